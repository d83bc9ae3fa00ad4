//! Records the git commit tsq is built from, when it is built from a git checkout, as
//! `TSQ_GIT_COMMIT` (reports and run logs name it beside the version).

use std::path::Path;
use std::process::Command;

fn main() {
    // Rerun when HEAD moves; only paths that exist (a missing one would rerun every build).
    for path in [".git/HEAD", ".git/refs/heads", ".git/packed-refs"] {
        if Path::new(path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if let Some(commit) = commit {
        println!("cargo:rustc-env=TSQ_GIT_COMMIT={commit}");
    }
}
