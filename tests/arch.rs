//! The model families users bring, each against transformers: tiny random-weight Llama 3 (rope
//! scaling `llama3`, legacy config keys), Qwen2 (q/k/v biases, tied head, transformers 5
//! config), Qwen3 (per-head q/k norms, heads wider than hidden / heads), SmolLM3 (layers without
//! rotary embeddings), Mistral (sliding window), Phi-3 (fused q|k|v and gate|up), and the `yarn`
//! (on Qwen2) and `linear` (on Llama) rope scalings: models in bf16, sharded over several safetensors files, made by
//! scripts/make-arch-fixtures.py with transformers' logits for one sequence.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use tsq::model::Model;
use tsq::model::transformer::{Batch, LogitsAt, Mode};

use crate::common::repo;

#[derive(Deserialize)]
struct Reference {
    ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
}

fn fixture(name: &str) -> (PathBuf, Reference) {
    let dir = repo().join("tests/fixtures/arch").join(name);
    let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
    (dir, serde_json::from_str(&text).unwrap())
}

/// Logits (time, vocab) of one unpadded sequence.
fn logits(model: &Model, ids: &[u32]) -> tsq::model::error::Result<Vec<Vec<f32>>> {
    let input = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?;
    let batch = Batch::left_padded(&[0], 0, ids.len(), &Device::Cpu)?;
    let out = model
        .transformer
        .forward(&input, &batch, None, Mode::Fast, LogitsAt::All)?;
    Ok(out.squeeze(0)?.to_vec2()?)
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// Within 1e-4 of transformers at every position: two f32 implementations on the same bf16
/// weights (measured 2026-12-06: 5e-6 for each family).
const TOLERANCE: f32 = 1e-4;

#[test]
fn each_architecture_matches_transformers() {
    for name in tsq::model::testing::ARCH_FIXTURES {
        let (dir, reference) = fixture(name);
        let model = Model::load(&dir, DType::F32, &Device::Cpu).unwrap();
        let ours = logits(&model, &reference.ids).unwrap();
        let diff = max_diff(&ours, &reference.logits);
        assert!(diff < TOLERANCE, "{name}: logits differ by {diff}");
        assert_eq!(model.tokenizer.encode("t5 t17").unwrap(), [5, 17], "{name}");
    }
}

/// What `tsq expert export` writes (`hf::save`) loads again as the same model: the config,
/// rope scaling included, and the logits.
#[test]
fn a_saved_model_directory_is_the_same_model() {
    for name in [
        "llama3", "yarn", "linear", "qwen3", "smollm3", "phi3", "longrope", "phi4mini", "gemma2",
        "gemma3",
    ] {
        let (dir, reference) = fixture(name);
        let model = Model::load(&dir, DType::F32, &Device::Cpu).unwrap();
        let saved = tempfile::tempdir().unwrap();
        tsq::model::hf::save(&model, saved.path()).unwrap();
        let again = Model::load(saved.path(), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(again.transformer.config, model.transformer.config, "{name}");
        let diff = max_diff(&logits(&again, &reference.ids).unwrap(), &reference.logits);
        assert!(diff < TOLERANCE, "{name}: logits differ by {diff}");
    }
}

/// GGUFs as llama.cpp's converter writes them (llama.cpp reads each within 7e-4 of
/// transformers' logits) give transformers' logits in tsq too: Qwen3's (head norms, q/k as they
/// are), SmolLM3's (q/k permuted, its unrotated layers implied), Mistral's (converted as a Llama,
/// with a SentencePiece vocabulary) and Phi-3's (q|k|v and gate|up fused, not permuted).
#[test]
fn ggufs_match_transformers() {
    for name in [
        "qwen3",
        "smollm3",
        "mistral",
        "phi3",
        "gemma2_gguf",
        "gemma3_gguf",
    ] {
        let (_, reference) = fixture(name);
        let gguf = repo().join(format!("tests/fixtures/arch/{name}.gguf"));
        let model = Model::load(&gguf, DType::F32, &Device::Cpu).unwrap();
        let (text, ids): (&str, &[u32]) = match name {
            // SentencePiece: BOS, then "▁" + "t" + "1" + "7" merged into "▁t17" (id 33).
            "mistral" | "phi3" => ("t17", &[1, 33]),
            // Gemma's puts no space in front: the text's own becomes "▁".
            "gemma2_gguf" | "gemma3_gguf" => (" t17", &[1, 33]),
            // Byte-level BPE: its one merge.
            _ => ("ab", &[4]),
        };
        assert_eq!(model.tokenizer.encode(text).unwrap(), ids, "{name}");
        let diff = max_diff(&logits(&model, &reference.ids).unwrap(), &reference.logits);
        assert!(diff < TOLERANCE, "{name}: logits differ by {diff}");
    }
}

/// How far fixture `name`'s logits move from transformers' when `change` alters its config
/// (the same weights).
fn moved_by(name: &str, change: impl FnOnce(&mut tsq::model::config::ModelConfig)) -> f32 {
    let (dir, reference) = fixture(name);
    let mut model = Model::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let mut config = model.transformer.config.clone();
    change(&mut config);
    let tensors = model.transformer.tensors().unwrap();
    model.transformer = tsq::model::transformer::Transformer::new(config, tensors).unwrap();
    max_diff(&logits(&model, &reference.ids).unwrap(), &reference.logits)
}

/// The features that set a family apart change the numbers: without them the same weights
/// give other logits, so the agreement above is not vacuous.
#[test]
fn each_familys_features_make_the_difference() {
    use tsq::model::config::RopeScaling;
    // Each scaling left out, and YaRN without its attention factor.
    type Change = fn(&mut Option<RopeScaling>);
    let unscaled: Change = |scaling| *scaling = None;
    let no_attention_factor: Change = |scaling| {
        if let Some(RopeScaling::Yarn(yarn)) = scaling {
            yarn.attention_factor = 1.0;
        }
    };
    // LongRoPE: the long divisors for a sequence within the original context, the short ones
    // past it, or no attention factor.
    let crossed: Change = |scaling| {
        if let Some(RopeScaling::LongRope(l)) = scaling {
            std::mem::swap(&mut l.short, &mut l.long);
        }
    };
    let longrope_unscaled: Change = |scaling| {
        if let Some(RopeScaling::LongRope(l)) = scaling {
            l.attention_factor = 1.0;
        }
    };
    let changes = [
        ("llama3", unscaled),
        ("linear", unscaled),
        ("yarn", unscaled),
        ("yarn", no_attention_factor),
        ("longrope", crossed),
        ("longrope_short", crossed),
        ("longrope", longrope_unscaled),
        ("phi4mini", crossed),
    ];
    for (name, change) in changes {
        let off = moved_by(name, |config| {
            assert!(config.rope_scaling.is_some(), "{name}");
            change(&mut config.rope_scaling);
        });
        assert!(
            off > 100.0 * TOLERANCE,
            "{name}: changed, the logits move by {off} only"
        );
    }

    let (dir, _) = fixture("qwen2");
    let model = Model::load(&dir, DType::F32, &Device::Cpu).unwrap();
    assert!(
        model
            .transformer
            .tensors()
            .unwrap()
            .contains_key("layers.0.attn.q_proj.bias")
    );
    assert_eq!(
        model.transformer.config.sliding_window, None,
        "switched off in the config"
    );

    let (dir, reference) = fixture("qwen3");
    let mut model = Model::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let c = &model.transformer.config;
    assert_ne!(c.num_heads * c.head_dim, c.hidden_size);
    let mut config = c.clone();
    config.architecture = tsq::model::config::Architecture::Qwen2;
    let tensors = model.transformer.tensors().unwrap();
    assert!(tensors.contains_key("layers.1.attn.k_norm.weight"));
    let unnormed = tensors
        .into_iter()
        .filter(|(name, _)| !name.contains("attn.q_norm") && !name.contains("attn.k_norm"))
        .collect();
    model.transformer = tsq::model::transformer::Transformer::new(config, unnormed).unwrap();
    let off = max_diff(&logits(&model, &reference.ids).unwrap(), &reference.logits);
    assert!(
        off > 100.0 * TOLERANCE,
        "without the head norms the logits move by {off} only"
    );

    let off = moved_by("smollm3", |config| {
        assert_eq!(config.layers_without_rope, [3]);
        config.layers_without_rope.clear();
    });
    assert!(
        off > 100.0 * TOLERANCE,
        "rotating every layer moves the logits by {off} only"
    );

    // Gemma's settings, each left out: soft caps, its attention scale, the local rotation base.
    type GemmaChange = fn(&mut tsq::model::config::Gemma);
    let gemma_changes: [(&str, GemmaChange); 4] = [
        ("gemma2", |g| g.attn_softcap = None),
        ("gemma2", |g| g.final_softcap = None),
        ("gemma2", |g| g.query_pre_attn_scalar = 16),
        ("gemma3", |g| g.local_rope_theta = None),
    ];
    for (name, change) in gemma_changes {
        let off = moved_by(name, |config| change(config.gemma.as_mut().unwrap()));
        assert!(
            off > 100.0 * TOLERANCE,
            "{name}: changed, the logits move by {off} only"
        );
    }

    // Attention past the sliding window, which the references run past.
    for name in ["phi3", "gemma2", "gemma3"] {
        let length = fixture(name).1.ids.len();
        let off = moved_by(name, |config| {
            assert!(config.sliding_window.unwrap() < length, "{name}");
            config.sliding_window = None;
        });
        assert!(
            off > 100.0 * TOLERANCE,
            "{name}: without its window, {off} only"
        );
    }
}

/// A copy of the Qwen3 fixture in `p` whose chat template, like Qwen3's, reads
/// `enable_thinking` (it appends ` t5` when it is false), and `chat.yaml`, a pipeline on it
/// setting that variable to false; returns the model's directory.
pub(crate) fn thinking_model(p: &crate::common::Project) -> PathBuf {
    let (fixture, _) = fixture("qwen3");
    let model = p.path().join("qwen3");
    std::fs::create_dir(&model).unwrap();
    for entry in std::fs::read_dir(&fixture).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, model.join(path.file_name().unwrap())).unwrap();
    }
    let template = "{{ messages[0].content }}{% if enable_thinking is defined and \
        enable_thinking is false %} t5{% endif %}";
    let config =
        serde_json::json!({"bos_token": "t0", "eos_token": "t1", "chat_template": template});
    std::fs::write(model.join("tokenizer_config.json"), config.to_string()).unwrap();
    let pipeline = "version: 1\nname: tiny\nrun_dir: runs\nmodel:\n  source: qwen3\n  \
        chat_template_kwargs: {enable_thinking: false}\n";
    std::fs::write(p.path().join("chat.yaml"), pipeline).unwrap();
    model
}

/// A pipeline's `chat_template_kwargs` (Qwen3's `enable_thinking`) reach the chat template of
/// the model that stages, `chat`, `classify` and `serve` load from the run; the model commands'
/// `--chat-template-kwargs` reach the model they load.
#[test]
fn chat_template_kwargs_reach_the_models_chat_template() {
    let p = crate::common::Project::new();
    let model = thinking_model(&p);
    p.run_ok(&["run", "chat.yaml", "--only", "model"]);
    let record = tsq::stages::model::ModelRecord::read(&p.run_dir().join("model")).unwrap();
    let chat = record.load().unwrap().chat.unwrap();
    let hi = [tsq::model::chat::Message::user("t9")];
    assert_eq!(chat.render(&hi).unwrap(), "t9 t5");
    let plain = Model::load(&model, DType::F32, &Device::Cpu)
        .unwrap()
        .chat
        .unwrap();
    assert_eq!(plain.render(&hi).unwrap(), "t9");

    // The model commands' `--chat-template-kwargs`, parsed and refused as the pipeline's are.
    let args = |kwargs: &str| {
        use clap::Parser;
        let path = model.to_str().unwrap();
        let argv = [
            "tsq",
            "generate",
            "--model",
            path,
            "--chat-template-kwargs",
            kwargs,
            "t9",
        ];
        let cli = tsq::cli::Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        let tsq::cli::Command::Generate(generate) = cli.command else {
            unreachable!("parsed as generate")
        };
        Ok::<_, String>(tsq::cmd::ModelArgs::from(generate.model))
    };
    let loaded = args(r#"{"enable_thinking": false}"#)
        .unwrap()
        .load()
        .unwrap();
    assert_eq!(loaded.chat.unwrap().render(&hi).unwrap(), "t9 t5");
    let err = args(r#"{"bos_token": "x"}"#).err().unwrap();
    assert!(err.contains("`bos_token` is set by tsq itself"), "{err}");
    let err = args("enable_thinking=false").err().unwrap();
    assert!(err.contains("expected a JSON object"), "{err}");
}

/// Past a sliding window attention is windowed (Phi-3's and Gemma's references run past theirs,
/// above); within it, it is causal attention: Mistral's first 16 positions are unchanged by a
/// 17th token.
#[test]
fn sequences_past_a_sliding_window_attend_within_it() {
    let (dir, reference) = fixture("mistral");
    let model = Model::load(&dir, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(model.transformer.config.sliding_window, Some(16));
    let mut longer = reference.ids.clone();
    longer.push(9);
    let ours = logits(&model, &longer).unwrap();
    assert_eq!(ours.len(), 17);
    let diff = max_diff(&ours[..16], &reference.logits);
    assert!(diff < TOLERANCE, "logits differ by {diff}");
}

/// An HF directory (sharded bf16 safetensors) runs the whole loop: decompose, an expert trained
/// with RL on a few steps, an evaluation of base and expert; in f32 with the CPU engine; in
/// bf16, where the CPU computes in f32 from bf16 panels (the CPU engine again) or, without
/// AVX2 (`TSQ_SIMD=portable`), in bf16 as a GPU run does (the autograd engine); Qwen3, Phi-3
/// (its fused matrices split, the SVD targets among them) and Gemma 3 with the CPU engine.
#[test]
fn a_model_directory_runs_decompose_train_and_evaluate() {
    let packs = tsq_linalg::simd() != tsq_linalg::Simd::Portable;
    for (fixture, dtype, simd, engine) in [
        ("qwen2", "f32", None, "backprop (cpu, f32)"),
        ("qwen2", "bf16", None, "backprop (cpu, f32)"),
        ("qwen2", "bf16", Some("portable"), "autograd (cpu, bf16)"),
        ("qwen3", "f32", None, "backprop (cpu, f32)"),
        ("phi3", "f32", None, "backprop (cpu, f32)"),
        ("gemma3", "f32", None, "backprop (cpu, f32)"),
    ] {
        if simd.is_none() && dtype == "bf16" && !packs {
            continue; // this CPU computes bf16 as bf16: the portable case covers it
        }
        let p = crate::common::Project::new();
        write_the_loop(&p, fixture, dtype, "");
        let mut run = p.tsq(&["run", "arch.yaml"]);
        if let Some(level) = simd {
            run.env(tsq_linalg::SIMD_VAR, level);
        }
        let out = run.output().unwrap();
        assert!(out.status.success(), "{}", crate::common::text(&out));
        let run = p.run_dir();
        let record: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("model/model.json")).unwrap())
                .unwrap();
        assert_eq!(record["format"], "directory");
        assert_eq!(record["dtype"], dtype);
        assert!(record["blake3"].is_string(), "{record}");
        let targets = std::fs::read_to_string(run.join("decompose/targets.json")).unwrap();
        assert!(targets.contains("layers.1.mlp.up_proj"), "{targets}");
        assert!(run.join("train.letters/expert.safetensors").is_file());
        let training: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(run.join("train.letters/training.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(training["engine"], engine);
        let results = std::fs::read_to_string(run.join("eval.letters/results.md")).unwrap();
        assert!(results.contains("| letters |"), "{results}");
    }
}

/// Runs a small pipeline on architecture fixture `fixture` in project `p`: decompose, train
/// expert `letters` (2 RL steps), evaluate, and whatever `extra` YAML adds; `runs/tiny` is the
/// finished run.
pub(crate) fn run_the_loop(p: &crate::common::Project, fixture: &str, dtype: &str, extra: &str) {
    write_the_loop(p, fixture, dtype, extra);
    p.run_ok(&["run", "arch.yaml"]);
}

/// The pipeline of [`run_the_loop`], as `arch.yaml` in `p`.
fn write_the_loop(p: &crate::common::Project, fixture: &str, dtype: &str, extra: &str) {
    let model = repo().join("tests/fixtures/arch").join(fixture);
    let pipeline = format!(
        "version: 1
name: tiny
seed: 3
run_dir: runs
model:
  source: {}
  dtype: {dtype}
svd:
  targets: ['mlp\\.(gate|up)_proj']
datasets:
  letters:
    card: cards/letters.yaml
    prompt: templates/question.jinja
    split: {{train: 6, val: 2, test: 4}}
rewards:
  choice: {{kind: multiple_choice}}
experts:
  letters:
    dataset: letters
    reward: choice
    train: {{rollout: options, steps: 2, prompts_per_step: 2, validate_every: 2, validate_limit: 2}}
evaluate:
  - {{dataset: letters, mode: loglik, reward: choice, with: [base, letters]}}
{extra}",
        model.display()
    );
    std::fs::write(p.path().join("arch.yaml"), pipeline).unwrap();
}

/// `device: cuda` is a valid pipeline; a build without CUDA says so at the model stage, before
/// anything downstream runs.
#[cfg(not(feature = "cuda"))]
#[test]
fn a_cuda_pipeline_is_refused_by_a_build_without_cuda() {
    let p = crate::common::Project::new();
    let model = repo().join("tests/fixtures/arch/qwen2");
    let pipeline = format!(
        "version: 1\nname: tiny\nrun_dir: runs\nmodel:\n  source: {}\n  device: cuda\n",
        model.display()
    );
    std::fs::write(p.path().join("gpu.yaml"), pipeline).unwrap();
    p.run_ok(&["validate", "gpu.yaml"]);
    let out = p.tsq(&["run", "gpu.yaml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = crate::common::text(&out);
    assert!(
        text.contains("device `cuda`: this tsq was built without it"),
        "{text}"
    );
}

#[derive(Deserialize)]
struct SentencePieceFixture {
    wheel: String,
    vocabularies: std::collections::BTreeMap<String, SentencePieceVocabulary>,
}

#[derive(Deserialize)]
struct SentencePieceVocabulary {
    path: String,
    cases: Vec<SentencePieceCase>,
}

#[derive(Deserialize)]
struct SentencePieceCase {
    text: String,
    llama_cpp: Vec<u32>,
    /// SentencePiece's own ids (no BOS) and decoding, for texts without special tokens.
    sentencepiece: Option<Vec<u32>>,
    decoded: Option<String>,
}

/// Mistral's SentencePiece vocabularies (7B v0.1, and v3 with control tokens such as [INST]),
/// from the `mistral-common` wheel, as a model directory's `tokenizer.model`: the ids and text
/// SentencePiece and llama.cpp give (tests/fixtures/sentencepiece, made by
/// scripts/make-spm-fixture.py), and a continuation's ids as they stand after its prompt.
#[test]
fn sentencepiece_vocabularies_tokenize_as_sentencepiece_and_llama_cpp_do() {
    let fixture: SentencePieceFixture =
        serde_json::from_str(include_str!("fixtures/sentencepiece/mistral.json")).unwrap();
    for (name, vocabulary) in &fixture.vocabularies {
        let source = format!("pip://{}#{}", fixture.wheel, vocabulary.path);
        let file = tsq::assets::AssetSource::parse(&source, std::path::Path::new("."))
            .unwrap()
            .resolve(&tsq::assets::TsqHome(crate::common::shared_tsq_home()))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(&file, dir.path().join("tokenizer.model")).unwrap();
        let mut tok = tsq::model::tokenizer::Tokenizer::in_directory(dir.path()).unwrap();
        (tok.bos_id, tok.add_bos) = (Some(1), true);
        for case in &vocabulary.cases {
            let ids = tok.encode(&case.text).unwrap();
            assert_eq!(ids, case.llama_cpp, "{name}: {:?}", case.text);
            if let (Some(own), Some(decoded)) = (&case.sentencepiece, &case.decoded) {
                assert_eq!(&ids[1..], own, "{name}: {:?}", case.text);
                assert_eq!(&tok.decode(&ids, false).unwrap(), decoded, "{name}");
            }
        }
        let prompt = "Question: What is the capital of France?\nAnswer:";
        let whole = tok.encode(&format!("{prompt} Paris")).unwrap();
        let alone = tok.encode(prompt).unwrap();
        let continuation = tok.encode_continuation(" Paris").unwrap();
        assert_eq!(continuation, whole[alone.len()..], "{name}");
        // Tokenized as a text of its own, " Paris" gets a second space in front.
        assert_ne!(tok.encode(" Paris").unwrap()[1..], continuation, "{name}");
    }
}
