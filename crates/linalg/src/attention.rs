//! Attention of many query positions at once (prompt processing, scoring) on the CPU, fused:
//! one task per sequence, key/value head and block of [`BLOCK`] query positions computes the
//! scores, the masked softmax and the product with the values, its intermediates staying in
//! the core's caches.
//!
//! Why: through two separate products and a softmax pass, a 512-token SmolLM2 prefill
//! multiplied every query with every key (half of them masked), wrote the scores out and read
//! them back, and copied the output into the layout the output projection reads: `perf` put
//! ~18% of the prefill there (2026-12-07) for 14% of its FLOPs. Here a block multiplies only the
//! keys its queries may see (the mask says which), and writes its output rows in place.
//!
//! Scores are computed transposed, keys × queries (K·Qᵀ): K's rows are read in place from the
//! KV cache's layout, only the block's queries are transposed (dim × 3·32 floats for SmolLM2),
//! the softmax runs down columns a vector of queries at a time, and the product with V reads the
//! probabilities column-wise as its broadcast operand.
//!
//! Every output is the same sequence of operations whatever the block, the thread or the other
//! sequences: hidden keys contribute exact zeros, so a sequence's result does not depend on its
//! batch.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use rayon::prelude::*;

use crate::Simd;
#[cfg(target_arch = "x86_64")]
use crate::packed::first_lanes;
use crate::parts::Out;

/// Query positions per task: with SmolLM2's 3 query heads per key/value head, 96 score columns,
/// three full vectors pairs of the kernel.
const BLOCK: usize = 32;

/// One call's sizes: `batch` sequences of `queries` new positions attending over `keys`
/// positions (cached and new), `heads` query heads sharing `kv_heads` key/value heads of `dim`
/// values each.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub batch: usize,
    pub queries: usize,
    pub keys: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub dim: usize,
}

/// One call's operands, row-major f32.
pub struct Operands<'a> {
    /// (batch, heads, queries, dim), contiguous.
    pub q: &'a [f32],
    /// Keys, (batch, kv_heads, ≥ keys, dim): matrix (s, g) starts at `(s·kv_heads + g)·kv_stride`
    /// and holds `keys` rows `dim` apart (a view of a KV cache with spare room fits).
    pub k: &'a [f32],
    /// Values, laid out as `k`.
    pub v: &'a [f32],
    pub kv_stride: usize,
    /// (batch, queries, keys), additive: 0 where a query may see a key, −∞ where not.
    pub mask: &'a [f32],
    /// What `mask` hides and shows wholesale ([`Visibility::of`] it).
    pub visibility: &'a Visibility,
    /// Multiplies the scores before the mask (1/√dim).
    pub scale: f32,
}

/// Whether [`attention`] runs a vector kernel on this machine. Without AVX2 its products are
/// plain loops: right, but a 512-token SmolLM2 prefill ran at 144-147 tok/s through them against
/// 1469-1575 with AVX-512 (2026-12-07), so callers should attend through their general products.
pub fn attention_pays() -> bool {
    crate::simd() > Simd::Portable
}

/// softmax(q·kᵀ·scale + mask)·v per sequence and head, head h reading key/value head
/// h / (heads / kv_heads): (batch, queries, heads·dim). A query that sees no key gets zeros.
pub fn attention(shape: Shape, operands: &Operands) -> Vec<f32> {
    let Shape {
        batch,
        queries,
        keys,
        heads,
        kv_heads,
        dim,
    } = shape;
    assert!(
        kv_heads > 0 && heads.is_multiple_of(kv_heads),
        "{heads} heads over {kv_heads}"
    );
    assert_eq!(operands.q.len(), batch * heads * queries * dim, "q");
    assert_eq!(operands.mask.len(), batch * queries * keys, "mask");
    if batch * queries == 0 {
        return Vec::new();
    }
    let last = (batch * kv_heads - 1) * operands.kv_stride + keys * dim;
    assert!(operands.k.len() >= last && operands.v.len() >= last, "k, v");
    let visibility = operands.visibility;
    assert!(
        visibility.keys == keys && visibility.seen.len() == batch * queries,
        "visibility"
    );
    let blocks = queries.div_ceil(BLOCK);
    let fill = |out: *mut f32| {
        let out = Out(out);
        (0..batch * kv_heads * blocks)
            .into_par_iter()
            .for_each(|task| {
                let (sequence_head, block) = (task / blocks, task % blocks);
                let block = Block {
                    sequence: sequence_head / kv_heads,
                    kv_head: sequence_head % kv_heads,
                    first: block * BLOCK,
                    positions: BLOCK.min(queries - block * BLOCK),
                };
                // SAFETY: each task writes the output rows of its own sequence, positions and
                // heads only (see `Block::run`), so tasks running at once never write the same
                // element, and `out` outlives the parallel loop.
                unsafe { block.run(shape, operands, out) }
            });
    };
    // SAFETY: the tasks cover every sequence, key/value head and block of positions, and each
    // writes every head and value of its rows.
    unsafe { crate::written(batch * queries * heads * dim, fill) }
}

/// Which keys each row of a mask (sequence · queries + position) may see, found once per
/// forward call and shared by its layers: none from `seen[r]` on, every one before `clear[r]`.
/// A block multiplies only the keys before its largest `seen` and adds the mask only from its
/// smallest `clear` on: for a causal mask, the keys around the block's own positions.
pub struct Visibility {
    keys: usize,
    seen: Vec<usize>,
    clear: Vec<usize>,
}

impl Visibility {
    /// Of an additive (rows × keys) mask, 0 where a key is visible and −∞ where it is hidden
    /// (any other value is added wherever the kernel multiplies).
    pub fn of(mask: &[f32], keys: usize) -> Self {
        let rows = mask.chunks(keys.max(1));
        let seen: Vec<usize> = rows
            .clone()
            .map(|row| {
                row.iter()
                    .rposition(|&m| m != f32::NEG_INFINITY)
                    .map_or(0, |j| j + 1)
            })
            .collect();
        let clear = rows
            .zip(&seen)
            .map(|(row, &seen)| row[..seen].iter().position(|&m| m != 0.0).unwrap_or(seen))
            .collect();
        Self { keys, seen, clear }
    }
}

/// One task: key/value head `kv_head` of `sequence`, query positions `first..first+positions`.
struct Block {
    sequence: usize,
    kv_head: usize,
    first: usize,
    positions: usize,
}

impl Block {
    /// # Safety
    /// `out` points to a (batch, queries, heads·dim) buffer, and no other task writes the rows
    /// of this block's positions and heads meanwhile.
    unsafe fn run(&self, shape: Shape, operands: &Operands, out: Out) {
        let Shape {
            queries,
            keys,
            heads,
            kv_heads,
            dim,
            ..
        } = shape;
        let (rep, np) = (heads / kv_heads, self.positions);
        let cols = rep * np;
        let rows_at = self.sequence * queries + self.first;
        let rows = rows_at..rows_at + np;
        let visibility = operands.visibility;
        let n = visibility.seen[rows.clone()]
            .iter()
            .copied()
            .max()
            .unwrap_or(0);
        let clear = visibility.clear[rows]
            .iter()
            .copied()
            .min()
            .unwrap_or(0)
            .min(n);
        // Column h·np + i is query head kv_head·rep + h at position first + i.
        let mut qt = vec![0f32; dim * cols];
        for h in 0..rep {
            let head = self.kv_head * rep + h;
            let at = ((self.sequence * heads + head) * queries + self.first) * dim;
            let q = &operands.q[at..at + np * dim];
            for (d, qt) in qt.chunks_exact_mut(cols).enumerate() {
                for (i, value) in qt[h * np..(h + 1) * np].iter_mut().enumerate() {
                    *value = q[i * dim + d];
                }
            }
        }
        // The mask of keys clear..n, transposed like the scores: (keys × np positions).
        let mut mask_t = vec![0f32; (n - clear) * np];
        for (j, mask_t) in (clear..n).zip(mask_t.chunks_exact_mut(np)) {
            for (i, m) in mask_t.iter_mut().enumerate() {
                *m = operands.mask[(rows_at + i) * keys + j];
            }
        }
        let matrix = (self.sequence * kv_heads + self.kv_head) * operands.kv_stride;
        let (k, v) = (&operands.k[matrix..], &operands.v[matrix..]);

        let keys_by_queries = Operand {
            data: k.as_ptr(),
            row_stride: dim,
            col_stride: 1,
        };
        // SAFETY: k holds n ≥ rows of dim values from `matrix` on (checked by `attention`);
        // qt is dim × cols; the product writes all n × cols scores.
        let mut scores_t = unsafe {
            crate::written(n * cols, |scores| {
                product(
                    n,
                    cols,
                    dim,
                    keys_by_queries,
                    qt.as_ptr(),
                    cols,
                    scores,
                    cols,
                )
            })
        };
        let sums = softmax_columns(&mut scores_t, [cols, np], clear, &mask_t, operands.scale);
        for h in 0..rep {
            let head = self.kv_head * rep + h;
            // SAFETY: the rows of positions first..first+np of `head` lie within `out`.
            let rows = unsafe { out.0.add((rows_at * heads + head) * dim) };
            let probs = Operand {
                data: scores_t[h * np..].as_ptr(),
                row_stride: 1,
                col_stride: cols,
            };
            // SAFETY: probs reads columns h·np.. of the n × cols scores; v holds n rows.
            unsafe { product(np, dim, n, probs, v.as_ptr(), dim, rows, heads * dim) };
            for (i, &sum) in sums[h * np..(h + 1) * np].iter().enumerate() {
                let inverse = if sum > 0.0 { 1.0 / sum } else { 0.0 };
                // SAFETY: row i of this head, as written just above.
                let row = unsafe { std::slice::from_raw_parts_mut(rows.add(i * heads * dim), dim) };
                row.iter_mut().for_each(|x| *x *= inverse);
            }
        }
    }
}

/// Softmax down each column of `scores` (keys × `cols`: rep heads of `np` positions each)
/// after multiplying by `scale` and, from key `clear` on, adding `mask_t` ((keys − clear) × np,
/// shared by the heads), in place and unnormalised: exp(s − max), hidden keys exactly 0.
/// Returns each column's sum.
fn softmax_columns(
    scores: &mut [f32],
    [cols, np]: [usize; 2],
    clear: usize,
    mask_t: &[f32],
    scale: f32,
) -> Vec<f32> {
    let mut top = vec![f32::NEG_INFINITY; cols];
    let mut sums = vec![0f32; cols];
    softmax_columns_body(scores, clear, mask_t, np, scale, &mut top, &mut sums);
    sums
}

wide_fn! {
fn softmax_columns_body(
    scores: &mut [f32],
    clear: usize,
    mask_t: &[f32],
    np: usize,
    scale: f32,
    top: &mut [f32],
    sums: &mut [f32],
) {
    let cols = top.len();
    for (j, row) in scores.chunks_exact_mut(cols).enumerate() {
        match j.checked_sub(clear) {
            None => row.iter_mut().for_each(|s| *s *= scale),
            Some(masked) => {
                let mask = &mask_t[masked * np..][..np];
                for head in row.chunks_exact_mut(np) {
                    for (s, &m) in head.iter_mut().zip(mask) {
                        *s = *s * scale + m;
                    }
                }
            }
        }
        for (t, &s) in top.iter_mut().zip(row.iter()) {
            *t = t.max(s);
        }
    }
    for row in scores.chunks_exact_mut(cols) {
        for ((s, &t), sum) in row.iter_mut().zip(top.iter()).zip(sums.iter_mut()) {
            *s = if *s == f32::NEG_INFINITY {
                0.0
            } else {
                crate::exp(*s - t)
            };
            *sum += *s;
        }
    }
}
}

/// A matrix read in place: element (r, c) at `data[r·row_stride + c·col_stride]`.
#[derive(Clone, Copy)]
struct Operand {
    data: *const f32,
    row_stride: usize,
    col_stride: usize,
}

/// Rows of x per AVX-512 kernel tile: 2·MR accumulators, two vectors of b and a broadcast
/// stay in the 32 vector registers.
const MR: usize = 8;
/// Columns per AVX-512 kernel tile: two 16-lane vectors.
const NR: usize = 32;
/// Rows of x per AVX2 kernel tile: 12 accumulators, two vectors of b and a broadcast fill
/// its 16 registers.
const MR_AVX2: usize = 6;
/// Columns per AVX2 kernel tile: two 8-lane vectors.
const NR_AVX2: usize = 16;

/// `out (m × n) = x (m × k) · b (k × n)`, b and out row-major with row strides `b_stride` and
/// `out_stride`, on this thread, with the kernel of [`crate::simd`].
///
/// # Safety
/// x, b and out hold the elements their strides and sizes address.
#[allow(clippy::too_many_arguments)]
unsafe fn product(
    m: usize,
    n: usize,
    k: usize,
    x: Operand,
    b: *const f32,
    b_stride: usize,
    out: *mut f32,
    out_stride: usize,
) {
    // SAFETY: `simd` reports a level the CPU runs; the caller vouches for the memory.
    unsafe { product_at(crate::simd(), m, n, k, x, b, b_stride, out, out_stride) }
}

/// [`product`] with the kernel of `simd`.
///
/// # Safety
/// As [`product`], and the CPU runs `simd`.
#[allow(clippy::too_many_arguments)]
unsafe fn product_at(
    simd: Simd,
    m: usize,
    n: usize,
    k: usize,
    x: Operand,
    b: *const f32,
    b_stride: usize,
    out: *mut f32,
    out_stride: usize,
) {
    // SAFETY: the CPU runs `simd`, and the caller vouches for the memory.
    unsafe {
        match simd {
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => product_avx512(m, n, k, x, b, b_stride, out, out_stride),
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => product_avx2(m, n, k, x, b, b_stride, out, out_stride),
            _ => product_portable(m, n, k, x, b, b_stride, out, out_stride),
        }
    }
}

/// [`product`] in plain Rust, where neither AVX2 nor AVX-512 runs.
///
/// # Safety
/// As [`product`].
#[allow(clippy::too_many_arguments)]
unsafe fn product_portable(
    m: usize,
    n: usize,
    k: usize,
    x: Operand,
    b: *const f32,
    b_stride: usize,
    out: *mut f32,
    out_stride: usize,
) {
    for r in 0..m {
        for c in 0..n {
            let mut sum = 0f32;
            for l in 0..k {
                // SAFETY: as the caller vouches.
                unsafe {
                    sum +=
                        *x.data.add(r * x.row_stride + l * x.col_stride) * *b.add(l * b_stride + c);
                }
            }
            // SAFETY: as the caller vouches.
            unsafe { *out.add(r * out_stride + c) = sum };
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn product_avx512(
    m: usize,
    n: usize,
    k: usize,
    x: Operand,
    b: *const f32,
    b_stride: usize,
    out: *mut f32,
    out_stride: usize,
) {
    for c in (0..n).step_by(NR) {
        let valid = NR.min(n - c);
        let low = ((1u32 << valid.min(16)) - 1) as u16;
        let high = ((1u32 << valid.saturating_sub(16)) - 1) as u16;
        for r in (0..m).step_by(MR) {
            let x = Operand {
                data: unsafe { x.data.add(r * x.row_stride) },
                ..x
            };
            let (b, out) = unsafe { (b.add(c), out.add(r * out_stride + c)) };
            macro_rules! by_rows {
                ($($m:literal),*) => {
                    match MR.min(m - r) {
                        $($m => unsafe { tile::<$m>(k, x, b, b_stride, [low, high], out, out_stride) },)*
                        rows => unreachable!("{rows} rows exceed {MR}"),
                    }
                };
            }
            by_rows!(1, 2, 3, 4, 5, 6, 7, 8)
        }
    }
}

/// `M` rows of x times the ≤ 32 columns of b that `lanes` select.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tile<const M: usize>(
    k: usize,
    x: Operand,
    b: *const f32,
    b_stride: usize,
    lanes: [u16; 2],
    out: *mut f32,
    out_stride: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; M];
    for l in 0..k {
        // Masked loads never touch the lanes they leave out, so a short last panel reads
        // nothing past b's columns.
        let b0 = unsafe { _mm512_maskz_loadu_ps(lanes[0], b.add(l * b_stride)) };
        let b1 = unsafe { _mm512_maskz_loadu_ps(lanes[1], b.add(l * b_stride + 16)) };
        for (r, row) in acc.iter_mut().enumerate() {
            let xb = _mm512_set1_ps(unsafe { *x.data.add(r * x.row_stride + l * x.col_stride) });
            row[0] = _mm512_fmadd_ps(xb, b0, row[0]);
            row[1] = _mm512_fmadd_ps(xb, b1, row[1]);
        }
    }
    for (r, row) in acc.iter().enumerate() {
        let out = unsafe { out.add(r * out_stride) };
        unsafe {
            _mm512_mask_storeu_ps(out, lanes[0], row[0]);
            _mm512_mask_storeu_ps(out.add(16), lanes[1], row[1]);
        }
    }
}

/// [`product_avx512`] with AVX2: tiles of [`MR_AVX2`] × [`NR_AVX2`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn product_avx2(
    m: usize,
    n: usize,
    k: usize,
    x: Operand,
    b: *const f32,
    b_stride: usize,
    out: *mut f32,
    out_stride: usize,
) {
    for c in (0..n).step_by(NR_AVX2) {
        let valid = NR_AVX2.min(n - c);
        let lanes = [
            first_lanes(valid.min(8)),
            first_lanes(valid.saturating_sub(8)),
        ];
        for r in (0..m).step_by(MR_AVX2) {
            let x = Operand {
                data: unsafe { x.data.add(r * x.row_stride) },
                ..x
            };
            let (b, out) = unsafe { (b.add(c), out.add(r * out_stride + c)) };
            macro_rules! by_rows {
                ($($m:literal),*) => {
                    match MR_AVX2.min(m - r) {
                        $($m => unsafe { tile_avx2::<$m>(k, x, b, b_stride, lanes, out, out_stride) },)*
                        rows => unreachable!("{rows} rows exceed {MR_AVX2}"),
                    }
                };
            }
            by_rows!(1, 2, 3, 4, 5, 6)
        }
    }
}

/// `M` rows of x times the ≤ 16 columns of b that `lanes` select.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile_avx2<const M: usize>(
    k: usize,
    x: Operand,
    b: *const f32,
    b_stride: usize,
    lanes: [__m256i; 2],
    out: *mut f32,
    out_stride: usize,
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; M];
    for l in 0..k {
        // As in `tile`: masked loads read nothing past b's columns.
        let b0 = unsafe { _mm256_maskload_ps(b.add(l * b_stride), lanes[0]) };
        let b1 = unsafe { _mm256_maskload_ps(b.add(l * b_stride + 8), lanes[1]) };
        for (r, row) in acc.iter_mut().enumerate() {
            let xb = _mm256_set1_ps(unsafe { *x.data.add(r * x.row_stride + l * x.col_stride) });
            row[0] = _mm256_fmadd_ps(xb, b0, row[0]);
            row[1] = _mm256_fmadd_ps(xb, b1, row[1]);
        }
    }
    for (r, row) in acc.iter().enumerate() {
        let out = unsafe { out.add(r * out_stride) };
        unsafe {
            _mm256_maskstore_ps(out, lanes[0], row[0]);
            _mm256_maskstore_ps(out.add(8), lanes[1], row[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        (0..n as u64)
            .map(|i| ((i.wrapping_mul(2654435761) ^ seed) % 2000) as f32 / 1000.0 - 1.0)
            .collect()
    }

    /// Attention the slow way, in f64, over q (b, heads, t, d) and contiguous k, v.
    fn naive(shape: Shape, o: &Operands) -> Vec<f32> {
        let Shape {
            batch,
            queries,
            keys,
            heads,
            kv_heads,
            dim,
        } = shape;
        let mut out = vec![0f32; batch * queries * heads * dim];
        for s in 0..batch {
            for h in 0..heads {
                let g = h / (heads / kv_heads);
                let kv = (s * kv_heads + g) * o.kv_stride;
                for i in 0..queries {
                    let q = &o.q[((s * heads + h) * queries + i) * dim..][..dim];
                    let mask = &o.mask[(s * queries + i) * keys..][..keys];
                    let logits: Vec<f64> = (0..keys)
                        .map(|j| {
                            let k = &o.k[kv + j * dim..][..dim];
                            let dot: f64 =
                                q.iter().zip(k).map(|(a, b)| *a as f64 * *b as f64).sum();
                            dot * o.scale as f64 + mask[j] as f64
                        })
                        .collect();
                    let top = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let weights: Vec<f64> = logits.iter().map(|l| (l - top).exp()).collect();
                    let total: f64 = weights.iter().sum();
                    let row = &mut out[((s * queries + i) * heads + h) * dim..][..dim];
                    for (c, value) in row.iter_mut().enumerate() {
                        let mixed: f64 = (0..keys)
                            .map(|j| weights[j] * o.v[kv + j * dim + c] as f64)
                            .sum();
                        *value = (mixed / total) as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn strided_products_match_a_naive_loop_on_every_path() {
        // x read transposed (column stride 1·m apart), b and out with spare columns.
        let (m, n, k) = (11, 37, 9);
        let x = values(k * m, 5);
        let b = values(k * (n + 3), 6);
        let operand = Operand {
            data: x.as_ptr(),
            row_stride: 1,
            col_stride: m,
        };
        let want: Vec<f32> = (0..m * n)
            .map(|i| {
                (0..k)
                    .map(|l| x[l * m + i / n] * b[l * (n + 3) + i % n])
                    .sum()
            })
            .collect();
        for simd in Simd::available() {
            let mut out = vec![f32::NAN; m * (n + 2)];
            // SAFETY: x, b and out hold the elements their strides and sizes address; the CPU
            // runs every available level.
            unsafe {
                let (b, o) = (b.as_ptr(), out.as_mut_ptr());
                product_at(simd, m, n, k, operand, b, n + 3, o, n + 2);
            }
            for (i, want) in want.iter().enumerate() {
                let got = out[i / n * (n + 2) + i % n];
                assert!((got - want).abs() < 1e-5, "{simd:?}, {i}: {got} vs {want}");
            }
            assert!(
                out.chunks(n + 2)
                    .all(|row| row[n..].iter().all(|v| v.is_nan()))
            );
        }
    }

    #[test]
    fn matches_naive_attention_across_blocks_padding_and_a_cached_past() {
        // 2 sequences, 37 new positions after 5 cached ones (two blocks, one short), 6 query
        // heads over 2 key/value heads, dim 20 (a short vector pair); k, v with spare room.
        let (batch, queries, past, heads, kv_heads, dim) = (2, 37, 5, 6, 2, 20);
        let keys = past + queries;
        let capacity = keys + 3;
        let shape = Shape {
            batch,
            queries,
            keys,
            heads,
            kv_heads,
            dim,
        };
        // Causal, and sequence 1 has keys 2..4 as padding (a query there sees only itself).
        let mut mask = vec![f32::NEG_INFINITY; batch * queries * keys];
        for s in 0..batch {
            for i in 0..queries {
                let own = past + i;
                for j in 0..=own {
                    let padding = s == 1 && (2..4).contains(&j) && j != own;
                    if !padding {
                        mask[(s * queries + i) * keys + j] = 0.0;
                    }
                }
            }
        }
        let (k, v) = (
            values(batch * kv_heads * capacity * dim, 3),
            values(batch * kv_heads * capacity * dim, 4),
        );
        let operands = Operands {
            q: &values(batch * heads * queries * dim, 2),
            k: &k,
            v: &v,
            kv_stride: capacity * dim,
            mask: &mask,
            visibility: &Visibility::of(&mask, keys),
            scale: 0.5,
        };
        let out = attention(shape, &operands);
        let want = naive(shape, &operands);
        for (i, (got, want)) in out.iter().zip(&want).enumerate() {
            assert!((got - want).abs() < 1e-5, "element {i}: {got} vs {want}");
        }
        // One sequence alone gives the same bits as within the batch.
        let one = Operands {
            q: &operands.q[heads * queries * dim..],
            k: &k[kv_heads * capacity * dim..],
            v: &v[kv_heads * capacity * dim..],
            mask: &mask[queries * keys..],
            visibility: &Visibility::of(&mask[queries * keys..], keys),
            ..operands
        };
        let alone = attention(Shape { batch: 1, ..shape }, &one);
        assert_eq!(alone, out[queries * heads * dim..]);
    }
}
