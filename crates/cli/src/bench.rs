//! `ruvllm bench`, in the manner of `llama-bench`: pp (one batch of P prompt tokens from an
//! empty cache) and tg (N single-token decode steps from an empty cache), each repeated R times
//! after a warm-up, reported as mean ± standard deviation tokens/s. `--output json` writes the
//! records llama-bench writes (`n_prompt`, `n_gen`, `avg_ts`, `stddev_ts`, ...).

use crate::error::Error;
use crate::{load, ModelArgs};
use clap::Args;
use ruvllm_model::{Logits, Runner};
use std::time::Instant;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt tokens for the pp test (0 skips it).
    #[arg(short = 'p', long = "n-prompt", default_value_t = 512)]
    n_prompt: usize,
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

/// Serving mode: N sequences prefilled together, then decoded together step by step.
fn serving(a: &BenchArgs, l: &crate::Loaded, tokens: &[u32]) -> Result<(), Error> {
    use ruvllm_kv::KvManager;
    use ruvllm_model::{Forward, KvCache, SeqInput};
    let c = &l.model.config;
    let bs = 16;
    let mut records = Vec::new();
    for &np in &a.parallel {
        if np == 0 {
            return Err(Error::usage("--parallel values must be at least 1"));
        }
        let per_seq = (a.np_prompt + a.n_gen).div_ceil(bs) + 1;
        let n_blocks = np * per_seq;
        let mut kv = KvCache::new(c.n_layer, c.kv_dim(), bs, n_blocks);
        let mut mgr = KvManager::new(n_blocks, bs, false);
        let mut fwd = Forward::new(&l.model, l.pool.clone());
        let prompts: Vec<&[u32]> = (0..np).map(|i| &tokens[i * a.np_prompt..(i + 1) * a.np_prompt]).collect();
        for (i, p) in prompts.iter().enumerate() {
            mgr.add_sequence(i as u64, p, &[]);
            mgr.append(i as u64, p).ok_or_else(|| Error::usage("KV pool too small"))?;
        }
        let t0 = Instant::now();
        let tables: Vec<Vec<u32>> = (0..np).map(|i| mgr.block_table(i as u64).unwrap_or(&[]).to_vec()).collect();
        let seqs: Vec<SeqInput<'_>> = (0..np).map(|i| SeqInput { tokens: prompts[i], pos0: 0, block_table: &tables[i], logits: Logits::Last }).collect();
        let mut last: Vec<u32> = {
            let lg = fwd.forward_batch(&mut kv, &seqs)?;
            (0..np).map(|i| ruvllm_model::sampler::argmax(&lg[i * c.n_vocab..(i + 1) * c.n_vocab])).collect()
        };
        let prefill = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let mut itl = Vec::with_capacity(a.n_gen);
        for step in 0..a.n_gen {
            let ts = Instant::now();
            for (i, &t) in last.iter().enumerate() {
                mgr.append(i as u64, &[t]).ok_or_else(|| Error::usage("KV pool too small"))?;
            }
            let tables: Vec<Vec<u32>> = (0..np).map(|i| mgr.block_table(i as u64).unwrap_or(&[]).to_vec()).collect();
            let toks: Vec<[u32; 1]> = last.iter().map(|&t| [t]).collect();
            let seqs: Vec<SeqInput<'_>> =
                (0..np).map(|i| SeqInput { tokens: &toks[i], pos0: a.np_prompt + step, block_table: &tables[i], logits: Logits::Last }).collect();
            let lg = fwd.forward_batch(&mut kv, &seqs)?;
            last = (0..np).map(|i| ruvllm_model::sampler::argmax(&lg[i * c.n_vocab..(i + 1) * c.n_vocab])).collect();
            itl.push(ts.elapsed().as_secs_f64());
        }
        let decode = t1.elapsed().as_secs_f64();
        itl.sort_by(|x, y| x.total_cmp(y));
        let pct = |q: f64| itl.get(((itl.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0.0) * 1e3;
        records.push(serde_json::json!({
            "n_parallel": np,
            "n_prompt": a.np_prompt,
            "n_gen": a.n_gen,
            "prefill_ts": (np * a.np_prompt) as f64 / prefill,
            "decode_ts": (np * a.n_gen) as f64 / decode,
            "itl_p50_ms": pct(0.5),
            "itl_p99_ms": pct(0.99),
            "kv_blocks_used": mgr.stats().used,
            "kv_bytes_per_token": kv.bytes_per_token(),
        }));
    }
    if a.output == "json" {
        println!("{}", serde_json::to_string_pretty(&records).unwrap_or_default());
    } else {
        println!("| parallel | prompt | gen | prefill t/s | aggregate decode t/s | ITL p50 ms | ITL p99 ms | KV blocks |");
        println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
        for r in &records {
            println!(
                "| {} | {} | {} | {:.1} | {:.1} | {:.2} | {:.2} | {} |",
                r["n_parallel"], r["n_prompt"], r["n_gen"],
                r["prefill_ts"].as_f64().unwrap_or(0.0), r["decode_ts"].as_f64().unwrap_or(0.0),
                r["itl_p50_ms"].as_f64().unwrap_or(0.0), r["itl_p99_ms"].as_f64().unwrap_or(0.0), r["kv_blocks_used"]
            );
        }
    }
    Ok(())
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 { v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (mean, var.sqrt())
}

pub fn run(a: BenchArgs) -> Result<(), Error> {
    if a.output != "md" && a.output != "json" {
        return Err(Error::usage(format!("--output must be md or json, got {:?}", a.output)));
    }
    if a.reps == 0 {
        return Err(Error::usage("--repetitions must be at least 1"));
    }
    let l = load(&a.model)?;
    let ctx = (a.n_prompt.max(a.n_gen) + 1).max(16);
    if ctx > l.model.config.n_ctx_train {
        return Err(Error::usage(format!("bench needs {ctx} positions but the model's context is {}", l.model.config.n_ctx_train)));
    }
    let mut runner = Runner::new(&l.model, l.pool.clone(), ctx);
    let tokens = tokens_for(&l, a.n_prompt.max(a.n_gen));
    let mut records = Vec::new();
    let path = crate::pull::resolve(a.model.model.as_deref())?;
    let file_name = path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let threads = l.pool.n_threads();
    if !a.parallel.is_empty() {
        return serving(&a, &l, &tokens_for(&l, a.np_prompt.max(1) * a.parallel.iter().max().copied().unwrap_or(1)));
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
            "avg_ts": avg,
            "stddev_ts": std,
            "samples_ts": samples,
            "backend": "CPU",
            "build_commit": env!("CARGO_PKG_VERSION"),
            "simd": format!("{:?}", ruvllm_kernels::dispatch::tier()),
        }));
    }
    if a.output == "json" {
        println!("{}", serde_json::to_string_pretty(&records).unwrap_or_default());
    } else {
        println!("| model | size | threads | simd | test | t/s |");
        println!("| --- | ---: | ---: | --- | ---: | ---: |");
        for r in &records {
            let test = if r["n_prompt"].as_u64() > Some(0) { format!("pp{}", r["n_prompt"]) } else { format!("tg{}", r["n_gen"]) };
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
