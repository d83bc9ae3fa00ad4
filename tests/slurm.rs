//! `tsq run --executor slurm` against the real one-node Slurm cluster that
//! `scripts/slurm-cluster.sh up` starts (scripts/test does): no mock of sbatch, squeue or
//! scancel. A small pipeline on the Qwen2 fixture with two independent experts.

use std::process::Command;

use crate::common::{Project, repo, text};

/// The cluster, for one test at a time: its two CPUs are what lets a test's independent jobs
/// run at once. Fails the test, saying how to start one, when no Slurm cluster answers here.
fn cluster() -> std::sync::MutexGuard<'static, ()> {
    static CLUSTER: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let turn = CLUSTER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let out = Command::new("sinfo").args(["-h", "-o", "%T"]).output();
    let states = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(
        states
            .lines()
            .any(|s| ["idle", "mixed", "allocated"].contains(&s.trim())),
        "no Slurm cluster answers here: start one with `scripts/slurm-cluster.sh up` (scripts/test does)"
    );
    turn
}

/// Decompose, data, two experts trained on one dataset (independent of each other, ~1.5 s of
/// training each in a debug build), an evaluation of both; each job takes one of the two CPUs.
/// `extra` adds YAML.
fn two_experts(p: &Project, extra: &str) {
    let model = repo().join("tests/fixtures/arch/qwen2");
    let pipeline = format!(
        "version: 1
name: tiny
seed: 3
run_dir: runs
model:
  source: {}
svd:
  targets: ['mlp\\.(gate|up)_proj']
datasets:
  letters:
    card: cards/letters.yaml
    prompt: templates/question.jinja
    split: {{train: 6, val: 2, test: 4}}
rewards:
  choice: {{kind: multiple_choice}}
experts:
  first:
    dataset: letters
    reward: choice
    train: {{rollout: options, steps: 400, prompts_per_step: 2, validate_every: 400, validate_limit: 2}}
  second:
    dataset: letters
    reward: choice
    train: {{rollout: options, steps: 401, prompts_per_step: 2, validate_every: 401, validate_limit: 2}}
evaluate:
  - {{dataset: letters, mode: loglik, reward: choice, with: [base, first, second]}}
executor:
  resources:
    default: {{cpus: 1}}
{extra}",
        model.display()
    );
    std::fs::write(p.path().join("two.yaml"), pipeline).unwrap();
}

/// A file without what two runs of the same stage differ in, their timing: an expert's
/// training summary records its wall time (`seconds_this_run`), a results table its items/s
/// (the last column).
fn without_timing(file: &str, bytes: Vec<u8>) -> Vec<u8> {
    if file.ends_with(".safetensors") {
        // safetensors: header length, JSON header (space-padded), tensor data.
        let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
        let mut meta: serde_json::Value =
            serde_json::from_str(header["__metadata__"]["tsq_expert"].as_str().unwrap()).unwrap();
        meta["training"]["summary"]["seconds_this_run"] = serde_json::Value::Null;
        let mut out = meta.to_string().into_bytes();
        out.extend_from_slice(&bytes[8 + len..]);
        return out;
    }
    let text = String::from_utf8_lossy(&bytes);
    let rows = text
        .lines()
        .map(|l| match l.trim_end_matches('|').rsplit_once('|') {
            Some((row, _items_per_s)) if l.starts_with('|') => row,
            _ => l,
        });
    rows.collect::<Vec<_>>().join("\n").into_bytes()
}

/// Each stage's `stage_started` and `stage_finished` times in the run's event log.
fn spans(p: &Project) -> std::collections::BTreeMap<String, (f64, f64)> {
    let events = std::fs::read_to_string(p.run_dir().join("events.jsonl")).unwrap();
    let mut spans = std::collections::BTreeMap::new();
    for line in events.lines() {
        let e: serde_json::Value = serde_json::from_str(line).unwrap();
        let (Some(stage), Some(ts)) = (e["stage"].as_str(), e["ts"].as_f64()) else {
            continue;
        };
        let span = spans.entry(stage.to_string()).or_insert((0.0, 0.0));
        match e["event"].as_str() {
            Some("stage_started") => span.0 = ts,
            Some("stage_finished") => span.1 = ts,
            _ => {}
        }
    }
    spans
}

/// Through Slurm the run ends with the outputs a local run makes (cache keys, expert files
/// and evaluation results byte for byte); the two experts train at the same time; a second
/// run finds everything cached and submits nothing.
#[test]
fn slurm_jobs_make_what_a_local_run_makes_with_independent_stages_at_once() {
    let _cluster = cluster();
    let (local, cluster_run) = (Project::new(), Project::new());
    for p in [&local, &cluster_run] {
        two_experts(p, "");
    }
    local.run_ok(&["run", "two.yaml"]);
    // What would be submitted, with each job's options.
    let plan = text(&cluster_run.run_ok(&["plan", "two.yaml", "--executor", "slurm"]));
    assert!(
        plan.contains("sbatch --cpus-per-task=1 --kill-on-invalid-dep=yes"),
        "{plan}"
    );
    let plan = cluster_run.run_ok(&["plan", "two.yaml", "--format", "json"]);
    let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    assert!(plan["stages"][0].get("sbatch").is_none(), "local: {plan}");
    let out = cluster_run.run_ok(&["run", "two.yaml", "--executor", "slurm"]);
    let log = text(&out);
    assert!(log.contains("as Slurm jobs"), "{log}");
    assert!(log.contains("  done    train.second (job "), "{log}");

    let stages = [
        "model",
        "data.letters",
        "decompose",
        "train.first",
        "train.second",
        "eval.letters",
    ];
    for stage in stages {
        let manifest = |p: &Project| -> serde_json::Value {
            let path = p.run_dir().join(stage).join("manifest.json");
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
        };
        assert_eq!(
            manifest(&local)["key"],
            manifest(&cluster_run)["key"],
            "{stage}"
        );
    }
    for file in [
        "train.first/expert.safetensors",
        "train.second/expert.safetensors",
        "eval.letters/results.md",
    ] {
        let bytes =
            |p: &Project| without_timing(file, std::fs::read(p.run_dir().join(file)).unwrap());
        assert!(bytes(&local) == bytes(&cluster_run), "{file} differs");
    }

    let spans = spans(&cluster_run);
    let (first, second) = (spans["train.first"], spans["train.second"]);
    assert!(
        first.0 < second.1 && second.0 < first.1,
        "the experts did not train at the same time: {first:?} {second:?}"
    );

    let again = text(&cluster_run.run_ok(&["run", "two.yaml", "--executor", "slurm"]));
    assert!(!again.contains("queued"), "{again}");

    // Forced, a stage and what follows it run again in jobs of their own.
    let started = |stage: &str| -> f64 {
        let path = cluster_run.run_dir().join(stage).join("manifest.json");
        let manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        manifest["started_unix"].as_f64().unwrap()
    };
    let before = started("eval.letters");
    let forced = text(&cluster_run.run_ok(&[
        "run",
        "two.yaml",
        "--executor",
        "slurm",
        "--force",
        "train.second",
    ]));
    assert!(forced.contains("  done    train.second (job "), "{forced}");
    assert!(forced.contains("  done    eval.letters (job "), "{forced}");
    assert!(!forced.contains("train.first"), "{forced}");
    assert!(started("eval.letters") > before);
}

/// A stage that fails on the cluster says why (its job's log) and stops only what needs it:
/// the other expert and nothing after the failed one. Fixed, a rerun submits only what is left.
#[test]
fn a_failed_job_blocks_only_its_dependents_and_a_rerun_resumes() {
    let _cluster = cluster();
    let p = Project::new();
    two_experts(
        &p,
        "  # the second expert's data fails until the template is fixed
",
    );
    // A dataset of its own for the second expert, whose target template breaks every record.
    let yaml = std::fs::read_to_string(p.path().join("two.yaml"))
        .unwrap()
        .replace(
            "  second:\n    dataset: letters",
            "  second:\n    dataset: broken",
        )
        .replace(
            "rewards:",
            "  broken:\n    card: cards/letters.yaml\n    prompt: templates/question.jinja\n    \
             target: templates/broken.jinja\n    split: {train: 6, val: 2, test: 4}\nrewards:",
        )
        .replace("with: [base, first, second]", "with: [base, first]");
    std::fs::write(p.path().join("two.yaml"), yaml).unwrap();
    std::fs::write(p.path().join("templates/broken.jinja"), "{{ missing }}").unwrap();

    let out = p
        .tsq(&["run", "two.yaml", "--executor", "slurm"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let log = text(&out);
    assert!(log.contains("  failed  data.broken (job "), "{log}");
    assert!(log.contains("records are bad"), "the job's log tail: {log}");
    assert!(
        log.contains("  skipped train.second: a stage it needs failed"),
        "{log}"
    );
    assert!(log.contains("  done    eval.letters"), "{log}");
    assert!(
        log.contains("2 stage(s) did not finish on the cluster"),
        "{log}"
    );

    std::fs::write(p.path().join("templates/broken.jinja"), "{{ 'AB'[gold] }}").unwrap();
    let again = text(&p.run_ok(&["run", "two.yaml", "--executor", "slurm"]));
    let submitted: Vec<&str> = again
        .lines()
        .filter_map(|l| l.strip_prefix("  queued  "))
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    assert_eq!(submitted, ["data.broken", "train.second"], "{again}");
}

/// Reads `child`'s stderr until a line contains `marker`; that line.
fn wait_for_line(
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
    marker: &str,
) -> String {
    for line in lines {
        let line = line.unwrap();
        if line.contains(marker) {
            return line;
        }
    }
    panic!("the driver ended without printing `{marker}`");
}

/// The driver killed after submitting leaves its jobs to Slurm; run again, it adopts them (by
/// name) rather than submitting twice. A training job cancelled mid-way (`scancel`) fails its
/// stage; run again, the new job resumes from the stage's checkpoint.
#[test]
fn a_killed_driver_does_not_submit_twice_and_a_cancelled_job_resumes() {
    use std::io::BufRead;
    let _cluster = cluster();
    let p = Project::new();
    two_experts(&p, "");
    // One long expert (~10 s in a debug build), checkpointed every 10 steps.
    let yaml = std::fs::read_to_string(p.path().join("two.yaml"))
        .unwrap()
        .replace(
            "steps: 400, prompts_per_step: 2, validate_every: 400,",
            "steps: 2000, prompts_per_step: 2, validate_every: 2000, checkpoint_every: 10,",
        );
    std::fs::write(p.path().join("two.yaml"), yaml).unwrap();
    let driver = || {
        p.tsq(&["run", "two.yaml", "--executor", "slurm"])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let job_of = |line: &str| -> String {
        let after = line.split("(job ").nth(1).unwrap();
        after.split([',', ')']).next().unwrap().to_string()
    };

    let mut first = driver();
    let mut lines = std::io::BufReader::new(first.stderr.take().unwrap()).lines();
    let job = job_of(&wait_for_line(&mut lines, "queued  train.first (job "));
    wait_for_line(&mut lines, "queued  eval.letters (job ");
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();

    let mut second = driver();
    let mut lines = std::io::BufReader::new(second.stderr.take().unwrap()).lines();
    let adopted = wait_for_line(&mut lines, "queued  train.first (job ");
    assert_eq!(job_of(&adopted), job, "{adopted}");
    assert!(adopted.contains("submitted before"), "{adopted}");
    let checkpoints = p.run_dir().join(".checkpoints/train.first");
    let started = std::time::Instant::now();
    while std::fs::read_dir(&checkpoints)
        .map(|keys| {
            keys.flatten()
                .all(|k| std::fs::read_dir(k.path()).map_or(0, |f| f.count()) == 0)
        })
        .unwrap_or(true)
    {
        assert!(
            started.elapsed().as_secs() < 120,
            "no checkpoint of train.first"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let cancelled = Command::new("scancel").arg(&job).status().unwrap();
    assert!(cancelled.success());
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    assert_eq!(second.wait().unwrap().code(), Some(1), "{rest:?}");
    let rest = rest.join("\n");
    assert!(
        rest.contains(&format!("failed  train.first (job {job}, CANCELLED)")),
        "{rest}"
    );
    assert!(rest.contains("skipped eval.letters"), "{rest}");

    let third = text(&p.run_ok(&["run", "two.yaml", "--executor", "slurm"]));
    assert!(third.contains("  done    eval.letters"), "{third}");
    let resumed = std::fs::read_dir(p.run_dir().join(".slurm"))
        .unwrap()
        .flatten()
        .filter(|f| f.file_name().to_string_lossy().starts_with("train.first-"))
        .map(|f| std::fs::read_to_string(f.path()).unwrap())
        .filter(|log| log.contains("resuming `train.first` after step"))
        .count();
    assert_eq!(
        resumed, 1,
        "one job of train.first resumed from a checkpoint"
    );
}

/// `tsq export slurm`: the jobs as plain scripts and a `submit.sh`; submitted by hand, they
/// finish the run (a plan after finds every stage cached).
#[test]
fn exported_scripts_submitted_by_hand_finish_the_run() {
    let _cluster = cluster();
    let p = Project::new();
    two_experts(&p, "");
    let out = text(&p.run_ok(&["export", "slurm", "two.yaml", "jobs"]));
    assert!(out.contains("6 job scripts and submit.sh"), "{out}");
    let script = std::fs::read_to_string(p.path().join("jobs/train.first.sh")).unwrap();
    assert!(script.contains("#SBATCH --cpus-per-task=1"), "{script}");
    assert!(script.contains("'--only' 'train.first'"), "{script}");
    let refused = p
        .tsq(&["export", "slurm", "two.yaml", "jobs"])
        .output()
        .unwrap();
    assert_eq!(
        refused.status.code(),
        Some(1),
        "a non-empty directory is refused"
    );

    let submitted = Command::new("sh")
        .arg(p.path().join("jobs/submit.sh"))
        .current_dir(p.path())
        .env("TSQ_HOME", p.path().join("home"))
        .output()
        .unwrap();
    assert!(submitted.status.success(), "{}", text(&submitted));
    let jobs: Vec<String> = String::from_utf8_lossy(&submitted.stdout)
        .lines()
        .map(|l| l.rsplit(' ').next().unwrap().to_string())
        .collect();
    assert_eq!(jobs.len(), 6, "{jobs:?}");
    let started = std::time::Instant::now();
    loop {
        let queue = Command::new("squeue")
            .args(["--me", "-h", "-o", "%i", "-j", &jobs.join(",")])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&queue.stdout).trim().is_empty() {
            break;
        }
        assert!(started.elapsed().as_secs() < 180, "the jobs did not end");
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let plan = String::from_utf8_lossy(&p.run_ok(&["plan", "two.yaml"]).stdout).into_owned();
    assert_eq!(plan.matches("  cached").count(), 6, "{plan}");
}

/// `--detach` submits and returns; `tsq plan --executor slurm` then shows the stages' live
/// jobs, and every stage cached once they have ended.
#[test]
fn a_detached_run_is_followed_by_plan() {
    let _cluster = cluster();
    let p = Project::new();
    two_experts(&p, "");
    let out = text(&p.run_ok(&["run", "two.yaml", "--executor", "slurm", "--detach"]));
    assert!(out.contains("submitted; `tsq plan`"), "{out}");
    let plan = text(&p.run_ok(&["plan", "two.yaml", "--executor", "slurm"]));
    assert!(plan.contains("eval.letters  to run (job "), "{plan}");
    let started = std::time::Instant::now();
    loop {
        let plan = String::from_utf8_lossy(&p.run_ok(&["plan", "two.yaml"]).stdout).into_owned();
        if plan.matches("  cached").count() == 6 {
            break;
        }
        assert!(started.elapsed().as_secs() < 180, "not finished: {plan}");
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

/// Ctrl-C at the driver cancels the jobs it submitted (`scancel`) and says so; none is left.
#[test]
fn an_interrupted_driver_cancels_its_jobs() {
    use std::io::BufRead;
    let _cluster = cluster();
    let p = Project::new();
    two_experts(&p, "");
    let mut driver = p
        .tsq(&["run", "two.yaml", "--executor", "slurm"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(driver.stderr.take().unwrap()).lines();
    wait_for_line(&mut lines, "queued  eval.letters (job ");
    // SAFETY: signalling a child this test started.
    unsafe { libc::kill(driver.id() as i32, libc::SIGINT) };
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    assert_eq!(driver.wait().unwrap().code(), Some(130), "{rest:?}");
    let cancelled = rest
        .iter()
        .find(|l| l.starts_with("cancelled jobs "))
        .unwrap();
    let ids = cancelled
        .trim_start_matches("cancelled jobs ")
        .replace(' ', "");
    std::thread::sleep(std::time::Duration::from_secs(2));
    let live = Command::new("squeue")
        .args([
            "--me",
            "-h",
            "-t",
            "PENDING,RUNNING",
            "-o",
            "%i",
            "-j",
            &ids,
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&live.stdout).trim(),
        "",
        "{cancelled}"
    );
}
