//! SentencePiece BPE vocabularies (Llama 2, Mistral 7B, TinyLlama, Phi-3): from a GGUF file's
//! metadata (`tokenizer.ggml.model = "llama"`) or a `tokenizer.model` file, turned into the
//! `tokenizers` spec that transformers writes for these models (its legacy Llama form).
//!
//! SentencePiece BPE merges the adjacent pair whose merged piece scores highest; a BPE model
//! whose merges are ranked by that score does the same, so the merges are derived from the
//! scores as transformers' converter derives them. A space prefix ("▁") goes in front of each
//! run of text between special tokens, as llama.cpp does; characters outside the vocabulary fall
//! back to `<0xNN>` byte pieces.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde_json::{Value as Json, json};

use super::super::error::{ModelError, Result};

/// What a piece is, numbered as in SentencePiece's model proto and GGUF's `token_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PieceKind {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl PieceKind {
    fn from_number(n: i64) -> Option<Self> {
        Some(match n {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => return None,
        })
    }

    /// Pieces matched in text before anything else and never split (llama.cpp's special tokens).
    pub(super) fn is_special(self) -> bool {
        matches!(self, Self::Unknown | Self::Control | Self::UserDefined)
    }
}

pub(super) struct Piece {
    pub text: String,
    pub score: f32,
    pub kind: PieceKind,
}

/// A SentencePiece BPE vocabulary and how its text is prepared.
pub(super) struct Vocabulary {
    pub pieces: Vec<Piece>,
    /// Whether "▁" goes in front of text (SentencePiece's `add_dummy_prefix`, GGUF's
    /// `tokenizer.ggml.add_space_prefix`).
    pub dummy_prefix: bool,
    /// Whether characters outside the vocabulary become byte pieces rather than the unknown one.
    pub byte_fallback: bool,
}

const SPACE: &str = "\u{2581}";

impl Vocabulary {
    /// The vocabulary of a GGUF file whose `tokenizer.ggml.model` is `llama`.
    pub fn from_gguf(path: &Path, md: &HashMap<String, Value>) -> Result<Self> {
        let tokens = super::strings(path, md, "tokenizer.ggml.tokens")?;
        let numbers = |key: &str| -> Result<Vec<&Value>> {
            let list = md
                .get(key)
                .ok_or_else(|| ModelError::load(path, format!("GGUF metadata lacks `{key}`")))?;
            let items = list
                .to_vec()
                .map_err(|_| ModelError::load(path, format!("`{key}` is not a list")))?;
            if items.len() != tokens.len() {
                return Err(ModelError::load(
                    path,
                    format!(
                        "`{key}` has {} entries for {} tokens",
                        items.len(),
                        tokens.len()
                    ),
                ));
            }
            Ok(items.iter().collect())
        };
        let scores = numbers("tokenizer.ggml.scores")?;
        let types = numbers("tokenizer.ggml.token_type")?;
        let pieces = tokens
            .into_iter()
            .zip(scores.into_iter().zip(types))
            .enumerate()
            .map(|(id, (text, (score, kind)))| {
                let score = score.to_f32().map_err(|_| {
                    ModelError::load(path, format!("token {id}'s score is not an f32"))
                })?;
                let kind = kind
                    .to_i32()
                    .ok()
                    .and_then(|k| PieceKind::from_number(k.into()))
                    .ok_or_else(|| {
                        ModelError::load(path, format!("token {id}'s type is not one of 1-6"))
                    })?;
                Ok(Piece { text, score, kind })
            })
            .collect::<Result<Vec<_>>>()?;
        let byte_fallback = pieces.iter().any(|p| p.kind == PieceKind::Byte);
        let dummy_prefix = md
            .get("tokenizer.ggml.add_space_prefix")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(true);
        Ok(Self {
            pieces,
            dummy_prefix,
            byte_fallback,
        })
    }

    /// The vocabulary of a SentencePiece `tokenizer.model` file (a protobuf `ModelProto`).
    pub fn from_model_file(path: &Path) -> Result<Self> {
        let bytes = crate::fsutil::read_bytes_bounded(path, crate::fsutil::MAX_TOKENIZER_BYTES)
            .map_err(|e| ModelError::load(path, format!("cannot read: {e}")))?;
        proto::model(&bytes).map_err(|e| ModelError::load(path, e))
    }

    /// The `tokenizers` spec of this vocabulary (BPE with byte fallback, merges by score).
    pub fn spec(&self) -> Json {
        let vocab: serde_json::Map<String, Json> = self
            .pieces
            .iter()
            .enumerate()
            .map(|(i, p)| (p.text.clone(), json!(i)))
            .collect();
        let added: Vec<Json> = self
            .pieces
            .iter()
            .enumerate()
            .filter(|(_, p)| p.kind.is_special())
            .map(|(i, p)| super::added_token(i, &p.text))
            .collect();
        let unk = self
            .pieces
            .iter()
            .find(|p| p.kind == PieceKind::Unknown)
            .map(|p| p.text.clone());
        let to_space = json!({"type": "Replace", "pattern": {"String": " "}, "content": SPACE});
        let normalizer = if self.dummy_prefix {
            json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": SPACE}, to_space]})
        } else {
            to_space
        };
        let mut decoders = vec![
            json!({"type": "Replace", "pattern": {"String": SPACE}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if self.dummy_prefix {
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": null,
            "post_processor": null,
            "decoder": {"type": "Sequence", "decoders": decoders},
            "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": self.byte_fallback, "ignore_merges": false, "vocab": vocab, "merges": self.merges()},
        })
    }

    /// Every split of a normal piece into two pieces of the vocabulary, the highest-scoring
    /// merged piece first (ties: in vocabulary order, then by the halves' ids, as transformers'
    /// `SentencePieceExtractor` orders them).
    fn merges(&self) -> Vec<[&str; 2]> {
        let ids: HashMap<&str, usize> = self
            .pieces
            .iter()
            .enumerate()
            .map(|(i, p)| (p.text.as_str(), i))
            .collect();
        let mut merges: Vec<(f32, [&str; 2])> = Vec::new();
        for piece in self.pieces.iter().filter(|p| p.kind == PieceKind::Normal) {
            let text = piece.text.as_str();
            let mut splits: Vec<(usize, usize, [&str; 2])> = text
                .char_indices()
                .skip(1)
                .filter_map(|(at, _)| {
                    let (left, right) = text.split_at(at);
                    Some((*ids.get(left)?, *ids.get(right)?, [left, right]))
                })
                .collect();
            splits.sort_by_key(|&(l, r, _)| (l, r));
            merges.extend(splits.into_iter().map(|(_, _, pair)| (piece.score, pair)));
        }
        merges.sort_by(|a, b| b.0.total_cmp(&a.0));
        merges.into_iter().map(|(_, pair)| pair).collect()
    }
}

/// Just enough of protobuf's wire format to read SentencePiece's `ModelProto`.
mod proto {
    use super::{Piece, PieceKind, Vocabulary};

    type Result<T> = std::result::Result<T, String>;

    enum Wire<'a> {
        Varint(u64),
        Fixed32(u32),
        Fixed64,
        Bytes(&'a [u8]),
    }

    /// The fields of one message, in order.
    struct Fields<'a> {
        bytes: &'a [u8],
    }

    impl<'a> Fields<'a> {
        fn varint(&mut self) -> Result<u64> {
            let mut value = 0u64;
            for shift in (0..64).step_by(7) {
                let (&byte, rest) = self
                    .bytes
                    .split_first()
                    .ok_or("the file ends inside a number")?;
                self.bytes = rest;
                value |= u64::from(byte & 0x7f) << shift;
                if byte & 0x80 == 0 {
                    return Ok(value);
                }
            }
            Err("a number runs past 64 bits".into())
        }

        fn take(&mut self, n: u64) -> Result<&'a [u8]> {
            let n = usize::try_from(n)
                .ok()
                .filter(|&n| n <= self.bytes.len())
                .ok_or("a field runs past the end of the file")?;
            let (taken, rest) = self.bytes.split_at(n);
            self.bytes = rest;
            Ok(taken)
        }

        fn next_field(&mut self) -> Result<Option<(u64, Wire<'a>)>> {
            if self.bytes.is_empty() {
                return Ok(None);
            }
            let key = self.varint()?;
            let wire = match key & 7 {
                0 => Wire::Varint(self.varint()?),
                1 => {
                    self.take(8)?;
                    Wire::Fixed64
                }
                2 => {
                    let len = self.varint()?;
                    Wire::Bytes(self.take(len)?)
                }
                5 => {
                    let raw = self.take(4)?;
                    Wire::Fixed32(u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]))
                }
                other => return Err(format!("unknown protobuf wire type {other}")),
            };
            Ok(Some((key >> 3, wire)))
        }
    }

    fn each_field<'a>(
        bytes: &'a [u8],
        mut visit: impl FnMut(u64, Wire<'a>) -> Result<()>,
    ) -> Result<()> {
        let mut fields = Fields { bytes };
        while let Some((number, wire)) = fields.next_field()? {
            visit(number, wire)?;
        }
        Ok(())
    }

    fn text(bytes: &[u8], what: &str) -> Result<String> {
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }

    fn piece(bytes: &[u8], id: usize) -> Result<Piece> {
        let mut piece = Piece {
            text: String::new(),
            score: 0.0,
            kind: PieceKind::Normal,
        };
        each_field(bytes, |number, wire| {
            match (number, wire) {
                (1, Wire::Bytes(b)) => piece.text = text(b, &format!("piece {id}"))?,
                (2, Wire::Fixed32(bits)) => piece.score = f32::from_bits(bits),
                (3, Wire::Varint(n)) => {
                    piece.kind = i64::try_from(n)
                        .ok()
                        .and_then(PieceKind::from_number)
                        .ok_or(format!("piece {id} has type {n}, not one of 1-6"))?;
                }
                _ => {}
            }
            Ok(())
        })?;
        Ok(piece)
    }

    /// The vocabulary in a `ModelProto`; refuses models tsq would tokenize differently from
    /// SentencePiece (unigram models, normalization rules, whitespace collapsing).
    pub(super) fn model(bytes: &[u8]) -> Result<Vocabulary> {
        let mut pieces = Vec::new();
        // ModelProto defaults: a unigram model, no byte fallback, the `nmt_nfkc` normalizer
        // with a space prefix and extra whitespace removed.
        let (mut model_type, mut byte_fallback) = (1, false);
        let (mut normalizer, mut dummy_prefix, mut collapse) = ("nmt_nfkc".to_string(), true, true);
        each_field(bytes, |number, wire| {
            match (number, wire) {
                (1, Wire::Bytes(b)) => pieces.push(piece(b, pieces.len())?),
                (2, Wire::Bytes(trainer)) => each_field(trainer, |n, w| {
                    match (n, w) {
                        (3, Wire::Varint(v)) => model_type = v,
                        (35, Wire::Varint(v)) => byte_fallback = v != 0,
                        _ => {}
                    }
                    Ok(())
                })?,
                (3, Wire::Bytes(spec)) => each_field(spec, |n, w| {
                    match (n, w) {
                        (1, Wire::Bytes(b)) => normalizer = text(b, "the normalizer's name")?,
                        (3, Wire::Varint(v)) => dummy_prefix = v != 0,
                        (4, Wire::Varint(v)) => collapse = v != 0,
                        _ => {}
                    }
                    Ok(())
                })?,
                _ => {}
            }
            Ok(())
        })?;
        if model_type != 2 {
            let kind = match model_type {
                1 => "unigram".to_string(),
                3 => "word".to_string(),
                4 => "char".to_string(),
                n => format!("type {n}"),
            };
            return Err(format!(
                "a SentencePiece {kind} model: only BPE models (Llama, Mistral) are supported"
            ));
        }
        if normalizer != "identity" {
            return Err(format!(
                "the SentencePiece normalizer `{normalizer}` is not supported (`identity` is)"
            ));
        }
        if collapse {
            return Err(
                "a SentencePiece model that removes extra whitespace is not supported".into(),
            );
        }
        if pieces.is_empty() {
            return Err("the SentencePiece model has no pieces".into());
        }
        Ok(Vocabulary {
            pieces,
            dummy_prefix,
            byte_fallback,
        })
    }
}

/// SentencePiece model files for tests: protobuf written by hand.
#[cfg(test)]
pub(crate) mod testing {
    fn varint(out: &mut Vec<u8>, mut value: u64) {
        while value >= 0x80 {
            out.push((value as u8) | 0x80);
            value >>= 7;
        }
        out.push(value as u8);
    }

    fn bytes_field(out: &mut Vec<u8>, number: u64, bytes: &[u8]) {
        varint(out, number << 3 | 2);
        varint(out, bytes.len() as u64);
        out.extend_from_slice(bytes);
    }

    fn varint_field(out: &mut Vec<u8>, number: u64, value: u64) {
        varint(out, number << 3);
        varint(out, value);
    }

    /// A `ModelProto` of `pieces` (text, score, type number) with the given trainer and
    /// normalizer fields (number, value).
    pub fn model_file(
        pieces: &[(String, f32, u64)],
        trainer: &[(u64, u64)],
        normalizer: &[(u64, u64)],
    ) -> Vec<u8> {
        let mut out = Vec::new();
        for (text, score, kind) in pieces {
            let mut piece = Vec::new();
            bytes_field(&mut piece, 1, text.as_bytes());
            varint(&mut piece, 2 << 3 | 5);
            piece.extend_from_slice(&score.to_le_bytes());
            varint_field(&mut piece, 3, *kind);
            bytes_field(&mut out, 1, &piece);
        }
        let mut spec = Vec::new();
        trainer
            .iter()
            .for_each(|&(n, v)| varint_field(&mut spec, n, v));
        bytes_field(&mut out, 2, &spec);
        let mut spec = Vec::new();
        bytes_field(&mut spec, 1, b"identity");
        normalizer
            .iter()
            .for_each(|&(n, v)| varint_field(&mut spec, n, v));
        bytes_field(&mut out, 3, &spec);
        out
    }

    /// Trainer fields of a BPE model with byte fallback; normalizer fields that keep whitespace.
    pub const BPE: [(u64, u64); 2] = [(3, 2), (35, 1)];
    pub const KEEP_WHITESPACE: [(u64, u64); 1] = [(4, 0)];

    /// `<unk>`, `<s>`, `</s>`, the byte pieces, then `normal` (text, score).
    pub fn pieces(normal: &[(&str, f32)]) -> Vec<(String, f32, u64)> {
        let mut pieces = vec![
            ("<unk>".to_string(), 0.0, 2),
            ("<s>".to_string(), 0.0, 3),
            ("</s>".to_string(), 0.0, 3),
        ];
        pieces.extend((0..=255u8).map(|b| (format!("<0x{b:02X}>"), 0.0, 6)));
        pieces.extend(normal.iter().map(|&(t, s)| (t.to_string(), s, 1)));
        pieces
    }

    /// Pieces for "hello world" and "abc", where "bc" scores above "ab".
    pub fn small_vocabulary() -> Vec<(String, f32, u64)> {
        pieces(&[
            ("\u{2581}", -1.0),
            ("h", -2.0),
            ("e", -3.0),
            ("l", -4.0),
            ("o", -5.0),
            ("w", -6.0),
            ("r", -7.0),
            ("d", -8.0),
            ("a", -9.0),
            ("b", -10.0),
            ("c", -11.0),
            ("ll", -12.0),
            ("\u{2581}h", -13.0),
            ("\u{2581}w", -14.0),
            ("llo", -15.0),
            ("\u{2581}hllo", -99.0),
            ("\u{2581}he", -16.0),
            ("\u{2581}hello", -17.0),
            ("or", -18.0),
            ("\u{2581}wor", -19.0),
            ("\u{2581}world", -20.0),
            ("bc", -21.0),
            ("ab", -22.0),
            ("ld", -23.0),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{BPE, KEEP_WHITESPACE, model_file, small_vocabulary};
    use super::*;
    use crate::model::tokenizer::Tokenizer;

    fn gguf_metadata(pieces: &[(String, f32, u64)]) -> HashMap<String, Value> {
        let list =
            |f: &dyn Fn(&(String, f32, u64)) -> Value| Value::Array(pieces.iter().map(f).collect());
        HashMap::from([
            ("tokenizer.ggml.model".into(), Value::String("llama".into())),
            (
                "tokenizer.ggml.tokens".into(),
                list(&|p| Value::String(p.0.clone())),
            ),
            ("tokenizer.ggml.scores".into(), list(&|p| Value::F32(p.1))),
            (
                "tokenizer.ggml.token_type".into(),
                list(&|p| Value::I32(p.2 as i32)),
            ),
            ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
            ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ])
    }

    fn from_model_file(bytes: &[u8]) -> std::result::Result<Vocabulary, String> {
        proto::model(bytes)
    }

    fn token_texts(tok: &Tokenizer, text: &str) -> Vec<String> {
        let ids = tok.encode(text).unwrap();
        ids.iter()
            .map(|&i| tok.decode(&[i], true).unwrap())
            .collect()
    }

    #[test]
    fn a_model_file_and_gguf_metadata_give_the_same_tokenizer() {
        let pieces = small_vocabulary();
        let from_file = from_model_file(&model_file(&pieces, &BPE, &KEEP_WHITESPACE)).unwrap();
        let path = Path::new("model.gguf");
        let from_gguf = Vocabulary::from_gguf(path, &gguf_metadata(&pieces)).unwrap();
        assert_eq!(from_file.spec(), from_gguf.spec());
        let tok = Tokenizer::from_gguf(path, &gguf_metadata(&pieces)).unwrap();
        // BOS by default, as llama.cpp adds it to SentencePiece vocabularies.
        assert_eq!(tok.encode("hello world").unwrap(), [1, 276, 279]);
        // "bc" outscores "ab"; "é" is not a piece and falls back to its UTF-8 bytes.
        let ids = tok.encode("abc é").unwrap();
        let bytes = [3 + 0xC3, 3 + 0xA9];
        assert_eq!(ids, [1, 259, 267, 280, 259, bytes[0], bytes[1]]);
        assert_eq!(tok.decode(&ids, false).unwrap(), "abc é");
        assert_eq!(token_texts(&tok, "hello")[1..], ["hello"]);
        assert_eq!(tok.encode_continuation(" world").unwrap(), [279]);
    }

    #[test]
    fn without_a_dummy_prefix_text_gets_no_space_in_front() {
        let mut md = gguf_metadata(&small_vocabulary());
        md.insert("tokenizer.ggml.add_space_prefix".into(), Value::Bool(false));
        md.insert("tokenizer.ggml.add_bos_token".into(), Value::Bool(false));
        let tok = Tokenizer::from_gguf(Path::new("model.gguf"), &md).unwrap();
        assert_eq!(tok.encode("hello").unwrap(), [260, 261, 273]);
        assert_eq!(
            tok.decode(&tok.encode(" world").unwrap(), false).unwrap(),
            " world"
        );
    }

    #[test]
    fn every_end_token_ends_generation_once() {
        let mut md = gguf_metadata(&small_vocabulary());
        md.insert("tokenizer.ggml.eot_token_id".into(), Value::U32(270));
        md.insert("tokenizer.ggml.eom_token_id".into(), Value::U32(2));
        let tok = Tokenizer::from_gguf(Path::new("model.gguf"), &md).unwrap();
        assert_eq!(tok.eos_ids, [2, 270]);
    }

    #[test]
    fn models_tsq_would_tokenize_differently_are_refused() {
        let pieces = small_vocabulary();
        type Fields<'a> = &'a [(u64, u64)];
        let cases: [(Fields, Fields, &str); 4] = [
            (&[(35, 1)], &KEEP_WHITESPACE, "unigram model"),
            (&[(3, 4)], &KEEP_WHITESPACE, "char model"),
            (&BPE, &[], "removes extra whitespace"),
            (&BPE, &[(4, 0)], ""),
        ];
        for (trainer, normalizer, refusal) in cases {
            let result = from_model_file(&model_file(&pieces, trainer, normalizer));
            match result {
                Err(e) => assert!(!refusal.is_empty() && e.contains(refusal), "{e}"),
                Ok(_) => assert!(refusal.is_empty(), "not refused: {refusal}"),
            }
        }
        let mut nfkc = model_file(&pieces, &BPE, &KEEP_WHITESPACE);
        let at = nfkc.windows(8).position(|w| w == b"identity").unwrap();
        nfkc[at..at + 8].copy_from_slice(b"nmt_nfkc");
        let err = from_model_file(&nfkc).err().unwrap();
        assert!(err.contains("normalizer `nmt_nfkc`"), "{err}");
    }

    #[test]
    fn broken_model_files_are_errors() {
        let good = model_file(&small_vocabulary(), &BPE, &KEEP_WHITESPACE);
        for (bytes, expected) in [
            (&good[..good.len() - 3], "past the end"),
            (&good[..1], "ends inside a number"),
            (&[0x0b, 0x00][..], "wire type 3"),
            (
                &[
                    0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
                ][..],
                "64 bits",
            ),
            (&[0x0a, 0x02, 0x18, 0x09][..], "type 9"),
            (&[0x0a, 0x03, 0x0a, 0x01, 0xff][..], "not UTF-8"),
        ] {
            let err = from_model_file(bytes).err().unwrap_or_default();
            assert!(err.contains(expected), "{expected}: {err}");
        }
    }

    #[test]
    fn gguf_lists_of_the_wrong_length_are_refused() {
        let mut md = gguf_metadata(&small_vocabulary());
        md.insert(
            "tokenizer.ggml.scores".into(),
            Value::Array(vec![Value::F32(0.0)]),
        );
        let err = Vocabulary::from_gguf(Path::new("m.gguf"), &md)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("m.gguf")
                && err.contains("`tokenizer.ggml.scores` has 1 entries for 283 tokens"),
            "{err}"
        );
    }
}
