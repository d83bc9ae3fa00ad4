//! Snapshots of what users read: `--help` of tsq and every subcommand, the validation errors of
//! the broken-pipeline corpus, `tsq plan` of every shipped pipeline, and the results table.
//! A change to any of them shows up as a diff to review (`cargo insta review`, or rerun with
//! `INSTA_UPDATE=always` and read the diff of `tests/snapshots/`).

use std::process::Command;

use crate::common::repo;

/// stdout, stderr and exit code of `tsq args` run in the repository with an empty `$TSQ_HOME`
/// (so nothing depends on what this machine has fetched).
fn tsq(args: &[&str]) -> String {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tsq"))
        .args(args)
        .current_dir(repo())
        .env("TSQ_HOME", home.path())
        .env("NO_COLOR", "1")
        // clap wraps help to COLUMNS when set: the same width everywhere.
        .env("COLUMNS", "100")
        .output()
        .unwrap();
    format!(
        "exit: {}\n--- stdout\n{}--- stderr\n{}",
        out.status.code().map_or("signal".into(), |c| c.to_string()),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

const SUBCOMMANDS: &[&[&str]] = &[
    &["validate"],
    &["plan"],
    &["run"],
    &["fetch"],
    &["generate"],
    &["chat"],
    &["serve"],
    &["score"],
    &["classify"],
    &["report"],
    &["expert"],
    &["expert", "inspect"],
    &["expert", "combine"],
    &["expert", "export"],
    &["bench"],
    &["schema"],
];

#[test]
fn help() {
    insta::assert_snapshot!("help", tsq(&["--help"]));
    for sub in SUBCOMMANDS {
        let mut args = sub.to_vec();
        args.push("--help");
        insta::assert_snapshot!(format!("help-{}", sub.join("-")), tsq(&args));
    }
}

#[test]
fn validation_errors_of_the_broken_corpus() {
    let mut files: Vec<String> = std::fs::read_dir(repo().join("tests/broken"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    files.sort();
    let all: String = files
        .iter()
        .map(|f| {
            format!(
                "=== {f}\n{}\n",
                tsq(&["validate", &format!("tests/broken/{f}")])
            )
        })
        .collect();
    insta::assert_snapshot!("broken", all);
}

/// Planned into an empty run directory: what a fresh checkout shows, whatever runs the
/// developer's `runs/` holds (the README's quickstart writes there).
#[test]
fn plan_of_every_shipped_pipeline() {
    let runs = tempfile::tempdir().unwrap();
    let root = runs.path().display().to_string();
    for name in ["quickstart", "experts", "eval_base", "transformer2"] {
        let file = format!("pipelines/{name}.yaml");
        let run_dir = format!("run_dir={root}");
        let plan = tsq(&["plan", &file, "--set", &run_dir]).replace(&root, "<runs>");
        insta::assert_snapshot!(format!("plan-{name}"), plan);
    }
}

#[test]
fn the_results_table() {
    let file = repo().join("tests/fixtures/report_run/eval.logic/results.json");
    let results: tsq::eval::results::Results =
        serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    insta::assert_snapshot!("results-table", results.markdown());
}
