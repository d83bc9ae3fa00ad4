//! One step's training batch: rollouts with the current expert, their rewards, and the token
//! weights the SVF trainer takes ([`TokenBatch`]), with the statistics a step reports.
//!
//! Three ways to make it: free generation judged by the reward (`rollout: generate`), the
//! options of multiple-choice records (`rollout: options`, exact expectation or sampled), and
//! the supervised ablation (`objective: sft`, the rendered targets).

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::advantage::{advantages, is_uniform, normaliser, std_dev};
use super::kl;
use super::options::OptionPolicy;
use crate::data::stored::StoredRecord;
use crate::eval::TaskError;
use crate::eval::prompts::render;
use crate::eval::runner::Task;
use crate::model::Model;
use crate::model::generate::{FinishReason, GenerateOptions, Generation, generate};
use crate::model::score::{continuation_ids, filler, score_options_in};
use crate::model::transformer::Transformer;
use crate::reward::Reward;
use crate::rl::spec::{OptionPolicy as PolicyKind, TrainSpec};
use crate::svf::train::TokenBatch;

/// What a step's rollouts were like (TRL's names where it has them).
#[derive(Clone, Debug, Default, Serialize)]
pub struct RolloutStats {
    /// Mean and spread of the rewards (expected rewards, for exact option expectations).
    pub reward: f64,
    pub reward_std: f64,
    /// A composite reward's parts: each one's mean reward, by name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub rewards: BTreeMap<String, f64>,
    /// Fraction of prompts whose samples all got the same reward.
    pub frac_reward_zero_std: f64,
    /// Prompts left out of the update for that reason.
    pub skipped_groups: usize,
    /// Mean KL(policy ‖ base) per prompt: exact over the options, or the per-token estimates
    /// summed over each sampled completion.
    pub kl: f64,
    /// Mean entropy (nats): of the option distribution per prompt, or of the model's
    /// next-token distribution per generated token.
    pub entropy: f64,
    pub completion_length: f64,
    pub completion_length_min: usize,
    pub completion_length_max: usize,
    /// Fraction of completions cut at `max_new_tokens`.
    pub clipped_ratio: f64,
    /// Tokens generated or scored while making the batch.
    pub tokens: usize,
    /// Seconds spent judging completions (reported beside rollout and train time).
    #[serde(skip)]
    pub reward_s: f64,
}

/// A step's batch and its statistics.
pub struct StepBatch {
    pub batch: TokenBatch,
    pub stats: RolloutStats,
}

/// What every step's rollouts share.
pub struct Rollouts<'a> {
    pub spec: &'a TrainSpec,
    pub task: &'a Task<'a>,
    pub reward: &'a Reward,
    /// The base model without the expert (KL terms).
    pub base: &'a Model,
}

fn failed(doing: &str, item: &StoredRecord, e: impl std::fmt::Display) -> TaskError {
    TaskError::on_item(doing, &item.id, e)
}

/// A sequence to train on: prompt tokens (weight 0) then completion tokens, each with its weight.
pub(crate) fn weighted(
    prompt: &[u32],
    completion: &[u32],
    weights: impl IntoIterator<Item = f64>,
) -> (Vec<u32>, Vec<f32>) {
    let ids = [prompt, completion].concat();
    let weights = std::iter::repeat_n(0.0, prompt.len())
        .chain(weights.into_iter().map(|w| w as f32))
        .collect();
    (ids, weights)
}

/// Same weight on every completion token.
pub(crate) fn uniform(completion: &[u32], w: f64) -> impl Iterator<Item = f64> {
    std::iter::repeat_n(w, completion.len())
}

/// A step's judged completions.
struct Judged {
    /// Rewards by group (prompt), in sample order.
    rewards: Vec<Vec<f64>>,
    /// A composite reward's parts: mean reward by name.
    parts: BTreeMap<String, f64>,
    seconds: f64,
}

/// Each completion as trained: its tokens, and EOS when the model chose to stop.
pub(crate) fn as_trained(generations: &[Generation]) -> Vec<Vec<u32>> {
    generations
        .iter()
        .map(|g| {
            let mut ids = g.token_ids.clone();
            ids.extend(g.eos_token);
            ids
        })
        .collect()
}

/// The KL term of a step's sampled completions.
struct KlPenalty {
    /// Per completion, per token: the weight the penalty adds on ∇log π.
    weights: Vec<Vec<f64>>,
    /// Mean over completions of the summed per-token estimates (the sequence KL).
    kl: f64,
}

impl Rollouts<'_> {
    fn prompt_ids(&self, model: &Model, item: &StoredRecord) -> Result<Vec<u32>, TaskError> {
        let prompt = render(model, &item.prompt, &[], self.spec.chat())
            .map_err(|e| failed("rendering", item, e))?;
        model
            .tokenizer
            .encode(&prompt)
            .map_err(|e| failed("tokenizing", item, e))
    }

    /// Option rollouts with `policy` (the model with the current expert).
    pub fn options(
        &self,
        policy: &Model,
        items: &[&StoredRecord],
        seed: u64,
    ) -> Result<StepBatch, TaskError> {
        let mut inputs = Vec::with_capacity(items.len());
        let mut rewards = Vec::with_capacity(items.len());
        for item in items {
            let (texts, gold) = self
                .task
                .scored_options(&item.fields)
                .map_err(|e| failed("reading the options of", item, e))?;
            let ids = texts
                .iter()
                .map(|t| continuation_ids(policy, t))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| failed("tokenizing the options of", item, e))?;
            inputs.push((self.prompt_ids(policy, item)?, ids));
            let values = &self.task.values;
            rewards.push(
                (0..texts.len())
                    .map(|k| {
                        if k == gold {
                            values.correct
                        } else {
                            values.wrong
                        }
                    })
                    .collect::<Vec<f64>>(),
            );
        }
        let models = OptionModels {
            policy: &policy.transformer,
            base: (self.spec.kl > 0.0).then_some(&self.base.transformer),
            filler: filler(policy),
        };
        option_batch(self.spec, &models, &inputs, &rewards, seed)
    }

    /// Sampled completions with `policy`, judged by the reward, weighted by their advantages
    /// (and, with `kl`, each token by the KL penalty's derivative).
    pub fn generate(
        &self,
        policy: &Model,
        items: &[&StoredRecord],
        seed: u64,
    ) -> Result<StepBatch, TaskError> {
        let spec = self.spec;
        let per = spec.samples_per_prompt as usize;
        let group_prompts = items
            .iter()
            .map(|item| self.prompt_ids(policy, item))
            .collect::<Result<Vec<_>, _>>()?;
        let prompts: Vec<Vec<u32>> = group_prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(p.clone(), per))
            .collect();
        let opts = GenerateOptions {
            max_new_tokens: spec.max_new_tokens as usize,
            temperature: spec.temperature,
            top_p: spec.top_p,
            seed,
            stop: spec.stop.clone(),
            track_entropy: true,
            ..GenerateOptions::default()
        };
        let generations =
            generate(policy, &prompts, &opts).map_err(|e| TaskError::new("generating", e))?;
        let judged = self.judge(items, &generations)?;
        let completions = as_trained(&generations);
        let penalty = (spec.kl > 0.0)
            .then(|| self.kl_penalty(policy, &group_prompts, &completions))
            .transpose()?;
        let lengths: Vec<usize> = completions.iter().map(Vec::len).collect();
        let mut stats = RolloutStats {
            tokens: prompts.iter().map(Vec::len).sum::<usize>() + lengths.iter().sum::<usize>(),
            reward_s: judged.seconds,
            rewards: judged.parts,
            ..RolloutStats::default()
        };
        let kept = self.kept(&judged.rewards, penalty.is_some(), &mut stats);
        let kept_lengths: Vec<usize> = kept.iter().map(|&(i, _)| lengths[i]).collect();
        let n = normaliser(spec.loss_norm, &kept_lengths, spec.max_new_tokens as usize);
        let (ids, weights) = kept
            .iter()
            .filter(|&&(i, _)| !completions[i].is_empty())
            .map(|&(i, a)| {
                let w = (0..completions[i].len()).map(|t| {
                    let kl = penalty.as_ref().map_or(0.0, |p| p.weights[i][t]);
                    (a + kl) / n
                });
                weighted(&prompts[i], &completions[i], w)
            })
            .unzip();
        let truncated = generations
            .iter()
            .filter(|g| g.finish_reason == FinishReason::Length)
            .count();
        finish_stats(
            &mut stats,
            &judged.rewards,
            &lengths,
            truncated,
            items.len() as f64,
        );
        // Reported per completion and per token (finish_stats divides options' by prompts).
        stats.kl = penalty.map_or(0.0, |p| p.kl);
        // Each completion as trained (with its EOS) is the steps that decoded it.
        stats.entropy = (generations.iter().zip(&lengths))
            .map(|(g, &n)| g.entropy.unwrap_or(0.0) * n as f64)
            .sum::<f64>()
            / lengths.iter().sum::<usize>().max(1) as f64;
        Ok(StepBatch {
            batch: TokenBatch { ids, weights },
            stats,
        })
    }

    /// The rewards of `generations` (`samples_per_prompt` consecutive ones per item), by group.
    fn judge(
        &self,
        items: &[&StoredRecord],
        generations: &[Generation],
    ) -> Result<Judged, TaskError> {
        let per = self.spec.samples_per_prompt as usize;
        let inputs: Vec<(&str, &serde_json::Map<String, serde_json::Value>)> = generations
            .iter()
            .enumerate()
            .map(|(i, g)| (g.text.as_str(), &items[i / per].fields))
            .collect();
        let clock = std::time::Instant::now();
        let judgements = self.reward.judge_all(&inputs);
        let mut judged = Judged {
            rewards: vec![Vec::with_capacity(per); items.len()],
            parts: BTreeMap::new(),
            seconds: clock.elapsed().as_secs_f64(),
        };
        for (i, j) in judgements.into_iter().enumerate() {
            let j = j.map_err(|e| failed("judging", items[i / per], e))?;
            judged.rewards[i / per].push(j.reward);
            for (name, r) in j.parts {
                *judged.parts.entry(name).or_default() += r / generations.len() as f64;
            }
        }
        Ok(judged)
    }

    /// The completions trained on, with their advantages: groups without reward variance are
    /// left out when `skip_uniform_groups` says so, unless a KL term still applies to them.
    fn kept(
        &self,
        rewards: &[Vec<f64>],
        has_kl: bool,
        stats: &mut RolloutStats,
    ) -> Vec<(usize, f64)> {
        let spec = self.spec;
        let per = spec.samples_per_prompt as usize;
        let adv = advantages(rewards, spec.baseline, spec.scale);
        let mut kept = Vec::new();
        for (g, group) in rewards.iter().enumerate() {
            let skip = spec.skip_uniform_groups && is_uniform(group);
            stats.skipped_groups += usize::from(skip);
            if !skip || has_kl {
                let a = |s: usize| if skip { 0.0 } else { adv[g][s] };
                kept.extend((0..per).map(|s| (g * per + s, a(s))));
            }
        }
        kept
    }

    /// The KL penalty of sampled completions (`per` consecutive ones per prompt): each token's
    /// log-probabilities under the policy and the base model, a prompt computed once for its
    /// samples, turned into token weights and the mean sequence KL estimate.
    fn kl_penalty(
        &self,
        policy: &Model,
        group_prompts: &[Vec<u32>],
        completions: &[Vec<u32>],
    ) -> Result<KlPenalty, TaskError> {
        let per = completions.len() / group_prompts.len().max(1);
        let inputs: Vec<(Vec<u32>, Vec<Vec<u32>>)> = group_prompts
            .iter()
            .zip(completions.chunks(per.max(1)))
            .map(|(p, c)| (p.clone(), c.to_vec()))
            .collect();
        let logprobs = |tf: &Transformer| -> Result<Vec<Vec<f64>>, TaskError> {
            let scored = score_options_in(tf, filler(policy), &inputs)
                .map_err(|e| TaskError::new("scoring completions for the KL term", e))?;
            Ok(scored.into_iter().flatten().map(|s| s.logprobs).collect())
        };
        let (mine, base) = (
            logprobs(&policy.transformer)?,
            logprobs(&self.base.transformer)?,
        );
        let pairs = || mine.iter().zip(&base);
        let weights = pairs()
            .map(|(m, b)| {
                m.iter()
                    .zip(b)
                    .map(|(&m, &b)| kl::token_weight(m, b, self.spec.kl))
                    .collect()
            })
            .collect();
        let total: f64 = pairs()
            .map(|(m, b)| m.iter().zip(b).map(|(&m, &b)| kl::k3(m, b)).sum::<f64>())
            .sum();
        Ok(KlPenalty {
            weights,
            kl: total / completions.len().max(1) as f64,
        })
    }

    /// The supervised ablation: next-token loss on each record's rendered target.
    pub fn sft(&self, policy: &Model, items: &[&StoredRecord]) -> Result<StepBatch, TaskError> {
        let mut stats = RolloutStats::default();
        let (mut pairs, mut lengths) = (Vec::new(), Vec::new());
        for item in items {
            let target = item.target.as_deref().ok_or_else(|| {
                failed(
                    "training on the target of",
                    item,
                    "the dataset has no `target` template (`objective: sft` needs one)",
                )
            })?;
            let prompt = self.prompt_ids(policy, item)?;
            let completion = continuation_ids(policy, target)
                .map_err(|e| failed("tokenizing the target of", item, e))?;
            stats.tokens += prompt.len() + completion.len();
            lengths.push(completion.len());
            pairs.push((prompt, completion));
        }
        let n = normaliser(
            self.spec.loss_norm,
            &lengths,
            self.spec.max_new_tokens as usize,
        );
        let (ids, weights) = pairs
            .iter()
            .map(|(p, c)| weighted(p, c, uniform(c, 1.0 / n)))
            .unzip();
        finish_stats(&mut stats, &[], &lengths, 0, items.len() as f64);
        Ok(StepBatch {
            batch: TokenBatch { ids, weights },
            stats,
        })
    }
}

/// The models option rollouts score with: the policy and, for a KL term, the base.
pub struct OptionModels<'a> {
    pub policy: &'a Transformer,
    pub base: Option<&'a Transformer>,
    /// The padding token.
    pub filler: u32,
}

/// The batch of option rollouts for tokenized `inputs` (prompt, options) with option rewards.
pub fn option_batch(
    spec: &TrainSpec,
    models: &OptionModels,
    inputs: &[(Vec<u32>, Vec<Vec<u32>>)],
    rewards: &[Vec<f64>],
    seed: u64,
) -> Result<StepBatch, TaskError> {
    let sums = |tf: &Transformer| -> Result<Vec<Vec<f64>>, TaskError> {
        let scored = score_options_in(tf, models.filler, inputs)
            .map_err(|e| TaskError::new("scoring options", e))?;
        Ok(scored
            .iter()
            .map(|o| o.iter().map(|s| s.sum).collect())
            .collect())
    };
    let logliks = sums(models.policy)?;
    let base = models.base.map(sums).transpose()?;
    let mut stats = RolloutStats::default();
    let policies: Vec<OptionPolicy> = logliks
        .iter()
        .enumerate()
        .map(|(g, l)| OptionPolicy::new(l, base.as_ref().map(|b| b[g].as_slice()), &rewards[g]))
        .collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let weighing = option_weights(spec, &policies, base.as_deref(), rewards, &mut rng);
    let prompts = inputs.len().max(1) as f64;
    let (mut ids, mut weights, mut lengths) = (vec![], vec![], vec![]);
    for (g, (prompt, options)) in inputs.iter().enumerate() {
        stats.kl += policies[g].kl;
        stats.entropy += policies[g].entropy;
        stats.tokens += prompt.len() + options.iter().map(Vec::len).sum::<usize>();
        for (k, option) in options.iter().enumerate() {
            // The objective is a mean over prompts.
            let (i, w) = weighted(
                prompt,
                option,
                uniform(option, weighing.weights[g][k] / prompts),
            );
            ids.push(i);
            weights.push(w);
            lengths.push(option.len());
        }
    }
    stats.skipped_groups = weighing.skipped;
    finish_stats(&mut stats, &weighing.rewards, &lengths, 0, prompts);
    if spec.option_policy == PolicyKind::Expectation {
        // One expected reward per prompt: it has signal unless its options' rewards are equal.
        let uniform = rewards.iter().filter(|r| is_uniform(r)).count();
        stats.frac_reward_zero_std = uniform as f64 / prompts;
    }
    Ok(StepBatch {
        batch: TokenBatch { ids, weights },
        stats,
    })
}

/// Each option's token weight, group by group, and the rewards the step reports.
struct OptionWeights {
    weights: Vec<Vec<f64>>,
    /// Expected rewards (one per group) or the drawn options' rewards.
    rewards: Vec<Vec<f64>>,
    skipped: usize,
}

/// ∂O/∂L_k per group: exact, or the KL term exact plus the drawn options' advantages (each draw
/// adds A / samples to its option), which equal the exact weights in expectation under `rloo`.
fn option_weights(
    spec: &TrainSpec,
    policies: &[OptionPolicy],
    base: Option<&[Vec<f64>]>,
    rewards: &[Vec<f64>],
    rng: &mut impl Rng,
) -> OptionWeights {
    let base_of = |g: usize| base.map(|b| b[g].as_slice());
    if spec.option_policy == PolicyKind::Expectation {
        return OptionWeights {
            weights: (0..policies.len())
                .map(|g| policies[g].expectation_weights(base_of(g), &rewards[g], spec.kl))
                .collect(),
            rewards: policies.iter().map(|p| vec![p.expected_reward]).collect(),
            skipped: 0,
        };
    }
    let draws: Vec<Vec<usize>> = policies
        .iter()
        .map(|p| {
            (0..spec.samples_per_prompt)
                .map(|_| p.draw(rng.random::<f64>()))
                .collect()
        })
        .collect();
    let drawn: Vec<Vec<f64>> = draws
        .iter()
        .zip(rewards)
        .map(|(d, r)| d.iter().map(|&k| r[k]).collect())
        .collect();
    let adv = advantages(&drawn, spec.baseline, spec.scale);
    let mut skipped = 0;
    let weights = (0..policies.len())
        .map(|g| {
            let mut w = policies[g].kl_weights(base_of(g), spec.kl);
            if spec.skip_uniform_groups && is_uniform(&drawn[g]) {
                skipped += 1;
                return w;
            }
            for (s, &k) in draws[g].iter().enumerate() {
                w[k] += adv[g][s] / draws[g].len() as f64;
            }
            w
        })
        .collect();
    OptionWeights {
        weights,
        rewards: drawn,
        skipped,
    }
}

/// Fills the reward, length and per-prompt means of `stats`.
fn finish_stats(
    stats: &mut RolloutStats,
    rewards: &[Vec<f64>],
    lengths: &[usize],
    truncated: usize,
    prompts: f64,
) {
    let all: Vec<f64> = rewards.iter().flatten().copied().collect();
    if !all.is_empty() {
        stats.reward = all.iter().sum::<f64>() / all.len() as f64;
        stats.reward_std = std_dev(&all);
        let uniform = rewards.iter().filter(|g| is_uniform(g)).count();
        stats.frac_reward_zero_std = uniform as f64 / rewards.len() as f64;
    }
    stats.kl /= prompts.max(1.0);
    stats.entropy /= prompts.max(1.0);
    if !lengths.is_empty() {
        stats.completion_length = lengths.iter().sum::<usize>() as f64 / lengths.len() as f64;
        stats.completion_length_min = lengths.iter().copied().min().unwrap_or(0);
        stats.completion_length_max = lengths.iter().copied().max().unwrap_or(0);
        stats.clipped_ratio = truncated as f64 / lengths.len() as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rl::spec::{Baseline, Rollout};
    use crate::svf::Parametrization;
    use crate::svf::apply::{Application, apply};
    use crate::svf::expert::{BaseModel, Expert};
    use crate::svf::train::SvfTrainer;

    /// Tokenized prompts with their options, and each option's reward.
    type Planted = (Vec<(Vec<u32>, Vec<Vec<u32>>)>, Vec<Vec<f64>>);

    /// Four prompts of random tokens with three one-token options each; option 1 is right.
    fn planted(vocab: u32) -> Planted {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let mut tokens = |n: usize| {
            (0..n)
                .map(|_| rng.random_range(1..vocab))
                .collect::<Vec<u32>>()
        };
        let inputs = (0..4)
            .map(|_| (tokens(12), (0..3).map(|_| tokens(1)).collect()))
            .collect();
        (inputs, vec![vec![-1.0, 1.0, -1.0]; 4])
    }

    /// A tiny model learns to prefer the rewarded options within a few exact-expectation steps.
    #[test]
    fn a_tiny_model_learns_a_planted_option_reward() {
        let (base, factors) = crate::svf::tiny_decomposed(5);
        let (inputs, rewards) = planted(base.config.vocab_size as u32);
        let spec = TrainSpec {
            rollout: Rollout::Options,
            ..TrainSpec::default()
        };
        let s = crate::svd::cache::singular_values(&factors);
        let who = BaseModel {
            name: "tiny".into(),
            blake3: "0".repeat(64),
        };
        let expert = Expert::initial(who, Parametrization::Linear, &s, 1).unwrap();
        let mut trainer = SvfTrainer::new(&base, &factors, &expert, 0.05, 0.0).unwrap();
        let mut expected = Vec::new();
        for step in 0..6 {
            let mut policy = base.clone();
            let scales = trainer
                .state()
                .unwrap()
                .z
                .iter()
                .map(|(n, v)| {
                    let v = candle_core::Tensor::new(v.as_slice(), &candle_core::Device::Cpu);
                    (n.clone(), v.unwrap())
                })
                .collect();
            apply(&mut policy, &factors, &scales, Application::Compose).unwrap();
            let models = OptionModels {
                policy: &policy,
                base: None,
                filler: 0,
            };
            let made = option_batch(&spec, &models, &inputs, &rewards, step).unwrap();
            assert_eq!(made.batch.ids.len(), 12);
            expected.push(made.stats.reward);
            trainer.step(&made.batch).unwrap();
        }
        assert!(
            expected[5] > expected[0] + 0.2,
            "expected reward {expected:?}"
        );
    }

    /// Sampled option weights under `rloo` average to the exact weights (an unbiased
    /// estimate of the same gradient), the KL term included.
    #[test]
    fn sampled_option_weights_are_unbiased_under_rloo() {
        let logliks = [vec![-1.0, -0.4, -2.0], vec![-0.2, -0.3, -0.25]];
        let base = vec![vec![-0.5, -0.5, -1.0], vec![-1.0, -0.1, -0.3]];
        let rewards = vec![vec![1.0, -1.0, -1.0], vec![-1.0, -1.0, 1.0]];
        let policies: Vec<OptionPolicy> = (0..2)
            .map(|g| OptionPolicy::new(&logliks[g], Some(&base[g]), &rewards[g]))
            .collect();
        let spec = |policy| TrainSpec {
            option_policy: policy,
            samples_per_prompt: 4,
            baseline: Baseline::Rloo,
            skip_uniform_groups: false,
            kl: 0.2,
            ..TrainSpec::default()
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let exact = option_weights(
            &spec(PolicyKind::Expectation),
            &policies,
            Some(&base),
            &rewards,
            &mut rng,
        );
        let rounds = 40_000;
        let mut mean = vec![vec![0.0; 3]; 2];
        for _ in 0..rounds {
            let w = option_weights(
                &spec(PolicyKind::Sample),
                &policies,
                Some(&base),
                &rewards,
                &mut rng,
            );
            for (m, w) in mean.iter_mut().flatten().zip(w.weights.iter().flatten()) {
                *m += w / rounds as f64;
            }
        }
        for (m, e) in mean.iter().flatten().zip(exact.weights.iter().flatten()) {
            assert!(
                (m - e).abs() < 0.01,
                "sampled mean {mean:?} vs exact {:?}",
                exact.weights
            );
        }
    }
}
