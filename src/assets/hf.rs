//! `hf://` sources, resolved in the local Hugging Face cache (the layout `huggingface_hub` writes:
//! `models--org--repo/snapshots/<commit>/path`). No network: machines running tsq often cannot reach
//! the hub, and a silent download in the middle of a run is not what a pinned pipeline wants.

use std::path::PathBuf;

use hf_hub::{Cache, Repo, RepoType};

use super::AssetError;

pub fn resolve(repo: &str, revision: &str, path: &str) -> Result<PathBuf, AssetError> {
    let cache = Cache::from_env();
    let found = cache
        .repo(Repo::with_revision(
            repo.into(),
            RepoType::Model,
            revision.into(),
        ))
        .get(path);
    found.ok_or_else(|| AssetError::Fetch {
        what: format!("hf://{repo}@{revision}/{path}"),
        reason: format!(
            "not in the local Hugging Face cache at `{}`; download it there first (e.g. `huggingface-cli download {repo} {path} --revision {revision}`) or use a `pip://` or local source",
            cache.path().display()
        ),
    })
}
