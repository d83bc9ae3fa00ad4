//! Scoring: log-probabilities of given continuations after given prompts, batched. Used for
//! multiple-choice evaluation, KL terms and few-shot tie-breaks.
//!
//! Prompt and continuation are tokenized separately and concatenated (the continuation without
//! BOS), which is how the tokens stand when the model generates the continuation itself.

use candle_core::{D, Tensor};
use serde::Serialize;

use super::Model;
use super::error::{ModelError, Result};
use super::transformer::{Batch, KvCache, LogitsAt, Mode, Transformer};

#[derive(Clone, Debug, Serialize)]
pub struct Scored {
    pub prompt_ids: Vec<u32>,
    pub continuation_ids: Vec<u32>,
    /// log p(token | everything before it), one per continuation token.
    pub logprobs: Vec<f64>,
    pub sum: f64,
}

/// Scores each `(prompt, continuation)` pair in one batch.
pub fn score(model: &Model, pairs: &[(String, String)]) -> Result<Vec<Scored>> {
    let tok = &model.tokenizer;
    let mut encoded = Vec::with_capacity(pairs.len());
    for (prompt, continuation) in pairs {
        let p = tok.encode(prompt)?;
        let c = continuation_ids(model, continuation)?;
        if p.is_empty() || c.is_empty() {
            return Err(ModelError::Input(format!(
                "cannot score an empty prompt or continuation ({prompt:?}, {continuation:?})"
            )));
        }
        encoded.push((p, c));
    }
    score_ids(model, encoded)
}

/// A continuation's token ids as they follow a prompt: tokenized alone, without BOS.
pub fn continuation_ids(model: &Model, continuation: &str) -> Result<Vec<u32>> {
    let tok = &model.tokenizer;
    let mut c = tok.encode(continuation)?;
    if tok.add_bos && tok.bos_id.is_some() && c.first() == tok.bos_id.as_ref() {
        c.remove(0);
    }
    Ok(c)
}

/// Scores pre-tokenized `(prompt, continuation)` pairs in one batch.
pub fn score_ids(model: &Model, pairs: Vec<(Vec<u32>, Vec<u32>)>) -> Result<Vec<Scored>> {
    score_ids_in(&model.transformer, filler(model), pairs)
}

/// The token that pads batches (never attended to).
fn filler(model: &Model) -> u32 {
    model.tokenizer.eos_ids.first().copied().unwrap_or(0)
}

fn score_ids_in(
    tf: &Transformer,
    filler: u32,
    pairs: Vec<(Vec<u32>, Vec<u32>)>,
) -> Result<Vec<Scored>> {
    let longest = pairs
        .iter()
        .map(|(p, c)| p.len() + c.len())
        .max()
        .unwrap_or(0);
    let pad: Vec<usize> = pairs
        .iter()
        .map(|(p, c)| longest - p.len() - c.len())
        .collect();
    let ids: Vec<u32> = pairs
        .iter()
        .zip(&pad)
        .flat_map(|((p, c), &n)| {
            std::iter::repeat_n(filler, n)
                .chain(p.iter().copied())
                .chain(c.iter().copied())
        })
        .collect();
    let device = tf.device();
    let batch = Batch::left_padded(&pad, 0, longest, device)?;
    let logits = tf.forward(
        &Tensor::from_vec(ids, (pairs.len(), longest), device)?,
        &batch,
        None,
        Mode::Fast,
        LogitsAt::All,
    )?;
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(candle_core::DType::F64)?, D::Minus1)?;
    let mut out = Vec::with_capacity(pairs.len());
    for (b, ((p, c), n)) in pairs.into_iter().zip(pad).enumerate() {
        let start = n + p.len(); // index of the first continuation token
        let rows = logp.get(b)?.narrow(0, start - 1, c.len())?;
        let index = Tensor::new(c.as_slice(), device)?.unsqueeze(1)?;
        let logprobs: Vec<f64> = rows.gather(&index, 1)?.squeeze(1)?.to_vec1()?;
        let sum = logprobs.iter().sum();
        out.push(Scored {
            prompt_ids: p,
            continuation_ids: c,
            logprobs,
            sum,
        });
    }
    Ok(out)
}

/// The log-likelihood of one option and its length in tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OptionScore {
    pub sum: f64,
    pub tokens: usize,
}

/// Scores every option of every item: `items[i]` is a prompt and its options (token ids, the
/// options without BOS). Each prompt is computed once; its KV cache is copied to one row per
/// option, and the options run together (right-padded after their shared prompt).
pub fn score_options(
    model: &Model,
    items: &[(Vec<u32>, Vec<Vec<u32>>)],
) -> Result<Vec<Vec<OptionScore>>> {
    score_options_in(&model.transformer, filler(model), items)
}

fn score_options_in(
    tf: &Transformer,
    filler: u32,
    items: &[(Vec<u32>, Vec<Vec<u32>>)],
) -> Result<Vec<Vec<OptionScore>>> {
    if items
        .iter()
        .any(|(p, opts)| p.is_empty() || opts.is_empty() || opts.iter().any(Vec::is_empty))
    {
        return Err(ModelError::Input(
            "cannot score an empty prompt, an item without options or an empty option".into(),
        ));
    }
    let device = tf.device();
    let longest = items.iter().map(|(p, _)| p.len()).max().unwrap_or(0);
    let pad: Vec<usize> = items.iter().map(|(p, _)| longest - p.len()).collect();
    let ids: Vec<u32> = items
        .iter()
        .zip(&pad)
        .flat_map(|((p, _), &n)| std::iter::repeat_n(filler, n).chain(p.iter().copied()))
        .collect();
    let mut cache = KvCache::default();
    let last = tf.forward(
        &Tensor::from_vec(ids, (items.len(), longest), device)?,
        &Batch::left_padded(&pad, 0, longest, device)?,
        Some(&mut cache),
        Mode::Fast,
        LogitsAt::Last,
    )?;
    // log p(first option token | prompt), one row per item.
    let first: Vec<Vec<f32>> =
        candle_nn::ops::log_softmax(&last.squeeze(1)?, D::Minus1)?.to_vec2()?;
    let rows: Vec<(usize, &Vec<u32>)> = items
        .iter()
        .enumerate()
        .flat_map(|(i, (_, opts))| opts.iter().map(move |o| (i, o)))
        .collect();
    // The options' tokens but their last feed the model; each predicts the next one.
    let fed = rows.iter().map(|(_, o)| o.len() - 1).max().unwrap_or(0);
    let rest: Vec<Vec<f32>> = if fed == 0 {
        vec![vec![]; rows.len()]
    } else {
        let index: Vec<u32> = rows.iter().map(|&(i, _)| i as u32).collect();
        let mut option_cache = cache.select_rows(&index)?;
        let row_pad: Vec<usize> = rows.iter().map(|&(i, _)| pad[i]).collect();
        let ids: Vec<u32> = rows
            .iter()
            .flat_map(|(_, o)| {
                let fed_here = &o[..o.len() - 1];
                fed_here
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(filler, fed - fed_here.len()))
            })
            .collect();
        let targets: Vec<u32> = rows
            .iter()
            .flat_map(|(_, o)| {
                o[1..]
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, fed - (o.len() - 1)))
            })
            .collect();
        let logits = tf.forward(
            &Tensor::from_vec(ids, (rows.len(), fed), device)?,
            &Batch::left_padded(&row_pad, longest, fed, device)?,
            Some(&mut option_cache),
            Mode::Fast,
            LogitsAt::All,
        )?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let index = Tensor::from_vec(targets, (rows.len(), fed, 1), device)?;
        logp.gather(&index, 2)?.squeeze(2)?.to_vec2()?
    };
    let mut out: Vec<Vec<OptionScore>> = items.iter().map(|_| Vec::new()).collect();
    for ((i, option), later) in rows.into_iter().zip(rest) {
        let head = f64::from(first[i][option[0] as usize]);
        let tail: f64 = later[..option.len() - 1]
            .iter()
            .map(|&l| f64::from(l))
            .sum();
        out[i].push(OptionScore {
            sum: head + tail,
            tokens: option.len(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sharing the prompt's computation must give what scoring each pair whole gives.
    #[test]
    fn shared_prompt_scores_equal_whole_pair_scores() -> Result<()> {
        use crate::model::config::Architecture;
        use crate::model::testing::{random_weights, tiny_config};
        let config = tiny_config(Architecture::Llama);
        let weights = random_weights(&config, 7, &candle_core::Device::Cpu);
        let tf = Transformer::new(config, weights)?;
        let items = vec![
            (vec![1, 5, 9], vec![vec![3], vec![4, 7, 2], vec![8, 8]]),
            (vec![2, 6, 10, 11, 12], vec![vec![5, 1], vec![9]]),
        ];
        let shared = score_options_in(&tf, 0, &items)?;
        for ((prompt, options), scores) in items.iter().zip(&shared) {
            let pairs = options
                .iter()
                .map(|o| (prompt.clone(), o.clone()))
                .collect();
            let whole = score_ids_in(&tf, 0, pairs)?;
            for (s, w) in scores.iter().zip(&whole) {
                assert!((s.sum - w.sum).abs() < 1e-3, "{} vs {}", s.sum, w.sum);
                assert_eq!(s.tokens, w.continuation_ids.len());
            }
        }
        Ok(())
    }
}
