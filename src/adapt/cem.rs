//! The cross-entropy method over mixing weights α: sample a population from a diagonal Gaussian,
//! clamp to the bounds, score every candidate, refit mean and standard deviation to the elites,
//! repeat. Fitness is compared as (accuracy, tie-break), so among equally accurate candidates
//! the one whose right answers are likelier wins.
//!
//! Each generation's randomness comes from the seed and the generation's index alone, so a
//! search resumed from its saved [`CemState`] draws what the uninterrupted search would have.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use crate::adapt::spec::CemSpec;

/// A candidate's score: accuracy first, then the tie-break (higher is better for both).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fitness {
    pub accuracy: f64,
    pub tie_break: f64,
}

impl Fitness {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.accuracy
            .total_cmp(&other.accuracy)
            .then(self.tie_break.total_cmp(&other.tie_break))
    }
}

/// The search between generations: what a checkpoint holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CemState {
    /// Generations done.
    pub generation: u32,
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
    /// The best candidate seen so far and its fitness.
    pub best: Option<(Vec<f64>, Fitness)>,
}

/// What one generation did (a metrics line).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GenerationRecord {
    pub generation: u32,
    /// This generation's best candidate and fitness.
    pub alpha: Vec<f64>,
    pub fitness: Fitness,
    pub mean_accuracy: f64,
    /// The distribution the next generation is drawn from.
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

/// A search over `dim` weights starting at `mean` 1/K (K experts) and the spec's initial std.
pub fn initial_state(spec: &CemSpec, dim: usize, experts: usize) -> CemState {
    CemState {
        generation: 0,
        mean: vec![1.0 / experts.max(1) as f64; dim],
        std: vec![spec.init_std; dim],
        best: None,
    }
}

/// This generation's candidates, clamped to the bounds.
pub fn population(spec: &CemSpec, state: &CemState, seed: u64) -> Vec<Vec<f64>> {
    let mut rng =
        ChaCha8Rng::seed_from_u64(seed ^ u64::from(state.generation).wrapping_mul(0x9E37_79B9));
    let unit = Normal::new(0.0, 1.0).expect("valid normal");
    (0..spec.population)
        .map(|_| {
            state
                .mean
                .iter()
                .zip(&state.std)
                .map(|(m, s)| (m + s * unit.sample(&mut rng)).clamp(spec.alpha_min, spec.alpha_max))
                .collect()
        })
        .collect()
}

/// Refits the distribution to the elites of `candidates` (scored by `fitness`) and moves to the
/// next generation.
pub fn advance(
    spec: &CemSpec,
    state: &mut CemState,
    candidates: Vec<Vec<f64>>,
    fitness: &[Fitness],
) -> GenerationRecord {
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    // Best first; among equals the earlier candidate.
    order.sort_by(|&a, &b| fitness[b].cmp(&fitness[a]).then(a.cmp(&b)));
    let elites = &order[..spec.elites().clamp(1, order.len())];
    let n = elites.len() as f64;
    for (d, (mean, std)) in state.mean.iter_mut().zip(&mut state.std).enumerate() {
        let m = elites.iter().map(|&i| candidates[i][d]).sum::<f64>() / n;
        let var = elites
            .iter()
            .map(|&i| (candidates[i][d] - m).powi(2))
            .sum::<f64>()
            / n;
        *mean = m;
        *std = var.sqrt();
    }
    let top = order[0];
    if state
        .best
        .as_ref()
        .is_none_or(|(_, f)| fitness[top].cmp(f).is_gt())
    {
        state.best = Some((candidates[top].clone(), fitness[top]));
    }
    state.generation += 1;
    GenerationRecord {
        generation: state.generation,
        alpha: candidates[top].clone(),
        fitness: fitness[top],
        mean_accuracy: fitness.iter().map(|f| f.accuracy).sum::<f64>() / fitness.len() as f64,
        mean: state.mean.clone(),
        std: state.std.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A planted optimum: accuracy falls with the distance to it, so CEM must find it.
    #[test]
    fn cem_finds_a_planted_optimum() {
        let spec = CemSpec {
            population: 32,
            generations: 30,
            ..CemSpec::default()
        };
        let target = [0.9, 0.1, 0.35];
        let fitness = |a: &[f64]| Fitness {
            accuracy: -a
                .iter()
                .zip(target)
                .map(|(x, t)| (x - t).powi(2))
                .sum::<f64>(),
            tie_break: 0.0,
        };
        let mut state = initial_state(&spec, 3, 3);
        while state.generation < spec.generations {
            let candidates = population(&spec, &state, 7);
            assert!(candidates.iter().flatten().all(|a| (0.0..=1.0).contains(a)));
            let scores: Vec<Fitness> = candidates.iter().map(|c| fitness(c)).collect();
            advance(&spec, &mut state, candidates, &scores);
        }
        let (best, _) = state.best.unwrap();
        for (b, t) in best.iter().zip(target) {
            assert!((b - t).abs() < 0.05, "{best:?} vs {target:?}");
        }
    }

    /// Equal accuracy: the tie-break decides which candidate leads.
    #[test]
    fn the_tie_break_orders_equally_accurate_candidates() {
        let spec = CemSpec {
            population: 2,
            elite_ratio: 0.5,
            ..CemSpec::default()
        };
        let mut state = initial_state(&spec, 1, 2);
        let f = |t| Fitness {
            accuracy: 0.5,
            tie_break: t,
        };
        let record = advance(
            &spec,
            &mut state,
            vec![vec![0.2], vec![0.8]],
            &[f(-2.0), f(-1.0)],
        );
        assert_eq!(record.alpha, vec![0.8]);
        assert_eq!(state.mean, vec![0.8]);
    }

    /// A resumed search draws the same population as one that never stopped.
    #[test]
    fn populations_depend_on_the_seed_and_generation_only() {
        let spec = CemSpec::default();
        let state = initial_state(&spec, 4, 2);
        let saved: CemState =
            serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
        assert_eq!(population(&spec, &state, 3), population(&spec, &saved, 3));
        assert_ne!(population(&spec, &state, 3), population(&spec, &state, 4));
    }
}
