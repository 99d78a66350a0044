//! The engine thread: a continuous-batching loop over one paged KV pool.
//!
//! Every sequence is `tokens` (prompt, then generated tokens) of which the first `n_computed`
//! have their keys and values in the pool. A step runs `tokens[n_computed..]` — all of it or a
//! chunk — for as many sequences as the token budget allows: decoding sequences (one token
//! each) first, then prefill chunks of partly computed ones, then new admissions. A sequence
//! whose chunk reaches the end of its tokens gets logits and samples its next token. Prefill,
//! decode and recompute after preemption are therefore the same operation, and because the
//! forward pass is batch-invariant (a row's result never depends on its batch), a preempted
//! sequence resumes with identical results.
//!
//! When the pool lacks blocks, the lowest-priority, newest sequence not yet scheduled this step
//! (possibly the one asking) is preempted: its blocks are freed (they stay in the prefix cache
//! until evicted, so recompute is often cheap) and it goes back to the waiting queue in its
//! original arrival order.

use crate::metrics::Metrics;
use crate::{
    Capture, Captured, Command, Error, ErrorKind, Event, FinishReason, Kept, Logprob, Request,
    Shared, Usage,
};
use ruvllm_kernels::pool::ThreadPool;
use ruvllm_kv::KvManager;
use ruvllm_model::{Forward, KvCache, Logits, Model, Sampler, SeqInput, StopMatcher};
use ruvllm_tokenizer::{StreamDecoder, Tokenizer};
use std::cmp::Reverse;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Instant;
use tokio::sync::mpsc as tmpsc;

/// Marks the cache salt of embedding requests: they need the hidden state of every prompt
/// token, so they must never start from cached blocks (and never feed generation's cache).
const EMBED_SALT: u64 = 0x454d_4245_4400_0000;

/// A request and its choices' shared state.
struct Group {
    tx: tmpsc::UnboundedSender<Event>,
    req: Request,
    /// Choices not yet finished.
    remaining: usize,
    usage: Usage,
    submitted: Instant,
    got_first_token: bool,
    /// Admitted at least once (no longer counted as queued by `submit`).
    admitted: bool,
    /// The stream's receiver is gone or a send failed: drop the request at the next step.
    cancelled: bool,
    /// Counted as queued by `submit` until admitted (the server's background work is not).
    counted: bool,
}

/// One choice of one request.
struct Seq {
    /// Id in the KV manager (unique per sequence).
    id: u64,
    group: u64,
    index: usize,
    /// Prompt, then generated tokens.
    tokens: Vec<u32>,
    /// Leading tokens whose K/V are in the pool.
    n_computed: usize,
    generated: usize,
    sampler: Sampler,
    decoder: StreamDecoder,
    stops: StopMatcher,
    /// Whether the request's other choices have been forked off (always true for n = 1).
    forked: bool,
    priority: i32,
    arrival: u64,
    /// Embedding requests: sum of final hidden states so far, `[n_embd]`.
    embed_sum: Vec<f32>,
    /// Embedding requests: admissions so far (part of the salt, so a recompute never hits
    /// blocks of its own earlier attempt).
    attempts: u64,
    last_token_at: Option<Instant>,
    /// Two-tier mode: blocks before this index have been considered for migration.
    migrated: usize,
    /// Capture requests: the rows and logits gathered so far (reset by preemption).
    captured: Option<Captured>,
    /// Requests that keep activations: the rows gathered so far (reset by preemption, whose
    /// recompute gathers them again).
    kept: Option<Kept>,
    /// Requests that keep activations: each generated token's served log-probability (kept
    /// across preemption: a recompute samples nothing it already generated).
    kept_logprobs: Vec<f32>,
}

impl Seq {
    fn key(&self) -> (Reverse<i32>, u64, usize) {
        (Reverse(self.priority), self.arrival, self.index)
    }
}

struct State<'m> {
    cfg: crate::EngineConfig,
    tok: Arc<Tokenizer>,
    fwd: Forward<'m>,
    kv: KvCache,
    mgr: KvManager,
    n_vocab: usize,
    n_embd: usize,
    n_ff: usize,
    groups: HashMap<u64, Group>,
    running: Vec<Seq>,
    waiting: VecDeque<Seq>,
    next_seq: u64,
    shared: Arc<Shared>,
    /// Logits of the last step, swapped out of the forward pass: `[rows × n_vocab]` first (the
    /// buffer may be longer).
    logits: Vec<f32>,
    /// Latency observations of this step, applied under one lock.
    ttft: Vec<f64>,
    itl: Vec<f64>,
    e2e: Vec<f64>,
    delta_generated: u64,
    delta_prompt: u64,
    delta_computed_prompt: u64,
    delta_preempted: u64,
    delta_finished: u64,
    delta_migrated: u64,
    /// Final events held until the step's metrics are published.
    outbox: Vec<(tmpsc::UnboundedSender<Event>, Event)>,
}

/// The engine thread's body: runs until shutdown or until every sender is gone.
pub(crate) fn run(
    model: Arc<Model>,
    tok: Arc<Tokenizer>,
    pool: Arc<ThreadPool>,
    cfg: crate::EngineConfig,
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Command>,
) {
    let c = &model.config;
    let mut st = State {
        tok,
        fwd: Forward::new(&model, pool),
        kv: match (cfg.kv_tail, cfg.kv_types()) {
            (Some(_), _) => KvCache::with_tiers(
                c.n_layer,
                c.kv_dim(),
                c.head_dim,
                cfg.block_size,
                cfg.n_blocks,
                cfg.n_cold_blocks,
                cfg.kv_type,
            ),
            (None, (k_ty, v_ty)) => KvCache::with_types(
                c.n_layer,
                c.kv_dim(),
                c.head_dim,
                cfg.block_size,
                cfg.n_blocks,
                k_ty,
                v_ty,
            ),
        }
        .unwrap_or_else(|| KvCache::new(c.n_layer, c.kv_dim(), cfg.block_size, cfg.n_blocks)),
        mgr: match cfg.kv_tail {
            Some(_) => KvManager::with_cold_tier(
                cfg.n_blocks,
                cfg.n_cold_blocks,
                cfg.block_size,
                cfg.prefix_caching,
            ),
            None => KvManager::new(cfg.n_blocks, cfg.block_size, cfg.prefix_caching),
        },
        n_vocab: c.n_vocab,
        n_embd: c.n_embd,
        n_ff: c.n_ff,
        cfg,
        groups: HashMap::new(),
        running: Vec::new(),
        waiting: VecDeque::new(),
        next_seq: 0,
        shared,
        logits: Vec::new(),
        ttft: Vec::new(),
        itl: Vec::new(),
        e2e: Vec::new(),
        delta_generated: 0,
        delta_prompt: 0,
        delta_computed_prompt: 0,
        delta_preempted: 0,
        delta_finished: 0,
        delta_migrated: 0,
        outbox: Vec::new(),
    };
    st.fwd.set_attention(st.cfg.attn);
    loop {
        if st.running.is_empty() && st.waiting.is_empty() {
            st.publish();
            match rx.recv() {
                Ok(cmd) => {
                    if !st.handle(cmd) {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        let mut open = true;
        loop {
            match rx.try_recv() {
                Ok(cmd) => {
                    if !st.handle(cmd) {
                        open = false;
                        break;
                    }
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        if !open {
            break;
        }
        st.reap();
        st.step();
        st.publish();
    }
    st.fail_all();
    st.publish();
}

impl State<'_> {
    /// Applies a command; false means shut down.
    fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Submit {
                id,
                req,
                tx,
                counted,
            } => self.admit_request(id, req, tx, counted),
            Command::Cancel(id) => {
                if let Some(g) = self.groups.get_mut(&id) {
                    g.cancelled = true;
                }
            }
            Command::Shutdown => return false,
        }
        true
    }

    fn admit_request(
        &mut self,
        id: u64,
        req: Request,
        tx: tmpsc::UnboundedSender<Event>,
        counted: bool,
    ) {
        let sampler = match Sampler::new(req.sampling.clone()) {
            Ok(s) => s,
            Err(e) => {
                if counted {
                    self.shared.waiting.fetch_sub(1, Ordering::Relaxed);
                }
                let _ = tx.send(Event::Failed(Error::new(ErrorKind::Model(e.to_string()))));
                return;
            }
        };
        self.next_seq += 1;
        let seq = Seq {
            id: self.next_seq,
            group: id,
            index: 0,
            tokens: req.prompt.clone(),
            n_computed: 0,
            generated: 0,
            sampler,
            decoder: StreamDecoder::new(),
            stops: StopMatcher::new(&req.stop),
            forked: req.n <= 1 || req.embed,
            priority: req.priority,
            arrival: id,
            embed_sum: Vec::new(),
            attempts: 0,
            last_token_at: None,
            migrated: 0,
            captured: None,
            kept: None,
            kept_logprobs: Vec::new(),
        };
        let usage = Usage {
            prompt_tokens: req.prompt.len(),
            ..Usage::default()
        };
        self.delta_prompt += req.prompt.len() as u64;
        let remaining = if req.embed || req.capture.is_some() {
            1
        } else {
            req.n
        };
        self.groups.insert(
            id,
            Group {
                tx,
                req,
                remaining,
                usage,
                submitted: Instant::now(),
                got_first_token: false,
                admitted: false,
                cancelled: false,
                counted,
            },
        );
        self.enqueue(seq);
    }

    /// Puts a sequence in the waiting queue in (priority, arrival) order.
    fn enqueue(&mut self, s: Seq) {
        let k = s.key();
        let pos = self.waiting.partition_point(|w| w.key() <= k);
        self.waiting.insert(pos, s);
    }

    /// Drops cancelled requests (explicitly, or their receiver is gone) and frees their blocks.
    fn reap(&mut self) {
        let dead: Vec<u64> = self
            .groups
            .iter()
            .filter(|(_, g)| g.cancelled || g.tx.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in dead {
            self.drop_group(id);
        }
    }

    fn drop_group(&mut self, id: u64) {
        let Some(g) = self.groups.remove(&id) else {
            return;
        };
        if !g.admitted && g.counted {
            self.shared.waiting.fetch_sub(1, Ordering::Relaxed);
        }
        let mgr = &mut self.mgr;
        self.running.retain(|s| {
            if s.group == id {
                mgr.free(s.id);
            }
            s.group != id
        });
        self.waiting.retain(|s| s.group != id);
        self.delta_finished += 1;
        self.e2e.push(g.submitted.elapsed().as_secs_f64());
    }

    /// Frees a sequence's blocks and sends it back to the waiting queue.
    fn preempt(&mut self, mut s: Seq) {
        self.mgr.free(s.id);
        s.n_computed = 0;
        s.migrated = 0;
        s.embed_sum.clear();
        s.captured = None;
        s.kept = None;
        self.delta_preempted += 1;
        self.enqueue(s);
    }

    fn salt(&self, s: &Seq) -> Vec<u64> {
        match self.groups.get(&s.group) {
            Some(g) if g.req.embed => vec![EMBED_SALT, s.group, s.attempts],
            Some(g) => {
                // An adapter that leaves every key and value as the base model's (SONA's) shares
                // the base model's blocks.
                let mut salt: Vec<u64> = g
                    .req
                    .adapter
                    .as_ref()
                    .filter(|a| a.affects_kv())
                    .map(|a| vec![a.id, a.version])
                    .unwrap_or_default();
                salt.extend_from_slice(&g.req.cache_salt);
                salt
            }
            None => Vec::new(),
        }
    }

    /// One scheduling decision and one forward pass.
    /// Makes room for a waiting sequence of higher priority than some running one: while the
    /// best waiting sequence outranks the worst running one and cannot be admitted (no sequence
    /// slot, or too few free blocks for its first chunk), the worst running one is preempted.
    fn preempt_for_priority(&mut self) {
        loop {
            let Some(w) = self.waiting.front() else {
                return;
            };
            let Some(worst) = (0..self.running.len()).max_by_key(|&j| self.running[j].key()) else {
                return;
            };
            if self.running[worst].priority >= w.priority {
                return;
            }
            let chunk = w.tokens.len().min(self.cfg.max_batch_tokens);
            let needs_blocks = chunk.div_ceil(self.cfg.block_size) + 1;
            if self.running.len() < self.cfg.max_seqs && self.mgr.n_free() >= needs_blocks {
                return;
            }
            let v = self.running.remove(worst);
            self.preempt(v);
        }
    }

    fn step(&mut self) {
        self.preempt_for_priority();
        let mut budget = self.cfg.max_batch_tokens;
        // Decodes first (one token each), then prefill chunks; each by priority and arrival.
        self.running
            .sort_by_key(|s| (s.tokens.len() - s.n_computed > 1, s.key()));
        let mut plan: Vec<usize> = Vec::with_capacity(self.running.len());
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let len = (self.running[i].tokens.len() - self.running[i].n_computed).min(budget);
            let s = &self.running[i];
            match self
                .mgr
                .append(s.id, &s.tokens[s.n_computed..s.n_computed + len])
            {
                Some(copies) => {
                    for c in copies {
                        self.kv.copy_block(c.src, c.dst);
                    }
                    plan.push(len);
                    budget -= len;
                    i += 1;
                }
                None => {
                    // Out of blocks: preempt the lowest-priority, newest of those not yet
                    // scheduled (this one included), then retry.
                    let victim = (i..self.running.len())
                        .max_by_key(|&j| self.running[j].key())
                        .unwrap_or(i);
                    let v = self.running.remove(victim);
                    self.preempt(v);
                }
            }
        }
        plan.resize(self.running.len(), 0);
        // Admissions, while budget, sequence slots and blocks last.
        while budget > 0 && self.running.len() < self.cfg.max_seqs {
            let Some(front) = self.waiting.front() else {
                break;
            };
            let salt = self.salt(front);
            let from = self
                .groups
                .get(&front.group)
                .and_then(|g| g.req.capture.or(g.req.keep))
                .map_or(front.tokens.len(), |c| c.from);
            let cached = self
                .mgr
                .add_sequence_computing_from(front.id, &front.tokens, &salt, from);
            let len = (front.tokens.len() - cached).min(budget);
            match self
                .mgr
                .append(front.id, &front.tokens[cached..cached + len])
            {
                Some(copies) => {
                    for c in copies {
                        self.kv.copy_block(c.src, c.dst);
                    }
                    let Some(mut s) = self.waiting.pop_front() else {
                        break;
                    };
                    s.n_computed = cached;
                    s.attempts += 1;
                    if let Some(g) = self.groups.get_mut(&s.group) {
                        if !g.admitted {
                            g.admitted = true;
                            g.usage.cached_tokens = cached.min(g.usage.prompt_tokens);
                            if g.counted {
                                self.shared.waiting.fetch_sub(1, Ordering::Relaxed);
                            }
                        }
                    }
                    plan.push(len);
                    budget -= len;
                    self.running.push(s);
                }
                None => {
                    self.mgr.free(front.id);
                    break;
                }
            }
        }
        if plan.iter().all(|&l| l == 0) {
            // Cannot happen for validated requests (one always fits an empty pool); fail the
            // head of the queue rather than spin.
            if let Some(s) = self.waiting.front() {
                let g = s.group;
                self.fail_group(
                    g,
                    Error::new(ErrorKind::Model(
                        "the request does not fit the KV pool".into(),
                    )),
                );
            }
            return;
        }
        self.run_batch(&plan);
        self.migrate_old_blocks();
    }

    /// Two-tier mode: moves every running sequence's full blocks older than the tail into the
    /// cold tier. Blocks shared with other sequences (a common prefix, forks) stay hot and are
    /// tried again at later steps; nothing moves while the cold tier is full.
    fn migrate_old_blocks(&mut self) {
        let Some(tail) = self.cfg.kv_tail else { return };
        let bs = self.cfg.block_size;
        for s in &mut self.running {
            let upto = s.n_computed.saturating_sub(tail) / bs;
            let mut first_kept = None;
            for i in s.migrated..upto {
                let Some(b) = self.mgr.block_table(s.id).and_then(|t| t.get(i).copied()) else {
                    break;
                };
                if self.mgr.is_cold(b) {
                    continue;
                }
                if self.mgr.ref_count(b) > 1 {
                    first_kept.get_or_insert(i);
                    continue;
                }
                match self.mgr.migrate(s.id, i) {
                    Some(op) => {
                        self.kv.migrate_block(op.src, op.dst);
                        self.delta_migrated += 1;
                    }
                    None => {
                        first_kept.get_or_insert(i);
                        break;
                    }
                }
            }
            s.migrated = first_kept.unwrap_or(upto.max(s.migrated));
        }
    }

    fn run_batch(&mut self, plan: &[usize]) {
        let mut inputs = Vec::new();
        let mut capture_layers = Vec::new();
        for (s, &len) in self.running.iter().zip(plan) {
            if len == 0 {
                continue;
            }
            let end = s.n_computed + len;
            let g = self.groups.get(&s.group);
            let embed = g.is_some_and(|g| g.req.embed);
            let capture = g.and_then(|g| g.req.capture);
            let lora = g.and_then(|g| g.req.adapter.as_deref());
            if let Some(k) = g.and_then(|g| g.req.keep).filter(|k| end > k.from) {
                capture_layers.push(k.layer);
            }
            let logits = if embed {
                Logits::Hidden
            } else if let Some(c) = capture {
                capture_layers.push(c.layer);
                if end > c.from {
                    Logits::From(c.from.saturating_sub(s.n_computed))
                } else {
                    Logits::None
                }
            } else if end == s.tokens.len() {
                Logits::Last
            } else {
                Logits::None
            };
            let table = self.mgr.block_table(s.id).unwrap_or(&[]);
            inputs.push(SeqInput {
                tokens: &s.tokens[s.n_computed..end],
                pos0: s.n_computed,
                block_table: table,
                logits,
                lora,
            });
        }
        capture_layers.sort_unstable();
        capture_layers.dedup();
        self.fwd.set_capture_layers(&capture_layers);
        let result = self.fwd.forward_batch(&mut self.kv, &inputs);
        drop(inputs);
        match result {
            Ok(_) => {
                // Keep the step's logits (its first rows; the buffer may be longer) without a copy.
                self.fwd.swap_logits(&mut self.logits);
            }
            Err(e) => {
                let groups: Vec<u64> = self
                    .running
                    .iter()
                    .zip(plan)
                    .filter(|(_, &l)| l > 0)
                    .map(|(s, _)| s.group)
                    .collect();
                for g in groups {
                    self.fail_group(g, Error::new(ErrorKind::Model(e.to_string())));
                }
                return;
            }
        }
        // Advance every scheduled sequence; sample for those that reached their end.
        let mut row = 0;
        let mut hidden_row = 0;
        let mut batch_row = 0;
        let mut finished: Vec<usize> = Vec::new();
        // Groups whose logits came out NaN or infinite.
        let mut failed: Vec<u64> = Vec::new();
        let n_running = self.running.len();
        for i in 0..n_running {
            let len = plan[i];
            if len == 0 {
                continue;
            }
            let s = &mut self.running[i];
            let first_row = batch_row;
            batch_row += len;
            let Some(g) = self.groups.get_mut(&s.group) else {
                continue;
            };
            let start = s.n_computed;
            s.n_computed += len;
            let np = g.usage.prompt_tokens;
            self.delta_computed_prompt += (s.n_computed.min(np) - start.min(np)) as u64;
            if g.req.embed {
                if s.embed_sum.is_empty() {
                    s.embed_sum = vec![0.0; self.n_embd];
                }
                // Token by token, in order: the sum does not depend on how prefill was chunked.
                for h in self.fwd.hidden()
                    [hidden_row * self.n_embd..(hidden_row + len) * self.n_embd]
                    .chunks_exact(self.n_embd)
                {
                    s.embed_sum.iter_mut().zip(h).for_each(|(a, b)| *a += b);
                }
                hidden_row += len;
                if s.n_computed == s.tokens.len() {
                    let n = s.tokens.len() as f32;
                    let mut e: Vec<f32> = s.embed_sum.iter().map(|v| v / n).collect();
                    let norm = e.iter().map(|v| v * v).sum::<f32>().sqrt();
                    if norm > 0.0 {
                        e.iter_mut().for_each(|v| *v /= norm);
                    }
                    if g.tx.send(Event::Embedding(e)).is_err() {
                        g.cancelled = true;
                    }
                    finished.push(i);
                }
                continue;
            }
            if let Some(spec) = g.req.capture {
                // Rows of positions from..: activations at their place in the batch, logits as
                // the forward pass laid them out (Logits::From).
                let n = s.tokens.len();
                let (d, ff, nv) = (self.n_embd, self.n_ff, self.n_vocab);
                let out = s.captured.get_or_insert_with(|| Captured {
                    cap: Capture {
                        layer: spec.layer,
                        act: vec![0.0; n * ff],
                        resid: vec![0.0; n * d],
                        down: vec![0.0; n * d],
                        last: vec![0.0; n * d],
                    },
                    logits: Vec::with_capacity((n - spec.from) * nv),
                });
                let lo = start.max(spec.from);
                if let Some(c) = self.fwd.captured(spec.layer) {
                    for p in lo..s.n_computed {
                        let r = first_row + p - start;
                        out.cap.act[p * ff..(p + 1) * ff]
                            .copy_from_slice(&c.act[r * ff..(r + 1) * ff]);
                        out.cap.resid[p * d..(p + 1) * d]
                            .copy_from_slice(&c.resid[r * d..(r + 1) * d]);
                        out.cap.down[p * d..(p + 1) * d]
                            .copy_from_slice(&c.down[r * d..(r + 1) * d]);
                        out.cap.last[p * d..(p + 1) * d]
                            .copy_from_slice(&c.last[r * d..(r + 1) * d]);
                    }
                }
                let rows = s.n_computed.saturating_sub(lo);
                out.logits
                    .extend_from_slice(&self.logits[row * nv..(row + rows) * nv]);
                row += rows;
                if s.n_computed == n {
                    if let Some(c) = s.captured.take() {
                        if g.tx.send(Event::Captured(Box::new(c))).is_err() {
                            g.cancelled = true;
                        }
                    }
                    finished.push(i);
                }
                continue;
            }
            if let Some(spec) = g.req.keep {
                // Rows of positions from.., appended in order (a recompute starts over).
                let lo = start.max(spec.from);
                if let Some(c) = self.fwd.captured(spec.layer).filter(|_| s.n_computed > lo) {
                    let (d, ff) = (self.n_embd, self.n_ff);
                    let k = s.kept.get_or_insert_with(|| Kept {
                        from: spec.from,
                        rows: 0,
                        logprobs: Vec::new(),
                        cap: Capture {
                            layer: spec.layer,
                            ..Capture::default()
                        },
                    });
                    let (r0, r1) = (first_row + lo - start, first_row + s.n_computed - start);
                    k.cap.act.extend_from_slice(&c.act[r0 * ff..r1 * ff]);
                    k.cap.resid.extend_from_slice(&c.resid[r0 * d..r1 * d]);
                    k.cap.down.extend_from_slice(&c.down[r0 * d..r1 * d]);
                    k.rows += r1 - r0;
                }
            }
            if s.n_computed < s.tokens.len() {
                continue;
            }
            let r = row;
            row += 1;
            // Sampling from a row with a NaN or an infinity (weights that overflow) would emit
            // one arbitrary token forever: the group fails instead.
            if !ruvllm_kernels::ops::all_finite(
                &self.logits[r * self.n_vocab..(r + 1) * self.n_vocab],
            ) {
                failed.push(s.group);
                continue;
            }
            let mut forks = Vec::new();
            if !s.forked {
                s.forked = true;
                for k in 1..g.req.n {
                    let mut sampling = g.req.sampling.clone();
                    sampling.seed = sampling.seed.map(|x| x.wrapping_add(k as u64));
                    let Ok(sampler) = Sampler::new(sampling) else {
                        continue;
                    };
                    self.next_seq += 1;
                    if !self.mgr.fork(s.id, self.next_seq) {
                        continue;
                    }
                    forks.push(Seq {
                        id: self.next_seq,
                        group: s.group,
                        index: k,
                        tokens: s.tokens.clone(),
                        n_computed: s.n_computed,
                        generated: 0,
                        sampler,
                        decoder: StreamDecoder::new(),
                        stops: StopMatcher::new(&g.req.stop),
                        forked: true,
                        priority: s.priority,
                        arrival: s.arrival,
                        embed_sum: Vec::new(),
                        attempts: s.attempts,
                        last_token_at: None,
                        migrated: s.migrated,
                        captured: None,
                        kept: None,
                        kept_logprobs: Vec::new(),
                    });
                }
            }
            if self.sample(i, r) {
                finished.push(i);
            }
            // The other choices sample from the same logits row.
            for f in forks {
                self.running.push(f);
                let j = self.running.len() - 1;
                if self.sample(j, r) {
                    finished.push(j);
                }
            }
        }
        finished.sort_unstable();
        finished.dedup();
        // A failed group's sequences leave with it (below), not as finished ones.
        finished.retain(|&i| !failed.contains(&self.running[i].group));
        for &i in finished.iter().rev() {
            let mut s = self.running.remove(i);
            self.mgr.free(s.id);
            if let Some(g) = self.groups.get_mut(&s.group) {
                if let Some(mut k) = s.kept.take() {
                    k.logprobs = std::mem::take(&mut s.kept_logprobs);
                    if g.tx.send(Event::Kept(Box::new(k))).is_err() {
                        g.cancelled = true;
                    }
                }
                g.remaining -= 1;
                if g.remaining == 0 {
                    // Sent after the metrics are published, so a client that reads them on Done
                    // sees its blocks freed.
                    self.outbox.push((g.tx.clone(), Event::Done(g.usage)));
                    self.e2e.push(g.submitted.elapsed().as_secs_f64());
                    self.delta_finished += 1;
                    self.groups.remove(&s.group);
                }
            }
        }
        failed.sort_unstable();
        failed.dedup();
        for id in failed {
            self.fail_group(
                id,
                Error::new(ErrorKind::Model(
                    "the forward pass produced non-finite logits (NaN or infinity): the model's \
                     weights overflow"
                        .into(),
                )),
            );
        }
    }

    /// Samples the next token of `running[i]` from logits row `r`, emits it, and returns whether
    /// the sequence has finished.
    fn sample(&mut self, i: usize, r: usize) -> bool {
        let nv = self.n_vocab;
        let s = &mut self.running[i];
        let Some(g) = self.groups.get_mut(&s.group) else {
            return true;
        };
        let row = &self.logits[r * nv..(r + 1) * nv];
        let next = s.sampler.sample(row, &s.tokens);
        let logprob = g.req.logprobs.map(|k| logprobs(row, next, k));
        let now = Instant::now();
        if !g.got_first_token {
            g.got_first_token = true;
            self.ttft.push((now - g.submitted).as_secs_f64());
        }
        if let Some(t) = s.last_token_at {
            self.itl.push((now - t).as_secs_f64());
        }
        s.last_token_at = Some(now);
        let send = |g: &mut Group, e: Event| {
            if g.tx.send(e).is_err() {
                g.cancelled = true;
            }
        };
        if !g.req.ignore_eos && self.tok.is_eog(next) {
            let tail = flush(s);
            send(
                g,
                Event::Finished {
                    index: s.index,
                    reason: FinishReason::Stop,
                    text: tail,
                },
            );
            return true;
        }
        if g.req.keep.is_some() {
            s.kept_logprobs
                .push(ruvllm_kernels::ops::token_logprob(row, next as usize));
        }
        s.tokens.push(next);
        s.generated += 1;
        g.usage.completion_tokens += 1;
        self.delta_generated += 1;
        let mut bytes = Vec::new();
        let piece = match self.tok.token_bytes(next, false, &mut bytes) {
            Ok(()) => s.decoder.push(&bytes),
            Err(_) => String::new(),
        };
        let (text, hit) = s.stops.push(&piece);
        send(
            g,
            Event::Token {
                index: s.index,
                token: next,
                text,
                logprob,
            },
        );
        if hit {
            send(
                g,
                Event::Finished {
                    index: s.index,
                    reason: FinishReason::Stop,
                    text: String::new(),
                },
            );
            return true;
        }
        if s.generated >= g.req.max_tokens || s.tokens.len() >= self.cfg.n_ctx {
            let tail = flush(s);
            send(
                g,
                Event::Finished {
                    index: s.index,
                    reason: FinishReason::Length,
                    text: tail,
                },
            );
            return true;
        }
        false
    }

    fn fail_group(&mut self, id: u64, e: Error) {
        if let Some(g) = self.groups.get(&id) {
            let _ = g.tx.send(Event::Failed(e));
        }
        self.drop_group(id);
    }

    fn fail_all(&mut self) {
        let ids: Vec<u64> = self.groups.keys().copied().collect();
        for id in ids {
            self.fail_group(id, Error::new(ErrorKind::ShuttingDown));
        }
    }

    /// Publishes gauges and this step's counters and observations.
    fn publish(&mut self) {
        let shared = self.shared.clone();
        if let Ok(mut m) = shared.metrics.lock() {
            self.publish_into(&mut m);
        }
        for (tx, e) in self.outbox.drain(..) {
            let _ = tx.send(e);
        }
    }

    fn publish_into(&mut self, m: &mut Metrics) {
        let st = self.mgr.stats();
        m.s.kv_blocks_used = st.used;
        m.s.kv_blocks_cached = st.cached;
        m.s.kv_cold_blocks_used = self.mgr.cold_stats().map_or(0, |c| c.used);
        m.s.kv_migrations += std::mem::take(&mut self.delta_migrated);
        m.s.prefix_cache_queries = self.mgr.prefix_queries;
        m.s.prefix_cache_hits = self.mgr.prefix_hits;
        let mut running: Vec<u64> = self.running.iter().map(|s| s.group).collect();
        running.sort_unstable();
        running.dedup();
        let mut waiting: Vec<u64> = self
            .waiting
            .iter()
            .map(|s| s.group)
            .filter(|g| running.binary_search(g).is_err())
            .collect();
        waiting.sort_unstable();
        waiting.dedup();
        m.s.requests_running = running.len();
        m.s.requests_waiting = waiting.len();
        m.s.generation_tokens += std::mem::take(&mut self.delta_generated);
        m.s.prompt_tokens += std::mem::take(&mut self.delta_prompt);
        m.s.computed_prompt_tokens += std::mem::take(&mut self.delta_computed_prompt);
        m.s.preemptions += std::mem::take(&mut self.delta_preempted);
        m.s.requests_finished += std::mem::take(&mut self.delta_finished);
        m.s.steps += 1;
        for v in self.ttft.drain(..) {
            m.s.time_to_first_token.observe(v);
        }
        for v in self.itl.drain(..) {
            m.s.inter_token_latency.observe(v);
        }
        for v in self.e2e.drain(..) {
            m.s.e2e_request_latency.observe(v);
        }
    }
}

/// Releases the text a sequence's decoder and stop matcher still hold.
fn flush(s: &mut Seq) -> String {
    let (mut tail, hit) = s.stops.push(&s.decoder.finish());
    if !hit {
        tail.push_str(&s.stops.finish());
    }
    tail
}

/// ln p(token) under softmax(`row`) and the `k` most likely tokens.
fn logprobs(row: &[f32], token: u32, k: usize) -> Logprob {
    let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = mx
        + row
            .iter()
            .map(|&l| ((l - mx) as f64).exp())
            .sum::<f64>()
            .ln() as f32;
    let lp = |t: u32| row.get(t as usize).map_or(f32::NEG_INFINITY, |&l| l - lse);
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    if k > 0 {
        for (t, &l) in row.iter().enumerate() {
            if top.len() < k || l > top[top.len() - 1].1 {
                let pos = top.partition_point(|&(_, v)| v >= l);
                top.insert(pos, (t as u32, l));
                top.truncate(k);
            }
        }
    }
    Logprob {
        logprob: lp(token),
        top: top.into_iter().map(|(t, l)| (t, l - lse)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_match_a_direct_softmax() {
        let row = [1.0f32, 3.0, -2.0, 3.0, 0.5];
        let z: f64 = row.iter().map(|&l| (l as f64).exp()).sum();
        let lp = logprobs(&row, 4, 3);
        assert!((lp.logprob as f64 - (0.5f64.exp() / z).ln()).abs() < 1e-5);
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 3, 0]);
        assert!((lp.top[2].1 as f64 - (1f64.exp() / z).ln()).abs() < 1e-5);
        assert!(logprobs(&row, 0, 0).top.is_empty());
    }
}
