//! Evaluation: scoring a dataset split with the base model, experts and adaptations (routed per
//! item or mixed, `adapted.rs`), as lm-evaluation-harness does. Two modes: `generate` (answer,
//! then judge with the reward — the same judge training uses) and `loglik` (rank
//! multiple-choice options by log-likelihood: `acc` and length-normalised `acc_norm`).
//!
//! Outputs of an `eval.<name>` stage:
//! - `samples.parquet`: one row per item and model (`with`): prompt, completion or option scores,
//!   extracted answer, gold, verdict, reward, and for routed adaptations the label and expert,
//! - `results.json`: per model, each metric with its standard error and 95% interval, item
//!   counts, config, versions, input hashes, timings (laid out close to lm-eval's), and for
//!   adaptations what the first pass did (items per expert, routing accuracy, its cost, α),
//! - `results.md`: the same as a table, printed by `tsq run`.

mod error;
pub mod prompts;
pub mod results;
pub mod runner;
pub mod spec;

use serde::{Deserialize, Serialize};

pub use error::TaskError;

/// A proportion measured on `n` items, with its uncertainty.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Proportion {
    pub value: f64,
    /// Standard error of the mean, sqrt(p(1-p)/(n-1)) (the sample estimate lm-eval reports).
    pub stderr: f64,
    /// 95% Wilson score interval: stays inside [0, 1] and is honest for small n or p near 0/1,
    /// where the normal interval is not.
    pub ci95: (f64, f64),
    pub n: usize,
}

impl Proportion {
    pub fn of(successes: usize, n: usize) -> Self {
        if n == 0 {
            return Self {
                value: 0.0,
                stderr: 0.0,
                ci95: (0.0, 1.0),
                n,
            };
        }
        let p = successes as f64 / n as f64;
        let stderr = if n > 1 {
            (p * (1.0 - p) / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        Self {
            value: p,
            stderr,
            ci95: wilson(p, n as f64, 1.959_964),
            n,
        }
    }
}

/// Exact two-sided McNemar test of two settings evaluated on the same items: `only_a` items
/// only the first got right, `only_b` only the second. Under "no difference" each of those
/// n = only_a + only_b items is a fair coin; p = P(a split at least as uneven). 1 when n = 0.
pub fn paired_p_value(only_a: usize, only_b: usize) -> f64 {
    let n = only_a + only_b;
    let k = only_a.min(only_b);
    // Σ_{i ≤ k} C(n, i) / 2^n in logs (2^n underflows from n = 1075).
    let mut ln_choose = 0.0;
    let mut tail = 0.0;
    for i in 0..=k {
        if i > 0 {
            ln_choose += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        tail += (ln_choose - n as f64 * std::f64::consts::LN_2).exp();
    }
    (2.0 * tail).min(1.0)
}

fn wilson(p: f64, n: f64, z: f64) -> (f64, f64) {
    let z2 = z * z;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / (1.0 + z2 / n);
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proportions_have_sample_stderr_and_wilson_intervals() {
        let p = Proportion::of(30, 100);
        assert!((p.value - 0.3).abs() < 1e-12);
        // sqrt(0.3 * 0.7 / 99)
        assert!((p.stderr - 0.046_057_5).abs() < 1e-6, "{}", p.stderr);
        // Wilson 95% for 30/100: [0.2189, 0.3958]
        assert!(
            (p.ci95.0 - 0.2189).abs() < 1e-3 && (p.ci95.1 - 0.3958).abs() < 1e-3,
            "{:?}",
            p.ci95
        );
        let none = Proportion::of(0, 10);
        assert_eq!(none.ci95.0, 0.0);
        assert!(none.ci95.1 > 0.25 && none.ci95.1 < 0.35, "{:?}", none.ci95);
        assert_eq!(Proportion::of(0, 0).ci95, (0.0, 1.0));
    }

    #[test]
    fn paired_p_values_are_exact_mcnemar() {
        assert_eq!(paired_p_value(0, 0), 1.0);
        // 10 vs 2 discordant items: 2 * P(X <= 2), X ~ Bin(12, 1/2) = 2 * 79 / 4096.
        assert!((paired_p_value(10, 2) - 2.0 * 79.0 / 4096.0).abs() < 1e-12);
        assert_eq!(paired_p_value(2, 10), paired_p_value(10, 2));
        assert_eq!(paired_p_value(5, 5), 1.0);
        // Large n stays finite and tiny.
        let p = paired_p_value(700, 500);
        assert!(p > 0.0 && p < 1e-7, "{p}");
    }
}
