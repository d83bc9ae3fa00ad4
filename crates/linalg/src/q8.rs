//! Int8 weights for decoding: `y = x · Wᵀ` with W (out × in) stored as Q8_0 (blocks of 32 values
//! along a row, each block `scale · int8`) and x in f32, for the few rows a decoding step
//! multiplies. Batch-1 decoding reads every weight once per token, so it runs at the speed of
//! memory: a quarter of f32's bytes is most of the gain.
//!
//! Why not candle's `QMatMul`: it quantizes x to int8 too and runs 256-bit kernels that convert
//! each block's f16 scale one at a time; `perf` of SmolLM2 decoding (2026-12-07) put 38% of
//! cycles in its dot product, 4% in scale conversion and 2% in quantizing x. Here scales are f32,
//! x stays f32 (no second rounding), and each 16 weights (8 with AVX2) are widened to f32 in
//! registers and multiplied there. Machines with neither AVX2 nor AVX-512F get `None` from
//! [`Q8Matrix::quantize`] and keep candle's path: a plain-Rust kernel like these decoded
//! SmolLM2 at 38-40 tok/s there, against candle's 76-102 and f32's 61-69 (2026-12-07).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use crate::Simd;
use crate::matmul::Threads;
use crate::parts::{self, Out, WeightKernel};

/// Values per scale, as in GGML's Q8_0.
pub const BLOCK: usize = 32;
/// Weight rows one kernel call reads together (each widened block is reused by every x row).
const NR: usize = 4;
/// Rows of x one AVX-512 kernel call takes at most; more are taken in several calls.
const MR: usize = 4;
/// Rows of x one AVX2 kernel call takes at most: its 16 registers hold 2 × [`NR`]
/// accumulators, the rows' x and a widened weight vector.
const MR_AVX2: usize = 2;
/// How far ahead of its reads (bytes) the AVX2 kernel prefetches its weights.
const PREFETCH_AHEAD: usize = 2048;
/// Below this many weights a product runs on one thread: waking another costs more.
const SPLIT_MIN_WEIGHTS: usize = 1 << 17;

/// W (rows × cols) in Q8_0 blocks, interleaved for the kernels: rows in groups of [`NR`] (the
/// last padded with zero rows), and within a group, block by block, the [`NR`] rows' 32 values
/// one after another. A kernel call reading a group reads one contiguous stream, which the
/// hardware prefetchers follow; a layout of whole rows had it read [`NR`] streams a row apart
/// and, on AVX2 machines, stream from memory at a third of f32's rate (2026-12-08).
pub struct Q8Matrix {
    /// The kernel that multiplies it.
    simd: Simd,
    rows: usize,
    cols: usize,
    /// `values[((g·blocks + b)·NR + c)·32 + i]` is W[g·NR + c][32b + i] / its scale.
    values: Vec<i8>,
    /// `scales[(g·blocks + b)·NR + c]`: the scale of that block.
    scales: Vec<f32>,
}

impl Q8Matrix {
    /// Quantizes a row-major `rows × cols` matrix the way GGML's Q8_0 does (per block of 32:
    /// scale = max |w| / 127, values rounded to nearest). `None` where no kernel can run it:
    /// neither AVX2 nor AVX-512 at the [`simd`](crate::simd) level, or rows that are not whole
    /// blocks.
    pub fn quantize(data: &[f32], rows: usize, cols: usize) -> Option<Self> {
        Self::quantize_for(crate::simd(), data, rows, cols)
    }

    /// [`Q8Matrix::quantize`] for the kernel of `simd`, a level this CPU runs.
    fn quantize_for(simd: Simd, data: &[f32], rows: usize, cols: usize) -> Option<Self> {
        assert_eq!(data.len(), rows * cols, "data is not rows × cols");
        if simd == Simd::Portable || !cols.is_multiple_of(BLOCK) || cols == 0 {
            return None;
        }
        let blocks = cols / BLOCK;
        let padded = rows.next_multiple_of(NR);
        let mut values = vec![0i8; padded * cols];
        let mut scales = vec![0f32; padded * blocks];
        for (r, row) in data.chunks_exact(cols).enumerate() {
            let (g, c) = (r / NR, r % NR);
            for (b, block) in row.chunks_exact(BLOCK).enumerate() {
                let at = (g * blocks + b) * NR + c;
                let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let scale = amax / 127.0;
                let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                for (v, w) in values[at * BLOCK..][..BLOCK].iter_mut().zip(block) {
                    *v = (w * inverse).round() as i8;
                }
                scales[at] = scale;
            }
        }
        Some(Self {
            simd,
            rows,
            cols,
            values,
            scales,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// `x (m × cols) · Wᵀ`: m × rows, both row-major and contiguous.
    pub fn matmul_t(&self, x: &[f32], m: usize, threads: Threads) -> Vec<f32> {
        let [out] = Self::matmul_t_each([self], x, m, threads);
        out
    }

    /// [`Q8Matrix::matmul_t`] for several matrices that read the same x (a layer's q, k and
    /// v), their rows split between threads as those of one product: a decoding step wakes the
    /// pool once for them, not once each.
    pub fn matmul_t_each<const N: usize>(
        matrices: [&Self; N],
        x: &[f32],
        m: usize,
        threads: Threads,
    ) -> [Vec<f32>; N] {
        parts::matmul_t_each(matrices, x, m, threads)
    }

    /// Output columns `rows` (weight rows) for every row of x.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn rows_avx512(&self, x: &[f32], m: usize, out: Out, rows: std::ops::Range<usize>) {
        for first in (0..m).step_by(MR) {
            let x = &x[first * self.cols..];
            for j in rows.clone().step_by(NR) {
                let valid = NR.min(rows.end - j);
                let out = unsafe { out.0.add(first * self.rows + j) };
                match MR.min(m - first) {
                    1 => unsafe { self.tile::<1>(x, j / NR, out, valid) },
                    2 => unsafe { self.tile::<2>(x, j / NR, out, valid) },
                    3 => unsafe { self.tile::<3>(x, j / NR, out, valid) },
                    4 => unsafe { self.tile::<4>(x, j / NR, out, valid) },
                    mr => unreachable!("{mr} rows of x exceed {MR}"),
                }
            }
        }
    }

    /// `M` rows of x (from `x`) against weight group `g`, into the first `valid` of its [`NR`]
    /// output columns (`out`, row stride `self.rows`): per 16 weights, widen to f32, scale, and
    /// multiply-add into `M·NR` accumulators, each summed once at the end.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile<const M: usize>(&self, x: &[f32], g: usize, out: *mut f32, valid: usize) {
        let k = self.cols;
        let blocks = k / BLOCK;
        let values = unsafe { self.values.as_ptr().add(g * blocks * NR * BLOCK) };
        let scales = unsafe { self.scales.as_ptr().add(g * blocks * NR) };
        let xp = x.as_ptr();
        let mut acc = [[_mm512_setzero_ps(); NR]; M];
        for b in 0..blocks {
            for half in 0..2 {
                let l = b * BLOCK + half * 16;
                let mut xv = [_mm512_setzero_ps(); M];
                for (r, v) in xv.iter_mut().enumerate() {
                    *v = unsafe { _mm512_loadu_ps(xp.add(r * k + l)) };
                }
                let mut ws = [_mm512_setzero_ps(); NR];
                for (c, w) in ws.iter_mut().enumerate() {
                    let at = (b * NR + c) * BLOCK + half * 16;
                    let bytes = unsafe { _mm_loadu_si128(values.add(at).cast()) };
                    let scale = _mm512_set1_ps(unsafe { *scales.add(b * NR + c) });
                    *w = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)), scale);
                }
                for (row, x) in acc.iter_mut().zip(&xv) {
                    for (partial, w) in row.iter_mut().zip(&ws) {
                        *partial = _mm512_fmadd_ps(*x, *w, *partial);
                    }
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (c, partial) in row.iter().enumerate().take(valid) {
                unsafe { *out.add(r * self.rows + c) = _mm512_reduce_add_ps(*partial) };
            }
        }
    }
}

impl Q8Matrix {
    /// [`Q8Matrix::rows_avx512`] with AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn rows_avx2(&self, x: &[f32], m: usize, out: Out, rows: std::ops::Range<usize>) {
        for first in (0..m).step_by(MR_AVX2) {
            let x = &x[first * self.cols..];
            for j in rows.clone().step_by(NR) {
                let valid = NR.min(rows.end - j);
                let out = unsafe { out.0.add(first * self.rows + j) };
                match MR_AVX2.min(m - first) {
                    1 => unsafe { self.tile_avx2::<1>(x, j / NR, out, valid) },
                    2 => unsafe { self.tile_avx2::<2>(x, j / NR, out, valid) },
                    mr => unreachable!("{mr} rows of x exceed {MR_AVX2}"),
                }
            }
        }
    }

    /// [`Q8Matrix::tile`] with AVX2: 8 weights at a time.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn tile_avx2<const M: usize>(&self, x: &[f32], g: usize, out: *mut f32, valid: usize) {
        let k = self.cols;
        let blocks = k / BLOCK;
        let values = unsafe { self.values.as_ptr().add(g * blocks * NR * BLOCK) };
        let scales = unsafe { self.scales.as_ptr().add(g * blocks * NR) };
        let xp = x.as_ptr();
        let mut acc = [[_mm256_setzero_ps(); NR]; M];
        for b in 0..blocks {
            // Ask for the group's values 2 KiB ahead: the prefetchers alone left a thread at
            // 12-14 GB/s from memory, this at 13-18 (wrapping: the address may pass the end,
            // which a prefetch ignores).
            let ahead = values.wrapping_add(b * NR * BLOCK + PREFETCH_AHEAD);
            _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64).cast());
            for eighth in 0..BLOCK / 8 {
                let l = b * BLOCK + eighth * 8;
                let mut xv = [_mm256_setzero_ps(); M];
                for (r, v) in xv.iter_mut().enumerate() {
                    *v = unsafe { _mm256_loadu_ps(xp.add(r * k + l)) };
                }
                for c in 0..NR {
                    let at = (b * NR + c) * BLOCK + eighth * 8;
                    let bytes = unsafe { _mm_loadl_epi64(values.add(at).cast()) };
                    let scale = _mm256_set1_ps(unsafe { *scales.add(b * NR + c) });
                    let w = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), scale);
                    for (row, x) in acc.iter_mut().zip(&xv) {
                        row[c] = _mm256_fmadd_ps(*x, w, row[c]);
                    }
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (c, partial) in row.iter().enumerate().take(valid) {
                unsafe { *out.add(r * self.rows + c) = sum_lanes(*partial) };
            }
        }
    }
}

/// The sum of 8 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn sum_lanes(v: __m256) -> f32 {
    let four = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let two = _mm_add_ps(four, _mm_movehl_ps(four, four));
    _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)))
}

impl WeightKernel for Q8Matrix {
    const ALIGN: usize = NR;
    const SPLIT_MIN_WORK: usize = SPLIT_MIN_WEIGHTS;

    fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Decoding multiplies a few rows of x: reading the weights is the cost, whatever m.
    fn work(&self, _: usize) -> usize {
        self.rows * self.cols
    }

    unsafe fn fill(&self, x: &[f32], m: usize, out: Out, columns: std::ops::Range<usize>) {
        // SAFETY: as the trait asks; `quantize_for` made this matrix for a level the CPU runs.
        #[cfg(target_arch = "x86_64")]
        match self.simd {
            Simd::Avx512 => unsafe { self.rows_avx512(x, m, out, columns) },
            Simd::Avx2 => unsafe { self.rows_avx2(x, m, out, columns) },
            Simd::Portable => unreachable!("int8 matrices have a kernel"),
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (x, m, out, columns);
            unreachable!("int8 matrices exist only where AVX2 or AVX-512F runs")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Q8Matrix {
        /// W[r][l]'s stored int8 value and its block's scale.
        fn stored(&self, r: usize, l: usize) -> (i8, f32) {
            let at = ((r / NR * (self.cols / BLOCK) + l / BLOCK) * NR + r % NR) * BLOCK;
            (self.values[at + l % BLOCK], self.scales[at / BLOCK])
        }
    }

    /// `w` quantized for each kernel this CPU runs.
    fn quantized_each(w: &[f32], rows: usize, cols: usize) -> Vec<Q8Matrix> {
        let quantized: Vec<_> = Simd::available()
            .filter_map(|simd| Q8Matrix::quantize_for(simd, w, rows, cols))
            .collect();
        if quantized.is_empty() {
            eprintln!("neither AVX2 nor AVX-512 here: nothing to check");
        }
        quantized
    }

    #[test]
    fn products_match_the_dequantized_weights_for_every_tile_and_split() {
        let (rows, cols) = (4 * 1024 + 3, 64);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 300.0)
            .collect();
        for q in quantized_each(&w, rows, cols) {
            // Quantization error stays within half a step of each block's scale.
            for (i, &orig) in w.iter().enumerate() {
                let (v, scale) = q.stored(i / cols, i % cols);
                assert!((v as f32 * scale - orig).abs() <= 0.5 * scale + 1e-6);
            }
            for m in [1, 2, 3, 4, 5, 6] {
                let x: Vec<f32> = (0..m * cols).map(|i| (i % 9) as f32 * 0.25 - 1.0).collect();
                let want: Vec<f64> = (0..m)
                    .flat_map(|r| {
                        let (x, q) = (&x, &q);
                        (0..rows).map(move |j| {
                            (0..cols)
                                .map(|l| {
                                    let (v, scale) = q.stored(j, l);
                                    v as f64 * scale as f64 * x[r * cols + l] as f64
                                })
                                .sum()
                        })
                    })
                    .collect();
                for threads in [Threads::One, Threads::All] {
                    let out = q.matmul_t(&x, m, threads);
                    for (i, (&got, &want)) in out.iter().zip(&want).enumerate() {
                        assert!(
                            (got as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{:?}, m {m}, element {i}: {got} vs {want}",
                            q.simd
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn products_taken_together_equal_products_taken_alone() {
        let quantize = |rows: usize, seed: f32| {
            let w: Vec<f32> = (0..rows * 64).map(|i| (i as f32 * seed).sin()).collect();
            quantized_each(&w, rows, 64)
        };
        let x: Vec<f32> = (0..3 * 64).map(|i| (i as f32 * 0.11).cos()).collect();
        for (a, b) in quantize(2048 + 3, 0.37).iter().zip(&quantize(9, 0.21)) {
            let [ya, yb] = Q8Matrix::matmul_t_each([a, b], &x, 3, Threads::All);
            assert_eq!(ya, a.matmul_t(&x, 3, Threads::One));
            assert_eq!(yb, b.matmul_t(&x, 3, Threads::One));
        }
    }

    #[test]
    fn rows_that_are_not_whole_blocks_are_left_to_other_kernels() {
        assert!(Q8Matrix::quantize(&[0.5; 40], 2, 20).is_none());
    }
}
