//! The HTTP side of `tsq serve`: axum routes, authentication, limits, and the translation
//! between OpenAI's JSON (whole or as server-sent events) and the engine's jobs.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::Stream;
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use super::api::{self, ApiError, Ask, Input, Limits};
use super::engine::{Catalog, Job, JobEvent, Place, Queue, Refused, Route};
use super::metrics::Metrics;
use crate::adapt::spec::BASE;
use crate::model::generate::TokenLogprob;
use crate::model::tokenizer::Tokenizer;

pub struct ServerState {
    pub catalog: Catalog,
    pub jobs: Queue,
    pub api_key: Option<String>,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
    pub started: u64,
}

/// Request bodies larger than this are refused (413) before they are read whole.
pub const MAX_BODY_BYTES: usize = 1 << 20;

pub fn app(state: Arc<ServerState>) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route(
            "/metrics",
            get(|State(state): State<Arc<ServerState>>| async move { state.metrics.render() }),
        )
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .fallback(|| async {
            ApiError::status(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Refuses a request without the server's key (when it has one), comparing in constant time.
fn authorize(state: &ServerState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &state.api_key else {
        return Ok(());
    };
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if constant_time_eq(given.as_bytes(), key.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::status(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "a valid API key is required: `Authorization: Bearer KEY`",
        ))
    }
}

/// Equality whose time depends on the lengths only, not on where the bytes differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, &x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0));
    }
    diff == 0
}

async fn models(State(state): State<Arc<ServerState>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&state, &headers) {
        return e.into_response();
    }
    let run = &state.catalog.run;
    let data: Vec<Value> = state
        .catalog
        .models
        .iter()
        .map(|(id, route)| {
            let parent = (*route != Route::Base).then_some(run);
            json!({"id": id, "object": "model", "created": state.started, "owned_by": "tsq",
                   "root": run, "parent": parent})
        })
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

type Body = Result<Bytes, BytesRejection>;

async fn chat_completions(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    respond(&state, &headers, body, Endpoint::Chat).await
}

async fn completions(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    respond(&state, &headers, body, Endpoint::Text).await
}

#[derive(Clone, Copy, PartialEq)]
enum Endpoint {
    Chat,
    Text,
}

async fn respond(
    state: &ServerState,
    headers: &HeaderMap,
    body: Body,
    endpoint: Endpoint,
) -> Response {
    // A body over the limit, or one that could not be read, in OpenAI's error shape.
    let body = match body {
        Ok(body) => body,
        Err(e) => {
            let code = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                "body_too_large"
            } else {
                "bad_body"
            };
            return ApiError::status(e.status(), code, e.body_text()).into_response();
        }
    };
    let started = match submit(state, headers, &body, endpoint) {
        Ok(started) => started,
        Err(e) => {
            // Refused before a model was resolved: no model label (its value is the client's).
            state.metrics.request("-", e.status.as_u16());
            return e.into_response();
        }
    };
    let model = started.model.clone();
    let response = if started.ask.stream {
        stream(started, endpoint).into_response()
    } else {
        whole(started, endpoint).await
    };
    state.metrics.request(&model, response.status().as_u16());
    response
}

/// OpenAI's `logprobs` object for tokens `lps`: chat's `{"content": [...]}`, or the legacy
/// completions' parallel lists (`text_offset` counted from `offset`).
fn logprobs_json(
    tokenizer: &Tokenizer,
    lps: &[TokenLogprob],
    endpoint: Endpoint,
    offset: usize,
) -> Value {
    let text = |id: u32| {
        tokenizer
            .decode_continuation(&[id], false)
            .unwrap_or_default()
    };
    match endpoint {
        Endpoint::Chat => {
            let entry = |id: u32, logprob: f32| {
                let token = text(id);
                json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()})
            };
            let content: Vec<Value> = lps
                .iter()
                .map(|lp| {
                    let mut e = entry(lp.token, lp.logprob);
                    e["top_logprobs"] = lp.top.iter().map(|&(id, l)| entry(id, l)).collect();
                    e
                })
                .collect();
            json!({"content": content})
        }
        Endpoint::Text => {
            let tokens: Vec<String> = lps.iter().map(|lp| text(lp.token)).collect();
            let mut at = offset;
            let offsets: Vec<usize> = tokens
                .iter()
                .map(|t| {
                    let here = at;
                    at += t.len();
                    here
                })
                .collect();
            let top: Vec<Value> = lps
                .iter()
                .map(|lp| {
                    Value::Object(lp.top.iter().map(|&(id, l)| (text(id), json!(l))).collect())
                })
                .collect();
            json!({"tokens": tokens, "token_logprobs": lps.iter().map(|lp| lp.logprob).collect::<Vec<_>>(),
                   "top_logprobs": top, "text_offset": offsets})
        }
    }
}

/// A request accepted by the engine: what was asked and where its events arrive.
struct Started {
    tokenizer: Arc<Tokenizer>,
    ask: Ask,
    id: String,
    model: String,
    prompt_tokens: usize,
    events: UnboundedReceiver<JobEvent>,
    /// Held until the answer is dropped.
    _place: Place,
    metrics: Arc<Metrics>,
    arrived: Instant,
    /// When the last piece of text came.
    last: Option<Instant>,
}

impl Started {
    /// Records the latency of a piece of text that just came.
    fn tick(&mut self) {
        let now = Instant::now();
        match self.last {
            None => self.metrics.first_token(now - self.arrived),
            Some(last) => self.metrics.between_tokens(now - last),
        }
        self.last = Some(now);
    }
}

fn submit(
    state: &ServerState,
    headers: &HeaderMap,
    body: &[u8],
    endpoint: Endpoint,
) -> Result<Started, ApiError> {
    authorize(state, headers)?;
    let ask = match endpoint {
        Endpoint::Chat => api::chat(body, &state.limits)?,
        Endpoint::Text => api::completion(body, &state.limits)?,
    };
    let catalog = &state.catalog;
    let mut route = catalog.route(&ask.model).cloned().ok_or_else(|| ApiError {
        param: Some("model"),
        ..ApiError::status(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!("no model `{}` here: GET /v1/models lists them", ask.model),
        )
    })?;
    if let Some(mix) = &ask.mixture {
        route = mixture_route(catalog, &route, mix)?;
    }
    let text = match &ask.input {
        Input::Chat {
            messages,
            template_kwargs,
        } => (catalog.chat.clone())
            .ok_or_else(|| {
                ApiError::invalid(
                    Some("messages"),
                    "the model has no chat template: use /v1/completions",
                )
            })?
            .with_variables(template_kwargs)
            .render(messages)
            .map_err(|e| ApiError::invalid(Some("messages"), e.to_string()))?,
        Input::Text(text) => text.clone(),
    };
    let prompt = catalog
        .tokenizer
        .encode(&text)
        .map_err(|e| ApiError::invalid(None, e.to_string()))?;
    if prompt.is_empty() {
        return Err(ApiError::invalid(Some("prompt"), "the prompt is empty"));
    }
    if prompt.len() + ask.opts.max_new_tokens > catalog.span {
        return Err(ApiError::invalid(
            Some("max_tokens"),
            format!(
                "the prompt's {} tokens plus max_tokens {} exceed the model's {} positions",
                prompt.len(),
                ask.opts.max_new_tokens,
                catalog.span
            ),
        ));
    }
    let (events_tx, events) = unbounded_channel();
    let prompt_tokens = prompt.len();
    let job = Job {
        prompt,
        route,
        first_pass: ask.input.first_pass_text(),
        opts: ask.opts.clone(),
        n: ask.n,
        events: events_tx,
    };
    let arrived = Instant::now();
    let place = match state.jobs.submit(job) {
        Ok(place) => {
            state
                .metrics
                .queued
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            place
        }
        Err(Refused::Full) => {
            return Err(ApiError {
                retry_after: Some(1),
                ..ApiError::status(
                    StatusCode::TOO_MANY_REQUESTS,
                    "queue_full",
                    "the server's queue is full: retry shortly",
                )
            });
        }
        Err(Refused::Gone) => {
            return Err(ApiError::status(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the server is shutting down",
            ));
        }
    };
    let prefix = if endpoint == Endpoint::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    };
    Ok(Started {
        id: format!("{prefix}-{:x}{:08x}", now(), rand::random::<u32>()),
        model: ask.model.clone(),
        ask,
        prompt_tokens,
        events,
        _place: place,
        metrics: Arc::clone(&state.metrics),
        tokenizer: Arc::clone(&catalog.tokenizer),
        arrived,
        last: None,
    })
}

/// The route of a request asking for its own mixture of experts: of the base model only, over
/// the run's experts (and `base`).
fn mixture_route(
    catalog: &Catalog,
    asked: &Route,
    mix: &[(String, f64)],
) -> Result<Route, ApiError> {
    let param = Some("tsq.experts");
    if *asked != Route::Base {
        return Err(ApiError::invalid(
            param,
            format!("a mixture is asked of the base model `{}`", catalog.run),
        ));
    }
    let experts = catalog.experts();
    if experts.is_empty() {
        return Err(ApiError::invalid(param, "the run has no expert to mix"));
    }
    if let Some((name, _)) = mix
        .iter()
        .find(|(n, _)| n != BASE && !experts.contains(&n.as_str()))
    {
        return Err(ApiError::invalid(
            param,
            format!(
                "no expert `{name}`: the run's are {} (and `base`)",
                experts.join(", ")
            ),
        ));
    }
    Ok(Route::Mixture(mix.to_vec()))
}

/// The `tsq` extension object and header value of an adaptation's choice.
fn chosen(choice: &Option<(Value, String)>) -> Option<Value> {
    choice
        .as_ref()
        .map(|(choice, answered_by)| json!({"choice": choice, "answered_by": answered_by}))
}

async fn whole(mut s: Started, endpoint: Endpoint) -> Response {
    let mut texts = vec![None; s.ask.n];
    let mut choice = None;
    let mut completion_tokens = 0;
    while texts.iter().any(Option::is_none) {
        match s.events.recv().await {
            Some(JobEvent::Chosen {
                choice: c,
                answered_by,
            }) => choice = Some((c, answered_by)),
            Some(JobEvent::Text { .. }) => s.tick(),
            Some(JobEvent::Finished { index, generation }) => {
                if s.last.is_none() {
                    s.tick();
                }
                completion_tokens += generation.token_ids.len();
                texts[index] = Some(generation);
            }
            Some(JobEvent::Failed(why)) => {
                return ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, "engine_error", why)
                    .into_response();
            }
            None => {
                return ApiError::status(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "shutting_down",
                    "the engine stopped",
                )
                .into_response();
            }
        }
    }
    let choices: Vec<Value> = texts
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(index, g)| {
            let reason = api::finish_reason(g.finish_reason);
            let logprobs = g
                .logprobs
                .as_deref()
                .map_or(Value::Null, |lps| logprobs_json(&s.tokenizer, lps, endpoint, 0));
            match endpoint {
                Endpoint::Chat => json!({"index": index, "logprobs": logprobs, "finish_reason": reason,
                    "message": {"role": "assistant", "content": g.text}}),
                Endpoint::Text => {
                    json!({"index": index, "logprobs": logprobs, "finish_reason": reason, "text": g.text})
                }
            }
        })
        .collect();
    let object = if endpoint == Endpoint::Chat {
        "chat.completion"
    } else {
        "text_completion"
    };
    let mut body = json!({
        "id": s.id, "object": object, "created": now(), "model": s.model, "choices": choices,
        "usage": usage(s.prompt_tokens * s.ask.n, completion_tokens),
    });
    if let Some(tsq) = chosen(&choice) {
        body["tsq"] = tsq;
    }
    let mut response = axum::Json(body).into_response();
    if let Some((_, answered_by)) = &choice
        && let Ok(value) = HeaderValue::from_str(answered_by)
    {
        response.headers_mut().insert("x-tsq-expert", value);
    }
    response
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion,
           "total_tokens": prompt + completion})
}

/// The answer as server-sent events: a chunk per piece of text, one with each choice's finish
/// reason, the usage when asked for, then `[DONE]`.
fn stream(s: Started, endpoint: Endpoint) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let chat = endpoint == Endpoint::Chat;
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let chunk = move |s: &Started, choices: Value, extra: Option<Value>| {
        let mut body = json!({"id": s.id, "object": object, "created": now(), "model": s.model,
                              "choices": choices});
        if let Some(extra) = extra {
            body["tsq"] = extra;
        }
        SseEvent::default().data(body.to_string())
    };
    let piece = move |index: usize, text: Option<String>, logprobs: Value, reason: Option<&str>| {
        if chat {
            let delta = match text {
                Some(t) => json!({"content": t}),
                None => json!({}),
            };
            json!([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}])
        } else {
            json!([{"index": index, "text": text.unwrap_or_default(), "logprobs": logprobs,
                    "finish_reason": reason}])
        }
    };
    struct Progress {
        s: Started,
        finished: usize,
        completion_tokens: usize,
        opened: bool,
        done: bool,
    }
    let start = Progress {
        s,
        finished: 0,
        completion_tokens: 0,
        opened: false,
        done: false,
    };
    let events = futures_util::stream::unfold(start, move |mut p| async move {
        if p.done {
            return None;
        }
        let mut out = Vec::new();
        if chat && !p.opened {
            p.opened = true;
            let roles: Vec<Value> = (0..p.s.ask.n)
                .map(|i| {
                    json!({"index": i, "delta": {"role": "assistant", "content": ""},
                                "logprobs": null, "finish_reason": null})
                })
                .collect();
            out.push(chunk(&p.s, Value::Array(roles), None));
        }
        match p.s.events.recv().await {
            Some(JobEvent::Chosen {
                choice,
                answered_by,
            }) => {
                out.push(chunk(&p.s, json!([]), chosen(&Some((choice, answered_by)))));
            }
            Some(JobEvent::Text {
                index,
                text,
                logprobs,
            }) => {
                p.s.tick();
                let logprobs = match p.s.ask.opts.logprobs {
                    Some(_) => logprobs_json(&p.s.tokenizer, &logprobs, endpoint, 0),
                    None => Value::Null,
                };
                out.push(chunk(&p.s, piece(index, Some(text), logprobs, None), None));
            }
            Some(JobEvent::Finished { index, generation }) => {
                p.finished += 1;
                p.completion_tokens += generation.token_ids.len();
                let reason = api::finish_reason(generation.finish_reason);
                out.push(chunk(
                    &p.s,
                    piece(index, None, Value::Null, Some(reason)),
                    None,
                ));
                if p.finished == p.s.ask.n {
                    if p.s.ask.include_usage {
                        let mut last = json!({"id": p.s.id, "object": object, "created": now(),
                                              "model": p.s.model, "choices": []});
                        last["usage"] = usage(p.s.prompt_tokens * p.s.ask.n, p.completion_tokens);
                        out.push(SseEvent::default().data(last.to_string()));
                    }
                    out.push(SseEvent::default().data("[DONE]"));
                    p.done = true;
                }
            }
            Some(JobEvent::Failed(why)) => {
                let error = json!({"error": {"message": why, "type": "server_error", "param": null,
                                             "code": "engine_error"}});
                out.push(SseEvent::default().data(error.to_string()));
                p.done = true;
            }
            None => p.done = true,
        }
        Some((futures_util::stream::iter(out.into_iter().map(Ok)), p))
    });
    Sse::new(futures_util::StreamExt::flatten(events))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_equal_only_when_equal() {
        assert!(constant_time_eq(b"secret-key", b"secret-key"));
        assert!(!constant_time_eq(b"secret-kez", b"secret-key"));
        assert!(!constant_time_eq(b"secret", b"secret-key"));
        assert!(!constant_time_eq(b"", b"secret-key"));
        assert!(!constant_time_eq(b"secret-key-longer", b"secret-key"));
    }
}
