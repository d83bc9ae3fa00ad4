//! Splitting products' output columns between the threads of the rayon pool.

use std::ops::Range;

use crate::matmul::Threads;

/// A weight matrix W (rows × cols) whose kernel fills ranges of the output columns of
/// `x · Wᵀ` (one per row of W): what [`matmul_t_each`] splits between threads.
pub(crate) trait WeightKernel: Sync {
    /// Where a range of output columns may start: the kernel's panel width.
    const ALIGN: usize;
    /// Below this much [`WeightKernel::work`] a product stays on one thread: waking another
    /// costs more.
    const SPLIT_MIN_WORK: usize;

    /// (rows, cols) of W.
    fn shape(&self) -> (usize, usize);

    /// What a product over `m` rows of x costs, in the unit of `SPLIT_MIN_WORK`.
    fn work(&self, m: usize) -> usize;

    /// Output columns `columns` for every row of x (m × cols) into `out` (m × rows).
    ///
    /// # Safety
    /// The matrix exists only where its kernel runs (its constructor checked the CPU); `x`
    /// holds m × cols floats and `out` room for m × rows; `columns` lies within the rows and
    /// starts at a multiple of `ALIGN`; no other thread writes those columns meanwhile.
    unsafe fn fill(&self, x: &[f32], m: usize, out: Out, columns: Range<usize>);
}

/// `x (m × cols) · Wᵀ` for several matrices that read the same x (a layer's q, k and v), their
/// output columns split between threads as those of one product: the pool wakes once for them,
/// not once each.
pub(crate) fn matmul_t_each<const N: usize, W: WeightKernel>(
    matrices: [&W; N],
    x: &[f32],
    m: usize,
    threads: Threads,
) -> [Vec<f32>; N] {
    let mut outs = matrices.map(|w| Vec::with_capacity(m * w.shape().0));
    let targets = outs.each_mut().map(|o| Out(o.as_mut_ptr()));
    // SAFETY: each target has room for m × rows.
    unsafe { fill_each(matrices, x, m, targets, threads) };
    for (out, w) in outs.iter_mut().zip(matrices) {
        // SAFETY: `fill_each` wrote every output column of every matrix, for every row of x.
        unsafe { out.set_len(m * w.shape().0) };
    }
    outs
}

/// [`matmul_t_each`] of one matrix into `out` (m × rows), overwriting it: for callers that
/// keep their buffers.
pub(crate) fn matmul_t_into<W: WeightKernel>(
    matrix: &W,
    x: &[f32],
    m: usize,
    out: &mut [f32],
    threads: Threads,
) {
    assert_eq!(out.len(), m * matrix.shape().0, "out is not {m} × rows");
    // SAFETY: out holds m × rows floats (checked above).
    unsafe { fill_each([matrix], x, m, [Out(out.as_mut_ptr())], threads) }
}

/// Writes every element of `x (m × cols) · Wᵢᵀ` into `targets[i]`.
///
/// # Safety
/// Each target has room for m × rows of its matrix.
unsafe fn fill_each<const N: usize, W: WeightKernel>(
    matrices: [&W; N],
    x: &[f32],
    m: usize,
    targets: [Out; N],
    threads: Threads,
) {
    let shapes = matrices.map(WeightKernel::shape);
    let cols = shapes.first().map_or(0, |&(_, cols)| cols);
    assert!(
        shapes.iter().all(|&(_, c)| c == cols),
        "matrices differ in columns"
    );
    assert_eq!(x.len(), m * cols, "x is not {m} × {cols}");
    let rows = shapes.map(|(rows, _)| rows);
    let work: usize = matrices.iter().map(|w| w.work(m)).sum();
    let part = |i: usize, columns: Range<usize>| {
        // SAFETY: x holds m rows (checked above), each target room for m × rows (the caller
        // vouches); `in_parts` hands out aligned ranges within matrix i's rows, disjoint
        // among the parts running at once.
        unsafe { matrices[i].fill(x, m, targets[i], columns) }
    };
    in_parts(&rows, W::ALIGN, threads, work >= W::SPLIT_MIN_WORK, part);
}

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
fn in_parts(
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
