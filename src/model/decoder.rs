//! Continuous batching: sequences join a running decode batch between steps and leave it when
//! they finish or are cancelled, each with its own sampling options and, on a model holding a
//! table of experts, its own expert. The serving engine's loop; [`super::generate`] decodes a
//! fixed batch (sharing the prefill of repeated prompts, which this does not).
//!
//! Joining sequences are prefilled together and their KV cache rows put after the running ones,
//! the shorter side left-padded ([`KvCache::append_rows`]); padding no row needs any more is
//! trimmed as sequences leave, so the cache is as long as its longest live sequence.

use candle_core::Tensor;

use super::Model;
use super::error::{ModelError, Result};
use super::generate::{GenerateOptions, Generation, Picks, Sequence, TokenLogprob};
use super::transformer::{Batch, KvCache, LogitsAt, Mode};

/// A sequence asking to join.
pub struct Joining {
    /// The caller's name for it, in its events.
    pub id: u64,
    pub prompt: Vec<u32>,
    /// Its row of the model's expert table (`None`: the model as it is).
    pub expert: Option<u32>,
    pub opts: GenerateOptions,
    /// Which sample of its request it is: with `opts.seed`, its random stream (as
    /// [`super::generate::generate`] numbers the sequences of one call).
    pub sample: usize,
}

/// What a step did for one sequence.
pub enum Event {
    /// New text (held back while it ends inside a multi-byte character), with the tokens'
    /// log-probabilities when asked for.
    Text {
        id: u64,
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    Finished {
        id: u64,
        generation: Generation,
    },
}

struct Row {
    id: u64,
    /// Positions of padding in front of this row's tokens in the cache.
    pad: usize,
    expert: Option<u32>,
    opts: GenerateOptions,
    seq: Sequence,
    /// Bytes of text and log-probability entries already reported.
    shown: usize,
    shown_logprobs: usize,
    cancelled: bool,
}

pub struct Decoder {
    model: Model,
    cache: KvCache,
    rows: Vec<Row>,
    /// Next-token logits (rows, vocab) of the rows, in row order.
    logits: Option<Tensor>,
}

impl Decoder {
    /// A decoder over `model` (cheap to clone: its tensors are shared).
    pub fn new(model: Model) -> Self {
        Self {
            model,
            cache: KvCache::default(),
            rows: Vec::new(),
            logits: None,
        }
    }

    /// Decodes with `model` from the next step on: the same model with its expert table grown
    /// (rows keep their numbers), as when a request asks for a new mixture.
    pub fn replace_model(&mut self, model: Model) {
        self.model = model;
    }

    /// Sequences in the batch.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Prefills `joining` together and adds them to the batch; they take their first token at
    /// the next [`Decoder::step`].
    pub fn join(&mut self, joining: Vec<Joining>) -> Result<()> {
        if joining.is_empty() {
            return Ok(());
        }
        let config = &self.model.transformer.config;
        for j in &joining {
            if j.prompt.is_empty() {
                return Err(ModelError::Input(
                    "cannot generate from an empty prompt".into(),
                ));
            }
            if j.prompt.len() + j.opts.max_new_tokens > config.attention_span() {
                return Err(ModelError::Input(format!(
                    "a prompt of {} tokens plus {} new tokens exceeds {}",
                    j.prompt.len(),
                    j.opts.max_new_tokens,
                    config.span_limit()
                )));
            }
        }
        let device = self.model.transformer.device();
        let longest = joining.iter().map(|j| j.prompt.len()).max().unwrap_or(0);
        let pads: Vec<usize> = joining.iter().map(|j| longest - j.prompt.len()).collect();
        let filler = super::score::filler(&self.model);
        let ids: Vec<u32> = joining
            .iter()
            .zip(&pads)
            .flat_map(|(j, &p)| std::iter::repeat_n(filler, p).chain(j.prompt.iter().copied()))
            .collect();
        let batch = self.with_experts(
            Batch::left_padded(&pads, 0, longest, device)?,
            joining.iter().map(|j| j.expert),
        )?;
        let mut cache = KvCache::default();
        let logits = self.model.transformer.forward(
            &Tensor::from_vec(ids, (joining.len(), longest), device)?,
            &batch,
            Some(&mut cache),
            Mode::Fast,
            LogitsAt::Last,
        )?;
        let (shift_running, shift_joining) = self.cache.append_rows(cache)?;
        for row in &mut self.rows {
            row.pad += shift_running;
        }
        self.rows
            .extend(joining.into_iter().zip(pads).map(|(j, pad)| Row {
                id: j.id,
                pad: pad + shift_joining,
                expert: j.expert,
                seq: Sequence::new(j.opts.seed, j.sample),
                opts: j.opts,
                shown: 0,
                shown_logprobs: 0,
                cancelled: false,
            }));
        let logits = logits.squeeze(1)?;
        self.logits = Some(match self.logits.take() {
            Some(running) => Tensor::cat(&[running, logits], 0)?,
            None => logits,
        });
        Ok(())
    }

    /// Stops sequence `id` at the next step, without an event (its caller has gone).
    pub fn cancel(&mut self, id: u64) {
        for row in self.rows.iter_mut().filter(|r| r.id == id) {
            row.cancelled = true;
        }
    }

    /// Takes one token for every sequence, reports what it produced, lets the finished and the
    /// cancelled leave, and computes the next logits of the rest.
    pub fn step(&mut self, on_event: &mut dyn FnMut(Event)) -> Result<()> {
        let Some(logits) = self.logits.take() else {
            return Ok(());
        };
        let greedy = self.rows.iter().all(|r| r.opts.only_argmax());
        let picks = Picks::of(&logits, greedy)?;
        let mut keep = Vec::with_capacity(self.rows.len());
        let mut next = Vec::with_capacity(self.rows.len());
        for (r, row) in self.rows.iter_mut().enumerate() {
            if row.cancelled {
                continue;
            }
            let token = row.seq.take(&self.model, &picks, r, &row.opts)?;
            let text = &row.seq.text;
            if text.len() > row.shown
                && text.is_char_boundary(row.shown)
                && !text.ends_with('\u{FFFD}')
            {
                on_event(Event::Text {
                    id: row.id,
                    text: text[row.shown..].to_string(),
                    logprobs: row.seq.logprobs[row.shown_logprobs..].to_vec(),
                });
                row.shown = text.len();
                row.shown_logprobs = row.seq.logprobs.len();
            }
            if row.seq.done.is_none() {
                keep.push(r);
                next.push(token);
            }
        }
        let leaving = self.keep(&keep)?;
        for row in leaving {
            if !row.cancelled {
                let generation = row.seq.generation(&row.opts);
                on_event(Event::Finished {
                    id: row.id,
                    generation,
                });
            }
        }
        if !self.rows.is_empty() {
            self.logits = Some(self.forward(next)?);
        }
        Ok(())
    }

    /// Keeps rows `keep` (in order) in the batch and the cache and trims the padding they all
    /// share; returns the rows that left.
    fn keep(&mut self, keep: &[usize]) -> Result<Vec<Row>> {
        if keep.len() == self.rows.len() {
            return Ok(Vec::new());
        }
        let mut rows: Vec<Option<Row>> = std::mem::take(&mut self.rows)
            .into_iter()
            .map(Some)
            .collect();
        self.rows = keep.iter().filter_map(|&r| rows[r].take()).collect();
        if self.rows.is_empty() {
            self.cache = KvCache::default();
        } else {
            self.cache
                .select_rows(&keep.iter().map(|&r| r as u32).collect::<Vec<_>>())?;
            let common = self.rows.iter().map(|r| r.pad).min().unwrap_or(0);
            self.cache.trim_front(common)?;
            for row in &mut self.rows {
                row.pad -= common;
            }
        }
        Ok(rows.into_iter().flatten().collect())
    }

    /// Logits of every row after feeding it its token of `next`.
    fn forward(&mut self, next: Vec<u32>) -> Result<Tensor> {
        let device = self.model.transformer.device();
        let pads: Vec<usize> = self.rows.iter().map(|r| r.pad).collect();
        let batch = self.with_experts(
            Batch::left_padded(&pads, self.cache.len(), 1, device)?,
            self.rows.iter().map(|r| r.expert),
        )?;
        let logits = self.model.transformer.forward(
            &Tensor::from_vec(next, (pads.len(), 1), device)?,
            &batch,
            Some(&mut self.cache),
            Mode::Fast,
            LogitsAt::Last,
        )?;
        Ok(logits.squeeze(1)?)
    }

    /// `batch` with each row's expert, when any row names one (the others take row 0, the
    /// model as it is).
    fn with_experts(
        &self,
        batch: Batch,
        experts: impl Iterator<Item = Option<u32>>,
    ) -> Result<Batch> {
        let experts: Vec<Option<u32>> = experts.collect();
        if experts.iter().all(Option::is_none) {
            return Ok(batch);
        }
        batch.with_experts(&experts.iter().map(|e| e.unwrap_or(0)).collect::<Vec<_>>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::generate::generate;

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    fn model() -> Model {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/arch/llama3");
        Model::load(&dir, candle_core::DType::F32, &candle_core::Device::Cpu).expect("fixture")
    }

    /// Greedy, with the entropy of every step's distribution: a measure that moves with any
    /// change to the logits, where the argmax may not.
    fn opts(max_new_tokens: usize) -> GenerateOptions {
        GenerateOptions {
            max_new_tokens,
            ignore_eos: true,
            track_entropy: true,
            ..Default::default()
        }
    }

    /// Runs `decoder` until every sequence finished; each sequence's generation by id.
    fn drain(
        decoder: &mut Decoder,
        out: &mut std::collections::BTreeMap<u64, Generation>,
    ) -> Result<()> {
        while !decoder.is_empty() {
            decoder.step(&mut |e| {
                if let Event::Finished { id, generation } = e {
                    out.insert(id, generation);
                }
            })?;
        }
        Ok(())
    }

    /// A sequence joining a running batch (shorter and longer than what is cached) decodes what
    /// it decodes alone, and so do those it joined; the cache shrinks back as they leave.
    #[test]
    fn joining_mid_flight_changes_no_sequence() -> TestResult {
        let model = model();
        let prompts: Vec<Vec<u32>> = vec![
            vec![5, 9, 13, 2, 40, 41, 7],
            vec![17, 3],
            vec![8, 8, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70],
        ];
        let lengths = [12usize, 9, 6];
        let alone: Vec<Generation> = prompts
            .iter()
            .zip(lengths)
            .map(|(p, n)| Ok(generate(&model, std::slice::from_ref(p), &opts(n))?.remove(0)))
            .collect::<Result<_>>()?;
        let mut decoder = Decoder::new(model.clone());
        let mut out = std::collections::BTreeMap::new();
        let join = |i: usize| Joining {
            id: i as u64,
            prompt: prompts[i].clone(),
            expert: None,
            opts: opts(lengths[i]),
            sample: 0,
        };
        decoder.join(vec![join(0)])?;
        for _ in 0..3 {
            decoder.step(&mut |_| {})?;
        }
        decoder.join(vec![join(1), join(2)])?;
        assert_eq!(decoder.len(), 3);
        drain(&mut decoder, &mut out)?;
        for (i, expected) in alone.iter().enumerate() {
            let ours = &out[&(i as u64)];
            assert_eq!(ours.token_ids, expected.token_ids, "sequence {i}");
            let (a, b) = (
                ours.entropy.unwrap_or(-1.0),
                expected.entropy.unwrap_or(-2.0),
            );
            assert!((a - b).abs() < 1e-5, "sequence {i}: entropy {a} vs {b}");
        }
        assert!(decoder.cache.is_empty());
        Ok(())
    }

    /// A cancelled sequence leaves without an event; the others go on.
    #[test]
    fn a_cancelled_sequence_leaves() -> TestResult {
        let model = model();
        let mut decoder = Decoder::new(model.clone());
        let joining = |id| Joining {
            id,
            prompt: vec![4, 5, 6],
            expert: None,
            opts: opts(5),
            sample: id as usize,
        };
        decoder.join(vec![joining(1), joining(2)])?;
        decoder.step(&mut |_| {})?;
        decoder.cancel(1);
        let mut out = std::collections::BTreeMap::new();
        drain(&mut decoder, &mut out)?;
        assert_eq!(out.keys().copied().collect::<Vec<_>>(), [2]);
        assert_eq!(out[&2].token_ids.len(), 5);
        Ok(())
    }
}
