//! The OpenAI-compatible API's requests, responses and errors, as JSON. Requests are read
//! leniently where OpenAI is (unknown fields are ignored) and strictly where tsq would otherwise
//! answer something else than was asked: a field tsq cannot honour is a 400, never dropped.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::model::generate::{FinishReason, GenerateOptions};

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<&'static str>,
    pub code: &'static str,
    /// Seconds a client should wait before retrying (429).
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn invalid(param: Option<&'static str>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param,
            code: "invalid_request",
            retry_after: None,
        }
    }

    pub fn status(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            code,
            retry_after: None,
        }
    }

    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message, "type": self.kind(), "param": self.param, "code": self.code,
        }});
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert("retry-after", seconds.into());
        }
        response
    }
}

/// What a request asks to be generated, whichever endpoint it came to.
pub struct Ask {
    pub model: String,
    /// tsq's extension: the request's own mixture of experts, by name (`base` too), with weights.
    pub mixture: Option<Vec<(String, f64)>>,
    pub input: Input,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    pub opts: GenerateOptions,
}

pub enum Input {
    /// A conversation, rendered with the model's chat template and the request's variables for
    /// it (vLLM's `chat_template_kwargs`) over the run's.
    Chat {
        messages: Vec<crate::model::chat::Message>,
        template_kwargs: crate::model::chat::ChatVariables,
    },
    /// Raw text to continue.
    Text(String),
}

impl Input {
    /// The text an adaptation's first pass looks at: the last user turn, or the prompt.
    pub fn first_pass_text(&self) -> String {
        match self {
            Self::Chat { messages, .. } => messages
                .iter()
                .rev()
                .find(|m| m.role == "user")
                .map(|m| m.content.clone())
                .unwrap_or_default(),
            Self::Text(text) => text.clone(),
        }
    }
}

/// Per-request limits (the server's flags).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_tokens: usize,
    pub max_n: usize,
    pub max_stop: usize,
}

/// The `tsq` object of a request: `{"experts": {"math": 0.7, "code": 0.3}}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Extension {
    experts: std::collections::BTreeMap<String, f64>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The fields both endpoints share. Unknown fields are ignored, as OpenAI does.
#[derive(Deserialize)]
struct Common {
    model: String,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<u64>,
    stop: Option<Value>,
    n: Option<u64>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    tsq: Option<Extension>,
    // Fields tsq cannot honour yet: refused when they would change the answer.
    logprobs: Option<Value>,
    top_logprobs: Option<Value>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    logit_bias: Option<Value>,
    tools: Option<Value>,
    response_format: Option<Value>,
    echo: Option<bool>,
    best_of: Option<u64>,
    suffix: Option<Value>,
}

#[derive(Deserialize)]
struct ChatBody {
    #[serde(flatten)]
    common: Common,
    messages: Vec<ChatMessage>,
    /// Variables for the chat template, as vLLM takes them (`extra_body` in the openai client).
    chat_template_kwargs: Option<Value>,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: Value,
}

#[derive(Deserialize)]
struct CompletionBody {
    #[serde(flatten)]
    common: Common,
    prompt: Value,
}

/// A `/v1/chat/completions` body.
pub fn chat(body: &[u8], limits: &Limits) -> Result<Ask, ApiError> {
    let body: ChatBody = parse(body)?;
    if body.messages.is_empty() {
        return Err(ApiError::invalid(
            Some("messages"),
            "`messages` must not be empty",
        ));
    }
    let messages = body
        .messages
        .into_iter()
        .map(|m| {
            if !["system", "user", "assistant", "developer"].contains(&m.role.as_str()) {
                return Err(ApiError::invalid(
                    Some("messages"),
                    format!(
                        "role `{}` is not supported (system, user, assistant)",
                        m.role
                    ),
                ));
            }
            let role = if m.role == "developer" {
                "system".into()
            } else {
                m.role
            };
            Ok(crate::model::chat::Message {
                role,
                content: message_text(&m.content)?,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let template_kwargs = template_kwargs(body.chat_template_kwargs)?;
    let input = Input::Chat {
        messages,
        template_kwargs,
    };
    ask(body.common, input, limits)
}

/// A request's `chat_template_kwargs`: an object (or null) not naming what tsq sets itself.
fn template_kwargs(value: Option<Value>) -> Result<crate::model::chat::ChatVariables, ApiError> {
    let invalid = |message: String| ApiError::invalid(Some("chat_template_kwargs"), message);
    let kwargs = match value {
        None | Some(Value::Null) => return Ok(Default::default()),
        Some(Value::Object(map)) => map,
        Some(_) => return Err(invalid("`chat_template_kwargs` must be an object".into())),
    };
    match (kwargs.keys()).find(|k| crate::model::chat::is_reserved(k)) {
        Some(name) => Err(invalid(format!("`{name}` is set by tsq itself"))),
        None => Ok(kwargs.into_iter().collect()),
    }
}

/// A `/v1/completions` body.
pub fn completion(body: &[u8], limits: &Limits) -> Result<Ask, ApiError> {
    let body: CompletionBody = parse(body)?;
    let prompt = match &body.prompt {
        Value::String(s) => s.clone(),
        Value::Array(items) if items.len() == 1 && items[0].is_string() => {
            items[0].as_str().unwrap_or_default().to_string()
        }
        _ => {
            return Err(ApiError::invalid(
                Some("prompt"),
                "`prompt` must be a string (or a list of one string; token lists and several \
                 prompts are not supported)",
            ));
        }
    };
    ask(body.common, Input::Text(prompt), limits)
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(None, format!("the body is not a valid request: {e}")))
}

/// A message's text: a string, or a list of `{"type": "text", "text": ...}` parts.
fn message_text(content: &Value) -> Result<String, ApiError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => parts
            .iter()
            .map(
                |p| match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => Ok(t.as_str()),
                    _ => Err(ApiError::invalid(
                        Some("messages"),
                        "only text content parts are supported",
                    )),
                },
            )
            .collect::<Result<Vec<_>, _>>()
            .map(|parts| parts.concat()),
        _ => Err(ApiError::invalid(
            Some("messages"),
            "a message's `content` must be a string or a list of text parts",
        )),
    }
}

fn ask(c: Common, input: Input, limits: &Limits) -> Result<Ask, ApiError> {
    refuse_unsupported(&c)?;
    let max_tokens = c.max_completion_tokens.or(c.max_tokens).unwrap_or(256);
    if max_tokens == 0 || max_tokens > limits.max_tokens as u64 {
        return Err(ApiError::invalid(
            Some("max_tokens"),
            format!("`max_tokens` must be between 1 and {}", limits.max_tokens),
        ));
    }
    let n = c.n.unwrap_or(1);
    if n == 0 || n > limits.max_n as u64 {
        return Err(ApiError::invalid(
            Some("n"),
            format!("`n` must be between 1 and {}", limits.max_n),
        ));
    }
    let temperature = c.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            Some("temperature"),
            "`temperature` must be in [0, 2]",
        ));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            Some("top_p"),
            "`top_p` must be in (0, 1]",
        ));
    }
    let logprobs = logprobs(&c, &input)?;
    let stop = match c.stop {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                _ => Err(ApiError::invalid(Some("stop"), "`stop` must be strings")),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(ApiError::invalid(Some("stop"), "`stop` must be strings")),
    };
    if stop.len() > limits.max_stop || stop.iter().any(|s| s.is_empty() || s.len() > 256) {
        return Err(ApiError::invalid(
            Some("stop"),
            format!(
                "at most {} non-empty stop strings of ≤ 256 bytes",
                limits.max_stop
            ),
        ));
    }
    let mixture = match c.tsq {
        None => None,
        Some(Extension { experts }) => {
            if experts.is_empty() || experts.len() > 8 {
                return Err(ApiError::invalid(
                    Some("tsq.experts"),
                    "between 1 and 8 experts to mix",
                ));
            }
            if experts.values().any(|a| !a.is_finite() || a.abs() > 100.0) {
                return Err(ApiError::invalid(
                    Some("tsq.experts"),
                    "weights must be finite, |α| ≤ 100",
                ));
            }
            Some(experts.into_iter().collect())
        }
    };
    Ok(Ask {
        model: c.model,
        mixture,
        input,
        n: n as usize,
        stream: c.stream,
        include_usage: c.stream_options.is_some_and(|o| o.include_usage),
        opts: GenerateOptions {
            max_new_tokens: max_tokens as usize,
            temperature,
            top_p,
            top_k: 0,
            seed: c.seed.unwrap_or(0),
            stop,
            ignore_eos: false,
            track_entropy: false,
            logprobs,
        },
    })
}

/// How many alternatives to report beside each token's log-probability, if any: chat asks
/// with `logprobs: true` and `top_logprobs` (0-20), completions with `logprobs` (0-5).
fn logprobs(c: &Common, input: &Input) -> Result<Option<usize>, ApiError> {
    let count = |v: &Value, max: u64, param| match v.as_u64() {
        Some(n) if n <= max => Ok(n as usize),
        _ => Err(ApiError::invalid(
            Some(param),
            format!("`{param}` must be an integer from 0 to {max}"),
        )),
    };
    match input {
        Input::Chat { .. } => {
            let asked = match &c.logprobs {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(ApiError::invalid(
                        Some("logprobs"),
                        "`logprobs` must be true or false",
                    ));
                }
            };
            let top = match &c.top_logprobs {
                None | Some(Value::Null) => 0,
                Some(_) if !asked => {
                    return Err(ApiError::invalid(
                        Some("top_logprobs"),
                        "`top_logprobs` needs `logprobs: true`",
                    ));
                }
                Some(v) => count(v, 20, "top_logprobs")?,
            };
            Ok(asked.then_some(top))
        }
        Input::Text(_) => match &c.logprobs {
            None | Some(Value::Null) => Ok(None),
            Some(v) => count(v, 5, "logprobs").map(Some),
        },
    }
}

fn refuse_unsupported(c: &Common) -> Result<(), ApiError> {
    let refuse = |param: &'static str| {
        Err(ApiError::invalid(
            Some(param),
            format!("`{param}` is not supported by tsq serve"),
        ))
    };
    let set = |v: &Option<Value>| {
        v.as_ref()
            .is_some_and(|v| !v.is_null() && v != &json!(false))
    };
    if c.presence_penalty.is_some_and(|p| p != 0.0) {
        return refuse("presence_penalty");
    }
    if c.frequency_penalty.is_some_and(|p| p != 0.0) {
        return refuse("frequency_penalty");
    }
    if c.logit_bias
        .as_ref()
        .is_some_and(|v| v.as_object().is_none_or(|o| !o.is_empty()))
    {
        return refuse("logit_bias");
    }
    if set(&c.tools) {
        return refuse("tools");
    }
    if c.response_format
        .as_ref()
        .is_some_and(|v| v.get("type") != Some(&json!("text")))
    {
        return refuse("response_format");
    }
    if c.echo == Some(true) {
        return refuse("echo");
    }
    if c.best_of.is_some_and(|b| b > 1) {
        return refuse("best_of");
    }
    if set(&c.suffix) {
        return refuse("suffix");
    }
    Ok(())
}

/// OpenAI's `finish_reason`.
pub fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Eos | FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_tokens: 512,
        max_n: 4,
        max_stop: 4,
    };

    #[test]
    fn a_chat_request_is_read_with_openais_defaults() {
        let ask = chat(
            br#"{"model": "m", "messages": [{"role": "user", "content": "hi"}], "unknown": 1}"#,
            &LIMITS,
        )
        .unwrap();
        assert_eq!(
            (ask.n, ask.stream, ask.opts.max_new_tokens),
            (1, false, 256)
        );
        assert_eq!(ask.opts.temperature, 1.0);
        assert_eq!(ask.input.first_pass_text(), "hi");
    }

    #[test]
    fn fields_tsq_cannot_honour_or_bad_values_are_refused_by_name() {
        for (body, param) in [
            (r#""logprobs": 3"#, "logprobs"),
            (r#""top_logprobs": 2"#, "top_logprobs"),
            (r#""presence_penalty": 0.5"#, "presence_penalty"),
            (r#""logit_bias": {"5": 10}"#, "logit_bias"),
            (r#""n": 9"#, "n"),
            (r#""max_tokens": 0"#, "max_tokens"),
            (r#""temperature": 3"#, "temperature"),
            (r#""stop": ["a", "b", "c", "d", "e"]"#, "stop"),
        ] {
            let text = format!(
                r#"{{"model": "m", "messages": [{{"role": "user", "content": "x"}}], {body}}}"#
            );
            let err = chat(text.as_bytes(), &LIMITS).err().expect(body);
            assert_eq!(
                (err.status, err.param),
                (StatusCode::BAD_REQUEST, Some(param)),
                "{body}"
            );
        }
        for kwargs in [r#"[1]"#, r#"{"messages": []}"#] {
            let text = format!(
                r#"{{"model": "m", "messages": [{{"role": "user", "content": "x"}}], "chat_template_kwargs": {kwargs}}}"#
            );
            let err = chat(text.as_bytes(), &LIMITS).err().expect(kwargs);
            assert_eq!(err.param, Some("chat_template_kwargs"), "{kwargs}");
        }
        let empty = chat(br#"{"model": "m", "messages": []}"#, &LIMITS)
            .err()
            .unwrap();
        assert_eq!(empty.param, Some("messages"));
        assert!(chat(b"{not json", &LIMITS).is_err());
        assert!(chat(&[0xff, 0xfe], &LIMITS).is_err());
    }
}
