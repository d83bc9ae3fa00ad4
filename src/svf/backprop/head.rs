//! The LM head and its loss, in row chunks, with the gradient into the last hidden state.

use super::*;
use tsq_linalg::wide_fn;

impl Engine {
    /// Floats per position and key/value head: the query heads that share it, or itself.
    pub(super) fn head_run(&self, queries: bool) -> usize {
        let (rep, d) = self.attention_shape();
        if queries { rep * d } else { d }
    }

    /// Members' rows folded back into packed rows (summed with `add`), in a pooled buffer.
    pub(super) fn fold(
        &self,
        e: &Expansion,
        expanded: &[f32],
        queries: bool,
        add: bool,
    ) -> Vec<f32> {
        let (kv, run) = (self.config.num_kv_heads, self.head_run(queries));
        let zeros = self.pool.zeros(e.packed_len(kv, run));
        e.scatter(expanded, kv, run, add, zeros)
    }

    /// `−Σ w log softmax(norm(x_row) headᵀ)[token]` (the logits soft-capped in Gemma 2) over
    /// the scored rows; writes the gradient of
    /// those rows of `x` into `grad_x`. The head runs on [`HEAD_CHUNK_ROWS`] rows at a time, so
    /// full logits never exist for the whole batch.
    pub(super) fn head_loss(&self, x: &[f32], scored: &[Scored], grad_x: &mut [f32]) -> f64 {
        let (hidden, vocab) = (self.config.hidden_size, self.config.vocab_size);
        let eps = self.config.rms_norm_eps as f32;
        let mut loss = 0f64;
        for chunk in scored.chunks(HEAD_CHUNK_ROWS) {
            let rows = chunk.len();
            let picked: Vec<f32> = chunk
                .iter()
                .flat_map(|s| &x[s.row * hidden..(s.row + 1) * hidden])
                .copied()
                .collect();
            let (mut normed, mut inv_rms) = (vec![0f32; picked.len()], vec![0f32; rows]);
            kernels::rms_norm(&picked, &self.norm, eps, &mut normed, &mut inv_rms);
            let mut logits = self.pool.zeros(rows * vocab);
            (self.head.forward).product(&mut logits, &normed, rows, false, &self.pool);
            // In place: logits become w · (softmax − onehot(token)), the gradient of the loss.
            loss += logits
                .par_chunks_mut(vocab)
                .zip(chunk)
                .map(|(row, s)| {
                    let mut loss = 0f64;
                    match self.final_cap {
                        None => loss_gradient(row, s.token as usize, s.weight, &mut loss),
                        Some(cap) => {
                            capped_loss_gradient(row, s.token as usize, s.weight, cap, &mut loss)
                        }
                    }
                    loss
                })
                .sum::<f64>();
            let mut grad_normed = vec![0f32; picked.len()];
            (self.head.backward).product(&mut grad_normed, &logits, rows, false, &self.pool);
            let mut grad_picked = vec![0f32; picked.len()];
            kernels::rms_norm_backward(
                &picked,
                &self.norm,
                &inv_rms,
                &grad_normed,
                &mut grad_picked,
            );
            // Members of a pack predict their first own tokens from the same shared row.
            for (s, g) in chunk.iter().zip(grad_picked.chunks(hidden)) {
                let row = &mut grad_x[s.row * hidden..(s.row + 1) * hidden];
                row.iter_mut().zip(g).for_each(|(a, b)| *a += b);
            }
            self.pool.give([logits]);
        }
        loss
    }
}

wide_fn! {
/// Turns one row of logits into its loss's gradient in place, w · (softmax − onehot(token)),
/// and sets `loss` to −w · log softmax(token).
fn loss_gradient(row: &mut [f32], token: usize, weight: f32, loss: &mut f64) {
    let max = kernels::max(row);
    let picked = row[token] - max;
    row.iter_mut().for_each(|v| *v = kernels::exp(*v - max));
    let total = kernels::sum(row) as f64;
    let scale = weight / total as f32;
    row.iter_mut().for_each(|v| *v *= scale);
    row[token] -= weight;
    *loss = -(weight as f64) * (picked as f64 - total.ln());
}
}

wide_fn! {
/// [`loss_gradient`] of soft-capped logits c = cap · tanh(l / cap), with respect to l: the
/// softmax's gradient times 1 − (c / cap)². The exponentials are taken twice (a sum, then
/// each gradient), so that c stays in the row until its derivative is taken.
fn capped_loss_gradient(row: &mut [f32], token: usize, weight: f32, cap: f32, loss: &mut f64) {
    row.iter_mut().for_each(|v| *v = cap * kernels::tanh(*v / cap));
    let max = kernels::max(row);
    let picked = row[token] - max;
    let total = kernels::sum_exp(row, max) as f64;
    let scale = weight / total as f32;
    let derivative = |c: f32| 1.0 - (c / cap) * (c / cap);
    let at_token = derivative(row[token]);
    row.iter_mut().for_each(|v| *v = scale * kernels::exp(*v - max) * derivative(*v));
    row[token] -= weight * at_token;
    *loss = -(weight as f64) * (picked as f64 - total.ln());
}
}
