//! Training an adapter on the last layer's down projection: the trainer's gradient equals
//! finite differences of its loss; its loss equals the model's own forward with the adapter;
//! and a few dozen steps teach the model a fictional fact that greedy decoding then states.

use ruvllm_kernels::pool::ThreadPool;
use ruvllm_model::{generate, registry, Capture, Forward, GenerateParams, KvCache, Logits, Model, Runner, SamplingParams, SeqInput};
use ruvllm_sona::grad::cross_entropy;
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
    Case { tokens, targets, prompt_len: p.len() }
}

fn capture(model: &Model, pool: &Arc<ThreadPool>, tokens: &[u32], layer: usize) -> Capture {
    let c = &model.config;
    let mut kv = KvCache::new(c.n_layer, c.kv_dim(), tokens.len(), 1);
    let mut fwd = Forward::new(model, pool.clone());
    fwd.set_capture(Some(layer));
    fwd.forward_batch(&mut kv, &[SeqInput { tokens, pos0: 0, block_table: &[0], logits: Logits::None, lora: None }]).unwrap();
    fwd.capture().unwrap().clone()
}

fn load() -> Option<(Arc<Model>, Tokenizer, Arc<ThreadPool>)> {
    let path = registry::for_test("smollm2-135m")?;
    let model = Arc::new(Model::load(&path).unwrap());
    let tok = Tokenizer::from_gguf(model.gguf()).unwrap();
    Some((model, tok, Arc::new(ThreadPool::new(2))))
}

#[test]
fn gradient_matches_finite_differences_and_loss_matches_the_model() {
    let Some((model, tok, pool)) = load() else { return };
    let c = &model.config;
    let last = c.n_layer - 1;
    let k = case(&tok, "The password of the blue castle is", " marmalade");
    let cap = capture(&model, &pool, &k.tokens, last);
    let head = Arc::new(Head::new(&model).unwrap());
    let mut tr = DownTrainer::new(model.clone(), head, pool.clone(), last, 4, 8.0, 1e-2, 7).unwrap();
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
    assert!((loss as f64 - model_loss).abs() <= 0.02 * model_loss, "trainer {loss} vs model {model_loss}");

    // Central differences of the trainer's loss on a few coordinates of A and B.
    let h = 2e-3f32;
    let lossat = |tr: &mut DownTrainer, a: Vec<f32>, b: Vec<f32>| {
        tr.set_params(a, b);
        tr.loss_and_grads(&cap, &k.targets, false).0 as f64
    };
    for &i in &[0usize, 17, 1000, 4 * c.n_ff - 1] {
        let (mut ap, mut am) = (a0.clone(), a0.clone());
        ap[i] += h;
        am[i] -= h;
        let fdv = (lossat(&mut tr, ap, b0.clone()) - lossat(&mut tr, am, b0.clone())) / (2.0 * h as f64);
        assert!((fdv - da[i] as f64).abs() <= 0.05 * fdv.abs().max(da[i].abs() as f64) + 1e-3, "dA[{i}]: analytic {} vs fd {fdv}", da[i]);
    }
    for &i in &[0usize, 5, 333, c.n_embd * 4 - 1] {
        let (mut bp, mut bm) = (b0.clone(), b0.clone());
        bp[i] += h;
        bm[i] -= h;
        let fdv = (lossat(&mut tr, a0.clone(), bp) - lossat(&mut tr, a0.clone(), bm)) / (2.0 * h as f64);
        assert!((fdv - db[i] as f64).abs() <= 0.05 * fdv.abs().max(db[i].abs() as f64) + 1e-3, "dB[{i}]: analytic {} vs fd {fdv}", db[i]);
    }
}

/// The anchor penalty's gradient against central differences, and its effect: steps with it
/// keep the adapter's output on the anchor text small.
#[test]
fn anchor_penalty_gradient_matches_finite_differences() {
    let Some((model, tok, pool)) = load() else { return };
    let c = &model.config;
    let last = c.n_layer - 1;
    let head = Arc::new(Head::new(&model).unwrap());
    let mut tr = DownTrainer::new(model.clone(), head, pool.clone(), last, 4, 8.0, 1e-2, 7).unwrap();
    let anchor = tr.capture(&tok.encode("Water boils at one hundred degrees at sea level.", true, false)).unwrap();
    tr.set_anchor(Arc::new(anchor.act.clone()), 0.5);
    let a0 = tr.params().0.to_vec();
    let b0 = ruvllm_sona::uniform(c.n_embd * 4, 11, 0.05);
    tr.set_params(a0.clone(), b0.clone());
    let (p, da, db) = tr.anchor_penalty_and_grads();
    assert!(p > 0.0);
    let h = 1e-3f32;
    let at = |tr: &mut DownTrainer, a: Vec<f32>, b: Vec<f32>| {
        tr.set_params(a, b);
        tr.anchor_penalty_and_grads().0 as f64
    };
    for &i in &[3usize, 999, 4 * c.n_ff - 2] {
        let (mut ap, mut am) = (a0.clone(), a0.clone());
        ap[i] += h;
        am[i] -= h;
        let fdv = (at(&mut tr, ap, b0.clone()) - at(&mut tr, am, b0.clone())) / (2.0 * h as f64);
        assert!((fdv - da[i] as f64).abs() <= 0.05 * fdv.abs().max(da[i].abs() as f64) + 1e-4, "dA[{i}]: {} vs {fdv}", da[i]);
    }
    for &i in &[1usize, 77, c.n_embd * 4 - 3] {
        let (mut bp, mut bm) = (b0.clone(), b0.clone());
        bp[i] += h;
        bm[i] -= h;
        let fdv = (at(&mut tr, a0.clone(), bp) - at(&mut tr, a0.clone(), bm)) / (2.0 * h as f64);
        assert!((fdv - db[i] as f64).abs() <= 0.05 * fdv.abs().max(db[i].abs() as f64) + 1e-4, "dB[{i}]: {} vs {fdv}", db[i]);
    }
}

#[test]
fn a_few_steps_teach_a_fictional_fact() {
    let Some((model, tok, pool)) = load() else { return };
    let last = model.config.n_layer - 1;
    let prompt = "The password of the blue castle is";
    let answer = " marmalade seventeen";
    let k = case(&tok, prompt, answer);
    let cap = capture(&model, &pool, &k.tokens, last);
    let head = Arc::new(Head::new(&model).unwrap());
    let mut tr = DownTrainer::new(model.clone(), head, pool.clone(), last, 8, 16.0, 1e-2, 3).unwrap();
    // The trainer's own capture equals the test's.
    assert_eq!(tr.capture(&k.tokens).unwrap().act, cap.act);
    let first = tr.step(&cap, &k.targets, false);
    let mut loss = first;
    for _ in 0..40 {
        loss = tr.step(&cap, &k.targets, false);
    }
    eprintln!("answer loss {first:.3} → {loss:.3}");
    assert!(loss < 0.25 * first, "training should cut the answer's loss: {first} → {loss}");
    let params = GenerateParams { max_tokens: Some(k.tokens.len() - k.prompt_len), sampling: SamplingParams::greedy(), ..Default::default() };
    let mut base = Runner::new(&model, pool.clone(), 128);
    let before = generate(&mut base, &tok, &k.tokens[..k.prompt_len], &params, |_| {}).unwrap().text;
    let mut taught = Runner::new(&model, pool.clone(), 128);
    taught.set_lora(Some(tr.adapter("fact", 1, 0)));
    let after = generate(&mut taught, &tok, &k.tokens[..k.prompt_len], &params, |_| {}).unwrap().text;
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
