//! Element-wise and normalization operators used by the forward pass.

/// RMSNorm: `out = x / sqrt(mean(x²) + eps) * w` (ggml `rms_norm` followed by `mul`).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let mut sum = 0f64;
    for &v in x {
        sum += (v * v) as f64;
    }
    let scale = 1.0 / ((sum / x.len() as f64) as f32 + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * scale * g;
    }
}

/// RMSNorm in place.
pub fn rms_norm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    let mut sum = 0f64;
    for &v in x.iter() {
        sum += (v * v) as f64;
    }
    let scale = 1.0 / ((sum / x.len() as f64) as f32 + eps).sqrt();
    for (v, &g) in x.iter_mut().zip(w) {
        *v = *v * scale * g;
    }
}

/// How RoPE pairs the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs `(2i, 2i+1)` (ggml `LLAMA_ROPE_TYPE_NORM`, the llama arch after conversion).
    Normal,
    /// Split halves `(i, i + d/2)` (ggml `LLAMA_ROPE_TYPE_NEOX`, Gemma, Qwen2).
    Neox,
}

/// Fills `cs` with `(cos, sin)` for `n_dims / 2` frequency pairs at `pos`, the way ggml does:
/// `theta_i = pos · freq_scale · base^(-2i/n_dims) / factor_i`, the base part computed by repeated
/// multiplication in f32; `factors` are per-pair frequency factors (Llama 3.1 `rope_freqs`).
pub fn rope_cache(
    pos: usize,
    n_dims: usize,
    base: f32,
    freq_scale: f32,
    factors: Option<&[f32]>,
    cs: &mut [(f32, f32)],
) {
    let theta_scale = base.powf(-2.0 / n_dims as f32);
    let mut theta = pos as f32 * freq_scale;
    for (j, c) in cs.iter_mut().take(n_dims / 2).enumerate() {
        let t = factors.map_or(theta, |f| theta / f[j]);
        *c = (t.cos(), t.sin());
        theta *= theta_scale;
    }
}

/// Multiplies `x` in place by the normalized Walsh–Hadamard matrix H/√n (n a power of two):
/// an orthogonal, symmetric rotation, so applying it twice is the identity and it preserves dot
/// products. Quantized KV caches store rotated keys and values: the rotation spreads a head's
/// outlier channels over all of them, so 4-bit blocks lose far less (as in QuaRot).
pub fn hadamard(x: &mut [f32]) {
    let n = x.len();
    debug_assert!(n.is_power_of_two());
    let mut h = 1;
    while h < n {
        for i in (0..n).step_by(2 * h) {
            for j in i..i + h {
                let (a, b) = (x[j], x[j + h]);
                x[j] = a + b;
                x[j + h] = a - b;
            }
        }
        h *= 2;
    }
    let s = 1.0 / (n as f32).sqrt();
    x.iter_mut().for_each(|v| *v *= s);
}

/// Rotates one head vector in place with a precomputed cache from [`rope_cache`].
pub fn rope_apply(x: &mut [f32], cs: &[(f32, f32)], n_dims: usize, style: RopeStyle) {
    match style {
        RopeStyle::Normal => {
            for i in 0..n_dims / 2 {
                let (c, s) = cs[i];
                let (a, b) = (x[2 * i], x[2 * i + 1]);
                x[2 * i] = a * c - b * s;
                x[2 * i + 1] = a * s + b * c;
            }
        }
        RopeStyle::Neox => {
            let h = n_dims / 2;
            for i in 0..h {
                let (c, s) = cs[i];
                let (a, b) = (x[i], x[i + h]);
                x[i] = a * c - b * s;
                x[i + h] = a * s + b * c;
            }
        }
    }
}

/// SiLU: `x · σ(x)`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// GELU, tanh approximation (ggml `gelu`).
#[inline]
pub fn gelu(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    const COEF_A: f32 = 0.044715;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + COEF_A * x * x)).tanh())
}

/// `gate[i] = silu(gate[i]) * up[i]` (SwiGLU).
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    // silu(g)·u = g / (1 + e^−g) · u, with the exponentials of a chunk at a time from
    // [`exp_in_place`] (libm's bits, so this equals the scalar formula exactly).
    const CHUNK: usize = 64;
    let mut e = [0f32; CHUNK];
    for (gs, us) in gate.chunks_mut(CHUNK).zip(up.chunks(CHUNK)) {
        let e = &mut e[..gs.len()];
        e.iter_mut().zip(gs.iter()).for_each(|(e, &g)| *e = -g);
        exp_in_place(e);
        for ((g, &u), &e) in gs.iter_mut().zip(us).zip(e.iter()) {
            *g = *g / (1.0 + e) * u;
        }
    }
}

/// GELU of every f16 value, stored as f16 (ggml's `ggml_table_gelu_f16`).
fn gelu_table() -> &'static [half::f16] {
    static T: std::sync::OnceLock<Vec<half::f16>> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        (0..=u16::MAX)
            .map(|b| half::f16::from_f32(gelu(half::f16::from_bits(b).to_f32())))
            .collect()
    })
}

/// `gate[i] = gelu(gate[i]) * up[i]` (GeGLU), computed as ggml does with `GGML_GELU_FP16` (its
/// default): 0 below −10, identity above 10, otherwise a lookup of the f16-rounded input in a
/// table of f16 GELU values. Faster than `tanh`, and the same numbers as llama.cpp.
pub fn geglu(gate: &mut [f32], up: &[f32]) {
    let t = gelu_table();
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        let y = if x <= -10.0 {
            0.0
        } else if x >= 10.0 {
            x
        } else {
            t[half::f16::from_f32(x).to_bits() as usize].to_f32()
        };
        *g = y * u;
    }
}

/// Numerically stable softmax in place.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `−ln softmax(logits)[target]`, in f64 (max-shifted log-sum-exp): a token's negative
/// log-likelihood, what perplexity and answer NLL are averaged from.
pub fn token_nll(logits: &[f32], target: usize) -> f64 {
    let mx = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let lse = mx
        + logits
            .iter()
            .map(|&v| (v as f64 - mx).exp())
            .sum::<f64>()
            .ln();
    lse - logits[target] as f64
}

/// A row of logits summarized: what greedy decoding picks and its log-partition function.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogitStats {
    /// Index of the first largest value (the greedy token).
    pub argmax: usize,
    /// The largest value.
    pub max: f32,
    /// `ln Σ exp(x[i])`.
    pub lse: f64,
}

/// [`LogitStats`] of `x` (non-empty, no NaN) in three vector passes: max, `Σ exp(x − max)` with
/// a polynomial `exp` in f32 lanes (relative error ≤ 2e-7 per term), and the max's first
/// position. Tens of microseconds for a 49k vocabulary where [`token_nll`]'s f64 `exp` takes
/// a quarter of a millisecond; for checks run many times per feedback event.
pub fn logit_stats(x: &[f32]) -> LogitStats {
    let k = f32_kernels();
    let max = (k.max)(x);
    let sum = (k.sum_exp)(x, max);
    let argmax = first_equal(x, max).unwrap_or(0);
    LogitStats {
        argmax,
        max,
        lse: max as f64 + (sum as f64).ln(),
    }
}

/// The first position of `v` in `x`: blocks of 64 without it are passed over with one vector
/// compare each (a plain `position` compares one value at a time).
fn first_equal(x: &[f32], v: f32) -> Option<usize> {
    x.chunks(64)
        .enumerate()
        .find(|(_, b)| b.iter().fold(false, |any, &y| any | (y == v)))
        .and_then(|(c, b)| b.iter().position(|&y| y == v).map(|i| c * 64 + i))
}

/// `ln softmax(logits)[target]` with [`logit_stats`]'s log-sum-exp, rounded to f32 (−∞ for a
/// target outside the row): a token's log-probability as the engine records it for every
/// generated token it keeps and as a learner scores rows by — one definition, so a rating
/// picks the same rows from served and recomputed logits.
pub fn token_logprob(logits: &[f32], target: usize) -> f32 {
    let l = logits.get(target).copied().unwrap_or(f32::NEG_INFINITY);
    (l as f64 - logit_stats(logits).lse) as f32
}

/// `Σ x[i]` accumulated in f64 (softmax normalizers): eight partial sums, lane `l` taking the
/// elements `l, l + 8, …`, then added pairwise. A single f64 running sum is a chain of
/// dependent adds (four cycles an element); eight independent ones vectorize. For sums of
/// positive f32 values either order is exact to well below an f32 ulp.
pub fn sum_f64(x: &[f32]) -> f64 {
    sum_lanes_f64(x, |v| v as f64)
}

/// `Σ f(x[i])` in eight f64 partial sums, lane `l` taking `l, l + 8, …`, added pairwise.
#[inline]
fn sum_lanes_f64(x: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            acc[l] += f(c[l]);
        }
    }
    for (l, &v) in tail.iter().enumerate() {
        acc[l] += f(v);
    }
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
}

/// `Σ x[i]²` in f64, in [`sum_f64`]'s order (eight partial sums, added pairwise): the mean
/// squares of RMS norms without a chain of dependent adds.
pub fn sum_sq_f64(x: &[f32]) -> f64 {
    sum_lanes_f64(x, |v| v as f64 * v as f64)
}

/// The largest value of `x` (no NaN; −∞ when empty): [`logit_stats`]'s vector max pass, for
/// greedy sampling.
pub fn max_f32(x: &[f32]) -> f32 {
    (f32_kernels().max)(x)
}

/// Whether every value of `x` is finite (no NaN, no ±∞): checked on each logits row before a
/// token is sampled from it, so a vector pass (an f64 sum of each row cost 16-stream decode
/// ~4% in an alternating bench).
pub fn all_finite(x: &[f32]) -> bool {
    (f32_kernels().all_finite)(x)
}

/// The scalar twin of [`all_finite`].
pub fn all_finite_scalar(x: &[f32]) -> bool {
    x.iter().all(|v| v.is_finite())
}

/// The scalar twin of the max pass of [`logit_stats`].
pub fn max_f32_scalar(x: &[f32]) -> f32 {
    x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// The scalar twin of the `Σ exp(x[i] − shift)` pass of [`logit_stats`]: the same polynomial
/// per term (eight partial sums, as the vector lanes).
pub fn sum_exp_scalar(x: &[f32], shift: f32) -> f32 {
    let mut acc = [0f32; 8];
    for (i, &v) in x.iter().enumerate() {
        acc[i % 8] += exp_poly(v - shift);
    }
    acc.iter().sum()
}

/// Cephes' `expf` scheme: `e^x = 2^n · e^r` with `n = round(x·log2 e)`, `|r| ≤ ln2/2` and a
/// degree-6 polynomial for `e^r`; `x` clamped to ±87.3 (the result then saturates rather than
/// overflowing to ∞ or flushing to a denormal).
#[inline]
fn exp_poly(x: f32) -> f32 {
    let x = x.clamp(-EXP_CLAMP, EXP_CLAMP);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = x - n * LN2_HI - n * LN2_LO;
    let p =
        ((((EXP_P[0] * r + EXP_P[1]) * r + EXP_P[2]) * r + EXP_P[3]) * r + EXP_P[4]) * r + EXP_P[5];
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

const EXP_CLAMP: f32 = 87.3;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const EXP_P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// `Σ a[i]·b[i]` in f32 (AVX2/FMA when the tier allows, chosen once).
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    (f32_kernels().dot)(a, b)
}

/// `y += alpha · x` (AVX2/FMA when the tier allows).
#[inline]
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    (f32_kernels().axpy)(alpha, x, y)
}

/// The scalar twin of [`dot_f32`].
pub fn dot_f32_scalar(a: &[f32], b: &[f32]) -> f32 {
    // Eight accumulators let the compiler vectorize without reassociating a single sum.
    let mut acc = [0f32; 8];
    let chunks = a.len().min(b.len()) / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[8 * c + l] * b[8 * c + l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..a.len().min(b.len()) {
        s += a[i] * b[i];
    }
    s
}

/// The scalar twin of [`axpy`].
pub fn axpy_scalar(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

/// Widens f16 values to f32 (`dst.len()` of them; F16C when the tier allows). Exact: every f16
/// is an f32.
#[inline]
pub fn f16_to_f32(src: &[half::f16], dst: &mut [f32]) {
    (f32_kernels().f16_to_f32)(src, dst)
}

/// The scalar twin of [`f16_to_f32`].
pub fn f16_to_f32_scalar(src: &[half::f16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

/// Narrows f32 values to f16 (`dst.len()` of them; F16C when the tier allows), rounding to
/// nearest even as `half::f16::from_f32` does, bit for bit.
#[inline]
pub fn f32_to_f16(src: &[f32], dst: &mut [half::f16]) {
    (f32_kernels().f32_to_f16)(src, dst)
}

/// The scalar twin of [`f32_to_f16`].
pub fn f32_to_f16_scalar(src: &[f32], dst: &mut [half::f16]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = half::f16::from_f32(*s);
    }
}

/// Decodes `dst.len() / 32` blocks of ggml's `q8_0` (an f16 scale `d`, then 32 signed bytes `q`:
/// `d·q`) from `src`, the blocks' bytes as little-endian 16-bit words (17 a block), as a
/// quantized KV cache stores its rows: read for every query of every step, so vectorized. Each
/// value is exact (an 8-bit integer times an f16 fits f32's mantissa), hence the same as
/// [`crate::quants::dequantize_row`]'s on the bytes.
///
/// # Panics
/// If `dst.len()` is not a multiple of 32 or `src` holds fewer than `dst.len() / 32 · 17` words.
pub fn dequant_q8_0(src: &[u16], dst: &mut [f32]) {
    check_blocks(src.len(), dst.len(), 17);
    (f32_kernels().dequant_q8_0)(src, dst)
}

/// [`dequant_q8_0`] for ggml's `q4_0` (an f16 scale, then 16 bytes: value `i < 16` in the low
/// nibble of byte `i`, value `i + 16` in its high nibble, each `d·(nibble − 8)`; 9 words a
/// block).
///
/// # Panics
/// As [`dequant_q8_0`], with 9 words a block.
pub fn dequant_q4_0(src: &[u16], dst: &mut [f32]) {
    check_blocks(src.len(), dst.len(), 9);
    (f32_kernels().dequant_q4_0)(src, dst)
}

fn check_blocks(src: usize, dst: usize, block_words: usize) {
    assert!(
        dst % 32 == 0 && src >= dst / 32 * block_words,
        "dequantizing {dst} values from {src} words ({block_words} a block)"
    );
}

/// A block's bytes from its little-endian words (the scalar twins' view of the layout).
fn block_bytes(words: &[u16]) -> impl Iterator<Item = u8> + '_ {
    words.iter().flat_map(|w| w.to_le_bytes())
}

/// The scalar twin of [`dequant_q8_0`].
pub fn dequant_q8_0_scalar(src: &[u16], dst: &mut [f32]) {
    for (y, b) in dst.chunks_exact_mut(32).zip(src.chunks_exact(17)) {
        let d = half::f16::from_bits(b[0]).to_f32();
        for (y, q) in y.iter_mut().zip(block_bytes(&b[1..])) {
            *y = q as i8 as f32 * d;
        }
    }
}

/// The scalar twin of [`dequant_q4_0`].
pub fn dequant_q4_0_scalar(src: &[u16], dst: &mut [f32]) {
    for (y, b) in dst.chunks_exact_mut(32).zip(src.chunks_exact(9)) {
        let d = half::f16::from_bits(b[0]).to_f32();
        for (j, q) in block_bytes(&b[1..]).enumerate() {
            y[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
            y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
        }
    }
}

/// `e^x` of every value in place, bit for bit what `f32::exp` returns on this platform's glibc
/// (2.28 and later: `expf` from ARM's optimized-routines): 2^(k/32) from a 32-entry table times
/// a cubic, in double precision, rounded to f32 once. The AVX-512 tier runs that algorithm on
/// eight lanes (four values per cycle instead of one per ~15); values of magnitude ≥ 88, where
/// `expf` takes its overflow/underflow paths, go to `f32::exp` itself. The softmax and SiLU
/// use it so that vectorizing them changes no result.
#[inline]
pub fn exp_in_place(x: &mut [f32]) {
    (f32_kernels().exp)(x)
}

/// The scalar twin of [`exp_in_place`]: `f32::exp` per value.
pub fn exp_scalar(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = v.exp();
    }
}

/// The constants of glibc's `expf` (`__exp2f_data`, N = 32): `2^(i/32)` as f64 bits minus
/// `i << 47` (so that adding `k << 47` scales by `2^(k/32)`), `32/ln 2`, the cubic's
/// coefficients scaled by `1/32^j`, and the rounding shift `1.5·2^52`.
mod expf_data {
    pub(super) const TAB: [u64; 32] = [
        0x3ff0000000000000,
        0x3fefd9b0d3158574,
        0x3fefb5586cf9890f,
        0x3fef9301d0125b51,
        0x3fef72b83c7d517b,
        0x3fef54873168b9aa,
        0x3fef387a6e756238,
        0x3fef1e9df51fdee1,
        0x3fef06fe0a31b715,
        0x3feef1a7373aa9cb,
        0x3feedea64c123422,
        0x3feece086061892d,
        0x3feebfdad5362a27,
        0x3feeb42b569d4f82,
        0x3feeab07dd485429,
        0x3feea47eb03a5585,
        0x3feea09e667f3bcd,
        0x3fee9f75e8ec5f74,
        0x3feea11473eb0187,
        0x3feea589994cce13,
        0x3feeace5422aa0db,
        0x3feeb737b0cdc5e5,
        0x3feec49182a3f090,
        0x3feed503b23e255d,
        0x3feee89f995ad3ad,
        0x3feeff76f2fb5e47,
        0x3fef199bdd85529c,
        0x3fef3720dcef9069,
        0x3fef5818dcfba487,
        0x3fef7c97337b9b5f,
        0x3fefa4afa2a490da,
        0x3fefd0765b6e4540,
    ];
    /// 32 / ln 2 (0x1.71547652b82fep+5).
    pub(super) const INV_LN2_N: f64 = f64::from_bits(0x40471547652b82fe);
    /// The cubic `C0·r³ + C1·r² + C2·r + 1` (2^(r/32)): 0x1.c6af84b912394p-20,
    /// 0x1.ebfce50fac4f3p-13, 0x1.62e42ff0c52d6p-6.
    pub(super) const C: [f64; 3] = [
        f64::from_bits(0x3ebc6af84b912394),
        f64::from_bits(0x3f2ebfce50fac4f3),
        f64::from_bits(0x3f962e42ff0c52d6),
    ];
    /// Adding it rounds a double to an integer held in the low mantissa bits (0x1.8p+52).
    pub(super) const SHIFT: f64 = f64::from_bits(0x4338000000000000);
    /// `expf`'s fast path: |x| < 88 (the top 12 bits of |x| below those of 88.0).
    pub(super) const TOP12_88: u32 = 0x42b;
}

/// Rounds every value to the nearest f16 in place (`f16::from_f32(x).to_f32()`, bit for bit):
/// what llama.cpp's f16 K·Q and f16 probabilities do to queries and attention weights.
#[inline]
pub fn round_f16(x: &mut [f32]) {
    (f32_kernels().round_f16)(x)
}

/// The scalar twin of [`round_f16`].
pub fn round_f16_scalar(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = half::f16::from_f32(*v).to_f32();
    }
}

/// `out[p] = q · rows[p·stride .. p·stride + q.len()]` for every `p < out.len()`: one query
/// against a tile of keys (attention scores), eight rows per step with one transposing
/// reduction instead of a horizontal sum per row.
///
/// # Panics
/// If `rows` is shorter than `(out.len() − 1)·stride + q.len()` or `stride < q.len()`.
#[inline]
pub fn dot_rows(q: &[f32], rows: &[f32], stride: usize, out: &mut [f32]) {
    check_rows(q.len(), rows.len(), stride, out.len());
    (f32_kernels().dot_rows)(q, rows, stride, out)
}

/// `acc += Σ_p w[p] · rows[p·stride .. p·stride + acc.len()]`: a tile of values weighted by
/// attention probabilities, the accumulator kept in registers across the tile.
///
/// # Panics
/// As [`dot_rows`], with `acc` for `q` and `w` for `out`.
#[inline]
pub fn weighted_sum(w: &[f32], rows: &[f32], stride: usize, acc: &mut [f32]) {
    check_rows(acc.len(), rows.len(), stride, w.len());
    (f32_kernels().weighted_sum)(w, rows, stride, acc)
}

/// Query heads the multi-head kernels take at most (a GQA group handled together).
pub const MAX_HEADS: usize = 8;

/// [`dot_rows`] on f16 rows (a KV cache's keys, read in place) for several query heads sharing
/// them (a GQA group): `q` holds `n = q.len() / d` heads of `d` values and
/// `out[j·out_stride + p] = q_j · f32(rows_p)` for `p < m`, each with exactly [`dot_f32`]'s
/// arithmetic (the value of widening the row, then `dot_f32`); a row is widened once, in
/// registers, for all heads.
///
/// # Panics
/// If `n` is 0 or above [`MAX_HEADS`], `q.len()` is not `n·d`, `rows` is shorter than
/// `(m − 1)·stride + d`, `stride < d`, or `out` is shorter than `(n − 1)·out_stride + m` with
/// `out_stride < m`.
pub fn dot_rows_f16_heads(
    q: &[f32],
    d: usize,
    rows: &[half::f16],
    stride: usize,
    m: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    check_heads(q.len(), d, rows.len(), stride, m, out.len(), out_stride);
    (f32_kernels().dot_rows_f16_heads)(q, d, rows, stride, m, out, out_stride)
}

/// [`weighted_sum`] on f16 rows (a KV cache's values, read in place) for several query heads
/// sharing them: `acc` holds `n` heads' accumulators of `d` values, `w` their weights
/// (`w[j·w_stride + p]`), and `acc_j += Σ_p w_j[p] · f32(rows_p)` with per element the
/// operations of one [`axpy`] per row in row order; a row is widened once for all heads.
///
/// # Panics
/// As [`dot_rows_f16_heads`], with `acc` for `q` and `w` for `out`.
pub fn weighted_sum_f16_heads(
    w: &[f32],
    w_stride: usize,
    rows: &[half::f16],
    stride: usize,
    m: usize,
    acc: &mut [f32],
    d: usize,
) {
    check_heads(acc.len(), d, rows.len(), stride, m, w.len(), w_stride);
    (f32_kernels().weighted_sum_f16_heads)(w, w_stride, rows, stride, m, acc, d)
}

/// [`dot_rows_f16_heads`] on f32 rows (a prefill's converted copy of the cache, at the cache's
/// row stride): `out[j·out_stride + p] = q_j · rows_p` with exactly [`dot_f32`]'s arithmetic
/// per row and head, a row read once for all heads.
///
/// # Panics
/// As [`dot_rows_f16_heads`].
pub fn dot_rows_f32_heads(
    q: &[f32],
    d: usize,
    rows: &[f32],
    stride: usize,
    m: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    check_heads(q.len(), d, rows.len(), stride, m, out.len(), out_stride);
    (f32_kernels().dot_rows_f32_heads)(q, d, rows, stride, m, out, out_stride)
}

/// [`weighted_sum_f16_heads`] on f32 rows: per element the operations of one [`axpy`] per row
/// in row order, a row read once for all heads.
///
/// # Panics
/// As [`weighted_sum_f16_heads`].
pub fn weighted_sum_f32_heads(
    w: &[f32],
    w_stride: usize,
    rows: &[f32],
    stride: usize,
    m: usize,
    acc: &mut [f32],
    d: usize,
) {
    check_heads(acc.len(), d, rows.len(), stride, m, w.len(), w_stride);
    (f32_kernels().weighted_sum_f32_heads)(w, w_stride, rows, stride, m, acc, d)
}

fn check_heads(
    q_len: usize,
    d: usize,
    have: usize,
    stride: usize,
    m: usize,
    out_len: usize,
    out_stride: usize,
) {
    let n = q_len.checked_div(d).unwrap_or(0);
    assert!(
        (1..=MAX_HEADS).contains(&n) && q_len == n * d,
        "heads: {q_len} values are not 1..={MAX_HEADS} heads of {d}"
    );
    check_rows(d, have, stride, m);
    assert!(
        m == 0 || (out_stride >= m && (n - 1) * out_stride + m <= out_len),
        "heads: {n} × {m} outputs at stride {out_stride} need more than {out_len}"
    );
}

/// The scalar twin of [`dot_rows_f16_heads`] (`R = f16`) and [`dot_rows_f32_heads`]
/// (`R = f32`): each row widened, then [`dot_f32_scalar`] per head.
pub fn dot_rows_heads_scalar<R: Copy + Into<f32>>(
    q: &[f32],
    d: usize,
    rows: &[R],
    stride: usize,
    m: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    let mut row = vec![0f32; d];
    for p in 0..m {
        for (r, x) in row.iter_mut().zip(&rows[p * stride..p * stride + d]) {
            *r = (*x).into();
        }
        for (j, qj) in q.chunks_exact(d).enumerate() {
            out[j * out_stride + p] = dot_f32_scalar(qj, &row);
        }
    }
}

/// The scalar twin of [`weighted_sum_f16_heads`] (`R = f16`) and [`weighted_sum_f32_heads`]
/// (`R = f32`): each row widened, then one [`axpy_scalar`] per row and head.
pub fn weighted_sum_heads_scalar<R: Copy + Into<f32>>(
    w: &[f32],
    w_stride: usize,
    rows: &[R],
    stride: usize,
    m: usize,
    acc: &mut [f32],
    d: usize,
) {
    let mut row = vec![0f32; d];
    for p in 0..m {
        for (r, x) in row.iter_mut().zip(&rows[p * stride..p * stride + d]) {
            *r = (*x).into();
        }
        for (j, aj) in acc.chunks_exact_mut(d).enumerate() {
            axpy_scalar(w[j * w_stride + p], &row, aj);
        }
    }
}

fn check_rows(d: usize, have: usize, stride: usize, n: usize) {
    assert!(
        stride >= d && (n == 0 || (n - 1) * stride + d <= have),
        "rows: {n} of {d} at stride {stride} need more than {have} values"
    );
}

/// The scalar twin of [`dot_rows`].
pub fn dot_rows_scalar(q: &[f32], rows: &[f32], stride: usize, out: &mut [f32]) {
    for (p, o) in out.iter_mut().enumerate() {
        *o = q
            .iter()
            .zip(&rows[p * stride..p * stride + q.len()])
            .map(|(a, b)| a * b)
            .sum();
    }
}

/// The scalar twin of [`weighted_sum`].
pub fn weighted_sum_scalar(w: &[f32], rows: &[f32], stride: usize, acc: &mut [f32]) {
    let d = acc.len();
    for (p, &wp) in w.iter().enumerate() {
        for (a, r) in acc.iter_mut().zip(&rows[p * stride..p * stride + d]) {
            *a += wp * r;
        }
    }
}

/// The multi-head kernels' shape: (queries or weights, their size or stride, rows of `R`, row
/// stride, rows, outputs or accumulators, their stride or size).
type HeadsFn<R> = fn(&[f32], usize, &[R], usize, usize, &mut [f32], usize);

struct F32Kernels {
    dot: fn(&[f32], &[f32]) -> f32,
    axpy: fn(f32, &[f32], &mut [f32]),
    f16_to_f32: fn(&[half::f16], &mut [f32]),
    f32_to_f16: fn(&[f32], &mut [half::f16]),
    round_f16: fn(&mut [f32]),
    exp: fn(&mut [f32]),
    dot_rows: fn(&[f32], &[f32], usize, &mut [f32]),
    weighted_sum: fn(&[f32], &[f32], usize, &mut [f32]),
    dot_rows_f16_heads: HeadsFn<half::f16>,
    weighted_sum_f16_heads: HeadsFn<half::f16>,
    dot_rows_f32_heads: HeadsFn<f32>,
    weighted_sum_f32_heads: HeadsFn<f32>,
    max: fn(&[f32]) -> f32,
    all_finite: fn(&[f32]) -> bool,
    sum_exp: fn(&[f32], f32) -> f32,
    dequant_q8_0: fn(&[u16], &mut [f32]),
    dequant_q4_0: fn(&[u16], &mut [f32]),
}

fn f32_kernels() -> &'static F32Kernels {
    static K: std::sync::OnceLock<F32Kernels> = std::sync::OnceLock::new();
    K.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if crate::dispatch::tier() >= crate::dispatch::Tier::Avx2 {
            let avx512 = crate::dispatch::tier() >= crate::dispatch::Tier::Avx512Vnni;
            return F32Kernels {
                // SAFETY: the tier check above guarantees AVX2 and FMA.
                dot: |a, b| unsafe { x86::dot(a, b) },
                // SAFETY: as above.
                axpy: |al, x, y| unsafe { x86::axpy(al, x, y) },
                // SAFETY: the AVX2 tier includes F16C.
                f16_to_f32: |s, d| unsafe { x86::f16_to_f32(s, d) },
                // SAFETY: as above.
                f32_to_f16: |s, d| unsafe { x86::f32_to_f16(s, d) },
                // SAFETY: as above.
                round_f16: |x| unsafe { x86::round_f16(x) },
                exp: if avx512 {
                    // SAFETY: the AVX-512 tier (F/BW/VL) includes AVX2 and FMA.
                    |x| unsafe { x86::exp_512(x) }
                } else {
                    exp_scalar
                },
                // SAFETY: AVX2 and FMA as above; the public wrappers checked the bounds.
                dot_rows: |q, r, st, o| unsafe { x86::dot_rows(q, r, st, o) },
                // SAFETY: as above.
                weighted_sum: |w, r, st, a| unsafe { x86::weighted_sum(w, r, st, a) },
                // SAFETY: AVX2, FMA and F16C as above; the public wrappers checked the shapes.
                dot_rows_f16_heads: if avx512 {
                    // SAFETY: the AVX-512 tier (F/BW/VL) includes AVX2, FMA and F16C; the public
                    // wrappers checked the shapes.
                    |q, d, r, st, m, o, os| unsafe {
                        x86::dot_rows_heads_512(q, d, r, st, m, o, os)
                    }
                } else {
                    // SAFETY: AVX2, FMA and F16C as above; the public wrappers checked the shapes.
                    |q, d, r, st, m, o, os| unsafe { x86::dot_rows_heads(q, d, r, st, m, o, os) }
                },
                weighted_sum_f16_heads: if avx512 {
                    // SAFETY: as above.
                    |w, ws, r, st, m, a, d| unsafe {
                        x86::weighted_sum_heads_512(w, ws, r, st, m, a, d)
                    }
                } else {
                    // SAFETY: as above.
                    |w, ws, r, st, m, a, d| unsafe {
                        x86::weighted_sum_heads(w, ws, r, st, m, a, d)
                    }
                },
                dot_rows_f32_heads: if avx512 {
                    // SAFETY: as for the f16 rows.
                    |q, d, r, st, m, o, os| unsafe {
                        x86::dot_rows_heads_512(q, d, r, st, m, o, os)
                    }
                } else {
                    // SAFETY: as above.
                    |q, d, r, st, m, o, os| unsafe { x86::dot_rows_heads(q, d, r, st, m, o, os) }
                },
                weighted_sum_f32_heads: if avx512 {
                    // SAFETY: as above.
                    |w, ws, r, st, m, a, d| unsafe {
                        x86::weighted_sum_heads_512(w, ws, r, st, m, a, d)
                    }
                } else {
                    // SAFETY: as above.
                    |w, ws, r, st, m, a, d| unsafe {
                        x86::weighted_sum_heads(w, ws, r, st, m, a, d)
                    }
                },
                // SAFETY: as above.
                max: |x| unsafe { x86::max(x) },
                // SAFETY: as above.
                all_finite: |x| unsafe { x86::all_finite(x) },
                sum_exp: if avx512 {
                    // SAFETY: the AVX-512 tier (F) includes AVX2 and FMA.
                    |x, sh| unsafe { x86::sum_exp_512(x, sh) }
                } else {
                    // SAFETY: as above.
                    |x, sh| unsafe { x86::sum_exp(x, sh) }
                },
                // SAFETY: AVX2 as above; the public wrappers checked the lengths.
                dequant_q8_0: |s, d| unsafe { x86::dequant_q8_0(s, d) },
                // SAFETY: as above.
                dequant_q4_0: |s, d| unsafe { x86::dequant_q4_0(s, d) },
            };
        }
        F32Kernels {
            dot: dot_f32_scalar,
            axpy: axpy_scalar,
            f16_to_f32: f16_to_f32_scalar,
            f32_to_f16: f32_to_f16_scalar,
            round_f16: round_f16_scalar,
            exp: exp_scalar,
            dot_rows: dot_rows_scalar,
            weighted_sum: weighted_sum_scalar,
            dot_rows_f16_heads: dot_rows_heads_scalar,
            weighted_sum_f16_heads: weighted_sum_heads_scalar,
            dot_rows_f32_heads: dot_rows_heads_scalar,
            weighted_sum_f32_heads: weighted_sum_heads_scalar,
            max: max_f32_scalar,
            all_finite: all_finite_scalar,
            sum_exp: sum_exp_scalar,
            dequant_q8_0: dequant_q8_0_scalar,
            dequant_q4_0: dequant_q4_0_scalar,
        }
    })
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// [`super::exp_in_place`] on eight lanes: glibc `expf`'s double-precision steps, operation
    /// for operation (the same fused multiply-adds), so every lane rounds as `expf` does.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
    pub(super) unsafe fn exp_512(x: &mut [f32]) {
        use super::expf_data::{C, INV_LN2_N, SHIFT, TAB, TOP12_88};
        let n = x.len();
        // SAFETY: TAB holds 32 u64, read as four vectors of 8.
        let tab: [__m512i; 4] = std::array::from_fn(|k| unsafe {
            _mm512_loadu_si512(TAB.as_ptr().add(8 * k) as *const _)
        });
        let (inv, shift) = (_mm512_set1_pd(INV_LN2_N), _mm512_set1_pd(SHIFT));
        let (c0, c1, c2, one) = (
            _mm512_set1_pd(C[0]),
            _mm512_set1_pd(C[1]),
            _mm512_set1_pd(C[2]),
            _mm512_set1_pd(1.0),
        );
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n.
            let xf = unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) };
            let top = _mm256_and_si256(
                _mm256_srli_epi32::<20>(_mm256_castps_si256(xf)),
                _mm256_set1_epi32(0x7ff),
            );
            let special = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(
                top,
                _mm256_set1_epi32(TOP12_88 as i32 - 1),
            )));
            let xd = _mm512_cvtps_pd(xf);
            let kds = _mm512_fmadd_pd(inv, xd, shift);
            let ki = _mm512_castpd_si512(kds);
            let kd = _mm512_sub_pd(kds, shift);
            let r = _mm512_fmsub_pd(inv, xd, kd);
            // tab[ki % 32]: two 16-entry permutes, the fifth index bit picks between them.
            let lo = _mm512_permutex2var_epi64(tab[0], ki, tab[1]);
            let hi = _mm512_permutex2var_epi64(tab[2], ki, tab[3]);
            let upper = _mm512_test_epi64_mask(ki, _mm512_set1_epi64(16));
            let t = _mm512_add_epi64(
                _mm512_mask_blend_epi64(upper, lo, hi),
                _mm512_slli_epi64::<47>(ki),
            );
            let z = _mm512_fmadd_pd(r, c0, c1);
            let r2 = _mm512_mul_pd(r, r);
            let y = _mm512_fmadd_pd(r, c2, one);
            let y = _mm512_fmadd_pd(z, r2, y);
            let y = _mm512_mul_pd(y, _mm512_castsi512_pd(t));
            // Lanes on expf's overflow/underflow paths (rare) are redone from their inputs.
            let mut inputs = [0f32; 8];
            if special != 0 {
                inputs.copy_from_slice(&x[i..i + 8]);
            }
            // SAFETY: as above.
            unsafe { _mm256_storeu_ps(x.as_mut_ptr().add(i), _mm512_cvtpd_ps(y)) };
            if special != 0 {
                for (j, (v, input)) in x[i..i + 8].iter_mut().zip(inputs).enumerate() {
                    if special & (1 << j) != 0 {
                        *v = input.exp();
                    }
                }
            }
            i += 8;
        }
        super::exp_scalar(&mut x[i..]);
    }

    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn f16_to_f32(src: &[half::f16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n, within both slices (f16 is 2 bytes, repr(transparent) u16).
            unsafe {
                let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            }
            i += 8;
        }
        for j in i..n {
            dst[j] = src[j].to_f32();
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: i + 16 <= n, within both slices.
            unsafe {
                s0 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(a.as_ptr().add(i)),
                    _mm256_loadu_ps(b.as_ptr().add(i)),
                    s0,
                );
                s1 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(a.as_ptr().add(i + 8)),
                    _mm256_loadu_ps(b.as_ptr().add(i + 8)),
                    s1,
                );
            }
            i += 16;
        }
        let mut s = hsum2(s0, s1);
        while i < n {
            s += a[i] * b[i];
            i += 1;
        }
        s
    }

    /// `Σ` of the lanes of `s0 + s1`, in `dot`'s order (which the f16 multi-head kernel
    /// repeats so that both give the same bits).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum2(s0: __m256, s1: __m256) -> f32 {
        hsum8(_mm256_add_ps(s0, s1))
    }

    /// Eight row sums reduced into one vector: lane i = Σ of v[i]'s lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn reduce8(v: &[__m256; 8]) -> __m256 {
        let a = _mm256_hadd_ps(v[0], v[1]);
        let b = _mm256_hadd_ps(v[2], v[3]);
        let c = _mm256_hadd_ps(v[4], v[5]);
        let d = _mm256_hadd_ps(v[6], v[7]);
        let ab = _mm256_hadd_ps(a, b);
        let cd = _mm256_hadd_ps(c, d);
        // ab = [r0 r1 r2 r3 | r0 r1 r2 r3] halves (low lane sums, high lane sums); same for cd.
        let lo = _mm256_permute2f128_ps(ab, cd, 0x20);
        let hi = _mm256_permute2f128_ps(ab, cd, 0x31);
        _mm256_add_ps(lo, hi)
    }

    /// # Safety
    /// AVX2 and FMA; `rows` holds `out.len()` rows of `q.len()` values at `stride`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_rows(q: &[f32], rows: &[f32], stride: usize, out: &mut [f32]) {
        let d = q.len();
        let n = out.len();
        let d8 = d / 8 * 8;
        let mut p = 0;
        while p + 8 <= n {
            let mut acc = [_mm256_setzero_ps(); 8];
            let mut i = 0;
            while i < d8 {
                // SAFETY: i + 8 <= d; rows p..p + 8 hold d values each at stride (checked by
                // the caller).
                unsafe {
                    let qv = _mm256_loadu_ps(q.as_ptr().add(i));
                    for (r, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(
                            qv,
                            _mm256_loadu_ps(rows.as_ptr().add((p + r) * stride + i)),
                            *a,
                        );
                    }
                }
                i += 8;
            }
            let mut sums = [0f32; 8];
            // SAFETY: sums holds 8 floats.
            unsafe { _mm256_storeu_ps(sums.as_mut_ptr(), reduce8(&acc)) };
            for (r, s) in sums.iter().enumerate() {
                let row = &rows[(p + r) * stride..(p + r) * stride + d];
                out[p + r] = s + (d8..d).map(|j| q[j] * row[j]).sum::<f32>();
            }
            p += 8;
        }
        for (p, o) in out.iter_mut().enumerate().skip(p) {
            // SAFETY: AVX2 and FMA, as this function's.
            *o = unsafe { dot(q, &rows[p * stride..p * stride + d]) };
        }
    }

    /// # Safety
    /// AVX2 and FMA; `rows` holds `w.len()` rows of `acc.len()` values at `stride`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn weighted_sum(w: &[f32], rows: &[f32], stride: usize, acc: &mut [f32]) {
        let d = acc.len();
        let d32 = d / 32 * 32;
        let mut c = 0;
        // 32 columns at a time in four registers, over every row.
        while c < d32 {
            // SAFETY: c + 32 <= d, inside acc and inside every row (checked by the caller).
            unsafe {
                let ap = acc.as_mut_ptr().add(c);
                let mut a = [
                    _mm256_loadu_ps(ap),
                    _mm256_loadu_ps(ap.add(8)),
                    _mm256_loadu_ps(ap.add(16)),
                    _mm256_loadu_ps(ap.add(24)),
                ];
                for (p, &wp) in w.iter().enumerate() {
                    let wv = _mm256_set1_ps(wp);
                    let rp = rows.as_ptr().add(p * stride + c);
                    for (k, ak) in a.iter_mut().enumerate() {
                        *ak = _mm256_fmadd_ps(wv, _mm256_loadu_ps(rp.add(8 * k)), *ak);
                    }
                }
                for (k, ak) in a.iter().enumerate() {
                    _mm256_storeu_ps(ap.add(8 * k), *ak);
                }
            }
            c += 32;
        }
        if c < d {
            for (p, &wp) in w.iter().enumerate() {
                // SAFETY: AVX2 and FMA, as this function's.
                unsafe { axpy(wp, &rows[p * stride + c..p * stride + d], &mut acc[c..]) };
            }
        }
    }

    /// Calls the const-generic kernel `f::<N>` (or `f::<C, N>`) for `n` heads (1..=8, checked by
    /// the caller).
    macro_rules! by_heads {
        ($n:expr, $f:ident::<$c:literal>($($arg:expr),*)) => {
            match $n {
                1 => $f::<_, $c, 1>($($arg),*),
                2 => $f::<_, $c, 2>($($arg),*),
                3 => $f::<_, $c, 3>($($arg),*),
                4 => $f::<_, $c, 4>($($arg),*),
                5 => $f::<_, $c, 5>($($arg),*),
                6 => $f::<_, $c, 6>($($arg),*),
                7 => $f::<_, $c, 7>($($arg),*),
                _ => $f::<_, $c, 8>($($arg),*),
            }
        };
        ($n:expr, $f:ident($($arg:expr),*)) => {
            match $n {
                1 => $f::<_, 1>($($arg),*),
                2 => $f::<_, 2>($($arg),*),
                3 => $f::<_, 3>($($arg),*),
                4 => $f::<_, 4>($($arg),*),
                5 => $f::<_, 5>($($arg),*),
                6 => $f::<_, 6>($($arg),*),
                7 => $f::<_, 7>($($arg),*),
                _ => $f::<_, 8>($($arg),*),
            }
        };
    }

    /// The row types the multi-head kernels read: f16 (a KV cache's rows, widened in
    /// registers) or f32 (a prefill's converted copy). Widening is exact, so both give the
    /// values of the f32 rows.
    pub(super) trait RowElem: Copy {
        /// Whether the rows are f16.
        const F16: bool;
        /// The value as f32.
        fn widen(self) -> f32;
    }

    impl RowElem for half::f16 {
        const F16: bool = true;
        fn widen(self) -> f32 {
            self.to_f32()
        }
    }

    impl RowElem for f32 {
        const F16: bool = false;
        fn widen(self) -> f32 {
            self
        }
    }

    /// Eight values at `p` as f32.
    ///
    /// # Safety
    /// Eight values are readable at `p`.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn load8<R: RowElem>(p: *const R) -> __m256 {
        // SAFETY: per the contract.
        unsafe {
            if R::F16 {
                _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
            } else {
                _mm256_loadu_ps(p as *const f32)
            }
        }
    }

    /// Sixteen values at `p` as f32.
    ///
    /// # Safety
    /// Sixteen values are readable at `p`.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,f16c")]
    unsafe fn load16<R: RowElem>(p: *const R) -> __m512 {
        // SAFETY: per the contract.
        unsafe {
            if R::F16 {
                _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
            } else {
                _mm512_loadu_ps(p as *const f32)
            }
        }
    }

    /// # Safety
    /// AVX2, FMA and F16C; shapes as checked by `check_heads`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_rows_heads<R: RowElem>(
        q: &[f32],
        d: usize,
        rows: &[R],
        stride: usize,
        m: usize,
        out: &mut [f32],
        out_stride: usize,
    ) {
        // SAFETY: same features; the shapes were checked.
        unsafe {
            by_heads!(
                q.len() / d,
                dot_heads(q, d, rows, stride, m, out, out_stride)
            )
        }
    }

    /// `N` heads' scores per row, each with `dot`'s accumulators, order and reduction.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_heads<R: RowElem, const N: usize>(
        q: &[f32],
        d: usize,
        rows: &[R],
        stride: usize,
        m: usize,
        out: &mut [f32],
        out_stride: usize,
    ) {
        for p in 0..m {
            let row = &rows[p * stride..p * stride + d];
            let mut s = [[_mm256_setzero_ps(); 2]; N];
            let mut i = 0;
            while i + 16 <= d {
                // SAFETY: i + 16 <= d, within the row and within every head of q.
                unsafe {
                    let k0 = load8(row.as_ptr().add(i));
                    let k1 = load8(row.as_ptr().add(i + 8));
                    for (j, sj) in s.iter_mut().enumerate() {
                        let qp = q.as_ptr().add(j * d + i);
                        sj[0] = _mm256_fmadd_ps(_mm256_loadu_ps(qp), k0, sj[0]);
                        sj[1] = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(8)), k1, sj[1]);
                    }
                }
                i += 16;
            }
            for (j, sj) in s.iter().enumerate() {
                let mut acc = hsum2(sj[0], sj[1]);
                for t in i..d {
                    acc += q[j * d + t] * row[t].widen();
                }
                out[j * out_stride + p] = acc;
            }
        }
    }

    /// # Safety
    /// AVX2, FMA and F16C; shapes as checked by `check_heads`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn weighted_sum_heads<R: RowElem>(
        w: &[f32],
        w_stride: usize,
        rows: &[R],
        stride: usize,
        m: usize,
        acc: &mut [f32],
        d: usize,
    ) {
        // SAFETY: same features; the shapes were checked.
        unsafe {
            by_heads!(
                acc.len() / d,
                wsum_heads(w, w_stride, rows, stride, m, acc, d)
            )
        }
    }

    /// `N` heads' weighted sums, 16 columns at a time in registers across the rows; per
    /// element the fused multiply-adds of `axpy` in row order (its unfused tail for the last
    /// `d % 8` columns).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn wsum_heads<R: RowElem, const N: usize>(
        w: &[f32],
        w_stride: usize,
        rows: &[R],
        stride: usize,
        m: usize,
        acc: &mut [f32],
        d: usize,
    ) {
        let d8 = d / 8 * 8;
        let mut c = 0;
        while c + 16 <= d8 {
            // SAFETY: c + 16 <= d: inside every head's accumulator and every row (checked).
            unsafe {
                let mut a = [[_mm256_setzero_ps(); 2]; N];
                for (j, aj) in a.iter_mut().enumerate() {
                    let ap = acc.as_ptr().add(j * d + c);
                    *aj = [_mm256_loadu_ps(ap), _mm256_loadu_ps(ap.add(8))];
                }
                for p in 0..m {
                    let rp = rows.as_ptr().add(p * stride + c);
                    let v0 = load8(rp);
                    let v1 = load8(rp.add(8));
                    for (j, aj) in a.iter_mut().enumerate() {
                        let wv = _mm256_set1_ps(*w.get_unchecked(j * w_stride + p));
                        aj[0] = _mm256_fmadd_ps(wv, v0, aj[0]);
                        aj[1] = _mm256_fmadd_ps(wv, v1, aj[1]);
                    }
                }
                for (j, aj) in a.iter().enumerate() {
                    let ap = acc.as_mut_ptr().add(j * d + c);
                    _mm256_storeu_ps(ap, aj[0]);
                    _mm256_storeu_ps(ap.add(8), aj[1]);
                }
            }
            c += 16;
        }
        for j in 0..N {
            for p in 0..m {
                let (wp, row) = (w[j * w_stride + p], &rows[p * stride..p * stride + d]);
                let aj = &mut acc[j * d..(j + 1) * d];
                let mut i = c;
                while i < d8 {
                    // SAFETY: i + 8 <= d, inside aj and row.
                    unsafe {
                        let x = load8(row.as_ptr().add(i));
                        _mm256_storeu_ps(
                            aj.as_mut_ptr().add(i),
                            _mm256_fmadd_ps(
                                _mm256_set1_ps(wp),
                                x,
                                _mm256_loadu_ps(aj.as_ptr().add(i)),
                            ),
                        );
                    }
                    i += 8;
                }
                for t in d8..d {
                    aj[t] += wp * row[t].widen();
                }
            }
        }
    }

    /// # Safety
    /// AVX-512 F/VL, AVX2, FMA and F16C; shapes as checked by `check_heads`.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
    pub(super) unsafe fn dot_rows_heads_512<R: RowElem>(
        q: &[f32],
        d: usize,
        rows: &[R],
        stride: usize,
        m: usize,
        out: &mut [f32],
        out_stride: usize,
    ) {
        if d % 16 != 0 {
            // SAFETY: same features.
            return unsafe { dot_rows_heads(q, d, rows, stride, m, out, out_stride) };
        }
        // SAFETY: same features; the shapes were checked.
        unsafe {
            by_heads!(
                q.len() / d,
                dot_heads_512(q, d, rows, stride, m, out, out_stride)
            )
        }
    }

    /// `N` heads' scores of row `p` before the horizontal sum: per head, `dot`'s two 8-lane
    /// accumulators (one 16-lane register: lanes 0–7 and 8–15) added lane by lane, as `hsum2`
    /// starts.
    ///
    /// # Safety
    /// `d % 16 == 0`; row `p` and every head of `q` hold `d` values.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
    unsafe fn row_sums_512<R: RowElem, const N: usize>(
        q: &[f32],
        d: usize,
        row: *const R,
    ) -> [__m256; N] {
        // SAFETY: per the contract.
        let s = unsafe { row_acc_512::<R, N>(q, d, row) };
        s.map(|v| {
            _mm256_add_ps(
                _mm512_castps512_ps256(v),
                _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))),
            )
        })
    }

    /// `N` heads' accumulators of row `row` (lanes 0–7: `dot`'s first accumulator, 8–15: its
    /// second), before any horizontal sum.
    ///
    /// # Safety
    /// `d % 16 == 0`; the row and every head of `q` hold `d` values.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
    unsafe fn row_acc_512<R: RowElem, const N: usize>(
        q: &[f32],
        d: usize,
        row: *const R,
    ) -> [__m512; N] {
        let mut s = [_mm512_setzero_ps(); N];
        let mut i = 0;
        while i < d {
            // SAFETY: i + 16 <= d, within the row and within every head of q.
            unsafe {
                let k = load16(row.add(i));
                for (j, sj) in s.iter_mut().enumerate() {
                    *sj = _mm512_fmadd_ps(_mm512_loadu_ps(q.as_ptr().add(j * d + i)), k, *sj);
                }
            }
            i += 16;
        }
        s
    }

    /// Eight rows' full horizontal sums from their 16-lane accumulators (`a[r]`, as
    /// [`row_acc_512`] leaves them), each in exactly `dot`'s order — lanes `i + (i + 8)` first,
    /// then [`hsum8`]'s `((v0+v4)+(v2+v6)) + ((v1+v5)+(v3+v7))` — by a butterfly across the
    /// rows: every step adds two halves of two rows' partial sums at once, so eight rows take
    /// 25 vector operations instead of 38 (folding each row, then an eight-row [`hsum8`]).
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
    fn hsum16_x8(a: &[__m512; 8]) -> __m256 {
        // Level 1, lanes i + (i + 8): rows (2k, 2k + 1) → [row 2k: 8 sums | row 2k + 1: 8].
        let l1 = |x: __m512, y: __m512| {
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(x, y),
                _mm512_shuffle_f32x4::<0xEE>(x, y),
            )
        };
        let (s01, s23, s45, s67) = (
            l1(a[0], a[1]),
            l1(a[2], a[3]),
            l1(a[4], a[5]),
            l1(a[6], a[7]),
        );
        // Level 2, v_i + v_{i+4}: [row 0: 4 | row 1: 4 | row 2: 4 | row 3: 4] (rows 4–7 alike).
        let l2 = |x: __m512, y: __m512| {
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(x, y),
                _mm512_shuffle_f32x4::<0xDD>(x, y),
            )
        };
        let (t0, t1) = (l2(s01, s23), l2(s45, s67));
        // Level 3, (v0+v4) + (v2+v6) and (v1+v5) + (v3+v7): chunk k holds row k's pair, then
        // row 4 + k's.
        let u = _mm512_add_ps(
            _mm512_shuffle_ps::<0x44>(t0, t1),
            _mm512_shuffle_ps::<0xEE>(t0, t1),
        );
        // Level 4, the pair's sum: chunk k = [row k, row 4 + k, row k, row 4 + k].
        let v = _mm512_add_ps(
            _mm512_shuffle_ps::<0x88>(u, u),
            _mm512_shuffle_ps::<0xDD>(u, u),
        );
        let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
        _mm512_castps512_ps256(_mm512_permutexvar_ps(order, v))
    }

    /// Prefetches the cache lines of `len` values at `rows[at..]`.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn prefetch_row<R: RowElem>(rows: &[R], at: usize, len: usize) {
        crate::prefetch_bytes(
            rows.as_ptr().wrapping_add(at) as *const u8,
            std::mem::size_of::<R>() * len,
        );
    }

    /// The horizontal sum of an accumulator pair already added lane by lane (the second half of
    /// `hsum2`): `((v0+v4)+(v2+v6)) + ((v1+v5)+(v3+v7))`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum8(v: __m256) -> f32 {
        let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)))
    }

    /// `N` heads' scores per row with `dot`'s accumulators, order and reduction, the 16 lanes
    /// of `dot`'s two 8-lane accumulators in one register and the horizontal sums of eight
    /// rows done together ([`hsum16_x8`]).
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
    unsafe fn dot_heads_512<R: RowElem, const N: usize>(
        q: &[f32],
        d: usize,
        rows: &[R],
        stride: usize,
        m: usize,
        out: &mut [f32],
        out_stride: usize,
    ) {
        let mut p = 0;
        while p + 8 <= m {
            // The next eight rows come from the KV cache's blocks (L3 at best): ask for them now.
            for r in p + 8..(p + 16).min(m) {
                prefetch_row(rows, r * stride, d);
            }
            let mut v = [[_mm512_setzero_ps(); 8]; N];
            for r in 0..8 {
                // SAFETY: row p + r < m lies within rows (checked) and d % 16 == 0.
                let s = unsafe { row_acc_512::<R, N>(q, d, rows.as_ptr().add((p + r) * stride)) };
                for (vj, sj) in v.iter_mut().zip(s) {
                    vj[r] = sj;
                }
            }
            for (j, vj) in v.iter().enumerate() {
                // SAFETY: out holds (n − 1)·out_stride + m values with out_stride >= m (checked).
                unsafe {
                    _mm256_storeu_ps(out.as_mut_ptr().add(j * out_stride + p), hsum16_x8(vj))
                };
            }
            p += 8;
        }
        while p < m {
            // SAFETY: as above, for one row.
            let s = unsafe { row_sums_512::<R, N>(q, d, rows.as_ptr().add(p * stride)) };
            for (j, sj) in s.into_iter().enumerate() {
                out[j * out_stride + p] = hsum8(sj);
            }
            p += 1;
        }
    }

    /// # Safety
    /// AVX-512 F/VL, AVX2, FMA and F16C; shapes as checked by `check_heads`.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
    pub(super) unsafe fn weighted_sum_heads_512<R: RowElem>(
        w: &[f32],
        w_stride: usize,
        rows: &[R],
        stride: usize,
        m: usize,
        acc: &mut [f32],
        d: usize,
    ) {
        if d % 16 != 0 {
            // SAFETY: same features.
            return unsafe { weighted_sum_heads(w, w_stride, rows, stride, m, acc, d) };
        }
        let n = acc.len() / d;
        // Columns per pass over the rows: as many 16-lane accumulators as fit in registers.
        let mut c = 0;
        while c < d {
            // SAFETY: same features; c + 16·C <= d in each call.
            unsafe {
                c += if n <= 2 && c + 128 <= d {
                    by_heads!(
                        n,
                        wsum_heads_512x::<8>(w, w_stride, rows, stride, m, acc, d, c)
                    )
                } else if n <= 4 && c + 64 <= d {
                    by_heads!(
                        n,
                        wsum_heads_512x::<4>(w, w_stride, rows, stride, m, acc, d, c)
                    )
                } else if n <= 8 && c + 32 <= d {
                    by_heads!(
                        n,
                        wsum_heads_512x::<2>(w, w_stride, rows, stride, m, acc, d, c)
                    )
                } else {
                    by_heads!(
                        n,
                        wsum_heads_512x::<1>(w, w_stride, rows, stride, m, acc, d, c)
                    )
                };
            }
        }
    }

    /// Columns `c..c + 16·C` of `N` heads' weighted sums in registers across all rows: per
    /// element the fused multiply-adds of `axpy` in row order. Returns the columns done.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
    unsafe fn wsum_heads_512x<R: RowElem, const C: usize, const N: usize>(
        w: &[f32],
        w_stride: usize,
        rows: &[R],
        stride: usize,
        m: usize,
        acc: &mut [f32],
        d: usize,
        c: usize,
    ) -> usize {
        // SAFETY (whole body): c + 16·C <= d, inside every head's accumulator and every row;
        // w holds (N − 1)·w_stride + m weights (checked).
        unsafe {
            let mut a = [[_mm512_setzero_ps(); C]; N];
            for (j, aj) in a.iter_mut().enumerate() {
                for (k, ak) in aj.iter_mut().enumerate() {
                    *ak = _mm512_loadu_ps(acc.as_ptr().add(j * d + c + 16 * k));
                }
            }
            for p in 0..m {
                if p + 8 < m {
                    prefetch_row(rows, (p + 8) * stride + c, 16 * C);
                }
                let rp = rows.as_ptr().add(p * stride + c);
                let mut v = [_mm512_setzero_ps(); C];
                for (k, vk) in v.iter_mut().enumerate() {
                    *vk = load16(rp.add(16 * k));
                }
                for (j, aj) in a.iter_mut().enumerate() {
                    let wv = _mm512_set1_ps(*w.get_unchecked(j * w_stride + p));
                    for (ak, vk) in aj.iter_mut().zip(&v) {
                        *ak = _mm512_fmadd_ps(wv, *vk, *ak);
                    }
                }
            }
            for (j, aj) in a.iter().enumerate() {
                for (k, ak) in aj.iter().enumerate() {
                    _mm512_storeu_ps(acc.as_mut_ptr().add(j * d + c + 16 * k), *ak);
                }
            }
        }
        16 * C
    }

    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn f32_to_f16(src: &[f32], dst: &mut [half::f16]) {
        let n = src.len().min(dst.len());
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n, within both slices (f16 is 2 bytes, repr(transparent) u16).
            unsafe {
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(
                    src.as_ptr().add(i),
                ));
                _mm_storeu_si128(dst.as_mut_ptr().add(i) as *mut __m128i, h);
            }
            i += 8;
        }
        for j in i..n {
            dst[j] = half::f16::from_f32(src[j]);
        }
    }

    /// # Safety
    /// AVX2; `src` holds `dst.len() / 32` blocks of 17 words (checked by the caller). x86 is
    /// little-endian: a block's words in memory are its bytes in order.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dequant_q8_0(src: &[u16], dst: &mut [f32]) {
        for (y, b) in dst.chunks_exact_mut(32).zip(src.chunks_exact(17)) {
            let d = _mm256_set1_ps(half::f16::from_bits(b[0]).to_f32());
            let bytes = b.as_ptr() as *const u8;
            for k in 0..4 {
                // SAFETY: bytes 2 + 8k .. 10 + 8k lie in the block's 34, values 8k .. 8k + 8 in y.
                unsafe {
                    let q = _mm_loadl_epi64(bytes.add(2 + 8 * k) as *const __m128i);
                    let v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
                    _mm256_storeu_ps(y.as_mut_ptr().add(8 * k), _mm256_mul_ps(v, d));
                }
            }
        }
    }

    /// # Safety
    /// AVX2; `src` holds `dst.len() / 32` blocks of 9 words (checked by the caller), read as
    /// bytes (little-endian, as [`dequant_q8_0`]).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dequant_q4_0(src: &[u16], dst: &mut [f32]) {
        for (y, b) in dst.chunks_exact_mut(32).zip(src.chunks_exact(9)) {
            let d = _mm256_set1_ps(half::f16::from_bits(b[0]).to_f32());
            // SAFETY: bytes 2..18 lie in the block's 18, values 0..32 in y.
            unsafe {
                let q = _mm_loadu_si128((b.as_ptr() as *const u8).add(2) as *const __m128i);
                let eight = _mm_set1_epi8(8);
                let lo = _mm_sub_epi8(_mm_and_si128(q, _mm_set1_epi8(0x0F)), eight);
                let hi = _mm_sub_epi8(
                    _mm_and_si128(_mm_srli_epi16::<4>(q), _mm_set1_epi8(0x0F)),
                    eight,
                );
                for (half, nibbles) in [lo, hi].into_iter().enumerate() {
                    let v0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(nibbles));
                    let v1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(nibbles)));
                    let out = y.as_mut_ptr().add(16 * half);
                    _mm256_storeu_ps(out, _mm256_mul_ps(v0, d));
                    _mm256_storeu_ps(out.add(8), _mm256_mul_ps(v1, d));
                }
            }
        }
    }

    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn round_f16(x: &mut [f32]) {
        let n = x.len();
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n, within the slice.
            unsafe {
                let p = x.as_mut_ptr().add(i);
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(p));
                _mm256_storeu_ps(p, _mm256_cvtph_ps(h));
            }
            i += 8;
        }
        for v in &mut x[i..] {
            *v = half::f16::from_f32(*v).to_f32();
        }
    }

    /// Four independent running maxima (one would make each compare wait for the last: a
    /// 49k-value row took ~8 µs instead of ~2); the maximum does not depend on the order.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn max(x: &[f32]) -> f32 {
        let n = x.len();
        let mut m = [_mm256_set1_ps(f32::NEG_INFINITY); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (k, mk) in m.iter_mut().enumerate() {
                // SAFETY: i + 32 <= n.
                *mk = _mm256_max_ps(*mk, unsafe { _mm256_loadu_ps(x.as_ptr().add(i + 8 * k)) });
            }
            i += 32;
        }
        while i + 8 <= n {
            // SAFETY: i + 8 <= n.
            m[0] = _mm256_max_ps(m[0], unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) });
            i += 8;
        }
        let m = _mm256_max_ps(_mm256_max_ps(m[0], m[1]), _mm256_max_ps(m[2], m[3]));
        let mut lanes = [0f32; 8];
        // SAFETY: lanes holds 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), m) };
        lanes
            .iter()
            .chain(&x[i..])
            .fold(f32::NEG_INFINITY, |a, &v| a.max(v))
    }

    /// Whether no value of `x` has an all-ones exponent (NaN or ±∞), eight lanes in four
    /// accumulators: `(bits & 0x7f800000) + 0x00800000` reaches bit 31 exactly for those, and
    /// the accumulators OR it in.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn all_finite(x: &[f32]) -> bool {
        let n = x.len();
        let (exp, one) = (
            _mm256_set1_epi32(0x7f80_0000),
            _mm256_set1_epi32(0x0080_0000),
        );
        let mut acc = [_mm256_setzero_si256(); 4];
        let flag = |v: __m256i| _mm256_add_epi32(_mm256_and_si256(v, exp), one);
        let mut i = 0;
        while i + 32 <= n {
            for (k, a) in acc.iter_mut().enumerate() {
                // SAFETY: i + 32 <= n.
                let v = unsafe { _mm256_loadu_si256(x.as_ptr().add(i + 8 * k) as *const __m256i) };
                *a = _mm256_or_si256(*a, flag(v));
            }
            i += 32;
        }
        while i + 8 <= n {
            // SAFETY: i + 8 <= n.
            let v = unsafe { _mm256_loadu_si256(x.as_ptr().add(i) as *const __m256i) };
            acc[0] = _mm256_or_si256(acc[0], flag(v));
            i += 8;
        }
        let a = _mm256_or_si256(
            _mm256_or_si256(acc[0], acc[1]),
            _mm256_or_si256(acc[2], acc[3]),
        );
        _mm256_movemask_ps(_mm256_castsi256_ps(a)) == 0 && x[i..].iter().all(|v| v.is_finite())
    }

    /// `e^v` per lane of sixteen by [`exp8`]'s polynomial.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn exp16(v: __m512) -> __m512 {
        let v = _mm512_min_ps(
            _mm512_max_ps(v, _mm512_set1_ps(-super::EXP_CLAMP)),
            _mm512_set1_ps(super::EXP_CLAMP),
        );
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(v, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(super::LN2_HI), v);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(super::LN2_LO), r);
        let c = super::EXP_P;
        let mut p = _mm512_set1_ps(c[0]);
        for &ck in &c[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(ck));
        }
        let y = _mm512_add_ps(
            _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r),
            _mm512_set1_ps(1.0),
        );
        let pow2 = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(
            _mm512_cvtps_epi32(n),
            _mm512_set1_epi32(127),
        )));
        _mm512_mul_ps(y, pow2)
    }

    /// [`sum_exp`] sixteen lanes wide (the polynomial's throughput, not the sum's latency,
    /// bounds it: half the instructions of the eight-lane loop). The same terms summed in
    /// another order (the test holds both to 1e-5 of their exact sum).
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn sum_exp_512(x: &[f32], shift: f32) -> f32 {
        let n = x.len();
        let sh = _mm512_set1_ps(shift);
        // Four accumulators: 64 partial sums, each of a sixty-fourth of the terms (one of
        // sixteen lanes took 3,072 terms of a 49k row and drifted 1e-6 from the exact sum).
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i + 64 <= n {
            for (k, a) in acc.iter_mut().enumerate() {
                // SAFETY: i + 64 <= n.
                let v = unsafe { _mm512_loadu_ps(x.as_ptr().add(i + 16 * k)) };
                *a = _mm512_add_ps(*a, exp16(_mm512_sub_ps(v, sh)));
            }
            i += 64;
        }
        while i + 16 <= n {
            // SAFETY: i + 16 <= n.
            let v = unsafe { _mm512_loadu_ps(x.as_ptr().add(i)) };
            acc[0] = _mm512_add_ps(acc[0], exp16(_mm512_sub_ps(v, sh)));
            i += 16;
        }
        let acc = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        _mm512_reduce_add_ps(acc)
            + x[i..]
                .iter()
                .map(|&v| super::exp_poly(v - shift))
                .sum::<f32>()
    }

    /// `e^v` per lane by the scalar twin's polynomial.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp8(v: __m256) -> __m256 {
        let v = _mm256_min_ps(
            _mm256_max_ps(v, _mm256_set1_ps(-super::EXP_CLAMP)),
            _mm256_set1_ps(super::EXP_CLAMP),
        );
        let n = _mm256_round_ps(
            _mm256_mul_ps(v, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(super::LN2_HI), v);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(super::LN2_LO), r);
        let c = super::EXP_P;
        let mut p = _mm256_set1_ps(c[0]);
        for &ck in &c[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(ck));
        }
        let y = _mm256_add_ps(
            _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
            _mm256_set1_ps(1.0),
        );
        let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
            23,
        ));
        _mm256_mul_ps(y, pow2)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn sum_exp(x: &[f32], shift: f32) -> f32 {
        let n = x.len();
        let sh = _mm256_set1_ps(shift);
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n.
            let v = unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) };
            acc = _mm256_add_ps(acc, exp8(_mm256_sub_ps(v, sh)));
            i += 8;
        }
        let mut lanes = [0f32; 8];
        // SAFETY: lanes holds 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
        lanes.iter().sum::<f32>()
            + x[i..]
                .iter()
                .map(|&v| super::exp_poly(v - shift))
                .sum::<f32>()
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len().min(y.len());
        let al = _mm256_set1_ps(alpha);
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n, within both slices.
            unsafe {
                let r = _mm256_fmadd_ps(
                    al,
                    _mm256_loadu_ps(x.as_ptr().add(i)),
                    _mm256_loadu_ps(y.as_ptr().add(i)),
                );
                _mm256_storeu_ps(y.as_mut_ptr().add(i), r);
            }
            i += 8;
        }
        while i < n {
            y[i] += alpha * x[i];
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uniform;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                (((i as u32)
                    .wrapping_mul(2654435761)
                    .wrapping_add(seed.wrapping_mul(40503))
                    >> 8)
                    % 2001) as f32
                    / 1000.0
                    - 1.0
            })
            .collect()
    }

    /// The tile kernels against their scalar twins, for head sizes with and without a tail of
    /// 8/32 columns, row counts with and without a tail of 8, and strided rows.
    #[test]
    fn dot_rows_and_weighted_sum_match_their_scalar_twins() {
        for (d, n, stride) in [
            (64, 32, 64),
            (64, 13, 192),
            (256, 40, 256),
            (40, 9, 48),
            (7, 3, 7),
            (128, 0, 128),
        ] {
            let q = values(d, 1);
            let rows = values(n.max(1) * stride, 2);
            let (mut got, mut want) = (vec![0f32; n], vec![0f32; n]);
            dot_rows(&q, &rows, stride, &mut got);
            dot_rows_scalar(&q, &rows, stride, &mut want);
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                    "dot_rows d {d} n {n}: {g} vs {w}"
                );
            }
            let wts = values(n, 3);
            let (mut got, mut want) = (values(d, 4), values(d, 4));
            weighted_sum(&wts, &rows, stride, &mut got);
            weighted_sum_scalar(&wts, &rows, stride, &mut want);
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                    "weighted_sum d {d} n {n}: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn rms_norm_unit_weight_has_unit_rms() {
        let x = [1.0f32, -2.0, 3.0, -4.0];
        let mut o = [0f32; 4];
        rms_norm(&x, &[1.0; 4], 0.0, &mut o);
        let rms = (o.iter().map(|v| v * v).sum::<f32>() / 4.0).sqrt();
        assert!((rms - 1.0).abs() < 1e-6);
    }

    #[test]
    fn rope_rotation_preserves_norm_and_position_zero_is_identity() {
        let mut cs = vec![(0f32, 0f32); 4];
        rope_cache(0, 8, 10000.0, 1.0, None, &mut cs);
        let mut x: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let orig = x.clone();
        rope_apply(&mut x, &cs, 8, RopeStyle::Neox);
        assert_eq!(x, orig);
        rope_cache(17, 8, 10000.0, 1.0, None, &mut cs);
        for style in [RopeStyle::Normal, RopeStyle::Neox] {
            let mut y = orig.clone();
            rope_apply(&mut y, &cs, 8, style);
            let n0: f32 = orig.iter().map(|v| v * v).sum();
            let n1: f32 = y.iter().map(|v| v * v).sum();
            assert!((n0 - n1).abs() < 1e-3);
        }
    }

    #[test]
    fn token_nll_is_the_negative_log_softmax() {
        let l = [1.0f32, 2.0, 3.0, -1.0];
        let z: f64 = l.iter().map(|&v| (v as f64).exp()).sum();
        for t in 0..4 {
            assert!((token_nll(&l, t) - (z.ln() - l[t] as f64)).abs() < 1e-12);
        }
        // Large logits do not overflow.
        assert!((token_nll(&[1000.0, 1000.0], 0) - std::f64::consts::LN_2).abs() < 1e-12);
    }

    #[test]
    fn kv_dequantizers_match_their_scalar_twins_and_gguf_layouts() {
        for (ty, bytes) in [
            (crate::GgmlType::Q8_0, 34usize),
            (crate::GgmlType::Q4_0, 18),
        ] {
            // The kernels read the blocks as a KV cache holds them: little-endian words.
            for blocks in [0usize, 1, 3, 6] {
                // Random bytes with finite f16 scales (the scale's exponent below its top).
                let mut src: Vec<u8> = (0..blocks * bytes)
                    .map(|i| ((i as u32).wrapping_mul(2654435761) >> 13) as u8)
                    .collect();
                for b in src.chunks_exact_mut(bytes) {
                    b[1] &= 0x3b;
                }
                let n = blocks * 32;
                let (mut simd, mut scalar, mut reference) =
                    (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
                let words: Vec<u16> = src
                    .chunks_exact(2)
                    .map(|w| u16::from_le_bytes([w[0], w[1]]))
                    .collect();
                let (fast, twin): (fn(&[u16], &mut [f32]), fn(&[u16], &mut [f32])) =
                    if ty == crate::GgmlType::Q8_0 {
                        (dequant_q8_0, dequant_q8_0_scalar)
                    } else {
                        (dequant_q4_0, dequant_q4_0_scalar)
                    };
                fast(&words, &mut simd);
                twin(&words, &mut scalar);
                assert!(crate::quants::dequantize_row(ty, &src, &mut reference));
                assert_eq!(simd, scalar, "{ty:?}, {blocks} blocks");
                assert_eq!(scalar, reference, "{ty:?}, {blocks} blocks");
                assert!(blocks == 0 || simd.iter().any(|&v| v != 0.0));
            }
        }
    }

    #[test]
    fn simd_f32_ops_match_scalar_twins() {
        for n in [0usize, 1, 7, 8, 15, 16, 33, 256, 1000] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 13) % 7) as f32 * 0.5).collect();
            let h: Vec<half::f16> = a
                .iter()
                .zip(&b)
                .map(|(x, y)| half::f16::from_f32(x * 1e-3 + y * 1e4))
                .collect();
            let (mut w1, mut w2) = (vec![0f32; n], vec![0f32; n]);
            f16_to_f32(&h, &mut w1);
            f16_to_f32_scalar(&h, &mut w2);
            assert_eq!(w1, w2, "{n}: f16 widening");
            let (d, ds) = (dot_f32(&a, &b), dot_f32_scalar(&a, &b));
            assert!(
                (d - ds).abs() <= 1e-4 * ds.abs().max(1.0),
                "{n}: {d} vs {ds}"
            );
            let (mut y1, mut y2) = (b.clone(), b.clone());
            axpy(0.3, &a, &mut y1);
            axpy_scalar(0.3, &a, &mut y2);
            // A fused multiply-add rounds once where mul+add rounds twice: one rounding apart.
            for i in 0..n {
                let bound = 2.0 * f32::EPSILON * ((0.3 * a[i]).abs() + b[i].abs());
                assert!(
                    (y1[i] - y2[i]).abs() <= bound,
                    "{n}[{i}]: {} vs {}",
                    y1[i],
                    y2[i]
                );
            }
        }
    }

    /// The f16 multi-head kernels give, head by head, bit for bit what widening each row and
    /// calling `dot_f32` / one `axpy` per row gives (what the attention's per-row path
    /// computes), and stay within rounding of their scalar twins, on every tier: 1–8 heads,
    /// sizes with and without 8/16-column tails, strided rows, no rows. The f32-row kernels
    /// give the same bits on the widened rows.
    #[test]
    fn multi_head_f16_kernels_equal_widen_then_dot_or_axpy() {
        let cases = [
            (1, 64, 16, 192),
            (1, 64, 5, 64),
            (1, 256, 16, 256),
            (1, 40, 9, 48),
            (1, 72, 3, 80),
            (1, 128, 0, 128),
            (3, 64, 16, 192),
            (4, 256, 16, 256),
            (8, 40, 9, 48),
            (2, 72, 3, 80),
            (5, 24, 1, 24),
            (3, 64, 0, 64),
            (3, 64, 37, 192),
            (1, 256, 23, 256),
            (2, 128, 8, 128),
            (8, 64, 19, 64),
            (6, 96, 11, 96),
        ];
        for (n, d, m, stride) in cases {
            let q = values(n * d, 1);
            let rows: Vec<half::f16> = values(m.max(1) * stride, 2)
                .iter()
                .map(|v| half::f16::from_f32(v * 3.0))
                .collect();
            let widened = |p: usize| {
                let mut r = vec![0f32; d];
                f16_to_f32(&rows[p * stride..p * stride + d], &mut r);
                r
            };
            let os = m + 3;
            let mut got = vec![0f32; n * os];
            dot_rows_f16_heads(&q, d, &rows, stride, m, &mut got, os);
            let mut twin = vec![0f32; n * os];
            dot_rows_heads_scalar(&q, d, &rows, stride, m, &mut twin, os);
            let w = values(n * os, 3);
            let (mut acc, mut acc_twin) = (values(n * d, 4), values(n * d, 4));
            weighted_sum_f16_heads(&w, os, &rows, stride, m, &mut acc, d);
            weighted_sum_heads_scalar(&w, os, &rows, stride, m, &mut acc_twin, d);
            for j in 0..n {
                for p in 0..m {
                    let want = dot_f32(&q[j * d..(j + 1) * d], &widened(p));
                    assert_eq!(
                        got[j * os + p].to_bits(),
                        want.to_bits(),
                        "dot heads n {n} d {d} head {j} row {p}"
                    );
                    assert!(
                        (got[j * os + p] - twin[j * os + p]).abs()
                            <= 1e-5 * (1.0 + twin[j * os + p].abs())
                    );
                }
                let mut want = values(n * d, 4)[j * d..(j + 1) * d].to_vec();
                for p in 0..m {
                    axpy(w[j * os + p], &widened(p), &mut want);
                }
                for t in 0..d {
                    assert_eq!(
                        acc[j * d + t].to_bits(),
                        want[t].to_bits(),
                        "wsum heads n {n} d {d} head {j} col {t}"
                    );
                    assert!(
                        (acc[j * d + t] - acc_twin[j * d + t]).abs()
                            <= 1e-5 * (1.0 + acc_twin[j * d + t].abs())
                    );
                }
            }
            // The f32-row kernels on the same rows widened (same stride): the same bits as the
            // f16 ones (checked above against dot_f32 / axpy), and their scalar twins within
            // rounding.
            let rows32: Vec<f32> = rows.iter().map(|h| h.to_f32()).collect();
            let mut got32 = vec![0f32; n * os];
            dot_rows_f32_heads(&q, d, &rows32, stride, m, &mut got32, os);
            let mut twin32 = vec![0f32; n * os];
            dot_rows_heads_scalar(&q, d, &rows32, stride, m, &mut twin32, os);
            let (mut acc32, mut acc_twin32) = (values(n * d, 4), values(n * d, 4));
            weighted_sum_f32_heads(&w, os, &rows32, stride, m, &mut acc32, d);
            weighted_sum_heads_scalar(&w, os, &rows32, stride, m, &mut acc_twin32, d);
            for j in 0..n {
                for p in 0..m {
                    let i = j * os + p;
                    assert_eq!(got32[i].to_bits(), got[i].to_bits(), "f32 dot n {n} d {d}");
                    assert!((got32[i] - twin32[i]).abs() <= 1e-5 * (1.0 + twin32[i].abs()));
                }
            }
            for i in 0..n * d {
                assert_eq!(acc32[i].to_bits(), acc[i].to_bits(), "f32 wsum n {n} d {d}");
                assert!((acc32[i] - acc_twin32[i]).abs() <= 1e-5 * (1.0 + acc_twin32[i].abs()));
            }
        }
    }

    /// f16 narrowing and rounding equal `half`'s conversions bit for bit (its round-to-nearest-
    /// even), on ordinary values, ties, subnormals, overflow to infinity, infinities and NaN
    /// (NaN stays NaN), with 8-lane tails.
    #[test]
    fn f16_narrowing_and_rounding_equal_half() {
        let mut x = values(203, 11)
            .iter()
            .map(|v| v * 7.0)
            .collect::<Vec<f32>>();
        x.extend([
            0.0,
            -0.0,
            1.0 + 1.0 / 2048.0,
            1.0 + 3.0 / 2048.0,
            65504.0,
            65520.0,
            1e6,
            -1e6,
            1e-7,
            -6e-8,
            3e-5,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MIN_POSITIVE,
        ]);
        for n in [0, 1, 7, 8, 9, x.len()] {
            let src = &x[..n];
            let mut got = vec![half::f16::ZERO; n];
            f32_to_f16(src, &mut got);
            let mut rounded = src.to_vec();
            round_f16(&mut rounded);
            for i in 0..n {
                let want = half::f16::from_f32(src[i]);
                if src[i].is_nan() {
                    assert!(got[i].is_nan() && rounded[i].is_nan());
                    continue;
                }
                assert_eq!(got[i].to_bits(), want.to_bits(), "narrow {}", src[i]);
                assert_eq!(
                    rounded[i].to_bits(),
                    want.to_f32().to_bits(),
                    "round {}",
                    src[i]
                );
            }
            let mut twin = vec![half::f16::ZERO; n];
            f32_to_f16_scalar(src, &mut twin);
            let mut twin_r = src.to_vec();
            round_f16_scalar(&mut twin_r);
            assert!(twin
                .iter()
                .zip(&got)
                .all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())));
            assert!(twin_r
                .iter()
                .zip(&rounded)
                .all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())));
        }
    }

    /// The vector check and its twin agree on clean rows and on a NaN, +∞ or −∞ at every
    /// position of rows of every length up to 80 (the 32-wide body, the 8-wide loop and the
    /// tail), on a 49k logits row, and on the largest finite values and subnormals (finite).
    #[test]
    fn all_finite_matches_its_scalar_twin() {
        for n in (0..80).chain([49_152]) {
            let mut x: Vec<f32> = values(n, n as u32 + 3).iter().map(|v| v * 1e3).collect();
            if n > 2 {
                x[0] = f32::MAX;
                x[1] = -f32::MAX;
                x[2] = f32::MIN_POSITIVE / 2.0;
            }
            assert!(all_finite(&x) && all_finite_scalar(&x), "{n}");
            let positions: Vec<usize> = if n > 100 {
                vec![0, 31, 32, 40_000, n - 1]
            } else {
                (0..n).collect()
            };
            for i in positions {
                for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    let mut y = x.clone();
                    y[i] = bad;
                    assert!(!all_finite_scalar(&y));
                    assert!(!all_finite(&y), "{n}: {bad} at {i}");
                }
            }
        }
    }

    #[test]
    fn logit_stats_match_f64_and_the_scalar_twins() {
        // The polynomial against f64 exp over the range a shifted logit takes.
        for i in -8800..=100 {
            let x = i as f32 / 100.0;
            let (got, want) = (exp_poly(x) as f64, (x as f64).exp());
            assert!(
                (got - want).abs() <= 3e-7 * want + 1e-37,
                "exp({x}) = {got}, want {want}"
            );
        }
        for n in [1usize, 7, 8, 9, 64, 1000, 49_152] {
            let x: Vec<f32> = values(n, n as u32).iter().map(|v| v * 20.0).collect();
            let s = logit_stats(&x);
            let want_max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            assert_eq!(s.max, want_max, "{n}");
            assert_eq!(
                s.argmax,
                x.iter().position(|&v| v == want_max).unwrap_or(0),
                "{n}"
            );
            assert_eq!(max_f32_scalar(&x), want_max);
            // The lse against token_nll's f64 (nll of token 0 = lse − x[0]).
            let lse64 = token_nll(&x, 0) + x[0] as f64;
            assert!(
                (s.lse - lse64).abs() < 1e-6 * lse64.abs().max(1.0),
                "{n}: {} vs {lse64}",
                s.lse
            );
            let lp = token_logprob(&x, n / 2) as f64;
            assert!(
                (lp + token_nll(&x, n / 2)).abs() < 1e-5 * lse64.abs().max(1.0),
                "{n}: {lp}"
            );
            // The same terms in different orders (eight partial sums, 64): each within 1e-5
            // of the terms' f64 sum (eight f32 partial sums of a 49k row drift 2e-6 from it,
            // 64 less; the twins are held to the exact sum, not to each other).
            let (simd, scalar) = (sum_exp_from_dispatch(&x, s.max), sum_exp_scalar(&x, s.max));
            let exact: f64 = x.iter().map(|&v| exp_poly(v - s.max) as f64).sum();
            for (name, got) in [("simd", simd), ("scalar", scalar)] {
                assert!(
                    (got as f64 - exact).abs() <= 1e-5 * exact,
                    "{n} {name}: {got} vs {exact}"
                );
            }
        }
        // Far-below-max values contribute nothing and do not produce NaN; a row with one
        // huge value has lse = that value.
        let s = logit_stats(&[1000.0, -1000.0, 0.0]);
        assert_eq!((s.argmax, s.max), (0, 1000.0));
        assert!((s.lse - 1000.0).abs() < 1e-9);
        assert_eq!(token_logprob(&[1000.0, -1000.0, 0.0], 3), f32::NEG_INFINITY);
    }

    /// The vector `exp` returns `f32::exp`'s bits: over the whole f32 range in steps of 61 bit
    /// patterns (~70 million values, both signs, NaN and infinities included), densely around
    /// the special-path bounds (±88, the overflow and underflow limits) and over [−20, 0] in
    /// steps of 13 (the softmax's range), at every slice offset of the 8-lane loop. Also checks
    /// that the table holds 2^(i/32).
    #[test]
    fn exp_in_place_is_libm_exp_bit_for_bit() {
        for (i, &t) in expf_data::TAB.iter().enumerate() {
            let want = (i as f64 / 32.0).exp2().to_bits() - ((i as u64) << 47);
            assert_eq!(t, want, "table entry {i}");
        }
        let mut xs: Vec<f32> = (0..=u32::MAX / 61)
            .map(|k| f32::from_bits(k * 61))
            .collect();
        for b in [
            88.0f32, -88.0, 88.72284, -87.33655, -103.97208, 89.0, -104.0,
        ] {
            let c = b.to_bits();
            xs.extend((c.saturating_sub(2000)..c + 2000).map(f32::from_bits));
        }
        xs.push(-20.0);
        // [−20, −0]: the negative floats' bit patterns run from −0 up to −20.
        xs.extend(
            (0x8000_0000u32..=(-20.0f32).to_bits())
                .step_by(13)
                .map(f32::from_bits),
        );
        for offset in [0usize, 3] {
            let mut got = xs[offset..].to_vec();
            exp_in_place(&mut got);
            for (x, g) in xs[offset..].iter().zip(&got) {
                let want = x.exp();
                assert!(
                    g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                    "exp({x:e}) = {g:e}, libm {want:e}"
                );
            }
        }
    }

    /// SwiGLU with the chunked vector exponentials equals `silu(g)·u` per element, bit for
    /// bit, over a ragged length and inputs past the exp's special bounds.
    #[test]
    fn swiglu_equals_elementwise_silu() {
        let n = 1536 + 37;
        let mut g: Vec<f32> = uniform(n, 5, 12.0);
        g[3] = 95.0;
        g[4] = -95.0;
        g[5] = -120.0;
        let u = uniform(n, 6, 2.0);
        let want: Vec<f32> = g.iter().zip(&u).map(|(&g, &u)| silu(g) * u).collect();
        swiglu(&mut g, &u);
        for (i, (a, b)) in g.iter().zip(&want).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "element {i}: {a} vs {b}");
        }
    }

    fn sum_exp_from_dispatch(x: &[f32], shift: f32) -> f32 {
        (f32_kernels().sum_exp)(x, shift)
    }

    #[test]
    fn table_geglu_is_within_f16_rounding_of_exact() {
        let xs: Vec<f32> = (-1200..1200).map(|i| i as f32 / 100.0).collect();
        let mut g = xs.clone();
        geglu(&mut g, &vec![1.0; xs.len()]);
        for (x, y) in xs.iter().zip(&g) {
            let exact = if *x <= -10.0 {
                0.0
            } else if *x >= 10.0 {
                *x
            } else {
                gelu(*x)
            };
            assert!(
                (y - exact).abs() <= 2e-3 * exact.abs().max(0.5) + 1e-3,
                "{x}: {y} vs {exact}"
            );
        }
    }

    #[test]
    fn softmax_sums_to_one_and_gelu_known_values() {
        let mut x = [1.0f32, 2.0, 3.0, 1000.0];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(gelu(0.0) == 0.0 && (gelu(1.0) - 0.841192).abs() < 1e-5);
        assert!((silu(1.0) - 0.7310586).abs() < 1e-6);
    }

    #[test]
    fn hadamard_is_an_involution_that_keeps_dot_products() {
        let a: Vec<f32> = (0..64)
            .map(|i| ((i * 13 % 17) as f32 - 8.0) * 0.3)
            .collect();
        let b: Vec<f32> = (0..64).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.7).collect();
        let (mut ha, mut hb) = (a.clone(), b.clone());
        hadamard(&mut ha);
        hadamard(&mut hb);
        let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f32>();
        assert!((dot(&a, &b) - dot(&ha, &hb)).abs() < 1e-3);
        hadamard(&mut ha);
        for (x, y) in ha.iter().zip(&a) {
            assert!((x - y).abs() < 1e-5);
        }
        // A single spike spreads evenly over every channel.
        let mut e = vec![0f32; 16];
        e[3] = 4.0;
        hadamard(&mut e);
        assert!(e.iter().all(|v| (v.abs() - 1.0).abs() < 1e-6));
    }

    /// The lane-parallel f64 sum equals the running one to within an f32-irrelevant margin, for
    /// every tail length, and its pairwise order is the one documented (checked exactly on
    /// values whose partial sums are exact).
    #[test]
    fn sum_f64_matches_the_running_sum() {
        assert_eq!(sum_f64(&[]), 0.0);
        for n in [1usize, 7, 8, 9, 16, 63, 200, 1001] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 + 0.5) / 97.0)
                .collect();
            let running: f64 = x.iter().fold(0.0, |s, &v| s + v as f64);
            let got = sum_f64(&x);
            assert!(
                (got - running).abs() <= 1e-12 * running,
                "n {n}: {got} vs {running}"
            );
            assert_eq!(got as f32, running as f32, "n {n}");
        }
        let x: Vec<f32> = (1..=10).map(|i| i as f32).collect();
        assert_eq!(sum_f64(&x), 55.0);
    }

    /// The eight-lane f64 sums equal a sequential f64 sum to rounding, tails included.
    #[test]
    fn lane_sums_match_sequential_f64() {
        for n in [0usize, 1, 7, 8, 9, 576, 1001] {
            let x = values(n, 5);
            let (s, sq) = (sum_f64(&x), sum_sq_f64(&x));
            let want_s: f64 = x.iter().map(|&v| v as f64).sum();
            let want_sq: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
            assert!(
                (s - want_s).abs() <= 1e-12 * (1.0 + want_s.abs()),
                "{n}: {s} {want_s}"
            );
            assert!(
                (sq - want_sq).abs() <= 1e-12 * (1.0 + want_sq),
                "{n}: {sq} {want_sq}"
            );
            assert!(n == 0 || sq > 0.0);
        }
    }

    /// `first_equal` finds what `position` finds: the first of repeated values, in the first,
    /// a middle and the last (partial) block, and nothing when absent.
    #[test]
    fn first_equal_matches_position() {
        let x: Vec<f32> = (0..200).map(|i| (i % 37) as f32).collect();
        for v in [0.0, 5.0, 36.0, 99.0] {
            assert_eq!(first_equal(&x, v), x.iter().position(|&y| y == v), "{v}");
        }
        let mut y = vec![0f32; 130];
        y[129] = 1.0;
        assert_eq!(first_equal(&y, 1.0), Some(129));
        assert_eq!(logit_stats(&y).argmax, 129);
        assert_eq!(first_equal(&[], 1.0), None);
    }
}
