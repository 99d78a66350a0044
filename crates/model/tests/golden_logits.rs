//! Agreement with llama.cpp on the real models (`tests/data/*.json`, see its README):
//! teacher-forced top-1 agreement and top-5 logit error, perplexity, and greedy generation up to
//! the first near-tie. The tolerances are the ones the reference's own self-disagreement allows.

use ruvllm_kernels::ops::token_nll;
use ruvllm_kernels::pool::ThreadPool;
use ruvllm_model::{
    generate, registry, AttnKernel, GenerateParams, KvType, Logits, Model, Runner, SamplingParams,
};
use ruvllm_tokenizer::Tokenizer;
use std::path::PathBuf;
use std::sync::Arc;

fn golden(file: &str) -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data")
        .join(file);
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

struct Stats {
    positions: usize,
    top1_agree: usize,
    abs_diff_sum: f64,
    abs_diff_n: usize,
    /// Top-1 disagreements where the reference's top-1/top-2 gap is ≥ 0.5 (not a near-tie).
    far_flips: usize,
}

fn teacher_force(
    model: &Model,
    pool: &Arc<ThreadPool>,
    g: &serde_json::Value,
    kernel: AttnKernel,
) -> Stats {
    let mut st = Stats {
        positions: 0,
        top1_agree: 0,
        abs_diff_sum: 0.0,
        abs_diff_n: 0,
        far_flips: 0,
    };
    for case in g["generate"].as_array().unwrap() {
        let prompt = ids(&case["prompt_ids"]);
        let greedy = ids(&case["greedy_ids"]);
        let top5 = case["top5_at_each_step"].as_array().unwrap();
        let mut seq = prompt.clone();
        seq.extend(&greedy);
        let mut r = Runner::new(model, pool.clone(), seq.len() + 1);
        r.set_attention(kernel);
        // Prompt in one batch (only its last logits matter), then the rest in one batch.
        let nv = model.config.n_vocab;
        let mut all = r.forward(&prompt, Logits::Last).unwrap().to_vec();
        if greedy.len() > 1 {
            all.extend_from_slice(r.forward(&greedy[..greedy.len() - 1], Logits::All).unwrap());
        }
        assert_eq!(top5.len(), greedy.len());
        for (k, ref5) in top5.iter().enumerate() {
            let ours = &all[k * nv..(k + 1) * nv];
            let ref5 = ref5.as_array().unwrap();
            let ref_top = ref5[0][0].as_u64().unwrap() as usize;
            let our_top = ruvllm_model::sampler::argmax(ours) as usize;
            st.positions += 1;
            st.top1_agree += (our_top == ref_top) as usize;
            if our_top != ref_top {
                let gap = ref5[0][1].as_f64().unwrap() - ref5[1][1].as_f64().unwrap();
                st.far_flips += (gap >= 0.5) as usize;
                eprintln!(
                    "  flip at step {k} of {:?}: reference gap {gap:.3}, ours {:.3} vs {:.3}",
                    case["prompt"]
                        .as_str()
                        .unwrap_or("")
                        .chars()
                        .take(20)
                        .collect::<String>(),
                    ours[our_top],
                    ours[ref_top]
                );
            }
            for e in ref5 {
                let id = e[0].as_u64().unwrap() as usize;
                st.abs_diff_sum += (ours[id] as f64 - e[1].as_f64().unwrap()).abs();
                st.abs_diff_n += 1;
            }
        }
    }
    st
}

fn perplexity(
    model: &Model,
    tok: &Tokenizer,
    pool: &Arc<ThreadPool>,
    g: &serde_json::Value,
    kernel: AttnKernel,
) -> (usize, f64) {
    let tokens = tok.encode(g["nll"][0]["text"].as_str().unwrap(), true, false);
    (
        tokens.len(),
        perplexity_with(model, pool, &tokens, KvType::F16, kernel),
    )
}

/// Greedy generation equals the reference up to the first position where the reference's top
/// two logits are within 0.5 of each other.
fn greedy_matches_up_to_near_tie(
    model: &Model,
    tok: &Tokenizer,
    pool: &Arc<ThreadPool>,
    g: &serde_json::Value,
    kernel: AttnKernel,
) {
    for case in g["generate"].as_array().unwrap() {
        let prompt = ids(&case["prompt_ids"]);
        let want = ids(&case["greedy_ids"]);
        let top5 = case["top5_at_each_step"].as_array().unwrap();
        let tie = top5
            .iter()
            .position(|t| t[0][1].as_f64().unwrap() - t[1][1].as_f64().unwrap() < 0.5)
            .unwrap_or(want.len());
        let mut r = Runner::new(model, pool.clone(), prompt.len() + want.len() + 1);
        r.set_attention(kernel);
        let params = GenerateParams {
            max_tokens: Some(want.len()),
            sampling: SamplingParams::greedy(),
            ..Default::default()
        };
        let got = generate(&mut r, tok, &prompt, &params, |_| {}).unwrap();
        let n = tie.min(want.len());
        assert!(
            got.tokens.len() >= n,
            "{:?}: stopped after {} tokens, expected at least {n}",
            case["prompt"],
            got.tokens.len()
        );
        assert_eq!(
            &got.tokens[..n],
            &want[..n],
            "{:?}: diverged before the first near-tie at {tie}",
            case["prompt"]
        );
    }
}

/// One pool for all tests of this binary: tests run in parallel, and two spinning pools on a
/// two-core machine would fight for the cores (the pool runs a second caller serially).
fn shared_pool() -> Arc<ThreadPool> {
    static POOL: std::sync::OnceLock<Arc<ThreadPool>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| Arc::new(ThreadPool::new(2))).clone()
}

fn check(model_name: &str, json: &str, max_mean_abs: f64, kernel: AttnKernel, min_top1: f64) {
    let Some(path) = registry::for_test(model_name) else {
        return;
    };
    let model = Model::load(&path).unwrap();
    let tok = Tokenizer::from_gguf(model.gguf()).unwrap();
    let pool = shared_pool();
    let g = golden(json);

    let st = teacher_force(&model, &pool, &g, kernel);
    let agree = st.top1_agree as f64 / st.positions as f64;
    let mean_abs = st.abs_diff_sum / st.abs_diff_n as f64;
    eprintln!("{model_name} ({kernel:?} attention): top-1 agreement {}/{} = {agree:.4}, mean |Δlogit| over reference top-5 = {mean_abs:.4}", st.top1_agree, st.positions);
    assert!(agree >= min_top1, "top-1 agreement {agree}");
    assert_eq!(st.far_flips, 0, "top-1 flips away from near-ties");
    assert!(
        mean_abs <= max_mean_abs,
        "mean abs logit diff {mean_abs} > {max_mean_abs}"
    );

    let (n, ppl) = perplexity(&model, &tok, &pool, &g, kernel);
    let want_n = g["nll"][0]["n_tokens"].as_u64().unwrap() as usize;
    let want_ppl = g["nll"][0]["perplexity"].as_f64().unwrap();
    eprintln!(
        "{model_name}: perplexity {ppl:.4} vs reference {want_ppl:.4} ({:+.3}%)",
        100.0 * (ppl / want_ppl - 1.0)
    );
    assert_eq!(n, want_n, "perplexity text token count");
    assert!(
        (ppl / want_ppl - 1.0).abs() <= 0.015,
        "perplexity {ppl} vs {want_ppl}"
    );

    greedy_matches_up_to_near_tie(&model, &tok, &pool, &g, kernel);
}

#[test]
fn smollm2_agrees_with_llama_cpp() {
    check(
        "smollm2-135m",
        "smollm2-135m-instruct-q4_1.json",
        0.25,
        AttnKernel::Auto,
        0.97,
    );
}

/// The flash kernel forced on (`--flash-attn on`; by default it runs only for spans over
/// 1,024 positions, which the golden texts do not reach). Its arithmetic is not llama.cpp's
/// `-fa off` (exact probabilities instead of f16-rounded ones, see the kernel test), so
/// near-ties resolve differently: on SmolLM2 9–11 of 220 positions flip, depending only on
/// rounding (tiles of 32, 128 or 256 positions: 210, 209 or 211 of 220; the kernel before its
/// scores took `dot_f32`'s summation order: 213), every flip at a reference gap ≤ 0.39 —
/// which is why short spans keep the two-pass kernel. No flip away from a near-tie, and the
/// other bounds hold.
#[test]
fn smollm2_with_flash_attention_agrees_with_llama_cpp() {
    check(
        "smollm2-135m",
        "smollm2-135m-instruct-q4_1.json",
        0.25,
        AttnKernel::Flash,
        0.95,
    );
}

#[test]
fn gemma3_agrees_with_llama_cpp() {
    check(
        "gemma3-270m",
        "gemma3-270m-q4_k_m.json",
        0.35,
        AttnKernel::Auto,
        0.97,
    );
}

#[test]
fn gemma3_with_flash_attention_agrees_with_llama_cpp() {
    check(
        "gemma3-270m",
        "gemma3-270m-q4_k_m.json",
        0.35,
        AttnKernel::Flash,
        0.97,
    );
}

/// The text the KV-type tests measure perplexity on: the first 9,000 bytes (about 1,900
/// tokens) of the GPL-3 text, committed verbatim in `tests/data`.
///
/// Why not the 150–220-token golden text: on it, perplexity moves by up to 1.2% under a pure
/// change of float summation order (row-interleaved vs ggml-layout kernels, same KV type),
/// because every layer requantizes its activations to int8 and a flipped rounding cascades.
/// That is above the 0.5% the q8_0 check must resolve. Over ~1,900 tokens the same change moves
/// it by at most 0.3%. The golden-text figures are still printed.
fn long_text() -> String {
    let t = include_str!("data/gpl-3.0.txt");
    t[..9000].to_string()
}

/// The registry model `model_name` (None when it is not installed), its tokenizer, the shared
/// pool and [`long_text`]'s tokens.
fn with_long_text(model_name: &str) -> Option<(Model, Tokenizer, Arc<ThreadPool>, Vec<u32>)> {
    let model = Model::load(&registry::for_test(model_name)?).unwrap();
    let tok = Tokenizer::from_gguf(model.gguf()).unwrap();
    let tokens = tok.encode(&long_text(), true, false);
    Some((model, tok, shared_pool(), tokens))
}

fn perplexity_of(model: &Model, pool: &Arc<ThreadPool>, tokens: &[u32], ty: KvType) -> f64 {
    perplexity_with(model, pool, tokens, ty, AttnKernel::Auto)
}

fn perplexity_with(
    model: &Model,
    pool: &Arc<ThreadPool>,
    tokens: &[u32],
    ty: KvType,
    kernel: AttnKernel,
) -> f64 {
    perplexity_kv(model, pool, tokens, ty, ty, kernel)
}

fn perplexity_kv(
    model: &Model,
    pool: &Arc<ThreadPool>,
    tokens: &[u32],
    k_ty: KvType,
    v_ty: KvType,
    kernel: AttnKernel,
) -> f64 {
    let mut r = Runner::with_kv_types(model, pool.clone(), tokens.len(), k_ty, v_ty).unwrap();
    r.set_attention(kernel);
    let logits = r.forward(tokens, Logits::All).unwrap();
    let nv = model.config.n_vocab;
    let mut nll = 0f64;
    for i in 0..tokens.len() - 1 {
        nll += token_nll(&logits[i * nv..(i + 1) * nv], tokens[i + 1] as usize);
    }
    (nll / (tokens.len() - 1) as f64).exp()
}

/// Quantized KV caches keep perplexity within 0.5% (q8_0, and f32) of the f16 cache, q4_0
/// within `q4_limit`, and q8_0 keys with q4_0 values within 3%, measured on [`long_text`].
///
/// NOTE: q4_0 here is the whole cache in 4 bits (`--kv-tail 0`), which misses issue 4's 3% on
/// these small models (+5.2% SmolLM2, +11.7% Gemma-3 on the long text, with Hadamard-rotated
/// heads; llama.cpp's own q4_0 cache: +7.6% / +13.2%). The newest 4-bit keys are what costs:
/// `--kv-type q4_0` by default keeps a 32-token f16 tail and meets 3%
/// ([`default_kv_types_keep_perplexity`]), as do q8_0 keys with q4_0 values (below). The
/// whole-cache q4_0 bounds pin today's quality so a regression fails.
fn kv_types_keep_perplexity(model_name: &str, json: &str, q4_limit: f64) {
    let Some((model, tok, pool, tokens)) = with_long_text(model_name) else {
        return;
    };
    let g = golden(json);
    let golden_tokens = tok.encode(g["nll"][0]["text"].as_str().unwrap(), true, false);
    assert!(tokens.len() > 1500, "{}", tokens.len());
    let base = perplexity_of(&model, &pool, &tokens, KvType::F16);
    let golden_base = perplexity_of(&model, &pool, &golden_tokens, KvType::F16);
    for (k_ty, v_ty, limit) in [
        (KvType::F32, KvType::F32, 0.005),
        (KvType::Q8_0, KvType::Q8_0, 0.005),
        (KvType::Q4_0, KvType::Q4_0, q4_limit),
        (KvType::Q8_0, KvType::Q4_0, 0.03),
    ] {
        let auto = AttnKernel::Auto;
        let ppl = perplexity_kv(&model, &pool, &tokens, k_ty, v_ty, auto);
        let rel = ppl / base - 1.0;
        let gp = perplexity_kv(&model, &pool, &golden_tokens, k_ty, v_ty, auto);
        let c = &model.config;
        eprintln!(
            "{model_name}: kv K {} V {}: perplexity {ppl:.4} vs f16 {base:.4} ({:+.3}%) over {} tokens; golden text {gp:.4} vs {golden_base:.4} ({:+.3}%); {} bytes/token",
            k_ty.name(),
            v_ty.name(),
            100.0 * rel,
            tokens.len(),
            100.0 * (gp / golden_base - 1.0),
            KvType::pair_bytes_per_token(k_ty, v_ty, c.n_layer, c.kv_dim())
        );
        assert!(
            rel.abs() <= limit,
            "{model_name} kv K {} V {}: perplexity {ppl} vs f16 {base}",
            k_ty.name(),
            v_ty.name()
        );
    }
}

#[test]
fn smollm2_kv_types_keep_perplexity() {
    kv_types_keep_perplexity("smollm2-135m", "smollm2-135m-instruct-q4_1.json", 0.06);
}

#[test]
fn gemma3_kv_types_keep_perplexity() {
    kv_types_keep_perplexity("gemma3-270m", "gemma3-270m-q4_k_m.json", 0.13);
}

/// Two-tier KV (the newest `tail` tokens in f16, older whole blocks moved to a quantized tier,
/// as `serve` does): [`long_text`] fed 16 tokens a step through [`Runner::with_kv_tail`] (so
/// every position sees the tier it would see decoding one token at a time: the blocks move
/// at block boundaries) keeps perplexity within `limit` of the all-f16 cache.
fn two_tier_keeps_perplexity(model_name: &str, cold_ty: KvType, tail: usize, limit: f64) {
    let Some((model, _, pool, tokens)) = with_long_text(model_name) else {
        return;
    };
    let base = perplexity_of(&model, &pool, &tokens, KvType::F16);
    let mut r =
        Runner::with_kv_tail(&model, pool.clone(), tokens.len(), cold_ty, tail, 16).unwrap();
    let nv = model.config.n_vocab;
    let mut nll = 0f64;
    for (ci, chunk) in tokens.chunks(16).enumerate() {
        let logits = r.forward(chunk, Logits::All).unwrap();
        for (j, l) in logits.chunks(nv).enumerate() {
            let p = ci * 16 + j;
            if p + 1 < tokens.len() {
                nll += token_nll(l, tokens[p + 1] as usize);
            }
        }
    }
    let ppl = (nll / (tokens.len() - 1) as f64).exp();
    let rel = ppl / base - 1.0;
    eprintln!(
        "{model_name}: two-tier (f16 tail {tail}, {} cold): perplexity {ppl:.4} vs f16 {base:.4} ({:+.3}%) over {} tokens",
        cold_ty.name(),
        100.0 * rel,
        tokens.len()
    );
    assert!(
        rel.abs() <= limit,
        "{model_name}: two-tier {} tail {tail}: perplexity {ppl} vs f16 {base}",
        cold_ty.name()
    );
}

/// What `--kv-type q8_0` and `--kv-type q4_0` run by default: q8_0 whole-cache within 0.5%
/// (in [`kv_types_keep_perplexity`]); q4_0 with its default f16 tail within issue 4's 3%;
/// a q8_0 cold tier under the same tail within 0.5%.
fn default_kv_types_keep_perplexity(model_name: &str) {
    let tail = KvType::Q4_0.default_tail().expect("q4_0 keeps a tail");
    assert_eq!(KvType::Q8_0.default_tail(), None);
    two_tier_keeps_perplexity(model_name, KvType::Q4_0, tail, 0.03);
    two_tier_keeps_perplexity(model_name, KvType::Q8_0, tail, 0.005);
}

#[test]
fn smollm2_two_tier_kv_keeps_perplexity() {
    default_kv_types_keep_perplexity("smollm2-135m");
    two_tier_keeps_perplexity("smollm2-135m", KvType::Q4_0, 16, 0.03);
}

#[test]
fn gemma3_two_tier_kv_keeps_perplexity() {
    default_kv_types_keep_perplexity("gemma3-270m");
    two_tier_keeps_perplexity("gemma3-270m", KvType::Q4_0, 16, 0.03);
}

/// Truncating a two-tier runner (the chat REPL's edits) points blocks back at their f16 rows:
/// the logits after a truncate-and-refeed equal a fresh runner's, bit for bit.
#[test]
fn two_tier_runner_truncates_to_a_fresh_state() {
    let Some((model, _, pool, tokens)) = with_long_text("smollm2-135m") else {
        return;
    };
    let (tokens, nv) = (&tokens[..200], model.config.n_vocab);
    // Rows depend on the tiers their step saw, so the fresh runner takes the same steps to 130.
    let mut fresh = Runner::with_kv_tail(&model, pool.clone(), 256, KvType::Q4_0, 32, 16).unwrap();
    for c in [0..40, 40..80, 80..120, 120..130] {
        fresh.forward(&tokens[c], Logits::None).unwrap();
    }
    let want = fresh
        .forward(&tokens[130..150], Logits::Last)
        .unwrap()
        .to_vec();
    let mut r = Runner::with_kv_tail(&model, pool.clone(), 256, KvType::Q4_0, 32, 16).unwrap();
    for c in tokens.chunks(40) {
        r.forward(c, Logits::None).unwrap();
    }
    r.truncate(130);
    let got = r.forward(&tokens[130..150], Logits::Last).unwrap();
    assert_eq!(got.len(), nv);
    assert!(want
        .iter()
        .zip(got)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    // The old blocks were read from the q4_0 tier: an all-f16 runner's logits differ.
    let mut f16 = Runner::new(&model, pool.clone(), 256);
    f16.forward(&tokens[..130], Logits::None).unwrap();
    let other = f16.forward(&tokens[130..150], Logits::Last).unwrap();
    assert!(want
        .iter()
        .zip(other)
        .any(|(a, b)| a.to_bits() != b.to_bits()));
    // Too short a tail, or an unquantized cold tier, is refused.
    assert!(Runner::with_kv_tail(&model, pool.clone(), 256, KvType::Q4_0, 8, 16).is_err());
    assert!(Runner::with_kv_tail(&model, pool, 256, KvType::F16, 32, 16).is_err());
}

/// The flash kernel (online softmax over tiles of keys and values) against the two-pass kernel
/// over [`long_text`] — prefilled in one batch, then its last 48 tokens decoded one at a time
/// (the f16 rows read in place). The kernels differ by rounding only (the kernel test: flash
/// within 6e-7 of an f64 reference, two-pass 2.5e-4), but these quantized models re-quantize
/// activations to 8 bits before every matmul and amplify any rounding change: two-pass without
/// its f16 probabilities moves as far from itself. So the bounds are the golden README's for a
/// correct engine (mean |Δ| of the top-5 logits ≤ 0.25 / 0.35), argmax flips only where the
/// top-1/top-2 gap is below llama.cpp's own largest self-disagreement (`tie_gap`: 0.722 /
/// 1.154), and perplexity within 0.3% (what a pure change of summation order moved it by on
/// this text, see [`long_text`]). Measured: mean 0.150 / 0.202, 88 / 103 flips of ~1,940
/// positions (largest gaps 0.59 / 0.86), perplexity −0.11% / −0.12%.
fn flash_matches_two_pass(model_name: &str, mean_limit: f64, tie_gap: f32) {
    let Some((model, _, pool, tokens)) = with_long_text(model_name) else {
        return;
    };
    let nv = model.config.n_vocab;
    let split = tokens.len() - 48;
    let run = |k: AttnKernel| {
        let mut r = Runner::with_kv_type(&model, pool.clone(), tokens.len(), KvType::F16).unwrap();
        r.set_attention(k);
        let mut logits = r.forward(&tokens[..split], Logits::All).unwrap().to_vec();
        for t in &tokens[split..] {
            logits.extend_from_slice(r.forward(&[*t], Logits::Last).unwrap());
        }
        logits
    };
    let (two, flash) = (run(AttnKernel::TwoPass), run(AttnKernel::Flash));
    let (mut sum, mut n, mut flips, mut bad_flips, mut nll_two, mut nll_flash) =
        (0f64, 0usize, 0, 0, 0f64, 0f64);
    for (p, (a, b)) in two.chunks(nv).zip(flash.chunks(nv)).enumerate() {
        let mut idx: Vec<usize> = (0..nv).collect();
        idx.sort_unstable_by(|&x, &y| a[y].total_cmp(&a[x]));
        for &i in &idx[..5] {
            sum += (a[i] - b[i]).abs() as f64;
            n += 1;
        }
        let top_b = (0..nv).fold(0, |m, i| if b[i] > b[m] { i } else { m });
        if top_b != idx[0] {
            flips += 1;
            bad_flips += (a[idx[0]] - a[idx[1]] >= tie_gap) as usize;
        }
        if p + 1 < tokens.len() {
            nll_two += token_nll(a, tokens[p + 1] as usize);
            nll_flash += token_nll(b, tokens[p + 1] as usize);
        }
    }
    let (mean, rel) = (sum / n as f64, (nll_flash - nll_two) / nll_two);
    eprintln!("{model_name}: flash vs two-pass over {} positions: mean |Δ| of top-5 logits {mean:.4}, argmax flips {flips} ({bad_flips} at a gap ≥ {tie_gap}), mean NLL {:+.4}%", tokens.len(), 100.0 * rel);
    assert!(
        mean <= mean_limit,
        "{model_name}: mean top-5 logit difference {mean}"
    );
    assert_eq!(
        bad_flips, 0,
        "{model_name}: argmax flips away from near-ties"
    );
    assert!(rel.abs() < 3e-3, "{model_name}: mean NLL moved {rel}");
}

#[test]
fn smollm2_flash_attention_matches_two_pass() {
    flash_matches_two_pass("smollm2-135m", 0.25, 0.722);
}

#[test]
fn gemma3_flash_attention_matches_two_pass() {
    flash_matches_two_pass("gemma3-270m", 0.35, 1.154);
}
