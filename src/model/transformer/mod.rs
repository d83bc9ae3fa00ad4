//! The Llama-family transformer (Llama, Mistral, Qwen2, Qwen3, SmolLM3): weights under
//! canonical names and two forward paths over them.
//!
//! - [`Mode::Fast`]: fused kernels (candle's `rms_norm` and `rope`; on the CPU in f32 our own
//!   masked softmax and SiLU·up from `model::kernels`, and the packed weight products). They
//!   have no backward pass, so this path is for inference only.
//! - [`Mode::Differentiable`]: the same maths from differentiable ops, so candle's autograd
//!   reaches the weights. SVF training itself runs in `svf::backprop` (hand-written, much faster);
//!   this path is the independent reference its losses and gradients are tested against.
//!
//! Batches of different lengths are left-padded: [`Batch`] carries per-sequence positions (counted
//! from each sequence's first real token) and an additive attention mask that hides padding and
//! the future.

mod batch;
mod cache;
mod linear;
mod ops;

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{D, DType, Device, IndexOp, Module, Tensor};

use super::autograd;
use super::config::ModelConfig;
use super::error::{ModelError, Result};
use autograd::linalg_applies;
use linear::QUANTIZED_MAX_ROWS;
use ops::{
    fused_attention, gated, local_rope_tables, masked_softmax, rms_norm, rope, rope_tables,
    soft_cap, softmax_primitive,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Fast,
    Differentiable,
}

/// Which positions to compute logits for: all (scoring), only the last (generation), or the
/// last n (scoring what follows a shared prefix).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsAt {
    All,
    Last,
    Tail(usize),
}

/// A weight matrix W (rows × cols). Where tsq-linalg's kernel runs (f32, bf16 or f16 on a CPU
/// with AVX2 or AVX-512) it is held only as that kernel's packed panels, which the forward
/// products use instead of faer whatever the number of rows (see [`linear`]): keeping the
/// tensor beside them doubled the model's memory (SmolLM2 served in 1089 MiB instead of ~590).
/// Norms and biases, small, are tensors in the compute dtype.
#[derive(Clone)]
enum Matrix {
    Tensor(Tensor),
    Packed(Arc<tsq_linalg::PackedMatrix>),
}

/// A weight as the model holds it, for [`Transformer::stored`].
enum Stored<'a> {
    Tensor(&'a Tensor),
    Matrix(&'a Matrix),
    /// A Gemma norm weight w, held as 1 + w (see [`gemma_norm`]).
    PlusOne(&'a Tensor),
}

impl Stored<'_> {
    /// The weight in `dtype`, the model's weights dtype.
    fn tensor(&self, dtype: DType) -> Result<Tensor> {
        let tensor = match self {
            Self::Tensor(t) => (*t).clone(),
            Self::Matrix(m) => m.tensor()?,
            Self::PlusOne(t) => (t.to_dtype(DType::F32)? - 1.0)?,
        };
        Ok(tensor.to_dtype(dtype)?)
    }
}

/// A norm weight as the forward multiplies by it: Gemma's norms multiply by 1 + w, added in f32
/// (as transformers computes it) before the cast to the compute dtype.
fn gemma_norm(weight: Tensor, config: &ModelConfig, dtype: DType) -> Result<Tensor> {
    match config.architecture.is_gemma() {
        true => Ok((weight.to_dtype(DType::F32)? + 1.0)?.to_dtype(dtype)?),
        false => Ok(weight.to_dtype(dtype)?),
    }
}

impl crate::model::WeightSource for Transformer {
    /// One weight, unpacked alone where it is packed: no copy of the rest of the model.
    fn weight(&self, name: &str) -> Result<Option<Tensor>> {
        let stored = self.stored().into_iter().find(|(n, _)| n == name);
        stored
            .map(|(_, s)| s.tensor(self.weights_dtype))
            .transpose()
    }

    fn packed(&self, name: &str) -> Option<Arc<tsq_linalg::PackedMatrix>> {
        match self.stored().into_iter().find(|(n, _)| n == name)? {
            (_, Stored::Matrix(Matrix::Packed(p))) => Some(Arc::clone(p)),
            _ => None,
        }
    }
}

#[derive(Clone)]
struct Linear {
    weight: Matrix,
    bias: Option<Tensor>,
    /// A quantized copy of `weight` for small-batch decoding (see [`Transformer::quantize_for_decoding`]).
    quantized: Option<Quantized>,
    /// When set, the layer computes `U (s' ⊙ Vᵀx)` instead of `W x` (see [`Transformer::set_factored`]).
    factored: Option<Factored>,
}

/// A projection's quantized copy: Q8_0 rows of an f32 CPU weight through tsq-linalg's kernels
/// where AVX2 or AVX-512 runs (x stays f32), candle's quantized matmul otherwise.
#[derive(Clone)]
enum Quantized {
    Rows(Arc<tsq_linalg::Q8Matrix>),
    Candle(QMatMul),
}

/// A projection applied as `y = U (s' ⊙ (Vᵀ x))`: W's SVD factors with scaled singular values s',
/// one vector for the whole batch or one row per sequence (a batch mixing SVF experts).
#[derive(Clone)]
struct Factored {
    /// (out, r)
    u: Tensor,
    /// (r, in)
    vt: Tensor,
    /// (r), or a table (experts, r) whose row a batch's [`Batch::experts`] picks per sequence.
    scaled_s: Tensor,
}

#[derive(Clone)]
struct Layer {
    attn_norm: Tensor,
    /// Per-head RMS norm weights of queries and keys (head_dim each), where the architecture
    /// has them ([`Architecture::qk_norm`](super::config::Architecture::qk_norm)).
    qk_norm: Option<[Tensor; 2]>,
    /// Whether queries and keys are rotated (not in SmolLM3's NoPE layers).
    rotate: bool,
    /// Whether they are rotated with the local tables (Gemma 3's sliding-window layers).
    local_rope: bool,
    /// Whether it attends within the sliding window only ([`ModelConfig::attends_within_window`]).
    windowed: bool,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    mlp_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
    /// Gemma's norms of the attention's and the MLP's outputs, before each residual sum.
    out_norms: Option<[Tensor; 2]>,
}

/// Keys and values of every layer for the positions seen so far: (batch, kv_heads, time, head_dim).
#[derive(Default)]
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
}

/// One layer's keys and values in buffers of some spare capacity along the time axis (dim 2),
/// the first `len` positions filled. Appending writes in place, so a decoding step copies only
/// its new positions (concatenating copied the whole cache every step); a full buffer doubles.
struct LayerCache {
    k: Tensor,
    v: Tensor,
    len: usize,
}

/// Positions and mask for one forward call over `(batch, time)` token ids.
pub struct Batch {
    /// (batch, time) u32: rotary position of each token.
    pub positions: Tensor,
    /// (batch, 1, time, past + time) f32: 0 where attention is allowed, -inf elsewhere.
    pub mask: Tensor,
    /// (batch, past + time) u32: rotary position of each key (cached or new; any value for
    /// padding), from which sliding windows are masked.
    pub key_positions: Tensor,
    /// (batch) u32: which row of the expert table each sequence uses, when the model's
    /// projections hold one (`svf::apply::apply_per_sequence`); sequences answered by different
    /// experts then share a batch.
    pub experts: Option<Tensor>,
}

/// Rotary tables and mask of one forward call ([`Transformer::positions`]).
struct Positions {
    cos: Tensor,
    sin: Tensor,
    /// The local layers' cos and sin, where they have their own.
    local: Option<(Tensor, Tensor)>,
    mask: Tensor,
    experts: Option<Tensor>,
    /// Where the fast path attends through the fused kernel (f32 on the CPU, at least
    /// [`FUSED_MIN_QUERIES`] new positions): what the mask hides and shows wholesale.
    fused: Option<tsq_linalg::Visibility>,
    /// The mask (and its visibility) of layers attending within the sliding window, where some
    /// key lies outside it.
    windowed: Option<(Tensor, Option<tsq_linalg::Visibility>)>,
}

/// Cheap to clone: tensors are shared, so a clone with some weights replaced (an SVF expert
/// being trained or applied) costs only those weights.
#[derive(Clone)]
pub struct Transformer {
    pub config: ModelConfig,
    /// The token embeddings: with tied word embeddings, the LM head's own matrix.
    embed: Matrix,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    cos: Tensor,
    sin: Tensor,
    /// Rotation tables of layers with a base of their own (Gemma 3's sliding-window layers).
    local_rope: Option<(Tensor, Tensor)>,
    /// What the forward computes in.
    dtype: DType,
    /// What the weights came in and are exported as. bf16 and f16 weights on a CPU with
    /// tsq-linalg's kernel stay 16-bit in its panels and are computed in f32, as llama.cpp
    /// does: candle's bf16 arithmetic on the CPU decoded SmolLM2 at 8 tokens/s against f32's 60.
    weights_dtype: DType,
}

/// The shape each projection must have under `config` (rows = outputs).
fn expected_shapes(config: &ModelConfig) -> impl Fn(&str) -> [usize; 2] + use<> {
    let (h, i, d) = (
        config.hidden_size,
        config.intermediate_size,
        config.head_dim,
    );
    let (q, kv) = (config.num_heads * d, config.num_kv_heads * d);
    move |module| match module {
        "attn.q_proj" => [q, h],
        "attn.k_proj" | "attn.v_proj" => [kv, h],
        "attn.o_proj" => [h, q],
        "mlp.gate_proj" | "mlp.up_proj" => [i, h],
        _ => [h, i], // mlp.down_proj
    }
}

impl Transformer {
    /// Builds the model from canonical-name tensors (`embed.weight`, `layers.0.attn.q_proj.weight`...).
    pub fn new(config: ModelConfig, mut tensors: BTreeMap<String, Tensor>) -> Result<Self> {
        let mut take = |name: &str| {
            tensors
                .remove(name)
                .ok_or_else(|| ModelError::Input(format!("weights lack `{name}`")))
        };
        let embed = take("embed.weight")?;
        let (vocab, hidden) = embed.dims2()?;
        if (vocab, hidden) != (config.vocab_size, config.hidden_size) {
            return Err(ModelError::Input(format!(
                "`embed.weight` is {vocab}×{hidden}, config says {}×{}",
                config.vocab_size, config.hidden_size
            )));
        }
        let weights_dtype = embed.dtype();
        let packs = tsq_linalg::simd() != tsq_linalg::Simd::Portable;
        let half = matches!(weights_dtype, DType::BF16 | DType::F16);
        let dtype = match half && embed.device().is_cpu() && packs {
            true => DType::F32,
            false => weights_dtype,
        };
        let shapes = expected_shapes(&config);
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let linear =
                |m: &str, take: &mut dyn FnMut(&str) -> Result<Tensor>| -> Result<Linear> {
                    let name = format!("layers.{i}.{m}.weight");
                    let weight = take(&name)?;
                    let want = shapes(m);
                    if weight.dims() != want {
                        return Err(ModelError::Input(format!(
                            "`{name}` is {:?}, the config implies {want:?}",
                            weight.dims()
                        )));
                    }
                    let bias = take(&format!("layers.{i}.{m}.bias")).ok();
                    let bias = bias.map(|b| b.to_dtype(dtype)).transpose()?;
                    Ok(Linear::new(Matrix::new(weight)?, bias))
                };
            let mut head_norm = |n: &str| -> Result<Tensor> {
                let name = format!("layers.{i}.attn.{n}.weight");
                let weight = take(&name)?;
                if weight.dims() != [config.head_dim] {
                    return Err(ModelError::Input(format!(
                        "`{name}` is {:?}, the config implies [{}]",
                        weight.dims(),
                        config.head_dim
                    )));
                }
                gemma_norm(weight, &config, dtype)
            };
            let qk_norm = match config.architecture.qk_norm() {
                true => Some([head_norm("q_norm")?, head_norm("k_norm")?]),
                false => None,
            };
            let norm = |n: &str, take: &mut dyn FnMut(&str) -> Result<Tensor>| {
                gemma_norm(take(&format!("layers.{i}.{n}.weight"))?, &config, dtype)
            };
            let out_norms = match config.architecture.is_gemma() {
                true => Some([
                    norm("attn_out_norm", &mut take)?,
                    norm("mlp_out_norm", &mut take)?,
                ]),
                false => None,
            };
            layers.push(Layer {
                attn_norm: norm("attn_norm", &mut take)?,
                qk_norm,
                rotate: config.rotates(i),
                local_rope: config.rotates_locally(i),
                windowed: config.attends_within_window(i),
                q: linear("attn.q_proj", &mut take)?,
                k: linear("attn.k_proj", &mut take)?,
                v: linear("attn.v_proj", &mut take)?,
                o: linear("attn.o_proj", &mut take)?,
                mlp_norm: norm("mlp_norm", &mut take)?,
                gate: linear("mlp.gate_proj", &mut take)?,
                up: linear("mlp.up_proj", &mut take)?,
                down: linear("mlp.down_proj", &mut take)?,
                out_norms,
            });
        }
        let norm = gemma_norm(take("norm.weight")?, &config, dtype)?;
        let (cos, sin) = rope_tables(&config, embed.device())?;
        let local_rope = local_rope_tables(&config, embed.device())?;
        let (embed, head) = match config.tie_word_embeddings {
            true => {
                let head = Matrix::new(embed)?;
                (head.clone(), head)
            }
            // Panels too where they are kept (rows gathered from them), so that the training
            // engine shares them rather than copying the rows.
            false => (Matrix::new(embed)?, Matrix::new(take("lm_head.weight")?)?),
        };
        let lm_head = Linear::new(head, None);
        Ok(Self {
            config,
            embed,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            local_rope,
            dtype,
            weights_dtype,
        })
    }

    /// Adds `dtype`-quantized copies of every dense projection and the LM head, used by the
    /// fast path for small-batch decoding (memory-bound, so ~4x less weight traffic with Q8_0);
    /// prompt processing, scoring and the differentiable path keep the float weights. Factored
    /// projections (SVF targets applied per sequence) get none: they never read the dense weight.
    pub fn quantize_for_decoding(&mut self, dtype: GgmlDType) -> Result<()> {
        let quantize = |l: &mut Linear| -> Result<()> {
            if l.factored.is_none() {
                l.quantized = Some(Quantized::new(&l.weight, dtype)?);
            }
            Ok(())
        };
        for layer in &mut self.layers {
            for l in [
                &mut layer.q,
                &mut layer.k,
                &mut layer.v,
                &mut layer.o,
                &mut layer.gate,
                &mut layer.up,
                &mut layer.down,
            ] {
                quantize(l)?;
            }
        }
        // The head is quantized too, but its error lands directly on the logits (up to 0.26 on
        // SmolLM2, whose chat answer starts with "The" only 0.08 ahead of "L"), so `head_logits`
        // recomputes the best candidates exactly.
        quantize(&mut self.lm_head)
    }

    /// Logits from the LM head. With a quantized head (small calls only), the `EXACT_TOP`
    /// highest quantized logits of each row are recomputed in full precision: the argmax and the
    /// probable tokens are exact, the far tail keeps Q8_0 precision.
    pub fn head_logits(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let logits = self.head_logits_uncapped(x, mode)?;
        match self.config.gemma.as_ref().and_then(|g| g.final_softcap) {
            Some(cap) => soft_cap(&logits, cap),
            None => Ok(logits),
        }
    }

    fn head_logits_uncapped(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        const EXACT_TOP: usize = 64;
        let head = &self.lm_head;
        let rows = x.elem_count() / x.dim(D::Minus1)?;
        if head.quantized.is_none() || mode != Mode::Fast || rows > QUANTIZED_MAX_ROWS {
            return Ok(head.forward(x, mode, None)?.to_dtype(DType::F32)?);
        }
        let approx = head.forward(x, mode, None)?.to_dtype(DType::F32)?;
        let shape = approx.dims().to_vec();
        let vocab = *shape.last().unwrap_or(&0);
        let flat_x = x.reshape((rows, x.dim(D::Minus1)?))?;
        let mut values: Vec<f32> = approx.flatten_all()?.to_vec1()?;
        for (r, row) in values.chunks_mut(vocab).enumerate() {
            let mut order: Vec<u32> = (0..vocab as u32).collect();
            let k = EXACT_TOP.min(vocab);
            order.select_nth_unstable_by(k - 1, |&a, &b| {
                row[b as usize].total_cmp(&row[a as usize])
            });
            let top = Tensor::new(&order[..k], x.device())?;
            let exact: Vec<f32> = flat_x
                .get(r)?
                .unsqueeze(0)?
                .matmul(&head.weight.rows(&top)?.t()?)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            for (&id, value) in order[..k].iter().zip(exact) {
                row[id as usize] = value;
            }
        }
        Ok(Tensor::from_vec(values, shape, x.device())?)
    }

    /// The projection under a canonical module name, e.g. `layers.3.mlp.up_proj`.
    fn linear_mut(&mut self, module: &str) -> Result<&mut Linear> {
        let unknown = || ModelError::Input(format!("no projection `{module}` in this model"));
        let rest = module.strip_prefix("layers.").ok_or_else(unknown)?;
        let (index, name) = rest.split_once('.').ok_or_else(unknown)?;
        let layer = index
            .parse::<usize>()
            .ok()
            .and_then(|i| self.layers.get_mut(i))
            .ok_or_else(unknown)?;
        Ok(match name {
            "attn.q_proj" => &mut layer.q,
            "attn.k_proj" => &mut layer.k,
            "attn.v_proj" => &mut layer.v,
            "attn.o_proj" => &mut layer.o,
            "mlp.gate_proj" => &mut layer.gate,
            "mlp.up_proj" => &mut layer.up,
            "mlp.down_proj" => &mut layer.down,
            _ => return Err(unknown()),
        })
    }

    /// Replaces one projection's weight, as when composing an SVF expert into the model. Its
    /// quantized copy, now stale, is dropped, and so is a factored form; it is packed anew.
    pub fn replace_weight(&mut self, module: &str, weight: Tensor) -> Result<()> {
        let dtype = self.weights_dtype;
        let linear = self.linear_mut(module)?;
        let dims = linear.weight.dims2()?;
        if weight.dims() != [dims.0, dims.1] {
            return Err(ModelError::Input(format!(
                "`{module}` is {dims:?}, the replacement is {:?}",
                weight.dims()
            )));
        }
        *linear = Linear::new(Matrix::new(weight.to_dtype(dtype)?)?, linear.bias.clone());
        Ok(())
    }

    /// Makes one projection compute `U (s' ⊙ (Vᵀ x))` from its SVD factors, u (out, r) and
    /// vt (r, in), with `scaled_s` either (r) for the whole batch or (batch, r), one row per
    /// sequence. Costs more than a composed weight; needed when sequences use different experts.
    pub fn set_factored(
        &mut self,
        module: &str,
        u: Tensor,
        vt: Tensor,
        scaled_s: Tensor,
    ) -> Result<()> {
        let dtype = self.dtype;
        let linear = self.linear_mut(module)?;
        let (out, r) = u.dims2()?;
        let (r2, inner) = vt.dims2()?;
        let r3 = *scaled_s.dims().last().unwrap_or(&0);
        let dims = linear.weight.dims2()?;
        if (out, inner) != dims || r != r2 || r != r3 || scaled_s.rank() > 2 {
            return Err(ModelError::Input(format!(
                "`{module}` is {dims:?}; factors U {:?}, s' {:?}, Vᵀ {:?} do not fit it",
                u.dims(),
                scaled_s.dims(),
                vt.dims()
            )));
        }
        linear.factored = Some(Factored {
            u: u.to_dtype(dtype)?,
            vt: vt.to_dtype(dtype)?,
            scaled_s: scaled_s.to_dtype(dtype)?,
        });
        Ok(())
    }

    /// Every weight under its canonical name: the inverse of [`Transformer::new`], for export.
    /// Packed matrices are unpacked: a whole copy of the model.
    pub fn tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        self.stored()
            .into_iter()
            .map(|(name, stored)| Ok((name, stored.tensor(self.weights_dtype)?)))
            .collect()
    }

    /// Every weight under its canonical name, as held.
    fn stored(&self) -> Vec<(String, Stored<'_>)> {
        let norm = |t| match self.config.architecture.is_gemma() {
            true => Stored::PlusOne(t),
            false => Stored::Tensor(t),
        };
        let mut out = vec![
            ("embed.weight".to_string(), Stored::Matrix(&self.embed)),
            ("norm.weight".to_string(), norm(&self.norm)),
        ];
        if !self.config.tie_word_embeddings {
            out.push((
                "lm_head.weight".into(),
                Stored::Matrix(&self.lm_head.weight),
            ));
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let norms = [
                ("attn_norm", &layer.attn_norm),
                ("mlp_norm", &layer.mlp_norm),
            ];
            let head_norms = ["attn.q_norm", "attn.k_norm"]
                .into_iter()
                .zip(layer.qk_norm.iter().flatten());
            let out_norms = ["attn_out_norm", "mlp_out_norm"]
                .into_iter()
                .zip(layer.out_norms.iter().flatten());
            for (name, weight) in norms.into_iter().chain(head_norms).chain(out_norms) {
                out.push((format!("layers.{i}.{name}.weight"), norm(weight)));
            }
            let linears = [
                ("attn.q_proj", &layer.q),
                ("attn.k_proj", &layer.k),
                ("attn.v_proj", &layer.v),
                ("attn.o_proj", &layer.o),
                ("mlp.gate_proj", &layer.gate),
                ("mlp.up_proj", &layer.up),
                ("mlp.down_proj", &layer.down),
            ];
            for (name, linear) in linears {
                let weight = Stored::Matrix(&linear.weight);
                out.push((format!("layers.{i}.{name}.weight"), weight));
                if let Some(bias) = &linear.bias {
                    out.push((format!("layers.{i}.{name}.bias"), Stored::Tensor(bias)));
                }
            }
        }
        out
    }

    pub fn device(&self) -> &Device {
        self.norm.device()
    }

    /// What the forward computes in (f32 for 16-bit weights on the CPU: see `weights_dtype`).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// What the weights are held and exported in.
    pub fn weights_dtype(&self) -> DType {
        self.weights_dtype
    }

    /// Logits (batch, time or 1, vocab) in f32 for `ids` (batch, time).
    pub fn forward(
        &self,
        ids: &Tensor,
        batch: &Batch,
        cache: Option<&mut KvCache>,
        mode: Mode,
        at: LogitsAt,
    ) -> Result<Tensor> {
        let x = self.hidden(ids, batch, cache, mode, at)?;
        self.head_logits(&x, mode)
    }

    /// The final normalised hidden states (batch, time or 1, hidden) that the LM head reads.
    pub fn hidden(
        &self,
        ids: &Tensor,
        batch: &Batch,
        cache: Option<&mut KvCache>,
        mode: Mode,
        at: LogitsAt,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let mut no_cache = KvCache::default();
        let cache = cache.unwrap_or(&mut no_cache);
        if cache.len() + t > self.config.attention_span() {
            return Err(ModelError::Input(format!(
                "{} positions exceed {}",
                cache.len() + t,
                self.config.span_limit()
            )));
        }
        cache.layers.resize_with(self.layers.len(), || None);
        let positions = self.positions(batch, b, t, mode)?;
        let mut x = self.embed(ids)?;
        for (index, kv) in cache.layers.iter_mut().enumerate() {
            x = self.block(index, &x, &positions, kv, mode)?;
        }
        let x = match at {
            LogitsAt::All => x,
            LogitsAt::Last => x.i((.., t - 1..t, ..))?,
            LogitsAt::Tail(n) => x.i((.., t - n.clamp(1, t)..t, ..))?,
        };
        self.final_norm(&x, mode)
    }

    /// Rotary tables and attention mask for a `(batch, time)` call, shared by every block.
    fn positions(&self, batch: &Batch, b: usize, t: usize, mode: Mode) -> Result<Positions> {
        let flat_pos = self.table_rows(batch)?;
        let half = self.config.rotary_dim() / 2;
        let mask = batch.mask.to_dtype(self.dtype)?;
        let fuses = mode == Mode::Fast && t >= FUSED_MIN_QUERIES && linalg_applies(&mask);
        let fuses = fuses && tsq_linalg::attention_pays();
        let visibility = |mask: &Tensor| match fuses {
            true => ops::visibility(mask).map(Some),
            false => Ok(None),
        };
        let fused = visibility(&mask)?;
        let windowed = match self.window_mask(batch)? {
            Some(band) => {
                let mask = mask.broadcast_add(&band.to_dtype(self.dtype)?)?;
                let fused = visibility(&mask)?;
                Some((mask, fused))
            }
            None => None,
        };
        let gather = |table: &Tensor| -> Result<Tensor> {
            Ok(table.index_select(&flat_pos, 0)?.reshape((b, t, half))?)
        };
        let local = match &self.local_rope {
            Some((cos, sin)) => Some((gather(cos)?, gather(sin)?)),
            None => None,
        };
        Ok(Positions {
            cos: gather(&self.cos)?,
            sin: gather(&self.sin)?,
            local,
            mask,
            experts: batch.experts.clone(),
            fused,
            windowed,
        })
    }

    /// The rows of the rotation tables for `batch`'s positions (flat): the positions, but
    /// under LongRoPE, for a sequence reaching past the original context, the long factors'
    /// rows (after the context's). Chosen per sequence, so that a sequence's outputs do not
    /// depend on the others in its batch; transformers chooses by the longest position of the
    /// whole call (the same for one sequence). As there, keys already cached keep their rotation.
    fn table_rows(&self, batch: &Batch) -> Result<Tensor> {
        let Some(original) = self.config.longrope().map(|l| l.original_context) else {
            return Ok(batch.positions.flatten_all()?);
        };
        let context = self.config.max_position_embeddings as u32;
        let rows: Vec<u32> = (batch.positions.to_vec2::<u32>()?.into_iter())
            .flat_map(|row| {
                let past = row.iter().any(|&p| p as usize >= original);
                row.into_iter()
                    .map(move |p| if past { context + p } else { p })
            })
            .collect();
        Ok(Tensor::new(rows, batch.positions.device())?)
    }

    /// −∞ where a query is a sliding window or more past a key ((batch, 1, time, keys), added
    /// to the mask), for models that compute windows and calls that reach past one.
    fn window_mask(&self, batch: &Batch) -> Result<Option<Tensor>> {
        let (Some(window), true) = (self.config.sliding_window, self.config.computes_windows())
        else {
            return Ok(None);
        };
        let keys = batch.key_positions.to_vec2::<u32>()?;
        if keys.first().is_none_or(|row| row.len() <= window) {
            return Ok(None);
        }
        let queries = batch.positions.to_vec2::<u32>()?;
        let (b, t, total) = (queries.len(), queries[0].len(), keys[0].len());
        let mut band = Vec::with_capacity(b * t * total);
        for (query_row, key_row) in queries.iter().zip(&keys) {
            for &q in query_row {
                band.extend(key_row.iter().map(|&k| {
                    match q.saturating_sub(k) as usize >= window {
                        true => f32::NEG_INFINITY,
                        false => 0.0,
                    }
                }));
            }
        }
        Ok(Some(Tensor::from_vec(
            band,
            (b, 1, t, total),
            batch.mask.device(),
        )?))
    }

    /// Token embeddings (batch, time, hidden) for `ids` (batch, time).
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let x = self
            .embed
            .rows(&ids.flatten_all()?)?
            .to_dtype(self.dtype)?
            .reshape((b, t, self.config.hidden_size))?;
        match self.config.architecture.is_gemma() {
            // Gemma scales its embeddings by √hidden (in the compute dtype, as transformers).
            true => Ok((x * (self.config.hidden_size as f64).sqrt())?),
            false => Ok(x),
        }
    }

    /// One transformer block (attention and MLP, each with its residual). `kv` holds the block's
    /// cached keys and values, extended in place (`&mut None` for no cache).
    fn block(
        &self,
        index: usize,
        x: &Tensor,
        positions: &Positions,
        kv: &mut Option<LayerCache>,
        mode: Mode,
    ) -> Result<Tensor> {
        let layer = &self.layers[index];
        let eps = self.config.rms_norm_eps;
        let out_norm = |y: Tensor, which: usize| match &layer.out_norms {
            Some(norms) => rms_norm(&y, &norms[which], eps, mode),
            None => Ok(y),
        };
        let h = rms_norm(x, &layer.attn_norm, eps, mode)?;
        let x = (x + out_norm(self.attention(layer, &h, positions, kv, mode)?, 0)?)?;
        let h = rms_norm(&x, &layer.mlp_norm, eps, mode)?;
        let experts = positions.experts.as_ref();
        let [gate, up] = Linear::forward_each([&layer.gate, &layer.up], &h, mode, experts)?;
        let gated = gated(&gate, &up, self.config.architecture.activation(), mode)?;
        Ok((&x + out_norm(layer.down.forward(&gated, mode, experts)?, 1)?)?)
    }

    /// The final RMS norm, whose output the LM head reads.
    fn final_norm(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        rms_norm(x, &self.norm, self.config.rms_norm_eps, mode)
    }

    fn attention(
        &self,
        layer: &Layer,
        x: &Tensor,
        positions: &Positions,
        kv: &mut Option<LayerCache>,
        mode: Mode,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (cos, sin) = match (&positions.local, layer.local_rope) {
            (Some((cos, sin)), true) => (cos, sin),
            _ => (&positions.cos, &positions.sin),
        };
        let (mask, fused) = match (&positions.windowed, layer.windowed) {
            (Some((mask, fused)), true) => (mask, fused),
            _ => (&positions.mask, &positions.fused),
        };
        let experts = positions.experts.as_ref();
        let (b, t, _) = x.dims3()?;
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, c.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let [q, k, v] = Linear::forward_each([&layer.q, &layer.k, &layer.v], x, mode, experts)?;
        let (mut q, mut k) = (heads(q, c.num_heads)?, heads(k, c.num_kv_heads)?);
        if let Some([q_norm, k_norm]) = &layer.qk_norm {
            q = rms_norm(&q, q_norm, c.rms_norm_eps, mode)?;
            k = rms_norm(&k, k_norm, c.rms_norm_eps, mode)?;
        }
        if layer.rotate {
            q = rope(&q, cos, sin, mode)?;
            k = rope(&k, cos, sin, mode)?;
        }
        if let Some(multiplier) = c.query_multiplier() {
            q = (q * multiplier)?;
        }
        let v = heads(v, c.num_kv_heads)?;
        let (k, v) = LayerCache::append(kv, k, v)?;
        let cap = c.gemma.as_ref().and_then(|g| g.attn_softcap);
        if let (Some(visibility), None) = (fused, cap) {
            let out = fused_attention(&q, &k, &v, mask, visibility)?;
            return layer.o.forward(&out, mode, experts);
        }
        let per_sequence = c.num_heads * t * k.dim(2)?;
        let out = if mode == Mode::Differentiable || b * per_sequence <= SCORES_PER_CALL {
            self.attend(&q, &k, &v, mask, mode, cap)?
        } else {
            self.attend_in_parts(&q, &k, &v, mask, cap)?
        };
        let out = out
            .transpose(1, 2)?
            .reshape((b, t, c.num_heads * c.head_dim))?;
        layer.o.forward(&out, mode, experts)
    }

    /// Attention of queries q (b, heads, t, d) over keys and values (b, kv_heads, total, d)
    /// under `mask` (b, 1, t, total): (b, heads, t, d). Scores are soft-capped before the mask
    /// where `cap` is given (Gemma 2), which no fused kernel does.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        mode: Mode,
        cap: Option<f64>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, _, t, _) = q.dims4()?;
        // Grouped-query attention without repeating keys and values: the `rep` query heads that
        // share a key/value head are stacked along the query axis, so each product is one
        // (rep·t × d)·(d × total) matmul per key/value head instead of `rep` small ones (3x fewer,
        // larger gemm calls, and no copies of k and v).
        let (kv_heads, rep) = (c.num_kv_heads, c.num_heads / c.num_kv_heads);
        let total = k.dim(2)?;
        let q = q
            .contiguous()?
            .reshape((b, kv_heads, rep * t, c.head_dim))?;
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let scores = autograd::batched_matmul(&q, k, true)?;
        if let (Mode::Fast, None) = (mode, cap) {
            let probs = masked_softmax(&scores, mask, t, scale)?;
            let out = autograd::batched_matmul(&probs, v, false)?;
            return Ok(out.reshape((b, c.num_heads, t, c.head_dim))?);
        }
        let scores = (scores * scale)?;
        let scores = match cap {
            Some(cap) => soft_cap(&scores, cap)?,
            None => scores,
        };
        let masked = scores
            .reshape((b, kv_heads, rep, t, total))?
            .broadcast_add(&mask.unsqueeze(2)?)?
            .reshape((b, kv_heads, rep * t, total))?;
        let probs = match mode {
            Mode::Fast => candle_nn::ops::softmax_last_dim(&masked)?,
            Mode::Differentiable => softmax_primitive(&masked)?,
        };
        Ok(autograd::batched_matmul(&probs, v, false)?.reshape((b, c.num_heads, t, c.head_dim))?)
    }

    /// [`Transformer::attend`] in parts whose scores stay within [`SCORES_PER_CALL`]: groups of
    /// sequences, or one sequence's queries in blocks, each block reading only the keys its
    /// queries may see (the causal mask hides the rest), which skips about half of a prompt's
    /// attention.
    fn attend_in_parts(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        cap: Option<f64>,
    ) -> Result<Tensor> {
        let (b, heads, t, _) = q.dims4()?;
        let total = k.dim(2)?;
        let past = total - t;
        let per_sequence = heads * t * total;
        let mut parts = Vec::new();
        if per_sequence <= SCORES_PER_CALL {
            let group = SCORES_PER_CALL / per_sequence;
            for first in (0..b).step_by(group) {
                let n = group.min(b - first);
                let rows = |x: &Tensor| x.narrow(0, first, n);
                parts.push(self.attend(
                    &rows(q)?,
                    &rows(k)?,
                    &rows(v)?,
                    &rows(mask)?,
                    Mode::Fast,
                    cap,
                )?);
            }
            return Ok(Tensor::cat(&parts, 0)?);
        }
        let block = (SCORES_PER_CALL / (heads * total)).max(1);
        for s in 0..b {
            let mut blocks = Vec::new();
            for first in (0..t).step_by(block) {
                let n = block.min(t - first);
                let keys = past + first + n;
                let (k, v) = (
                    k.narrow(0, s, 1)?.narrow(2, 0, keys)?,
                    v.narrow(0, s, 1)?.narrow(2, 0, keys)?,
                );
                let q = q.narrow(0, s, 1)?.narrow(2, first, n)?;
                let mask = mask
                    .narrow(0, s, 1)?
                    .narrow(2, first, n)?
                    .narrow(3, 0, keys)?;
                blocks.push(self.attend(&q, &k, &v, &mask, Mode::Fast, cap)?);
            }
            parts.push(Tensor::cat(&blocks, 2)?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }
}

/// New positions from which the fast path on the CPU attends through tsq-linalg's fused kernel
/// (`ops::fused_attention`). Its scores run 32 query columns to a vector pair, so a decoding
/// step's few rows would waste most lanes: those keep the small products of [`Transformer::attend`].
const FUSED_MIN_QUERIES: usize = 8;

/// Attention scores (floats) one fast-path call may hold at once: larger calls are split
/// (`attend_in_parts`). Whole-batch scores of six 600-token prompts were 78 MB per product,
/// each allocation fresh pages from the system: 6.5 million page faults and most of the time
/// of that prefill in the kernel.
const SCORES_PER_CALL: usize = 1 << 21;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Architecture;
    use crate::model::testing::{random_weights, tiny_config};

    #[test]
    fn weights_that_disagree_with_the_config_are_refused() {
        let config = tiny_config(crate::model::config::Architecture::Llama);
        let mut weights = random_weights(&config, 1, &Device::Cpu);
        weights.insert(
            "layers.1.mlp.down_proj.weight".into(),
            Tensor::zeros((3, 5), DType::F32, &Device::Cpu).unwrap(),
        );
        let err = Transformer::new(config, weights).err().unwrap().to_string();
        assert!(
            err.contains("layers.1.mlp.down_proj.weight") && err.contains("[3, 5]"),
            "{err}"
        );
        // Qwen3's head norms: one of the wrong size, and one missing.
        let config = tiny_config(Architecture::Qwen3);
        let mut weights = random_weights(&config, 1, &Device::Cpu);
        let norm = "layers.1.attn.k_norm.weight";
        weights.insert(
            norm.into(),
            Tensor::ones(5, DType::F32, &Device::Cpu).unwrap(),
        );
        let err = Transformer::new(config.clone(), weights.clone())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains(norm) && err.contains("[12]"), "{err}");
        weights.remove(norm);
        let err = Transformer::new(config, weights).err().unwrap().to_string();
        assert!(err.contains(&format!("weights lack `{norm}`")), "{err}");
    }

    fn tiny(arch: Architecture) -> Transformer {
        let config = tiny_config(arch);
        let weights = random_weights(&config, 7, &Device::Cpu);
        Transformer::new(config, weights).unwrap()
    }

    fn logits(tf: &Transformer, seqs: &[Vec<u32>], mode: Mode) -> Result<Vec<Vec<Vec<f32>>>> {
        let longest = seqs.iter().map(Vec::len).max().unwrap();
        let pad: Vec<usize> = seqs.iter().map(|s| longest - s.len()).collect();
        let ids: Vec<u32> = seqs
            .iter()
            .zip(&pad)
            .flat_map(|(s, &n)| std::iter::repeat_n(0, n).chain(s.iter().copied()))
            .collect();
        let batch = Batch::left_padded(&pad, 0, longest, &Device::Cpu)?;
        let out = tf.forward(
            &Tensor::from_vec(ids, (seqs.len(), longest), &Device::Cpu)?,
            &batch,
            None,
            mode,
            LogitsAt::All,
        )?;
        // Drop the padded positions so rows line up with each sequence's own tokens.
        Ok(out
            .to_vec3::<f32>()?
            .into_iter()
            .zip(pad)
            .map(|(rows, n)| rows[n..].to_vec())
            .collect())
    }

    fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
        a.iter()
            .flatten()
            .zip(b.iter().flatten())
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn batched_left_padded_equals_one_at_a_time() -> Result<()> {
        for arch in [
            Architecture::Llama,
            Architecture::Qwen2,
            Architecture::Qwen3,
            Architecture::SmolLm3,
        ] {
            let tf = tiny(arch);
            let seqs = vec![
                vec![3, 9, 1, 4, 1, 5, 9, 2],
                vec![6, 5, 3],
                vec![5, 8, 9, 7, 9],
            ];
            let together = logits(&tf, &seqs, Mode::Fast)?;
            for (i, s) in seqs.iter().enumerate() {
                let alone = logits(&tf, std::slice::from_ref(s), Mode::Fast)?;
                assert!(
                    max_diff(&together[i], &alone[0]) < 1e-5,
                    "{arch:?} sequence {i}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn kv_cache_decoding_equals_full_forward() -> Result<()> {
        // Plain, and with a sliding window of 6 that decoding and the last call run past
        // (Gemma 2: its first layer windowed, soft caps on).
        let mut windowed = tiny_config(Architecture::Gemma2);
        windowed.sliding_window = Some(6);
        let windowed =
            Transformer::new(windowed.clone(), random_weights(&windowed, 1, &Device::Cpu))?;
        for tf in [tiny(Architecture::Llama), windowed] {
            decoding_equals_full_forward(&tf)?;
        }
        Ok(())
    }

    fn decoding_equals_full_forward(tf: &Transformer) -> Result<()> {
        // Decoding past the prefix fills the cache's buffers in place and grows them twice
        // (3 → 6 → 12 positions); the last 8 positions in one call grow them to 24, which the
        // fused attention (FUSED_MIN_QUERIES) then reads in place, spare room and all.
        let seqs = [
            vec![
                3u32, 9, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8,
            ],
            vec![0, 0, 2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5, 9, 0, 4, 5, 2, 3],
        ];
        let pad = [0usize, 2];
        let dev = Device::Cpu;
        let all: Vec<u32> = seqs.iter().flatten().copied().collect();
        let full = tf.forward(
            &Tensor::from_vec(all, (2, 20), &dev)?,
            &Batch::left_padded(&pad, 0, 20, &dev)?,
            None,
            Mode::Fast,
            LogitsAt::All,
        )?;
        let mut cache = KvCache::default();
        let prefix: Vec<u32> = seqs.iter().flat_map(|s| s[..3].to_vec()).collect();
        tf.forward(
            &Tensor::from_vec(prefix, (2, 3), &dev)?,
            &Batch::left_padded(&pad, 0, 3, &dev)?,
            Some(&mut cache),
            Mode::Fast,
            LogitsAt::Last,
        )?;
        for step in 3..12 {
            let next: Vec<u32> = seqs.iter().map(|s| s[step]).collect();
            let out = tf.forward(
                &Tensor::from_vec(next, (2, 1), &dev)?,
                &Batch::left_padded(&pad, cache.len(), 1, &dev)?,
                Some(&mut cache),
                Mode::Fast,
                LogitsAt::Last,
            )?;
            let expected = full.i((.., step..step + 1, ..))?;
            let diff = (out - expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "step {step}: {diff}");
        }
        let rest: Vec<u32> = seqs.iter().flat_map(|s| s[12..].to_vec()).collect();
        let out = tf.forward(
            &Tensor::from_vec(rest, (2, 8), &dev)?,
            &Batch::left_padded(&pad, cache.len(), 8, &dev)?,
            Some(&mut cache),
            Mode::Fast,
            LogitsAt::All,
        )?;
        let diff = (out - full.i((.., 12.., ..))?)?.abs()?.max_all()?;
        assert!(diff.to_scalar::<f32>()? < 1e-5, "{diff}");
        assert_eq!(cache.len(), 20);
        let capacity = cache.layers[0].as_ref().map(|l| l.k.dim(2)).transpose()?;
        assert_eq!(capacity, Some(24));
        Ok(())
    }

    #[test]
    fn fast_and_differentiable_paths_agree() -> Result<()> {
        for arch in [
            Architecture::Qwen2,
            Architecture::Qwen3,
            Architecture::SmolLm3,
            Architecture::Gemma2,
            Architecture::Gemma3,
        ] {
            let tf = tiny(arch);
            let seqs = vec![vec![1, 2, 3, 4, 5, 6, 7], vec![9, 8, 7]];
            let fast = logits(&tf, &seqs, Mode::Fast)?;
            let slow = logits(&tf, &seqs, Mode::Differentiable)?;
            for (f, s) in fast.iter().zip(&slow) {
                assert!(max_diff(f, s) < 1e-4, "{arch:?}: {}", max_diff(f, s));
            }
        }
        Ok(())
    }

    #[test]
    fn attention_in_parts_equals_attention_whole() -> Result<()> {
        let tf = tiny(Architecture::Llama);
        let c = &tf.config;
        let dev = Device::Cpu;
        // One sequence past SCORES_PER_CALL (query blocks), then three that fit it one by one
        // but not together (groups of sequences, left-padded).
        for (pad, t) in [(vec![0], 800), (vec![0, 50, 200], 500)] {
            let b = pad.len();
            assert!(b * c.num_heads * t * t > SCORES_PER_CALL);
            let q = Tensor::randn(0f32, 1.0, (b, c.num_heads, t, c.head_dim), &dev)?;
            let k = Tensor::randn(0f32, 1.0, (b, c.num_kv_heads, t, c.head_dim), &dev)?;
            let v = Tensor::randn(0f32, 1.0, (b, c.num_kv_heads, t, c.head_dim), &dev)?;
            let mask = Batch::left_padded(&pad, 0, t, &dev)?.mask;
            // Plain, and with Gemma 2's soft cap on the scores.
            for cap in [None, Some(2.0)] {
                let whole = tf.attend(&q, &k, &v, &mask, Mode::Fast, cap)?;
                let parts = tf.attend_in_parts(&q, &k, &v, &mask, cap)?;
                let diff = (whole - parts)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(diff < 1e-5, "{cap:?}: {diff}");
            }
        }
        Ok(())
    }

    #[test]
    fn long_prompts_agree_with_the_differentiable_path() -> Result<()> {
        // Plain, and windowed (every layer: Mistral; the first: Gemma 3) past a window of 100.
        for (arch, window) in [
            (Architecture::Llama, None),
            (Architecture::Mistral, Some(100)),
            (Architecture::Gemma3, Some(100)),
        ] {
            let mut config = tiny_config(arch);
            config.max_position_embeddings = 1024;
            config.sliding_window = window;
            let tf = Transformer::new(config.clone(), random_weights(&config, 3, &Device::Cpu))?;
            let tokens = |n: usize, seed: u32| (0..n as u32).map(|i| (i * 7 + seed) % 64).collect();
            let seqs = vec![tokens(500, 2), tokens(450, 3), tokens(300, 4)];
            let fast = logits(&tf, &seqs, Mode::Fast)?;
            let whole = logits(&tf, &seqs, Mode::Differentiable)?;
            for (f, w) in fast.iter().zip(&whole) {
                assert!(max_diff(f, w) < 1e-4, "{arch:?}: {}", max_diff(f, w));
            }
        }
        Ok(())
    }

    #[test]
    fn token_ids_past_the_vocabulary_are_refused() {
        // Tied embeddings: on an AVX2 or AVX-512 CPU the rows come out of the head's panels.
        let tf = tiny(Architecture::Llama);
        assert!(tf.config.tie_word_embeddings);
        let ids = Tensor::new(&[[1u32, tf.config.vocab_size as u32]], &Device::Cpu).unwrap();
        let batch = Batch::left_padded(&[0], 0, 2, &Device::Cpu).unwrap();
        let err = tf
            .forward(&ids, &batch, None, Mode::Fast, LogitsAt::Last)
            .err()
            .unwrap();
        let message = err.to_string();
        // The packed rows' check, or candle's where the embedding is a tensor.
        let named = ["past the vocabulary", "invalid index"];
        assert!(named.iter().any(|m| message.contains(m)), "{message}");
    }

    #[test]
    fn prompts_past_the_context_are_refused() {
        let tf = tiny(Architecture::Llama);
        let n = tf.config.max_position_embeddings + 1;
        let ids = Tensor::zeros((1, n), DType::U32, &Device::Cpu).unwrap();
        let batch = Batch::left_padded(&[0], 0, n, &Device::Cpu).unwrap();
        let err = tf
            .forward(&ids, &batch, None, Mode::Fast, LogitsAt::Last)
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("exceed the model's context"),
            "{err}"
        );
    }
}

#[cfg(test)]
mod quantized_tests {
    use super::*;

    #[test]
    fn q8_linear_matches_float_linear() -> Result<()> {
        let dev = Device::Cpu;
        for (out, inp, rows) in [
            (96, 64, 2),
            (576, 576, 1),
            (192, 576, 1),
            (1536, 576, 1),
            (576, 1536, 1),
            (576, 1536, 3),
        ] {
            let w = Tensor::randn(0f32, 1.0, (out, inp), &dev)?;
            let mut lin = Linear::new(Matrix::new(w)?, None);
            let x = Tensor::randn(0f32, 1.0, (rows, 1, inp), &dev)?;
            let exact = lin.forward(&x, Mode::Fast, None)?;
            lin.quantized = Some(Quantized::new(&lin.weight, GgmlDType::Q8_0)?);
            let approx = lin.forward(&x, Mode::Fast, None)?;
            let err = (exact.clone() - approx)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            let scale = exact.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                err < 0.02 * scale,
                "{out}x{inp} rows {rows}: {err} vs {scale}"
            );
        }
        Ok(())
    }

    #[test]
    fn quantized_head_keeps_the_top_logits_exact() -> Result<()> {
        let dev = Device::Cpu;
        let mut config =
            crate::model::testing::tiny_config(crate::model::config::Architecture::Llama);
        (config.intermediate_size, config.vocab_size) = (64, 512);
        let mut tf = Transformer::new(
            config.clone(),
            crate::model::testing::random_weights(&config, 3, &dev),
        )?;
        tf.quantize_for_decoding(GgmlDType::Q8_0)?;
        // Compare the head alone: same hidden state, float head vs quantized head + exact top.
        let x = Tensor::randn(0f32, 1.0, (1, 1, config.hidden_size), &dev)?;
        let float_head = autograd::plain_matmul_t(&x, &tf.lm_head.weight.tensor()?)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mixed = tf
            .head_logits(&x, Mode::Fast)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut order: Vec<usize> = (0..float_head.len()).collect();
        order.sort_by(|&a, &b| float_head[b].total_cmp(&float_head[a]));
        for &i in &order[..16] {
            assert!(
                (mixed[i] - float_head[i]).abs() < 1e-5,
                "token {i}: {} vs {}",
                mixed[i],
                float_head[i]
            );
        }
        Ok(())
    }
}
