//! Model hyper-parameters, resolved from GGUF metadata or an HF `config.json` into one runtime
//! config. Missing required values are errors naming the key, never silent defaults.

use serde::{Deserialize, Serialize};

/// The transformer families tsq runs. All are Llama-shaped (RMSNorm, RoPE, SwiGLU, GQA);
/// Qwen2 adds biases on q, k and v.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

impl Architecture {
    pub fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "llama" | "llamaforcausallm" => Some(Self::Llama),
            "mistral" | "mistralforcausallm" => Some(Self::Mistral),
            "qwen2" | "qwen2forcausallm" => Some(Self::Qwen2),
            _ => None,
        }
    }

    pub fn qkv_bias(self) -> bool {
        self == Self::Qwen2
    }
}

/// Why a model's hyper-parameters were refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("unsupported architecture `{0}` (supported: llama, mistral, qwen2)")]
    Unsupported(String),
    #[error("`{field}` is {value}; expected 1 to {max}")]
    SizeOutOfRange {
        field: &'static str,
        value: usize,
        max: usize,
    },
    #[error("`{field}` is {value}; expected a positive number")]
    NotPositive { field: &'static str, value: f64 },
    #[error("{heads} attention heads cannot be shared by {kv_heads} key/value heads")]
    HeadsNotShared { heads: usize, kv_heads: usize },
    #[error("head dimension {0} must be even for rotary embeddings")]
    OddHeadDim(usize),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
}

impl ModelConfig {
    /// Checks the relations between sizes that the forward pass relies on.
    pub fn check(&self) -> Result<(), ConfigError> {
        // Bounds well above any real model: a crafted file must not make tsq allocate without
        // limit (rope tables are context × head_dim, the head vocab × hidden).
        for (field, value, max) in [
            ("hidden_size", self.hidden_size, 1 << 16),
            ("intermediate_size", self.intermediate_size, 1 << 18),
            ("num_layers", self.num_layers, 1024),
            ("num_heads", self.num_heads, 1024),
            ("num_kv_heads", self.num_kv_heads, 1024),
            ("head_dim", self.head_dim, 1024),
            ("vocab_size", self.vocab_size, 1 << 21),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                1 << 17,
            ),
        ] {
            if value == 0 || value > max {
                return Err(ConfigError::SizeOutOfRange { field, value, max });
            }
        }
        for (field, value) in [
            ("rope_theta", self.rope_theta),
            ("rms_norm_eps", self.rms_norm_eps),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return Err(ConfigError::NotPositive { field, value });
            }
        }
        if self.num_heads == 0
            || self.num_kv_heads == 0
            || !self.num_heads.is_multiple_of(self.num_kv_heads)
        {
            return Err(ConfigError::HeadsNotShared {
                heads: self.num_heads,
                kv_heads: self.num_kv_heads,
            });
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(ConfigError::OddHeadDim(self.head_dim));
        }
        Ok(())
    }
}

/// HF `config.json`, as far as tsq reads it.
#[derive(Debug, Deserialize)]
pub struct HfConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

fn default_rope_theta() -> f64 {
    10_000.0
}

fn default_max_positions() -> usize {
    2048
}

impl HfConfig {
    pub fn resolve(&self) -> Result<ModelConfig, ConfigError> {
        let arch_name = self
            .model_type
            .clone()
            .or_else(|| self.architectures.first().cloned())
            .unwrap_or_default();
        let architecture =
            Architecture::parse(&arch_name).ok_or(ConfigError::Unsupported(arch_name))?;
        let config = ModelConfig {
            architecture,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size / self.num_attention_heads.max(1)),
            vocab_size: self.vocab_size,
            rope_theta: self.rope_theta,
            rms_norm_eps: self.rms_norm_eps,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
        };
        config.check()?;
        Ok(config)
    }
}
