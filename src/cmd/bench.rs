//! `tsq bench`: performance figures on this machine, printed as a table and one JSON line, beside
//! the peer figures measured on this machine type (shared/peers/README.md, 2 threads, 2026-11-26).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use candle_core::quantized::GgmlDType;
use serde_json::json;

use super::{CmdError, ModelArgs};
use crate::model::Model;
use crate::model::generate::{GenerateOptions, generate};
use crate::model::transformer::{Batch, LogitsAt, Mode};
use crate::svf::Parametrization;
use crate::svf::expert::{BaseModel, Expert};
use crate::svf::train::{SvfTrainer, TokenBatch};

/// Peer figures (tokens/s) for SmolLM2-135M on this machine type, from shared/peers/README.md.
const PEERS: [(&str, &str, f64); 5] = [
    ("prefill_512", "llama.cpp f32", 512.0),
    ("prefill_512", "llama.cpp Q4_1", 226.0),
    ("decode_b1", "llama.cpp Q4_1", 93.0),
    ("decode_b1", "PyTorch f32", 21.5),
    ("decode_b8", "PyTorch f32 (batch 8)", 75.6),
];

const TEXT: &str = "Transformer-squared adapts a language model to each prompt in two passes: the first pass \
looks at the prompt and picks or mixes expert vectors, the second answers with the adapted weights. ";

/// What multiplies by what in this build on this machine, for the benchmarks' headers.
pub(super) fn products() -> String {
    format!(
        "weight products by {}, the rest by {}",
        tsq_linalg::weight_products_by(),
        tsq_linalg::LARGE_PRODUCTS_BY
    )
}

fn best_of(repeat: usize, mut f: impl FnMut() -> Result<f64, CmdError>) -> Result<f64, CmdError> {
    (0..repeat.max(1))
        .map(|_| f())
        .try_fold(f64::INFINITY, |best, t| Ok(best.min(t?)))
}

/// A prompt of exactly `n` tokens of real text.
fn prompt_ids(model: &Model, n: usize) -> Result<Vec<u32>, CmdError> {
    let mut ids = Vec::new();
    while ids.len() < n {
        ids.extend(model.tokenizer.encode(TEXT).map_err(CmdError::failed)?);
    }
    ids.truncate(n);
    Ok(ids)
}

fn prefill_seconds(model: &Model, ids: &[u32]) -> Result<f64, CmdError> {
    let device = model.transformer.device();
    let batch = Batch::left_padded(&[0], 0, ids.len(), device).map_err(CmdError::failed)?;
    let input = Tensor::from_vec(ids.to_vec(), (1, ids.len()), device).map_err(CmdError::failed)?;
    let started = Instant::now();
    model
        .transformer
        .forward(&input, &batch, None, Mode::Fast, LogitsAt::Last)
        .map_err(CmdError::failed)?;
    // A GPU runs kernels asynchronously: the clock stops when they are done.
    device.synchronize().map_err(CmdError::failed)?;
    Ok(started.elapsed().as_secs_f64())
}

fn decode_seconds(model: &Model, batch: usize, new_tokens: usize) -> Result<f64, CmdError> {
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|i| prompt_ids(model, 8 + i % 5))
        .collect::<Result<_, _>>()?;
    let opts = GenerateOptions {
        max_new_tokens: new_tokens,
        ignore_eos: true,
        ..Default::default()
    };
    // Prefill is timed separately: subtract a one-token generation to keep decode alone.
    let started = Instant::now();
    generate(
        model,
        &prompts,
        &GenerateOptions {
            max_new_tokens: 1,
            ..opts.clone()
        },
    )
    .map_err(CmdError::failed)?;
    let prefill = started.elapsed().as_secs_f64();
    let started = Instant::now();
    generate(model, &prompts, &opts).map_err(CmdError::failed)?;
    Ok((started.elapsed().as_secs_f64() - prefill).max(1e-9))
}

/// `wide`: the batch of the second decode measurement.
pub fn generate_bench(model_args: &ModelArgs, repeat: usize, wide: usize) -> Result<(), CmdError> {
    let mut model = model_args.load()?;
    let ids = prompt_ids(&model, 512)?;
    let prefill = 512.0 / best_of(repeat, || prefill_seconds(&model, &ids))?;
    let new_tokens = 128;
    let decode_b1 =
        (new_tokens - 1) as f64 / best_of(repeat, || decode_seconds(&model, 1, new_tokens))?;
    let decode_wide = (wide * (new_tokens - 1)) as f64
        / best_of(repeat, || decode_seconds(&model, wide, new_tokens))?;
    // Decoding from requantized copies: Q8_0 (near-lossless) and Q4_0 (half the bytes again),
    // a CPU measure (the quantized products are for small CPU batches).
    let mut quantized = Vec::new();
    let formats = [("q8_0", GgmlDType::Q8_0), ("q4_0", GgmlDType::Q4_0)];
    let on_cpu = model.transformer.device().is_cpu();
    for (label, dtype) in formats.into_iter().filter(|_| on_cpu) {
        let started = Instant::now();
        model
            .transformer
            .quantize_for_decoding(dtype)
            .map_err(CmdError::failed)?;
        let quantize_s = started.elapsed().as_secs_f64();
        let b1 =
            (new_tokens - 1) as f64 / best_of(repeat, || decode_seconds(&model, 1, new_tokens))?;
        let b_wide = (wide * (new_tokens - 1)) as f64
            / best_of(repeat, || decode_seconds(&model, wide, new_tokens))?;
        quantized.push((label, quantize_s, b1, b_wide));
    }
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let device = model_args.device.name();
    println!(
        "tsq bench generate: {} ({device}, {:?}), {threads} threads, {}",
        model_args.source,
        model_args.dtype,
        products()
    );
    println!("  {:<28} {:>10}", "measurement", "tok/s");
    println!("  {:<28} {:>10.1}", "prefill 512 tokens", prefill);
    println!("  {:<28} {:>10.1}", "decode 128, batch 1", decode_b1);
    println!(
        "  {:<28} {:>10.1}  ({:.2}x batch 1)",
        format!("decode 128, batch {wide} (total)"),
        decode_wide,
        decode_wide / decode_b1
    );
    for (label, quantize_s, b1, b_wide) in &quantized {
        println!(
            "  {:<28} {:>10.1}  (quantizing took {quantize_s:.1}s)",
            format!("decode 128, batch 1, {label}"),
            b1
        );
        println!(
            "  {:<28} {:>10.1}  ({:.2}x batch 1)",
            format!("decode 128, batch {wide}, {label}"),
            b_wide,
            b_wide / b1
        );
    }
    if on_cpu {
        println!("  peers on this machine type (recorded, shared/peers/README.md):");
        for (what, who, value) in PEERS {
            println!("    {what:<12} {who:<24} {value:>8.1}");
        }
    }
    let mut record = json!({"bench": "generate", "model": model_args.source, "device": device, "dtype": model_args.dtype, "threads": threads, "prefill_512_tok_s": prefill, "decode_b1_tok_s": decode_b1, format!("decode_b{wide}_tok_s"): decode_wide});
    for (label, quantize_s, b1, b_wide) in quantized {
        record[format!("decode_b1_{label}_tok_s")] = json!(b1);
        record[format!("decode_b{wide}_{label}_tok_s")] = json!(b_wide);
        record[format!("quantize_{label}_s")] = json!(quantize_s);
    }
    println!("{record}");
    Ok(())
}

/// Peer figures (seconds) for the SVD of SmolLM2-135M's matrices on this machine type.
const SVD_PEERS: [(&str, &str, f64); 4] = [
    ("mlp_90", "PyTorch (MKL)", 7.1),
    ("mlp_90", "numpy (OpenBLAS)", 19.3),
    ("attn_120", "PyTorch (MKL)", 3.2),
    ("attn_120", "numpy (OpenBLAS)", 7.0),
];

/// Decomposes a set of matrices; returns (seconds, worst relative error).
fn time_svd(matrices: &[(String, Tensor)]) -> Result<(f64, f64), CmdError> {
    let started = Instant::now();
    let results = crate::svd::decompose_all(matrices);
    let seconds = started.elapsed().as_secs_f64();
    let mut worst: f64 = 0.0;
    for r in results {
        worst = worst.max(r.map_err(CmdError::failed)?.relative_error);
    }
    Ok((seconds, worst))
}

pub fn svd_bench(model_args: &ModelArgs, large: bool) -> Result<(), CmdError> {
    let model = model_args.load()?;
    let tensors = model.transformer.tensors().map_err(CmdError::failed)?;
    let select = |modules: &[&str]| -> Vec<(String, Tensor)> {
        tensors
            .iter()
            .filter(|(name, _)| {
                modules
                    .iter()
                    .any(|m| name.ends_with(&format!("{m}.weight")))
            })
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect()
    };
    let mlp = select(&["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]);
    let attn = select(&["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj"]);
    let (mlp_s, mlp_err) = time_svd(&mlp)?;
    let (attn_s, attn_err) = time_svd(&attn)?;
    let threads = rayon::current_num_threads();
    println!(
        "tsq bench svd: {} ({threads} threads), faer thin SVD in f32",
        model_args.source
    );
    println!(
        "  {:<34} {:>9} {:>12}",
        "matrices", "seconds", "worst error"
    );
    println!(
        "  {:<34} {:>9.2} {:>12.1e}",
        format!("{} MLP (gate/up/down)", mlp.len()),
        mlp_s,
        mlp_err
    );
    println!(
        "  {:<34} {:>9.2} {:>12.1e}",
        format!("{} attention (q/k/v/o)", attn.len()),
        attn_s,
        attn_err
    );
    let mut record = json!({"bench": "svd", "threads": threads, "mlp_matrices": mlp.len(), "mlp_s": mlp_s, "mlp_max_rel_error": mlp_err, "attn_matrices": attn.len(), "attn_s": attn_s, "attn_max_rel_error": attn_err});
    if large {
        for (rows, cols) in [(4096usize, 4096usize), (14336, 4096)] {
            let w = Tensor::randn(0f32, 1.0, (rows, cols), &candle_core::Device::Cpu)
                .map_err(CmdError::failed)?;
            let (s, err) = time_svd(&[(format!("random {rows}x{cols}"), w)])?;
            println!(
                "  {:<34} {:>9.2} {:>12.1e}",
                format!("random {rows}×{cols}"),
                s,
                err
            );
            record[format!("random_{rows}x{cols}_s")] = json!(s);
        }
    }
    println!("  peers on this machine type (recorded, shared/peers/README.md):");
    for (what, who, value) in SVD_PEERS {
        println!("    {what:<10} {who:<18} {value:>6.1} s");
    }
    println!("{record}");
    Ok(())
}

/// One SVF step of a peer: seconds per step, forward, backward, and peak RSS in GB.
struct PeerStep {
    label: String,
    step_s: f64,
    forward_s: f64,
    backward_s: f64,
    rss_gb: f64,
}

impl PeerStep {
    /// PyTorch on this machine type as recorded in shared/peers/README.md (MLP targets, 8 × 256).
    fn recorded() -> Self {
        Self {
            label: "PyTorch f32 (transformers), recorded".into(),
            step_s: 13.7,
            forward_s: 4.8,
            backward_s: 8.5,
            rss_gb: 6.9,
        }
    }

    /// The JSON line printed by `shared/peers/torch_svf_bench.py --parts svf`, run beside tsq.
    fn from_file(path: &Path) -> Result<Self, CmdError> {
        let bad = |what: String| CmdError::Usage(format!("{}: {what}", path.display()));
        let text = crate::fsutil::read_bounded(path, crate::fsutil::MAX_TEXT_BYTES)
            .map_err(|e| bad(e.to_string()))?;
        let value: serde_json::Value =
            serde_json::from_str(text.trim()).map_err(|e| bad(format!("not JSON: {e}")))?;
        let number = |pointer: &str| {
            value
                .pointer(pointer)
                .and_then(|v| v.as_f64())
                .ok_or_else(|| {
                    bad(format!(
                        "expected a number at `{pointer}` (torch_svf_bench.py --parts svf output)"
                    ))
                })
        };
        Ok(Self {
            label: format!("PyTorch f32 (transformers), {}", path.display()),
            step_s: number("/svf/median_step_s")?,
            forward_s: number("/svf/median_phase_s/forward")?,
            backward_s: number("/svf/median_phase_s/backward")?,
            // MiB, in the KiB / 1e6 unit of `peak_rss_gb`.
            rss_gb: number("/svf/peak_rss_mib")? * 1024.0 / 1e6,
        })
    }
}

/// Peak resident memory of this process (Linux), in GB.
pub(super) fn peak_rss_gb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1e6)
}

/// The workload of the PyTorch peer: random token ids, a ±1 reward per sequence, and the
/// REINFORCE loss −mean_b(r_b · Σ completion log-probs) over the tokens after the prompt.
fn reinforce_batch(vocab: usize, batch: usize, seq: usize, prompt: usize) -> TokenBatch {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let mut ids = Vec::with_capacity(batch);
    let mut weights = Vec::with_capacity(batch);
    for _ in 0..batch {
        ids.push(
            (0..seq)
                .map(|_| rng.random_range(0..vocab as u32))
                .collect(),
        );
        let reward = if rng.random_bool(0.5) { 1.0 } else { -1.0 };
        weights.push(
            (0..seq)
                .map(|t| {
                    if t >= prompt {
                        reward / batch as f32
                    } else {
                        0.0
                    }
                })
                .collect(),
        );
    }
    TokenBatch { ids, weights }
}

/// A model with its 90 MLP matrices decomposed and the initial sigmoid expert on them: what
/// the training benches step.
pub(super) struct MlpSetup {
    pub model: Model,
    pub names: Vec<String>,
    pub factors: Vec<crate::svd::cache::Decomposed>,
    pub expert: Expert,
    /// Seconds to get the factors (the cache, or an SVD).
    pub factors_s: f64,
}

/// `layers`: only the MLP matrices of the first this many layers (all when `None`).
pub(super) fn mlp_setup(
    model_args: &ModelArgs,
    layers: Option<usize>,
) -> Result<MlpSetup, CmdError> {
    let model = model_args.load()?;
    let base = BaseModel::of_path(&model.path).map_err(CmdError::failed)?;
    let count = model.transformer.config.num_layers;
    let names: Vec<String> = (0..layers.map_or(count, |n| n.min(count)))
        .flat_map(|l| ["gate_proj", "up_proj", "down_proj"].map(|m| format!("layers.{l}.mlp.{m}")))
        .collect();
    let started = Instant::now();
    let home = crate::assets::TsqHome::from_env();
    let factors =
        crate::svf::factors_for(&model, &base, &names, &home).map_err(CmdError::failed)?;
    let factors_s = started.elapsed().as_secs_f64();
    let s = crate::svd::cache::singular_values(&factors);
    let expert =
        Expert::initial(base, Parametrization::Sigmoid, &s, 0).map_err(CmdError::failed)?;
    Ok(MlpSetup {
        model,
        names,
        factors,
        expert,
        factors_s,
    })
}

/// The shape of one measured SVF step.
pub struct SvfStepShape {
    pub batch: usize,
    pub seq: usize,
    pub prompt: usize,
    pub steps: usize,
    /// Train the MLP matrices of the first this many layers only (all when `None`).
    pub layers: Option<usize>,
}

/// Writes what an independent check of one SVF step needs to `file`: the targets, each z, the
/// files of their cached factors, the batch (ids and per-token weights), and the loss and
/// z-gradients tsq computes from them. The factor files let the check hold the engine to
/// account on tsq's own U, s, Vᵀ, apart from how closely two SVDs agree.
fn write_gradients(
    trainer: &SvfTrainer,
    factor_files: &[PathBuf],
    batch: &TokenBatch,
    file: &Path,
) -> Result<(), CmdError> {
    let (loss, grads, _) = trainer.gradients(batch).map_err(CmdError::failed)?;
    let z = trainer.z().map_err(CmdError::failed)?;
    let grads = grads
        .iter()
        .map(|g| g.to_vec1::<f32>())
        .collect::<candle_core::Result<Vec<_>>>()
        .map_err(CmdError::failed)?;
    let record = json!({
        "parametrization": "sigmoid",
        "max_mult": crate::svf::MAX_MULT,
        "targets": z.iter().map(|(name, _)| name).collect::<Vec<_>>(),
        "z": z.iter().map(|(_, z)| z).collect::<Vec<_>>(),
        "factors": factor_files,
        "ids": batch.ids,
        "weights": batch.weights,
        "loss": loss,
        "z_grads": grads,
        "engine": trainer.engine(),
    });
    crate::fsutil::write_json(file, &record).map_err(CmdError::failed)
}

/// `peer`: a file with the PyTorch peer's output from a run beside this one; without it, the
/// figures recorded in shared/peers/README.md.
/// `gradients`: where to write the first step's inputs and gradients ([`write_gradients`]).
pub fn svf_step_bench(
    model_args: &ModelArgs,
    shape: &SvfStepShape,
    peer: Option<&Path>,
    gradients: Option<&Path>,
) -> Result<(), CmdError> {
    let peer = match peer {
        Some(path) => PeerStep::from_file(path)?,
        None => PeerStep::recorded(),
    };
    let MlpSetup {
        model,
        names,
        factors,
        expert,
        factors_s,
    } = mlp_setup(model_args, shape.layers)?;
    let parameters: usize = crate::svd::cache::singular_values(&factors)
        .iter()
        .map(|(_, s)| s.elem_count())
        .sum();
    let vocab = model.transformer.config.vocab_size;
    let mut trainer = SvfTrainer::new(&model.transformer, &factors, &expert, 2e-3, 1e-3)
        .map_err(CmdError::failed)?;
    let factor_files: Vec<PathBuf> = factors.iter().map(|d| d.file.clone()).collect();
    // The trainer holds its own copies: what it does not need leaves the peak RSS.
    drop((factors, model));
    let batch = reinforce_batch(vocab, shape.batch, shape.seq, shape.prompt);
    if let Some(file) = gradients {
        write_gradients(&trainer, &factor_files, &batch, file)?;
    }
    let mut reports = Vec::new();
    for step in 0..=shape.steps {
        let clock = Instant::now();
        let report = trainer.step(&batch).map_err(CmdError::failed)?;
        let total = clock.elapsed().as_secs_f64();
        eprintln!(
            "  step {step}{}: {total:.2} s (loss {:.4}, grad norm {:.3e})",
            if step == 0 { " (warm-up)" } else { "" },
            report.loss,
            report.grad_norm
        );
        if step > 0 {
            reports.push((total, report));
        }
    }
    reports.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (median, report) = reports[reports.len() / 2].clone();
    let rss = peak_rss_gb();
    println!(
        "tsq bench svf-step: {} ({} threads, {}), {} MLP targets, {parameters} parameters, batch {}×{} ({} prompt)",
        model_args.source,
        rayon::current_num_threads(),
        products(),
        names.len(),
        shape.batch,
        shape.seq,
        shape.prompt
    );
    println!("  factors (cache or SVD) {factors_s:>8.2} s");
    println!(
        "  step (median of {})    {median:>8.2} s   apply e(z) {:.2}, forward {:.2}, backward {:.2}, adam {:.3}",
        reports.len(),
        report.apply_s,
        report.forward_s,
        report.backward_s,
        report.optimizer_s
    );
    println!(
        "  peak RSS               {:>8.2} GB",
        rss.unwrap_or(f64::NAN)
    );
    println!(
        "  peer: {}: {:.2} s per step (forward {:.2}, backward {:.2}), {:.2} GB → tsq is {:.2}x its speed at {:.2}x its memory",
        peer.label,
        peer.step_s,
        peer.forward_s,
        peer.backward_s,
        peer.rss_gb,
        peer.step_s / median,
        rss.unwrap_or(f64::NAN) / peer.rss_gb
    );
    let record = json!({"bench": "svf_step", "engine": trainer.engine(), "gemm": products(), "threads": rayon::current_num_threads(), "targets": names.len(), "parameters": parameters, "batch": shape.batch, "seq": shape.seq, "prompt": shape.prompt, "median_step_s": median, "phases": report, "peak_rss_gb": rss, "factors_s": factors_s, "peer": {"label": peer.label, "step_s": peer.step_s, "peak_rss_gb": peer.rss_gb}});
    println!("{record}");
    Ok(())
}
