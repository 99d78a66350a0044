//! `ruvllm bench`, in the manner of `llama-bench`: pp (one batch of P prompt tokens from an
//! empty cache) and tg (N single-token decode steps from an empty cache), each repeated R times
//! after a warm-up, reported as mean ± standard deviation tokens/s. `--output json` writes the
//! records llama-bench writes (`n_prompt`, `n_gen`, `avg_ts`, `stddev_ts`, ...).

use crate::error::Error;
use crate::{load, ModelArgs};
use clap::Args;
use ruvllm_engine::{Engine, EngineConfig, Event, Request};
use ruvllm_model::{Logits, Runner};
use std::sync::Arc;
use std::time::Instant;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt tokens for the pp test (0 skips it).
    #[arg(short = 'p', long = "n-prompt", default_value_t = 512)]
    n_prompt: usize,
    /// Tokens already in the context before each pp/tg test (prefilled, not timed), as
    /// llama-bench's `-d`: long-context attention speed.
    #[arg(short = 'd', long = "depth", default_value_t = 0)]
    depth: usize,
    /// Generated tokens for the tg test (0 skips it).
    #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
    n_gen: usize,
    /// Repetitions.
    #[arg(short = 'r', long = "repetitions", default_value_t = 5)]
    reps: usize,
    /// Output format: md or json.
    #[arg(short = 'o', long = "output", default_value = "md")]
    output: String,
    /// Serving mode: numbers of concurrent sequences (e.g. `1,4,16,64`), each with a prompt of
    /// `--np-prompt` tokens generating `-n` tokens, advanced together in batched steps over one
    /// paged KV pool; reports aggregate decode tokens/s. Replaces the pp/tg tests.
    #[arg(long = "parallel", value_delimiter = ',')]
    parallel: Vec<usize>,
    /// Prompt tokens per sequence in serving mode.
    #[arg(long = "np-prompt", default_value_t = 32)]
    np_prompt: usize,
    /// Serving mode: also measure TTFT of a request whose first N prompt tokens are cached
    /// (after one that computed them) against the cold request.
    #[arg(long = "prefix-ttft", default_value_t = 0)]
    prefix_ttft: usize,
    /// KV cache storage in serving mode: f16, q8_0, q4_0 or f32.
    #[arg(long = "kv-type", default_value = "f16")]
    kv_type: String,
    /// Keys stored as this type instead of --kv-type (serving mode).
    #[arg(long = "kv-type-k")]
    kv_type_k: Option<String>,
    /// Values stored as this type instead of --kv-type (serving mode).
    #[arg(long = "kv-type-v")]
    kv_type_v: Option<String>,
    /// Two-tier KV in serving mode, as `serve --kv-tail` (default 32 for q4_0; 0: none).
    #[arg(long = "kv-tail")]
    kv_tail: Option<usize>,
}

fn tokens_for(l: &crate::Loaded, n: usize) -> Vec<u32> {
    let nv = l.model.config.n_vocab as u64;
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (100 + seed % (nv - 100).max(1)) as u32
        })
        .collect()
}

/// Timestamps of one request's tokens (seconds since the batch was submitted).
struct Trace {
    tokens: Vec<f64>,
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|x, y| x.total_cmp(y));
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

/// Submits `prompts` at once and records every token's arrival time per request.
fn run_batch(
    engine: &Engine,
    prompts: Vec<Vec<u32>>,
    n_gen: usize,
) -> Result<(Vec<Trace>, f64), Error> {
    let t0 = Instant::now();
    let mut handles = Vec::new();
    for p in prompts {
        let mut r = Request::greedy(p, n_gen);
        r.ignore_eos = true;
        handles.push(engine.submit(r).map_err(|e| Error::usage(e.to_string()))?);
    }
    let traces: Vec<Result<Trace, String>> = std::thread::scope(|s| {
        let joins: Vec<_> = handles
            .into_iter()
            .map(|mut h| {
                s.spawn(move || {
                    let mut t = Trace { tokens: Vec::new() };
                    while let Some(e) = h.next_blocking() {
                        match e {
                            Event::Token { .. } => t.tokens.push(t0.elapsed().as_secs_f64()),
                            Event::Done(_) => return Ok(t),
                            Event::Failed(e) => return Err(e.to_string()),
                            _ => {}
                        }
                    }
                    Err("the engine stopped".to_string())
                })
            })
            .collect();
        joins
            .into_iter()
            .map(|j| {
                j.join()
                    .unwrap_or_else(|_| Err("a collector thread panicked".into()))
            })
            .collect()
    });
    let wall = t0.elapsed().as_secs_f64();
    let traces = traces
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(Error::usage)?;
    Ok((traces, wall))
}

/// Serving mode: N concurrent requests through the engine (continuous batching, chunked
/// prefill, paged KV); reports throughput, TTFT and inter-token latency percentiles.
fn serving(a: &BenchArgs, l: crate::Loaded) -> Result<(), Error> {
    let c = l.model.config.clone();
    let bs = 16;
    let max_np = a.parallel.iter().copied().max().unwrap_or(1);
    if a.parallel.contains(&0) {
        return Err(Error::usage("--parallel values must be at least 1"));
    }
    if a.n_gen == 0 {
        return Err(Error::usage("serving mode needs -n at least 1"));
    }
    let per_seq = (a.np_prompt + a.n_gen).div_ceil(bs) + 1;
    let prefix = a.prefix_ttft;
    let n_blocks = (max_np * per_seq).max((prefix + 64).div_ceil(bs) * 2 + 4);
    let kv = crate::kv_choice(
        &a.kv_type,
        a.kv_type_k.as_deref(),
        a.kv_type_v.as_deref(),
        a.kv_tail,
    )?;
    let mut cfg = EngineConfig::new(&c, n_blocks);
    cfg.attn = l.attn;
    cfg.set_kv_types(kv.ty, kv.k, kv.v);
    if let Some(tail) = kv.tail {
        // Two-tier: every sequence's tail (and a batch) in f16 blocks, the rest in the cold tier.
        cfg.kv_tail = Some(tail);
        cfg.n_cold_blocks = n_blocks;
        cfg.n_blocks = ruvllm_engine::hot_blocks(tail, bs, max_np, cfg.max_batch_tokens).0;
    }
    cfg.max_seqs = max_np.max(1);
    cfg.n_ctx = c.n_ctx_train;
    let tokens = tokens_for(&l, a.np_prompt * max_np + prefix + 32);
    let engine = Engine::start(Arc::new(l.model), Arc::new(l.tok), l.pool, cfg)
        .map_err(|e| Error::usage(e.to_string()))?;
    let mut records = Vec::new();
    for &np in &a.parallel {
        let prompts: Vec<Vec<u32>> = (0..np)
            .map(|i| tokens[i * a.np_prompt..(i + 1) * a.np_prompt].to_vec())
            .collect();
        let m0 = engine.metrics();
        let (traces, wall) = run_batch(&engine, prompts, a.n_gen)?;
        let m1 = engine.metrics();
        let mut ttft: Vec<f64> = traces
            .iter()
            .filter_map(|t| t.tokens.first().copied())
            .collect();
        let mut itl: Vec<f64> = traces
            .iter()
            .flat_map(|t| t.tokens.windows(2).map(|w| w[1] - w[0]))
            .collect();
        // Steady-state decode: tokens that arrived after every request had its first token.
        let start = ttft.iter().copied().fold(0.0, f64::max);
        let end = traces
            .iter()
            .filter_map(|t| t.tokens.last().copied())
            .fold(0.0, f64::max);
        let decoded = traces
            .iter()
            .flat_map(|t| t.tokens.iter())
            .filter(|&&x| x > start)
            .count();
        let total: usize = traces.iter().map(|t| t.tokens.len()).sum();
        records.push(serde_json::json!({
            "n_parallel": np,
            "n_prompt": a.np_prompt,
            "n_gen": a.n_gen,
            "throughput_ts": total as f64 / wall,
            "decode_ts": if end > start { decoded as f64 / (end - start) } else { 0.0 },
            "ttft_p50_ms": pct(&mut ttft, 0.5) * 1e3,
            "ttft_p99_ms": pct(&mut ttft, 0.99) * 1e3,
            "itl_p50_ms": pct(&mut itl, 0.5) * 1e3,
            "itl_p99_ms": pct(&mut itl, 0.99) * 1e3,
            "steps": m1.steps - m0.steps,
            "preemptions": m1.preemptions - m0.preemptions,
            "kv_type": kv.ty.name(),
            "kv_type_k": kv.k.name(),
            "kv_type_v": kv.v.name(),
            "kv_tail": kv.tail,
            "kv_bytes_per_token": ruvllm_engine::kv_bytes_per_token_kv(&c, kv.k, kv.v),
        }));
    }
    let mut prefix_record = None;
    if prefix > 0 {
        // Cold: a prompt of `prefix` shared tokens plus 16 of its own; warm: the same prefix,
        // another 16-token suffix.
        // Tokens no serving run used, so the cold request really is cold.
        let fresh = &tokens[a.np_prompt * max_np..];
        let shared = &fresh[..prefix];
        let mk = |tail: &[u32]| [shared, tail].concat();
        let cold_p = mk(&fresh[prefix..prefix + 16]);
        let warm_p = mk(&fresh[prefix + 16..prefix + 32]);
        let m0 = engine.metrics();
        let (cold, _) = run_batch(&engine, vec![cold_p], 1)?;
        let m1 = engine.metrics();
        let (warm, _) = run_batch(&engine, vec![warm_p], 1)?;
        let m2 = engine.metrics();
        let (tc, tw) = (cold[0].tokens[0], warm[0].tokens[0]);
        prefix_record = Some(serde_json::json!({
            "shared_prefix": prefix,
            "cold_ttft_ms": tc * 1e3,
            "warm_ttft_ms": tw * 1e3,
            "speedup": tc / tw,
            "cold_computed": m1.computed_prompt_tokens - m0.computed_prompt_tokens,
            "warm_computed": m2.computed_prompt_tokens - m1.computed_prompt_tokens,
        }));
    }
    if a.output == "json" {
        let v = serde_json::json!({"serving": records, "prefix_cache": prefix_record});
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        println!("| parallel | prompt | gen | throughput t/s | decode t/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | steps | preemptions |");
        println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
        for r in &records {
            let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
            println!(
                "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} | {} | {} |",
                r["n_parallel"],
                r["n_prompt"],
                r["n_gen"],
                f("throughput_ts"),
                f("decode_ts"),
                f("ttft_p50_ms"),
                f("ttft_p99_ms"),
                f("itl_p50_ms"),
                f("itl_p99_ms"),
                r["steps"],
                r["preemptions"]
            );
        }
        if let Some(p) = prefix_record {
            println!(
                "\nprefix cache: {} shared tokens: cold TTFT {:.1} ms ({} prompt tokens computed), warm TTFT {:.1} ms ({} computed): {:.1}x",
                p["shared_prefix"], p["cold_ttft_ms"].as_f64().unwrap_or(0.0), p["cold_computed"],
                p["warm_ttft_ms"].as_f64().unwrap_or(0.0), p["warm_computed"], p["speedup"].as_f64().unwrap_or(0.0)
            );
        }
    }
    Ok(())
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

pub fn run(a: BenchArgs) -> Result<(), Error> {
    if a.output != "md" && a.output != "json" {
        return Err(Error::usage(format!(
            "--output must be md or json, got {:?}",
            a.output
        )));
    }
    if a.reps == 0 {
        return Err(Error::usage("--repetitions must be at least 1"));
    }
    let l = load(&a.model)?;
    let ctx = (a.depth + a.n_prompt.max(a.n_gen) + 1).max(16);
    if ctx > l.model.config.n_ctx_train {
        return Err(Error::usage(format!(
            "bench needs {ctx} positions but the model's context is {}",
            l.model.config.n_ctx_train
        )));
    }
    let mut runner = Runner::new(&l.model, l.pool.clone(), ctx);
    runner.set_attention(l.attn);
    let tokens = tokens_for(&l, a.depth + a.n_prompt.max(a.n_gen));
    let (context, tokens) = tokens.split_at(a.depth);
    let mut records = Vec::new();
    let path = crate::pull::resolve(a.model.model.as_deref())?;
    let file_name = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let threads = l.pool.n_threads();
    if !a.parallel.is_empty() {
        drop(runner);
        return serving(&a, l);
    }
    let mut tests: Vec<(usize, usize)> = Vec::new();
    if a.n_prompt > 0 {
        tests.push((a.n_prompt, 0));
    }
    if a.n_gen > 0 {
        tests.push((0, a.n_gen));
    }
    for (np, ng) in tests {
        let mut samples = Vec::new();
        for rep in 0..=a.reps {
            runner.truncate(0);
            if !context.is_empty() {
                runner.forward(context, Logits::None)?;
            }
            let t = Instant::now();
            if np > 0 {
                runner.forward(&tokens[..np], Logits::Last)?;
            } else {
                for &tk in &tokens[..ng] {
                    runner.forward(&[tk], Logits::Last)?;
                }
            }
            let secs = t.elapsed().as_secs_f64();
            if rep > 0 {
                samples.push((np + ng) as f64 / secs);
            }
        }
        let (avg, std) = mean_std(&samples);
        records.push(serde_json::json!({
            "model_filename": file_name,
            "model_type": l.model.config.arch_name,
            "model_size": l.model.gguf().file_size(),
            "n_params": l.model.gguf().tensors().iter().map(|t| t.n_elements()).sum::<u64>(),
            "n_threads": threads,
            "n_prompt": np,
            "n_gen": ng,
            "n_depth": a.depth,
            "avg_ts": avg,
            "stddev_ts": std,
            "samples_ts": samples,
            "backend": "CPU",
            "build_commit": env!("CARGO_PKG_VERSION"),
            "simd": format!("{:?}", ruvllm_kernels::dispatch::tier()),
        }));
    }
    if a.output == "json" {
        println!(
            "{}",
            serde_json::to_string_pretty(&records).unwrap_or_default()
        );
    } else {
        println!("| model | size | threads | simd | test | t/s |");
        println!("| --- | ---: | ---: | --- | ---: | ---: |");
        for r in &records {
            let mut test = if r["n_prompt"].as_u64() > Some(0) {
                format!("pp{}", r["n_prompt"])
            } else {
                format!("tg{}", r["n_gen"])
            };
            if a.depth > 0 {
                test.push_str(&format!(" @ d{}", a.depth));
            }
            println!(
                "| {} | {:.1} MiB | {} | {} | {test} | {:.2} ± {:.2} |",
                r["model_filename"].as_str().unwrap_or(""),
                r["model_size"].as_f64().unwrap_or(0.0) / 1048576.0,
                r["n_threads"],
                r["simd"].as_str().unwrap_or(""),
                r["avg_ts"].as_f64().unwrap_or(0.0),
                r["stddev_ts"].as_f64().unwrap_or(0.0)
            );
        }
    }
    Ok(())
}
