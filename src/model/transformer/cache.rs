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
