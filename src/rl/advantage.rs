//! From rewards to per-token loss weights: group baselines, advantage scaling, skipped groups and
//! loss normalisation (the choices `train:` exposes as `baseline`, `scale`, `skip_uniform_groups`
//! and `loss_norm`).
//!
//! A step's samples come in groups, one group per prompt. The trainer minimises
//! `−Σ_b Σ_t w[b][t] log π(token)`, so a sample's completion tokens get weight `A_b / N` with
//! `A_b` its advantage and `N` the normaliser.

use crate::rl::spec::{AdvantageScale, Baseline, LossNorm};

/// How far apart rewards must be for a group to count as having signal.
const UNIFORM: f64 = 1e-9;

/// Each sample's advantage, group by group (`rewards[g][i]`: sample `i` of prompt `g`).
/// Groups of one sample keep their raw reward under `mean` and `rloo` (there is nothing to
/// compare with).
pub fn advantages(
    rewards: &[Vec<f64>],
    baseline: Baseline,
    scale: AdvantageScale,
) -> Vec<Vec<f64>> {
    let batch_std = std_dev(&rewards.iter().flatten().copied().collect::<Vec<_>>());
    rewards
        .iter()
        .map(|group| {
            let n = group.len();
            let sum: f64 = group.iter().sum();
            let centred: Vec<f64> = group
                .iter()
                .map(|&r| match baseline {
                    Baseline::None => r,
                    _ if n < 2 => r,
                    Baseline::Mean => r - sum / n as f64,
                    Baseline::Rloo => r - (sum - r) / (n - 1) as f64,
                })
                .collect();
            let divisor = match scale {
                AdvantageScale::None => 1.0,
                AdvantageScale::GroupStd => std_dev(group),
                AdvantageScale::BatchStd => batch_std,
            };
            // A zero spread means equal rewards: their centred advantages are 0 already.
            let divisor = if divisor > UNIFORM { divisor } else { 1.0 };
            centred.iter().map(|a| a / divisor).collect()
        })
        .collect()
}

/// Whether every sample of the group got the same reward.
pub fn is_uniform(group: &[f64]) -> bool {
    group.iter().all(|&r| (r - group[0]).abs() <= UNIFORM)
}

/// Population standard deviation (0 for fewer than two values).
pub fn std_dev(values: &[f64]) -> f64 {
    if values.len() < 2 {
        return 0.0;
    }
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / values.len() as f64).sqrt()
}

/// The divisor of the summed token losses for `completion_lengths` (the trained sequences).
pub fn normaliser(norm: LossNorm, completion_lengths: &[usize], max_new_tokens: usize) -> f64 {
    let sequences = completion_lengths.len().max(1) as f64;
    match norm {
        LossNorm::Sequence => sequences,
        LossNorm::Token => completion_lengths.iter().sum::<usize>().max(1) as f64,
        LossNorm::Constant => sequences * max_new_tokens.max(1) as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[Vec<f64>], b: &[Vec<f64>]) -> bool {
        a.len() == b.len()
            && a.iter().zip(b).all(|(x, y)| {
                x.len() == y.len() && x.iter().zip(y).all(|(p, q)| (p - q).abs() < 1e-12)
            })
    }

    #[test]
    fn baselines_and_scales_match_hand_computed_values() {
        let rewards = vec![vec![1.0, -1.0, -1.0, -1.0], vec![1.0, 1.0], vec![0.5]];
        let cases = [
            (Baseline::None, AdvantageScale::None, rewards.clone()),
            (
                Baseline::Mean,
                AdvantageScale::None,
                vec![vec![1.5, -0.5, -0.5, -0.5], vec![0.0, 0.0], vec![0.5]],
            ),
            (
                // 1 − (−3/3) = 2; −1 − (−1/3) = −2/3.
                Baseline::Rloo,
                AdvantageScale::None,
                vec![
                    vec![2.0, -2.0 / 3.0, -2.0 / 3.0, -2.0 / 3.0],
                    vec![0.0, 0.0],
                    vec![0.5],
                ],
            ),
            (
                // Group 1's std: sqrt(((1.5)² + 3·(0.5)²)/4) = sqrt(0.75).
                Baseline::Mean,
                AdvantageScale::GroupStd,
                vec![
                    vec![
                        1.5 / 0.75f64.sqrt(),
                        -0.5 / 0.75f64.sqrt(),
                        -0.5 / 0.75f64.sqrt(),
                        -0.5 / 0.75f64.sqrt(),
                    ],
                    vec![0.0, 0.0],
                    vec![0.5],
                ],
            ),
        ];
        for (baseline, scale, expected) in cases {
            let got = advantages(&rewards, baseline, scale);
            assert!(close(&got, &expected), "{baseline:?} {scale:?}: {got:?}");
        }
        // Batch std of the 7 rewards [1,-1,-1,-1,1,1,0.5]: mean 1.5/7.
        let all = [1.0, -1.0, -1.0, -1.0, 1.0, 1.0, 0.5];
        let batch = std_dev(&all);
        let got = advantages(&rewards, Baseline::None, AdvantageScale::BatchStd);
        assert!((got[0][0] - 1.0 / batch).abs() < 1e-12 && (got[2][0] - 0.5 / batch).abs() < 1e-12);
        assert!(is_uniform(&rewards[1]) && !is_uniform(&rewards[0]) && is_uniform(&rewards[2]));
    }

    #[test]
    fn normalisers_follow_the_named_conventions() {
        let lengths = [3, 5, 0, 4];
        assert_eq!(normaliser(LossNorm::Sequence, &lengths, 16), 4.0);
        assert_eq!(normaliser(LossNorm::Token, &lengths, 16), 12.0);
        assert_eq!(normaliser(LossNorm::Constant, &lengths, 16), 64.0);
        assert_eq!(normaliser(LossNorm::Token, &[], 16), 1.0);
    }
}
