//! `tsq generate`: continue prompts with a model (batched), printing text or JSON; with
//! `--run RUN_DIR --adapt NAME`, each prompt first goes through the run's adaptation, which
//! says which expert (or mixture) answers it and why; then all prompts are answered in one
//! batch, each by its own expert (per-sequence application) when they differ.

use serde_json::json;

use super::{CmdError, Format, ModelArgs};
use crate::model::generate::{GenerateOptions, Generation, generate, generate_per_sequence};
use crate::stages::adapt::adapter::{Adapter, Choice};

/// How to present the prompts and run the decoding.
pub struct GenerateArgs {
    pub chat: bool,
    pub decode_q8: bool,
    pub format: Format,
}

/// A run's adaptation to answer through.
pub struct Adapt<'a> {
    pub run_dir: &'a std::path::Path,
    pub name: &'a str,
}

pub fn run(
    model_args: &ModelArgs,
    adapt: Option<Adapt>,
    prompts: &[String],
    args: &GenerateArgs,
    opts: &GenerateOptions,
) -> Result<(), CmdError> {
    let started = std::time::Instant::now();
    let (
        Answers {
            generations,
            seconds,
        },
        choices,
    ) = match adapt {
        None => {
            let model = model_args.load()?;
            (answer(model, prompts, None, args, opts)?, vec![])
        }
        Some(a) => adapted(&a, prompts, args, opts)?,
    };
    let total = started.elapsed().as_secs_f64();
    let tokens: usize = generations.iter().map(|g| g.token_ids.len()).sum();
    match args.format {
        Format::Json => {
            let items: Vec<_> = prompts
                .iter()
                .zip(&generations)
                .enumerate()
                .map(|(i, (p, g))| json!({"prompt": p, "adaptation": choices.get(i), "text": g.text, "token_ids": g.token_ids, "finish_reason": g.finish_reason}))
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &json!({"generations": items, "tokens": tokens, "seconds": seconds, "total_seconds": total})
                )
                .expect("json")
            );
        }
        Format::Text => {
            for (i, g) in generations.iter().enumerate() {
                if let Some(choice) = choices.get(i) {
                    println!("[{choice}]");
                }
                println!("{}", g.text);
                if generations.len() > 1 {
                    println!("---");
                }
            }
            eprintln!(
                "{tokens} tokens in {seconds:.2}s ({:.1} tok/s; {total:.2}s with loading)",
                tokens as f64 / seconds.max(1e-9)
            );
        }
    }
    Ok(())
}

/// The prompts' answers, and the seconds their generation took (prompts in, answers out):
/// loading and quantizing apart, which a tokens-per-second figure should not count.
struct Answers {
    generations: Vec<Generation>,
    seconds: f64,
}

/// Each prompt's answer from `model`, in one batch; prompt `i` by expert `experts[i]` of the
/// model's table when given.
fn answer(
    mut model: crate::model::Model,
    prompts: &[String],
    experts: Option<&[u32]>,
    args: &GenerateArgs,
    opts: &GenerateOptions,
) -> Result<Answers, CmdError> {
    if args.decode_q8 {
        model.decode_from_q8().map_err(CmdError::failed)?;
    }
    let started = std::time::Instant::now();
    let mut ids = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        let text = if args.chat {
            model.chat_prompt(prompt).map_err(CmdError::failed)?
        } else {
            prompt.clone()
        };
        ids.push(model.tokenizer.encode(&text).map_err(CmdError::failed)?);
    }
    let generations = match experts {
        Some(e) => generate_per_sequence(&model, &ids, e, opts),
        None => generate(&model, &ids, opts),
    }
    .map_err(CmdError::failed)?;
    Ok(Answers {
        generations,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The answers, all in one batch, and the adaptation's choice for each prompt.
fn adapted(
    a: &Adapt,
    prompts: &[String],
    args: &GenerateArgs,
    opts: &GenerateOptions,
) -> Result<(Answers, Vec<Choice>), CmdError> {
    let home = crate::assets::TsqHome::from_env();
    let mut adapter = Adapter::open(a.run_dir, a.name, home).map_err(CmdError::failed)?;
    let choices = adapter.choose(prompts).map_err(CmdError::failed)?;
    let (model, experts) = adapter.answering(&choices).map_err(CmdError::failed)?;
    let answers = answer((*model).clone(), prompts, experts.as_deref(), args, opts)?;
    Ok((answers, choices))
}
