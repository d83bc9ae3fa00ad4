//! Tokenizers: `tokenizer.json` when a model directory has one, else built from GGUF metadata or
//! a SentencePiece `tokenizer.model`.
//!
//! Building from GGUF: byte-level BPE (`tokenizer.ggml.model = "gpt2"`) from
//! `tokenizer.ggml.tokens` and `.merges` with the pre-tokenizer that `tokenizer.ggml.pre` names,
//! or SentencePiece BPE (`"llama"`, [`sentencepiece`]); token types 2-4 (unknown, control,
//! user-defined) are special tokens, matched in text, as llama.cpp matches them. candle's own GGUF
//! tokenizer does not know `smollm` and adds a prefix space ("Ġuser" instead of "user"), which is
//! why this exists.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde_json::{Value as Json, json};

use super::error::{ModelError, Result};
use super::gguf::meta_str;

pub(crate) mod sentencepiece;

/// A tokenizer plus the ids that generation needs.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// `inner` without the space that SentencePiece tokenizers put in front of text, for text
    /// that follows other text; `None` where `inner` adds none.
    continuation: Option<tokenizers::Tokenizer>,
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

/// A special token of a `tokenizers` spec.
fn added_token(id: usize, content: &str) -> Json {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true})
}

/// The byte-level BPE spec of a GGUF file whose `tokenizer.ggml.model` is `gpt2`.
fn byte_level_spec(path: &Path, md: &HashMap<String, Value>) -> Result<Json> {
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
        .filter(|(i, _)| matches!(types.get(*i), Some(2..=4)))
        .map(|(i, t)| added_token(i, t))
        .collect();
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges},
    }))
}

/// `spec` without the "▁" that SentencePiece-style tokenizers put in front of text (a
/// `Prepend` normalizer, or a `Metaspace` pre-tokenizer that prepends), if it puts one there;
/// its decoder then keeps the space that it strips from the front of a whole text.
fn without_dummy_prefix(spec: &Json) -> Option<Json> {
    let part = |key: &str| spec.get(key).cloned().unwrap_or(Json::Null);
    let (mut normalizer, mut pre_tokenizer) = (part("normalizer"), part("pre_tokenizer"));
    let dropped = drop_prepend(&mut normalizer);
    let never = never_prepend(&mut pre_tokenizer);
    if !(dropped || never) {
        return None;
    }
    let mut decoder = part("decoder");
    if !drop_leading_strip(&mut decoder) {
        never_prepend(&mut decoder);
    }
    let mut spec = spec.clone();
    spec["normalizer"] = normalizer;
    spec["pre_tokenizer"] = pre_tokenizer;
    spec["decoder"] = decoder;
    Some(spec)
}

/// Removes a decoder sequence's `Strip` of leading spaces; whether there was one.
fn drop_leading_strip(decoder: &mut Json) -> bool {
    let Some(list) = decoder.get_mut("decoders").and_then(Json::as_array_mut) else {
        return false;
    };
    let before = list.len();
    list.retain(|d| {
        let strips_front = d.get("start").and_then(Json::as_u64).is_some_and(|n| n > 0);
        !(d.get("type").and_then(Json::as_str) == Some("Strip") && strips_front)
    });
    list.len() != before
}

/// Removes `Prepend` from a normalizer (alone or in a sequence); whether there was one.
fn drop_prepend(normalizer: &mut Json) -> bool {
    match normalizer.get("type").and_then(Json::as_str) {
        Some("Prepend") => {
            *normalizer = Json::Null;
            true
        }
        Some("Sequence") => match normalizer
            .get_mut("normalizers")
            .and_then(Json::as_array_mut)
        {
            Some(list) => {
                let before = list.len();
                list.retain(|n| n.get("type").and_then(Json::as_str) != Some("Prepend"));
                list.len() != before
            }
            None => false,
        },
        _ => false,
    }
}

/// Makes `Metaspace` pre-tokenizers (alone or in a sequence) prepend nothing; whether one did.
fn never_prepend(pre_tokenizer: &mut Json) -> bool {
    match pre_tokenizer.get("type").and_then(Json::as_str) {
        Some("Metaspace") => {
            let Some(fields) = pre_tokenizer.as_object_mut() else {
                return false;
            };
            // `prepend_scheme` since tokenizers 0.15, `add_prefix_space` before it.
            let scheme = fields.get("prepend_scheme").and_then(Json::as_str);
            let legacy = fields.get("add_prefix_space").and_then(Json::as_bool);
            let prepends = scheme.map_or(legacy == Some(true), |s| s != "never");
            if prepends {
                fields.insert("prepend_scheme".into(), json!("never"));
                fields.insert("add_prefix_space".into(), json!(false));
            }
            prepends
        }
        Some("Sequence") => pre_tokenizer
            .get_mut("pretokenizers")
            .and_then(Json::as_array_mut)
            .is_some_and(|list| list.iter_mut().fold(false, |any, p| never_prepend(p) | any)),
        _ => false,
    }
}

impl Tokenizer {
    /// Builds the tokenizer described by a GGUF file's metadata.
    pub fn from_gguf(path: &Path, md: &HashMap<String, Value>) -> Result<Self> {
        let model = meta_str(path, md, "tokenizer.ggml.model")?;
        let spec = match model {
            "gpt2" => byte_level_spec(path, md)?,
            "llama" => sentencepiece::Vocabulary::from_gguf(path, md)?.spec(),
            _ => {
                return Err(ModelError::load(
                    path,
                    format!(
                        "tokenizer model `{model}` is not supported yet (byte-level BPE, `gpt2`, \
                         and SentencePiece BPE, `llama`, are)"
                    ),
                ));
            }
        };
        let mut tokenizer = Self::from_spec(path, spec)?;
        tokenizer.bos_id = id(md, "tokenizer.ggml.bos_token_id");
        // llama.cpp ends generation at any of these (Llama 3's <|eot_id|>, Phi-3's <|end|>).
        let ends = ["eos", "eot", "eom"].map(|k| id(md, &format!("tokenizer.ggml.{k}_token_id")));
        tokenizer.set_eos_ids(ends.into_iter().flatten());
        // llama.cpp's default: SentencePiece vocabularies start with BOS, byte-level ones do not.
        tokenizer.add_bos = md
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(model == "llama");
        Ok(tokenizer)
    }

    /// The tokenizer of a model directory: `tokenizer.json`, else a SentencePiece
    /// `tokenizer.model`. BOS/EOS are the caller's to set (they live in config files).
    pub fn in_directory(dir: &Path) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        let sentencepiece = dir.join("tokenizer.model");
        if json.exists() || !sentencepiece.exists() {
            Self::from_file(&json)
        } else {
            let spec = sentencepiece::Vocabulary::from_model_file(&sentencepiece)?.spec();
            Self::from_spec(&sentencepiece, spec)
        }
    }

    /// Loads a `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = crate::fsutil::read_bytes_bounded(path, crate::fsutil::MAX_TOKENIZER_BYTES)
            .map_err(|e| ModelError::load(path, format!("cannot read: {e}")))?;
        let spec: Json = serde_json::from_slice(&bytes)
            .map_err(|e| ModelError::load(path, format!("cannot load tokenizer: {e}")))?;
        Self::from_spec(path, spec)
    }

    /// A tokenizer from its `tokenizers` spec (read from `path`), without BOS or EOS.
    fn from_spec(path: &Path, spec: Json) -> Result<Self> {
        let build = |spec: Json| {
            serde_json::from_value::<tokenizers::Tokenizer>(spec)
                .map_err(|e| ModelError::load(path, format!("cannot load tokenizer: {e}")))
        };
        let continuation = without_dummy_prefix(&spec).map(build).transpose()?;
        Ok(Self {
            inner: build(spec)?,
            continuation,
            bos_id: None,
            eos_ids: Vec::new(),
            add_bos: false,
        })
    }

    /// Sets the ids that end generation: `ids` in order, each once. The first is the EOS that
    /// pads batches and that exports name.
    pub fn set_eos_ids(&mut self, ids: impl IntoIterator<Item = u32>) {
        self.eos_ids.clear();
        for id in ids {
            if !self.eos_ids.contains(&id) {
                self.eos_ids.push(id);
            }
        }
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

    /// Text of `ids` as it follows other text (a SentencePiece word's space kept in front):
    /// what each generated token adds. Special tokens are kept when `keep_special`.
    pub fn decode_continuation(&self, ids: &[u32], keep_special: bool) -> Result<String> {
        let tokenizer = self.continuation.as_ref().unwrap_or(&self.inner);
        tokenizer
            .decode(ids, !keep_special)
            .map_err(|e| ModelError::Input(format!("cannot decode: {e}")))
    }

    /// Token ids of `text` as they follow other text: without BOS, and without the space that
    /// SentencePiece tokenizers put in front of text (" Paris" after a prompt is "▁Paris", not
    /// "▁", "▁Paris"), which is how the tokens stand when the model generates the text itself.
    pub fn encode_continuation(&self, text: &str) -> Result<Vec<u32>> {
        let tokenizer = self.continuation.as_ref().unwrap_or(&self.inner);
        let encoding = tokenizer
            .encode(text, false)
            .map_err(|e| ModelError::Input(format!("cannot tokenize: {e}")))?;
        Ok(encoding.get_ids().to_vec())
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
    use super::sentencepiece::testing::{BPE, KEEP_WHITESPACE, model_file, small_vocabulary};
    use super::*;

    /// transformers' own forms of a SentencePiece tokenizer.json: the space prefix from a
    /// `Metaspace` pre-tokenizer (`prepend_scheme` first or always, as transformers 5 writes it;
    /// tokenizers' earlier `add_prefix_space`), alone or in a sequence. Each is found, and removed for continuations.
    #[test]
    fn a_metaspace_prefix_is_left_out_of_continuations() {
        let file = model_file(&small_vocabulary(), &BPE, &KEEP_WHITESPACE);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.model"), file).unwrap();
        let sentencepiece = Tokenizer::in_directory(dir.path()).unwrap();
        let mut spec: Json =
            serde_json::from_str(&sentencepiece.inner.to_string(false).unwrap()).unwrap();
        spec["normalizer"] = Json::Null;
        let metaspace = json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first", "split": false});
        let legacy =
            json!({"type": "Metaspace", "replacement": "\u{2581}", "add_prefix_space": true});
        let always = json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "always", "split": false});
        for pre_tokenizer in [
            metaspace.clone(),
            always,
            legacy,
            json!({"type": "Sequence", "pretokenizers": [metaspace]}),
        ] {
            spec["pre_tokenizer"] = pre_tokenizer.clone();
            let tok = Tokenizer::from_spec(Path::new("tokenizer.json"), spec.clone()).unwrap();
            assert_eq!(
                tok.encode("hello world").unwrap(),
                [276, 279],
                "{pre_tokenizer}"
            );
            assert_eq!(
                tok.encode_continuation(" world").unwrap(),
                [279],
                "{pre_tokenizer}"
            );
            assert_eq!(tok.encode_continuation("world").unwrap(), [264, 277, 282]);
            assert_eq!(tok.decode(&[279], false).unwrap(), "world");
            assert_eq!(tok.decode_continuation(&[279], false).unwrap(), " world");
        }
        // A `Metaspace` decoder strips the front space as the sequence's `Strip` does.
        spec["decoder"] = metaspace.clone();
        let tok = Tokenizer::from_spec(Path::new("tokenizer.json"), spec.clone()).unwrap();
        assert_eq!(tok.decode(&[279], false).unwrap(), "world");
        assert_eq!(tok.decode_continuation(&[279], false).unwrap(), " world");
        // Byte-level BPE puts nothing in front: one tokenizer serves both.
        spec["pre_tokenizer"] = byte_level(true);
        assert!(without_dummy_prefix(&spec).is_none());
    }

    #[test]
    fn an_endless_tokenizer_file_is_refused_naming_it() {
        let err = Tokenizer::from_file(Path::new("/dev/zero"))
            .err()
            .expect("/dev/zero is no tokenizer")
            .to_string();
        assert!(
            err.contains("/dev/zero") && err.contains("not a regular file"),
            "{err}"
        );
    }
}
