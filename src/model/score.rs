//! Scoring: log-probabilities of given continuations after given prompts, batched. Used for
//! multiple-choice evaluation, KL terms and few-shot tie-breaks.
//!
//! Prompt and continuation are tokenized separately and concatenated (the continuation without
//! BOS), which is how the tokens stand when the model generates the continuation itself.

use candle_core::{D, Tensor};
use serde::Serialize;

use super::Model;
use super::error::{ModelError, Result};
use super::transformer::{Batch, LogitsAt, Mode};

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
        let mut c = tok.encode(continuation)?;
        if tok.add_bos && tok.bos_id.is_some() && c.first() == tok.bos_id.as_ref() {
            c.remove(0);
        }
        if p.is_empty() || c.is_empty() {
            return Err(ModelError::Input(format!(
                "cannot score an empty prompt or continuation ({prompt:?}, {continuation:?})"
            )));
        }
        encoded.push((p, c));
    }
    score_ids(model, encoded)
}

/// Scores pre-tokenized `(prompt, continuation)` pairs in one batch.
pub fn score_ids(model: &Model, pairs: Vec<(Vec<u32>, Vec<u32>)>) -> Result<Vec<Scored>> {
    let tf = &model.transformer;
    let longest = pairs
        .iter()
        .map(|(p, c)| p.len() + c.len())
        .max()
        .unwrap_or(0);
    let pad: Vec<usize> = pairs
        .iter()
        .map(|(p, c)| longest - p.len() - c.len())
        .collect();
    let filler = model.tokenizer.eos_ids.first().copied().unwrap_or(0);
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
