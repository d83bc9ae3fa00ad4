//! Expert files: one safetensors file per expert holding, for each target matrix, the vector
//! `<name>.z` and the base model's singular values `<name>.s` (so the effective scaling can be
//! read without the model, and a file is checked against the base it is applied to). The header
//! metadata `tsq_expert` is JSON: format version, base model name and blake3, SVD algorithm
//! version, parametrisation, target list and a free-form training summary.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Parametrization;

pub const FORMAT_VERSION: u32 = 1;
const METADATA_KEY: &str = "tsq_expert";

#[derive(Debug, thiserror::Error)]
pub enum ExpertError {
    #[error("{}: {message}", file.display())]
    File { file: PathBuf, message: String },
    #[error("{}: targets do not match: {detail}", file.display())]
    Targets { file: PathBuf, detail: String },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BaseModel {
    pub name: String,
    pub blake3: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExpertMeta {
    pub format_version: u32,
    pub base_model: BaseModel,
    pub svd_algorithm: u32,
    pub parametrization: Parametrization,
    pub max_mult: f64,
    pub targets: Vec<String>,
    /// How the expert was made: a training summary, or what it was combined from.
    pub training: Value,
}

/// One vector per target, plus the base singular values it scales.
#[derive(Clone)]
pub struct Expert {
    pub meta: ExpertMeta,
    /// target → (z, s), both (r,) f32 on the CPU.
    pub vectors: BTreeMap<String, (Tensor, Tensor)>,
}

impl Expert {
    /// A fresh expert at the parametrisation's initial point; `singular_values` holds each
    /// target's s in target order. Each target gets its own seed so vectors are independent.
    pub fn initial(
        base_model: BaseModel,
        parametrization: Parametrization,
        singular_values: &[(String, Tensor)],
        seed: u64,
    ) -> Result<Self, ExpertError> {
        let mut vectors = BTreeMap::new();
        for (i, (name, s)) in singular_values.iter().enumerate() {
            let z = super::init_vector(parametrization, s.dim(0)?, seed + i as u64, &Device::Cpu)?;
            vectors.insert(name.clone(), (z, s.to_dtype(DType::F32)?));
        }
        Ok(Self {
            meta: ExpertMeta {
                format_version: FORMAT_VERSION,
                base_model,
                svd_algorithm: crate::svd::cache::ALGORITHM_VERSION,
                parametrization,
                max_mult: super::MAX_MULT,
                targets: singular_values.iter().map(|(n, _)| n.clone()).collect(),
                training: Value::Null,
            },
            vectors,
        })
    }

    /// Each target's effective scale e, so that W' = U diag(s ⊙ e) Vᵀ (the sigmoid rescale included).
    pub fn effective_scales(&self) -> Result<BTreeMap<String, Tensor>, ExpertError> {
        self.vectors
            .iter()
            .map(|(name, (z, s))| {
                Ok((
                    name.clone(),
                    super::effective_scale(self.meta.parametrization, s, z)?,
                ))
            })
            .collect()
    }

    /// Refuses an expert made for another model, SVD algorithm or set of targets.
    pub fn check_compatible(
        &self,
        file: &Path,
        base: &BaseModel,
        targets: &[(String, usize)],
    ) -> Result<(), ExpertError> {
        self.check_base(file, base)?;
        self.check_targets(file, targets)
    }

    /// Refuses an expert made for another base model (by the blake3 of its weights file).
    pub fn check_base(&self, file: &Path, base: &BaseModel) -> Result<(), ExpertError> {
        if self.meta.base_model.blake3 != base.blake3 {
            let (found, expected) = (&self.meta.base_model, base);
            return Err(ExpertError::File {
                file: file.into(),
                message: format!(
                    "made for base model {} (blake3 {}), but this model is {} (blake3 {})",
                    found.name, found.blake3, expected.name, expected.blake3
                ),
            });
        }
        Ok(())
    }

    /// Refuses an expert whose targets (names and ranks) differ from the model's.
    fn check_targets(&self, file: &Path, targets: &[(String, usize)]) -> Result<(), ExpertError> {
        let mismatch = |detail: String| ExpertError::Targets {
            file: file.into(),
            detail,
        };
        let ours: Vec<&String> = self.vectors.keys().collect();
        let theirs: Vec<&String> = targets.iter().map(|(n, _)| n).collect::<Vec<_>>();
        let missing: Vec<&&String> = theirs.iter().filter(|n| !ours.contains(n)).collect();
        let extra: Vec<&&String> = ours.iter().filter(|n| !theirs.contains(n)).collect();
        if !missing.is_empty() || !extra.is_empty() {
            return Err(mismatch(format!(
                "the expert lacks {missing:?} and has extra {extra:?}"
            )));
        }
        for (name, rank) in targets {
            let have = self.vectors[name].0.dim(0)?;
            if have != *rank {
                return Err(mismatch(format!(
                    "`{name}` has {have} values, the model's matrix has rank {rank}"
                )));
            }
        }
        Ok(())
    }

    /// Writes the expert atomically (the project's one atomic write: temporary file, fsync,
    /// rename, directory fsync).
    pub fn save(&self, file: &Path) -> Result<(), ExpertError> {
        let fail = |message: String| ExpertError::File {
            file: file.into(),
            message,
        };
        let mut tensors = Vec::new();
        for (name, (z, s)) in &self.vectors {
            tensors.push((format!("{name}.z"), z.clone()));
            tensors.push((format!("{name}.s"), s.clone()));
        }
        let meta = serde_json::to_string(&self.meta).map_err(|e| fail(e.to_string()))?;
        let metadata = HashMap::from([(METADATA_KEY.to_string(), meta)]);
        let bytes =
            safetensors::serialize(tensors, Some(metadata)).map_err(|e| fail(e.to_string()))?;
        crate::fsutil::write_atomic(file, &bytes).map_err(|e| fail(e.to_string()))
    }

    pub fn load(file: &Path) -> Result<Self, ExpertError> {
        let bytes = crate::fsutil::read_bytes_bounded(file, crate::fsutil::MAX_EXPERT_BYTES)
            .map_err(|e| ExpertError::File {
                file: file.into(),
                message: format!("cannot read: {e}"),
            })?;
        Self::from_bytes(file, &bytes)
    }

    /// An expert from the bytes of its file (`file` names it in errors); every field checked.
    pub fn from_bytes(file: &Path, bytes: &[u8]) -> Result<Self, ExpertError> {
        let fail = |message: String| ExpertError::File {
            file: file.into(),
            message,
        };
        let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| fail(format!("not a safetensors file: {e}")))?;
        let meta_json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(METADATA_KEY))
            .ok_or_else(|| fail("not a tsq expert file (no `tsq_expert` metadata)".into()))?;
        let meta: ExpertMeta = serde_json::from_str(meta_json)
            .map_err(|e| fail(format!("invalid `tsq_expert` metadata: {e}")))?;
        if meta.format_version > FORMAT_VERSION {
            return Err(fail(format!(
                "expert format version {} is newer than this tsq supports ({FORMAT_VERSION})",
                meta.format_version
            )));
        }
        let algorithm = crate::svd::cache::ALGORITHM_VERSION;
        if meta.svd_algorithm != algorithm {
            return Err(fail(format!(
                "made with SVD algorithm version {}, this tsq computes version {algorithm}: its vectors scale other singular vectors",
                meta.svd_algorithm
            )));
        }
        let hash = &meta.base_model.blake3;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(fail(format!(
                "`base_model.blake3` must be 64 hexadecimal digits, found {:?}",
                hash.chars().take(80).collect::<String>()
            )));
        }
        if meta.max_mult != super::MAX_MULT {
            return Err(fail(format!(
                "`max_mult` is {}, this tsq supports only {}",
                meta.max_mult,
                super::MAX_MULT
            )));
        }
        let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)
            .map_err(|e| fail(format!("cannot read tensors: {e}")))?;
        let mut vectors = BTreeMap::new();
        for name in &meta.targets {
            let get = |suffix: &str| {
                tensors
                    .get(&format!("{name}.{suffix}"))
                    .cloned()
                    .ok_or_else(|| fail(format!("target `{name}` has no `{name}.{suffix}` tensor")))
            };
            let (z, s) = (get("z")?, get("s")?);
            if z.rank() != 1 || z.dims() != s.dims() {
                return Err(fail(format!(
                    "target `{name}`: z is {:?} but s is {:?}",
                    z.dims(),
                    s.dims()
                )));
            }
            let (z, s) = (z.to_dtype(DType::F32)?, s.to_dtype(DType::F32)?);
            for (what, t) in [("z", &z), ("s", &s)] {
                if t.to_vec1::<f32>()?.iter().any(|v| !v.is_finite()) {
                    return Err(fail(format!(
                        "target `{name}`: `{what}` holds NaN or infinite values"
                    )));
                }
            }
            vectors.insert(name.clone(), (z, s));
        }
        Ok(Self { meta, vectors })
    }
}

/// Mixing weights for [`combine`]: one per expert, or one per expert per layer.
pub enum Mix {
    PerExpert(Vec<f64>),
    PerLayer(Vec<Vec<f64>>),
}

/// The layer index of a canonical target name (`layers.{i}.…`).
pub fn layer_of(target: &str) -> Option<usize> {
    target
        .strip_prefix("layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// A weighted mix of effective scales, e' = Σ_k α_k e_k, as a `linear` expert (so e' is applied
/// as is). Mixing the effective scales, not raw pre-sigmoid parameters as the reference code
/// does, keeps a mix of one expert equal to that expert. `labels` name the inputs for provenance.
pub fn combine(experts: &[(String, Expert)], mix: &Mix) -> Result<Expert, ExpertError> {
    let invalid = |m: String| ExpertError::Invalid(m);
    let (_, first) = experts
        .first()
        .ok_or_else(|| invalid("nothing to combine".into()))?;
    for (label, e) in experts {
        if e.meta.base_model.blake3 != first.meta.base_model.blake3 {
            return Err(invalid(format!(
                "`{label}` was made for another base model than `{}`",
                experts[0].0
            )));
        }
        if e.meta.targets != first.meta.targets {
            return Err(invalid(format!(
                "`{label}` has other targets than `{}`",
                experts[0].0
            )));
        }
    }
    let layers = first
        .meta
        .targets
        .iter()
        .filter_map(|t| layer_of(t))
        .max()
        .map_or(0, |l| l + 1);
    let weight = |k: usize, target: &str| -> Result<f64, ExpertError> {
        match mix {
            Mix::PerExpert(w) => Ok(w[k]),
            Mix::PerLayer(w) => layer_of(target)
                .and_then(|l| w[k].get(l).copied())
                .ok_or_else(|| invalid(format!("no per-layer weight for `{target}`"))),
        }
    };
    match mix {
        Mix::PerExpert(w) if w.len() != experts.len() => {
            return Err(invalid(format!(
                "{} weights for {} experts",
                w.len(),
                experts.len()
            )));
        }
        Mix::PerLayer(w) if w.len() != experts.len() || w.iter().any(|r| r.len() != layers) => {
            return Err(invalid(format!(
                "per-layer weights must be {} rows (experts) of {layers} values (layers)",
                experts.len()
            )));
        }
        _ => {}
    }
    let scales: Vec<BTreeMap<String, Tensor>> = experts
        .iter()
        .map(|(_, e)| e.effective_scales())
        .collect::<Result<_, _>>()?;
    let mut vectors = BTreeMap::new();
    for (name, (_, s)) in &first.vectors {
        let mut mixed = s.zeros_like()?;
        for (k, scale) in scales.iter().enumerate() {
            mixed = (mixed + (&scale[name] * weight(k, name)?)?)?;
        }
        vectors.insert(name.clone(), (mixed, s.clone()));
    }
    let weights = match mix {
        Mix::PerExpert(w) => serde_json::json!(w),
        Mix::PerLayer(w) => serde_json::json!(w),
    };
    let sources: Vec<Value> = experts
        .iter()
        .map(|(label, e)| serde_json::json!({"expert": label, "parametrization": e.meta.parametrization, "training": e.meta.training}))
        .collect();
    Ok(Expert {
        meta: ExpertMeta {
            parametrization: Parametrization::Linear,
            training: serde_json::json!({"combined_from": sources, "weights": weights}),
            ..first.meta.clone()
        },
        vectors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    fn base() -> BaseModel {
        BaseModel {
            name: "tiny".into(),
            blake3: "ab".repeat(32),
        }
    }

    fn singular_values() -> Vec<(String, Tensor)> {
        ["layers.0.mlp.up_proj", "layers.1.mlp.up_proj"]
            .iter()
            .map(|n| {
                (
                    n.to_string(),
                    Tensor::new(&[3f32, 2.0, 1.0], &Device::Cpu).unwrap(),
                )
            })
            .collect()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.to_vec1().unwrap()
    }

    #[test]
    fn files_round_trip_and_are_checked_against_the_base() -> TestResult {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("e.safetensors");
        let mut expert = Expert::initial(base(), Parametrization::Sigmoid, &singular_values(), 1)?;
        expert.meta.training = serde_json::json!({"steps": 3});
        expert.save(&file)?;
        let back = Expert::load(&file)?;
        assert_eq!(back.meta.targets, expert.meta.targets);
        assert_eq!(back.meta.training["steps"], 3);
        for (name, (z, s)) in &expert.vectors {
            assert_eq!(values(&back.vectors[name].0), values(z));
            assert_eq!(values(&back.vectors[name].1), values(s));
        }
        let targets = [
            ("layers.0.mlp.up_proj".to_string(), 3),
            ("layers.1.mlp.up_proj".to_string(), 3),
        ];
        back.check_compatible(&file, &base(), &targets)?;
        // A base-model hash that is not one (here non-ASCII, which once broke `inspect`).
        let mut odd = expert.clone();
        odd.meta.base_model.blake3 = format!("é{}", "a".repeat(62));
        odd.save(&file)?;
        let Err(err) = Expert::load(&file) else {
            panic!("an expert with a malformed base-model hash loaded");
        };
        let err = err.to_string();
        assert!(
            err.contains("`base_model.blake3` must be 64 hexadecimal digits"),
            "{err}"
        );
        let other = BaseModel {
            name: "other".into(),
            blake3: "de".repeat(32),
        };
        let err = back
            .check_compatible(&file, &other, &targets)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("made for base model tiny") && err.contains("this model is other"),
            "{err}"
        );
        let err = back
            .check_compatible(&file, &base(), &targets[..1])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("has extra") && err.contains("layers.1.mlp.up_proj"),
            "{err}"
        );
        let wrong_rank = [targets[0].clone(), ("layers.1.mlp.up_proj".to_string(), 4)];
        let err = back
            .check_compatible(&file, &base(), &wrong_rank)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("has 3 values, the model's matrix has rank 4"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn other_files_are_refused_by_name() -> TestResult {
        let dir = tempfile::tempdir()?;
        let plain = dir.path().join("plain.safetensors");
        candle_core::safetensors::save(
            &HashMap::from([("w".to_string(), Tensor::zeros(2, DType::F32, &Device::Cpu)?)]),
            &plain,
        )?;
        let err = Expert::load(&plain).err().unwrap().to_string();
        assert!(
            err.contains("plain.safetensors: not a tsq expert file"),
            "{err}"
        );
        let junk = dir.path().join("junk.safetensors");
        std::fs::write(&junk, b"not at all")?;
        let err = Expert::load(&junk).err().unwrap().to_string();
        assert!(
            err.contains("junk.safetensors: not a safetensors file"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn foreign_algorithms_options_and_non_finite_vectors_are_refused() -> TestResult {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("e.safetensors");
        let fresh = || Expert::initial(base(), Parametrization::Sigmoid, &singular_values(), 1);
        let refused = |e: &Expert| -> std::result::Result<String, Box<dyn std::error::Error>> {
            e.save(&file)?;
            Ok(Expert::load(&file).err().ok_or("loaded")?.to_string())
        };
        let mut old = fresh()?;
        old.meta.svd_algorithm += 1;
        assert!(refused(&old)?.contains("SVD algorithm version"));
        let mut mult = fresh()?;
        mult.meta.max_mult = 2.0;
        assert!(refused(&mult)?.contains("max_mult"));
        let mut nan = fresh()?;
        let name = nan.meta.targets[0].clone();
        nan.vectors.get_mut(&name).ok_or("target")?.0 =
            Tensor::new(&[f32::NAN, 1.0, 1.0], &Device::Cpu)?;
        assert!(refused(&nan)?.contains("NaN"));
        Ok(())
    }

    #[test]
    fn combining_mixes_effective_scales() -> TestResult {
        let s = singular_values();
        let a = Expert::initial(base(), Parametrization::Sigmoid, &s, 1)?;
        let b = Expert::initial(base(), Parametrization::Linear, &s, 2)?;
        let (ea, eb) = (a.effective_scales()?, b.effective_scales()?);
        let experts = [("a".to_string(), a), ("b".to_string(), b)];
        // One expert at weight 1 is that expert.
        let only_a = combine(&experts, &Mix::PerExpert(vec![1.0, 0.0]))?;
        assert_eq!(only_a.meta.parametrization, Parametrization::Linear);
        for (name, e) in only_a.effective_scales()? {
            let diff: f32 = values(&e)
                .iter()
                .zip(values(&ea[&name]))
                .map(|(x, y)| (x - y).abs())
                .sum();
            assert!(diff < 1e-6, "{name}");
        }
        // Per layer: layer 0 all a, layer 1 all b.
        let per_layer = combine(
            &experts,
            &Mix::PerLayer(vec![vec![1.0, 0.0], vec![0.0, 1.0]]),
        )?;
        let scales = per_layer.effective_scales()?;
        assert_eq!(
            values(&scales["layers.0.mlp.up_proj"]),
            values(&ea["layers.0.mlp.up_proj"])
        );
        assert_eq!(
            values(&scales["layers.1.mlp.up_proj"]),
            values(&eb["layers.1.mlp.up_proj"])
        );
        let err = combine(&experts, &Mix::PerExpert(vec![1.0]))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("1 weights for 2 experts"), "{err}");
        Ok(())
    }
}
