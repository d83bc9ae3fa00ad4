//! Splitting a product's output columns between the threads of the rayon pool.

use std::ops::Range;

use crate::matmul::Threads;

/// The output, shared by the threads that fill disjoint columns of it.
#[derive(Clone, Copy)]
pub(crate) struct Out(pub(crate) *mut f32);
// SAFETY: `in_parts` gives each concurrent part a disjoint range of columns, and the kernels
// write only the columns of their range.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// Runs `part` over `0..n` in contiguous ranges, each a multiple of `align` long but the last:
/// one per thread of the pool when `threads` allows it and the product is `large` enough that
/// waking other threads pays, the first on this thread; else all of it here.
pub(crate) fn in_parts(
    n: usize,
    align: usize,
    threads: Threads,
    large: bool,
    part: impl Fn(Range<usize>) + Sync,
) {
    let pieces = match threads {
        Threads::All if large => rayon::current_num_threads(),
        _ => 1,
    };
    let per_piece = n.div_ceil(pieces).next_multiple_of(align);
    if per_piece >= n {
        return part(0..n);
    }
    let part = &part;
    rayon::scope(|s| {
        for start in (per_piece..n).step_by(per_piece) {
            s.spawn(move |_| part(start..(start + per_piece).min(n)));
        }
        part(0..per_piece);
    });
}
