//! Learning from feedback over HTTP: every completion is remembered by id (prompt and answer
//! tokens, caller); `POST /v1/feedback` with a correction or a rating hands it to the caller's
//! scope of the [`ruvllm_sona::learner::Learner`] (the instant loop, persisted with
//! `--sona-dir`), whose published adapter the caller's next requests run with.
//!
//! Every completion also becomes a trajectory in the caller's ReasoningBank (question, answer,
//! embedding of the question from the model's own hidden states, adapter, rating 0 until
//! feedback), added off the request path by one embedding pass through the engine; feedback
//! rates it (a correction replaces its answer). A request with `"sona": {"retrieve": k}` gets
//! the caller's `k` nearest rated-positive entries put before its prompt (a system message for
//! chat), and `"route": true` follows the nearest successful ones. Banks are per caller,
//! persisted beside the adapters as append-only logs (`bank.log`, see [`load_bank_log`]).

use crate::api::ApiError;
use crate::{AppState, Caller};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use ruvllm_engine::{CaptureSpec, Engine, Event, Kept, Request};
use ruvllm_kernels::pool::ThreadPool;
use ruvllm_model::{Capture, LoraAdapter};
use ruvllm_sona::bank::{Bank, Gate, Trajectory, GENERIC_PROMPTS};
use ruvllm_sona::learner::{scope_dirs, scope_key, Feedback, LearnConfig, LearnError, Learner};
use ruvllm_sona::train::{tokens_hash, CaptureSource};
use ruvllm_tokenizer::Tokenizer;
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Completions remembered for feedback.
const RECORDS: usize = 4096;

/// Entries a caller's bank takes before unrated trajectories stop being added (rated ones
/// still are): 100k × 576 floats ≈ 230 MB for SmolLM2.
pub const MAX_TRAJECTORIES: usize = 100_000;

/// Default memory for activations kept from generations (`--sona-keep-mib`).
pub const KEEP_MIB: usize = 256;

/// A scope's bank log, next to its versions.
const BANK_LOG: &str = "bank.log";

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
    /// Its trajectory's index in the caller's bank, once added.
    bank: Option<usize>,
    /// The latest feedback on it (rating, corrected answer): what its trajectory carries.
    feedback: Option<(f32, Option<String>)>,
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
    /// Embeds questions for trajectories.
    engine: Arc<Engine>,
    tok: Arc<Tokenizer>,
    /// Whether every completion becomes a trajectory (else only those that get feedback).
    all_trajectories: bool,
    records: Mutex<(VecDeque<String>, HashMap<String, Record>)>,
    /// ReasoningBanks by scope key.
    banks: Mutex<HashMap<String, Bank>>,
    dim: usize,
    dir: Option<PathBuf>,
    /// The learner's source of activations, which keeps those of generations.
    capture: Arc<EngineCapture>,
    /// Whether a caller's learned adapter runs only for questions near one it taught
    /// (`--sona-apply near`, the default; see [`Gate`]) or for every request (`always`).
    apply_near: bool,
    /// The generic prompts' embeddings, computed at the first gated request.
    gate: tokio::sync::OnceCell<Gate>,
}

/// Activations kept while completions were generated ([`Request::keep`]: the last layer's down
/// projection rows of the prompt's last token and every generated token), by the tokens they
/// belong to: a rating of an answer trains on them without running prompt or answer through
/// the model again. Oldest first out, within a byte budget (SmolLM2: 10.5 KiB per token).
/// Two completions with the same tokens share one entry: their rows are the same base rows,
/// the served log-probabilities (which pick a rating's rows) are the later one's.
#[derive(Default)]
struct KeptStore {
    budget: usize,
    bytes: usize,
    order: VecDeque<u64>,
    /// By [`tokens_hash`] of the tokens; entries keep their tokens, compared on lookup.
    map: HashMap<u64, (Vec<u32>, Arc<Kept>)>,
}

fn kept_bytes(k: &Kept) -> usize {
    4 * (k.cap.act.len() + k.cap.resid.len() + k.cap.down.len())
}

impl KeptStore {
    /// Keeps `k` for `tokens` (prompt and answer), dropping the oldest entries past the budget.
    fn insert(&mut self, tokens: Vec<u32>, k: Kept) {
        let size = kept_bytes(&k);
        if size > self.budget {
            return;
        }
        let key = tokens_hash(&tokens);
        if let Some((_, old)) = self.map.remove(&key) {
            self.bytes -= kept_bytes(&old);
            self.order.retain(|&o| o != key);
        }
        self.bytes += size;
        self.shrink();
        self.order.push_front(key);
        self.map.insert(key, (tokens, Arc::new(k)));
    }

    /// Drops the oldest entries until the kept bytes fit the budget.
    fn shrink(&mut self) {
        while self.bytes > self.budget {
            let Some(old) = self.order.pop_back() else {
                break;
            };
            if let Some((_, o)) = self.map.remove(&old) {
                self.bytes -= kept_bytes(&o);
            }
        }
    }

    fn get(&self, tokens: &[u32]) -> Option<Arc<Kept>> {
        self.map
            .get(&tokens_hash(tokens))
            .filter(|(t, _)| t == tokens)
            .map(|(_, k)| k.clone())
    }
}

/// A bank log's line adding a trajectory (its unit embedding: exact in JSON's shortest
/// round-trip form).
fn add_line(t: &Trajectory, embedding: &[f32]) -> Value {
    json!({"op": "add", "question": t.prompt, "answer": t.answer, "rating": t.rating, "adapter": t.adapter, "embedding": embedding})
}

/// A bank log's line rating entry `index` (and replacing its answer for a correction).
fn rate_line(index: usize, rating: f32, answer: Option<&str>) -> Value {
    json!({"op": "rate", "index": index, "rating": rating, "answer": answer})
}

/// Applies one log line (or one legacy `bank.json` entry, an "add" without "op").
fn apply_line(b: &mut Bank, v: &Value, scope: &str) -> Option<()> {
    match v.get("op").and_then(Value::as_str).unwrap_or("add") {
        "add" => {
            let emb: Vec<f32> = v
                .get("embedding")?
                .as_array()?
                .iter()
                .map(|x| x.as_f64().map(|x| x as f32))
                .collect::<Option<_>>()?;
            let t = Trajectory {
                prompt: v.get("question")?.as_str()?.to_owned(),
                answer: v.get("answer")?.as_str()?.to_owned(),
                rating: v.get("rating")?.as_f64()? as f32,
                scope: scope.to_owned(),
                adapter: v.get("adapter").and_then(Value::as_str).map(str::to_owned),
            };
            b.add(&emb, t).ok().map(|_| ())
        }
        "rate" => {
            let i = usize::try_from(v.get("index")?.as_u64()?).ok()?;
            let answer = v.get("answer").and_then(Value::as_str).map(str::to_owned);
            b.rate(i, v.get("rating")?.as_f64()? as f32, answer)
                .then_some(())
        }
        _ => None,
    }
}

/// Loads a bank log: lines are applied in order up to the first that is torn (no final
/// newline: a crash mid-append) or unreadable, and the file is cut there so later appends
/// follow good lines. Returns the bank and, if something was cut, how many bytes.
pub fn load_bank_log(
    path: &Path,
    dim: usize,
    scope: &str,
) -> std::io::Result<(Bank, Option<usize>)> {
    let bytes = std::fs::read(path)?;
    let mut b = Bank::new(dim);
    let mut good = 0;
    for line in bytes.split_inclusive(|&c| c == b'\n') {
        let complete = line.last() == Some(&b'\n');
        let ok = complete
            && serde_json::from_slice::<Value>(line)
                .ok()
                .and_then(|v| apply_line(&mut b, &v, scope))
                .is_some();
        if !ok {
            break;
        }
        good += line.len();
    }
    if good < bytes.len() {
        let f = std::fs::OpenOptions::new().write(true).open(path)?;
        f.set_len(good as u64)?;
        f.sync_all()?;
        return Ok((b, Some(bytes.len() - good)));
    }
    Ok((b, None))
}

/// Appends lines to a bank log and makes them durable (fsync) before returning.
fn append_lines(path: &Path, lines: &[Value]) -> std::io::Result<()> {
    use std::io::Write;
    let text: String = lines.iter().map(|v| format!("{v}\n")).collect();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_data()
}

/// A bank from session 5's whole-file `bank.json` (converted to a log on first open).
fn parse_legacy_bank(v: &Value, dim: usize, scope: &str) -> Option<Bank> {
    let mut b = Bank::new(dim);
    for e in v.get("entries")?.as_array()? {
        apply_line(&mut b, e, scope)?;
    }
    Some(b)
}

/// The engine as the learner's source of activations. A rating of an answer just served
/// finds the activations its generation kept ([`KeptStore`]): only the LM head runs, for the
/// base logits its candidates come from. Otherwise (a correction, or rows no longer kept) the
/// prompt's KV blocks are in the prefix cache and only the answer is computed, in the engine's
/// batched step (bit-identical to the learner's own pass: `engine` tests).
pub struct EngineCapture {
    engine: Arc<Engine>,
    kept: Mutex<KeptStore>,
    /// Runs the LM head over kept rows.
    pool: Arc<ThreadPool>,
    /// Lessons served from kept rows, and computed by the engine.
    from_kept: AtomicU64,
    computed: AtomicU64,
}

impl EngineCapture {
    /// A source for `engine`'s model keeping up to `keep_bytes` of generations' activations
    /// (0: none; every lesson is computed by the engine); the head runs on `pool`.
    pub fn new(engine: Arc<Engine>, pool: Arc<ThreadPool>, keep_bytes: usize) -> EngineCapture {
        EngineCapture {
            engine,
            kept: Mutex::new(KeptStore {
                budget: keep_bytes,
                ..KeptStore::default()
            }),
            pool,
            from_kept: AtomicU64::new(0),
            computed: AtomicU64::new(0),
        }
    }

    /// Changes the memory for kept activations (dropping the oldest past it).
    pub fn set_keep_budget(&self, bytes: usize) {
        let mut g = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        g.budget = bytes;
        g.shrink();
    }

    /// What a generation of a `prompt_len`-token prompt running with `adapter` should keep
    /// ([`Request::keep`]): the last layer's rows from the prompt's last token on. None when
    /// nothing is kept or the adapter changes those rows (a lesson on it is then computed).
    pub fn keep_spec(
        &self,
        prompt_len: usize,
        adapter: Option<&LoraAdapter>,
    ) -> Option<CaptureSpec> {
        let layer = self.engine.model().config.n_layer - 1;
        let budget = self.kept.lock().unwrap_or_else(|p| p.into_inner()).budget;
        (budget > 0 && prompt_len > 0 && !adapter.is_some_and(|a| a.adapts_before_down(layer)))
            .then(|| CaptureSpec {
                layer,
                from: prompt_len - 1,
            })
    }

    /// Keeps what the generation of `answer` after `prompt` kept, for a lesson on it.
    pub fn keep(&self, prompt: &[u32], answer: &[u32], k: Kept) {
        if answer.is_empty() {
            return;
        }
        let tokens: Vec<u32> = prompt.iter().chain(answer).copied().collect();
        self.kept
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tokens, k);
    }

    /// Bytes of activations kept now.
    pub fn kept_bytes(&self) -> usize {
        self.kept.lock().unwrap_or_else(|p| p.into_inner()).bytes
    }

    /// Lessons captured so far: (from kept rows, computed by the engine).
    pub fn lesson_sources(&self) -> (u64, u64) {
        (
            self.from_kept.load(Ordering::Relaxed),
            self.computed.load(Ordering::Relaxed),
        )
    }

    /// What a lesson on `tokens` needs from rows kept while they were generated: every row
    /// with a target (`from..n − 1`) must be kept, of the last layer. Logits of `rows` only,
    /// when given (else of every row `from..`).
    fn lesson_from_kept(
        &self,
        layer: usize,
        tokens: &[u32],
        from: usize,
        rows: Option<&[usize]>,
    ) -> Option<(Capture, Vec<f32>)> {
        let k = self
            .kept
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(tokens)?;
        let model = self.engine.model();
        let c = &model.config;
        let n = tokens.len();
        if k.cap.layer != layer
            || layer + 1 != c.n_layer
            || k.from > from
            || k.from + k.rows + 1 < n
        {
            return None;
        }
        let (d, ff, nv) = (c.n_embd, c.n_ff, c.n_vocab);
        let mut cap = Capture {
            layer,
            act: vec![0.0; n * ff],
            resid: vec![0.0; n * d],
            down: vec![0.0; n * d],
            last: Vec::new(),
        };
        let hi = (k.from + k.rows).min(n);
        cap.act[k.from * ff..hi * ff].copy_from_slice(&k.cap.act[..(hi - k.from) * ff]);
        cap.resid[k.from * d..hi * d].copy_from_slice(&k.cap.resid[..(hi - k.from) * d]);
        cap.down[k.from * d..hi * d].copy_from_slice(&k.cap.down[..(hi - k.from) * d]);
        // Logits of rows from..: the wanted kept ones through the head, the rest zero.
        let wanted: Vec<usize> = match rows {
            Some(r) => r.iter().copied().filter(|&t| t >= from && t < hi).collect(),
            None => (from..hi).collect(),
        };
        let (mut resid, mut down) = (
            Vec::with_capacity(wanted.len() * d),
            Vec::with_capacity(wanted.len() * d),
        );
        for &t in &wanted {
            resid.extend_from_slice(&cap.resid[t * d..(t + 1) * d]);
            down.extend_from_slice(&cap.down[t * d..(t + 1) * d]);
        }
        let mut out = vec![0f32; wanted.len() * nv];
        ruvllm_model::logits_from_last_layer(model, &self.pool, &resid, &down, &mut out);
        let mut logits = vec![0f32; (n - from) * nv];
        for (i, &t) in wanted.iter().enumerate() {
            logits[(t - from) * nv..(t - from + 1) * nv]
                .copy_from_slice(&out[i * nv..(i + 1) * nv]);
        }
        Some((cap, logits))
    }
}

impl CaptureSource for EngineCapture {
    fn capture(
        &self,
        layer: usize,
        tokens: &[u32],
        from: usize,
        rows: Option<&[usize]>,
    ) -> Option<(Capture, Vec<f32>)> {
        if let Some(x) = self.lesson_from_kept(layer, tokens, from, rows) {
            self.from_kept.fetch_add(1, Ordering::Relaxed);
            return Some(x);
        }
        self.computed.fetch_add(1, Ordering::Relaxed);
        let mut req = Request::greedy(tokens.to_vec(), 1);
        req.capture = Some(CaptureSpec { layer, from });
        let mut h = self.engine.submit(req).ok()?;
        while let Some(e) = h.next_blocking() {
            match e {
                Event::Captured(c) => return Some((c.cap, c.logits)),
                Event::Failed(_) | Event::Done(_) => return None,
                _ => {}
            }
        }
        None
    }

    fn serving_busy(&self) -> bool {
        let m = self.engine.metrics();
        m.requests_running + m.requests_waiting > 0
    }

    fn served_logprobs(&self, tokens: &[u32], from: usize) -> Option<Vec<f32>> {
        let k = self
            .kept
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(tokens)?;
        // The answer's tokens follow position `from`; the kept ones were served in order.
        let n = tokens.len().checked_sub(from + 1)?;
        (k.from == from && k.logprobs.len() >= n).then(|| k.logprobs[..n].to_vec())
    }
}

/// A learner configured as the server runs it: `cfg` (serving defaults but for threads and
/// rated rows), the anchor text, lessons captured through the engine.
/// Returns it with its source of activations.
fn serving_learner(
    mut learner: Learner,
    engine: Arc<Engine>,
    anchor: Vec<u32>,
    cfg: LearnConfig,
) -> (Learner, Arc<EngineCapture>) {
    learner.configure(cfg, Some(anchor));
    let capture = Arc::new(EngineCapture::new(engine, learner.pool(), KEEP_MIB << 20));
    learner.set_capture_source(Some(capture.clone()));
    (learner, capture)
}

impl Learning {
    /// In-memory learning for `engine`'s model configured by `cfg` (its own threads); `anchor`
    /// is the anchor text's token ids.
    pub fn new(
        engine: Arc<Engine>,
        tok: Arc<Tokenizer>,
        anchor: Vec<u32>,
        cfg: LearnConfig,
    ) -> Learning {
        let dim = engine.model().config.n_embd;
        let (learner, capture) = serving_learner(
            Learner::new(engine.model().clone()),
            engine.clone(),
            anchor,
            cfg,
        );
        Learning {
            learner,
            engine,
            tok,
            all_trajectories: true,
            records: Mutex::default(),
            banks: Mutex::default(),
            dim,
            dir: None,
            capture,
            apply_near: true,
            gate: tokio::sync::OnceCell::new(),
        }
    }

    /// Learning persisted under `dir`; returns it and how many scopes were restored.
    pub fn open(
        dir: &Path,
        engine: Arc<Engine>,
        tok: Arc<Tokenizer>,
        anchor: Vec<u32>,
        cfg: LearnConfig,
    ) -> std::io::Result<(Learning, usize)> {
        let dim = engine.model().config.n_embd;
        let (learner, report) = Learner::open(dir, engine.model().clone())?;
        let (learner, capture) = serving_learner(learner, engine.clone(), anchor, cfg);
        for w in &report.warnings {
            tracing::warn!(dir = %dir.display(), "{w}");
        }
        let mut banks = HashMap::new();
        for (key, path) in scope_dirs(dir)? {
            let log = path.join(BANK_LOG);
            if !log.exists() {
                // A whole-file bank from before the log: converted once.
                let Ok(bytes) = std::fs::read(path.join("bank.json")) else {
                    continue;
                };
                let Some(b) = serde_json::from_slice::<Value>(&bytes)
                    .ok()
                    .and_then(|v| parse_legacy_bank(&v, dim, &key))
                else {
                    tracing::warn!(scope = %key, "bank.json unreadable; bank skipped");
                    continue;
                };
                let lines: Vec<Value> = (0..b.len())
                    .filter_map(|i| Some(add_line(b.get(i)?, b.vector(i)?)))
                    .collect();
                let text: String = lines.iter().map(|v| format!("{v}\n")).collect();
                ruvllm_model::write_atomic(&log, text.as_bytes())
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                let _ = std::fs::remove_file(path.join("bank.json"));
            }
            match load_bank_log(&log, dim, &key) {
                Ok((b, cut)) => {
                    if let Some(n) = cut {
                        tracing::warn!(scope = %key, bytes = n, "bank.log: a torn or unreadable tail was cut off");
                    }
                    banks.insert(key, b);
                }
                Err(e) => {
                    tracing::warn!(scope = %key, error = %e, "bank.log unreadable; bank skipped")
                }
            }
        }
        Ok((
            Learning {
                learner,
                engine,
                tok,
                all_trajectories: true,
                records: Mutex::default(),
                banks: Mutex::new(banks),
                dim,
                dir: Some(dir.to_path_buf()),
                capture,
                apply_near: true,
                gate: tokio::sync::OnceCell::new(),
            },
            report.scopes,
        ))
    }

    /// `--sona-apply`: whether a caller's learned adapter runs only for questions near one it
    /// taught (true) or for all its requests.
    pub fn with_apply_near(mut self, near: bool) -> Learning {
        self.apply_near = near;
        self
    }

    /// Whether learned adapters run only near taught questions (`--sona-apply near`).
    pub(crate) fn apply_near(&self) -> bool {
        self.apply_near
    }

    /// Whether the caller's learned adapter applies to a question embedded as `embedding`:
    /// one of the questions it taught (its bank's rated or corrected entries) is nearer than
    /// every generic prompt ([`Gate`]). The first call embeds the generic prompts (~24
    /// embedding passes, once per server).
    pub(crate) async fn adapter_applies(&self, caller: &str, embedding: &[f32]) -> bool {
        let gate = self
            .gate
            .get_or_init(|| async {
                let mut generic = Vec::with_capacity(GENERIC_PROMPTS.len());
                for p in GENERIC_PROMPTS {
                    if let Some(e) = self.embed(p).await {
                        generic.push(e);
                    }
                }
                Gate::new(self.dim, &generic)
            })
            .await;
        self.banks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&scope_key(caller))
            .is_some_and(|b| gate.opens(b, embedding))
    }

    /// Every completion a trajectory (`true`, the default) or only those that get feedback:
    /// each trajectory costs an embedding pass of its question (serve_bench at concurrency 16
    /// with 32-token prompts: 8–11% fewer generated tokens/s).
    pub fn with_all_trajectories(mut self, all: bool) -> Learning {
        self.all_trajectories = all;
        self
    }

    /// Memory for activations kept from generations, so that a rating trains without a forward
    /// pass (0: none kept; every lesson's rows are computed by the engine).
    pub fn with_kept_budget(self, bytes: usize) -> Learning {
        self.capture.set_keep_budget(bytes);
        self
    }

    /// The learner's source of activations.
    pub(crate) fn capture(&self) -> &EngineCapture {
        &self.capture
    }

    /// Whether the caller has rated-positive bank entries (so a retrieval or a route is worth
    /// an embedding pass).
    pub(crate) fn has_bank(&self, caller: &str) -> bool {
        self.banks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&scope_key(caller))
            .is_some_and(|b| (0..b.len()).any(|i| b.get(i).is_some_and(|t| t.rating > 0.0)))
    }

    /// Trajectories over every caller's bank: (all, rated — any feedback, positive or not).
    pub(crate) fn trajectory_counts(&self) -> (usize, usize) {
        let g = self.banks.lock().unwrap_or_else(|p| p.into_inner());
        g.values().fold((0, 0), |(n, r), b| {
            (
                n + b.len(),
                r + (0..b.len())
                    .filter(|&i| b.get(i).is_some_and(|t| t.rating != 0.0))
                    .count(),
            )
        })
    }

    /// The caller's `k` bank entries nearest to `embedding`.
    pub(crate) fn search(&self, caller: &str, embedding: &[f32], k: usize) -> Vec<Retrieved> {
        let g = self.banks.lock().unwrap_or_else(|p| p.into_inner());
        let Some(b) = g.get(&scope_key(caller)) else {
            return Vec::new();
        };
        b.search_rated(embedding, k)
            .into_iter()
            .filter_map(|(i, sim)| {
                b.get(i).map(|t| Retrieved {
                    question: t.prompt.clone(),
                    answer: t.answer.clone(),
                    similarity: sim,
                })
            })
            .collect()
    }

    /// Appends `lines` to scope `key`'s bank log when persisted (logged, never fatal: the
    /// in-memory bank keeps serving).
    fn persist_bank(&self, key: &str, lines: &[Value]) {
        let Some(dir) = &self.dir else { return };
        let d = dir.join("scopes").join(key);
        if let Err(e) =
            std::fs::create_dir_all(&d).and_then(|()| append_lines(&d.join(BANK_LOG), lines))
        {
            tracing::error!(scope = %key, error = %e, "bank entry not persisted");
        }
    }

    /// Adds completion `id`'s trajectory to its caller's bank under `embedding` (its
    /// question's), with its feedback if any arrived, else rating 0 and `answer` (the answer
    /// as generated). Nothing when it has one already, was forgotten, or the bank is full and
    /// it is unrated.
    fn add_trajectory(&self, id: &str, embedding: &[f32], answer: &str) {
        let mut recs = self.records.lock().unwrap_or_else(|p| p.into_inner());
        let Some(rec) = recs.1.get_mut(id).filter(|r| r.bank.is_none()) else {
            return;
        };
        let key = scope_key(&rec.caller);
        let (rating, answer) = match &rec.feedback {
            Some((r, Some(a))) => (*r, a.clone()),
            Some((r, None)) => (*r, answer.to_owned()),
            None => (0.0, answer.to_owned()),
        };
        let mut banks = self.banks.lock().unwrap_or_else(|p| p.into_inner());
        let b = banks
            .entry(key.clone())
            .or_insert_with(|| Bank::new(self.dim));
        if rating == 0.0 && b.len() >= MAX_TRAJECTORIES {
            return;
        }
        let t = Trajectory {
            prompt: rec.question.clone(),
            answer,
            rating,
            scope: key.clone(),
            adapter: rec.adapter.clone(),
        };
        match b.add(embedding, t.clone()) {
            Ok(i) => {
                rec.bank = Some(i);
                let line = add_line(&t, b.vector(i).unwrap_or(&[]));
                // Completions need the records while the line is made durable; the bank's lock
                // stays held so its log lines keep the order of its indices.
                drop(recs);
                self.persist_bank(&key, &[line]);
            }
            Err(e) => tracing::warn!(error = %e, "bank entry refused"),
        }
    }

    /// Records feedback on completion `id` (a rating; for a correction rating 1 and the
    /// corrected answer) and rates its trajectory if it has one. Returns whether it has one.
    fn rate_trajectory(&self, id: &str, rating: f32, answer: Option<String>) -> bool {
        let mut recs = self.records.lock().unwrap_or_else(|p| p.into_inner());
        let Some(rec) = recs.1.get_mut(id) else {
            return false;
        };
        rec.feedback = Some((rating, answer.clone()));
        let Some(i) = rec.bank else { return false };
        let key = scope_key(&rec.caller);
        let mut banks = self.banks.lock().unwrap_or_else(|p| p.into_inner());
        if banks
            .get_mut(&key)
            .is_some_and(|b| b.rate(i, rating, answer.clone()))
        {
            drop(recs);
            self.persist_bank(&key, &[rate_line(i, rating, answer.as_deref())]);
        }
        true
    }

    /// Remembers a finished completion and, off the request path, adds its trajectory to the
    /// caller's bank (one embedding pass of its question through the engine); `kept`: the
    /// activations its generation kept, if any, for a rating of it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn record(
        self: &Arc<Self>,
        id: &str,
        caller: &str,
        question: &str,
        prompt: &[u32],
        answer: &[u32],
        adapter: Option<String>,
        kept: Option<Kept>,
    ) {
        if let Some(k) = kept {
            self.capture.keep(prompt, answer, k);
        }
        {
            let mut g = self.records.lock().unwrap_or_else(|p| p.into_inner());
            let (order, map) = &mut *g;
            if order.len() >= RECORDS {
                if let Some(old) = order.pop_front() {
                    map.remove(&old);
                }
            }
            order.push_back(id.to_owned());
            map.insert(
                id.to_owned(),
                Record {
                    caller: caller.to_owned(),
                    question: question.to_owned(),
                    prompt: prompt.to_vec(),
                    answer: answer.to_vec(),
                    adapter,
                    bank: None,
                    feedback: None,
                },
            );
        }
        if !self.all_trajectories || question.trim().is_empty() || answer.is_empty() {
            return;
        }
        let (me, id, question, answer) = (
            self.clone(),
            id.to_owned(),
            question.to_owned(),
            answer.to_vec(),
        );
        tokio::spawn(async move {
            let Ok(text) = me.tok.decode(&answer, false) else {
                return;
            };
            match me.embed(&question).await {
                // The log append waits for fsync: off the runtime's worker threads.
                Some(e) => {
                    let _ = tokio::task::spawn_blocking(move || {
                        me.add_trajectory(&id, &e, text.trim())
                    })
                    .await;
                }
                None => tracing::warn!(id, "trajectory not recorded: the embedding pass failed"),
            }
        });
    }

    /// The bank's embedding of `text` (as retrieval computes it), through the engine.
    async fn embed(&self, text: &str) -> Option<Vec<f32>> {
        // Background work: never refused for, nor counted in, the clients' queue.
        let mut r = Request::greedy(self.tok.encode(text, true, false), 1);
        r.embed = true;
        crate::api::await_embedding(self.engine.submit_background(r).ok()?, "input")
            .await
            .ok()
    }

    /// Where the caller's nearest successful trajectories (the 8 nearest bank entries rated
    /// above 0) send a request with `embedding` (see [`Bank::route`]).
    pub(crate) fn route(
        &self,
        caller: &str,
        embedding: &[f32],
    ) -> Option<ruvllm_sona::bank::Route> {
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
        Ok(o) if o.steps == 0 => tracing::debug!(
            scope = key,
            "background loop: a run of this scope is in progress; these events wait for the next"
        ),
        Ok(o) => tracing::info!(
            scope = key,
            loss_before = o.loss_before,
            loss_after = o.loss_after,
            version = o.version,
            persisted = o.persisted,
            ms = t.elapsed().as_secs_f64() * 1e3,
            "background loop"
        ),
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
                                Ok(c) => tracing::info!(
                                    scope = key,
                                    version = c.version,
                                    rank = c.rank,
                                    pruned = c.pruned,
                                    loss_before = c.loss_before,
                                    loss_after = c.loss_after,
                                    ms = t.elapsed().as_secs_f64() * 1e3,
                                    "deep loop"
                                ),
                                Err(e) => {
                                    tracing::warn!(scope = key, error = %e, "deep loop failed")
                                }
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

pub(crate) async fn feedback(
    State(st): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    // From here to the adapter's publication: the instant loop's latency as issue 6 defines it.
    let t_start = Instant::now();
    let run = async {
        let Some(learning) = st.learning.clone() else {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                Some("learning_disabled"),
                "this server runs with --no-learning",
            ));
        };
        let body = crate::api::parse_body(body)?;
        let id = body
            .get("id")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::invalid("id", "`id` (a completion id) is required"))?
            .to_owned();
        let correction = match body.get("correction") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(_) => {
                return Err(ApiError::invalid(
                    "correction",
                    "`correction` must be a non-empty string",
                ))
            }
        };
        let rating = match body.get("rating") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_f64() {
                Some(r) if (-1.0..=1.0).contains(&r) => Some(r),
                _ => {
                    return Err(ApiError::invalid(
                        "rating",
                        "`rating` must be a number in [-1, 1]",
                    ))
                }
            },
        };
        if correction.is_none() && rating.is_none() {
            return Err(ApiError::invalid(
                "correction",
                "send a `correction` or a `rating`",
            ));
        }
        let rec = {
            let g = learning.records.lock().unwrap_or_else(|p| p.into_inner());
            g.1.get(&id).filter(|r| r.caller == caller.0).cloned()
        };
        let Some(rec) = rec else {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("id"),
                Some("completion_not_found"),
                format!("no recent completion `{id}` of yours"),
            ));
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
            return Err(ApiError::invalid(
                "correction",
                "prompt and correction do not fit the context",
            ));
        }
        // What the completion's trajectory takes: rating 1 and the corrected answer, or the
        // rating; and the answer a new bank entry keeps (the corrected one, or the one a
        // positive rating confirms).
        let (rated, corrected) = match (&correction, rating) {
            (Some(text), _) => (1.0f32, Some(text.trim().to_owned())),
            (None, Some(r)) => (r as f32, None),
            (None, None) => unreachable!("checked above"),
        };
        let remembered = match &corrected {
            Some(text) => Some(text.clone()),
            None if rated != 0.0 => st
                .tok
                .decode(&rec.answer, false)
                .ok()
                .map(|t| t.trim().to_owned()),
            None => None,
        };
        let question = rec.question.clone();
        let scope = caller.0.clone();
        let l2 = learning.clone();
        let t0 = Instant::now();
        let out = tokio::task::spawn_blocking(move || {
            l2.learner.learn(&scope, &rec.prompt, &rec.answer, &fb)
        })
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                None,
                None,
                e.to_string(),
            )
        })?;
        let published_ms = t_start.elapsed().as_secs_f64() * 1e3;
        let o = match out {
            Ok(o) => o,
            Err(e @ LearnError::BadRating) => {
                return Err(ApiError::invalid("rating", e.to_string()))
            }
            Err(e) => {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    None,
                    None,
                    e.to_string(),
                ))
            }
        };
        if !o.updated {
            return Ok(Json(json!({"id": id, "updated": false})).into_response());
        }
        // The completion's trajectory takes the feedback; one not added yet (its embedding
        // pass still running, or `--sona-trajectories feedback`) is added here at once, so
        // that the next request can retrieve a confirmed or corrected answer and the caller's
        // adapter runs for its question (`--sona-apply near`).
        let (l2, id2) = (learning.clone(), id.clone());
        let has = tokio::task::spawn_blocking(move || l2.rate_trajectory(&id2, rated, corrected))
            .await
            .unwrap_or(false);
        if let Some(answer) = remembered.filter(|a| !has && !a.is_empty() && !question.is_empty()) {
            let emb = crate::api::embed_tokens(&st, st.tok.encode(&question, true, false)).await?;
            let (l2, id2) = (learning.clone(), id.clone());
            let _ =
                tokio::task::spawn_blocking(move || l2.add_trajectory(&id2, &emb, &answer)).await;
        }
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        tracing::info!(
            id,
            steps = o.steps,
            loss_before = o.loss_before,
            loss_after = o.loss_after,
            version = o.version,
            persisted = o.persisted,
            published_ms,
            ms,
            "feedback learned"
        );
        if o.background_due {
            // The background loop runs after this answer, off the request path.
            let (l3, scope) = (learning.clone(), caller.0.clone());
            tokio::task::spawn_blocking(move || log_background(&l3.learner, &scope_key(&scope)));
        }
        let ph = &o.phases;
        let phases = json!({"capture_ms": ph.capture_ms, "candidates_ms": ph.candidates_ms, "prepare_ms": ph.prepare_ms, "steps_ms": ph.steps_ms, "checks_ms": ph.checks_ms, "widen_ms": ph.widen_ms, "publish_ms": ph.publish_ms, "rounds": ph.rounds});
        Ok(Json(json!({"id": id, "updated": true, "steps": o.steps, "loss_before": o.loss_before, "loss_after": o.loss_after, "version": o.version, "persisted": o.persisted, "published_ms": published_ms, "ms": ms, "phases": phases, "follows": o.follows, "replays_follow": o.replays_follow, "superseded": o.superseded, "background_scheduled": o.background_due})).into_response())
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn traj(q: &str, rating: f32) -> Trajectory {
        Trajectory {
            prompt: q.into(),
            answer: format!("answer to {q}"),
            rating,
            scope: "k".into(),
            adapter: (rating > 0.5).then(|| "law".to_owned()),
        }
    }

    fn kept(rows: usize, fill: f32) -> Kept {
        Kept {
            from: 3,
            rows,
            logprobs: vec![fill; rows],
            cap: Capture {
                layer: 1,
                act: vec![fill; rows * 4],
                resid: vec![fill; rows * 2],
                down: vec![fill; rows * 2],
                last: Vec::new(),
            },
        }
    }

    /// The store finds rows by their exact tokens, keeps within its budget by dropping the
    /// oldest first, replaces an entry for the same tokens, and refuses one over the budget.
    #[test]
    fn kept_store_keeps_the_newest_within_its_budget() {
        let row = 4 * (4 + 2 + 2);
        let mut st = KeptStore {
            budget: 5 * row,
            ..KeptStore::default()
        };
        st.insert(vec![1, 2, 3], kept(2, 1.0));
        st.insert(vec![1, 2, 4], kept(2, 2.0));
        assert_eq!(st.bytes, 4 * row);
        assert_eq!(st.get(&[1, 2, 3]).map(|k| k.cap.act[0]), Some(1.0));
        assert!(st.get(&[1, 2]).is_none() && st.get(&[1, 2, 3, 4]).is_none());
        // A third entry pushes out the oldest.
        st.insert(vec![7], kept(2, 3.0));
        assert!(st.get(&[1, 2, 3]).is_none());
        assert_eq!(st.get(&[1, 2, 4]).map(|k| k.cap.act[0]), Some(2.0));
        assert_eq!(st.bytes, 4 * row);
        // The same tokens again: replaced, not counted twice.
        st.insert(vec![7], kept(3, 4.0));
        assert_eq!((st.bytes, st.map.len(), st.order.len()), (5 * row, 2, 2));
        assert_eq!(st.get(&[7]).map(|k| k.rows), Some(3));
        // Larger than the whole budget: not kept, nothing dropped.
        st.insert(vec![9], kept(6, 5.0));
        assert!(st.get(&[9]).is_none());
        assert_eq!(st.map.len(), 2);
        // A smaller budget drops the oldest.
        st.budget = 3 * row;
        st.shrink();
        assert_eq!((st.bytes, st.map.len()), (3 * row, 1));
        assert!(st.get(&[7]).is_some());
    }

    /// The log replays adds and ratings exactly; a torn last line (a crash mid-append) and
    /// anything after an unreadable line are cut off, and appends then follow the good lines.
    #[test]
    fn bank_log_replays_and_cuts_a_torn_tail() {
        let dir = std::env::temp_dir().join(format!("ruvllm-banklog-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(BANK_LOG);
        let (e0, e1) = (vec![1.0f32, 0.0, 0.0], vec![0.6f32, 0.8, 0.0]);
        append_lines(
            &path,
            &[
                add_line(&traj("q0", 0.0), &e0),
                add_line(&traj("q1", 1.0), &e1),
            ],
        )
        .unwrap();
        append_lines(&path, &[rate_line(0, 0.75, Some("fixed"))]).unwrap();
        let good_len = std::fs::metadata(&path).unwrap().len();
        let check = |b: &Bank| {
            assert_eq!(b.len(), 2);
            assert_eq!(
                b.get(0)
                    .map(|t| (t.rating, t.answer.as_str(), t.adapter.clone())),
                Some((0.75, "fixed", None))
            );
            assert_eq!(
                b.get(1)
                    .map(|t| (t.rating, t.prompt.as_str(), t.adapter.as_deref())),
                Some((1.0, "q1", Some("law")))
            );
            assert_eq!(b.vector(1), Some(&e1[..]));
        };
        let (b, cut) = load_bank_log(&path, 3, "k").unwrap();
        check(&b);
        assert_eq!(cut, None);
        // A torn append.
        std::fs::write(
            &path,
            [
                std::fs::read(&path).unwrap(),
                br#"{"op": "add", "question": "q2", "ans"#.to_vec(),
            ]
            .concat(),
        )
        .unwrap();
        let (b, cut) = load_bank_log(&path, 3, "k").unwrap();
        check(&b);
        assert!(cut.is_some() && std::fs::metadata(&path).unwrap().len() == good_len);
        // An unreadable line (a rating of an entry that does not exist) stops the replay there.
        append_lines(
            &path,
            &[rate_line(9, 1.0, None), add_line(&traj("q3", 1.0), &e0)],
        )
        .unwrap();
        let (b, cut) = load_bank_log(&path, 3, "k").unwrap();
        check(&b);
        assert!(cut.is_some());
        append_lines(&path, &[add_line(&traj("q4", 0.0), &e0)]).unwrap();
        assert_eq!(load_bank_log(&path, 3, "k").unwrap().0.len(), 3);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Session 5's whole-file bank (entries without "op") reads as adds.
    #[test]
    fn legacy_bank_json_reads_as_adds() {
        let v = json!({"format": 1, "entries": [{"question": "q", "answer": "a", "rating": 1.0, "adapter": null, "embedding": [0.0, 2.0]}]});
        let b = parse_legacy_bank(&v, 2, "k").unwrap();
        assert_eq!((b.len(), b.vector(0)), (1, Some(&[0.0f32, 1.0][..])));
        assert!(parse_legacy_bank(&json!({"entries": [{"question": "q"}]}), 2, "k").is_none());
    }

    /// The engine's capture source reports serving busy while a request runs and idle before
    /// and after it (what picks the learner's idle pool).
    #[test]
    fn engine_capture_reports_serving_busy_while_a_request_runs() {
        let Some(path) = ruvllm_model::registry::for_test("smollm2-135m") else {
            return;
        };
        let model = Arc::new(ruvllm_model::Model::load(&path).expect("model loads"));
        let tok = Arc::new(Tokenizer::from_gguf(model.gguf()).expect("tokenizer"));
        let pool = Arc::new(ThreadPool::new(1));
        let engine = Arc::new(
            Engine::start(
                model.clone(),
                tok,
                pool.clone(),
                ruvllm_engine::EngineConfig::new(&model.config, 64),
            )
            .expect("engine starts"),
        );
        let src = EngineCapture::new(engine.clone(), pool, 0);
        assert!(!src.serving_busy());
        let mut h = engine
            .submit(Request::greedy(vec![1, 2, 3, 4], 200))
            .expect("submitted");
        // The second token: the request is running. (Metrics are published at the end of each
        // step, after its tokens went out, so the first token can arrive before the step that
        // admitted the request is counted; the second comes after that publication.)
        let mut tokens = 0;
        while let Some(e) = h.next_blocking() {
            if matches!(e, Event::Token { .. }) {
                tokens += 1;
                if tokens == 2 {
                    break;
                }
            }
        }
        assert_eq!(tokens, 2);
        assert!(src.serving_busy());
        h.cancel();
        while h.next_blocking().is_some() {}
        let t = std::time::Instant::now();
        while src.serving_busy() && t.elapsed().as_secs() < 10 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!src.serving_busy());
    }
}
