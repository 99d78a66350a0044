//! `ruvllm`: run, chat with, inspect and measure GGUF models on the CPU.

mod bench;
mod error;
mod pull;
mod serve;
mod sona_bench;
mod sona_cmd;

use clap::{Args, Parser, Subcommand};
use error::{exit_code, Error};
use ruvllm_gguf::GgufFile;
use ruvllm_kernels::pool::ThreadPool;
use ruvllm_model::{
    generate, registry, AttnKernel, GenerateParams, Logits, Model, Runner, SamplingParams,
};
use ruvllm_tokenizer::{ChatMessage, ChatTemplate, Tokenizer};
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "ruvllm",
    version,
    about = "LLM serving runtime: GGUF models on the CPU"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate a reply to PROMPT (or standard input), streamed to standard output.
    Run(RunArgs),
    /// Interactive multi-turn chat on the engine; earlier turns come from the prefix cache.
    Chat(ChatArgs),
    /// Print the token ids of TEXT as a JSON array.
    Tokenize(TokenizeArgs),
    /// Show a model's metadata and tensors.
    Info {
        /// Model file or pulled name.
        model: String,
    },
    /// Mean negative log-likelihood and perplexity of a text file.
    Perplexity(PerplexityArgs),
    /// Fetch a known model into the cache (RUVLLM_HOME, default ~/.cache/ruvllm).
    Pull {
        /// Model name (see `ruvllm list`).
        name: String,
    },
    /// List known models and whether they are pulled.
    List,
    /// Measure prompt processing (pp) and generation (tg) speed, like llama-bench.
    Bench(bench::BenchArgs),
    /// Serve an OpenAI-compatible HTTP API (continuous batching over a paged KV cache).
    Serve(serve::ServeArgs),
    /// Measure learning from feedback: generated facts taught by correction, scored on held-out
    /// paraphrases in four modes (baseline, retrieval-only, adapters-only, full).
    #[command(name = "sona-bench")]
    SonaBench(sona_bench::SonaBenchArgs),
    /// Learned state under a --sona-dir: status, consolidate (the deep loop), rollback.
    Sona(sona_cmd::SonaArgs),
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// Model: a GGUF path or a pulled name (default: smollm2-135m, pulled on first use).
    #[arg(short = 'm', long = "model")]
    model: Option<String>,
    /// Worker threads (default: all cores).
    #[arg(short = 't', long = "threads")]
    threads: Option<usize>,
    /// Context size in tokens (default: 4096, capped at the model's trained context).
    #[arg(short = 'c', long = "ctx-size", default_value_t = 4096)]
    ctx_size: usize,
    /// Attention kernel: on (flash-style online softmax), off (two-pass, llama.cpp's default
    /// arithmetic) or auto (flash for spans over 1,024 positions).
    #[arg(long = "flash-attn", default_value = "auto")]
    flash_attn: String,
}

#[derive(Args, Clone)]
struct SamplingArgs {
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8, allow_hyphen_values = true)]
    temperature: f32,
    /// Top-p (nucleus) sampling; 1 disables.
    #[arg(long = "top-p", default_value_t = 0.95, allow_hyphen_values = true)]
    top_p: f32,
    /// Top-k sampling; 0 disables.
    #[arg(long = "top-k", default_value_t = 40)]
    top_k: usize,
    /// Min-p sampling; 0 disables.
    #[arg(long = "min-p", default_value_t = 0.05, allow_hyphen_values = true)]
    min_p: f32,
    /// Repetition penalty over the last 64 tokens; 1 disables.
    #[arg(
        long = "repeat-penalty",
        default_value_t = 1.0,
        allow_hyphen_values = true
    )]
    repeat_penalty: f32,
    /// Frequency penalty.
    #[arg(
        long = "frequency-penalty",
        default_value_t = 0.0,
        allow_hyphen_values = true
    )]
    frequency_penalty: f32,
    /// Presence penalty.
    #[arg(
        long = "presence-penalty",
        default_value_t = 0.0,
        allow_hyphen_values = true
    )]
    presence_penalty: f32,
    /// RNG seed for reproducible sampling.
    #[arg(long)]
    seed: Option<u64>,
    /// Most tokens to generate (default: until end of turn or the context is full).
    #[arg(short = 'n', long = "max-tokens")]
    max_tokens: Option<usize>,
    /// Stop string (repeatable).
    #[arg(long = "stop")]
    stop: Vec<String>,
}

impl SamplingArgs {
    fn params(&self) -> GenerateParams {
        GenerateParams {
            max_tokens: self.max_tokens,
            sampling: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repetition_penalty: self.repeat_penalty,
                frequency_penalty: self.frequency_penalty,
                presence_penalty: self.presence_penalty,
                penalty_last_n: 64,
                seed: self.seed,
            },
            stop: self.stop.clone(),
            ignore_eos: false,
            n_batch: 256,
        }
    }
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Use the prompt as is, without the chat template.
    #[arg(long)]
    raw: bool,
    /// System message (chat template only).
    #[arg(long)]
    system: Option<String>,
    /// LoRA adapter as PATH[:SCALE] (a PEFT directory or .safetensors file).
    #[arg(long = "lora")]
    lora: Option<String>,
    /// Print {"prompt_tokens":[..],"tokens":[..],"text":..} instead of streaming text.
    #[arg(long)]
    json: bool,
    /// The prompt; read from standard input when absent.
    prompt: Option<String>,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// System message.
    #[arg(long)]
    system: Option<String>,
    /// Do not learn from `/good`, `/bad` and `/fix`.
    #[arg(long = "no-learning")]
    no_learning: bool,
    /// Persist what `/good`, `/bad` and `/fix` teach under DIR (the same layout as `serve
    /// --sona-dir`, scope `chat`), and start from it.
    #[arg(long = "sona-dir", value_name = "DIR")]
    sona_dir: Option<std::path::PathBuf>,
}

#[derive(Args)]
struct TokenizeArgs {
    /// Model: a GGUF path or a pulled name.
    #[arg(short = 'm', long = "model")]
    model: Option<String>,
    /// Add BOS even if the model says not to.
    #[arg(long, conflicts_with = "no_bos")]
    bos: bool,
    /// Do not add BOS.
    #[arg(long = "no-bos")]
    no_bos: bool,
    /// Treat special-token text as plain text.
    #[arg(long = "no-special")]
    no_special: bool,
    /// The text.
    text: String,
}

#[derive(Args)]
struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Text file.
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
    /// KV cache storage: f16, q8_0, q4_0 or f32.
    #[arg(long = "kv-type", default_value = "f16")]
    kv_type: String,
    /// Store the keys as this type instead of --kv-type.
    #[arg(long = "kv-type-k")]
    kv_type_k: Option<String>,
    /// Store the values as this type instead of --kv-type.
    #[arg(long = "kv-type-v")]
    kv_type_v: Option<String>,
    /// Two-tier KV as `serve` runs it: the newest N tokens in f16, older 16-token blocks in
    /// --kv-type; the text is then fed 16 tokens a step so each position sees the tiers it
    /// would see while decoding. Default: 32 for q4_0, none otherwise; 0: no tail.
    #[arg(long = "kv-tail")]
    kv_tail: Option<usize>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// A model with what it needs to talk: tokenizer and chat template.
struct Loaded {
    model: Model,
    tok: Tokenizer,
    pool: Arc<ThreadPool>,
    /// The attention kernel `--flash-attn` chose.
    attn: AttnKernel,
}

fn load(args: &ModelArgs) -> Result<Loaded, Error> {
    let path = pull::resolve(args.model.as_deref())?;
    let model = Model::load(&path)?;
    let tok = Tokenizer::from_gguf(model.gguf())?;
    if tok.vocab_size() != model.config.n_vocab {
        return Err(Error::usage(format!(
            "tokenizer has {} tokens but the embedding has {} rows",
            tok.vocab_size(),
            model.config.n_vocab
        )));
    }
    let threads = match args.threads {
        Some(0) => return Err(Error::usage("--threads must be at least 1")),
        Some(t) => t,
        None => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
    };
    if args.ctx_size == 0 {
        return Err(Error::usage("--ctx-size must be at least 1"));
    }
    let attn = AttnKernel::parse(&args.flash_attn).ok_or_else(|| {
        Error::usage(format!(
            "--flash-attn must be on, off or auto, got {:?}",
            args.flash_attn
        ))
    })?;
    Ok(Loaded {
        model,
        tok,
        pool: Arc::new(ThreadPool::new(threads)),
        attn,
    })
}

/// Splits `PATH[:SCALE]` (the scale only when the text after the last `:` is a number).
fn split_scale(spec: &str) -> Result<(&str, f32), Error> {
    if let Some((p, s)) = spec.rsplit_once(':') {
        if let Ok(v) = s.parse::<f32>() {
            if !v.is_finite() {
                return Err(Error::usage(format!("LoRA scale must be finite, got {s}")));
            }
            return Ok((p, v));
        }
    }
    Ok((spec, 1.0))
}

fn template(l: &Loaded) -> Result<ChatTemplate, Error> {
    Ok(ChatTemplate::from_gguf(l.model.gguf(), &l.tok)?)
}

fn cmd_run(a: RunArgs) -> Result<(), Error> {
    let params = a.sampling.params();
    params.sampling.validate()?;
    let prompt = match a.prompt {
        Some(p) => p,
        None => {
            let mut s = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut s)
                .map_err(|e| Error::io("read prompt from stdin", e))?;
            let mut rest = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut rest)
                .map_err(|e| Error::io("read prompt from stdin", e))?;
            s + &rest
        }
    };
    let l = load(&a.model)?;
    let ids = if a.raw {
        l.tok.encode(&prompt, true, true)
    } else {
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(ChatMessage::new("system", s));
        }
        msgs.push(ChatMessage::new("user", &prompt));
        l.tok.encode_chat(&template(&l)?.render(&msgs, true)?)
    };
    let mut runner = Runner::new(&l.model, l.pool.clone(), a.model.ctx_size);
    runner.set_attention(l.attn);
    if let Some(spec) = &a.lora {
        let (path, scale) = split_scale(spec)?;
        runner.set_lora(Some(ruvllm_model::LoraAdapter::load_peft(
            std::path::Path::new(path),
            &l.model,
            "cli",
            1,
            scale,
        )?));
    }
    let stdout = std::io::stdout();
    let json = a.json;
    let gen = generate(&mut runner, &l.tok, &ids, &params, |t| {
        if !json {
            let mut o = stdout.lock();
            let _ = o.write_all(t.as_bytes());
            let _ = o.flush();
        }
    })?;
    if json {
        let v = serde_json::json!({
            "prompt_tokens": ids,
            "tokens": gen.tokens,
            "text": gen.text,
            "finish_reason": gen.finish.as_str(),
        });
        println!("{v}");
    } else {
        println!();
        eprintln!(
            "[{} prompt tokens ({} computed) in {:.2}s, {} tokens in {:.2}s = {:.1} tok/s, finish: {}]",
            ids.len(),
            gen.prompt_computed,
            gen.prefill_secs,
            gen.tokens.len(),
            gen.decode_secs,
            gen.tokens.len().saturating_sub(1) as f64 / gen.decode_secs.max(1e-9),
            gen.finish.as_str()
        );
    }
    Ok(())
}

/// The interactive chat runs on the engine: each turn submits the whole conversation, and the
/// prefix cache finds the blocks of earlier turns, so only the new text is computed. `/good`,
/// `/bad` and `/fix TEXT` teach the session's adapter (SONA's instant loop, scope `chat`), which
/// every later turn runs with.
fn cmd_chat(a: ChatArgs) -> Result<(), Error> {
    use ruvllm_engine::{Engine, EngineConfig, Event, Request};
    use ruvllm_sona::learner::{Feedback, LearnConfig, Learner, ANCHOR_TEXT};
    const SCOPE: &str = "chat";
    let params = a.sampling.params();
    params.sampling.validate()?;
    let l = load(&a.model)?;
    let tmpl = template(&l)?;
    let c = &l.model.config;
    let n_ctx = a.model.ctx_size.min(c.n_ctx_train);
    let mut cfg = EngineConfig::new(c, n_ctx.div_ceil(16) * 2 + 4);
    cfg.attn = l.attn;
    cfg.n_ctx = n_ctx;
    cfg.max_seqs = 1;
    let tok = Arc::new(l.tok);
    let model = Arc::new(l.model);
    let engine_threads = l.pool.n_threads();
    let engine = Arc::new(
        Engine::start(model.clone(), tok.clone(), l.pool, cfg)
            .map_err(|e| Error::usage(e.to_string()))?,
    );
    let mut learner = match (&a.sona_dir, a.no_learning) {
        (_, true) => None,
        (None, false) => Some(Learner::new(model.clone())),
        (Some(dir), false) => {
            let (l, report) = Learner::open(dir, model.clone())
                .map_err(|e| Error::usage(format!("--sona-dir {}: {e}", dir.display())))?;
            for w in &report.warnings {
                eprintln!("warning: {w}");
            }
            Some(l)
        }
    };
    // Lessons come through the engine: a rated answer from the activations its generation
    // kept, a correction with the prompt from the prefix cache.
    let mut capture = None;
    if let Some(l) = &mut learner {
        // Feedback arrives between answers: it trains on the engine's threads (bit-identical).
        l.configure(
            LearnConfig {
                idle_threads: engine_threads,
                ..LearnConfig::default()
            },
            Some(tok.encode(ANCHOR_TEXT, true, false)),
        );
        let c = Arc::new(ruvllm_server::EngineCapture::new(
            engine.clone(),
            l.pool(),
            ruvllm_server::KEEP_MIB << 20,
        ));
        l.set_capture_source(Some(c.clone()));
        capture = Some(c);
    }
    let mut msgs: Vec<ChatMessage> = a
        .system
        .iter()
        .map(|s| ChatMessage::new("system", s))
        .collect();
    // The last exchange (prompt ids, answer ids), what /good, /bad and /fix refer to.
    let mut last: Option<(Vec<u32>, Vec<u32>)> = None;
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!("ruvllm chat ({}); /reset clears the conversation, /good /bad /fix TEXT teach the model, /exit or Ctrl-D quits", tmpl.source);
    }
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        if interactive {
            eprint!("> ");
            let _ = std::io::stderr().flush();
        }
        line.clear();
        if stdin
            .lock()
            .read_line(&mut line)
            .map_err(|e| Error::io("read stdin", e))?
            == 0
        {
            break;
        }
        let text = line.trim_end_matches(['\n', '\r']);
        match text.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                msgs.retain(|m| m.role == "system");
                last = None;
                eprintln!("[conversation cleared]");
                continue;
            }
            cmd @ ("/good" | "/bad") => {
                teach(
                    learner.as_ref(),
                    last.as_ref(),
                    Feedback::Rating(if cmd == "/good" { 1.0 } else { -1.0 }),
                );
                continue;
            }
            t if t == "/fix" || t.starts_with("/fix ") => {
                let better = t["/fix".len()..].trim();
                if better.is_empty() {
                    eprintln!("[usage: /fix THE BETTER ANSWER]");
                    continue;
                }
                let mut ids = tok.encode(better, false, false);
                if let Some(e) = tok.eog.first().copied().or(tok.eos) {
                    ids.push(e);
                }
                if teach(learner.as_ref(), last.as_ref(), Feedback::Correction(ids)) {
                    // The conversation goes on from the corrected answer.
                    if let Some(m) = msgs.last_mut().filter(|m| m.role == "assistant") {
                        *m = ChatMessage::new("assistant", better);
                    }
                }
                continue;
            }
            t if t.starts_with('/') && !t.starts_with("//") => {
                eprintln!("[unknown command {t}; /reset /good /bad /fix TEXT /exit]");
                continue;
            }
            _ => {}
        }
        msgs.push(ChatMessage::new("user", text));
        let ids = tok.encode_chat(&tmpl.render(&msgs, true)?);
        let max_tokens = params
            .max_tokens
            .unwrap_or_else(|| n_ctx.saturating_sub(ids.len()))
            .max(1);
        let mut req = Request::greedy(ids.clone(), max_tokens);
        req.sampling = params.sampling.clone();
        req.stop = params.stop.clone();
        req.adapter = learner.as_ref().and_then(|l| l.adapter_for(SCOPE));
        req.keep = capture
            .as_ref()
            .and_then(|c| c.keep_spec(ids.len(), req.adapter.as_deref()));
        let mut h = match engine.submit(req) {
            Ok(h) => h,
            Err(e) => {
                eprintln!("error: {e}");
                msgs.pop();
                continue;
            }
        };
        let stdout = std::io::stdout();
        let mut reply = String::new();
        let mut answer_ids = Vec::new();
        let mut usage = None;
        let mut kept = None;
        while let Some(ev) = h.next_blocking() {
            if let Event::Token { token, .. } = &ev {
                answer_ids.push(*token);
            }
            match ev {
                Event::Token { text, .. } | Event::Finished { text, .. } => {
                    let mut o = stdout.lock();
                    let _ = o.write_all(text.as_bytes());
                    let _ = o.flush();
                    reply.push_str(&text);
                }
                Event::Done(u) => {
                    usage = Some(u);
                    break;
                }
                Event::Failed(e) => {
                    eprintln!("error: {e}");
                    break;
                }
                Event::Kept(k) => kept = Some(*k),
                Event::Embedding(_) | Event::Captured(_) => {}
            }
        }
        println!();
        match usage {
            Some(u) => {
                eprintln!(
                    "[{} of {} prompt tokens computed, {} generated]",
                    u.prompt_tokens - u.cached_tokens,
                    u.prompt_tokens,
                    u.completion_tokens
                );
                msgs.push(ChatMessage::new("assistant", &reply));
                if let (Some(c), Some(k)) = (&capture, kept) {
                    c.keep(&ids, &answer_ids, k);
                }
                last = Some((ids, answer_ids));
            }
            None => {
                msgs.pop();
            }
        }
    }
    engine.shutdown();
    Ok(())
}

/// Runs one feedback event of the chat REPL on its last exchange and reports it; true when
/// the adapter changed.
fn teach(
    learner: Option<&ruvllm_sona::learner::Learner>,
    last: Option<&(Vec<u32>, Vec<u32>)>,
    fb: ruvllm_sona::learner::Feedback,
) -> bool {
    let Some(learner) = learner else {
        eprintln!("[learning is off (--no-learning)]");
        return false;
    };
    let Some((prompt, answer)) = last else {
        eprintln!("[nothing to give feedback on yet]");
        return false;
    };
    let t0 = std::time::Instant::now();
    match learner.learn("chat", prompt, answer, &fb) {
        Ok(o) if o.updated => {
            // What the instant loop's final check says the next identical question gets.
            let negative = matches!(fb, ruvllm_sona::learner::Feedback::Rating(r) if r < 0.0);
            let verdict = match (negative, o.follows) {
                (false, true) => "; the same question now gets this answer",
                (false, false) => "; not reproduced yet (too long for the adapter, or a near-tie)",
                (true, true) => "; the same question now gets another answer",
                (true, false) => "; the same question may still get this answer",
            };
            eprintln!(
                "[learned in {:.1}s: {} steps, loss {:.3} -> {:.3}, adapter version {}{}{verdict}]",
                t0.elapsed().as_secs_f64(),
                o.steps,
                o.loss_before,
                o.loss_after,
                o.version,
                if o.persisted { ", saved" } else { "" }
            );
            if o.background_due {
                let t = std::time::Instant::now();
                match learner.background("chat") {
                    Ok(b) => eprintln!("[background loop in {:.1}s: lessons' loss {:.3} -> {:.3}, adapter version {}]", t.elapsed().as_secs_f64(), b.loss_before, b.loss_after, b.version),
                    Err(e) => eprintln!("[background loop failed: {e}]"),
                }
            }
            true
        }
        Ok(_) => {
            eprintln!("[nothing to learn]");
            false
        }
        Err(e) => {
            eprintln!("[not learned: {e}]");
            false
        }
    }
}

fn cmd_tokenize(a: TokenizeArgs) -> Result<(), Error> {
    let path = pull::resolve(a.model.as_deref())?;
    let f = GgufFile::open(&path)?;
    let mut tok = Tokenizer::from_gguf(&f)?;
    if a.bos {
        tok.add_bos = true;
    }
    if a.no_bos {
        tok.add_bos = false;
    }
    let ids = tok.encode(&a.text, true, !a.no_special);
    println!("{}", serde_json::to_string(&ids).unwrap_or_default());
    Ok(())
}

fn cmd_info(model: &str) -> Result<(), Error> {
    let path = pull::resolve(Some(model))?;
    let f = GgufFile::open(&path)?;
    println!(
        "file: {} ({:.1} MB, GGUF v{})",
        path.display(),
        f.file_size() as f64 / 1e6,
        f.version
    );
    println!("metadata:");
    for (k, v) in f.metadata() {
        println!("  {k} = {}", v.summary());
    }
    let mut by_type: std::collections::BTreeMap<&str, (usize, u64)> = Default::default();
    for t in f.tensors() {
        let e = by_type.entry(t.ggml_type.name()).or_default();
        e.0 += 1;
        e.1 += t.size;
    }
    println!("tensors: {}", f.tensors().len());
    for (ty, (n, bytes)) in by_type {
        println!("  {ty:>5}: {n:4} tensors, {:8.2} MB", bytes as f64 / 1e6);
    }
    for t in f.tensors() {
        println!("  {:40} {:>5} {:?}", t.name, t.ggml_type.name(), t.dims);
    }
    match Model::from_gguf(GgufFile::open(&path)?) {
        Ok(m) => println!("model: {:?} — loadable by ruvllm", m.config),
        Err(e) => println!("model: not runnable by ruvllm: {e}"),
    }
    Ok(())
}

fn cmd_perplexity(a: PerplexityArgs) -> Result<(), Error> {
    let text =
        std::fs::read(&a.file).map_err(|e| Error::io(format!("read {}", a.file.display()), e))?;
    let text = String::from_utf8(text)
        .map_err(|_| Error::usage(format!("{} is not valid UTF-8", a.file.display())))?;
    let l = load(&a.model)?;
    let tokens = l.tok.encode(&text, true, false);
    if tokens.len() < 2 {
        return Err(Error::usage("the text needs at least two tokens"));
    }
    // Score the text in windows of the context size; each window predicts all its tokens but
    // the first (for a text that fits one window this is the plain mean NLL).
    let n_ctx = a.model.ctx_size.min(l.model.config.n_ctx_train);
    let kv = kv_choice(
        &a.kv_type,
        a.kv_type_k.as_deref(),
        a.kv_type_v.as_deref(),
        a.kv_tail,
    )?;
    const BLOCK: usize = 16;
    let (mut runner, step) = match kv.tail {
        Some(tail) => (
            Runner::with_kv_tail(&l.model, l.pool.clone(), n_ctx, kv.ty, tail, BLOCK)?,
            BLOCK,
        ),
        None => (
            Runner::with_kv_types(&l.model, l.pool.clone(), n_ctx, kv.k, kv.v)?,
            64,
        ),
    };
    runner.set_attention(l.attn);
    let nv = l.model.config.n_vocab;
    let (mut nll, mut count) = (0f64, 0usize);
    let t0 = std::time::Instant::now();
    for window in tokens.chunks(n_ctx) {
        if window.len() < 2 {
            break;
        }
        runner.truncate(0);
        for (ci, chunk) in window.chunks(step).enumerate() {
            let logits = runner.forward(chunk, Logits::All)?;
            for (i, _) in chunk.iter().enumerate() {
                let gi = ci * step + i;
                if gi + 1 >= window.len() {
                    break;
                }
                nll += ruvllm_kernels::ops::token_nll(
                    &logits[i * nv..(i + 1) * nv],
                    window[gi + 1] as usize,
                );
                count += 1;
            }
        }
    }
    let mean = nll / count as f64;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"n_tokens": tokens.len(), "n_predicted": count, "mean_nll": mean, "perplexity": mean.exp()})
        );
    } else {
        println!(
            "tokens: {}  predicted: {count}  mean NLL: {mean:.6}  perplexity: {:.4}  ({:.1}s)",
            tokens.len(),
            mean.exp(),
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

fn cmd_list() {
    for m in registry::KNOWN_MODELS {
        let state = match registry::installed(m.name) {
            Some(p) => format!("pulled: {}", p.display()),
            None => "not pulled".to_string(),
        };
        let default = if m.name == registry::DEFAULT_MODEL {
            " (default)"
        } else {
            ""
        };
        println!(
            "{:14} {}{default}\n{:14} {state}",
            m.name, m.description, ""
        );
    }
}

fn run(cli: Cli) -> Result<(), Error> {
    match cli.cmd {
        Cmd::Run(a) => cmd_run(a),
        Cmd::Chat(a) => cmd_chat(a),
        Cmd::Serve(a) => serve::run(a),
        Cmd::Tokenize(a) => cmd_tokenize(a),
        Cmd::Info { model } => cmd_info(&model),
        Cmd::Perplexity(a) => cmd_perplexity(a),
        Cmd::Pull { name } => {
            let m = registry::find(&name).ok_or_else(|| {
                Error::usage(format!(
                    "unknown model {name:?} (known: {})",
                    registry::KNOWN_MODELS
                        .iter()
                        .map(|m| m.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
            pull::pull(m).map(|_| ())
        }
        Cmd::List => {
            cmd_list();
            Ok(())
        }
        Cmd::Bench(a) => bench::run(a),
        Cmd::SonaBench(a) => sona_bench::run(a),
        Cmd::Sona(a) => sona_cmd::run(a),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// The KV cache that `--kv-type`, `--kv-type-k`, `--kv-type-v` and `--kv-tail` ask for.
pub(crate) struct KvChoice {
    /// `--kv-type` (with a tail: the cold tier's type).
    pub ty: ruvllm_model::KvType,
    /// The keys' type: `ty` unless `--kv-type-k` names another.
    pub k: ruvllm_model::KvType,
    /// The values' type: `ty` unless `--kv-type-v` names another.
    pub v: ruvllm_model::KvType,
    /// The two-tier tail in tokens: `--kv-tail N` as given (`0`: none, every position stored
    /// as `ty`), else the type's default ([`KvType::default_tail`](ruvllm_model::KvType::default_tail):
    /// 32 for q4_0), and none when keys and values take separate types.
    pub tail: Option<usize>,
}

/// Parses the KV flags (see [`KvChoice`]); usage errors for unknown types, a tail without a
/// quantized `--kv-type`, and a tail with separate key/value types.
pub(crate) fn kv_choice(
    ty: &str,
    k: Option<&str>,
    v: Option<&str>,
    tail: Option<usize>,
) -> Result<KvChoice, Error> {
    let parse = |flag: &str, s: &str| {
        ruvllm_model::KvType::parse(s).ok_or_else(|| {
            Error::usage(format!("{flag} must be f16, q8_0, q4_0 or f32, got {s:?}"))
        })
    };
    let ty = parse("--kv-type", ty)?;
    let or_ty = |flag: &str, s: Option<&str>| s.map_or(Ok(ty), |s| parse(flag, s));
    let (k_ty, v_ty) = (or_ty("--kv-type-k", k)?, or_ty("--kv-type-v", v)?);
    let split = k.is_some() || v.is_some();
    let tail = match tail {
        Some(0) => None,
        Some(_) if split => {
            return Err(Error::usage(
                "--kv-type-k/--kv-type-v do not combine with --kv-tail",
            ))
        }
        Some(_) if !ty.is_quantized() => {
            return Err(Error::usage(
                "--kv-tail needs a quantized --kv-type for the cold tier (q8_0 or q4_0)",
            ))
        }
        Some(t) => Some(t),
        None if split => None,
        None => ty.default_tail(),
    };
    Ok(KvChoice {
        ty,
        k: k_ty,
        v: v_ty,
        tail,
    })
}
