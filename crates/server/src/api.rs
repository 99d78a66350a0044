//! The OpenAI endpoints: body parsing with parameter-naming errors, engine submission, and the
//! JSON and SSE response shapes of chat completions, completions and embeddings.

use crate::{AppState, Caller};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use base64::Engine as _;
use futures_util::stream::{self, Stream, StreamExt};
use ruvllm_engine::{
    CaptureSpec, Error as EngineError, ErrorKind as EngineErrorKind, Event, FinishReason, Logprob,
    Request, RequestHandle, Usage,
};
use ruvllm_model::{LoraAdapter, SamplingParams};
use ruvllm_tokenizer::ChatMessage;
use serde_json::{json, Map, Value};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

/// An OpenAI-shaped error response.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    param: Option<String>,
    code: Option<&'static str>,
    message: String,
}

impl ApiError {
    pub(crate) fn new(
        status: StatusCode,
        kind: &'static str,
        param: Option<&str>,
        code: Option<&'static str>,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            kind,
            param: param.map(str::to_owned),
            code,
            message: message.into(),
        }
    }
    /// 400 naming the parameter at fault.
    pub(crate) fn invalid(param: &str, message: impl Into<String>) -> ApiError {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some(param),
            None,
            message,
        )
    }
    fn invalid_body(message: impl Into<String>) -> ApiError {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            None,
            None,
            message,
        )
    }
    pub(crate) fn unauthorized(message: &str) -> ApiError {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            None,
            Some("invalid_api_key"),
            message,
        )
    }
    pub(crate) fn unavailable(message: &str) -> ApiError {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            None,
            Some("unavailable"),
            message,
        )
    }
    pub(crate) fn model_not_found(m: &str, names: &[String]) -> ApiError {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("model"),
            Some("model_not_found"),
            format!(
                "The model `{m}` does not exist. This server serves: {}",
                names.join(", ")
            ),
        )
    }

    /// The one mapping from engine errors to HTTP statuses; `prompt_param` names the field that
    /// held the prompt (`messages`, `prompt` or `input`).
    pub(crate) fn from_engine(e: &EngineError, prompt_param: &str) -> ApiError {
        match e.kind() {
            EngineErrorKind::InvalidParam { param, message } => {
                let p = if *param == "prompt" {
                    prompt_param
                } else {
                    param
                };
                Self::invalid(p, message.clone())
            }
            EngineErrorKind::ContextOverflow { .. } => Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some(prompt_param),
                Some("context_length_exceeded"),
                e.to_string(),
            ),
            EngineErrorKind::QueueFull(_) => Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                None,
                Some("queue_full"),
                e.to_string(),
            ),
            EngineErrorKind::ShuttingDown => Self::unavailable(&e.to_string()),
            _ => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                None,
                None,
                e.to_string(),
            ),
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// Parses a body into a JSON object; size-limit rejections become 413.
pub(crate) fn parse_body(
    body: Result<Bytes, BytesRejection>,
) -> Result<Map<String, Value>, ApiError> {
    let bytes = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                None,
                Some("request_too_large"),
                "the request body is larger than the server accepts",
            )
        } else {
            ApiError::invalid_body(format!("cannot read the request body: {}", r.body_text()))
        }
    })?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::invalid_body(
            "the request body must be a JSON object",
        )),
        Err(e) => Err(ApiError::invalid_body(format!(
            "the request body is not valid JSON: {e}"
        ))),
    }
}

/// Typed access to body fields; `null` counts as absent; a wrong type names the field.
struct Fields<'a>(&'a Map<String, Value>);

impl<'a> Fields<'a> {
    fn get(&self, k: &str) -> Option<&'a Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }
    fn f64(&self, k: &str) -> Result<Option<f64>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| ApiError::invalid(k, format!("`{k}` must be a number, got {v}"))),
        }
    }
    fn int(&self, k: &str) -> Result<Option<i64>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| ApiError::invalid(k, format!("`{k}` must be an integer, got {v}"))),
        }
    }
    fn bool(&self, k: &str) -> Result<Option<bool>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| ApiError::invalid(k, format!("`{k}` must be a boolean, got {v}"))),
        }
    }
    fn str(&self, k: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| ApiError::invalid(k, format!("`{k}` must be a string, got {v}"))),
        }
    }
}

/// The served model a request names (`model`), and its adapter: the `adapter` field, or a
/// `model` that names an adapter (as vLLM serves LoRA adapters as models).
fn resolve(
    st: &AppState,
    f: &Fields<'_>,
    caller: &Caller,
) -> Result<(String, Option<Arc<LoraAdapter>>, Option<String>), ApiError> {
    let requested = f.str("model")?;
    let (model, mut adapter) = match requested.and_then(|m| st.adapter(m).map(|a| (m, a))) {
        Some((m, a)) => (m.to_owned(), Some(a)),
        None => (st.model(requested)?, None),
    };
    let mut named = adapter.is_some().then(|| model.clone());
    if let Some(name) = f.str("adapter")? {
        adapter = Some(st.adapter(name).ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("adapter"),
                Some("adapter_not_found"),
                format!("no adapter named `{name}` is loaded"),
            )
        })?);
        named = Some(name.to_owned());
    }
    // Otherwise the caller's own adapter, learned from its feedback.
    if adapter.is_none() {
        adapter = st.learning.as_ref().and_then(|l| l.adapter_for(&caller.0));
    }
    Ok((model, adapter, named))
}

/// Generation parameters common to chat and text completions.
struct GenParams {
    max_tokens: Option<usize>,
    sampling: SamplingParams,
    stop: Vec<String>,
    n: usize,
    stream: bool,
    include_usage: bool,
    logprobs: Option<usize>,
    ignore_eos: bool,
    priority: i32,
    adapter: Option<Arc<LoraAdapter>>,
}

fn parse_gen(f: &Fields<'_>, chat: bool) -> Result<GenParams, ApiError> {
    for (k, unsupported) in [
        (
            "logit_bias",
            f.get("logit_bias")
                .is_some_and(|v| v.as_object().is_none_or(|o| !o.is_empty())),
        ),
        (
            "tools",
            f.get("tools")
                .is_some_and(|v| v.as_array().is_none_or(|a| !a.is_empty())),
        ),
        (
            "functions",
            f.get("functions")
                .is_some_and(|v| v.as_array().is_none_or(|a| !a.is_empty())),
        ),
        (
            "echo",
            f.get("echo").is_some_and(|v| v.as_bool() != Some(false)),
        ),
        ("suffix", f.get("suffix").is_some()),
        (
            "best_of",
            f.get("best_of").is_some_and(|v| v.as_i64() != Some(1)),
        ),
        (
            "response_format",
            f.get("response_format")
                .is_some_and(|v| v.get("type").and_then(Value::as_str) != Some("text")),
        ),
    ] {
        if unsupported {
            return Err(ApiError::invalid(
                k,
                format!("`{k}` is not supported by this server"),
            ));
        }
    }
    let max = match if chat {
        f.int("max_completion_tokens")?
            .map(|v| ("max_completion_tokens", v))
    } else {
        None
    } {
        Some(x) => Some(x),
        None => f.int("max_tokens")?.map(|v| ("max_tokens", v)),
    };
    let max_tokens = match max {
        Some((k, v)) if v < 1 => {
            return Err(ApiError::invalid(
                k,
                format!("`{k}` must be at least 1, got {v}"),
            ))
        }
        Some((_, v)) => Some(usize::try_from(v).unwrap_or(usize::MAX)),
        None => None,
    };
    let mut s = SamplingParams {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        repetition_penalty: 1.0,
        frequency_penalty: 0.0,
        presence_penalty: 0.0,
        penalty_last_n: 64,
        seed: None,
    };
    if let Some(t) = f.f64("temperature")? {
        s.temperature = t as f32;
    }
    if let Some(v) = f.f64("top_p")? {
        s.top_p = v as f32;
    }
    if let Some(v) = f.f64("min_p")? {
        s.min_p = v as f32;
    }
    if let Some(v) = f.f64("repetition_penalty")? {
        s.repetition_penalty = v as f32;
    }
    if let Some(v) = f.f64("frequency_penalty")? {
        s.frequency_penalty = v as f32;
    }
    if let Some(v) = f.f64("presence_penalty")? {
        s.presence_penalty = v as f32;
    }
    if let Some(k) = f.int("top_k")? {
        s.top_k = match k {
            -1 | 0 => 0,
            k if k > 0 => k as usize,
            k => {
                return Err(ApiError::invalid(
                    "top_k",
                    format!("`top_k` must be -1 (off) or positive, got {k}"),
                ))
            }
        };
    }
    s.seed = f.int("seed")?.map(|v| v as u64);
    let n = match f.int("n")? {
        None => 1,
        Some(v) if v >= 1 => v as usize,
        Some(v) => {
            return Err(ApiError::invalid(
                "n",
                format!("`n` must be at least 1, got {v}"),
            ))
        }
    };
    let stop = match f.get("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str().map(str::to_owned).ok_or_else(|| {
                    ApiError::invalid("stop", "`stop` must be a string or a list of strings")
                })
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ApiError::invalid(
                "stop",
                "`stop` must be a string or a list of strings",
            ))
        }
    };
    if stop.len() > 16 {
        return Err(ApiError::invalid("stop", "at most 16 stop sequences"));
    }
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => Fields(o)
            .bool("include_usage")
            .map_err(|_| {
                ApiError::invalid(
                    "stream_options",
                    "`stream_options.include_usage` must be a boolean",
                )
            })?
            .unwrap_or(false),
        Some(_) => {
            return Err(ApiError::invalid(
                "stream_options",
                "`stream_options` must be an object",
            ))
        }
    };
    let logprobs = if chat {
        let on = f.bool("logprobs")?.unwrap_or(false);
        let top = f.int("top_logprobs")?;
        match (on, top) {
            (false, Some(_)) => {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    "`top_logprobs` requires `logprobs: true`",
                ))
            }
            (false, None) => None,
            (true, None) => Some(0),
            (true, Some(k)) if (0..=20).contains(&k) => Some(k as usize),
            (true, Some(k)) => {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    format!("`top_logprobs` must be between 0 and 20, got {k}"),
                ))
            }
        }
    } else {
        match f.int("logprobs")? {
            None => None,
            Some(k) if (0..=20).contains(&k) => Some(k as usize),
            Some(k) => {
                return Err(ApiError::invalid(
                    "logprobs",
                    format!("`logprobs` must be between 0 and 20, got {k}"),
                ))
            }
        }
    };
    let ignore_eos = f.bool("ignore_eos")?.unwrap_or(false);
    let priority = f
        .int("priority")?
        .unwrap_or(0)
        .clamp(i32::MIN as i64, i32::MAX as i64) as i32;
    f.str("user")?;
    Ok(GenParams {
        max_tokens,
        sampling: s,
        stop,
        n,
        stream,
        include_usage,
        logprobs,
        ignore_eos,
        priority,
        adapter: None,
    })
}

fn parse_messages(f: &Fields<'_>) -> Result<Vec<ChatMessage>, ApiError> {
    let Some(Value::Array(items)) = f.get("messages") else {
        return Err(ApiError::invalid(
            "messages",
            "`messages` must be a non-empty list of messages",
        ));
    };
    if items.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "`messages` must not be empty",
        ));
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, m) in items.iter().enumerate() {
        let bad = |what: &str| ApiError::invalid(&format!("messages[{i}]"), what.to_owned());
        let o = m
            .as_object()
            .ok_or_else(|| bad("each message must be an object"))?;
        let role = o
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("`role` must be a string"))?;
        let role = match role {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(bad(&format!(
                    "unsupported role `{other}` (system, developer, user, assistant)"
                )))
            }
        };
        let content = match o.get("content") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut s = String::new();
                for p in parts {
                    match (
                        p.get("type").and_then(Value::as_str),
                        p.get("text").and_then(Value::as_str),
                    ) {
                        (Some("text"), Some(t)) => s.push_str(t),
                        _ => return Err(bad("only text content parts are supported")),
                    }
                }
                s
            }
            Some(_) => return Err(bad("`content` must be a string or a list of text parts")),
        };
        out.push(ChatMessage::new(role, &content));
    }
    Ok(out)
}

/// A prompt given as text, token ids, or a list of either.
fn parse_prompts(st: &AppState, v: Option<&Value>, param: &str) -> Result<Vec<Vec<u32>>, ApiError> {
    let text = |s: &str| st.tok.encode(s, true, true);
    let ids = |a: &[Value]| -> Result<Vec<u32>, ApiError> {
        a.iter()
            .map(|t| {
                t.as_u64()
                    .and_then(|t| u32::try_from(t).ok())
                    .ok_or_else(|| {
                        ApiError::invalid(
                            param,
                            format!("`{param}` token ids must be non-negative integers"),
                        )
                    })
            })
            .collect()
    };
    let out = match v {
        Some(Value::String(s)) => vec![text(s)],
        Some(Value::Array(a)) if a.is_empty() => {
            return Err(ApiError::invalid(
                param,
                format!("`{param}` must not be empty"),
            ))
        }
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
            a.iter().filter_map(Value::as_str).map(text).collect()
        }
        Some(Value::Array(a)) if a.iter().all(Value::is_number) => vec![ids(a)?],
        Some(Value::Array(a)) if a.iter().all(Value::is_array) => a
            .iter()
            .map(|x| ids(x.as_array().map(Vec::as_slice).unwrap_or(&[])))
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(ApiError::invalid(
                param,
                format!("`{param}` must be a string, a list of strings, or token ids"),
            ))
        }
    };
    if out.iter().any(|p| p.is_empty()) {
        return Err(ApiError::invalid(
            param,
            format!("`{param}` must not be empty"),
        ));
    }
    Ok(out)
}

fn engine_request(
    st: &AppState,
    prompt: Vec<u32>,
    g: &GenParams,
    keep: Option<CaptureSpec>,
) -> Request {
    let limit = st.engine.config().n_ctx;
    Request {
        max_tokens: g
            .max_tokens
            .unwrap_or_else(|| limit.saturating_sub(prompt.len()).max(1)),
        prompt,
        sampling: g.sampling.clone(),
        stop: g.stop.clone(),
        ignore_eos: g.ignore_eos,
        n: g.n,
        priority: g.priority,
        logprobs: g.logprobs,
        embed: false,
        cache_salt: Vec::new(),
        adapter: g.adapter.clone(),
        capture: None,
        keep,
    }
}

/// Submits one request per prompt; choice indices of prompt `p` start at `p × n`.
fn submit_all(
    st: &AppState,
    prompts: Vec<Vec<u32>>,
    g: &GenParams,
    param: &str,
) -> Result<Vec<RequestHandle>, ApiError> {
    // The first prompt's choice is remembered for feedback: with one choice, its generation
    // keeps the activations a rating trains on.
    let keep = |i: usize, p: &[u32]| {
        st.learning
            .as_ref()
            .filter(|_| i == 0 && g.n == 1)
            .and_then(|l| l.capture().keep_spec(p.len(), g.adapter.as_deref()))
    };
    let reqs: Vec<Request> = prompts
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let k = keep(i, &p);
            engine_request(st, p, g, k)
        })
        .collect();
    for r in &reqs {
        st.engine
            .validate(r)
            .map_err(|e| ApiError::from_engine(&e, param))?;
    }
    reqs.into_iter()
        .map(|r| {
            st.engine
                .submit(r)
                .map_err(|e| ApiError::from_engine(&e, param))
        })
        .collect()
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

/// What one choice produced.
#[derive(Default)]
struct ChoiceOut {
    tokens: Vec<u32>,
    text: String,
    finish: Option<FinishReason>,
    logprobs: Vec<(u32, Logprob)>,
}

fn token_piece(st: &AppState, id: u32) -> (String, Vec<u8>) {
    let mut b = Vec::new();
    let _ = st.tok.token_bytes(id, true, &mut b);
    (String::from_utf8_lossy(&b).into_owned(), b)
}

fn chat_logprob_entry(st: &AppState, id: u32, lp: &Logprob) -> Value {
    let (s, b) = token_piece(st, id);
    let top: Vec<Value> = lp
        .top
        .iter()
        .map(|&(t, l)| {
            let (s, b) = token_piece(st, t);
            json!({"token": s, "logprob": l, "bytes": b})
        })
        .collect();
    json!({"token": s, "logprob": lp.logprob, "bytes": b, "top_logprobs": top})
}

fn text_logprobs(st: &AppState, items: &[(u32, Logprob)], offset0: usize) -> Value {
    let mut tokens = Vec::new();
    let mut lps = Vec::new();
    let mut tops = Vec::new();
    let mut offsets = Vec::new();
    let mut off = offset0;
    for (id, lp) in items {
        let (s, _) = token_piece(st, *id);
        offsets.push(off);
        off += s.len();
        tokens.push(s);
        lps.push(lp.logprob);
        let mut m = Map::new();
        for &(t, l) in &lp.top {
            m.insert(token_piece(st, t).0, json!(l));
        }
        tops.push(Value::Object(m));
    }
    json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

fn add_usage(a: &mut Usage, b: &Usage) {
    a.prompt_tokens += b.prompt_tokens;
    a.cached_tokens += b.cached_tokens;
    a.completion_tokens += b.completion_tokens;
}

/// Events of several handles, tagged with their choice offset, in arrival order.
fn merged(handles: Vec<RequestHandle>, n: usize) -> impl Stream<Item = (usize, Event)> + Send {
    let streams = handles.into_iter().enumerate().map(move |(p, h)| {
        stream::unfold(Some(h), move |h| async move {
            let mut h = h?;
            match h.next().await {
                Some(e @ (Event::Done(_) | Event::Failed(_))) => Some(((p * n, e), None)),
                Some(e) => Some(((p * n, e), Some(h))),
                None => Some((
                    (
                        p * n,
                        Event::Failed(EngineError::new(EngineErrorKind::ShuttingDown)),
                    ),
                    None,
                )),
            }
        })
        .boxed()
    });
    stream::select_all(streams)
}

struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    n_prompts: usize,
    started: Instant,
    caller: String,
    /// The first prompt's tokens (remembered with choice 0's answer for feedback).
    prompt: Vec<u32>,
    /// What the caller asked, before retrieved context (the ReasoningBank's key text).
    question: String,
    /// Bank entries put before the first prompt (`"sona": {"retrieve": k}`), if asked for.
    retrieved: Option<Vec<crate::learn::Retrieved>>,
    /// The named adapter the request runs with (kept with its trajectory for routing).
    adapter_name: Option<String>,
    /// Where `"sona": {"route": true}` sent the request, when it asked.
    routed: Option<Option<ruvllm_sona::bank::Route>>,
    /// Whether the caller's learned adapter ran (None: the caller has none, or the request
    /// named or routed to an adapter).
    scope_adapter: Option<bool>,
}

/// Runs a request to completion and builds the JSON response.
async fn collect(
    st: &AppState,
    meta: Meta,
    handles: Vec<RequestHandle>,
    g: &GenParams,
) -> Response {
    let total = meta.n_prompts * g.n;
    let mut choices: Vec<ChoiceOut> = (0..total).map(|_| ChoiceOut::default()).collect();
    let mut usage = Usage::default();
    let mut ev = Box::pin(merged(handles, g.n));
    let mut done = 0;
    let mut kept = None;
    while let Some((off, e)) = ev.next().await {
        match e {
            Event::Token {
                index,
                token,
                text,
                logprob,
            } => {
                let c = &mut choices[off + index];
                c.tokens.push(token);
                c.text.push_str(&text);
                if let Some(lp) = logprob {
                    c.logprobs.push((token, lp));
                }
            }
            Event::Finished {
                index,
                reason,
                text,
            } => {
                let c = &mut choices[off + index];
                c.text.push_str(&text);
                c.finish = Some(reason);
            }
            Event::Kept(k) if off == 0 => kept = Some(*k),
            Event::Embedding(_) | Event::Captured(_) | Event::Kept(_) => {}
            Event::Done(u) => {
                add_usage(&mut usage, &u);
                done += 1;
                if done == meta.n_prompts {
                    break;
                }
            }
            Event::Failed(e) => return ApiError::from_engine(&e, "prompt").into_response(),
        }
    }
    let items: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let finish = c.finish.map(FinishReason::as_str);
            match meta.kind {
                Kind::Chat => {
                    let lp = g.logprobs.map(|_| json!({"content": c.logprobs.iter().map(|(t, l)| chat_logprob_entry(st, *t, l)).collect::<Vec<_>>()}));
                    json!({"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": lp, "finish_reason": finish})
                }
                Kind::Text => {
                    let lp = g.logprobs.map(|_| text_logprobs(st, &c.logprobs, 0));
                    json!({"index": i, "text": c.text, "logprobs": lp, "finish_reason": finish})
                }
            }
        })
        .collect();
    if let Some(l) = &st.learning {
        l.record(
            &meta.id,
            &meta.caller,
            &meta.question,
            &meta.prompt,
            &choices[0].tokens,
            meta.adapter_name.clone(),
            kept,
        );
    }
    let object = if meta.kind == Kind::Chat {
        "chat.completion"
    } else {
        "text_completion"
    };
    tracing::info!(
        id = meta.id,
        caller = meta.caller,
        prompt_tokens = usage.prompt_tokens,
        cached_tokens = usage.cached_tokens,
        completion_tokens = usage.completion_tokens,
        ms = meta.started.elapsed().as_secs_f64() * 1e3,
        "completion"
    );
    let mut body = json!({
        "id": meta.id,
        "object": object,
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": concat!("ruvllm-", env!("CARGO_PKG_VERSION")),
        "choices": items,
        "usage": usage_json(&usage),
    });
    if let Some(hits) = &meta.retrieved {
        let list: Vec<Value> = hits
            .iter()
            .map(
                |h| json!({"question": h.question, "answer": h.answer, "similarity": h.similarity}),
            )
            .collect();
        body["sona"] = json!({"retrieved": list});
    }
    if let Some(r) = &meta.routed {
        if !body["sona"].is_object() {
            body["sona"] = json!({});
        }
        body["sona"]["routed"] = routed_json(r.as_ref());
    }
    if let Some(applied) = meta.scope_adapter {
        if !body["sona"].is_object() {
            body["sona"] = json!({});
        }
        body["sona"]["scope_adapter"] = json!(applied);
    }
    Json(body).into_response()
}

/// Per-stream state for building SSE chunks.
struct StreamCtx {
    st: Arc<AppState>,
    meta: Meta,
    include_usage: bool,
    logprobs: bool,
    role_sent: Vec<bool>,
    offsets: Vec<usize>,
    usage: Usage,
    done: usize,
    first_token_at: Option<f64>,
    /// Choice 0's tokens (remembered for feedback).
    answer: Vec<u32>,
    /// What choice 0's generation kept for feedback.
    kept: Option<ruvllm_engine::Kept>,
}

impl StreamCtx {
    fn chunk(&self, choices: Vec<Value>) -> SseEvent {
        let object = if self.meta.kind == Kind::Chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let mut v = json!({
            "id": self.meta.id,
            "object": object,
            "created": self.meta.created,
            "model": self.meta.model,
            "system_fingerprint": concat!("ruvllm-", env!("CARGO_PKG_VERSION")),
            "choices": choices,
        });
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        SseEvent::default().data(v.to_string())
    }

    fn content(
        &mut self,
        i: usize,
        text: &str,
        lp: Option<(u32, &Logprob)>,
        finish: Option<FinishReason>,
    ) -> Vec<SseEvent> {
        let mut out = Vec::new();
        let finish = finish.map(FinishReason::as_str);
        match self.meta.kind {
            Kind::Chat => {
                if !self.role_sent[i] {
                    self.role_sent[i] = true;
                    out.push(self.chunk(vec![json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null})]));
                }
                let lpv = lp.map(|(t, l)| json!({"content": [chat_logprob_entry(&self.st, t, l)]}));
                if !text.is_empty() || lpv.is_some() {
                    out.push(self.chunk(vec![json!({"index": i, "delta": {"content": text}, "logprobs": lpv, "finish_reason": null})]));
                }
                if finish.is_some() {
                    out.push(self.chunk(vec![
                        json!({"index": i, "delta": {}, "logprobs": null, "finish_reason": finish}),
                    ]));
                }
            }
            Kind::Text => {
                let lpv =
                    lp.map(|(t, l)| text_logprobs(&self.st, &[(t, l.clone())], self.offsets[i]));
                self.offsets[i] += text.len();
                if !text.is_empty() || lpv.is_some() || finish.is_some() {
                    out.push(self.chunk(vec![
                        json!({"index": i, "text": text, "logprobs": lpv, "finish_reason": finish}),
                    ]));
                }
            }
        }
        out
    }

    /// SSE events for one engine event; the bool says the stream is complete.
    fn on_event(&mut self, off: usize, e: Event) -> (Vec<SseEvent>, bool) {
        match e {
            Event::Token {
                index,
                token,
                text,
                logprob,
            } => {
                if self.first_token_at.is_none() {
                    self.first_token_at = Some(self.meta.started.elapsed().as_secs_f64());
                }
                if off + index == 0 {
                    self.answer.push(token);
                }
                let lp = if self.logprobs {
                    logprob.as_ref().map(|l| (token, l))
                } else {
                    None
                };
                (self.content(off + index, &text, lp, None), false)
            }
            Event::Finished {
                index,
                reason,
                text,
            } => (self.content(off + index, &text, None, Some(reason)), false),
            Event::Kept(k) => {
                if off == 0 {
                    self.kept = Some(*k);
                }
                (Vec::new(), false)
            }
            Event::Embedding(_) | Event::Captured(_) => (Vec::new(), false),
            Event::Done(u) => {
                add_usage(&mut self.usage, &u);
                self.done += 1;
                if self.done < self.meta.n_prompts {
                    return (Vec::new(), false);
                }
                let mut out = Vec::new();
                if self.include_usage {
                    let v = json!({
                        "id": self.meta.id,
                        "object": if self.meta.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
                        "created": self.meta.created,
                        "model": self.meta.model,
                        "choices": [],
                        "usage": usage_json(&self.usage),
                    });
                    out.push(SseEvent::default().data(v.to_string()));
                }
                out.push(SseEvent::default().data("[DONE]"));
                if let Some(l) = &self.st.learning {
                    l.record(
                        &self.meta.id,
                        &self.meta.caller,
                        &self.meta.question,
                        &self.meta.prompt,
                        &self.answer,
                        self.meta.adapter_name.clone(),
                        self.kept.take(),
                    );
                }
                tracing::info!(
                    id = self.meta.id,
                    caller = self.meta.caller,
                    prompt_tokens = self.usage.prompt_tokens,
                    cached_tokens = self.usage.cached_tokens,
                    completion_tokens = self.usage.completion_tokens,
                    ttft_ms = self.first_token_at.unwrap_or(0.0) * 1e3,
                    ms = self.meta.started.elapsed().as_secs_f64() * 1e3,
                    "streamed completion"
                );
                (out, true)
            }
            Event::Failed(e) => {
                // Headers are gone; report the error in-band as OpenAI-compatible servers do.
                let err = ApiError::from_engine(&e, "prompt");
                (
                    vec![
                        SseEvent::default().data(err.body().to_string()),
                        SseEvent::default().data("[DONE]"),
                    ],
                    true,
                )
            }
        }
    }
}

fn stream_response(
    st: Arc<AppState>,
    meta: Meta,
    handles: Vec<RequestHandle>,
    g: &GenParams,
) -> Response {
    let total = meta.n_prompts * g.n;
    let ctx = StreamCtx {
        st,
        meta,
        include_usage: g.include_usage,
        logprobs: g.logprobs.is_some(),
        role_sent: vec![false; total],
        offsets: vec![0; total],
        usage: Usage::default(),
        done: 0,
        first_token_at: None,
        answer: Vec::new(),
        kept: None,
    };
    let events = Box::pin(merged(handles, g.n));
    // Dropping this stream (client gone) drops the handles, which cancels their sequences.
    let s = stream::unfold(
        (events, ctx, false),
        |(mut events, mut ctx, finished)| async move {
            if finished {
                return None;
            }
            let (off, e) = events.next().await?;
            let (out, fin) = ctx.on_event(off, e);
            Some((
                stream::iter(out.into_iter().map(Ok::<_, Infallible>)),
                (events, ctx, fin),
            ))
        },
    )
    .flatten();
    Sse::new(s).keep_alive(KeepAlive::default()).into_response()
}

fn meta(
    st: &AppState,
    model: String,
    kind: Kind,
    n_prompts: usize,
    caller: &Caller,
    prompt: Vec<u32>,
    question: String,
    retrieved: Option<Vec<crate::learn::Retrieved>>,
) -> Meta {
    let prefix = if kind == Kind::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    };
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Meta {
        id: st.new_id(prefix),
        created,
        model,
        kind,
        n_prompts,
        started: Instant::now(),
        caller: caller.0.clone(),
        prompt,
        question,
        retrieved,
        adapter_name: None,
        routed: None,
        scope_adapter: None,
    }
}

/// `{"adapter": name | null, "weight": w, "voters": n}`, or null when nothing decided.
fn routed_json(r: Option<&ruvllm_sona::bank::Route>) -> Value {
    r.map_or(
        Value::Null,
        |r| json!({"adapter": r.adapter, "weight": r.weight, "voters": r.voters}),
    )
}

/// What a request asks of SONA (`"sona": {"retrieve": k, "route": bool}`).
#[derive(Debug, Clone, Copy, Default)]
struct SonaOpts {
    /// Bank entries to put before the prompt (0–8).
    retrieve: usize,
    /// Run with the adapter of the caller's nearest successful trajectories (when the request
    /// names no adapter).
    route: bool,
}

/// The request's adapter after routing: unchanged when it named one or routing was not asked
/// for; otherwise the adapter its nearest successful trajectories were answered with (when still
/// loaded), or the caller's own adapter when they used none. Returns the decision for the response.
fn route(
    st: &AppState,
    caller: &Caller,
    opts: SonaOpts,
    explicit: bool,
    embedding: Option<&[f32]>,
    g: &mut GenParams,
) -> (Option<String>, Option<Option<ruvllm_sona::bank::Route>>) {
    if !opts.route || explicit {
        return (None, None);
    }
    let decision = st
        .learning
        .as_ref()
        .zip(embedding)
        .and_then(|(l, e)| l.route(&caller.0, e));
    let loaded = decision
        .as_ref()
        .and_then(|d| d.adapter.as_deref())
        .and_then(|n| st.adapter(n).map(|a| (n.to_owned(), a)));
    let name = loaded.map(|(n, a)| {
        g.adapter = Some(a);
        n
    });
    (name, Some(decision))
}

/// Keeps or drops the caller's learned adapter in `g` (`--sona-apply near`): it runs only
/// for a question nearer one the caller taught than every generic prompt
/// ([`ruvllm_sona::bank::Gate`]); `emb` is the question's embedding, computed here when the
/// request had none. Returns whether it runs, or None when `g` does not carry it (the caller
/// has none, or the request named an adapter or asked to be routed).
async fn gate_scope_adapter(
    st: &AppState,
    caller: &Caller,
    question: &str,
    learned: bool,
    emb: &mut Option<Vec<f32>>,
    g: &mut GenParams,
) -> Result<Option<bool>, ApiError> {
    let Some(l) = st
        .learning
        .as_ref()
        .filter(|_| learned && g.adapter.is_some())
    else {
        return Ok(None);
    };
    if !l.apply_near() {
        return Ok(Some(true));
    }
    let e = match emb {
        Some(e) => e,
        None => emb.insert(embed_tokens(st, st.tok.encode(question, true, false)).await?),
    };
    let applies = l.adapter_applies(&caller.0, e).await;
    if !applies {
        g.adapter = None;
    }
    Ok(Some(applies))
}

/// `"sona": {"retrieve": k, "route": bool}`: how many of the caller's bank entries to put
/// before the prompt (0 when absent; at most 8), and whether to route by nearest trajectories.
fn parse_sona(f: &Fields<'_>) -> Result<SonaOpts, ApiError> {
    let Some(v) = f.get("sona") else {
        return Ok(SonaOpts::default());
    };
    if v.is_null() {
        return Ok(SonaOpts::default());
    }
    let bad = || {
        ApiError::invalid("sona", "`sona` must be an object like {\"retrieve\": k, \"route\": true} with k an integer in [0, 8]")
    };
    let o = v.as_object().ok_or_else(bad)?;
    if o.keys().any(|k| k != "retrieve" && k != "route") {
        return Err(bad());
    }
    let retrieve = match o.get("retrieve") {
        None | Some(Value::Null) => 0,
        Some(k) => k
            .as_u64()
            .filter(|k| *k <= 8)
            .map(|k| k as usize)
            .ok_or_else(bad)?,
    };
    let route = match o.get("route") {
        None | Some(Value::Null) => false,
        Some(b) => b.as_bool().ok_or_else(bad)?,
    };
    Ok(SonaOpts { retrieve, route })
}

/// The embedding of `question` when the caller has a bank and the request retrieves or routes.
async fn question_embedding(
    st: &AppState,
    caller: &Caller,
    question: &str,
    opts: SonaOpts,
) -> Result<Option<Vec<f32>>, ApiError> {
    let wanted = (opts.retrieve > 0 || opts.route)
        && st.learning.as_ref().is_some_and(|l| l.has_bank(&caller.0));
    if !wanted {
        return Ok(None);
    }
    Ok(Some(
        embed_tokens(st, st.tok.encode(question, true, false)).await?,
    ))
}

/// The caller's `k` bank entries nearest to `embedding` (none without one or for k = 0).
fn retrieve(
    st: &AppState,
    caller: &Caller,
    embedding: Option<&[f32]>,
    k: usize,
) -> Vec<crate::learn::Retrieved> {
    match (st.learning.as_ref(), embedding) {
        (Some(l), Some(e)) if k > 0 => l.search(&caller.0, e, k),
        _ => Vec::new(),
    }
}

/// Retrieved entries as context lines, one `question answer` per line.
fn context_lines(hits: &[crate::learn::Retrieved]) -> String {
    hits.iter()
        .map(|h| format!("{} {}\n", h.question.trim(), h.answer.trim()))
        .collect()
}

/// Waits for an embedding request's vector.
pub(crate) async fn await_embedding(
    mut h: RequestHandle,
    param: &str,
) -> Result<Vec<f32>, ApiError> {
    let mut emb = None;
    while let Some(e) = h.next().await {
        match e {
            Event::Embedding(v) => emb = Some(v),
            Event::Done(_) => break,
            Event::Failed(e) => return Err(ApiError::from_engine(&e, param)),
            _ => {}
        }
    }
    emb.ok_or_else(|| ApiError::unavailable("the engine stopped"))
}

/// The model's embedding of `tokens` (mean-pooled, normalized final hidden states).
pub(crate) async fn embed_tokens(st: &AppState, tokens: Vec<u32>) -> Result<Vec<f32>, ApiError> {
    engine_embedding(&st.engine, tokens).await
}

/// [`embed_tokens`] through `engine` directly (the learning state holds the engine, not the
/// server state).
pub(crate) async fn engine_embedding(
    engine: &ruvllm_engine::Engine,
    tokens: Vec<u32>,
) -> Result<Vec<f32>, ApiError> {
    let mut r = Request::greedy(tokens, 1);
    r.embed = true;
    await_embedding(
        engine
            .submit(r)
            .map_err(|e| ApiError::from_engine(&e, "input"))?,
        "input",
    )
    .await
}

/// `POST /v1/chat/completions`.
pub(crate) async fn chat_completions(
    State(st): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = async {
        let body = parse_body(body)?;
        let f = Fields(&body);
        let (model, adapter, named) = resolve(&st, &f, &caller)?;
        let mut g = parse_gen(&f, true)?;
        g.adapter = adapter;
        let opts = parse_sona(&f)?;
        let k = opts.retrieve;
        let mut msgs = parse_messages(&f)?;
        let question = msgs
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(|m| m.content.clone())
            .unwrap_or_default();
        let mut emb = question_embedding(&st, &caller, &question, opts).await?;
        let (routed_name, routed) =
            route(&st, &caller, opts, named.is_some(), emb.as_deref(), &mut g);
        let learned = named.is_none() && !opts.route;
        let scope_adapter =
            gate_scope_adapter(&st, &caller, &question, learned, &mut emb, &mut g).await?;
        let hits = retrieve(&st, &caller, emb.as_deref(), k);
        if !hits.is_empty() {
            let facts = format!("Facts from earlier corrections:\n{}", context_lines(&hits));
            match msgs.first_mut().filter(|m| m.role == "system") {
                Some(m) => m.content = format!("{}\n\n{facts}", m.content),
                None => msgs.insert(0, ChatMessage::new("system", &facts)),
            }
        }
        let rendered = st
            .template
            .render(&msgs, true)
            .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
        let prompt = st.tok.encode_chat(&rendered);
        let handles = submit_all(&st, vec![prompt.clone()], &g, "messages")?;
        let mut m = meta(
            &st,
            model,
            Kind::Chat,
            1,
            &caller,
            prompt,
            question,
            (k > 0).then_some(hits),
        );
        m.adapter_name = named.or(routed_name);
        m.routed = routed;
        m.scope_adapter = scope_adapter;
        Ok::<_, ApiError>(if g.stream {
            stream_response(st.clone(), m, handles, &g)
        } else {
            collect(&st, m, handles, &g).await
        })
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// `POST /v1/completions`.
pub(crate) async fn completions(
    State(st): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = async {
        let body = parse_body(body)?;
        let f = Fields(&body);
        let (model, adapter, named) = resolve(&st, &f, &caller)?;
        let mut g = parse_gen(&f, false)?;
        g.adapter = adapter;
        let opts = parse_sona(&f)?;
        let k = opts.retrieve;
        let mut prompts = parse_prompts(&st, f.get("prompt"), "prompt")?;
        let n_prompts = prompts.len();
        let question = st.tok.decode(&prompts[0], false).unwrap_or_default();
        // Routing follows the first prompt's question.
        let mut first_emb = question_embedding(&st, &caller, &question, opts).await?;
        let (routed_name, routed) = route(
            &st,
            &caller,
            opts,
            named.is_some(),
            first_emb.as_deref(),
            &mut g,
        );
        // The learned adapter follows the first prompt's question too.
        let learned = named.is_none() && !opts.route;
        let scope_adapter =
            gate_scope_adapter(&st, &caller, &question, learned, &mut first_emb, &mut g).await?;
        let mut first_hits = None;
        if k > 0 {
            for (i, p) in prompts.iter_mut().enumerate() {
                let text = if i == 0 {
                    question.clone()
                } else {
                    st.tok.decode(p, false).unwrap_or_default()
                };
                let emb = if i == 0 {
                    first_emb.take()
                } else {
                    question_embedding(&st, &caller, &text, opts).await?
                };
                let hits = retrieve(&st, &caller, emb.as_deref(), k);
                if !hits.is_empty() {
                    *p = st
                        .tok
                        .encode(&format!("{}{text}", context_lines(&hits)), true, false);
                }
                if i == 0 {
                    first_hits = Some(hits);
                }
            }
        }
        let first = prompts[0].clone();
        let handles = submit_all(&st, prompts, &g, "prompt")?;
        let mut m = meta(
            &st,
            model,
            Kind::Text,
            n_prompts,
            &caller,
            first,
            question,
            first_hits,
        );
        m.adapter_name = named.or(routed_name);
        m.routed = routed;
        m.scope_adapter = scope_adapter;
        Ok::<_, ApiError>(if g.stream {
            stream_response(st.clone(), m, handles, &g)
        } else {
            collect(&st, m, handles, &g).await
        })
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// `POST /v1/embeddings`: mean-pooled, L2-normalized final hidden states.
pub(crate) async fn embeddings(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = async {
        let body = parse_body(body)?;
        let f = Fields(&body);
        let model = st.model(f.str("model")?)?;
        let inputs = parse_prompts(&st, f.get("input"), "input")?;
        let base64 = match f.str("encoding_format")? {
            None | Some("float") => false,
            Some("base64") => true,
            Some(o) => {
                return Err(ApiError::invalid(
                    "encoding_format",
                    format!("`encoding_format` must be float or base64, got {o}"),
                ))
            }
        };
        if let Some(d) = f.int("dimensions")? {
            if d != st.n_embd as i64 {
                return Err(ApiError::invalid(
                    "dimensions",
                    format!("this model's embeddings have {} dimensions", st.n_embd),
                ));
            }
        }
        let mut handles = Vec::new();
        let mut n_tokens = 0;
        for p in inputs {
            n_tokens += p.len();
            let mut r = Request::greedy(p, 1);
            r.embed = true;
            handles.push(
                st.engine
                    .submit(r)
                    .map_err(|e| ApiError::from_engine(&e, "input"))?,
            );
        }
        let mut data = Vec::new();
        for (i, h) in handles.into_iter().enumerate() {
            let v = await_embedding(h, "input").await?;
            let value = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            data.push(json!({"object": "embedding", "index": i, "embedding": value}));
        }
        Ok(Json(json!({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})).into_response())
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

fn model_json(st: &AppState, id: &str) -> Value {
    json!({"id": id, "object": "model", "created": st.created, "owned_by": "ruvllm", "max_model_len": st.engine.config().n_ctx})
}

/// `GET /v1/models`: the base model's names, then each adapter (usable as a `model`).
pub(crate) async fn list_models(State(st): State<Arc<AppState>>) -> Response {
    let mut data: Vec<Value> = st.names.iter().map(|n| model_json(&st, n)).collect();
    let mut names: Vec<String> = st
        .adapters
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .keys()
        .cloned()
        .collect();
    names.sort();
    for n in names {
        let mut m = model_json(&st, &n);
        m["parent"] = json!(st.names.first());
        data.push(m);
    }
    Json(json!({"object": "list", "data": data})).into_response()
}

/// `GET /v1/models/{id}`.
pub(crate) async fn get_model(State(st): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    match st.model(Some(&id)) {
        Ok(m) => Json(model_json(&st, &m)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `POST /tokenize`: `{prompt}` or `{messages}` → token ids.
pub(crate) async fn tokenize(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = || {
        let body = parse_body(body)?;
        let f = Fields(&body);
        if let Some(m) = f.str("model")? {
            st.model(Some(m))?;
        }
        let tokens = if f.get("messages").is_some() {
            let msgs = parse_messages(&f)?;
            let add_gen = f.bool("add_generation_prompt")?.unwrap_or(true);
            let rendered = st
                .template
                .render(&msgs, add_gen)
                .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
            st.tok.encode_chat(&rendered)
        } else {
            let p = f.str("prompt")?.ok_or_else(|| {
                ApiError::invalid("prompt", "`prompt` (a string) or `messages` is required")
            })?;
            let special = f.bool("add_special_tokens")?.unwrap_or(true);
            st.tok.encode(p, special, true)
        };
        Ok::<_, ApiError>(Json(json!({"tokens": tokens, "count": tokens.len(), "max_model_len": st.engine.config().n_ctx})).into_response())
    };
    run().unwrap_or_else(IntoResponse::into_response)
}

/// `POST /detokenize`: `{tokens}` → text.
pub(crate) async fn detokenize(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = || {
        let body = parse_body(body)?;
        let f = Fields(&body);
        let Some(Value::Array(a)) = f.get("tokens") else {
            return Err(ApiError::invalid(
                "tokens",
                "`tokens` must be a list of token ids",
            ));
        };
        let ids: Vec<u32> = a
            .iter()
            .map(|t| {
                t.as_u64()
                    .and_then(|t| u32::try_from(t).ok())
                    .ok_or_else(|| {
                        ApiError::invalid("tokens", "token ids must be non-negative integers")
                    })
            })
            .collect::<Result<_, _>>()?;
        let text = st
            .tok
            .decode(&ids, false)
            .map_err(|e| ApiError::invalid("tokens", e.to_string()))?;
        Ok(Json(json!({"prompt": text})).into_response())
    };
    run().unwrap_or_else(IntoResponse::into_response)
}

fn adapter_json(a: &LoraAdapter) -> Value {
    let projections: usize = a
        .layers
        .iter()
        .map(|l| l.iter().filter(|p| p.is_some()).count())
        .sum();
    json!({"name": a.name, "id": a.id, "version": a.version, "projections": projections})
}

/// `GET /v1/adapters`.
pub(crate) async fn list_adapters(State(st): State<Arc<AppState>>) -> Response {
    let mut v: Vec<Value> = st
        .adapters
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .map(|a| adapter_json(a))
        .collect();
    v.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    Json(json!({"object": "list", "data": v})).into_response()
}

/// `POST /v1/adapters {name, path, scale?}`: loads a PEFT adapter from a path on the server, or
/// replaces the one of that name (hot swap: requests already running keep the old weights;
/// the version changes, so cached KV of the old one is never reused).
pub(crate) async fn load_adapter(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = async {
        let body = parse_body(body)?;
        let f = Fields(&body);
        let name = f
            .str("name")?
            .ok_or_else(|| ApiError::invalid("name", "`name` is required"))?
            .to_owned();
        if name.is_empty() || st.names.contains(&name) {
            return Err(ApiError::invalid(
                "name",
                "`name` must be non-empty and differ from the base model's names",
            ));
        }
        let path = std::path::PathBuf::from(
            f.str("path")?
                .ok_or_else(|| ApiError::invalid("path", "`path` is required"))?,
        );
        let scale = f.f64("scale")?.unwrap_or(1.0) as f32;
        let st2 = st.clone();
        let a = tokio::task::spawn_blocking(move || st2.load_adapter(&name, &path, scale))
            .await
            .map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    None,
                    None,
                    e.to_string(),
                )
            })?
            .map_err(|e| ApiError::invalid("path", e.to_string()))?;
        tracing::info!(name = a.name, version = a.version, "adapter loaded");
        Ok(Json(adapter_json(&a)).into_response())
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// `DELETE /v1/adapters/{name}`.
pub(crate) async fn delete_adapter(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Response {
    match st
        .adapters
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&name)
    {
        Some(a) => Json(json!({"name": a.name, "deleted": true})).into_response(),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("name"),
            Some("adapter_not_found"),
            format!("no adapter named `{name}` is loaded"),
        )
        .into_response(),
    }
}
