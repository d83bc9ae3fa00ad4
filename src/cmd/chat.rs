//! `tsq chat RUN_DIR [--adapt NAME]`: a conversation with a finished run's model. With an
//! adaptation, each user turn goes through its first pass (the turn's text is classified, or the
//! few-shot mixture is taken) and the chosen expert answers, streamed token by token; the
//! conversation so far is the prompt of every answer.

use std::io::{BufRead, Write};
use std::path::Path;
use std::rc::Rc;

use super::CmdError;
use crate::model::Model;
use crate::model::chat::Message;
use crate::model::generate::{GenerateOptions, generate_streaming};
use crate::stages::adapt::adapter::Adapter;

pub fn run(run_dir: &Path, adapt: Option<&str>, opts: &GenerateOptions) -> Result<(), CmdError> {
    let home = crate::assets::TsqHome::from_env();
    let mut answerer = match adapt {
        Some(name) => Answerer::Adapted(Box::new(
            Adapter::open(run_dir, name, home).map_err(CmdError::failed)?,
        )),
        None => Answerer::Base(Rc::new(
            crate::stages::adapt::adapter::run_model(run_dir).map_err(CmdError::failed)?,
        )),
    };
    eprintln!(
        "tsq chat: {}{}. An empty line or end of input ends the chat.",
        run_dir.display(),
        adapt
            .map(|a| format!(", adaptation `{a}`"))
            .unwrap_or_default()
    );
    let mut messages: Vec<Message> = Vec::new();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        eprint!("> ");
        std::io::stderr().flush().ok();
        let Some(Ok(line)) = lines.next() else { break };
        let turn = line.trim();
        if turn.is_empty() {
            break;
        }
        let model = match &mut answerer {
            Answerer::Adapted(adapter) => {
                let choice = adapter
                    .choose(&[turn.to_string()])
                    .map_err(CmdError::failed)?
                    .remove(0);
                println!("[{choice}]");
                adapter.model_for(&choice).map_err(CmdError::failed)?
            }
            Answerer::Base(base) => Rc::clone(base),
        };
        messages.push(Message::user(turn));
        let answer = answer(&model, &messages, opts)?;
        messages.push(Message::assistant(answer));
    }
    Ok(())
}

/// Who answers: the adaptation's choice each turn, or the run's base model.
enum Answerer {
    Adapted(Box<Adapter>),
    Base(Rc<Model>),
}

/// Streams the model's answer to the conversation to stdout and returns it.
fn answer(model: &Model, messages: &[Message], opts: &GenerateOptions) -> Result<String, CmdError> {
    let chat = model
        .chat
        .as_ref()
        .ok_or_else(|| CmdError::Failed("the model has no chat template".into()))?;
    let ids = model
        .tokenizer
        .encode(&chat.render(messages).map_err(CmdError::failed)?)
        .map_err(CmdError::failed)?;
    let mut stdout = std::io::stdout();
    let generations = generate_streaming(model, &[ids], opts, &mut |_, text| {
        print!("{text}");
        stdout.flush().ok();
    })
    .map_err(CmdError::failed)?;
    println!();
    Ok(generations
        .into_iter()
        .next()
        .map(|g| g.text)
        .unwrap_or_default())
}
