//! The instant loop's trainer: a rank-1/2 micro-adapter on the last layer's down projection,
//! trained in milliseconds instead of seconds.
//!
//! [`crate::train::DownTrainer`] computes the exact full-vocabulary cross-entropy: two
//! `n_vocab × n_embd` products per answer token and step (49,152 × 576 on SmolLM2), seconds per
//! correction on one core. Two changes make the instant loop cheap, both exact for the
//! objective they optimize:
//!
//! 1. **Candidate softmax.** Each lesson keeps, per target row, its base model's top-K tokens
//!    and the targets (`C`), a uniform sample `S` of the other tokens, and `ln Σ exp(logit)` of
//!    every token outside `C` (`rest`, from the capture pass's full logits). The loss is the
//!    softmax over `C ∪ S`, the sampled tokens' logits shifted by one per-row offset so that, at
//!    the base model, they add up to exactly `rest`: the full cross-entropy at the start, and
//!    a rise of the other tokens' logits (which the adapter could otherwise make for free) is
//!    seen through the sample's.
//! 2. **Low-rank logits.** With `h1 = A·act`, the final norm's input is
//!    `h = resid + g2 ⊙ (down + s·B·h1)/ρ2` (`g2, ρ2`: the post-FFN norm, if any), so the
//!    candidates' logits are `y = (P + (Q + s·M·h1)/ρ2)/ρ` with `P = W_C·(g ⊙ resid)` and
//!    `Q = W_C·(g ⊙ g2 ⊙ down)` fixed per row and `M = W_C·diag(g ⊙ g2)·B` (`|C| × r`) once per
//!    step. A row then costs `O(|C|·r + n_embd·r + n_ff·r)` instead of `O(n_vocab·n_embd)`.
//!
//! A lesson raises its targets' likelihood (corrections, positive ratings) or lowers it
//! (unlikelihood, negative ratings) ([`Objective`]). The scope's other branch is a fixed part
//! of `down` here.

use crate::merge::Branch;
use crate::train::{AdapterParams, Head, OptimizerState};
use half::f16;
use ruvllm_kernels::ops::{
    axpy, dot_f32 as dot, dot_rows_f16_heads, exp_in_place, logit_stats, max_f32, sum_f64,
    sum_sq_f64, weighted_sum_f16_heads, MAX_HEADS,
};
use ruvllm_kernels::pool::ThreadPool;
use ruvllm_model::{head_logits, Capture, LoraAdapter, LoraPair, Model};
use std::sync::Arc;

/// Base-model tokens kept per target row as candidates.
pub const TOP_K: usize = 16;

/// Other tokens sampled per lesson to stand for the rest of the vocabulary.
pub const SAMPLE: usize = 256;

/// What a lesson keeps for the candidate objective, from its capture pass.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidates {
    /// Candidate token ids: each target row's top base tokens and every target, ascending
    /// (`n_top` of them), then the sample of the others.
    pub ids: Vec<u32>,
    /// How many of `ids` are top tokens and targets.
    pub n_top: usize,
    /// Per row of the capture, the base model's logits of the sampled ids (`ids[n_top..]`,
    /// `[rows × n_sample]`; zeros for rows without a target): what places the sample.
    pub sample_base: Vec<f32>,
    /// Per row: `ln Σ exp(logit)` over the tokens outside the top ones (−∞ when there are
    /// none); read for rows with a target only.
    pub log_rest: Vec<f32>,
}

/// The `k` positions among `scored` (position, log-probability of its target) that tell the
/// objective most, ascending: for a likely objective the `k` least likely targets (where
/// cross-entropy's gradient `1 − p` is largest), for an unlikely one the `k` most likely
/// (unlikelihood's `p / (1 − p)`). Ties go to the earlier position; all when `k` covers them.
pub fn telling_rows(scored: &[(usize, f32)], k: usize, negative: bool) -> Vec<usize> {
    let mut order: Vec<(f32, usize)> = scored
        .iter()
        .map(|&(t, lp)| (if negative { -lp } else { lp }, t))
        .collect();
    order.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut keep: Vec<usize> = order.into_iter().take(k).map(|(_, t)| t).collect();
    keep.sort_unstable();
    keep
}

/// Each target row's log-probability of its target from `logits` (rows `first..`, as in
/// [`Candidates::from_logits`]), as the engine records served ones
/// ([`ruvllm_kernels::ops::token_logprob`]).
pub fn target_logprobs(
    logits: &[f32],
    n_vocab: usize,
    targets: &[Option<u32>],
    first: usize,
) -> Vec<(usize, f32)> {
    targets
        .iter()
        .enumerate()
        .filter_map(|(t, tg)| {
            let row = logits.get(t.checked_sub(first)? * n_vocab..(t - first + 1) * n_vocab)?;
            let tg = (*tg)? as usize;
            (tg < row.len()).then(|| (t, ruvllm_kernels::ops::token_logprob(row, tg)))
        })
        .collect()
}

/// The positions of the `k` largest values of `row` (ties: the earlier position), in
/// descending order of value. One pass: blocks of 64 values none of which beats the current
/// `k`-th are passed over with one vector compare each; the rest go through a sorted list of
/// `k`. Tens of microseconds for a 49k vocabulary, where selecting over an index vector took
/// ~0.3 ms.
pub fn top_indices(row: &[f32], k: usize) -> Vec<u32> {
    let k = k.min(row.len());
    if k == 0 {
        return Vec::new();
    }
    let mut top: Vec<(f32, u32)> = Vec::with_capacity(k + 1);
    for (c, block) in row.chunks(64).enumerate() {
        if let Some(&(kth, _)) = top.get(k - 1) {
            // Later positions enter only by beating the k-th value (a tie loses to it).
            if !block.iter().fold(false, |any, &x| any | (x > kth)) {
                continue;
            }
        }
        for (j, &v) in block.iter().enumerate() {
            let i = (c * 64 + j) as u32;
            if top.len() == k && v <= top[k - 1].0 {
                continue;
            }
            // After every kept value at least as large (earlier positions win ties).
            let at = top.partition_point(|&(w, _)| w >= v);
            top.insert(at, (v, i));
            top.truncate(k);
        }
    }
    top.into_iter().map(|(_, i)| i).collect()
}

/// Drops the targets of rows not in `keep`.
pub fn mask_targets(targets: &mut [Option<u32>], keep: &[usize]) {
    for (t, tg) in targets.iter_mut().enumerate() {
        if keep.binary_search(&t).is_err() {
            *tg = None;
        }
    }
}

/// `f(0), …, f(n − 1)` in order, computed on `pool`'s threads when given (one task each):
/// what the learner parallelizes (lessons' gradients and checks, candidates' rows) without
/// changing any result.
pub(crate) fn per_row<T: Send + Default>(
    pool: Option<&ThreadPool>,
    n: usize,
    f: impl Fn(usize) -> T + Sync,
) -> Vec<T> {
    match pool {
        Some(p) if p.n_threads() > 1 && n > 1 => {
            let slots: Vec<std::sync::Mutex<T>> = (0..n)
                .map(|_| std::sync::Mutex::new(T::default()))
                .collect();
            p.run(n, &|i| {
                let v = f(i);
                *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = v;
            });
            slots
                .into_iter()
                .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
                .collect()
        }
        _ => (0..n).map(f).collect(),
    }
}

impl Candidates {
    /// From the base model's logits of rows `first..` (`[(rows − first) × n_vocab]`; rows
    /// before `first` must have no target) and the rows' targets: `k` top tokens per row and
    /// `n_sample` others drawn uniformly (xorshift from `seed`). The per-row work (each row's
    /// top tokens by [`top_indices`], then its sampled logits and the log-sum-exp of its rest
    /// by the vector [`logit_stats`]) runs on `pool`'s threads when given, with the same
    /// result.
    #[allow(clippy::too_many_arguments)]
    pub fn from_logits(
        pool: Option<&ThreadPool>,
        logits: &[f32],
        n_vocab: usize,
        targets: &[Option<u32>],
        first: usize,
        k: usize,
        n_sample: usize,
        seed: u64,
    ) -> Candidates {
        let row_of = |t: usize| {
            t.checked_sub(first)
                .and_then(|i| logits.get(i * n_vocab..(i + 1) * n_vocab))
        };
        let rows = targets.len();
        let k = k.min(n_vocab);
        let tops = per_row(pool, rows, |t| {
            let (Some(_), Some(row)) = (targets[t], row_of(t)) else {
                return Vec::new();
            };
            if k == 0 {
                return Vec::new();
            }
            top_indices(row, k)
        });
        let mut member = vec![false; n_vocab];
        for (t, target) in targets.iter().enumerate() {
            let Some(target) = *target else { continue };
            if row_of(t).is_none() {
                continue;
            }
            if let Some(m) = member.get_mut(target as usize) {
                *m = true;
            }
            for &i in &tops[t] {
                member[i as usize] = true;
            }
        }
        let mut ids: Vec<u32> = (0..n_vocab as u32)
            .filter(|&i| member[i as usize])
            .collect();
        let n_top = ids.len();
        let others = n_vocab - n_top;
        let mut chosen = member.clone();
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        while ids.len() < n_top + n_sample.min(others) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = (x % n_vocab as u64) as usize;
            if !chosen[v] {
                chosen[v] = true;
                ids.push(v as u32);
            }
        }
        let n_s = ids.len() - n_top;
        // Per row with a target: its logits of the sampled ids and ln Σ exp over the rest.
        let per = per_row(pool, rows, |t| {
            let Some(row) = targets[t].and(row_of(t)) else {
                return (vec![0f32; n_s], f32::NEG_INFINITY);
            };
            let sampled: Vec<f32> = ids[n_top..].iter().map(|&i| row[i as usize]).collect();
            // The row without its top tokens, through the vector log-sum-exp.
            let mut others = row.to_vec();
            for &i in &ids[..n_top] {
                others[i as usize] = f32::NEG_INFINITY;
            }
            let rest = if max_f32(&others) > f32::NEG_INFINITY {
                logit_stats(&others).lse as f32
            } else {
                f32::NEG_INFINITY
            };
            (sampled, rest)
        });
        let mut sample_base = Vec::with_capacity(rows * n_s);
        let mut log_rest = Vec::with_capacity(rows);
        for (sampled, rest) in per {
            sample_base.extend_from_slice(&sampled);
            log_rest.push(rest);
        }
        Candidates {
            ids,
            n_top,
            sample_base,
            log_rest,
        }
    }

    /// Makes `extra` tokens top candidates (those an adapter under training raised, found by a
    /// full-vocabulary check), taking them out of the sample if they were in it; returns how
    /// many were new. Their base mass stays counted in `rest` (it was below every top token's;
    /// the base logits are no longer at hand), a small overestimate.
    pub fn add_top(&mut self, extra: &[u32]) -> usize {
        let mut top = self.ids[..self.n_top].to_vec();
        let mut added = 0;
        for &e in extra {
            if let Err(i) = top.binary_search(&e) {
                top.insert(i, e);
                added += 1;
            }
        }
        if added == 0 {
            return 0;
        }
        // The sample keeps the ids (and their base logits) that did not become top ones.
        let old_sample = &self.ids[self.n_top..];
        let keep: Vec<bool> = old_sample
            .iter()
            .map(|v| top.binary_search(v).is_err())
            .collect();
        let sample: Vec<u32> = old_sample
            .iter()
            .zip(&keep)
            .filter(|(_, k)| **k)
            .map(|(v, _)| *v)
            .collect();
        if !old_sample.is_empty() {
            self.sample_base = self
                .sample_base
                .chunks_exact(old_sample.len())
                .flat_map(|row| row.iter().zip(&keep).filter(|(_, k)| **k).map(|(v, _)| *v))
                .collect();
        }
        self.n_top = top.len();
        self.ids = top.into_iter().chain(sample).collect();
        added
    }

    /// Every token a candidate (no rest): the objective is then the exact full softmax.
    pub fn all(n_vocab: usize, rows: usize) -> Candidates {
        Candidates {
            ids: (0..n_vocab as u32).collect(),
            n_top: n_vocab,
            sample_base: Vec::new(),
            log_rest: vec![f32::NEG_INFINITY; rows],
        }
    }
}

/// What training does with a lesson's target rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Objective {
    /// Raise the targets' likelihood (cross-entropy).
    Likely,
    /// Lower it (unlikelihood, bounded).
    Unlikely,
}

/// One lesson made ready for training: per target row, its activations and the fixed parts of
/// its candidates' logits. Built when the branch held fixed changes (the base adapter after a
/// background run) or per feedback event.
#[derive(Debug, Clone)]
pub struct Prepared {
    objective: Objective,
    /// The capture rows these are (those with a target among the top candidates).
    rows: Vec<usize>,
    /// Each target row's input of the down projection: `[rows × n_ff]`.
    act: Vec<f32>,
    /// Each target row's residual stream before the feed-forward output: `[rows × n_embd]`.
    resid: Vec<f32>,
    /// Each row's target as an index into the candidates.
    target: Vec<usize>,
    /// Each row's offset of the sampled candidates' logits.
    offset: Vec<f32>,
    /// Each row's fixed rest logit (−∞: none; used when there is no sample).
    fixed_rest: Vec<f32>,
    /// The candidates' rows of the LM head as stored (f16, exact): `[|C| × n_embd]`. The
    /// norms' weights `g ⊙ g2` are applied to the vectors they meet instead.
    wc: Vec<f16>,
    /// `W_C·(g ⊙ resid)` per row: `[rows × |C|]`.
    p: Vec<f32>,
    /// `W_C·(g ⊙ g2 ⊙ down)` per row: `[rows × |C|]`.
    q: Vec<f32>,
    /// The down projection's output with the fixed branch: `[rows × n_embd]`.
    down: Vec<f32>,
    /// The candidates' token ids (`cands.ids` as prepared): `[|C|]`.
    ids: Vec<u32>,
    /// Rows of the capture (targets' length), what the sample's base logits are laid out by.
    capture_rows: usize,
    /// `|C|` (top candidates and sample).
    n_c: usize,
    /// Top candidates (the rest of `n_c` is the sample).
    n_top: usize,
}

impl Prepared {
    /// Candidate count `|C|`.
    pub fn n_candidates(&self) -> usize {
        self.n_c
    }
    /// Rows with a target.
    pub fn n_rows(&self) -> usize {
        self.target.len()
    }
    /// The capture rows these are.
    pub fn rows(&self) -> &[usize] {
        &self.rows
    }
}

/// The parts of a prepared lesson's full-vocabulary logits that do not depend on the adapter
/// being trained. With `h1 = A·act` the logits are `(P + (Q + s·M·h1)/ρ2)/ρ` with
/// `P = W·(g ⊙ resid)`, `Q = W·(g ⊙ g2 ⊙ down)` (the fixed branch included) and
/// `M = W·diag(g ⊙ g2)·B` ([`FastTrainer::full_basis`]); without a post-FFN norm (`g2 = 1`,
/// `ρ2 = 1`) `P` holds `P + Q`. `ρ2` and `ρ` come from the row's `n_embd`-sized hidden state.
/// So the instant loop's full-vocabulary checks pass the LM head once per feedback event
/// instead of once per round.
#[derive(Debug, Clone)]
pub struct FullFixed {
    /// Rows of the prepared lesson these belong to.
    rows: usize,
    /// `[rows × n_vocab]`.
    p: Vec<f32>,
    /// `[rows × n_vocab]`, with a post-FFN norm only.
    q: Option<Vec<f32>>,
}

impl FullFixed {
    /// Whether these are for a lesson prepared with `rows` rows.
    pub fn fits(&self, l: &Prepared) -> bool {
        self.rows == l.n_rows()
    }
}

fn logsumexp(x: &[f32]) -> f32 {
    let mx = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if mx == f32::NEG_INFINITY {
        return mx;
    }
    (mx as f64 + x.iter().map(|v| ((v - mx) as f64).exp()).sum::<f64>().ln()) as f32
}

/// Row `t`'s sample offset and fixed rest logit, for candidates of a capture of `capture_rows`
/// rows: with a sample, the offset that gives the sampled logits the rest's mass at the base
/// model; without one, the rest as one fixed logit (−∞: none).
fn sample_offset(cands: &Candidates, capture_rows: usize, t: usize) -> (f32, f32) {
    let n_s = cands.ids.len() - cands.n_top.min(cands.ids.len());
    let sampled = n_s > 0 && cands.sample_base.len() == capture_rows * n_s;
    let rest = cands.log_rest.get(t).copied().unwrap_or(f32::NEG_INFINITY);
    match (sampled, rest.is_finite()) {
        (true, true) => (
            rest - logsumexp(&cands.sample_base[t * n_s..(t + 1) * n_s]),
            f32::NEG_INFINITY,
        ),
        (true, false) => (f32::NEG_INFINITY, f32::NEG_INFINITY),
        (false, _) => (0.0, rest),
    }
}

/// `xs · Wᵀ` for vectors `xs` (`[n × d]`) against f16 rows `w` (`[m × d]`): `[n × m]`, in
/// groups of [`MAX_HEADS`] vectors that share each row's widening.
fn rows_times(xs: &[f32], d: usize, w: &[f16], m: usize) -> Vec<f32> {
    let n = xs.len() / d.max(1);
    let mut out = vec![0f32; n * m];
    if m == 0 {
        return out;
    }
    for v0 in (0..n).step_by(MAX_HEADS) {
        let v1 = (v0 + MAX_HEADS).min(n);
        dot_rows_f16_heads(&xs[v0 * d..v1 * d], d, w, d, m, &mut out[v0 * m..v1 * m], m);
    }
    out
}

/// The objective of one row's candidate logits `z` for the candidate `target`: the loss, and
/// its gradient with respect to `z` into `dz` — cross-entropy, or bounded unlikelihood
/// `−ln(1 − p)` with `p ≤ 1 − 10⁻⁶` ([`crate::grad`]'s, whose finite-difference tests pin
/// the formulas), here with one vector `exp` per candidate (libm's values, f32) and the
/// normalizer summed in f64.
fn objective_grad(objective: Objective, z: &[f32], target: usize, dz: &mut [f32]) -> f32 {
    let mx = max_f32(z);
    dz.iter_mut().zip(z).for_each(|(e, v)| *e = v - mx);
    exp_in_place(dz);
    let sum = sum_f64(dz);
    let inv = (1.0 / sum) as f32;
    match objective {
        Objective::Likely => {
            dz.iter_mut().for_each(|e| *e *= inv);
            let Some(t) = dz.get_mut(target) else {
                return f32::INFINITY;
            };
            *t -= 1.0;
            (mx as f64 + sum.ln() - z[target] as f64) as f32
        }
        Objective::Unlikely => {
            let pt = dz
                .get(target)
                .map_or(0.0, |&e| e as f64 / sum)
                .min(1.0 - 1e-6);
            // d/dz_j of −ln(1 − p_t) = p_t (δ_tj − p_j) / (1 − p_t).
            let k = (pt / (1.0 - pt)) as f32;
            dz.iter_mut().for_each(|e| *e *= -k * inv);
            if let Some(t) = dz.get_mut(target) {
                *t += k;
            }
            -(1.0 - pt).ln() as f32
        }
    }
}

/// A LoRA adapter on one layer's down projection trained on the candidate objective (rank 2
/// for the instant loop's micro-adapter, 8 for the background loop's base adapter).
#[derive(Clone)]
pub struct FastTrainer {
    model: Arc<Model>,
    head: Arc<Head>,
    /// Parameters, Adam state and anchor penalty.
    p: AdapterParams,
    /// Directions of the projection's input space `A` must stay orthogonal to (`[m × n_ff]`,
    /// orthonormal; see [`set_blind`](Self::set_blind)).
    blind: Option<Arc<Vec<f32>>>,
    ewc: Option<Ewc>,
}

/// EWC++ state of an adapter: an online diagonal Fisher information and the parameters it
/// anchors to. The penalty `λ/2 · Σ F ⊙ (θ − θ*)²` keeps the directions that earlier lessons
/// (and generic text) depend on.
#[derive(Debug, Clone, PartialEq)]
pub struct Ewc {
    /// Fisher diagonal of `A` (normalized with `fisher_b` to mean 1).
    pub fisher_a: Vec<f32>,
    /// Fisher diagonal of `B`.
    pub fisher_b: Vec<f32>,
    /// `A` when the Fisher was last updated.
    pub star_a: Vec<f32>,
    /// `B` when the Fisher was last updated.
    pub star_b: Vec<f32>,
}

impl FastTrainer {
    /// A trainer for the down projection of `layer` (PEFT initialization: `A` small random,
    /// `B` zero, so it starts as no change); `scale = alpha / rank`.
    pub fn new(
        model: Arc<Model>,
        head: Arc<Head>,
        layer: usize,
        rank: usize,
        alpha: f32,
        lr: f32,
        seed: u64,
    ) -> Option<FastTrainer> {
        let p = AdapterParams::new(&model.config, layer, rank, alpha, lr, seed)?;
        Some(FastTrainer {
            model,
            head,
            p,
            blind: None,
            ewc: None,
        })
    }

    /// Rank.
    pub fn rank(&self) -> usize {
        self.p.rank
    }

    /// Multiplier of `B·A`.
    pub fn scale(&self) -> f32 {
        self.p.scale
    }

    /// The parameters `(A, B)`.
    pub fn params(&self) -> (&[f32], &[f32]) {
        (&self.p.a, &self.p.b)
    }

    /// Replaces the parameters (restoring, tests) when the shapes match.
    pub fn set_params(&mut self, a: Vec<f32>, b: Vec<f32>) {
        self.p.set_params(a, b);
    }

    /// The adapter as a branch (to hold fixed under another, or to merge).
    pub fn branch(&self) -> Branch<'_> {
        self.p.branch()
    }

    /// Back to no change (`B = 0`) with fresh optimizer moments, after its lessons were merged
    /// into the base adapter.
    pub fn reset(&mut self) {
        self.p.b.iter_mut().for_each(|x| *x = 0.0);
        self.p.restart_optimizer();
    }

    /// The optimizer's state (persisted so that training after a restart continues exactly).
    pub fn optimizer_state(&self) -> OptimizerState {
        self.p.optimizer()
    }

    /// Restores an optimizer state of matching shapes; false (and nothing changed) otherwise.
    pub fn set_optimizer_state(&mut self, s: OptimizerState) -> bool {
        self.p.set_optimizer(s)
    }

    /// Fresh optimizer moments (after the parameters were replaced by a merge).
    pub fn restart_optimizer(&mut self) {
        self.p.restart_optimizer();
    }

    /// Penalizes the adapter's output on `acts` (generic text's activations at this
    /// projection, `[rows × n_ff]`) with `weight · mean_t ‖scale·B·A·act_t‖²` in every step:
    /// what keeps general ability (see [`crate::train::anchor_penalty`]).
    pub fn set_anchor(&mut self, acts: Arc<Vec<f32>>, weight: f32) {
        self.p.anchor = Some((acts, weight));
    }

    /// Keeps `A`'s rows orthogonal to `dirs` (`[m × n_ff]`, orthonormal): the leading
    /// principal directions of generic text's activations, which every token shares and which
    /// therefore cannot tell a lesson from anything else. Without them the adapter's output on
    /// generic text (the anchor penalty) and on a lesson are one and the same, and the penalty
    /// stalls learning; projected out, lessons are learned from what sets them apart.
    /// Applied now and after every step (projected gradient descent).
    pub fn set_blind(&mut self, dirs: Arc<Vec<f32>>) {
        self.blind = Some(dirs);
        self.project_a();
    }

    /// `A ← A·(I − U·Uᵀ)` for the blind directions `U`.
    fn project_a(&mut self) {
        let Some(u) = &self.blind else { return };
        let ff = self.p.a.len() / self.p.rank;
        for row in self.p.a.chunks_exact_mut(ff) {
            for dir in u.chunks_exact(ff) {
                let p = dot(row, dir);
                axpy(-p, dir, row);
            }
        }
    }

    /// The EWC++ state, if any.
    pub fn ewc(&self) -> Option<&Ewc> {
        self.ewc.as_ref()
    }

    /// Replaces the EWC++ state (restoring; `None` to drop it) when the shapes match.
    pub fn set_ewc(&mut self, ewc: Option<Ewc>) {
        if ewc.as_ref().is_none_or(|e| {
            e.fisher_a.len() == self.p.a.len()
                && e.star_a.len() == self.p.a.len()
                && e.fisher_b.len() == self.p.b.len()
                && e.star_b.len() == self.p.b.len()
        }) {
            self.ewc = ewc;
        }
    }

    /// The empirical diagonal Fisher at the current parameters: the mean over `lessons` of
    /// each lesson's squared gradient.
    pub fn fisher(&self, lessons: &[Prepared]) -> (Vec<f32>, Vec<f32>) {
        let mut fa = vec![0f32; self.p.a.len()];
        let mut fb = vec![0f32; self.p.b.len()];
        for l in lessons {
            let (_, ga, gb) = self.loss_and_grads(l);
            fa.iter_mut().zip(&ga).for_each(|(f, g)| *f += g * g);
            fb.iter_mut().zip(&gb).for_each(|(f, g)| *f += g * g);
        }
        let n = lessons.len().max(1) as f32;
        fa.iter_mut().chain(fb.iter_mut()).for_each(|f| *f /= n);
        (fa, fb)
    }

    /// EWC++'s online update after training: `F ← γ·F + (1 − γ)·F_new` (`F_new` from
    /// [`fisher`](Self::fisher) over `lessons`, normalized to mean 1 so the penalty's weight
    /// does not depend on the loss's scale) and `θ* ← θ`.
    pub fn update_ewc(&mut self, lessons: &[Prepared], gamma: f32) {
        let (mut fa, mut fb) = self.fisher(lessons);
        let mean = fa.iter().chain(&fb).map(|&f| f as f64).sum::<f64>()
            / (fa.len() + fb.len()).max(1) as f64;
        if mean > 0.0 {
            fa.iter_mut()
                .chain(fb.iter_mut())
                .for_each(|f| *f = (*f as f64 / mean) as f32);
        }
        if let Some(old) = &self.ewc {
            fa.iter_mut()
                .zip(&old.fisher_a)
                .for_each(|(f, o)| *f = gamma * o + (1.0 - gamma) * *f);
            fb.iter_mut()
                .zip(&old.fisher_b)
                .for_each(|(f, o)| *f = gamma * o + (1.0 - gamma) * *f);
        }
        self.ewc = Some(Ewc {
            fisher_a: fa,
            fisher_b: fb,
            star_a: self.p.a.clone(),
            star_b: self.p.b.clone(),
        });
    }

    /// The EWC++ penalty `λ/2 · Σ F ⊙ (θ − θ*)²` (0 without EWC state).
    pub fn ewc_penalty(&self, lambda: f32) -> f32 {
        let Some(e) = &self.ewc else { return 0.0 };
        let part = |p: &[f32], f: &[f32], s: &[f32]| {
            p.iter()
                .zip(f)
                .zip(s)
                .map(|((p, f), s)| (*f as f64) * ((p - s) as f64).powi(2))
                .sum::<f64>()
        };
        (0.5 * lambda as f64
            * (part(&self.p.a, &e.fisher_a, &e.star_a) + part(&self.p.b, &e.fisher_b, &e.star_b)))
            as f32
    }

    /// Sets the learning rate of the next steps.
    pub fn set_lr(&mut self, lr: f32) {
        self.p.lr = lr;
    }

    /// Whether every parameter is a finite number (training that diverged is not published).
    pub fn is_finite(&self) -> bool {
        self.p.a.iter().chain(&self.p.b).all(|v| v.is_finite())
    }

    /// The adapter as a LoRA pair.
    pub fn pair(&self) -> LoraPair {
        self.p.pair()
    }

    /// The adapter as the forward pass takes it.
    pub fn adapter(&self, name: &str, id: u64, version: u64) -> LoraAdapter {
        self.p.adapter(self.model.config.n_layer, name, id, version)
    }

    /// Makes a lesson ready: `cap` from a forward without adapters, its candidates, what to
    /// learn, and the branch held fixed under this one, if any.
    pub fn prepare(
        &self,
        cap: &Capture,
        targets: &[Option<u32>],
        cands: &Candidates,
        objective: Objective,
        fixed: Option<Branch<'_>>,
    ) -> Prepared {
        let c = &self.model.config;
        let (d, ff) = (c.n_embd, c.n_ff);
        let n_c = cands.ids.len();
        let n_top = cands.n_top.min(n_c);
        let mut l = Prepared {
            objective,
            rows: Vec::new(),
            act: Vec::new(),
            resid: Vec::new(),
            target: Vec::new(),
            offset: Vec::new(),
            fixed_rest: Vec::new(),
            wc: Vec::new(),
            p: Vec::new(),
            q: Vec::new(),
            down: Vec::new(),
            ids: cands.ids.clone(),
            capture_rows: targets.len(),
            n_c,
            n_top,
        };
        for (t, tg) in targets.iter().enumerate() {
            let Some(tg) = *tg else { continue };
            let Ok(ti) = cands.ids[..n_top].binary_search(&tg) else {
                continue;
            };
            if (t + 1) * ff > cap.act.len() {
                break;
            }
            let act = &cap.act[t * ff..(t + 1) * ff];
            let mut dn = cap.down[t * d..(t + 1) * d].to_vec();
            if let Some(f) = fixed {
                f.add_to(act, &mut dn);
            }
            let resid = &cap.resid[t * d..(t + 1) * d];
            let (offset, fixed_rest) = sample_offset(cands, targets.len(), t);
            l.rows.push(t);
            l.act.extend_from_slice(act);
            l.resid.extend_from_slice(resid);
            l.target.push(ti);
            l.offset.push(offset);
            l.fixed_rest.push(fixed_rest);
            l.down.extend_from_slice(&dn);
        }
        l.wc = self.candidate_rows(&cands.ids);
        (l.p, l.q) = self.columns(&l.resid, &l.down, &l.wc);
        l
    }

    /// The LM head's rows of candidates `ids` as stored (f16, exact): `[|ids| × n_embd]`.
    fn candidate_rows(&self, ids: &[u32]) -> Vec<f16> {
        let mut w = Vec::with_capacity(ids.len() * self.model.config.n_embd);
        for &v in ids {
            w.extend_from_slice(self.head.row(v as usize));
        }
        w
    }

    /// `P = W·(g ⊙ resid)` and `Q = W·(g ⊙ g2 ⊙ down)` of rows `resid`, `down` (`[rows ×
    /// n_embd]` each) against head rows `w`: `[rows × |w|]` each.
    fn columns(&self, resid: &[f32], down: &[f32], w: &[f16]) -> (Vec<f32>, Vec<f32>) {
        let d = self.model.config.n_embd;
        let g = &self.model.output_norm;
        let g2 = self.model.layers[self.p.layer].post_ffn_norm.as_deref();
        let m = w.len() / d.max(1);
        let xp: Vec<f32> = resid
            .chunks_exact(d)
            .flat_map(|r| (0..d).map(move |j| g[j] * r[j]))
            .collect();
        let xq: Vec<f32> = down
            .chunks_exact(d)
            .flat_map(|dn| (0..d).map(move |j| g[j] * g2.map_or(1.0, |g2| g2[j]) * dn[j]))
            .collect();
        (rows_times(&xp, d, w, m), rows_times(&xq, d, w, m))
    }

    /// `old` prepared again for `cands`, its candidates after [`Candidates::add_top`] (the same
    /// capture, targets and fixed branch): the candidates' columns of `P` and `Q` that `old` has
    /// are moved, only the new ones computed. The same bits as [`prepare`](Self::prepare) with
    /// the widened candidates (each column is its own dot products), at a fraction of the
    /// cost: the instant loop widens after each round. None when a row's target is not among
    /// `cands`' top ones (candidates that did not come from `old`'s): prepare instead.
    pub fn widen(&self, old: &Prepared, cands: &Candidates) -> Option<Prepared> {
        let n_c = cands.ids.len();
        let n_top = cands.n_top.min(n_c);
        let rows = old.target.len();
        let target = old
            .target
            .iter()
            .map(|&t| {
                let tg = *old.ids.get(t)?;
                cands.ids[..n_top].binary_search(&tg).ok()
            })
            .collect::<Option<Vec<usize>>>()?;
        // Where each candidate was among `old`'s (its column), or None: computed here.
        let old_col: std::collections::HashMap<u32, usize> =
            old.ids.iter().enumerate().map(|(i, &v)| (v, i)).collect();
        let from: Vec<Option<usize>> = cands.ids.iter().map(|v| old_col.get(v).copied()).collect();
        let new_ids: Vec<u32> = cands
            .ids
            .iter()
            .zip(&from)
            .filter(|(_, f)| f.is_none())
            .map(|(&v, _)| v)
            .collect();
        let (p_new, q_new) = self.columns(&old.resid, &old.down, &self.candidate_rows(&new_ids));
        let (n_old, m) = (old.n_c, new_ids.len());
        let (mut p, mut q) = (vec![0f32; rows * n_c], vec![0f32; rows * n_c]);
        for ri in 0..rows {
            let mut k = 0;
            for (i, f) in from.iter().enumerate() {
                let (pv, qv) = match f {
                    Some(o) => (old.p[ri * n_old + o], old.q[ri * n_old + o]),
                    None => {
                        k += 1;
                        (p_new[ri * m + k - 1], q_new[ri * m + k - 1])
                    }
                };
                p[ri * n_c + i] = pv;
                q[ri * n_c + i] = qv;
            }
        }
        let (mut offset, mut fixed_rest) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
        for ri in 0..rows {
            let (o, f) = sample_offset(cands, old.capture_rows, old.rows[ri]);
            offset.push(o);
            fixed_rest.push(f);
        }
        Some(Prepared {
            objective: old.objective,
            rows: old.rows.clone(),
            act: old.act.clone(),
            resid: old.resid.clone(),
            target,
            offset,
            fixed_rest,
            wc: self.candidate_rows(&cands.ids),
            p,
            q,
            down: old.down.clone(),
            ids: cands.ids.clone(),
            capture_rows: old.capture_rows,
            n_c,
            n_top,
        })
    }

    /// Row `ri` of `l` up to the final norm's input with `h1 = A·act`: fills `tsum` (the
    /// post-FFN norm's input) and `hv` (the final norm's input), returns `(ρ2, ρ)` (1 for a
    /// missing post-FFN norm).
    fn hidden(
        &self,
        l: &Prepared,
        ri: usize,
        h1: &[f32],
        tsum: &mut [f32],
        hv: &mut [f32],
    ) -> (f32, f32) {
        let c = &self.model.config;
        let (d, r, s, eps) = (c.n_embd, self.p.rank, self.p.scale, c.rms_eps);
        let g2 = self.model.layers[self.p.layer].post_ffn_norm.as_deref();
        let resid = &l.resid[ri * d..(ri + 1) * d];
        let down = &l.down[ri * d..(ri + 1) * d];
        for ((t, dn), bj) in tsum.iter_mut().zip(down).zip(self.p.b.chunks_exact(r)) {
            *t = dn + s * bj.iter().zip(h1).map(|(b, h)| b * h).sum::<f32>();
        }
        let rho2 = match g2 {
            Some(_) => ((sum_sq_f64(tsum) / d as f64) as f32 + eps).sqrt(),
            None => 1.0,
        };
        match g2 {
            Some(g2) => {
                for ((h, x), (g, t)) in hv.iter_mut().zip(resid).zip(g2.iter().zip(&*tsum)) {
                    *h = x + g * t / rho2;
                }
            }
            // (1·t is t exactly.)
            None => {
                for ((h, x), t) in hv.iter_mut().zip(resid).zip(&*tsum) {
                    *h = x + t / rho2;
                }
            }
        }
        let rho = ((sum_sq_f64(hv) / d as f64) as f32 + eps).sqrt();
        (rho2, rho)
    }

    /// Every row of `l` through the final norm with the current parameters (`[rows ×
    /// n_embd]`): what [`ruvllm_model::head_logits`] turns into full-vocabulary logits.
    pub fn normed(&self, l: &Prepared) -> Vec<f32> {
        let c = &self.model.config;
        let (d, ff) = (c.n_embd, c.n_ff);
        let (mut tsum, mut hv) = (vec![0f32; d], vec![0f32; d]);
        let mut out = Vec::with_capacity(l.target.len() * d);
        for ri in 0..l.target.len() {
            let act = &l.act[ri * ff..(ri + 1) * ff];
            let h1: Vec<f32> = (0..self.p.rank)
                .map(|k| dot(&self.p.a[k * ff..(k + 1) * ff], act))
                .collect();
            let (_, rho) = self.hidden(l, ri, &h1, &mut tsum, &mut hv);
            out.extend(
                hv.iter()
                    .zip(&self.model.output_norm)
                    .map(|(h, g)| g * h / rho),
            );
        }
        out
    }

    /// The adapter-independent parts of `lessons`' full-vocabulary logits (see [`FullFixed`]),
    /// in one pass of the LM head over all their rows (two with a post-FFN norm).
    pub fn full_fixed(&self, pool: &ThreadPool, lessons: &[&Prepared]) -> Vec<FullFixed> {
        let c = &self.model.config;
        let (d, nv) = (c.n_embd, c.n_vocab);
        let g = &self.model.output_norm;
        let g2 = self.model.layers[self.p.layer].post_ffn_norm.as_deref();
        let total: usize = lessons.iter().map(|l| l.n_rows()).sum();
        let (mut xp, mut xq) = (Vec::with_capacity(total * d), Vec::new());
        for l in lessons {
            for ri in 0..l.n_rows() {
                let (resid, down) = (
                    &l.resid[ri * d..(ri + 1) * d],
                    &l.down[ri * d..(ri + 1) * d],
                );
                match g2 {
                    None => xp.extend((0..d).map(|j| g[j] * (resid[j] + down[j]))),
                    Some(g2) => {
                        xp.extend((0..d).map(|j| g[j] * resid[j]));
                        xq.extend((0..d).map(|j| g[j] * g2[j] * down[j]));
                    }
                }
            }
        }
        let through_head = |x: &[f32]| {
            let mut out = vec![0f32; total * nv];
            if total > 0 {
                head_logits(&self.model, pool, x, &mut out);
            }
            out
        };
        let p = through_head(&xp);
        let q = g2.map(|_| through_head(&xq));
        let mut seen = 0;
        lessons
            .iter()
            .map(|l| {
                let span = seen * nv..(seen + l.n_rows()) * nv;
                seen += l.n_rows();
                FullFixed {
                    rows: l.n_rows(),
                    p: p[span.clone()].to_vec(),
                    q: q.as_ref().map(|q| q[span].to_vec()),
                }
            })
            .collect()
    }

    /// `M = W·diag(g ⊙ g2)·B` for the current `B`: `[rank × n_vocab]` (one LM-head pass of
    /// `rank` rows), what [`full_logits`](Self::full_logits) combines with a [`FullFixed`].
    pub fn full_basis(&self, pool: &ThreadPool) -> Vec<f32> {
        let c = &self.model.config;
        let (d, r) = (c.n_embd, self.p.rank);
        let g = &self.model.output_norm;
        let g2 = self.model.layers[self.p.layer].post_ffn_norm.as_deref();
        let x: Vec<f32> = (0..r)
            .flat_map(|k| {
                (0..d).map(move |j| g[j] * g2.map_or(1.0, |g2| g2[j]) * self.p.b[j * r + k])
            })
            .collect();
        let mut m = vec![0f32; r * c.n_vocab];
        head_logits(&self.model, pool, &x, &mut m);
        m
    }

    /// Row `ri` of `l`: its full-vocabulary logits under the current parameters (`n_vocab`
    /// values into `out`) from its fixed parts and the current [`full_basis`](Self::full_basis),
    /// `O(n_vocab·rank)` instead of an `n_vocab × n_embd` product.
    pub fn full_logits(
        &self,
        l: &Prepared,
        fixed: &FullFixed,
        basis: &[f32],
        ri: usize,
        out: &mut [f32],
    ) {
        let c = &self.model.config;
        let (d, ff, nv, r, s) = (c.n_embd, c.n_ff, c.n_vocab, self.p.rank, self.p.scale);
        let act = &l.act[ri * ff..(ri + 1) * ff];
        let h1: Vec<f32> = (0..r)
            .map(|k| dot(&self.p.a[k * ff..(k + 1) * ff], act))
            .collect();
        let (mut tsum, mut hv) = (vec![0f32; d], vec![0f32; d]);
        let (rho2, rho) = self.hidden(l, ri, &h1, &mut tsum, &mut hv);
        // (P + (Q + s·M·h1)/ρ2)/ρ, accumulated in place from Q — or, without a post-FFN norm
        // (ρ2 = 1), (P + s·M·h1)/ρ from P: three vector passes instead of five.
        let out = &mut out[..nv];
        let p = &fixed.p[ri * nv..(ri + 1) * nv];
        let q = fixed.q.as_ref().map(|q| &q[ri * nv..(ri + 1) * nv]);
        out.copy_from_slice(q.unwrap_or(p));
        for k in 0..r {
            axpy(s * h1[k], &basis[k * nv..(k + 1) * nv], out);
        }
        let (inv2, inv) = (1.0 / rho2, 1.0 / rho);
        match q {
            Some(_) => out
                .iter_mut()
                .zip(p)
                .for_each(|(o, p)| *o = (p + *o * inv2) * inv),
            None => out.iter_mut().for_each(|o| *o *= inv),
        }
    }

    /// The candidate objective (mean over rows) and its gradients with respect to `A` and `B`.
    pub fn loss_and_grads(&self, l: &Prepared) -> (f32, Vec<f32>, Vec<f32>) {
        let c = &self.model.config;
        let (d, ff, r, s) = (c.n_embd, c.n_ff, self.p.rank, self.p.scale);
        let g2 = self.model.layers[self.p.layer].post_ffn_norm.as_deref();
        let n_c = l.n_c;
        let mut da = vec![0f32; self.p.a.len()];
        let mut db = vec![0f32; self.p.b.len()];
        let rows = l.target.len();
        if rows == 0 || n_c == 0 {
            return (0.0, da, db);
        }
        // M = W_C·diag(g ⊙ g2)·B, rank-major `[r × |C|]`: each rank's column of B, weighted by
        // the norms, against every candidate row (rows read once for all ranks).
        let g = &self.model.output_norm;
        let gg: Vec<f32> = (0..d).map(|j| g[j] * g2.map_or(1.0, |g2| g2[j])).collect();
        let qb: Vec<f32> = (0..r)
            .flat_map(|k| {
                (0..d)
                    .map(|j| gg[j] * self.p.b[j * r + k])
                    .collect::<Vec<_>>()
            })
            .collect();
        let m = rows_times(&qb, d, &l.wc, n_c);
        let mut dm = vec![0f32; r * n_c];
        // B rank-major (`[r × d]`), and dB's per-row part accumulated the same way: vector
        // dot products and axpys over `d` instead of a strided loop per element.
        let bt: Vec<f32> = (0..r)
            .flat_map(|k| (0..d).map(move |j| self.p.b[j * r + k]))
            .collect();
        let mut db_rows = vec![0f32; r * d];
        let norm = 1.0 / rows as f32;
        let mut total = 0f64;
        let (mut y, mut u, mut du, mut z, mut dz, mut tsum, mut hv, mut dtsum) = (
            vec![0f32; n_c],
            vec![0f32; n_c],
            vec![0f32; n_c],
            vec![0f32; n_c + 1],
            vec![0f32; n_c + 1],
            vec![0f32; d],
            vec![0f32; d],
            vec![0f32; d],
        );
        for ri in 0..rows {
            let act = &l.act[ri * ff..(ri + 1) * ff];
            let h1: Vec<f32> = (0..r)
                .map(|k| dot(&self.p.a[k * ff..(k + 1) * ff], act))
                .collect();
            let (rho2, rho) = self.hidden(l, ri, &h1, &mut tsum, &mut hv);
            let (p, q) = (
                &l.p[ri * n_c..(ri + 1) * n_c],
                &l.q[ri * n_c..(ri + 1) * n_c],
            );
            // u = s·M·h1; y = (P + (Q + u)/ρ2)/ρ.
            u.fill(0.0);
            for k in 0..r {
                axpy(s * h1[k], &m[k * n_c..(k + 1) * n_c], &mut u);
            }
            let (inv2, inv) = (1.0 / rho2, 1.0 / rho);
            for ((yi, (pi, qi)), ui) in y.iter_mut().zip(p.iter().zip(q)).zip(&u) {
                *yi = (pi + (qi + ui) * inv2) * inv;
            }
            z[..n_c].copy_from_slice(&y);
            let off = l.offset[ri];
            z[l.n_top..n_c].iter_mut().for_each(|v| *v += off);
            let n_ext = if l.fixed_rest[ri].is_finite() {
                z[n_c] = l.fixed_rest[ri];
                n_c + 1
            } else {
                n_c
            };
            total +=
                objective_grad(l.objective, &z[..n_ext], l.target[ri], &mut dz[..n_ext]) as f64;
            // Backward (the rest's logit is fixed).
            // Element-wise parts apart from the sums (which keep their order).
            for (dui, dzi) in du.iter_mut().zip(&dz[..n_c]) {
                *dui = dzi * norm * inv * inv2;
            }
            let drho = -norm * inv * dot(&dz[..n_c], &y);
            let mut drho2 = 0f32;
            if g2.is_some() {
                drho2 -= inv2 * (dot(&du, q) + dot(&du, &u));
            }
            let mut dh1: Vec<f32> = (0..r)
                .map(|k| s * dot(&m[k * n_c..(k + 1) * n_c], &du))
                .collect();
            for k in 0..r {
                axpy(s * h1[k], &du, &mut dm[k * n_c..(k + 1) * n_c]);
            }
            match g2 {
                Some(g2) => {
                    for j in 0..d {
                        let dh = drho * hv[j] / (d as f32 * rho);
                        dtsum[j] = g2[j] * dh / rho2;
                        drho2 -= dh * g2[j] * tsum[j] / (rho2 * rho2);
                    }
                    for j in 0..d {
                        dtsum[j] += drho2 * tsum[j] / (d as f32 * rho2);
                    }
                }
                None => {
                    let dr = d as f32 * rho;
                    for (t, h) in dtsum.iter_mut().zip(&hv) {
                        *t = drho * h / dr;
                    }
                }
            }
            for k in 0..r {
                axpy(s * h1[k], &dtsum, &mut db_rows[k * d..(k + 1) * d]);
                dh1[k] += s * dot(&bt[k * d..(k + 1) * d], &dtsum);
            }
            for k in 0..r {
                axpy(dh1[k], act, &mut da[k * ff..(k + 1) * ff]);
            }
        }
        // dB += diag(g ⊙ g2)·W_Cᵀ·dM: per rank a weighted sum of the candidate rows (rows read
        // once for all ranks), then weighted by the norms and interleaved.
        let mut dbt = vec![0f32; r * d];
        for k0 in (0..r).step_by(MAX_HEADS) {
            let k1 = (k0 + MAX_HEADS).min(r);
            weighted_sum_f16_heads(
                &dm[k0 * n_c..k1 * n_c],
                n_c,
                &l.wc,
                d,
                n_c,
                &mut dbt[k0 * d..k1 * d],
                d,
            );
        }
        for j in 0..d {
            for k in 0..r {
                db[j * r + k] = db_rows[k * d + j] + gg[j] * dbt[k * d + j];
            }
        }
        ((total / rows as f64) as f32, da, db)
    }

    /// One Adam step on the mean of the lessons' objectives plus the anchor penalty, if set;
    /// returns the lessons' mean objective before it.
    pub fn step<P: std::borrow::Borrow<Prepared> + Sync>(&mut self, lessons: &[P]) -> f32 {
        self.step_ewc_on(None, lessons, 0.0)
    }

    /// [`step`](Self::step) with the lessons' objectives and gradients computed in parallel on
    /// `pool` (one task per lesson) and summed in lesson order: the same bits as `step`.
    pub fn step_on<P: std::borrow::Borrow<Prepared> + Sync>(
        &mut self,
        pool: &ThreadPool,
        lessons: &[P],
    ) -> f32 {
        self.step_ewc_on(Some(pool), lessons, 0.0)
    }

    /// [`step`](Self::step) plus the EWC++ penalty with weight `lambda`.
    pub fn step_ewc<P: std::borrow::Borrow<Prepared> + Sync>(
        &mut self,
        lessons: &[P],
        lambda: f32,
    ) -> f32 {
        self.step_ewc_on(None, lessons, lambda)
    }

    /// One Adam step: each lesson's (objective, dA, dB) — on `pool`'s threads when given —
    /// averaged in lesson order, plus the anchor and (weight `lambda`) EWC++ penalties;
    /// returns the lessons' mean objective before it.
    fn step_ewc_on<P: std::borrow::Borrow<Prepared> + Sync>(
        &mut self,
        pool: Option<&ThreadPool>,
        lessons: &[P],
        lambda: f32,
    ) -> f32 {
        let this = &*self;
        let grads = per_row(pool, lessons.len(), |i| {
            this.loss_and_grads(lessons[i].borrow())
        });
        let mut da = vec![0f32; self.p.a.len()];
        let mut db = vec![0f32; self.p.b.len()];
        let n = grads.len().max(1) as f32;
        let mut loss = 0f32;
        for (v, ga, gb) in grads {
            loss += v / n;
            da.iter_mut().zip(&ga).for_each(|(x, y)| *x += y / n);
            db.iter_mut().zip(&gb).for_each(|(x, y)| *x += y / n);
        }
        self.p.add_anchor_grads(&mut da, &mut db);
        if let Some(e) = self.ewc.as_ref().filter(|_| lambda > 0.0) {
            da.iter_mut()
                .zip(self.p.a.iter().zip(e.fisher_a.iter().zip(&e.star_a)))
                .for_each(|(g, (p, (f, s)))| *g += lambda * f * (p - s));
            db.iter_mut()
                .zip(self.p.b.iter().zip(e.fisher_b.iter().zip(&e.star_b)))
                .for_each(|(g, (p, (f, s)))| *g += lambda * f * (p - s));
        }
        self.p.update(&da, &db);
        self.project_a();
        loss
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The top-k scan equals sorting (descending value, earlier position first on ties),
    /// with ties across block boundaries, −∞ values and k beyond the row.
    #[test]
    fn top_indices_equal_a_sort() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for (n, k) in [(1000, 16), (49, 8), (200, 0), (10, 20), (130, 64)] {
            let row: Vec<f32> = (0..n)
                .map(|i| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    match x % 10 {
                        0 => f32::NEG_INFINITY,
                        1 => 3.0, // many ties
                        _ => (x % 1000) as f32 / 100.0 + if i > n / 2 { 0.5 } else { 0.0 },
                    }
                })
                .collect();
            let mut want: Vec<u32> = (0..n as u32).collect();
            want.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
            want.truncate(k.min(n));
            assert_eq!(top_indices(&row, k), want, "n {n} k {k}");
        }
    }

    /// A likely objective keeps the least likely targets, an unlikely one the most likely;
    /// rows before `first` and without targets are never scored; fewer rows than `k`: all.
    #[test]
    fn telling_rows_are_the_least_or_most_likely_targets() {
        let nv = 4;
        // Rows 1..5 (first = 1), target 0 with p(target) 0.7, 0.1, 0.4, 0.9.
        let ps = [0.7f64, 0.1, 0.4, 0.9];
        let logits: Vec<f32> = ps
            .iter()
            .flat_map(|&p| {
                let rest = ((1.0 - p) / 3.0).ln() as f32;
                [p.ln() as f32, rest, rest, rest]
            })
            .collect();
        let targets = vec![None, Some(0), Some(0), Some(0), Some(0)];
        let scored = target_logprobs(&logits, nv, &targets, 1);
        assert_eq!(
            scored.iter().map(|s| s.0).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        for ((_, lp), p) in scored.iter().zip(ps) {
            assert!((lp - p.ln() as f32).abs() < 1e-5, "{lp} vs ln {p}");
        }
        assert_eq!(telling_rows(&scored, 2, false), vec![2, 3]);
        assert_eq!(telling_rows(&scored, 2, true), vec![1, 4]);
        assert_eq!(telling_rows(&scored, 9, false), vec![1, 2, 3, 4]);
        let mut masked = targets.clone();
        mask_targets(&mut masked, &[2, 3]);
        assert_eq!(masked, vec![None, None, Some(0), Some(0), None]);
    }
}
