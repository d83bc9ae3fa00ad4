//! Products and views over the engine's flat f32 buffers.

use rayon::prelude::*;
use tsq_linalg::{Mat, MatMut, Threads, matmul};

use super::QUERY_BLOCK;

/// `c = a · b` (or `c += a · b`) for a contiguous `c`, on all threads: the large products.
pub(super) fn product(c: &mut [f32], a: Mat, b: Mat, accumulate: bool) {
    let (rows, cols) = (a.shape().0, b.shape().1);
    matmul(MatMut::new(c, rows, cols), a, b, accumulate, Threads::All);
}

/// (first, end) positions of each query block of a sequence of `len` tokens.
pub(super) fn query_blocks(len: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..len)
        .step_by(QUERY_BLOCK)
        .map(move |first| (first, (first + QUERY_BLOCK).min(len)))
}

pub(super) fn scale_columns(m: &mut [f32], scale: &[f32]) {
    m.par_chunks_mut(scale.len())
        .for_each(|row| row.iter_mut().zip(scale).for_each(|(v, s)| *v *= s));
}

/// `buf` cut into consecutive pieces of `sizes`.
pub(super) fn split<'a>(mut buf: &'a [f32], sizes: &[usize]) -> Vec<&'a [f32]> {
    sizes
        .iter()
        .map(|&n| {
            let (head, rest) = buf.split_at(n);
            buf = rest;
            head
        })
        .collect()
}

pub(crate) fn split_mut<'a>(mut buf: &'a mut [f32], sizes: &[usize]) -> Vec<&'a mut [f32]> {
    sizes
        .iter()
        .map(|&n| {
            let (head, rest) = std::mem::take(&mut buf).split_at_mut(n);
            buf = rest;
            head
        })
        .collect()
}

pub(super) fn split_groups<'a>(
    buf: &'a [f32],
    groups: &[usize],
    size: impl Fn(usize) -> usize,
) -> Vec<&'a [f32]> {
    split(
        buf,
        &groups.iter().map(|&len| size(len)).collect::<Vec<_>>(),
    )
}

pub(super) fn split_groups_mut<'a>(
    buf: &'a mut [f32],
    groups: &[usize],
    size: impl Fn(usize) -> usize,
) -> Vec<&'a mut [f32]> {
    split_mut(
        buf,
        &groups.iter().map(|&len| size(len)).collect::<Vec<_>>(),
    )
}
