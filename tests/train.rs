//! Training experts on the real model: the quickstart's `train.reasoning` stage runs two steps
//! with every metric finite and its expert is evaluated beside the base model; a training run
//! killed with SIGKILL resumes from its checkpoint and ends with the same vectors, bit for bit,
//! as an uninterrupted run.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::common::{repo, shared_tsq_home, text};

/// A small quickstart run: `steps` steps of 2 prompts, 4 validation items, 8 test items.
fn args(run_dir: &Path, steps: u32, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "run",
        repo().join("pipelines/quickstart.yaml").to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    for set in [
        format!("run_dir={}", run_dir.display()),
        format!("experts.reasoning.train.steps={steps}"),
        "experts.reasoning.train.prompts_per_step=2".into(),
        "experts.reasoning.train.validate_limit=4".into(),
        "experts.reasoning.train.checkpoint_every=1".into(),
        "evaluate.0.limit=8".into(),
    ] {
        args.extend(["--set".into(), set]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// The stages before training, to run alone first.
const UPSTREAM: [&str; 6] = [
    "--only",
    "model",
    "--only",
    "data.logic",
    "--only",
    "decompose",
];

/// The metrics lines of a run's `train.reasoning` stage.
fn metrics(run_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(stage(run_dir, "train.reasoning").join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Each of `keys` (JSON pointers) is a finite number in `line`.
fn assert_finite(line: &Value, keys: &[&str], case: &str) {
    for key in keys {
        let v = line.pointer(key).and_then(Value::as_f64);
        assert!(v.is_some_and(f64::is_finite), "{case}: {key} in {line}");
    }
}

fn tsq(args: &[String]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tsq"));
    cmd.args(args).env("TSQ_HOME", shared_tsq_home());
    cmd
}

fn run_ok(args: &[String]) -> String {
    let out = tsq(args).output().unwrap();
    assert!(out.status.success(), "tsq {args:?}:\n{}", text(&out));
    text(&out)
}

fn stage(run_dir: &Path, id: &str) -> PathBuf {
    run_dir.join("quickstart").join(id)
}

/// The trained vectors of an expert file, by target.
fn vectors(file: &Path) -> Vec<(String, Vec<f32>)> {
    let expert = tsq::svf::expert::Expert::load(file).unwrap();
    expert
        .vectors
        .iter()
        .map(|(name, (z, _))| (name.clone(), z.to_vec1::<f32>().unwrap()))
        .collect()
}

#[test]
fn real_model_trains_with_finite_metrics_and_its_expert_is_evaluated() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_ok(&args(dir.path(), 2, &[]));
    let train = stage(dir.path(), "train.reasoning");
    let lines = metrics(dir.path());
    assert_eq!(lines.len(), 2, "{lines:?}");
    for line in &lines {
        let keys = [
            "/loss",
            "/grad_norm",
            "/lr",
            "/rollout/reward",
            "/rollout/entropy",
            "/rollout/completion_length",
            "/time_train_s",
            "/tokens_per_s",
        ];
        assert_finite(line, &keys, "options");
    }
    assert!(lines[1]["val_accuracy"].as_f64().is_some(), "{}", lines[1]);
    // One validation (after the last step): the kept expert is the last vector.
    let training: Value =
        serde_json::from_str(&std::fs::read_to_string(train.join("training.json")).unwrap())
            .unwrap();
    assert_eq!(training["kept_step"], 2, "{training}");
    assert_eq!(
        vectors(&train.join("expert.safetensors")),
        vectors(&train.join("last.safetensors"))
    );
    let results: Value = serde_json::from_str(
        &std::fs::read_to_string(stage(dir.path(), "eval.logic").join("results.json")).unwrap(),
    )
    .unwrap();
    for with in ["base", "reasoning"] {
        assert_eq!(results["results"][with]["acc"]["n"], 8, "{results}");
    }
    assert!(
        results["inputs"]["expert.reasoning"].is_string(),
        "{results}"
    );
    assert!(out.contains("| reasoning | acc |"), "{out}");
}

#[test]
fn a_killed_training_resumes_and_ends_as_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let (straight, killed) = (dir.path().join("straight"), dir.path().join("killed"));
    let only = ["--only", "train.reasoning"];
    run_ok(&args(&straight, 4, &[]));
    // The killed run: upstream stages first, then training until its second checkpoint.
    run_ok(&args(&killed, 4, &UPSTREAM));
    let mut child = tsq(&args(&killed, 4, &only))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let checkpoints = killed.join("quickstart/.checkpoints/train.reasoning");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    loop {
        let step = std::fs::read_dir(&checkpoints)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("state.json")).ok())
            .filter_map(|t| serde_json::from_str::<Value>(&t).ok())
            .filter_map(|v| v["step"].as_u64())
            .max();
        if step.is_some_and(|s| s >= 2) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!stage(&killed, "train.reasoning").exists());
    let out = run_ok(&args(&killed, 4, &only));
    assert!(
        out.contains("resuming `train.reasoning` after step"),
        "{out}"
    );
    for file in ["last.safetensors", "expert.safetensors"] {
        assert!(
            vectors(&stage(&straight, "train.reasoning").join(file))
                == vectors(&stage(&killed, "train.reasoning").join(file)),
            "{file} differs after resuming"
        );
    }
}

/// Generated rollouts (sampled answers judged by a composite reward, with the per-token KL
/// penalty) and the supervised ablation each train a step on the real model with finite metrics.
#[test]
fn generated_and_supervised_rollouts_train_on_the_real_model() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &[&str]); 2] = [
        (
            "generate",
            &[
                "experts.reasoning.train.rollout=generate",
                "experts.reasoning.train.samples_per_prompt=2",
                "experts.reasoning.train.max_new_tokens=8",
                "experts.reasoning.train.skip_uniform_groups=false",
                "experts.reasoning.train.kl=0.1",
                "rewards.both={kind: composite, parts: [{reward: choice}]}",
                "experts.reasoning.reward=both",
            ],
        ),
        (
            "sft",
            &[
                "experts.reasoning.train.objective=sft",
                "datasets.logic.target=../templates/targets/choice_text.jinja",
            ],
        ),
    ];
    for (name, sets) in cases {
        let run_dir = dir.path().join(name);
        let mut extra = UPSTREAM.to_vec();
        extra.extend(["--only", "train.reasoning"]);
        for set in sets {
            extra.extend(["--set", set]);
        }
        run_ok(&args(&run_dir, 1, &extra));
        let line = &metrics(&run_dir)[0];
        let keys = [
            "/loss",
            "/grad_norm",
            "/rollout/completion_length",
            "/time_rollout_s",
            "/time_reward_s",
            "/val_accuracy",
        ];
        assert_finite(line, &keys, name);
        assert!(
            line["rollout"]["completion_length"].as_f64() > Some(0.0),
            "{name}: {line}"
        );
        assert!(line["trained_tokens"].as_u64() > Some(0), "{name}: {line}");
        if name == "generate" {
            // The initial sigmoid vector (m ≈ 0.525, rescaled) is not the base model.
            let kl = line["rollout"]["kl"].as_f64().unwrap();
            assert!(kl.is_finite() && kl > 0.0, "KL estimate {kl}: {line}");
            let entropy = line["rollout"]["entropy"].as_f64().unwrap();
            assert!(
                entropy.is_finite() && entropy > 0.0,
                "entropy {entropy}: {line}"
            );
            // A composite reward reports each part; one part of weight 1 is the whole reward.
            let part = line["rollout"]["rewards"]["choice"].as_f64();
            assert_eq!(part, line["rollout"]["reward"].as_f64(), "{line}");
        }
    }
}
