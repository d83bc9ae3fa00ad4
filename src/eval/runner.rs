//! Evaluating one batch of items with one model, in either mode, into [`Sample`]s.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::TaskError;
use super::prompts::{Shot, render, shot_records};
use crate::data::stored::StoredRecord;
use crate::eval::spec::OptionForm;
use crate::eval::spec::ResolvedEval;
use crate::model::Model;
use crate::model::generate::{GenerateOptions, generate};
use crate::model::score::{continuation_ids, score_options};
use crate::reward::spec::RewardValues;
use crate::reward::{Reward, RewardError, Verdict, choices_field, extract, gold_index};

/// One item evaluated with one model.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sample {
    /// `base`, an expert's name or an adaptation's.
    pub with: String,
    pub id: String,
    /// The text the model was given (shots and chat template included).
    pub prompt: String,
    /// `generate` mode: the generated answer.
    pub completion: Option<String>,
    /// A multiple-choice item's options, as the record gives them (for readers of samples).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<Vec<String>>,
    /// `loglik` mode: each option's log-likelihood.
    pub option_logliks: Option<Vec<f64>>,
    pub extracted: Option<String>,
    pub gold: String,
    pub verdict: Verdict,
    pub reward: f64,
    /// `loglik` mode: whether the length-normalised choice is the gold one (`acc_norm`).
    pub correct_norm: Option<bool>,
    pub detail: Option<String>,
    pub finish_reason: Option<String>,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    /// Adaptations: the label the first pass chose and the expert (or `base`) it led to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_label: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routed_to: Option<String>,
}

/// What every batch of one evaluation shares.
pub struct Task<'a> {
    pub eval: &'a ResolvedEval,
    /// The dataset's train split, where shots come from.
    pub train: &'a [StoredRecord],
    pub reward: Option<&'a Reward>,
    /// Reward values in `loglik` mode (from its `multiple_choice` reward, else 1 / 0).
    pub values: RewardValues,
    /// Record fields holding the options and the gold option (`loglik` mode and its shots).
    pub choices: String,
    /// Whether the reward is `multiple_choice` (so a generated answer's record has options).
    pub multiple_choice: bool,
    pub gold: String,
}

fn failed(doing: &str, item: &StoredRecord, e: impl std::fmt::Display) -> TaskError {
    TaskError::on_item(doing, &item.id, e)
}

impl Task<'_> {
    pub fn run(
        &self,
        model: &Model,
        with: &str,
        batch: &[&StoredRecord],
    ) -> Result<Vec<Sample>, TaskError> {
        match self.eval.spec.mode {
            crate::eval::spec::EvalMode::Loglik => self.loglik(model, with, batch),
            crate::eval::spec::EvalMode::Generate => self.generate(model, with, batch),
        }
    }

    /// An option as scored after the prompt: plain text continues after a space, a chat turn
    /// starts right away.
    fn option_text(&self, options: &[String], i: usize) -> String {
        let body = match self.eval.spec.options {
            OptionForm::Text => options[i].clone(),
            OptionForm::Letter => extract::letter(i).map(String::from).unwrap_or_default(),
        };
        if self.eval.chat {
            body
        } else {
            format!(" {body}")
        }
    }

    /// Orders items for batching, so a batch's padding stays small: by the longest option in
    /// `loglik` mode (options are padded once per option row), by prompt length otherwise.
    pub fn sort_for_batching(&self, items: &mut [&StoredRecord]) {
        let options = |r: &StoredRecord| {
            choices_field(&r.fields, &self.choices)
                .map(|o| o.iter().map(String::len).max().unwrap_or(0))
                .unwrap_or(0)
        };
        match self.eval.spec.mode {
            crate::eval::spec::EvalMode::Loglik => {
                items.sort_by_key(|r| (options(r), r.prompt.len()))
            }
            crate::eval::spec::EvalMode::Generate => items.sort_by_key(|r| r.prompt.len()),
        }
    }

    /// A multiple-choice record's options as scored after its prompt, and the gold index.
    pub fn scored_options(
        &self,
        fields: &Map<String, Value>,
    ) -> Result<(Vec<String>, usize), RewardError> {
        let (options, gold) = self.options_of(fields)?;
        Ok((
            (0..options.len())
                .map(|i| self.option_text(&options, i))
                .collect(),
            gold,
        ))
    }

    fn options_of(&self, fields: &Map<String, Value>) -> Result<(Vec<String>, usize), RewardError> {
        let options = choices_field(fields, &self.choices)?;
        let gold = gold_index(fields, &self.gold, options.len())?;
        Ok((options, gold))
    }

    fn loglik(
        &self,
        model: &Model,
        with: &str,
        batch: &[&StoredRecord],
    ) -> Result<Vec<Sample>, TaskError> {
        let mut prepared = Vec::with_capacity(batch.len());
        let mut inputs = Vec::with_capacity(batch.len());
        for item in batch {
            let (options, gold) = self
                .options_of(&item.fields)
                .map_err(|e| failed("reading the options of", item, e))?;
            let mut shots = Vec::new();
            for shot in shot_records(
                item,
                self.train,
                self.eval.spec.shots as usize,
                self.eval.seed,
            ) {
                let (o, g) = self
                    .options_of(&shot.fields)
                    .map_err(|e| failed("reading the options of shot", shot, e))?;
                shots.push(Shot {
                    prompt: &shot.prompt,
                    answer: self.option_text(&o, g).trim_start().to_string(),
                });
            }
            let prompt = render(model, &item.prompt, &shots, self.eval.chat)
                .map_err(|e| failed("rendering", item, e))?;
            let prompt_ids = model
                .tokenizer
                .encode(&prompt)
                .map_err(|e| failed("tokenizing", item, e))?;
            let texts: Vec<String> = (0..options.len())
                .map(|i| self.option_text(&options, i))
                .collect();
            let ids = texts
                .iter()
                .map(|t| continuation_ids(model, t))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| failed("tokenizing the options of", item, e))?;
            inputs.push((prompt_ids, ids));
            prepared.push((prompt, texts, options, gold));
        }
        let scores =
            score_options(model, &inputs).map_err(|e| TaskError::new("scoring options", e))?;
        let mut out = Vec::with_capacity(batch.len());
        for (((item, (prompt, texts, options, gold)), scores), (prompt_ids, option_ids)) in
            batch.iter().zip(prepared).zip(scores).zip(&inputs)
        {
            let sums: Vec<f64> = scores.iter().map(|s| s.sum).collect();
            let argmax = |key: &dyn Fn(usize) -> f64| {
                (0..sums.len())
                    .max_by(|&a, &b| key(a).total_cmp(&key(b)).then(b.cmp(&a)))
                    .unwrap_or(0)
            };
            let best = argmax(&|i| sums[i]);
            // lm-eval's acc_norm: log-likelihood per character of the option.
            let best_norm = argmax(&|i| sums[i] / texts[i].chars().count().max(1) as f64);
            let (verdict, reward) = if best == gold {
                (Verdict::Correct, self.values.correct)
            } else {
                (Verdict::Wrong, self.values.wrong)
            };
            let letter = |i: usize| extract::letter(i).map(String::from).unwrap_or_default();
            out.push(Sample {
                with: with.into(),
                id: item.id.clone(),
                prompt,
                completion: None,
                options: Some(options),
                option_logliks: Some(sums),
                extracted: Some(letter(best)),
                gold: letter(gold),
                verdict,
                reward,
                correct_norm: Some(best_norm == gold),
                detail: None,
                finish_reason: None,
                prompt_tokens: prompt_ids.len(),
                new_tokens: option_ids.iter().map(Vec::len).sum(),
                route_label: None,
                routed_to: None,
            });
        }
        Ok(out)
    }

    fn generate(
        &self,
        model: &Model,
        with: &str,
        batch: &[&StoredRecord],
    ) -> Result<Vec<Sample>, TaskError> {
        let reward = self
            .reward
            .ok_or_else(|| TaskError::new("judging answers", "`generate` mode needs a reward"))?;
        let spec = &self.eval.spec;
        let mut prompts = Vec::with_capacity(batch.len());
        let mut ids = Vec::with_capacity(batch.len());
        for item in batch {
            let shots: Vec<Shot> =
                shot_records(item, self.train, spec.shots as usize, self.eval.seed)
                    .into_iter()
                    .map(|r| Shot {
                        prompt: &r.prompt,
                        answer: r.target.clone().unwrap_or_default(),
                    })
                    .collect();
            let prompt = render(model, &item.prompt, &shots, self.eval.chat)
                .map_err(|e| failed("rendering", item, e))?;
            ids.push(
                model
                    .tokenizer
                    .encode(&prompt)
                    .map_err(|e| failed("tokenizing", item, e))?,
            );
            prompts.push(prompt);
        }
        let opts = GenerateOptions {
            max_new_tokens: spec.max_new_tokens as usize,
            temperature: spec.temperature,
            seed: self.eval.seed,
            stop: spec.stop.clone(),
            ..GenerateOptions::default()
        };
        let generations = generate(model, &ids, &opts)
            .map_err(|e| TaskError::new(format!("generating answers for `{}`", batch[0].id), e))?;
        let judged_inputs: Vec<(&str, &Map<String, Value>)> = generations
            .iter()
            .zip(batch)
            .map(|(g, item)| (g.text.as_str(), &item.fields))
            .collect();
        let judged = reward.judge_all(&judged_inputs);
        let mut out = Vec::with_capacity(batch.len());
        for ((((item, prompt), prompt_ids), generation), judgement) in batch
            .iter()
            .zip(prompts)
            .zip(&ids)
            .zip(generations.iter())
            .zip(judged)
        {
            let j = judgement.map_err(|e| failed("judging", item, e))?;
            out.push(Sample {
                with: with.into(),
                id: item.id.clone(),
                prompt,
                completion: Some(generation.text.clone()),
                options: self
                    .multiple_choice
                    .then(|| choices_field(&item.fields, &self.choices).ok())
                    .flatten(),
                option_logliks: None,
                extracted: j.extracted,
                gold: j.gold,
                verdict: j.verdict,
                reward: j.reward,
                correct_norm: None,
                detail: j.detail,
                finish_reason: Some(crate::hash::serde_name(&generation.finish_reason)),
                prompt_tokens: prompt_ids.len(),
                new_tokens: generation.token_ids.len(),
                route_label: None,
                routed_to: None,
            });
        }
        Ok(out)
    }
}
