//! One file per subcommand. Commands take plain arguments (no clap types), print results, and
//! return a [`CmdError`] that `main` maps to an exit code.

pub mod bench;
pub mod bench_eval;
pub mod bench_rl;
pub mod chat;
pub mod classify;
pub mod expert;
pub mod export;
pub mod fetch;
pub mod generate;
pub mod plan;
pub mod report;
pub mod run;
pub mod schema;
pub mod score;
pub mod validate;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::dag::{Graph, StageId};
use crate::diagnostic::{Diagnostic, render_text};
use crate::exec::{Executor, RunOptions};
use crate::pipeline::{Override, Pipeline};

pub use crate::cli::Format;

#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    /// Problems already printed (validation diagnostics).
    #[error("{0} problem(s) found")]
    Reported(usize),
    #[error("{0}")]
    Failed(String),
    #[error("{0}")]
    Interrupted(String),
    #[error("{0}")]
    Usage(String),
}

impl CmdError {
    /// A command that failed because of `e` (exit code 1).
    pub fn failed(e: impl std::fmt::Display) -> Self {
        Self::Failed(e.to_string())
    }

    /// A command that failed because of the error `e`, with every cause in its chain that its
    /// message does not already say.
    pub fn failed_with_causes(e: &dyn std::error::Error) -> Self {
        let mut message = e.to_string();
        let mut source = e.source();
        while let Some(cause) = source {
            let text = cause.to_string();
            if !message.contains(&text) {
                message.push_str(&format!("\n  caused by: {text}"));
            }
            source = cause.source();
        }
        Self::Failed(message)
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Reported(_) | Self::Failed(_) => 1,
            Self::Usage(_) => 2,
            Self::Interrupted(_) => 130,
        }
    }
}

/// `--force` / `--only` as written.
pub struct StageSelection {
    pub force: Vec<String>,
    pub only: Vec<String>,
}

impl StageSelection {
    /// Checks the stage names against the graph (usage error with a hint otherwise).
    fn resolve(&self, graph: &Graph) -> Result<RunOptions, CmdError> {
        let known: Vec<&str> = graph.stages.iter().map(|s| s.id.0.as_str()).collect();
        let check = |names: &[String]| -> Result<BTreeSet<StageId>, CmdError> {
            names
                .iter()
                .map(|n| {
                    if known.contains(&n.as_str()) {
                        Ok(StageId(n.clone()))
                    } else {
                        let hint = crate::diagnostic::did_you_mean(n, known.iter().copied())
                            .map(|s| format!(" (did you mean `{s}`?)"))
                            .unwrap_or_default();
                        Err(CmdError::Usage(format!(
                            "no stage `{n}` in this pipeline{hint}; stages: {}",
                            known.join(", ")
                        )))
                    }
                })
                .collect()
        };
        let only = if self.only.is_empty() {
            None
        } else {
            Some(check(&self.only)?)
        };
        Ok(RunOptions {
            force: check(&self.force)?,
            only,
        })
    }
}

/// Loads a pipeline, printing its diagnostics (to stderr) if it is invalid.
pub(crate) fn load_or_report(file: &Path, overrides: &[Override]) -> Result<Pipeline, CmdError> {
    crate::pipeline::load(file, overrides).map_err(|diagnostics| {
        eprint!("{}", render(&diagnostics));
        CmdError::Reported(diagnostics.len())
    })
}

fn render(diagnostics: &[Diagnostic]) -> String {
    render_text(diagnostics, |p| {
        crate::fsutil::read_bounded(p, crate::fsutil::MAX_YAML_BYTES).ok()
    })
}

/// A valid pipeline with its graph, the stages asked for and an executor over them: what
/// `plan` and `run` share.
struct Loaded<'a> {
    pipeline: &'a Pipeline,
    graph: &'a Graph,
    opts: RunOptions,
    executor: Executor<'a>,
    run_root: PathBuf,
}

/// Loads `file` (reporting its diagnostics if invalid) and hands `then` what it needs to plan
/// or run it.
fn with_loaded<T>(
    file: &Path,
    overrides: &[Override],
    selection: &StageSelection,
    then: impl FnOnce(Loaded<'_>) -> Result<T, CmdError>,
) -> Result<T, CmdError> {
    let pipeline = load_or_report(file, overrides)?;
    // Cycles were ruled out by validation.
    let graph = crate::stages::graph(&pipeline).map_err(CmdError::failed)?;
    let opts = selection.resolve(&graph)?;
    let env = crate::stages::Env::new(&pipeline, crate::assets::TsqHome::from_env());
    let factory = |stage: &crate::dag::Stage| env.runner_for(stage);
    let run_root = pipeline.runs_root().join(&pipeline.spec.name);
    then(Loaded {
        pipeline: &pipeline,
        graph: &graph,
        opts,
        executor: Executor {
            graph: &graph,
            factory: &factory,
        },
        run_root,
    })
}

/// Which model to load, as given on the command line.
pub struct ModelArgs {
    pub source: String,
    /// An SVF expert file to compose into the weights.
    pub expert: Option<std::path::PathBuf>,
    pub dtype: crate::model::placement::Dtype,
    pub device: crate::model::placement::Device,
    /// Variables for the model's chat template.
    pub chat_template_kwargs: crate::model::chat::ChatVariables,
}

impl ModelArgs {
    /// Resolves the source (fetching `pip://` assets) and loads the model, with the expert
    /// composed in when one is given.
    pub fn load(&self) -> Result<crate::model::Model, CmdError> {
        Ok(self.load_with_expert()?.0)
    }

    pub fn load_with_expert(
        &self,
    ) -> Result<(crate::model::Model, Option<crate::svf::expert::Expert>), CmdError> {
        let mut model = self.load_base()?;
        let Some(file) = &self.expert else {
            return Ok((model, None));
        };
        let home = crate::assets::TsqHome::from_env();
        let expert =
            crate::svf::compose_expert_file(&mut model, file, &home).map_err(CmdError::failed)?;
        Ok((model, Some(expert)))
    }

    fn load_base(&self) -> Result<crate::model::Model, CmdError> {
        let source = crate::assets::AssetSource::parse(&self.source, Path::new("."))
            .map_err(|e| CmdError::Usage(e.to_string()))?;
        let path = source
            .resolve(&crate::assets::TsqHome::from_env())
            .map_err(CmdError::failed)?;
        let device = crate::model::device(self.device).map_err(CmdError::failed)?;
        let mut model = crate::model::Model::load(&path, crate::model::dtype(self.dtype), &device)
            .map_err(CmdError::failed)?;
        model.set_chat_variables(&self.chat_template_kwargs);
        Ok(model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::StageError;

    /// A stage failure keeps the error that caused it, and the command's message adds each
    /// cause its text does not already contain.
    #[test]
    fn a_failure_keeps_its_cause_and_the_message_its_chain() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let StageError::Failed(failure) = StageError::failed("reading the records", io) else {
            unreachable!()
        };
        let cause = std::error::Error::source(&*failure).expect("a source");
        assert!(cause.downcast_ref::<std::io::Error>().is_some());
        let wrapped = crate::exec::ExecError::StageFailed {
            stage: crate::dag::StageId::new("data", Some("arc")),
            failure,
        };
        let CmdError::Failed(message) = CmdError::failed_with_causes(&wrapped) else {
            unreachable!()
        };
        // Every cause is already in the message: nothing is repeated.
        assert_eq!(
            message,
            "stage `data.arc` failed: reading the records: no such file"
        );

        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let CmdError::Failed(message) =
            CmdError::failed_with_causes(&Outer(std::io::Error::other("inner")))
        else {
            unreachable!()
        };
        assert_eq!(message, "outer\n  caused by: inner");
    }
}
