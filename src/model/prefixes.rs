//! Prompts' KV caches kept after their prefill, so that a later prompt starting the same way (a
//! chat template's system prompt, a few-shot preamble, the question a client asks again)
//! computes only what follows: vLLM's automatic prefix caching, and what llama.cpp's server does
//! with the prompt it evaluated last. Bounded in bytes, least recently used first out.

use super::error::Result;
use super::transformer::KvCache;

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
