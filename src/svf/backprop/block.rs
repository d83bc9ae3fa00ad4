//! One transformer block of the training engine: its forward pass keeping what the backward
//! pass needs, and that backward pass.

use super::*;

/// Indices of [`Layer::out_norms`].
const ATTENTION: usize = 0;
const MLP: usize = 1;

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
        let mut heads_of = |slot: usize, count: usize, rotation: Option<Tables>| {
            let mut tokens = project(slot, &normed);
            if let Some(weight) = layer.head_norm(slot) {
                let (normed, input) = self.norm(tokens, weight);
                head_norms.push(input);
                tokens = normed;
            }
            let grouped = self.to_heads(&tokens, pass, count, rotation);
            pool.give([tokens]);
            grouped
        };
        let q = heads_of(Q, heads, layer.rotation);
        let k = heads_of(K, kv_heads, layer.rotation);
        let v = heads_of(V, kv_heads, None);
        let Attended {
            q,
            k,
            v,
            probs,
            out,
        } = self.attend(q, k, v, pass, layer.window);
        let attended = self.to_tokens(&out, pass, heads, None);
        let attn_out = project(O, &attended);
        pool.give([out, attended]);
        let mut out_norms = Vec::new();
        let mut x_mid = self.out_norm(layer, ATTENTION, attn_out, &mut out_norms);
        x_mid.par_iter_mut().zip(&x).for_each(|(o, x)| *o += x);

        let mut inv_rms_mlp = pool.zeros(n);
        kernels::rms_norm(&x_mid, &layer.mlp_norm, eps, &mut normed, &mut inv_rms_mlp);
        let gate = project(GATE, &normed);
        let up = project(UP, &normed);
        let mut gated = pool.zeros(gate.len());
        pool.give([normed]);
        (c.architecture.activation()).gated(&gate, &up, &mut gated);
        let down = project(DOWN, &gated);
        pool.give([gated]);
        let mut y = self.out_norm(layer, MLP, down, &mut out_norms);
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
            out_norms,
        };
        (y, keep)
    }

    /// Each `weight`-wide row of `rows` RMS-normalised with `weight` (a head norm on q's or
    /// k's heads, an output norm on tokens), and what the backward pass needs.
    fn norm(&self, rows: Vec<f32>, weight: &[f32]) -> (Vec<f32>, NormInput) {
        let eps = self.config.rms_norm_eps as f32;
        let mut normed = self.pool.zeros(rows.len());
        let mut inv_rms = self.pool.zeros(rows.len() / weight.len());
        kernels::rms_norm(&rows, weight, eps, &mut normed, &mut inv_rms);
        (normed, NormInput { x: rows, inv_rms })
    }

    /// The gradient of a norm's input from that of its output.
    fn norm_backward(&self, grad: &[f32], weight: &[f32], input: NormInput) -> Vec<f32> {
        let mut grad_x = self.pool.zeros(grad.len());
        kernels::rms_norm_backward(&input.x, weight, &input.inv_rms, grad, &mut grad_x);
        self.pool.give([input.x, input.inv_rms]);
        grad_x
    }

    /// The attention's or the MLP's output `y` (`which`) through the layer's norm of it, where
    /// it has one (Gemma), keeping the norm's input in `kept`.
    fn out_norm(
        &self,
        layer: &Layer,
        which: usize,
        y: Vec<f32>,
        kept: &mut Vec<NormInput>,
    ) -> Vec<f32> {
        let Some(weights) = &layer.out_norms else {
            return y;
        };
        let (normed, input) = self.norm(y, &weights[which]);
        kept.push(input);
        normed
    }

    /// The gradient of the output `which` from that of its norm's output (`None`: the layer
    /// has no such norm, the gradient is `grad` itself).
    fn out_norm_backward(
        &self,
        layer: &Layer,
        which: usize,
        grad: &[f32],
        kept: &mut Vec<NormInput>,
    ) -> Option<Vec<f32>> {
        let weights = layer.out_norms.as_ref()?;
        let input = kept.pop().expect("the forward pass kept its input");
        Some(self.norm_backward(grad, &weights[which], input))
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

        // MLP: y = x_mid + out_norm(down(act(gate) ⊙ up)), gate and up of rms_norm(x_mid).
        let mut out_norms = std::mem::take(&mut saved.out_norms);
        let grad_down = self.out_norm_backward(layer, MLP, &grad_y, &mut out_norms);
        let mut grad_gate = pool.zeros(saved.gate.len());
        back(
            DOWN,
            grad_down.as_deref().unwrap_or(&grad_y),
            &mut grad_gate,
            false,
        );
        pool.give(grad_down);
        let mut grad_up = pool.zeros(saved.up.len());
        let activation = c.architecture.activation();
        activation.gated_backward(&saved.gate, &saved.up, &mut grad_gate, &mut grad_up);
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

        // Attention: x_mid = x + out_norm(o(attention(q, k, v))), q, k, v of rms_norm(x).
        let (heads, kv_heads) = (c.num_heads, c.num_kv_heads);
        let grad_o = self.out_norm_backward(layer, ATTENTION, &grad_mid, &mut out_norms);
        let mut grad_attended = pool.zeros(n * heads * c.head_dim);
        back(
            O,
            grad_o.as_deref().unwrap_or(&grad_mid),
            &mut grad_attended,
            false,
        );
        pool.give(grad_o);
        let grad_grouped = self.to_heads(&grad_attended, pass, heads, None);
        let (grad_q, grad_k, grad_v) = self.attend_backward(&saved, &grad_grouped, pass);
        pool.give([grad_attended, grad_grouped]);
        let qkv = [
            (Q, grad_q, heads, layer.rotation),
            (K, grad_k, kv_heads, layer.rotation),
            (V, grad_v, kv_heads, None),
        ];
        let mut head_norms = std::mem::take(&mut saved.head_norms).into_iter();
        for (slot, grouped, count, rotation) in qkv {
            let mut tokens = self.to_tokens(&grouped, pass, count, rotation);
            pool.give([grouped]);
            if let Some(weight) = layer.head_norm(slot) {
                let input = head_norms
                    .next()
                    .expect("the forward pass kept q's and k's");
                let grad = self.norm_backward(&tokens, weight, input);
                pool.give([std::mem::replace(&mut tokens, grad)]);
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
