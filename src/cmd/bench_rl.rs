//! `tsq bench rl-step`: one whole RL step on the real model, the way `train.<expert>` takes it —
//! compose the current expert, sample 8 prompts × 4 completions (temperature 0.7, up to 128
//! new tokens), weight them by leave-one-out advantages of a ±1 reward, one SVF step on the 90
//! MLP targets — beside the PyTorch peer doing the same parts
//! (`shared/peers/torch_svf_bench.py --parts svf,rollout`) in the same session. With
//! `--options`, also an option-rollout step (score each item's options with the policy, weight
//! them, one SVF step) beside `torch_score_bench.py` scoring the same items.

use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use super::bench::{MlpSetup, mlp_setup, peak_rss_gb, products};
use super::{CmdError, ModelArgs};
use crate::model::Model;
use crate::model::generate::{GenerateOptions, Generation, generate};
use crate::model::score::{continuation_ids, filler};
use crate::rl::advantage::advantages;
use crate::rl::rollout::{OptionModels, as_trained, option_batch, uniform, weighted};
use crate::rl::spec::{AdvantageScale, Baseline, Rollout, TrainSpec};
use crate::svf::apply::{Application, apply};
use crate::svf::train::{SvfTrainer, TokenBatch};

/// The peer's questions (torch_svf_bench.py), asked through the chat template.
const QUESTIONS: [&str; 8] = [
    "What is 12*7?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "Explain photosynthesis in one sentence.",
    "How many legs does a spider have?",
    "Give me a synonym for 'happy'.",
    "What is 15 + 27?",
];
const SAMPLES: usize = 4;
const NEW_TOKENS: usize = 128;
/// The token count of the peer's SVF step (8 × 256), which its time is scaled from.
const PEER_SVF_TOKENS: f64 = 2048.0;

/// The peer's figures: from a JSON line of this session, or as recorded on 2026-12-01.
struct Peer {
    label: String,
    /// Sampled rollouts stopping at EOS: seconds, and completion tokens per second.
    natural_s: f64,
    natural_useful_tok_s: f64,
    /// Every sample forced to 128 tokens: tokens per second.
    forced_tok_s: Option<f64>,
    svf_step_s: f64,
    rss_gb: f64,
}

impl Peer {
    fn recorded() -> Self {
        // shared/peers/README.md, 2026-12-01: rollout 125.8 slot / 49.6 useful tok/s (the
        // batch runs 128 steps: 32 × 128 / 125.8 = 32.6 s); SVF step 15.40 s, 7.19 GB.
        Self {
            label: "PyTorch f32, recorded 2026-12-01".into(),
            natural_s: 32.0 * 128.0 / 125.8,
            natural_useful_tok_s: 49.6,
            forced_tok_s: None,
            svf_step_s: 15.40,
            rss_gb: 7.19,
        }
    }

    fn from_file(path: &Path) -> Result<Self, CmdError> {
        let bad = |what: String| CmdError::Usage(format!("{}: {what}", path.display()));
        let text = crate::fsutil::read_bounded(path, crate::fsutil::MAX_TEXT_BYTES)
            .map_err(|e| bad(e.to_string()))?;
        let value: Value =
            serde_json::from_str(text.trim()).map_err(|e| bad(format!("not JSON: {e}")))?;
        let number = |pointer: &str| {
            value.pointer(pointer).and_then(Value::as_f64).ok_or_else(|| {
                bad(format!(
                    "expected a number at `{pointer}` (torch_svf_bench.py --parts svf,rollout output)"
                ))
            })
        };
        let rss_mib = number("/svf/peak_rss_mib")?.max(number("/rollout/peak_rss_mib")?);
        Ok(Self {
            label: format!("PyTorch f32, {}", path.display()),
            natural_s: number("/rollout/natural/seconds")?,
            natural_useful_tok_s: number("/rollout/natural/useful_tokens_per_s")?,
            forced_tok_s: Some(number("/rollout/forced128/tokens_per_s")?),
            svf_step_s: number("/svf/median_step_s")?,
            rss_gb: rss_mib * 1024.0 / 1e6,
        })
    }
}

/// Sampled rollouts of the questions: seconds, and the generations.
fn rollouts(
    policy: &Model,
    prompts: &[Vec<u32>],
    ignore_eos: bool,
    seed: u64,
) -> Result<(f64, Vec<Generation>), CmdError> {
    let opts = GenerateOptions {
        max_new_tokens: NEW_TOKENS,
        temperature: 0.7,
        seed,
        ignore_eos,
        ..GenerateOptions::default()
    };
    let clock = Instant::now();
    let out = generate(policy, prompts, &opts).map_err(CmdError::failed)?;
    Ok((clock.elapsed().as_secs_f64(), out))
}

/// The step's training batch: each completion as the trainer takes it, after its prompt,
/// weighted by its leave-one-out advantage under a random ±1 reward, over the batch.
fn weighted_batch(prompts: &[Vec<u32>], generations: &[Generation]) -> TokenBatch {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let rewards: Vec<Vec<f64>> = generations
        .chunks(SAMPLES)
        .map(|g| {
            g.iter()
                .map(|_| if rng.random_bool(0.5) { 1.0 } else { -1.0 })
                .collect()
        })
        .collect();
    let adv = advantages(&rewards, Baseline::Rloo, AdvantageScale::None);
    let n = generations.len() as f64;
    let (ids, weights) = prompts
        .iter()
        .zip(as_trained(generations))
        .zip(adv.into_iter().flatten())
        .map(|((prompt, completion), a)| weighted(prompt, &completion, uniform(&completion, a / n)))
        .unzip();
    TokenBatch { ids, weights }
}

/// The option-rollout step to time as well: its items, and the peer's scoring of them.
pub struct OptionStep {
    /// JSONL items `{"prompt", "continuations", "gold"}` (`tsq bench eval --write-items`).
    pub items: PathBuf,
    /// `torch_score_bench.py`'s JSON line on the same items.
    pub peer: Option<PathBuf>,
}

/// More items than this are not one step's prompts.
const MAX_STEP_ITEMS: usize = 64;

/// An option-rollout step's batch, and what making it took.
struct OptionRun {
    items: usize,
    options: usize,
    score_s: f64,
    batch: TokenBatch,
    peer_score_s: Option<f64>,
}

/// One item of an option step as written: the rendered prompt, the options, the gold one.
struct OptionItem {
    prompt: String,
    options: Vec<String>,
    gold: usize,
}

/// The items of `--options`, checked before any model is loaded.
fn read_option_items(path: &Path) -> Result<Vec<OptionItem>, CmdError> {
    let bad = |line: usize, what: &str| {
        CmdError::Usage(format!(
            "{}:{line}: {what}; expected {{\"prompt\": text, \"continuations\": [text, ...], \"gold\": index}} as `tsq bench eval --write-items` writes",
            path.display()
        ))
    };
    let text = crate::fsutil::read_bounded(path, crate::fsutil::MAX_TEXT_BYTES)
        .map_err(|e| CmdError::Usage(format!("{}: {e}", path.display())))?;
    let mut items = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let item: Value = serde_json::from_str(line).map_err(|_| bad(i + 1, "not JSON"))?;
        let prompt = item["prompt"].as_str().filter(|p| !p.is_empty());
        let options: Option<Vec<String>> = (item["continuations"].as_array())
            .and_then(|c| c.iter().map(|o| o.as_str().map(String::from)).collect());
        let gold = item["gold"].as_u64().and_then(|g| usize::try_from(g).ok());
        match (prompt, options, gold) {
            (Some(prompt), Some(options), Some(gold))
                if gold < options.len() && options.iter().all(|o| !o.is_empty()) =>
            {
                items.push(OptionItem {
                    prompt: prompt.to_string(),
                    options,
                    gold,
                })
            }
            _ => {
                return Err(bad(
                    i + 1,
                    "not an item with a prompt, options and a gold index",
                ));
            }
        }
    }
    if items.is_empty() || items.len() > MAX_STEP_ITEMS {
        return Err(CmdError::Usage(format!(
            "{}: {} items; one step takes 1 to {MAX_STEP_ITEMS} (e.g. `head -n 8` of the eval items)",
            path.display(),
            items.len()
        )));
    }
    Ok(items)
}

/// The peer's seconds for scoring `items` items, from its JSON line.
fn peer_score_seconds(path: &Path, items: usize) -> Result<f64, CmdError> {
    let bad = |what: String| CmdError::Usage(format!("{}: {what}", path.display()));
    let text = crate::fsutil::read_bounded(path, crate::fsutil::MAX_TEXT_BYTES)
        .map_err(|e| bad(e.to_string()))?;
    let value: Value =
        serde_json::from_str(text.trim()).map_err(|e| bad(format!("not JSON: {e}")))?;
    let (Some(seconds), Some(scored)) = (value["seconds"].as_f64(), value["items"].as_u64()) else {
        return Err(bad(
            "expected `seconds` and `items` (torch_score_bench.py's JSON line)".into(),
        ));
    };
    if scored != items as u64 {
        return Err(bad(format!(
            "the peer scored {scored} items, --options has {items}: run it on the same file"
        )));
    }
    Ok(seconds)
}

/// Scores the items' options with `policy` and weights them as `rollout: options` does, each
/// option's reward 1 for the gold one and 0 for the others.
fn option_rollouts(
    policy: &Model,
    items: &[OptionItem],
    peer_score_s: Option<f64>,
) -> Result<OptionRun, CmdError> {
    let mut inputs = Vec::with_capacity(items.len());
    for item in items {
        let prompt = policy.tokenizer.encode(&item.prompt);
        let options: Result<Vec<_>, _> = (item.options.iter())
            .map(|o| continuation_ids(policy, o))
            .collect();
        inputs.push((
            prompt.map_err(CmdError::failed)?,
            options.map_err(CmdError::failed)?,
        ));
    }
    let rewards: Vec<Vec<f64>> = (items.iter())
        .map(|item| {
            (0..item.options.len())
                .map(|k| f64::from(u8::from(k == item.gold)))
                .collect()
        })
        .collect();
    let spec = TrainSpec {
        rollout: Rollout::Options,
        ..TrainSpec::default()
    };
    let models = OptionModels {
        policy: &policy.transformer,
        base: None,
        filler: filler(policy),
    };
    let clock = Instant::now();
    let made = option_batch(&spec, &models, &inputs, &rewards, 0).map_err(CmdError::failed)?;
    Ok(OptionRun {
        items: items.len(),
        options: items.iter().map(|i| i.options.len()).sum(),
        score_s: clock.elapsed().as_secs_f64(),
        batch: made.batch,
        peer_score_s,
    })
}

pub fn run(
    model_args: &ModelArgs,
    peer: Option<&Path>,
    options: Option<&OptionStep>,
) -> Result<(), CmdError> {
    let peer = match peer {
        Some(path) => Peer::from_file(path)?,
        None => Peer::recorded(),
    };
    let option_items = options.map(|o| read_option_items(&o.items)).transpose()?;
    let peer_score_s = match (options.and_then(|o| o.peer.as_deref()), &option_items) {
        (Some(path), Some(items)) => Some(peer_score_seconds(path, items.len())?),
        _ => None,
    };
    let MlpSetup {
        model,
        names,
        factors,
        expert,
        ..
    } = mlp_setup(model_args, None)?;
    let mut trainer = SvfTrainer::new(&model.transformer, &factors, &expert, 2e-3, 1e-3)
        .map_err(CmdError::failed)?;
    let prompts: Vec<Vec<u32>> = QUESTIONS
        .iter()
        .map(|q| {
            let text = model.chat_prompt(q).map_err(CmdError::failed)?;
            let ids = model.tokenizer.encode(&text).map_err(CmdError::failed)?;
            Ok(std::iter::repeat_n(ids, SAMPLES))
        })
        .collect::<Result<Vec<_>, CmdError>>()?
        .into_iter()
        .flatten()
        .collect();
    let clock = Instant::now();
    let mut policy = model.clone();
    let scales = expert.effective_scales().map_err(CmdError::failed)?;
    apply(
        &mut policy.transformer,
        &factors,
        &scales,
        Application::Compose,
    )
    .map_err(CmdError::failed)?;
    let compose_s = clock.elapsed().as_secs_f64();
    // Warm-up (allocations, page faults), then the measured runs.
    rollouts(&policy, &prompts[..SAMPLES], false, 0)?;
    let (forced_s, _) = rollouts(&policy, &prompts, true, 0)?;
    let (natural_s, generations) = rollouts(&policy, &prompts, false, 1)?;
    let batch = weighted_batch(&prompts, &generations);
    let useful: usize = batch
        .weights
        .iter()
        .map(|w| w.iter().filter(|&&x| x != 0.0).count())
        .sum();
    let trained: usize = batch.ids.iter().map(Vec::len).sum();
    let option_run = (option_items.as_deref())
        .map(|items| option_rollouts(&policy, items, peer_score_s))
        .transpose()?;
    drop((factors, policy));
    let clock = Instant::now();
    let report = trainer.step(&batch).map_err(CmdError::failed)?;
    let train_s = clock.elapsed().as_secs_f64();
    let option_train_s = (option_run.as_ref())
        .map(|o| {
            let clock = Instant::now();
            trainer.step(&o.batch).map_err(CmdError::failed)?;
            Ok::<_, CmdError>(clock.elapsed().as_secs_f64())
        })
        .transpose()?;
    let rss = peak_rss_gb().unwrap_or(f64::NAN);
    let forced_tok_s = (generations.len() * NEW_TOKENS) as f64 / forced_s;
    let natural_tok_s = useful as f64 / natural_s;
    let step_s = compose_s + natural_s + train_s;
    // The peer's step on the same work: its rollout plus its SVF step scaled to our tokens.
    let peer_train_s = peer.svf_step_s * trained as f64 / PEER_SVF_TOKENS;
    let peer_step_s = peer.natural_s + peer_train_s;
    println!(
        "tsq bench rl-step: {} ({} threads, {}), {} MLP targets, {} prompts × {SAMPLES} samples, T 0.7, ≤ {NEW_TOKENS} new tokens",
        model_args.source,
        rayon::current_num_threads(),
        products(),
        names.len(),
        QUESTIONS.len()
    );
    println!("  compose expert           {compose_s:>7.2} s");
    println!(
        "  rollout, forced 128      {forced_s:>7.2} s  {forced_tok_s:>7.1} tok/s{}",
        peer.forced_tok_s.map_or(String::new(), |p| format!(
            "   peer {p:.1} tok/s → {:.2}x",
            forced_tok_s / p
        ))
    );
    println!(
        "  rollout, stop at EOS     {natural_s:>7.2} s  {natural_tok_s:>7.1} tok/s   peer {:.1} tok/s → {:.2}x ({useful} completion tokens)",
        peer.natural_useful_tok_s,
        natural_tok_s / peer.natural_useful_tok_s
    );
    println!(
        "  SVF step                 {train_s:>7.2} s  on {trained} tokens (loss {:.4}, grad norm {:.2e})",
        report.loss, report.grad_norm
    );
    println!(
        "  whole step               {step_s:>7.2} s   peer {peer_step_s:.2} s (rollout {:.2} + SVF {:.2}, its 8×256 step scaled to {trained} tokens) → {:.2} of the peer's time",
        peer.natural_s,
        peer_train_s,
        step_s / peer_step_s
    );
    println!(
        "  peak RSS                 {rss:>7.2} GB  peer {:.2} GB → {:.2}x",
        peer.rss_gb,
        rss / peer.rss_gb
    );
    let option_record = match (&option_run, option_train_s) {
        (Some(o), Some(train_s)) => print_option_step(o, train_s, &peer),
        _ => Value::Null,
    };
    println!("  peer: {}", peer.label);
    let record = json!({
        "bench": "rl_step", "gemm": products(), "threads": rayon::current_num_threads(),
        "compose_s": compose_s, "rollout_forced_s": forced_s, "rollout_forced_tok_s": forced_tok_s,
        "rollout_natural_s": natural_s, "rollout_natural_tok_s": natural_tok_s,
        "completion_tokens": useful, "trained_tokens": trained, "train_s": train_s,
        "step_s": step_s, "peak_rss_gb": rss, "option_step": option_record,
        "peer": {"label": peer.label, "natural_s": peer.natural_s, "natural_useful_tok_s": peer.natural_useful_tok_s,
                 "forced_tok_s": peer.forced_tok_s, "svf_step_s": peer.svf_step_s, "step_s_scaled": peer_step_s, "peak_rss_gb": peer.rss_gb},
    });
    println!("{record}");
    Ok(())
}

/// Prints the option-rollout step beside the peer's; returns its record.
fn print_option_step(o: &OptionRun, train_s: f64, peer: &Peer) -> Value {
    let tokens: usize = o.batch.ids.iter().map(Vec::len).sum();
    let step_s = o.score_s + train_s;
    let peer_train_s = peer.svf_step_s * tokens as f64 / PEER_SVF_TOKENS;
    let peer_step_s = o.peer_score_s.map(|s| s + peer_train_s);
    let vs = |ours: f64, theirs: Option<f64>, what: &str| {
        theirs.map_or(String::new(), |t| {
            format!("   peer {t:.2} s → {:.2}x{what}", t / ours)
        })
    };
    println!("  option step: {} items, {} options", o.items, o.options);
    println!(
        "    scoring                {:>7.2} s{}",
        o.score_s,
        vs(o.score_s, o.peer_score_s, " (torch_score_bench)")
    );
    println!("    SVF step               {train_s:>7.2} s  on {tokens} tokens");
    println!(
        "    whole step             {step_s:>7.2} s{}",
        vs(
            step_s,
            peer_step_s,
            " (its SVF step scaled to these tokens)"
        )
    );
    json!({"items": o.items, "options": o.options, "score_s": o.score_s, "train_s": train_s,
           "tokens": tokens, "step_s": step_s, "peer_score_s": o.peer_score_s, "peer_step_s_scaled": peer_step_s})
}
