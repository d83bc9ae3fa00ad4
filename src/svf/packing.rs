//! Shared prompts in a training step: consecutive sequences that start with the same tokens
//! (several completions of one prompt, the options of one question) are packed, so the shared
//! tokens are computed once and every member's own tokens attend to that one copy. Per-token
//! work (projections, MLP, norms, the LM head) then grows with the unique tokens only.
//!
//! Attention keeps its plain per-sequence kernels: each member's attention sequence (shared
//! tokens, then its own) is gathered from the packed rows, and the results are folded back —
//! outputs of shared rows from the pack's first member (every member computes the same), and
//! gradients of shared keys and values summed over the members that attend to them.

use rayon::prelude::*;

use super::backprop::{Sequence, split_mut};

/// Fewest shared tokens worth packing: below it the copies cost more than they save.
pub(super) const MIN_SHARED: usize = 8;

/// Consecutive sequences whose first `shared` tokens are equal and carry no loss weight.
pub(super) struct Pack<'a> {
    pub members: Vec<&'a Sequence<'a>>,
    pub shared: usize,
}

impl Pack<'_> {
    /// Tokens computed: the shared ones once, then each member's own.
    pub fn tokens(&self) -> usize {
        self.shared + self.members.iter().map(|m| self.own(m)).sum::<usize>()
    }

    fn own(&self, member: &Sequence) -> usize {
        member.ids.len() - self.shared
    }

    /// Token ids in packed order.
    pub fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        let shared = &self.members[0].ids[..self.shared];
        let own = self.members.iter().flat_map(|m| &m.ids[self.shared..]);
        shared.iter().chain(own).copied()
    }

    /// The rotary position of each packed token.
    pub fn positions(&self) -> impl Iterator<Item = usize> + '_ {
        let own = self.members.iter().flat_map(|m| self.shared..m.ids.len());
        (0..self.shared).chain(own)
    }

    /// The packed row (within the pack) of member `j`'s position `u`.
    pub fn row(&self, j: usize, u: usize) -> usize {
        if u < self.shared {
            return u;
        }
        let before: usize = self.members[..j].iter().map(|m| self.own(m)).sum();
        self.shared + before + (u - self.shared)
    }
}

/// Leading positions whose predictions carry no weight (at most all but the last token).
fn unweighted_prefix(seq: &Sequence) -> usize {
    let len = seq.ids.len().saturating_sub(1);
    seq.weights[..len].iter().take_while(|&&w| w == 0.0).count()
}

/// The batch's packs, in batch order: a sequence joins the previous pack when at least
/// `min_shared` of its first tokens equal the pack's and carry no weight.
pub(super) fn packs<'a>(batch: &'a [Sequence<'a>], min_shared: usize) -> Vec<Pack<'a>> {
    let mut out: Vec<Pack> = Vec::new();
    for seq in batch {
        let cap = unweighted_prefix(seq);
        if let Some(pack) = out.last_mut() {
            let first = pack.members[0].ids;
            let common = first
                .iter()
                .zip(seq.ids)
                .take_while(|(a, b)| a == b)
                .count();
            let shared = pack.shared.min(common).min(cap);
            if shared >= min_shared {
                pack.members.push(seq);
                pack.shared = shared;
                continue;
            }
        }
        out.push(Pack {
            members: vec![seq],
            shared: cap,
        });
    }
    out
}

/// One member's attention sequence: its pack, and the packed row (within the pack) of each of
/// its positions.
struct Member {
    pack: usize,
    first: bool,
    shared: usize,
    sources: Vec<usize>,
}

/// The attention sequences of a pass whose packs share tokens, and how they map to its rows.
pub(super) struct Expansion {
    /// Length of each member's attention sequence, in member order.
    pub lengths: Vec<usize>,
    members: Vec<Member>,
    /// Packed tokens of each pack.
    pack_tokens: Vec<usize>,
}

impl Expansion {
    /// `None` when no pack has more than one member (the packs are the sequences).
    pub fn of(packs: &[Pack]) -> Option<Self> {
        if packs.iter().all(|p| p.members.len() == 1) {
            return None;
        }
        let mut members = Vec::new();
        for (b, pack) in packs.iter().enumerate() {
            for (j, m) in pack.members.iter().enumerate() {
                members.push(Member {
                    pack: b,
                    first: j == 0,
                    shared: pack.shared,
                    sources: (0..m.ids.len()).map(|u| pack.row(j, u)).collect(),
                });
            }
        }
        Some(Self {
            lengths: members.iter().map(|m| m.sources.len()).collect(),
            members,
            pack_tokens: packs.iter().map(Pack::tokens).collect(),
        })
    }

    /// Floats of the members' sequences with `kv` heads of `run` floats per position.
    pub fn expanded_len(&self, kv: usize, run: usize) -> usize {
        self.lengths.iter().sum::<usize>() * kv * run
    }

    /// Floats of the packed rows with `kv` heads of `run` floats per position.
    pub fn packed_len(&self, kv: usize, run: usize) -> usize {
        self.pack_tokens.iter().sum::<usize>() * kv * run
    }

    /// Grouped rows (per pack and key/value head: `run` floats per position, as the engine lays
    /// out heads) copied into each member's attention sequence. With `shared_once`, a shared
    /// row goes to the pack's first member only (zero elsewhere): gradients of outputs that
    /// the first member alone delivers.
    /// `out` is zeros of [`Self::expanded_len`].
    pub fn gather(
        &self,
        packed: &[f32],
        kv: usize,
        run: usize,
        shared_once: bool,
        mut out: Vec<f32>,
    ) -> Vec<f32> {
        let starts = offsets(self.pack_tokens.iter().map(|&n| n * kv * run));
        let sizes: Vec<usize> = self.lengths.iter().map(|&n| n * kv * run).collect();
        debug_assert_eq!(out.len(), self.expanded_len(kv, run));
        split_mut(&mut out, &sizes)
            .into_par_iter()
            .zip(&self.members)
            .for_each(|(out, m)| {
                let (start, tokens, len) =
                    (starts[m.pack], self.pack_tokens[m.pack], m.sources.len());
                for g in 0..kv {
                    for (t, &src) in m.sources.iter().enumerate() {
                        if shared_once && !m.first && t < m.shared {
                            continue;
                        }
                        let from = start + (g * tokens + src) * run;
                        let to = (g * len + t) * run;
                        out[to..to + run].copy_from_slice(&packed[from..from + run]);
                    }
                }
            });
        out
    }

    /// The members' rows folded back into packed rows: shared rows from each pack's first
    /// member (outputs), or, with `add`, summed over members (gradients).
    /// `out` is zeros of [`Self::packed_len`].
    pub fn scatter(
        &self,
        expanded: &[f32],
        kv: usize,
        run: usize,
        add: bool,
        mut out: Vec<f32>,
    ) -> Vec<f32> {
        let sizes: Vec<usize> = self.pack_tokens.iter().map(|&n| n * kv * run).collect();
        let member_starts = offsets(self.lengths.iter().map(|&n| n * kv * run));
        debug_assert_eq!(out.len(), self.packed_len(kv, run));
        split_mut(&mut out, &sizes)
            .into_par_iter()
            .enumerate()
            .for_each(|(b, out)| {
                let tokens = self.pack_tokens[b];
                for (m, &start) in self.members.iter().zip(&member_starts) {
                    if m.pack != b {
                        continue;
                    }
                    let len = m.sources.len();
                    for g in 0..kv {
                        for (t, &src) in m.sources.iter().enumerate() {
                            if !add && !m.first && t < m.shared {
                                continue;
                            }
                            let from = start + (g * len + t) * run;
                            let to = (g * tokens + src) * run;
                            let (to, from) = (&mut out[to..to + run], &expanded[from..from + run]);
                            if add {
                                to.iter_mut().zip(from).for_each(|(a, b)| *a += b);
                            } else {
                                to.copy_from_slice(from);
                            }
                        }
                    }
                }
            });
        out
    }
}

/// Running starts of consecutive pieces of the given sizes.
fn offsets(sizes: impl Iterator<Item = usize>) -> Vec<usize> {
    let mut at = 0;
    sizes
        .map(|n| {
            let start = at;
            at += n;
            start
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq<'a>(ids: &'a [u32], weights: &'a [f32]) -> Sequence<'a> {
        Sequence { ids, weights }
    }

    #[test]
    fn sequences_sharing_an_unweighted_prefix_are_packed() {
        let prompt: Vec<u32> = (0..10).collect();
        let a: Vec<u32> = prompt.iter().copied().chain([50, 51]).collect();
        let b: Vec<u32> = prompt.iter().copied().chain([60]).collect();
        let c: Vec<u32> = (100..120).collect();
        let w = |n: usize, from: usize| -> Vec<f32> {
            (0..n).map(|t| if t >= from { 1.0 } else { 0.0 }).collect()
        };
        let (wa, wb, wc) = (w(12, 10), w(11, 10), w(20, 5));
        let batch = vec![seq(&a, &wa), seq(&b, &wb), seq(&c, &wc)];
        let packs = packs(&batch, 8);
        assert_eq!(packs.len(), 2);
        assert_eq!((packs[0].members.len(), packs[0].shared), (2, 10));
        assert_eq!(packs[0].tokens(), 10 + 2 + 1);
        let ids: Vec<u32> = packs[0].ids().collect();
        assert_eq!(ids[10..], [50, 51, 60]);
        let positions: Vec<usize> = packs[0].positions().collect();
        assert_eq!(positions[10..], [10, 11, 10]);
        assert_eq!((packs[0].row(1, 10), packs[0].row(1, 3)), (12, 3));
        // A weight on a shared position stops the sharing there.
        let wb_early = w(11, 9);
        let batch = vec![seq(&a, &wa), seq(&b, &wb_early)];
        assert_eq!(super::packs(&batch, 8)[0].shared, 9);
        assert_eq!(super::packs(&batch, 10).len(), 2);
    }

    /// Gathering then scattering gives the packed rows back (outputs), and summing counts each
    /// shared row once per member (gradients).
    #[test]
    fn gather_and_scatter_invert_each_other() {
        let prompt: Vec<u32> = (0..8).collect();
        let a: Vec<u32> = prompt.iter().copied().chain([9]).collect();
        let b: Vec<u32> = prompt.iter().copied().chain([10, 11]).collect();
        let (wa, wb) = (vec![0.0; 9], vec![0.0; 10]);
        let batch = vec![seq(&a, &wa), seq(&b, &wb)];
        let packs = packs(&batch, 8);
        let expansion = Expansion::of(&packs).unwrap();
        assert_eq!(expansion.lengths, [9, 10]);
        let (kv, run) = (2, 3);
        let packed: Vec<f32> = (0..packs[0].tokens() * kv * run)
            .map(|i| i as f32)
            .collect();
        let zeros = |n: usize| vec![0f32; n];
        let (e_len, p_len) = (
            expansion.expanded_len(kv, run),
            expansion.packed_len(kv, run),
        );
        let expanded = expansion.gather(&packed, kv, run, false, zeros(e_len));
        assert_eq!(expanded.len(), 19 * kv * run);
        assert_eq!(
            expansion.scatter(&expanded, kv, run, false, zeros(p_len)),
            packed
        );
        let summed = expansion.scatter(&expanded, kv, run, true, zeros(p_len));
        let shared_row = 0; // head 0, position 0: in both members
        let own_row = 8 * run; // head 0, member a's own token
        assert_eq!(summed[shared_row + 1], 2.0 * packed[shared_row + 1]);
        assert_eq!(summed[own_row], packed[own_row]);
        let once = expansion.gather(&packed, kv, run, true, zeros(e_len));
        let b_start = 9 * kv * run;
        assert!(once[b_start..b_start + 8 * run].iter().all(|&v| v == 0.0));
        assert_eq!(once[b_start + 8 * run], expanded[b_start + 8 * run]);
    }
}
