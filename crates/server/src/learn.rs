//! Learning from feedback over HTTP: every completion is remembered by id (prompt and answer
//! tokens, caller); `POST /v1/feedback` with a correction or a rating hands it to the caller's
//! scope of the [`ruvllm_sona::learner::Learner`] (the instant loop, persisted with
//! `--sona-dir`), whose published adapter the caller's next requests run with.
//!
//! Corrections and positive ratings also go into the caller's ReasoningBank (question, answer,
//! embedding of the question from the model's own hidden states); a request with
//! `"sona": {"retrieve": k}` gets the caller's `k` nearest entries put before its prompt (a
//! system message for chat). Banks are per caller and persisted beside the adapters.

use crate::api::ApiError;
use crate::{AppState, Caller};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use ruvllm_engine::{CaptureSpec, Engine, Event, Request};
use ruvllm_model::{Capture, LoraAdapter};
use ruvllm_sona::bank::{Bank, Trajectory};
use ruvllm_sona::learner::{scope_dirs, scope_key, Feedback, LearnConfig, LearnError, Learner};
use ruvllm_sona::train::CaptureSource;
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Completions remembered for feedback.
const RECORDS: usize = 4096;

/// What a completion was, for feedback on it.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    caller: String,
    /// What the caller asked (before any retrieved context).
    question: String,
    prompt: Vec<u32>,
    answer: Vec<u32>,
    /// The named adapter the completion ran with (`None`: the caller's own or the base model).
    adapter: Option<String>,
}

/// A bank entry handed to a request.
#[derive(Debug, Clone)]
pub(crate) struct Retrieved {
    pub question: String,
    pub answer: String,
    pub similarity: f32,
}

/// Learning state of a server (absent with `--no-learning`).
pub struct Learning {
    learner: Learner,
    records: Mutex<(VecDeque<String>, HashMap<String, Record>)>,
    /// ReasoningBanks by scope key.
    banks: Mutex<HashMap<String, Bank>>,
    dim: usize,
    dir: Option<PathBuf>,
}

fn bank_json(b: &Bank) -> Value {
    let entries: Vec<Value> = (0..b.len())
        .filter_map(|i| Some(json!({"question": b.get(i)?.prompt, "answer": b.get(i)?.answer, "rating": b.get(i)?.rating, "adapter": b.get(i)?.adapter, "embedding": b.vector(i)?})))
        .collect();
    json!({"format": 1, "entries": entries})
}

fn parse_bank(v: &Value, dim: usize, scope: &str) -> Option<Bank> {
    let mut b = Bank::new(dim);
    for e in v.get("entries")?.as_array()? {
        let emb: Vec<f32> = e.get("embedding")?.as_array()?.iter().map(|x| x.as_f64().map(|x| x as f32)).collect::<Option<_>>()?;
        let t = Trajectory { prompt: e.get("question")?.as_str()?.to_owned(), answer: e.get("answer")?.as_str()?.to_owned(), rating: e.get("rating")?.as_f64()? as f32, scope: scope.to_owned(), adapter: e.get("adapter").and_then(Value::as_str).map(str::to_owned) };
        b.add(&emb, t).ok()?;
    }
    Some(b)
}

/// The engine as the learner's source of activations: a lesson's prompt was just served, so
/// its KV blocks are in the prefix cache and only the answer is computed, in the engine's
/// batched step (bit-identical to the learner's own pass: `engine` tests).
pub struct EngineCapture(pub Arc<Engine>);

impl CaptureSource for EngineCapture {
    fn capture(&self, layer: usize, tokens: &[u32], from: usize) -> Option<(Capture, Vec<f32>)> {
        let mut req = Request::greedy(tokens.to_vec(), 1);
        req.capture = Some(CaptureSpec { layer, from });
        let mut h = self.0.submit(req).ok()?;
        while let Some(e) = h.next_blocking() {
            match e {
                Event::Captured(c) => return Some((c.cap, c.logits)),
                Event::Failed(_) | Event::Done(_) => return None,
                _ => {}
            }
        }
        None
    }
}

/// A learner configured as the server runs it: serving defaults on `threads` threads, the
/// anchor text, lessons captured through the engine.
fn serving_learner(mut learner: Learner, engine: Arc<Engine>, anchor: Vec<u32>, threads: usize) -> Learner {
    learner.configure(LearnConfig { threads, ..LearnConfig::default() }, Some(anchor));
    learner.set_capture_source(Some(Arc::new(EngineCapture(engine))));
    learner
}

impl Learning {
    /// In-memory learning for `engine`'s model on `threads` threads of its own; `anchor` is
    /// the anchor text's token ids.
    pub fn new(engine: Arc<Engine>, anchor: Vec<u32>, threads: usize) -> Learning {
        let dim = engine.model().config.n_embd;
        let learner = serving_learner(Learner::new(engine.model().clone()), engine, anchor, threads);
        Learning { learner, records: Mutex::default(), banks: Mutex::default(), dim, dir: None }
    }

    /// Learning persisted under `dir`; returns it and how many scopes were restored.
    pub fn open(dir: &Path, engine: Arc<Engine>, anchor: Vec<u32>, threads: usize) -> std::io::Result<(Learning, usize)> {
        let dim = engine.model().config.n_embd;
        let (learner, report) = Learner::open(dir, engine.model().clone())?;
        let learner = serving_learner(learner, engine, anchor, threads);
        for w in &report.warnings {
            tracing::warn!(dir = %dir.display(), "{w}");
        }
        let mut banks = HashMap::new();
        for (key, path) in scope_dirs(dir)? {
            let Ok(bytes) = std::fs::read(path.join("bank.json")) else { continue };
            match serde_json::from_slice::<Value>(&bytes).ok().and_then(|v| parse_bank(&v, dim, &key)) {
                Some(b) => {
                    banks.insert(key, b);
                }
                None => tracing::warn!(scope = %key, "bank.json unreadable; bank skipped"),
            }
        }
        Ok((Learning { learner, records: Mutex::default(), banks: Mutex::new(banks), dim, dir: Some(dir.to_path_buf()) }, report.scopes))
    }

    /// Whether the caller has bank entries (so a retrieval is worth an embedding pass).
    pub(crate) fn has_bank(&self, caller: &str) -> bool {
        self.banks.lock().unwrap_or_else(|p| p.into_inner()).get(&scope_key(caller)).is_some_and(|b| !b.is_empty())
    }

    /// The caller's `k` bank entries nearest to `embedding`.
    pub(crate) fn search(&self, caller: &str, embedding: &[f32], k: usize) -> Vec<Retrieved> {
        let g = self.banks.lock().unwrap_or_else(|p| p.into_inner());
        let Some(b) = g.get(&scope_key(caller)) else { return Vec::new() };
        b.search(embedding, k)
            .into_iter()
            .filter_map(|(i, sim)| b.get(i).map(|t| Retrieved { question: t.prompt.clone(), answer: t.answer.clone(), similarity: sim }))
            .collect()
    }

    /// Adds an entry to the caller's bank (and writes the bank when persisted).
    fn remember(&self, caller: &str, embedding: &[f32], question: &str, answer: &str, rating: f32, adapter: Option<String>) {
        let key = scope_key(caller);
        let mut g = self.banks.lock().unwrap_or_else(|p| p.into_inner());
        let b = g.entry(key.clone()).or_insert_with(|| Bank::new(self.dim));
        if let Err(e) = b.add(embedding, Trajectory { prompt: question.to_owned(), answer: answer.to_owned(), rating, scope: key.clone(), adapter }) {
            tracing::warn!(error = %e, "bank entry refused");
            return;
        }
        if let Some(dir) = &self.dir {
            let d = dir.join("scopes").join(&key);
            let r = std::fs::create_dir_all(&d).map_err(|e| e.to_string()).and_then(|()| ruvllm_model::write_atomic(&d.join("bank.json"), bank_json(b).to_string().as_bytes()).map_err(|e| e.to_string()));
            if let Err(e) = r {
                tracing::error!(scope = %key, error = %e, "bank not persisted");
            }
        }
    }

    /// Remembers a finished completion.
    pub(crate) fn record(&self, id: &str, caller: &str, question: &str, prompt: &[u32], answer: &[u32], adapter: Option<String>) {
        let mut g = self.records.lock().unwrap_or_else(|p| p.into_inner());
        let (order, map) = &mut *g;
        if order.len() >= RECORDS {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
        order.push_back(id.to_owned());
        map.insert(id.to_owned(), Record { caller: caller.to_owned(), question: question.to_owned(), prompt: prompt.to_vec(), answer: answer.to_vec(), adapter });
    }

    /// Where the caller's nearest successful trajectories (the 8 nearest bank entries rated
    /// above 0) send a request with `embedding` (see [`Bank::route`]).
    pub(crate) fn route(&self, caller: &str, embedding: &[f32]) -> Option<ruvllm_sona::bank::Route> {
        let g = self.banks.lock().unwrap_or_else(|p| p.into_inner());
        g.get(&scope_key(caller))?.route(embedding, 8)
    }

    /// The adapter the caller's requests run with, if its feedback produced one.
    pub(crate) fn adapter_for(&self, caller: &str) -> Option<Arc<LoraAdapter>> {
        self.learner.adapter_for(caller)
    }
}

/// `POST /v1/feedback {id, correction}` or `{id, rating ∈ [-1, 1]}`.
/// Runs the background loop for scope `key` and logs what it did.
fn log_background(learner: &Learner, key: &str) {
    let t = Instant::now();
    match learner.background_key(key) {
        Ok(o) => tracing::info!(scope = key, loss_before = o.loss_before, loss_after = o.loss_after, version = o.version, persisted = o.persisted, ms = t.elapsed().as_secs_f64() * 1e3, "background loop"),
        Err(e) => tracing::warn!(scope = key, error = %e, "background loop failed"),
    }
}

/// Starts the learning timers: every `background_secs`, the background loop of each scope with
/// feedback since its last run; every `consolidate_secs`, the deep loop of every scope whose
/// micro-adapter holds something (0: that timer is off). Each run happens on a blocking thread, one at a time.
pub(crate) fn spawn_timers(learning: Arc<Learning>, background_secs: u64, consolidate_secs: u64) {
    for (secs, deep) in [(background_secs, false), (consolidate_secs, true)] {
        if secs == 0 {
            continue;
        }
        let l = learning.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(secs));
            tick.tick().await;
            loop {
                tick.tick().await;
                let l = l.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    if deep {
                        for key in l.learner.consolidation_pending() {
                            let t = Instant::now();
                            match l.learner.consolidate_key(&key) {
                                Ok(c) => tracing::info!(scope = key, version = c.version, rank = c.rank, pruned = c.pruned, loss_before = c.loss_before, loss_after = c.loss_after, ms = t.elapsed().as_secs_f64() * 1e3, "deep loop"),
                                Err(e) => tracing::warn!(scope = key, error = %e, "deep loop failed"),
                            }
                        }
                    } else {
                        for key in l.learner.background_pending() {
                            log_background(&l.learner, &key);
                        }
                    }
                })
                .await;
            }
        });
    }
}

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
        // What the bank keeps: the corrected answer, or the answer a positive rating confirms.
        let remembered = match (&correction, rating) {
            (Some(text), _) => Some((text.trim().to_owned(), 1.0f32)),
            (None, Some(r)) if r > 0.0 => st.tok.decode(&rec.answer, false).ok().map(|t| (t.trim().to_owned(), r as f32)),
            _ => None,
        };
        let question = rec.question.clone();
        let used_adapter = rec.adapter.clone();
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
        if let Some((answer, r)) = remembered.filter(|(a, _)| !a.is_empty() && !question.is_empty()) {
            let emb = crate::api::embed_tokens(&st, st.tok.encode(&question, true, false)).await?;
            learning.remember(&caller.0, &emb, &question, &answer, r, used_adapter);
        }
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        tracing::info!(id, steps = o.steps, loss_before = o.loss_before, loss_after = o.loss_after, version = o.version, persisted = o.persisted, ms, "feedback learned");
        if o.background_due {
            // The background loop runs after this answer, off the request path.
            let (l3, scope) = (learning.clone(), caller.0.clone());
            tokio::task::spawn_blocking(move || log_background(&l3.learner, &scope_key(&scope)));
        }
        Ok(Json(json!({"id": id, "updated": true, "steps": o.steps, "loss_before": o.loss_before, "loss_after": o.loss_after, "version": o.version, "persisted": o.persisted, "ms": ms, "background_scheduled": o.background_due})).into_response())
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

