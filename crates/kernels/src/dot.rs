//! Row dot products: one weight row (in its block format) · one quantized activation row.
//!
//! The `scalar` functions are the reference twins: integer sums per block exactly as ggml's
//! generic `ggml_vec_dot_*` compute them. SIMD tiers in `simd/` must give the same integer sums
//! (and so bit-identical results up to the order of the final float accumulation, which they
//! keep identical too: one f32 accumulator, blocks in order).

use crate::act::ActRow;
use crate::quants::{f16_at, q3k_scales, scale_min_k4, QK_K};
use crate::GgmlType;

/// Scalar reference dot of a weight row with an activation row.
pub fn dot_scalar(ty: GgmlType, w: &[u8], a: ActRow<'_>) -> f32 {
    use GgmlType::*;
    match ty {
        Q4_0 => q4_0(w, a),
        Q4_1 => q4_1(w, a),
        Q5_0 => q5(w, a, false),
        Q5_1 => q5(w, a, true),
        Q8_0 => q8_0(w, a),
        Q2_K => q2_k(w, a),
        Q3_K => q3_k(w, a),
        Q4_K => q4_k(w, a),
        Q5_K => q5_k(w, a),
        Q6_K => q6_k(w, a),
        F32 => w
            .chunks_exact(4)
            .zip(a.f)
            .map(|(b, x)| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) * x)
            .sum(),
        F16 => {
            a.f.iter()
                .enumerate()
                .map(|(i, x)| f16_at(w, 2 * i) * x)
                .sum()
        }
        BF16 => {
            a.f.iter()
                .enumerate()
                .map(|(i, x)| {
                    half::bf16::from_bits(u16::from_le_bytes([w[2 * i], w[2 * i + 1]])).to_f32() * x
                })
                .sum()
        }
        _ => 0.0,
    }
}

fn q4_0(w: &[u8], a: ActRow<'_>) -> f32 {
    let mut sum = 0f32;
    for (i, b) in w.chunks_exact(18).enumerate() {
        let q8 = &a.qs[32 * i..32 * i + 32];
        let mut isum = 0i32;
        for j in 0..16 {
            isum += ((b[2 + j] & 0xF) as i32 - 8) * q8[j] as i32
                + ((b[2 + j] >> 4) as i32 - 8) * q8[j + 16] as i32;
        }
        sum += isum as f32 * (f16_at(b, 0) * a.d[i]);
    }
    sum
}

fn q4_1(w: &[u8], a: ActRow<'_>) -> f32 {
    let mut sum = 0f32;
    for (i, b) in w.chunks_exact(20).enumerate() {
        let q8 = &a.qs[32 * i..32 * i + 32];
        let mut isum = 0i32;
        for j in 0..16 {
            isum +=
                (b[4 + j] & 0xF) as i32 * q8[j] as i32 + (b[4 + j] >> 4) as i32 * q8[j + 16] as i32;
        }
        sum += isum as f32 * (f16_at(b, 0) * a.d[i]) + f16_at(b, 2) * a.s[i];
    }
    sum
}

fn q5(w: &[u8], a: ActRow<'_>, has_min: bool) -> f32 {
    let ts = if has_min { 24 } else { 22 };
    let o = if has_min { 4 } else { 2 };
    let bias = if has_min { 0 } else { 16 };
    let mut sum = 0f32;
    for (i, b) in w.chunks_exact(ts).enumerate() {
        let q8 = &a.qs[32 * i..32 * i + 32];
        let qh = u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let qs = &b[o + 4..o + 20];
        let mut isum = 0i32;
        for j in 0..16 {
            let x0 = ((qs[j] & 0xF) as u32 | (((qh >> j) << 4) & 0x10)) as i32 - bias;
            let x1 = ((qs[j] >> 4) as u32 | ((qh >> (j + 12)) & 0x10)) as i32 - bias;
            isum += x0 * q8[j] as i32 + x1 * q8[j + 16] as i32;
        }
        sum += isum as f32 * (f16_at(b, 0) * a.d[i]);
        if has_min {
            sum += f16_at(b, 2) * a.s[i];
        }
    }
    sum
}

fn q8_0(w: &[u8], a: ActRow<'_>) -> f32 {
    let mut sum = 0f32;
    for (i, b) in w.chunks_exact(34).enumerate() {
        let q8 = &a.qs[32 * i..32 * i + 32];
        let isum: i32 = (0..32).map(|j| b[2 + j] as i8 as i32 * q8[j] as i32).sum();
        sum += isum as f32 * (f16_at(b, 0) * a.d[i]);
    }
    sum
}

fn q2_k(w: &[u8], a: ActRow<'_>) -> f32 {
    let mut sum = 0f32;
    for (i, b) in w.chunks_exact(84).enumerate() {
        let q8 = &a.qs[QK_K * i..QK_K * (i + 1)];
        let bs = &a.bsums[16 * i..16 * (i + 1)];
        let sc = &b[0..16];
        let qs = &b[16..80];
        let summs: i32 = (0..16).map(|j| (sc[j] >> 4) as i32 * bs[j] as i32).sum();
        let mut isum = 0i32;
        for n in 0..2 {
            for j in 0..4 {
                for half in 0..2 {
                    let s = (sc[8 * n + 2 * j + half] & 0xF) as i32;
                    let mut acc = 0i32;
                    for l in 0..16 {
                        let q = ((qs[32 * n + 16 * half + l] >> (2 * j)) & 3) as i32;
                        acc += q * q8[128 * n + 32 * j + 16 * half + l] as i32;
                    }
                    isum += s * acc;
                }
            }
        }
        let d = a.d[i] * f16_at(b, 80);
        let dmin = a.d[i] * f16_at(b, 82);
        sum += d * isum as f32 - dmin * summs as f32;
    }
    sum
}

fn q3_k(w: &[u8], a: ActRow<'_>) -> f32 {
    let mut sum = 0f32;
    for (i, b) in w.chunks_exact(110).enumerate() {
        let q8 = &a.qs[QK_K * i..QK_K * (i + 1)];
        let hm = &b[0..32];
        let qs = &b[32..96];
        let sc = q3k_scales(&b[96..108]);
        let mut isum = 0i32;
        for n in 0..2 {
            for j in 0..4 {
                let m = 1u8 << (4 * n + j);
                for half in 0..2 {
                    let mut acc = 0i32;
                    for l in 0..16 {
                        let li = 16 * half + l;
                        let q = ((qs[32 * n + li] >> (2 * j)) & 3) as i32
                            - if hm[li] & m != 0 { 0 } else { 4 };
                        acc += q * q8[128 * n + 32 * j + li] as i32;
                    }
                    isum += sc[8 * n + 2 * j + half] as i32 * acc;
                }
            }
        }
        sum += a.d[i] * f16_at(b, 108) * isum as f32;
    }
    sum
}

fn q4_k(w: &[u8], a: ActRow<'_>) -> f32 {
    k_quant_4_5(w, a, false)
}

fn q5_k(w: &[u8], a: ActRow<'_>) -> f32 {
    k_quant_4_5(w, a, true)
}

fn k_quant_4_5(w: &[u8], a: ActRow<'_>, is5: bool) -> f32 {
    let ts = if is5 { 176 } else { 144 };
    let mut sum = 0f32;
    for (i, b) in w.chunks_exact(ts).enumerate() {
        let q8 = &a.qs[QK_K * i..QK_K * (i + 1)];
        let bs = &a.bsums[16 * i..16 * (i + 1)];
        let sc = &b[4..16];
        let (qh, ql) = if is5 {
            (&b[16..48], &b[48..176])
        } else {
            (&b[0..0], &b[16..144])
        };
        let mut isum = 0i32;
        let mut msum = 0i32;
        for j in 0..4 {
            let (s1, m1) = scale_min_k4(2 * j, sc);
            let (s2, m2) = scale_min_k4(2 * j + 1, sc);
            let (mut a1, mut a2) = (0i32, 0i32);
            for l in 0..32 {
                let q = ql[32 * j + l];
                let (mut lo, mut hi) = ((q & 0xF) as i32, (q >> 4) as i32);
                if is5 {
                    lo += (((qh[l] >> (2 * j)) & 1) as i32) << 4;
                    hi += (((qh[l] >> (2 * j + 1)) & 1) as i32) << 4;
                }
                a1 += lo * q8[64 * j + l] as i32;
                a2 += hi * q8[64 * j + 32 + l] as i32;
            }
            isum += s1 as i32 * a1 + s2 as i32 * a2;
            msum += m1 as i32 * (bs[4 * j] as i32 + bs[4 * j + 1] as i32)
                + m2 as i32 * (bs[4 * j + 2] as i32 + bs[4 * j + 3] as i32);
        }
        sum += a.d[i] * f16_at(b, 0) * isum as f32 - a.d[i] * f16_at(b, 2) * msum as f32;
    }
    sum
}

fn q6_k(w: &[u8], a: ActRow<'_>) -> f32 {
    let mut sum = 0f32;
    for (i, b) in w.chunks_exact(210).enumerate() {
        let q8 = &a.qs[QK_K * i..QK_K * (i + 1)];
        let mut isum = 0i32;
        for n in 0..2 {
            let ql = &b[64 * n..64 * n + 64];
            let qh = &b[128 + 32 * n..160 + 32 * n];
            let sc = &b[192 + 8 * n..200 + 8 * n];
            let mut acc = [0i32; 8];
            for l in 0..32 {
                let is = l / 16;
                let q = [
                    ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32,
                    ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32,
                    ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32,
                    ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32,
                ];
                for k in 0..4 {
                    acc[is + 2 * k] += q[k] * q8[128 * n + l + 32 * k] as i32;
                }
            }
            for (s, v) in sc.iter().zip(acc) {
                isum += *s as i8 as i32 * v;
            }
        }
        sum += a.d[i] * f16_at(b, 208) * isum as f32;
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::act::{ActFormat, QuantActs};
    use crate::quants::dequantize_row;
    use crate::test_util::{bytes, random_row};

    /// Every weight type: the integer dot equals the f32 dot of the dequantized row with the
    /// dequantized activations, up to float rounding.
    #[test]
    fn scalar_dot_matches_dequantized_reference() {
        use GgmlType::*;
        for ty in [Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K] {
            let n = 512;
            let w = random_row(ty, n, 7 + ty.id() as u64);
            let x: Vec<f32> = bytes(n, 99)
                .iter()
                .map(|&b| (b as f32 - 128.0) / 37.0)
                .collect();
            let mut acts = QuantActs::default();
            let fmt = ActFormat::for_weight(ty);
            acts.quantize(fmt, &x, n);
            // dequantized activations
            let xa: Vec<f32> = match fmt {
                ActFormat::Q8x32 => (0..n).map(|i| acts.qs[i] as f32 * acts.d[i / 32]).collect(),
                _ => (0..n)
                    .map(|i| acts.qs[i] as f32 * acts.d[i / 256])
                    .collect(),
            };
            let mut wf = vec![0f32; n];
            assert!(dequantize_row(ty, &w, &mut wf));
            let reference: f64 = wf.iter().zip(&xa).map(|(a, b)| *a as f64 * *b as f64).sum();
            let got = dot_scalar(ty, &w, acts.row(0)) as f64;
            // Q4_1/Q5_1 use the f16-rounded block sum for the minimum term.
            let tol = 1e-3
                * wf.iter()
                    .zip(&xa)
                    .map(|(a, b)| (a * b).abs() as f64)
                    .sum::<f64>()
                + 1e-4;
            assert!(
                (got - reference).abs() <= tol,
                "{ty}: {got} vs {reference} (tol {tol})"
            );
        }
    }
}
