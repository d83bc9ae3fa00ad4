//! Each subcommand's arguments as clap reads them, and how each runs: turned into the
//! command's own arguments in `cmd` and handed over.

use std::path::PathBuf;

use super::{Format, ModelOptions, Overrides, ReportFormatArg, Selection};
use crate::cmd;
use crate::model::generate::GenerateOptions;

#[derive(Debug, clap::Args)]
pub struct ValidateArgs {
    /// Pipeline files to check.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    #[command(flatten)]
    pub overrides: Overrides,
    /// Output format; `json` is for CI and editors.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

impl ValidateArgs {
    pub(super) fn run(self) -> Result<(), cmd::CmdError> {
        let Self {
            files,
            overrides,
            format,
        } = self;
        cmd::validate::run(&files, &overrides.set, format)
    }
}

#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    pub file: PathBuf,
    #[command(flatten)]
    pub overrides: Overrides,
    #[command(flatten)]
    pub selection: Selection,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// With `slurm`, each job's `sbatch` options too (default: the pipeline's `executor.kind`).
    #[arg(long, value_enum)]
    pub executor: Option<ExecutorChoice>,
}

impl PlanArgs {
    pub(super) fn run(self) -> Result<(), cmd::CmdError> {
        let Self {
            file,
            overrides,
            selection,
            format,
            executor,
        } = self;
        let choice = cmd::run::ExecutorChoice {
            kind: executor.map(ExecutorChoice::kind),
            ..Default::default()
        };
        cmd::plan::run(&file, &overrides.set, &selection.into(), format, &choice)
    }
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    pub file: PathBuf,
    #[command(flatten)]
    pub overrides: Overrides,
    #[command(flatten)]
    pub selection: Selection,
    /// Print what would run, run nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub executor: ExecutorArgs,
}

impl RunArgs {
    pub(super) fn run(self) -> Result<(), cmd::CmdError> {
        let Self {
            file,
            overrides,
            selection,
            dry_run,
            executor,
        } = self;
        cmd::run::run(
            &file,
            &overrides.set,
            &selection.into(),
            dry_run,
            &executor.into(),
        )
    }
}

/// Where the stages run, over the pipeline's `executor:` section.
#[derive(Debug, clap::Args)]
pub struct ExecutorArgs {
    /// `local` runs the stages here; `slurm` submits each as a job (default: the pipeline's
    /// `executor.kind`, else local).
    #[arg(long, value_enum)]
    pub executor: Option<ExecutorChoice>,
    /// Slurm partition for the jobs.
    #[arg(long, requires = "executor")]
    pub partition: Option<String>,
    /// Slurm account for the jobs.
    #[arg(long, requires = "executor")]
    pub account: Option<String>,
    /// Submit the jobs and return without following them.
    #[arg(long, requires = "executor")]
    pub detach: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExecutorChoice {
    Local,
    Slurm,
}

impl ExecutorChoice {
    fn kind(self) -> crate::pipeline::spec::ExecutorKind {
        use crate::pipeline::spec::ExecutorKind;
        match self {
            Self::Local => ExecutorKind::Local,
            Self::Slurm => ExecutorKind::Slurm,
        }
    }
}

impl From<ExecutorArgs> for cmd::run::ExecutorChoice {
    fn from(a: ExecutorArgs) -> Self {
        Self {
            kind: a.executor.map(ExecutorChoice::kind),
            partition: a.partition,
            account: a.account,
            detach: a.detach,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct ExportSlurmArgs {
    pub file: PathBuf,
    /// A new (or empty) directory for the scripts.
    pub dir: PathBuf,
    #[command(flatten)]
    pub overrides: Overrides,
}

impl ExportSlurmArgs {
    pub(super) fn run(self) -> Result<(), cmd::CmdError> {
        cmd::export::slurm(&self.file, &self.overrides.set, &self.dir)
    }
}

#[derive(Debug, clap::Args)]
pub struct FetchArgs {
    pub file: PathBuf,
    #[command(flatten)]
    pub overrides: Overrides,
}

impl FetchArgs {
    pub(super) fn run(self) -> Result<(), cmd::CmdError> {
        let Self { file, overrides } = self;
        cmd::fetch::run(&file, &overrides.set)
    }
}

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelOptions,
    /// Wrap each prompt as a user turn of the model's chat template.
    #[arg(long)]
    pub chat: bool,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Keep only the K most likely tokens (0: off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop a sequence when its text contains this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep generating past the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Decode from Q8_0-quantized copies of the weights (~4x less memory traffic) where a
    /// step has at most 12 rows (sequences × new tokens); longer prompts and larger batches
    /// keep the f32 weights.
    #[arg(long)]
    pub decode_q8: bool,
    /// A finished run directory (`runs/<name>`) whose adaptation `--adapt` names.
    #[arg(long, value_name = "RUN_DIR", requires = "adapt")]
    pub run: Option<PathBuf>,
    /// Answer each prompt through this adaptation of `--run`: its first pass picks the
    /// expert (or mixture), which is shown with the reason before the answer.
    #[arg(long, value_name = "NAME", requires = "run", conflicts_with_all = ["expert", "model"])]
    pub adapt: Option<String>,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    #[arg(required = true)]
    pub prompts: Vec<String>,
}

impl GenerateArgs {
    pub(super) fn run(self) -> Result<(), cmd::CmdError> {
        let Self {
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
        } = self;
        let opts = GenerateOptions {
            max_new_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            stop,
            ignore_eos,
            track_entropy: false,
            logprobs: None,
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
}

#[derive(Debug, clap::Args)]
pub struct ChatArgs {
    /// A finished run directory (`runs/<name>`).
    pub run: PathBuf,
    /// An adaptation of the run (`adaptations` in its pipeline).
    #[arg(long, value_name = "NAME")]
    pub adapt: Option<String>,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Decode answers from Q8_0-quantized copies of the answering model's weights (~4x less
    /// memory traffic, made once per model); the conversation so far is read with the f32
    /// weights, and an adaptation's first pass uses them throughout.
    #[arg(long)]
    pub decode_q8: bool,
}

impl ChatArgs {
    pub(super) fn run(self) -> Result<(), cmd::CmdError> {
        let Self {
            run,
            adapt,
            max_new_tokens,
            temperature,
            seed,
            decode_q8,
        } = self;
        let opts = GenerateOptions {
            max_new_tokens,
            temperature,
            seed,
            ..GenerateOptions::default()
        };
        cmd::chat::run(&run, adapt.as_deref(), &opts, decode_q8)
    }
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// A finished run directory (`runs/<name>`).
    pub run: PathBuf,
    /// Address to listen on; another host than 127.0.0.1 exposes the server to the network.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// A file holding the API key clients must send as `Authorization: Bearer KEY`.
    #[arg(long, value_name = "FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Sequences decoded together at most.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_batch: u16,
    /// Requests waiting for a place in the batch at most; beyond, 429 with Retry-After.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_queue: u16,
    /// MiB of prompts' keys and values kept so that later prompts starting the same way (a
    /// system prompt) compute only the rest; 0 keeps none.
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    pub prefix_cache: u32,
    /// Largest `max_tokens` a request may ask for.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_tokens: u16,
    /// Seconds a client may take to send a request's headers before it is disconnected.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..))]
    pub header_timeout: u16,
    /// Decode from Q8_0-quantized copies of the weights that are not SVF targets (all of them
    /// for a run without experts) where a step has at most 12 rows (sequences × new tokens):
    /// ~4x less memory traffic at low concurrency; prompts and larger batches keep f32.
    #[arg(long)]
    pub decode_q8: bool,
}

impl ServeArgs {
    pub(super) fn run(self) -> Result<(), cmd::CmdError> {
        let Self {
            run,
            host,
            port,
            api_key_file,
            max_batch,
            max_queue,
            prefix_cache,
            max_tokens,
            header_timeout,
            decode_q8,
        } = self;
        let options = crate::serve::ServeOptions {
            host,
            port,
            api_key_file,
            capacity: crate::serve::engine::Capacity {
                max_batch: max_batch.into(),
                max_queue: max_queue.into(),
                prefix_cache: prefix_cache as usize * (1 << 20),
            },
            header_timeout: std::time::Duration::from_secs(header_timeout.into()),
            decode_q8,
            limits: crate::serve::api::Limits {
                max_tokens: max_tokens.into(),
                max_n: 8,
                max_stop: 4,
            },
        };
        crate::serve::run(&run, &options).map_err(cmd::CmdError::failed)
    }
}

#[derive(Debug, clap::Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub model: ModelOptions,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, required = true)]
    pub continuation: Vec<String>,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

impl ScoreArgs {
    pub(super) fn run(self) -> Result<(), cmd::CmdError> {
        let Self {
            model,
            prompt,
            continuation,
            format,
        } = self;
        cmd::score::run(&model.into(), &prompt, &continuation, format)
    }
}

#[derive(Debug, clap::Args)]
pub struct ClassifyArgs {
    #[command(flatten)]
    pub model: ModelOptions,
    /// A minijinja template of the question to the model (variables: `question`, `labels`),
    /// e.g. templates/classifiers/paper.jinja.
    #[arg(long, required_unless_present = "adaptation", requires = "labels")]
    pub template: Option<PathBuf>,
    /// The categories, comma-separated (e.g. `code,math,reasoning,other`).
    #[arg(long, value_delimiter = ',', requires = "template")]
    pub labels: Vec<String>,
    /// Take the template and labels from a routing adaptation of a pipeline instead, as
    /// `PIPELINE:NAME`; each label's expert is shown too.
    #[arg(long, value_name = "PIPELINE:NAME", conflicts_with_all = ["template", "labels"])]
    pub adaptation: Option<String>,
    /// Divide each label's probability by its mean over the inputs given (batch
    /// calibration): removes the model's preference for some labels whatever the input.
    #[arg(long)]
    pub calibrate: bool,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    #[arg(required = true)]
    pub inputs: Vec<String>,
}

impl ClassifyArgs {
    pub(super) fn run(self) -> Result<(), cmd::CmdError> {
        let Self {
            model,
            template,
            labels,
            adaptation,
            calibrate,
            format,
            inputs,
        } = self;
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
}

#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// A run directory (`runs/<name>`).
    pub run: PathBuf,
    /// Formats to write, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [ReportFormatArg::Md, ReportFormatArg::Html])]
    pub format: Vec<ReportFormatArg>,
    /// Where to write (default: the run directory itself).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// A minijinja template replacing the built-in Markdown report.
    #[arg(long, value_name = "FILE")]
    pub markdown_template: Option<PathBuf>,
    /// A minijinja template replacing the built-in HTML report.
    #[arg(long, value_name = "FILE")]
    pub html_template: Option<PathBuf>,
}

impl ReportArgs {
    pub(super) fn run(self) -> Result<(), cmd::CmdError> {
        let Self {
            run,
            format,
            out,
            markdown_template,
            html_template,
        } = self;
        let formats: Vec<_> = format.into_iter().map(Into::into).collect();
        let templates = cmd::report::TemplateFiles {
            markdown: markdown_template,
            html: html_template,
        };
        cmd::report::run(&run, &formats, out.as_deref(), &templates)
    }
}

#[derive(Debug, clap::Args)]
pub struct ExpertInspectArgs {
    pub file: PathBuf,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

impl ExpertInspectArgs {
    pub(super) fn run(self) -> Result<(), cmd::CmdError> {
        let Self { file, format } = self;
        cmd::expert::inspect(&file, format)
    }
}

#[derive(Debug, clap::Args)]
pub struct ExpertCombineArgs {
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// One weight per expert, comma-separated (default: equal weights).
    #[arg(long, value_delimiter = ',', conflicts_with = "layer_weights")]
    pub weights: Option<Vec<f64>>,
    /// JSON file with one array of per-layer weights per expert.
    #[arg(long, value_name = "FILE")]
    pub layer_weights: Option<PathBuf>,
    #[arg(long)]
    pub out: PathBuf,
}

impl ExpertCombineArgs {
    pub(super) fn run(self) -> Result<(), cmd::CmdError> {
        let Self {
            files,
            weights,
            layer_weights,
            out,
        } = self;
        let weights = match layer_weights {
            Some(file) => cmd::expert::Weights::PerLayerFile(file),
            None => cmd::expert::Weights::PerExpert(weights),
        };
        cmd::expert::combine_files(&files, &weights, &out)
    }
}

#[derive(Debug, clap::Args)]
pub struct ExpertExportArgs {
    #[command(flatten)]
    pub model: ModelOptions,
    /// The directory to create (must not exist).
    #[arg(long)]
    pub out: PathBuf,
}

impl ExpertExportArgs {
    pub(super) fn run(self) -> Result<(), cmd::CmdError> {
        let Self { model, out } = self;
        cmd::expert::export(&model.into(), &out)
    }
}

#[derive(Debug, clap::Args)]
pub struct BenchEvalArgs {
    pub pipeline: PathBuf,
    /// The evaluation stage, e.g. `eval.logic`.
    pub stage: String,
    /// Evaluate at most this many of the stage's items.
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long, value_name = "FILE")]
    pub write_items: Option<PathBuf>,
    #[arg(long, value_name = "FILE")]
    pub peer: Option<PathBuf>,
    #[arg(long, value_name = "FILE")]
    pub peer_items: Option<PathBuf>,
}

impl BenchEvalArgs {
    pub(super) fn run(self) -> Result<(), cmd::CmdError> {
        let Self {
            pipeline,
            stage,
            limit,
            write_items,
            peer,
            peer_items,
        } = self;
        cmd::bench_eval::run(&cmd::bench_eval::BenchEvalArgs {
            pipeline: &pipeline,
            stage: &stage,
            limit,
            write_items: write_items.as_deref(),
            peer: peer.as_deref(),
            peer_items: peer_items.as_deref(),
        })
    }
}

#[derive(Debug, clap::Args)]
pub struct BenchGenerateArgs {
    #[command(flatten)]
    pub model: ModelOptions,
    /// Repetitions of each measurement; the best is reported.
    #[arg(long, default_value_t = 2)]
    pub repeat: usize,
    /// The batch of the second decode measurement (the first is batch 1).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(2..))]
    pub batch: u16,
}

impl BenchGenerateArgs {
    pub(super) fn run(self) -> Result<(), cmd::CmdError> {
        let Self {
            model,
            repeat,
            batch,
        } = self;
        cmd::bench::generate_bench(&model.into(), repeat, batch.into())
    }
}

#[derive(Debug, clap::Args)]
pub struct BenchSvdArgs {
    #[command(flatten)]
    pub model: ModelOptions,
    #[arg(long)]
    pub large: bool,
}

impl BenchSvdArgs {
    pub(super) fn run(self) -> Result<(), cmd::CmdError> {
        let Self { model, large } = self;
        cmd::bench::svd_bench(&model.into(), large)
    }
}

#[derive(Debug, clap::Args)]
pub struct BenchSvfStepArgs {
    #[command(flatten)]
    pub model: ModelOptions,
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..))]
    pub batch: u16,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u16).range(2..))]
    pub seq: u16,
    /// Prompt tokens per sequence (at least 1); the rest is scored as the completion.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    pub prompt: u16,
    /// Measured steps after one warm-up step; the median is reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
    pub steps: u16,
    /// The JSON line from `shared/peers/torch_svf_bench.py --parts svf` run just before, to
    /// compare with (default: the figures recorded in shared/peers/README.md).
    #[arg(long, value_name = "FILE")]
    pub peer: Option<PathBuf>,
    /// Write the first step's targets, z, batch, loss and z-gradients as JSON to FILE, for an
    /// independent check (scripts/gpu_check.py compares them with torch autograd's).
    #[arg(long, value_name = "FILE")]
    pub gradients: Option<PathBuf>,
    /// Train the MLP matrices of the first N layers only (default: every layer's), e.g. to
    /// measure an 8B model's step memory without decomposing all its matrices first.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub layers: Option<u16>,
}

impl BenchSvfStepArgs {
    pub(super) fn run(self) -> Result<(), cmd::CmdError> {
        let Self {
            model,
            batch,
            seq,
            prompt,
            steps,
            peer,
            gradients,
            layers,
        } = self;
        cmd::bench::svf_step_bench(
            &model.into(),
            &cmd::bench::SvfStepShape {
                batch: batch.into(),
                seq: seq.into(),
                prompt: prompt.into(),
                steps: steps.into(),
                layers: layers.map(usize::from),
            },
            peer.as_deref(),
            gradients.as_deref(),
        )
    }
}

#[derive(Debug, clap::Args)]
pub struct BenchRlStepArgs {
    #[command(flatten)]
    pub model: ModelOptions,
    /// The JSON line from `shared/peers/torch_svf_bench.py --parts svf,rollout` run just
    /// before (default: the figures recorded on 2026-12-01).
    #[arg(long, value_name = "FILE")]
    pub peer: Option<PathBuf>,
    /// Also time an option-rollout step whose prompts are the items of this JSONL file, as
    /// `tsq bench eval --write-items` writes them (one step's worth, e.g. 8)
    #[arg(long, value_name = "ITEMS")]
    pub options: Option<PathBuf>,
    /// The JSON line from `shared/peers/torch_score_bench.py` on the same `--options` items, run
    /// just before
    #[arg(long, value_name = "FILE", requires = "options")]
    pub peer_score: Option<PathBuf>,
}

impl BenchRlStepArgs {
    pub(super) fn run(self) -> Result<(), cmd::CmdError> {
        let Self {
            model,
            peer,
            options,
            peer_score,
        } = self;
        let options = options.map(|items| cmd::bench_rl::OptionStep {
            items,
            peer: peer_score,
        });
        cmd::bench_rl::run(&model.into(), peer.as_deref(), options.as_ref())
    }
}
