//! Learning from feedback (SONA's instant loop, first form): every completion is remembered by
//! id (prompt and answer tokens, caller); `POST /v1/feedback` with a correction or a rating
//! trains the caller's own micro-adapter — rank 8 on the last layer's down projection, exact
//! gradients from one captured forward ([`ruvllm_sona::train`]) — on a learning thread pool of
//! its own, and publishes it with a new version; the caller's next requests run with it. Each
//! new lesson is trained together with the caller's three most recent earlier ones (replay), so
//! it does not overwrite them. One caller's feedback never changes another caller's outputs.
//!
//! With `--sona-dir DIR` every published adapter is also written to
//! `DIR/scopes/<scope>/` (PEFT `adapter_model.safetensors` + `adapter_config.json`, and
//! `state.json` with the version and the lessons as token ids), each file through a temporary
//! sibling, fsync and rename: a crash at any point leaves the last good files, and a restart
//! serves every scope with exactly the adapter it had. `<scope>` is a SHA-256 prefix of the
//! caller's key, so keys never reach the disk. Not persisted: Adam moments (a restored scope's
//! optimizer restarts) and completions awaiting feedback.

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
use std::path::{Path, PathBuf};
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
    /// Prompt + answer (what is persisted; the capture is recomputed from it).
    tokens: Vec<u32>,
    prompt_len: usize,
}

/// A lesson as stored in `state.json`.
#[derive(Debug, Clone, PartialEq)]
struct StoredLesson {
    tokens: Vec<u32>,
    prompt_len: usize,
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
    /// Trainers by scope key.
    scopes: Mutex<HashMap<String, Scope>>,
    /// The adapters requests run with, by scope key.
    published: RwLock<HashMap<String, Arc<LoraAdapter>>>,
    records: Mutex<(VecDeque<String>, HashMap<String, Record>)>,
    /// Where learned state is persisted (`--sona-dir`).
    dir: Option<PathBuf>,
    /// Lessons read back from `dir`, recaptured when their scope next learns.
    restored: Mutex<HashMap<String, Vec<StoredLesson>>>,
}

impl Default for Learning {
    fn default() -> Self {
        Learning {
            head: OnceLock::new(),
            pool: Arc::new(ThreadPool::new(1)),
            scopes: Mutex::default(),
            published: RwLock::default(),
            records: Mutex::default(),
            dir: None,
            restored: Mutex::default(),
        }
    }
}

/// A stable, non-reversible name for a caller: the first 128 bits of SHA-256 of its key, in hex
/// (API keys must not show up in adapter names or file names).
fn scope_key(caller: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(caller.as_bytes())[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// The adapter id (and trainer seed) of a scope key.
fn scope_id(key: &str) -> u64 {
    u64::from_str_radix(key.get(..16).unwrap_or("0"), 16).unwrap_or(0)
}

fn state_json(version: u64, lessons: &VecDeque<Lesson>) -> Value {
    let ls: Vec<Value> = lessons.iter().map(|l| json!({"tokens": l.tokens, "prompt_len": l.prompt_len, "negative": l.negative})).collect();
    json!({"format": 1, "version": version, "lessons": ls})
}

fn parse_state(v: &Value) -> Option<(u64, Vec<StoredLesson>)> {
    let version = v.get("version")?.as_u64()?;
    let mut out = Vec::new();
    for l in v.get("lessons")?.as_array()? {
        let tokens: Vec<u32> = l.get("tokens")?.as_array()?.iter().map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok())).collect::<Option<_>>()?;
        let prompt_len = usize::try_from(l.get("prompt_len")?.as_u64()?).ok()?;
        if prompt_len == 0 || prompt_len >= tokens.len() {
            return None;
        }
        out.push(StoredLesson { tokens, prompt_len, negative: l.get("negative")?.as_bool()? });
    }
    Some((version, out))
}

impl Learning {
    /// Learning state persisted under `dir` (created if missing): reads back every scope's
    /// adapter and lessons, removing temporary files that a crash mid-write left behind.
    /// Returns the state and how many scopes were restored; a scope whose files cannot be read
    /// is skipped with a warning, never fatal.
    pub fn open(dir: &Path, model: &ruvllm_model::Model) -> std::io::Result<(Learning, usize)> {
        let scopes_dir = dir.join("scopes");
        std::fs::create_dir_all(&scopes_dir)?;
        let mut l = Learning { dir: Some(dir.to_path_buf()), ..Learning::default() };
        let (mut published, mut restored) = (HashMap::new(), HashMap::new());
        for entry in std::fs::read_dir(&scopes_dir)? {
            let path = entry?.path();
            let Some(key) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else { continue };
            if !path.is_dir() || key.len() != 32 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
                continue;
            }
            for f in std::fs::read_dir(&path)?.flatten() {
                if f.path().extension().is_some_and(|e| e == "tmp") {
                    tracing::warn!(file = %f.path().display(), "removing a partial write left by a crash");
                    let _ = std::fs::remove_file(f.path());
                }
            }
            let state = std::fs::read(path.join("state.json")).ok().and_then(|b| serde_json::from_slice::<Value>(&b).ok()).and_then(|v| parse_state(&v));
            let Some((version, lessons)) = state else {
                tracing::warn!(scope = %key, "no readable state.json; scope skipped");
                continue;
            };
            match LoraAdapter::load_peft(&path, model, &format!("sona:{key}"), scope_id(&key), 1.0) {
                Ok(mut ad) => {
                    ad.version = version;
                    published.insert(key.clone(), Arc::new(ad));
                    restored.insert(key, lessons);
                }
                Err(e) => tracing::warn!(scope = %key, error = %e, "adapter unreadable; scope skipped"),
            }
        }
        let n = published.len();
        l.published = RwLock::new(published);
        l.restored = Mutex::new(restored);
        Ok((l, n))
    }

    /// Writes a scope's adapter and state (each file atomically).
    fn persist(&self, key: &str, ad: &LoraAdapter, lessons: &VecDeque<Lesson>, model: &ruvllm_model::Model) -> Result<(), ruvllm_model::Error> {
        let Some(dir) = &self.dir else { return Ok(()) };
        let d = dir.join("scopes").join(key);
        ad.save_peft(&d, model)?;
        ruvllm_model::write_atomic(&d.join("state.json"), state_json(ad.version, lessons).to_string().as_bytes())
    }

    fn adapter_for_key(&self, key: &str) -> Option<Arc<LoraAdapter>> {
        self.published.read().unwrap_or_else(|p| p.into_inner()).get(key).cloned()
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
        self.published.read().unwrap_or_else(|p| p.into_inner()).get(&scope_key(caller)).cloned()
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
        let prompt_len = rec.prompt.len();
        let targets = answer_targets(&tokens, prompt_len);
        let model = st.engine.model().clone();
        let key = scope_key(&caller.0);
        let l2 = learning.clone();
        let t0 = Instant::now();
        let out = tokio::task::spawn_blocking(move || {
            let head = l2.head.get_or_init(|| Head::new(&model).map(Arc::new)).clone()?;
            let mut scopes = l2.scopes.lock().unwrap_or_else(|p| p.into_inner());
            let sid = scope_id(&key);
            let sc = match scopes.entry(key.clone()) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    let last = model.config.n_layer - 1;
                    let mut trainer = DownTrainer::new(model.clone(), head, l2.pool.clone(), last, 8, 16.0, 2e-2, sid)?;
                    // A scope restored from --sona-dir continues from its adapter and lessons.
                    let mut lessons = VecDeque::new();
                    if let Some(ad) = l2.adapter_for_key(&key) {
                        if let Some(p) = ad.pair(last, ruvllm_model::Proj::Down) {
                            trainer.set_params(p.a.clone(), p.b.clone());
                        }
                    }
                    for s in l2.restored.lock().unwrap_or_else(|p| p.into_inner()).remove(&key).unwrap_or_default() {
                        if let Some(cap) = trainer.capture(&s.tokens) {
                            let targets = answer_targets(&s.tokens, s.prompt_len);
                            lessons.push_back(Lesson { cap, targets, negative: s.negative, tokens: s.tokens, prompt_len: s.prompt_len });
                        }
                    }
                    v.insert(Scope { trainer, lessons })
                }
            };
            let cap = sc.trainer.capture(&tokens)?;
            let new = Lesson { cap, targets, negative, tokens, prompt_len };
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
            let version = l2.adapter_for_key(&key).map_or(0, |a| a.version + 1);
            let ad = Arc::new(tr.adapter(&format!("sona:{key}"), sid, version));
            l2.published.write().unwrap_or_else(|p| p.into_inner()).insert(key.clone(), ad.clone());
            let persisted = match l2.persist(&key, &ad, &sc.lessons, &model) {
                Ok(()) => l2.dir.is_some(),
                Err(e) => {
                    tracing::error!(scope = %key, error = %e, "learned state not persisted");
                    false
                }
            };
            Some((before, after, version, persisted))
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, None, e.to_string()))?;
        let Some((before, after, version, persisted)) = out else {
            return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, None, "learning failed (the model's LM head cannot be dequantized?)"));
        };
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        tracing::info!(id, steps, negative, loss_before = before, loss_after = after, version, ms, "feedback learned");
        Ok(Json(json!({"id": id, "updated": true, "steps": steps, "loss_before": before, "loss_after": after, "version": version, "persisted": persisted, "ms": ms})).into_response())
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_keys_are_stable_hex_and_hide_the_key() {
        let k = scope_key("sk-secret");
        assert_eq!(k.len(), 32);
        assert!(k.bytes().all(|b| b.is_ascii_hexdigit()) && !k.contains("secret"));
        assert_eq!(k, scope_key("sk-secret"));
        assert_ne!(k, scope_key("sk-secreu"));
        assert_eq!(scope_id(&k), u64::from_str_radix(&k[..16], 16).unwrap());
    }

    #[test]
    fn state_round_trips_and_bad_state_is_refused() {
        let v = json!({"format": 1, "version": 7, "lessons": [{"tokens": [1, 2, 3], "prompt_len": 2, "negative": true}]});
        assert_eq!(parse_state(&v), Some((7, vec![StoredLesson { tokens: vec![1, 2, 3], prompt_len: 2, negative: true }])));
        for bad in [
            json!({"version": 1}),
            json!({"version": -1, "lessons": []}),
            json!({"version": 1, "lessons": [{"tokens": [1], "prompt_len": 1, "negative": false}]}),
            json!({"version": 1, "lessons": [{"tokens": [1, 5000000000u64], "prompt_len": 1, "negative": false}]}),
            json!({"version": 1, "lessons": [{"tokens": "x", "prompt_len": 1, "negative": false}]}),
        ] {
            assert_eq!(parse_state(&bad), None, "{bad}");
        }
    }
}
