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
        let input = Mat::new(x, n, self.inp);
        let hidden = match &self.weight {
            Weight::Dense(w) => {
                product(&mut y, input, w.mat_t(), false);
                None
            }
            Weight::Factored { u, vt, target } => {
                let mut h = pool.zeros(n * vt.rows);
                product(&mut h, input, vt.mat_t(), false);
                let mut scaled = pool.copy_of(&h);
                scale_columns(&mut scaled, &scaled_s[*target]);
                product(&mut y, Mat::new(&scaled, n, vt.rows), u.mat_t(), false);
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
        let grad_y = Mat::new(grad_y, n, self.out);
        match (&self.weight, hidden) {
            (Weight::Dense(w), _) => product(grad_x, grad_y, w.mat(), accumulate),
            (Weight::Factored { u, vt, target }, Some(h)) => {
                let rank = vt.rows;
                let mut g = pool.zeros(n * rank);
                product(&mut g, grad_y, u.mat(), false);
                for (g, h) in g.chunks(rank).zip(h.chunks(rank)) {
                    for ((acc, g), h) in grad_s[*target].iter_mut().zip(g).zip(h) {
                        *acc += g * h;
                    }
                }
                scale_columns(&mut g, &scaled_s[*target]);
                product(grad_x, Mat::new(&g, n, rank), vt.mat(), accumulate);
                pool.give([g]);
            }
            (Weight::Factored { .. }, None) => {
                unreachable!("a factored projection's forward pass keeps Vᵀx")
            }
        }
    }
}
