//! `tsq score`: log-probabilities of continuations after a prompt.

use serde_json::json;

use super::{CmdError, Format, ModelArgs};
use crate::model::score::score;

pub fn run(
    model_args: &ModelArgs,
    prompt: &str,
    continuations: &[String],
    format: Format,
) -> Result<(), CmdError> {
    let model = model_args.load()?;
    let pairs: Vec<(String, String)> = continuations
        .iter()
        .map(|c| (prompt.to_string(), c.clone()))
        .collect();
    let scored = score(&model, &pairs).map_err(CmdError::failed)?;
    match format {
        Format::Json => {
            let items: Vec<_> = continuations.iter().zip(&scored).map(|(c, s)| json!({"continuation": c, "token_ids": s.continuation_ids, "logprobs": s.logprobs, "sum": s.sum})).collect();
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &json!({"prompt_ids": scored.first().map(|s| &s.prompt_ids), "scores": items})
                )
                .expect("json")
            );
        }
        Format::Text => {
            for (c, s) in continuations.iter().zip(&scored) {
                println!("{:>12.4}  {:>3} tokens  {c:?}", s.sum, s.logprobs.len());
            }
        }
    }
    Ok(())
}
