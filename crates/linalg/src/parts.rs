//! Splitting products' output columns between the threads of the rayon pool.

use std::ops::Range;

use crate::matmul::Threads;

/// The output, shared by the threads that fill disjoint columns of it.
#[derive(Clone, Copy)]
pub(crate) struct Out(pub(crate) *mut f32);
// SAFETY: `in_parts` gives each concurrent part a disjoint range of columns, and the kernels
// write only the columns of their range.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// Runs `part(i, range)` over the columns `0..columns[i]` of several products as if they were
/// the columns of one, in contiguous ranges of multiples of `align` columns (within each
/// product): one range per thread of the pool when `threads` allows it and the work is `large`
/// enough that waking other threads pays, the first on this thread; else all of it here.
/// Several products in one split wake the pool once (a layer's q, k and v products).
pub(crate) fn in_parts(
    columns: &[usize],
    align: usize,
    threads: Threads,
    large: bool,
    part: impl Fn(usize, Range<usize>) + Sync,
) {
    // Each product starts on an aligned column of the whole.
    let starts: Vec<usize> = columns
        .iter()
        .scan(0, |start, &n| {
            let this = *start;
            *start += n.next_multiple_of(align);
            Some(this)
        })
        .collect();
    let total = columns.last().map_or(0, |&n| starts[starts.len() - 1] + n);
    let run = |range: Range<usize>| {
        for (i, (&n, &start)) in columns.iter().zip(&starts).enumerate() {
            let (first, end) = (range.start.max(start), range.end.min(start + n));
            if first < end {
                part(i, first - start..end - start);
            }
        }
    };
    let pieces = match threads {
        Threads::All if large => rayon::current_num_threads(),
        _ => 1,
    };
    let per_piece = total.div_ceil(pieces).next_multiple_of(align);
    if per_piece >= total {
        return run(0..total);
    }
    let run = &run;
    rayon::scope(|s| {
        for start in (per_piece..total).step_by(per_piece) {
            s.spawn(move |_| run(start..(start + per_piece).min(total)));
        }
        run(0..per_piece);
    });
}
