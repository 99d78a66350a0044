//! The serving engine: many requests share one model, one paged KV pool and one batched forward
//! pass per step. The server and the CLI both talk to it through [`Engine`]:
//! [`Engine::submit`] validates a [`Request`] and returns a [`RequestHandle`] that streams
//! [`Event`]s (tokens with their text and log-probabilities, per-choice finish reasons, usage);
//! dropping the handle or calling [`RequestHandle::cancel`] frees the request's KV blocks at the
//! next step.
//!
//! The engine runs on its own thread (see [`sched`]): each step it takes every running
//! sequence's next token (decode) plus prefill chunks of waiting ones, up to a token budget,
//! through one `forward_batch`, preempting the lowest-priority, newest sequences by recompute
//! when the pool runs out of blocks.
#![deny(missing_docs)]

pub mod metrics;
mod sched;

pub use metrics::{Histogram, MetricsSnapshot};
pub use ruvllm_model::Capture;
pub use ruvllm_model::FinishReason;

use metrics::Metrics;
use ruvllm_kernels::pool::ThreadPool;
use ruvllm_model::{AttnKernel, Config, KvType, LoraAdapter, Model, SamplingParams};
use ruvllm_tokenizer::Tokenizer;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use tokio::sync::mpsc as tmpsc;

/// Why a request was refused or failed.
#[derive(Debug, Clone, PartialEq)]
pub struct Error {
    kind: ErrorKind,
}

/// The kinds of [`Error`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A request parameter is out of range; names the parameter.
    InvalidParam {
        /// The parameter's name (OpenAI's spelling).
        param: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// Prompt plus requested tokens exceed the context or the KV pool.
    ContextOverflow {
        /// Tokens the request needs (prompt + max_tokens).
        needed: usize,
        /// Tokens available (context length or pool size, whichever is smaller).
        limit: usize,
    },
    /// The waiting queue is full.
    QueueFull(usize),
    /// The engine has stopped (shutdown).
    ShuttingDown,
    /// The forward pass failed.
    Model(String),
}

impl Error {
    /// Wraps a kind.
    pub fn new(kind: ErrorKind) -> Error {
        Error { kind }
    }
    /// What went wrong.
    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }
    fn param(param: &'static str, message: impl Into<String>) -> Error {
        Error::new(ErrorKind::InvalidParam {
            param,
            message: message.into(),
        })
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ErrorKind::InvalidParam { message, .. } => write!(f, "{message}"),
            ErrorKind::ContextOverflow { needed, limit } => write!(
                f,
                "this request needs {needed} tokens (prompt + max_tokens) but at most {limit} fit; shorten the prompt or lower max_tokens"
            ),
            ErrorKind::QueueFull(n) => write!(f, "the server is busy: {n} requests are already waiting"),
            ErrorKind::ShuttingDown => write!(f, "the engine is shutting down"),
            ErrorKind::Model(m) => write!(f, "model error: {m}"),
        }
    }
}

impl std::error::Error for Error {}

/// Engine sizing and policy.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// Blocks in the KV pool (see [`blocks_for_memory`]).
    pub n_blocks: usize,
    /// Most tokens (decode + prefill chunks) in one forward step.
    pub max_batch_tokens: usize,
    /// Most sequences running at once.
    pub max_seqs: usize,
    /// Reuse cached prefix blocks across requests.
    pub prefix_caching: bool,
    /// Longest sequence (prompt + generation) accepted.
    pub n_ctx: usize,
    /// Most requests waiting for admission before [`ErrorKind::QueueFull`].
    pub max_waiting: usize,
    /// How keys and values are stored (f16 by default; q8_0/q4_0 quantize them). In two-tier
    /// mode, the type of the cold tier.
    pub kv_type: KvType,
    /// The keys' type when it differs from `kv_type` (llama.cpp's `-ctk`; not in two-tier mode).
    pub key_type: Option<KvType>,
    /// The values' type when it differs from `kv_type` (llama.cpp's `-ctv`; not in two-tier
    /// mode).
    pub value_type: Option<KvType>,
    /// Two-tier mode: keep each sequence's most recent `kv_tail` tokens in f16 blocks and move
    /// full blocks older than that into `n_cold_blocks` blocks of `kv_type`. The CLI sets it
    /// to [`KvType::default_tail`] unless told otherwise (32 tokens for q4_0).
    pub kv_tail: Option<usize>,
    /// Blocks of the cold tier (two-tier mode).
    pub n_cold_blocks: usize,
    /// The attention kernel (flash for long spans by default).
    pub attn: AttnKernel,
}

impl EngineConfig {
    /// Defaults for `model` with a KV pool of `n_blocks` blocks of 16 tokens.
    pub fn new(model: &Config, n_blocks: usize) -> EngineConfig {
        EngineConfig {
            block_size: 16,
            n_blocks,
            max_batch_tokens: 512,
            max_seqs: 64,
            prefix_caching: true,
            n_ctx: model.n_ctx_train,
            max_waiting: 1024,
            kv_type: KvType::F16,
            key_type: None,
            value_type: None,
            kv_tail: None,
            n_cold_blocks: 0,
            attn: AttnKernel::Auto,
        }
    }
}

impl EngineConfig {
    /// How keys and values are stored: `kv_type` unless overridden.
    pub fn kv_types(&self) -> (KvType, KvType) {
        (
            self.key_type.unwrap_or(self.kv_type),
            self.value_type.unwrap_or(self.kv_type),
        )
    }

    /// Stores keys as `k` and values as `v`, `kv_type` the type both default to (the
    /// overrides are set only where they differ from it).
    pub fn set_kv_types(&mut self, kv_type: KvType, k: KvType, v: KvType) {
        self.kv_type = kv_type;
        self.key_type = (k != kv_type).then_some(k);
        self.value_type = (v != kv_type).then_some(v);
    }
}

/// Two-tier mode's f16 blocks for a tail of `tail` tokens: `(wanted, least)` — each of
/// `max_seqs` sequences' tail plus the block being filled and one more, and at the least one
/// tail plus a whole batch of `max_batch_tokens` (what [`Engine::start`] requires).
pub fn hot_blocks(
    tail: usize,
    block_size: usize,
    max_seqs: usize,
    max_batch_tokens: usize,
) -> (usize, usize) {
    let least = (tail + max_batch_tokens).div_ceil(block_size) + 2;
    (
        (max_seqs * (tail.div_ceil(block_size) + 2)).max(least),
        least,
    )
}

/// K and V bytes per token for `c` stored as `ty` (all layers).
pub fn kv_bytes_per_token(c: &Config, ty: KvType) -> usize {
    kv_bytes_per_token_kv(c, ty, ty)
}

/// K and V bytes per token for `c` with keys stored as `k` and values as `v` (all layers).
pub fn kv_bytes_per_token_kv(c: &Config, k: KvType, v: KvType) -> usize {
    KvType::pair_bytes_per_token(k, v, c.n_layer, c.kv_dim())
}

/// Blocks of `block_size` tokens that fit in `bytes` of KV memory of type `ty`.
pub fn blocks_for_memory(c: &Config, ty: KvType, block_size: usize, bytes: u64) -> usize {
    blocks_for_memory_kv(c, ty, ty, block_size, bytes)
}

/// Blocks of `block_size` tokens that fit in `bytes` of KV memory, keys stored as `k` and values
/// as `v`.
pub fn blocks_for_memory_kv(
    c: &Config,
    k: KvType,
    v: KvType,
    block_size: usize,
    bytes: u64,
) -> usize {
    (bytes / (kv_bytes_per_token_kv(c, k, v) * block_size.max(1)) as u64) as usize
}

/// One request: a prompt and how to continue it (or embed it).
#[derive(Debug, Clone)]
pub struct Request {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Most tokens to generate per choice (at least 1).
    pub max_tokens: usize,
    /// Sampling parameters (validated on submit). With a seed, choice `i` uses `seed + i`.
    pub sampling: SamplingParams,
    /// Stop strings (not included in the output).
    pub stop: Vec<String>,
    /// Keep going past end-of-generation tokens (benchmarks).
    pub ignore_eos: bool,
    /// Number of choices sampled from one prompt (the prompt is computed once; the choices
    /// share its KV blocks copy-on-write).
    pub n: usize,
    /// Higher runs first; ties go first-come first-served.
    pub priority: i32,
    /// Report the chosen token's log-probability and this many alternatives (0–20).
    pub logprobs: Option<usize>,
    /// Compute a normalized mean-pooled embedding of the prompt instead of generating.
    pub embed: bool,
    /// Mixed into every block hash besides the adapter's id and version: KV computed under
    /// other weights is never reused.
    pub cache_salt: Vec<u64>,
    /// The LoRA adapter to run with (the base model when `None`).
    pub adapter: Option<Arc<LoraAdapter>>,
    /// Compute the prompt for training instead of generating: one layer's activations and the
    /// logits of positions `from..` come back as [`Event::Captured`]. Cached prefix blocks are
    /// reused up to `from`, so a correction of an answer just served computes only its tail.
    pub capture: Option<CaptureSpec>,
    /// While generating, keep one layer's activations (the down projection's input and base
    /// output, and the residual) of positions `from..` as they are computed; they come back as
    /// [`Event::Kept`] when the choice ends. A learner trains on feedback about the answer
    /// from them without running the sequence again. `n = 1`; an adapter may adapt only that
    /// layer's down projection (as SONA's do), so the rows are the base model's.
    pub keep: Option<CaptureSpec>,
}

/// What a capture request asks for (see [`Request::capture`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaptureSpec {
    /// The layer whose down projection (input, output, residual) is captured.
    pub layer: usize,
    /// The first position whose activations and logits are needed.
    pub from: usize,
}

/// A generation's kept activations (see [`Request::keep`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Kept {
    /// Position of the first row.
    pub from: usize,
    /// How many rows (positions) it holds.
    pub rows: usize,
    /// The served log-probability of each generated token, in order (the row at position
    /// `from + j` predicted token `j`): under the request's adapter, computed when it was
    /// sampled. What a rating's lesson picks its rows by before any head pass.
    pub logprobs: Vec<f32>,
    /// Rows of positions `from..from + rows` (`last` is empty): every position the sequence
    /// ran through the model — the prompt's last token and each generated token that was fed
    /// back (a choice cut by its length limit never feeds its final token).
    pub cap: Capture,
}

/// A capture request's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Captured {
    /// Rows for every prompt position; rows before `from` are zero (not computed here).
    pub cap: Capture,
    /// Logits of positions `from..`: `[(prompt − from) × n_vocab]`.
    pub logits: Vec<f32>,
}

impl Request {
    /// A greedy request for `max_tokens` tokens after `prompt`.
    pub fn greedy(prompt: Vec<u32>, max_tokens: usize) -> Request {
        Request {
            prompt,
            max_tokens,
            sampling: SamplingParams::greedy(),
            stop: Vec::new(),
            ignore_eos: false,
            n: 1,
            priority: 0,
            logprobs: None,
            embed: false,
            cache_salt: Vec::new(),
            adapter: None,
            capture: None,
            keep: None,
        }
    }
}

/// A token's log-probability under the model (before penalties and temperature) and the most
/// likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct Logprob {
    /// ln p(token).
    pub logprob: f32,
    /// The `logprobs` most likely tokens and their log-probabilities, best first.
    pub top: Vec<(u32, f32)>,
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache (not computed).
    pub cached_tokens: usize,
    /// Generated tokens over all choices.
    pub completion_tokens: usize,
}

/// What a request's stream carries, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Choice `index` generated `token`; `text` is the text it completes (may be empty while a
    /// multi-byte character or a possible stop string is pending).
    Token {
        /// Choice index.
        index: usize,
        /// Token id.
        token: u32,
        /// Newly released text.
        text: String,
        /// Present when the request asked for logprobs.
        logprob: Option<Logprob>,
    },
    /// Choice `index` ended; `text` is any held-back text released at the end.
    Finished {
        /// Choice index.
        index: usize,
        /// Why.
        reason: FinishReason,
        /// Remaining text.
        text: String,
    },
    /// The prompt's embedding (embedding requests).
    Embedding(Vec<f32>),
    /// A capture request's activations and logits.
    Captured(Box<Captured>),
    /// A generation's kept activations (requests with [`Request::keep`]), after its
    /// `Finished`.
    Kept(Box<Kept>),
    /// Every choice has finished; the last event.
    Done(Usage),
    /// The request failed; the last event.
    Failed(Error),
}

pub(crate) enum Command {
    /// `counted`: the request counts against the waiting-queue limit (clients' requests).
    Submit {
        id: u64,
        req: Request,
        tx: tmpsc::UnboundedSender<Event>,
        counted: bool,
    },
    Cancel(u64),
    Shutdown,
}

/// A submitted request: its id and event stream. Dropping it cancels the request.
pub struct RequestHandle {
    id: u64,
    events: tmpsc::UnboundedReceiver<Event>,
    cmd: mpsc::Sender<Command>,
}

impl RequestHandle {
    /// The engine's id of this request.
    pub fn id(&self) -> u64 {
        self.id
    }
    /// The next event, or `None` once the stream has ended.
    pub async fn next(&mut self) -> Option<Event> {
        self.events.recv().await
    }
    /// The next event, blocking the thread (for non-async callers).
    pub fn next_blocking(&mut self) -> Option<Event> {
        self.events.blocking_recv()
    }
    /// Stops the request and frees its KV blocks at the next step.
    pub fn cancel(&self) {
        let _ = self.cmd.send(Command::Cancel(self.id));
    }
}

impl Drop for RequestHandle {
    fn drop(&mut self) {
        self.cancel();
    }
}

pub(crate) struct Shared {
    pub(crate) metrics: Mutex<Metrics>,
    /// Requests submitted but not yet admitted.
    pub(crate) waiting: AtomicUsize,
}

/// A running engine. Cheap to share behind an `Arc`; [`Engine::shutdown`] stops it.
pub struct Engine {
    cmd: Mutex<mpsc::Sender<Command>>,
    next_id: AtomicU64,
    shared: Arc<Shared>,
    cfg: EngineConfig,
    n_vocab: usize,
    n_layer: usize,
    model: Arc<Model>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Engine {
    /// Starts the engine thread for `model` on `pool` (the thread pool the forward pass uses).
    pub fn start(
        model: Arc<Model>,
        tok: Arc<Tokenizer>,
        pool: Arc<ThreadPool>,
        cfg: EngineConfig,
    ) -> Result<Engine, Error> {
        if cfg.block_size == 0
            || cfg.n_blocks == 0
            || cfg.max_batch_tokens == 0
            || cfg.max_seqs == 0
        {
            return Err(Error::param(
                "engine",
                "block size, block count, batch tokens and max sequences must be positive",
            ));
        }
        let c = &model.config;
        if let Some(tail) = cfg.kv_tail {
            let (_, hot_needed) = hot_blocks(tail, cfg.block_size, 1, cfg.max_batch_tokens);
            if tail < cfg.block_size || cfg.n_cold_blocks == 0 || cfg.n_blocks < hot_needed {
                return Err(Error::param(
                    "kv_tail",
                    format!("two-tier KV needs a tail of at least one block, cold blocks, and at least {hot_needed} hot blocks (tail + one batch); got tail {tail}, {} hot, {} cold", cfg.n_blocks, cfg.n_cold_blocks),
                ));
            }
        }
        let (k_ty, v_ty) = cfg.kv_types();
        for (param, ty) in [
            ("kv_type", cfg.kv_type),
            ("key_type", k_ty),
            ("value_type", v_ty),
        ] {
            if ty.is_quantized() && c.head_dim % 32 != 0 {
                return Err(Error::param(
                    param,
                    format!(
                        "kv type {} needs heads of a multiple of 32 values; this model's have {}",
                        ty.name(),
                        c.head_dim
                    ),
                ));
            }
        }
        if cfg.kv_tail.is_some() && (cfg.key_type.is_some() || cfg.value_type.is_some()) {
            return Err(Error::param(
                "key_type",
                "separate key and value types do not combine with the two-tier KV mode".to_string(),
            ));
        }
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            metrics: Mutex::new(Metrics::new(
                cfg.n_blocks,
                if cfg.kv_tail.is_some() {
                    cfg.n_cold_blocks
                } else {
                    0
                },
            )),
            waiting: AtomicUsize::new(0),
        });
        let n_vocab = model.config.n_vocab;
        let n_layer = model.config.n_layer;
        let model2 = model.clone();
        let cfg2 = cfg.clone();
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("ruvllm-engine".into())
            .spawn(move || sched::run(model2, tok, pool, cfg2, sh, rx))
            .map_err(|e| {
                Error::new(ErrorKind::Model(format!(
                    "cannot start the engine thread: {e}"
                )))
            })?;
        Ok(Engine {
            cmd: Mutex::new(tx),
            next_id: AtomicU64::new(1),
            shared,
            cfg,
            n_vocab,
            n_layer,
            model,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The model it serves.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Tokens the KV pool holds (both tiers).
    pub fn kv_capacity_tokens(&self) -> usize {
        let cold = if self.cfg.kv_tail.is_some() {
            self.cfg.n_cold_blocks
        } else {
            0
        };
        (self.cfg.n_blocks + cold) * self.cfg.block_size
    }

    /// Checks a request against the context, the pool and parameter ranges.
    pub fn validate(&self, req: &Request) -> Result<(), Error> {
        if req.prompt.is_empty() {
            return Err(Error::param("prompt", "the prompt is empty"));
        }
        if let Some(&t) = req.prompt.iter().find(|&&t| t as usize >= self.n_vocab) {
            return Err(Error::param(
                "prompt",
                format!(
                    "token id {t} is outside the vocabulary ({} tokens)",
                    self.n_vocab
                ),
            ));
        }
        if req.n == 0 || req.n > self.cfg.max_seqs.min(128) {
            return Err(Error::param(
                "n",
                format!(
                    "n must be between 1 and {}, got {}",
                    self.cfg.max_seqs.min(128),
                    req.n
                ),
            ));
        }
        if let Some(k) = req.logprobs {
            if k > 20 {
                return Err(Error::param(
                    "top_logprobs",
                    format!("top_logprobs must be between 0 and 20, got {k}"),
                ));
            }
        }
        if let Some(a) = &req.adapter {
            if a.layers.len() != self.n_layer {
                return Err(Error::param(
                    "adapter",
                    format!(
                        "adapter {:?} has {} layers but the model has {}",
                        a.name,
                        a.layers.len(),
                        self.n_layer
                    ),
                ));
            }
        }
        // A capture or keep spec names a layer of the model and a position of the prompt.
        let in_range = |param: &'static str, c: CaptureSpec| {
            if c.layer >= self.n_layer || c.from >= req.prompt.len() {
                return Err(Error::param(param, format!("{param} of layer {} from position {} is outside the model ({} layers) or the prompt ({} tokens)", c.layer, c.from, self.n_layer, req.prompt.len())));
            }
            Ok(())
        };
        if let Some(c) = req.capture {
            if req.embed || req.n != 1 {
                return Err(Error::param(
                    "capture",
                    "a capture request computes its prompt once: no embedding, n = 1",
                ));
            }
            in_range("capture", c)?;
        }
        if let Some(k) = req.keep {
            if req.embed || req.n != 1 || req.capture.is_some() {
                return Err(Error::param(
                    "keep",
                    "activations are kept for one generated choice: no embedding or capture, n = 1",
                ));
            }
            in_range("keep", k)?;
            if req
                .adapter
                .as_ref()
                .is_some_and(|a| a.adapts_before_down(k.layer))
            {
                return Err(Error::param("keep", "the adapter changes the kept layer's inputs: the rows would not be the base model's"));
            }
        }
        let prompt_only = req.embed || req.capture.is_some();
        let gen = if prompt_only { 0 } else { req.max_tokens };
        if !prompt_only && gen == 0 {
            return Err(Error::param("max_tokens", "max_tokens must be at least 1"));
        }
        let needed = req.prompt.len().saturating_add(gen);
        let limit = self.cfg.n_ctx.min(self.kv_capacity_tokens());
        if needed > limit {
            return Err(Error::new(ErrorKind::ContextOverflow { needed, limit }));
        }
        req.sampling.validate().map_err(|e| match e.kind() {
            ruvllm_model::ErrorKind::InvalidParam { param, message } => {
                Error::param(param, message.clone())
            }
            _ => Error::param("sampling", e.to_string()),
        })
    }

    /// Validates and queues a request; events arrive on the returned handle.
    pub fn submit(&self, req: Request) -> Result<RequestHandle, Error> {
        self.submit_counted(req, true)
    }

    /// Validates and queues the server's own background work (a trajectory's embedding, a
    /// lesson's capture): not refused for a full queue and not counted in it, so it never
    /// turns a client's request away.
    pub fn submit_background(&self, req: Request) -> Result<RequestHandle, Error> {
        self.submit_counted(req, false)
    }

    fn submit_counted(&self, req: Request, counted: bool) -> Result<RequestHandle, Error> {
        self.validate(&req)?;
        let waiting = self.shared.waiting.load(Ordering::Relaxed);
        if counted && waiting >= self.cfg.max_waiting {
            return Err(Error::new(ErrorKind::QueueFull(waiting)));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tmpsc::unbounded_channel();
        let cmd = self
            .cmd
            .lock()
            .map_err(|_| Error::new(ErrorKind::ShuttingDown))?
            .clone();
        if counted {
            self.shared.waiting.fetch_add(1, Ordering::Relaxed);
        }
        if cmd
            .send(Command::Submit {
                id,
                req,
                tx,
                counted,
            })
            .is_err()
        {
            if counted {
                self.shared.waiting.fetch_sub(1, Ordering::Relaxed);
            }
            return Err(Error::new(ErrorKind::ShuttingDown));
        }
        Ok(RequestHandle {
            id,
            events: rx,
            cmd,
        })
    }

    /// Current counters, gauges and histograms.
    pub fn metrics(&self) -> MetricsSnapshot {
        match self.shared.metrics.lock() {
            Ok(m) => m.snapshot(),
            Err(p) => p.into_inner().snapshot(),
        }
    }

    /// Cancels everything in flight (their streams get [`Event::Failed`] with
    /// [`ErrorKind::ShuttingDown`]) and waits for the engine thread to exit.
    pub fn shutdown(&self) {
        if let Ok(tx) = self.cmd.lock() {
            let _ = tx.send(Command::Shutdown);
        }
        if let Some(t) = self.thread.lock().ok().and_then(|mut g| g.take()) {
            let _ = t.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}
