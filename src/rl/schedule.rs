//! The RL step schedule: which train prompts each step takes and its learning rate. Both are
//! functions of (seed, step) alone, so a resumed run makes the same batches as an
//! uninterrupted one.

use rand::SeedableRng;
use rand::seq::SliceRandom;

use super::spec::{Schedule, TrainSpec};

/// The train-split indices of each step: a seeded permutation per epoch, taken in order.
pub struct PromptOrder {
    len: usize,
    per_step: usize,
    seed: u64,
}

impl PromptOrder {
    pub fn new(len: usize, per_step: usize, seed: u64) -> Self {
        Self {
            len,
            per_step,
            seed,
        }
    }

    fn epoch(&self, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len).collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed ^ (epoch as u64 + 1));
        order.shuffle(&mut rng);
        order
    }

    pub fn step(&self, step: u32) -> Vec<usize> {
        let first = step as usize * self.per_step;
        // A step spans at most a few epochs: shuffle each once.
        let mut epoch: Option<(usize, Vec<usize>)> = None;
        (first..first + self.per_step)
            .map(|at| {
                let number = at / self.len;
                if epoch.as_ref().is_none_or(|(n, _)| *n != number) {
                    epoch = Some((number, self.epoch(number)));
                }
                epoch.as_ref().map_or(0, |(_, order)| order[at % self.len])
            })
            .collect()
    }
}

/// The learning rate of `step` (0-based): linear warm-up, then constant or cosine to 0.
pub fn learning_rate(spec: &TrainSpec, step: u32) -> f64 {
    let warmup = spec.warmup_steps;
    if step < warmup {
        return spec.lr * f64::from(step + 1) / f64::from(warmup);
    }
    match spec.schedule {
        Schedule::Constant => spec.lr,
        Schedule::Cosine => {
            let span = spec.steps.saturating_sub(warmup).max(1);
            let t = f64::from(step - warmup) / f64::from(span);
            spec.lr * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_are_drawn_without_replacement_within_an_epoch() {
        let order = PromptOrder::new(10, 4, 7);
        let first: Vec<usize> = (0..2)
            .flat_map(|s| order.step(s))
            .chain(order.step(2)[..2].to_vec())
            .collect();
        let mut sorted = first.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>(), "{first:?}");
        assert_eq!(order.step(3), PromptOrder::new(10, 4, 7).step(3));
        assert_ne!(order.epoch(0), order.epoch(1));
    }

    #[test]
    fn schedules_warm_up_and_decay() {
        let spec = TrainSpec {
            steps: 10,
            lr: 1.0,
            warmup_steps: 2,
            schedule: Schedule::Cosine,
            ..TrainSpec::default()
        };
        let lrs: Vec<f64> = (0..10).map(|s| learning_rate(&spec, s)).collect();
        assert_eq!((lrs[0], lrs[1], lrs[2]), (0.5, 1.0, 1.0));
        assert!(
            lrs[9] < 0.05 && lrs.windows(2).skip(2).all(|w| w[1] <= w[0]),
            "{lrs:?}"
        );
        let constant = TrainSpec {
            lr: 0.1,
            ..TrainSpec::default()
        };
        assert_eq!(learning_rate(&constant, 50), 0.1);
    }
}
