//! Learning from feedback over HTTP: every completion is remembered by id (prompt and answer
//! tokens, caller); `POST /v1/feedback` with a correction or a rating hands it to the caller's
//! scope of the [`ruvllm_sona::learner::Learner`] (the instant loop, persisted with
//! `--sona-dir`), whose published adapter the caller's next requests run with.

use crate::api::ApiError;
use crate::{AppState, Caller};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use ruvllm_model::LoraAdapter;
use ruvllm_sona::learner::{Feedback, LearnConfig, LearnError, Learner};
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Completions remembered for feedback.
const RECORDS: usize = 4096;

/// What a completion was, for feedback on it.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    caller: String,
    prompt: Vec<u32>,
    answer: Vec<u32>,
}

/// Learning state of a server (absent with `--no-learning`).
pub struct Learning {
    learner: Learner,
    records: Mutex<(VecDeque<String>, HashMap<String, Record>)>,
}

impl Learning {
    /// In-memory learning for `model`; `anchor` is the anchor text's token ids.
    pub fn new(model: Arc<ruvllm_model::Model>, anchor: Vec<u32>) -> Learning {
        let mut learner = Learner::new(model);
        learner.configure(LearnConfig::default(), Some(anchor));
        Learning { learner, records: Mutex::default() }
    }

    /// Learning persisted under `dir`; returns it and how many scopes were restored.
    pub fn open(dir: &Path, model: Arc<ruvllm_model::Model>, anchor: Vec<u32>) -> std::io::Result<(Learning, usize)> {
        let (mut learner, report) = Learner::open(dir, model)?;
        learner.configure(LearnConfig::default(), Some(anchor));
        for w in &report.warnings {
            tracing::warn!(dir = %dir.display(), "{w}");
        }
        Ok((Learning { learner, records: Mutex::default() }, report.scopes))
    }

    /// Remembers a finished completion.
    pub(crate) fn record(&self, id: &str, caller: &str, prompt: &[u32], answer: &[u32]) {
        let mut g = self.records.lock().unwrap_or_else(|p| p.into_inner());
        let (order, map) = &mut *g;
        if order.len() >= RECORDS {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
        order.push_back(id.to_owned());
        map.insert(id.to_owned(), Record { caller: caller.to_owned(), prompt: prompt.to_vec(), answer: answer.to_vec() });
    }

    /// The adapter the caller's requests run with, if its feedback produced one.
    pub(crate) fn adapter_for(&self, caller: &str) -> Option<Arc<LoraAdapter>> {
        self.learner.adapter_for(caller)
    }
}

/// `POST /v1/feedback {id, correction}` or `{id, rating ∈ [-1, 1]}`.
pub(crate) async fn feedback(State(st): State<Arc<AppState>>, Extension(caller): Extension<Caller>, body: Result<Bytes, BytesRejection>) -> Response {
    let run = async {
        let Some(learning) = st.learning.clone() else {
            return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", None, Some("learning_disabled"), "this server runs with --no-learning"));
        };
        let body = crate::api::parse_body(body)?;
        let id = body.get("id").and_then(Value::as_str).ok_or_else(|| ApiError::invalid("id", "`id` (a completion id) is required"))?.to_owned();
        let correction = match body.get("correction") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(_) => return Err(ApiError::invalid("correction", "`correction` must be a non-empty string")),
        };
        let rating = match body.get("rating") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_f64() {
                Some(r) if (-1.0..=1.0).contains(&r) => Some(r),
                _ => return Err(ApiError::invalid("rating", "`rating` must be a number in [-1, 1]")),
            },
        };
        if correction.is_none() && rating.is_none() {
            return Err(ApiError::invalid("correction", "send a `correction` or a `rating`"));
        }
        let rec = {
            let g = learning.records.lock().unwrap_or_else(|p| p.into_inner());
            g.1.get(&id).filter(|r| r.caller == caller.0).cloned()
        };
        let Some(rec) = rec else {
            return Err(ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", Some("id"), Some("completion_not_found"), format!("no recent completion `{id}` of yours")));
        };
        // What to learn: the correction (then end of turn), or the answer itself, rated.
        let fb = match (&correction, rating) {
            (Some(text), _) => {
                let mut a = st.tok.encode(text, false, false);
                if let Some(e) = st.tok.eog.first().copied().or(st.tok.eos) {
                    a.push(e);
                }
                Feedback::Correction(a)
            }
            (None, Some(r)) => Feedback::Rating(r),
            (None, None) => unreachable!("checked above"),
        };
        let answer_len = match &fb {
            Feedback::Correction(a) => a.len(),
            Feedback::Rating(_) => rec.answer.len(),
        };
        if rec.prompt.len() + answer_len > st.engine.config().n_ctx {
            return Err(ApiError::invalid("correction", "prompt and correction do not fit the context"));
        }
        let scope = caller.0.clone();
        let l2 = learning.clone();
        let t0 = Instant::now();
        let out = tokio::task::spawn_blocking(move || l2.learner.learn(&scope, &rec.prompt, &rec.answer, &fb))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, None, e.to_string()))?;
        let o = match out {
            Ok(o) => o,
            Err(e @ LearnError::BadRating) => return Err(ApiError::invalid("rating", e.to_string())),
            Err(e) => return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, None, e.to_string())),
        };
        if !o.updated {
            return Ok(Json(json!({"id": id, "updated": false})).into_response());
        }
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        tracing::info!(id, steps = o.steps, loss_before = o.loss_before, loss_after = o.loss_after, version = o.version, persisted = o.persisted, ms, "feedback learned");
        Ok(Json(json!({"id": id, "updated": true, "steps": o.steps, "loss_before": o.loss_before, "loss_after": o.loss_after, "version": o.version, "persisted": o.persisted, "ms": ms})).into_response())
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

