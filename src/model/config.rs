//! Model hyper-parameters, resolved from GGUF metadata or an HF `config.json` into one runtime
//! config. Missing required values are errors naming the key, never silent defaults.

use serde::{Deserialize, Serialize};

use super::kernels::Activation;

/// The transformer families tsq runs. All are Llama-shaped (RMSNorm, RoPE, SwiGLU, GQA);
/// Qwen2 adds biases on q, k and v; Qwen3 instead RMS-normalises each head's query and key
/// before the rotation (and sets its head size apart from hidden / heads); SmolLM3 leaves the
/// rotation out of some layers (every fourth as released: "NoPE" layers); Phi-3 stores q|k|v and
/// gate|up as fused matrices, split at load. Gemma 2 and 3 differ most ([`Gemma`]): embeddings
/// scaled by √hidden, RMS norms by (1 + w) (folded into w at load), a norm after attention and
/// after the MLP too, GELU (tanh) gating, their own attention scale; Gemma 2 soft-caps attention
/// scores and logits, Gemma 3 normalises q and k per head and rotates its sliding-window layers
/// with a base of their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    SmolLm3,
    Phi3,
    Gemma2,
    #[serde(rename = "gemma3_text")]
    Gemma3,
}

impl Architecture {
    pub fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "llama" | "llamaforcausallm" => Some(Self::Llama),
            "mistral" | "mistralforcausallm" => Some(Self::Mistral),
            "qwen2" | "qwen2forcausallm" => Some(Self::Qwen2),
            "qwen3" | "qwen3forcausallm" => Some(Self::Qwen3),
            "smollm3" | "smollm3forcausallm" => Some(Self::SmolLm3),
            "phi3" | "phi3forcausallm" => Some(Self::Phi3),
            "gemma2" | "gemma2forcausallm" => Some(Self::Gemma2),
            "gemma3_text" | "gemma3forcausallm" => Some(Self::Gemma3),
            _ => None,
        }
    }

    /// The MLP's gating function: GELU for Gemma, SiLU for the others.
    pub fn activation(self) -> Activation {
        match self.is_gemma() {
            true => Activation::GeluTanh,
            false => Activation::Silu,
        }
    }

    pub fn qkv_bias(self) -> bool {
        self == Self::Qwen2
    }

    /// Whether each attention head's query and key pass an RMS norm of their own (weights
    /// `attn.q_norm` / `attn.k_norm`, head_dim long) before the rotation.
    pub fn qk_norm(self) -> bool {
        matches!(self, Self::Qwen3 | Self::Gemma3)
    }

    /// Gemma 2 or 3 (see [`Gemma`]).
    pub fn is_gemma(self) -> bool {
        matches!(self, Self::Gemma2 | Self::Gemma3)
    }

    /// Every `n`-th layer (counting from 1) without rotary embeddings, where a config does not
    /// list them: SmolLM3's default, and what llama.cpp assumes for its GGUFs.
    pub fn no_rope_interval(self) -> Option<usize> {
        (self == Self::SmolLm3).then_some(4)
    }
}

/// Why a model's hyper-parameters were refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "unsupported architecture `{0}` (supported: llama, mistral, qwen2, qwen3, smollm3, phi3, \
         gemma2, gemma3_text)"
    )]
    Unsupported(String),
    #[error(
        "`partial_rotary_factor` is {fraction}: expected a fraction of the heads' {head_dim} \
         dimensions that is an even number of them, at least two"
    )]
    PartialRotary { fraction: f64, head_dim: usize },
    #[error(
        "GGUF `rope.dimension_count` rotates {rotated} of each head's {head_dim} dimensions: \
         partial rotation is read from a model's HF directory (config.json), not from GGUF"
    )]
    GgufPartialRotary { rotated: usize, head_dim: usize },
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
    #[error(
        "`rope_scaling` of type `{0}` is not supported (supported: `llama3`, `yarn`, `linear`, \
         `longrope`; none for no scaling)"
    )]
    UnsupportedRopeScaling(String),
    #[error(
        "GGUF rope scaling `{0}` is not supported (supported: `linear`, and `llama3` as \
         llama.cpp's `rope_freqs`; `yarn` from the model's HF directory)"
    )]
    UnsupportedGgufRopeScaling(String),
    #[error("`rope_scaling`: {0}")]
    BadRopeScaling(String),
    #[error("`no_rope_layers` has {0} flags for {1} layers")]
    BadNoRopeLayers(usize, usize),
    #[error("`hidden_act` is `{found}`; tsq computes this family's MLP with `{expected}`")]
    UnsupportedActivation {
        found: String,
        expected: &'static str,
    },
    #[error("`{field}`: {message}")]
    BadGemma {
        field: &'static str,
        message: String,
    },
}

/// How rotary frequencies are rescaled for contexts longer than the model was pretrained on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    /// Llama 3.1+ (HF `rope_type: llama3`): wavelengths longer than the original context /
    /// `low_freq_factor` are stretched by `factor`, those shorter than original /
    /// `high_freq_factor` kept, and those between interpolated smoothly.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_context: usize,
    },
    /// One divisor per frequency, as llama.cpp stores scaling in GGUF (`rope_freqs.weight`).
    Divisors(Vec<f32>),
    /// Positions divided by `factor` (HF `rope_type: linear`): every frequency divided.
    Linear { factor: f64 },
    /// YaRN (HF `rope_type: yarn`, Qwen2.5's long-context setting).
    Yarn(Yarn),
    /// LongRoPE (HF `rope_type: longrope`: Phi-3 128k, Phi-3.5): one divisor per frequency,
    /// `short` for sequences within the original context and `long` past it; cos and sin
    /// scaled by `attention_factor` either way.
    LongRope(LongRope),
}

/// LongRoPE's parameters (see [`RopeScaling::LongRope`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LongRope {
    pub short: Vec<f32>,
    pub long: Vec<f32>,
    /// `original_max_position_embeddings`: sequences longer than this take `long`.
    pub original_context: usize,
    pub attention_factor: f64,
}

impl RopeScaling {
    /// The scaling as `config.json` writes it (`rope_type` and its parameters); `None` for
    /// GGUF's divisors, which it cannot express.
    pub fn to_hf(&self) -> Option<serde_json::Value> {
        Some(match self {
            Self::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_context,
            } => serde_json::json!({
                "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_context,
            }),
            Self::Linear { factor } => serde_json::json!({"rope_type": "linear", "factor": factor}),
            Self::Yarn(y) => serde_json::json!({
                "rope_type": "yarn", "factor": y.factor,
                "original_max_position_embeddings": y.original_context,
                "beta_fast": y.beta_fast, "beta_slow": y.beta_slow, "truncate": y.truncate,
                "attention_factor": y.attention_factor,
            }),
            Self::LongRope(l) => serde_json::json!({
                "rope_type": "longrope", "short_factor": l.short, "long_factor": l.long,
                "original_max_position_embeddings": l.original_context,
                "attention_factor": l.attention_factor,
            }),
            Self::Divisors(_) => return None,
        })
    }
}

/// YaRN's parameters: frequencies whose wavelength fits the original context many times (more
/// than `beta_fast` rotations) kept, those rotating fewer than `beta_slow` times divided by
/// `factor`, a linear ramp between (over whole dimensions when `truncate`); cos and sin scaled
/// by `attention_factor`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Yarn {
    pub factor: f64,
    /// `original_max_position_embeddings`.
    pub original_context: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub truncate: bool,
    pub attention_factor: f64,
}

impl Yarn {
    /// Frequency `i` (unscaled: `base`) of `config`'s heads under YaRN.
    fn scaled(&self, base: f64, i: usize, config: &ModelConfig) -> f64 {
        let (low, high) = self.ramp(config);
        let kept = 1.0 - ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
        base / self.factor * (1.0 - kept) + base * kept
    }

    /// The ramp over the frequency index, as transformers computes it: from the dimension that
    /// turns `beta_fast` times over the original context to the one that turns `beta_slow`
    /// times (whole dimensions when `truncate`), never empty.
    fn ramp(&self, config: &ModelConfig) -> (f64, f64) {
        let dim = config.rotary_dim() as f64;
        let correction = |rotations: f64| {
            dim * (self.original_context as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln()
                / (2.0 * config.rope_theta.ln())
        };
        let (mut low, mut high) = (correction(self.beta_fast), correction(self.beta_slow));
        if self.truncate {
            (low, high) = (low.floor(), high.ceil());
        }
        let (low, high) = (low.max(0.0), high.min(dim - 1.0));
        (low, if high == low { high + 0.001 } else { high })
    }

    fn check(&self) -> Result<(), ConfigError> {
        let positive = [
            self.factor,
            self.beta_fast,
            self.beta_slow,
            self.attention_factor,
        ]
        .iter()
        .all(|v| v.is_finite() && *v > 0.0);
        if !positive || self.original_context == 0 {
            return Err(ConfigError::BadRopeScaling(format!(
                "factor {}, beta_fast {}, beta_slow {}, attention_factor {}, \
                 original_max_position_embeddings {}: expected positive numbers and a context",
                self.factor,
                self.beta_fast,
                self.beta_slow,
                self.attention_factor,
                self.original_context
            )));
        }
        Ok(())
    }
}

/// What Gemma 2 and 3 set apart beyond their architecture (see [`Architecture`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Gemma {
    /// Attention scores are scaled by this^-½ rather than head_dim^-½.
    pub query_pre_attn_scalar: usize,
    /// Attention scores pass tanh(x / cap) · cap before the softmax (Gemma 2).
    pub attn_softcap: Option<f64>,
    /// So do the logits (Gemma 2).
    pub final_softcap: Option<f64>,
    /// Layers (from 0, ascending) with sliding-window attention.
    pub local_layers: Vec<usize>,
    /// The rotation base of those layers, unscaled (Gemma 3's `rope_local_base_freq`); `None`:
    /// the model's own, scaled as the others.
    pub local_rope_theta: Option<f64>,
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// Attention sees at most this many positions back (Mistral's sliding window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// Layers (from 0, ascending) whose queries and keys are not rotated (SmolLM3's NoPE).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers_without_rope: Vec<usize>,
    /// Gemma's settings, for Gemma 2 and 3 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gemma: Option<Gemma>,
    /// How many leading dimensions of each head are rotated, where not all (Phi-4-mini: 96 of
    /// 128); see [`Self::rotary_dim`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_dim: Option<usize>,
}

impl ModelConfig {
    /// The leading dimensions of each head that rotary embeddings rotate (as two halves);
    /// the rest pass unrotated.
    pub fn rotary_dim(&self) -> usize {
        self.partial_rotary_dim.unwrap_or(self.head_dim)
    }

    /// Whether layer `index` rotates its queries and keys.
    pub fn rotates(&self, index: usize) -> bool {
        !self.layers_without_rope.contains(&index)
    }

    /// The layers an architecture leaves unrotated by default (see
    /// [`Architecture::no_rope_interval`]).
    pub fn default_layers_without_rope(architecture: Architecture, layers: usize) -> Vec<usize> {
        match architecture.no_rope_interval() {
            Some(n) => (0..layers).filter(|i| (i + 1) % n == 0).collect(),
            None => vec![],
        }
    }

    /// Whether the forward attends within the sliding window where the model has one (Mistral,
    /// Phi-3, Gemma: their windows as transformers masks them). Qwen2's and SmolLM3's windows,
    /// off in every release and laid out over layers differently, are not computed.
    pub fn computes_windows(&self) -> bool {
        use Architecture::*;
        matches!(self.architecture, Mistral | Phi3 | Gemma2 | Gemma3)
    }

    /// Whether layer `index` attends only within the sliding window: every layer of a windowed
    /// model that computes windows, or Gemma's sliding-window layers.
    pub fn attends_within_window(&self, index: usize) -> bool {
        self.computes_windows()
            && self.sliding_window.is_some()
            && self
                .gemma
                .as_ref()
                .is_none_or(|g| g.local_layers.contains(&index))
    }

    /// The most positions one sequence may hold in the model's forward: its context, or its
    /// sliding window where the window is not computed (see [`Self::computes_windows`]).
    pub fn attention_span(&self) -> usize {
        match (self.sliding_window, self.computes_windows()) {
            (Some(window), false) => window.min(self.max_position_embeddings),
            _ => self.max_position_embeddings,
        }
    }

    /// [`Self::attention_span`] in words, for messages refusing longer sequences.
    pub fn span_limit(&self) -> String {
        let span = self.attention_span();
        match span < self.max_position_embeddings {
            true => format!(
                "the model's sliding window of {span} (tsq computes this family's attention \
                 within the window only)"
            ),
            false => format!("the model's context of {}", self.max_position_embeddings),
        }
    }

    /// The rotary inverse frequencies (rotary_dim / 2), with the model's scaling applied: what
    /// the inference and the training engine both build their rotation tables from.
    pub fn inv_freq(&self) -> Vec<f32> {
        (0..self.rotary_dim() / 2)
            .map(|i| {
                let base = self.unscaled_frequency(self.rope_theta, i);
                let scaled = match &self.rope_scaling {
                    None => base,
                    Some(RopeScaling::Divisors(d)) => base / f64::from(d[i]),
                    Some(RopeScaling::Linear { factor }) => base / factor,
                    Some(RopeScaling::Yarn(yarn)) => yarn.scaled(base, i, self),
                    Some(RopeScaling::LongRope(l)) => base / f64::from(l.short[i]),
                    Some(RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original_context,
                    }) => {
                        let original = *original_context as f64;
                        let wavelength = 2.0 * std::f64::consts::PI / base;
                        if wavelength < original / high_freq_factor {
                            base
                        } else if wavelength > original / low_freq_factor {
                            base / factor
                        } else {
                            let smooth = (original / wavelength - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * base / factor + smooth * base
                        }
                    }
                };
                scaled as f32
            })
            .collect()
    }

    /// The model's LongRoPE scaling, if it has one.
    pub fn longrope(&self) -> Option<&LongRope> {
        match &self.rope_scaling {
            Some(RopeScaling::LongRope(l)) => Some(l),
            _ => None,
        }
    }

    /// LongRoPE's inverse frequencies for sequences past the original context; `None` for
    /// other scalings.
    pub fn long_inv_freq(&self) -> Option<Vec<f32>> {
        let l = self.longrope()?;
        let inv_freq = (l.long.iter().enumerate())
            .map(|(i, &factor)| {
                (self.unscaled_frequency(self.rope_theta, i) / f64::from(factor)) as f32
            })
            .collect();
        Some(inv_freq)
    }

    /// Rotary frequency `i` of base `theta`, unscaled: θ^(−2i / rotary_dim).
    fn unscaled_frequency(&self, theta: f64, i: usize) -> f64 {
        1.0 / theta.powf(2.0 * i as f64 / self.rotary_dim() as f64)
    }

    /// The rotary inverse frequencies of layers with a base of their own (Gemma 3's
    /// sliding-window layers; see [`Self::rotates_locally`]), unscaled.
    pub fn local_inv_freq(&self) -> Option<Vec<f32>> {
        let theta = self.gemma.as_ref()?.local_rope_theta?;
        Some(
            (0..self.rotary_dim() / 2)
                .map(|i| self.unscaled_frequency(theta, i) as f32)
                .collect(),
        )
    }

    /// Whether layer `index` rotates with [`Self::local_inv_freq`].
    pub fn rotates_locally(&self, index: usize) -> bool {
        self.gemma
            .as_ref()
            .is_some_and(|g| g.local_rope_theta.is_some() && g.local_layers.contains(&index))
    }

    /// What queries are multiplied by so that attention's head_dim^-½ scale gives the model's
    /// own (Gemma's query_pre_attn_scalar^-½); `None` where they are the same.
    pub fn query_multiplier(&self) -> Option<f64> {
        let scalar = self.gemma.as_ref()?.query_pre_attn_scalar;
        let multiplier = (self.head_dim as f64 / scalar as f64).sqrt();
        (multiplier != 1.0).then_some(multiplier)
    }

    /// What cos and sin of the rotation are multiplied by (YaRN's and LongRoPE's attention
    /// factor; else 1).
    pub fn rope_attention_factor(&self) -> f32 {
        match &self.rope_scaling {
            Some(RopeScaling::Yarn(yarn)) => yarn.attention_factor as f32,
            Some(RopeScaling::LongRope(l)) => l.attention_factor as f32,
            _ => 1.0,
        }
    }

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
        let rotated = self.rotary_dim();
        if rotated == 0 || rotated > self.head_dim || !rotated.is_multiple_of(2) {
            return Err(ConfigError::PartialRotary {
                fraction: rotated as f64 / self.head_dim as f64,
                head_dim: self.head_dim,
            });
        }
        if let Some(&layer) = (self.layers_without_rope.iter()).find(|&&l| l >= self.num_layers) {
            return Err(ConfigError::SizeOutOfRange {
                field: "no_rope_layers",
                value: layer + 1,
                max: self.num_layers,
            });
        }
        if let Some(g) = &self.gemma {
            let positive = |v: f64| v.is_finite() && v > 0.0;
            for (field, value) in [
                ("attn_logit_softcapping", g.attn_softcap),
                ("final_logit_softcapping", g.final_softcap),
                ("rope_local_base_freq", g.local_rope_theta),
            ] {
                if let Some(value) = value.filter(|v| !positive(*v)) {
                    return Err(ConfigError::NotPositive { field, value });
                }
            }
            if g.query_pre_attn_scalar == 0 {
                return Err(ConfigError::NotPositive {
                    field: "query_pre_attn_scalar",
                    value: 0.0,
                });
            }
            if let Some(&layer) = g.local_layers.iter().find(|&&l| l >= self.num_layers) {
                return Err(ConfigError::SizeOutOfRange {
                    field: "layer_types",
                    value: layer + 1,
                    max: self.num_layers,
                });
            }
        }
        if self.sliding_window == Some(0) {
            return Err(ConfigError::SizeOutOfRange {
                field: "sliding_window",
                value: 0,
                max: self.max_position_embeddings,
            });
        }
        match &self.rope_scaling {
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_context,
            }) => {
                let positive = [factor, low_freq_factor, high_freq_factor]
                    .iter()
                    .all(|v| v.is_finite() && **v > 0.0);
                if !positive || high_freq_factor <= low_freq_factor || *original_context == 0 {
                    return Err(ConfigError::BadRopeScaling(format!(
                        "factor {factor}, low_freq_factor {low_freq_factor}, high_freq_factor \
                         {high_freq_factor}, original_max_position_embeddings {original_context}: \
                         expected positive factors, high above low, and a context"
                    )));
                }
            }
            Some(RopeScaling::Linear { factor }) if !(factor.is_finite() && *factor > 0.0) => {
                return Err(ConfigError::BadRopeScaling(format!(
                    "factor {factor}: expected a positive number"
                )));
            }
            Some(RopeScaling::Yarn(yarn)) => yarn.check()?,
            Some(RopeScaling::LongRope(l)) => {
                let half = self.rotary_dim() / 2;
                let positive = |v: &[f32]| v.iter().all(|v| v.is_finite() && *v > 0.0);
                let attention = l.attention_factor.is_finite() && l.attention_factor > 0.0;
                let sizes = l.short.len() == half && l.long.len() == half;
                if !(sizes && positive(&l.short) && positive(&l.long) && attention)
                    || l.original_context == 0
                {
                    return Err(ConfigError::BadRopeScaling(format!(
                        "{} short and {} long factors for {} rotated dimensions per head, \
                         attention_factor {}, original_max_position_embeddings {}: expected \
                         {half} positive factors each, a positive attention factor and a context",
                        l.short.len(),
                        l.long.len(),
                        self.rotary_dim(),
                        l.attention_factor,
                        l.original_context
                    )));
                }
            }
            Some(RopeScaling::Divisors(d))
                if d.len() != self.rotary_dim() / 2
                    || !d.iter().all(|v| v.is_finite() && *v > 0.0) =>
            {
                return Err(ConfigError::BadRopeScaling(format!(
                    "{} frequency divisors for {} rotated dimensions per head: expected {} \
                     positive numbers",
                    d.len(),
                    self.rotary_dim(),
                    self.rotary_dim() / 2
                )));
            }
            _ => {}
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
    /// Absent from configs written by transformers 5, which put it in `rope_parameters`.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    pub rms_norm_eps: f64,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// transformers 4's scaling (`rope_type` or `type`, and its parameters).
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers 5's `rope_theta` and scaling in one object.
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Qwen2's and Qwen3's switch for their `sliding_window` (off in every released Qwen2.5
    /// and Qwen3).
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    /// SmolLM3's flag per layer: 1 where it rotates, 0 where it does not.
    #[serde(default)]
    pub no_rope_layers: Option<Vec<u8>>,
    /// LongRoPE's original context, where Phi-3's configs keep it.
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
    /// The fraction of each head that is rotated (transformers 4 keeps it here, 5 in
    /// `rope_parameters`): tsq rotates whole heads.
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
    /// The MLP's gate activation (`hidden_act`, or Gemma's `hidden_activation`).
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub hidden_activation: Option<String>,
    /// Gemma's attention scale, soft caps, layer kinds and local rotation base.
    #[serde(default)]
    pub query_pre_attn_scalar: Option<usize>,
    #[serde(default)]
    pub attn_logit_softcapping: Option<f64>,
    #[serde(default)]
    pub final_logit_softcapping: Option<f64>,
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default)]
    pub sliding_window_pattern: Option<usize>,
    #[serde(default)]
    pub rope_local_base_freq: Option<f64>,
}

/// The RoPE base when a config gives none (transformers' default too).
pub(crate) const DEFAULT_ROPE_THETA: f64 = 10_000.0;

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
        let rotary_fraction = self.partial_rotary_factor.or_else(|| {
            self.rope_parameters
                .as_ref()?
                .get("partial_rotary_factor")?
                .as_f64()
        });
        let expected = architecture.activation().hf_name();
        if let Some(found) = (self.hidden_activation.as_ref().or(self.hidden_act.as_ref()))
            .filter(|a| a.as_str() != expected)
        {
            return Err(ConfigError::UnsupportedActivation {
                found: found.clone(),
                expected,
            });
        }
        let head_dim =
            (self.head_dim).unwrap_or(self.hidden_size / self.num_attention_heads.max(1));
        let config = ModelConfig {
            architecture,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim,
            vocab_size: self.vocab_size,
            rope_theta: self
                .rope_theta
                .or_else(|| self.global_rope_parameters()?.get("rope_theta")?.as_f64())
                .unwrap_or(DEFAULT_ROPE_THETA),
            rms_norm_eps: self.rms_norm_eps,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            rope_scaling: self.resolved_rope_scaling()?,
            sliding_window: match architecture {
                Architecture::Qwen2 | Architecture::Qwen3 | Architecture::SmolLm3
                    if self.use_sliding_window != Some(true) =>
                {
                    None
                }
                _ => self.sliding_window,
            },
            layers_without_rope: match (&self.no_rope_layers, architecture) {
                (Some(flags), Architecture::SmolLm3) => (flags.iter().enumerate())
                    .filter(|(_, rotates)| **rotates == 0)
                    .map(|(i, _)| i)
                    .collect(),
                _ => ModelConfig::default_layers_without_rope(architecture, self.num_hidden_layers),
            },
            gemma: match architecture.is_gemma() {
                true => Some(self.gemma(architecture)?),
                false => None,
            },
            // As transformers counts them: the fraction's whole dimensions.
            partial_rotary_dim: rotary_fraction
                .map(|f| (head_dim as f64 * f) as usize)
                .filter(|&dims| dims != head_dim),
        };
        if let Some(flags) = &self.no_rope_layers
            && architecture == Architecture::SmolLm3
            && flags.len() != self.num_hidden_layers
        {
            return Err(ConfigError::BadNoRopeLayers(
                flags.len(),
                self.num_hidden_layers,
            ));
        }
        config.check()?;
        Ok(config)
    }

    /// HF `rope_scaling` (or transformers 5's `rope_parameters`): absent, null or `default`
    /// for none; its type under `rope_type` (or the older `type`).
    fn resolved_rope_scaling(&self) -> Result<Option<RopeScaling>, ConfigError> {
        let Some(scaling) = (self.rope_scaling.as_ref())
            .filter(|v| !v.is_null())
            .or_else(|| self.global_rope_parameters())
        else {
            return Ok(None);
        };
        let kind = scaling
            .get("rope_type")
            .or_else(|| scaling.get("type"))
            .and_then(serde_json::Value::as_str)
            .unwrap_or("");
        let number = |key: &str| {
            scaling
                .get(key)
                .and_then(serde_json::Value::as_f64)
                .ok_or_else(|| {
                    ConfigError::BadRopeScaling(format!("`{key}` is missing or not a number"))
                })
        };
        match kind {
            "default" => Ok(None),
            "llama3" => Ok(Some(RopeScaling::Llama3 {
                factor: number("factor")?,
                low_freq_factor: number("low_freq_factor")?,
                high_freq_factor: number("high_freq_factor")?,
                original_context: number("original_max_position_embeddings")? as usize,
            })),
            "linear" => Ok(Some(RopeScaling::Linear {
                factor: number("factor")?,
            })),
            "yarn" => Ok(Some(RopeScaling::Yarn(self.yarn(scaling)?))),
            "longrope" => Ok(Some(RopeScaling::LongRope(self.longrope(scaling)?))),
            other => Err(ConfigError::UnsupportedRopeScaling(other.to_string())),
        }
    }

    /// transformers 5's `rope_parameters`, or for models with two kinds of layers (Gemma 3) the
    /// full-attention layers' entry.
    fn global_rope_parameters(&self) -> Option<&serde_json::Value> {
        let parameters = self.rope_parameters.as_ref().filter(|v| !v.is_null())?;
        Some(parameters.get("full_attention").unwrap_or(parameters))
    }

    /// Gemma's settings: required `query_pre_attn_scalar`; sliding-window layers from
    /// `layer_types`, else the release's pattern (Gemma 2: every other layer from the first;
    /// Gemma 3: all but every `sliding_window_pattern`-th); Gemma 3's local rotation base from
    /// `rope_parameters.sliding_attention` or `rope_local_base_freq`, unscaled.
    fn gemma(&self, architecture: Architecture) -> Result<Gemma, ConfigError> {
        let bad = |field, message: &str| ConfigError::BadGemma {
            field,
            message: message.to_string(),
        };
        let query_pre_attn_scalar = self
            .query_pre_attn_scalar
            .ok_or_else(|| bad("query_pre_attn_scalar", "missing"))?;
        let layers = self.num_hidden_layers;
        let local_layers = match &self.layer_types {
            Some(kinds) if kinds.len() != layers => {
                let message = format!("{} entries for {layers} layers", kinds.len());
                return Err(bad("layer_types", &message));
            }
            Some(kinds) => {
                if let Some(other) = kinds
                    .iter()
                    .find(|k| !matches!(k.as_str(), "sliding_attention" | "full_attention"))
                {
                    let message =
                        format!("`{other}`: expected sliding_attention or full_attention");
                    return Err(bad("layer_types", &message));
                }
                (0..layers)
                    .filter(|&i| kinds[i] == "sliding_attention")
                    .collect()
            }
            None if architecture == Architecture::Gemma2 => (0..layers).step_by(2).collect(),
            None => {
                let pattern = self.sliding_window_pattern.unwrap_or(6).max(1);
                (0..layers).filter(|i| (i + 1) % pattern != 0).collect()
            }
        };
        let local = self
            .rope_parameters
            .as_ref()
            .and_then(|p| p.get("sliding_attention"));
        if let Some(kind) = local
            .and_then(|l| l.get("rope_type"))
            .and_then(serde_json::Value::as_str)
            .filter(|k| *k != "default")
        {
            let message = format!("sliding-window layers' rope type `{kind}` (expected default)");
            return Err(bad("rope_parameters", &message));
        }
        let local_rope_theta = match architecture {
            Architecture::Gemma3 => Some(
                local
                    .and_then(|l| l.get("rope_theta")?.as_f64())
                    .or(self.rope_local_base_freq)
                    .ok_or_else(|| bad("rope_local_base_freq", "missing"))?,
            ),
            _ => None,
        };
        Ok(Gemma {
            query_pre_attn_scalar,
            attn_softcap: self.attn_logit_softcapping,
            final_softcap: self.final_logit_softcapping,
            local_layers,
            local_rope_theta,
        })
    }

    /// LongRoPE's parameters as transformers reads them: the original context from the scaling
    /// or the config's top level (Phi-3's place for it), and unless given, the attention
    /// factor √(1 + ln f / ln original) for f = context / original (1 where f ≤ 1).
    fn longrope(&self, scaling: &serde_json::Value) -> Result<LongRope, ConfigError> {
        let bad = |message: String| ConfigError::BadRopeScaling(message);
        let factors = |key: &str| -> Result<Vec<f32>, ConfigError> {
            let list = scaling.get(key).and_then(serde_json::Value::as_array);
            let list = list.ok_or_else(|| bad(format!("`{key}` is missing or not a list")))?;
            (list.iter())
                .map(|v| v.as_f64().map(|v| v as f32))
                .collect::<Option<_>>()
                .ok_or_else(|| bad(format!("`{key}` holds something other than numbers")))
        };
        let original = (scaling.get("original_max_position_embeddings"))
            .and_then(serde_json::Value::as_u64)
            .map(|v| v as usize)
            .or(self.original_max_position_embeddings)
            .ok_or_else(|| bad("`original_max_position_embeddings` is missing".into()))?;
        let attention_factor = match scaling.get("attention_factor").and_then(|v| v.as_f64()) {
            Some(given) => given,
            None => {
                let factor = (scaling.get("factor").and_then(serde_json::Value::as_f64))
                    .unwrap_or(self.max_position_embeddings as f64 / original.max(1) as f64);
                match factor <= 1.0 {
                    true => 1.0,
                    false => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
                }
            }
        };
        Ok(LongRope {
            short: factors("short_factor")?,
            long: factors("long_factor")?,
            original_context: original,
            attention_factor,
        })
    }

    /// YaRN's parameters with transformers' defaults: the original context the config's own,
    /// the factor their ratio, betas 32 and 1 (0 counts as unset there too), truncation on,
    /// and the attention factor 0.1 ln(factor) + 1 (DeepSeek's `mscale` / `mscale_all_dim`
    /// form where both are given).
    fn yarn(&self, scaling: &serde_json::Value) -> Result<Yarn, ConfigError> {
        let optional = |key: &str| match scaling.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                ConfigError::BadRopeScaling(format!("`{key}` is not a number: {v}"))
            }),
        };
        let original = optional("original_max_position_embeddings")?
            .unwrap_or(self.max_position_embeddings as f64);
        let factor = optional("factor")?.unwrap_or(self.max_position_embeddings as f64 / original);
        let mscale = |scale: f64, m: f64| match scale <= 1.0 {
            true => 1.0,
            false => 0.1 * m * scale.ln() + 1.0,
        };
        let attention_factor = match (optional("mscale")?, optional("mscale_all_dim")?) {
            (Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                mscale(factor, m) / mscale(factor, all)
            }
            _ => mscale(factor, 1.0),
        };
        let nonzero = |v: Option<f64>| v.filter(|v| *v != 0.0);
        Ok(Yarn {
            factor,
            original_context: original as usize,
            beta_fast: nonzero(optional("beta_fast")?).unwrap_or(32.0),
            beta_slow: nonzero(optional("beta_slow")?).unwrap_or(1.0),
            truncate: scaling
                .get("truncate")
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(true),
            attention_factor: optional("attention_factor")?.unwrap_or(attention_factor),
        })
    }
}
