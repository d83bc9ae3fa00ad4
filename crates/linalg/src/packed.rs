//! f32 weights packed once for `y = x · Wᵀ`, so that products stop repacking them.
//!
//! faer packs both operands inside every product. For the model's projections W is the same
//! matrix call after call, and at decoding batches (8-64 rows of x) packing it is most of the
//! work: `perf` of SmolLM2 rollouts (32 sequences, 2026-12-07) put 27% of all cycles in faer's
//! packing and 11% in its thread barrier, against 23% in its kernel. Here W (out × in) is stored
//! as panels of [`NR`] rows interleaved along `in` (`panel[k][c] = W[32p + c][k]`), and the
//! kernel multiplies up to [`MR`] rows of x, read in place, into a panel: per k one load of 32
//! weights, one broadcast per row of x, two FMAs per row.
//!
//! Each output is one sequential sum over `in`, whatever the tile, the thread split or the
//! other rows of x: a sequence's logits do not depend on what else is in its batch.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use rayon::prelude::*;

use crate::matmul::Threads;
use crate::parts::{self, Out, WeightKernel};

/// Weight rows per panel: two 16-lane vectors.
const NR: usize = 32;
/// Rows of x per kernel call: 2·MR accumulators, two weight vectors and a broadcast stay in
/// the 32 vector registers.
const MR: usize = 8;
/// Packed weights one pass over x's rows reads, sized to stay in a core's L2 cache.
const CHUNK_BYTES: usize = 256 << 10;
/// Below this many multiply-adds a product runs on one thread: waking another costs more.
const SPLIT_MIN_WORK: usize = 1 << 20;

/// 16 floats on a 64-byte boundary, so no vector load of a panel straddles two cache lines.
#[derive(Clone, Copy)]
#[repr(align(64))]
struct Lanes([f32; 16]);

/// W (rows × cols) in panels of [`NR`] rows, the last one padded with zeros.
pub struct PackedMatrix {
    rows: usize,
    cols: usize,
    panels: Vec<Lanes>,
}

impl PackedMatrix {
    /// Packs a row-major `rows × cols` matrix; `None` where the kernel cannot run (no AVX-512F
    /// here) or there is nothing to pack.
    pub fn pack(data: &[f32], rows: usize, cols: usize) -> Option<Self> {
        assert_eq!(data.len(), rows * cols, "data is not rows × cols");
        if !crate::avx512_available() || rows == 0 || cols == 0 {
            return None;
        }
        let lanes_per_panel = cols * NR / 16;
        let mut panels = vec![Lanes([0.0; 16]); rows.div_ceil(NR) * lanes_per_panel];
        let fill = |(p, panel): (usize, &mut [Lanes])| {
            let first = p * NR;
            for c in 0..NR.min(rows - first) {
                let row = &data[(first + c) * cols..][..cols];
                for (k, &v) in row.iter().enumerate() {
                    panel[k * 2 + c / 16].0[c % 16] = v;
                }
            }
        };
        panels
            .par_chunks_mut(lanes_per_panel)
            .enumerate()
            .for_each(fill);
        Some(Self { rows, cols, panels })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// `x (m × cols) · Wᵀ`: m × rows, both row-major and contiguous.
    pub fn matmul_t(&self, x: &[f32], m: usize, threads: Threads) -> Vec<f32> {
        let [out] = Self::matmul_t_each([self], x, m, threads);
        out
    }

    /// [`PackedMatrix::matmul_t`] into `out` (m × rows), overwriting it.
    pub fn matmul_t_into(&self, x: &[f32], m: usize, out: &mut [f32], threads: Threads) {
        parts::matmul_t_into(self, x, m, out, threads)
    }

    /// [`PackedMatrix::matmul_t`] for several matrices that read the same x (a layer's q, k
    /// and v), their panels split between threads as those of one product.
    pub fn matmul_t_each<const N: usize>(
        matrices: [&Self; N],
        x: &[f32],
        m: usize,
        threads: Threads,
    ) -> [Vec<f32>; N] {
        parts::matmul_t_each(matrices, x, m, threads)
    }

    /// Output columns of `panels` for every row of x: a chunk of panels that fits in L2 at a
    /// time, each multiplied by every block of x's rows.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn panels_avx512(&self, x: &[f32], m: usize, out: Out, panels: std::ops::Range<usize>) {
        let k = self.cols;
        let lanes_per_panel = k * NR / 16;
        let chunk = (CHUNK_BYTES / (k * NR * 4)).max(1);
        for chunk_start in panels.clone().step_by(chunk) {
            let chunk_end = (chunk_start + chunk).min(panels.end);
            for first in (0..m).step_by(MR) {
                let x = unsafe { x.as_ptr().add(first * k) };
                for p in chunk_start..chunk_end {
                    let w = self.panels[p * lanes_per_panel..].as_ptr().cast::<f32>();
                    let valid = NR.min(self.rows - p * NR);
                    let out = unsafe { out.0.add(first * self.rows + p * NR) };
                    macro_rules! by_rows {
                        ($($m:literal),*) => {
                            match MR.min(m - first) {
                                $($m => unsafe { self.tile::<$m>(x, w, out, valid) },)*
                                rows => unreachable!("{rows} rows exceed {MR}"),
                            }
                        };
                    }
                    by_rows!(1, 2, 3, 4, 5, 6, 7, 8)
                }
            }
        }
    }

    /// `M` rows of x times one panel `w` into `out` (row stride `self.rows`), writing the
    /// `valid` columns that are real weight rows.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile<const M: usize>(
        &self,
        x: *const f32,
        w: *const f32,
        out: *mut f32,
        valid: usize,
    ) {
        let k = self.cols;
        let mut acc = [[_mm512_setzero_ps(); 2]; M];
        for l in 0..k {
            let w0 = unsafe { _mm512_load_ps(w.add(l * NR)) };
            let w1 = unsafe { _mm512_load_ps(w.add(l * NR + 16)) };
            for (r, row) in acc.iter_mut().enumerate() {
                let xb = _mm512_set1_ps(unsafe { *x.add(r * k + l) });
                row[0] = _mm512_fmadd_ps(xb, w0, row[0]);
                row[1] = _mm512_fmadd_ps(xb, w1, row[1]);
            }
        }
        let low = ((1u32 << valid.min(16)) - 1) as u16;
        let high = ((1u32 << valid.saturating_sub(16)) - 1) as u16;
        for (r, row) in acc.iter().enumerate() {
            let out = unsafe { out.add(r * self.rows) };
            unsafe {
                _mm512_mask_storeu_ps(out, low, row[0]);
                _mm512_mask_storeu_ps(out.add(16), high, row[1]);
            }
        }
    }
}

impl WeightKernel for PackedMatrix {
    const ALIGN: usize = NR;
    const SPLIT_MIN_WORK: usize = SPLIT_MIN_WORK;

    fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    fn work(&self, m: usize) -> usize {
        m * self.rows * self.cols
    }

    unsafe fn fill(&self, x: &[f32], m: usize, out: Out, columns: std::ops::Range<usize>) {
        let panels = columns.start / NR..columns.end.div_ceil(NR);
        // SAFETY: as the trait asks; `pack` made this matrix only where AVX-512F runs.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            self.panels_avx512(x, m, out, panels)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (x, m, out, panels);
            unreachable!("packed matrices exist only where AVX-512F runs")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_match_a_naive_loop_for_every_tile_edge_and_split() {
        // 2 full panels and a partial one (9 rows), k not a multiple of anything.
        let (rows, cols) = (2 * NR + 9, 37);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 300.0)
            .collect();
        let Some(packed) = PackedMatrix::pack(&w, rows, cols) else {
            eprintln!("no AVX-512 here: nothing to check");
            return;
        };
        for m in [1, 3, 8, 11, 17] {
            let x: Vec<f32> = (0..m * cols).map(|i| (i % 9) as f32 * 0.25 - 1.0).collect();
            let want: Vec<f32> = (0..m)
                .flat_map(|r| {
                    let (x, w) = (&x, &w);
                    (0..rows).map(move |j| {
                        (0..cols).fold(0f32, |s, l| s + x[r * cols + l] * w[j * cols + l])
                    })
                })
                .collect();
            for threads in [Threads::One, Threads::All] {
                let out = packed.matmul_t(&x, m, threads);
                for (i, (&got, &want)) in out.iter().zip(&want).enumerate() {
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "m {m}, element {i}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn products_taken_together_or_into_a_buffer_equal_products_taken_alone() {
        let pack = |rows: usize, seed: f32| {
            let w: Vec<f32> = (0..rows * 64).map(|i| (i as f32 * seed).sin()).collect();
            PackedMatrix::pack(&w, rows, 64)
        };
        let (Some(a), Some(b), Some(c)) = (pack(3 * NR, 0.37), pack(NR + 5, 0.21), pack(7, 0.5))
        else {
            return;
        };
        let x: Vec<f32> = (0..40 * 64).map(|i| (i as f32 * 0.11).cos()).collect();
        let together = PackedMatrix::matmul_t_each([&a, &b, &c], &x, 40, Threads::All);
        for (out, w) in together.iter().zip([&a, &b, &c]) {
            assert_eq!(*out, w.matmul_t(&x, 40, Threads::One));
            let mut into = vec![f32::NAN; out.len()];
            w.matmul_t_into(&x, 40, &mut into, Threads::All);
            assert_eq!(*out, into);
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_whatever_else_is_in_the_batch() {
        let (rows, cols) = (3 * NR, 300);
        let w: Vec<f32> = (0..rows * cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let Some(packed) = PackedMatrix::pack(&w, rows, cols) else {
            return;
        };
        let x: Vec<f32> = (0..13 * cols).map(|i| (i as f32 * 0.11).cos()).collect();
        let all = packed.matmul_t(&x, 13, Threads::All);
        for r in [0, 7, 12] {
            let one = packed.matmul_t(&x[r * cols..][..cols], 1, Threads::One);
            assert_eq!(one, all[r * rows..][..rows]);
        }
    }
}
