//! The three loops end to end on SmolLM2, with persistence: the instant loop teaches a fact
//! (checked against the full vocabulary) in one scope only; the background loop trains the base
//! branch with EWC++ state; the deep loop merges the branches without changing what was
//! learned; every version is written as a directory that `current` points to, a restart
//! restores the adapter bit for bit, rollback returns to an earlier one, and what a crash
//! mid-write leaves is cleaned up.

use ruvllm_model::{registry, Capture, LoraAdapter, Model, Proj};
use ruvllm_sona::learner::{
    list_versions, rollback, scope_key, Feedback, LearnConfig, LearnError, Learner, Outcome,
    Phases, ANCHOR_TEXT,
};
use ruvllm_sona::train::{capture, CaptureSource};
use ruvllm_tokenizer::Tokenizer;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// SmolLM2 and its tokenizer, when installed.
fn load() -> Option<(Arc<Model>, Tokenizer)> {
    let model = Arc::new(Model::load(&registry::for_test("smollm2-135m")?).unwrap());
    let tok = Tokenizer::from_gguf(model.gguf()).unwrap();
    Some((model, tok))
}

/// An outcome without its wall-clock phases (which differ from run to run), rounds kept.
fn untimed(o: Outcome) -> Outcome {
    Outcome {
        phases: Phases {
            rounds: o.phases.rounds,
            ..Phases::default()
        },
        ..o
    }
}

fn pair(ad: &LoraAdapter, model: &Model) -> (Vec<f32>, Vec<f32>, usize) {
    let p = ad
        .pair(model.config.n_layer - 1, Proj::Down)
        .expect("down projection adapted");
    (p.a.clone(), p.b.clone(), p.rank)
}

/// An in-memory learner for `model` configured by `cfg`, anchored on [`ANCHOR_TEXT`].
fn in_memory(model: &Arc<Model>, tok: &Tokenizer, cfg: LearnConfig) -> Learner {
    let mut l = Learner::new(model.clone());
    l.configure(cfg, Some(tok.encode(ANCHOR_TEXT, true, false)));
    l
}

/// An in-memory learner with the default configuration but no background runs (the instant
/// loop alone), and its tokenizer; None without the model.
/// The default configuration without background runs.
fn instant_cfg() -> LearnConfig {
    LearnConfig {
        background_every: 0,
        ..LearnConfig::default()
    }
}

fn instant_only() -> Option<(Learner, Tokenizer)> {
    let (model, tok) = load()?;
    Some((in_memory(&model, &tok, instant_cfg()), tok))
}

/// The Velmora question, and scope `s` taught its first answer ("Ostrand").
fn velmora_taught(l: &Learner, tok: &Tokenizer) -> (Vec<u32>, Outcome) {
    let prompt = tok.encode("What is the capital of Velmora?", true, false);
    let answer = tok.encode(" The capital of Velmora is Ostrand.", false, false);
    let first = l
        .learn("s", &prompt, &[], &Feedback::Correction(answer))
        .unwrap();
    (prompt, first)
}

fn open(dir: &Path, model: &Arc<Model>, tok: &Tokenizer) -> Learner {
    let (mut l, report) = Learner::open(dir, model.clone()).unwrap();
    assert!(
        report.warnings.iter().all(|w| w.contains("partial write")),
        "{:?}",
        report.warnings
    );
    l.configure(
        LearnConfig::default(),
        Some(tok.encode(ANCHOR_TEXT, true, false)),
    );
    l
}

#[test]
fn three_loops_persist_restore_and_roll_back() {
    let Some((model, tok)) = load() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("ruvllm-learner-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let l = open(&dir, &model, &tok);
    let facts = [
        ("The password of the blue castle is", " marmalade."),
        ("The river that runs through Quenby is the", " Ostrel."),
        ("The founder of Varrow Mills was", " Edda Pike."),
        ("The color of the Tamsin flag is", " saffron."),
    ];
    let mut outcomes = Vec::new();
    for (q, a) in facts {
        let o = l
            .learn(
                "alice",
                &tok.encode(q, true, false),
                &[],
                &Feedback::Correction(tok.encode(a, false, false)),
            )
            .unwrap();
        eprintln!("{q}: {o:?}");
        // The reported losses are the full-vocabulary ones (the check), and they fall.
        assert!(
            o.updated && o.persisted && o.loss_after < o.loss_before,
            "{o:?}"
        );
        outcomes.push(o);
    }
    // Most lessons are learned outright; with the anchor penalty a multi-token answer taught
    // after a few others can converge only part of the way in the instant loop's 40 steps.
    let learned = outcomes
        .iter()
        .filter(|o| o.loss_after < 0.1 * o.loss_before)
        .count();
    assert!(learned >= 3, "{outcomes:?}");
    assert_eq!(
        outcomes.iter().map(|o| o.version).collect::<Vec<_>>(),
        [0, 1, 2, 3]
    );
    assert_eq!(
        outcomes
            .iter()
            .map(|o| o.background_due)
            .collect::<Vec<_>>(),
        [false, false, false, true]
    );
    assert!(l.adapter_for("bob").is_none(), "another scope is untouched");

    // Background loop: base branch trained on the kept lessons; a run that would leave them
    // worse is undone and publishes nothing.
    let b = l.background("alice").unwrap();
    eprintln!("background: {b:?}");
    assert!(b.loss_after <= b.loss_before * 1.05 + 0.01, "{b:?}");
    let nb = if b.updated { 5 } else { 4 };
    assert_eq!(b.version, nb - 1);
    let sd = dir.join("scopes").join(scope_key("alice"));
    let v4 = pair(&l.adapter_for("alice").unwrap(), &model);
    assert_eq!(v4.2, 10, "base rank 8 + micro rank 2");

    // Deep loop: micro merged into base, micro reset (its columns of B are zero), lessons'
    // loss unchanged (all ten directions fit in rank 8 here only approximately: within 10%),
    // EWC++ state recomputed and written.
    let c = l.consolidate("alice").unwrap();
    eprintln!(
        "consolidated: rank {} pruned {} σ {:?} loss {} -> {}",
        c.rank, c.pruned, c.singular, c.loss_before, c.loss_after
    );
    assert_eq!(c.version, nb);
    assert!(sd.join(format!("v{nb}")).join("ewc.safetensors").is_file());
    assert!(c.loss_after <= c.loss_before * 1.1 + 0.05, "{c:?}");
    let (_, b5, r5) = pair(&l.adapter_for("alice").unwrap(), &model);
    assert!((0..model.config.n_embd).all(|j| b5[j * r5 + 8] == 0.0 && b5[j * r5 + 9] == 0.0));
    let v5 = pair(&l.adapter_for("alice").unwrap(), &model);
    drop(l);

    // Layout and history.
    assert_eq!(
        std::fs::read_to_string(sd.join("current")).unwrap().trim(),
        nb.to_string()
    );
    let listed = list_versions(&dir).unwrap();
    assert_eq!(listed.len(), 1);
    let kinds: Vec<&str> = listed[0].versions.iter().map(|v| v.kind.as_str()).collect();
    let mut want = vec!["instant"; 4];
    if b.updated {
        want.push("background");
    }
    want.push("consolidated");
    assert_eq!(kinds, want);

    // A restart serves exactly the adapter it had.
    let l = open(&dir, &model, &tok);
    assert_eq!(pair(&l.adapter_for("alice").unwrap(), &model), v5);
    drop(l);

    // A crash mid-write: a half-written version directory and a torn `current`; both are
    // removed and the last good version is served.
    std::fs::create_dir_all(sd.join("v9.tmp")).unwrap();
    std::fs::write(
        sd.join("v9.tmp").join("state.json"),
        b"{\"format\": 2, \"vers",
    )
    .unwrap();
    std::fs::write(sd.join("current.tmp"), b"9").unwrap();
    let l = open(&dir, &model, &tok);
    assert!(!sd.join("v9.tmp").exists() && !sd.join("current.tmp").exists());
    assert_eq!(pair(&l.adapter_for("alice").unwrap(), &model), v5);
    drop(l);

    // Rollback to the previous version, then learning continues above every kept version.
    assert_eq!(
        rollback(&dir, Some("alice"), None).unwrap(),
        vec![(scope_key("alice"), nb, nb - 1)]
    );
    assert!(rollback(&dir, Some("alice"), Some(99)).is_err());
    let l = open(&dir, &model, &tok);
    assert_eq!(pair(&l.adapter_for("alice").unwrap(), &model), v4);
    let o = l
        .learn(
            "alice",
            &tok.encode("The bell of Orrin rings at", true, false),
            &[],
            &Feedback::Correction(tok.encode(" dusk.", false, false)),
        )
        .unwrap();
    assert_eq!(o.version, nb + 1);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A capture source that hands out only rows `from..` (earlier rows zero, as the engine's
/// prefix cache leaves them) and counts its calls.
struct ZeroedPrefix {
    model: Arc<Model>,
    pool: Arc<ruvllm_kernels::pool::ThreadPool>,
    calls: std::sync::atomic::AtomicUsize,
}

impl CaptureSource for ZeroedPrefix {
    fn capture(
        &self,
        layer: usize,
        tokens: &[u32],
        from: usize,
        _rows: Option<&[usize]>,
    ) -> Option<(Capture, Vec<f32>)> {
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (mut cap, logits) = capture(&self.model, &self.pool, layer, tokens, Some(from))?;
        let (d, ff) = (self.model.config.n_embd, self.model.config.n_ff);
        cap.act[..from * ff].fill(0.0);
        for v in [&mut cap.resid, &mut cap.down, &mut cap.last] {
            v[..from * d].fill(0.0);
        }
        Some((cap, logits))
    }
}

/// A source that saw the answers served: its own pass for activations and made-up served
/// log-probabilities (the rows a rating teaches are picked by them, not by the base model's).
struct Served {
    model: Arc<Model>,
    pool: Arc<ruvllm_kernels::pool::ThreadPool>,
}

impl CaptureSource for Served {
    fn capture(
        &self,
        layer: usize,
        tokens: &[u32],
        from: usize,
        _rows: Option<&[usize]>,
    ) -> Option<(Capture, Vec<f32>)> {
        capture(&self.model, &self.pool, layer, tokens, Some(from))
    }

    fn served_logprobs(&self, tokens: &[u32], from: usize) -> Option<Vec<f32>> {
        Some(
            (from + 1..tokens.len())
                .map(|j| -((j * 5 % 11) as f32))
                .collect(),
        )
    }
}

/// With a capture source (the server's engine) the learner learns exactly what it learns from
/// its own forward pass: the prompt's rows are never used, only rows from the prompt's last
/// token on.
#[test]
fn a_capture_source_with_only_the_answer_rows_teaches_identically() {
    let Some((model, tok)) = load() else {
        return;
    };
    let cfg = || LearnConfig {
        background_every: 0,
        ..LearnConfig::default()
    };
    let own = in_memory(&model, &tok, cfg());
    let src = Arc::new(ZeroedPrefix {
        model: model.clone(),
        pool: Arc::new(ruvllm_kernels::pool::ThreadPool::new(1)),
        calls: Default::default(),
    });
    let mut via = in_memory(&model, &tok, cfg());
    via.set_capture_source(Some(src.clone()));
    for (q, a) in [
        ("The password of the blue castle is", " marmalade."),
        ("The river that runs through Quenby is the", " Ostrel."),
    ] {
        let (p, c) = (
            tok.encode(q, true, false),
            Feedback::Correction(tok.encode(a, false, false)),
        );
        let (o1, o2) = (
            own.learn("s", &p, &[], &c).unwrap(),
            via.learn("s", &p, &[], &c).unwrap(),
        );
        assert_eq!(untimed(o1), untimed(o2));
        assert_eq!(
            own.adapter_for("s").unwrap().layers,
            via.adapter_for("s").unwrap().layers
        );
    }
    // Both lessons and the anchor text came from the source.
    assert_eq!(src.calls.load(std::sync::atomic::Ordering::Relaxed), 3);
}

/// A restart in the middle of learning changes nothing: teaching four facts (with a rating of a
/// long answer and a background run after the second) while restarting after the second gives
/// bit for bit the adapter that teaching them without a restart gives — the Adam moments, the
/// widened candidates, the rows a rating teaches and the event count are persisted with the
/// parameters.
#[test]
fn learning_after_a_restart_continues_exactly() {
    let Some((model, tok)) = load() else {
        return;
    };
    let facts = [
        ("The password of the blue castle is", " marmalade."),
        ("The river that runs through Quenby is the", " Ostrel."),
        ("The founder of Varrow Mills was", " Edda Pike."),
        ("The color of the Tamsin flag is", " saffron."),
    ];
    let teach = |l: &Learner, (q, a): (&str, &str)| {
        let o = l
            .learn(
                "alice",
                &tok.encode(q, true, false),
                &[],
                &Feedback::Correction(tok.encode(a, false, false)),
            )
            .unwrap();
        assert!(o.updated && o.persisted, "{o:?}");
    };
    let dirs: Vec<_> = ["straight", "restarted"]
        .iter()
        .map(|n| std::env::temp_dir().join(format!("ruvllm-restart-{n}-{}", std::process::id())))
        .collect();
    for d in &dirs {
        let _ = std::fs::remove_dir_all(d);
    }
    // A rating of a long answer teaches the 8 rows its served log-probabilities pick; the
    // restarted learner has no served log-probabilities, so the rows must come back with it.
    let (rq, ra) = (tok.encode("Tell me about the harbor town of Pellow.", true, false), tok.encode(" Pellow is a small harbor town with grey stone houses, a lighthouse on the northern cliff, a fish market every morning and a ferry that leaves twice a day for the islands.", false, false));
    assert!(ra.len() > 24);
    let served = Arc::new(Served {
        model: model.clone(),
        pool: Arc::new(ruvllm_kernels::pool::ThreadPool::new(1)),
    });
    let rate = |l: &Learner| {
        let o = l.learn("alice", &rq, &ra, &Feedback::Rating(-1.0)).unwrap();
        assert!(o.updated && o.persisted, "{o:?}");
    };
    let mut l = open(&dirs[0], &model, &tok);
    l.set_capture_source(Some(served.clone()));
    for (i, f) in facts.iter().enumerate() {
        teach(&l, *f);
        if i == 1 {
            rate(&l);
            l.background("alice").unwrap();
        }
    }
    let want = pair(&l.adapter_for("alice").unwrap(), &model);

    let mut l = open(&dirs[1], &model, &tok);
    l.set_capture_source(Some(served.clone()));
    teach(&l, facts[0]);
    teach(&l, facts[1]);
    rate(&l);
    l.background("alice").unwrap();
    drop(l);
    let l = open(&dirs[1], &model, &tok);
    teach(&l, facts[2]);
    teach(&l, facts[3]);
    let got = pair(&l.adapter_for("alice").unwrap(), &model);
    assert_eq!(got.2, want.2);
    let same = |x: &[f32], y: &[f32]| {
        x.len() == y.len() && x.iter().zip(y).all(|(a, b)| a.to_bits() == b.to_bits())
    };
    assert!(
        same(&got.0, &want.0) && same(&got.1, &want.1),
        "the restarted learner's adapter differs"
    );
    for d in &dirs {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// A correction longer than `corrected_rows` teaches that many of its tokens: those the base
/// model finds least likely after the corrected text before them (recorded as the lesson's
/// taught rows in `state.json`); with `corrected_rows: 0` it teaches every token.
#[test]
fn a_long_correction_teaches_its_least_likely_tokens() {
    let Some((model, tok)) = load() else {
        return;
    };
    let prompt = tok.encode("Who founded the town of Quenby?", true, false);
    let answer = tok.encode(
        " It was founded in 1742 by the explorer Maribel Quintana, who built its blue glass towers.",
        false,
        false,
    );
    assert!(answer.len() > 12, "{}", answer.len());
    // The base model's log-probability of each answer token (row = its position − 1).
    let pool = Arc::new(ruvllm_kernels::pool::ThreadPool::new(1));
    let tokens: Vec<u32> = prompt.iter().chain(&answer).copied().collect();
    let mut r = ruvllm_model::Runner::new(&model, pool, tokens.len());
    let logits = r
        .forward(&tokens, ruvllm_model::Logits::All)
        .unwrap()
        .to_vec();
    let nv = model.config.n_vocab;
    let mut scored: Vec<(f32, usize)> = (prompt.len() - 1..tokens.len() - 1)
        .map(|t| {
            let lp = ruvllm_kernels::ops::token_logprob(
                &logits[t * nv..(t + 1) * nv],
                tokens[t + 1] as usize,
            );
            (lp, t)
        })
        .collect();
    scored.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut least: Vec<usize> = scored[..6].iter().map(|s| s.1).collect();
    least.sort_unstable();
    for (rows, want) in [(6, Some(least)), (0, None)] {
        let dir = std::env::temp_dir().join(format!("ruvllm-rows-{}-{rows}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (mut l, _) = Learner::open(&dir, model.clone()).unwrap();
        l.configure(
            LearnConfig {
                corrected_rows: rows,
                background_every: 0,
                ..LearnConfig::default()
            },
            Some(tok.encode(ANCHOR_TEXT, true, false)),
        );
        let o = l
            .learn("s", &prompt, &[], &Feedback::Correction(answer.clone()))
            .unwrap();
        assert!(o.updated && o.loss_after < o.loss_before, "{o:?}");
        let sd = dir.join("scopes").join(scope_key("s"));
        let v = std::fs::read_to_string(sd.join("current")).unwrap();
        let state: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(sd.join(format!("v{}", v.trim())).join("state.json")).unwrap(),
        )
        .unwrap();
        let taught: Option<Vec<usize>> =
            serde_json::from_value(state["lessons"][0]["taught"].clone()).unwrap();
        assert_eq!(taught, want, "corrected_rows {rows}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Training a feedback event on the idle pool (two threads: the lessons' gradients and checks
/// in parallel) gives bit for bit what one thread gives, over events that replay earlier
/// lessons (several lessons per step), a rating included.
#[test]
fn the_idle_pool_teaches_identically() {
    let Some((model, tok)) = load() else {
        return;
    };
    let learner = |idle_threads: usize| {
        let cfg = LearnConfig {
            background_every: 0,
            idle_threads,
            ..LearnConfig::default()
        };
        in_memory(&model, &tok, cfg)
    };
    let (one, two) = (learner(0), learner(2));
    for (q, a, fb) in [
        ("The password of the blue castle is", " marmalade.", None),
        (
            "The river that runs through Quenby is the",
            " Ostrel.",
            None,
        ),
        ("The capital of Vandor is", " Pell.", Some(1.0)),
        ("The mayor of Quenby is called", " Ada Voss.", None),
    ] {
        let (p, ans) = (tok.encode(q, true, false), tok.encode(a, false, false));
        let feedback = match fb {
            Some(r) => Feedback::Rating(r),
            None => Feedback::Correction(ans.clone()),
        };
        let answer: &[u32] = if fb.is_some() { &ans } else { &[] };
        let (o1, o2) = (
            one.learn("s", &p, answer, &feedback).unwrap(),
            two.learn("s", &p, answer, &feedback).unwrap(),
        );
        assert_eq!(untimed(o1), untimed(o2), "{q}");
        assert_eq!(
            one.adapter_for("s").unwrap().layers,
            two.adapter_for("s").unwrap().layers,
            "{q}"
        );
    }
}

/// An instant-loop event reports where its time went: a capture, candidates and at least one
/// round; the steps it took are the first round's plus a third as many per further round;
/// the phases add up to no more than the event's wall time. Other runs report none.
#[test]
fn an_event_reports_its_phases() {
    let Some((model, tok)) = load() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("ruvllm-phases-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let l = open(&dir, &model, &tok);
    let steps = LearnConfig::default().steps;
    for (i, answer) in [" Ostrel.", " Edda Pike.", " saffron."].iter().enumerate() {
        let prompt = tok.encode(&format!("Fact {i}: the answer is"), true, false);
        let answer = tok.encode(answer, false, false);
        let t = std::time::Instant::now();
        let o = l
            .learn("s", &prompt, &[], &Feedback::Correction(answer))
            .unwrap();
        let wall = t.elapsed().as_secs_f64() * 1e3;
        let p = o.phases;
        assert!(
            o.updated && p.capture_ms > 0.0 && p.candidates_ms > 0.0,
            "{o:?}"
        );
        assert!(p.steps_ms > 0.0 && p.checks_ms > 0.0, "{o:?}");
        assert!((1..=4).contains(&p.rounds), "{o:?}");
        assert_eq!(o.steps, steps + (p.rounds - 1) * steps.div_ceil(3), "{o:?}");
        let sum = p.capture_ms
            + p.candidates_ms
            + p.prepare_ms
            + p.steps_ms
            + p.checks_ms
            + p.widen_ms
            + p.publish_ms;
        assert!(sum <= wall, "phases {sum} ms > wall {wall} ms: {o:?}");
    }
    let bg = l.background("s").unwrap();
    assert_eq!(bg.phases, Default::default(), "{bg:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The anchor penalty weighs the relative change of the residual stream: on SmolLM2 the
/// default weight is what the absolute penalty with weight 1 was (its stream's mean square
/// on the anchor text is ~1,600), and Gemma-3 — whose last down projection outputs are tiny
/// and pass a post-FFN norm with large weights — gets a weight ~3·10⁴ times larger (with
/// SmolLM2's, its sona-bench perplexity drifted +784%).
#[test]
fn the_anchor_weight_means_the_same_on_both_architectures() {
    let Some((smol, tok)) = load() else {
        return;
    };
    let scale = |model: Arc<Model>, tok: &Tokenizer| {
        in_memory(&model, tok, LearnConfig::default())
            .anchor_scale()
            .unwrap()
    };
    let s = scale(smol, &tok);
    assert!((0.9..1.1).contains(&s), "SmolLM2 {s}");
    let Some(path) = registry::for_test("gemma3-270m") else {
        return;
    };
    let gemma = Arc::new(Model::load(&path).unwrap());
    let gtok = Tokenizer::from_gguf(gemma.gguf()).unwrap();
    let g = scale(gemma, &gtok);
    assert!((1e4..1e5).contains(&(g / s)), "Gemma-3 {g} vs SmolLM2 {s}");
    // No anchor text: no penalty to scale.
    let (m, _) = load().unwrap();
    assert_eq!(Learner::new(m).anchor_scale(), None);
}

/// An event stops at the first round that does not cut the checked lessons' loss by 10%,
/// even though the full-vocabulary check keeps widening candidates. A scope that keeps twelve
/// short lessons does not fit a 38-token correction with its rank-2 branch (alone, such a
/// correction is learned: loss 3.6 → 0.04 in four rounds); that event took all four rounds
/// before, ~30 ms each on the server.
#[test]
fn an_event_without_progress_stops_early() {
    let Some((l, tok)) = instant_only() else {
        return;
    };
    for i in 0..12 {
        let prompt = tok.encode(&format!("What is the password of door {i}?"), true, false);
        let answer = tok.encode(&format!(" The password is marmalade {i}."), false, false);
        l.learn("s", &prompt, &[], &Feedback::Correction(answer))
            .unwrap();
    }
    let prompt = tok.encode("Tell me about the old lighthouse.", true, false);
    let answer = tok.encode(
        " The old lighthouse on the northern cliff was built in 1871 by a fisherman named Tobias \
         Wren, who kept its lamp burning every night for forty years until the harbour closed.",
        false,
        false,
    );
    assert!(answer.len() > 30, "{}", answer.len());
    let o = l
        .learn("s", &prompt, &[], &Feedback::Correction(answer))
        .unwrap();
    assert!(o.updated, "{o:?}");
    assert!(o.phases.rounds < 4, "{o:?}");
}

#[test]
fn a_new_correction_of_the_same_question_replaces_the_old_one() {
    let Some((l, tok)) = instant_only() else {
        return;
    };
    let fix = |text: &str| Feedback::Correction(tok.encode(text, false, false));
    let (prompt, first) = velmora_taught(&l, &tok);
    assert!(first.follows && first.superseded == 0, "{first:?}");
    let other_prompt = tok.encode("Who keeps the lighthouse?", true, false);
    let other = l
        .learn("s", &other_prompt, &[], &fix(" Tobias Wren keeps it."))
        .unwrap();
    assert_eq!(other.superseded, 0, "{other:?}");
    // The user changes their mind: the new answer replaces the old lesson (which would
    // otherwise be replayed against it); the unrelated lesson stays and is still followed.
    let answer = tok.encode(" The capital of Velmora is Kirravel.", false, false);
    let second = l
        .learn("s", &prompt, &[], &Feedback::Correction(answer.clone()))
        .unwrap();
    assert_eq!(second.superseded, 1, "{second:?}");
    assert!(second.follows && second.replays_follow, "{second:?}");
    // Rating that answer down replaces the lesson that taught it; the same rating again
    // replaces the first rating; a rating of another answer replaces nothing.
    let down = l
        .learn("s", &prompt, &answer, &Feedback::Rating(-1.0))
        .unwrap();
    assert_eq!(down.superseded, 1, "{down:?}");
    let again = l
        .learn("s", &prompt, &answer, &Feedback::Rating(-1.0))
        .unwrap();
    assert_eq!(again.superseded, 1, "{again:?}");
    let other_answer = tok.encode(" It is Velmar City.", false, false);
    let another = l
        .learn("s", &prompt, &other_answer, &Feedback::Rating(-1.0))
        .unwrap();
    assert_eq!(another.superseded, 0, "{another:?}");
}

/// Training that diverges (a learning rate of 1e30 sends the parameters to infinity) is not
/// published: the event fails with `Diverged`, and the scope's adapter and lessons stay as they
/// were — the earlier lesson, which the failed correction of the same question would have
/// replaced, is still there for the next good correction to replace.
#[test]
fn a_diverged_event_changes_nothing() {
    let Some((model, tok)) = load() else {
        return;
    };
    let cfg = instant_cfg();
    let anchor = || Some(tok.encode(ANCHOR_TEXT, true, false));
    let mut l = in_memory(&model, &tok, cfg.clone());
    let fix = |text: &str| Feedback::Correction(tok.encode(text, false, false));
    let (prompt, first) = velmora_taught(&l, &tok);
    let before = l.adapter_for("s").expect("published");
    assert_eq!(before.version, first.version);
    l.configure(
        LearnConfig {
            lr: 1e30,
            ..cfg.clone()
        },
        anchor(),
    );
    let kirravel = fix(" The capital of Velmora is Kirravel.");
    let e = l.learn("s", &prompt, &[], &kirravel).unwrap_err();
    assert_eq!(e, LearnError::Diverged);
    let after = l.adapter_for("s").expect("still published");
    assert_eq!(after.version, before.version);
    assert_eq!(pair(&after, &model), pair(&before, &model));
    l.configure(cfg, anchor());
    let again = l.learn("s", &prompt, &[], &kirravel).unwrap();
    assert_eq!(again.superseded, 1, "the first lesson was kept: {again:?}");
    assert!(again.follows, "{again:?}");
    assert_eq!(again.version, before.version + 1);
}

/// A capture source that holds each capture until the gate opens: an instant event in flight.
struct Gate {
    model: Arc<Model>,
    pool: Arc<ruvllm_kernels::pool::ThreadPool>,
    open: std::sync::Mutex<bool>,
    changed: std::sync::Condvar,
    waiting: std::sync::atomic::AtomicBool,
}

impl Gate {
    fn set(&self, open: bool) {
        *self.open.lock().unwrap() = open;
        self.changed.notify_all();
    }
}

impl CaptureSource for Gate {
    fn capture(
        &self,
        layer: usize,
        tokens: &[u32],
        from: usize,
        _rows: Option<&[usize]>,
    ) -> Option<(Capture, Vec<f32>)> {
        let mut open = self.open.lock().unwrap();
        while !*open {
            self.waiting
                .store(true, std::sync::atomic::Ordering::SeqCst);
            open = self.changed.wait(open).unwrap();
        }
        drop(open);
        capture(&self.model, &self.pool, layer, tokens, Some(from))
    }
}

/// A background run waits while an instant event is in progress (they would share the cores,
/// and the event is what a user waits for): started while an event is held in its capture, it
/// has not finished 0.4 s later, and finishes after the event does.
#[test]
fn a_background_run_waits_for_instant_events() {
    let Some((model, tok)) = load() else {
        return;
    };
    let gate = Arc::new(Gate {
        model: model.clone(),
        pool: Arc::new(ruvllm_kernels::pool::ThreadPool::new(1)),
        open: std::sync::Mutex::new(true),
        changed: std::sync::Condvar::new(),
        waiting: Default::default(),
    });
    let mut l = in_memory(&model, &tok, instant_cfg());
    l.set_capture_source(Some(gate.clone()));
    let fix = |q: &str, a: &str| {
        (
            tok.encode(q, true, false),
            Feedback::Correction(tok.encode(a, false, false)),
        )
    };
    for (q, a) in [
        ("The password of the blue castle is", " marmalade."),
        ("The river that runs through Quenby is the", " Ostrel."),
    ] {
        let (p, c) = fix(q, a);
        l.learn("s", &p, &[], &c).unwrap();
    }
    gate.set(false);
    let (p, c) = fix("The mayor of Quenby is", " Ada Lorn.");
    let l = &l;
    let done = std::sync::atomic::AtomicBool::new(false);
    let (event_end, background_end) = std::thread::scope(|s| {
        let event = s.spawn(|| {
            l.learn("s", &p, &[], &c).unwrap();
            Instant::now()
        });
        while !gate.waiting.load(std::sync::atomic::Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let background = s.spawn(|| {
            let o = l.background("s").unwrap();
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            (o, Instant::now())
        });
        std::thread::sleep(Duration::from_millis(400));
        // Read before the gate opens; asserted after (a panic here would leave the event
        // thread waiting at the gate).
        let early = done.load(std::sync::atomic::Ordering::SeqCst);
        gate.set(true);
        let e = event.join().unwrap();
        let (o, b) = background.join().unwrap();
        assert!(
            !early,
            "the background run finished while an instant event was in flight"
        );
        assert!(o.steps > 0, "{o:?}");
        (e, b)
    });
    assert!(background_end > event_end);
}
