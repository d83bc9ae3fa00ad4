//! Adam on the expert vectors, with its state in the open: a resumable trainer must checkpoint the
//! moments and the step count, which candle-nn's AdamW keeps private. No weight decay (the
//! paper's SVF has none); bias-corrected moments as in Kingma & Ba.

use serde::{Deserialize, Serialize};

/// Adam's hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

/// The optimiser's state: what a checkpoint holds besides the parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamState {
    pub config: AdamConfig,
    /// Steps taken so far.
    pub step: u64,
    /// First and second moments, one vector per parameter vector.
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

impl AdamState {
    /// A fresh state for parameter vectors of these lengths.
    pub fn new(config: AdamConfig, lengths: &[usize]) -> Self {
        Self {
            config,
            step: 0,
            m: lengths.iter().map(|&n| vec![0.0; n]).collect(),
            v: lengths.iter().map(|&n| vec![0.0; n]).collect(),
        }
    }

    /// One step at learning rate `lr`: updates `params` in place from `grads` (same shapes).
    pub fn update(&mut self, lr: f64, params: &mut [Vec<f32>], grads: &[Vec<f32>]) {
        self.step += 1;
        let AdamConfig { beta1, beta2, eps } = self.config;
        let t = self.step as i32;
        // Folding the bias corrections into the step size keeps the inner loop to f32 ops.
        let step_size = (lr * (1.0 - beta2.powi(t)).sqrt() / (1.0 - beta1.powi(t))) as f32;
        let eps_hat = (eps * (1.0 - beta2.powi(t)).sqrt()) as f32;
        let (b1, b2) = (beta1 as f32, beta2 as f32);
        for (((p, g), m), v) in params
            .iter_mut()
            .zip(grads)
            .zip(&mut self.m)
            .zip(&mut self.v)
        {
            for i in 0..p.len() {
                m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                p[i] -= step_size * m[i] / (v[i].sqrt() + eps_hat);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first steps by hand: with bias correction the first step moves each parameter by
    /// lr · sign(g) (up to eps), whatever the gradient's size.
    #[test]
    fn matches_hand_computed_steps() {
        let mut state = AdamState::new(AdamConfig::default(), &[2]);
        let mut params = vec![vec![1.0f32, -1.0]];
        state.update(0.1, &mut params, &[vec![0.5, -2.0]]);
        assert!(
            (params[0][0] - 0.9).abs() < 1e-6 && (params[0][1] + 0.9).abs() < 1e-6,
            "{params:?}"
        );
        // Second step, gradient 0.5 again on the first: m = 0.095, v = 0.0004997,
        // m̂ = 0.5, v̂ = 0.25 → step 0.1 · 0.5 / 0.5.
        state.update(0.1, &mut params, &[vec![0.5, 0.0]]);
        assert!((params[0][0] - 0.8).abs() < 1e-5, "{params:?}");
        assert_eq!(state.step, 2);
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut state = AdamState::new(AdamConfig::default(), &[3, 1]);
        let mut params = vec![vec![0.0f32; 3], vec![1.0]];
        state.update(1e-3, &mut params, &[vec![1.0, 2.0, 3.0], vec![-1.0]]);
        let back: AdamState =
            serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
        assert_eq!(back, state);
    }
}
