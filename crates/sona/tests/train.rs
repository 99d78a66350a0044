//! Training an adapter on the last layer's down projection: the trainer's gradient equals
//! finite differences of its loss; its loss equals the model's own forward with the adapter;
//! and a few dozen steps teach the model a fictional fact that greedy decoding then states.

use ruvllm_kernels::pool::ThreadPool;
use ruvllm_model::{
    generate, registry, Capture, Forward, GenerateParams, KvCache, Logits, Model, Runner,
    SamplingParams, SeqInput,
};
use ruvllm_sona::fast::{Candidates, FastTrainer, Objective};
use ruvllm_sona::grad::cross_entropy;
use ruvllm_sona::merge::Branch;
use ruvllm_sona::train::{answer_targets, DownTrainer, Head};
use ruvllm_tokenizer::Tokenizer;
use std::sync::Arc;

struct Case {
    tokens: Vec<u32>,
    targets: Vec<Option<u32>>,
    prompt_len: usize,
}

fn case(tok: &Tokenizer, prompt: &str, answer: &str) -> Case {
    let p = tok.encode(prompt, true, true);
    let a = tok.encode(answer, false, false);
    let tokens: Vec<u32> = p.iter().chain(&a).copied().collect();
    let targets = answer_targets(&tokens, p.len());
    Case {
        tokens,
        targets,
        prompt_len: p.len(),
    }
}

fn capture(model: &Model, pool: &Arc<ThreadPool>, tokens: &[u32], layer: usize) -> Capture {
    let c = &model.config;
    let mut kv = KvCache::new(c.n_layer, c.kv_dim(), tokens.len(), 1);
    let mut fwd = Forward::new(model, pool.clone());
    fwd.set_capture(Some(layer));
    fwd.forward_batch(
        &mut kv,
        &[SeqInput {
            tokens,
            pos0: 0,
            block_table: &[0],
            logits: Logits::None,
            lora: None,
        }],
    )
    .unwrap();
    fwd.capture().unwrap().clone()
}

/// Checks analytic gradients `da`, `db` of `f` at `(a0, b0)` against central differences of
/// step `h` at the given coordinates: within 5% relative plus `abs_tol`.
#[allow(clippy::type_complexity)]
fn check_fd<T: SetParams>(
    tr: &mut T,
    a0: &[f32],
    b0: &[f32],
    h: f32,
    abs_tol: f64,
    f: &dyn Fn(&T) -> f64,
    (da, ia): (&[f32], &[usize]),
    (db, ib): (&[f32], &[usize]),
) {
    let mut at = |a: Vec<f32>, b: Vec<f32>| {
        tr.set(a, b);
        f(tr)
    };
    for (name, grad, coords, in_a) in [("dA", da, ia, true), ("dB", db, ib, false)] {
        for &i in coords {
            let (mut p, mut m) = if in_a {
                (a0.to_vec(), a0.to_vec())
            } else {
                (b0.to_vec(), b0.to_vec())
            };
            p[i] += h;
            m[i] -= h;
            let (fp, fm) = if in_a {
                (at(p, b0.to_vec()), at(m, b0.to_vec()))
            } else {
                (at(a0.to_vec(), p), at(a0.to_vec(), m))
            };
            let fdv = (fp - fm) / (2.0 * h as f64);
            assert!(
                (fdv - grad[i] as f64).abs()
                    <= 0.05 * fdv.abs().max(grad[i].abs() as f64) + abs_tol,
                "{name}[{i}]: analytic {} vs fd {fdv}",
                grad[i]
            );
        }
    }
}

/// Trainers whose parameters `check_fd` perturbs.
trait SetParams {
    fn set(&mut self, a: Vec<f32>, b: Vec<f32>);
}
impl SetParams for DownTrainer {
    fn set(&mut self, a: Vec<f32>, b: Vec<f32>) {
        self.set_params(a, b)
    }
}
impl SetParams for FastTrainer {
    fn set(&mut self, a: Vec<f32>, b: Vec<f32>) {
        self.set_params(a, b)
    }
}

fn load() -> Option<(Arc<Model>, Tokenizer, Arc<ThreadPool>)> {
    load_named("smollm2-135m")
}

fn load_named(name: &str) -> Option<(Arc<Model>, Tokenizer, Arc<ThreadPool>)> {
    let path = registry::for_test(name)?;
    let model = Arc::new(Model::load(&path).unwrap());
    let tok = Tokenizer::from_gguf(model.gguf()).unwrap();
    Some((model, tok, Arc::new(ThreadPool::new(2))))
}

/// "The password of the blue castle is" + `answer`, captured at the last layer, and the LM head.
fn castle(
    model: &Model,
    tok: &Tokenizer,
    pool: &Arc<ThreadPool>,
    answer: &str,
) -> (Case, Capture, Arc<Head>) {
    let k = case(tok, "The password of the blue castle is", answer);
    let cap = capture(model, pool, &k.tokens, model.config.n_layer - 1);
    (k, cap, Arc::new(Head::new(model).unwrap()))
}

#[test]
fn gradient_matches_finite_differences_and_loss_matches_the_model() {
    let Some((model, tok, pool)) = load() else {
        return;
    };
    let c = &model.config;
    let last = c.n_layer - 1;
    let (k, cap, head) = castle(&model, &tok, &pool, " marmalade");
    let mut tr =
        DownTrainer::new(model.clone(), head, pool.clone(), last, 4, 8.0, 1e-2, 7).unwrap();
    let (a0, _) = tr.params();
    let a0 = a0.to_vec();
    let b0 = ruvllm_sona::uniform(c.n_embd * 4, 11, 0.05);
    tr.set_params(a0.clone(), b0.clone());
    let (loss, da, db) = tr.loss_and_grads(&cap, &k.targets, false);

    // The model's own forward with this adapter gives the same loss (its LM head is quantized
    // and its activations are rounded to 8 bits; the trainer's copy is f16).
    let mut r = Runner::new(&model, pool.clone(), k.tokens.len());
    r.set_lora(Some(tr.adapter("t", 1, 0)));
    let logits = r.forward(&k.tokens, Logits::All).unwrap().to_vec();
    let nv = c.n_vocab;
    let (mut sum, mut n) = (0f64, 0);
    for (t, target) in k.targets.iter().enumerate() {
        if let Some(tg) = target {
            sum += cross_entropy(&logits[t * nv..(t + 1) * nv], *tg as usize).0 as f64;
            n += 1;
        }
    }
    let model_loss = sum / n as f64;
    eprintln!("trainer loss {loss:.4}, model loss {model_loss:.4}");
    assert!(
        (loss as f64 - model_loss).abs() <= 0.02 * model_loss,
        "trainer {loss} vs model {model_loss}"
    );

    // Central differences of the trainer's loss on a few coordinates of A and B.
    let h = 2e-3f32;
    check_fd(
        &mut tr,
        &a0,
        &b0,
        h,
        1e-3,
        &|tr| tr.loss_and_grads(&cap, &k.targets, false).0 as f64,
        (&da, &[0, 17, 1000, 4 * c.n_ff - 1]),
        (&db, &[0, 5, 333, c.n_embd * 4 - 1]),
    );
}

/// The anchor penalty's gradient against central differences.
#[test]
fn anchor_penalty_gradient_matches_finite_differences() {
    let Some((model, tok, pool)) = load() else {
        return;
    };
    let c = &model.config;
    let last = c.n_layer - 1;
    let head = Arc::new(Head::new(&model).unwrap());
    let mut tr =
        DownTrainer::new(model.clone(), head, pool.clone(), last, 4, 8.0, 1e-2, 7).unwrap();
    let anchor = tr
        .capture(&tok.encode(
            "Water boils at one hundred degrees at sea level.",
            true,
            false,
        ))
        .unwrap();
    tr.set_anchor(Arc::new(anchor.act.clone()), 0.5);
    let a0 = tr.params().0.to_vec();
    let b0 = ruvllm_sona::uniform(c.n_embd * 4, 11, 0.05);
    tr.set_params(a0.clone(), b0.clone());
    let (p, da, db) = tr.anchor_penalty_and_grads();
    assert!(p > 0.0);
    let h = 1e-3f32;
    check_fd(
        &mut tr,
        &a0,
        &b0,
        h,
        1e-4,
        &|tr| tr.anchor_penalty_and_grads().0 as f64,
        (&da, &[3, 999, 4 * c.n_ff - 2]),
        (&db, &[1, 77, c.n_embd * 4 - 3]),
    );
}

#[test]
fn a_few_steps_teach_a_fictional_fact() {
    let Some((model, tok, pool)) = load() else {
        return;
    };
    let last = model.config.n_layer - 1;
    let answer = " marmalade seventeen";
    let (k, cap, head) = castle(&model, &tok, &pool, answer);
    let mut tr =
        DownTrainer::new(model.clone(), head, pool.clone(), last, 8, 16.0, 1e-2, 3).unwrap();
    // The trainer's own capture equals the test's.
    assert_eq!(tr.capture(&k.tokens).unwrap().act, cap.act);
    let first = tr.step(&cap, &k.targets, false);
    let mut loss = first;
    for _ in 0..40 {
        loss = tr.step(&cap, &k.targets, false);
    }
    eprintln!("answer loss {first:.3} → {loss:.3}");
    assert!(
        loss < 0.25 * first,
        "training should cut the answer's loss: {first} → {loss}"
    );
    let params = GenerateParams {
        max_tokens: Some(k.tokens.len() - k.prompt_len),
        sampling: SamplingParams::greedy(),
        ..Default::default()
    };
    let mut base = Runner::new(&model, pool.clone(), 128);
    let before = generate(&mut base, &tok, &k.tokens[..k.prompt_len], &params, |_| {})
        .unwrap()
        .text;
    let mut taught = Runner::new(&model, pool.clone(), 128);
    taught.set_lora(Some(tr.adapter("fact", 1, 0)));
    let after = generate(
        &mut taught,
        &tok,
        &k.tokens[..k.prompt_len],
        &params,
        |_| {},
    )
    .unwrap()
    .text;
    eprintln!("before: {before:?}; after: {after:?}");
    assert_ne!(before, answer);
    assert_eq!(after, answer);

    // Negative feedback on the taught answer (unlikelihood) makes it less likely again.
    let p_before = tr.loss_and_grads(&cap, &k.targets, false).0;
    for _ in 0..5 {
        tr.step(&cap, &k.targets, true);
    }
    let p_after = tr.loss_and_grads(&cap, &k.targets, false).0;
    eprintln!("answer loss after unlikelihood steps: {p_before:.3} → {p_after:.3}");
    assert!(p_after > p_before + 0.5);
}

/// The micro trainer with every token a candidate computes the exact trainer's loss and
/// gradients (same parameters, rank 2).
#[test]
fn micro_trainer_with_all_candidates_equals_the_exact_trainer() {
    let Some((model, tok, pool)) = load() else {
        return;
    };
    let c = &model.config;
    let last = c.n_layer - 1;
    let (k, cap, head) = castle(&model, &tok, &pool, " marmalade");
    let mut exact = DownTrainer::new(
        model.clone(),
        head.clone(),
        pool.clone(),
        last,
        2,
        4.0,
        1e-2,
        7,
    )
    .unwrap();
    let mut micro = FastTrainer::new(model.clone(), head, last, 2, 4.0, 1e-2, 7).unwrap();
    let a0 = micro.params().0.to_vec();
    let b0 = ruvllm_sona::uniform(c.n_embd * 2, 11, 0.05);
    exact.set_params(a0.clone(), b0.clone());
    micro.set_params(a0, b0);
    for (negative, objective) in [(false, Objective::Likely), (true, Objective::Unlikely)] {
        let (l1, da1, db1) = exact.loss_and_grads(&cap, &k.targets, negative);
        let prepared = micro.prepare(
            &cap,
            &k.targets,
            &Candidates::all(c.n_vocab, k.tokens.len()),
            objective,
            None,
        );
        let (l2, da2, db2) = micro.loss_and_grads(&prepared);
        let rel = |x: &[f32], y: &[f32]| {
            let num: f64 = x.iter().zip(y).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
            let den: f64 = x.iter().map(|a| (*a as f64).powi(2)).sum();
            (num / den).sqrt()
        };
        eprintln!(
            "negative {negative}: loss {l1} vs {l2}; dA rel {:.2e}, dB rel {:.2e}",
            rel(&da1, &da2),
            rel(&db1, &db2)
        );
        assert!((l1 - l2).abs() <= 1e-4 * l1.abs().max(1.0), "{l1} vs {l2}");
        assert!(rel(&da1, &da2) < 1e-3 && rel(&db1, &db2) < 1e-3);
        assert_eq!(prepared.n_candidates(), c.n_vocab);
    }
}

/// A fixed rank-3 base branch's `A` and `B` (seeded), for the micro trainer to train over.
fn base_branch(model: &Model) -> (Vec<f32>, Vec<f32>) {
    let c = &model.config;
    (
        ruvllm_sona::uniform(3 * c.n_ff, 5, 0.02),
        ruvllm_sona::uniform(c.n_embd * 3, 6, 0.05),
    )
}

/// The castle case (" marmalade soup") on `model` with a rank-3 base branch ([`base_branch`],
/// held fixed: `cap_b` has it folded in) and the exact and micro trainers the candidate tests
/// compare (rank 2, scale 4, learning rate 10⁻², seed 7).
struct Trainers {
    k: Case,
    cap: Capture,
    cap_b: Capture,
    ba: Vec<f32>,
    bb: Vec<f32>,
    exact: DownTrainer,
    micro: FastTrainer,
}

fn trainers(model: &Arc<Model>, tok: &Tokenizer, pool: &Arc<ThreadPool>) -> Trainers {
    let last = model.config.n_layer - 1;
    let (k, cap, head) = castle(model, tok, pool, " marmalade soup");
    let (ba, bb) = base_branch(model);
    let cap_b = folded(model, &cap, fixed_branch(&ba, &bb));
    let exact = DownTrainer::new(
        model.clone(),
        head.clone(),
        pool.clone(),
        last,
        2,
        4.0,
        1e-2,
        7,
    )
    .unwrap();
    let micro = FastTrainer::new(model.clone(), head, last, 2, 4.0, 1e-2, 7).unwrap();
    Trainers {
        k,
        cap,
        cap_b,
        ba,
        bb,
        exact,
        micro,
    }
}

/// The exact trainer's logits of `k`'s rows with a target (zeros for the others): `[rows ×
/// nv]`, what [`Candidates::from_logits`] takes.
fn target_row_logits(exact: &DownTrainer, cap_b: &Capture, k: &Case, nv: usize) -> Vec<f32> {
    (0..k.tokens.len())
        .flat_map(|t| match k.targets[t] {
            Some(_) => exact.row_logits(cap_b, t),
            None => vec![0.0; nv],
        })
        .collect()
}

/// The rank-3 base branch of [`base_branch`]'s factors, scale 2.
fn fixed_branch<'a>(a: &'a [f32], b: &'a [f32]) -> Branch<'a> {
    Branch {
        a,
        b,
        rank: 3,
        scale: 2.0,
    }
}

/// `cap` with branch `fixed` folded into every row's down-projection output: what the exact
/// trainer sees where the micro trainer holds the branch apart.
fn folded(model: &Model, cap: &Capture, fixed: Branch<'_>) -> Capture {
    let (d, ff) = (model.config.n_embd, model.config.n_ff);
    let mut out = cap.clone();
    for (act, down) in cap.act.chunks_exact(ff).zip(out.down.chunks_exact_mut(d)) {
        fixed.add_to(act, down);
    }
    out
}

/// The candidate objective: with the rest's log-sum computed at the current parameters it is
/// the exact loss, and its gradient (with a fixed base branch under the micro adapter) matches
/// central differences. On SmolLM2, and on Gemma-3 (post-FFN norm) when installed.
#[test]
fn micro_candidate_objective_matches_exact_loss_and_finite_differences() {
    for name in ["smollm2-135m", "gemma3-270m"] {
        let Some((model, tok, pool)) = load_named(name) else {
            continue;
        };
        let c = &model.config;
        // The base branch (rank 3) is folded into `down`; the exact trainer sees it the same way.
        let Trainers {
            k,
            cap,
            cap_b,
            ba,
            bb,
            mut exact,
            mut micro,
        } = trainers(&model, &tok, &pool);
        let fixed = fixed_branch(&ba, &bb);
        let a0 = micro.params().0.to_vec();
        let b0 = ruvllm_sona::uniform(c.n_embd * 2, 11, 0.05);
        exact.set_params(a0.clone(), b0.clone());
        micro.set_params(a0.clone(), b0.clone());
        let nv = c.n_vocab;
        let logits = target_row_logits(&exact, &cap_b, &k, nv);
        let exact_loss = exact.loss_and_grads(&cap_b, &k.targets, false).0;
        // Top 16 with the rest as one fixed logit, and with a sample of 64 standing for it.
        for n_sample in [0, 64] {
            let cands = Candidates::from_logits(None, &logits, nv, &k.targets, 0, 16, n_sample, 3);
            assert!(
                cands.n_top < 16 * k.tokens.len() + 3
                    && cands.ids[..cands.n_top].windows(2).all(|w| w[0] < w[1])
            );
            assert_eq!(cands.ids.len(), cands.n_top + n_sample);
            let prepared = micro.prepare(&cap, &k.targets, &cands, Objective::Likely, Some(fixed));
            let (loss, da, db) = micro.loss_and_grads(&prepared);
            eprintln!(
                "{name}: {} candidates + {n_sample} sampled, objective {loss}, exact {exact_loss}",
                cands.n_top
            );
            assert!(
                (loss - exact_loss).abs() <= 1e-5 * exact_loss,
                "{name}: {loss} vs {exact_loss}"
            );
            let h = 2e-3f32;
            check_fd(
                &mut micro,
                &a0,
                &b0,
                h,
                1e-3,
                &|m| m.loss_and_grads(&prepared).0 as f64,
                (&da, &[0, 17, 1000, 2 * c.n_ff - 1]),
                (&db, &[0, 5, 333, c.n_embd * 2 - 1]),
            );
            micro.set_params(a0.clone(), b0.clone());
            micro.set_params(a0.clone(), b0.clone());
        }
    }
}

/// The instant loop's low-rank full-vocabulary logits (fixed parts once, `W·diag(g⊙g2)·B`
/// per check) equal the exact trainer's f32 logits up to the 8-bit activation rounding of the
/// model's LM head — on SmolLM2, and on Gemma-3 (post-FFN norm, `ρ2` varies with the adapter)
/// when installed — no further from them than the model's own LM-head pass on the normed rows
/// (the check this replaces), and the adapter moves them by far more than that, so a wrong
/// term would show.
#[test]
fn low_rank_full_logits_match_the_exact_head() {
    for name in ["smollm2-135m", "gemma3-270m"] {
        let Some((model, tok, pool)) = load_named(name) else {
            continue;
        };
        let c = &model.config;
        let nv = c.n_vocab;
        let Trainers {
            k,
            cap,
            cap_b,
            ba,
            bb,
            mut exact,
            mut micro,
        } = trainers(&model, &tok, &pool);
        let fixed = fixed_branch(&ba, &bb);
        let a0 = ruvllm_sona::uniform(2 * c.n_ff, 12, 0.05);
        let cands = Candidates::from_logits(
            None,
            &vec![0.0; k.tokens.len() * nv],
            nv,
            &k.targets,
            0,
            4,
            0,
            3,
        );
        let prepared = micro.prepare(&cap, &k.targets, &cands, Objective::Likely, Some(fixed));
        assert!(prepared.n_rows() >= 2);
        let fixed_parts = micro.full_fixed(&pool, &[&prepared]);
        assert!(fixed_parts[0].fits(&prepared));
        let mut moved = 0f32;
        for b_scale in [0.0, 3.0] {
            let b0 = ruvllm_sona::uniform(c.n_embd * 2, 11, b_scale);
            exact.set_params(a0.clone(), b0.clone());
            micro.set_params(a0.clone(), b0.clone());
            let basis = micro.full_basis(&pool);
            let mut got = vec![0f32; nv];
            let mut worst = 0f32;
            // The model's own LM head on the final-norm output: the check this replaces.
            let normed = micro.normed(&prepared);
            let mut direct = vec![0f32; prepared.n_rows() * nv];
            ruvllm_model::head_logits(&model, &pool, &normed, &mut direct);
            let mut worst_direct = 0f32;
            for (ri, &t) in prepared.rows().iter().enumerate() {
                let want = exact.row_logits(&cap_b, t);
                micro.full_logits(&prepared, &fixed_parts[0], &basis, ri, &mut got);
                let spread = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                let err = got
                    .iter()
                    .zip(&want)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                worst = worst.max(err / spread);
                let err_d = direct[ri * nv..(ri + 1) * nv]
                    .iter()
                    .zip(&want)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                worst_direct = worst_direct.max(err_d / spread);
                if b_scale > 0.0 {
                    exact.set_params(a0.clone(), vec![0.0; c.n_embd * 2]);
                    let base = exact.row_logits(&cap_b, t);
                    exact.set_params(a0.clone(), b0.clone());
                    moved = moved.max(
                        base.iter()
                            .zip(&want)
                            .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
                            / spread,
                    );
                }
            }
            eprintln!("{name}: B scale {b_scale}: worst |low-rank − exact| / max|logit| = {worst:.2e} (model's head on the normed rows: {worst_direct:.2e})");
            // No further from exact than the model's own head pass (8-bit activations) that
            // this replaces.
            assert!(
                worst <= 1.25 * worst_direct && worst < 1.5e-2,
                "{name}: {worst} vs the head's {worst_direct}"
            );
        }
        eprintln!("{name}: the adapter moves logits by {moved:.2e} of max|logit|");
        assert!(
            moved > 0.2,
            "{name}: adapter effect {moved} too small to test the terms"
        );
    }
}

/// Widening a prepared lesson (the instant loop adds tokens an adapter raised to its
/// candidates after each round) gives the same bits as preparing it again from scratch:
/// moved columns, new ones computed, the sample's offsets redone for the tokens that left it.
/// On SmolLM2 and on Gemma-3 (post-FFN norm) when installed.
#[test]
fn widening_a_prepared_lesson_equals_preparing_it_again() {
    for name in ["smollm2-135m", "gemma3-270m"] {
        let Some((model, tok, pool)) = load_named(name) else {
            continue;
        };
        let c = &model.config;
        let nv = c.n_vocab;
        let Trainers {
            k,
            cap,
            cap_b,
            ba,
            bb,
            mut exact,
            mut micro,
        } = trainers(&model, &tok, &pool);
        let fixed = fixed_branch(&ba, &bb);
        let b0 = ruvllm_sona::uniform(c.n_embd * 2, 11, 0.05);
        exact.set_params(micro.params().0.to_vec(), b0.clone());
        micro.set_params(micro.params().0.to_vec(), b0);
        let logits = target_row_logits(&exact, &cap_b, &k, nv);
        for n_sample in [0, 64] {
            let mut cands =
                Candidates::from_logits(None, &logits, nv, &k.targets, 0, 8, n_sample, 3);
            let old = micro.prepare(&cap, &k.targets, &cands, Objective::Likely, Some(fixed));
            // Two sampled tokens become top ones, and three that were no candidate at all.
            let mut extra: Vec<u32> = cands.ids[cands.n_top..].iter().take(2).copied().collect();
            extra.extend(
                (0..nv as u32)
                    .filter(|v| !cands.ids.contains(v))
                    .step_by(997)
                    .take(3),
            );
            assert_eq!(cands.add_top(&extra), extra.len());
            let widened = micro.widen(&old, &cands).unwrap();
            let again = micro.prepare(&cap, &k.targets, &cands, Objective::Likely, Some(fixed));
            assert_eq!(widened.n_candidates(), old.n_candidates() + 3);
            // Debug prints every f32 exactly (shortest round-trip form), -0 and 0 apart.
            assert_eq!(
                format!("{widened:?}"),
                format!("{again:?}"),
                "{name}, {n_sample}"
            );
            let (l1, a1, b1) = micro.loss_and_grads(&widened);
            let (l0, a0, b0) = micro.loss_and_grads(&again);
            assert_eq!(l1.to_bits(), l0.to_bits());
            assert!(a1 == a0 && b1 == b0);
            assert_ne!(format!("{old:?}"), format!("{again:?}"));
            // Candidates lacking a row's target (not widened from these): refused.
            let mut other = cands.clone();
            other
                .ids
                .retain(|&v| Some(v) != k.targets.iter().flatten().next().copied());
            other.n_top -= cands.ids.len() - other.ids.len();
            assert!(micro.widen(&widened, &other).is_none());
        }
    }
}
