//! Block-causal attention of packed sequences, forward and backward, in query blocks.

use super::*;
use crate::model::kernels::Scores;

impl Engine {
    /// Token-major (tokens × heads·d) to grouped: per sequence and key/value head g, the rows
    /// t·rep + j hold query head g·rep + j at position t (rep = heads / kv_heads; 1 for keys
    /// and values). Each head vector is rotated by its position with `rotation`'s tables.
    ///
    /// Why this order: the rep query heads of one position are adjacent in both layouts (one
    /// copy each), and a block of positions is a block of rows for all of them at once, so
    /// causal attention can skip the masked blocks with a few large products.
    pub(super) fn to_heads(
        &self,
        x: &[f32],
        pass: &Pass,
        heads: usize,
        rotation: Option<Tables>,
    ) -> Vec<f32> {
        self.transpose_heads(x, pass, heads, rotation, true)
    }

    /// The inverse of [`Engine::to_heads`]; with `rotation`, applies the inverse rotation (the
    /// backward pass of the rotation).
    pub(super) fn to_tokens(
        &self,
        x: &[f32],
        pass: &Pass,
        heads: usize,
        rotation: Option<Tables>,
    ) -> Vec<f32> {
        self.transpose_heads(x, pass, heads, rotation, false)
    }

    pub(super) fn transpose_heads(
        &self,
        x: &[f32],
        pass: &Pass,
        heads: usize,
        rotation: Option<Tables>,
        to_heads: bool,
    ) -> Vec<f32> {
        let tables = rotation.map(|t| pass.tables(t));
        let (d, kv_heads) = (self.config.head_dim, self.config.num_kv_heads);
        let (rotated, width) = (self.config.rotary_dim(), heads * d);
        let half = rotated / 2;
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
                        if let Some((cos, sin)) = tables {
                            let angles = at * half..(at + 1) * half;
                            let (cos, sin) = (&cos[angles.clone()], &sin[angles]);
                            for v in run.chunks_mut(d) {
                                kernels::rotate(&mut v[..rotated], cos, sin, !to_heads);
                            }
                        }
                    }
                }
            });
        out
    }

    /// Causal attention of every sequence and key/value head (within `window`, if given):
    /// the probabilities and the attended values (grouped like q). Queries go in blocks of
    /// [`QUERY_BLOCK`] positions, each against the keys up to its last position only.
    pub(super) fn attention(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        lengths: &[usize],
        window: Option<usize>,
    ) -> (Vec<f32>, Vec<f32>) {
        let (rep, d) = self.attention_shape();
        let how = Scores {
            window,
            ..self.scores()
        };
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
                    kernels::causal_softmax(scores, len, rep, first, end, how);
                    let o = MatMut::new(&mut o[r0 * d..(r0 + rows) * d], rows, d);
                    let p = Mat::strided(scores, rows, end, len);
                    matmul(o, p, Mat::new(&v[..end * d], end, d), false, Threads::One);
                }
            });
        (probs, out)
    }

    /// Gradients of q, k and v (grouped, before the inverse rotation) from those of the
    /// attended values. Keys outside a window have probability 0 and so no gradient; soft-capped
    /// scores are recomputed for the cap's derivative (one product per block, where keeping
    /// them would take as much memory as the probabilities).
    pub(super) fn attention_backward(
        &self,
        saved: &Saved,
        grad_out: &[f32],
        lengths: &[usize],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (rep, d) = self.attention_shape();
        let Scores { scale, cap, .. } = self.scores();
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
                let block = rep * QUERY_BLOCK.min(len) * len;
                let mut gs = vec![0f32; block];
                let mut raw = vec![0f32; if cap.is_some() { block } else { 0 }];
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
                    if let Some(cap) = cap {
                        let raw = &mut raw[..rows * end];
                        matmul(MatMut::new(raw, rows, end), q, k.t(), false, Threads::One);
                        kernels::soft_cap_backward(raw, gs, scale, cap);
                    }
                    let gq = MatMut::new(&mut gq[r0 * d..(r0 + rows) * d], rows, d);
                    matmul(gq, Mat::new(gs, rows, end), k, false, Threads::One);
                    let gk = MatMut::new(&mut gk[..end * d], end, d);
                    matmul(gk, Mat::new(gs, rows, end).t(), q, true, Threads::One);
                }
            });
        (grad_q, grad_k, grad_v)
    }

    /// Query heads per key/value head, head dimension.
    pub(super) fn attention_shape(&self) -> (usize, usize) {
        let c = &self.config;
        (c.num_heads / c.num_kv_heads, c.head_dim)
    }

    /// How scores become probabilities, but for a layer's window: scaled by head_dim^-½
    /// (Gemma's query_pre_attn_scalar^-½), soft-capped in Gemma 2.
    pub(super) fn scores(&self) -> Scores {
        let c = &self.config;
        let multiplier = c.query_multiplier().unwrap_or(1.0) as f32;
        Scores {
            scale: multiplier / (c.head_dim as f32).sqrt(),
            cap: (c.gemma.as_ref()).and_then(|g| g.attn_softcap.map(|cap| cap as f32)),
            window: None,
        }
    }

    /// The length of each (sequence, key/value head) group, in layout order.
    pub(super) fn groups(&self, lengths: &[usize]) -> Vec<usize> {
        let kv_heads = self.config.num_kv_heads;
        lengths
            .iter()
            .flat_map(|&len| std::iter::repeat_n(len, kv_heads))
            .collect()
    }

    pub(super) fn probs_len(&self, lengths: &[usize]) -> usize {
        lengths.iter().map(|l| self.config.num_heads * l * l).sum()
    }

    /// Attention of the pass's sequences; packs that share tokens run one sequence per member
    /// (see [`super::packing`]), folded back into packed rows.
    pub(super) fn attend(
        &self,
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        pass: &Pass,
        window: Option<usize>,
    ) -> Attended {
        let Some(e) = &pass.expansion else {
            let (probs, out) = self.attention(&q, &k, &v, &pass.lengths, window);
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
        let (probs, expanded_out) = self.attention(&q, &k, &v, &e.lengths, window);
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
    pub(super) fn attend_backward(
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
}
