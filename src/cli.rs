//! The command line: clap definitions (the only module that knows clap) and dispatch to `cmd`.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::cmd;
use crate::pipeline::Override;

/// tsq: make language models self-adaptive the Transformer² way, from YAML pipelines.
///
/// A pipeline names a base model, the weight matrices to decompose, datasets, rewards, SVF experts
/// to train, an adaptation strategy, evaluations and a report. tsq validates it and runs it as a
/// graph of cached, resumable stages under `runs/<name>/`.
///
/// Exit codes: 0 success; 1 invalid pipeline or failed stage; 2 usage error; 130 interrupted.
#[derive(Debug, Parser)]
#[command(name = "tsq", version, max_term_width = 100)]
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
    /// Print the JSON Schema of pipeline files (checked in at `schemas/pipeline.schema.json`).
    Schema,
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
