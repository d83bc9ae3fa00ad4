//! Prompts' KV caches kept after their prefill, so that a later prompt starting the same way (a
//! chat template's system prompt, a few-shot preamble, the question a client asks again)
//! computes only what follows: vLLM's automatic prefix caching, and what llama.cpp's server does
//! with the prompt it evaluated last. Bounded in bytes, least recently used first out.
//!
//! Also how prompts prefilled together compute what they all start with once
//! ([`shared_prefix`], [`extend`], [`prefill_after`]): the serving decoder's joining prompts,
//! and a fixed batch's ([`super::generate`]), such as evaluation items under one chat
//! template's system prompt.

use candle_core::Tensor;

use super::Model;
use super::error::Result;
use super::score::filler;
use super::transformer::{Batch, KvCache, LogitsAt, Mode};

/// Fewest leading tokens prompts must share for the prefix to be computed once (by prompts
/// prefilled together, or taken from the prefix cache).
pub const MIN_SHARED: usize = 8;

/// How many leading tokens every one of `prompts` shares, when worth sharing (at least
/// [`MIN_SHARED`], two prompts or more); each prompt keeps at least one token of its own, whose
/// logits are the ones it needs.
pub fn shared_prefix(prompts: &[&[u32]]) -> usize {
    let Some((first, rest)) = prompts.split_first() else {
        return 0;
    };
    let shortest = prompts.iter().map(|p| p.len()).min().unwrap_or(0);
    let common = rest.iter().fold(shortest.saturating_sub(1), |n, p| {
        common_len(&first[..n], p)
    });
    if rest.is_empty() || common < MIN_SHARED {
        0
    } else {
        common
    }
}

/// The batch of a forward call whose row `r` is answered by `experts[r]` of the model's table
/// (all rows by the model as it is without them).
fn with_experts(batch: Batch, experts: Option<&[u32]>) -> Result<Batch> {
    match experts {
        Some(rows) => Ok(batch.with_experts(rows)?),
        None => Ok(batch),
    }
}

/// Feeds `tokens` to one sequence after what `cache` holds of it, answered by `expert`; the
/// next-token logits (1, 1, vocab).
pub fn extend(
    model: &Model,
    cache: &mut KvCache,
    tokens: &[u32],
    expert: Option<u32>,
) -> Result<Tensor> {
    let device = model.transformer.device();
    let batch = Batch::left_padded(&[0], cache.len(), tokens.len(), device)?;
    let batch = with_experts(batch, expert.as_ref().map(std::slice::from_ref))?;
    model.transformer.forward(
        &Tensor::from_vec(tokens.to_vec(), (1, tokens.len()), device)?,
        &batch,
        Some(cache),
        Mode::Fast,
        LogitsAt::Last,
    )
}

/// Prefills `prompts` after the `shared` tokens they all start with, which `cache` holds (a
/// row per prompt; nothing when `shared` is 0): each prompt's own part, left-padded after the
/// prefix, row `r` answered by `experts[r]`. The cache comes out as if each prompt had been
/// prefilled whole and left-padded: its padding is moved in front. Returns the next-token
/// logits (rows, 1, vocab) and each prompt's padding.
pub fn prefill_after(
    model: &Model,
    cache: &mut KvCache,
    prompts: &[&[u32]],
    shared: usize,
    experts: Option<&[u32]>,
) -> Result<(Tensor, Vec<usize>)> {
    let device = model.transformer.device();
    let longest = prompts.iter().map(|p| p.len() - shared).max().unwrap_or(0);
    let pads: Vec<usize> = prompts.iter().map(|p| longest + shared - p.len()).collect();
    let gaps: Vec<std::ops::Range<usize>> = pads.iter().map(|&p| shared..shared + p).collect();
    let filler = filler(model);
    let ids: Vec<u32> = prompts
        .iter()
        .zip(&pads)
        .flat_map(|(p, &n)| std::iter::repeat_n(filler, n).chain(p[shared..].iter().copied()))
        .collect();
    let batch = with_experts(Batch::with_gaps(&gaps, shared, longest, device)?, experts)?;
    let logits = model.transformer.forward(
        &Tensor::from_vec(ids, (prompts.len(), longest), device)?,
        &batch,
        Some(cache),
        Mode::Fast,
        LogitsAt::Last,
    )?;
    cache.move_gaps_to_front(&gaps)?;
    Ok((logits, pads))
}

struct Entry {
    /// The expert-table row the keys and values were computed with (`None`: the model as is).
    expert: Option<u32>,
    tokens: Vec<u32>,
    /// One row, `tokens.len()` positions.
    cache: KvCache,
}

pub struct PrefixCache {
    budget: usize,
    /// Least recently used first.
    entries: Vec<Entry>,
}

/// What a prefix cache saved so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Prompt tokens prefilled.
    pub prompt: u64,
    /// Of them, tokens whose keys and values came from the cache.
    pub cached: u64,
}

/// How many leading tokens `a` and `b` have in common.
pub fn common_len(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PrefixCache {
    /// A cache holding at most `budget` bytes of keys and values (0: none kept).
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            entries: Vec::new(),
        }
    }

    /// The longest cached start of `tokens` under `expert`, when at least `min` tokens long: its
    /// length and a copy of its cache (one row), to append the rest to.
    pub fn lookup(
        &mut self,
        expert: Option<u32>,
        tokens: &[u32],
        min: usize,
    ) -> Result<Option<(usize, KvCache)>> {
        let best = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.expert == expert)
            .map(|(i, e)| (common_len(&e.tokens, tokens), i))
            .max();
        let Some((n, i)) = best.filter(|&(n, _)| n >= min.max(1)) else {
            return Ok(None);
        };
        let entry = self.entries.remove(i);
        let cache = entry.cache.head(n)?;
        self.entries.push(entry);
        Ok(Some((n, cache)))
    }

    /// Keeps the first `tokens.len()` positions of `cache` (one row) as `tokens`' keys and
    /// values under `expert`. An entry that `tokens` extends is replaced; one that extends
    /// `tokens` already holds them and only counts as used.
    pub fn insert(&mut self, expert: Option<u32>, tokens: &[u32], cache: &KvCache) -> Result<()> {
        if self.budget == 0 || tokens.is_empty() {
            return Ok(());
        }
        let same = |e: &Entry| e.expert == expert;
        if let Some(i) = self
            .entries
            .iter()
            .position(|e| same(e) && e.tokens.starts_with(tokens))
        {
            let entry = self.entries.remove(i);
            self.entries.push(entry);
            return Ok(());
        }
        let kept = cache.head(tokens.len())?;
        if kept.bytes() > self.budget {
            return Ok(());
        }
        self.entries
            .retain(|e| !(same(e) && tokens.starts_with(&e.tokens)));
        while self.bytes() + kept.bytes() > self.budget {
            self.entries.remove(0);
        }
        self.entries.push(Entry {
            expert,
            tokens: tokens.to_vec(),
            cache: kept,
        });
        Ok(())
    }

    fn bytes(&self) -> usize {
        self.entries.iter().map(|e| e.cache.bytes()).sum()
    }
}
