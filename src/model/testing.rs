//! Tiny random models for fast tests of shapes, masks, caches and gradients. Deterministic for a
//! seed; never a stand-in for the real model in tests of behaviour.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

use super::config::{Architecture, ModelConfig};

/// The architecture fixtures under `tests/fixtures/arch` (made by
/// `scripts/make-arch-fixtures.py`): small random-weight models of each family with
/// transformers' logits for one sequence, which the forward pass and the training engine are
/// held to.
pub const ARCH_FIXTURES: [&str; 15] = [
    "llama3",
    "qwen2",
    "qwen3",
    "smollm3",
    "mistral",
    "yarn",
    "linear",
    "phi3",
    "longrope",
    "longrope_short",
    "phi4mini",
    "gemma2",
    "gemma3",
    "gemma2_gguf",
    "gemma3_gguf",
];

/// A 2-layer GQA config small enough to run in milliseconds. Qwen3's heads are wider than
/// hidden / heads, as in the released models.
pub fn tiny_config(architecture: Architecture) -> ModelConfig {
    ModelConfig {
        architecture,
        hidden_size: 32,
        intermediate_size: 48,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: if architecture.qk_norm() { 12 } else { 8 },
        vocab_size: 64,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-5,
        max_position_embeddings: 128,
        tie_word_embeddings: true,
        rope_scaling: None,
        sliding_window: None,
        // SmolLM3 leaves every fourth layer unrotated; the second here, so two layers have one.
        layers_without_rope: match architecture.no_rope_interval() {
            Some(_) => vec![1],
            None => vec![],
        },
        // Both Gemmas' features on: soft caps (Gemma 2's), a local rotation base (Gemma 3's),
        // an attention scale other than head_dim's.
        gemma: architecture.is_gemma().then(|| super::config::Gemma {
            query_pre_attn_scalar: 12,
            attn_softcap: Some(5.0),
            final_softcap: Some(3.0),
            local_layers: vec![0],
            local_rope_theta: Some(100.0),
        }),
        partial_rotary_dim: None,
    }
}

/// Random canonical-name weights for `config` (biases too when the architecture has them).
pub fn random_weights(
    config: &ModelConfig,
    seed: u64,
    device: &Device,
) -> BTreeMap<String, Tensor> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut tensor = |rows: usize, cols: usize, scale: f32| {
        let data: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-scale..scale))
            .collect();
        Tensor::from_vec(data, (rows, cols), device).expect("shape matches data")
    };
    let (h, i, d) = (
        config.hidden_size,
        config.intermediate_size,
        config.head_dim,
    );
    let (q_out, kv_out) = (config.num_heads * d, config.num_kv_heads * d);
    let mut w = BTreeMap::new();
    w.insert(
        "embed.weight".to_string(),
        tensor(config.vocab_size, h, 1.0),
    );
    w.insert(
        "norm.weight".to_string(),
        (tensor(1, h, 0.2).squeeze(0).expect("1×h") + 1.0).expect("add"),
    );
    for l in 0..config.num_layers {
        let p = |m: &str| format!("layers.{l}.{m}");
        for (name, rows, cols) in [
            ("attn.q_proj", q_out, h),
            ("attn.k_proj", kv_out, h),
            ("attn.v_proj", kv_out, h),
            ("attn.o_proj", h, q_out),
            ("mlp.gate_proj", i, h),
            ("mlp.up_proj", i, h),
            ("mlp.down_proj", h, i),
        ] {
            w.insert(p(&format!("{name}.weight")), tensor(rows, cols, 0.3));
        }
        if config.architecture.qkv_bias() {
            for (name, rows) in [
                ("attn.q_proj", q_out),
                ("attn.k_proj", kv_out),
                ("attn.v_proj", kv_out),
            ] {
                w.insert(
                    p(&format!("{name}.bias")),
                    tensor(1, rows, 0.1).squeeze(0).expect("1×n"),
                );
            }
        }
        let out_norms: &[&str] = match config.architecture.is_gemma() {
            true => &["attn_out_norm", "mlp_out_norm"],
            false => &[],
        };
        for norm in ["attn_norm", "mlp_norm"].iter().chain(out_norms) {
            w.insert(
                p(&format!("{norm}.weight")),
                (tensor(1, h, 0.2).squeeze(0).expect("1×h") + 1.0).expect("add"),
            );
        }
        if config.architecture.qk_norm() {
            for norm in ["attn.q_norm", "attn.k_norm"] {
                w.insert(
                    p(&format!("{norm}.weight")),
                    (tensor(1, d, 0.5).squeeze(0).expect("1×d") + 1.0).expect("add"),
                );
            }
        }
    }
    w
}
