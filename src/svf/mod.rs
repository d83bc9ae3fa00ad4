//! Singular value fine-tuning: an expert is one vector z per decomposed matrix, and the adapted
//! weight is W' = U diag(s ⊙ m(z)) Vᵀ.
//!
//! Parametrisations ([`Parametrization`]):
//! - `sigmoid` (the paper's): m = sigmoid(z) · max_mult, z initialised to 0.1 + N(0, 0.01²), and W'
//!   rescaled by Σs / Σ(s ⊙ m) so the sum of singular values is unchanged;
//! - `linear`: m = z, initialised to 1, no rescale, so W' == W at initialisation.
//!
//! Everything here is differentiable in z (primitive candle ops only).

pub mod adam;
pub mod apply;
mod autograd_engine;
mod backprop;
pub mod expert;
mod packing;
pub mod train;

use std::path::Path;

use candle_core::{DType, Device, Result, Tensor};
use rand::SeedableRng;

use crate::assets::TsqHome;
use crate::model::Model;
use crate::svd::cache::{CacheError, Decomposed, SvdCache};
use expert::{BaseModel, Expert, ExpertError};
use rand_distr::{Distribution, Normal};

#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Parametrization {
    /// m = sigmoid(z)·max_mult, rescaled to keep Σs (the paper's).
    #[default]
    Sigmoid,
    /// m = z, initialised to 1 (reproduces the base model exactly at init).
    Linear,
}

/// The paper's `max_mult`: sigmoid scales lie in (0, 1).
pub const MAX_MULT: f64 = 1.0;

#[derive(Debug, thiserror::Error)]
pub enum SvfError {
    #[error(transparent)]
    Expert(#[from] ExpertError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Model(#[from] crate::model::error::ModelError),
    #[error("{}: {message}", path.display())]
    Base {
        path: std::path::PathBuf,
        message: String,
    },
}

impl BaseModel {
    /// The identity experts are checked against: the name and blake3 of the weights file or
    /// model directory ([`crate::hash::path_blake3`], as the model stage records it).
    pub fn of_path(path: &Path) -> std::result::Result<Self, SvfError> {
        let base = |message: String| SvfError::Base {
            path: path.into(),
            message,
        };
        Ok(Self {
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            blake3: crate::hash::path_blake3(path).map_err(|e| base(e.to_string()))?,
        })
    }
}

/// The SVD factors of `names` in `model`, from the shared cache (decomposing what is missing).
pub fn factors_for(
    model: &Model,
    base: &BaseModel,
    names: &[String],
    home: &TsqHome,
) -> std::result::Result<Vec<Decomposed>, SvfError> {
    let cache = SvdCache::new(home, &base.blake3);
    Ok(cache.load_or_decompose(names, &model.transformer, &|| false)?)
}

/// Loads an expert file, checks it against `model`, and composes it into the model's weights.
pub fn compose_expert_file(
    model: &mut Model,
    file: &Path,
    home: &TsqHome,
) -> std::result::Result<Expert, SvfError> {
    let expert = Expert::load(file)?;
    let base = BaseModel::of_path(&model.path)?;
    // Refuse a foreign expert before decomposing anything.
    expert.check_base(file, &base)?;
    let factors = factors_for(model, &base, &expert.meta.targets, home)?;
    let ranks = factors
        .iter()
        .map(|d| Ok((d.name.clone(), d.factors.s.dim(0)?)))
        .collect::<Result<Vec<_>>>()
        .map_err(ExpertError::from)?;
    expert.check_compatible(file, &base, &ranks)?;
    apply::apply(
        &mut model.transformer,
        &factors,
        &expert.effective_scales()?,
        apply::Application::Compose,
    )?;
    Ok(expert)
}

/// `model` with a table of experts in its factored projections: row 0 the model itself, row
/// `k` the expert in `files[k - 1]`. A batch then answers each sequence with its own expert
/// ([`crate::model::transformer::Batch::with_experts`]), at the cost of factored products
/// (more work per token than a composed expert's weights).
pub fn expert_table(
    model: &Model,
    files: &[&Path],
    home: &TsqHome,
) -> std::result::Result<Model, SvfError> {
    Ok(ExpertTable::new(model, files, home)?.model)
}

/// Effective scales by target.
type Scales = std::collections::BTreeMap<String, Tensor>;

/// A model holding a table of experts ([`expert_table`]), which can grow by rows that mix
/// the others.
pub struct ExpertTable {
    /// The model with the table.
    pub model: Model,
    base: Model,
    factors: Vec<crate::svd::cache::Decomposed>,
    /// Each row's effective scales by target (none: the base model's `s` there).
    rows: Vec<Scales>,
}

impl ExpertTable {
    pub fn new(
        model: &Model,
        files: &[&Path],
        home: &TsqHome,
    ) -> std::result::Result<Self, SvfError> {
        let (factors, rows) = table_rows(model, files, home)?;
        let mut table = Self {
            model: model.clone(),
            base: model.clone(),
            factors,
            rows,
        };
        table.apply()?;
        Ok(table)
    }

    /// Appends a row whose effective scales are Σ α e over `mix` (row, α) — a row that leaves
    /// a target alone counts as scale 1 there — and returns its index.
    pub fn push_mixture(&mut self, mix: &[(u32, f64)]) -> std::result::Result<u32, SvfError> {
        let mut scales = Scales::new();
        for d in &self.factors {
            let mut sum = d.factors.s.zeros_like().map_err(ExpertError::from)?;
            for &(row, alpha) in mix {
                let e = match self.rows.get(row as usize).and_then(|r| r.get(&d.name)) {
                    Some(e) => e.clone(),
                    None => d.factors.s.ones_like().map_err(ExpertError::from)?,
                };
                sum = (sum + (e * alpha).map_err(ExpertError::from)?).map_err(ExpertError::from)?;
            }
            scales.insert(d.name.clone(), sum);
        }
        self.rows.push(scales);
        self.apply()?;
        Ok(self.rows.len() as u32 - 1)
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    fn apply(&mut self) -> std::result::Result<(), SvfError> {
        let mut model = self.base.clone();
        let rows: Vec<_> = self.rows.iter().collect();
        apply::apply_per_sequence(&mut model.transformer, &self.factors, &rows)?;
        self.model = model;
        Ok(())
    }
}

/// The factors of every target `files`' experts train, and the table's rows: the base model's
/// (no scales), then each expert's effective scales.
fn table_rows(
    model: &Model,
    files: &[&Path],
    home: &TsqHome,
) -> std::result::Result<(Vec<crate::svd::cache::Decomposed>, Vec<Scales>), SvfError> {
    let base = BaseModel::of_path(&model.path)?;
    let experts = files
        .iter()
        .map(|file| {
            let expert = Expert::load(file)?;
            expert.check_base(file, &base)?;
            Ok(expert)
        })
        .collect::<std::result::Result<Vec<_>, SvfError>>()?;
    let targets: std::collections::BTreeSet<String> = experts
        .iter()
        .flat_map(|e| e.meta.targets.iter().cloned())
        .collect();
    let factors = factors_for(model, &base, &Vec::from_iter(targets), home)?;
    let ranks = factors
        .iter()
        .map(|d| Ok((d.name.clone(), d.factors.s.dim(0)?)))
        .collect::<Result<Vec<_>>>()
        .map_err(ExpertError::from)?;
    let mut scales = vec![std::collections::BTreeMap::new()];
    for (expert, file) in experts.iter().zip(files) {
        let own: Vec<(String, usize)> = ranks
            .iter()
            .filter(|(name, _)| expert.meta.targets.contains(name))
            .cloned()
            .collect();
        expert.check_compatible(file, &base, &own)?;
        scales.push(expert.effective_scales()?);
    }
    Ok((factors, scales))
}

/// A base model and copies of it with an expert composed in, each made once and kept by label
/// (an evaluation or a chat answers with the same few experts again and again).
pub struct Composed {
    pub base: std::rc::Rc<Model>,
    home: TsqHome,
    adapted: std::collections::BTreeMap<String, std::rc::Rc<Model>>,
}

impl Composed {
    pub fn new(base: std::rc::Rc<Model>, home: TsqHome) -> Self {
        Self {
            base,
            home,
            adapted: Default::default(),
        }
    }

    /// Where SVD factors are cached.
    pub fn home(&self) -> &TsqHome {
        &self.home
    }

    /// The base model with the expert in `file` composed in, known as `label`.
    pub fn with_expert(
        &mut self,
        label: &str,
        file: &Path,
    ) -> std::result::Result<std::rc::Rc<Model>, SvfError> {
        if let Some(model) = self.adapted.get(label) {
            return Ok(std::rc::Rc::clone(model));
        }
        let mut model = (*self.base).clone();
        compose_expert_file(&mut model, file, &self.home)?;
        let model = std::rc::Rc::new(model);
        self.adapted
            .insert(label.to_string(), std::rc::Rc::clone(&model));
        Ok(model)
    }
}

/// The initial expert vector of length `rank` for a parametrisation.
pub fn init_vector(
    parametrization: Parametrization,
    rank: usize,
    seed: u64,
    device: &Device,
) -> Result<Tensor> {
    match parametrization {
        Parametrization::Linear => Tensor::ones(rank, DType::F32, device),
        Parametrization::Sigmoid => {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let normal = Normal::new(0.1f32, 0.01).expect("valid normal");
            Tensor::from_vec(
                (0..rank)
                    .map(|_| normal.sample(&mut rng))
                    .collect::<Vec<f32>>(),
                rank,
                device,
            )
        }
    }
}

/// The effective scale m(z) applied to the singular values.
pub fn scale(parametrization: Parametrization, z: &Tensor) -> Result<Tensor> {
    match parametrization {
        Parametrization::Linear => Ok(z.clone()),
        Parametrization::Sigmoid => candle_nn::ops::sigmoid(z)? * MAX_MULT,
    }
}

/// The effective scale e with W' = U diag(s ⊙ e) Vᵀ: m(z), times Σs / Σ(s ⊙ m) for `sigmoid`
/// so that the sum of singular values is unchanged.
pub fn effective_scale(parametrization: Parametrization, s: &Tensor, z: &Tensor) -> Result<Tensor> {
    let m = scale(parametrization, z)?;
    match parametrization {
        Parametrization::Linear => Ok(m),
        Parametrization::Sigmoid => {
            let ratio = s.sum_all()?.broadcast_div(&(s * &m)?.sum_all()?)?;
            m.broadcast_mul(&ratio)
        }
    }
}

/// W' = U diag(s ⊙ e(z)) Vᵀ.
pub fn adapted_weight(
    parametrization: Parametrization,
    u: &Tensor,
    s: &Tensor,
    vt: &Tensor,
    z: &Tensor,
) -> Result<Tensor> {
    crate::svd::compose(u, &(s * effective_scale(parametrization, s, z)?)?, vt)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn factors() -> (Tensor, crate::svd::Factors) {
        let w = Tensor::randn(0f32, 1.0, (24, 16), &Device::Cpu).unwrap();
        let f = crate::svd::decompose("w", &w).unwrap();
        (w, f)
    }

    #[test]
    fn linear_at_init_reproduces_the_weight() -> Result<()> {
        let (w, f) = factors();
        let z = init_vector(Parametrization::Linear, 16, 0, &Device::Cpu)?;
        let w2 = adapted_weight(Parametrization::Linear, &f.u, &f.s, &f.vt, &z)?;
        let diff = (w2 - &w)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-4, "{diff}");
        Ok(())
    }

    #[test]
    fn sigmoid_init_is_near_half_and_keeps_the_singular_value_sum() -> Result<()> {
        let (_, f) = factors();
        let z = init_vector(Parametrization::Sigmoid, 16, 7, &Device::Cpu)?;
        let m: Vec<f32> = scale(Parametrization::Sigmoid, &z)?.to_vec1()?;
        assert!(m.iter().all(|x| (x - 0.525).abs() < 0.01), "{m:?}");
        let w2 = adapted_weight(Parametrization::Sigmoid, &f.u, &f.s, &f.vt, &z)?;
        let s2 = crate::svd::decompose("w2", &w2)
            .unwrap()
            .s
            .sum_all()?
            .to_scalar::<f32>()?;
        let s1 = f.s.sum_all()?.to_scalar::<f32>()?;
        assert!((s1 - s2).abs() / s1 < 1e-4, "{s1} vs {s2}");
        Ok(())
    }

    #[test]
    fn every_z_gets_a_finite_nonzero_gradient_matching_finite_differences() -> Result<()> {
        let (_, f) = factors();
        let x = Tensor::randn(0f32, 1.0, (3, 16), &Device::Cpu)?;
        for p in [Parametrization::Linear, Parametrization::Sigmoid] {
            let z = candle_core::Var::from_tensor(&init_vector(p, 16, 1, &Device::Cpu)?)?;
            let loss = |z: &Tensor| -> Result<Tensor> {
                x.matmul(&adapted_weight(p, &f.u, &f.s, &f.vt, z)?.t()?)?
                    .sqr()?
                    .sum_all()
            };
            let grads = loss(z.as_tensor())?.backward()?;
            let g: Vec<f32> = grads
                .get(z.as_tensor())
                .expect("z has a gradient")
                .to_vec1()?;
            assert!(g.iter().all(|v| v.is_finite() && *v != 0.0), "{p:?}: {g:?}");
            // Central differences on two coordinates, evaluated entirely in f64: in f32 the
            // loss's rounding error swamps the difference quotient of the small sigmoid gradients.
            let to64 = |t: &Tensor| t.to_dtype(DType::F64);
            let (x64, u64, s64, vt64) = (to64(&x)?, to64(&f.u)?, to64(&f.s)?, to64(&f.vt)?);
            for i in [0usize, 9] {
                let eps = 1e-4;
                let bump = |d: f64| -> Result<f64> {
                    let mut v: Vec<f64> = to64(z.as_tensor())?.to_vec1()?;
                    v[i] += d;
                    let z = Tensor::from_vec(v, 16, &Device::Cpu)?;
                    x64.matmul(&adapted_weight(p, &u64, &s64, &vt64, &z)?.t()?)?
                        .sqr()?
                        .sum_all()?
                        .to_scalar::<f64>()
                };
                let numeric = (bump(eps)? - bump(-eps)?) / (2.0 * eps);
                let rel = (numeric - g[i] as f64).abs() / numeric.abs().max(1e-3);
                assert!(
                    rel < 2e-2,
                    "{p:?} z[{i}]: analytic {} numeric {numeric}",
                    g[i]
                );
            }
        }
        Ok(())
    }
}

/// A tiny random Llama model with every projection decomposed, for tests.
#[cfg(test)]
pub(crate) fn tiny_decomposed(seed: u64) -> (Transformer, Vec<crate::svd::cache::Decomposed>) {
    tiny_decomposed_as(crate::model::config::Architecture::Llama, seed)
}

/// [`tiny_decomposed`] of another architecture.
#[cfg(test)]
pub(crate) fn tiny_decomposed_as(
    architecture: crate::model::config::Architecture,
    seed: u64,
) -> (Transformer, Vec<crate::svd::cache::Decomposed>) {
    use crate::model::testing::{random_weights, tiny_config};
    let config = tiny_config(architecture);
    let weights = random_weights(&config, seed, &Device::Cpu);
    let mut decomposed = Vec::new();
    for layer in 0..config.num_layers {
        for module in crate::svd::targets::LAYER_MODULES {
            let name = format!("layers.{layer}.{module}");
            let factors =
                crate::svd::decompose(&name, &weights[&format!("{name}.weight")]).unwrap();
            decomposed.push(crate::svd::cache::Decomposed {
                name,
                factors,
                file: Default::default(),
                reused: false,
            });
        }
    }
    (Transformer::new(config, weights).unwrap(), decomposed)
}

/// A sigmoid expert for `factors` with its vectors spread (z + N(0, 1)), so experts made with
/// different seeds differ clearly; for tests.
#[cfg(test)]
pub(crate) fn spread_expert(factors: &[crate::svd::cache::Decomposed], seed: u64) -> Expert {
    let s = crate::svd::cache::singular_values(factors);
    let base = BaseModel {
        name: "tiny".into(),
        blake3: "0".repeat(64),
    };
    let mut e = Expert::initial(base, Parametrization::Sigmoid, &s, seed).unwrap();
    for (z, _) in e.vectors.values_mut() {
        *z = (z.clone() + Tensor::randn(0f32, 1.0, z.dims(), &Device::Cpu).unwrap()).unwrap();
    }
    e
}

#[cfg(test)]
use crate::model::transformer::Transformer;

#[cfg(test)]
mod model_tests {
    use super::*;
    use crate::model::config::Architecture;
    use crate::model::testing::{random_weights, tiny_config};
    use crate::model::transformer::{Batch, LogitsAt, Mode, Transformer};
    use crate::svd::targets::LAYER_MODULES;

    type TestResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

    fn logits(tf: &Transformer) -> TestResult<Tensor> {
        let ids = Tensor::new(&[[3u32, 1, 4, 1, 5, 9]], &Device::Cpu)?;
        let batch = Batch::left_padded(&[0], 0, 6, &Device::Cpu)?;
        Ok(tf.forward(&ids, &batch, None, Mode::Fast, LogitsAt::All)?)
    }

    #[test]
    fn linear_experts_at_init_reproduce_the_base_model() -> TestResult<()> {
        let config = tiny_config(Architecture::Llama);
        let weights = random_weights(&config, 5, &Device::Cpu);
        let base = Transformer::new(config.clone(), weights.clone())?;
        let mut adapted = Transformer::new(config.clone(), weights.clone())?;
        for layer in 0..config.num_layers {
            for module in LAYER_MODULES {
                let name = format!("layers.{layer}.{module}");
                let f = crate::svd::decompose(&name, &weights[&format!("{name}.weight")])?;
                let z = init_vector(Parametrization::Linear, f.s.dim(0)?, 0, &Device::Cpu)?;
                adapted.replace_weight(
                    &name,
                    adapted_weight(Parametrization::Linear, &f.u, &f.s, &f.vt, &z)?,
                )?;
            }
        }
        let diff = (logits(&base)? - logits(&adapted)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-4, "{diff}");
        assert!(
            adapted
                .replace_weight(
                    "layers.0.mlp.nope",
                    Tensor::zeros(1, DType::F32, &Device::Cpu)?
                )
                .is_err()
        );
        Ok(())
    }
}
