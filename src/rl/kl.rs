//! The KL penalty of generated rollouts, per sampled token, in the direction the paper states:
//! KL(policy ‖ base) (the reference code computes the reverse).
//!
//! The estimate at a token y drawn from the policy is Schulman's k3: with r = log base(y) −
//! log policy(y), k3 = eᴿ − r − 1. It is never negative and its expectation under the policy is
//! the token's KL, so a completion's Σ k3 estimates the sequence KL without bias. TRL's GRPO adds
//! β·k3 to the loss the same way; here the engine takes token weights on ∇log π, so the term
//! enters as its derivative with respect to log π: ∂k3/∂log π = 1 − eᴿ.

/// k3 at one token from its log-probabilities under the policy and the base model.
pub fn k3(policy: f64, base: f64) -> f64 {
    let r = base - policy;
    r.exp() - r - 1.0
}

/// The weight a KL coefficient `beta` puts on ∇log π(token): −β ∂k3/∂log π.
pub fn token_weight(policy: f64, base: f64, beta: f64) -> f64 {
    -beta * (1.0 - (base - policy).exp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k3_by_hand() {
        assert_eq!(k3(-1.0, -1.0), 0.0);
        // r = ln 2: 2 − ln 2 − 1.
        let (p, b) = (-2.0, -2.0 + 2f64.ln());
        assert!((k3(p, b) - (1.0 - 2f64.ln())).abs() < 1e-12);
        assert!(k3(-0.1, -3.0) > 0.0 && k3(-3.0, -0.1) > 0.0);
    }

    /// The weight is −β times the derivative of k3 in the policy's log-probability.
    #[test]
    fn weight_is_the_derivative_of_k3() {
        for (p, b) in [(-1.0, -0.3), (-0.2, -2.5), (-4.0, -4.0)] {
            let h = 1e-6;
            let derivative = (k3(p + h, b) - k3(p - h, b)) / (2.0 * h);
            assert!((token_weight(p, b, 0.3) + 0.3 * derivative).abs() < 1e-6);
        }
        // Where the policy is likelier than the base, the penalty pushes log π down.
        assert!(token_weight(-0.1, -2.0, 0.1) < 0.0);
    }

    /// Over a whole distribution, E_policy[k3] is exactly KL(policy ‖ base).
    #[test]
    fn k3_is_unbiased_for_the_kl() {
        let policy = [0.7f64, 0.2, 0.1];
        let base = [0.3f64, 0.3, 0.4];
        let expected: f64 = (0..3)
            .map(|i| policy[i] * k3(policy[i].ln(), base[i].ln()))
            .sum();
        let kl: f64 = (0..3).map(|i| policy[i] * (policy[i] / base[i]).ln()).sum();
        assert!((expected - kl).abs() < 1e-12);
    }
}
