//! One transformer block of the training engine: its forward pass keeping what the backward
//! pass needs, and that backward pass.

use super::*;

impl Engine {
    pub(super) fn block_forward(
        &self,
        layer: &Layer,
        x: Vec<f32>,
        pass: &Pass,
        scaled_s: &[Vec<f32>],
    ) -> (Vec<f32>, Saved) {
        let c = &self.config;
        let (n, eps) = (pass.tokens, c.rms_norm_eps as f32);
        let p = &layer.projections;
        let mut hidden: [Option<Vec<f32>>; 7] = Default::default();
        let pool = &self.pool;
        let mut project = |slot: usize, input: &[f32]| {
            let (y, h) = p[slot].forward(input, n, scaled_s, pool);
            hidden[slot] = h;
            y
        };

        let mut normed = pool.zeros(x.len());
        let mut inv_rms_attn = pool.zeros(n);
        kernels::rms_norm(&x, &layer.attn_norm, eps, &mut normed, &mut inv_rms_attn);
        let (heads, kv_heads) = (c.num_heads, c.num_kv_heads);
        let mut head_norms = Vec::new();
        let mut heads_of = |slot: usize, count: usize, rotate: bool| {
            let mut tokens = project(slot, &normed);
            if let Some(weight) = layer.head_norm(slot) {
                let (normed, input) = self.head_norm(tokens, weight);
                head_norms.push(input);
                tokens = normed;
            }
            let grouped = self.to_heads(&tokens, pass, count, rotate);
            pool.give([tokens]);
            grouped
        };
        let q = heads_of(Q, heads, layer.rotate);
        let k = heads_of(K, kv_heads, layer.rotate);
        let v = heads_of(V, kv_heads, false);
        let Attended {
            q,
            k,
            v,
            probs,
            out,
        } = self.attend(q, k, v, pass);
        let attended = self.to_tokens(&out, pass, heads, false);
        let mut x_mid = project(O, &attended);
        pool.give([out, attended]);
        x_mid.par_iter_mut().zip(&x).for_each(|(o, x)| *o += x);

        let mut inv_rms_mlp = pool.zeros(n);
        kernels::rms_norm(&x_mid, &layer.mlp_norm, eps, &mut normed, &mut inv_rms_mlp);
        let gate = project(GATE, &normed);
        let up = project(UP, &normed);
        let mut gated = pool.zeros(gate.len());
        pool.give([normed]);
        kernels::silu_mul(&gate, &up, &mut gated);
        let mut y = project(DOWN, &gated);
        pool.give([gated]);
        y.par_iter_mut().zip(&x_mid).for_each(|(y, x)| *y += x);
        let keep = Saved {
            x,
            inv_rms_attn,
            q,
            k,
            v,
            probs,
            x_mid,
            inv_rms_mlp,
            gate,
            up,
            hidden,
            head_norms,
        };
        (y, keep)
    }

    /// Each head's row of `tokens` (a q or k projection) RMS-normalised with `weight`, and
    /// what the backward pass needs.
    fn head_norm(&self, tokens: Vec<f32>, weight: &[f32]) -> (Vec<f32>, HeadNormInput) {
        let eps = self.config.rms_norm_eps as f32;
        let mut normed = self.pool.zeros(tokens.len());
        let mut inv_rms = self.pool.zeros(tokens.len() / weight.len());
        kernels::rms_norm(&tokens, weight, eps, &mut normed, &mut inv_rms);
        (normed, HeadNormInput { x: tokens, inv_rms })
    }

    /// The gradient of a head norm's input from that of its output.
    fn head_norm_backward(&self, grad: Vec<f32>, weight: &[f32], input: HeadNormInput) -> Vec<f32> {
        let mut grad_x = self.pool.zeros(grad.len());
        kernels::rms_norm_backward(&input.x, weight, &input.inv_rms, &grad, &mut grad_x);
        self.pool.give([grad, input.x, input.inv_rms]);
        grad_x
    }

    pub(super) fn block_backward(
        &self,
        layer: &Layer,
        mut saved: Saved,
        grad_y: Vec<f32>,
        pass: &Pass,
        scaled_s: &[Vec<f32>],
        grad_s: &mut [Vec<f32>],
    ) -> Vec<f32> {
        let c = &self.config;
        let n = pass.tokens;
        let p = &layer.projections;
        let pool = &self.pool;
        let mut back = |slot: usize, grad: &[f32], grad_x: &mut [f32], accumulate: bool| {
            let hidden = &saved.hidden[slot];
            p[slot].backward(grad, n, hidden, scaled_s, grad_x, accumulate, grad_s, pool)
        };

        // MLP: y = x_mid + down(silu(gate) ⊙ up), gate and up of rms_norm(x_mid).
        let mut grad_gate = pool.zeros(saved.gate.len());
        back(DOWN, &grad_y, &mut grad_gate, false);
        let mut grad_up = pool.zeros(saved.up.len());
        kernels::silu_mul_backward(&saved.gate, &saved.up, &mut grad_gate, &mut grad_up);
        let mut grad_normed = pool.zeros(grad_y.len());
        back(GATE, &grad_gate, &mut grad_normed, false);
        back(UP, &grad_up, &mut grad_normed, true);
        pool.give([grad_gate, grad_up]);
        let mut grad_mid = grad_y;
        kernels::rms_norm_backward(
            &saved.x_mid,
            &layer.mlp_norm,
            &saved.inv_rms_mlp,
            &grad_normed,
            &mut grad_mid,
        );

        // Attention: x_mid = x + o(attention(q, k, v)), q, k, v of rms_norm(x).
        let (heads, kv_heads) = (c.num_heads, c.num_kv_heads);
        let mut grad_attended = pool.zeros(n * heads * c.head_dim);
        back(O, &grad_mid, &mut grad_attended, false);
        let grad_grouped = self.to_heads(&grad_attended, pass, heads, false);
        let (grad_q, grad_k, grad_v) = self.attend_backward(&saved, &grad_grouped, pass);
        pool.give([grad_attended, grad_grouped]);
        let qkv = [
            (Q, grad_q, heads, layer.rotate),
            (K, grad_k, kv_heads, layer.rotate),
            (V, grad_v, kv_heads, false),
        ];
        let mut head_norms = std::mem::take(&mut saved.head_norms).into_iter();
        for (slot, grouped, count, rotate) in qkv {
            let mut tokens = self.to_tokens(&grouped, pass, count, rotate);
            pool.give([grouped]);
            if let Some(weight) = layer.head_norm(slot) {
                let input = head_norms
                    .next()
                    .expect("the forward pass kept q's and k's");
                tokens = self.head_norm_backward(tokens, weight, input);
            }
            back(slot, &tokens, &mut grad_normed, slot != Q);
            pool.give([tokens]);
        }
        let mut grad_x = grad_mid;
        kernels::rms_norm_backward(
            &saved.x,
            &layer.attn_norm,
            &saved.inv_rms_attn,
            &grad_normed,
            &mut grad_x,
        );
        pool.give([grad_normed]);
        saved.recycle(pool);
        grad_x
    }
}
