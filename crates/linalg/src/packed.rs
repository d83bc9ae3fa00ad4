//! f32 weights packed once for `y = x · Wᵀ`, so that products stop repacking them.
//!
//! faer packs both operands inside every product. For the model's projections W is the same
//! matrix call after call, and at decoding batches (8-64 rows of x) packing it is most of the
//! work: `perf` of SmolLM2 rollouts (32 sequences, 2026-12-07) put 27% of all cycles in faer's
//! packing and 11% in its thread barrier, against 23% in its kernel. Here W (out × in) is stored
//! as panels of [`NR`] rows interleaved along `in` (`panel[k][c] = W[32p + c][k]`), and the
//! AVX-512 kernel multiplies up to [`MR`] rows of x, read in place, into a panel: per k one
//! load of 32 weights, one broadcast per row of x, two FMAs per row. The AVX2 kernel takes each
//! half panel (16 rows) in turn, up to [`MR_AVX2`] rows of x at a time, as its 16 registers allow.
//!
//! Each output is one sequential sum over `in`, whatever the tile, the thread split, the other
//! rows of x or the kernel (AVX2 and AVX-512 give the same bits): a sequence's logits do not
//! depend on what else is in its batch.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use rayon::prelude::*;

use crate::Simd;
use crate::matmul::Threads;
use crate::parts::{self, Out, WeightKernel};

/// Weight rows per panel: two 16-lane vectors.
const NR: usize = 32;
/// Rows of x per AVX-512 kernel call: 2·MR accumulators, two weight vectors and a broadcast
/// stay in the 32 vector registers.
const MR: usize = 8;
/// Rows of x per AVX2 kernel call, which has 16 registers: 12 accumulators, two 8-lane
/// vectors of weights and a broadcast.
const MR_AVX2: usize = 6;
/// Packed weights one pass over x's rows reads, sized to stay in a core's L2 cache.
const CHUNK_BYTES: usize = 256 << 10;
/// Below this many multiply-adds a product runs on one thread: waking another costs more.
const SPLIT_MIN_WORK: usize = 1 << 20;

/// 16 floats on a 64-byte boundary, so no vector load of a panel straddles two cache lines.
#[derive(Clone, Copy)]
#[repr(align(64))]
struct Lanes([f32; 16]);

/// One k-row of a bf16 panel: its 32 weights on a 64-byte boundary.
#[derive(Clone, Copy)]
#[repr(align(64))]
struct HalfLanes([u16; 32]);

/// The panels, in the element type W came in. Half-width ones are half the bytes to read,
/// widened to f32 in registers: the products are f32 products of their values.
enum Panels {
    F32(Vec<Lanes>),
    Half(HalfFormat, Vec<HalfLanes>),
}

/// A 16-bit float format weights can be packed in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HalfFormat {
    Bf16,
    F16,
}

/// bf16 bits: an f32's upper half.
#[derive(Clone, Copy)]
#[repr(transparent)]
struct Bf16(u16);

/// IEEE half-precision bits.
#[derive(Clone, Copy)]
#[repr(transparent)]
struct F16(u16);

/// W (rows × cols) in panels of [`NR`] rows, the last one padded with zeros.
pub struct PackedMatrix {
    /// The kernel that multiplies it.
    simd: Simd,
    rows: usize,
    cols: usize,
    panels: Panels,
}

/// An element of packed panels, as the kernels load it: `p` points into a panel's k-row.
trait Element: Copy + Send + Sync {
    fn to_f32(self) -> f32;
    /// 16 weights from `p` (32-byte aligned at least) as f32 lanes.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> __m512;
    /// 8 weights from `p` (16-byte aligned at least) as f32 lanes.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> __m256;
}

impl Element for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> __m512 {
        unsafe { _mm512_load_ps(p) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        unsafe { _mm256_load_ps(p) }
    }
}

impl Element for Bf16 {
    fn to_f32(self) -> f32 {
        f32::from_bits(u32::from(self.0) << 16)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> __m512 {
        let bits = unsafe { _mm256_load_si256(p.cast()) };
        unsafe { _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16)) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        let bits = unsafe { _mm_load_si128(p.cast()) };
        unsafe { _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16)) }
    }
}

impl Element for F16 {
    fn to_f32(self) -> f32 {
        half::f16::from_bits(self.0).to_f32()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> __m512 {
        unsafe { _mm512_cvtph_ps(_mm256_load_si256(p.cast())) }
    }
    /// Needs F16C, which the AVX2 kernels enable (every AVX2 CPU has it).
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        unsafe { _mm256_cvtph_ps(_mm_load_si128(p.cast())) }
    }
}

impl PackedMatrix {
    /// Packs a row-major `rows × cols` matrix; `None` where no kernel runs (neither AVX2 nor
    /// AVX-512 at the [`simd`](crate::simd) level) or there is nothing to pack.
    pub fn pack(data: &[f32], rows: usize, cols: usize) -> Option<Self> {
        Self::pack_for(crate::simd(), data, rows, cols)
    }

    /// [`PackedMatrix::pack`] of a bf16 or f16 matrix (its bits): products read half the
    /// bytes of an f32 one and compute in f32.
    pub fn pack_half(format: HalfFormat, data: &[u16], rows: usize, cols: usize) -> Option<Self> {
        Self::pack_half_for(crate::simd(), format, data, rows, cols)
    }

    /// [`PackedMatrix::pack`] for the kernel of `simd`, a level this CPU runs.
    fn pack_for(simd: Simd, data: &[f32], rows: usize, cols: usize) -> Option<Self> {
        let panels = packed_panels(simd, data, rows, cols, Lanes([0.0; 16]), |panel, k, c| {
            &mut panel[k * 2 + c / 16].0[c % 16]
        })?;
        Some(Self {
            simd,
            rows,
            cols,
            panels: Panels::F32(panels),
        })
    }

    /// [`PackedMatrix::pack_half`] for the kernel of `simd`, a level this CPU runs.
    fn pack_half_for(
        simd: Simd,
        format: HalfFormat,
        data: &[u16],
        rows: usize,
        cols: usize,
    ) -> Option<Self> {
        let zero = HalfLanes([0; 32]);
        let panels = packed_panels(simd, data, rows, cols, zero, |panel, k, c| {
            &mut panel[k].0[c]
        })?;
        Some(Self {
            simd,
            rows,
            cols,
            panels: Panels::Half(format, panels),
        })
    }

    /// The 16-bit format of the panels, if not f32.
    pub fn half_format(&self) -> Option<HalfFormat> {
        match self.panels {
            Panels::F32(_) => None,
            Panels::Half(format, _) => Some(format),
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Rows `indices` of W, row-major (`indices.len()` × cols): where the panels are the only
    /// copy of W, this is how its rows are read (an embedding tied to the LM head, the head's
    /// exact logits).
    pub fn gather_rows(&self, indices: &[u32]) -> Vec<f32> {
        let mut out = Vec::with_capacity(indices.len() * self.cols);
        for &r in indices {
            let r = r as usize;
            assert!(r < self.rows, "row {r} of a {}-row matrix", self.rows);
            let (p, c) = (r / NR, r % NR);
            match &self.panels {
                Panels::F32(panels) => {
                    let panel = &panels[p * self.cols * 2..][..self.cols * 2];
                    out.extend((0..self.cols).map(|k| panel[k * 2 + c / 16].0[c % 16]));
                }
                Panels::Half(format, panels) => {
                    let panel = &panels[p * self.cols..][..self.cols];
                    out.extend((0..self.cols).map(|k| match format {
                        HalfFormat::Bf16 => Bf16(panel[k].0[c]).to_f32(),
                        HalfFormat::F16 => F16(panel[k].0[c]).to_f32(),
                    }));
                }
            }
        }
        out
    }

    /// W itself, row-major, in f32: the inverse of [`PackedMatrix::pack`] (and, widened, of
    /// [`PackedMatrix::pack_half`]).
    pub fn unpack(&self) -> Vec<f32> {
        let all: Vec<u32> = (0..self.rows as u32).collect();
        self.gather_rows(&all)
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
    unsafe fn panels_avx512<E: Element>(
        &self,
        all: *const E,
        x: &[f32],
        m: usize,
        out: Out,
        panels: std::ops::Range<usize>,
    ) {
        let k = self.cols;
        let chunk = (CHUNK_BYTES / (k * NR * size_of::<E>())).max(1);
        for chunk_start in panels.clone().step_by(chunk) {
            let chunk_end = (chunk_start + chunk).min(panels.end);
            for first in (0..m).step_by(MR) {
                let x = unsafe { x.as_ptr().add(first * k) };
                for p in chunk_start..chunk_end {
                    let w = unsafe { all.add(p * k * NR) };
                    let valid = NR.min(self.rows - p * NR);
                    let out = unsafe { out.0.add(first * self.rows + p * NR) };
                    macro_rules! by_rows {
                        ($($m:literal),*) => {
                            match MR.min(m - first) {
                                $($m => unsafe { self.tile::<E, $m>(x, w, out, valid) },)*
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
    unsafe fn tile<E: Element, const M: usize>(
        &self,
        x: *const f32,
        w: *const E,
        out: *mut f32,
        valid: usize,
    ) {
        let k = self.cols;
        let mut acc = [[_mm512_setzero_ps(); 2]; M];
        for l in 0..k {
            let w0 = unsafe { E::load16(w.add(l * NR)) };
            let w1 = unsafe { E::load16(w.add(l * NR + 16)) };
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

impl PackedMatrix {
    /// [`PackedMatrix::panels_avx512`] with AVX2: each half panel of 16 weight rows in turn.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn panels_avx2<E: Element>(
        &self,
        all: *const E,
        x: &[f32],
        m: usize,
        out: Out,
        panels: std::ops::Range<usize>,
    ) {
        let k = self.cols;
        let chunk = (CHUNK_BYTES / (k * NR * size_of::<E>())).max(1);
        for chunk_start in panels.clone().step_by(chunk) {
            let chunk_end = (chunk_start + chunk).min(panels.end);
            for first in (0..m).step_by(MR_AVX2) {
                let x = unsafe { x.as_ptr().add(first * k) };
                for p in chunk_start..chunk_end {
                    let panel = unsafe { all.add(p * k * NR) };
                    let out = unsafe { out.0.add(first * self.rows + p * NR) };
                    let valid = NR.min(self.rows - p * NR);
                    // A row or two (batch-1 decoding) take the whole panel in one pass:
                    // reading it contiguously once beats two strided passes.
                    match m - first {
                        1 => unsafe { self.tile_avx2_whole::<E, 1>(x, panel, out, valid) },
                        2 => unsafe { self.tile_avx2_whole::<E, 2>(x, panel, out, valid) },
                        rows => unsafe {
                            self.halves_avx2(x, rows.min(MR_AVX2), panel, out, valid)
                        },
                    }
                }
            }
        }
    }

    /// `rows` (≤ [`MR_AVX2`]) rows of x times each half of a panel in turn.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn halves_avx2<E: Element>(
        &self,
        x: *const f32,
        rows: usize,
        panel: *const E,
        out: *mut f32,
        valid: usize,
    ) {
        for half in 0..2 {
            let valid = valid.saturating_sub(half * 16).min(16);
            if valid == 0 {
                break;
            }
            let (w, out) = unsafe { (panel.add(half * 16), out.add(half * 16)) };
            macro_rules! by_rows {
                ($($m:literal),*) => {
                    match rows {
                        $($m => unsafe { self.tile_avx2::<E, $m>(x, w, out, valid) },)*
                        rows => unreachable!("{rows} rows exceed {MR_AVX2}"),
                    }
                };
            }
            by_rows!(1, 2, 3, 4, 5, 6)
        }
    }

    /// `M` rows of x times half a panel (`w`: 16 weight rows, read [`NR`] floats apart along
    /// k) into `out`, writing the `valid` columns that are real weight rows. Not the fused
    /// attention's AVX2 tile, which reads b with masked loads: shared, it made this kernel
    /// 15-50% slower at 512 rows (2026-12-07; the AVX-512 tiles measured alike either way).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn tile_avx2<E: Element, const M: usize>(
        &self,
        x: *const f32,
        w: *const E,
        out: *mut f32,
        valid: usize,
    ) {
        let k = self.cols;
        let mut acc = [[_mm256_setzero_ps(); 2]; M];
        for l in 0..k {
            let w0 = unsafe { E::load8(w.add(l * NR)) };
            let w1 = unsafe { E::load8(w.add(l * NR + 8)) };
            for (r, row) in acc.iter_mut().enumerate() {
                let xb = _mm256_set1_ps(unsafe { *x.add(r * k + l) });
                row[0] = _mm256_fmadd_ps(xb, w0, row[0]);
                row[1] = _mm256_fmadd_ps(xb, w1, row[1]);
            }
        }
        let masks = [
            first_lanes(valid.min(8)),
            first_lanes(valid.saturating_sub(8)),
        ];
        for (r, row) in acc.iter().enumerate() {
            let out = unsafe { out.add(r * self.rows) };
            unsafe {
                _mm256_maskstore_ps(out, masks[0], row[0]);
                _mm256_maskstore_ps(out.add(8), masks[1], row[1]);
            }
        }
    }
    /// `M` (≤ 2) rows of x times a whole panel `w` into `out`, writing the `valid` columns
    /// that are real weight rows: 4M accumulators and four weight vectors.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn tile_avx2_whole<E: Element, const M: usize>(
        &self,
        x: *const f32,
        w: *const E,
        out: *mut f32,
        valid: usize,
    ) {
        let k = self.cols;
        let mut acc = [[_mm256_setzero_ps(); 4]; M];
        for l in 0..k {
            let w = unsafe { w.add(l * NR) };
            let ws: [__m256; 4] = std::array::from_fn(|q| unsafe { E::load8(w.add(8 * q)) });
            for (r, row) in acc.iter_mut().enumerate() {
                let xb = _mm256_set1_ps(unsafe { *x.add(r * k + l) });
                for (partial, w) in row.iter_mut().zip(ws) {
                    *partial = _mm256_fmadd_ps(xb, w, *partial);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            let out = unsafe { out.add(r * self.rows) };
            for (q, partial) in row.iter().enumerate() {
                let mask = first_lanes(valid.saturating_sub(8 * q).min(8));
                unsafe { _mm256_maskstore_ps(out.add(8 * q), mask, *partial) };
            }
        }
    }
}

/// A mask of the first `n` (≤ 8) of 8 lanes, for AVX2's masked loads and stores.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(crate) fn first_lanes(n: usize) -> __m256i {
    _mm256_cmpgt_epi32(
        _mm256_set1_epi32(n as i32),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    )
}

impl PackedMatrix {
    /// [`WeightKernel::fill`] from the panels at `all`, of element type `E`, by this matrix's
    /// kernel.
    #[cfg(target_arch = "x86_64")]
    unsafe fn fill_from<E: Element>(
        &self,
        all: *const E,
        x: &[f32],
        m: usize,
        out: Out,
        panels: std::ops::Range<usize>,
    ) {
        match self.simd {
            Simd::Avx512 => unsafe { self.panels_avx512(all, x, m, out, panels) },
            Simd::Avx2 => unsafe { self.panels_avx2(all, x, m, out, panels) },
            Simd::Portable => unreachable!("packed matrices have a kernel"),
        }
    }
}

/// Panels of [`NR`] rows of a row-major `rows × cols` matrix, `at(panel, k, c)` the place of
/// `W[32p + c][k]` in panel p; `None` where no kernel runs at `simd` or there is nothing to pack.
fn packed_panels<E: Copy + Send + Sync, L: Clone + Send + Sync>(
    simd: Simd,
    data: &[E],
    rows: usize,
    cols: usize,
    zero: L,
    at: impl Fn(&mut [L], usize, usize) -> &mut E + Sync,
) -> Option<Vec<L>> {
    assert_eq!(data.len(), rows * cols, "data is not rows × cols");
    if simd == Simd::Portable || rows == 0 || cols == 0 {
        return None;
    }
    let per_panel = cols * NR * size_of::<E>() / size_of::<L>();
    let mut panels = vec![zero; rows.div_ceil(NR) * per_panel];
    let fill = |(p, panel): (usize, &mut [L])| {
        let first = p * NR;
        for c in 0..NR.min(rows - first) {
            let row = &data[(first + c) * cols..][..cols];
            for (k, &v) in row.iter().enumerate() {
                *at(panel, k, c) = v;
            }
        }
    };
    panels.par_chunks_mut(per_panel).enumerate().for_each(fill);
    Some(panels)
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
        // SAFETY: as the trait asks; `pack_for` made this matrix for a level the CPU runs.
        #[cfg(target_arch = "x86_64")]
        match &self.panels {
            Panels::F32(all) => unsafe {
                self.fill_from(all.as_ptr().cast::<f32>(), x, m, out, panels)
            },
            Panels::Half(HalfFormat::Bf16, all) => unsafe {
                self.fill_from(all.as_ptr().cast::<Bf16>(), x, m, out, panels)
            },
            Panels::Half(HalfFormat::F16, all) => unsafe {
                self.fill_from(all.as_ptr().cast::<F16>(), x, m, out, panels)
            },
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (x, m, out, panels);
            unreachable!("packed matrices exist only where AVX2 or AVX-512F runs")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `w` packed for each kernel this CPU runs, in f32 and in each 16-bit format that holds
    /// every value exactly.
    fn packed_each(w: &[f32], rows: usize, cols: usize) -> Vec<PackedMatrix> {
        let bf16: Option<Vec<u16>> = w
            .iter()
            .map(|v| (v.to_bits() & 0xffff == 0).then_some((v.to_bits() >> 16) as u16))
            .collect();
        let f16: Option<Vec<u16>> = w
            .iter()
            .map(|&v| {
                let h = half::f16::from_f32(v);
                (h.to_f32() == v).then_some(h.to_bits())
            })
            .collect();
        let halves = [(HalfFormat::Bf16, bf16), (HalfFormat::F16, f16)];
        let packed: Vec<_> = Simd::available()
            .flat_map(|simd| {
                let halves = halves.iter().filter_map(move |(format, bits)| {
                    let bits = bits.as_ref()?;
                    PackedMatrix::pack_half_for(simd, *format, bits, rows, cols)
                });
                PackedMatrix::pack_for(simd, w, rows, cols)
                    .into_iter()
                    .chain(halves)
            })
            .collect();
        if packed.is_empty() {
            eprintln!("neither AVX2 nor AVX-512 here: nothing to check");
        }
        packed
    }

    #[test]
    fn rows_read_back_from_the_panels_are_the_packed_rows() {
        // A partial last panel in each half (rows 9 and 25 past the second).
        for rows in [2 * NR + 9, 2 * NR + 25] {
            let cols = 37;
            // Whole numbers below 256: bf16 holds them exactly.
            let w: Vec<f32> = (0..rows * cols).map(|i| (i % 251) as f32).collect();
            let packed = packed_each(&w, rows, cols);
            let formats: Vec<_> = packed.iter().map(PackedMatrix::half_format).collect();
            for format in [HalfFormat::Bf16, HalfFormat::F16] {
                assert!(formats.contains(&Some(format)) || packed.is_empty());
            }
            for packed in packed {
                assert_eq!(packed.unpack(), w);
                let picked = packed.gather_rows(&[rows as u32 - 1, 0, 17]);
                let want: Vec<f32> = [rows - 1, 0, 17]
                    .iter()
                    .flat_map(|&r| w[r * cols..][..cols].to_vec())
                    .collect();
                assert_eq!(picked, want);
            }
        }
    }

    #[test]
    fn products_match_a_naive_loop_for_every_tile_edge_and_split() {
        // 2 full panels and a partial one (9 rows: half of it empty; 25: the second half
        // partial), k not a multiple of anything.
        for rows in [2 * NR + 9, 2 * NR + 25] {
            let cols = 37;
            // Values bf16 and f16 hold exactly (eight significant bits, small exponents), so
            // that every format's panels multiply the same matrix.
            let w: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 300.0)
                .map(|v| f32::from_bits(v.to_bits() & 0xffff_0000))
                .collect();
            for packed in packed_each(&w, rows, cols) {
                for m in [1, 3, 6, 7, 8, 11, 13, 17] {
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
                                "{:?} ({:?}), m {m}, element {i}: {got} vs {want}",
                                packed.simd,
                                packed.half_format()
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn products_taken_together_or_into_a_buffer_equal_products_taken_alone() {
        let pack = |rows: usize, seed: f32| {
            let w: Vec<f32> = (0..rows * 64).map(|i| (i as f32 * seed).sin()).collect();
            packed_each(&w, rows, 64)
        };
        let (a, b, c) = (pack(3 * NR, 0.37), pack(NR + 5, 0.21), pack(7, 0.5));
        let x: Vec<f32> = (0..40 * 64).map(|i| (i as f32 * 0.11).cos()).collect();
        for ((a, b), c) in a.iter().zip(&b).zip(&c) {
            let together = PackedMatrix::matmul_t_each([a, b, c], &x, 40, Threads::All);
            for (out, w) in together.iter().zip([a, b, c]) {
                assert_eq!(*out, w.matmul_t(&x, 40, Threads::One));
                let mut into = vec![f32::NAN; out.len()];
                w.matmul_t_into(&x, 40, &mut into, Threads::All);
                assert_eq!(*out, into);
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_whatever_else_is_in_the_batch_or_the_kernel() {
        let (rows, cols) = (3 * NR, 300);
        let w: Vec<f32> = (0..rows * cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let x: Vec<f32> = (0..13 * cols).map(|i| (i as f32 * 0.11).cos()).collect();
        let each = packed_each(&w, rows, cols);
        let Some(first) = each.first() else {
            return;
        };
        let all = first.matmul_t(&x, 13, Threads::All);
        for packed in &each {
            assert_eq!(
                packed.matmul_t(&x, 13, Threads::All),
                all,
                "{:?}",
                packed.simd
            );
            for r in [0, 7, 12] {
                let one = packed.matmul_t(&x[r * cols..][..cols], 1, Threads::One);
                assert_eq!(one, all[r * rows..][..rows]);
            }
        }
    }
}
