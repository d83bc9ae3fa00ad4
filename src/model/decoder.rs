//! Continuous batching: sequences join a running decode batch between steps and leave it when
//! they finish or are cancelled, each with its own sampling options and, on a model holding a
//! table of experts, its own expert. The serving engine's loop; [`super::generate`] decodes a
//! fixed batch (sharing the prefill of repeated prompts, which this does not).
//!
//! Joining sequences are prefilled together (those with one expert and a common prefix, such as
//! a system prompt, compute it once) and their KV cache rows put after the running ones, the
//! shorter side left-padded ([`KvCache::append_rows`]); padding no row needs any more is
//! trimmed as sequences leave, so the cache is as long as its longest live sequence. What a
//! prefill computes is kept in a [`PrefixCache`]: a prompt that starts like an earlier one (the
//! same system prompt, arriving a second later) computes only the rest.

use candle_core::Tensor;

use super::Model;
use super::error::{ModelError, Result};
use super::generate::{GenerateOptions, Generation, Picks, Sequence, TokenLogprob, take_each};
use super::prefixes::{MIN_SHARED, PrefixCache, PrefixStats, extend, prefill_after, shared_prefix};
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
    cancelled: bool,
}

pub struct Decoder {
    model: Model,
    cache: KvCache,
    rows: Vec<Row>,
    /// Next-token logits (rows, vocab) of the rows, in row order.
    logits: Option<Tensor>,
    prefixes: PrefixCache,
    prefix_stats: PrefixStats,
}

impl Decoder {
    /// A decoder over `model` (cheap to clone: its tensors are shared) keeping up to
    /// `prefix_budget` bytes of prompts' keys and values for later prompts to start from.
    pub fn new(model: Model, prefix_budget: usize) -> Self {
        Self {
            model,
            cache: KvCache::default(),
            rows: Vec::new(),
            logits: None,
            prefixes: PrefixCache::new(prefix_budget),
            prefix_stats: PrefixStats::default(),
        }
    }

    /// Prompt tokens prefilled so far, and how many of them the prefix cache answered.
    pub fn prefix_stats(&self) -> PrefixStats {
        self.prefix_stats
    }

    /// Decodes with `model` from the next step on: the same model with its expert table grown
    /// (rows keep their numbers), as when a request asks for a new mixture.
    pub fn replace_model(&mut self, model: Model) {
        self.model = model;
    }

    /// Drops every sequence (a failed step lost the batch); the prefix cache stays.
    pub fn clear(&mut self) {
        self.cache = KvCache::default();
        self.rows.clear();
        self.logits = None;
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
        // Sequences with one expert share what their prompts share: each such group is
        // prefilled together, its common prefix once.
        let mut groups: Vec<Vec<Joining>> = Vec::new();
        for j in joining {
            match groups.iter_mut().find(|g| g[0].expert == j.expert) {
                Some(group) => group.push(j),
                None => groups.push(vec![j]),
            }
        }
        for group in groups {
            let (cache, logits, pads) = self.prefill(&group)?;
            self.add(group, cache, logits, pads)?;
        }
        Ok(())
    }

    /// Prefills `group` (one expert): the prefix all its prompts share (at least
    /// [`MIN_SHARED`] tokens; a lone prompt's is all of it) once, starting from what the prefix
    /// cache holds of it, then each prompt's own part, left-padded after it. The cache comes out
    /// as if each prompt had been prefilled whole and left-padded: its padding is moved in
    /// front. Returns the cache, the next-token logits (rows, vocab), the paddings.
    fn prefill(&mut self, group: &[Joining]) -> Result<(KvCache, Tensor, Vec<usize>)> {
        let first = &group[0];
        let prompts: Vec<&[u32]> = group.iter().map(|j| j.prompt.as_slice()).collect();
        let shared = match group {
            [lone] => lone.prompt.len(),
            _ => shared_prefix(&prompts),
        };
        let prefix = &first.prompt[..shared];
        // At least one token is computed: its logits are the next token's.
        let reusable = &prefix[..shared.min(first.prompt.len() - 1)];
        let (cached, mut cache) = self
            .prefixes
            .lookup(first.expert, reusable, MIN_SHARED)?
            .unwrap_or_default();
        self.prefix_stats.cached += (cached * group.len()) as u64;
        self.prefix_stats.prompt += prompts.iter().map(|p| p.len() as u64).sum::<u64>();
        let mut logits = None;
        if shared > cached {
            logits = Some(extend(
                &self.model,
                &mut cache,
                &prefix[cached..],
                first.expert,
            )?);
            self.prefixes.insert(first.expert, prefix, &cache)?;
        }
        if let ([_], Some(logits)) = (group, logits) {
            return Ok((cache, logits.squeeze(1)?, vec![0]));
        }
        cache.select_rows(&vec![0; group.len()])?;
        let experts = expert_rows(group.iter().map(|j| j.expert));
        let (logits, pads) = prefill_after(
            &self.model,
            &mut cache,
            &prompts,
            shared,
            experts.as_deref(),
        )?;
        Ok((cache, logits.squeeze(1)?, pads))
    }

    /// Puts a prefilled group after the running rows.
    fn add(
        &mut self,
        group: Vec<Joining>,
        cache: KvCache,
        logits: Tensor,
        pads: Vec<usize>,
    ) -> Result<()> {
        let (shift_running, shift_joining) = self.cache.append_rows(cache)?;
        for row in &mut self.rows {
            row.pad += shift_running;
        }
        self.rows
            .extend(group.into_iter().zip(pads).map(|(j, pad)| Row {
                id: j.id,
                pad: pad + shift_joining,
                expert: j.expert,
                seq: Sequence::new(j.opts.seed, j.sample),
                opts: j.opts,
                cancelled: false,
            }));
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
        let taking = (self.rows.iter_mut().enumerate())
            .filter(|(_, row)| !row.cancelled)
            .map(|(r, row)| (r, &mut row.seq, &row.opts));
        let mut tokens = take_each(&self.model, &picks, taking)?.into_iter();
        let mut keep = Vec::with_capacity(self.rows.len());
        let mut next = Vec::with_capacity(self.rows.len());
        for (r, row) in self.rows.iter_mut().enumerate() {
            if row.cancelled {
                continue;
            }
            let token = tokens.next().expect("one token per sequence taking one");
            if let Some((text, logprobs)) = row.seq.unshown() {
                on_event(Event::Text {
                    id: row.id,
                    text: row.seq.text[text].to_string(),
                    logprobs: row.seq.logprobs[logprobs].to_vec(),
                });
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
        let mut batch = Batch::left_padded(&pads, self.cache.len(), 1, device)?;
        if let Some(rows) = expert_rows(self.rows.iter().map(|r| r.expert)) {
            batch = batch.with_experts(&rows)?;
        }
        let logits = self.model.transformer.forward(
            &Tensor::from_vec(next, (pads.len(), 1), device)?,
            &batch,
            Some(&mut self.cache),
            Mode::Fast,
            LogitsAt::Last,
        )?;
        Ok(logits.squeeze(1)?)
    }
}

/// Each row's expert, when any row names one (the others take row 0, the model as it is).
fn expert_rows(experts: impl Iterator<Item = Option<u32>>) -> Option<Vec<u32>> {
    let experts: Vec<Option<u32>> = experts.collect();
    if experts.iter().all(Option::is_none) {
        return None;
    }
    Some(experts.iter().map(|e| e.unwrap_or(0)).collect())
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

    /// Sequence `i` of `out` generated what `alone[i]` did: the tokens and, to 1e-5, the mean
    /// entropy of its steps.
    fn assert_same(out: &std::collections::BTreeMap<u64, Generation>, alone: &[Generation]) {
        for (i, expected) in alone.iter().enumerate() {
            let ours = &out[&(i as u64)];
            assert_eq!(ours.token_ids, expected.token_ids, "sequence {i}");
            let (a, b) = (
                ours.entropy.unwrap_or(-1.0),
                expected.entropy.unwrap_or(-2.0),
            );
            assert!((a - b).abs() < 1e-5, "sequence {i}: entropy {a} vs {b}");
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
        let mut decoder = Decoder::new(model.clone(), 0);
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
        assert_same(&out, &alone);
        assert!(decoder.cache.is_empty());
        Ok(())
    }

    /// Prompts joining together with a common prefix (a system prompt) compute it once and
    /// still decode what each decodes alone, also beside a sequence already running.
    #[test]
    fn a_shared_prefix_is_computed_once_and_changes_nothing() -> TestResult {
        let model = model();
        let system: Vec<u32> = (0..20).map(|i| 3 + (i * 7) % 90).collect();
        let prompts: Vec<Vec<u32>> = [vec![5u32, 9, 13], vec![40], vec![8, 8, 60, 61, 62, 63, 64]]
            .into_iter()
            .map(|own| system.iter().copied().chain(own).collect())
            .collect();
        let alone: Vec<Generation> = prompts
            .iter()
            .map(|p| Ok(generate(&model, std::slice::from_ref(p), &opts(8))?.remove(0)))
            .collect::<Result<_>>()?;
        let joining = |i: usize| Joining {
            id: i as u64,
            prompt: prompts[i].clone(),
            expert: None,
            opts: opts(8),
            sample: 0,
        };
        let all: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        assert_eq!(shared_prefix(&all), 20);
        assert_eq!(shared_prefix(&all[..1]), 0);
        let mut decoder = Decoder::new(model.clone(), 0);
        decoder.join(vec![Joining {
            id: 9,
            prompt: vec![11, 12],
            expert: None,
            opts: opts(12),
            sample: 0,
        }])?;
        decoder.step(&mut |_| {})?;
        decoder.join(vec![joining(0), joining(1), joining(2)])?;
        let mut out = std::collections::BTreeMap::new();
        drain(&mut decoder, &mut out)?;
        assert_same(&out, &alone);
        Ok(())
    }

    /// A prompt starting like one prefilled before (by itself or with others) takes that
    /// start from the prefix cache and decodes what it decodes alone; the cache's copies are
    /// not disturbed by what is appended to them.
    #[test]
    fn a_cached_prefix_is_reused_and_changes_nothing() -> TestResult {
        let model = model();
        let system: Vec<u32> = (0..12).map(|i| 3 + (i * 5) % 80).collect();
        let prompts: Vec<Vec<u32>> = [vec![5u32, 9], vec![40], vec![7], vec![7], vec![5, 9]]
            .into_iter()
            .map(|own| system.iter().copied().chain(own).collect())
            .collect();
        let alone: Vec<Generation> = prompts
            .iter()
            .map(|p| Ok(generate(&model, std::slice::from_ref(p), &opts(6))?.remove(0)))
            .collect::<Result<_>>()?;
        let joining = |i: usize| Joining {
            id: i as u64,
            prompt: prompts[i].clone(),
            expert: None,
            opts: opts(6),
            sample: 0,
        };
        let mut decoder = Decoder::new(model.clone(), 1 << 20);
        let mut out = std::collections::BTreeMap::new();
        decoder.join(vec![joining(0)])?;
        assert_eq!(decoder.prefix_stats().cached, 0);
        decoder.step(&mut |_| {})?;
        decoder.join(vec![joining(1)])?;
        assert_eq!(decoder.prefix_stats().cached, 12, "the system prompt");
        drain(&mut decoder, &mut out)?;
        decoder.join(vec![joining(2), joining(3)])?;
        let stats = decoder.prefix_stats();
        assert_eq!(stats.cached, 12 + 2 * 12);
        assert_eq!(stats.prompt, 14 + 13 + 13 + 13);
        drain(&mut decoder, &mut out)?;
        decoder.join(vec![joining(3)])?;
        assert_eq!(
            decoder.prefix_stats().cached,
            36 + 12,
            "all but the last token"
        );
        drain(&mut decoder, &mut out)?;
        // The first prompt's entry lent its start to the second: what the second appended to
        // its copy must not have reached the entry.
        decoder.join(vec![joining(4)])?;
        assert_eq!(decoder.prefix_stats().cached, 48 + 13);
        drain(&mut decoder, &mut out)?;
        assert_same(&out, &alone);
        Ok(())
    }

    /// The prefix cache holds at most its budget: the least recently used prompt leaves first,
    /// and a prompt extending a cached one replaces it.
    #[test]
    fn the_prefix_cache_keeps_to_its_budget() -> TestResult {
        let model = model();
        let c = &model.transformer.config;
        let per_token = c.num_layers * 2 * c.num_kv_heads * c.head_dim * 4;
        let prompt = |first: u32, len: u32| (first..first + len).collect::<Vec<u32>>();
        let mut decoder = Decoder::new(model.clone(), 25 * per_token);
        let mut ask = |prompt: Vec<u32>| -> Result<u64> {
            let before = decoder.prefix_stats().cached;
            decoder.join(vec![Joining {
                id: 0,
                prompt,
                expert: None,
                opts: opts(1),
                sample: 0,
            }])?;
            drain(&mut decoder, &mut std::collections::BTreeMap::new())?;
            Ok(decoder.prefix_stats().cached - before)
        };
        assert_eq!(ask(prompt(10, 10))?, 0);
        assert_eq!(ask(prompt(10, 12))?, 10, "extends the first: replaces it");
        assert_eq!(ask(prompt(40, 12))?, 0, "both fit: 24 tokens");
        assert_eq!(ask(prompt(10, 12))?, 11, "the first is used again...");
        assert_eq!(ask(prompt(70, 9))?, 0, "...so the second leaves");
        assert_eq!(ask(prompt(40, 12))?, 0);
        assert_eq!(ask(prompt(10, 30))?, 0, "the first left too");
        assert_eq!(ask(prompt(10, 30))?, 0, "too long to keep");
        Ok(())
    }

    /// A cancelled sequence leaves without an event; the others go on.
    #[test]
    fn a_cancelled_sequence_leaves() -> TestResult {
        let model = model();
        let mut decoder = Decoder::new(model.clone(), 0);
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
