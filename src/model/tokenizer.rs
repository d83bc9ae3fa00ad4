//! Tokenizers: `tokenizer.json` when a model directory has one, else built from GGUF metadata.
//!
//! Building from GGUF: byte-level BPE from `tokenizer.ggml.tokens` and `.merges`, token types 3
//! (control) and 4 (user-defined) as special tokens, and the pre-tokenizer that
//! `tokenizer.ggml.pre` names. candle's own GGUF tokenizer does not know `smollm` and adds a prefix
//! space ("Ġuser" instead of "user"), which is why this exists.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde_json::{Value as Json, json};

use super::error::{ModelError, Result};
use super::gguf::meta_str;

/// A tokenizer plus the ids that generation needs.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_id: Option<u32>,
    pub eos_ids: Vec<u32>,
    /// Whether the model expects a BOS token in front of every prompt.
    pub add_bos: bool,
}

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level(use_regex: bool) -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split(pattern: &str) -> Json {
    json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false})
}

/// The pre-tokenizer for a `tokenizer.ggml.pre` value.
fn pre_tokenizer(pre: &str) -> Option<Json> {
    let sequence = |items: Vec<Json>| json!({"type": "Sequence", "pretokenizers": items});
    match pre {
        "smollm" | "starcoder" => Some(sequence(vec![
            json!({"type": "Digits", "individual_digits": true}),
            byte_level(true),
        ])),
        "gpt2" | "default" => Some(byte_level(true)),
        "llama-bpe" | "llama3" | "smaug-bpe" => {
            Some(sequence(vec![split(LLAMA3_SPLIT), byte_level(false)]))
        }
        "qwen2" => Some(sequence(vec![split(QWEN2_SPLIT), byte_level(false)])),
        _ => None,
    }
}

fn strings(path: &Path, md: &HashMap<String, Value>, key: &str) -> Result<Vec<String>> {
    let list = md.get(key).ok_or_else(|| {
        ModelError::load(
            path,
            format!("GGUF has no tokenizer: metadata lacks `{key}`"),
        )
    })?;
    let items = list
        .to_vec()
        .map_err(|_| ModelError::load(path, format!("`{key}` is not a list")))?;
    items
        .iter()
        .map(|v| {
            v.to_string()
                .cloned()
                .map_err(|_| ModelError::load(path, format!("`{key}` holds a non-string")))
        })
        .collect()
}

fn id(md: &HashMap<String, Value>, key: &str) -> Option<u32> {
    md.get(key).and_then(|v| v.to_u32().ok())
}

impl Tokenizer {
    /// Builds the tokenizer described by a GGUF file's metadata.
    pub fn from_gguf(path: &Path, md: &HashMap<String, Value>) -> Result<Self> {
        let model = meta_str(path, md, "tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(ModelError::load(
                path,
                format!(
                    "tokenizer model `{model}` is not supported yet (byte-level BPE, `gpt2`, is)"
                ),
            ));
        }
        let pre = meta_str(path, md, "tokenizer.ggml.pre").unwrap_or("default");
        let pre_tokenizer = pre_tokenizer(pre).ok_or_else(|| {
            ModelError::load(
                path,
                format!("unknown pre-tokenizer `tokenizer.ggml.pre = {pre}`"),
            )
        })?;
        let tokens = strings(path, md, "tokenizer.ggml.tokens")?;
        let merges = strings(path, md, "tokenizer.ggml.merges")?;
        let types: Vec<i32> = md
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.to_vec().ok())
            .map(|v| v.iter().map(|t| t.to_i32().unwrap_or(1)).collect())
            .unwrap_or_default();
        let vocab: serde_json::Map<String, Json> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        let added: Vec<Json> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| matches!(types.get(*i), Some(3 | 4)))
            .map(|(i, t)| json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
            .collect();
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges},
        });
        let inner = tokenizers::Tokenizer::from_bytes(spec.to_string().as_bytes())
            .map_err(|e| ModelError::load(path, format!("cannot build the tokenizer: {e}")))?;
        let bos_id = id(md, "tokenizer.ggml.bos_token_id");
        let eos_ids = id(md, "tokenizer.ggml.eos_token_id").into_iter().collect();
        let add_bos = md
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        Ok(Self {
            inner,
            bos_id,
            eos_ids,
            add_bos,
        })
    }

    /// Loads `tokenizer.json`; BOS/EOS come from the caller (config files).
    pub fn from_file(
        path: &Path,
        bos_id: Option<u32>,
        eos_ids: Vec<u32>,
        add_bos: bool,
    ) -> Result<Self> {
        let bytes = crate::fsutil::read_bytes_bounded(path, crate::fsutil::MAX_TOKENIZER_BYTES)
            .map_err(|e| ModelError::load(path, format!("cannot read: {e}")))?;
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| ModelError::load(path, format!("cannot load tokenizer: {e}")))?;
        Ok(Self {
            inner,
            bos_id,
            eos_ids,
            add_bos,
        })
    }

    /// Token ids of `text`, special tokens recognised, with one BOS in front if the model wants it
    /// and the text does not already start with it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::Input(format!("cannot tokenize: {e}")))?;
        let mut ids = encoding.get_ids().to_vec();
        if let (true, Some(bos)) = (self.add_bos, self.bos_id)
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// Text of `ids`; special tokens are kept when `keep_special`.
    pub fn decode(&self, ids: &[u32], keep_special: bool) -> Result<String> {
        self.inner
            .decode(ids, !keep_special)
            .map_err(|e| ModelError::Input(format!("cannot decode: {e}")))
    }

    /// Writes `tokenizer.json`.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.inner
            .save(path, false)
            .map_err(|e| ModelError::load(path, format!("cannot write tokenizer: {e}")))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endless_tokenizer_file_is_refused_naming_it() {
        let err = Tokenizer::from_file(Path::new("/dev/zero"), None, vec![], false)
            .err()
            .expect("/dev/zero is no tokenizer")
            .to_string();
        assert!(
            err.contains("/dev/zero") && err.contains("not a regular file"),
            "{err}"
        );
    }
}
