//! `tsq bench eval PIPELINE STAGE`: the evaluation path's throughput (items/s, tokens/s) on
//! the stage's items, run in-process without checkpoints or outputs, and beside PyTorch: it can
//! write the exact rendered items for `shared/peers/torch_score_bench.py` and compare with that
//! peer's JSON line and per-item option log-likelihoods.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde_json::{Value, json};

use super::{CmdError, load_or_report};
use crate::eval::runner::Sample;
use crate::eval::spec::EvalMode;
use crate::stages::Env;
use crate::stages::eval::{EvalStage, run_batches};
use crate::stages::ids;

pub struct BenchEvalArgs<'a> {
    pub pipeline: &'a Path,
    pub stage: &'a str,
    pub limit: Option<usize>,
    /// Write the rendered items as the peer's input (JSONL) here.
    pub write_items: Option<&'a Path>,
    /// The peer's JSON line, run just before on the written items.
    pub peer: Option<&'a Path>,
    /// The peer's per-item option log-likelihoods (`--out` of the peer).
    pub peer_items: Option<&'a Path>,
}

pub fn run(args: &BenchEvalArgs) -> Result<(), CmdError> {
    let pipeline = load_or_report(args.pipeline, &[])?;
    let eval = pipeline
        .evaluations
        .iter()
        .find(|e| ids::eval(&e.name).as_str() == args.stage)
        .ok_or_else(|| {
            let known: Vec<String> = (pipeline.evaluations.iter())
                .map(|e| ids::eval(&e.name).to_string())
                .collect();
            CmdError::Usage(format!(
                "no evaluation stage `{}` in this pipeline; evaluations: {}",
                args.stage,
                known.join(", ")
            ))
        })?;
    let run_root = pipeline.runs_root().join(&pipeline.spec.name);
    let data_dir = run_root.join(ids::data(&eval.spec.dataset).as_str());
    let model_dir = run_root.join(ids::model().as_str());
    if !data_dir.join("manifest.json").exists() || !model_dir.join("manifest.json").exists() {
        return Err(CmdError::Failed(format!(
            "the benchmark evaluates prepared items: run `tsq run {} --only model --only data.{}` first",
            args.pipeline.display(),
            eval.spec.dataset
        )));
    }
    let record = crate::stages::model::ModelRecord::read(&model_dir).map_err(CmdError::failed)?;
    let env = Env::new(&pipeline, crate::assets::TsqHome::from_env());
    let stage = EvalStage {
        eval: eval.clone(),
        rewards: pipeline.spec.rewards.clone(),
        adaptations: Default::default(),
        version: String::new(),
        shared: &env.shared,
    };
    let records = crate::stages::data::read_stored(&data_dir).map_err(CmdError::failed)?;
    let (mut items, _) = stage.items(&records);
    items.truncate(args.limit.unwrap_or(items.len()));
    let train = crate::stages::eval::train_split(&records);
    let reward = stage.reward().map_err(CmdError::failed)?;
    let task = stage.task(&train, reward.as_ref());
    task.sort_for_batching(&mut items);
    let model = env.shared.model(&record).map_err(CmdError::failed)?;
    let mut samples: Vec<Sample> = Vec::new();
    let timing = run_batches(
        &task,
        &model,
        "base",
        &items,
        eval.spec.batch_size as usize,
        &mut |batch, _| {
            samples.extend(batch.iter().cloned());
            Ok(())
        },
    )
    .map_err(CmdError::failed)?;
    if let Some(file) = args.write_items {
        write_peer_items(file, &task, &items, &samples)?;
    }
    let correct = samples
        .iter()
        .filter(|s| s.verdict == crate::reward::Verdict::Correct)
        .count();
    let ours = json!({
        "bench": "tsq_eval", "stage": args.stage, "mode": eval.spec.mode, "items": samples.len(),
        "tokens": timing.tokens, "seconds": round(timing.seconds),
        "tokens_per_s": round(timing.tokens as f64 / timing.seconds),
        "items_per_s": round(samples.len() as f64 / timing.seconds),
        "acc": round(correct as f64 / samples.len().max(1) as f64),
        "gemm": super::bench::products(),
    });
    println!(
        "tsq {}: {} items, {} tokens in {:.2} s: {:.1} tok/s, {:.2} items/s, acc {:.4}",
        args.stage,
        samples.len(),
        timing.tokens,
        timing.seconds,
        timing.tokens as f64 / timing.seconds,
        samples.len() as f64 / timing.seconds,
        ours["acc"].as_f64().unwrap_or(0.0)
    );
    if let Some(file) = args.peer {
        compare_with_peer(file, &ours)?;
    }
    if let Some(file) = args.peer_items {
        compare_per_item(file, &samples)?;
    }
    println!("{ours}");
    Ok(())
}

fn round(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

/// The items exactly as tsq scored them, in the peer's input format.
/// The items as the peers read them: the rendered prompt with the options to score
/// (`torch_score_bench.py`) or with the generation budget (`scripts/torch_generate_bench.py`).
fn write_peer_items(
    file: &Path,
    task: &crate::eval::runner::Task,
    items: &[&crate::data::stored::StoredRecord],
    samples: &[Sample],
) -> Result<(), CmdError> {
    let spec = &task.eval.spec;
    let mut out = std::fs::File::create(file).map_err(CmdError::failed)?;
    for (item, sample) in items.iter().zip(samples) {
        let line = match spec.mode {
            EvalMode::Loglik => {
                let (continuations, gold) = task
                    .scored_options(&item.fields)
                    .map_err(CmdError::failed)?;
                json!({"id": item.id, "prompt": sample.prompt, "continuations": continuations, "gold": gold})
            }
            EvalMode::Generate => {
                json!({"id": item.id, "prompt": sample.prompt, "max_new_tokens": spec.max_new_tokens, "stop": spec.stop})
            }
        };
        writeln!(out, "{line}").map_err(CmdError::failed)?;
    }
    Ok(())
}

fn compare_with_peer(file: &Path, ours: &Value) -> Result<(), CmdError> {
    let text = crate::fsutil::read_bounded(file, crate::fsutil::MAX_LOG_BYTES)
        .map_err(CmdError::failed)?;
    let peer: Value = text
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| CmdError::failed(format!("`{}` holds no JSON line", file.display())))?;
    let get = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "PyTorch: {} items, {:.1} tok/s, {:.2} items/s, acc {:.4}; tsq/PyTorch items/s: {:.2}x",
        peer["items"],
        get(&peer, "tokens_per_s"),
        get(&peer, "items_per_s"),
        get(&peer, "acc"),
        get(ours, "items_per_s") / get(&peer, "items_per_s")
    );
    Ok(())
}

/// Per-item agreement with the peer: for options, the largest log-likelihood difference and how
/// many items pick the same option; for generations, how many completions are the same text.
fn compare_per_item(file: &Path, samples: &[Sample]) -> Result<(), CmdError> {
    let text = crate::fsutil::read_bounded(file, crate::fsutil::MAX_LOG_BYTES)
        .map_err(CmdError::failed)?;
    let peer: BTreeMap<String, Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| {
            let id = match &v["id"] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (id, v)
        })
        .collect();
    let (mut compared, mut same, mut worst) = (0, 0, 0.0f64);
    for s in samples {
        let Some(theirs) = peer.get(&s.id) else {
            continue;
        };
        if let Some(completion) = &s.completion {
            let Some(their_completion) = theirs["completion"].as_str() else {
                continue;
            };
            compared += 1;
            same += usize::from(completion == their_completion);
            continue;
        }
        let sums: Option<Vec<f64>> =
            (theirs["logprob_sums"].as_array()).and_then(|a| a.iter().map(Value::as_f64).collect());
        let (Some(ours), Some(theirs)) = (&s.option_logliks, sums) else {
            continue;
        };
        compared += 1;
        for (a, b) in ours.iter().zip(&theirs) {
            worst = worst.max((a - b).abs());
        }
        let best = |v: &[f64]| (0..v.len()).max_by(|&i, &j| v[i].total_cmp(&v[j]));
        same += usize::from(best(ours) == best(&theirs));
    }
    if samples.iter().any(|s| s.completion.is_some()) {
        println!("per item vs PyTorch: {compared} items compared, the same completion on {same}");
    } else {
        println!(
            "per item vs PyTorch: {compared} items compared, same choice on {same}, largest log-likelihood difference {worst:.2e}"
        );
    }
    Ok(())
}
