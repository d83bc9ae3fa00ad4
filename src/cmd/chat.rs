//! `tsq chat RUN_DIR [--adapt NAME]`: a conversation with a finished run's model. With an
//! adaptation, each user turn goes through its first pass (the turn's text is classified, or the
//! few-shot mixture is taken) and the chosen expert answers, streamed token by token; the
//! conversation so far is the prompt of every answer.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::Path;
use std::rc::Rc;

use super::CmdError;
use crate::adapt::spec::BASE;
use crate::model::Model;
use crate::model::chat::Message;
use crate::model::generate::{GenerateOptions, generate_streaming};
use crate::stages::adapt::adapter::Adapter;

pub fn run(
    run_dir: &Path,
    adapt: Option<&str>,
    opts: &GenerateOptions,
    decode_q8: bool,
) -> Result<(), CmdError> {
    let home = crate::assets::TsqHome::from_env();
    let mut answerer = match adapt {
        Some(name) => Answerer::Adapted(Box::new(
            Adapter::open(run_dir, name, home).map_err(CmdError::failed)?,
        )),
        None => Answerer::Base(Rc::new(
            crate::stages::adapt::adapter::run_model(run_dir).map_err(CmdError::failed)?,
        )),
    };
    let mut decoders = Decoders {
        q8: decode_q8,
        made: BTreeMap::new(),
    };
    eprintln!(
        "tsq chat: {}{}{}. An empty line or end of input ends the chat.",
        run_dir.display(),
        adapt
            .map(|a| format!(", adaptation `{a}`"))
            .unwrap_or_default(),
        if decode_q8 {
            ", decoding from Q8_0 copies"
        } else {
            ""
        }
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
                let model = adapter.model_for(&choice).map_err(CmdError::failed)?;
                decoders.of(&choice.answered_by(), model)?
            }
            Answerer::Base(base) => decoders.of(BASE, Rc::clone(base))?,
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

/// The models answers decode with: each answering model itself, or with `--decode-q8` its
/// Q8_0 decoding copy, made the first time that model answers (an adaptation may choose another
/// expert each turn) and kept for the turns after.
struct Decoders {
    q8: bool,
    made: BTreeMap<String, Rc<Model>>,
}

impl Decoders {
    /// What decodes for `model`, the model that answers as `name`.
    fn of(&mut self, name: &str, model: Rc<Model>) -> Result<Rc<Model>, CmdError> {
        if !self.q8 {
            return Ok(model);
        }
        if let Some(made) = self.made.get(name) {
            return Ok(Rc::clone(made));
        }
        let mut copy = Model::clone(&model);
        copy.decode_from_q8().map_err(CmdError::failed)?;
        let copy = Rc::new(copy);
        self.made.insert(name.to_string(), Rc::clone(&copy));
        Ok(copy)
    }
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
