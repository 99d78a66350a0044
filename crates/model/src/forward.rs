//! The forward pass: a batch of consecutive tokens of one sequence through every block,
//! reading and extending its KV cache. One function serves llama, gemma3 and qwen2; the
//! differences are data (optional norms and biases, RoPE style, window) rather than code paths.

use crate::config::Arch;
use crate::kv::KvCache;
use crate::lora::{LoraAdapter, Proj};
use crate::weights::{Model, Weight};
use crate::{Error, ErrorKind};
use half::f16;
use ruvllm_kernels::act::{ActFormat, QuantActs};
use ruvllm_kernels::gemv::{gemv_batched, Gemv};
use ruvllm_kernels::matmul::{matmul_many, MatJob};
use ruvllm_kernels::ops::{self, rope_apply, rope_cache};
use ruvllm_kernels::pool::ThreadPool;
use ruvllm_kernels::SyncPtr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Which positions of a batch need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token (generation).
    Last,
    /// Every token (perplexity, teacher forcing).
    All,
    /// The tokens from this index of the sequence's new tokens on (an answer after its
    /// prompt, for training).
    From(usize),
    /// None (prefilling a prefix).
    None,
    /// No logits; instead the final normed hidden state of every new token of this sequence,
    /// in [`Forward::hidden`] (embeddings).
    Hidden,
}

/// Quantized copies of one activation buffer, made lazily per format and reused by every
/// matmul that reads the same input (q, k and v; gate and up).
#[derive(Default)]
struct ActCache {
    /// One batch per format, indexed by [`ActCache::slot`]: Q8x32, Q8K, F32.
    acts: [QuantActs; 3],
    fresh: [bool; 3],
}

impl ActCache {
    fn invalidate(&mut self) {
        self.fresh = [false; 3];
    }
    fn slot(fmt: ActFormat) -> usize {
        match fmt {
            ActFormat::Q8x32 => 0,
            ActFormat::Q8K => 1,
            ActFormat::F32 => 2,
        }
    }
    /// Makes sure `x` is quantized in the format `w` needs.
    fn prepare(&mut self, pool: &ThreadPool, w: &Weight, x: &[f32], cols: usize) {
        let fmt = ActFormat::for_weight(w.ty());
        let i = Self::slot(fmt);
        if !self.fresh[i] {
            self.acts[i].quantize_par(pool, fmt, x, cols);
            self.fresh[i] = true;
        }
    }
    /// Produces the rows of `x` with `make` and quantizes them for `first` in the same pass
    /// over the pool (see [`QuantActs::produce_and_quantize_par`]); other formats follow with
    /// [`ActCache::prepare`].
    fn produce(
        &mut self,
        pool: &ThreadPool,
        first: &Weight,
        x: &mut [f32],
        cols: usize,
        make: &(dyn Fn(usize, &mut [f32]) + Sync),
    ) {
        self.invalidate();
        let fmt = ActFormat::for_weight(first.ty());
        let i = Self::slot(fmt);
        self.acts[i].produce_and_quantize_par(pool, fmt, x, cols, make);
        self.fresh[i] = true;
    }
    /// The prepared activations for `w`.
    fn get(&self, w: &Weight) -> &QuantActs {
        &self.acts[Self::slot(ActFormat::for_weight(w.ty()))]
    }
}

/// Scratch buffers, grown to the largest batch seen and then reused (no per-token allocation).
#[derive(Default)]
struct Scratch {
    /// Residual stream: `[n × n_embd]`.
    x: Vec<f32>,
    /// Normed input of a sub-layer: `[n × n_embd]`.
    xn: Vec<f32>,
    /// Queries: `[n × q_dim]`.
    q: Vec<f32>,
    /// Keys: `[n × kv_dim]`.
    k: Vec<f32>,
    /// Values: `[n × kv_dim]`.
    v: Vec<f32>,
    /// Attention output: `[n × q_dim]`.
    att: Vec<f32>,
    /// Sub-layer output: `[n × n_embd]`.
    out: Vec<f32>,
    /// FFN gate, then activation: `[n × n_ff]`.
    gate: Vec<f32>,
    /// FFN up: `[n × n_ff]`.
    up: Vec<f32>,
    /// Logits: `[rows × n_vocab]`.
    logits: Vec<f32>,
    /// Final normed hidden states of the tokens of `Hidden` sequences: `[tokens × n_embd]`.
    hidden: Vec<f32>,
    /// RoPE (cos, sin) per token for full layers: `[n × rope_dims/2]`.
    rope_full: Vec<(f32, f32)>,
    /// RoPE (cos, sin) per token for sliding layers: `[n × rope_dims/2]`.
    rope_swa: Vec<(f32, f32)>,
    /// Sequence index of each token of the batch: `[n]`.
    tok_seq: Vec<usize>,
    /// Position of each token of the batch: `[n]`.
    tok_pos: Vec<usize>,
    /// A layer's keys as f32 for a prefill batch: per copied sequence `[positions × kv_dim]`.
    k32: Vec<f32>,
    /// A layer's values as f32, laid out as `k32`.
    v32: Vec<f32>,
    /// Per sequence of the batch, where its copy starts in `k32`/`v32` (None: no copy).
    f32_at: Vec<Option<usize>>,
    /// The copy's tasks: (sequence, first of up to 64 positions).
    copy_tasks: Vec<(usize, usize)>,
    /// The KV cache row of each token of the batch: `[n]`.
    slots: Vec<usize>,
    /// LoRA intermediate `A·x` per token: `[n × rank]`.
    lora_tmp: Vec<f32>,
    acts: ActCache,
}

/// One sequence's part of a batched forward step.
#[derive(Debug, Clone, Copy)]
pub struct SeqInput<'a> {
    /// The tokens to run, at positions `pos0..pos0 + tokens.len()`.
    pub tokens: &'a [u32],
    /// Position of the first token (the number of tokens already cached).
    pub pos0: usize,
    /// Block ids holding positions `0..pos0 + tokens.len()` of this sequence.
    pub block_table: &'a [u32],
    /// Which of its rows need logits.
    pub logits: Logits,
    /// The LoRA adapter this sequence runs with, if any.
    pub lora: Option<&'a LoraAdapter>,
}

/// Activations of one layer's feed-forward kept from the last step, for training adapters on
/// that layer's down projection without re-running the layers before it. Rows follow the
/// batch's tokens.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Capture {
    /// The captured layer.
    pub layer: usize,
    /// Input of the down projection (the gated activation): `[n × n_ff]`.
    pub act: Vec<f32>,
    /// The residual stream before the layer's feed-forward output is added: `[n × n_embd]`.
    pub resid: Vec<f32>,
    /// The down projection's base output (without any adapter on it; earlier projections'
    /// adapters do act), before any post-FFN norm: `[n × n_embd]`.
    pub down: Vec<f32>,
    /// The residual stream after the last layer (before the final norm): `[n × n_embd]`.
    pub last: Vec<f32>,
}

/// The forward pass over a batch of sequences sharing one paged KV cache: all tokens of all
/// sequences go through each matmul together (weights read once per step), attention runs per
/// sequence through its block table. Owns the scratch space, reused between steps.
pub struct Forward<'m> {
    model: &'m Model,
    pool: Arc<ThreadPool>,
    s: Scratch,
    /// One capture per layer being captured (usually none or one).
    captures: Vec<Capture>,
    attn: AttnKernel,
}

/// Runs a model over one sequence, owning its KV cache (one block spanning the context).
pub struct Runner<'m> {
    fwd: Forward<'m>,
    /// The sequence's KV cache.
    pub kv: KvCache,
    /// The tokens whose keys and values are cached, in order.
    history: Vec<u32>,
    /// The LoRA adapter every step runs with.
    lora: Option<LoraAdapter>,
    /// Two-tier mode (see [`with_kv_tail`](Runner::with_kv_tail)); `None`: one contiguous block.
    tiers: Option<RunnerTiers>,
}

/// A [`Runner`]'s two-tier bookkeeping: its block table and how many of its blocks have moved
/// to the quantized tier. Hot block `i` and cold block `n_hot + i` both belong to positions
/// `i·bs..(i+1)·bs`; a migrated hot block keeps its f16 rows, so truncating only points the
/// table back at it.
struct RunnerTiers {
    /// Positions kept in f16 behind the newest one.
    tail: usize,
    /// Positions the runner accepts.
    n_ctx: usize,
    block_size: usize,
    n_hot: u32,
    /// Block id per `block_size` positions: hot `i` or cold `n_hot + i`.
    table: Vec<u32>,
    /// Blocks `0..migrated` are cold.
    migrated: usize,
}

/// The error for a quantized KV type (`types`, as the flags name it) whose 32-value blocks
/// would straddle heads of `head_dim` values.
fn heads_error(types: &str, head_dim: usize) -> Error {
    Error::new(ErrorKind::InvalidParam {
        param: "kv_type",
        message: format!(
            "--kv-type {types} needs heads of a multiple of 32 values; this model's have {head_dim}"
        ),
    })
}

fn grow(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
    }
}

impl<'m> Runner<'m> {
    /// A runner with a KV cache of `n_ctx` positions (capped at the trained context).
    pub fn new(model: &'m Model, pool: Arc<ThreadPool>, n_ctx: usize) -> Runner<'m> {
        let c = &model.config;
        let n_ctx = n_ctx.clamp(1, c.n_ctx_train);
        let kv = KvCache::new(c.n_layer, c.kv_dim(), n_ctx, 1);
        Self::with_cache(model, pool, kv, None)
    }

    /// A runner with the engine's two-tier cache: the newest `tail` positions (at least one
    /// block of `block_size`) in f16, every older whole block in `cold_ty`, moved as the
    /// sequence grows — so `ruvllm perplexity` measures what `serve` computes. Both tiers span
    /// the context (the runner measures one sequence; the engine sizes its f16 tier for tails).
    pub fn with_kv_tail(
        model: &'m Model,
        pool: Arc<ThreadPool>,
        n_ctx: usize,
        cold_ty: crate::KvType,
        tail: usize,
        block_size: usize,
    ) -> Result<Runner<'m>, Error> {
        let c = &model.config;
        let n_ctx = n_ctx.clamp(1, c.n_ctx_train);
        if block_size == 0 || tail < block_size || !cold_ty.is_quantized() {
            return Err(Error::new(ErrorKind::InvalidParam {
                param: "kv_tail",
                message: format!("two-tier KV needs a quantized cold type and a tail of at least one block of {block_size} tokens; got {} and tail {tail}", cold_ty.name()),
            }));
        }
        let n = n_ctx.div_ceil(block_size);
        let kv = KvCache::with_tiers(c.n_layer, c.kv_dim(), c.head_dim, block_size, n, n, cold_ty)
            .ok_or_else(|| heads_error(cold_ty.name(), c.head_dim))?;
        let tiers = RunnerTiers {
            tail,
            n_ctx,
            block_size,
            n_hot: n as u32,
            table: (0..n as u32).collect(),
            migrated: 0,
        };
        Ok(Self::with_cache(model, pool, kv, Some(tiers)))
    }

    fn with_cache(
        model: &'m Model,
        pool: Arc<ThreadPool>,
        kv: KvCache,
        tiers: Option<RunnerTiers>,
    ) -> Runner<'m> {
        Runner {
            fwd: Forward::new(model, pool),
            kv,
            history: Vec::new(),
            lora: None,
            tiers,
        }
    }

    /// A runner whose KV cache stores keys and values as `ty`.
    pub fn with_kv_type(
        model: &'m Model,
        pool: Arc<ThreadPool>,
        n_ctx: usize,
        ty: crate::KvType,
    ) -> Result<Runner<'m>, Error> {
        Self::with_kv_types(model, pool, n_ctx, ty, ty)
    }

    /// A runner whose KV cache stores keys as `k_ty` and values as `v_ty`.
    pub fn with_kv_types(
        model: &'m Model,
        pool: Arc<ThreadPool>,
        n_ctx: usize,
        k_ty: crate::KvType,
        v_ty: crate::KvType,
    ) -> Result<Runner<'m>, Error> {
        let c = &model.config;
        let n_ctx = n_ctx.clamp(1, c.n_ctx_train);
        let kv = KvCache::with_types(c.n_layer, c.kv_dim(), c.head_dim, n_ctx, 1, k_ty, v_ty)
            .ok_or_else(|| heads_error(&format!("{}/{}", k_ty.name(), v_ty.name()), c.head_dim))?;
        Ok(Self::with_cache(model, pool, kv, None))
    }

    /// The model.
    pub fn model(&self) -> &'m Model {
        self.fwd.model
    }

    /// The tokens in the KV cache.
    pub fn history(&self) -> &[u32] {
        &self.history
    }

    /// Runs every later step with `adapter` (or the base weights); clears the cache, which was
    /// computed under other weights.
    pub fn set_lora(&mut self, adapter: Option<LoraAdapter>) {
        self.lora = adapter;
        self.truncate(0);
    }

    /// Chooses the attention kernel (see [`AttnKernel`]).
    pub fn set_attention(&mut self, kernel: AttnKernel) {
        self.fwd.set_attention(kernel);
    }

    /// Drops cached positions from `n` on, keeping the prefix for reuse.
    pub fn truncate(&mut self, n: usize) {
        self.history.truncate(n);
        if let Some(t) = self.tiers.as_mut() {
            // Blocks that a fresh run to `n` would still hold in f16 go back to their hot rows.
            let keep = self.history.len().saturating_sub(t.tail) / t.block_size;
            while t.migrated > keep {
                t.migrated -= 1;
                t.table[t.migrated] = t.migrated as u32;
            }
        }
    }

    /// Context size in tokens.
    pub fn n_ctx(&self) -> usize {
        match &self.tiers {
            Some(t) => t.n_ctx,
            None => self.kv.capacity(),
        }
    }

    /// The final normed hidden states of the last [`Logits::Hidden`] call: `[tokens × n_embd]`.
    pub fn hidden(&self) -> &[f32] {
        self.fwd.hidden()
    }

    /// Runs `tokens` after the cached ones and returns the requested logits
    /// (`[rows × n_vocab]`, rows = 1 for `Last`, `tokens.len()` for `All`, 0 for `None`).
    pub fn forward(&mut self, tokens: &[u32], want: Logits) -> Result<&[f32], Error> {
        let pos0 = self.history.len();
        if pos0 + tokens.len() > self.n_ctx() {
            return Err(Error::new(ErrorKind::ContextOverflow {
                needed: pos0 + tokens.len(),
                context: self.n_ctx(),
            }));
        }
        let seq = SeqInput {
            tokens,
            pos0,
            block_table: self.tiers.as_ref().map_or(&[0], |t| &t.table),
            logits: want,
            lora: self.lora.as_ref(),
        };
        let out = self.fwd.forward_batch(&mut self.kv, &[seq])?;
        self.history.extend_from_slice(tokens);
        if let Some(t) = self.tiers.as_mut() {
            // Whole blocks older than the tail move to the quantized tier, as the engine's do.
            let upto = self.history.len().saturating_sub(t.tail) / t.block_size;
            while t.migrated < upto {
                let (src, dst) = (t.migrated as u32, t.n_hot + t.migrated as u32);
                self.kv.migrate_block(src, dst);
                t.table[t.migrated] = dst;
                t.migrated += 1;
            }
        }
        Ok(out)
    }
}

impl<'m> Forward<'m> {
    /// A forward pass for `model` on `pool`.
    pub fn new(model: &'m Model, pool: Arc<ThreadPool>) -> Forward<'m> {
        Forward {
            model,
            pool,
            s: Scratch::default(),
            captures: Vec::new(),
            attn: AttnKernel::Auto,
        }
    }

    /// The model.
    pub fn model(&self) -> &'m Model {
        self.model
    }

    /// Chooses the attention kernel (default [`AttnKernel::Auto`]).
    pub fn set_attention(&mut self, kernel: AttnKernel) {
        self.attn = kernel;
    }

    /// Keeps the feed-forward activations of `layer` from every later step (see [`Capture`]);
    /// `None` stops capturing.
    pub fn set_capture(&mut self, layer: Option<usize>) {
        self.set_capture_layers(layer.as_slice());
    }

    /// Captures each of `layers` from every later step (a batch whose sequences want different
    /// layers); empty stops capturing. Keeps the buffers of layers captured before.
    pub fn set_capture_layers(&mut self, layers: &[usize]) {
        self.captures.retain(|c| layers.contains(&c.layer));
        for &l in layers {
            if !self.captures.iter().any(|c| c.layer == l) {
                self.captures.push(Capture {
                    layer: l,
                    ..Capture::default()
                });
            }
        }
    }

    /// What the last step captured (the first captured layer's rows).
    pub fn capture(&self) -> Option<&Capture> {
        self.captures.first()
    }

    /// What the last step captured of `layer`: rows of every token of the batch, in order.
    pub fn captured(&self, layer: usize) -> Option<&Capture> {
        self.captures.iter().find(|c| c.layer == layer)
    }

    /// The final normed hidden states of the last step's [`Logits::Hidden`] sequences' tokens,
    /// in batch order: `[tokens × n_embd]`.
    pub fn hidden(&self) -> &[f32] {
        &self.s.hidden
    }

    /// `outs[i] = ws[i] · x` for each weight, with `x` quantized once per format and one pass
    /// over the thread pool for all of them.
    fn mm<const K: usize>(
        &self,
        acts: &mut ActCache,
        x: &[f32],
        cols: usize,
        ws: [&Weight; K],
        outs: [&mut [f32]; K],
    ) {
        acts.invalidate();
        for w in ws {
            acts.prepare(&self.pool, w, x, cols);
        }
        self.run_products(acts, ws, outs);
    }

    /// [`Forward::mm`] of rows that `make(i, row)` first produces in `x` (a norm, an
    /// activation function), producing and quantizing each row in one pool task.
    fn mm_from<const K: usize>(
        &self,
        acts: &mut ActCache,
        x: &mut [f32],
        cols: usize,
        ws: [&Weight; K],
        outs: [&mut [f32]; K],
        make: &(dyn Fn(usize, &mut [f32]) + Sync),
    ) {
        acts.produce(&self.pool, ws[0], x, cols, make);
        for w in ws {
            acts.prepare(&self.pool, w, x, cols);
        }
        self.run_products(acts, ws, outs);
    }

    /// The products `outs[k] = ws[k] · acts` with activations already prepared.
    fn run_products<const K: usize>(
        &self,
        acts: &ActCache,
        ws: [&Weight; K],
        outs: [&mut [f32]; K],
    ) {
        let mut i = 0;
        let mut jobs = outs.map(|out| {
            let w = ws[i];
            i += 1;
            MatJob {
                w: self.model.mat(w),
                acts: acts.get(w),
                out,
            }
        });
        matmul_many(&self.pool, &mut jobs);
    }

    /// Adds each sequence's LoRA delta for projection `p` of layer `il` to its rows of `y`:
    /// `y[t] += scale · B·(A·x[t])` (`x: [n × in_dim]`, `y: [n × out_dim]`).
    #[allow(clippy::too_many_arguments)]
    fn lora(
        &self,
        seqs: &[SeqInput<'_>],
        il: usize,
        p: Proj,
        x: &[f32],
        in_dim: usize,
        y: &mut [f32],
        out_dim: usize,
        tmp: &mut Vec<f32>,
    ) {
        let mut t0 = 0;
        for q in seqs {
            let n = q.tokens.len();
            if let Some(pair) = q.lora.and_then(|a| a.pair(il, p)) {
                let r = pair.rank;
                grow(tmp, n * r);
                let xs = &x[t0 * in_dim..(t0 + n) * in_dim];
                gemv_batched(
                    &self.pool,
                    Gemv {
                        m: r,
                        n: in_dim,
                        lda: in_dim,
                        alpha: 1.0,
                        beta: 0.0,
                    },
                    n,
                    &pair.a,
                    0,
                    xs,
                    in_dim,
                    &mut tmp[..n * r],
                    r,
                );
                let ys = &mut y[t0 * out_dim..(t0 + n) * out_dim];
                gemv_batched(
                    &self.pool,
                    Gemv {
                        m: out_dim,
                        n: r,
                        lda: r,
                        alpha: pair.scale,
                        beta: 1.0,
                    },
                    n,
                    &pair.b,
                    0,
                    &tmp[..n * r],
                    r,
                    ys,
                    out_dim,
                );
            }
            t0 += n;
        }
    }

    /// Exchanges the logits buffer with `other`: after [`forward_batch`](Self::forward_batch)
    /// returned `rows × n_vocab` logits, `other` holds them as its first values (it may be
    /// longer), without a copy; the next pass writes into `other`'s old allocation.
    pub fn swap_logits(&mut self, other: &mut Vec<f32>) {
        std::mem::swap(&mut self.s.logits, other);
    }

    /// Runs one step over `seqs` (their new tokens in order) against the paged `kv`, and returns
    /// the logits each sequence asked for, concatenated in sequence order (`[rows × n_vocab]`).
    pub fn forward_batch(
        &mut self,
        kv: &mut KvCache,
        seqs: &[SeqInput<'_>],
    ) -> Result<&[f32], Error> {
        let m = self.model;
        let c = &m.config;
        let n: usize = seqs.iter().map(|q| q.tokens.len()).sum();
        if n == 0 {
            return Ok(&[]);
        }
        for q in seqs {
            let end = q.pos0 + q.tokens.len();
            if end > 0 && kv.slot(q.block_table, end - 1).is_none() {
                return Err(Error::new(ErrorKind::ContextOverflow {
                    needed: end,
                    context: q.block_table.len() * kv.block_size(),
                }));
            }
        }
        let (d, qd, kvd, hd, ff) = (c.n_embd, c.q_dim(), c.kv_dim(), c.head_dim, c.n_ff);
        let mut s = std::mem::take(&mut self.s);
        grow(&mut s.x, n * d);
        grow(&mut s.xn, n * d);
        grow(&mut s.q, n * qd);
        grow(&mut s.k, n * kvd);
        grow(&mut s.v, n * kvd);
        grow(&mut s.att, n * qd);
        grow(&mut s.out, n * d);
        grow(&mut s.gate, n * ff);
        grow(&mut s.up, n * ff);
        s.tok_seq.clear();
        s.tok_pos.clear();
        s.slots.clear();
        for (si, q) in seqs.iter().enumerate() {
            for (j, &t) in q.tokens.iter().enumerate() {
                let i = s.tok_seq.len();
                if let Err(e) = m.embed(t, &mut s.x[i * d..(i + 1) * d]) {
                    self.s = s;
                    return Err(e);
                }
                s.tok_seq.push(si);
                s.tok_pos.push(q.pos0 + j);
                // The same row in every layer's cache.
                s.slots
                    .push(kv.slot(q.block_table, q.pos0 + j).unwrap_or(0)); // checked above
            }
        }
        // RoPE tables for this batch's positions.
        let half = c.rope_dims / 2;
        s.rope_full.resize(n * half, (1.0, 0.0));
        s.rope_swa.resize(n * half, (1.0, 0.0));
        for i in 0..n {
            let p = s.tok_pos[i];
            rope_cache(
                p,
                c.rope_dims,
                c.rope_base,
                c.rope_freq_scale,
                m.rope_freqs.as_deref(),
                &mut s.rope_full[i * half..(i + 1) * half],
            );
            if c.sliding_window.is_some() {
                rope_cache(
                    p,
                    c.rope_dims,
                    c.rope_base_swa,
                    1.0,
                    None,
                    &mut s.rope_swa[i * half..(i + 1) * half],
                );
            }
        }

        let any_lora = seqs.iter().any(|q| q.lora.is_some());
        // Quantized caches hold Hadamard-rotated keys and values (see `KvCache::rotated`).
        let rotate = kv.rotated(hd);
        for (il, layer) in m.layers.iter().enumerate() {
            // ---- attention ----
            // Each sub-layer's output joins the residual stream in the pool tasks that norm the
            // stream for the next sub-layer (row i in task i): the previous layer's
            // feed-forward output here, the attention output before the feed-forward.
            let (xp, op) = (
                SyncPtr::new(&mut s.x[..n * d]),
                SyncPtr::new(&mut s.out[..n * d]),
            );
            let prev_ffn = il
                .checked_sub(1)
                .map(|p| m.layers[p].post_ffn_norm.as_deref());
            self.mm_from(
                &mut s.acts,
                &mut s.xn[..n * d],
                d,
                [&layer.wq, &layer.wk, &layer.wv],
                [&mut s.q[..n * qd], &mut s.k[..n * kvd], &mut s.v[..n * kvd]],
                &|i, row| {
                    // SAFETY: row i of the residual stream and of the sub-layer output belong to
                    // this task alone.
                    let (x, o) = unsafe { (xp.slice(i * d, d), op.slice(i * d, d)) };
                    if let Some(norm) = prev_ffn {
                        add_output(x, o, norm, c.rms_eps);
                    }
                    ops::rms_norm(x, &layer.attn_norm, c.rms_eps, row)
                },
            );
            if any_lora {
                self.lora(
                    seqs,
                    il,
                    Proj::Q,
                    &s.xn[..n * d],
                    d,
                    &mut s.q[..n * qd],
                    qd,
                    &mut s.lora_tmp,
                );
                self.lora(
                    seqs,
                    il,
                    Proj::K,
                    &s.xn[..n * d],
                    d,
                    &mut s.k[..n * kvd],
                    kvd,
                    &mut s.lora_tmp,
                );
                self.lora(
                    seqs,
                    il,
                    Proj::V,
                    &s.xn[..n * d],
                    d,
                    &mut s.v[..n * kvd],
                    kvd,
                    &mut s.lora_tmp,
                );
            }
            // Biases, q/k norms, RoPE (and the rotation) and the KV cache write of each token,
            // one pool task per token (its rows are its own): serial, these took ~8% of a
            // 16-sequence decode step while the other thread waited.
            let rope = if c.is_swa_layer(il) {
                &s.rope_swa
            } else {
                &s.rope_full
            };
            let (qp, kp, vp) = (
                SyncPtr::new(&mut s.q[..n * qd]),
                SyncPtr::new(&mut s.k[..n * kvd]),
                SyncPtr::new(&mut s.v[..n * kvd]),
            );
            let cold = AtomicBool::new(false);
            {
                let writer = kv.row_writer(il);
                let slots = &s.slots;
                self.pool.run(n, &|i| {
                    // SAFETY: token i's rows of q, k and v belong to this task alone.
                    let (qi, ki, vi) = unsafe {
                        (
                            qp.slice(i * qd, qd),
                            kp.slice(i * kvd, kvd),
                            vp.slice(i * kvd, kvd),
                        )
                    };
                    let cs = &rope[i * half..(i + 1) * half];
                    project_token(c, layer, cs, rotate, qi, ki, vi);
                    // SAFETY: each token of the batch has its own position, hence its own slot.
                    if !unsafe { writer.write(slots[i], ki, vi) } {
                        cold.store(true, Ordering::Relaxed);
                    }
                });
            }
            if cold.load(Ordering::Relaxed) {
                // A token whose row lies in a two-tier cache's cold tier (the writer stores hot
                // rows only): all rows through the cache's own write, hot ones again with the
                // same values.
                for i in 0..n {
                    kv.write(
                        il,
                        s.slots[i],
                        &s.k[i * kvd..(i + 1) * kvd],
                        &s.v[i * kvd..(i + 1) * kvd],
                    );
                }
            }
            let window = if c.is_swa_layer(il) {
                c.sliding_window
            } else {
                None
            };
            // A sequence with several new tokens reads each key many times: convert its keys
            // and values to f32 once (in parallel, indexed by position) instead of once per
            // query, when the cache is quantized or has a cold tier (rows dequantized one at a
            // time otherwise). Every such sequence of the batch gets its own copy (a batch of
            // several prompts' chunks under continuous batching: 16 × 1,024-token prompts with
            // `--kv-type q8_0` took 1.8× f16's TTFT while only a lone prefill had one). An
            // all-f16 cache is read in place by the multi-head kernels instead (both attention
            // kernels), with the same values and arithmetic: a prefill of 512 tokens spent half
            // its time in attention through the copy's per-row `dot_f32`/`axpy` calls. One
            // token reads each row once, so decode converts on the fly.
            let in_place =
                kv.keys_f16(il).is_some() && kv.values_f16(il).is_some() && !kv.has_cold();
            s.f32_at.clear();
            let mut total = 0;
            if !in_place {
                for q in seqs {
                    let len = (q.pos0 + q.tokens.len()) * kvd;
                    let copy = q.tokens.len() > 1 && total + len <= MAX_F32_COPY;
                    s.f32_at.push(copy.then_some(total));
                    total += if copy { len } else { 0 };
                }
            }
            let kv_f32 = if total > 0 {
                grow(&mut s.k32, total);
                grow(&mut s.v32, total);
                let (kp, vp) = (
                    SyncPtr::new(&mut s.k32[..total]),
                    SyncPtr::new(&mut s.v32[..total]),
                );
                // Tasks of 64 positions of one sequence: (sequence, first position).
                s.copy_tasks.clear();
                for (si, q) in seqs.iter().enumerate() {
                    if s.f32_at[si].is_some() {
                        let first = window.map_or(0, |w| (q.pos0 + 1).saturating_sub(w));
                        let end = q.pos0 + q.tokens.len();
                        s.copy_tasks
                            .extend((first..end).step_by(64).map(|p| (si, p)));
                    }
                }
                let (kvr, at, tasks) = (&*kv, &s.f32_at, &s.copy_tasks);
                self.pool.run(tasks.len(), &|t| {
                    let (si, p0) = tasks[t];
                    let q = &seqs[si];
                    let base = at[si].unwrap_or(0);
                    for p in p0..(p0 + 64).min(q.pos0 + q.tokens.len()) {
                        let r = kvr.slot(q.block_table, p).unwrap_or(0);
                        let o = base + p * kvd;
                        // SAFETY: position p's rows of sequence si's region of both buffers
                        // belong to this task alone (regions are disjoint, tasks split them).
                        let (kd, vd) = unsafe { (kp.slice(o, kvd), vp.slice(o, kvd)) };
                        kvr.read(il, false, r, 0, kd);
                        kvr.read(il, true, r, 0, vd);
                    }
                });
                Some(F32Copy {
                    k: &s.k32[..total],
                    v: &s.v32[..total],
                    at: &s.f32_at,
                })
            } else {
                None
            };
            attention(
                &self.pool,
                c,
                kv,
                seqs,
                &s.tok_seq,
                &s.tok_pos,
                kv_f32,
                il,
                window,
                self.attn,
                &s.q[..n * qd],
                &mut s.att[..n * qd],
            );
            if rotate {
                // Values were stored rotated: rotate each head's output back.
                s.att[..n * qd].chunks_exact_mut(hd).for_each(ops::hadamard);
            }
            self.mm(
                &mut s.acts,
                &s.att[..n * qd],
                qd,
                [&layer.wo],
                [&mut s.out[..n * d]],
            );
            if any_lora {
                self.lora(
                    seqs,
                    il,
                    Proj::O,
                    &s.att[..n * qd],
                    qd,
                    &mut s.out[..n * d],
                    d,
                    &mut s.lora_tmp,
                );
            }

            // ---- feed-forward ----
            let (xp, op) = (
                SyncPtr::new(&mut s.x[..n * d]),
                SyncPtr::new(&mut s.out[..n * d]),
            );
            let post_attn = layer.post_attn_norm.as_deref();
            self.mm_from(
                &mut s.acts,
                &mut s.xn[..n * d],
                d,
                [&layer.gate, &layer.up],
                [&mut s.gate[..n * ff], &mut s.up[..n * ff]],
                &|i, row| {
                    // SAFETY: as above.
                    let (x, o) = unsafe { (xp.slice(i * d, d), op.slice(i * d, d)) };
                    add_output(x, o, post_attn, c.rms_eps);
                    ops::rms_norm(x, &layer.ffn_norm, c.rms_eps, row)
                },
            );
            if any_lora {
                self.lora(
                    seqs,
                    il,
                    Proj::Gate,
                    &s.xn[..n * d],
                    d,
                    &mut s.gate[..n * ff],
                    ff,
                    &mut s.lora_tmp,
                );
                self.lora(
                    seqs,
                    il,
                    Proj::Up,
                    &s.xn[..n * d],
                    d,
                    &mut s.up[..n * ff],
                    ff,
                    &mut s.lora_tmp,
                );
            }
            // The gated activation, row by row in the pool tasks that quantize it for `down`
            // (tanh/exp are not cheap).
            let up = &s.up[..n * ff];
            let gemma = c.arch == Arch::Gemma3;
            self.mm_from(
                &mut s.acts,
                &mut s.gate[..n * ff],
                ff,
                [&layer.down],
                [&mut s.out[..n * d]],
                &|i, g| {
                    if gemma {
                        ops::geglu(g, &up[i * ff..(i + 1) * ff]);
                    } else {
                        ops::swiglu(g, &up[i * ff..(i + 1) * ff]);
                    }
                },
            );
            for cap in self.captures.iter_mut().filter(|c| c.layer == il) {
                cap.act.clear();
                cap.act.extend_from_slice(&s.gate[..n * ff]);
                cap.resid.clear();
                cap.resid.extend_from_slice(&s.x[..n * d]);
                cap.down.clear();
                cap.down.extend_from_slice(&s.out[..n * d]);
            }
            if any_lora {
                self.lora(
                    seqs,
                    il,
                    Proj::Down,
                    &s.gate[..n * ff],
                    ff,
                    &mut s.out[..n * d],
                    d,
                    &mut s.lora_tmp,
                );
            }
        }
        // The last layer's feed-forward output (the others joined in the next layer's tasks).
        if let Some(last) = m.layers.last() {
            let norm = last.post_ffn_norm.as_deref();
            for (x, o) in s.x[..n * d]
                .chunks_exact_mut(d)
                .zip(s.out[..n * d].chunks_exact_mut(d))
            {
                add_output(x, o, norm, c.rms_eps);
            }
        }
        for cap in self.captures.iter_mut() {
            cap.last.clear();
            cap.last.extend_from_slice(&s.x[..n * d]);
        }
        // Rows that need logits: per sequence, its last token, all of them, or none.
        let mut rows = 0;
        let mut first = 0;
        s.hidden.clear();
        for q in seqs {
            if q.logits == Logits::Hidden {
                for j in 0..q.tokens.len() {
                    let (src, dst) = ((first + j) * d, s.hidden.len());
                    s.hidden.resize(dst + d, 0.0);
                    ops::rms_norm(
                        &s.x[src..src + d],
                        &m.output_norm,
                        c.rms_eps,
                        &mut s.hidden[dst..dst + d],
                    );
                }
            }
            let (lo, hi) = match q.logits {
                Logits::None | Logits::Hidden => (0, 0),
                Logits::Last => (q.tokens.len().saturating_sub(1), q.tokens.len()),
                Logits::All => (0, q.tokens.len()),
                Logits::From(k) => (k.min(q.tokens.len()), q.tokens.len()),
            };
            for j in lo..hi {
                let src = (first + j) * d;
                let (x, xn) = (&s.x, &mut s.xn);
                ops::rms_norm(
                    &x[src..src + d],
                    &m.output_norm,
                    c.rms_eps,
                    &mut xn[rows * d..(rows + 1) * d],
                );
                rows += 1;
            }
            first += q.tokens.len();
        }
        if rows == 0 {
            self.s = s;
            return Ok(&[]);
        }
        grow(&mut s.logits, rows * c.n_vocab);
        self.mm(
            &mut s.acts,
            &s.xn[..rows * d],
            d,
            [&m.output],
            [&mut s.logits[..rows * c.n_vocab]],
        );
        self.s = s;
        Ok(&self.s.logits[..rows * c.n_vocab])
    }
}

/// The LM head over rows of final-normed hidden states (`normed: [rows × n_embd]`) into
/// `out` (`[rows × n_vocab]`), with the kernels the forward pass uses (one pass over the head
/// for all rows): the full-vocabulary check of a trainer that works on candidate tokens.
pub fn head_logits(model: &Model, pool: &ThreadPool, normed: &[f32], out: &mut [f32]) {
    let m = model.mat(&model.output);
    let mut acts = QuantActs::default();
    acts.quantize_par(
        pool,
        ActFormat::for_weight(m.ty),
        normed,
        model.config.n_embd,
    );
    ruvllm_kernels::matmul::matmul(pool, &m, &acts, out);
}

/// The base model's logits of rows whose last layer was captured ([`Capture`]'s `resid` and
/// base `down`, `[rows × n_embd]` each) into `out` (`[rows × n_vocab]`): the forward pass's
/// post-FFN norm, residual add, final norm and head, so the values are the forward pass's bit
/// for bit. A learner gets a generation's candidate logits from activations kept while it ran.
pub fn logits_from_last_layer(
    model: &Model,
    pool: &ThreadPool,
    resid: &[f32],
    down: &[f32],
    out: &mut [f32],
) {
    let c = &model.config;
    let d = c.n_embd;
    let post = model.layers.last().and_then(|l| l.post_ffn_norm.as_ref());
    let mut normed = vec![0f32; resid.len()];
    let mut o = vec![0f32; d];
    for ((x, dn), xn) in resid
        .chunks_exact(d)
        .zip(down.chunks_exact(d))
        .zip(normed.chunks_exact_mut(d))
    {
        o.copy_from_slice(dn);
        if let Some(w) = post {
            ops::rms_norm_inplace(&mut o, w, c.rms_eps);
        }
        o.iter_mut().zip(x).for_each(|(o, x)| *o += x);
        ops::rms_norm(&o, &model.output_norm, c.rms_eps, xn);
    }
    head_logits(model, pool, &normed, out);
}

/// Query heads handled together per task (they share the KV head's converted keys/values).
const MAX_GROUP: usize = ops::MAX_HEADS;

/// Positions per tile of the flash kernel: scores of one tile live on the stack.
const FLASH_TILE: usize = 32;

/// Spans (positions one query attends to) longer than this use the flash kernel under
/// [`AttnKernel::Auto`]; shorter ones the two-pass kernel, whose arithmetic follows llama.cpp's
/// default (and with it the golden outputs' near-ties).
pub const FLASH_MIN_SPAN: usize = 1024;

/// Which attention kernel a forward pass uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttnKernel {
    /// Flash for spans longer than [`FLASH_MIN_SPAN`], two-pass for the rest.
    #[default]
    Auto,
    /// Online softmax (flash-style) over tiles of keys and values: one pass, no score row.
    Flash,
    /// Scores of the whole span, softmax, then the weighted values (llama.cpp's `-fa off`).
    TwoPass,
}

impl AttnKernel {
    /// Parses `auto`, `on` (flash) or `off` (two-pass), as llama.cpp's `--flash-attn`.
    pub fn parse(s: &str) -> Option<AttnKernel> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Some(AttnKernel::Auto),
            "on" | "flash" => Some(AttnKernel::Flash),
            "off" | "two-pass" => Some(AttnKernel::TwoPass),
            _ => None,
        }
    }

    fn flash_for(self, span: usize) -> bool {
        match self {
            AttnKernel::Auto => span > FLASH_MIN_SPAN,
            AttnKernel::Flash => true,
            AttnKernel::TwoPass => false,
        }
    }
}

/// Rows of a quantized cache converted at a time for the multi-head kernels.
const CONVERTED_ROWS: usize = 32;

thread_local! {
    /// Per-thread rows of a quantized cache converted to f32, `[CONVERTED_ROWS × hd]`.
    static CONVERTED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Per-thread attention scores, `[MAX_GROUP × positions]`, grown to the longest context seen
    /// and reused (no allocation per token once warm).
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Per-thread buffers of one attention task, `[2·MAX_GROUP × hd]`: the group's rounded
    /// queries and its accumulators (reused, never zeroed whole).
    static TASK_BUF: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Adds a sub-layer's output row `o` to the residual stream row `x`, after the sub-layer's
/// output norm (Gemma-3's post-attention and post-feed-forward norms) when it has one (`o`
/// is normed in place).
fn add_output(x: &mut [f32], o: &mut [f32], norm: Option<&[f32]>, eps: f32) {
    if let Some(w) = norm {
        ops::rms_norm_inplace(o, w, eps);
    }
    x.iter_mut().zip(o.iter()).for_each(|(x, o)| *x += o);
}

/// One token's projections made ready for attention: biases added, q and k heads normed
/// (Gemma-3), RoPE with the token's table `cs`, and the Hadamard rotation of a rotated cache
/// (`q: [q_dim]`, `k` and `v`: `[kv_dim]`).
fn project_token(
    c: &crate::Config,
    layer: &crate::weights::Layer,
    cs: &[(f32, f32)],
    rotate: bool,
    q: &mut [f32],
    k: &mut [f32],
    v: &mut [f32],
) {
    for (x, b) in [
        (&mut *q, &layer.bq),
        (&mut *k, &layer.bk),
        (&mut *v, &layer.bv),
    ] {
        if let Some(b) = b {
            x.iter_mut().zip(b).for_each(|(x, b)| *x += b);
        }
    }
    let hd = c.head_dim;
    for (x, norm) in [(&mut *q, &layer.q_norm), (&mut *k, &layer.k_norm)] {
        for h in x.chunks_exact_mut(hd) {
            if let Some(w) = norm {
                ops::rms_norm_inplace(h, w, c.rms_eps);
            }
            rope_apply(h, cs, c.rope_dims, c.rope_style);
            if rotate {
                ops::hadamard(h);
            }
        }
    }
    if rotate {
        v.chunks_exact_mut(hd).for_each(ops::hadamard);
    }
}

/// Causal attention for `n` new tokens at positions `pos0..pos0+n`, one task per (token, KV
/// head) covering the query heads that share that KV head (GQA), optionally limited to a sliding
/// window of the most recent `window` positions. Each key and value row is read once per task
/// for all of its query heads: in place from an f16 cache, else from the prefill's f32 copy or
/// converted one at a time ([`HeadRows`]); scores always with [`ops::dot_f32`]'s arithmetic.
///
/// Two kernels (see [`AttnKernel`]). The two-pass kernel follows llama.cpp's CPU path (flash
/// attention off, its default here) so that near-ties resolve the same way: q is rounded to f16
/// (its K·Q runs f16 × f16 with f32 sums), the softmax sums in f64, and the probabilities are
/// rounded to f16 before they weight the values; its scores live in one row per query head.
/// The flash kernel reads keys and values tile by tile ([`FLASH_TILE`] positions) with an
/// online softmax — a running maximum and sum, the accumulated output rescaled when the maximum
/// grows — so nothing grows with the span; it keeps the f16-rounded q but not the f16
/// probabilities. A one-sequence prefill runs its flash queries in blocks ([`flash_block`]),
/// bit-identical to decoding each token alone.
#[allow(clippy::too_many_arguments)]
fn attention(
    pool: &ThreadPool,
    c: &crate::Config,
    kv: &KvCache,
    seqs: &[SeqInput<'_>],
    tok_seq: &[usize],
    tok_pos: &[usize],
    kv_f32: Option<F32Copy<'_>>,
    layer: usize,
    window: Option<usize>,
    kernel: AttnKernel,
    q: &[f32],
    out: &mut [f32],
) {
    let n = tok_pos.len();
    let (hd, nkv, kvd, qd) = (c.head_dim, c.n_head_kv, c.kv_dim(), c.q_dim());
    let group = c.n_head / c.n_head_kv;
    let keys = kv.keys_f16(layer);
    let values = kv.values_f16(layer);
    let scale = c.attn_scale;
    let optr = SyncPtr::new(out);
    let sub_groups = group.div_ceil(MAX_GROUP);
    let sub = nkv * sub_groups;
    // A one-sequence prefill without a sliding window runs the tokens whose span takes the
    // flash kernel in blocks of FLASH_QUERIES (positions grow with the token index, so they
    // are the tokens from f0 on); the others one task per token.
    let f0 = match (seqs.len(), window) {
        (1, None) if n > 1 => (0..n)
            .find(|&i| kernel.flash_for(tok_pos[i] + 1))
            .unwrap_or(n),
        _ => n,
    };
    let n_blocks = (n - f0).div_ceil(FLASH_QUERIES);
    // With enough tokens to keep every thread busy (a batch of decoding sequences), one task
    // takes all of a token's KV heads: it reads the token's key and value rows front to back
    // (the heads are adjacent in a row) and there are a third as many tasks to hand out; a
    // single decoding sequence keeps one task per KV head so both threads share its work.
    let heads_per_task = if f0 >= 4 * pool.n_threads() { sub } else { 1 };
    let tasks_per_token = sub / heads_per_task;
    let token_tasks = f0 * tasks_per_token;
    // KV head g's key and value rows for sequence `si`.
    let head_rows = |g: usize, si: usize| {
        let copy = kv_f32.and_then(|x| Some((x, x.at.get(si).copied().flatten()?)));
        let keys = HeadRows {
            f32_rows: copy.map(|(x, o)| &x.k[o..]),
            f16_rows: keys,
            kv,
            layer,
            value: false,
            table: seqs[si].block_table,
            kvd,
            hd,
            koff: g * hd,
        };
        let values = HeadRows {
            f32_rows: copy.map(|(x, o)| &x.v[o..]),
            f16_rows: values,
            value: true,
            ..keys
        };
        (keys, values)
    };
    // Attention of token i for the query heads of KV head group `rest` (`g`, sub-group `sg`).
    let token_heads = |i: usize, rest: usize| {
        let (g, sg) = (rest / sub_groups, rest % sub_groups);
        let h0 = g * group + sg * MAX_GROUP;
        let gn = (group - sg * MAX_GROUP).min(MAX_GROUP);
        let pos = tok_pos[i];
        let start = window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let len = pos + 1 - start;
        let (keys, values) = head_rows(g, tok_seq[i]);
        TASK_BUF.with(|cell| {
            let mut buf = cell.borrow_mut();
            if buf.len() < 2 * MAX_GROUP * hd {
                buf.resize(2 * MAX_GROUP * hd, 0.0);
            }
            // [queries | accumulators], no zeroing per task.
            let (qs, acc) = buf.split_at_mut(MAX_GROUP * hd);
            // The group's queries rounded to f16 (as llama.cpp's), head j at j·hd: [gn × hd] (the
            // group's heads are adjacent in q).
            let qs = &mut qs[..gn * hd];
            qs.copy_from_slice(&q[i * qd + h0 * hd..i * qd + (h0 + gn) * hd]);
            ops::round_f16(qs);
            let qs = &*qs;
            // Head j's output at j·hd: [gn × hd].
            let acc = &mut acc[..gn * hd];
            acc.fill(0.0);
            if kernel.flash_for(len) {
                let (mut mx, mut sum) = ([f32::NEG_INFINITY; MAX_GROUP], [0f32; MAX_GROUP]);
                let mut tile = [0f32; MAX_GROUP * FLASH_TILE];
                let mut p0 = start;
                while p0 <= pos {
                    let p1 = (p0 + FLASH_TILE).min(pos + 1);
                    flash_tile(
                        (&keys, &values),
                        qs,
                        (p0, p1),
                        scale,
                        &mut tile,
                        (&mut mx[..gn], &mut sum[..gn]),
                        acc,
                    );
                    p0 = p1;
                }
                for j in 0..gn {
                    let inv = 1.0 / sum[j];
                    // SAFETY: this task alone writes query head h0 + j of token i, inside the buffer.
                    let o = unsafe { optr.slice(i * qd + (h0 + j) * hd, hd) };
                    o.iter_mut()
                        .zip(&acc[j * hd..(j + 1) * hd])
                        .for_each(|(o, a)| *o = a * inv);
                }
                return;
            }
            SCORES.with(|cell| {
                let mut scores = cell.borrow_mut();
                if scores.len() < gn * len {
                    scores.resize(gn * len, 0.0);
                }
                keys.scores(qs, start, pos + 1, &mut scores[..], len);
                for j in 0..gn {
                    let sj = &mut scores[j * len..(j + 1) * len];
                    sj.iter_mut().for_each(|v| *v *= scale);
                    let mx = ops::max_f32(sj);
                    sj.iter_mut().for_each(|v| *v -= mx);
                    ops::exp_in_place(sj);
                    let sum = ops::sum_f64(sj);
                    let inv = (1.0 / sum) as f32;
                    sj.iter_mut().for_each(|v| *v *= inv);
                    ops::round_f16(sj);
                }
                values.weigh(&scores, len, start, pos + 1, acc);
                for j in 0..gn {
                    // SAFETY: this task alone writes query head h0 + j of token i, inside the buffer.
                    let o = unsafe { optr.slice(i * qd + (h0 + j) * hd, hd) };
                    o.copy_from_slice(&acc[j * hd..(j + 1) * hd]);
                }
            });
        });
    };
    pool.run(token_tasks + n_blocks * sub, &|task| {
        if task >= token_tasks {
            let (b, rest) = ((task - token_tasks) / sub, (task - token_tasks) % sub);
            let (g, sg) = (rest / sub_groups, rest % sub_groups);
            let i0 = f0 + b * FLASH_QUERIES;
            let gn = (group - sg * MAX_GROUP).min(MAX_GROUP);
            flash_block(
                c,
                q,
                tok_pos,
                (i0, (i0 + FLASH_QUERIES).min(n)),
                (g * group + sg * MAX_GROUP, gn),
                head_rows(g, 0),
                optr,
            );
            return;
        }
        let (i, first) = (
            task / tasks_per_token,
            task % tasks_per_token * heads_per_task,
        );
        for rest in first..first + heads_per_task {
            token_heads(i, rest);
        }
    });
}

/// One tile of the flash kernel (positions `p0..p1`, at most [`FLASH_TILE`]) for the `gn`
/// query heads `qs` (`[gn × hd]`) sharing one KV head: the tile's scores (each key read once for
/// all heads, `tile[j·FLASH_TILE + p − p0]`), scaled; per head the online softmax's running
/// maximum and sum (`state`) updated — the head's accumulated output in `acc` (`[gn × hd]`)
/// shrinks when the maximum grows — and the tile's unnormalized probabilities weighting its
/// values into `acc`.
fn flash_tile(
    (keys, values): (&HeadRows<'_>, &HeadRows<'_>),
    qs: &[f32],
    (p0, p1): (usize, usize),
    scale: f32,
    tile: &mut [f32; MAX_GROUP * FLASH_TILE],
    (mx, sum): (&mut [f32], &mut [f32]),
    acc: &mut [f32],
) {
    let (hd, m) = (keys.hd, p1 - p0);
    keys.scores(qs, p0, p1, tile, FLASH_TILE);
    for (j, (mx, sum)) in mx.iter_mut().zip(sum.iter_mut()).enumerate() {
        let t = &mut tile[j * FLASH_TILE..j * FLASH_TILE + m];
        t.iter_mut().for_each(|v| *v *= scale);
        let mtile = mx.max(ops::max_f32(t));
        if mtile > *mx && *sum > 0.0 {
            // The maximum grew: what was accumulated against the old one shrinks.
            let c = (*mx - mtile).exp();
            *sum *= c;
            acc[j * hd..(j + 1) * hd].iter_mut().for_each(|a| *a *= c);
        }
        *mx = mtile;
        t.iter_mut().for_each(|v| *v -= mtile);
        ops::exp_in_place(t);
        *sum += ops::sum_f64(t) as f32;
    }
    values.weigh(&tile[..], FLASH_TILE, p0, p1, acc);
}

/// Query tokens whose flash attention one prefill task runs together (they share each key and
/// value tile while it is in L1).
const FLASH_QUERIES: usize = 8;

thread_local! {
    /// Per-thread state of a block of flash queries: rounded queries and accumulators,
    /// `[2 × FLASH_QUERIES × MAX_GROUP × hd]`.
    static FLASH_BLOCK: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The flash kernel for query tokens `i0..i1` of a one-sequence prefill (positions
/// `tok_pos[i0..i1]`, no sliding window) and the `gn` query heads from `h0` sharing one KV head
/// (its `keys` and `values`): each key tile is read while in L1 for all the block's queries.
/// Every query's arithmetic is exactly the per-token flash path's (same tiles, same operations
/// in the same order), so results do not depend on how queries are grouped.
fn flash_block(
    c: &crate::Config,
    q: &[f32],
    tok_pos: &[usize],
    (i0, i1): (usize, usize),
    (h0, gn): (usize, usize),
    (keys, values): (HeadRows<'_>, HeadRows<'_>),
    out: SyncPtr<f32>,
) {
    let (hd, qd) = (c.head_dim, c.q_dim());
    let scale = c.attn_scale;
    let nq = i1 - i0;
    FLASH_BLOCK.with(|cell| {
        let mut buf = cell.borrow_mut();
        let per = MAX_GROUP * hd;
        if buf.len() < 2 * FLASH_QUERIES * per {
            buf.resize(2 * FLASH_QUERIES * per, 0.0);
        }
        let (qs, accs) = buf.split_at_mut(FLASH_QUERIES * per);
        for t in 0..nq {
            let i = i0 + t;
            let qt = &mut qs[t * per..t * per + gn * hd];
            qt.copy_from_slice(&q[i * qd + h0 * hd..i * qd + (h0 + gn) * hd]);
            ops::round_f16(qt);
            accs[t * per..t * per + gn * hd].fill(0.0);
        }
        let mut mx = [[f32::NEG_INFINITY; MAX_GROUP]; FLASH_QUERIES];
        let mut sum = [[0f32; MAX_GROUP]; FLASH_QUERIES];
        let mut tile = [0f32; MAX_GROUP * FLASH_TILE];
        let last = tok_pos[i1 - 1];
        let mut p0 = 0;
        while p0 <= last {
            for t in 0..nq {
                let pos = tok_pos[i0 + t];
                if pos < p0 {
                    continue;
                }
                flash_tile(
                    (&keys, &values),
                    &qs[t * per..t * per + gn * hd],
                    (p0, (p0 + FLASH_TILE).min(pos + 1)),
                    scale,
                    &mut tile,
                    (&mut mx[t][..gn], &mut sum[t][..gn]),
                    &mut accs[t * per..t * per + gn * hd],
                );
            }
            p0 += FLASH_TILE;
        }
        for t in 0..nq {
            let i = i0 + t;
            for j in 0..gn {
                let inv = 1.0 / sum[t][j];
                // SAFETY: this task alone writes query head h0 + j of token i, inside the buffer.
                let o = unsafe { out.slice(i * qd + (h0 + j) * hd, hd) };
                let a = &accs[t * per + j * hd..t * per + (j + 1) * hd];
                o.iter_mut().zip(a).for_each(|(o, a)| *o = a * inv);
            }
        }
    });
}

/// Most f32 values of keys (and as many of values) a batch's copies take: a sequence whose
/// copy would pass it reads its rows through the cache's decoder instead (64 MiB each).
const MAX_F32_COPY: usize = 16 << 20;

/// A layer's keys and values converted to f32 for the sequences of a batch with several new
/// tokens: sequence `si`'s position `p` at `at[si] + p·kv_dim` of `k` and `v`.
#[derive(Clone, Copy)]
struct F32Copy<'a> {
    k: &'a [f32],
    v: &'a [f32],
    at: &'a [Option<usize>],
}

/// A run of rows as [`HeadRows::each_run`] hands it out.
enum RunRows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

/// Where one KV head's key (or value) rows of a layer are read from: the f32 copy made for a
/// prefill batch (indexed by position) when there is one, else the cache rows the block table
/// points to (directly from f16 on the default path, through the cache's decoder for other
/// types).
#[derive(Clone, Copy)]
struct HeadRows<'a> {
    f32_rows: Option<&'a [f32]>,
    f16_rows: Option<&'a [f16]>,
    kv: &'a KvCache,
    layer: usize,
    value: bool,
    table: &'a [u32],
    kvd: usize,
    /// Values per head.
    hd: usize,
    /// Offset of the head in a row.
    koff: usize,
}

impl<'a> HeadRows<'a> {
    /// The prefill's f32 copy from position `p` on (this head's values of each position at
    /// stride `kvd`), when rows come from it.
    #[inline]
    fn f32_from(&self, p: usize) -> Option<&'a [f32]> {
        self.f32_rows.map(|r| &r[p * self.kvd + self.koff..])
    }

    /// The f16 cache rows of positions `p..p + m` read in place, `m` reaching to the end of
    /// `p`'s block or to `end` (rows of one block are consecutive slots, `kvd` apart): None
    /// when the cache is not f16 or `p`'s slot lies outside the f16 rows (a two-tier cache's
    /// cold blocks). [`each_run`](Self::each_run) asks only when there is no f32 copy.
    #[inline]
    fn f16_run(&self, p: usize, end: usize) -> Option<(&'a [f16], usize)> {
        let hd = self.hd;
        let h = self.f16_rows?;
        let bs = self.kv.block_size();
        let m = (bs - p % bs).min(end - p);
        let lo = self.kv.slot(self.table, p)? * self.kvd + self.koff;
        h.get(lo..lo + (m - 1) * self.kvd + hd)
            .map(|rows| (rows, m))
    }

    /// Walks the rows at positions `p0..p1` in runs, calling `f(offset, rows, stride, m)` for
    /// the `m` rows from position `p0 + offset` on, `stride` apart: the prefill's f32 copy in
    /// one run, an f16 cache block by block in place, any other rows converted to f32 block by
    /// block ([`convert_run`](Self::convert_run)).
    fn each_run(&self, p0: usize, p1: usize, mut f: impl FnMut(usize, RunRows<'_>, usize, usize)) {
        if let Some(rows) = self.f32_from(p0) {
            f(0, RunRows::F32(rows), self.kvd, p1 - p0);
            return;
        }
        let mut p = p0;
        while p < p1 {
            let m = match self.f16_run(p, p1) {
                Some((rows, m)) => {
                    f(p - p0, RunRows::F16(rows), self.kvd, m);
                    m
                }
                None => CONVERTED.with(|cell| {
                    let mut rows = cell.borrow_mut();
                    let m = self.convert_run(p, p1, &mut rows);
                    f(p - p0, RunRows::F32(&rows[..m * self.hd]), self.hd, m);
                    m
                }),
            };
            p += m;
        }
    }

    /// Scores of the query heads `qs` (`[gn × hd]`) against the rows at positions `p0..p1`:
    /// `out[j·out_stride + p − p0] = qs_j · row_p`, each with exactly [`ops::dot_f32`]'s
    /// arithmetic, every row read once for all heads ([`each_run`](Self::each_run)).
    fn scores(&self, qs: &[f32], p0: usize, p1: usize, out: &mut [f32], out_stride: usize) {
        let hd = self.hd;
        self.each_run(p0, p1, |o, rows, stride, m| match rows {
            RunRows::F32(r) => {
                ops::dot_rows_f32_heads(qs, hd, r, stride, m, &mut out[o..], out_stride)
            }
            RunRows::F16(r) => {
                ops::dot_rows_f16_heads(qs, hd, r, stride, m, &mut out[o..], out_stride)
            }
        });
    }

    /// The rows at positions `p..p + m` converted into `rows` (`[m × hd]`, f32), `m` reaching
    /// to the end of `p`'s block, to `end` or to [`CONVERTED_ROWS`]: a quantized cache's rows
    /// (or a two-tier cache's cold ones) decoded once for all query heads of the group and
    /// handed to the multi-head kernels, whose arithmetic per row and head is that of
    /// `dot_f32` and `axpy` on the decoded row.
    fn convert_run(&self, p: usize, end: usize, rows: &mut Vec<f32>) -> usize {
        let hd = self.hd;
        let bs = self.kv.block_size();
        let m = (bs - p % bs).min(end - p).min(CONVERTED_ROWS);
        if rows.len() < m * hd {
            rows.resize(m * hd, 0.0);
        }
        // The block's rows are consecutive slots.
        let slot = self.kv.slot(self.table, p).unwrap_or(0);
        self.kv.read_run(
            self.layer,
            self.value,
            slot,
            self.koff,
            hd,
            &mut rows[..m * hd],
        );
        m
    }

    /// The weighted sum of the rows at positions `p0..p1` into the heads' accumulators `acc`
    /// (`[gn × hd]`): `acc_j += Σ_p w[j·w_stride + p − p0] · row_p`, per element the operations
    /// of one [`ops::axpy`] per row in position order; rows read as in [`scores`](Self::scores).
    fn weigh(&self, w: &[f32], w_stride: usize, p0: usize, p1: usize, acc: &mut [f32]) {
        let hd = self.hd;
        self.each_run(p0, p1, |o, rows, stride, m| match rows {
            RunRows::F32(r) => {
                ops::weighted_sum_f32_heads(&w[o..], w_stride, r, stride, m, acc, hd)
            }
            RunRows::F16(r) => {
                ops::weighted_sum_f16_heads(&w[o..], w_stride, r, stride, m, acc, hd)
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ruvllm_kernels::ops::RopeStyle;
    use ruvllm_kernels::uniform;

    fn config(n_head: usize, n_head_kv: usize, head_dim: usize) -> crate::Config {
        crate::Config {
            arch: Arch::Llama,
            arch_name: "llama".into(),
            n_layer: 1,
            n_embd: n_head * head_dim,
            n_head,
            n_head_kv,
            head_dim,
            n_ff: 4,
            n_vocab: 4,
            n_ctx_train: 4096,
            rms_eps: 1e-5,
            rope_base: 10000.0,
            rope_freq_scale: 1.0,
            rope_base_swa: 10000.0,
            rope_dims: head_dim,
            rope_style: RopeStyle::Normal,
            sliding_window: None,
            swa_pattern: 1,
            embed_scale: None,
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
        }
    }

    /// Attention of one query row against the cache, in f64 with the kernels' inputs (q rounded
    /// to f16 as both kernels do; keys and values as the cache holds them).
    fn reference(
        c: &crate::Config,
        kv: &KvCache,
        table: &[u32],
        q: &[f32],
        pos: usize,
        window: Option<usize>,
    ) -> Vec<f32> {
        let (hd, kvd, group) = (c.head_dim, c.kv_dim(), c.n_head / c.n_head_kv);
        let start = window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let mut out = vec![0f32; c.q_dim()];
        let (mut k, mut v) = (vec![0f32; kvd], vec![0f32; kvd]);
        for h in 0..c.n_head {
            let g = h / group;
            let qh: Vec<f64> = q[h * hd..(h + 1) * hd]
                .iter()
                .map(|x| f16::from_f32(*x).to_f32() as f64)
                .collect();
            let mut s = Vec::new();
            for p in start..=pos {
                kv.read(0, false, kv.slot(table, p).unwrap(), 0, &mut k);
                s.push(
                    qh.iter()
                        .zip(&k[g * hd..(g + 1) * hd])
                        .map(|(a, b)| a * *b as f64)
                        .sum::<f64>()
                        * c.attn_scale as f64,
                );
            }
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
            let mut o = vec![0f64; hd];
            for (i, p) in (start..=pos).enumerate() {
                kv.read(0, true, kv.slot(table, p).unwrap(), 0, &mut v);
                let w = (s[i] - m).exp() / z;
                o.iter_mut()
                    .zip(&v[g * hd..(g + 1) * hd])
                    .for_each(|(o, x)| *o += w * *x as f64);
            }
            out[h * hd..(h + 1) * hd]
                .iter_mut()
                .zip(&o)
                .for_each(|(d, s)| *d = *s as f32);
        }
        out
    }

    /// Both attention kernels against an f64 reference, for GQA with spans across many flash
    /// tiles and 16-position cache blocks (in reverse order) (and a sliding window), reading the
    /// f16 rows in place and f32 copies. The flash kernel is within ~6e-7 of the reference; the
    /// two-pass one ~2.5e-4 (its probabilities are rounded to f16, as llama.cpp's are). The
    /// flash prefill runs its 11 queries in blocks (8 + 3) and must equal, bit for bit, the
    /// per-token path that decoding takes (each token alone), from f16 rows and f32 copies alike.
    #[test]
    fn flash_and_two_pass_kernels_match_an_f64_reference() {
        let pool = ThreadPool::new(2);
        for (n_head, n_head_kv, hd, n_pos, window) in [
            (4, 2, 64, 300usize, None),
            (8, 1, 128, 297, None),
            (4, 4, 32, 200, Some(50)),
        ] {
            let c = config(n_head, n_head_kv, hd);
            let (kvd, qd) = (c.kv_dim(), c.q_dim());
            let bs = 16;
            let n_blocks = n_pos.div_ceil(bs);
            let table: Vec<u32> = (0..n_blocks as u32).rev().collect();
            let mut kv = KvCache::new(1, kvd, bs, n_blocks);
            let keys = uniform(n_pos * kvd, 1, 2.0);
            let vals = uniform(n_pos * kvd, 2, 1.0);
            for p in 0..n_pos {
                kv.write(
                    0,
                    kv.slot(&table, p).unwrap(),
                    &keys[p * kvd..(p + 1) * kvd],
                    &vals[p * kvd..(p + 1) * kvd],
                );
            }
            // The last 11 positions as new tokens of one sequence.
            let n = 11;
            let q = uniform(n * qd, 3, 3.0);
            let tokens = vec![0u32; n];
            let seqs = [SeqInput {
                tokens: &tokens,
                pos0: n_pos - n,
                block_table: &table,
                logits: Logits::None,
                lora: None,
            }];
            let tok_seq = vec![0usize; n];
            let tok_pos: Vec<usize> = (n_pos - n..n_pos).collect();
            // The f32 copies are indexed by position.
            let (k32, v32) = (keys.clone(), vals.clone());
            for p in 0..n_pos {
                let mut row = vec![0f32; kvd];
                kv.read(0, false, kv.slot(&table, p).unwrap(), 0, &mut row);
                assert_eq!(
                    row,
                    k32[p * kvd..(p + 1) * kvd]
                        .iter()
                        .map(|x| f16::from_f32(*x).to_f32())
                        .collect::<Vec<_>>()
                );
            }
            let widen = |x: &[f32]| {
                x.iter()
                    .map(|v| f16::from_f32(*v).to_f32())
                    .collect::<Vec<_>>()
            };
            let (k32, v32) = (widen(&k32), widen(&v32));
            // Each token alone (a decoding step) through the per-token flash path.
            let mut per_token_flash = vec![0f32; n * qd];
            for i in 0..n {
                let one = [SeqInput {
                    tokens: &tokens[..1],
                    pos0: tok_pos[i],
                    block_table: &table,
                    logits: Logits::None,
                    lora: None,
                }];
                attention(
                    &pool,
                    &c,
                    &kv,
                    &one,
                    &[0],
                    &tok_pos[i..i + 1],
                    None,
                    0,
                    window,
                    AttnKernel::Flash,
                    &q[i * qd..(i + 1) * qd],
                    &mut per_token_flash[i * qd..(i + 1) * qd],
                );
            }
            for f32_rows in [false, true] {
                let rows = f32_rows.then_some(F32Copy {
                    k: &k32,
                    v: &v32,
                    at: &[Some(0)],
                });
                for (kernel, tol) in [(AttnKernel::Flash, 2e-6), (AttnKernel::TwoPass, 1e-3)] {
                    let mut out = vec![0f32; n * qd];
                    attention(
                        &pool, &c, &kv, &seqs, &tok_seq, &tok_pos, rows, 0, window, kernel, &q,
                        &mut out,
                    );
                    if kernel == AttnKernel::Flash {
                        assert!(
                            out.iter().zip(&per_token_flash).all(|(a, b): (&f32, &f32)| a.to_bits() == b.to_bits()),
                            "flash (f32 rows {f32_rows}) differs from the per-token flash path ({n_head}/{n_head_kv} heads of {hd})"
                        );
                    }
                    for i in 0..n {
                        let want = reference(
                            &c,
                            &kv,
                            &table,
                            &q[i * qd..(i + 1) * qd],
                            tok_pos[i],
                            window,
                        );
                        let err = want
                            .iter()
                            .zip(&out[i * qd..(i + 1) * qd])
                            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                        let scale = want.iter().fold(0f32, |m, a| m.max(a.abs()));
                        assert!(err <= tol * scale.max(1e-3), "{kernel:?} (f32 rows {f32_rows}), {n_head}/{n_head_kv} heads of {hd}, token {i}: error {err} of {scale}");
                    }
                }
            }
        }
    }
}
