//! `tsq fetch`: download and cache every asset a pipeline names, so a later run needs no network.

use std::path::Path;

use super::{CmdError, load_or_report};
use crate::assets::{AssetSource, TsqHome, verify_sha256};
use crate::data::card::Origin;
use crate::pipeline::Override;

pub fn run(file: &Path, overrides: &[Override]) -> Result<(), CmdError> {
    let pipeline = load_or_report(file, overrides)?;
    let home = TsqHome::from_env();
    let mut assets = vec![(
        pipeline.spec.model.source.clone(),
        pipeline.dir().to_path_buf(),
        pipeline.spec.model.sha256.clone(),
    )];
    for card in pipeline.datasets.values().map(|d| &d.card) {
        if let Origin::File { source, .. } = &card.origin {
            assets.push((
                source.clone(),
                card.dir().to_path_buf(),
                card.card.sha256.clone(),
            ));
        }
    }
    for (text, base, sha256) in assets {
        let path = AssetSource::parse(&text, &base)
            .and_then(|s| s.resolve(&home))
            .map_err(CmdError::failed)?;
        verify_sha256(&path, sha256.as_deref()).map_err(CmdError::failed)?;
        println!("ok: {text} -> {}", path.display());
    }
    Ok(())
}
