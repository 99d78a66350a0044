//! Learning from feedback (SONA's instant loop, first form): every completion is remembered by
//! id (prompt and answer tokens, caller); `POST /v1/feedback` with a correction or a rating
//! trains the caller's own micro-adapter — rank 8 on the last layer's down projection, exact
//! gradients from one captured forward ([`ruvllm_sona::train`]) — on a learning thread pool of
//! its own, and publishes it with a new version; the caller's next requests run with it. Each
//! new lesson is trained together with the caller's three most recent earlier ones (replay), so
//! it does not overwrite them. One caller's feedback never changes another caller's outputs.

use crate::api::ApiError;
use crate::{AppState, Caller};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use ruvllm_kernels::pool::ThreadPool;
use ruvllm_model::LoraAdapter;
use ruvllm_sona::train::{answer_targets, DownTrainer, Head};
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Instant;

/// Completions remembered for feedback.
const RECORDS: usize = 4096;

/// Earlier lessons of a scope replayed with each new one (most recent first).
const REPLAY: usize = 3;

/// A lesson: captured activations of prompt + answer, the rows to learn, and its sign.
struct Lesson {
    cap: ruvllm_model::Capture,
    targets: Vec<Option<u32>>,
    negative: bool,
}

/// A caller's learning state: its trainer and its recent lessons.
struct Scope {
    trainer: DownTrainer,
    lessons: VecDeque<Lesson>,
}

/// What a completion was, for feedback on it.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    caller: String,
    prompt: Vec<u32>,
    answer: Vec<u32>,
}

/// Learning state of a server (absent with `--no-learning`).
pub struct Learning {
    head: OnceLock<Option<Arc<Head>>>,
    pool: Arc<ThreadPool>,
    scopes: Mutex<HashMap<String, Scope>>,
    published: RwLock<HashMap<String, Arc<LoraAdapter>>>,
    records: Mutex<(VecDeque<String>, HashMap<String, Record>)>,
}

impl Default for Learning {
    fn default() -> Self {
        Learning {
            head: OnceLock::new(),
            pool: Arc::new(ThreadPool::new(1)),
            scopes: Mutex::default(),
            published: RwLock::default(),
            records: Mutex::default(),
        }
    }
}

/// A stable, non-reversible name for a caller (API keys must not show up in adapter names).
fn scope_id(caller: &str) -> u64 {
    // FNV-1a.
    caller.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

impl Learning {
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
        self.published.read().unwrap_or_else(|p| p.into_inner()).get(caller).cloned()
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
        let (answer, negative, steps) = match (&correction, rating) {
            (Some(text), _) => {
                let mut a = st.tok.encode(text, false, false);
                if let Some(e) = st.tok.eog.first().copied().or(st.tok.eos) {
                    a.push(e);
                }
                (a, false, 30)
            }
            (None, Some(r)) => (rec.answer.clone(), r < 0.0, (r.abs() * 10.0).round() as usize),
            (None, None) => unreachable!("checked above"),
        };
        if answer.is_empty() || steps == 0 {
            return Ok(Json(json!({"id": id, "updated": false})).into_response());
        }
        let tokens: Vec<u32> = rec.prompt.iter().chain(&answer).copied().collect();
        if tokens.len() > st.engine.config().n_ctx {
            return Err(ApiError::invalid("correction", "prompt and correction do not fit the context"));
        }
        let targets = answer_targets(&tokens, rec.prompt.len());
        let model = st.engine.model().clone();
        let scope = caller.0.clone();
        let l2 = learning.clone();
        let t0 = Instant::now();
        let out = tokio::task::spawn_blocking(move || {
            let head = l2.head.get_or_init(|| Head::new(&model).map(Arc::new)).clone()?;
            let mut scopes = l2.scopes.lock().unwrap_or_else(|p| p.into_inner());
            let sid = scope_id(&scope);
            let sc = match scopes.entry(scope.clone()) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    let last = model.config.n_layer - 1;
                    let trainer = DownTrainer::new(model.clone(), head, l2.pool.clone(), last, 8, 16.0, 2e-2, sid)?;
                    v.insert(Scope { trainer, lessons: VecDeque::new() })
                }
            };
            let cap = sc.trainer.capture(&tokens)?;
            let new = Lesson { cap, targets, negative };
            // The new lesson with the most recent earlier ones, so it does not overwrite them.
            let (before, after) = {
                let mut batch: Vec<(&ruvllm_model::Capture, &[Option<u32>], bool)> = vec![(&new.cap, &new.targets, new.negative)];
                batch.extend(sc.lessons.iter().take(REPLAY).map(|l| (&l.cap, l.targets.as_slice(), l.negative)));
                let before = sc.trainer.loss_and_grads(&new.cap, &new.targets, false).0;
                for _ in 0..steps {
                    sc.trainer.step_batch(&batch);
                }
                (before, sc.trainer.loss_and_grads(&new.cap, &new.targets, false).0)
            };
            sc.lessons.push_front(new);
            sc.lessons.truncate(16);
            let tr = &sc.trainer;
            let version = l2.adapter_for(&scope).map_or(0, |a| a.version + 1);
            let ad = Arc::new(tr.adapter(&format!("sona:{sid:016x}"), sid, version));
            l2.published.write().unwrap_or_else(|p| p.into_inner()).insert(scope, ad);
            Some((before, after, version))
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, None, e.to_string()))?;
        let Some((before, after, version)) = out else {
            return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, None, "learning failed (the model's LM head cannot be dequantized?)"));
        };
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        tracing::info!(id, steps, negative, loss_before = before, loss_after = after, version, ms, "feedback learned");
        Ok(Json(json!({"id": id, "updated": true, "steps": steps, "loss_before": before, "loss_after": after, "version": version, "ms": ms})).into_response())
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}
