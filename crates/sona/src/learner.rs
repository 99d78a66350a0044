//! SONA's three loops for one model, shared by the server (`POST /v1/feedback`) and the chat
//! REPL (`/good`, `/bad`, `/fix`). Every scope (an API key, a user) has its own adapter on the
//! last layer's down projection, made of two branches with one multiplier:
//!
//! - **instant loop** ([`Learner::learn`]): each feedback event trains the scope's rank-2
//!   *micro* branch on the new lesson and the three most recent earlier ones (replay), with the
//!   candidate-softmax trainer ([`crate::fast`]; milliseconds), and publishes the adapter with a
//!   new version; the scope's next request runs with it.
//! - **background loop** ([`Learner::background`], every `background_every` events or on a
//!   timer): trains the rank-8 *base* branch on every kept lesson (up to 16) with the micro
//!   branch held fixed, under an EWC++ penalty (online diagonal Fisher of the lessons and of
//!   generic text), so old lessons and general ability are kept.
//! - **deep loop** ([`Learner::consolidate`], `ruvllm sona consolidate`, or a timer): merges the
//!   micro branch into the base by a truncated SVD (pruning directions that carry nothing),
//!   resets the micro branch, and writes a snapshot that [`rollback`] can return to.
//!
//! One scope's feedback never changes another scope's outputs.
//!
//! Persistence ([`Learner::open`]): every published adapter is written as a version directory
//! `DIR/scopes/<key>/v<N>/` (PEFT `adapter_model.safetensors` + `adapter_config.json` of the
//! served adapter, `state.json` with the lessons as token ids and the branch ranks, and
//! `ewc.safetensors`): files are written into `v<N>.tmp/` and fsynced, the directory is
//! renamed, and only then does the `current` file (written atomically) point to it. A crash at
//! any point leaves the last good version current, and a restart serves every scope with
//! exactly the adapter it had. `<key>` is a SHA-256 prefix of the scope's name, so names never
//! reach the disk. The newest [`KEEP_VERSIONS`] versions and consolidated snapshots are kept.
//! Not persisted: Adam moments (a restored scope's optimizers restart).

use crate::fast::{
    mask_targets, target_logprobs, telling_rows, Candidates, Ewc, FastTrainer, FullFixed,
    Objective, Prepared, SAMPLE, TOP_K,
};
use crate::merge::merge;
use crate::train::{answer_targets, capture, tokens_hash, CaptureSource, Head, OptimizerState};
use ruvllm_kernels::ops::{logit_stats, max_f32, LogitStats};
use ruvllm_kernels::pool::ThreadPool;
use ruvllm_model::{head_logits, Capture, LoraAdapter, LoraPair, Model, Proj};
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Instant;

/// Milliseconds from `a` to `b`.
fn ms(a: Instant, b: Instant) -> f64 {
    b.duration_since(a).as_secs_f64() * 1e3
}

/// Lessons a scope keeps (what the background loop replays).
const KEEP: usize = 16;

/// Version directories kept per scope (consolidated snapshots are kept in addition, up to as
/// many again).
pub const KEEP_VERSIONS: usize = 8;

/// Training rounds of the instant loop at most: `steps`, then `steps / 3` each.
const ROUNDS: usize = 4;

/// Probability at which the full-vocabulary check makes a token a top candidate.
const CHECK_P: f64 = 1e-3;

/// The multiplier of both branches (`alpha / rank` = 2, as PEFT's default `alpha = 2r`).
const SCALE: f32 = 2.0;

/// The default [`LearnConfig::anchor_weight`]: about SmolLM2-135M's mean square of the residual
/// stream after its last layer on the anchor text (1,597), so that its penalty is what the
/// absolute `‖δ‖²` with weight 1 was before the penalty became relative (session 13); on
/// Gemma-3-270M it makes the effective weight ~3·10⁴ times SmolLM2's.
pub const ANCHOR_WEIGHT: f32 = 1600.0;

/// Generic text whose activations anchor the micro branch (see [`LearnConfig::anchor_weight`])
/// and whose Fisher information the background loop's EWC++ penalty includes: what learning
/// must leave alone.
pub const ANCHOR_TEXT: &str = "The museum opens at nine in the morning and closes at five. Visitors can walk through rooms of old maps, \
clocks and paintings, and a small garden sits behind the main hall. In the winter the roads are icy, so most people take the train, \
which leaves every twenty minutes from the station near the river. def add(a, b):\n    return a + b\n\nQuestion: How many legs does a spider have? \
Answer: Eight. The recipe needs two cups of flour, one egg and a pinch of salt; mix them slowly and bake for half an hour.";

/// How feedback is learned.
#[derive(Debug, Clone, PartialEq)]
pub struct LearnConfig {
    /// Adam steps of the instant loop for a correction; a rating `r` takes `round(steps·|r|/3)`.
    pub steps: usize,
    /// Adam learning rate of the instant loop.
    pub lr: f32,
    /// Adam learning rate of the background loop (its steps replay every kept lesson).
    pub background_lr: f32,
    /// Earlier lessons replayed with each new one by the instant loop (most recent first).
    pub replay: usize,
    /// A rating teaches at most this many of its answer's tokens (0: all): for a positive
    /// rating those that were least likely when served, for a negative one those that were
    /// most likely — where the objective's gradient is (served log-probabilities come with
    /// activations kept while generating; without them the base model's are used). The
    /// instant loop's cost grows with the rows it trains on, replays included: a rated
    /// 60-token answer took 0.7 s with every row, 0.2 s with 16 and 0.09 s with 8
    /// (`scripts/feedback_bench.py`). Corrections: [`corrected_rows`](Self::corrected_rows).
    pub rated_rows: usize,
    /// A correction teaches at most this many of its tokens (0, the default: all): those its
    /// base model finds least likely, where the correction departs from what the model would
    /// say and cross-entropy's gradient `1 − p` is largest. Faster for long corrections (44
    /// tokens: published p50 ~93 ms at 16 instead of ~150 ms), but the tokens left out are not
    /// protected: the adapter that raises a taught token can also raise it where an untaught
    /// one should follow. With 16, the 25-token `The password is marmalade seventeen and the
    /// door code is four four two one, written on the blue card.` came back re-asked as
    /// "armarmarmarm…" where teaching all 25 reproduced it exactly (session 13; with 8, a
    /// 13-token correction did the same). Off by default for that reason.
    pub corrected_rows: usize,
    /// Weight of the penalty on each branch's output over [`ANCHOR_TEXT`]'s activations
    /// (0: none), measured as the squared change it makes to the residual stream relative to
    /// that stream's mean square (see `Learner::anchor_gain`; default [`ANCHOR_WEIGHT`]),
    /// reached when a scope keeps its full 16 lessons: it grows with the lessons
    /// kept (`weight · (kept / 16)³`), because one lesson changes the model little and must
    /// stick (a chat correction stops converging at a constant 0.05), while many unchecked
    /// lessons wreck general ability (golden perplexity ×10⁷ after 36 at 0). Even small
    /// weights (~3) keep the last-layer adapter from telling near-identical prompts apart
    /// (castle 1/2/3, a known failure). See `docs/BENCHMARKS.md`.
    pub anchor_weight: f32,
    /// Leading principal directions of the anchor text's activations that the adapters' `A`
    /// is kept orthogonal to (see [`FastTrainer::set_blind`]; 0: none). Off by default: with
    /// 6, every lesson of the learner test converges, but the adapter drifts general text more
    /// (sona-bench `adapters-only` +13.5% perplexity vs +0.9%).
    pub blind_dirs: usize,
    /// Rank of the micro branch (the instant loop's).
    pub micro_rank: usize,
    /// Rank of the base branch (the background loop's).
    pub base_rank: usize,
    /// Feedback events between background runs that [`Outcome::background_due`] asks for
    /// (0: only on demand).
    pub background_every: usize,
    /// Adam steps of a background run.
    pub background_steps: usize,
    /// Weight λ of the EWC++ penalty `λ/2 · Σ F ⊙ (θ − θ*)²` (Fisher normalized to mean 1).
    pub ewc_lambda: f32,
    /// EWC++'s decay γ of the old Fisher at each update.
    pub ewc_gamma: f32,
    /// Threads of the learner's own pool (training steps, full-vocabulary checks). One by
    /// default: serving keeps the other cores.
    pub threads: usize,
    /// Threads the instant loop uses instead when serving is idle (no request running or
    /// waiting when a feedback event starts, as its capture source reports; always without a
    /// capture source, as in `ruvllm chat` and sona-bench): the lessons'
    /// gradients and checks are computed in parallel, one lesson per task, and summed in the
    /// same order, so the result is bit-identical to one thread's. 0 (the default): `threads`
    /// always. A request that arrives meanwhile shares the cores with the event (~0.1 s).
    pub idle_threads: usize,
}

impl Default for LearnConfig {
    fn default() -> Self {
        LearnConfig {
            steps: 30,
            lr: 2e-2,
            background_lr: 5e-3,
            replay: 3,
            rated_rows: 8,
            corrected_rows: 0,
            anchor_weight: ANCHOR_WEIGHT,
            blind_dirs: 0,
            micro_rank: 2,
            base_rank: 8,
            background_every: 4,
            background_steps: 30,
            ewc_lambda: 1.0,
            ewc_gamma: 0.9,
            threads: 1,
            idle_threads: 0,
        }
    }
}

/// What a user said about an answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Feedback {
    /// The better answer, as token ids (ending with end-of-turn if the caller wants the model
    /// to stop after it): its likelihood is raised.
    Correction(Vec<u32>),
    /// A rating in [-1, 1] of the answer itself: positive raises its likelihood, negative
    /// lowers it (unlikelihood), with `round(steps·|r|/3)` steps.
    Rating(f64),
}

/// What a feedback event (or a background or deep run) did.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Whether the adapter changed (a rating of 0 or an empty answer changes nothing).
    pub updated: bool,
    /// Adam steps taken.
    pub steps: usize,
    /// Loss of the lesson(s) before and after training (cross-entropy over the candidates, or
    /// unlikelihood for a negative rating).
    pub loss_before: f32,
    /// See `loss_before`.
    pub loss_after: f32,
    /// The published adapter's version.
    pub version: u64,
    /// Whether the new state was written to the learner's directory.
    pub persisted: bool,
    /// Whether the scope has had `background_every` events since its last background run
    /// (the caller should run [`Learner::background`], off its serving path).
    pub background_due: bool,
    /// Where an instant-loop event's time went (zero for other runs).
    pub phases: Phases,
    /// Instant-loop events: whether the update took, by the full-vocabulary check of the
    /// published adapter: for a correction or a positive rating, every token its row's most
    /// likely one given the tokens before it, by at least [`FOLLOW_MARGIN`] (the same request
    /// now reproduces it); for a negative rating, some taught token trails its row's best by
    /// that much (greedy decoding no longer reproduces the answer). False for other runs.
    pub follows: bool,
    /// Instant-loop events: whether the replayed earlier lessons are all still followed (true
    /// when none were replayed). False for other runs.
    pub replays_follow: bool,
    /// Instant-loop events: earlier lessons of the same prompt that this one replaced (those
    /// it contradicts or repeats: one right answer per prompt, the latest); 0 for other runs.
    pub superseded: usize,
}

/// Wall-clock milliseconds of an instant-loop event's phases, in the order they run: what a
/// latency budget is spent on (reported in feedback responses and `docs/BENCHMARKS.md`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Phases {
    /// The forward pass over prompt + answer (or the kept rows' LM head), with base logits.
    pub capture_ms: f64,
    /// The base model's candidates (top tokens and sample) of every taught row.
    pub candidates_ms: f64,
    /// Preparing the new lesson and any replay not prepared by an earlier event.
    pub prepare_ms: f64,
    /// The Adam steps of every round.
    pub steps_ms: f64,
    /// Full-vocabulary checks after each round (the adapter-independent logits included).
    pub checks_ms: f64,
    /// Widening lessons whose candidates grew.
    pub widen_ms: f64,
    /// Publishing the new adapter (and persisting it, with a learner directory).
    pub publish_ms: f64,
    /// Training rounds run.
    pub rounds: usize,
}

impl Outcome {
    /// An event or run that changed nothing: the scope's adapter stays at `version`.
    fn unchanged(version: u64) -> Outcome {
        Outcome {
            updated: false,
            steps: 0,
            loss_before: 0.0,
            loss_after: 0.0,
            version,
            persisted: false,
            background_due: false,
            phases: Phases::default(),
            follows: false,
            replays_follow: false,
            superseded: 0,
        }
    }
}

/// What [`Learner::consolidate`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct Consolidation {
    /// The snapshot's version.
    pub version: u64,
    /// Rank of the merged base branch.
    pub rank: usize,
    /// Directions pruned (singular values below 1e-3 of the largest).
    pub pruned: usize,
    /// Singular values of base + micro, descending.
    pub singular: Vec<f64>,
    /// Mean candidate loss of the kept lessons before and after the merge.
    pub loss_before: f32,
    /// See `loss_before`.
    pub loss_after: f32,
    /// Whether it was written to the learner's directory.
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
    /// The prompt and answer do not fit the model's context.
    TooLong,
    /// No such scope (nothing learned for it yet).
    UnknownScope,
    /// Training produced NaN or infinite parameters or loss; the scope's state is as it was
    /// before the event (nothing published, no lesson kept or replaced).
    Diverged,
}

impl std::fmt::Display for LearnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LearnError::HeadUnavailable => {
                write!(f, "the model's LM head cannot be dequantized for training")
            }
            LearnError::BadRating => write!(f, "a rating must be a number in [-1, 1]"),
            LearnError::EmptyPrompt => write!(f, "the prompt is empty"),
            LearnError::TooLong => {
                write!(f, "the prompt and answer do not fit the model's context")
            }
            LearnError::UnknownScope => write!(f, "no learned state for this scope"),
            LearnError::Diverged => write!(
                f,
                "training diverged (NaN or infinite values); the learned state is unchanged"
            ),
        }
    }
}

impl std::error::Error for LearnError {}

/// A lesson: captured activations of prompt + answer, its candidates, the rows to learn, and
/// its sign.
#[derive(Clone)]
struct Lesson {
    cap: Capture,
    cands: Candidates,
    targets: Vec<Option<u32>>,
    negative: bool,
    /// Prompt + answer (what is persisted; the capture is recomputed from it).
    tokens: Vec<u32>,
    prompt_len: usize,
    /// The positions whose targets it teaches, when not every answer row (a rating's).
    taught: Option<Vec<usize>>,
    /// What the instant loop last computed for it, reused while it is replayed.
    ready: Option<Ready>,
}

/// A lesson's preparation and adapter-independent logits ([`FullFixed`]) as the instant loop
/// last computed them, against the base branch of generation `base_gen`: both depend only on
/// the lesson's rows and candidates and on that branch, so the next events that replay the
/// lesson take them as they are (shared, not copied, with a background run's copy).
#[derive(Clone)]
struct Ready {
    base_gen: u64,
    prepared: Arc<Prepared>,
    fixed: Arc<FullFixed>,
}

/// Which answer rows a lesson teaches.
enum Teach {
    /// Every one.
    All,
    /// These positions (a restored lesson's).
    Rows(Vec<usize>),
    /// The `k` that tell its objective most ([`telling_rows`]): by the log-probabilities the
    /// tokens were served with when the source has them, else by the base model's.
    Telling(usize),
}

/// A lesson as stored in `state.json`.
#[derive(Debug, Clone, PartialEq)]
struct StoredLesson {
    tokens: Vec<u32>,
    prompt_len: usize,
    negative: bool,
    /// The positions whose targets it teaches (absent: every answer row).
    taught: Option<Vec<usize>>,
    /// Its top candidates as the full-vocabulary checks left them (widened past the base
    /// model's top ones; empty in snapshots written before they were kept).
    top: Vec<u32>,
}

/// A version's `state.json`.
#[derive(Debug, Clone, PartialEq)]
struct State {
    version: u64,
    kind: String,
    base_rank: usize,
    lessons: Vec<StoredLesson>,
    /// Feedback events since the last background run.
    since_background: usize,
}

/// A scope's two branches, its lessons and its progress.
struct Scope {
    base: FastTrainer,
    micro: FastTrainer,
    lessons: VecDeque<Lesson>,
    /// Feedback events since the last background run.
    since_background: usize,
    /// The anchor text's activations (shared by both branches' penalties).
    anchor_acts: Option<Arc<Vec<f32>>>,
    /// Bumped whenever the base branch is replaced (a background run installed, a
    /// consolidation): a background run trained on an older base is dropped.
    base_gen: u64,
    /// Bumped whenever a new lesson supersedes kept ones: a background run that snapshotted
    /// the lessons before is dropped (it would train the replaced answers into the base).
    lessons_gen: u64,
    /// A background run is training a copy of this scope (one at a time).
    background_running: bool,
}

/// What the full-vocabulary check found for one lesson.
#[derive(Debug, Default)]
struct Check {
    /// The exact mean loss of its targets.
    loss: f32,
    /// Tokens outside its top candidates that a row now gives a probability of at least
    /// [`CHECK_P`] (the sample only estimates their mass; these matter one by one).
    extra: Vec<u32>,
    /// Whether training may stop for this lesson: every target its row's most likely token by
    /// at least [`FOLLOW_MARGIN`] (for a negative lesson, no target its row's most likely).
    follows: bool,
    /// Whether the lesson took as [`Outcome::follows`] reports it: `follows` for a positive
    /// lesson; for a negative one, some target trails its row's best by [`FOLLOW_MARGIN`].
    took: bool,
}

/// How far (in logits, i.e. nats) a lesson's target must lead every other token of its row —
/// or, for a negative lesson, trail the row's best — for the check to say greedy decoding
/// follows it. The check computes logits from exact f32 hidden states, while serving
/// multiplies the LM head with 8-bit quantized ones: near-ties can go the other way there
/// (castle 3's digit: the check's argmax by 0.02, the served argmax another digit by 0.04),
/// so a lesson counts as followed only with a lead well beyond that rounding.
pub const FOLLOW_MARGIN: f32 = 0.25;

/// The lead of `target` over the best other logit of `lg` (negative when it is not the
/// argmax); for a `negative` lesson, the best logit's lead over the target's instead.
/// `lg` is restored before returning.
fn follow_margin(lg: &mut [f32], stats: &LogitStats, target: usize, negative: bool) -> f32 {
    let t = lg[target];
    if negative || stats.argmax != target {
        let lead = stats.max - t;
        return if negative { lead } else { -lead };
    }
    lg[target] = f32::NEG_INFINITY;
    let second = max_f32(lg);
    lg[target] = t;
    t - second
}

/// Judges lesson `l` (prepared as `p`) from its rows' full-vocabulary logits, which
/// `row_logits(ri, out)` writes row by row (`n_vocab` values).
fn judge(
    l: &Lesson,
    p: &Prepared,
    nv: usize,
    mut row_logits: impl FnMut(usize, &mut [f32]),
) -> Check {
    let top = &l.cands.ids[..l.cands.n_top];
    let (mut loss, mut extra, mut follows, mut displaced) = (0f64, Vec::new(), true, false);
    let mut lg = vec![0f32; nv];
    for (ri, &row) in p.rows().iter().enumerate() {
        let Some(target) = l.targets.get(row).copied().flatten() else {
            continue;
        };
        row_logits(ri, &mut lg);
        let stats = logit_stats(&lg);
        let nll = stats.lse - lg[target as usize] as f64;
        loss += if l.negative {
            -(1.0 - (-nll).exp()).max(1e-6).ln()
        } else {
            nll
        };
        // p(v) ≥ CHECK_P ⇔ logit(v) ≥ ln Z + ln CHECK_P.
        let bar = (stats.lse + CHECK_P.ln()) as f32;
        // Blocks of 64 logits with none at the bar are skipped in one vector compare.
        for (c, block) in lg.chunks(64).enumerate() {
            if block.iter().fold(false, |any, &x| any | (x >= bar)) {
                extra.extend(
                    (c * 64..c * 64 + block.len())
                        .map(|v| v as u32)
                        .filter(|&v| lg[v as usize] >= bar && top.binary_search(&v).is_err()),
                );
            }
        }
        let margin = follow_margin(&mut lg, &stats, target as usize, l.negative);
        if l.negative {
            follows &= stats.argmax != target as usize;
            displaced |= margin >= FOLLOW_MARGIN;
        } else {
            follows &= margin >= FOLLOW_MARGIN;
        }
    }
    extra.sort_unstable();
    extra.dedup();
    Check {
        loss: (loss / p.n_rows().max(1) as f64) as f32,
        extra,
        follows,
        took: if l.negative { displaced } else { follows },
    }
}

/// Whether lesson `new` replaces the kept lesson `old`: both answer the same prompt and `new`
/// contradicts or repeats it. One right answer per prompt: a positive lesson (correction or
/// positive rating) replaces every positive one (a repeat only when it teaches at least the
/// same rows) and a negative one of its own answer; a negative lesson replaces the positive
/// and negative ones of its own answer. Negative lessons of other answers stay (ruling out
/// several wrong answers is consistent with one right one).
fn supersedes(new: &Lesson, old: &Lesson) -> bool {
    let p = new.prompt_len;
    if old.prompt_len != p || old.tokens.get(..p) != new.tokens.get(..p) {
        return false;
    }
    let same_answer = old.tokens.get(p..) == new.tokens.get(p..);
    match (new.negative, old.negative) {
        (false, false) => !same_answer || new.taught.is_none() || old.taught.is_some(),
        _ => same_answer,
    }
}

/// A scope's key and its shared state.
type ScopeRef = (String, Arc<Mutex<Scope>>);

/// A scope restored from disk, built into a [`Scope`] when it next learns.
struct RestoredScope {
    pair: LoraPair,
    base_rank: usize,
    lessons: Vec<StoredLesson>,
    ewc: Option<Ewc>,
    optim: Option<(OptimizerState, OptimizerState)>,
    since_background: usize,
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
    /// Each scope's trainers, by scope key (one lock per scope, so a background run of one
    /// scope does not hold up another's feedback).
    scopes: Mutex<HashMap<String, Arc<Mutex<Scope>>>>,
    /// The adapters requests run with, by scope key.
    published: RwLock<HashMap<String, Arc<LoraAdapter>>>,
    /// Where learned state is persisted.
    dir: Option<PathBuf>,
    /// Scopes read back from `dir`, built (lessons recaptured) when they next learn.
    restored: Mutex<HashMap<String, RestoredScope>>,
    cfg: LearnConfig,
    /// Token ids of the anchor text, and (computed once) its lesson.
    anchor_tokens: Option<Vec<u32>>,
    anchor: OnceLock<Option<Arc<Lesson>>>,
    /// [`Learner::anchor_gain`], computed with the anchor lesson.
    anchor_gain: OnceLock<f32>,
    /// Where lessons' activations come from (the learner's own forward pass when `None`).
    source: Option<Arc<dyn CaptureSource>>,
    /// The pool of [`LearnConfig::idle_threads`], when it is larger than `pool`'s.
    idle_pool: Option<Arc<ThreadPool>>,
    /// Instant-loop events in progress: a background run waits between its steps while any
    /// is (they would otherwise share the cores, and the event's latency is what a user waits
    /// for; the run's result does not depend on when its steps run).
    instant_events: Arc<AtomicUsize>,
}

/// Counts an instant-loop event in progress for as long as it lives.
struct InstantEvent(Arc<AtomicUsize>);

impl InstantEvent {
    fn start(count: &Arc<AtomicUsize>) -> InstantEvent {
        count.fetch_add(1, Ordering::SeqCst);
        InstantEvent(count.clone())
    }
}

impl Drop for InstantEvent {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A stable, non-reversible key for a scope name: the first 128 bits of SHA-256, in hex.
pub fn scope_key(scope: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(scope.as_bytes())[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether `key` looks like a [`scope_key`].
fn is_key(key: &str) -> bool {
    key.len() == 32 && key.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Every scope directory under `DIR/scopes` (named by a [`scope_key`]), as (key, path).
pub fn scope_dirs(dir: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    Ok(std::fs::read_dir(dir.join("scopes"))?
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.to_owned(), e.path())))
        .filter(|(key, path)| is_key(key) && path.is_dir())
        .collect())
}

/// The adapter id (and trainer seed) of a scope key.
fn scope_id(key: &str) -> u64 {
    u64::from_str_radix(key.get(..16).unwrap_or("0"), 16).unwrap_or(0)
}

fn state_json(version: u64, kind: &str, sc: &Scope) -> Value {
    let ls: Vec<Value> = sc.lessons.iter().map(|l| json!({"tokens": l.tokens, "prompt_len": l.prompt_len, "negative": l.negative, "taught": l.taught, "top": &l.cands.ids[..l.cands.n_top]})).collect();
    json!({"format": 2, "version": version, "kind": kind, "base_rank": sc.base.rank(), "lessons": ls, "since_background": sc.since_background})
}

fn u32_list(v: &Value) -> Option<Vec<u32>> {
    v.as_array()?
        .iter()
        .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
        .collect()
}

/// Parses a `state.json` (`top` and `since_background` are optional: older snapshots lack them).
fn parse_state(v: &Value) -> Option<State> {
    let version = v.get("version")?.as_u64()?;
    let kind = v.get("kind")?.as_str()?.to_owned();
    let base_rank = usize::try_from(v.get("base_rank")?.as_u64()?).ok()?;
    let mut lessons = Vec::new();
    for l in v.get("lessons")?.as_array()? {
        let tokens = u32_list(l.get("tokens")?)?;
        let prompt_len = usize::try_from(l.get("prompt_len")?.as_u64()?).ok()?;
        if prompt_len == 0 || prompt_len >= tokens.len() {
            return None;
        }
        let top = match l.get("top") {
            None => Vec::new(),
            Some(t) => u32_list(t)?,
        };
        let taught = match l.get("taught") {
            None | Some(Value::Null) => None,
            Some(t) => Some(u32_list(t)?.into_iter().map(|x| x as usize).collect()),
        };
        lessons.push(StoredLesson {
            tokens,
            prompt_len,
            negative: l.get("negative")?.as_bool()?,
            taught,
            top,
        });
    }
    let since_background = match v.get("since_background") {
        None => 0,
        Some(n) => usize::try_from(n.as_u64()?).ok()?,
    };
    Some(State {
        version,
        kind,
        base_rank,
        lessons,
        since_background,
    })
}

/// Named 1-D F32 tensors (and string metadata) as one safetensors file.
fn f32_safetensors(
    tensors: &[(String, &[f32])],
    meta: Option<HashMap<String, String>>,
) -> Option<Vec<u8>> {
    use safetensors::tensor::TensorView;
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, v)| v.iter().flat_map(|f| f.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, _), d)| {
            TensorView::new(safetensors::Dtype::F32, vec![d.len() / 4], d).map(|v| (n.clone(), v))
        })
        .collect::<Result<_, _>>()
        .ok()?;
    safetensors::serialize(views, meta).ok()
}

/// Tensor `name` of a safetensors file, when it is F32.
fn f32_tensor(st: &safetensors::SafeTensors<'_>, name: &str) -> Option<Vec<f32>> {
    let t = st.tensor(name).ok()?;
    (t.dtype() == safetensors::Dtype::F32).then(|| {
        t.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    })
}

/// Both branches' Adam states as one safetensors file (moments as F32 tensors `base.m_a` …,
/// step counts in the metadata).
fn optim_bytes(base: &OptimizerState, micro: &OptimizerState) -> Option<Vec<u8>> {
    let mut tensors: Vec<(String, &[f32])> = Vec::new();
    for (branch, o) in [("base", base), ("micro", micro)] {
        for (n, v) in [
            ("m_a", &o.m_a),
            ("m_b", &o.m_b),
            ("v_a", &o.v_a),
            ("v_b", &o.v_b),
        ] {
            tensors.push((format!("{branch}.{n}"), v));
        }
    }
    let meta: HashMap<String, String> = [
        ("base.t".to_owned(), base.t.to_string()),
        ("micro.t".to_owned(), micro.t.to_string()),
    ]
    .into();
    f32_safetensors(&tensors, Some(meta))
}

fn parse_optim(bytes: &[u8]) -> Option<(OptimizerState, OptimizerState)> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).ok()?;
    let meta = meta.metadata().clone()?;
    let st = safetensors::SafeTensors::deserialize(bytes).ok()?;
    let branch = |b: &str| -> Option<OptimizerState> {
        let get = |n: &str| f32_tensor(&st, &format!("{b}.{n}"));
        Some(OptimizerState {
            t: meta.get(&format!("{b}.t"))?.parse().ok()?,
            m_a: get("m_a")?,
            m_b: get("m_b")?,
            v_a: get("v_a")?,
            v_b: get("v_b")?,
        })
    };
    Some((branch("base")?, branch("micro")?))
}

fn ewc_bytes(e: &Ewc) -> Option<Vec<u8>> {
    let tensors: Vec<(String, &[f32])> = [
        ("fisher_a", &e.fisher_a),
        ("fisher_b", &e.fisher_b),
        ("star_a", &e.star_a),
        ("star_b", &e.star_b),
    ]
    .into_iter()
    .map(|(n, v)| (n.to_owned(), v.as_slice()))
    .collect();
    f32_safetensors(&tensors, None)
}

fn parse_ewc(bytes: &[u8]) -> Option<Ewc> {
    let st = safetensors::SafeTensors::deserialize(bytes).ok()?;
    let get = |n: &str| f32_tensor(&st, n);
    Some(Ewc {
        fisher_a: get("fisher_a")?,
        fisher_b: get("fisher_b")?,
        star_a: get("star_a")?,
        star_b: get("star_b")?,
    })
}

/// The version directories (`v<N>`) of a scope directory, ascending.
fn versions(scope_dir: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = std::fs::read_dir(scope_dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().is_dir())
                .filter_map(|e| {
                    e.file_name()
                        .to_str()
                        .and_then(|n| n.strip_prefix('v'))
                        .and_then(|n| n.parse().ok())
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v
}

/// The version `current` names, if readable.
fn current_version(scope_dir: &Path) -> Option<u64> {
    std::fs::read_to_string(scope_dir.join("current"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// One version of a scope as read from disk.
struct VersionFiles {
    adapter: LoraAdapter,
    state: State,
    ewc: Option<Ewc>,
    /// (base, micro) Adam states; None in snapshots written before they were kept.
    optim: Option<(OptimizerState, OptimizerState)>,
}

fn read_version(dir: &Path, model: &Model, key: &str) -> Result<VersionFiles, String> {
    let state = std::fs::read(dir.join("state.json")).map_err(|e| format!("state.json: {e}"))?;
    let state = serde_json::from_slice::<Value>(&state)
        .ok()
        .and_then(|v| parse_state(&v))
        .ok_or("state.json unreadable")?;
    let mut adapter =
        LoraAdapter::load_peft(dir, model, &format!("sona:{key}"), scope_id(key), 1.0)
            .map_err(|e| e.to_string())?;
    adapter.version = state.version;
    let ewc = match std::fs::read(dir.join("ewc.safetensors")) {
        Ok(b) => Some(parse_ewc(&b).ok_or("ewc.safetensors unreadable")?),
        Err(_) => None,
    };
    let optim = match std::fs::read(dir.join("optim.safetensors")) {
        Ok(b) => Some(parse_optim(&b).ok_or("optim.safetensors unreadable")?),
        Err(_) => None,
    };
    Ok(VersionFiles {
        adapter,
        state,
        ewc,
        optim,
    })
}

/// Points every scope under `dir` (or only `scope`'s) back to an earlier version: `to`, or the
/// newest one before the current. The server must be restarted to serve it (it reads `current`
/// at start-up); learning then continues with a version number above every existing one.
/// Returns `(scope key, from, to)` for each scope changed.
pub fn rollback(
    dir: &Path,
    scope: Option<&str>,
    to: Option<u64>,
) -> std::io::Result<Vec<(String, u64, u64)>> {
    let mut out = Vec::new();
    let want = scope.map(scope_key);
    for (key, sd) in scope_dirs(dir)? {
        if want.as_ref().is_some_and(|w| *w != key) {
            continue;
        }
        let Some(cur) = current_version(&sd) else {
            continue;
        };
        let vs = versions(&sd);
        let target = match to {
            Some(t) if vs.contains(&t) => t,
            Some(t) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("scope {key} has no version {t} (kept: {vs:?})"),
                ))
            }
            None => match vs.iter().rev().find(|&&v| v < cur) {
                Some(&v) => v,
                None => continue,
            },
        };
        ruvllm_model::write_atomic(&sd.join("current"), format!("{target}\n").as_bytes())
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        out.push((key, cur, target));
    }
    Ok(out)
}

/// One kept version of a scope, as `ruvllm sona status` lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionInfo {
    /// Its number.
    pub version: u64,
    /// `instant`, `background` or `consolidated` (`unreadable` if its state is).
    pub kind: String,
    /// Lessons it keeps.
    pub lessons: usize,
}

/// A scope's kept versions and which one is current.
#[derive(Debug, Clone, PartialEq)]
pub struct ScopeHistory {
    /// The scope key.
    pub key: String,
    /// The version `current` names.
    pub current: Option<u64>,
    /// Kept versions, ascending.
    pub versions: Vec<VersionInfo>,
}

/// Every scope under `dir` with its kept versions: what `ruvllm sona status` prints.
pub fn list_versions(dir: &Path) -> std::io::Result<Vec<ScopeHistory>> {
    let mut out = Vec::new();
    for (key, sd) in scope_dirs(dir)? {
        let versions = versions(&sd)
            .into_iter()
            .map(|version| {
                let st = std::fs::read(sd.join(format!("v{version}")).join("state.json"))
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                    .and_then(|s| parse_state(&s));
                VersionInfo {
                    version,
                    kind: st
                        .as_ref()
                        .map_or("unreadable".to_owned(), |s| s.kind.clone()),
                    lessons: st.map_or(0, |s| s.lessons.len()),
                }
            })
            .collect();
        out.push(ScopeHistory {
            current: current_version(&sd),
            key,
            versions,
        });
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

/// Joins the two branches (same multiplier) into the one pair the forward pass runs:
/// `A = [A_base; A_micro]`, `B = [B_base | B_micro]`.
fn combined(base: &FastTrainer, micro: &FastTrainer) -> LoraPair {
    let (ba, bb) = base.params();
    let (ma, mb) = micro.params();
    let (rb, rm) = (base.rank(), micro.rank());
    let d = bb.len() / rb;
    let a: Vec<f32> = ba.iter().chain(ma).copied().collect();
    let mut b = Vec::with_capacity(d * (rb + rm));
    for j in 0..d {
        b.extend_from_slice(&bb[j * rb..(j + 1) * rb]);
        b.extend_from_slice(&mb[j * rm..(j + 1) * rm]);
    }
    LoraPair {
        rank: rb + rm,
        a,
        b,
        scale: SCALE,
    }
}

/// A branch's `(A, B)`.
type Factors = (Vec<f32>, Vec<f32>);

/// The first `r0` ranks of `pair` and the rest.
fn split(pair: &LoraPair, r0: usize) -> Option<(Factors, Factors)> {
    let r = pair.rank;
    if r0 > r || r == 0 {
        return None;
    }
    let inp = pair.a.len() / r;
    let d = pair.b.len() / r;
    let a0 = pair.a[..r0 * inp].to_vec();
    let a1 = pair.a[r0 * inp..].to_vec();
    let b0 = (0..d)
        .flat_map(|j| pair.b[j * r..j * r + r0].iter().copied())
        .collect();
    let b1 = (0..d)
        .flat_map(|j| pair.b[j * r + r0..(j + 1) * r].iter().copied())
        .collect();
    Some(((a0, b0), (a1, b1)))
}

impl Lesson {
    fn objective(&self) -> Objective {
        if self.negative {
            Objective::Unlikely
        } else {
            Objective::Likely
        }
    }

    fn prepare(&self, t: &FastTrainer, objective: Objective, fixed: &FastTrainer) -> Prepared {
        t.prepare(
            &self.cap,
            &self.targets,
            &self.cands,
            objective,
            Some(fixed.branch()),
        )
    }

    /// `old`, this lesson's preparation before its candidates widened, for the widened ones:
    /// only the new candidates computed ([`FastTrainer::widen`]), or prepared from scratch.
    fn widened(&self, t: &FastTrainer, old: &Prepared, fixed: &FastTrainer) -> Prepared {
        t.widen(old, &self.cands)
            .unwrap_or_else(|| self.prepare(t, self.objective(), fixed))
    }
}

/// Marks a scope's background run finished when dropped.
struct Running<'a>(&'a Mutex<Scope>);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .background_running = false;
    }
}

/// `sc`'s kept lessons prepared for its base branch, the micro branch held fixed.
fn base_batch(sc: &Scope) -> Vec<Prepared> {
    sc.lessons
        .iter()
        .map(|l| l.prepare(&sc.base, l.objective(), &sc.micro))
        .collect()
}

/// The mean of `t`'s objective over `batch`.
fn mean_loss(t: &FastTrainer, batch: &[Prepared]) -> f32 {
    batch.iter().map(|p| t.loss_and_grads(p).0).sum::<f32>() / batch.len().max(1) as f32
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
            anchor_gain: OnceLock::new(),
            source: None,
            idle_pool: None,
            instant_events: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Sets how feedback is learned and the anchor text's token ids (normally
    /// [`ANCHOR_TEXT`] encoded by the model's tokenizer); applies to scopes created afterwards.
    pub fn configure(&mut self, cfg: LearnConfig, anchor_tokens: Option<Vec<u32>>) {
        if cfg.threads.max(1) != self.pool.n_threads() {
            self.pool = Arc::new(ThreadPool::new(cfg.threads.max(1)));
        }
        self.idle_pool = match &self.idle_pool {
            _ if cfg.idle_threads <= cfg.threads.max(1) => None,
            Some(p) if p.n_threads() == cfg.idle_threads => Some(p.clone()),
            _ => Some(Arc::new(ThreadPool::new(cfg.idle_threads))),
        };
        self.cfg = cfg;
        self.anchor_tokens = anchor_tokens;
        self.anchor = OnceLock::new();
        self.anchor_gain = OnceLock::new();
    }

    /// Takes lessons' activations from `source` (a server's engine) instead of the learner's
    /// own forward pass; the results are identical (`engine` tests), only cheaper.
    pub fn set_capture_source(&mut self, source: Option<Arc<dyn CaptureSource>>) {
        self.source = source;
    }

    /// The pool training runs on (set by [`configure`](Self::configure)).
    pub fn pool(&self) -> Arc<ThreadPool> {
        self.pool.clone()
    }

    /// How feedback is learned.
    pub fn config(&self) -> &LearnConfig {
        &self.cfg
    }

    /// A learner persisted under `dir` (created if missing): reads back every scope's current
    /// version, removing what a crash mid-write left behind. A version that cannot be read
    /// falls back to the newest older one that can; a scope with none is skipped (and
    /// reported), never fatal.
    pub fn open(dir: &Path, model: Arc<Model>) -> std::io::Result<(Learner, Restored)> {
        std::fs::create_dir_all(dir.join("scopes"))?;
        let mut report = Restored::default();
        let (mut published, mut restored) = (HashMap::new(), HashMap::new());
        for (key, sd) in scope_dirs(dir)? {
            let Ok(files) = std::fs::read_dir(&sd) else {
                report
                    .warnings
                    .push(format!("scope {key}: directory unreadable; skipped"));
                continue;
            };
            for f in files.flatten() {
                let p = f.path();
                if p.extension().is_some_and(|e| e == "tmp") {
                    report.warnings.push(format!(
                        "removed {} (a partial write left by a crash)",
                        p.display()
                    ));
                    let _ = if p.is_dir() {
                        std::fs::remove_dir_all(&p)
                    } else {
                        std::fs::remove_file(&p)
                    };
                }
            }
            let vs = versions(&sd);
            let cur = current_version(&sd);
            // The current version first, then older ones, newest first.
            let order: Vec<u64> = cur
                .into_iter()
                .chain(
                    vs.iter()
                        .rev()
                        .copied()
                        .filter(|v| cur.is_none_or(|c| *v < c)),
                )
                .collect();
            let mut found = None;
            for v in order {
                match read_version(&sd.join(format!("v{v}")), &model, &key) {
                    Ok(files) => {
                        found = Some(files);
                        break;
                    }
                    Err(e) => report.warnings.push(format!(
                        "scope {key}: version {v} unreadable ({e}); trying an older one"
                    )),
                }
            }
            let Some(files) = found else {
                report
                    .warnings
                    .push(format!("scope {key}: no readable version; skipped"));
                continue;
            };
            let Some(pair) = files
                .adapter
                .pair(model.config.n_layer - 1, Proj::Down)
                .cloned()
            else {
                report.warnings.push(format!(
                    "scope {key}: adapter has no last-layer down projection; skipped"
                ));
                continue;
            };
            restored.insert(
                key.clone(),
                RestoredScope {
                    pair,
                    base_rank: files.state.base_rank,
                    lessons: files.state.lessons,
                    ewc: files.ewc,
                    optim: files.optim,
                    since_background: files.state.since_background,
                },
            );
            published.insert(key, Arc::new(files.adapter));
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
        self.published
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }

    /// Keys of every scope with a published adapter.
    pub fn scope_keys(&self) -> Vec<String> {
        let mut k: Vec<String> = self
            .published
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        k.sort();
        k
    }

    /// Keys of the scopes in memory for which `pred` holds (each scope locked in turn).
    fn scopes_where(&self, pred: impl Fn(&Scope) -> bool) -> Vec<String> {
        let scopes: Vec<ScopeRef> = self
            .scopes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        scopes
            .into_iter()
            .filter(|(_, s)| pred(&s.lock().unwrap_or_else(|p| p.into_inner())))
            .map(|(k, _)| k)
            .collect()
    }

    /// Keys of the scopes with feedback since their last background run.
    pub fn background_pending(&self) -> Vec<String> {
        self.scopes_where(|s| s.since_background > 0)
    }

    /// Keys of the scopes whose micro-adapter holds something to consolidate (those touched
    /// since start-up or their last consolidation).
    pub fn consolidation_pending(&self) -> Vec<String> {
        self.scopes_where(|s| s.micro.params().1.iter().any(|&x| x != 0.0))
    }

    fn head(&self) -> Result<Arc<Head>, LearnError> {
        self.head
            .get_or_init(|| Head::new(&self.model).map(Arc::new))
            .clone()
            .ok_or(LearnError::HeadUnavailable)
    }

    /// Captures `tokens` (prompt of `prompt_len` + answer) at the last layer, with the base
    /// model's candidates for every answer row it teaches (see [`Teach`]); adds the capture's
    /// and the candidates' times to `phases`.
    fn lesson(
        &self,
        pool: &ThreadPool,
        tokens: Vec<u32>,
        prompt_len: usize,
        negative: bool,
        teach: Teach,
        phases: &mut Phases,
    ) -> Option<Lesson> {
        let t0 = Instant::now();
        let c = &self.model.config;
        let first = prompt_len.saturating_sub(1);
        let mut targets = answer_targets(&tokens, prompt_len);
        let telling = match teach {
            Teach::Telling(k) => Some(k),
            _ => None,
        };
        // Rows picked by served log-probabilities need logits for those rows only.
        let mut taught = match teach {
            Teach::All => None,
            Teach::Rows(r) => Some(r),
            Teach::Telling(k) => self
                .source
                .as_ref()
                .and_then(|s| s.served_logprobs(&tokens, first))
                .map(|lps| {
                    let scored: Vec<(usize, f32)> = lps
                        .iter()
                        .enumerate()
                        .map(|(j, &lp)| (first + j, lp))
                        .filter(|&(t, _)| targets.get(t).is_some_and(Option::is_some))
                        .collect();
                    telling_rows(&scored, k, negative)
                }),
        };
        // A source that cannot run the tokens (a full queue, shutting down) leaves it to the
        // learner's own pass.
        let from_source = self
            .source
            .as_ref()
            .and_then(|s| s.capture(c.n_layer - 1, &tokens, first, taught.as_deref()));
        let (cap, logits) = match from_source {
            Some(x) => x,
            None => capture(&self.model, &self.pool, c.n_layer - 1, &tokens, Some(first))?,
        };
        if let (Some(k), None) = (telling, &taught) {
            taught = Some(telling_rows(
                &target_logprobs(&logits, c.n_vocab, &targets, first),
                k,
                negative,
            ));
        }
        if let Some(t) = &taught {
            mask_targets(&mut targets, t);
        }
        let t1 = Instant::now();
        phases.capture_ms += ms(t0, t1);
        // The sample's seed comes from the tokens, so a lesson's objective is reproducible.
        let seed = tokens_hash(&tokens);
        let cands = Candidates::from_logits(
            Some(pool),
            &logits,
            c.n_vocab,
            &targets,
            first,
            TOP_K,
            SAMPLE,
            seed,
        );
        phases.candidates_ms += ms(t1, Instant::now());
        Some(Lesson {
            cap,
            cands,
            targets,
            negative,
            tokens,
            prompt_len,
            taught,
            ready: None,
        })
    }

    /// The anchor text as a lesson (every token predicts the next), computed once.
    fn anchor_lesson(&self) -> Option<Arc<Lesson>> {
        self.anchor
            .get_or_init(|| {
                self.anchor_tokens
                    .as_ref()
                    .filter(|t| t.len() > 1)
                    .and_then(|t| {
                        let p = &mut Phases::default();
                        self.lesson(&self.pool, t.clone(), 1, false, Teach::All, p)
                    })
                    .map(Arc::new)
            })
            .clone()
    }

    /// Points both branches' anchor penalty at the anchor text with the weight for `kept`
    /// lessons (see [`LearnConfig::anchor_weight`]).
    fn set_anchors(&self, sc: &mut Scope, kept: usize) {
        if self.cfg.anchor_weight <= 0.0 {
            return;
        }
        if let Some(a) = self.anchor_lesson() {
            if sc.anchor_acts.is_none() && self.cfg.blind_dirs > 0 {
                let dirs = Arc::new(crate::merge::principal_directions(
                    &a.cap.act,
                    self.model.config.n_ff,
                    self.cfg.blind_dirs,
                ));
                sc.micro.set_blind(dirs.clone());
                sc.base.set_blind(dirs);
            }
            let acts = sc
                .anchor_acts
                .get_or_insert_with(|| Arc::new(a.cap.act.clone()))
                .clone();
            let w = self.cfg.anchor_weight
                * self.anchor_gain(&a)
                * (kept.min(KEEP) as f32 / KEEP as f32).powi(3);
            sc.micro.set_anchor(acts.clone(), w);
            sc.base.set_anchor(acts, w);
        }
    }

    /// The anchor penalty's effective weight on `mean_t ‖δ_t‖²` once a scope keeps its full
    /// 16 lessons: [`LearnConfig::anchor_weight`] times what a unit of it is worth on this
    /// model (see `anchor_gain`); None without an anchor text. Computes the anchor lesson
    /// if no event has yet.
    pub fn anchor_scale(&self) -> Option<f32> {
        let a = self.anchor_lesson()?;
        Some(self.cfg.anchor_weight * self.anchor_gain(&a))
    }

    /// What one unit of the anchor penalty `mean_t ‖δ_t‖²` (δ: the adapter's change of the
    /// adapted layer's down projection on the anchor text) is worth: the squared change it
    /// makes to the residual stream after the layer, relative to that stream's mean square —
    /// so that one [`LearnConfig::anchor_weight`] means the same for every architecture. The
    /// change is δ itself without a post-FFN norm; with one (Gemma-3) it is
    /// `post_norm(down + δ) − post_norm(down) ≈ g2 ⊙ δ / rms(down)` to first order, which
    /// multiplies it by `mean_j g2_j² / ms(down)` (~4·10⁷ on Gemma-3-270M, whose last layer's
    /// down projection outputs are tiny and whose norm weights are large). Without this, the
    /// weight that suits SmolLM2 let Gemma-3's adapters change its golden-text perplexity by
    /// +784% in sona-bench.
    fn anchor_gain(&self, anchor: &Lesson) -> f32 {
        *self.anchor_gain.get_or_init(|| {
            let c = &self.model.config;
            let d = c.n_embd;
            let post = self.model.layers[anchor.cap.layer].post_ffn_norm.as_deref();
            let mean_sq =
                |v: &[f32]| v.iter().map(|&x| x as f64 * x as f64).sum::<f64>() / d as f64;
            let g2sq = post.map_or(1.0, mean_sq);
            // Over the anchor's rows: the residual stream after the layer, and the down
            // projection's output the post-FFN norm divides by.
            let (mut ms_x, mut ms_down, mut rows) = (0f64, 0f64, 0usize);
            let mut x = vec![0f32; d];
            for (r, dn) in anchor
                .cap
                .resid
                .chunks_exact(d)
                .zip(anchor.cap.down.chunks_exact(d))
            {
                let md = mean_sq(dn);
                let inv = 1.0 / (md + c.rms_eps as f64).sqrt();
                for (j, xj) in x.iter_mut().enumerate() {
                    *xj = match post {
                        Some(g2) => r[j] + (g2[j] as f64 * dn[j] as f64 * inv) as f32,
                        None => r[j] + dn[j],
                    };
                }
                ms_x += mean_sq(&x);
                ms_down += md;
                rows += 1;
            }
            if rows == 0 || ms_x <= 0.0 || ms_down <= 0.0 {
                return 1.0;
            }
            let (ms_x, ms_down) = (ms_x / rows as f64, ms_down / rows as f64);
            let per_delta = if post.is_some() { g2sq / ms_down } else { 1.0 };
            (per_delta / ms_x) as f32
        })
    }

    /// The full-vocabulary check of lessons (each prepared for trainer `t`): their rows
    /// through the model's LM head with `t`'s current parameters, in one pass (see [`Check`]).
    fn check_many(&self, t: &FastTrainer, items: &[(&Lesson, &Prepared)]) -> Vec<Check> {
        let nv = self.model.config.n_vocab;
        let normed: Vec<f32> = items.iter().flat_map(|(_, p)| t.normed(p)).collect();
        let total: usize = items.iter().map(|(_, p)| p.n_rows()).sum();
        let mut logits = vec![0f32; total * nv];
        if total > 0 {
            head_logits(&self.model, &self.pool, &normed, &mut logits);
        }
        let mut rows_seen = 0;
        let mut out = Vec::with_capacity(items.len());
        for (l, p) in items {
            let lgs = &logits[rows_seen * nv..(rows_seen + p.n_rows()) * nv];
            rows_seen += p.n_rows();
            out.push(judge(l, p, nv, |ri, row| {
                row.copy_from_slice(&lgs[ri * nv..(ri + 1) * nv])
            }));
        }
        out
    }

    /// The same check from each lesson's adapter-independent logits `fixed` (computed once
    /// per event, [`FastTrainer::full_fixed`]) and one LM-head pass of `t`'s `rank` rows:
    /// the instant loop's rounds cost `O(n_vocab·rank)` per row instead of a head pass each.
    /// Lessons are judged in parallel on `pool` (one task each; the same results).
    fn check_low_rank(
        &self,
        pool: &ThreadPool,
        t: &FastTrainer,
        items: &[(&Lesson, &Prepared)],
        fixed: &[&FullFixed],
    ) -> Vec<Check> {
        let nv = self.model.config.n_vocab;
        let basis = t.full_basis(pool);
        crate::fast::per_row(Some(pool), items.len().min(fixed.len()), |i| {
            let ((l, p), f) = (items[i], fixed[i]);
            judge(l, p, nv, |ri, row| t.full_logits(p, f, &basis, ri, row))
        })
    }

    /// `key`'s scope, built on first use (from what [`open`](Self::open) restored, if
    /// anything: its branches, EWC++ state and lessons, recaptured).
    fn scope(&self, key: &str) -> Result<Arc<Mutex<Scope>>, LearnError> {
        let mut map = self.scopes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = map.get(key) {
            return Ok(s.clone());
        }
        let head = self.head()?;
        let (sid, last, cfg) = (scope_id(key), self.model.config.n_layer - 1, &self.cfg);
        let new = |rank: usize, lr: f32, seed: u64| {
            FastTrainer::new(
                self.model.clone(),
                head.clone(),
                last,
                rank,
                SCALE * rank as f32,
                lr,
                seed,
            )
            .ok_or(LearnError::HeadUnavailable)
        };
        let mut base = new(cfg.base_rank, cfg.background_lr, sid)?;
        let mut micro = new(cfg.micro_rank, cfg.lr, sid ^ 0x5eed_5eed)?;
        let (mut lessons, mut since_background) = (VecDeque::new(), 0);
        if let Some(r) = self
            .restored
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key)
        {
            if let Some(((ba, bb), (ma, mb))) = split(&r.pair, r.base_rank)
                .filter(|_| r.base_rank == cfg.base_rank && r.pair.scale == SCALE)
            {
                base.set_params(ba, bb);
                micro.set_params(ma, mb);
                base.set_ewc(r.ewc);
                // With the Adam moments, widened candidates and event count, training goes on
                // exactly as it would have without the restart.
                if let Some((bo, mo)) = r.optim {
                    base.set_optimizer_state(bo);
                    micro.set_optimizer_state(mo);
                }
                since_background = r.since_background;
            }
            for s in r.lessons {
                let teach = s.taught.map_or(Teach::All, Teach::Rows);
                if let Some(mut l) = self.lesson(
                    &self.pool,
                    s.tokens,
                    s.prompt_len,
                    s.negative,
                    teach,
                    &mut Phases::default(),
                ) {
                    l.cands.add_top(&s.top);
                    lessons.push_back(l);
                }
            }
        }
        let s = Arc::new(Mutex::new(Scope {
            base,
            micro,
            lessons,
            since_background,
            anchor_acts: None,
            base_gen: 0,
            lessons_gen: 0,
            background_running: false,
        }));
        map.insert(key.to_owned(), s.clone());
        Ok(s)
    }

    /// Learns one feedback event on `answer` to `prompt` for `scope` (the instant loop) and
    /// publishes the new adapter. Blocking (tens of milliseconds plus one forward pass over
    /// prompt + answer on the learner's thread), so callers run it off their serving threads.
    pub fn learn(
        &self,
        scope: &str,
        prompt: &[u32],
        answer: &[u32],
        feedback: &Feedback,
    ) -> Result<Outcome, LearnError> {
        if prompt.is_empty() {
            return Err(LearnError::EmptyPrompt);
        }
        let _event = InstantEvent::start(&self.instant_events);
        let telling = |k: usize| if k > 0 { Teach::Telling(k) } else { Teach::All };
        let rated = telling(self.cfg.rated_rows);
        let (answer, negative, steps, teach) = match feedback {
            Feedback::Correction(a) => (
                a.as_slice(),
                false,
                self.cfg.steps,
                telling(self.cfg.corrected_rows),
            ),
            Feedback::Rating(r) if (-1.0..=1.0).contains(r) => (
                answer,
                *r < 0.0,
                (r.abs() * self.cfg.steps as f64 / 3.0).round() as usize,
                rated,
            ),
            Feedback::Rating(_) => return Err(LearnError::BadRating),
        };
        let key = scope_key(scope);
        if answer.is_empty() || steps == 0 {
            let version = self.adapter_for_key(&key).map_or(0, |a| a.version);
            return Ok(Outcome::unchanged(version));
        }
        let tokens: Vec<u32> = prompt.iter().chain(answer).copied().collect();
        if tokens.len() > self.model.config.n_ctx_train {
            return Err(LearnError::TooLong);
        }
        let entry = self.scope(&key)?;
        // Serving idle as the event starts (before its own capture runs through the engine),
        // or no serving at all: the idle pool (if any) for this event's steps and checks.
        let pool = match (&self.idle_pool, &self.source) {
            (Some(p), src) if src.as_ref().is_none_or(|s| !s.serving_busy()) => p.clone(),
            _ => self.pool.clone(),
        };
        let mut phases = Phases::default();
        let new = self
            .lesson(&pool, tokens, prompt.len(), negative, teach, &mut phases)
            .ok_or(LearnError::TooLong)?;
        let mut guard = entry.lock().unwrap_or_else(|p| p.into_inner());
        let sc = &mut *guard;
        // The user's latest word on a prompt replaces what it contradicts or repeats: kept, the
        // old lesson would be replayed against the new one (a second correction of the same
        // question then does not take: "Kirravel" came back as "Kirrandrand").
        // Taken out (by position) rather than dropped, so that a diverged event can put them
        // back; the micro branch is saved for the same reason.
        let mut replaced: Vec<(usize, Lesson)> = Vec::new();
        let mut i = 0;
        while i < sc.lessons.len() {
            if supersedes(&new, &sc.lessons[i]) {
                if let Some(old) = sc.lessons.remove(i) {
                    replaced.push((i + replaced.len(), old));
                }
            } else {
                i += 1;
            }
        }
        let superseded = replaced.len();
        let saved_micro = sc.micro.clone();
        // The configured rate (it may have changed since the scope's trainer was made).
        sc.micro.set_lr(self.cfg.lr);
        // The new lesson with the most recent earlier ones, so it does not overwrite them; the
        // base branch is a fixed part of the layer here. After each round, a full-vocabulary
        // check: tokens the adapter raised into a row's top that the candidates lack join
        // them; while that happens, or while greedy decoding does not yet follow the lessons
        // and training still makes progress, another, shorter round follows (at most ROUNDS).
        let mut new = new;
        self.set_anchors(sc, sc.lessons.len() + 1);
        let n_replay = self.cfg.replay.min(sc.lessons.len());
        let gen = sc.base_gen;
        // Per item (the new lesson, then the replays): its adapter-independent logits, when
        // known (a replay's from an earlier event against the same base branch).
        let mut fixed: Vec<Option<Arc<FullFixed>>> = vec![None];
        let mut replays: Vec<Arc<Prepared>> = Vec::with_capacity(n_replay);
        let t = Instant::now();
        for l in sc.lessons.iter().take(n_replay) {
            match &l.ready {
                Some(r) if r.base_gen == gen => {
                    replays.push(r.prepared.clone());
                    fixed.push(Some(r.fixed.clone()));
                }
                _ => {
                    replays.push(Arc::new(l.prepare(&sc.micro, l.objective(), &sc.base)));
                    fixed.push(None);
                }
            }
        }
        let (mut loss_before, mut loss_after, mut taken, mut prev_total) =
            (None, 0.0, 0, f32::INFINITY);
        // The last round's verdicts (its checks see the adapter that is published).
        let (mut follows_new, mut follows_replays) = (false, false);
        // Prepared once, widened when its candidates widen (preparation depends on the
        // candidates and the fixed base branch, not on the trained parameters; widening
        // computes only the new candidates' columns).
        let mut first = new.prepare(&sc.micro, new.objective(), &sc.base);
        phases.prepare_ms += ms(t, Instant::now());
        // Positions (after the new lesson joins the kept ones at 0) whose preparation the last
        // round's checks widened.
        let mut widen_later: Vec<usize> = Vec::new();
        for round in 0..ROUNDS {
            phases.rounds += 1;
            let t = Instant::now();
            let batch: Vec<&Prepared> = std::iter::once(&first)
                .chain(replays.iter().map(|p| &**p))
                .collect();
            // The candidate objective starts equal to the full one (the sample stands for the
            // rest exactly at the base).
            loss_before.get_or_insert_with(|| sc.micro.loss_and_grads(batch[0]).0);
            let n = if round == 0 { steps } else { steps.div_ceil(3) };
            for _ in 0..n {
                sc.micro.step_on(&pool, &batch);
            }
            taken += n;
            let t_check = Instant::now();
            phases.steps_ms += ms(t, t_check);
            // The replayed lessons are checked the same way: still followed (a new lesson must
            // not overwrite them), and not "kept" by raising tokens outside their candidates.
            let items: Vec<(&Lesson, &Prepared)> = std::iter::once((&new, &first))
                .chain(sc.lessons.iter().zip(replays.iter().map(|p| &**p)))
                .collect();
            // The lessons' adapter-independent logits once per event (their rows and the base
            // branch do not change between rounds; a widened lesson keeps its rows), in one
            // LM-head pass over the rows of those not known yet.
            let missing: Vec<usize> = (0..items.len())
                .filter(|&i| fixed[i].as_ref().is_none_or(|f| !f.fits(items[i].1)))
                .collect();
            if !missing.is_empty() {
                let parts: Vec<&Prepared> = missing.iter().map(|&i| items[i].1).collect();
                for (i, f) in missing.iter().zip(sc.micro.full_fixed(&pool, &parts)) {
                    fixed[*i] = Some(Arc::new(f));
                }
            }
            let known: Vec<&FullFixed> = fixed.iter().flatten().map(|f| &**f).collect();
            let checks = self.check_low_rank(&pool, &sc.micro, &items, &known);
            let t_widen = Instant::now();
            phases.checks_ms += ms(t_check, t_widen);
            let follows = checks.iter().all(|c| c.follows);
            follows_new = checks.first().is_some_and(|c| c.took);
            follows_replays = checks.iter().skip(1).all(|c| c.took);
            loss_after = checks.first().map_or(0.0, |c| c.loss);
            let new_widened = checks
                .first()
                .is_some_and(|c| new.cands.add_top(&c.extra) > 0);
            // The replays whose candidates grew (by position among the replays).
            let grown: Vec<usize> = sc
                .lessons
                .iter_mut()
                .zip(checks.iter().skip(1))
                .enumerate()
                .filter_map(|(i, (l, c))| (l.cands.add_top(&c.extra) > 0).then_some(i))
                .collect();
            let widened = new_widened || !grown.is_empty();
            // Another round while the last one made progress (≥ 10% off the checked lessons'
            // total loss) and either the candidates grew or a lesson is not yet followed. A
            // round without progress ends the event even when the candidates grew: a lesson the
            // rank-2 branch cannot fit (a long correction in a scope that keeps many lessons)
            // otherwise ran all ROUNDS, widening each time, at ~30 ms a round (sona-bench
            // unchanged: docs/BENCHMARKS.md, session 13).
            let total: f32 = checks.iter().map(|c| c.loss).sum();
            let progress = total < 0.9 * prev_total;
            prev_total = total;
            let stop = !progress || (!widened && follows);
            if stop || round + 1 == ROUNDS {
                // No round follows: the widened preparations serve only the next events'
                // replays, so they are made after publication (below).
                widen_later = grown.iter().map(|i| i + 1).collect();
                if new_widened {
                    widen_later.insert(0, 0);
                }
                phases.widen_ms += ms(t_widen, Instant::now());
                break;
            }
            for &i in &grown {
                replays[i] = Arc::new(sc.lessons[i].widened(&sc.micro, &replays[i], &sc.base));
            }
            if new_widened {
                first = new.widened(&sc.micro, &first, &sc.base);
            }
            phases.widen_ms += ms(t_widen, Instant::now());
        }
        let loss_before = loss_before.unwrap_or(0.0);
        if !(loss_after.is_finite() && sc.micro.is_finite()) {
            sc.micro = saved_micro;
            for (pos, old) in replaced {
                sc.lessons.insert(pos, old);
            }
            // The checks may have widened kept lessons' candidates past what their kept
            // preparations hold: the next event prepares them afresh.
            for l in sc.lessons.iter_mut() {
                l.ready = None;
            }
            self.set_anchors(sc, sc.lessons.len());
            return Err(LearnError::Diverged);
        }
        if superseded > 0 {
            sc.lessons_gen += 1;
        }
        // Each lesson keeps what this event computed for it while it will be replayed.
        let mut fixed = fixed.into_iter();
        let ready = |prepared, fixed: Option<Arc<FullFixed>>| {
            fixed.map(|fixed| Ready {
                base_gen: gen,
                prepared,
                fixed,
            })
        };
        new.ready = ready(Arc::new(first), fixed.next().flatten());
        for (l, p) in sc.lessons.iter_mut().zip(replays) {
            l.ready = ready(p, fixed.next().flatten());
        }
        sc.lessons.push_front(new);
        sc.lessons.truncate(KEEP);
        for l in sc.lessons.iter_mut().skip(self.cfg.replay) {
            l.ready = None;
        }
        sc.since_background += 1;
        let background_due =
            self.cfg.background_every > 0 && sc.since_background >= self.cfg.background_every;
        let t = Instant::now();
        let (version, persisted) = self.publish(&key, sc, "instant");
        phases.publish_ms = ms(t, Instant::now());
        for pos in widen_later {
            let Some(l) = sc.lessons.get_mut(pos) else {
                continue;
            };
            if let Some(old) = l.ready.as_ref().map(|r| r.prepared.clone()) {
                let widened = Arc::new(l.widened(&sc.micro, &old, &sc.base));
                if let Some(r) = l.ready.as_mut() {
                    r.prepared = widened;
                }
            }
        }
        Ok(Outcome {
            updated: true,
            steps: taken,
            loss_before,
            loss_after,
            version,
            persisted,
            background_due,
            phases,
            follows: follows_new,
            replays_follow: follows_replays,
            superseded,
        })
    }

    /// Waits while an instant-loop event is in progress (see `instant_events`).
    fn yield_to_instant(&self) {
        while self.instant_events.load(Ordering::SeqCst) > 0 {
            std::thread::sleep(std::time::Duration::from_micros(500));
        }
    }

    /// The background loop for `scope`: trains its base branch on every kept lesson (micro
    /// branch fixed) under the EWC++ penalty, then updates the Fisher information (lessons and
    /// generic text) and publishes; a run that leaves the lessons' mean loss more than 5% worse
    /// is undone (`updated: false`, nothing published). Hundreds of milliseconds to seconds
    /// on one core; run it off the serving path. It trains a copy of the scope, so feedback on
    /// the scope is learned meanwhile (on the micro branch); one run per scope at a time (a
    /// call during a run returns at once with `steps: 0`), and a run is dropped if a
    /// consolidation replaced the base branch while it trained.
    pub fn background(&self, scope: &str) -> Result<Outcome, LearnError> {
        self.background_key(&scope_key(scope))
    }

    /// [`background`](Self::background) by scope key.
    pub fn background_key(&self, key: &str) -> Result<Outcome, LearnError> {
        let entry = self.learned_scope(key)?;
        let anchor = self.anchor_lesson();
        // Trains a copy of the scope taken under its lock, so that feedback arriving meanwhile
        // is learned at once (on the micro branch, the base as it was) instead of waiting.
        let steps = self.cfg.background_steps;
        let (mut tmp, gen, events) = {
            let mut guard = entry.lock().unwrap_or_else(|p| p.into_inner());
            let sc = &mut *guard;
            if sc.background_running {
                // The run in progress takes what it snapshotted; these events wait for the next.
                let version = self.adapter_for_key(key).map_or(0, |a| a.version);
                return Ok(Outcome::unchanged(version));
            }
            sc.background_running = true;
            self.set_anchors(sc, sc.lessons.len());
            let tmp = Scope {
                base: sc.base.clone(),
                micro: sc.micro.clone(),
                lessons: sc.lessons.clone(),
                since_background: 0,
                anchor_acts: sc.anchor_acts.clone(),
                base_gen: sc.base_gen,
                lessons_gen: sc.lessons_gen,
                background_running: true,
            };
            (tmp, (sc.base_gen, sc.lessons_gen), sc.since_background)
        };
        // Cleared however this function ends (a panic in training included).
        let _running = Running(&entry);
        let (loss_before, loss_after, accepted) = {
            let sc = &mut tmp;
            let saved = sc.base.clone();
            self.yield_to_instant();
            let mut batch = base_batch(sc);
            let before = mean_loss(&sc.base, &batch);
            for _ in 0..steps {
                self.yield_to_instant();
                sc.base.step_ewc(&batch, self.cfg.ewc_lambda);
            }
            // The full-vocabulary check on every lesson, and one more round if it widened any.
            self.yield_to_instant();
            let checks =
                self.check_many(&sc.base, &sc.lessons.iter().zip(&batch).collect::<Vec<_>>());
            let mut widened = false;
            for (l, c) in sc.lessons.iter_mut().zip(&checks) {
                widened |= l.cands.add_top(&c.extra) > 0;
            }
            if widened {
                self.yield_to_instant();
                batch = base_batch(sc);
                for _ in 0..steps.div_ceil(3) {
                    self.yield_to_instant();
                    sc.base.step_ewc(&batch, self.cfg.ewc_lambda);
                }
            }
            let mut after = mean_loss(&sc.base, &batch);
            // A run that leaves the kept lessons worse is undone (with the lessons already fit
            // by the micro branch, Adam's normalized steps on near-zero gradients only add
            // noise).
            let accepted = after <= before * 1.05 + 0.01;
            if !accepted {
                sc.base = saved;
                after = before;
            }
            self.yield_to_instant();
            self.update_fisher(sc, batch, anchor.as_deref());
            (before, after, accepted)
        };
        let mut guard = entry.lock().unwrap_or_else(|p| p.into_inner());
        let sc = &mut *guard;
        // Candidates the checks widened join the same lessons (by their tokens) if still kept.
        for t in &tmp.lessons {
            if let Some(l) = sc
                .lessons
                .iter_mut()
                .find(|l| l.tokens == t.tokens && l.prompt_len == t.prompt_len)
            {
                l.cands.add_top(&t.cands.ids[..t.cands.n_top]);
            }
        }
        // Events learned while it ran count toward the next run.
        sc.since_background = sc.since_background.saturating_sub(events);
        let version = self.adapter_for_key(key).map_or(0, |a| a.version);
        if (sc.base_gen, sc.lessons_gen) != gen {
            // A consolidation replaced the base meanwhile, or a new lesson superseded one this
            // run trained on: this run's base is stale.
            return Ok(Outcome {
                updated: false,
                steps,
                loss_before,
                loss_after: loss_before,
                version,
                persisted: false,
                background_due: false,
                phases: Phases::default(),
                follows: false,
                replays_follow: false,
                superseded: 0,
            });
        }
        // The Fisher information is updated even for an undone run.
        sc.base = tmp.base;
        sc.base_gen += 1;
        if !accepted {
            return Ok(Outcome {
                updated: false,
                steps,
                loss_before,
                loss_after,
                version,
                persisted: false,
                background_due: false,
                phases: Phases::default(),
                follows: false,
                replays_follow: false,
                superseded: 0,
            });
        }
        let (version, persisted) = self.publish(key, sc, "background");
        Ok(Outcome {
            updated: true,
            steps,
            loss_before,
            loss_after,
            version,
            persisted,
            background_due: false,
            phases: Phases::default(),
            follows: false,
            replays_follow: false,
            superseded: 0,
        })
    }

    /// The deep loop for `scope`: merges the micro branch into the base branch (truncated
    /// SVD to the base rank, pruning directions below 1e-3 of the largest), resets the micro
    /// branch, recomputes the EWC++ state in the new basis, and publishes a consolidated
    /// snapshot.
    pub fn consolidate(&self, scope: &str) -> Result<Consolidation, LearnError> {
        self.consolidate_key(&scope_key(scope))
    }

    /// [`consolidate`](Self::consolidate) by scope key.
    pub fn consolidate_key(&self, key: &str) -> Result<Consolidation, LearnError> {
        let entry = self.learned_scope(key)?;
        let anchor = self.anchor_lesson();
        let mut guard = entry.lock().unwrap_or_else(|p| p.into_inner());
        let sc = &mut *guard;
        let c = &self.model.config;
        // The lessons' loss under both branches (from the micro branch's side).
        let lessons_loss = |sc: &Scope| {
            mean_loss(
                &sc.micro,
                &sc.lessons
                    .iter()
                    .map(|l| l.prepare(&sc.micro, l.objective(), &sc.base))
                    .collect::<Vec<_>>(),
            )
        };
        let loss_before = lessons_loss(sc);
        let m = merge(
            &[sc.base.branch(), sc.micro.branch()],
            c.n_embd,
            c.n_ff,
            sc.base.rank(),
            1e-3,
            sc.base.scale(),
        );
        // Directions left empty restart as LoRA does (A small random, B zero) so they can learn.
        let mut a = m.a;
        let fresh = crate::uniform(
            a.len(),
            scope_id(key) ^ m.singular.len() as u64,
            1.0 / (c.n_ff as f32).sqrt(),
        );
        a[m.rank * c.n_ff..].copy_from_slice(&fresh[m.rank * c.n_ff..]);
        sc.base.set_params(a, m.b);
        sc.base.restart_optimizer();
        sc.base.set_ewc(None);
        sc.base_gen += 1;
        sc.micro.reset();
        let loss_after = lessons_loss(sc);
        let batch = base_batch(sc);
        self.update_fisher(sc, batch, anchor.as_deref());
        let (version, persisted) = self.publish(key, sc, "consolidated");
        Ok(Consolidation {
            version,
            rank: m.rank,
            pruned: m.pruned,
            singular: m.singular,
            loss_before,
            loss_after,
            persisted,
        })
    }

    /// `key`'s scope when it has learned something (a published adapter), else
    /// [`LearnError::UnknownScope`].
    fn learned_scope(&self, key: &str) -> Result<Arc<Mutex<Scope>>, LearnError> {
        if self.adapter_for_key(key).is_none() {
            return Err(LearnError::UnknownScope);
        }
        self.scope(key)
    }

    /// EWC++'s update of `sc`'s base branch over `batch` (its kept lessons prepared for it by
    /// [`base_batch`]) and the anchor text's own next tokens: what lessons and generic text
    /// now depend on.
    fn update_fisher(&self, sc: &mut Scope, mut batch: Vec<Prepared>, anchor: Option<&Lesson>) {
        if let Some(a) = anchor {
            batch.push(a.prepare(&sc.base, Objective::Likely, &sc.micro));
        }
        sc.base.update_ewc(&batch, self.cfg.ewc_gamma);
    }

    /// Publishes `sc`'s adapter under the next version (above every version on disk, so a
    /// rolled-back scope never reuses one) and persists it; returns (version, persisted).
    fn publish(&self, key: &str, sc: &Scope, kind: &str) -> (u64, bool) {
        let mut published = self.published.write().unwrap_or_else(|p| p.into_inner());
        let mut version = published.get(key).map_or(0, |a| a.version + 1);
        if let Some(&newest) = self
            .dir
            .as_ref()
            .and_then(|d| versions(&d.join("scopes").join(key)).last().copied())
            .as_ref()
        {
            version = version.max(newest + 1);
        }
        let mut ad = LoraAdapter::empty(
            &format!("sona:{key}"),
            scope_id(key),
            self.model.config.n_layer,
        );
        ad.version = version;
        ad.set(
            self.model.config.n_layer - 1,
            Proj::Down,
            combined(&sc.base, &sc.micro),
        );
        let ad = Arc::new(ad);
        published.insert(key.to_owned(), ad.clone());
        drop(published);
        let persisted = match &self.dir {
            Some(dir) => match self.persist(dir, key, version, kind, sc, &ad) {
                Ok(()) => true,
                Err(e) => {
                    eprintln!("sona: scope {key} version {version} not persisted: {e}");
                    false
                }
            },
            None => false,
        };
        (version, persisted)
    }

    /// Writes version `version` of scope `key` as described in the module documentation.
    fn persist(
        &self,
        dir: &Path,
        key: &str,
        version: u64,
        kind: &str,
        sc: &Scope,
        ad: &LoraAdapter,
    ) -> Result<(), String> {
        let sd = dir.join("scopes").join(key);
        let tmp = sd.join(format!("v{version}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        ad.save_peft(&tmp, &self.model).map_err(|e| e.to_string())?;
        ruvllm_model::write_atomic(
            &tmp.join("state.json"),
            state_json(version, kind, sc).to_string().as_bytes(),
        )
        .map_err(|e| e.to_string())?;
        let optim = optim_bytes(&sc.base.optimizer_state(), &sc.micro.optimizer_state())
            .ok_or("optimizer state not serializable")?;
        ruvllm_model::write_atomic(&tmp.join("optim.safetensors"), &optim)
            .map_err(|e| e.to_string())?;
        if let Some(bytes) = sc.base.ewc().and_then(ewc_bytes) {
            ruvllm_model::write_atomic(&tmp.join("ewc.safetensors"), &bytes)
                .map_err(|e| e.to_string())?;
        }
        sync_dir(&tmp);
        let fin = sd.join(format!("v{version}"));
        let _ = std::fs::remove_dir_all(&fin);
        std::fs::rename(&tmp, &fin).map_err(|e| format!("{}: {e}", fin.display()))?;
        sync_dir(&sd);
        ruvllm_model::write_atomic(&sd.join("current"), format!("{version}\n").as_bytes())
            .map_err(|e| e.to_string())?;
        // Retention: the newest versions, the newest consolidated snapshots, and the current.
        let vs = versions(&sd);
        let kind_of = |v: u64| {
            std::fs::read(sd.join(format!("v{v}")).join("state.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .and_then(|s| s.get("kind").and_then(Value::as_str).map(str::to_owned))
        };
        let consolidated: Vec<u64> = vs
            .iter()
            .copied()
            .filter(|&v| kind_of(v).as_deref() == Some("consolidated"))
            .collect();
        for &v in &vs {
            let keep = v == version
                || vs.iter().rev().take(KEEP_VERSIONS).any(|&k| k == v)
                || consolidated
                    .iter()
                    .rev()
                    .take(KEEP_VERSIONS)
                    .any(|&k| k == v);
            if !keep {
                let _ = std::fs::remove_dir_all(sd.join(format!("v{v}")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lesson is followed only with a clear lead: the target's over the runner-up (not over
    /// itself), and for a negative lesson the best token's over the target; `lg` comes back
    /// unchanged.
    #[test]
    fn follow_margin_is_the_lead_over_the_runner_up() {
        let mut lg = vec![0.0f32, 3.0, 2.9, -1.0, 2.5];
        let before = lg.clone();
        let stats = logit_stats(&lg);
        let m = |lg: &mut Vec<f32>, t, neg| follow_margin(lg, &stats, t, neg);
        assert!((m(&mut lg, 1, false) - 0.1).abs() < 1e-6); // argmax by 0.1: below the bar
        assert!((m(&mut lg, 4, false) + 0.5).abs() < 1e-6); // not the argmax
        assert!((m(&mut lg, 4, true) - 0.5).abs() < 1e-6); // negative: 3.0 leads it by 0.5
        assert_eq!(m(&mut lg, 1, true), 0.0); // negative on the argmax itself
        assert_eq!(lg, before);
        assert!(m(&mut lg, 1, false) < FOLLOW_MARGIN && m(&mut lg, 4, true) >= FOLLOW_MARGIN);
    }

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
        let lesson = StoredLesson {
            tokens: vec![1, 2, 3],
            prompt_len: 2,
            negative: true,
            taught: None,
            top: vec![],
        };
        let v = json!({"format": 2, "version": 7, "kind": "instant", "base_rank": 8, "lessons": [{"tokens": [1, 2, 3], "prompt_len": 2, "negative": true}]});
        assert_eq!(
            parse_state(&v),
            Some(State {
                version: 7,
                kind: "instant".to_owned(),
                base_rank: 8,
                lessons: vec![lesson.clone()],
                since_background: 0
            })
        );
        let v = json!({"format": 2, "version": 7, "kind": "instant", "base_rank": 8, "lessons": [{"tokens": [1, 2, 3], "prompt_len": 2, "negative": true, "top": [4, 9]}], "since_background": 3});
        assert_eq!(
            parse_state(&v),
            Some(State {
                version: 7,
                kind: "instant".to_owned(),
                base_rank: 8,
                lessons: vec![StoredLesson {
                    top: vec![4, 9],
                    ..lesson.clone()
                }],
                since_background: 3
            })
        );
        let v = json!({"format": 2, "version": 7, "kind": "instant", "base_rank": 8, "lessons": [{"tokens": [1, 2, 3], "prompt_len": 2, "negative": true, "taught": [1]}]});
        assert_eq!(
            parse_state(&v).map(|s| s.lessons[0].taught.clone()),
            Some(Some(vec![1]))
        );
        for bad in [
            json!({"version": 1}),
            json!({"version": 1, "kind": "instant", "lessons": []}),
            json!({"version": -1, "kind": "instant", "base_rank": 8, "lessons": []}),
            json!({"version": 1, "kind": "instant", "base_rank": 8, "lessons": [{"tokens": [1], "prompt_len": 1, "negative": false}]}),
            json!({"version": 1, "kind": "instant", "base_rank": 8, "lessons": [{"tokens": [1, 5000000000u64], "prompt_len": 1, "negative": false}]}),
            json!({"version": 1, "kind": "instant", "base_rank": 8, "lessons": [{"tokens": "x", "prompt_len": 1, "negative": false}]}),
            json!({"version": 1, "kind": "instant", "base_rank": 8, "lessons": [{"tokens": [1, 2], "prompt_len": 1, "negative": false, "top": [-1]}]}),
            json!({"version": 1, "kind": "instant", "base_rank": 8, "lessons": [], "since_background": "x"}),
        ] {
            assert_eq!(parse_state(&bad), None, "{bad}");
        }
    }

    #[test]
    fn branches_join_and_split_back_exactly() {
        let pair = LoraPair {
            rank: 3,
            a: (0..3 * 4).map(|x| x as f32).collect(),
            b: (0..5 * 3).map(|x| -(x as f32)).collect(),
            scale: SCALE,
        };
        let ((a0, b0), (a1, b1)) = split(&pair, 2).unwrap();
        assert_eq!((a0.len(), b0.len(), a1.len(), b1.len()), (8, 10, 4, 5));
        assert_eq!(b0[..4], [0.0, -1.0, -3.0, -4.0]);
        assert_eq!(b1[..2], [-2.0, -5.0]);
        assert!(split(&pair, 4).is_none());
    }

    #[test]
    fn ewc_state_round_trips() {
        let e = Ewc {
            fisher_a: vec![1.0, 2.5],
            fisher_b: vec![0.0],
            star_a: vec![-1.0, 3.0],
            star_b: vec![7.0],
        };
        assert_eq!(parse_ewc(&ewc_bytes(&e).unwrap()), Some(e));
        assert_eq!(parse_ewc(b"garbage"), None);
    }

    #[test]
    fn optimizer_state_round_trips() {
        let b = OptimizerState {
            t: 40,
            m_a: vec![1.0, -2.5],
            m_b: vec![0.25],
            v_a: vec![3.0, 4.0],
            v_b: vec![1e-9],
        };
        let m = OptimizerState {
            t: 7,
            m_a: vec![0.5],
            m_b: vec![],
            v_a: vec![2.0],
            v_b: vec![],
        };
        assert_eq!(
            parse_optim(&optim_bytes(&b, &m).unwrap()),
            Some((b.clone(), m))
        );
        assert_eq!(
            parse_optim(
                &ewc_bytes(&Ewc {
                    fisher_a: vec![1.0],
                    fisher_b: vec![],
                    star_a: vec![1.0],
                    star_b: vec![]
                })
                .unwrap()
            ),
            None,
            "another file's tensors"
        );
        assert_eq!(parse_optim(b"garbage"), None);
    }
}
