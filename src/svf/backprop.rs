//! The SVF training engine: the transformer's forward pass keeping what its backward pass needs,
//! and that backward pass written out by hand, over plain f32 buffers on the CPU.
//!
//! Why not candle's autograd: on an SVF step (SmolLM2, 8 × 256 tokens) candle spent more time
//! around the products than in them: every graph node's backward allocates a zero-filled
//! gradient and adds into it, its matmul backward computes gradients for frozen weights, and
//! keeping the whole graph took 15 GB, so blocks had to be recomputed (31 s per step at best,
//! PyTorch 13.7 s). Here each block keeps a few activations per token (~40 KB on SmolLM2), the
//! backward pass computes input gradients only, and nearly all time is spent in faer's gemm.
//!
//! Projections that are SVF targets run factored, y = U (s' ⊙ (Vᵀ x)), keeping h = Vᵀ x; the
//! backward pass gets ∂L/∂s' = Σ_tokens (Uᵀ ∂y) ⊙ h from the product it needs anyway for ∂x. The
//! caller maps ∂L/∂s' to ∂L/∂z (the parametrisation lives in [`super::effective_scale`]).
//!
//! Sequences are packed without padding: each attends causally within itself, sequences that
//! share their first tokens are computed once up to there ([`super::packing`]), and a batch too
//! large for memory runs as several passes whose gradients add up.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use candle_core::Tensor;
use rayon::prelude::*;
use tsq_linalg::{Mat, MatMut, Threads, matmul};

use super::kernels;
use super::packing::{Expansion, MIN_SHARED, Pack, packs};
use crate::model::config::ModelConfig;
use crate::model::error::{ModelError, Result};
use crate::svd::cache::Decomposed;
use crate::svd::targets::LAYER_MODULES;

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

/// A frozen matrix kept row-major both as itself and transposed, so that every product reads
/// its operands in storage order: faer ran 1.2-1.5x slower on a transposed read of the right
/// operand (SVF-step shapes on 2 cores, 2026-11-27). Memory is cheap here next to time.
struct Frozen {
    m: Vec<f32>,
    t: Vec<f32>,
    rows: usize,
    cols: usize,
}

impl Frozen {
    fn new(tensor: &Tensor) -> Result<Self> {
        let (rows, cols) = tensor.dims2()?;
        Ok(Self {
            m: f32s(tensor)?,
            t: f32s(&tensor.t()?)?,
            rows,
            cols,
        })
    }

    fn mat(&self) -> Mat<'_> {
        Mat::new(&self.m, self.rows, self.cols)
    }

    /// The transpose, as a matrix of its own.
    fn mat_t(&self) -> Mat<'_> {
        Mat::new(&self.t, self.cols, self.rows)
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
    inp: usize,
}

struct Layer {
    attn_norm: Vec<f32>,
    mlp_norm: Vec<f32>,
    projections: [Projection; 7],
}

/// A base model's weights as the engine uses them, with the SVF targets factored.
pub struct Engine {
    config: ModelConfig,
    embed: Vec<f32>,
    head: Frozen,
    norm: Vec<f32>,
    layers: Vec<Layer>,
    inv_freq: Vec<f32>,
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
    cos: Vec<f32>,
    sin: Vec<f32>,
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
        pool.give(buffers.into_iter().chain(self.hidden.into_iter().flatten()));
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
        tensors: &BTreeMap<String, Tensor>,
        factors: &[Decomposed],
    ) -> Result<Self> {
        let get = |name: &str| {
            tensors
                .get(name)
                .ok_or_else(|| ModelError::Input(format!("weights lack `{name}`")))
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
                let dense = get(&format!("{module}.weight"))?;
                let (out, inp) = dense.dims2()?;
                let weight = match targets.get(module.as_str()) {
                    Some(&(target, d)) => Weight::Factored {
                        u: Frozen::new(&d.factors.u)?,
                        vt: Frozen::new(&d.factors.vt)?,
                        target,
                    },
                    None => Weight::Dense(Frozen::new(dense)?),
                };
                let bias = match tensors.get(&format!("{module}.bias")) {
                    Some(b) => Some(f32s(b)?),
                    None => None,
                };
                Ok(Projection {
                    weight,
                    bias,
                    out,
                    inp,
                })
            };
            let projections = [Q, K, V, O, GATE, UP, DOWN].map(|p| projection(LAYER_MODULES[p]));
            let [q, k, v, o, gate, up, down] = projections;
            let projections = [q?, k?, v?, o?, gate?, up?, down?];
            used += projections
                .iter()
                .filter(|p| matches!(p.weight, Weight::Factored { .. }))
                .count();
            layers.push(Layer {
                attn_norm: f32s(get(&format!("layers.{i}.attn_norm.weight"))?)?,
                mlp_norm: f32s(get(&format!("layers.{i}.mlp_norm.weight"))?)?,
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
        let half = config.head_dim / 2;
        let inv_freq = (0..half)
            .map(|i| {
                1.0 / config
                    .rope_theta
                    .powf(2.0 * i as f64 / config.head_dim as f64) as f32
            })
            .collect();
        Ok(Self {
            config: config.clone(),
            embed: f32s(get("embed.weight")?)?,
            head: Frozen::new(match config.tie_word_embeddings {
                true => get("embed.weight")?,
                false => get("lm_head.weight")?,
            })?,
            norm: f32s(get("norm.weight")?)?,
            layers,
            inv_freq,
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
        self.check(scaled_s, batch)?;
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

    fn check(&self, scaled_s: &[Vec<f32>], batch: &[Sequence]) -> Result<()> {
        let bad = |message: String| Err(ModelError::Input(message));
        if scaled_s.len() != self.ranks.len()
            || scaled_s.iter().zip(&self.ranks).any(|(s, &r)| s.len() != r)
        {
            return bad("scaled singular values do not match the SVF targets".into());
        }
        let (vocab, context) = (self.config.vocab_size, self.config.max_position_embeddings);
        for (b, seq) in batch.iter().enumerate() {
            if seq.ids.len() != seq.weights.len() || seq.weights.first().is_some_and(|&w| w != 0.0)
            {
                return bad(format!(
                    "sequence {b}: needs one weight per token and none on the first"
                ));
            }
            if seq.ids.len() > context {
                return bad(format!(
                    "sequence {b}: {} tokens exceed the model's context of {context}",
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

    /// Groups the packs into passes of at most `pass_bytes` of activations (a larger single
    /// pack gets a pass of its own).
    fn passes<'p, 'a>(&self, packs: &'p [Pack<'a>]) -> Vec<&'p [Pack<'a>]> {
        let c = &self.config;
        // Per token and layer, f32: x, q, k, v, x_mid and a few norms (≤ 6 hidden), gate and up
        // (2 intermediate), h = Vᵀx of up to three factored MLP targets (≤ 3 hidden); then the
        // attention probabilities of each member's sequence.
        let per_token = 4 * c.num_layers * (9 * c.hidden_size + 2 * c.intermediate_size);
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
        let (cos, sin) = kernels::rope_tables(&self.inv_freq, longest);
        let pass = Pass {
            tokens: lengths.iter().sum(),
            lengths,
            positions,
            cos,
            sin,
            expansion: Expansion::of(packs),
        };
        let hidden = self.config.hidden_size;
        let mut x: Vec<f32> = packs
            .iter()
            .flat_map(Pack::ids)
            .flat_map(|id| &self.embed[id as usize * hidden..(id as usize + 1) * hidden])
            .copied()
            .collect();
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

    fn block_forward(
        &self,
        layer: &Layer,
        x: Vec<f32>,
        pass: &Pass,
        scaled_s: &[Vec<f32>],
    ) -> (Vec<f32>, Saved) {
        let c = &self.config;
        let (n, eps) = (pass.tokens, c.rms_norm_eps as f32);
        let p = &layer.projections;
        let mut hidden: [Option<Vec<f32>>; 7] = Default::default();
        let pool = &self.pool;
        let mut project = |slot: usize, input: &[f32]| {
            let (y, h) = p[slot].forward(input, n, scaled_s, pool);
            hidden[slot] = h;
            y
        };

        let mut normed = pool.zeros(x.len());
        let mut inv_rms_attn = pool.zeros(n);
        kernels::rms_norm(&x, &layer.attn_norm, eps, &mut normed, &mut inv_rms_attn);
        let (heads, kv_heads) = (c.num_heads, c.num_kv_heads);
        let mut heads_of = |slot: usize, count: usize, rotate: bool| {
            let tokens = project(slot, &normed);
            let grouped = self.to_heads(&tokens, pass, count, rotate);
            pool.give([tokens]);
            grouped
        };
        let q = heads_of(Q, heads, true);
        let k = heads_of(K, kv_heads, true);
        let v = heads_of(V, kv_heads, false);
        let Attended {
            q,
            k,
            v,
            probs,
            out,
        } = self.attend(q, k, v, pass);
        let attended = self.to_tokens(&out, pass, heads, false);
        let mut x_mid = project(O, &attended);
        pool.give([out, attended]);
        x_mid.par_iter_mut().zip(&x).for_each(|(o, x)| *o += x);

        let mut inv_rms_mlp = pool.zeros(n);
        kernels::rms_norm(&x_mid, &layer.mlp_norm, eps, &mut normed, &mut inv_rms_mlp);
        let gate = project(GATE, &normed);
        let up = project(UP, &normed);
        let mut gated = pool.zeros(gate.len());
        pool.give([normed]);
        kernels::silu_mul(&gate, &up, &mut gated);
        let mut y = project(DOWN, &gated);
        pool.give([gated]);
        y.par_iter_mut().zip(&x_mid).for_each(|(y, x)| *y += x);
        let keep = Saved {
            x,
            inv_rms_attn,
            q,
            k,
            v,
            probs,
            x_mid,
            inv_rms_mlp,
            gate,
            up,
            hidden,
        };
        (y, keep)
    }

    fn block_backward(
        &self,
        layer: &Layer,
        saved: Saved,
        grad_y: Vec<f32>,
        pass: &Pass,
        scaled_s: &[Vec<f32>],
        grad_s: &mut [Vec<f32>],
    ) -> Vec<f32> {
        let c = &self.config;
        let n = pass.tokens;
        let p = &layer.projections;
        let pool = &self.pool;
        let mut back = |slot: usize, grad: &[f32], grad_x: &mut [f32], accumulate: bool| {
            let hidden = &saved.hidden[slot];
            p[slot].backward(grad, n, hidden, scaled_s, grad_x, accumulate, grad_s, pool)
        };

        // MLP: y = x_mid + down(silu(gate) ⊙ up), gate and up of rms_norm(x_mid).
        let mut grad_gate = pool.zeros(saved.gate.len());
        back(DOWN, &grad_y, &mut grad_gate, false);
        let mut grad_up = pool.zeros(saved.up.len());
        kernels::silu_mul_backward(&saved.gate, &saved.up, &mut grad_gate, &mut grad_up);
        let mut grad_normed = pool.zeros(grad_y.len());
        back(GATE, &grad_gate, &mut grad_normed, false);
        back(UP, &grad_up, &mut grad_normed, true);
        pool.give([grad_gate, grad_up]);
        let mut grad_mid = grad_y;
        kernels::rms_norm_backward(
            &saved.x_mid,
            &layer.mlp_norm,
            &saved.inv_rms_mlp,
            &grad_normed,
            &mut grad_mid,
        );

        // Attention: x_mid = x + o(attention(q, k, v)), q, k, v of rms_norm(x).
        let (heads, kv_heads) = (c.num_heads, c.num_kv_heads);
        let mut grad_attended = pool.zeros(n * heads * c.head_dim);
        back(O, &grad_mid, &mut grad_attended, false);
        let grad_grouped = self.to_heads(&grad_attended, pass, heads, false);
        let (grad_q, grad_k, grad_v) = self.attend_backward(&saved, &grad_grouped, pass);
        pool.give([grad_attended, grad_grouped]);
        let qkv = [
            (Q, grad_q, heads, true),
            (K, grad_k, kv_heads, true),
            (V, grad_v, kv_heads, false),
        ];
        for (slot, grouped, count, rotate) in qkv {
            let tokens = self.to_tokens(&grouped, pass, count, rotate);
            back(slot, &tokens, &mut grad_normed, slot != Q);
            pool.give([grouped, tokens]);
        }
        let mut grad_x = grad_mid;
        kernels::rms_norm_backward(
            &saved.x,
            &layer.attn_norm,
            &saved.inv_rms_attn,
            &grad_normed,
            &mut grad_x,
        );
        pool.give([grad_normed]);
        saved.recycle(pool);
        grad_x
    }

    /// Token-major (tokens × heads·d) to grouped: per sequence and key/value head g, the rows
    /// t·rep + j hold query head g·rep + j at position t (rep = heads / kv_heads; 1 for keys
    /// and values). Each head vector is rotated by its position when `rotate`.
    ///
    /// Why this order: the rep query heads of one position are adjacent in both layouts (one
    /// copy each), and a block of positions is a block of rows for all of them at once, so
    /// causal attention can skip the masked blocks with a few large products.
    fn to_heads(&self, x: &[f32], pass: &Pass, heads: usize, rotate: bool) -> Vec<f32> {
        self.transpose_heads(x, pass, heads, rotate, true)
    }

    /// The inverse of [`Engine::to_heads`]; with `rotate`, applies the inverse rotation (the
    /// backward pass of the rotation).
    fn to_tokens(&self, x: &[f32], pass: &Pass, heads: usize, rotate: bool) -> Vec<f32> {
        self.transpose_heads(x, pass, heads, rotate, false)
    }

    fn transpose_heads(
        &self,
        x: &[f32],
        pass: &Pass,
        heads: usize,
        rotate: bool,
        to_heads: bool,
    ) -> Vec<f32> {
        let (d, kv_heads) = (self.config.head_dim, self.config.num_kv_heads);
        let (half, width) = (d / 2, heads * d);
        let run = heads / kv_heads * d;
        let mut out = self.pool.zeros(x.len());
        let sizes: Vec<usize> = pass.lengths.iter().map(|l| l * width).collect();
        let mut positions = pass.positions.as_slice();
        let positions: Vec<&[usize]> = (pass.lengths.iter())
            .map(|&len| {
                let (head, rest) = positions.split_at(len);
                positions = rest;
                head
            })
            .collect();
        split_mut(&mut out, &sizes)
            .into_par_iter()
            .zip(split(x, &sizes))
            .zip(positions)
            .for_each(|((out, x), positions)| {
                let len = positions.len();
                for g in 0..kv_heads {
                    for (t, &at) in positions.iter().enumerate() {
                        let token_major = t * width + g * run;
                        let grouped = (g * len + t) * run;
                        let (from, to) = match to_heads {
                            true => (token_major, grouped),
                            false => (grouped, token_major),
                        };
                        let run = &mut out[to..to + run];
                        run.copy_from_slice(&x[from..from + run.len()]);
                        if rotate {
                            let angles = at * half..(at + 1) * half;
                            let (cos, sin) = (&pass.cos[angles.clone()], &pass.sin[angles]);
                            for v in run.chunks_mut(d) {
                                kernels::rotate(v, cos, sin, !to_heads);
                            }
                        }
                    }
                }
            });
        out
    }

    /// Causal attention of every sequence and key/value head: the probabilities and the
    /// attended values (grouped like q). Queries go in blocks of [`QUERY_BLOCK`] positions,
    /// each against the keys up to its last position only.
    fn attention(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        lengths: &[usize],
    ) -> (Vec<f32>, Vec<f32>) {
        let (rep, d, scale) = self.attention_shape();
        let mut probs = self.pool.zeros(self.probs_len(lengths));
        let mut out = self.pool.zeros(q.len());
        let groups = self.groups(lengths);
        split_groups_mut(&mut probs, &groups, |len| rep * len * len)
            .into_par_iter()
            .zip(split_groups_mut(&mut out, &groups, |len| rep * len * d))
            .zip(split_groups(q, &groups, |len| rep * len * d))
            .zip(split_groups(k, &groups, |len| len * d))
            .zip(split_groups(v, &groups, |len| len * d))
            .zip(&groups)
            .for_each(|(((((p, o), q), k), v), &len)| {
                for (first, end) in query_blocks(len) {
                    let (r0, rows) = (first * rep, (end - first) * rep);
                    let scores = &mut p[r0 * len..(r0 + rows) * len];
                    let q = Mat::new(&q[r0 * d..(r0 + rows) * d], rows, d);
                    let k = Mat::new(&k[..end * d], end, d);
                    let visible = MatMut::strided(scores, rows, end, len);
                    matmul(visible, q, k.t(), false, Threads::One);
                    kernels::causal_softmax(scores, len, rep, first, end, scale);
                    let o = MatMut::new(&mut o[r0 * d..(r0 + rows) * d], rows, d);
                    let p = Mat::strided(scores, rows, end, len);
                    matmul(o, p, Mat::new(&v[..end * d], end, d), false, Threads::One);
                }
            });
        (probs, out)
    }

    /// Gradients of q, k and v (grouped, before the inverse rotation) from those of the
    /// attended values.
    fn attention_backward(
        &self,
        saved: &Saved,
        grad_out: &[f32],
        lengths: &[usize],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (rep, d, scale) = self.attention_shape();
        let (mut grad_q, mut grad_k, mut grad_v) = (
            self.pool.zeros(saved.q.len()),
            self.pool.zeros(saved.k.len()),
            self.pool.zeros(saved.v.len()),
        );
        let groups = self.groups(lengths);
        split_groups_mut(&mut grad_q, &groups, |len| rep * len * d)
            .into_par_iter()
            .zip(split_groups_mut(&mut grad_k, &groups, |len| len * d))
            .zip(split_groups_mut(&mut grad_v, &groups, |len| len * d))
            .zip(split_groups(&saved.probs, &groups, |len| rep * len * len))
            .zip(split_groups(grad_out, &groups, |len| rep * len * d))
            .zip(split_groups(&saved.q, &groups, |len| rep * len * d))
            .zip(split_groups(&saved.k, &groups, |len| len * d))
            .zip(split_groups(&saved.v, &groups, |len| len * d))
            .zip(&groups)
            .for_each(|((((((((gq, gk), gv), p), go), q), k), v), &len)| {
                let mut gs = vec![0f32; rep * QUERY_BLOCK.min(len) * len];
                for (first, end) in query_blocks(len) {
                    let (r0, rows) = (first * rep, (end - first) * rep);
                    let (q, go) = (&q[r0 * d..(r0 + rows) * d], &go[r0 * d..(r0 + rows) * d]);
                    let (q, go) = (Mat::new(q, rows, d), Mat::new(go, rows, d));
                    let p_rows = &p[r0 * len..];
                    let p = Mat::strided(p_rows, rows, end, len);
                    let (k, v) = (
                        Mat::new(&k[..end * d], end, d),
                        Mat::new(&v[..end * d], end, d),
                    );
                    let gs = &mut gs[..rows * end];
                    matmul(MatMut::new(gs, rows, end), go, v.t(), false, Threads::One);
                    let gv = MatMut::new(&mut gv[..end * d], end, d);
                    matmul(gv, p.t(), go, true, Threads::One);
                    kernels::causal_softmax_backward(p_rows, len, gs, end, scale);
                    let gq = MatMut::new(&mut gq[r0 * d..(r0 + rows) * d], rows, d);
                    matmul(gq, Mat::new(gs, rows, end), k, false, Threads::One);
                    let gk = MatMut::new(&mut gk[..end * d], end, d);
                    matmul(gk, Mat::new(gs, rows, end).t(), q, true, Threads::One);
                }
            });
        (grad_q, grad_k, grad_v)
    }

    /// Query heads per key/value head, head dimension, score scale.
    fn attention_shape(&self) -> (usize, usize, f32) {
        let c = &self.config;
        let d = c.head_dim;
        (c.num_heads / c.num_kv_heads, d, 1.0 / (d as f32).sqrt())
    }

    /// The length of each (sequence, key/value head) group, in layout order.
    fn groups(&self, lengths: &[usize]) -> Vec<usize> {
        let kv_heads = self.config.num_kv_heads;
        lengths
            .iter()
            .flat_map(|&len| std::iter::repeat_n(len, kv_heads))
            .collect()
    }

    fn probs_len(&self, lengths: &[usize]) -> usize {
        lengths.iter().map(|l| self.config.num_heads * l * l).sum()
    }

    /// Attention of the pass's sequences; packs that share tokens run one sequence per member
    /// (see [`super::packing`]), folded back into packed rows.
    fn attend(&self, q: Vec<f32>, k: Vec<f32>, v: Vec<f32>, pass: &Pass) -> Attended {
        let Some(e) = &pass.expansion else {
            let (probs, out) = self.attention(&q, &k, &v, &pass.lengths);
            return Attended {
                q,
                k,
                v,
                probs,
                out,
            };
        };
        let [q, k, v] = [(q, true), (k, false), (v, false)].map(|(x, is_q)| {
            let run = self.head_run(is_q);
            let zeros = self
                .pool
                .zeros(e.expanded_len(self.config.num_kv_heads, run));
            let expanded = e.gather(&x, self.config.num_kv_heads, run, false, zeros);
            self.pool.give([x]);
            expanded
        });
        let (probs, expanded_out) = self.attention(&q, &k, &v, &e.lengths);
        let out = self.fold(e, &expanded_out, true, false);
        self.pool.give([expanded_out]);
        Attended {
            q,
            k,
            v,
            probs,
            out,
        }
    }

    /// Gradients of the packed q, k and v from those of the packed attended values.
    fn attend_backward(
        &self,
        saved: &Saved,
        grad_out: &[f32],
        pass: &Pass,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let Some(e) = &pass.expansion else {
            return self.attention_backward(saved, grad_out, &pass.lengths);
        };
        let kv = self.config.num_kv_heads;
        let run = self.head_run(true);
        // A shared row's output came from the pack's first member only.
        let zeros = self.pool.zeros(e.expanded_len(kv, run));
        let grad_out = e.gather(grad_out, kv, run, true, zeros);
        let (q, k, v) = self.attention_backward(saved, &grad_out, &e.lengths);
        let folded = (
            self.fold(e, &q, true, true),
            self.fold(e, &k, false, true),
            self.fold(e, &v, false, true),
        );
        self.pool.give([grad_out, q, k, v]);
        folded
    }

    /// Floats per position and key/value head: the query heads that share it, or itself.
    fn head_run(&self, queries: bool) -> usize {
        let (rep, d, _) = self.attention_shape();
        if queries { rep * d } else { d }
    }

    /// Members' rows folded back into packed rows (summed with `add`), in a pooled buffer.
    fn fold(&self, e: &Expansion, expanded: &[f32], queries: bool, add: bool) -> Vec<f32> {
        let (kv, run) = (self.config.num_kv_heads, self.head_run(queries));
        let zeros = self.pool.zeros(e.packed_len(kv, run));
        e.scatter(expanded, kv, run, add, zeros)
    }

    /// `−Σ w log softmax(norm(x_row) headᵀ)[token]` over the scored rows; writes the gradient of
    /// those rows of `x` into `grad_x`. The head runs on [`HEAD_CHUNK_ROWS`] rows at a time, so
    /// full logits never exist for the whole batch.
    fn head_loss(&self, x: &[f32], scored: &[Scored], grad_x: &mut [f32]) -> f64 {
        let (hidden, vocab) = (self.config.hidden_size, self.config.vocab_size);
        let eps = self.config.rms_norm_eps as f32;
        let mut loss = 0f64;
        for chunk in scored.chunks(HEAD_CHUNK_ROWS) {
            let rows = chunk.len();
            let picked: Vec<f32> = chunk
                .iter()
                .flat_map(|s| &x[s.row * hidden..(s.row + 1) * hidden])
                .copied()
                .collect();
            let (mut normed, mut inv_rms) = (vec![0f32; picked.len()], vec![0f32; rows]);
            kernels::rms_norm(&picked, &self.norm, eps, &mut normed, &mut inv_rms);
            let mut logits = self.pool.zeros(rows * vocab);
            let normed = Mat::new(&normed, rows, hidden);
            product(&mut logits, normed, self.head.mat_t(), false);
            // In place: logits become w · (softmax − onehot(token)), the gradient of the loss.
            loss += logits
                .par_chunks_mut(vocab)
                .zip(chunk)
                .map(|(row, s)| {
                    let max = kernels::max(row);
                    let picked = row[s.token as usize] - max;
                    row.iter_mut().for_each(|v| *v = kernels::exp(*v - max));
                    let total = kernels::sum(row) as f64;
                    let scale = s.weight / total as f32;
                    row.iter_mut().for_each(|v| *v *= scale);
                    row[s.token as usize] -= s.weight;
                    -(s.weight as f64) * (picked as f64 - total.ln())
                })
                .sum::<f64>();
            let mut grad_normed = vec![0f32; picked.len()];
            product(
                &mut grad_normed,
                Mat::new(&logits, rows, vocab),
                self.head.mat(),
                false,
            );
            let mut grad_picked = vec![0f32; picked.len()];
            kernels::rms_norm_backward(
                &picked,
                &self.norm,
                &inv_rms,
                &grad_normed,
                &mut grad_picked,
            );
            // Members of a pack predict their first own tokens from the same shared row.
            for (s, g) in chunk.iter().zip(grad_picked.chunks(hidden)) {
                let row = &mut grad_x[s.row * hidden..(s.row + 1) * hidden];
                row.iter_mut().zip(g).for_each(|(a, b)| *a += b);
            }
            self.pool.give([logits]);
        }
        loss
    }
}

impl Projection {
    /// `x Wᵀ (+ b)` for `n` rows of x; a factored projection also returns h = x V (n × rank).
    fn forward(
        &self,
        x: &[f32],
        n: usize,
        scaled_s: &[Vec<f32>],
        pool: &Pool,
    ) -> (Vec<f32>, Option<Vec<f32>>) {
        let mut y = pool.zeros(n * self.out);
        let input = Mat::new(x, n, self.inp);
        let hidden = match &self.weight {
            Weight::Dense(w) => {
                product(&mut y, input, w.mat_t(), false);
                None
            }
            Weight::Factored { u, vt, target } => {
                let mut h = pool.zeros(n * vt.rows);
                product(&mut h, input, vt.mat_t(), false);
                let mut scaled = pool.copy_of(&h);
                scale_columns(&mut scaled, &scaled_s[*target]);
                product(&mut y, Mat::new(&scaled, n, vt.rows), u.mat_t(), false);
                pool.give([scaled]);
                Some(h)
            }
        };
        if let Some(b) = &self.bias {
            y.par_chunks_mut(self.out)
                .for_each(|row| row.iter_mut().zip(b).for_each(|(y, b)| *y += b));
        }
        (y, hidden)
    }

    /// Writes (or with `accumulate` adds) ∂L/∂x into `grad_x`, and for a factored projection
    /// adds ∂L/∂s' = Σ_rows (∂y U) ⊙ h into `grad_s`.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        grad_y: &[f32],
        n: usize,
        hidden: &Option<Vec<f32>>,
        scaled_s: &[Vec<f32>],
        grad_x: &mut [f32],
        accumulate: bool,
        grad_s: &mut [Vec<f32>],
        pool: &Pool,
    ) {
        let grad_y = Mat::new(grad_y, n, self.out);
        match (&self.weight, hidden) {
            (Weight::Dense(w), _) => product(grad_x, grad_y, w.mat(), accumulate),
            (Weight::Factored { u, vt, target }, Some(h)) => {
                let rank = vt.rows;
                let mut g = pool.zeros(n * rank);
                product(&mut g, grad_y, u.mat(), false);
                for (g, h) in g.chunks(rank).zip(h.chunks(rank)) {
                    for ((acc, g), h) in grad_s[*target].iter_mut().zip(g).zip(h) {
                        *acc += g * h;
                    }
                }
                scale_columns(&mut g, &scaled_s[*target]);
                product(grad_x, Mat::new(&g, n, rank), vt.mat(), accumulate);
                pool.give([g]);
            }
            (Weight::Factored { .. }, None) => {
                unreachable!("a factored projection's forward pass keeps Vᵀx")
            }
        }
    }
}

/// `c = a · b` (or `c += a · b`) for a contiguous `c`, on all threads: the large products.
fn product(c: &mut [f32], a: Mat, b: Mat, accumulate: bool) {
    let (rows, cols) = (a.shape().0, b.shape().1);
    matmul(MatMut::new(c, rows, cols), a, b, accumulate, Threads::All);
}

/// (first, end) positions of each query block of a sequence of `len` tokens.
fn query_blocks(len: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..len)
        .step_by(QUERY_BLOCK)
        .map(move |first| (first, (first + QUERY_BLOCK).min(len)))
}

fn scale_columns(m: &mut [f32], scale: &[f32]) {
    m.par_chunks_mut(scale.len())
        .for_each(|row| row.iter_mut().zip(scale).for_each(|(v, s)| *v *= s));
}

/// `buf` cut into consecutive pieces of `sizes`.
fn split<'a>(mut buf: &'a [f32], sizes: &[usize]) -> Vec<&'a [f32]> {
    sizes
        .iter()
        .map(|&n| {
            let (head, rest) = buf.split_at(n);
            buf = rest;
            head
        })
        .collect()
}

pub(super) fn split_mut<'a>(mut buf: &'a mut [f32], sizes: &[usize]) -> Vec<&'a mut [f32]> {
    sizes
        .iter()
        .map(|&n| {
            let (head, rest) = std::mem::take(&mut buf).split_at_mut(n);
            buf = rest;
            head
        })
        .collect()
}

fn split_groups<'a>(
    buf: &'a [f32],
    groups: &[usize],
    size: impl Fn(usize) -> usize,
) -> Vec<&'a [f32]> {
    split(
        buf,
        &groups.iter().map(|&len| size(len)).collect::<Vec<_>>(),
    )
}

fn split_groups_mut<'a>(
    buf: &'a mut [f32],
    groups: &[usize],
    size: impl Fn(usize) -> usize,
) -> Vec<&'a mut [f32]> {
    split_mut(
        buf,
        &groups.iter().map(|&len| size(len)).collect::<Vec<_>>(),
    )
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

    /// A tiny decomposed model's engine and its targets' singular values.
    fn tiny_engine() -> Result<(Engine, Vec<Vec<f32>>, u32)> {
        let (base, factors) = crate::svf::tiny_decomposed(5);
        let engine = Engine::new(&base.config, &base.tensors(), &factors)?;
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
        let engine = Engine::new(&config, &model.tensors(), &[])?;
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
