//! The instant loop, shared by the server (`POST /v1/feedback`) and the chat REPL (`/good`,
//! `/bad`, `/fix`): each feedback event trains its scope's own adapter — rank 8 on the last
//! layer's down projection, exact gradients from one captured forward ([`crate::train`]) — and
//! publishes it with a new version; the scope's next requests run with it. Each new lesson is
//! trained together with the scope's three most recent earlier ones (replay), so it does not
//! overwrite them. One scope's feedback never changes another scope's outputs.
//!
//! Persistence ([`Learner::open`]): every published adapter is also written to
//! `DIR/scopes/<key>/` (PEFT `adapter_model.safetensors` + `adapter_config.json`, and
//! `state.json` with the version and the lessons as token ids), each file through a temporary
//! sibling, fsync and rename: a crash at any point leaves the last good files, and a restart
//! serves every scope with exactly the adapter it had. `<key>` is a SHA-256 prefix of the
//! scope's name (an API key, say), so names never reach the disk. Not persisted: Adam moments
//! (a restored scope's optimizer restarts).

use crate::train::{answer_targets, DownTrainer, Head};
use ruvllm_kernels::pool::ThreadPool;
use ruvllm_model::{Capture, LoraAdapter, Model, Proj};
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

/// Lessons a scope keeps.
const KEEP: usize = 16;

/// Generic text whose activations anchor every adapter (see [`LearnConfig::anchor_weight`]):
/// what the adapter must leave alone.
pub const ANCHOR_TEXT: &str = "The museum opens at nine in the morning and closes at five. Visitors can walk through rooms of old maps, \
clocks and paintings, and a small garden sits behind the main hall. In the winter the roads are icy, so most people take the train, \
which leaves every twenty minutes from the station near the river. def add(a, b):\n    return a + b\n\nQuestion: How many legs does a spider have? \
Answer: Eight. The recipe needs two cups of flour, one egg and a pinch of salt; mix them slowly and bake for half an hour.";

/// How feedback is learned.
#[derive(Debug, Clone, PartialEq)]
pub struct LearnConfig {
    /// Adam steps for a correction; a rating `r` takes `round(steps·|r|/3)`.
    pub steps: usize,
    /// Adam learning rate.
    pub lr: f32,
    /// Earlier lessons replayed with each new one (most recent first).
    pub replay: usize,
    /// Weight of the penalty on the adapter's output over [`ANCHOR_TEXT`]'s activations (0: none).
    ///
    /// A trade-off measured with `ruvllm sona-bench`, the chat REPL and the server tests: at
    /// 1.0, 36 corrections leave golden-text perplexity within 2% (at 0.01: +7.5% after 18;
    /// at 0: it explodes), but a single chat-format correction no longer converges in 30 steps
    /// (loss 4.18 → 4.09; at 0.01: → 0.14), and at 0.01 three near-identical facts (castle
    /// 1/2/3) interfere. Serving therefore defaults to 0 (corrections stick, general ability
    /// degrades as a scope accumulates many); the benchmark runs at 1.0. Open: a penalty that
    /// adapts to the number of lessons.
    pub anchor_weight: f32,
}

impl Default for LearnConfig {
    fn default() -> Self {
        LearnConfig { steps: 30, lr: 2e-2, replay: 3, anchor_weight: 0.0 }
    }
}

/// What a user said about an answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Feedback {
    /// The better answer, as token ids (ending with end-of-turn if the caller wants the model
    /// to stop after it): its likelihood is raised.
    Correction(Vec<u32>),
    /// A rating in [-1, 1] of the answer itself: positive raises its likelihood, negative
    /// lowers it (unlikelihood), with `round(10·|r|)` steps.
    Rating(f64),
}

/// What a feedback event did.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Whether the adapter changed (a rating of 0 or an empty answer changes nothing).
    pub updated: bool,
    /// Adam steps taken.
    pub steps: usize,
    /// Loss of the lesson before and after training (cross-entropy, or unlikelihood for a
    /// negative rating).
    pub loss_before: f32,
    /// See `loss_before`.
    pub loss_after: f32,
    /// The published adapter's version (0 for a scope's first).
    pub version: u64,
    /// Whether the new state was written to the learner's directory.
    pub persisted: bool,
}

/// Why a feedback event could not be learned.
#[derive(Debug, Clone, PartialEq)]
pub enum LearnError {
    /// The model's LM head is in a type this trainer cannot dequantize.
    HeadUnavailable,
    /// A rating outside [-1, 1] (or not a number).
    BadRating,
    /// The prompt is empty.
    EmptyPrompt,
}

impl std::fmt::Display for LearnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LearnError::HeadUnavailable => write!(f, "the model's LM head cannot be dequantized for training"),
            LearnError::BadRating => write!(f, "a rating must be a number in [-1, 1]"),
            LearnError::EmptyPrompt => write!(f, "the prompt is empty"),
        }
    }
}

impl std::error::Error for LearnError {}

/// A lesson: captured activations of prompt + answer, the rows to learn, and its sign.
struct Lesson {
    cap: Capture,
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

/// A scope's trainer and recent lessons.
struct Scope {
    trainer: DownTrainer,
    lessons: VecDeque<Lesson>,
}

/// What [`Learner::open`] found.
#[derive(Debug, Default)]
pub struct Restored {
    /// Scopes restored.
    pub scopes: usize,
    /// Problems met (a scope skipped, a partial write removed), one line each.
    pub warnings: Vec<String>,
}

/// Per-scope learning from feedback for one model.
pub struct Learner {
    model: Arc<Model>,
    head: OnceLock<Option<Arc<Head>>>,
    pool: Arc<ThreadPool>,
    /// Trainers by scope key.
    scopes: Mutex<HashMap<String, Scope>>,
    /// The adapters requests run with, by scope key.
    published: RwLock<HashMap<String, Arc<LoraAdapter>>>,
    /// Where learned state is persisted.
    dir: Option<PathBuf>,
    /// Lessons read back from `dir`, recaptured when their scope next learns.
    restored: Mutex<HashMap<String, Vec<StoredLesson>>>,
    cfg: LearnConfig,
    /// Token ids of the anchor text, and (computed once) their activations.
    anchor_tokens: Option<Vec<u32>>,
    anchor: OnceLock<Option<Arc<Vec<f32>>>>,
}

/// A stable, non-reversible key for a scope name: the first 128 bits of SHA-256, in hex.
pub fn scope_key(scope: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(scope.as_bytes())[..16].iter().map(|b| format!("{b:02x}")).collect()
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

impl Learner {
    /// A learner that keeps its state in memory only. Training runs on a pool of its own (one
    /// thread), so serving is not stalled.
    pub fn new(model: Arc<Model>) -> Learner {
        Learner {
            model,
            head: OnceLock::new(),
            pool: Arc::new(ThreadPool::new(1)),
            scopes: Mutex::default(),
            published: RwLock::default(),
            dir: None,
            restored: Mutex::default(),
            cfg: LearnConfig::default(),
            anchor_tokens: None,
            anchor: OnceLock::new(),
        }
    }

    /// Sets how feedback is learned and the anchor text's token ids (normally
    /// [`ANCHOR_TEXT`] encoded by the model's tokenizer); applies to scopes created afterwards.
    pub fn configure(&mut self, cfg: LearnConfig, anchor_tokens: Option<Vec<u32>>) {
        self.cfg = cfg;
        self.anchor_tokens = anchor_tokens;
        self.anchor = OnceLock::new();
    }

    /// A learner persisted under `dir` (created if missing): reads back every scope's adapter
    /// and lessons, removing temporary files that a crash mid-write left behind. A scope whose
    /// files cannot be read is skipped (and reported), never fatal.
    pub fn open(dir: &Path, model: Arc<Model>) -> std::io::Result<(Learner, Restored)> {
        let scopes_dir = dir.join("scopes");
        std::fs::create_dir_all(&scopes_dir)?;
        let mut report = Restored::default();
        let (mut published, mut restored) = (HashMap::new(), HashMap::new());
        for entry in std::fs::read_dir(&scopes_dir)?.flatten() {
            let path = entry.path();
            let Some(key) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else { continue };
            if !path.is_dir() || key.len() != 32 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
                continue;
            }
            let Ok(files) = std::fs::read_dir(&path) else {
                report.warnings.push(format!("scope {key}: directory unreadable; skipped"));
                continue;
            };
            for f in files.flatten() {
                if f.path().extension().is_some_and(|e| e == "tmp") {
                    report.warnings.push(format!("removed {} (a partial write left by a crash)", f.path().display()));
                    let _ = std::fs::remove_file(f.path());
                }
            }
            let state = std::fs::read(path.join("state.json")).ok().and_then(|b| serde_json::from_slice::<Value>(&b).ok()).and_then(|v| parse_state(&v));
            let Some((version, lessons)) = state else {
                report.warnings.push(format!("scope {key}: no readable state.json; skipped"));
                continue;
            };
            match LoraAdapter::load_peft(&path, &model, &format!("sona:{key}"), scope_id(&key), 1.0) {
                Ok(mut ad) => {
                    ad.version = version;
                    published.insert(key.clone(), Arc::new(ad));
                    restored.insert(key, lessons);
                }
                Err(e) => report.warnings.push(format!("scope {key}: adapter unreadable ({e}); skipped")),
            }
        }
        report.scopes = published.len();
        let mut l = Learner::new(model);
        l.dir = Some(dir.to_path_buf());
        l.published = RwLock::new(published);
        l.restored = Mutex::new(restored);
        Ok((l, report))
    }

    /// The adapter `scope`'s requests run with, if its feedback produced one.
    pub fn adapter_for(&self, scope: &str) -> Option<Arc<LoraAdapter>> {
        self.adapter_for_key(&scope_key(scope))
    }

    fn adapter_for_key(&self, key: &str) -> Option<Arc<LoraAdapter>> {
        self.published.read().unwrap_or_else(|p| p.into_inner()).get(key).cloned()
    }

    /// Learns one feedback event on `answer` to `prompt` for `scope` and publishes the new
    /// adapter (blocking; seconds on a small CPU, so callers run it off their serving threads).
    pub fn learn(&self, scope: &str, prompt: &[u32], answer: &[u32], feedback: &Feedback) -> Result<Outcome, LearnError> {
        if prompt.is_empty() {
            return Err(LearnError::EmptyPrompt);
        }
        let (answer, negative, steps) = match feedback {
            Feedback::Correction(a) => (a.as_slice(), false, self.cfg.steps),
            Feedback::Rating(r) if (-1.0..=1.0).contains(r) => (answer, *r < 0.0, (r.abs() * self.cfg.steps as f64 / 3.0).round() as usize),
            Feedback::Rating(_) => return Err(LearnError::BadRating),
        };
        let key = scope_key(scope);
        if answer.is_empty() || steps == 0 {
            let version = self.adapter_for_key(&key).map_or(0, |a| a.version);
            return Ok(Outcome { updated: false, steps: 0, loss_before: 0.0, loss_after: 0.0, version, persisted: false });
        }
        let tokens: Vec<u32> = prompt.iter().chain(answer).copied().collect();
        let targets = answer_targets(&tokens, prompt.len());
        let head = self.head.get_or_init(|| Head::new(&self.model).map(Arc::new)).clone().ok_or(LearnError::HeadUnavailable)?;
        let mut scopes = self.scopes.lock().unwrap_or_else(|p| p.into_inner());
        let sid = scope_id(&key);
        let last = self.model.config.n_layer - 1;
        let sc = match scopes.entry(key.clone()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let mut trainer = DownTrainer::new(self.model.clone(), head, self.pool.clone(), last, 8, 16.0, self.cfg.lr, sid).ok_or(LearnError::HeadUnavailable)?;
                if self.cfg.anchor_weight > 0.0 {
                    let acts = self.anchor.get_or_init(|| self.anchor_tokens.as_ref().and_then(|t| trainer.capture(t)).map(|c| Arc::new(c.act)));
                    if let Some(acts) = acts {
                        trainer.set_anchor(acts.clone(), self.cfg.anchor_weight);
                    }
                }
                // A scope restored from disk continues from its adapter and lessons.
                let mut lessons = VecDeque::new();
                if let Some(p) = self.adapter_for_key(&key).as_ref().and_then(|ad| ad.pair(last, Proj::Down).cloned()) {
                    trainer.set_params(p.a, p.b);
                }
                for s in self.restored.lock().unwrap_or_else(|p| p.into_inner()).remove(&key).unwrap_or_default() {
                    if let Some(cap) = trainer.capture(&s.tokens) {
                        let targets = answer_targets(&s.tokens, s.prompt_len);
                        lessons.push_back(Lesson { cap, targets, negative: s.negative, tokens: s.tokens, prompt_len: s.prompt_len });
                    }
                }
                v.insert(Scope { trainer, lessons })
            }
        };
        let cap = sc.trainer.capture(&tokens).ok_or(LearnError::HeadUnavailable)?;
        let new = Lesson { cap, targets, negative, tokens, prompt_len: prompt.len() };
        // The new lesson with the most recent earlier ones, so it does not overwrite them.
        let (loss_before, loss_after) = {
            let mut batch: Vec<(&Capture, &[Option<u32>], bool)> = vec![(&new.cap, &new.targets, new.negative)];
            batch.extend(sc.lessons.iter().take(self.cfg.replay).map(|l| (&l.cap, l.targets.as_slice(), l.negative)));
            let before = sc.trainer.loss_and_grads(&new.cap, &new.targets, new.negative).0;
            for _ in 0..steps {
                sc.trainer.step_batch(&batch);
            }
            (before, sc.trainer.loss_and_grads(&new.cap, &new.targets, new.negative).0)
        };
        sc.lessons.push_front(new);
        sc.lessons.truncate(KEEP);
        let version = self.adapter_for_key(&key).map_or(0, |a| a.version + 1);
        let ad = Arc::new(sc.trainer.adapter(&format!("sona:{key}"), sid, version));
        self.published.write().unwrap_or_else(|p| p.into_inner()).insert(key.clone(), ad.clone());
        let persisted = match &self.dir {
            None => false,
            Some(dir) => {
                let d = dir.join("scopes").join(&key);
                ad.save_peft(&d, &self.model).and_then(|()| ruvllm_model::write_atomic(&d.join("state.json"), state_json(version, &sc.lessons).to_string().as_bytes())).is_ok()
            }
        };
        Ok(Outcome { updated: true, steps, loss_before, loss_after, version, persisted })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_keys_are_stable_hex_and_hide_the_name() {
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
