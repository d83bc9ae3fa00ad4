//! The language-model engine: configs, weights (GGUF, safetensors), tokenizers, chat templates,
//! the transformer with fast and differentiable forward paths, batched generation and scoring.
//! Also the pipeline's `model` stage.
//!
//! Canonical module names (stable; SVD targets match against them):
//! `embed`, `layers.{i}.attn.{q,k,v,o}_proj`, `layers.{i}.mlp.{gate,up,down}_proj`,
//! `layers.{i}.attn_norm`, `layers.{i}.mlp_norm`, `norm`, `lm_head` (tensors add `.weight`/`.bias`).

pub mod autograd;
pub mod chat;
pub mod config;
pub mod decoder;
pub mod error;
pub mod generate;
pub mod gguf;
pub(crate) mod gguf_header;
pub mod hf;
pub(crate) mod kernels;
pub mod placement;
pub mod prefixes;
pub mod score;
pub mod testing;
pub mod tokenizer;
pub mod transformer;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use chat::{ChatTemplate, Message};
use error::{ModelError, Result};
use tokenizer::Tokenizer;
use transformer::Transformer;

/// Makes the calling thread one of the threads that run the engine's parallel work (the global
/// rayon pool, with one more thread per further core), so a product it splits runs its share
/// in place and the other cores steal the rest. Otherwise every split product is handed from
/// outside the pool and the caller sleeps until the pool wakes it: on 2 cores that handoff,
/// hundreds of times per decoded token, cost more than the products (docs/benchmarks.md,
/// 2026-12-07).
/// Call it first thing on the thread that drives the model; later calls, and any after
/// the global pool exists, leave things as they are.
pub fn compute_on_this_thread() {
    let _already_built = rayon::ThreadPoolBuilder::new()
        .use_current_thread()
        .build_global();
}

/// The candle dtype for a pipeline dtype.
pub fn dtype(d: placement::Dtype) -> DType {
    use placement::Dtype;
    match d {
        Dtype::F32 => DType::F32,
        Dtype::Bf16 => DType::BF16,
        Dtype::F16 => DType::F16,
    }
}

/// The candle device for a pipeline device; CUDA and Metal need tsq built with that feature.
/// The same device every time: candle refuses operands from two devices it opened separately,
/// even on one GPU.
pub fn device(d: placement::Device) -> Result<Device> {
    static OPENED: std::sync::Mutex<Vec<(placement::Device, Device)>> =
        std::sync::Mutex::new(Vec::new());
    let mut opened = OPENED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, device)) = opened.iter().find(|(p, _)| *p == d) {
        return Ok(device.clone());
    }
    let device = open_device(d)?;
    opened.push((d, device.clone()));
    Ok(device)
}

fn open_device(d: placement::Device) -> Result<Device> {
    use candle_core::utils::{cuda_is_available, metal_is_available};
    use placement::Device as D;
    let unbuilt = |how: &str| {
        ModelError::Input(format!(
            "device `{}`: this tsq was built without it ({how})",
            d.name()
        ))
    };
    Ok(match d {
        D::Cpu => Device::Cpu,
        D::Cuda if !cuda_is_available() => {
            return Err(unbuilt(
                "build one with `scripts/build-cuda.sh build --release`",
            ));
        }
        D::Metal if !metal_is_available() => {
            return Err(unbuilt(
                "build one with `cargo build --release --features metal`",
            ));
        }
        D::Cuda => Device::new_cuda(0)?,
        D::Metal => Device::new_metal(0)?,
    })
}

/// A model's config without loading its weights (GGUF header or `config.json`).
pub fn read_config(path: &Path) -> Result<config::ModelConfig> {
    if path.is_dir() {
        return hf::read_config(path);
    }
    let (content, _) = gguf::read_header(path)?;
    let mut config = gguf::config_from_metadata(path, &content.metadata)?;
    config.tie_word_embeddings = !content.tensor_infos.contains_key("output.weight");
    Ok(config)
}

/// Weights by canonical name (`layers.3.mlp.up_proj.weight`), as a loaded [`Transformer`] or a
/// map of tensors holds them: readers that take a few weights at a time (decomposition, the
/// training engine) leave the model's packed matrices packed but the one they read.
pub trait WeightSource {
    /// `None` where there is no such weight.
    fn weight(&self, name: &str) -> Result<Option<candle_core::Tensor>>;

    /// The weight's rows as packed for tsq-linalg's kernel, where they are held so: a reader
    /// that would pack them the same way shares these instead.
    fn packed(&self, _name: &str) -> Option<std::sync::Arc<tsq_linalg::PackedMatrix>> {
        None
    }
}

impl WeightSource for std::collections::BTreeMap<String, candle_core::Tensor> {
    fn weight(&self, name: &str) -> Result<Option<candle_core::Tensor>> {
        Ok(self.get(name).cloned())
    }
}

/// A loaded model: transformer, tokenizer and chat template. Cheap to clone (weights and
/// tokenizer are shared), so an expert can be composed into a copy.
#[derive(Clone)]
pub struct Model {
    pub path: PathBuf,
    pub transformer: Transformer,
    /// Shared: a model with an expert composed in is a clone of its base.
    pub tokenizer: std::sync::Arc<Tokenizer>,
    pub chat: Option<ChatTemplate>,
}

impl Model {
    /// Renders chat prompts with `variables` besides the messages (a pipeline's or the
    /// command line's `chat_template_kwargs`).
    pub fn set_chat_variables(&mut self, variables: &chat::ChatVariables) {
        self.chat = (self.chat.take()).map(|c| c.with_variables(variables));
    }

    /// Loads a GGUF file or an HF-layout directory.
    pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        if path.is_dir() {
            Self::load_hf(path, dtype, device)
        } else if path.extension().is_some_and(|e| e == "gguf") {
            Self::load_gguf(path, dtype, device)
        } else {
            Err(ModelError::load(
                path,
                "expected a .gguf file or a model directory with config.json",
            ))
        }
    }

    fn load_gguf(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let mut g = gguf::load(path, dtype, device)?;
        g.config.tie_word_embeddings = !g.tensors.contains_key("lm_head.weight");
        let tokenizer = Tokenizer::from_gguf(path, &g.metadata)?;
        let token_text = |id: Option<u32>| {
            id.and_then(|i| tokenizer.decode(&[i], true).ok())
                .unwrap_or_default()
        };
        let chat = gguf::meta_str(path, &g.metadata, "tokenizer.chat_template")
            .ok()
            .map(|t| {
                ChatTemplate::new(
                    t.to_string(),
                    token_text(tokenizer.bos_id),
                    token_text(tokenizer.eos_ids.first().copied()),
                )
            });
        let transformer = Transformer::new(g.config, g.tensors)
            .map_err(|e| ModelError::load(path, e.to_string()))?;
        Ok(Self {
            path: path.to_path_buf(),
            transformer,
            tokenizer: std::sync::Arc::new(tokenizer),
            chat,
        })
    }

    fn load_hf(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config = hf::read_config(dir)?;
        let mut tensors = hf::load_tensors(dir, dtype, device)?;
        hf::unfuse(&config, &mut tensors, hf::hf_name)?;
        hf::from_gemma_layout(&config, &mut tensors);
        let tok_config = hf::tokenizer_config(dir).unwrap_or_default();
        let bos = hf::special_token(&tok_config, "bos_token");
        let eos = hf::special_token(&tok_config, "eos_token");
        let add_bos = tok_config
            .get("add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let mut tokenizer = Tokenizer::in_directory(dir)?;
        tokenizer.bos_id = bos.as_deref().and_then(|t| tokenizer.token_id(t));
        let eos_id = eos.as_deref().and_then(|t| tokenizer.token_id(t));
        tokenizer.set_eos_ids(eos_id.into_iter().chain(hf::generation_eos_ids(dir)));
        tokenizer.add_bos = add_bos;
        let chat = tok_config
            .get("chat_template")
            .and_then(|t| t.as_str())
            .map(|t| {
                ChatTemplate::new(
                    t.to_string(),
                    bos.unwrap_or_default(),
                    eos.unwrap_or_default(),
                )
            });
        let transformer =
            Transformer::new(config, tensors).map_err(|e| ModelError::load(dir, e.to_string()))?;
        Ok(Self {
            path: dir.to_path_buf(),
            transformer,
            tokenizer: std::sync::Arc::new(tokenizer),
            chat,
        })
    }

    /// Makes this model decode steps of few rows from Q8_0 copies of its projections (what
    /// `--decode-q8` asks for; see [`Transformer::quantize_for_decoding`]). The float weights
    /// stay, shared with any clone, and prompts keep using them.
    pub fn decode_from_q8(&mut self) -> Result<()> {
        (self.transformer).quantize_for_decoding(candle_core::quantized::GgmlDType::Q8_0)
    }

    /// `text` as one user turn of the model's chat template, ready for generation.
    pub fn chat_prompt(&self, text: &str) -> Result<String> {
        let chat = self
            .chat
            .as_ref()
            .ok_or_else(|| ModelError::load(&self.path, "the model has no chat template"))?;
        chat.render(&[Message::user(text)])
    }
}
