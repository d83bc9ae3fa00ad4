//! tsq's version as `TSQ_VERSION`: the package version, with the git commit it is built from
//! when built from a git checkout (`0.1.0 (abc123def456)`), for `--version`, run logs and
//! reports.

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
    let package = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    let version = match commit {
        Some(commit) => format!("{package} ({commit})"),
        None => package,
    };
    println!("cargo:rustc-env=TSQ_VERSION={version}");
}
