//! A projection, dense or factored (an SVF target), forward and backward.

use super::*;

impl Projection {
    /// `x Wᵀ (+ b)` for `n` rows of x; a factored projection also returns h = x V (n × rank).
    pub(super) fn forward(
        &self,
        x: &[f32],
        n: usize,
        scaled_s: &[Vec<f32>],
        pool: &Pool,
    ) -> (Vec<f32>, Option<Vec<f32>>) {
        let mut y = pool.zeros(n * self.out);
        let hidden = match &self.weight {
            Weight::Dense(w) => {
                w.forward.product(&mut y, x, n, false, pool);
                None
            }
            Weight::Factored { u, vt, target } => {
                let mut h = pool.zeros(n * vt.rows);
                vt.forward.product(&mut h, x, n, false, pool);
                let mut scaled = pool.copy_of(&h);
                scale_columns(&mut scaled, &scaled_s[*target]);
                u.forward.product(&mut y, &scaled, n, false, pool);
                pool.give([scaled]);
                Some(h)
            }
        };
        if let Some(b) = &self.bias {
            y.par_chunks_mut(self.out)
                .for_each(|row| row.iter_mut().zip(b).for_each(|(y, b)| *y += b));
        }
        (y, hidden)
    }

    /// Writes (or with `accumulate` adds) ∂L/∂x into `grad_x`, and for a factored projection
    /// adds ∂L/∂s' = Σ_rows (∂y U) ⊙ h into `grad_s`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward(
        &self,
        grad_y: &[f32],
        n: usize,
        hidden: &Option<Vec<f32>>,
        scaled_s: &[Vec<f32>],
        grad_x: &mut [f32],
        accumulate: bool,
        grad_s: &mut [Vec<f32>],
        pool: &Pool,
    ) {
        match (&self.weight, hidden) {
            (Weight::Dense(w), _) => w.backward.product(grad_x, grad_y, n, accumulate, pool),
            (Weight::Factored { u, vt, target }, Some(h)) => {
                let rank = vt.rows;
                let mut g = pool.zeros(n * rank);
                u.backward.product(&mut g, grad_y, n, false, pool);
                for (g, h) in g.chunks(rank).zip(h.chunks(rank)) {
                    for ((acc, g), h) in grad_s[*target].iter_mut().zip(g).zip(h) {
                        *acc += g * h;
                    }
                }
                scale_columns(&mut g, &scaled_s[*target]);
                vt.backward.product(grad_x, &g, n, accumulate, pool);
                pool.give([g]);
            }
            (Weight::Factored { .. }, None) => {
                unreachable!("a factored projection's forward pass keeps Vᵀx")
            }
        }
    }
}
