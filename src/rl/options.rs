//! The option policy of multiple-choice rollouts: the model's probability of each option after
//! the prompt, renormalised over the record's K options, p = softmax(L) with L_k the option's
//! summed token log-likelihood (constrained decoding of whole answers).
//!
//! The objective per prompt is O = E_p[r] − β·KL(p ‖ q), q the base model's option distribution.
//! Its gradient is exact: ∂O/∂L_k = p_k (r_k − E_p[r]) − β p_k (log(p_k/q_k) − KL), and since
//! ∂L_k/∂θ is the sum of the option's token log-prob gradients, weighting option k's tokens by
//! ∂O/∂L_k turns the trainer's weighted log-likelihood into O's gradient — REINFORCE in exact
//! expectation, without sampling variance.

/// One prompt's option distribution and what the step reports of it.
#[derive(Clone, Debug, PartialEq)]
pub struct OptionPolicy {
    /// p_k.
    pub probs: Vec<f64>,
    /// E_p[r].
    pub expected_reward: f64,
    /// KL(p ‖ q) (0 without a base distribution).
    pub kl: f64,
    /// −Σ p log p.
    pub entropy: f64,
}

/// The softmax of `logliks`.
pub fn softmax(logliks: &[f64]) -> Vec<f64> {
    let top = logliks.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = logliks.iter().map(|l| (l - top).exp()).collect();
    let total: f64 = exps.iter().sum();
    exps.iter().map(|e| e / total).collect()
}

impl OptionPolicy {
    /// The policy of options with log-likelihoods `logliks` (`base`: under the base model).
    pub fn new(logliks: &[f64], base: Option<&[f64]>, rewards: &[f64]) -> Self {
        let probs = softmax(logliks);
        let expected_reward = probs.iter().zip(rewards).map(|(p, r)| p * r).sum();
        let entropy = -probs
            .iter()
            .filter(|&&p| p > 0.0)
            .map(|p| p * p.ln())
            .sum::<f64>();
        let kl = base.map_or(0.0, |base| {
            let q = softmax(base);
            probs
                .iter()
                .zip(&q)
                .filter(|(p, _)| **p > 0.0)
                .map(|(p, q)| p * (p.ln() - q.ln()))
                .sum()
        });
        Self {
            probs,
            expected_reward,
            kl,
            entropy,
        }
    }

    /// ∂O/∂L_k for each option: the weight of its tokens (`base` as given to [`Self::new`]).
    pub fn expectation_weights(&self, base: Option<&[f64]>, rewards: &[f64], kl: f64) -> Vec<f64> {
        let divergence = self.kl_weights(base, kl);
        self.probs
            .iter()
            .zip(rewards)
            .zip(divergence)
            .map(|((p, r), d)| p * (r - self.expected_reward) + d)
            .collect()
    }

    /// The KL term's part of ∂O/∂L_k alone: −β p_k (log(p_k/q_k) − KL) (0 without a base).
    pub fn kl_weights(&self, base: Option<&[f64]>, kl: f64) -> Vec<f64> {
        let q = base.filter(|_| kl > 0.0).map(softmax);
        self.probs
            .iter()
            .enumerate()
            .map(|(k, &p)| match &q {
                Some(q) if p > 0.0 => -kl * p * (p.ln() - q[k].ln() - self.kl),
                _ => 0.0,
            })
            .collect()
    }

    /// An option drawn from p with `uniform` in [0, 1).
    pub fn draw(&self, uniform: f64) -> usize {
        let mut left = uniform;
        for (k, p) in self.probs.iter().enumerate() {
            left -= p;
            if left < 0.0 {
                return k;
            }
        }
        self.probs.len() - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// O(L) for finite differences.
    fn objective(l: &[f64], base: &[f64], r: &[f64], kl: f64) -> f64 {
        let policy = OptionPolicy::new(l, Some(base), r);
        policy.expected_reward - kl * policy.kl
    }

    #[test]
    fn weights_are_the_objectives_gradient() {
        let (l, base, r) = (
            [-3.0, -1.5, -2.2, -4.0],
            [-2.0, -2.5, -1.0, -3.0],
            [1.0, -1.0, -1.0, 0.5],
        );
        for kl in [0.0, 0.3] {
            let policy = OptionPolicy::new(&l, Some(&base), &r);
            let weights = policy.expectation_weights(Some(&base), &r, kl);
            for k in 0..l.len() {
                let eps = 1e-6;
                let (mut up, mut down) = (l, l);
                up[k] += eps;
                down[k] -= eps;
                let numeric =
                    (objective(&up, &base, &r, kl) - objective(&down, &base, &r, kl)) / (2.0 * eps);
                assert!(
                    (numeric - weights[k]).abs() < 1e-7,
                    "kl {kl}, option {k}: {numeric} vs {}",
                    weights[k]
                );
            }
        }
    }

    #[test]
    fn hand_computed_policy_and_draws() {
        // Two options with equal likelihood: p = ½ each, E[r] = 0, weights ±½.
        let p = OptionPolicy::new(&[-1.0, -1.0], Some(&[-1.0, -1.0]), &[1.0, -1.0]);
        assert_eq!(p.probs, vec![0.5, 0.5]);
        assert_eq!(p.expected_reward, 0.0);
        assert_eq!(p.kl, 0.0);
        assert!((p.entropy - 2f64.ln()).abs() < 1e-12);
        assert_eq!(
            p.expectation_weights(None, &[1.0, -1.0], 0.0),
            vec![0.5, -0.5]
        );
        assert_eq!((p.draw(0.2), p.draw(0.7), p.draw(0.999_999)), (0, 1, 1));
    }
}
