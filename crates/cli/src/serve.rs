//! `ruvllm serve`: loads the model, sizes the KV pool from a memory budget, starts the engine
//! and the OpenAI-compatible HTTP server.

use crate::error::Error;
use crate::{load, ModelArgs};
use clap::Args;
use ruvllm_engine::{
    blocks_for_memory, blocks_for_memory_kv, hot_blocks, kv_bytes_per_token, kv_bytes_per_token_kv,
    Engine, EngineConfig,
};
use ruvllm_model::{registry, KvType};
use ruvllm_server::{AppState, ServerConfig};
use ruvllm_tokenizer::ChatTemplate;
use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port (0 picks a free one; the chosen address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Accepted API key (repeatable). RUVLLM_API_KEY adds one more. Without any key the API is open.
    #[arg(long = "api-key")]
    api_keys: Vec<String>,
    /// File with one API key per line (blank lines and lines starting with # are skipped).
    #[arg(long = "api-keys-file")]
    api_keys_file: Option<std::path::PathBuf>,
    /// KV cache memory: a size (1GiB, 512MiB, 2000000000) or a fraction of available RAM (0.25).
    /// Default: 1 GiB or a quarter of available RAM, whichever is smaller.
    #[arg(long = "kv-cache-memory")]
    kv_cache_memory: Option<String>,
    /// KV cache storage: f16, q8_0, q4_0 (quantized, with Hadamard-rotated heads) or f32.
    /// With --kv-tail, the type of the cold tier.
    #[arg(long = "kv-type", default_value = "f16")]
    kv_type: String,
    /// Store the keys as this type instead of --kv-type (llama.cpp's --cache-type-k); 4-bit keys
    /// cost most of a q4_0 cache's perplexity, so `--kv-type q4_0 --kv-type-k q8_0` keeps most
    /// of its saving. Not with --kv-tail.
    #[arg(long = "kv-type-k")]
    kv_type_k: Option<String>,
    /// Store the values as this type instead of --kv-type (llama.cpp's --cache-type-v). Not
    /// with --kv-tail.
    #[arg(long = "kv-type-v")]
    kv_type_v: Option<String>,
    /// Two-tier KV: keep each sequence's most recent N tokens in f16 and move older full blocks
    /// to --kv-type (q8_0 or q4_0). The f16 tier is sized for --max-num-seqs tails (at most
    /// half the memory budget); the rest of the budget is the cold tier. Default: 32 for q4_0
    /// (4-bit newest keys cost most of its perplexity), none otherwise; 0: no tail.
    #[arg(long = "kv-tail")]
    kv_tail: Option<usize>,
    /// LoRA adapter to serve as NAME=PATH[:SCALE] (a PEFT directory or .safetensors file;
    /// repeatable). Requests pick one with `"adapter": NAME` or `"model": NAME`; more can be
    /// loaded or replaced at run time with `POST /v1/adapters`.
    #[arg(long = "lora")]
    lora: Vec<String>,
    /// Tokens per KV block.
    #[arg(long = "block-size", default_value_t = 16)]
    block_size: usize,
    /// Most sequences running at once.
    #[arg(long = "max-num-seqs", default_value_t = 64)]
    max_num_seqs: usize,
    /// Most tokens per forward step (decodes plus prefill chunks).
    #[arg(long = "max-batch-tokens", default_value_t = 512)]
    max_batch_tokens: usize,
    /// Most requests waiting for admission; beyond it requests get 429.
    #[arg(long = "max-queue", default_value_t = 256)]
    max_queue: usize,
    /// Turn automatic prefix caching off.
    #[arg(long = "no-prefix-caching")]
    no_prefix_caching: bool,
    /// Largest request body in bytes.
    #[arg(long = "max-body-bytes", default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// Do not learn from `POST /v1/feedback`: outputs stay the base model's (and the loaded
    /// adapters').
    #[arg(long = "no-learning")]
    no_learning: bool,
    /// Persist learned adapters (per caller) under DIR, written atomically, and restore them
    /// at start-up.
    #[arg(long = "sona-dir", value_name = "DIR")]
    sona_dir: Option<std::path::PathBuf>,
    /// Seconds between background-loop runs for scopes with new feedback (it also runs after
    /// every 4th feedback event of a scope); 0 turns the timer off.
    #[arg(long = "sona-background-secs", default_value_t = 60)]
    sona_background_secs: u64,
    /// Seconds between deep-loop runs (each scope's micro-adapter merged into its base and a
    /// snapshot written); 0 turns it off.
    #[arg(long = "sona-consolidate-secs", default_value_t = 3600)]
    sona_consolidate_secs: u64,
    /// Threads the learner trains on (besides the engine's `-t`); one keeps the other cores
    /// for serving.
    #[arg(long = "sona-threads", default_value_t = 1)]
    sona_threads: usize,
    /// Threads a feedback event trains on when serving is idle as it arrives (no request
    /// running or waiting): its lessons' gradients and checks in parallel, bit-identical to
    /// one thread's (default: the engine's `-t`; 0 or 1: `--sona-threads` always). A request
    /// arriving meanwhile shares the cores with the event for its ~0.1 s.
    #[arg(long = "sona-idle-threads")]
    sona_idle_threads: Option<usize>,
    /// Which completions become ReasoningBank trajectories: `all` (each costs one embedding
    /// pass of its question, off the request path) or `feedback` (only rated/corrected ones).
    #[arg(long = "sona-trajectories", default_value = "all", value_parser = ["all", "feedback"])]
    sona_trajectories: String,
    /// Which requests a caller's learned adapter runs for: `near` (questions nearer one the
    /// caller taught than generic ones, by the model's embedding: one extra embedding pass
    /// per request of a caller that has an adapter) or `always` (every request; one
    /// correction then changes answers to unrelated questions too).
    #[arg(long = "sona-apply", default_value = "near", value_parser = ["near", "always"])]
    sona_apply: String,
    /// Memory (MiB) for activations kept while answers are generated, so that a rating of an
    /// answer trains without running it through the model again (10.5 KiB per token on
    /// SmolLM2; oldest dropped first; 0 keeps none).
    #[arg(long = "sona-keep-mib", default_value_t = ruvllm_server::KEEP_MIB)]
    sona_keep_mib: usize,
    /// The most answer tokens a rating teaches (0: all): those least likely when served for a
    /// positive rating, most likely for a negative one. Feedback latency grows with it (a
    /// rated 60-token answer: 0.09 s at 8, 0.2 s at 16, 0.7 s with every token).
    #[arg(long = "sona-rated-rows", default_value_t = ruvllm_sona::learner::LearnConfig::default().rated_rows)]
    sona_rated_rows: usize,
    /// The most tokens a correction teaches (0, the default: all): those the model finds least
    /// likely. Cuts a long correction's feedback latency (44 tokens: published p50 ~0.09 s at
    /// 16, ~0.15 s with all) but leaves the other tokens unprotected (a taught token can start
    /// repeating where an untaught one should follow: "armarmarm…" after a 25-token correction
    /// at 16).
    #[arg(long = "sona-corrected-rows", default_value_t = ruvllm_sona::learner::LearnConfig::default().corrected_rows)]
    sona_corrected_rows: usize,
    /// Log format: text or json.
    #[arg(long = "log-format", default_value = "text")]
    log_format: String,
    /// Seconds in-flight requests may run after SIGINT/SIGTERM before they are cancelled.
    #[arg(long = "shutdown-grace", default_value_t = 30)]
    shutdown_grace: u64,
}

/// Parses a memory size: plain bytes, a K/M/G/T suffix (KB = 1000, KiB = 1024), or a fraction
/// in (0, 1] of `available`.
pub fn parse_memory(s: &str, available: u64) -> Result<u64, Error> {
    let t = s.trim();
    let bad = || {
        Error::usage(format!(
            "--kv-cache-memory: cannot read {s:?} (examples: 1GiB, 512MiB, 0.25)"
        ))
    };
    if let Ok(f) = t.parse::<f64>() {
        if t.contains('.') || (f > 0.0 && f <= 1.0 && !t.chars().all(|c| c.is_ascii_digit())) {
            if !(f > 0.0 && f <= 1.0) {
                return Err(bad());
            }
            return Ok((available as f64 * f) as u64);
        }
        return t.parse::<u64>().map_err(|_| bad());
    }
    let split = t.find(|c: char| c.is_ascii_alphabetic()).ok_or_else(bad)?;
    let (num, unit) = t.split_at(split);
    let n: f64 = num.trim().parse().map_err(|_| bad())?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1048576.0,
        "g" | "gb" => 1e9,
        "gib" => 1073741824.0,
        "t" | "tb" => 1e12,
        "tib" => 1099511627776.0,
        _ => return Err(bad()),
    };
    if n.is_nan() || n <= 0.0 {
        return Err(bad());
    }
    Ok((n * mult) as u64)
}

/// MemAvailable from /proc/meminfo, in bytes (8 GiB when unknown).
fn available_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(8 << 30)
}

fn api_keys(a: &ServeArgs) -> Result<HashSet<String>, Error> {
    let mut keys: HashSet<String> = a
        .api_keys
        .iter()
        .map(|k| k.trim().to_owned())
        .filter(|k| !k.is_empty())
        .collect();
    if let Ok(k) = std::env::var("RUVLLM_API_KEY") {
        if !k.trim().is_empty() {
            keys.insert(k.trim().to_owned());
        }
    }
    if let Some(p) = &a.api_keys_file {
        let text = std::fs::read_to_string(p)
            .map_err(|e| Error::io(format!("cannot read {}", p.display()), e))?;
        keys.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned),
        );
    }
    Ok(keys)
}

/// Names the model answers to: its registry name (when it is a known model) and its file stem.
fn model_names(requested: Option<&str>, path: &std::path::Path) -> Vec<String> {
    let mut names = Vec::new();
    let req = requested.unwrap_or(registry::DEFAULT_MODEL);
    if registry::find(req).is_some() {
        names.push(req.to_owned());
    } else if let Some(m) = registry::KNOWN_MODELS
        .iter()
        .find(|m| path.file_name().is_some_and(|f| f == m.file))
    {
        names.push(m.name.to_owned());
    }
    if let Some(stem) = path.file_stem().map(|s| s.to_string_lossy().into_owned()) {
        if !names.contains(&stem) {
            names.push(stem);
        }
    }
    names
}

pub fn run(a: ServeArgs) -> Result<(), Error> {
    if a.log_format != "text" && a.log_format != "json" {
        return Err(Error::usage(format!(
            "--log-format must be text or json, got {:?}",
            a.log_format
        )));
    }
    if a.block_size == 0 || a.max_num_seqs == 0 || a.max_batch_tokens == 0 {
        return Err(Error::usage(
            "--block-size, --max-num-seqs and --max-batch-tokens must be at least 1",
        ));
    }
    let kv = crate::kv_choice(
        &a.kv_type,
        a.kv_type_k.as_deref(),
        a.kv_type_v.as_deref(),
        a.kv_tail,
    )?;
    ruvllm_server::init_logging(a.log_format == "json");
    let keys = api_keys(&a)?;
    let path = crate::pull::resolve(a.model.model.as_deref())?;
    let l = load(&a.model)?;
    let c = &l.model.config;
    let avail = available_memory();
    let budget = match &a.kv_cache_memory {
        Some(s) => parse_memory(s, avail)?,
        None => (1u64 << 30).min(avail / 4),
    };
    let n_ctx = a.model.ctx_size.min(c.n_ctx_train);
    let (n_blocks, n_cold) = match kv.tail {
        None => (blocks_for_memory_kv(c, kv.k, kv.v, a.block_size, budget), 0),
        Some(tail) => {
            let (wanted, min_hot) =
                hot_blocks(tail, a.block_size, a.max_num_seqs, a.max_batch_tokens);
            let hot = wanted
                .min(blocks_for_memory(c, KvType::F16, a.block_size, budget / 2).max(min_hot));
            let hot_bytes = (hot * a.block_size * kv_bytes_per_token(c, KvType::F16)) as u64;
            (
                hot,
                blocks_for_memory(c, kv.ty, a.block_size, budget.saturating_sub(hot_bytes)),
            )
        }
    };
    if n_blocks == 0 {
        return Err(Error::usage(format!(
            "--kv-cache-memory {budget} bytes holds no block of {} tokens",
            a.block_size
        )));
    }
    let per_token = kv_bytes_per_token_kv(c, kv.k, kv.v);
    if let Some(tail) = kv.tail {
        let hot_pt = kv_bytes_per_token(c, KvType::F16);
        eprintln!(
            "ruvllm: two-tier KV: f16 tail of {tail} tokens, {n_blocks} f16 blocks ({:.1} MiB, {hot_pt} bytes/token) + {n_cold} {} blocks ({:.1} MiB, {per_token} bytes/token) = {} tokens",
            (n_blocks * a.block_size * hot_pt) as f64 / 1048576.0,
            kv.ty.name(),
            (n_cold * a.block_size * per_token) as f64 / 1048576.0,
            (n_blocks + n_cold) * a.block_size
        );
    } else {
        eprintln!(
        "ruvllm: KV cache {} blocks × {} tokens = {} tokens ({:.1} MiB, {} bytes/token {}); context {} tokens; {} threads",
        n_blocks,
        a.block_size,
        n_blocks * a.block_size,
        (n_blocks * a.block_size * per_token) as f64 / 1048576.0,
        per_token,
        if kv.k == kv.v { kv.k.name().to_string() } else { format!("K {} / V {}", kv.k.name(), kv.v.name()) },
        n_ctx,
        l.pool.n_threads()
    );
    }
    if (n_blocks + n_cold) * a.block_size < n_ctx {
        eprintln!("ruvllm: note: the KV pool holds fewer tokens than the context; longer requests get 400");
    }
    let template = ChatTemplate::from_gguf(l.model.gguf(), &l.tok)?;
    let mut cfg = EngineConfig::new(c, n_blocks);
    cfg.attn = l.attn;
    cfg.block_size = a.block_size;
    cfg.max_seqs = a.max_num_seqs;
    cfg.max_batch_tokens = a.max_batch_tokens;
    cfg.max_waiting = a.max_queue;
    cfg.prefix_caching = !a.no_prefix_caching;
    cfg.n_ctx = n_ctx;
    cfg.set_kv_types(kv.ty, kv.k, kv.v);
    cfg.kv_tail = kv.tail;
    cfg.n_cold_blocks = n_cold;
    let n_embd = c.n_embd;
    let tok = Arc::new(l.tok);
    let engine_threads = l.pool.n_threads();
    let engine = Engine::start(Arc::new(l.model), tok.clone(), l.pool, cfg)
        .map_err(|e| Error::usage(e.to_string()))?;
    let scfg = ServerConfig {
        addr: SocketAddr::new(a.host, a.port),
        api_keys: keys,
        max_body_bytes: a.max_body_bytes,
        model_names: model_names(a.model.model.as_deref(), &path),
        shutdown_grace: Duration::from_secs(a.shutdown_grace),
        learning: !a.no_learning,
        sona_dir: a.sona_dir.clone(),
        sona_background_secs: a.sona_background_secs,
        sona_consolidate_secs: a.sona_consolidate_secs,
        sona_threads: a.sona_threads,
        sona_idle_threads: a.sona_idle_threads.unwrap_or(engine_threads),
        sona_all_trajectories: a.sona_trajectories == "all",
        sona_apply_near: a.sona_apply == "near",
        sona_keep_bytes: a.sona_keep_mib << 20,
        sona_rated_rows: a.sona_rated_rows,
        sona_corrected_rows: a.sona_corrected_rows,
    };
    eprintln!("ruvllm: serving model as {}", scfg.model_names.join(", "));
    let state = Arc::new(
        AppState::new(Arc::new(engine), tok, template, n_embd, &scfg)
            .map_err(|e| Error::usage(format!("--sona-dir: {e}")))?,
    );
    for spec in &a.lora {
        let (name, rest) = spec
            .split_once('=')
            .ok_or_else(|| Error::usage(format!("--lora wants NAME=PATH[:SCALE], got {spec:?}")))?;
        let (path, scale) = crate::split_scale(rest)?;
        let ad = state.load_adapter(name, std::path::Path::new(path), scale)?;
        eprintln!(
            "ruvllm: adapter {name} from {path} (scale {scale}, id {})",
            ad.id
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::io("cannot start the async runtime", e))?;
    rt.block_on(ruvllm_server::serve(state, &scfg))
        .map_err(|e| Error::io(format!("cannot serve on {}", scfg.addr), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes_parse() {
        assert_eq!(parse_memory("1GiB", 0).unwrap(), 1 << 30);
        assert_eq!(parse_memory("512MiB", 0).unwrap(), 512 << 20);
        assert_eq!(parse_memory("2G", 0).unwrap(), 2_000_000_000);
        assert_eq!(parse_memory("1.5 GiB", 0).unwrap(), 3 << 29);
        assert_eq!(parse_memory("123456", 0).unwrap(), 123456);
        assert_eq!(parse_memory("0.25", 1000).unwrap(), 250);
        for bad in ["", "abc", "1.5", "-1GiB", "1XB", "0GiB", "2.0"] {
            assert!(
                parse_memory(bad, 1000).is_err(),
                "{bad:?} should be refused"
            );
        }
    }
}
