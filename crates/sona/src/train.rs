//! Training a LoRA adapter on one layer's down projection from captured activations.
//!
//! With the adapter on layer `L`'s down projection only, nothing before that projection
//! depends on the adapter: one forward pass (with [`Capture`] on `L`) supplies, for every
//! token, the projection's input, the base output and the residual stream, and every training
//! step recomputes just `down + scale·B·A·act → (post-norm) → residual → final norm → LM head`
//! and backpropagates through the same path ([`crate::grad`]). The LM head is kept as f16
//! copies in both orientations so both products are SIMD GEMVs.

use crate::grad::{cross_entropy, lora_backward, rms_norm_backward, unlikelihood};
use half::f16;
use ruvllm_kernels::gemv::{gemv, Gemv};
use ruvllm_kernels::ops::rms_norm;
use ruvllm_kernels::pool::ThreadPool;
use ruvllm_kernels::quants::dequantize_row;
use ruvllm_model::{
    Capture, Forward, KvCache, Logits, LoraAdapter, LoraPair, Model, Proj, SeqInput,
};
use std::sync::Arc;

/// FNV-1a over token ids: a sequence's identity where a cheap, stable one is needed (a
/// lesson's sample seed, the server's store of kept activations).
pub fn tokens_hash(tokens: &[u32]) -> u64 {
    tokens.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &t| {
        (h ^ t as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Training targets for a sequence of `prompt_len` prompt tokens followed by an answer: row `t`
/// predicts token `t + 1` for every answer token, and prompt rows predict nothing.
pub fn answer_targets(tokens: &[u32], prompt_len: usize) -> Vec<Option<u32>> {
    (0..tokens.len())
        .map(|t| {
            if t + 1 >= prompt_len && t + 1 < tokens.len() {
                Some(tokens[t + 1])
            } else {
                None
            }
        })
        .collect()
}

/// The LM head as f16 in both orientations, shared by every trainer of one model.
pub struct Head {
    /// `[n_vocab × n_embd]`.
    w: Vec<f16>,
    /// `[n_embd × n_vocab]`.
    w_t: Vec<f16>,
    /// `n_embd`.
    d: usize,
}

impl Head {
    /// Row `v` (token `v`'s output embedding), `n_embd` values.
    pub(crate) fn row(&self, v: usize) -> &[f16] {
        &self.w[v * self.d..(v + 1) * self.d]
    }

    /// Dequantizes `model`'s LM head (None when its type cannot be dequantized).
    pub fn new(model: &Model) -> Option<Head> {
        let c = &model.config;
        let (d, nv) = (c.n_embd, c.n_vocab);
        let m = model.mat(&model.output);
        let mut w = vec![f16::ZERO; nv * d];
        let mut row = vec![0f32; d];
        let rb = m.data.len() / nv;
        for v in 0..nv {
            if !dequantize_row(m.ty, &m.data[v * rb..(v + 1) * rb], &mut row) {
                return None;
            }
            for (h, x) in w[v * d..(v + 1) * d].iter_mut().zip(&row) {
                *h = f16::from_f32(*x);
            }
        }
        let mut w_t = vec![f16::ZERO; nv * d];
        for v in 0..nv {
            for j in 0..d {
                w_t[j * nv + v] = w[v * d + j];
            }
        }
        Some(Head { w, w_t, d })
    }
}

/// The penalty `weight · mean_t ‖scale·B·A·act_t‖²` over the rows of `acts` (`[rows × in]`)
/// on a rank-`rank` LoRA branch (`A: rank × in`, `B: out × rank`), and its gradients.
pub fn anchor_penalty(
    a: &[f32],
    b: &[f32],
    rank: usize,
    scale: f32,
    acts: &[f32],
    weight: f32,
) -> (f32, Vec<f32>, Vec<f32>) {
    let mut da = vec![0f32; a.len()];
    let mut db = vec![0f32; b.len()];
    if rank == 0 || a.is_empty() {
        return (0.0, da, db);
    }
    let (ff, r) = (a.len() / rank, rank);
    let rows = acts.chunks_exact(ff).len();
    if rows == 0 {
        return (0.0, da, db);
    }
    // With h_t = A·act_t: mean_t ‖s·B·h_t‖² = s²·tr(BᵀB·H), H = mean_t h_t·h_tᵀ (r × r). So
    // dB = 2w·s²·B·H and dh_t = (2w·s²/rows)·BᵀB·h_t, dA = Σ_t dh_t ⊗ act_t.
    // h_t for every row, per rank with the tile kernel: [rows × r].
    let mut h = vec![0f32; rows * r];
    let mut col = vec![0f32; rows];
    for k in 0..r {
        ruvllm_kernels::ops::dot_rows(&a[k * ff..(k + 1) * ff], acts, ff, &mut col);
        for (t, v) in col.iter().enumerate() {
            h[t * r + k] = *v;
        }
    }
    let mut hm = vec![0f64; r * r];
    for ht in h.chunks_exact(r) {
        for i in 0..r {
            for j in 0..r {
                hm[i * r + j] += ht[i] as f64 * ht[j] as f64 / rows as f64;
            }
        }
    }
    let mut btb = vec![0f64; r * r];
    for row in b.chunks_exact(r) {
        for i in 0..r {
            for j in 0..r {
                btb[i * r + j] += row[i] as f64 * row[j] as f64;
            }
        }
    }
    let s2w = (scale * scale * weight) as f64;
    let penalty: f64 = s2w * (0..r * r).map(|i| btb[i] * hm[i]).sum::<f64>();
    for (j, row) in b.chunks_exact(r).enumerate() {
        for k in 0..r {
            db[j * r + k] =
                (2.0 * s2w * (0..r).map(|m| row[m] as f64 * hm[m * r + k]).sum::<f64>()) as f32;
        }
    }
    // dA_k = Σ_t dh_t[k]·act_t: per rank a weighted sum of the activation rows.
    for k in 0..r {
        let dh: Vec<f32> = h
            .chunks_exact(r)
            .map(|ht| {
                (2.0 * s2w / rows as f64
                    * (0..r).map(|m| btb[k * r + m] * ht[m] as f64).sum::<f64>())
                    as f32
            })
            .collect();
        ruvllm_kernels::ops::weighted_sum(&dh, acts, ff, &mut da[k * ff..(k + 1) * ff]);
    }
    (penalty as f32, da, db)
}

/// What [`DownTrainer::forward_row`] keeps for the backward pass.
struct RowState {
    /// The down projection's output with the adapter (the post-FFN norm's input).
    tsum: Vec<f32>,
    /// The final norm's input.
    h: Vec<f32>,
}

/// An adapter's Adam state: first and second moments of `A` and `B` and the step count, what a
/// restart needs to continue training exactly where it stopped.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerState {
    /// Steps taken (the bias corrections' exponent).
    pub t: i32,
    /// First moment of `A`.
    pub m_a: Vec<f32>,
    /// First moment of `B`.
    pub m_b: Vec<f32>,
    /// Second moment of `A`.
    pub v_a: Vec<f32>,
    /// Second moment of `B`.
    pub v_b: Vec<f32>,
}

/// Adam moments of an adapter's two matrices (β = 0.9, 0.999; ε = 1e-8).
#[derive(Clone)]
pub(crate) struct Adam {
    m: [Vec<f32>; 2],
    v: [Vec<f32>; 2],
    t: i32,
}

impl Adam {
    pub(crate) fn new(na: usize, nb: usize) -> Adam {
        Adam {
            m: [vec![0.0; na], vec![0.0; nb]],
            v: [vec![0.0; na], vec![0.0; nb]],
            t: 0,
        }
    }

    /// The moments and step count, for persisting.
    pub(crate) fn state(&self) -> OptimizerState {
        OptimizerState {
            t: self.t,
            m_a: self.m[0].clone(),
            m_b: self.m[1].clone(),
            v_a: self.v[0].clone(),
            v_b: self.v[1].clone(),
        }
    }

    /// Restores [`state`](Self::state)'s output when its shapes are this optimizer's.
    pub(crate) fn restore(&mut self, s: OptimizerState) -> bool {
        let fits = s.m_a.len() == self.m[0].len()
            && s.v_a.len() == self.v[0].len()
            && s.m_b.len() == self.m[1].len()
            && s.v_b.len() == self.v[1].len()
            && s.t >= 0;
        if fits {
            *self = Adam {
                m: [s.m_a, s.m_b],
                v: [s.v_a, s.v_b],
                t: s.t,
            };
        }
        fits
    }

    /// One step on `a` and `b` with their gradients.
    pub(crate) fn update(&mut self, a: &mut [f32], da: &[f32], b: &mut [f32], db: &[f32], lr: f32) {
        self.t += 1;
        let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
        let (c1, c2) = (1.0 - b1.powi(self.t), 1.0 - b2.powi(self.t));
        for (i, (p, g)) in [(a, da), (b, db)].into_iter().enumerate() {
            for (p, (g, (m, v))) in p
                .iter_mut()
                .zip(g.iter().zip(self.m[i].iter_mut().zip(self.v[i].iter_mut())))
            {
                *m = b1 * *m + (1.0 - b1) * g;
                *v = b2 * *v + (1.0 - b2) * g * g;
                *p -= lr * (*m / c1) / ((*v / c2).sqrt() + eps);
            }
        }
    }
}

/// What both trainers keep of the adapter they train: a rank-`r` LoRA pair on one layer's
/// down projection, its Adam state, and the anchor penalty (see [`anchor_penalty`]).
#[derive(Clone)]
pub(crate) struct AdapterParams {
    /// The adapted layer.
    pub(crate) layer: usize,
    pub(crate) rank: usize,
    pub(crate) scale: f32,
    /// `A: rank × n_ff`.
    pub(crate) a: Vec<f32>,
    /// `B: n_embd × rank`.
    pub(crate) b: Vec<f32>,
    adam: Adam,
    pub(crate) lr: f32,
    /// Activations of generic text at the adapted projection (`[rows × n_ff]`) and the weight of
    /// the penalty `weight · mean_t ‖scale·B·A·act_t‖²` that keeps the adapter from changing
    /// the model there (general ability kept while facts are learned).
    pub(crate) anchor: Option<(Arc<Vec<f32>>, f32)>,
}

impl AdapterParams {
    /// PEFT's initialization (`A` small and random from `seed`, `B` zero: no change yet),
    /// `scale = alpha / rank`. None for a layer the model lacks or rank 0.
    pub(crate) fn new(
        c: &ruvllm_model::Config,
        layer: usize,
        rank: usize,
        alpha: f32,
        lr: f32,
        seed: u64,
    ) -> Option<AdapterParams> {
        if layer >= c.n_layer || rank == 0 {
            return None;
        }
        let (d, ff) = (c.n_embd, c.n_ff);
        let a = crate::uniform(rank * ff, seed, 1.0 / (ff as f32).sqrt());
        let b = vec![0f32; d * rank];
        let adam = Adam::new(a.len(), b.len());
        Some(AdapterParams {
            layer,
            rank,
            scale: alpha / rank as f32,
            a,
            b,
            adam,
            lr,
            anchor: None,
        })
    }

    /// Replaces `A` and `B` when the shapes match.
    pub(crate) fn set_params(&mut self, a: Vec<f32>, b: Vec<f32>) {
        if a.len() == self.a.len() && b.len() == self.b.len() {
            self.a = a;
            self.b = b;
        }
    }

    pub(crate) fn branch(&self) -> crate::merge::Branch<'_> {
        crate::merge::Branch {
            a: &self.a,
            b: &self.b,
            rank: self.rank,
            scale: self.scale,
        }
    }

    pub(crate) fn pair(&self) -> LoraPair {
        LoraPair {
            rank: self.rank,
            a: self.a.clone(),
            b: self.b.clone(),
            scale: self.scale,
        }
    }

    /// The adapter as the forward pass takes it, for a model of `n_layer` layers.
    pub(crate) fn adapter(&self, n_layer: usize, name: &str, id: u64, version: u64) -> LoraAdapter {
        let mut ad = LoraAdapter::empty(name, id, n_layer);
        ad.version = version;
        ad.set(self.layer, Proj::Down, self.pair());
        ad
    }

    /// The anchor penalty and its gradients (zero without an anchor).
    pub(crate) fn anchor_penalty(&self) -> (f32, Vec<f32>, Vec<f32>) {
        match &self.anchor {
            Some((acts, weight)) => {
                anchor_penalty(&self.a, &self.b, self.rank, self.scale, acts, *weight)
            }
            None => (0.0, vec![0f32; self.a.len()], vec![0f32; self.b.len()]),
        }
    }

    /// Adds the anchor penalty's gradients to `da` and `db`, if there is an anchor.
    pub(crate) fn add_anchor_grads(&self, da: &mut [f32], db: &mut [f32]) {
        if self.anchor.is_some() {
            let (_, ga, gb) = self.anchor_penalty();
            da.iter_mut().zip(&ga).for_each(|(x, y)| *x += y);
            db.iter_mut().zip(&gb).for_each(|(x, y)| *x += y);
        }
    }

    /// One Adam step with these gradients.
    pub(crate) fn update(&mut self, da: &[f32], db: &[f32]) {
        self.adam.update(&mut self.a, da, &mut self.b, db, self.lr);
    }

    /// The Adam state.
    pub(crate) fn optimizer(&self) -> OptimizerState {
        self.adam.state()
    }

    /// Restores an Adam state of matching shapes (false otherwise, nothing changed).
    pub(crate) fn set_optimizer(&mut self, s: OptimizerState) -> bool {
        self.adam.restore(s)
    }

    /// Fresh Adam moments.
    pub(crate) fn restart_optimizer(&mut self) {
        self.adam = Adam::new(self.a.len(), self.b.len());
    }
}

/// The reference trainer: an adapter on one down projection trained on the exact
/// full-vocabulary loss.
pub struct DownTrainer {
    model: Arc<Model>,
    pool: Arc<ThreadPool>,
    head: Arc<Head>,
    /// Parameters, Adam state and anchor penalty.
    p: AdapterParams,
}

impl DownTrainer {
    /// A trainer for the down projection of `layer`, rank `rank`, `scale = alpha / rank`,
    /// learning rate `lr`. `A` starts small and random, `B` at zero (PEFT's initialization),
    /// so the adapter starts as no change.
    pub fn new(
        model: Arc<Model>,
        head: Arc<Head>,
        pool: Arc<ThreadPool>,
        layer: usize,
        rank: usize,
        alpha: f32,
        lr: f32,
        seed: u64,
    ) -> Option<DownTrainer> {
        let p = AdapterParams::new(&model.config, layer, rank, alpha, lr, seed)?;
        Some(DownTrainer {
            model,
            pool,
            head,
            p,
        })
    }

    /// Penalizes the adapter's output on `acts` (activations of generic text at this layer's
    /// down projection, `[rows × n_ff]`, from [`capture`](Self::capture)) with `weight` in
    /// every [`step_batch`](Self::step_batch).
    pub fn set_anchor(&mut self, acts: Arc<Vec<f32>>, weight: f32) {
        self.p.anchor = Some((acts, weight));
    }

    /// The anchor penalty `weight · mean_t ‖scale·B·A·act_t‖²` and its gradients (zero
    /// without an anchor).
    pub fn anchor_penalty_and_grads(&self) -> (f32, Vec<f32>, Vec<f32>) {
        self.p.anchor_penalty()
    }

    /// The parameters `(A, B)`.
    pub fn params(&self) -> (&[f32], &[f32]) {
        (&self.p.a, &self.p.b)
    }

    /// Replaces the parameters (tests, restoring a snapshot).
    pub fn set_params(&mut self, a: Vec<f32>, b: Vec<f32>) {
        self.p.set_params(a, b);
    }

    /// The adapter as the forward pass takes it.
    pub fn adapter(&self, name: &str, id: u64, version: u64) -> LoraAdapter {
        self.p.adapter(self.model.config.n_layer, name, id, version)
    }

    /// Row `t` of `cap` through `down + scale·B·A·act → (post-norm) → residual → final norm →
    /// LM head` with the current parameters: the logits (into `logits`, `n_vocab`) and what
    /// the backward pass needs.
    fn forward_row(&self, cap: &Capture, t: usize, logits: &mut [f32]) -> RowState {
        let c = &self.model.config;
        let (d, ff, nv, r) = (c.n_embd, c.n_ff, c.n_vocab, self.p.rank);
        let post = self.model.layers[self.p.layer].post_ffn_norm.as_deref();
        let act = &cap.act[t * ff..(t + 1) * ff];
        let h1: Vec<f32> = (0..r)
            .map(|k| {
                self.p.a[k * ff..(k + 1) * ff]
                    .iter()
                    .zip(act)
                    .map(|(w, x)| w * x)
                    .sum()
            })
            .collect();
        let tsum: Vec<f32> = (0..d)
            .map(|j| {
                cap.down[t * d + j]
                    + self.p.scale * (0..r).map(|k| self.p.b[j * r + k] * h1[k]).sum::<f32>()
            })
            .collect();
        let mut o = tsum.clone();
        if let Some(w) = post {
            rms_norm(&tsum, w, c.rms_eps, &mut o);
        }
        let h: Vec<f32> = (0..d).map(|j| cap.resid[t * d + j] + o[j]).collect();
        let mut f = vec![0f32; d];
        rms_norm(&h, &self.model.output_norm, c.rms_eps, &mut f);
        gemv(
            &self.pool,
            Gemv {
                m: nv,
                n: d,
                lda: d,
                alpha: 1.0,
                beta: 0.0,
            },
            &self.head.w,
            &f,
            logits,
        );
        RowState { tsum, h }
    }

    /// The full-vocabulary logits of row `t` of `cap` with the current parameters (`cap` from
    /// a forward without this adapter).
    pub fn row_logits(&self, cap: &Capture, t: usize) -> Vec<f32> {
        let mut logits = vec![0f32; self.model.config.n_vocab];
        self.forward_row(cap, t, &mut logits);
        logits
    }

    /// Mean cross-entropy over the rows of `cap` with a target (or, with `negative`, the mean
    /// unlikelihood −ln(1 − p) of tokens to discourage), and its gradients with respect to `A`
    /// and `B`. `cap` must come from a forward pass *without* this adapter.
    pub fn loss_and_grads(
        &self,
        cap: &Capture,
        targets: &[Option<u32>],
        negative: bool,
    ) -> (f32, Vec<f32>, Vec<f32>) {
        let c = &self.model.config;
        let (d, ff, nv, r) = (c.n_embd, c.n_ff, c.n_vocab, self.p.rank);
        let post = self.model.layers[self.p.layer].post_ffn_norm.as_deref();
        let mut da = vec![0f32; self.p.a.len()];
        let mut db = vec![0f32; self.p.b.len()];
        let mut total = 0f64;
        let mut count = 0;
        let mut logits = vec![0f32; nv];
        let mut df = vec![0f32; d];
        for (t, target) in targets.iter().enumerate() {
            let Some(target) = *target else { continue };
            let act = &cap.act[t * ff..(t + 1) * ff];
            let RowState { tsum, h } = self.forward_row(cap, t, &mut logits);
            let (loss, dlog) = if negative {
                unlikelihood(&logits, target as usize)
            } else {
                cross_entropy(&logits, target as usize)
            };
            total += loss as f64;
            count += 1;
            gemv(
                &self.pool,
                Gemv {
                    m: d,
                    n: nv,
                    lda: nv,
                    alpha: 1.0,
                    beta: 0.0,
                },
                &self.head.w_t,
                &dlog,
                &mut df,
            );
            let dh = rms_norm_backward(&h, &self.model.output_norm, c.rms_eps, &df);
            let dt = match post {
                Some(w) => rms_norm_backward(&tsum, w, c.rms_eps, &dh),
                None => dh,
            };
            let g = lora_backward(&self.p.a, &self.p.b, r, self.p.scale, act, &dt);
            da.iter_mut().zip(&g.da).for_each(|(x, y)| *x += y);
            db.iter_mut().zip(&g.db).for_each(|(x, y)| *x += y);
        }
        let n = count.max(1) as f32;
        da.iter_mut().for_each(|x| *x /= n);
        db.iter_mut().for_each(|x| *x /= n);
        ((total / count.max(1) as f64) as f32, da, db)
    }

    /// One Adam step on the targeted rows' loss (see [`loss_and_grads`](Self::loss_and_grads));
    /// returns the loss before it.
    pub fn step(&mut self, cap: &Capture, targets: &[Option<u32>], negative: bool) -> f32 {
        self.step_batch(&[(cap, targets, negative)])
    }

    /// One Adam step on the mean of several examples' losses (new feedback with replayed
    /// earlier lessons, so a new lesson does not overwrite the old ones) plus the anchor
    /// penalty, if set; returns the examples' mean loss before it.
    pub fn step_batch(&mut self, batch: &[(&Capture, &[Option<u32>], bool)]) -> f32 {
        let mut da = vec![0f32; self.p.a.len()];
        let mut db = vec![0f32; self.p.b.len()];
        let mut loss = 0f32;
        for &(cap, targets, negative) in batch {
            let (l, ga, gb) = self.loss_and_grads(cap, targets, negative);
            loss += l;
            da.iter_mut().zip(&ga).for_each(|(x, y)| *x += y);
            db.iter_mut().zip(&gb).for_each(|(x, y)| *x += y);
        }
        let n = batch.len().max(1) as f32;
        da.iter_mut().for_each(|x| *x /= n);
        db.iter_mut().for_each(|x| *x /= n);
        let loss = loss / n;
        self.p.add_anchor_grads(&mut da, &mut db);
        self.p.update(&da, &db);
        loss
    }
}

impl DownTrainer {
    /// The adapted layer's activations for `tokens`, from one forward pass without adapters
    /// (what [`step`](Self::step) trains on).
    pub fn capture(&self, tokens: &[u32]) -> Option<Capture> {
        capture(&self.model, &self.pool, self.p.layer, tokens, None).map(|(c, _)| c)
    }
}

/// Where a learner gets a lesson's activations and base logits. Without one it runs its own
/// forward pass over prompt and answer ([`capture`]); a server hands it its engine, whose prefix
/// cache still holds the prompt just served, so only the answer's tail is computed — in the
/// engine's batched step, next to the traffic it serves.
pub trait CaptureSource: Send + Sync {
    /// What [`capture`] returns for `logits_from = Some(from)`, for rows `from..` (earlier
    /// rows may be zero); with `rows`, only those rows' logits are needed (others may be
    /// zero). None when the tokens cannot be run.
    fn capture(
        &self,
        layer: usize,
        tokens: &[u32],
        from: usize,
        rows: Option<&[usize]>,
    ) -> Option<(Capture, Vec<f32>)>;

    /// The log-probability each answer token had when it was served (the row at `from + j`
    /// predicted token `from + 1 + j`), when the source saw it generated: a rating picks the
    /// rows it teaches by them without a head pass.
    fn served_logprobs(&self, _tokens: &[u32], _from: usize) -> Option<Vec<f32>> {
        None
    }

    /// Whether serving has work now (requests running or waiting): the learner then keeps to
    /// its own threads instead of its idle pool ([`crate::LearnConfig::idle_threads`]).
    fn serving_busy(&self) -> bool {
        true
    }
}

/// One forward pass over `tokens` without adapters that captures `layer`'s down projection
/// (input, output, residual) for every token, and with `logits_from = Some(k)` also returns the
/// logits of tokens `k..` (`[(n − k) × n_vocab]`, else empty). None for an empty or over-long
/// sequence.
pub fn capture(
    model: &Model,
    pool: &Arc<ThreadPool>,
    layer: usize,
    tokens: &[u32],
    logits_from: Option<usize>,
) -> Option<(Capture, Vec<f32>)> {
    let c = &model.config;
    if tokens.is_empty() || tokens.len() > c.n_ctx_train {
        return None;
    }
    let mut kv = KvCache::new(c.n_layer, c.kv_dim(), tokens.len(), 1);
    let mut fwd = Forward::new(model, pool.clone());
    fwd.set_capture(Some(layer));
    let want = logits_from.map_or(Logits::None, Logits::From);
    let out = fwd
        .forward_batch(
            &mut kv,
            &[SeqInput {
                tokens,
                pos0: 0,
                block_table: &[0],
                logits: want,
                lora: None,
            }],
        )
        .ok()?
        .to_vec();
    Some((fwd.capture()?.clone(), out))
}
