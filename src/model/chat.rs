//! Chat templates (from `tokenizer.chat_template` in GGUF or `tokenizer_config.json`), rendered
//! with minijinja the way HF transformers renders them.

use std::collections::BTreeMap;

use minijinja::{Error, ErrorKind, context};
use serde::Serialize;

use super::error::{ModelError, Result};

#[derive(Clone, Debug, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: "user".into(),
            content: content.into(),
        }
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Self {
            role: "assistant".into(),
            content: content.into(),
        }
    }
}

/// Variables for a chat template besides the messages, by name: a pipeline's, a command
/// line's or a request's `chat_template_kwargs`.
pub type ChatVariables = BTreeMap<String, serde_json::Value>;

/// The variables tsq passes to every chat template itself; [`ChatTemplate::with_variables`]
/// cannot set them.
const RESERVED: [&str; 4] = [
    "messages",
    "add_generation_prompt",
    "bos_token",
    "eos_token",
];

/// Whether tsq sets variable `name` itself, so that no [`ChatVariables`] may.
pub fn is_reserved(name: &str) -> bool {
    RESERVED.contains(&name)
}

#[derive(Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
    /// Further variables (`enable_thinking` for Qwen3), from the pipeline's model section.
    variables: ChatVariables,
}

impl ChatTemplate {
    pub fn new(source: String, bos_token: String, eos_token: String) -> Self {
        Self {
            source,
            bos_token,
            eos_token,
            variables: BTreeMap::new(),
        }
    }

    /// The template rendered with `variables` besides the messages (over those it had, for
    /// the names both give), as transformers' `apply_chat_template(**kwargs)` passes them;
    /// reserved names ([`is_reserved`]) are ignored.
    pub fn with_variables(mut self, variables: &ChatVariables) -> Self {
        let allowed = (variables.iter()).filter(|(name, _)| !is_reserved(name));
        (self.variables).extend(allowed.map(|(name, value)| (name.clone(), value.clone())));
        self
    }

    /// The template's source text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The prompt text for `messages`, ending with the assistant's turn opened.
    pub fn render(&self, messages: &[Message]) -> Result<String> {
        let mut env = crate::jinja::environment();
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template("chat", &self.source)
            .map_err(|e| ModelError::Input(format!("the chat template does not parse: {e}")))?;
        let template = env
            .get_template("chat")
            .map_err(|e| ModelError::Input(e.to_string()))?;
        let ctx = context! {
            messages => minijinja::value::Serde(messages),
            add_generation_prompt => true,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
            ..minijinja::Value::from(minijinja::value::Serde(&self.variables))
        };
        crate::jinja::render(&template, ctx)
            .map_err(|e| ModelError::Input(format!("cannot render the chat template: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Templates written for Python's Jinja call Python's string methods, as Qwen3's does to
    /// find the last user query and split reasoning from an answer.
    #[test]
    fn python_string_methods_work_as_in_transformers() {
        let source = "{%- set ns = namespace(last=0) %}\
            {%- for m in messages[::-1] %}{%- if ns.last == 0 and m.role == 'user' \
            and not m.content.startswith('<tool') %}{%- set ns.last = messages|length - loop.index0 %}\
            {%- endif %}{%- endfor %}\
            {%- for m in messages %}{%- set content = m.content %}\
            {%- if '</think>' in content %}{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}\
            [{{ loop.index }}/{{ ns.last }} {{ m.role.upper() }}: {{ content.strip() }}|{{ 'q' if content.strip().endswith('?') else '-' }}]\
            {%- endfor %}";
        let chat = ChatTemplate::new(source.into(), "<s>".into(), "</s>".into());
        let messages = [
            Message::user("  Why?  "),
            Message::assistant("<think>\nhm\n</think>\n\nBecause."),
            Message::user("<tool_response>x</tool_response>"),
        ];
        assert_eq!(
            chat.render(&messages).unwrap(),
            "[1/1 USER: Why?|q][2/1 ASSISTANT: Because.|-][3/1 USER: <tool_response>x</tool_response>|-]"
        );
    }

    /// Variables from the pipeline reach the template (Qwen3's switch), and cannot replace the
    /// ones tsq sets.
    #[test]
    fn variables_reach_the_template() {
        let source = "{{ messages[0].content }}{% if enable_thinking is defined and \
            enable_thinking is false %}<think></think>{% endif %}{{ bos_token }}";
        let chat = ChatTemplate::new(source.into(), "<s>".into(), "</s>".into());
        let hi = [Message::user("hi")];
        assert_eq!(chat.render(&hi).unwrap(), "hi<s>");
        let variables = serde_json::from_str(r#"{"enable_thinking": false, "bos_token": "x"}"#);
        let chat = chat.with_variables(&variables.unwrap());
        assert_eq!(chat.render(&hi).unwrap(), "hi<think></think><s>");
        let request = serde_json::from_str(r#"{"enable_thinking": true}"#).unwrap();
        assert_eq!(chat.with_variables(&request).render(&hi).unwrap(), "hi<s>");
    }

    #[test]
    fn a_chat_template_that_would_run_forever_is_an_error() {
        let endless = "{% for a in range(100000) %}{% for b in range(100000) %}{{ bos_token }}{% endfor %}{% endfor %}";
        let chat = ChatTemplate::new(endless.into(), "<s>".into(), "</s>".into());
        let err = chat.render(&[Message::user("hi")]).unwrap_err().to_string();
        assert!(
            err.contains("cannot render the chat template") && err.contains("fuel"),
            "{err}"
        );
    }
}
