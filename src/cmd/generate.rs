//! `tsq generate`: continue prompts with a model (batched), printing text or JSON.

use serde_json::json;

use super::{CmdError, Format, ModelArgs};
use crate::model::generate::{GenerateOptions, generate};

/// How to present the prompts and run the decoding.
pub struct GenerateArgs {
    pub chat: bool,
    pub decode_q8: bool,
    pub format: Format,
}

pub fn run(
    model_args: &ModelArgs,
    prompts: &[String],
    args: &GenerateArgs,
    opts: &GenerateOptions,
) -> Result<(), CmdError> {
    let mut model = model_args.load()?;
    let fail = |e: crate::model::error::ModelError| CmdError::Failed(e.to_string());
    if args.decode_q8 {
        model
            .transformer
            .quantize_for_decoding(candle_core::quantized::GgmlDType::Q8_0)
            .map_err(fail)?;
    }
    let mut ids = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        let text = if args.chat {
            model.chat_prompt(prompt).map_err(fail)?
        } else {
            prompt.clone()
        };
        ids.push(model.tokenizer.encode(&text).map_err(fail)?);
    }
    let started = std::time::Instant::now();
    let generations = generate(&model, &ids, opts).map_err(fail)?;
    let seconds = started.elapsed().as_secs_f64();
    let tokens: usize = generations.iter().map(|g| g.token_ids.len()).sum();
    match args.format {
        Format::Json => {
            let items: Vec<_> = prompts
                .iter()
                .zip(&generations)
                .map(|(p, g)| json!({"prompt": p, "text": g.text, "token_ids": g.token_ids, "finish_reason": g.finish_reason}))
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &json!({"generations": items, "tokens": tokens, "seconds": seconds})
                )
                .expect("json")
            );
        }
        Format::Text => {
            for g in &generations {
                println!("{}", g.text);
                if generations.len() > 1 {
                    println!("---");
                }
            }
            eprintln!(
                "{tokens} tokens in {seconds:.2}s ({:.1} tok/s)",
                tokens as f64 / seconds.max(1e-9)
            );
        }
    }
    Ok(())
}
