//! Validation: the broken-pipeline corpus, the example pipelines, the checked-in schema, and the
//! CLI's output formats and exit codes.

use std::path::Path;

use tsq::diagnostic::{Diagnostic, Origin};

use crate::common::{Project, repo, text};

/// `# expect: [FILE:]LINE: TEXT` on a corpus file's first line.
struct Expectation {
    file_suffix: Option<String>,
    line: usize,
    text: String,
}

fn expectation(path: &Path) -> Expectation {
    let first = std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string();
    let spec = first
        .strip_prefix("# expect: ")
        .unwrap_or_else(|| panic!("{}: first line must be `# expect: ...`", path.display()));
    let (location, text) = spec.split_once(": ").unwrap();
    let (file_suffix, line) = match location.rsplit_once(':') {
        Some((file, line)) => (Some(file.to_string()), line),
        None => (None, location),
    };
    Expectation {
        file_suffix,
        line: line.parse().unwrap(),
        text: text.to_string(),
    }
}

fn matches(d: &Diagnostic, e: &Expectation, pipeline: &Path) -> bool {
    let Origin::File { file, line, .. } = &d.origin else {
        return false;
    };
    let file_ok = match &e.file_suffix {
        Some(suffix) => file.to_string_lossy().ends_with(suffix.as_str()),
        None => file == pipeline,
    };
    file_ok && *line == e.line && (d.message.contains(&e.text) || d.to_string().contains(&e.text))
}

#[test]
fn every_broken_pipeline_yields_its_expected_error() {
    let dir = repo().join("tests/broken");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 25, "the corpus has {} files", files.len());
    let mut failures = Vec::new();
    for file in &files {
        let expected = expectation(file);
        match tsq::pipeline::load(file, &[]) {
            Ok(_) => failures.push(format!("{}: loaded without error", file.display())),
            Err(diagnostics) if !diagnostics.iter().any(|d| matches(d, &expected, file)) => {
                let got: Vec<String> = diagnostics.iter().map(|d| d.to_string()).collect();
                failures.push(format!(
                    "{}: expected line {} `{}`, got:\n    {}",
                    file.display(),
                    expected.line,
                    expected.text,
                    got.join("\n    ")
                ));
            }
            Err(_) => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn example_pipelines_are_valid() {
    let mut files: Vec<_> = std::fs::read_dir(repo().join("pipelines"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty());
    for file in files {
        if let Err(d) = tsq::pipeline::load(&file, &[]) {
            panic!("{} is invalid: {d:#?}", file.display());
        }
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            text.starts_with("# yaml-language-server: $schema=../schemas/pipeline.schema.json"),
            "{} lacks the schema modeline",
            file.display()
        );
    }
}

#[test]
fn checked_in_schema_is_current() {
    let generated = serde_json::to_string_pretty(&tsq::pipeline::json_schema()).unwrap() + "\n";
    let checked_in =
        std::fs::read_to_string(repo().join("schemas/pipeline.schema.json")).unwrap_or_default();
    assert!(
        generated == checked_in,
        "schemas/pipeline.schema.json is stale: regenerate with `cargo run -- schema > schemas/pipeline.schema.json`"
    );
}

#[test]
fn all_errors_of_a_file_are_reported_at_once() {
    let p = Project::new();
    std::fs::write(
        p.path().join("many.yaml"),
        "version: 1\nname: many\nmodel: {source: model.gguf, dtype: f64}\nexperts:\n  e: {dataset: nope, reward: nada, train: {steps: 0}}\nsurprise: 1\n",
    )
    .unwrap();
    let out = p.tsq(&["validate", "many.yaml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let all = text(&out);
    for needle in [
        "many.yaml:3:",
        "many.yaml:5:",
        "many.yaml:6:1: `surprise`: unknown key",
        "expected a number ≥ 1",
    ] {
        assert!(all.contains(needle), "missing `{needle}` in:\n{all}");
    }
}

#[test]
fn json_format_and_exit_codes() {
    let p = Project::new();
    let ok = p
        .tsq(&["validate", "pipeline.yaml", "--format", "json"])
        .output()
        .unwrap();
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
    let report: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(report["valid"], true);

    std::fs::write(
        p.path().join("bad.yaml"),
        "version: 1\nname: bad\nmodel: {source: model.gguf}\nseed: many\n",
    )
    .unwrap();
    let bad = p
        .tsq(&["validate", "pipeline.yaml", "bad.yaml", "--format", "json"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&bad.stdout).unwrap();
    assert_eq!(report["files"][0]["valid"], true);
    let error = &report["files"][1]["errors"][0];
    assert_eq!(
        (error["origin"]["line"].as_u64(), error["path"].as_str()),
        (Some(4), Some("seed")),
        "{report:#}"
    );

    let usage = p.tsq(&["validate"]).output().unwrap();
    assert_eq!(usage.status.code(), Some(2));
    let unknown_stage = p
        .tsq(&["plan", "pipeline.yaml", "--only", "data.letter"])
        .output()
        .unwrap();
    assert_eq!(unknown_stage.status.code(), Some(2));
    assert!(
        text(&unknown_stage).contains("did you mean `data.letters`?"),
        "{}",
        text(&unknown_stage)
    );
}

#[test]
fn overrides_apply_and_unknown_keys_are_errors() {
    let p = Project::new();
    let ok = p
        .tsq(&[
            "validate",
            "pipeline.yaml",
            "--set",
            "datasets.letters.split.train=0.25",
        ])
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", text(&ok));
    let unknown = p
        .tsq(&[
            "validate",
            "pipeline.yaml",
            "--set",
            "datasets.letters.split.trian=3",
        ])
        .output()
        .unwrap();
    assert_eq!(unknown.status.code(), Some(1));
    let out = text(&unknown);
    assert!(
        out.contains("--set datasets.letters.split.trian=3") && out.contains("unknown key `trian`"),
        "{out}"
    );
    let missing_parent = p
        .tsq(&[
            "validate",
            "pipeline.yaml",
            "--set",
            "experts.math.train.steps=20",
        ])
        .output()
        .unwrap();
    assert!(
        text(&missing_parent).contains("has no key `experts`"),
        "{}",
        text(&missing_parent)
    );
}

#[test]
fn endless_inputs_are_refused_instead_of_read() {
    let p = Project::new();
    std::os::unix::fs::symlink("/dev/zero", p.path().join("endless.yaml")).unwrap();
    let out = p.tsq(&["validate", "endless.yaml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("not a regular file"), "{}", text(&out));

    std::fs::remove_file(p.path().join("cards/letters.yaml")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", p.path().join("cards/letters.yaml")).unwrap();
    std::fs::remove_file(p.path().join("templates/plain.jinja")).unwrap();
    std::os::unix::fs::symlink("/dev/urandom", p.path().join("templates/plain.jinja")).unwrap();
    let out = p.tsq(&["validate", "pipeline.yaml"]).output().unwrap();
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(1), "{shown}");
    assert!(
        shown.contains("letters.yaml") && shown.contains("plain.jinja"),
        "{shown}"
    );
}

#[test]
fn many_errors_are_capped_in_text_and_complete_in_json() {
    let p = Project::new();
    let keys: String = (0..30_000)
        .map(|i| format!("unknown_key_{i}: {i}\n"))
        .collect();
    std::fs::write(
        p.path().join("noisy.yaml"),
        format!("version: 1\nname: noisy\nmodel: {{source: model.gguf}}\n{keys}"),
    )
    .unwrap();
    let out = p.tsq(&["validate", "noisy.yaml"]).output().unwrap();
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        shown.matches("error: ").count(),
        tsq::diagnostic::MAX_SHOWN,
        "{}",
        &shown[..500]
    );
    assert!(
        shown.contains("and 29950 more problem(s)"),
        "{}",
        &shown[shown.len() - 300..]
    );
    let json = p
        .tsq(&["validate", "noisy.yaml", "--format", "json"])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(
        report["files"][0]["errors"].as_array().unwrap().len(),
        30_000
    );
}

/// A preset fills the fields an expert's `train` does not write; written fields win.
#[test]
fn a_preset_fills_what_is_not_written() {
    use tsq::rl::spec::{Baseline, Preset, Rollout};
    let file = repo().join("pipelines/quickstart.yaml");
    let set = |s: &str| s.parse::<tsq::pipeline::Override>().unwrap();
    let pipeline = tsq::pipeline::load(
        &file,
        &[
            set("experts.reasoning.train.preset=paper"),
            set("experts.reasoning.train.lr=0.01"),
        ],
    )
    .unwrap();
    let train = &pipeline.spec.experts["reasoning"].train;
    assert_eq!(train.preset, Preset::Paper);
    assert_eq!(
        (train.samples_per_prompt, train.temperature, train.baseline),
        (1, 0.0, Baseline::None)
    );
    assert!(!train.skip_uniform_groups);
    assert_eq!(train.lr, 0.01, "a written field beats the preset");
    assert_eq!(
        train.rollout,
        Rollout::Options,
        "the file's own field beats the preset"
    );
    let plain = tsq::pipeline::load(&file, &[]).unwrap();
    assert_eq!(
        plain.spec.experts["reasoning"].train.baseline,
        Baseline::Rloo
    );
}

/// `TSQ_SIMD` caps the kernels' level; a value that names none is refused before any work, as a
/// usage error naming the variable and the levels, while a real level runs the command.
#[test]
fn a_simd_cap_that_names_no_level_is_refused() {
    let p = Project::new();
    let out = p
        .tsq(&["validate", "pipeline.yaml"])
        .env("TSQ_SIMD", "avx3")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let shown = text(&out);
    assert!(
        shown.contains("TSQ_SIMD=\"avx3\"") && shown.contains("portable, avx2, avx512"),
        "{shown}"
    );
    for level in ["portable", "avx2", "avx512"] {
        let out = p
            .tsq(&["validate", "pipeline.yaml"])
            .env("TSQ_SIMD", level)
            .output()
            .unwrap();
        assert!(out.status.success(), "{level}: {}", text(&out));
    }
}
