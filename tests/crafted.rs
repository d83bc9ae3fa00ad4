//! Crafted files through the commands users run: each is a clear error naming the file (or,
//! for a report, a section said to be missing), never a hang, a panic or a blown memory. The
//! mechanisms have unit tests beside them (fsutil, gguf_header, jinja, data::read, charts,
//! pip); these check that every command reaches them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::{repo, text};

/// Runs `tsq args`, failing the test if it is still running after 60 s (a hang).
fn tsq(args: &[&std::ffi::OsStr], home: &Path) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tsq"))
        .args(args)
        .env("TSQ_HOME", home)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("tsq {args:?} hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn fifo(path: &Path) -> PathBuf {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    path.to_path_buf()
}

/// An error exit (1 or 2, never a signal or a panic's 101) whose message names `name` and says
/// `why`.
fn assert_clear_error(out: &Output, name: &str, why: &str) {
    let said = text(out);
    assert!(
        matches!(out.status.code(), Some(1 | 2)),
        "{:?}: {said}",
        out.status
    );
    assert!(said.contains(name) && said.contains(why), "{said}");
    assert!(!said.contains("panicked"), "{said}");
}

#[test]
fn endless_files_are_refused_by_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let pipe = fifo(&dir.path().join("pipeline.yaml"));
    let expert = fifo(&dir.path().join("expert.safetensors"));
    for (args, name) in [
        (vec!["validate".as_ref(), pipe.as_os_str()], "pipeline.yaml"),
        (vec!["validate".as_ref(), "/dev/zero".as_ref()], "/dev/zero"),
        (
            vec!["expert".as_ref(), "inspect".as_ref(), expert.as_os_str()],
            "expert.safetensors",
        ),
        (
            vec!["expert".as_ref(), "inspect".as_ref(), "/dev/zero".as_ref()],
            "/dev/zero",
        ),
    ] {
        let out = tsq(&args, &home);
        assert_clear_error(&out, name, "not a regular file");
    }
}

/// A report of a run directory whose logs are endless (a FIFO, /dev/zero) renders, saying what
/// it could not read.
#[test]
fn a_report_over_endless_run_files_says_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let status = Command::new("cp")
        .arg("-r")
        .arg(repo().join("tests/fixtures/report_run"))
        .arg(&run)
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::remove_file(run.join("events.jsonl")).unwrap();
    fifo(&run.join("events.jsonl"));
    let results = run.join("eval.logic/results.json");
    std::fs::remove_file(&results).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &results).unwrap();
    let out_dir = dir.path().join("out");
    let out = tsq(
        &[
            "report".as_ref(),
            run.as_os_str(),
            "--out".as_ref(),
            out_dir.as_os_str(),
        ],
        &dir.path().join("home"),
    );
    assert!(out.status.success(), "{}", text(&out));
    let md = std::fs::read_to_string(out_dir.join("report.md")).unwrap();
    // /dev/zero in place of an output fails the manifest's hash check before anything reads
    // it; the endless event log leaves the provenance unrecorded.
    assert!(
        md.contains("`eval.logic`: its outputs do not match its manifest"),
        "{md}"
    );
    assert!(md.contains("tsq that ran it: not recorded"), "{md}");
}

/// A GGUF whose header would crash candle's reader: a located error from `generate`.
#[test]
fn a_crafted_gguf_is_an_error_naming_the_file() {
    use candle_core::quantized::gguf_file::{Value, write};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("aligned-to-zero.gguf");
    let mut file = std::fs::File::create(&path).unwrap();
    write(&mut file, &[("general.alignment", &Value::U32(0))], &[]).unwrap();
    drop(file);
    let out = tsq(
        &[
            "generate".as_ref(),
            "--model".as_ref(),
            path.as_os_str(),
            "hello".as_ref(),
        ],
        &dir.path().join("home"),
    );
    assert_clear_error(&out, "aligned-to-zero.gguf", "`general.alignment` is 0");
}
