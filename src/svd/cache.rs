//! The factor cache shared by every pipeline and command on one model:
//! `$TSQ_HOME/svd/v{ALGORITHM_VERSION}/<model blake3>/<name>.safetensors` (tensors `u`, `s`, `vt`).
//! An entry is re-checked by its reconstruction error whenever it is read, so a damaged file is
//! recomputed rather than trusted. Processes sharing the cache (Slurm jobs of one study on
//! several nodes, two pipelines on one model) take turns on a model's missing entries (a lock
//! file beside them): one decomposes, the others wait and then read what it wrote.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::{Factors, MAX_RELATIVE_ERROR, SvdError, decompose_all};
use crate::assets::TsqHome;
use crate::model::WeightSource;

/// Bump when the decomposition changes, so old cache entries are not reused.
pub const ALGORITHM_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("interrupted")]
    Interrupted,
    #[error(transparent)]
    Svd(#[from] SvdError),
    #[error("the model has no matrix `{0}`")]
    Missing(String),
    #[error(transparent)]
    Model(#[from] crate::model::error::ModelError),
    #[error("cannot write {}: {message}", file.display())]
    Write { file: PathBuf, message: String },
    #[error("cannot lock {}: {source}", file.display())]
    Lock {
        file: PathBuf,
        source: std::io::Error,
    },
}

/// One target's factors and where they are cached.
pub struct Decomposed {
    pub name: String,
    pub factors: Factors,
    pub file: PathBuf,
    /// Read from the cache rather than computed now.
    pub reused: bool,
}

/// Each target's singular values, by name: what a new expert is built on.
pub fn singular_values(decomposed: &[Decomposed]) -> Vec<(String, Tensor)> {
    decomposed
        .iter()
        .map(|d| (d.name.clone(), d.factors.s.clone()))
        .collect()
}

pub struct SvdCache {
    dir: PathBuf,
}

impl SvdCache {
    pub fn new(home: &TsqHome, model_blake3: &str) -> Self {
        Self {
            dir: home
                .path()
                .join("svd")
                .join(format!("v{ALGORITHM_VERSION}"))
                .join(model_blake3),
        }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.safetensors"))
    }

    /// The factors of every named matrix of `weights` (canonical names without `.weight`): read
    /// from the cache when valid, otherwise decomposed, a few matrices per core at a time, and
    /// stored. `interrupted` is asked between batches.
    pub fn load_or_decompose(
        &self,
        names: &[String],
        weights: &dyn WeightSource,
        interrupted: &dyn Fn() -> bool,
    ) -> Result<Vec<Decomposed>, CacheError> {
        let mut done = Vec::with_capacity(names.len());
        let mut todo = self.read_cached(names, weights, &mut done)?;
        let _turn = if todo.is_empty() {
            None
        } else {
            let turn = self.take_turn()?;
            // Whoever had the turn before may have written some of them.
            let names: Vec<String> = todo.into_iter().map(|(name, _)| name).collect();
            todo = self.read_cached(&names, weights, &mut done)?;
            Some(turn)
        };
        for chunk in todo.chunks(rayon::current_num_threads().max(1) * 2) {
            if interrupted() {
                return Err(CacheError::Interrupted);
            }
            for ((name, _), factors) in chunk.iter().zip(decompose_all(chunk)) {
                let factors = factors?;
                let file = self.file(name);
                write(&factors, &file)?;
                done.push(Decomposed {
                    name: name.clone(),
                    factors,
                    file,
                    reused: false,
                });
            }
        }
        done.sort_by_key(|d| names.iter().position(|n| *n == d.name));
        Ok(done)
    }

    /// Adds the valid cached entries of `names` to `done`; the others, with their weights.
    fn read_cached(
        &self,
        names: &[String],
        weights: &dyn WeightSource,
        done: &mut Vec<Decomposed>,
    ) -> Result<Vec<(String, Tensor)>, CacheError> {
        let mut todo = Vec::new();
        for name in names {
            let weight = weights
                .weight(&format!("{name}.weight"))?
                .ok_or_else(|| CacheError::Missing(name.clone()))?;
            let file = self.file(name);
            match read_checked(&file, &weight) {
                Some(factors) => done.push(Decomposed {
                    name: name.clone(),
                    factors,
                    file,
                    reused: true,
                }),
                None => todo.push((name.clone(), weight)),
            }
        }
        Ok(todo)
    }

    /// Waits until no other process is decomposing this model's matrices; the turn lasts as
    /// long as the returned file is open.
    fn take_turn(&self) -> Result<std::fs::File, CacheError> {
        let file = self.dir.join(".lock");
        let fail = |source| CacheError::Lock {
            file: file.clone(),
            source,
        };
        let lock = crate::fsutil::open_lock_file(&file).map_err(fail)?;
        if lock.try_lock().is_err() {
            eprintln!(
                "  waiting for another tsq decomposing this model ({})",
                file.display()
            );
            lock.lock().map_err(fail)?;
        }
        Ok(lock)
    }
}

fn write(factors: &Factors, file: &Path) -> Result<(), CacheError> {
    let fail = |message: String| CacheError::Write {
        file: file.to_path_buf(),
        message,
    };
    let tensors: std::collections::HashMap<String, Tensor> =
        [("u", &factors.u), ("s", &factors.s), ("vt", &factors.vt)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
    let bytes = safetensors::serialize(&tensors, None).map_err(|e| fail(e.to_string()))?;
    crate::fsutil::write_atomic(file, &bytes).map_err(|e| fail(e.to_string()))
}

/// A cached decomposition of `weight`, if present, readable and accurate.
fn read_checked(file: &Path, weight: &Tensor) -> Option<Factors> {
    let mut t = candle_core::safetensors::load(file, &Device::Cpu).ok()?;
    let (u, s, vt) = (t.remove("u")?, t.remove("s")?, t.remove("vt")?);
    let relative_error = super::reconstruction_error(&u, &s, &vt, weight).ok()?;
    (relative_error <= MAX_RELATIVE_ERROR).then_some(Factors {
        u,
        s,
        vt,
        relative_error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Two processes' worth of decompositions of one model at once (threads, each with its own
    /// lock handle, as flock treats separate opens): each matrix is decomposed once, the other
    /// reads it, and both get the same intact factors.
    #[test]
    fn concurrent_users_decompose_each_matrix_once() {
        let home = tempfile::tempdir().unwrap();
        let home = TsqHome(home.path().to_path_buf());
        let names: Vec<String> = (0..6).map(|i| format!("layers.{i}.mlp.up_proj")).collect();
        let weights: BTreeMap<String, Tensor> = names
            .iter()
            .map(|n| {
                let w = Tensor::randn(0f32, 1.0, (96, 64), &Device::Cpu).unwrap();
                (format!("{n}.weight"), w)
            })
            .collect();
        let results: Vec<Vec<Decomposed>> = std::thread::scope(|s| {
            let run = || {
                SvdCache::new(&home, "model")
                    .load_or_decompose(&names, &weights, &|| false)
                    .unwrap()
            };
            let (a, b) = (s.spawn(run), s.spawn(run));
            vec![a.join().unwrap(), b.join().unwrap()]
        });
        let computed = results.iter().flatten().filter(|d| !d.reused).count();
        assert_eq!(computed, names.len(), "each matrix decomposed once");
        for (a, b) in results[0].iter().zip(&results[1]) {
            assert_eq!(a.name, b.name);
            let diff = (&a.factors.s - &b.factors.s).unwrap().abs().unwrap();
            assert_eq!(diff.max(0).unwrap().to_scalar::<f32>().unwrap(), 0.0);
            let weight = &weights[&format!("{}.weight", a.name)];
            assert!(read_checked(&a.file, weight).is_some(), "{} intact", a.name);
        }
    }
}
