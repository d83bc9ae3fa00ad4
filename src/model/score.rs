//! Scoring: log-probabilities of given continuations after given prompts, batched. Used for
//! multiple-choice evaluation, KL terms and few-shot tie-breaks.
//!
//! Prompt and continuation are tokenized separately and concatenated (the continuation without
//! BOS or a SentencePiece space prefix), which is how the tokens stand when the model generates
//! the continuation itself.

use std::ops::Range;

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

/// A continuation's token ids as they follow a prompt (see [`Tokenizer::encode_continuation`]).
///
/// [`Tokenizer::encode_continuation`]: super::tokenizer::Tokenizer::encode_continuation
pub fn continuation_ids(model: &Model, continuation: &str) -> Result<Vec<u32>> {
    model.tokenizer.encode_continuation(continuation)
}

/// Scores pre-tokenized `(prompt, continuation)` pairs in one batch.
pub fn score_ids(model: &Model, pairs: Vec<(Vec<u32>, Vec<u32>)>) -> Result<Vec<Scored>> {
    score_ids_in(&model.transformer, filler(model), pairs)
}

/// The token that pads batches (never attended to).
pub(crate) fn filler(model: &Model) -> u32 {
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

/// The log-likelihood of one option, token by token and summed.
#[derive(Clone, Debug, PartialEq)]
pub struct OptionScore {
    pub logprobs: Vec<f64>,
    pub sum: f64,
}

/// Scores every option of every item: `items[i]` is a prompt and its options (token ids, the
/// options without BOS). Each prompt is computed once, with the tokens all its options start
/// with (" Hence," in "Hence, X" / "Hence, Y"); then each item's options run packed in one row
/// after it, each seeing the prompt and itself only (no padding between options).
pub fn score_options(
    model: &Model,
    items: &[(Vec<u32>, Vec<Vec<u32>>)],
) -> Result<Vec<Vec<OptionScore>>> {
    score_options_in(&model.transformer, filler(model), items)
}

/// How many leading tokens all `options` share, leaving every option at least one of its own.
fn shared_prefix(options: &[Vec<u32>]) -> usize {
    let shortest = options.iter().map(Vec::len).min().unwrap_or(0);
    (0..shortest.saturating_sub(1))
        .take_while(|&k| options.iter().all(|o| o[k] == options[0][k]))
        .count()
}

/// One item's options packed for the options pass: each option's own tokens but its last (they
/// predict the rest), the tokens they predict, and where each option sits in the row.
struct Packed {
    ids: Vec<u32>,
    targets: Vec<u32>,
    spans: Vec<std::ops::Range<usize>>,
}

impl Packed {
    fn new(options: &[Vec<u32>], shared: usize) -> Self {
        let (mut ids, mut targets, mut spans) = (Vec::new(), Vec::new(), Vec::new());
        for o in options {
            let own = &o[shared..];
            let start = ids.len();
            ids.extend_from_slice(&own[..own.len() - 1]);
            targets.extend_from_slice(&own[1..]);
            spans.push(start..ids.len());
        }
        Self {
            ids,
            targets,
            spans,
        }
    }
}

/// Positions and mask of the options pass: an option's token at offset `k` of its span sits at
/// rotary position prompt + k (the prompt counting the shared tokens) and sees the row's prompt
/// (cached: `past` positions but the row's padding `gap`) and its own span up to itself; padding
/// sees only itself, so its softmax row stays finite.
fn packed_batch(
    packed: &[Packed],
    gaps: &[Range<usize>],
    past: usize,
    time: usize,
    device: &candle_core::Device,
) -> Result<Batch> {
    let total = past + time;
    let mut positions = Vec::with_capacity(packed.len() * time);
    let mut key_positions = Vec::with_capacity(packed.len() * total);
    let mut mask = vec![f32::NEG_INFINITY; packed.len() * time * total];
    for (b, (p, gap)) in packed.iter().zip(gaps).enumerate() {
        let prompt = past - gap.len();
        // Cached keys: the shared prompt, its padding counted out; new keys: each token's own
        // position, pushed below.
        key_positions.extend((0..past).map(|j| match j >= gap.end {
            true => (j - gap.len()) as u32,
            false => j.min(gap.start) as u32,
        }));
        let first_new = positions.len();
        let mut owner = vec![None; time];
        for span in &p.spans {
            for j in span.clone() {
                owner[j] = Some(span.start);
            }
        }
        for (j, own) in owner.iter().enumerate() {
            let row = &mut mask[(b * time + j) * total..(b * time + j + 1) * total];
            match own {
                Some(start) => {
                    positions.push((prompt + j - start) as u32);
                    row[..gap.start].fill(0.0);
                    row[gap.end..past].fill(0.0);
                    row[past + start..=past + j].fill(0.0);
                }
                None => {
                    positions.push(prompt as u32);
                    row[past + j] = 0.0;
                }
            }
        }
        key_positions.extend_from_slice(&positions[first_new..]);
    }
    Ok(Batch {
        positions: Tensor::from_vec(positions, (packed.len(), time), device)?,
        mask: Tensor::from_vec(mask, (packed.len(), 1, time, total), device)?,
        key_positions: Tensor::from_vec(key_positions, (packed.len(), total), device)?,
        experts: None,
    })
}

/// How many leading tokens every prompt shares (a template's fixed instructions), leaving each
/// at least `keep` of its own; none for a single prompt, which gains nothing from sharing.
fn common_prefix(prompts: &[Vec<u32>], keep: usize) -> usize {
    let [first, rest @ ..] = prompts else {
        return 0;
    };
    if rest.is_empty() {
        return 0;
    }
    let most = prompts
        .iter()
        .map(|p| p.len().saturating_sub(keep))
        .min()
        .unwrap_or(0);
    (0..most)
        .take_while(|&k| rest.iter().all(|p| p[k] == first[k]))
        .count()
}

pub(crate) fn score_options_in(
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
    let shared: Vec<usize> = items.iter().map(|(_, opts)| shared_prefix(opts)).collect();
    // The prompt pass: each prompt followed by its options' shared tokens, left-padded.
    let prompts: Vec<Vec<u32>> = items
        .iter()
        .zip(&shared)
        .map(|((p, opts), &c)| p.iter().chain(&opts[0][..c]).copied().collect())
        .collect();
    let tail = shared.iter().max().copied().unwrap_or(0) + 1;
    // Tokens all prompts start with are computed once, their keys and values copied to every row.
    let common = common_prefix(&prompts, tail);
    let mut cache = KvCache::default();
    if common > 0 {
        tf.forward(
            &Tensor::new(&prompts[0][..common], device)?.unsqueeze(0)?,
            &Batch::left_padded(&[0], 0, common, device)?,
            Some(&mut cache),
            Mode::Fast,
            LogitsAt::Last,
        )?;
        cache.select_rows(&vec![0; items.len()])?;
    }
    // Then each prompt's own tokens, left-padded after the shared ones.
    let longest = prompts.iter().map(|p| p.len() - common).max().unwrap_or(0);
    let gaps: Vec<Range<usize>> = prompts
        .iter()
        .map(|p| common..common + longest - (p.len() - common))
        .collect();
    let ids: Vec<u32> = prompts
        .iter()
        .zip(&gaps)
        .flat_map(|(p, gap)| {
            std::iter::repeat_n(filler, gap.len()).chain(p[common..].iter().copied())
        })
        .collect();
    let head = tf.forward(
        &Tensor::from_vec(ids, (items.len(), longest), device)?,
        &Batch::with_gaps(&gaps, common, longest, device)?,
        Some(&mut cache),
        Mode::Fast,
        LogitsAt::Tail(tail),
    )?;
    // head_logp[i][j]: log-probabilities at the j-th of the last `tail` positions of item i.
    let head_logp: Vec<Vec<Vec<f32>>> = candle_nn::ops::log_softmax(&head, D::Minus1)?.to_vec3()?;
    // The options pass: per item, its options' own tokens (but each one's last) packed into one
    // row, each option attending to the shared prompt and to its own earlier tokens only.
    let packed: Vec<Packed> = items
        .iter()
        .zip(&shared)
        .map(|((_, opts), &c)| Packed::new(opts, c))
        .collect();
    let time = packed.iter().map(|p| p.ids.len()).max().unwrap_or(0);
    let later: Vec<Vec<f32>> = if time == 0 {
        vec![vec![]; items.len()]
    } else {
        let ids: Vec<u32> = packed
            .iter()
            .flat_map(|p| {
                p.ids
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(filler, time - p.ids.len()))
            })
            .collect();
        let targets: Vec<u32> = packed
            .iter()
            .flat_map(|p| {
                p.targets
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, time - p.ids.len()))
            })
            .collect();
        let batch = packed_batch(&packed, &gaps, common + longest, time, device)?;
        let logits = tf.forward(
            &Tensor::from_vec(ids, (items.len(), time), device)?,
            &batch,
            Some(&mut cache),
            Mode::Fast,
            LogitsAt::All,
        )?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let index = Tensor::from_vec(targets, (items.len(), time, 1), device)?;
        logp.gather(&index, 2)?.squeeze(2)?.to_vec2()?
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, ((_, opts), &c)) in items.iter().zip(&shared).enumerate() {
        // The last `c + 1` prompt-pass positions predict the shared tokens, then each option's first own.
        let at = |k: usize| &head_logp[i][tail - 1 - c + k];
        let prefix = (0..c).map(|k| f64::from(at(k)[opts[0][k] as usize]));
        let scores = opts
            .iter()
            .zip(&packed[i].spans)
            .map(|(o, span)| {
                let first = f64::from(at(c)[o[c] as usize]);
                let own = later[i][span.clone()].iter().map(|&l| f64::from(l));
                let logprobs: Vec<f64> = prefix
                    .clone()
                    .chain(std::iter::once(first))
                    .chain(own)
                    .collect();
                OptionScore {
                    sum: logprobs.iter().sum(),
                    logprobs,
                }
            })
            .collect();
        out.push(scores);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_prefixes_leave_each_option_a_token() {
        assert_eq!(shared_prefix(&[vec![1, 2, 3], vec![1, 2, 4]]), 2);
        assert_eq!(shared_prefix(&[vec![1, 2], vec![1, 2, 4]]), 1);
        assert_eq!(shared_prefix(&[vec![5], vec![5]]), 0);
        assert_eq!(shared_prefix(&[vec![1, 2], vec![3, 2]]), 0);
    }

    fn tiny() -> Result<Transformer> {
        use crate::model::config::Architecture;
        use crate::model::testing::{random_weights, tiny_config};
        let config = tiny_config(Architecture::Llama);
        let weights = random_weights(&config, 7, &candle_core::Device::Cpu);
        Transformer::new(config, weights)
    }

    /// Each item's option scores equal scoring each (prompt, option) pair whole, alone.
    fn assert_equal_to_whole_pairs(
        tf: &Transformer,
        items: &[(Vec<u32>, Vec<Vec<u32>>)],
    ) -> Result<()> {
        let shared = score_options_in(tf, 0, items)?;
        for ((prompt, options), scores) in items.iter().zip(&shared) {
            let pairs = options
                .iter()
                .map(|o| (prompt.clone(), o.clone()))
                .collect();
            let whole = score_ids_in(tf, 0, pairs)?;
            for (s, w) in scores.iter().zip(&whole) {
                assert!((s.sum - w.sum).abs() < 1e-3, "{} vs {}", s.sum, w.sum);
                assert_eq!(s.logprobs.len(), w.logprobs.len());
                for (a, b) in s.logprobs.iter().zip(&w.logprobs) {
                    assert!((a - b).abs() < 1e-4, "per token {a} vs {b}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn common_prefixes_leave_each_prompt_its_own_tokens() {
        let p = |v: &[u32]| v.to_vec();
        assert_eq!(
            common_prefix(&[p(&[1, 2, 3, 4]), p(&[1, 2, 3, 5, 6])], 1),
            3
        );
        assert_eq!(
            common_prefix(&[p(&[1, 2, 3, 4]), p(&[1, 2, 3, 4, 6])], 1),
            3
        );
        assert_eq!(
            common_prefix(&[p(&[1, 2, 3, 4]), p(&[1, 2, 3, 5, 6])], 2),
            2
        );
        assert_eq!(common_prefix(&[p(&[1, 2, 3, 4])], 1), 0, "alone");
        assert_eq!(common_prefix(&[p(&[1]), p(&[1, 2])], 1), 0);
        assert_eq!(common_prefix(&[p(&[7, 2]), p(&[1, 2])], 1), 0);
    }

    /// A template's fixed instructions computed once, then each question after them with its
    /// padding between, must score as each prompt whole does.
    #[test]
    fn scores_after_a_shared_prefix_equal_whole_pair_scores() -> Result<()> {
        let tf = tiny()?;
        let prefix = [4u32, 9, 2, 7, 7, 1];
        let with = |own: &[u32]| prefix.iter().chain(own).copied().collect::<Vec<u32>>();
        let items = vec![
            (with(&[3, 3, 1]), vec![vec![5, 2], vec![8]]),
            (with(&[6, 10, 11, 2]), vec![vec![5, 2], vec![8]]),
            // Options sharing tokens, which join the prompt pass after the shared prefix.
            (with(&[12, 3, 5]), vec![vec![9, 9, 1], vec![9, 9, 4, 4]]),
        ];
        // Each prompt keeps a tail of 3 own tokens, so the whole prefix is computed once.
        let prompts: Vec<Vec<u32>> = items.iter().map(|(p, _)| p.clone()).collect();
        assert_eq!(common_prefix(&prompts, 3), prefix.len());
        assert_equal_to_whole_pairs(&tf, &items)
    }

    /// Sharing the prompt's computation must give what scoring each pair whole gives.
    #[test]
    fn shared_prompt_scores_equal_whole_pair_scores() -> Result<()> {
        let tf = tiny()?;
        let items = vec![
            (vec![1, 5, 9], vec![vec![3], vec![4, 7, 2], vec![8, 8]]),
            (vec![2, 6, 10, 11, 12], vec![vec![5, 1], vec![9]]),
            // Options sharing their first tokens, one of them only those plus one.
            (
                vec![7],
                vec![vec![4, 4, 9, 1], vec![4, 4, 2], vec![4, 4, 9, 3, 3]],
            ),
            (vec![3, 3], vec![vec![6, 2], vec![6, 2]]),
        ];
        assert_equal_to_whole_pairs(&tf, &items)
    }
}
