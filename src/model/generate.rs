//! Batched generation with a KV cache: prompts of different lengths are left-padded and decoded
//! together; each sequence stops on EOS, a stop string or the token budget, and says which.
//! Repeated prompts (several samples of one prompt) are computed once, and a finished sequence
//! leaves the batch, so cost follows the distinct prompt tokens and the tokens still wanted.
//! Sampling is deterministic for a seed: sequence `i` draws from its own ChaCha stream seeded by
//! (seed, i), so results do not depend on what else is in the batch.

use std::collections::HashMap;
use std::ops::Range;

use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;

use super::Model;
use super::error::{ModelError, Result};
use super::prefixes::{extend, prefill_after, shared_prefix};
use super::transformer::{Batch, KvCache, LogitsAt, Mode};

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens with this much probability (1 = off).
    pub top_p: f64,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    pub seed: u64,
    pub stop: Vec<String>,
    /// Keep generating past EOS (benchmarks need a fixed number of tokens).
    pub ignore_eos: bool,
    /// Record the entropy of the model's next-token distribution at each step (rollouts report
    /// it; it costs a pass over the vocabulary per sequence and step).
    pub track_entropy: bool,
    /// Keep each generated token's log-probability and those of the `k` likeliest tokens there
    /// (`Some(k)`; the log-softmax of the logits, before temperature).
    pub logprobs: Option<usize>,
}

impl GenerateOptions {
    /// Whether every step just takes the argmax and reads nothing else of the logits.
    pub(super) fn only_argmax(&self) -> bool {
        self.temperature <= 0.0 && !self.track_entropy && self.logprobs.is_none()
    }
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            stop: vec![],
            ignore_eos: false,
            track_entropy: false,
            logprobs: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Eos,
    Stop,
    Length,
}

#[derive(Clone, Debug, Serialize)]
pub struct Generation {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    /// The end-of-sequence token the model chose, when `finish_reason` is `Eos` (a model may
    /// have several; it is not in `token_ids`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eos_token: Option<u32>,
    /// Mean entropy (nats) of the model's next-token distribution over the steps it decoded,
    /// when asked for (`track_entropy`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entropy: Option<f64>,
    /// Each token's log-probability and the likeliest alternatives, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<TokenLogprob>>,
}

/// A generated token's log-probability, and the `k` likeliest tokens' at its position (best
/// first).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

impl TokenLogprob {
    /// From the logits `row` the token was chosen from.
    fn of(row: &[f32], token: u32, k: usize) -> Self {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
        let log_z = max
            + row
                .iter()
                .map(|&l| (l as f64 - max).exp())
                .sum::<f64>()
                .ln();
        let logprob = |id: u32| (row[id as usize] as f64 - log_z) as f32;
        let mut order: Vec<u32> = (0..row.len() as u32).collect();
        let k = k.min(row.len());
        if k > 0 {
            order.select_nth_unstable_by(k - 1, |&a, &b| {
                row[b as usize].total_cmp(&row[a as usize])
            });
        }
        order.truncate(k);
        order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
        Self {
            token,
            logprob: logprob(token),
            top: order.into_iter().map(|id| (id, logprob(id))).collect(),
        }
    }
}

/// One sequence being decoded (shared with [`super::decoder`]).
pub(super) struct Sequence {
    pub(super) tokens: Vec<u32>,
    pub(super) rng: ChaCha8Rng,
    pub(super) done: Option<FinishReason>,
    /// The end-of-sequence token that finished it, if one did.
    pub(super) eos_token: Option<u32>,
    pub(super) text: String,
    /// Σ over decoding steps of the model's entropy there, and the number of steps.
    pub(super) entropy: (f64, usize),
    /// One per token in `tokens`, when asked for.
    pub(super) logprobs: Vec<TokenLogprob>,
    /// Bytes of `text` and entries of `logprobs` already handed out ([`Sequence::unshown`]).
    shown: (usize, usize),
}

impl Sequence {
    /// Sequence `index` of a call seeded with `seed`: its own random stream.
    pub(super) fn new(seed: u64, index: usize) -> Self {
        Self {
            tokens: vec![],
            rng: ChaCha8Rng::seed_from_u64(
                seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            ),
            done: None,
            eos_token: None,
            text: String::new(),
            entropy: (0.0, 0),
            logprobs: Vec::new(),
            shown: (0, 0),
        }
    }

    /// The text (and log-probabilities) decoded since the last call, as ranges of `text` and
    /// `logprobs`, and marks them shown; `None` while there is nothing new or the text ends
    /// inside a multi-byte character.
    pub(super) fn unshown(&mut self) -> Option<(Range<usize>, Range<usize>)> {
        let (text, logprobs) = self.shown;
        let ready = self.text.len() > text
            && self.text.is_char_boundary(text)
            && !self.text.ends_with('\u{FFFD}');
        if !ready {
            return None;
        }
        self.shown = (self.text.len(), self.logprobs.len());
        Some((text..self.text.len(), logprobs..self.logprobs.len()))
    }

    /// Takes this step's token (row `r` of `picks`, or drawn from it) with what `opts` asks to
    /// record of it, and decides whether the sequence is finished.
    pub(super) fn take(
        &mut self,
        model: &Model,
        picks: &Picks,
        r: usize,
        opts: &GenerateOptions,
    ) -> Result<u32> {
        let (token, logprob) = match picks {
            Picks::Chosen(ids) => (ids[r], None),
            Picks::Rows(rows) => {
                let row = &rows[r];
                if opts.track_entropy {
                    self.entropy = (self.entropy.0 + entropy(row), self.entropy.1 + 1);
                }
                let token = pick(row, opts, &mut self.rng);
                (
                    token,
                    opts.logprobs.map(|k| TokenLogprob::of(row, token, k)),
                )
            }
        };
        let before = self.tokens.len();
        advance(model, self, token, opts, before + 1)?;
        if let Some(lp) = logprob.filter(|_| self.tokens.len() > before) {
            self.logprobs.push(lp);
        }
        Ok(token)
    }

    pub(super) fn generation(self, opts: &GenerateOptions) -> Generation {
        Generation {
            text: self.text,
            token_ids: self.tokens,
            finish_reason: self.done.unwrap_or(FinishReason::Length),
            eos_token: self.eos_token,
            entropy: opts
                .track_entropy
                .then(|| self.entropy.0 / self.entropy.1.max(1) as f64),
            logprobs: opts.logprobs.map(|_| self.logprobs),
        }
    }
}

/// Generates a continuation of each prompt (token ids).
pub fn generate(
    model: &Model,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
) -> Result<Vec<Generation>> {
    generate_streaming(model, prompts, opts, &mut |_, _| {})
}

/// [`generate`] on a model holding a table of experts (`svf::apply::apply_per_sequence`):
/// prompt `i` is answered by expert `experts[i]` of the table, all prompts in one batch.
pub fn generate_per_sequence(
    model: &Model,
    prompts: &[Vec<u32>],
    experts: &[u32],
    opts: &GenerateOptions,
) -> Result<Vec<Generation>> {
    if experts.len() != prompts.len() {
        return Err(ModelError::Input(format!(
            "{} prompts but {} experts",
            prompts.len(),
            experts.len()
        )));
    }
    decode(model, prompts, Some(experts), opts, &mut |_, _| {})
}

/// [`generate`], handing each sequence's new text to `on_text(sequence, text)` as it is
/// decoded (held back while it ends inside a multi-byte character).
pub fn generate_streaming(
    model: &Model,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(usize, &str),
) -> Result<Vec<Generation>> {
    decode(model, prompts, None, opts, on_text)
}

/// Decodes every prompt, with its expert of the model's table when `experts` are given.
fn decode(
    model: &Model,
    prompts: &[Vec<u32>],
    experts: Option<&[u32]>,
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(usize, &str),
) -> Result<Vec<Generation>> {
    if prompts.iter().any(Vec::is_empty) {
        return Err(ModelError::Input(
            "cannot generate from an empty prompt".into(),
        ));
    }
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    let tf = &model.transformer;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if longest + opts.max_new_tokens > tf.config.attention_span() {
        return Err(ModelError::Input(format!(
            "a prompt of {longest} tokens plus {} new tokens exceeds {}",
            opts.max_new_tokens,
            tf.config.span_limit()
        )));
    }
    // Samples of one prompt share its prefill: each distinct prompt is computed once, and its
    // cache rows are copied to its samples. Distinct prompts with one expert compute what they
    // all start with (a chat template's system prompt, a few-shot preamble) once.
    let (distinct, source) = distinct_prompts(prompts, experts);
    let firsts: Vec<&[u32]> = distinct.iter().map(|&i| prompts[i].as_slice()).collect();
    let distinct_experts: Option<Vec<u32>> =
        experts.map(|e| distinct.iter().map(|&i| e[i]).collect());
    let one_expert = distinct_experts
        .as_ref()
        .is_none_or(|e| e.iter().all(|&x| x == e[0]));
    let shared = if one_expert {
        shared_prefix(&firsts)
    } else {
        0
    };
    let device = tf.device();
    let mut cache = KvCache::default();
    if shared > 0 {
        let expert = distinct_experts.as_ref().map(|e| e[0]);
        extend(model, &mut cache, &firsts[0][..shared], expert)?;
        cache.select_rows(&vec![0; firsts.len()])?;
    }
    let (prefill, distinct_pad) = prefill_after(
        model,
        &mut cache,
        &firsts,
        shared,
        distinct_experts.as_deref(),
    )?;
    // A batch whose rows are prompts `rows`, each with its expert.
    let with_experts = |batch: Batch, rows: &[usize]| match experts {
        Some(e) => batch.with_experts(&rows.iter().map(|&i| e[i]).collect::<Vec<_>>()),
        None => Ok(batch),
    };
    let mut seqs: Vec<Sequence> = (0..prompts.len())
        .map(|i| Sequence::new(opts.seed, i))
        .collect();
    let rows: Vec<u32> = source.iter().map(|&d| d as u32).collect();
    cache.select_rows(&rows)?;
    let mut logits = prefill.index_select(&Tensor::new(rows.as_slice(), device)?, 0)?;
    // Batch row r decodes sequence live[r], left-padded by pad[r].
    let mut pad: Vec<usize> = source.iter().map(|&d| distinct_pad[d]).collect();
    let mut live: Vec<usize> = (0..prompts.len()).collect();
    for _ in 0..opts.max_new_tokens {
        let picks = Picks::of(&logits.squeeze(1)?, opts.only_argmax())?;
        // `live` is the unfinished sequences in order, so row r of the batch is the r-th of them.
        let running = seqs.iter_mut().filter(|s| s.done.is_none());
        let mut next = take_each(
            model,
            &picks,
            running.enumerate().map(|(r, s)| (r, s, opts)),
        )?;
        for &i in &live {
            if let Some((text, _)) = seqs[i].unshown() {
                on_text(i, &seqs[i].text[text]);
            }
        }
        // Finished sequences leave the batch, so they stop costing.
        let keep: Vec<usize> = (0..live.len())
            .filter(|&r| seqs[live[r]].done.is_none())
            .collect();
        if keep.is_empty() {
            break;
        }
        if keep.len() < live.len() {
            cache.select_rows(&keep.iter().map(|&r| r as u32).collect::<Vec<_>>())?;
            next = keep.iter().map(|&r| next[r]).collect();
            pad = keep.iter().map(|&r| pad[r]).collect();
            live = keep.iter().map(|&r| live[r]).collect();
        }
        let batch = with_experts(Batch::left_padded(&pad, cache.len(), 1, device)?, &live)?;
        logits = tf.forward(
            &Tensor::from_vec(next, (live.len(), 1), device)?,
            &batch,
            Some(&mut cache),
            Mode::Fast,
            LogitsAt::Last,
        )?;
    }
    Ok(seqs.into_iter().map(|s| s.generation(opts)).collect())
}

/// This step's token of each `(row, sequence, options)`, drawn from row `row` of `picks`, the
/// sequences side by side: a draw over the whole vocabulary and the text's decoding cost as
/// much as a small batch's forward pass. Each sequence has its own random stream, so what it
/// draws does not depend on the split.
pub(super) fn take_each<'a>(
    model: &Model,
    picks: &Picks,
    sequences: impl Iterator<Item = (usize, &'a mut Sequence, &'a GenerateOptions)>,
) -> Result<Vec<u32>> {
    let sequences: Vec<_> = sequences.collect();
    sequences
        .into_par_iter()
        .map(|(r, seq, opts)| seq.take(model, picks, r, opts))
        .collect()
}

/// One decoding step's choices: made on the device (greedy off the CPU, where copying every
/// row of logits to the host each step would cost more than the step), or the rows to choose
/// from on the host.
pub(super) enum Picks {
    Chosen(Vec<u32>),
    Rows(Vec<Vec<f32>>),
}

impl Picks {
    /// From `logits` (batch, vocab); `greedy`: every row takes its argmax and nothing else is
    /// read from the rows.
    pub(super) fn of(logits: &Tensor, greedy: bool) -> Result<Self> {
        Ok(if greedy && !logits.device().is_cpu() {
            Self::Chosen(logits.argmax(candle_core::D::Minus1)?.to_vec1()?)
        } else {
            Self::Rows(logits.to_vec2()?)
        })
    }
}

/// Entropy (nats) of the model's own next-token distribution (temperature 1) from its logits.
fn entropy(logits: &[f32]) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let (mut total, mut weighted) = (0f64, 0f64);
    for &l in logits {
        let shifted = l as f64 - max;
        let e = shifted.exp();
        total += e;
        weighted += e * shifted;
    }
    total.ln() - weighted / total
}

/// The distinct (expert, prompt) pairs as the index of each one's first appearance, and which
/// of them each prompt is.
fn distinct_prompts(prompts: &[Vec<u32>], experts: Option<&[u32]>) -> (Vec<usize>, Vec<usize>) {
    let mut index: HashMap<(u32, &[u32]), usize> = HashMap::new();
    let mut first = Vec::new();
    let source = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let expert = experts.map_or(0, |e| e[i]);
            *index.entry((expert, p.as_slice())).or_insert_with(|| {
                first.push(i);
                first.len() - 1
            })
        })
        .collect();
    (first, source)
}

/// Appends `token` and decides whether the sequence is finished.
fn advance(
    model: &Model,
    seq: &mut Sequence,
    token: u32,
    opts: &GenerateOptions,
    produced: usize,
) -> Result<()> {
    if !opts.ignore_eos && model.tokenizer.eos_ids.contains(&token) {
        seq.done = Some(FinishReason::Eos);
        seq.eos_token = Some(token);
        return Ok(());
    }
    seq.tokens.push(token);
    seq.text = model.tokenizer.decode(&seq.tokens, false)?;
    if let Some(at) = opts
        .stop
        .iter()
        .filter_map(|s| seq.text.find(s.as_str()))
        .min()
    {
        seq.text.truncate(at);
        seq.done = Some(FinishReason::Stop);
    } else if produced >= opts.max_new_tokens {
        seq.done = Some(FinishReason::Length);
    }
    Ok(())
}

/// The next token: argmax when greedy, else a draw after temperature, top-k and top-p.
fn pick(logits: &[f32], opts: &GenerateOptions, rng: &mut ChaCha8Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as u32)
            .unwrap_or(0)
    };
    if opts.temperature <= 0.0 {
        return argmax();
    }
    if opts.top_k == 0 && opts.top_p >= 1.0 {
        return draw_all(logits, opts.temperature, rng);
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if opts.top_k > 0 {
        order.truncate(opts.top_k);
    }
    let top = logits[order[0]] as f64;
    let weights: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] as f64 - top) / opts.temperature).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut kept = 0;
    let mut mass = 0.0;
    for w in &weights {
        kept += 1;
        mass += w / total;
        if mass >= opts.top_p {
            break;
        }
    }
    let kept_total: f64 = weights[..kept].iter().sum();
    let mut draw = rng.random::<f64>() * kept_total;
    for (i, w) in weights[..kept].iter().enumerate() {
        draw -= w;
        if draw <= 0.0 {
            return order[i] as u32;
        }
    }
    order[kept - 1] as u32
}

/// A draw from the whole tempered distribution, in vocabulary order: no sort is needed when
/// nothing is cut off (sorting 49k logits per sequence and step cost ~a third of decoding).
fn draw_all(logits: &[f32], temperature: f64, rng: &mut ChaCha8Rng) -> u32 {
    let top = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let weights: Vec<f64> = logits
        .iter()
        .map(|&l| ((l as f64 - top) / temperature).exp())
        .collect();
    let mut draw = rng.random::<f64>() * weights.iter().sum::<f64>();
    for (i, w) in weights.iter().enumerate() {
        draw -= w;
        if draw <= 0.0 {
            return i as u32;
        }
    }
    // Rounding left a sliver: the likeliest token.
    weights
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Prompts under one system prompt compute it once and still generate what each does alone,
    /// to the token and to 1e-5 in their steps' mean entropy; a repeated prompt (samples) too.
    #[test]
    fn a_shared_start_is_computed_once_and_changes_nothing() -> Result<()> {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/arch/llama3");
        let model = Model::load(&dir, candle_core::DType::F32, &candle_core::Device::Cpu)?;
        let system: Vec<u32> = (0..20).map(|i| 3 + (i * 7) % 90).collect();
        let prompts: Vec<Vec<u32>> = [vec![5u32, 9, 13], vec![40], vec![8, 60, 61, 62], vec![40]]
            .into_iter()
            .map(|own| system.iter().copied().chain(own).collect())
            .collect();
        let firsts: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        assert_eq!(shared_prefix(&firsts), 20);
        let opts = GenerateOptions {
            max_new_tokens: 8,
            ignore_eos: true,
            track_entropy: true,
            ..Default::default()
        };
        let together = generate(&model, &prompts, &opts)?;
        for (i, (prompt, ours)) in prompts.iter().zip(&together).enumerate() {
            let alone = generate(&model, std::slice::from_ref(prompt), &opts)?.remove(0);
            assert_eq!(ours.token_ids, alone.token_ids, "prompt {i}");
            let (a, b) = (ours.entropy.unwrap_or(-1.0), alone.entropy.unwrap_or(-2.0));
            assert!((a - b).abs() < 1e-5, "prompt {i}: entropy {a} vs {b}");
        }
        Ok(())
    }

    #[test]
    fn greedy_top_k_and_top_p() {
        let logits = [0.0f32, 3.0, 1.0, 2.9];
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        assert_eq!(pick(&logits, &GenerateOptions::default(), &mut rng), 1);
        let one = GenerateOptions {
            temperature: 1.0,
            top_k: 1,
            ..Default::default()
        };
        assert!((0..20).all(|_| pick(&logits, &one, &mut rng) == 1));
        let nucleus = GenerateOptions {
            temperature: 1.0,
            top_p: 0.5,
            ..Default::default()
        };
        let draws: Vec<u32> = (0..200)
            .map(|_| pick(&logits, &nucleus, &mut rng))
            .collect();
        assert!(
            draws.iter().all(|&t| t == 1 || t == 3) && draws.contains(&3),
            "top-p keeps the two near-equal tokens"
        );
    }

    #[test]
    fn entropy_by_hand() {
        assert!((entropy(&[0.0, 0.0, 0.0, 0.0]) - 4f64.ln()).abs() < 1e-12);
        assert!(entropy(&[0.0, -1000.0]).abs() < 1e-9);
        // p = (2/3, 1/3): −Σ p ln p.
        let h = -(2.0 / 3.0 * (2.0f64 / 3.0).ln() + 1.0 / 3.0 * (1.0f64 / 3.0).ln());
        assert!((entropy(&[2f32.ln(), 0.0]) - h).abs() < 1e-6);
    }

    /// Without top-k or top-p, draws follow the tempered softmax.
    #[test]
    fn full_draws_follow_the_tempered_distribution() {
        let logits = [0.0f32, 1.0, 2.0];
        let opts = GenerateOptions {
            temperature: 0.5,
            ..Default::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let n = 20_000;
        let mut counts = [0usize; 3];
        for _ in 0..n {
            counts[pick(&logits, &opts, &mut rng) as usize] += 1;
        }
        let weights: Vec<f64> = logits.iter().map(|&l| (l as f64 / 0.5).exp()).collect();
        let total: f64 = weights.iter().sum();
        for (c, w) in counts.iter().zip(&weights) {
            let expected = w / total;
            assert!((*c as f64 / n as f64 - expected).abs() < 0.01, "{counts:?}");
        }
    }
}
