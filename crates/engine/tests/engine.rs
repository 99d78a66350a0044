//! The engine against the model run alone: 16 concurrent requests give exactly the tokens each
//! gives alone (greedy), with and without prefix caching, under forced preemption and with
//! chunked prefill; n > 1 choices equal single requests with the matching seeds; prefix caching
//! skips computing a shared prefix; cancellation and random workloads leak no blocks; priorities
//! order admission; embeddings do not depend on their batch; a model whose logits overflow
//! fails its requests with a typed error and frees their blocks.

use ruvllm_engine::{
    CaptureSpec, Captured, Engine, EngineConfig, ErrorKind, Event, FinishReason, Kept, Request,
    Usage,
};
use ruvllm_kernels::pool::ThreadPool;
use ruvllm_model::{
    generate, registry, Forward, GenerateParams, KvCache, KvType, Logits, Model, Runner,
    SamplingParams, SeqInput,
};
use ruvllm_tokenizer::Tokenizer;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

struct Fixture {
    model: Arc<Model>,
    tok: Arc<Tokenizer>,
    pool: Arc<ThreadPool>,
}

fn fixture() -> Option<&'static Fixture> {
    static F: OnceLock<Option<Fixture>> = OnceLock::new();
    F.get_or_init(|| {
        let path = registry::for_test("smollm2-135m")?;
        let model = Model::load(&path).expect("model loads");
        let tok = Tokenizer::from_gguf(model.gguf()).expect("tokenizer");
        Some(Fixture {
            model: Arc::new(model),
            tok: Arc::new(tok),
            pool: Arc::new(ThreadPool::new(2)),
        })
    })
    .as_ref()
}

fn engine(f: &Fixture, tweak: impl FnOnce(&mut EngineConfig)) -> Engine {
    let mut cfg = EngineConfig::new(&f.model.config, 256);
    tweak(&mut cfg);
    Engine::start(f.model.clone(), f.tok.clone(), f.pool.clone(), cfg).expect("engine starts")
}

fn prompts(tok: &Tokenizer) -> Vec<Vec<u32>> {
    let system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n";
    let questions = [
        "What is 2+2?",
        "Name a color.",
        "Write a haiku about rust.",
        "Why is the sky blue?",
        "Count to five.",
        "What is the capital of Italy?",
        "Say hello in French.",
        "Give me a fruit.",
    ];
    let mut v: Vec<Vec<u32>> = questions
        .iter()
        .map(|q| {
            tok.encode(
                &format!("{system}{q}<|im_end|>\n<|im_start|>assistant\n"),
                true,
                true,
            )
        })
        .collect();
    for raw in [
        "Once upon a time",
        "def fibonacci(n):",
        "1, 2, 3, 4,",
        "The history of computing",
        "Rust is",
        "In 1969,",
        "The quick brown fox",
        "Dear diary,",
    ] {
        v.push(tok.encode(raw, true, true));
    }
    v
}

/// Everything a request produced.
#[derive(Debug, Default, Clone, PartialEq)]
struct Outcome {
    tokens: Vec<Vec<u32>>,
    text: Vec<String>,
    finish: Vec<Option<FinishReason>>,
    usage: Option<Usage>,
    embedding: Option<Vec<f32>>,
    captured: Option<Captured>,
    kept: Option<Kept>,
}

fn collect(mut h: ruvllm_engine::RequestHandle, n: usize) -> Outcome {
    let mut o = Outcome {
        tokens: vec![vec![]; n],
        text: vec![String::new(); n],
        finish: vec![None; n],
        ..Default::default()
    };
    while let Some(e) = h.next_blocking() {
        match e {
            Event::Token {
                index, token, text, ..
            } => {
                o.tokens[index].push(token);
                o.text[index].push_str(&text);
            }
            Event::Finished {
                index,
                reason,
                text,
            } => {
                o.finish[index] = Some(reason);
                o.text[index].push_str(&text);
            }
            Event::Embedding(e) => o.embedding = Some(e),
            Event::Captured(c) => o.captured = Some(*c),
            Event::Kept(k) => o.kept = Some(*k),
            Event::Done(u) => {
                o.usage = Some(u);
                break;
            }
            Event::Failed(e) => panic!("request failed: {e}"),
        }
    }
    o
}

fn alone(f: &Fixture, prompt: &[u32], params: &GenerateParams) -> (Vec<u32>, String) {
    alone_kv(f, prompt, params, KvType::F16)
}

fn alone_kv(
    f: &Fixture,
    prompt: &[u32],
    params: &GenerateParams,
    ty: KvType,
) -> (Vec<u32>, String) {
    alone_kv2(f, prompt, params, ty, ty)
}

fn alone_kv2(
    f: &Fixture,
    prompt: &[u32],
    params: &GenerateParams,
    k_ty: KvType,
    v_ty: KvType,
) -> (Vec<u32>, String) {
    let mut r = Runner::with_kv_types(&f.model, f.pool.clone(), 1024, k_ty, v_ty).expect("runner");
    let g = generate(&mut r, &f.tok, prompt, params, |_| {}).expect("generate");
    (g.tokens, g.text)
}

const MAX_NEW: usize = 16;

fn check_concurrent_equals_alone(tweak: impl FnOnce(&mut EngineConfig), expect_preemption: bool) {
    let Some(f) = fixture() else { return };
    let ps = prompts(&f.tok);
    let params = GenerateParams {
        max_tokens: Some(MAX_NEW),
        sampling: SamplingParams::greedy(),
        ..Default::default()
    };
    let expected: Vec<(Vec<u32>, String)> = ps.iter().map(|p| alone(f, p, &params)).collect();
    let e = engine(f, tweak);
    let handles: Vec<_> = ps
        .iter()
        .map(|p| {
            e.submit(Request::greedy(p.clone(), MAX_NEW))
                .expect("submit")
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let o = collect(h, 1);
        assert_eq!(
            o.tokens[0], expected[i].0,
            "prompt {i}: tokens differ from the solo run"
        );
        assert_eq!(o.text[0], expected[i].1, "prompt {i}: text differs");
        let u = o.usage.expect("usage");
        assert_eq!(u.prompt_tokens, ps[i].len());
        assert_eq!(u.completion_tokens, o.tokens[0].len());
    }
    let m = e.metrics();
    assert_eq!(m.kv_blocks_used, 0, "blocks leaked");
    assert_eq!(m.requests_running + m.requests_waiting, 0);
    assert_eq!(
        m.preemptions > 0,
        expect_preemption,
        "preemptions: {}",
        m.preemptions
    );
}

#[test]
fn sixteen_concurrent_requests_equal_solo_runs_with_prefix_caching() {
    check_concurrent_equals_alone(|_| {}, false);
}

#[test]
fn sixteen_concurrent_requests_equal_solo_runs_without_prefix_caching() {
    check_concurrent_equals_alone(|c| c.prefix_caching = false, false);
}

#[test]
fn forced_preemption_and_chunked_prefill_keep_results_identical() {
    // The longest prompt plus its output needs 4 blocks of 16; 8 blocks hold about two
    // sequences, and 20 tokens per step split every prompt into chunks.
    check_concurrent_equals_alone(
        |c| {
            c.n_blocks = 8;
            c.max_batch_tokens = 20;
        },
        true,
    );
}

#[test]
fn n_choices_equal_single_requests_with_matching_seeds() {
    let Some(f) = fixture() else { return };
    let e = engine(f, |_| {});
    let prompt = f
        .tok
        .encode("The three most important inventions are", true, true);
    let sampling = SamplingParams {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        seed: Some(42),
        ..Default::default()
    };
    let mut req = Request::greedy(prompt.clone(), 20);
    req.sampling = sampling.clone();
    req.n = 3;
    req.ignore_eos = true;
    let together = collect(e.submit(req.clone()).expect("submit"), 3);
    for k in 0..3 {
        let mut single = req.clone();
        single.n = 1;
        single.sampling.seed = Some(42 + k as u64);
        let o = collect(e.submit(single).expect("submit"), 1);
        assert_eq!(
            together.tokens[k],
            o.tokens[0],
            "choice {k} differs from a single request with seed {}",
            42 + k
        );
    }
    assert_ne!(
        together.tokens[0], together.tokens[1],
        "choices should differ at temperature 1"
    );
    let u = together.usage.expect("usage");
    assert_eq!(u.completion_tokens, 60);
    assert_eq!(e.metrics().kv_blocks_used, 0);
}

#[test]
fn shared_prefix_is_computed_once() {
    let Some(f) = fixture() else { return };
    let e = engine(f, |c| c.n_blocks = 512);
    let text = "The history of the city begins with a small settlement on the river. ".repeat(100);
    let mut base = f.tok.encode(&text, true, true);
    base.truncate(1000);
    assert_eq!(base.len(), 1000);
    let mut a = base.clone();
    a.extend(f.tok.encode(" First question:", false, false));
    let mut b = base.clone();
    b.extend(
        f.tok
            .encode(" Another, different question here:", false, false),
    );
    let oa = collect(e.submit(Request::greedy(a.clone(), 4)).expect("submit"), 1);
    let m0 = e.metrics();
    let ob = collect(e.submit(Request::greedy(b.clone(), 4)).expect("submit"), 1);
    let m1 = e.metrics();
    assert_eq!(oa.usage.expect("usage").cached_tokens, 0);
    let cached = ob.usage.expect("usage").cached_tokens;
    assert_eq!(
        cached,
        1000 / 16 * 16,
        "every full block of the shared prefix is reused"
    );
    assert_eq!(
        m1.computed_prompt_tokens - m0.computed_prompt_tokens,
        (b.len() - cached) as u64,
        "only the suffix is computed"
    );
    // The cached run gives what a cold engine gives.
    let cold = engine(f, |c| c.prefix_caching = false);
    assert_eq!(
        collect(cold.submit(Request::greedy(b, 4)).expect("submit"), 1).tokens,
        ob.tokens
    );
}

/// Waits (at most 10 s, else fails with `what`) until `e` runs nothing and holds no blocks.
fn wait_until_idle(e: &Engine, what: &str) {
    let t = Instant::now();
    while e.metrics().kv_blocks_used > 0 || e.metrics().requests_running > 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "{what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn cancellation_frees_blocks_at_once() {
    let Some(f) = fixture() else { return };
    let e = engine(f, |_| {});
    let p = f
        .tok
        .encode("Tell me a very long story about dragons.", true, true);
    let mut req = Request::greedy(p, 500);
    req.ignore_eos = true;
    let mut h = e.submit(req).expect("submit");
    for _ in 0..5 {
        assert!(matches!(h.next_blocking(), Some(Event::Token { .. })));
    }
    assert!(e.metrics().kv_blocks_used > 0);
    drop(h);
    wait_until_idle(&e, "cancelled request still holds blocks");
}

#[test]
fn higher_priority_goes_first_and_equal_priorities_keep_arrival_order() {
    let Some(f) = fixture() else { return };
    let e = engine(f, |c| c.max_seqs = 1);
    let p = f.tok.encode("Once upon a time", true, true);
    let mut first = Request::greedy(p.clone(), 8);
    first.ignore_eos = true;
    let mut h1 = e.submit(first.clone()).expect("submit");
    // Once the first request runs, the other two queue behind it.
    assert!(matches!(h1.next_blocking(), Some(Event::Token { .. })));
    let low = e.submit(first.clone()).expect("submit");
    let mut hi = first.clone();
    hi.priority = 10;
    let high = e.submit(hi).expect("submit");
    let order = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for (name, h) in [("first", h1), ("low", low), ("high", high)] {
            let order = &order;
            s.spawn(move || {
                collect(h, 1);
                order.lock().unwrap().push(name);
            });
        }
    });
    // "high" preempts "first" (the only slot); "first" resumes before "low" (earlier arrival).
    assert_eq!(*order.lock().unwrap(), vec!["high", "first", "low"]);
}

#[test]
fn random_workload_with_cancellations_leaks_nothing() {
    let Some(f) = fixture() else { return };
    let e = engine(f, |c| {
        c.n_blocks = 24;
        c.max_batch_tokens = 64;
    });
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut live: Vec<ruvllm_engine::RequestHandle> = Vec::new();
    let mut finished = 0;
    for _ in 0..1000 {
        let len = 1 + rnd(40) as usize;
        let prompt: Vec<u32> = (0..len).map(|_| 100 + rnd(64) as u32).collect();
        let mut r = Request::greedy(prompt, 1 + rnd(3) as usize);
        r.ignore_eos = true;
        r.n = 1 + (rnd(4) == 0) as usize;
        live.push(e.submit(r).expect("submit"));
        // Cancel some at random points, drain others.
        if rnd(4) == 0 {
            let i = rnd(live.len() as u64) as usize;
            drop(live.swap_remove(i));
        }
        if live.len() > 12 {
            let h = live.remove(0);
            let mut h = h;
            while let Some(ev) = h.next_blocking() {
                if matches!(ev, Event::Done(_) | Event::Failed(_)) {
                    finished += 1;
                    break;
                }
            }
        }
    }
    drop(live);
    let t = Instant::now();
    loop {
        let m = e.metrics();
        if m.requests_running + m.requests_waiting == 0 && m.requests_finished == 1000 {
            assert_eq!(m.kv_blocks_used, 0, "blocks leaked");
            assert!(m.kv_blocks_cached + m.kv_blocks_used <= m.kv_blocks_total);
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "engine did not drain: {m:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(finished > 0);
}

#[test]
fn invalid_requests_get_typed_errors() {
    let Some(f) = fixture() else { return };
    let e = engine(f, |c| c.n_ctx = 64);
    let err = |r: Request| e.submit(r).err().expect("must be refused").kind().clone();
    assert!(matches!(
        err(Request::greedy(vec![], 4)),
        ErrorKind::InvalidParam {
            param: "prompt",
            ..
        }
    ));
    assert!(matches!(
        err(Request::greedy(vec![1; 60], 10)),
        ErrorKind::ContextOverflow {
            needed: 70,
            limit: 64
        }
    ));
    assert!(matches!(
        err(Request::greedy(vec![1], 0)),
        ErrorKind::InvalidParam {
            param: "max_tokens",
            ..
        }
    ));
    assert!(matches!(
        err(Request::greedy(vec![u32::MAX], 1)),
        ErrorKind::InvalidParam {
            param: "prompt",
            ..
        }
    ));
    let mut r = Request::greedy(vec![1], 1);
    r.sampling.temperature = -1.0;
    assert!(matches!(
        err(r),
        ErrorKind::InvalidParam {
            param: "temperature",
            ..
        }
    ));
    let mut r = Request::greedy(vec![1], 1);
    r.sampling.presence_penalty = 3.0;
    assert!(matches!(
        err(r),
        ErrorKind::InvalidParam {
            param: "presence_penalty",
            ..
        }
    ));
    let mut r = Request::greedy(vec![1], 1);
    r.sampling.top_p = 0.0;
    assert!(matches!(
        err(r),
        ErrorKind::InvalidParam { param: "top_p", .. }
    ));
    let mut r = Request::greedy(vec![1], 1);
    r.logprobs = Some(21);
    assert!(matches!(
        err(r),
        ErrorKind::InvalidParam {
            param: "top_logprobs",
            ..
        }
    ));
    // The engine still serves.
    assert_eq!(
        collect(
            e.submit(Request::greedy(vec![1, 2, 3], 2)).expect("submit"),
            1
        )
        .tokens[0]
            .len(),
        2
    );
}

#[test]
fn embeddings_are_normalized_and_batch_independent() {
    let Some(f) = fixture() else { return };
    let e = engine(f, |c| c.max_batch_tokens = 7);
    let embed = |text: &str| {
        let mut r = Request::greedy(f.tok.encode(text, true, true), 1);
        r.embed = true;
        r
    };
    let a1 = collect(
        e.submit(embed("The cat sat on the mat.")).expect("submit"),
        1,
    )
    .embedding
    .expect("embedding");
    // Now alongside others, chunked differently.
    let hs: Vec<_> = [
        "A long unrelated sentence about finance and banks.",
        "The cat sat on the mat.",
        "Rust",
    ]
    .iter()
    .map(|t| e.submit(embed(t)).expect("submit"))
    .collect();
    let outs: Vec<Vec<f32>> = hs
        .into_iter()
        .map(|h| collect(h, 1).embedding.expect("embedding"))
        .collect();
    assert_eq!(outs[1], a1, "an embedding must not depend on its batch");
    let norm: f32 = a1.iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4);
    assert_eq!(a1.len(), f.model.config.n_embd);
    assert_eq!(e.metrics().kv_blocks_used, 0);
}

#[test]
fn logprobs_and_stop_strings_come_through() {
    let Some(f) = fixture() else { return };
    let e = engine(f, |_| {});
    let p = f.tok.encode("1, 2, 3, 4,", true, true);
    let mut r = Request::greedy(p.clone(), 30);
    r.logprobs = Some(3);
    let mut h = e.submit(r).expect("submit");
    let mut n = 0;
    while let Some(ev) = h.next_blocking() {
        if let Event::Token { token, logprob, .. } = ev {
            let lp = logprob.expect("logprobs requested");
            assert_eq!(lp.top.len(), 3);
            // Greedy: the chosen token is the most likely one.
            assert_eq!(lp.top[0].0, token);
            assert!((lp.top[0].1 - lp.logprob).abs() < 1e-6 && lp.logprob <= 0.0);
            n += 1;
        } else if matches!(ev, Event::Done(_)) {
            break;
        }
    }
    assert!(n > 0);
    let full =
        collect(e.submit(Request::greedy(p.clone(), 30)).expect("submit"), 1).text[0].clone();
    let cut = full.find(" 8").expect("the model counts on to 8");
    let mut r = Request::greedy(p, 30);
    r.stop = vec![" 8".into()];
    let o = collect(e.submit(r).expect("submit"), 1);
    assert_eq!(o.text[0], full[..cut]);
    assert_eq!(o.finish[0], Some(FinishReason::Stop));
}

#[test]
fn quantized_kv_cache_serves_like_its_solo_run_and_reports_its_size() {
    let Some(f) = fixture() else { return };
    let c = &f.model.config;
    // SmolLM2: 30 layers × (K + V) × 192 values; Q8_0 stores 32 values in 34 bytes.
    assert_eq!(
        ruvllm_engine::kv_bytes_per_token(c, KvType::Q8_0),
        30 * 2 * (192 / 32 * 34)
    );
    assert_eq!(
        ruvllm_engine::kv_bytes_per_token(c, KvType::Q4_0),
        30 * 2 * (192 / 32 * 18)
    );
    assert_eq!(
        ruvllm_engine::kv_bytes_per_token(c, KvType::F16),
        30 * 2 * 192 * 2
    );
    assert_eq!(
        ruvllm_engine::blocks_for_memory(c, KvType::Q8_0, 16, 1 << 20),
        (1 << 20) / (12240 * 16)
    );
    // q8_0 keys with q4_0 values (llama.cpp's -ctk q8_0 -ctv q4_0).
    assert_eq!(
        ruvllm_engine::kv_bytes_per_token_kv(c, KvType::Q8_0, KvType::Q4_0),
        30 * (192 / 32 * 34 + 192 / 32 * 18)
    );
    let ps = prompts(&f.tok);
    let params = GenerateParams {
        max_tokens: Some(12),
        sampling: SamplingParams::greedy(),
        ..Default::default()
    };
    for (k_ty, v_ty) in [
        (KvType::Q8_0, KvType::Q8_0),
        (KvType::Q4_0, KvType::Q4_0),
        (KvType::Q8_0, KvType::Q4_0),
    ] {
        let e = engine(f, |c| {
            c.kv_type = v_ty;
            c.key_type = (k_ty != v_ty).then_some(k_ty);
            c.n_blocks = 8;
            c.max_batch_tokens = 20;
        });
        let handles: Vec<_> = ps
            .iter()
            .map(|p| e.submit(Request::greedy(p.clone(), 12)).expect("submit"))
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            let o = collect(h, 1);
            assert_eq!(
                o.tokens[0],
                alone_kv2(f, &ps[i], &params, k_ty, v_ty).0,
                "K {k_ty:?} V {v_ty:?} prompt {i}"
            );
        }
        assert!(e.metrics().preemptions > 0);
    }
    // Separate key and value types do not combine with the two-tier mode.
    let mut cfg = EngineConfig::new(c, 64);
    cfg.kv_type = KvType::Q4_0;
    cfg.key_type = Some(KvType::Q8_0);
    cfg.kv_tail = Some(32);
    cfg.n_cold_blocks = 64;
    let err = Engine::start(f.model.clone(), f.tok.clone(), f.pool.clone(), cfg)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("two-tier"), "{err}");
}

#[test]
fn adapters_apply_per_request_and_never_share_cached_prefixes() {
    let Some(f) = fixture() else { return };
    use ruvllm_model::{LoraAdapter, LoraPair, Proj};
    let c = &f.model.config;
    // A deterministic adapter on v and down of every layer, strong enough to change greedy output.
    let mut ad = LoraAdapter::empty("t", 7, c.n_layer);
    let mut seed = 99u64;
    let mut rnd = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
    };
    for l in 0..c.n_layer {
        for p in [Proj::V, Proj::Down] {
            let (out, inp) = p.shape(c);
            ad.set(
                l,
                p,
                LoraPair {
                    rank: 2,
                    a: (0..2 * inp).map(|_| rnd()).collect(),
                    b: (0..out * 2).map(|_| rnd()).collect(),
                    scale: 1.0,
                },
            );
        }
    }
    let ad = Arc::new(ad);
    let e = engine(f, |_| {});
    let prompt = f.tok.encode("The history of computing begins with the abacus, continues through mechanical calculators and the analytical engine, and arrives at electronic machines. In this essay we will see how each of these steps made the next one possible, and why the people who built them cared so much.", true, true);
    assert!(prompt.len() > 32);
    let params = GenerateParams {
        max_tokens: Some(12),
        sampling: SamplingParams::greedy(),
        ignore_eos: true,
        ..Default::default()
    };
    let mut r = Runner::new(&f.model, f.pool.clone(), 512);
    r.set_lora(Some((*ad).clone()));
    let want_adapted = generate(&mut r, &f.tok, &prompt, &params, |_| {})
        .expect("generate")
        .tokens;
    let want_base = alone(f, &prompt, &params).0;
    assert_ne!(
        want_adapted, want_base,
        "the adapter should change the output"
    );
    // Base first (its blocks are cached), then the adapted request with the same prompt, then
    // both at once.
    let mut base_req = Request::greedy(prompt.clone(), 12);
    base_req.ignore_eos = true;
    let mut ad_req = base_req.clone();
    ad_req.adapter = Some(ad.clone());
    assert_eq!(
        collect(e.submit(base_req.clone()).expect("submit"), 1).tokens[0],
        want_base
    );
    let o = collect(e.submit(ad_req.clone()).expect("submit"), 1);
    assert_eq!(o.tokens[0], want_adapted);
    assert_eq!(
        o.usage.expect("usage").cached_tokens,
        0,
        "KV computed without the adapter must not be reused"
    );
    let (h1, h2) = (
        e.submit(ad_req).expect("submit"),
        e.submit(base_req).expect("submit"),
    );
    let (o1, o2) = (collect(h1, 1), collect(h2, 1));
    assert_eq!(o1.tokens[0], want_adapted);
    assert_eq!(o2.tokens[0], want_base);
    assert!(
        o1.usage.expect("usage").cached_tokens > 0,
        "same adapter, same version: its prefix is reused"
    );
    // An adapter that leaves every key and value alone (last layer's down projection only:
    // SONA's) shares the base model's cached blocks, and still changes the output.
    let mut last_only = LoraAdapter::empty("last", 8, c.n_layer);
    let (out, inp) = Proj::Down.shape(c);
    last_only.set(
        c.n_layer - 1,
        Proj::Down,
        LoraPair {
            rank: 2,
            a: (0..2 * inp).map(|_| rnd()).collect(),
            b: (0..out * 2).map(|_| 10.0 * rnd()).collect(),
            scale: 1.0,
        },
    );
    assert!(!last_only.affects_kv() && ad.affects_kv());
    let mut r = Runner::new(&f.model, f.pool.clone(), 512);
    r.set_lora(Some(last_only.clone()));
    let want_last = generate(&mut r, &f.tok, &prompt, &params, |_| {})
        .expect("generate")
        .tokens;
    assert_ne!(
        want_last, want_base,
        "the last-layer adapter should change the output"
    );
    let mut last_req = Request::greedy(prompt.clone(), 12);
    last_req.ignore_eos = true;
    last_req.adapter = Some(Arc::new(last_only));
    let o = collect(e.submit(last_req).expect("submit"), 1);
    assert_eq!(o.tokens[0], want_last);
    assert!(
        o.usage.expect("usage").cached_tokens > 0,
        "KV-invariant adapter: the base model's prefix is reused"
    );
    // An adapter for another model shape is refused.
    let mut bad = Request::greedy(prompt, 2);
    bad.adapter = Some(Arc::new(LoraAdapter::empty("x", 9, 3)));
    assert!(matches!(
        e.submit(bad).err().expect("refused").kind(),
        ErrorKind::InvalidParam {
            param: "adapter",
            ..
        }
    ));
}

#[test]
fn a_higher_priority_arrival_preempts_a_running_request_which_resumes_identically() {
    let Some(f) = fixture() else { return };
    let e = engine(f, |c| c.max_seqs = 1);
    let p = f.tok.encode("Once upon a time", true, true);
    let mut low = Request::greedy(p.clone(), 40);
    low.ignore_eos = true;
    let want_low = collect(e.submit(low.clone()).expect("submit"), 1).tokens[0].clone();
    let mut h_low = e.submit(low).expect("submit");
    let mut got_low = Vec::new();
    for _ in 0..5 {
        match h_low.next_blocking() {
            Some(Event::Token { token, .. }) => got_low.push(token),
            other => panic!("unexpected {other:?}"),
        }
    }
    // The only slot is taken; a higher-priority request must not wait for it.
    let mut high = Request::greedy(f.tok.encode("The capital of France is", true, true), 8);
    high.priority = 5;
    high.ignore_eos = true;
    let h_high = e.submit(high).expect("submit");
    let mut high_done_first = false;
    std::thread::scope(|s| {
        let t = s.spawn(move || {
            let o = collect(h_high, 1);
            assert_eq!(o.tokens[0].len(), 8);
            Instant::now()
        });
        let mut low_end = None;
        while let Some(ev) = h_low.next_blocking() {
            match ev {
                Event::Token { token, .. } => got_low.push(token),
                Event::Done(_) => {
                    low_end = Some(Instant::now());
                    break;
                }
                _ => {}
            }
        }
        let high_end = t.join().expect("high thread");
        high_done_first = high_end < low_end.expect("low finished");
    });
    assert!(
        high_done_first,
        "the high-priority request finished after the low one"
    );
    assert_eq!(
        got_low, want_low,
        "the preempted request resumed with identical tokens"
    );
    assert!(e.metrics().preemptions > 0);
}

#[test]
fn two_tier_kv_migrates_old_blocks_and_leaks_nothing() {
    let Some(f) = fixture() else { return };
    let e = engine(f, |c| {
        c.kv_type = KvType::Q8_0;
        c.kv_tail = Some(32);
        c.n_blocks = 40;
        c.n_cold_blocks = 64;
        c.max_batch_tokens = 128;
    });
    // Four distinct 200-token prompts (nothing shared, so every old block may move).
    let handles: Vec<_> = (0..4u32)
        .map(|i| {
            let p: Vec<u32> = (0..200u32)
                .map(|j| 100 + (j * 7919 + i * 104729) % 20000)
                .collect();
            let mut r = Request::greedy(p, 24);
            r.ignore_eos = true;
            e.submit(r).expect("submit")
        })
        .collect();
    for h in handles {
        assert_eq!(collect(h, 1).tokens[0].len(), 24);
    }
    let m = e.metrics();
    // Each sequence reaches 223 computed tokens: its full blocks older than the 32-token tail
    // ((223 − 32) / 16 = 11) move to the cold tier.
    assert!(m.kv_migrations >= 4 * 11, "migrations: {}", m.kv_migrations);
    assert_eq!(m.kv_cold_blocks_total, 64);
    assert_eq!(
        (m.kv_blocks_used, m.kv_cold_blocks_used),
        (0, 0),
        "blocks leaked"
    );
    assert_eq!(e.kv_capacity_tokens(), (40 + 64) * 16);
    // A tail shorter than a block, or a hot tier too small for the tail plus a batch, is refused.
    let bad = EngineConfig {
        kv_tail: Some(8),
        n_cold_blocks: 4,
        ..EngineConfig::new(&f.model.config, 64)
    };
    assert!(Engine::start(f.model.clone(), f.tok.clone(), f.pool.clone(), bad).is_err());
}

/// The reference capture: one forward pass of the model alone over `tokens`.
fn solo_capture(f: &Fixture, tokens: &[u32], layer: usize, from: usize) -> Captured {
    let c = &f.model.config;
    let mut kv = KvCache::new(c.n_layer, c.kv_dim(), tokens.len(), 1);
    let mut fwd = Forward::new(&f.model, f.pool.clone());
    fwd.set_capture(Some(layer));
    let logits = fwd
        .forward_batch(
            &mut kv,
            &[SeqInput {
                tokens,
                pos0: 0,
                block_table: &[0],
                logits: Logits::From(from),
                lora: None,
            }],
        )
        .expect("forward")
        .to_vec();
    Captured {
        cap: fwd.capture().expect("captured").clone(),
        logits,
    }
}

/// Capture requests (what a learner trains on) give exactly the rows and logits of a solo pass
/// from `from` on — reusing the cached prompt, in a batch with other requests, and split over
/// several steps by chunked prefill — and never reuse cached blocks past `from`.
#[test]
fn capture_requests_equal_a_solo_pass_and_reuse_the_cached_prompt() {
    let Some(f) = fixture() else { return };
    let c = &f.model.config;
    let ps = prompts(&f.tok);
    for max_batch_tokens in [512, 7] {
        let e = engine(f, |cfg| cfg.max_batch_tokens = max_batch_tokens);
        for (i, p) in ps.iter().take(3).enumerate() {
            // Serve the prompt first (its blocks are cached), as a correction follows an answer.
            let mut served = Request::greedy(p.clone(), 20);
            served.ignore_eos = true;
            let answer = collect(e.submit(served).expect("submit"), 1)
                .tokens
                .remove(0);
            let tokens: Vec<u32> = p.iter().chain(&answer).copied().collect();
            let (layer, from) = (c.n_layer - 1 - i % 2, p.len() - 1);
            let want = solo_capture(f, &tokens, layer, from);
            // Other traffic in the same steps.
            let others: Vec<_> = ps[8..12]
                .iter()
                .map(|q| e.submit(Request::greedy(q.clone(), 8)).expect("submit"))
                .collect();
            let mut req = Request::greedy(tokens.clone(), 1);
            req.capture = Some(CaptureSpec { layer, from });
            let o = collect(e.submit(req).expect("submit"), 1);
            for h in others {
                collect(h, 1);
            }
            let got = o.captured.expect("captured");
            let (d, ff) = (c.n_embd, c.n_ff);
            assert_eq!(got.cap.layer, layer);
            assert_eq!(got.cap.act.len(), tokens.len() * ff);
            assert_eq!(
                &got.cap.act[from * ff..],
                &want.cap.act[from * ff..],
                "prompt {i}: activations"
            );
            assert_eq!(
                &got.cap.resid[from * d..],
                &want.cap.resid[from * d..],
                "prompt {i}: residual"
            );
            assert_eq!(
                &got.cap.down[from * d..],
                &want.cap.down[from * d..],
                "prompt {i}: down"
            );
            assert_eq!(
                &got.cap.last[from * d..],
                &want.cap.last[from * d..],
                "prompt {i}: last"
            );
            assert_eq!(got.logits.len(), (tokens.len() - from) * c.n_vocab);
            assert_eq!(got.logits, want.logits, "prompt {i}: logits");
            let u = o.usage.expect("usage");
            assert!(
                u.cached_tokens >= 16 && u.cached_tokens <= from,
                "prompt {i}: {} cached of {from}",
                u.cached_tokens
            );
            assert_eq!(u.completion_tokens, 0);
        }
        // Out-of-range captures are refused with a typed error.
        let mut bad = Request::greedy(ps[0].clone(), 1);
        bad.capture = Some(CaptureSpec {
            layer: c.n_layer,
            from: 0,
        });
        assert!(matches!(
            e.submit(bad.clone()).err().expect("refused").kind(),
            ErrorKind::InvalidParam {
                param: "capture",
                ..
            }
        ));
        bad.capture = Some(CaptureSpec {
            layer: 0,
            from: ps[0].len(),
        });
        assert!(matches!(
            e.submit(bad).err().expect("refused").kind(),
            ErrorKind::InvalidParam {
                param: "capture",
                ..
            }
        ));
        assert_eq!(e.metrics().kv_blocks_used, 0, "blocks leaked");
    }
}

/// Activations kept while generating (what a rating of the answer trains on) are exactly the
/// rows of a solo pass over prompt + answer, and the logits made from them are that pass's:
/// several requests at once, under chunked prefill and under forced preemption (whose
/// recompute gathers the rows again), and with an adapter on the last down projection (the
/// rows stay the base model's). An adapter that changes the rows is refused.
#[test]
fn kept_activations_equal_a_solo_pass_over_prompt_and_answer() {
    let Some(f) = fixture() else { return };
    use ruvllm_model::{LoraAdapter, LoraPair, Proj};
    let c = &f.model.config;
    let (d, ff, nv, last) = (c.n_embd, c.n_ff, c.n_vocab, c.n_layer - 1);
    let ps = prompts(&f.tok);
    let mut sona = LoraAdapter::empty("sona", 5, c.n_layer);
    let (out, inp) = Proj::Down.shape(c);
    sona.set(
        last,
        Proj::Down,
        LoraPair {
            rank: 1,
            a: (0..inp).map(|i| ((i % 7) as f32 - 3.0) * 0.05).collect(),
            b: (0..out).map(|i| ((i % 5) as f32 - 2.0) * 0.5).collect(),
            scale: 1.0,
        },
    );
    let sona = Arc::new(sona);
    type Tweak = fn(&mut EngineConfig);
    let tweaks: [(&str, Tweak); 3] = [
        ("plain", |_| {}),
        ("chunked", |c| c.max_batch_tokens = 7),
        ("preempted", |c| {
            c.n_blocks = 8;
            c.max_batch_tokens = 20;
        }),
    ];
    for (name, tweak) in tweaks {
        let e = engine(f, tweak);
        let picks = [0usize, 3, 9, 12];
        let handles: Vec<_> = picks
            .iter()
            .enumerate()
            .map(|(j, &i)| {
                let mut r = Request::greedy(ps[i].clone(), 24);
                r.ignore_eos = true;
                r.adapter = (j % 2 == 1).then(|| sona.clone());
                r.keep = Some(CaptureSpec {
                    layer: last,
                    from: ps[i].len() - 1,
                });
                e.submit(r).expect("submit")
            })
            .collect();
        let outs: Vec<Outcome> = handles.into_iter().map(|h| collect(h, 1)).collect();
        if name == "preempted" {
            assert!(
                e.metrics().preemptions > 0,
                "the small pool should force preemption"
            );
        }
        for (j, (&i, o)) in picks.iter().zip(&outs).enumerate() {
            let adapted = j % 2 == 1;
            let answer = &o.tokens[0];
            let k = o.kept.as_ref().expect("kept rows");
            let tokens: Vec<u32> = ps[i].iter().chain(answer).copied().collect();
            let from = ps[i].len() - 1;
            // Cut by length: the final token is never fed, so one row per answer token.
            assert_eq!(
                (k.from, k.rows, k.cap.layer),
                (from, answer.len(), last),
                "{name} prompt {i}"
            );
            assert_eq!(k.cap.act.len(), k.rows * ff);
            let want = solo_capture(f, &tokens, last, from);
            let hi = from + k.rows;
            assert_eq!(
                k.cap.act,
                want.cap.act[from * ff..hi * ff],
                "{name} prompt {i}: activations"
            );
            assert_eq!(
                k.cap.resid,
                want.cap.resid[from * d..hi * d],
                "{name} prompt {i}: residual"
            );
            assert_eq!(
                k.cap.down,
                want.cap.down[from * d..hi * d],
                "{name} prompt {i}: down"
            );
            let mut logits = vec![0f32; k.rows * nv];
            ruvllm_model::logits_from_last_layer(
                &f.model,
                &f.pool,
                &k.cap.resid,
                &k.cap.down,
                &mut logits,
            );
            assert_eq!(
                logits,
                want.logits[..k.rows * nv],
                "{name} prompt {i}: logits from kept rows"
            );
            // Each generated token's served log-probability: the base model's for requests
            // without an adapter, the adapted model's otherwise.
            assert_eq!(k.logprobs.len(), answer.len(), "{name} prompt {i}");
            let base_lp: Vec<f32> = (0..answer.len())
                .map(|j| {
                    ruvllm_kernels::ops::token_logprob(
                        &want.logits[j * nv..(j + 1) * nv],
                        answer[j] as usize,
                    )
                })
                .collect();
            if adapted {
                assert_ne!(
                    k.logprobs, base_lp,
                    "{name} prompt {i}: served under the adapter"
                );
            } else {
                assert_eq!(
                    k.logprobs, base_lp,
                    "{name} prompt {i}: served log-probabilities"
                );
            }
        }
        assert_eq!(e.metrics().kv_blocks_used, 0, "{name}: blocks leaked");
    }
    // An adapter on anything before the last down projection changes the rows: refused.
    let e = engine(f, |_| {});
    let mut early = LoraAdapter::empty("early", 6, c.n_layer);
    let (out, inp) = Proj::Q.shape(c);
    early.set(
        0,
        Proj::Q,
        LoraPair {
            rank: 1,
            a: vec![0.01; inp],
            b: vec![0.01; out],
            scale: 1.0,
        },
    );
    let mut bad = Request::greedy(ps[0].clone(), 4);
    bad.adapter = Some(Arc::new(early));
    bad.keep = Some(CaptureSpec {
        layer: last,
        from: ps[0].len() - 1,
    });
    assert!(matches!(
        e.submit(bad.clone()).err().expect("refused").kind(),
        ErrorKind::InvalidParam { param: "keep", .. }
    ));
    bad.adapter = None;
    bad.n = 2;
    assert!(matches!(
        e.submit(bad).err().expect("refused").kind(),
        ErrorKind::InvalidParam { param: "keep", .. }
    ));
}

/// Logits that overflow (an output norm of 3e38: finite, so the model loads) fail the request
/// with an error — every choice of an n = 2 request and a plain one running beside it — instead
/// of streaming one arbitrary token, and their blocks come back.
#[test]
fn non_finite_logits_fail_the_request_and_free_its_blocks() {
    let Some(f) = fixture() else { return };
    let file = f.model.gguf();
    let mut w = ruvllm_gguf::writer::GgufWriter::copy_of(file);
    let norm = w
        .tensor_data_mut("output_norm.weight")
        .expect("output norm");
    for c in norm.chunks_exact_mut(4) {
        c.copy_from_slice(&3e38f32.to_le_bytes());
    }
    let bytes = w.to_bytes();
    let model = Model::from_gguf(ruvllm_gguf::GgufFile::from_bytes(bytes).expect("parses"))
        .expect("finite weights load");
    let cfg = EngineConfig::new(&model.config, 256);
    let e = Engine::start(Arc::new(model), f.tok.clone(), f.pool.clone(), cfg).expect("starts");
    let p = prompts(&f.tok);
    let mut two = Request::greedy(p[0].clone(), 8);
    two.n = 2;
    two.sampling.temperature = 0.7;
    let handles = [
        e.submit(two).expect("submit"),
        e.submit(Request::greedy(p[1].clone(), 8)).expect("submit"),
    ];
    for mut h in handles {
        let mut tokens = 0;
        let err = loop {
            match h.next_blocking() {
                Some(Event::Failed(err)) => break err,
                Some(Event::Token { .. }) => tokens += 1,
                Some(other) => panic!("unexpected event {other:?}"),
                None => panic!("stream ended without an error"),
            }
        };
        assert_eq!(tokens, 0, "no token is sampled from non-finite logits");
        assert!(matches!(err.kind(), ErrorKind::Model(_)), "{err}");
        assert!(err.to_string().contains("non-finite logits"), "{err}");
        assert!(h.next_blocking().is_none(), "nothing after the failure");
    }
    wait_until_idle(&e, "failed requests hold blocks");
}
