//! Evaluation on the real model: `loglik` accuracies agree with an independent PyTorch run item by
//! item, `generate` mode judges real answers, results files and the printed table hold the same
//! numbers, a killed evaluation resumes from its checkpoint, and `--only` accepts finished
//! dependencies.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::common::{repo, shared_tsq_home, text};

fn tsq(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tsq"))
        .args(args)
        .env("TSQ_HOME", shared_tsq_home())
        .current_dir(dir)
        .output()
        .unwrap()
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = tsq(dir, args);
    assert!(out.status.success(), "tsq {args:?}:\n{}", text(&out));
    text(&out)
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Option log-likelihood sums per item, from samples.parquet.
fn sample_sums(stage_dir: &Path) -> BTreeMap<String, Vec<f64>> {
    use polars::prelude::*;
    let file = std::fs::File::open(stage_dir.join("samples.parquet")).unwrap();
    let df = ParquetReader::new(file).finish().unwrap();
    let ids = df.column("id").unwrap().str().unwrap().clone();
    let sums = df.column("option_logliks").unwrap().str().unwrap().clone();
    ids.iter()
        .zip(sums.iter())
        .map(|(id, s)| {
            (
                id.unwrap().to_string(),
                serde_json::from_str(s.unwrap()).unwrap(),
            )
        })
        .collect()
}

#[test]
fn loglik_agrees_with_pytorch_and_generate_judges_answers() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = repo().join("pipelines/eval_base.yaml");
    let pipeline = pipeline.to_str().unwrap();
    let run_dir = dir.path().join("runs");
    let set_run_dir = format!("run_dir={}", run_dir.display());
    let base = [
        "--set",
        &set_run_dir,
        "--set",
        "evaluate.4.limit=40",
        "--set",
        "evaluate.1.limit=4",
        "--set",
        "evaluate.1.max_new_tokens=12",
    ];
    let run = |extra: &[&str]| {
        let mut args = vec!["run", pipeline];
        args.extend(base);
        args.extend(extra);
        ok(dir.path(), &args)
    };
    // `--only` with finished dependencies (the model stage) runs what was asked.
    run(&["--only", "model"]);
    run(&["--only", "data.logic", "--only", "data.arc_easy_mc"]);
    let out = run(&["--only", "eval.logic", "--only", "eval.arc_easy_mc"]);
    let stage = run_dir.join("eval_base/eval.logic");
    let results = json(&stage.join("results.json"));
    let acc = &results["results"]["base"]["acc"];
    assert_eq!(acc["n"], 40);
    assert!(out.contains("| base | acc |"), "{out}");
    let shown = format!("{:.2}", 100.0 * acc["value"].as_f64().unwrap());
    assert!(out.contains(&shown), "the table shows {shown}: {out}");

    let fixtures = repo().join("tests/fixtures");
    let peer: BTreeMap<String, Vec<f64>> =
        std::fs::read_to_string(fixtures.join("peer_logic40_sums.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                let sums = v["logprob_sums"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect();
                (v["id"].as_str().unwrap().to_string(), sums)
            })
            .collect();
    let ours = sample_sums(&stage);
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        peer.keys().collect::<Vec<_>>()
    );
    let best = |v: &[f64]| (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap();
    for (id, sums) in &ours {
        let theirs = &peer[id];
        for (a, b) in sums.iter().zip(theirs) {
            assert!(
                (a - b).abs() < 2e-3,
                "item {id}: {sums:?} vs PyTorch {theirs:?}"
            );
        }
        assert_eq!(best(sums), best(theirs), "item {id}");
    }
    let peer_result = json(&fixtures.join("peer_logic40_result.json"));
    assert_eq!(
        acc["value"].as_f64().unwrap(),
        peer_result["acc"].as_f64().unwrap()
    );
    let norm = results["results"]["base"]["acc_norm"]["value"]
        .as_f64()
        .unwrap();
    assert_eq!(norm, peer_result["acc_norm"].as_f64().unwrap());

    let mc = json(&run_dir.join("eval_base/eval.arc_easy_mc/results.json"));
    let base_mc = &mc["results"]["base"];
    assert_eq!(base_mc["acc"]["n"], 4);
    assert!(base_mc["new_tokens"].as_u64().unwrap() > 0);
}

#[test]
fn a_killed_evaluation_resumes_from_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = repo().join("pipelines/eval_base.yaml");
    let pipeline = pipeline.to_str().unwrap();
    let set_run_dir = format!("run_dir={}", dir.path().join("runs").display());
    let args = |extra: &[&'static str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "run",
            pipeline,
            "--set",
            &set_run_dir,
            "--set",
            "evaluate.5.limit=6",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    fn as_refs(a: &[String]) -> Vec<&str> {
        a.iter().map(String::as_str).collect()
    }
    ok(
        dir.path(),
        &as_refs(&args(&["--only", "model", "--only", "data.pattern"])),
    );
    // What a killed attempt leaves: the checkpoint of one finished item, under the stage's key.
    let mut plan_args = args(&["--only", "eval.pattern"]);
    plan_args[0] = "plan".into();
    plan_args.extend(["--format".to_string(), "json".to_string()]);
    let plan: Value = serde_json::from_str(
        &String::from_utf8(tsq(dir.path(), &as_refs(&plan_args)).stdout).unwrap(),
    )
    .unwrap();
    let key = plan["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == "eval.pattern")
        .unwrap()["key"]
        .as_str()
        .unwrap()
        .to_string();
    let records =
        tsq::stages::data::read_stored(&dir.path().join("runs/eval_base/data.pattern")).unwrap();
    let first = records.iter().find(|r| r.split == "test").unwrap();
    let checkpoint = dir
        .path()
        .join("runs/eval_base/.checkpoints/eval.pattern")
        .join(&key);
    std::fs::create_dir_all(&checkpoint).unwrap();
    let done = serde_json::json!({
        "with": "base", "id": first.id, "prompt": "from the killed attempt", "completion": null,
        "option_logliks": [0.0], "extracted": "Z", "gold": "Z", "verdict": "correct", "reward": 1.0,
        "correct_norm": true, "detail": null, "finish_reason": null, "prompt_tokens": 1, "new_tokens": 1
    });
    std::fs::write(
        checkpoint.join("base.jsonl"),
        format!("{done}\n{{\"torn\": "),
    )
    .unwrap();
    ok(dir.path(), &as_refs(&args(&["--only", "eval.pattern"])));
    let results = json(&dir.path().join("runs/eval_base/eval.pattern/results.json"));
    let base = &results["results"]["base"];
    assert_eq!(base["acc"]["n"], 6);
    assert_eq!(
        base["items_timed"], 5,
        "the checkpointed item is not evaluated again"
    );
    assert!(
        !checkpoint.exists(),
        "a committed stage's checkpoints are removed"
    );
}

/// kill -9 after every item was evaluated but before the stage committed: the rerun takes all
/// of them from the checkpoint and evaluates none again.
#[test]
fn an_evaluation_killed_before_commit_resumes_without_redoing_items() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let pipeline = repo().join("pipelines/eval_base.yaml");
    let set_run_dir = format!("run_dir={}", dir.path().join("runs").display());
    let args = [
        "run",
        pipeline.to_str().unwrap(),
        "--set",
        &set_run_dir,
        "--set",
        "evaluate.6.limit=4",
        "--only",
        "model",
        "--only",
        "data.arithmetic",
        "--only",
        "eval.arithmetic",
    ];
    let mut child = Command::new(env!("CARGO_BIN_EXE_tsq"))
        .args(args)
        .env("TSQ_HOME", shared_tsq_home())
        .env("TSQ_TEST_STALL_BEFORE_COMMIT", "eval.arithmetic")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    for line in stderr.lines() {
        if line
            .unwrap()
            .contains("stalling before commit of eval.arithmetic")
        {
            break;
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let stage = dir.path().join("runs/eval_base/eval.arithmetic");
    assert!(!stage.exists(), "an unfinished stage must not appear");
    ok(dir.path(), &args);
    let results = json(&stage.join("results.json"));
    assert_eq!(results["results"]["base"]["acc"]["n"], 4);
    assert_eq!(results["results"]["base"]["items_timed"], 0);
}
