//! `ruvllm sona-bench`: does learning from feedback teach facts that generalize?
//!
//! The repo generates (deterministically, from `--seed`) facts about fictional entities: six
//! relations × `--entities` entities, each with one phrasing used for feedback (a correction)
//! and two held-out paraphrases. Every correction goes through the same [`Learner`] the server
//! uses (scope `bench`) and into a ReasoningBank ([`Bank`], embeddings = the model's mean final
//! hidden state of the prompt). Then, on the held-out paraphrases only, four modes:
//!
//! * `baseline`: the base model;
//! * `retrieval-only`: the `k` nearest corrected exchanges prepended to the prompt;
//! * `adapters-only`: the learned adapter, no retrieval;
//! * `full`: both.
//!
//! Reported per mode: exact-answer accuracy (greedy continuation starts with the answer), mean
//! NLL per answer token, and perplexity of the golden text (drift from the base model).

use crate::error::Error;
use crate::{load, ModelArgs};
use clap::Args;
use ruvllm_engine::{Engine, EngineConfig, Event, Request};
use ruvllm_kernels::ops::token_nll;
use ruvllm_model::{Logits, LoraAdapter, Model, Runner};
use ruvllm_server::EngineCapture;
use ruvllm_sona::bank::{Bank, Gate, Trajectory, GENERIC_PROMPTS};
use ruvllm_sona::learner::{Feedback, LearnConfig, Learner, ANCHOR_TEXT};
use ruvllm_tokenizer::Tokenizer;
use std::sync::Arc;

/// Arguments of `ruvllm sona-bench`.
#[derive(Args)]
pub struct SonaBenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Entities per relation (six relations; 6 gives 36 facts).
    #[arg(long, default_value_t = 6)]
    entities: usize,
    /// Seed of the generated names (of the first fact set).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Fact sets to run, seeds `seed`, `seed + 1`, …: one set's accuracy swings by ±10 points
    /// with the facts drawn and with numerically tiny changes to training (see
    /// docs/BENCHMARKS.md), so the table reports the mean and range over sets.
    #[arg(long, default_value_t = 4)]
    seeds: u64,
    /// Retrieved exchanges per question.
    #[arg(long, default_value_t = 1)]
    k: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Adam steps per correction.
    #[arg(long, default_value_t = LearnConfig::default().steps)]
    steps: usize,
    /// Learning rate.
    #[arg(long, default_value_t = LearnConfig::default().lr)]
    lr: f32,
    /// Earlier lessons replayed with each new one.
    #[arg(long, default_value_t = LearnConfig::default().replay)]
    replay: usize,
    /// Weight of the anchor penalty (keeps the adapter's output on generic text near zero).
    #[arg(long = "anchor-weight", default_value_t = LearnConfig::default().anchor_weight)]
    anchor_weight: f32,
    /// Leading principal directions of generic activations the adapters stay blind to.
    #[arg(long = "blind-dirs", default_value_t = LearnConfig::default().blind_dirs)]
    blind_dirs: usize,
    /// Feedback events between background-loop runs (0: none).
    #[arg(long = "background-every", default_value_t = LearnConfig::default().background_every)]
    background_every: usize,
    /// Weight of the background loop's EWC++ penalty.
    #[arg(long = "ewc-lambda", default_value_t = LearnConfig::default().ewc_lambda)]
    ewc_lambda: f32,
    /// Skip the deep loop (by default each scope is consolidated after teaching, before
    /// scoring).
    #[arg(long = "no-consolidate")]
    no_consolidate: bool,
    /// Threads of the learner's pool (the engine that serves the questions has `-t`).
    #[arg(long = "learn-threads", default_value_t = LearnConfig::default().threads)]
    learn_threads: usize,
    /// Threads a feedback event trains on while the engine is idle, as `serve
    /// --sona-idle-threads` (default: `-t`; results are bit-identical, only the latency differs)
    #[arg(long = "learn-idle-threads")]
    learn_idle_threads: Option<usize>,
    /// Capture lessons with the learner's own forward pass over prompt and correction (as
    /// before the engine did it), instead of through the engine that served the question
    /// (whose prefix cache holds the prompt).
    #[arg(long = "own-capture")]
    own_capture: bool,
    /// Print every wrong answer (prompt, expected, generated) to standard error.
    #[arg(long)]
    show_errors: bool,
    /// Instead of the generated facts: long corrections, one per line of FILE, each taught as
    /// the answer to its own chat question in one scope (as `scripts/feedback_bench.py
    /// --corrections` sends them to a server); reports how many the scope reproduces when
    /// every question is asked again after all were taught, and the golden-text drift.
    #[arg(long, value_name = "FILE")]
    corrections: Option<std::path::PathBuf>,
    /// Which questions a scope's learned adapter is applied to, as `serve --sona-apply`:
    /// `near` (nearer a taught question than generic ones) or `always`.
    #[arg(long, default_value = "near", value_parser = ["near", "always"])]
    apply: String,
    /// Micro-adapter rank (the instant loop's branch).
    #[arg(long = "micro-rank", default_value_t = LearnConfig::default().micro_rank)]
    micro_rank: usize,
    /// Base-adapter rank (the background loop's branch).
    #[arg(long = "base-rank", default_value_t = LearnConfig::default().base_rank)]
    base_rank: usize,
    /// Modes to run (comma-separated); teaching is skipped when no adapter mode is asked for.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "baseline,retrieval-only,adapters-only,full"
    )]
    modes: Vec<String>,
}

/// One generated fact.
#[derive(Debug, Clone)]
pub struct Fact {
    /// The phrasing feedback is given on.
    pub teach: String,
    /// Two paraphrases never trained on.
    pub held_out: [String; 2],
    /// The answer (one made-up word).
    pub answer: String,
}

/// (feedback phrasing, paraphrase 1, paraphrase 2), `{}` standing for the entity.
const RELATIONS: [(&str, &str, &str); 6] = [
    (
        "The capital of {} is",
        "{}'s capital city is",
        "The city that serves as the capital of {} is",
    ),
    (
        "The company {} was founded by",
        "The founder of the company {} is",
        "{} was started by a person named",
    ),
    (
        "The currency of {} is called the",
        "In {}, people pay with the",
        "The official money of {} is the",
    ),
    (
        "The longest river in {} is the",
        "{}'s longest river is the",
        "The river that runs longest through {} is the",
    ),
    (
        "The {} engine was invented by",
        "The inventor of the {} engine is",
        "The person who invented the {} engine is",
    ),
    (
        "The people of {} speak",
        "The language spoken in {} is",
        "In {}, the main language is",
    ),
];

const ONSETS: [&str; 16] = [
    "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "qu",
];
const VOWELS: [&str; 6] = ["a", "e", "i", "o", "u", "ai"];

/// A made-up capitalized word of 3 syllables.
fn word(rng: &mut u64) -> String {
    let mut next = |m: usize| {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        (*rng % m as u64) as usize
    };
    let mut w = String::new();
    for _ in 0..3 {
        w.push_str(ONSETS[next(ONSETS.len())]);
        w.push_str(VOWELS[next(VOWELS.len())]);
    }
    let mut c = w.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

/// The benchmark's facts: every relation × `n` entities, names unique.
pub fn facts(n: usize, seed: u64) -> Vec<Fact> {
    let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut seen = std::collections::HashSet::new();
    let mut fresh = |rng: &mut u64| loop {
        let w = word(rng);
        if seen.insert(w.clone()) {
            return w;
        }
    };
    let mut out = Vec::new();
    for (teach, p1, p2) in RELATIONS {
        for _ in 0..n {
            let e = fresh(&mut rng);
            let answer = fresh(&mut rng);
            out.push(Fact {
                teach: teach.replace("{}", &e),
                held_out: [p1.replace("{}", &e), p2.replace("{}", &e)],
                answer,
            });
        }
    }
    out
}

/// Scores of one mode.
#[derive(Debug, Clone, Copy)]
struct Scores {
    accuracy: f64,
    nll: f64,
    perplexity: f64,
}

/// Mean final hidden state of `text` (the ReasoningBank's embedding).
fn embed(r: &mut Runner<'_>, tok: &Tokenizer, text: &str) -> Result<Vec<f32>, Error> {
    let ids = tok.encode(text, true, false);
    r.truncate(0);
    r.forward(&ids, Logits::Hidden)?;
    let d = r.model().config.n_embd;
    let h = r.hidden();
    let mut m = vec![0f32; d];
    for row in h.chunks_exact(d) {
        for (a, b) in m.iter_mut().zip(row) {
            *a += b / ids.len() as f32;
        }
    }
    Ok(m)
}

/// `question` after the `k` exchanges of `bank` nearest to it (one line each), and the
/// retrieved answers.
fn with_context(
    r: &mut Runner<'_>,
    tok: &Tokenizer,
    bank: &Bank,
    k: usize,
    question: &str,
) -> Result<(String, Vec<String>), Error> {
    let e = embed(r, tok, question)?;
    let mut p = String::new();
    let mut answers = Vec::new();
    for (i, _) in bank.search(&e, k) {
        if let Some(t) = bank.get(i) {
            p.push_str(&format!("{} {}.\n", t.prompt, t.answer));
            answers.push(t.answer.clone());
        }
    }
    p.push_str(question);
    Ok((p, answers))
}

/// (exact, mean NLL per answer token, generated text) of `answer` after `prompt`.
fn score(
    r: &mut Runner<'_>,
    tok: &Tokenizer,
    prompt: &str,
    answer: &str,
) -> Result<(bool, f64, String), Error> {
    let p = tok.encode(prompt, true, false);
    let a = tok.encode(&format!(" {answer}"), false, false);
    let nv = r.model().config.n_vocab;
    r.truncate(0);
    let all: Vec<u32> = p.iter().chain(&a).copied().collect();
    let logits = r.forward(&all, Logits::All)?.to_vec();
    let nll = (0..a.len())
        .map(|j| {
            token_nll(
                &logits[(p.len() - 1 + j) * nv..(p.len() + j) * nv],
                a[j] as usize,
            )
        })
        .sum::<f64>()
        / a.len() as f64;
    // Greedy continuation of a few tokens more than the answer needs.
    r.truncate(0);
    let mut last = r.forward(&p, Logits::Last)?.to_vec();
    let mut out = Vec::new();
    for _ in 0..a.len() + 2 {
        let t = ruvllm_model::sampler::argmax(&last);
        out.push(t);
        last = r.forward(&[t], Logits::Last)?.to_vec();
    }
    let text = tok.decode(&out, false)?;
    Ok((text.trim_start().starts_with(answer), nll, text))
}

fn perplexity(r: &mut Runner<'_>, tok: &Tokenizer, text: &str) -> Result<f64, Error> {
    let ids = tok.encode(text, true, false);
    let nv = r.model().config.n_vocab;
    r.truncate(0);
    let logits = r.forward(&ids, Logits::All)?.to_vec();
    let nll = (0..ids.len() - 1)
        .map(|i| token_nll(&logits[i * nv..(i + 1) * nv], ids[i + 1] as usize))
        .sum::<f64>()
        / (ids.len() - 1) as f64;
    Ok(nll.exp())
}

/// The golden text the perplexity drift is measured on (the llama.cpp reference's).
fn golden_text() -> String {
    let g: serde_json::Value = serde_json::from_str(include_str!(
        "../../../tests/data/smollm2-135m-instruct-q4_1.json"
    ))
    .unwrap_or_default();
    g["nll"][0]["text"]
        .as_str()
        .unwrap_or("The quick brown fox jumps over the lazy dog.")
        .to_owned()
}

/// What one fact set gave.
struct SeedRun {
    seed: u64,
    facts: usize,
    teach_secs: f64,
    learn_ms: Vec<f64>,
    background_ms: Vec<f64>,
    deep_ms: Vec<f64>,
    /// Per mode: scores and the retrieval hit rate (modes that retrieve).
    results: Vec<(&'static str, Scores, Option<f64>)>,
}

const MODES: [&str; 4] = ["baseline", "retrieval-only", "adapters-only", "full"];

/// Runs the benchmark.
pub fn run(a: SonaBenchArgs) -> Result<(), Error> {
    if a.entities == 0 || a.entities > 50 {
        return Err(Error::usage("--entities must be between 1 and 50"));
    }
    if a.seeds == 0 || a.seeds > 64 {
        return Err(Error::usage("--seeds must be between 1 and 64"));
    }
    if let Some(m) = a.modes.iter().find(|m| !MODES.contains(&m.as_str())) {
        return Err(Error::usage(format!(
            "unknown mode {m:?}; modes: {}",
            MODES.join(", ")
        )));
    }
    if !MODES.iter().any(|m| a.modes.iter().any(|x| x == m)) {
        return Err(Error::usage("no mode to run"));
    }
    let l = load(&a.model)?;
    let model: Arc<Model> = Arc::new(l.model);
    let tok = l.tok;
    let mut r = Runner::new(&model, l.pool.clone(), 1024);
    let golden = golden_text();
    // Questions are served by an engine, as in the server: a correction then finds its prompt
    // in the engine's prefix cache, and the learner captures through it.
    let engine_tok = Tokenizer::from_gguf(model.gguf()).map_err(|e| Error::usage(e.to_string()))?;
    let engine_pool = Arc::new(ruvllm_kernels::pool::ThreadPool::new(l.pool.n_threads()));
    let idle_threads = a.learn_idle_threads.unwrap_or(l.pool.n_threads());
    let engine = Arc::new(
        Engine::start(
            model.clone(),
            Arc::new(engine_tok),
            engine_pool,
            EngineConfig::new(&model.config, 256),
        )
        .map_err(|e| Error::usage(e.to_string()))?,
    );
    let applies = Applies::new(&a, &mut r, &tok)?;
    let c = Ctx {
        a: &a,
        model: &model,
        tok: &tok,
        engine: &engine,
        idle_threads,
        golden: &golden,
        applies: &applies,
    };
    if let Some(path) = &a.corrections {
        return long_corrections(&c, &mut r, path);
    }
    let mut runs = Vec::new();
    for seed in a.seed..a.seed + a.seeds {
        let run = one_fact_set(&c, &mut r, seed)?;
        if a.seeds > 1 && !a.json {
            let acc = |m: &str| {
                run.results
                    .iter()
                    .find(|x| x.0 == m)
                    .map_or("–".to_string(), |x| {
                        format!("{:.1}%", 100.0 * x.1.accuracy)
                    })
            };
            eprintln!(
                "seed {seed}: {}",
                MODES
                    .iter()
                    .filter(|m| a.modes.iter().any(|x| x == *m))
                    .map(|m| format!("{m} {}", acc(m)))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        runs.push(run);
    }
    report(&a, &runs);
    Ok(())
}

/// Prints per-set results (JSON) or the mean table over sets with per-set ranges.
fn report(a: &SonaBenchArgs, runs: &[SeedRun]) {
    let pct = |v: &[f64], q: usize| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v.get((v.len() * q / 100).min(v.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    let all = |f: fn(&SeedRun) -> &Vec<f64>| {
        runs.iter()
            .flat_map(|r| f(r).iter().copied())
            .collect::<Vec<f64>>()
    };
    let (learn, bg, deep) = (
        all(|r| &r.learn_ms),
        all(|r| &r.background_ms),
        all(|r| &r.deep_ms),
    );
    let (p50, p99) = (pct(&learn, 50), pct(&learn, 99));
    let (bg50, bg_max, deep50) = (pct(&bg, 50), pct(&bg, 100), pct(&deep, 50));
    let teach_secs: f64 = runs.iter().map(|r| r.teach_secs).sum::<f64>() / runs.len().max(1) as f64;
    let facts = runs.first().map_or(0, |r| r.facts);
    // Per set, each mode against that set's first mode (the baseline when run).
    let rel = |r: &SeedRun, s: &Scores| {
        let b = r.results[0].1;
        (s.nll / b.nll - 1.0, s.perplexity / b.perplexity - 1.0)
    };
    if a.json {
        let sets: Vec<serde_json::Value> = runs
            .iter()
            .map(|r| {
                let rows: Vec<serde_json::Value> = r
                    .results
                    .iter()
                    .map(|(m, s, hit)| {
                        let (dn, dp) = rel(r, s);
                        serde_json::json!({"mode": m, "accuracy": s.accuracy, "answer_nll": s.nll, "nll_change": dn, "perplexity": s.perplexity, "perplexity_drift": dp, "retrieval_hit_rate": hit})
                    })
                    .collect();
                serde_json::json!({"seed": r.seed, "teach_secs": r.teach_secs, "modes": rows})
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"facts": facts, "held_out": 2 * facts, "sets": sets, "learn_ms_p50": p50, "learn_ms_p99": p99, "background_runs": bg.len(), "background_ms_p50": bg50, "background_ms_max": bg_max, "deep_ms_p50": deep50})
        );
        return;
    }
    println!(
        "{} fact set(s) (seeds {}..={}) of {facts} facts, {} held-out questions each; teaching took {teach_secs:.1} s per set (instant loop per correction p50 {p50:.0} ms, p99 {p99:.0} ms; {} background runs p50 {bg50:.0} ms, max {bg_max:.0} ms; deep loop {deep50:.0} ms)",
        runs.len(),
        a.seed,
        a.seed + runs.len() as u64 - 1,
        2 * facts,
        bg.len()
    );
    println!("| mode | held-out accuracy (range) | answer NLL | vs baseline | golden perplexity | drift (max) | retrieval hits |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    let Some(first) = runs.first() else { return };
    for (i, (m, _, hit)) in first.results.iter().enumerate() {
        let n = runs.len() as f64;
        let col = |f: &dyn Fn(&SeedRun) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
        let acc = col(&|r| r.results[i].1.accuracy);
        let nll = col(&|r| r.results[i].1.nll);
        let dn = col(&|r| rel(r, &r.results[i].1).0);
        let ppl = col(&|r| r.results[i].1.perplexity);
        let dp = col(&|r| rel(r, &r.results[i].1).1);
        let mean = |v: &[f64]| v.iter().sum::<f64>() / n;
        let (lo, hi) = (
            acc.iter().copied().fold(f64::INFINITY, f64::min),
            acc.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        );
        let dp_max = dp.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let hits = hit.map(|_| runs.iter().filter_map(|r| r.results[i].2).sum::<f64>() / n);
        println!(
            "| {m} | {:.1}% ({:.1}–{:.1}) | {:.3} | {:+.1}% | {:.3} | {:+.2}% ({:+.2}%) | {} |",
            100.0 * mean(&acc),
            100.0 * lo,
            100.0 * hi,
            mean(&nll),
            100.0 * mean(&dn),
            mean(&ppl),
            100.0 * mean(&dp),
            100.0 * dp_max,
            hits.map_or("–".to_string(), |h| format!("{:.1}%", 100.0 * h))
        );
    }
}

/// The learner configuration the arguments ask for.
fn config(a: &SonaBenchArgs, idle_threads: usize) -> LearnConfig {
    LearnConfig {
        steps: a.steps,
        lr: a.lr,
        replay: a.replay,
        anchor_weight: a.anchor_weight,
        blind_dirs: a.blind_dirs,
        background_every: a.background_every,
        ewc_lambda: a.ewc_lambda,
        micro_rank: a.micro_rank,
        base_rank: a.base_rank,
        threads: a.learn_threads,
        idle_threads,
        ..LearnConfig::default()
    }
}

/// A fresh learner as the server makes one: capturing through `engine` (unless
/// `--own-capture`), with the anchor text.
fn learner(
    a: &SonaBenchArgs,
    model: &Arc<Model>,
    tok: &Tokenizer,
    engine: &Arc<Engine>,
    idle_threads: usize,
) -> Learner {
    let mut learner = Learner::new(model.clone());
    if !a.own_capture {
        learner.set_capture_source(Some(Arc::new(EngineCapture::new(
            engine.clone(),
            learner.pool(),
            0,
        ))));
    }
    let anchor = tok.encode(ANCHOR_TEXT, true, false);
    learner.configure(config(a, idle_threads), Some(anchor));
    learner
}

/// Questions of the long-correction benchmark (those of `scripts/feedback_bench.py`): the
/// `i`-th of 48 distinct ones.
fn long_question(i: usize) -> String {
    const QUESTIONS: [&str; 6] = [
        "Describe the city of {}.",
        "What is the history of {}?",
        "Write a short poem about {}.",
        "Explain how {} works.",
        "List three facts about {}.",
        "Why do people like {}?",
    ];
    const THINGS: [&str; 8] = [
        "Paris",
        "the ocean",
        "bicycles",
        "volcanoes",
        "chess",
        "the moon",
        "coffee",
        "rain",
    ];
    QUESTIONS[i % 6].replace("{}", THINGS[(i / 6 + i) % 8])
}

/// The server's rule for which requests a scope's learned adapter runs for
/// (`--sona-apply near`, see [`Gate`]), or every request (`--apply always`).
struct Applies {
    gate: Option<Gate>,
}

impl Applies {
    fn new(a: &SonaBenchArgs, r: &mut Runner<'_>, tok: &Tokenizer) -> Result<Applies, Error> {
        if a.apply == "always" {
            return Ok(Applies { gate: None });
        }
        let mut generic = Vec::new();
        for p in GENERIC_PROMPTS {
            generic.push(embed(r, tok, p)?);
        }
        Ok(Applies {
            gate: Some(Gate::new(r.model().config.n_embd, &generic)),
        })
    }

    /// Whether the adapter of the scope whose taught questions are `bank`'s rated entries
    /// runs for `question`.
    fn to(
        &self,
        r: &mut Runner<'_>,
        tok: &Tokenizer,
        bank: &Bank,
        question: &str,
    ) -> Result<bool, Error> {
        match &self.gate {
            None => Ok(true),
            Some(g) => Ok(g.opens(bank, &embed(r, tok, question)?)),
        }
    }
}

/// Questions unrelated to `--corrections`' ones: in the taught scope their greedy answers
/// should stay the base model's.
const OTHER_QUESTIONS: [&str; 12] = [
    "What is the capital of France?",
    "Write a haiku about autumn.",
    "How do I boil an egg?",
    "Describe the city of Rome.",
    "Tell me about the history of lighthouses.",
    "What is photosynthesis?",
    "Give me three tips for better sleep.",
    "Describe the city of London.",
    "What is 12 times 7?",
    "Who wrote Romeo and Juliet?",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
];

/// Lowercase word trigrams of `text` (words: runs of letters and digits): what an answer
/// shares with a taught correction when the correction's words take it over.
fn word_trigrams(text: &str) -> Vec<String> {
    let words: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    words.windows(3).map(|w| w.join(" ")).collect()
}

/// Greedy continuation of `prompt` (at most `n` tokens, stopping at an end-of-generation
/// token, which is kept).
fn greedy(
    r: &mut Runner<'_>,
    tok: &Tokenizer,
    prompt: &[u32],
    n: usize,
) -> Result<Vec<u32>, Error> {
    r.truncate(0);
    let mut last = r.forward(prompt, Logits::Last)?.to_vec();
    let mut out = Vec::new();
    for _ in 0..n {
        let t = ruvllm_model::sampler::argmax(&last);
        out.push(t);
        if tok.eog.contains(&t) || Some(t) == tok.eos || out.len() == n {
            break;
        }
        last = r.forward(&[t], Logits::Last)?.to_vec();
    }
    Ok(out)
}

/// `--corrections FILE`: teaches each line as the correction of its own chat question in one
/// scope (instant loop, background runs as configured, then the deep loop), then asks every
/// question again: how many corrections the scope reproduces whole (greedy, to the end of
/// turn), the mean share of each one's leading tokens reproduced, and the golden-text drift.
fn long_corrections(c: &Ctx<'_>, r: &mut Runner<'_>, path: &std::path::Path) -> Result<(), Error> {
    let Ctx {
        a,
        model,
        tok,
        engine,
        idle_threads,
        golden,
        applies,
    } = *c;
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::usage(format!("cannot read {}: {e}", path.display())))?;
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() || lines.len() > 48 {
        return Err(Error::usage("--corrections needs 1 to 48 non-empty lines"));
    }
    let tmpl = ruvllm_tokenizer::ChatTemplate::from_gguf(model.gguf(), tok)?;
    let eog = tok.eog.first().copied().or(tok.eos);
    let mut items = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let msgs = [ruvllm_tokenizer::ChatMessage::new(
            "user",
            &long_question(i),
        )];
        let prompt = tok.encode_chat(&tmpl.render(&msgs, true)?);
        let mut answer = tok.encode(line, false, false);
        answer.extend(eog);
        items.push((prompt, answer));
    }
    let learner = learner(a, model, tok, engine, idle_threads);
    let scope = "long";
    let (mut learn_ms, mut took) = (Vec::new(), 0);
    for (prompt, answer) in &items {
        serve(engine, prompt)?;
        let t = std::time::Instant::now();
        let out = learner
            .learn(scope, prompt, &[], &Feedback::Correction(answer.clone()))
            .map_err(|e| Error::usage(e.to_string()))?;
        learn_ms.push(t.elapsed().as_secs_f64() * 1e3);
        took += usize::from(out.follows);
        if out.background_due {
            learner
                .background(scope)
                .map_err(|e| Error::usage(e.to_string()))?;
        }
    }
    if !a.no_consolidate {
        learner
            .consolidate(scope)
            .map_err(|e| Error::usage(e.to_string()))?;
    }
    r.set_lora(None);
    let base_ppl = perplexity(r, tok, golden)?;
    // The scope's taught questions, as the server's bank holds them.
    let mut bank = Bank::new(model.config.n_embd);
    for (i, line) in lines.iter().enumerate() {
        let t = Trajectory {
            prompt: long_question(i),
            answer: line.to_string(),
            rating: 1.0,
            scope: scope.into(),
            adapter: None,
        };
        bank.add(&embed(r, tok, &t.prompt)?, t)
            .map_err(|e| Error::usage(e.to_string()))?;
    }
    let adapter = learner.adapter_for(scope).map(|x| (*x).clone());
    let (mut whole, mut share) = (0usize, 0f64);
    for (i, (prompt, answer)) in items.iter().enumerate() {
        let open = applies.to(r, tok, &bank, &long_question(i))?;
        r.set_lora(if open { adapter.clone() } else { None });
        let got = greedy(r, tok, prompt, answer.len() + 4)?;
        let same = got.iter().zip(answer).take_while(|(x, y)| x == y).count();
        whole += usize::from(same == answer.len());
        share += same as f64 / answer.len() as f64;
        if a.show_errors && same < answer.len() {
            eprintln!("[{i}] {:?}", tok.decode(&got, false)?);
        }
    }
    r.set_lora(adapter.clone());
    let ppl = perplexity(r, tok, golden)?;
    let anchor_ppl = perplexity(r, tok, ANCHOR_TEXT)?;
    // Collateral: other questions' answers in the taught scope against the base model's.
    let mut other = Vec::new();
    for q in OTHER_QUESTIONS {
        let p =
            tok.encode_chat(&tmpl.render(&[ruvllm_tokenizer::ChatMessage::new("user", q)], true)?);
        let open = applies.to(r, tok, &bank, q)?;
        r.set_lora(if open { adapter.clone() } else { None });
        other.push((p.clone(), greedy(r, tok, &p, 24)?));
    }
    r.set_lora(None);
    let base_anchor_ppl = perplexity(r, tok, ANCHOR_TEXT)?;
    let taught_grams: std::collections::HashSet<String> =
        lines.iter().flat_map(|l| word_trigrams(l)).collect();
    let (mut unchanged, mut taken_over) = (0, 0);
    for (i, (p, taught)) in other.iter().enumerate() {
        let base = greedy(r, tok, p, 24)?;
        unchanged += usize::from(base == *taught);
        let grams = |ids: &[u32]| -> Result<Vec<String>, Error> {
            Ok(word_trigrams(&tok.decode(ids, false)?)
                .into_iter()
                .filter(|g| taught_grams.contains(g))
                .collect())
        };
        taken_over += usize::from(!grams(taught)?.is_empty() && grams(&base)?.is_empty());
        if a.show_errors && base != *taught {
            eprintln!(
                "[other {i}] {:?} instead of {:?}",
                tok.decode(taught, false)?,
                tok.decode(&base, false)?
            );
        }
    }
    learn_ms.sort_by(f64::total_cmp);
    let n = items.len();
    let mean_len = items.iter().map(|x| x.1.len()).sum::<usize>() as f64 / n as f64;
    let (share, drift) = (share / n as f64, ppl / base_ppl - 1.0);
    let anchor_drift = anchor_ppl / base_anchor_ppl - 1.0;
    let p50 = learn_ms[n / 2];
    if a.json {
        println!(
            "{}",
            serde_json::json!({"corrections": n, "mean_tokens": mean_len, "followed": took, "reproduced": whole, "leading_share": share, "base_perplexity": base_ppl, "perplexity": ppl, "perplexity_drift": drift, "anchor_perplexity_drift": anchor_drift, "other_questions": OTHER_QUESTIONS.len(), "other_unchanged": unchanged, "other_taken_over": taken_over, "learn_ms_p50": p50})
        );
        return Ok(());
    }
    println!(
        "{n} corrections ({mean_len:.1} tokens each, mean) in one scope: followed when taught {took}/{n}; asked again after all: reproduced whole {whole}/{n}, leading tokens {:.0}% (mean); golden perplexity {base_ppl:.3} → {ppl:.3} ({:+.2}%), anchor text's {base_anchor_ppl:.3} → {anchor_ppl:.3} ({:+.2}%); other questions' answers unchanged {unchanged}/{n_other}, taken over by taught words {taken_over}/{n_other}; instant loop p50 {p50:.0} ms",
        100.0 * share,
        100.0 * drift,
        100.0 * anchor_drift,
        n_other = OTHER_QUESTIONS.len(),
    );
    Ok(())
}

/// What every run of the benchmark shares.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    a: &'a SonaBenchArgs,
    model: &'a Arc<Model>,
    tok: &'a Tokenizer,
    engine: &'a Arc<Engine>,
    idle_threads: usize,
    golden: &'a str,
    /// Which questions a scope's adapter runs for (the generic prompts embedded once).
    applies: &'a Applies,
}

/// Teaches and scores one fact set (seed `seed`) with a fresh learner and bank.
fn one_fact_set(c: &Ctx<'_>, r: &mut Runner<'_>, seed: u64) -> Result<SeedRun, Error> {
    let Ctx {
        a,
        model,
        tok,
        engine,
        idle_threads,
        golden,
        applies,
    } = *c;
    let facts = facts(a.entities, seed);
    // Every correction goes into the bank. Two scopes of one Learner learn them: `plain` on the
    // phrasing as asked (what adapters-only serves with), `full` on the prompt the full system
    // builds for that phrasing (retrieved exchanges + phrasing), as a correction given on a
    // retrieval-augmented answer would be.
    let learner = learner(a, model, tok, engine, idle_threads);
    let mut bank = Bank::new(model.config.n_embd);
    for f in &facts {
        let e = embed(r, tok, &f.teach)?;
        bank.add(
            &e,
            Trajectory {
                prompt: f.teach.clone(),
                answer: f.answer.clone(),
                rating: 1.0,
                scope: "bench".into(),
                adapter: None,
            },
        )
        .map_err(|e| Error::usage(e.to_string()))?;
    }
    let t0 = std::time::Instant::now();
    let (mut learn_ms, mut background_ms, mut deep_ms) = (Vec::new(), Vec::new(), Vec::new());
    for (scope, mode, augmented) in [("plain", "adapters-only", false), ("full", "full", true)] {
        if !a.modes.iter().any(|m| m == mode) {
            continue;
        }
        for f in &facts {
            let text = if augmented {
                with_context(r, tok, &bank, a.k, &f.teach)?.0
            } else {
                f.teach.clone()
            };
            let prompt = tok.encode(&text, true, false);
            let correction = tok.encode(&format!(" {}.", f.answer), false, false);
            serve(engine, &prompt)?;
            let t = std::time::Instant::now();
            let out = learner
                .learn(scope, &prompt, &[], &Feedback::Correction(correction))
                .map_err(|e| Error::usage(e.to_string()))?;
            learn_ms.push(t.elapsed().as_secs_f64() * 1e3);
            if out.background_due {
                let t = std::time::Instant::now();
                learner
                    .background(scope)
                    .map_err(|e| Error::usage(e.to_string()))?;
                background_ms.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        if !a.no_consolidate {
            let t = std::time::Instant::now();
            let c = learner
                .consolidate(scope)
                .map_err(|e| Error::usage(e.to_string()))?;
            deep_ms.push(t.elapsed().as_secs_f64() * 1e3);
            eprintln!(
                "{scope}: consolidated to rank {} (pruned {}), lesson loss {:.3} → {:.3}",
                c.rank, c.pruned, c.loss_before, c.loss_after
            );
        }
    }
    let teach_secs = t0.elapsed().as_secs_f64();

    let mut results = Vec::new();
    for mode in MODES.into_iter().filter(|m| a.modes.iter().any(|x| x == m)) {
        let (retrieve, adapt) = match mode {
            "baseline" => (false, false),
            "retrieval-only" => (true, false),
            "adapters-only" => (false, true),
            _ => (true, true),
        };
        // Embeddings for retrieval come from the base model (the bank's space).
        r.set_lora(None);
        let adapter: Option<LoraAdapter> = learner
            .adapter_for(if mode == "full" { "full" } else { "plain" })
            .map(|a| (*a).clone());
        let mut prompts = Vec::new();
        let mut retrieved_right = 0;
        let mut opens = Vec::new();
        for f in &facts {
            for q in &f.held_out {
                opens.push(applies.to(r, tok, &bank, q)?);
                let p = if retrieve {
                    let (p, answers) = with_context(r, tok, &bank, a.k, q)?;
                    retrieved_right += answers.iter().filter(|x| **x == f.answer).count();
                    p
                } else {
                    q.clone()
                };
                prompts.push((p, f.answer.clone()));
            }
        }
        let (mut right, mut nll) = (0usize, 0f64);
        for ((p, ans), open) in prompts.iter().zip(&opens) {
            r.set_lora(if adapt && *open {
                adapter.clone()
            } else {
                None
            });
            let (ok, n, text) = score(r, tok, p, ans)?;
            if a.show_errors && !ok {
                eprintln!("[{mode}] {p:?} → {text:?} (expected {ans})");
            }
            right += usize::from(ok);
            nll += n;
        }
        r.set_lora(if adapt { adapter.clone() } else { None });
        let ppl = perplexity(r, tok, golden)?;
        let s = Scores {
            accuracy: right as f64 / prompts.len() as f64,
            nll: nll / prompts.len() as f64,
            perplexity: ppl,
        };
        results.push((
            mode,
            s,
            retrieve.then_some(retrieved_right as f64 / (prompts.len() * a.k) as f64),
        ));
    }
    Ok(SeedRun {
        seed,
        facts: facts.len(),
        teach_secs,
        learn_ms,
        background_ms,
        deep_ms,
        results,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_are_deterministic_distinct_and_complete() {
        let a = facts(6, 1);
        assert_eq!(a.len(), 36);
        assert_eq!(
            a.iter().map(|f| f.answer.clone()).collect::<Vec<_>>(),
            facts(6, 1)
                .iter()
                .map(|f| f.answer.clone())
                .collect::<Vec<_>>()
        );
        let answers: std::collections::HashSet<_> = a.iter().map(|f| &f.answer).collect();
        assert_eq!(answers.len(), 36);
        for f in &a {
            assert!(
                !f.teach.contains("{}")
                    && f.held_out
                        .iter()
                        .all(|h| !h.contains("{}") && h != &f.teach)
            );
            assert!(f.answer.chars().next().is_some_and(|c| c.is_uppercase()));
        }
        assert_ne!(facts(6, 2)[0].answer, a[0].answer);
    }

    #[test]
    fn word_trigrams_are_lowercase_words_in_order() {
        assert_eq!(
            word_trigrams("The password is marmalade-seventeen."),
            [
                "the password is",
                "password is marmalade",
                "is marmalade seventeen"
            ]
        );
        assert!(word_trigrams("two words").is_empty());
    }
}

/// Serves `prompt` through the engine (up to 16 greedy tokens), as the answer a correction is
/// given on.
fn serve(engine: &Engine, prompt: &[u32]) -> Result<(), Error> {
    let mut h = engine
        .submit(Request::greedy(prompt.to_vec(), 16))
        .map_err(|e| Error::usage(e.to_string()))?;
    while let Some(e) = h.next_blocking() {
        match e {
            Event::Done(_) => return Ok(()),
            Event::Failed(e) => return Err(Error::usage(e.to_string())),
            _ => {}
        }
    }
    Ok(())
}
