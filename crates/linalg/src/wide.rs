//! Plain loops compiled wide: the [`wide_fn!`](crate::wide_fn) macro, and an exponential they
//! can vectorise.

/// Defines a function whose body is compiled three times, for AVX-512F, for AVX2 with FMA and
/// for baseline x86-64, and runs as wide as [`simd`](crate::simd) allows: tsq is built for
/// baseline x86-64, where plain loops vectorise only 4 lanes wide (SSE2).
///
/// The body is an `#[inline(always)]` function called from `#[target_feature]` ones, which the
/// compiler must inline and so compile with their features. (A closure handed to one such
/// function, this macro's first form, was left out of line whenever the inliner judged it too
/// large: four of the training engine's and decoding's row kernels ran at SSE2.)
#[macro_export]
macro_rules! wide_fn {
    ($(#[$attr:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$attr])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                #[allow(clippy::too_many_arguments)]
                fn avx512($($arg: $ty),*) {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx2($($arg: $ty),*) {
                    body($($arg),*)
                }
                match $crate::simd() {
                    // SAFETY: `simd` reports only levels the CPU runs.
                    $crate::Simd::Avx512 => unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    $crate::Simd::Avx2 => unsafe { avx2($($arg),*) },
                    $crate::Simd::Portable => body($($arg),*),
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            body($($arg),*)
        }
    };
}

/// e^x in f32 to within ~2e-7 relative error (~2 ulp), without branches so that loops over it
/// vectorise: libm's `expf` is a scalar call, and exponentials were 40% of an SVF step's time
/// (LM-head softmax, attention softmax, SiLU). Inputs below −87.3 give ~1e-38, not 0.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5·2^23 rounds x·log2 e to the nearest integer n (|x·log2 e| < 2^22) and leaves
    // n in the low mantissa bits, so 2^n is built from integer bits without a float-to-int
    // conversion (which SSE2 cannot vectorise cheaply).
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.7);
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    // e^r on |r| ≤ ln2/2: Taylor to r^7 (truncation error < 3e-9).
    let p = 1.0 / 5040.0;
    let p = p * r + 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    p * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_the_standard_library_to_a_few_ulp() {
        let mut worst = 0f64;
        for i in -87_000..88_000 {
            let x = i as f32 * 1e-3 + 1.7e-4;
            let (ours, std) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max((ours - std).abs() / std);
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert!(exp(f32::NEG_INFINITY) < 1e-37 && exp(-1e4) >= 0.0);
    }
}
