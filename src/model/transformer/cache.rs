//! The KV cache: every layer's keys and values in buffers that grow along the time axis.

use super::*;

impl LayerCache {
    /// Appends (batch, kv_heads, t, head_dim) keys and values; returns views of all of them.
    pub(super) fn append(
        slot: &mut Option<Self>,
        k: Tensor,
        v: Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        let Some(cache) = slot else {
            // The first call keeps its tensors as they are: a call without a cache (scoring,
            // training references) never pays for spare room.
            *slot = Some(Self {
                k: k.clone(),
                v: v.clone(),
                len: t,
            });
            return Ok((k, v));
        };
        let (len, capacity) = (cache.len, cache.k.dim(2)?);
        if len + t > capacity {
            let grown = (2 * capacity).max(len + t);
            cache.k = Self::regrown(&cache.k, len, grown)?;
            cache.v = Self::regrown(&cache.v, len, grown)?;
        }
        cache.k.slice_set(&k.contiguous()?, 2, len)?;
        cache.v.slice_set(&v.contiguous()?, 2, len)?;
        cache.len = len + t;
        Ok((
            cache.k.narrow(2, 0, len + t)?,
            cache.v.narrow(2, 0, len + t)?,
        ))
    }

    /// The first `len` positions of `buffer` after `to - len` zero positions.
    fn left_padded(buffer: &Tensor, len: usize, to: usize) -> Result<Tensor> {
        let filled = buffer.narrow(2, 0, len)?;
        if to == len {
            return Ok(filled.contiguous()?);
        }
        let (b, h, _, d) = buffer.dims4()?;
        let pad = Tensor::zeros((b, h, to - len, d), buffer.dtype(), buffer.device())?;
        Ok(Tensor::cat(&[&pad, &filled], 2)?)
    }

    /// A buffer of `capacity` positions holding the first `len` of `buffer`.
    pub(super) fn regrown(buffer: &Tensor, len: usize, capacity: usize) -> Result<Tensor> {
        let (b, h, _, d) = buffer.dims4()?;
        let grown = Tensor::zeros((b, h, capacity, d), buffer.dtype(), buffer.device())?;
        grown.slice_set(&buffer.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
        Ok(grown)
    }
}

impl KvCache {
    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |l| l.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Puts `other`'s rows after this cache's rows (sequences joining a running batch), the
    /// shorter of the two left-padded to the longer's length. Returns the padding added in front
    /// of this cache's rows and of `other`'s.
    pub fn append_rows(&mut self, other: KvCache) -> Result<(usize, usize)> {
        let (mine, theirs) = (self.len(), other.len());
        if self.layers.iter().all(Option::is_none) {
            *self = other;
            return Ok((0, 0));
        }
        let len = mine.max(theirs);
        for (slot, joining) in self.layers.iter_mut().zip(other.layers) {
            let (Some(cache), Some(joining)) = (slot.as_mut(), joining) else {
                return Err(ModelError::Input("KV caches of different models".into()));
            };
            let rows = |a: &LayerCache, b: &LayerCache, pick: fn(&LayerCache) -> &Tensor| {
                let (a, b) = (
                    LayerCache::left_padded(pick(a), a.len, len)?,
                    LayerCache::left_padded(pick(b), b.len, len)?,
                );
                Ok::<_, ModelError>(Tensor::cat(&[a, b], 0)?)
            };
            let (k, v) = (
                rows(cache, &joining, |c| &c.k)?,
                rows(cache, &joining, |c| &c.v)?,
            );
            *cache = LayerCache { k, v, len };
        }
        Ok((len - mine, len - theirs))
    }

    /// Moves each row's padding `gaps[row]` (positions inside the cached ones) in front of the
    /// row, the other positions keeping their order: a prefix computed once and followed by
    /// left-padded own parts becomes a left-padded cache.
    pub fn move_gaps_to_front(&mut self, gaps: &[Range<usize>]) -> Result<()> {
        if gaps.iter().all(|g| g.start == 0 || g.is_empty()) {
            return Ok(());
        }
        for layer in self.layers.iter_mut().flatten() {
            let len = layer.len;
            let reorder = |buffer: &Tensor| -> Result<Tensor> {
                let rows = gaps
                    .iter()
                    .enumerate()
                    .map(|(b, gap)| {
                        let row = buffer.narrow(0, b, 1)?;
                        let part = |r: &Range<usize>| row.narrow(2, r.start, r.len());
                        let parts = [part(gap)?, part(&(0..gap.start))?, part(&(gap.end..len))?];
                        Ok(Tensor::cat(&parts, 2)?)
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(Tensor::cat(&rows, 0)?)
            };
            layer.k = reorder(&layer.k)?;
            layer.v = reorder(&layer.v)?;
        }
        Ok(())
    }

    /// A copy of the first `n` positions of every row, in buffers of its own: what is appended
    /// to either afterwards (in place, into spare capacity) never shows in the other.
    pub fn head(&self, n: usize) -> Result<KvCache> {
        let layers = self
            .layers
            .iter()
            .map(|slot| {
                slot.as_ref()
                    .map(|layer| {
                        Ok::<_, ModelError>(LayerCache {
                            k: LayerCache::regrown(&layer.k, n, n)?,
                            v: LayerCache::regrown(&layer.v, n, n)?,
                            len: n,
                        })
                    })
                    .transpose()
            })
            .collect::<Result<_>>()?;
        Ok(KvCache { layers })
    }

    /// Bytes its buffers hold, spare capacity included.
    pub fn bytes(&self) -> usize {
        let tensor = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        self.layers
            .iter()
            .flatten()
            .map(|l| tensor(&l.k) + tensor(&l.v))
            .sum()
    }

    /// Drops the first `n` positions of every row (padding no row needs any more).
    pub fn trim_front(&mut self, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        for layer in self.layers.iter_mut().flatten() {
            let len = layer.len - n;
            layer.k = layer.k.narrow(2, n, len)?.contiguous()?;
            layer.v = layer.v.narrow(2, n, len)?.contiguous()?;
            layer.len = len;
        }
        Ok(())
    }

    /// Keeps batch rows `rows`, in that order (a row may repeat): a prompt computed once becomes
    /// its samples' rows, and finished sequences leave the batch.
    pub fn select_rows(&mut self, rows: &[u32]) -> Result<()> {
        for layer in self.layers.iter_mut().flatten() {
            let index = Tensor::new(rows, layer.k.device())?;
            layer.k = layer.k.index_select(&index, 0)?;
            layer.v = layer.v.index_select(&index, 0)?;
        }
        Ok(())
    }
}
