//! Many sequences in one paged KV pool, advanced together by `Forward::forward_batch`, give
//! exactly the tokens each gives alone — with prefix caching, and under forced preemption
//! (a pool too small for all of them: the newest sequence is dropped and recomputed later).
//! Block bookkeeping comes from `ruvllm-kv`, as the engine will use it.

use ruvllm_kernels::pool::ThreadPool;
use ruvllm_kv::KvManager;
use ruvllm_model::sampler::argmax;
use ruvllm_model::{registry, Forward, KvCache, Logits, Model, Runner, SeqInput};
use std::sync::Arc;

const MAX_NEW: usize = 12;

fn prompts(tok: &ruvllm_tokenizer::Tokenizer) -> Vec<Vec<u32>> {
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

fn alone(model: &Model, pool: &Arc<ThreadPool>, prompt: &[u32]) -> Vec<u32> {
    let mut r = Runner::new(model, pool.clone(), 512);
    let mut out = Vec::new();
    let mut next = argmax(r.forward(prompt, Logits::Last).unwrap());
    for _ in 0..MAX_NEW {
        out.push(next);
        next = argmax(r.forward(&[next], Logits::Last).unwrap());
    }
    out
}

struct Live {
    id: u64,
    prompt: Vec<u32>,
    out: Vec<u32>,
    /// Tokens whose K/V are in the pool.
    computed: usize,
}

/// Runs all prompts together; returns each one's tokens and how many preemptions happened.
fn together(
    model: &Model,
    pool: &Arc<ThreadPool>,
    prompts: &[Vec<u32>],
    n_blocks: usize,
    prefix_caching: bool,
) -> (Vec<Vec<u32>>, usize, u64) {
    let bs = 16;
    let c = &model.config;
    let mut kv = KvCache::new(c.n_layer, c.kv_dim(), bs, n_blocks);
    let mut mgr = KvManager::new(n_blocks, bs, prefix_caching);
    let mut fwd = Forward::new(model, pool.clone());
    let mut waiting: Vec<Live> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| Live {
            id: i as u64,
            prompt: p.clone(),
            out: vec![],
            computed: 0,
        })
        .collect();
    waiting.reverse();
    let mut running: Vec<Live> = Vec::new();
    let mut done: Vec<Option<Vec<u32>>> = vec![None; prompts.len()];
    let mut preemptions = 0;
    let mut next_seq_id = 1000u64;
    while !waiting.is_empty() || !running.is_empty() {
        // Admit waiting sequences while blocks allow (FCFS).
        while let Some(mut w) = waiting.pop() {
            let all: Vec<u32> = w.prompt.iter().chain(&w.out).copied().collect();
            let sid = next_seq_id;
            next_seq_id += 1;
            let cached = mgr.add_sequence(sid, &all, &[]);
            if mgr.append(sid, &all[cached..]).is_none() {
                mgr.free(sid);
                waiting.push(w);
                break;
            }
            w.computed = cached;
            w.id = (w.id & 0xffff) | (sid << 16);
            running.push(w);
        }
        assert!(!running.is_empty(), "pool too small for a single sequence");
        // Every running sequence needs a slot for the token it sampled last step; when blocks
        // run out, preempt the newest running sequence (it is recomputed when readmitted).
        let mut i = 0;
        while i < running.len() {
            let (sid, all_len) = (
                running[i].id >> 16,
                running[i].prompt.len() + running[i].out.len(),
            );
            if mgr.num_tokens(sid).unwrap() < all_len {
                let last = *running[i].out.last().unwrap();
                if mgr.append(sid, &[last]).is_none() {
                    let victim = running.pop().unwrap();
                    mgr.free(victim.id >> 16);
                    preemptions += 1;
                    waiting.push(Live {
                        computed: 0,
                        ..victim
                    });
                    continue; // retry the same index (or stop if the victim was it)
                }
            }
            i += 1;
        }
        // The step: each sequence runs the tokens not yet in the pool.
        let inputs: Vec<(Vec<u32>, usize, Vec<u32>)> = running
            .iter()
            .map(|r| {
                let all: Vec<u32> = r.prompt.iter().chain(&r.out).copied().collect();
                (
                    all[r.computed..].to_vec(),
                    r.computed,
                    mgr.block_table(r.id >> 16).unwrap().to_vec(),
                )
            })
            .collect();
        let seqs: Vec<SeqInput<'_>> = inputs
            .iter()
            .map(|(t, p, b)| SeqInput {
                tokens: t,
                pos0: *p,
                block_table: b,
                logits: Logits::Last,
                lora: None,
            })
            .collect();
        let logits = fwd.forward_batch(&mut kv, &seqs).unwrap().to_vec();
        let nv = c.n_vocab;
        let mut finished = vec![];
        for (k, r) in running.iter_mut().enumerate() {
            r.computed = r.prompt.len() + r.out.len();
            r.out.push(argmax(&logits[k * nv..(k + 1) * nv]));
            if r.out.len() == MAX_NEW {
                finished.push(k);
            }
        }
        for k in finished.into_iter().rev() {
            let r = running.remove(k);
            mgr.free(r.id >> 16);
            done[(r.id & 0xffff) as usize] = Some(r.out);
        }
    }
    let s = mgr.stats();
    assert_eq!(s.used, 0, "every block is free or cached at the end");
    (
        done.into_iter().map(|d| d.unwrap()).collect(),
        preemptions,
        mgr.prefix_hits,
    )
}

#[test]
fn sixteen_concurrent_sequences_equal_their_solo_runs() {
    let Some(path) = registry::for_test("smollm2-135m") else {
        return;
    };
    let model = Model::load(&path).unwrap();
    let tok = ruvllm_tokenizer::Tokenizer::from_gguf(model.gguf()).unwrap();
    let pool = Arc::new(ThreadPool::new(2));
    let ps = prompts(&tok);
    assert_eq!(ps.len(), 16);
    let solo: Vec<Vec<u32>> = ps.iter().map(|p| alone(&model, &pool, p)).collect();

    let (outs, pre, _) = together(&model, &pool, &ps, 128, false);
    assert_eq!(pre, 0);
    assert_eq!(outs, solo, "batched without prefix caching");

    let (outs, pre, hits) = together(&model, &pool, &ps, 128, true);
    assert_eq!(pre, 0);
    // The shared system prompt fills one 16-token block: each later chat prompt reuses it.
    assert!(
        hits >= 7,
        "the 8 chat prompts share their system-prompt block ({hits} hits)"
    );
    assert_eq!(outs, solo, "batched with prefix caching");

    // A pool that holds about two sequences: preemption by recompute, same tokens.
    let longest = ps.iter().map(|p| p.len()).max().unwrap() + MAX_NEW;
    let (outs, pre, _) = together(&model, &pool, &ps, 2 * longest.div_ceil(16) + 1, true);
    assert!(pre > 0, "the small pool forced preemptions");
    assert_eq!(outs, solo, "batched under preemption");
}

/// Long context through a paged pool of 16-token blocks (chunked prefill, then decode) gives
/// bit-identical logits to the contiguous single-block cache: SmolLM2 with a 4,000-token prompt,
/// and Gemma-3 past its 512-token sliding window.
#[test]
fn long_context_paged_equals_contiguous() {
    for (name, n_prompt) in [("smollm2-135m", 4000usize), ("gemma3-270m", 1100)] {
        let Some(path) = registry::for_test(name) else {
            continue;
        };
        let model = Model::load(&path).unwrap();
        let pool = Arc::new(ThreadPool::new(2));
        let nv = model.config.n_vocab as u32;
        let prompt: Vec<u32> = (0..n_prompt as u32)
            .map(|i| 100 + (i * 7919) % (nv - 200))
            .collect();
        let steps = 4;

        let mut r = Runner::new(&model, pool.clone(), n_prompt + steps + 1);
        for chunk in prompt.chunks(512) {
            r.forward(chunk, Logits::Last).unwrap();
        }
        let mut contiguous = vec![r.forward(&[prompt[0]], Logits::Last).unwrap().to_vec()];
        for s in 1..steps {
            contiguous.push(r.forward(&[prompt[s]], Logits::Last).unwrap().to_vec());
        }

        let c = &model.config;
        let bs = 16;
        let n_blocks = (n_prompt + steps).div_ceil(bs) + 1;
        let mut kv = KvCache::new(c.n_layer, c.kv_dim(), bs, n_blocks);
        // A shuffled block table: blocks in reverse order, so addressing is really exercised.
        let table: Vec<u32> = (0..n_blocks as u32).rev().collect();
        let mut fwd = Forward::new(&model, pool.clone());
        let mut pos = 0;
        for chunk in prompt.chunks(256) {
            fwd.forward_batch(
                &mut kv,
                &[SeqInput {
                    tokens: chunk,
                    pos0: pos,
                    block_table: &table,
                    logits: Logits::None,
                    lora: None,
                }],
            )
            .unwrap();
            pos += chunk.len();
        }
        for (s, want) in contiguous.iter().enumerate() {
            let got = fwd
                .forward_batch(
                    &mut kv,
                    &[SeqInput {
                        tokens: &[prompt[s]],
                        pos0: pos,
                        block_table: &table,
                        logits: Logits::Last,
                        lora: None,
                    }],
                )
                .unwrap();
            assert!(
                got.iter()
                    .zip(want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{name}: step {s} differs"
            );
            pos += 1;
        }
    }
}
