//! The SVF training engine: the transformer's forward pass keeping what its backward pass needs,
//! and that backward pass written out by hand, over plain f32 buffers on the CPU.
//!
//! Why not candle's autograd: on an SVF step (SmolLM2, 8 × 256 tokens) candle spent more time
//! around the products than in them: every graph node's backward allocates a zero-filled
//! gradient and adds into it, its matmul backward computes gradients for frozen weights, and
//! keeping the whole graph took 15 GB, so blocks had to be recomputed (31 s per step at best,
//! PyTorch 13.7 s). Here each block keeps a few activations per token (~40 KB on SmolLM2), the
//! backward pass computes input gradients only, and nearly all time is spent in products with
//! frozen matrices ([`Frozen`]: tsq-linalg's packed kernel where AVX2 or AVX-512 runs, faer
//! otherwise).
//!
//! Projections that are SVF targets run factored, y = U (s' ⊙ (Vᵀ x)), keeping h = Vᵀ x; the
//! backward pass gets ∂L/∂s' = Σ_tokens (Uᵀ ∂y) ⊙ h from the product it needs anyway for ∂x. The
//! caller maps ∂L/∂s' to ∂L/∂z (the parametrisation lives in [`super::effective_scale`]).
//!
//! Sequences are packed without padding: each attends causally within itself, sequences that
//! share their first tokens are computed once up to there ([`super::packing`]), and a batch too
//! large for memory runs as several passes whose gradients add up.

mod attention;
mod block;
mod buffers;
mod head;
mod projection;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{DType, Tensor};
use rayon::prelude::*;
use tsq_linalg::{Mat, MatMut, PackedMatrix, Threads, matmul};

use super::packing::{Expansion, MIN_SHARED, Pack, packs};
use crate::model::WeightSource;
use crate::model::config::ModelConfig;
use crate::model::error::{ModelError, Result};
use crate::model::kernels;
use crate::svd::cache::Decomposed;
use crate::svd::targets::LAYER_MODULES;
pub(super) use buffers::split_mut;
use buffers::{product, query_blocks, scale_columns, split, split_groups, split_groups_mut};

// Slots of [`Layer::projections`], in `LAYER_MODULES` order.
const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const O: usize = 3;
const GATE: usize = 4;
const UP: usize = 5;
const DOWN: usize = 6;

/// Query positions per block of causal attention: a block of t positions needs the first
/// t_end keys only, so blocks skip ~3/8 of the score products at 256 tokens.
const QUERY_BLOCK: usize = 64;

/// Rows of the LM head computed at once: 256 × 49k vocabulary × 4 bytes ≈ 50 MB per buffer.
const HEAD_CHUNK_ROWS: usize = 256;

/// Activation memory one pass may take; larger batches are split into passes. At ~40 KB per
/// token and layer on SmolLM2 plus attention probabilities, 8 × 256 tokens take ~2.4 GB.
const PASS_BYTES: usize = 3 << 30;

/// Buffers kept for reuse. A training step allocates the same few gigabytes of activations
/// every time; taken fresh from the OS each step they cost ~1 s of page faults per step on
/// SmolLM2 (sys time 8.8 s → 4.0 s over a 3-step benchmark when freed memory was kept).
/// Buffers come out zeroed (or holding a copy) and go back with [`Pool::give`]; one not given
/// back is just freed.
#[derive(Default)]
struct Pool(Mutex<Vec<Vec<f32>>>);

impl Pool {
    /// `len` zeros, in the smallest kept buffer that holds them.
    fn zeros(&self, len: usize) -> Vec<f32> {
        let mut buffer = self.take(len);
        buffer.resize(len, 0.0);
        buffer
    }

    /// A copy of `values`, in the smallest kept buffer that holds them.
    fn copy_of(&self, values: &[f32]) -> Vec<f32> {
        let mut buffer = self.take(values.len());
        buffer.extend_from_slice(values);
        buffer
    }

    /// An empty buffer with room for `len`.
    fn take(&self, len: usize) -> Vec<f32> {
        let mut kept = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let best = (kept.iter().enumerate())
            .filter(|(_, b)| b.capacity() >= len)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        match best {
            Some(i) => {
                let mut buffer = kept.swap_remove(i);
                buffer.clear();
                buffer
            }
            None => Vec::with_capacity(len),
        }
    }

    fn give(&self, buffers: impl IntoIterator<Item = Vec<f32>>) {
        let mut kept = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        kept.extend(buffers);
    }
}

/// A frozen matrix M as the right factor of both products the engine takes with it: `x · Mᵀ`
/// (forward) and `x · M` (backward).
struct Frozen {
    rows: usize,
    /// B = Mᵀ.
    forward: Factor,
    /// B = M.
    backward: Factor,
}

/// A right factor B (k × n) of `c = x · B`, stored the way its kernel reads it: packed (Bᵀ in
/// panels) for tsq-linalg's kernel where AVX2 or AVX-512 runs, else row-major for faer, which ran
/// 1.2-1.5x slower on a transposed read of the right operand (SVF-step shapes, 2026-11-27).
enum Factor {
    Packed(Arc<PackedMatrix>),
    Plain { b: Vec<f32>, k: usize, n: usize },
}

impl Frozen {
    /// M's own factors, or with `shared` M's rows as packed by the model for its forward
    /// pass (the same panels: one copy fewer).
    fn new(tensor: &Tensor, shared: Option<Arc<PackedMatrix>>) -> Result<Self> {
        Ok(Self {
            rows: tensor.dim(0)?,
            forward: Factor::transpose_of(tensor, shared)?,
            backward: Factor::transpose_of(&tensor.t()?, None)?,
        })
    }

    /// The LM head: its backward product sums over the whole vocabulary (k ≈ 49k for
    /// SmolLM2), where the packed kernel, which keeps each output's sum over k in registers,
    /// streams the weights once per 8 rows; faer's blocking over k does better there.
    fn head(tensor: &Tensor, shared: Option<Arc<PackedMatrix>>) -> Result<Self> {
        Ok(Self {
            rows: tensor.dim(0)?,
            forward: Factor::transpose_of(tensor, shared)?,
            backward: Factor::plain(tensor)?,
        })
    }
}

impl Factor {
    /// B = Mᵀ for a matrix M: M's rows packed where the kernel runs (`shared` if given; 16-bit
    /// panels for a bf16 or f16 M, half the memory), else Mᵀ row-major.
    fn transpose_of(m: &Tensor, shared: Option<Arc<PackedMatrix>>) -> Result<Self> {
        if let Some(packed) = shared {
            return Ok(Self::Packed(packed));
        }
        // Only a 16-bit M is packed in its own type: anything else in f32 (U, Vᵀ of any dtype).
        let m = match m.dtype() {
            DType::BF16 | DType::F16 => m.clone(),
            _ => m.to_dtype(DType::F32)?,
        };
        match crate::model::autograd::packed(&m)? {
            Some(packed) => Ok(Self::Packed(Arc::new(packed))),
            None => Self::plain(&m.t()?),
        }
    }

    /// B itself, row-major, for faer.
    fn plain(b: &Tensor) -> Result<Self> {
        let (k, n) = b.dims2()?;
        Ok(Self::Plain { b: f32s(b)?, k, n })
    }

    /// `c = x · B` (or with `accumulate`, `c += x · B`) for the `rows` rows of x, on all
    /// threads.
    fn product(&self, c: &mut [f32], x: &[f32], rows: usize, accumulate: bool, pool: &Pool) {
        match self {
            Self::Plain { b, k, n } => {
                product(c, Mat::new(x, rows, *k), Mat::new(b, *k, *n), accumulate)
            }
            Self::Packed(packed) if !accumulate => packed.matmul_t_into(x, rows, c, Threads::All),
            Self::Packed(packed) => {
                let mut fresh = pool.zeros(c.len());
                packed.matmul_t_into(x, rows, &mut fresh, Threads::All);
                c.par_iter_mut().zip(&fresh).for_each(|(c, f)| *c += f);
                pool.give([fresh]);
            }
        }
    }
}

enum Weight {
    /// W (out × in).
    Dense(Frozen),
    /// An SVF target: U (out × rank), Vᵀ (rank × in), and its index among the targets.
    Factored {
        u: Frozen,
        vt: Frozen,
        target: usize,
    },
}

struct Projection {
    weight: Weight,
    bias: Option<Vec<f32>>,
    out: usize,
}

struct Layer {
    attn_norm: Vec<f32>,
    /// Per-head RMS norm weights of queries and keys, where the architecture has them.
    qk_norm: Option<[Vec<f32>; 2]>,
    /// Which tables rotate queries and keys (none in SmolLM3's NoPE layers).
    rotation: Option<Tables>,
    /// The sliding window its attention keeps to, if it has one.
    window: Option<usize>,
    mlp_norm: Vec<f32>,
    /// Gemma's norms of the attention's and the MLP's outputs, before each residual sum.
    out_norms: Option<[Vec<f32>; 2]>,
    projections: [Projection; 7],
}

/// Which rotation tables of a pass a layer uses.
#[derive(Clone, Copy)]
enum Tables {
    Global,
    /// Gemma 3's sliding-window layers' own base.
    Local,
}

impl Layer {
    /// The weights of the head norm that follows projection `slot` (q or k), if any.
    fn head_norm(&self, slot: usize) -> Option<&[f32]> {
        let [q, k] = self.qk_norm.as_ref()?;
        match slot {
            Q => Some(q),
            K => Some(k),
            _ => None,
        }
    }
}

/// Token embeddings: the model's own panels where it holds them so (rows gathered per token),
/// else an f32 copy of the rows.
enum Embedding {
    Panels(Arc<PackedMatrix>),
    Rows(Vec<f32>),
}

impl Embedding {
    /// The rows of `ids` (already checked against the vocabulary), one after another.
    fn rows(&self, ids: &[u32], hidden: usize) -> Vec<f32> {
        match self {
            Self::Panels(panels) => panels.gather_rows(ids),
            Self::Rows(rows) => (ids.iter())
                .flat_map(|&id| &rows[id as usize * hidden..(id as usize + 1) * hidden])
                .copied()
                .collect(),
        }
    }
}

/// A base model's weights as the engine uses them, with the SVF targets factored.
pub struct Engine {
    config: ModelConfig,
    embed: Embedding,
    /// What embeddings are multiplied by (Gemma's √hidden).
    embed_scale: Option<f32>,
    head: Frozen,
    norm: Vec<f32>,
    /// The logits' soft cap (Gemma 2).
    final_cap: Option<f32>,
    layers: Vec<Layer>,
    inv_freq: Vec<f32>,
    /// Inverse frequencies of [`Tables::Local`], where some layer uses them.
    local_inv_freq: Option<Vec<f32>>,
    /// Rank of each target, in target order.
    ranks: Vec<usize>,
    /// Activation memory one pass may take ([`PASS_BYTES`]).
    pass_bytes: usize,
    /// Fewest shared leading tokens for which sequences are packed ([`MIN_SHARED`]).
    min_shared: usize,
    pool: Pool,
}

/// One sequence of a step: its tokens and the loss weight of each (`weights[0]` is 0: nothing
/// predicts the first token).
pub struct Sequence<'a> {
    pub ids: &'a [u32],
    pub weights: &'a [f32],
}

/// What a call to [`Engine::gradients`] found.
pub struct Gradients {
    /// −Σ w · log p over all weighted tokens.
    pub loss: f64,
    /// ∂loss/∂s' per target, in target order.
    pub scaled_s: Vec<Vec<f32>>,
    pub forward_s: f64,
    pub backward_s: f64,
}

/// A position whose prediction is weighted: its row in the pass, the token, the weight.
struct Scored {
    row: usize,
    token: u32,
    weight: f32,
}

/// The packs of one pass, one after another.
struct Pass {
    /// Tokens of each pack (what the head layout groups by).
    lengths: Vec<usize>,
    tokens: usize,
    /// Rotary position of each token.
    positions: Vec<usize>,
    /// Cos and sin of [`Tables::Global`], then of [`Tables::Local`] where the model has them.
    global: (Vec<f32>, Vec<f32>),
    local: Option<(Vec<f32>, Vec<f32>)>,
    /// The members' own attention sequences, when some pack shares tokens.
    expansion: Option<Expansion>,
}

/// What one block's backward pass needs from its forward pass.
struct Saved {
    x: Vec<f32>,
    inv_rms_attn: Vec<f32>,
    /// Head-major per sequence (heads × len × head_dim), after rotation for q and k.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Per sequence and key/value head: (rep · len) × len.
    probs: Vec<f32>,
    x_mid: Vec<f32>,
    inv_rms_mlp: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// h = Vᵀ x of each factored projection.
    hidden: [Option<Vec<f32>>; 7],
    /// The inputs of q's and k's head norms, in that order (none where the model has none).
    head_norms: Vec<NormInput>,
    /// The inputs of the attention's and the MLP's output norms (Gemma), in that order.
    out_norms: Vec<NormInput>,
}

/// What an RMS norm's backward pass needs: its input (rows × width) and the inverse RMS of
/// each row.
struct NormInput {
    x: Vec<f32>,
    inv_rms: Vec<f32>,
}

impl Pass {
    /// Cos and sin of `tables`.
    fn tables(&self, tables: Tables) -> (&[f32], &[f32]) {
        let (cos, sin) = match (tables, &self.local) {
            (Tables::Local, Some(local)) => local,
            _ => &self.global,
        };
        (cos, sin)
    }
}

/// Attention's results: what its backward pass keeps, and the attended values (packed).
struct Attended {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    probs: Vec<f32>,
    out: Vec<f32>,
}

impl Saved {
    fn recycle(self, pool: &Pool) {
        let buffers = [
            self.x,
            self.inv_rms_attn,
            self.q,
            self.k,
            self.v,
            self.probs,
            self.x_mid,
            self.inv_rms_mlp,
            self.gate,
            self.up,
        ];
        let norms =
            (self.head_norms.into_iter().chain(self.out_norms)).flat_map(|n| [n.x, n.inv_rms]);
        let hidden = self.hidden.into_iter().flatten();
        pool.give(buffers.into_iter().chain(hidden).chain(norms));
    }
}

/// The elements of `t` as f32, whatever its dtype and device (bf16 / f16 models train in f32).
fn f32s(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

impl Engine {
    /// The weights of `tensors` (canonical names, f32) with `factors` as the SVF targets, in
    /// that order.
    pub fn new(
        config: &ModelConfig,
        tensors: &dyn WeightSource,
        factors: &[Decomposed],
    ) -> Result<Self> {
        let get = |name: &str| {
            tensors
                .weight(name)?
                .ok_or_else(|| ModelError::Input(format!("weights lack `{name}`")))
        };
        let gemma = config.architecture.is_gemma();
        // A norm's weight as the forward multiplies by it: Gemma's stored w is 1 + w.
        let norm = |name: &str| -> Result<Vec<f32>> {
            let mut weight = f32s(&get(name)?)?;
            if gemma {
                weight.iter_mut().for_each(|w| *w += 1.0);
            }
            Ok(weight)
        };
        let targets: BTreeMap<&str, (usize, &Decomposed)> = factors
            .iter()
            .enumerate()
            .map(|(i, d)| (d.name.as_str(), (i, d)))
            .collect();
        let mut layers = Vec::with_capacity(config.num_layers);
        let mut used = 0;
        for i in 0..config.num_layers {
            let projection = |name: &str| -> Result<Projection> {
                let module = format!("layers.{i}.{name}");
                let (weight, out) = match targets.get(module.as_str()) {
                    Some(&(target, d)) => {
                        let u = Frozen::new(&d.factors.u, None)?;
                        let out = u.rows;
                        (
                            Weight::Factored {
                                u,
                                vt: Frozen::new(&d.factors.vt, None)?,
                                target,
                            },
                            out,
                        )
                    }
                    None => {
                        let name = format!("{module}.weight");
                        let dense = Frozen::new(&get(&name)?, tensors.packed(&name))?;
                        let out = dense.rows;
                        (Weight::Dense(dense), out)
                    }
                };
                let bias = match tensors.weight(&format!("{module}.bias"))? {
                    Some(b) => Some(f32s(&b)?),
                    None => None,
                };
                Ok(Projection { weight, bias, out })
            };
            let projections = [Q, K, V, O, GATE, UP, DOWN].map(|p| projection(LAYER_MODULES[p]));
            let [q, k, v, o, gate, up, down] = projections;
            let projections = [q?, k?, v?, o?, gate?, up?, down?];
            used += projections
                .iter()
                .filter(|p| matches!(p.weight, Weight::Factored { .. }))
                .count();
            let layer_norm = |n: &str| norm(&format!("layers.{i}.{n}.weight"));
            let qk_norm = match config.architecture.qk_norm() {
                true => Some([layer_norm("attn.q_norm")?, layer_norm("attn.k_norm")?]),
                false => None,
            };
            let out_norms = match gemma {
                true => Some([layer_norm("attn_out_norm")?, layer_norm("mlp_out_norm")?]),
                false => None,
            };
            let rotation = match config.rotates_locally(i) {
                true => Tables::Local,
                false => Tables::Global,
            };
            layers.push(Layer {
                attn_norm: layer_norm("attn_norm")?,
                qk_norm,
                rotation: config.rotates(i).then_some(rotation),
                window: config
                    .sliding_window
                    .filter(|_| config.attends_within_window(i)),
                mlp_norm: layer_norm("mlp_norm")?,
                out_norms,
                projections,
            });
        }
        if used != factors.len() {
            return Err(ModelError::Input(format!(
                "{} of {} SVF targets name no projection of this model",
                factors.len() - used,
                factors.len()
            )));
        }
        let cap = |pick: fn(&crate::model::config::Gemma) -> Option<f64>| {
            config.gemma.as_ref().and_then(pick).map(|c| c as f32)
        };
        Ok(Self {
            config: config.clone(),
            embed: match tensors.packed("embed.weight") {
                Some(panels) => Embedding::Panels(panels),
                None => Embedding::Rows(f32s(&get("embed.weight")?)?),
            },
            // In f32, as transformers computes it for an f32 model.
            embed_scale: gemma.then(|| (config.hidden_size as f32).sqrt()),
            head: {
                let name = match config.tie_word_embeddings {
                    true => "embed.weight",
                    false => "lm_head.weight",
                };
                Frozen::head(&get(name)?, tensors.packed(name))?
            },
            norm: norm("norm.weight")?,
            final_cap: cap(|g| g.final_softcap),
            layers,
            inv_freq: config.inv_freq(),
            local_inv_freq: config.local_inv_freq(),
            ranks: factors
                .iter()
                .map(|d| d.factors.s.dim(0))
                .collect::<candle_core::Result<_>>()?,
            pass_bytes: PASS_BYTES,
            min_shared: MIN_SHARED,
            pool: Pool::default(),
        })
    }

    /// The loss −Σ w · log p(token | prefix) over `batch` with the targets' scaled singular
    /// values `scaled_s` (target order), and its gradient with respect to them.
    pub fn gradients(&self, scaled_s: &[Vec<f32>], batch: &[Sequence]) -> Result<Gradients> {
        check_step(&self.config, &self.ranks, scaled_s, batch)?;
        let mut out = Gradients {
            loss: 0.0,
            scaled_s: self.ranks.iter().map(|&r| vec![0f32; r]).collect(),
            forward_s: 0.0,
            backward_s: 0.0,
        };
        let packs = packs(batch, self.min_shared);
        for pass in self.passes(&packs) {
            self.run_pass(scaled_s, pass, &mut out);
        }
        Ok(out)
    }

    /// Groups the packs into passes of at most `pass_bytes` of activations (a larger single
    /// pack gets a pass of its own).
    fn passes<'p, 'a>(&self, packs: &'p [Pack<'a>]) -> Vec<&'p [Pack<'a>]> {
        let c = &self.config;
        // Per token and layer, f32: x, q, k, v, x_mid and a few norms (≤ 6 × the wider of
        // hidden and q), gate and up (2 intermediate), h = Vᵀx of up to three factored MLP
        // targets (≤ 3 hidden), q and k before their head norms (where the model has them);
        // then the attention probabilities of each member's sequence.
        let q_width = c.num_heads * c.head_dim;
        let head_norms = match c.architecture.qk_norm() {
            true => q_width + c.num_kv_heads * c.head_dim,
            false => 0,
        };
        let out_norms = match c.architecture.is_gemma() {
            true => 2 * c.hidden_size,
            false => 0,
        };
        let widths =
            9 * c.hidden_size.max(q_width) + 2 * c.intermediate_size + head_norms + out_norms;
        let per_token = 4 * c.num_layers * widths;
        let bytes = |pack: &Pack| {
            let probs: usize = pack.members.iter().map(|m| m.ids.len().pow(2)).sum();
            pack.tokens() * per_token + 4 * c.num_layers * c.num_heads * probs
        };
        let mut passes = vec![];
        let (mut start, mut used) = (0, 0);
        for (i, pack) in packs.iter().enumerate() {
            let need = bytes(pack);
            if i > start && used + need > self.pass_bytes {
                passes.push(&packs[start..i]);
                (start, used) = (i, 0);
            }
            used += need;
        }
        if start < packs.len() {
            passes.push(&packs[start..]);
        }
        passes
    }

    fn run_pass(&self, scaled_s: &[Vec<f32>], packs: &[Pack], out: &mut Gradients) {
        let clock = std::time::Instant::now();
        let lengths: Vec<usize> = packs.iter().map(Pack::tokens).collect();
        let positions: Vec<usize> = packs.iter().flat_map(Pack::positions).collect();
        let longest = positions.iter().max().map_or(0, |p| p + 1);
        let scale = self.config.rope_attention_factor();
        let pass = Pass {
            tokens: lengths.iter().sum(),
            lengths,
            positions,
            global: kernels::rope_tables(&self.inv_freq, scale, longest),
            local: (self.local_inv_freq.as_ref())
                .map(|inv_freq| kernels::rope_tables(inv_freq, 1.0, longest)),
            expansion: Expansion::of(packs),
        };
        let ids: Vec<u32> = packs.iter().flat_map(Pack::ids).collect();
        let mut x = self.embed.rows(&ids, self.config.hidden_size);
        if let Some(scale) = self.embed_scale {
            x.par_iter_mut().for_each(|v| *v *= scale);
        }
        let mut saved = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let (next, keep) = self.block_forward(layer, x, &pass, scaled_s);
            saved.push(keep);
            x = next;
        }
        out.forward_s += clock.elapsed().as_secs_f64();

        let clock = std::time::Instant::now();
        let mut scored = vec![];
        let mut start = 0;
        for pack in packs {
            for (j, seq) in pack.members.iter().enumerate() {
                for t in 1..seq.ids.len() {
                    if seq.weights[t] != 0.0 {
                        scored.push(Scored {
                            row: start + pack.row(j, t - 1),
                            token: seq.ids[t],
                            weight: seq.weights[t],
                        });
                    }
                }
            }
            start += pack.tokens();
        }
        let mut grad = self.pool.zeros(x.len());
        out.loss += self.head_loss(&x, &scored, &mut grad);
        self.pool.give([x]);
        for (layer, keep) in self.layers.iter().zip(saved).rev() {
            grad = self.block_backward(layer, keep, grad, &pass, scaled_s, &mut out.scaled_s);
        }
        out.backward_s += clock.elapsed().as_secs_f64();
    }
}

/// Refuses a step whose scaled singular values do not fit the targets (`ranks`, in order) or
/// whose sequences the model cannot take (longer than its attention span). Both engines check
/// with it.
pub(super) fn check_step(
    config: &ModelConfig,
    ranks: &[usize],
    scaled_s: &[Vec<f32>],
    batch: &[Sequence],
) -> Result<()> {
    let bad = |message: String| Err(ModelError::Input(message));
    if scaled_s.len() != ranks.len() || scaled_s.iter().zip(ranks).any(|(s, &r)| s.len() != r) {
        return bad("scaled singular values do not match the SVF targets".into());
    }
    let vocab = config.vocab_size;
    let long_from = config.longrope().map(|l| l.original_context);
    for (b, seq) in batch.iter().enumerate() {
        if seq.ids.len() != seq.weights.len() || seq.weights.first().is_some_and(|&w| w != 0.0) {
            return bad(format!(
                "sequence {b}: needs one weight per token and none on the first"
            ));
        }
        if seq.ids.len() > config.attention_span() {
            return bad(format!(
                "sequence {b}: {} tokens exceed {}",
                seq.ids.len(),
                config.span_limit()
            ));
        }
        // Packed sequences share their prompt's rotation, which LongRoPE would make depend on
        // each sequence's length: training keeps within the original context.
        if let Some(original) = long_from.filter(|&original| seq.ids.len() > original) {
            return bad(format!(
                "sequence {b}: {} tokens exceed the model's original context of {original} \
                 (LongRoPE): tsq trains within it",
                seq.ids.len()
            ));
        }
        if let Some(id) = seq.ids.iter().find(|&&id| id as usize >= vocab) {
            return bad(format!(
                "sequence {b}: token {id} is outside the vocabulary of {vocab}"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Architecture;
    use crate::model::testing::{random_weights, tiny_config};
    use crate::model::transformer::{Batch, LogitsAt, Mode, Transformer};
    use candle_core::Device;

    /// Two sequences of different lengths (longer than a query block), weights of both signs.
    fn batch(vocab: u32) -> (Vec<Vec<u32>>, Vec<Vec<f32>>) {
        let ids: Vec<Vec<u32>> = [70usize, 45]
            .iter()
            .map(|&n| (0..n as u32).map(|t| (t * 7 + n as u32) % vocab).collect())
            .collect();
        let weights = ids
            .iter()
            .zip([0.5f32, -0.75])
            .map(|(s, a)| (0..s.len()).map(|t| if t > 20 { a } else { 0.0 }).collect())
            .collect();
        (ids, weights)
    }

    fn sequences<'a>(ids: &'a [Vec<u32>], weights: &'a [Vec<f32>]) -> Vec<Sequence<'a>> {
        ids.iter()
            .zip(weights)
            .map(|(ids, weights)| Sequence { ids, weights })
            .collect()
    }

    #[test]
    fn a_batch_split_into_passes_gives_the_same_loss_and_gradients() -> Result<()> {
        let (mut engine, scaled_s, vocab) = tiny_engine()?;
        let (ids, weights) = batch(vocab);
        let batch = sequences(&ids, &weights);
        let whole = engine.gradients(&scaled_s, &batch)?;
        engine.pass_bytes = 1;
        assert_eq!(engine.passes(&packs(&batch, MIN_SHARED)).len(), 2);
        let split = engine.gradients(&scaled_s, &batch)?;
        assert_same_gradients(&whole, &split);
        Ok(())
    }

    /// LongRoPE rotates a sequence by its length, which packed prompts cannot share: training
    /// sequences past the original context are refused, naming it.
    #[test]
    fn sequences_past_longropes_original_context_are_refused() -> Result<()> {
        let (mut engine, scaled_s, vocab) = tiny_engine()?;
        let half = engine.config.head_dim / 2;
        engine.config.rope_scaling = Some(crate::model::config::RopeScaling::LongRope(
            crate::model::config::LongRope {
                short: vec![1.0; half],
                long: vec![4.0; half],
                original_context: 50,
                attention_factor: 1.2,
            },
        ));
        let (ids, weights) = batch(vocab);
        let err = engine.gradients(&scaled_s, &sequences(&ids, &weights));
        let err = err.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            err.contains("sequence 0: 70 tokens exceed the model's original context of 50"),
            "{err}"
        );
        Ok(())
    }

    /// A tiny decomposed model's engine and its targets' singular values.
    fn tiny_engine() -> Result<(Engine, Vec<Vec<f32>>, u32)> {
        let (base, factors) = crate::svf::tiny_decomposed(5);
        let engine = Engine::new(&base.config, &base, &factors)?;
        let scaled_s = factors
            .iter()
            .map(|d| d.factors.s.to_vec1::<f32>())
            .collect::<candle_core::Result<_>>()?;
        Ok((engine, scaled_s, base.config.vocab_size as u32))
    }

    /// Equal up to f32 rounding: products over different row counts sum in other orders.
    fn assert_same_gradients(a: &Gradients, b: &Gradients) {
        let (x, y) = (a.loss, b.loss);
        assert!((x - y).abs() < 1e-5 * x.abs().max(1.0), "{x} vs {y}");
        for (a, b) in a.scaled_s.iter().zip(&b.scaled_s) {
            let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(scale > 0.0 && diff <= 1e-4 * scale, "{diff} vs {scale}");
        }
    }

    /// Completions of shared prompts, packed (the prompt computed once), give the loss and
    /// gradients of the same sequences trained apart; split across passes too.
    #[test]
    fn packed_prompts_give_the_gradients_of_separate_sequences() -> Result<()> {
        let (mut engine, scaled_s, vocab) = tiny_engine()?;
        let prompt =
            |n: u32, seed: u32| (0..n).map(|t| (t * 11 + seed) % vocab).collect::<Vec<_>>();
        // Two prompts (one past a query block) with completions of different lengths, then a
        // sequence of its own.
        let (p1, p2) = (prompt(70, 3), prompt(20, 8));
        let mut ids: Vec<Vec<u32>> = Vec::new();
        for (p, lens) in [(&p1, vec![5usize, 1, 9]), (&p2, vec![3, 4])] {
            for (j, &n) in lens.iter().enumerate() {
                let own = (0..n as u32).map(|t| (t * 5 + j as u32 * 13 + 1) % vocab);
                ids.push(p.iter().copied().chain(own).collect());
            }
        }
        ids.push(prompt(30, 1));
        let weights: Vec<Vec<f32>> = (ids.iter().enumerate())
            .map(|(i, s)| {
                let start = if i == 5 {
                    10
                } else if i < 3 {
                    70
                } else {
                    20
                };
                let w = if i % 2 == 0 { 0.5 } else { -0.75 };
                (0..s.len())
                    .map(|t| if t >= start { w } else { 0.0 })
                    .collect()
            })
            .collect();
        let batch = sequences(&ids, &weights);
        let packed = packs(&batch, MIN_SHARED);
        assert_eq!(
            packed.iter().map(|p| p.members.len()).collect::<Vec<_>>(),
            [3, 2, 1]
        );
        let together = engine.gradients(&scaled_s, &batch)?;
        engine.min_shared = usize::MAX;
        let apart = engine.gradients(&scaled_s, &batch)?;
        engine.min_shared = MIN_SHARED;
        engine.pass_bytes = 1;
        let split = engine.gradients(&scaled_s, &batch)?;
        assert_same_gradients(&together, &apart);
        assert_same_gradients(&together, &split);
        Ok(())
    }

    /// The engine's loss equals the one from the inference path's logits, on a Qwen2-shaped
    /// model (biases on q, k and v; grouped-query attention) with no SVF targets.
    #[test]
    fn loss_matches_the_inference_path_with_biases() -> Result<()> {
        let config = tiny_config(Architecture::Qwen2);
        let model = Transformer::new(config.clone(), random_weights(&config, 9, &Device::Cpu))?;
        let engine = Engine::new(&config, &model, &[])?;
        let (ids, weights) = batch(config.vocab_size as u32);
        let ours = engine.gradients(&[], &sequences(&ids, &weights))?.loss;
        let mut expected = 0f64;
        for (ids, weights) in ids.iter().zip(&weights) {
            let n = ids.len();
            let input = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
            let mask = Batch::left_padded(&[0], 0, n, &Device::Cpu)?;
            let logits = model.forward(&input, &mask, None, Mode::Fast, LogitsAt::All)?;
            let rows: Vec<Vec<f32>> = logits.squeeze(0)?.to_vec2()?;
            for t in 1..n {
                let row = &rows[t - 1];
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
                let total: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
                let log_p = row[ids[t] as usize] as f64 - max - total.ln();
                expected -= weights[t] as f64 * log_p;
            }
        }
        assert!(
            (ours - expected).abs() < 1e-4 * expected.abs().max(1.0),
            "{ours} vs {expected}"
        );
        Ok(())
    }

    /// The training engine's loss on the architecture fixtures (Llama 3 rope scaling, Qwen2
    /// biases, Qwen3 head norms, SmolLM3 NoPE layers, Mistral, Phi-3 and Gemma past their
    /// sliding windows, Gemma's norms, GELU, soft caps and local rotation base, Phi-3.5's
    /// LongRoPE within its original context) equals the one from transformers' own logits for
    /// the same sequence.
    #[test]
    fn loss_matches_transformers_on_each_architecture() -> Result<()> {
        #[derive(serde::Deserialize)]
        struct Reference {
            ids: Vec<u32>,
            logits: Vec<Vec<f32>>,
        }
        // These two run past LongRoPE's original context, which training refuses
        // (`sequences_past_longropes_original_context_are_refused`).
        let past_context = ["longrope", "phi4mini"];
        for name in crate::model::testing::ARCH_FIXTURES {
            if past_context.contains(&name) {
                continue;
            }
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/arch")
                .join(name);
            let reference: Reference =
                crate::fsutil::read_json(&dir.join("reference.json"), 1 << 20).unwrap();
            let model = crate::model::Model::load(&dir, candle_core::DType::F32, &Device::Cpu)?;
            let tf = &model.transformer;
            let engine = Engine::new(&tf.config, tf, &[])?;
            let ids = &reference.ids;
            // Position by position (a sum over the sequence would hide a difference of 1e-2
            // in one logit, such as YaRN's attention factor left out).
            for t in (1..ids.len()).step_by(3) {
                let weights: Vec<f32> = (0..ids.len())
                    .map(|u| f32::from(u8::from(u == t)))
                    .collect();
                let ours = engine
                    .gradients(
                        &[],
                        &[Sequence {
                            ids,
                            weights: &weights,
                        }],
                    )?
                    .loss;
                let row = &reference.logits[t - 1];
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
                let total: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
                let expected = -(row[ids[t] as usize] as f64 - max - total.ln());
                assert!(
                    (ours - expected).abs() < 1e-4 * expected.abs().max(1.0),
                    "{name}, position {t}: {ours} vs {expected}"
                );
            }
        }
        Ok(())
    }

    /// A bf16 model's engine multiplies the model's own bf16 panels where the kernel runs
    /// (and packs bf16 for the backward products): the same gradients, to the bit there, as an
    /// f32 model of the same rounded values.
    #[test]
    fn a_bf16_model_trains_on_its_own_panels_as_its_f32_values_do() -> Result<()> {
        use candle_core::DType;
        let (base, factors) = crate::svf::tiny_decomposed(5);
        let in_dtype = |dtype: DType| -> Result<Transformer> {
            let tensors = (base.tensors()?.into_iter())
                .map(|(k, v)| Ok((k, v.to_dtype(DType::BF16)?.to_dtype(dtype)?)))
                .collect::<candle_core::Result<_>>()?;
            Transformer::new(base.config.clone(), tensors)
        };
        let (half, rounded) = (in_dtype(DType::BF16)?, in_dtype(DType::F32)?);
        let engine = Engine::new(&half.config, &half, &factors)?;
        // Every projection is a target here; the (tied) head and embedding are not.
        if tsq_linalg::simd() != tsq_linalg::Simd::Portable {
            let panels = half
                .packed("embed.weight")
                .expect("the model's head is packed");
            assert_eq!(panels.half_format(), Some(tsq_linalg::HalfFormat::Bf16));
            let shared =
                matches!(&engine.head.forward, Factor::Packed(p) if Arc::ptr_eq(p, &panels));
            assert!(shared, "the head's panels were packed again");
            let rows = matches!(&engine.embed, Embedding::Panels(p) if Arc::ptr_eq(p, &panels));
            assert!(rows, "the embedding was copied");
        }
        let scaled_s: Vec<Vec<f32>> = (factors.iter())
            .map(|d| d.factors.s.to_vec1::<f32>())
            .collect::<candle_core::Result<_>>()?;
        let (ids, weights) = batch(base.config.vocab_size as u32);
        let from_half = engine.gradients(&scaled_s, &sequences(&ids, &weights))?;
        let from_f32 = Engine::new(&rounded.config, &rounded, &factors)?
            .gradients(&scaled_s, &sequences(&ids, &weights))?;
        // Not to the bit: the products left to faer (all of them at the portable level, the
        // head's backward and the factored ones at any level) split their sums as they see
        // fit, run to run (seen: the loss's last bit, at AVX2, with other tests beside it).
        assert_same_gradients(&from_half, &from_f32);
        Ok(())
    }

    #[test]
    fn bf16_weights_are_trained_in_f32() -> Result<()> {
        let config = tiny_config(Architecture::Llama);
        let weights = random_weights(&config, 3, &Device::Cpu);
        let half: BTreeMap<String, Tensor> = (weights.iter())
            .map(|(k, v)| Ok((k.clone(), v.to_dtype(candle_core::DType::BF16)?)))
            .collect::<candle_core::Result<_>>()?;
        let (ids, weights_of_tokens) = batch(config.vocab_size as u32);
        let loss = |tensors: &BTreeMap<String, Tensor>| -> Result<f64> {
            let engine = Engine::new(&config, tensors, &[])?;
            Ok(engine
                .gradients(&[], &sequences(&ids, &weights_of_tokens))?
                .loss)
        };
        let (full, rounded) = (loss(&weights)?, loss(&half)?);
        assert!(
            (full - rounded).abs() < 2e-2 * full.abs(),
            "{full} vs {rounded}"
        );
        Ok(())
    }
}
