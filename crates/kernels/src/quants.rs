//! ggml block formats and their scalar dequantization.
//!
//! Every function here reproduces `dequantize_row_*` of ggml's `ggml-quants.c` exactly (same
//! float operations in the same order), so results are bit-identical to gguf-py's `quants`
//! module, against which the tests in `tests/dequant_vs_gguf_py.rs` check real model tensors.

use crate::GgmlType;
use half::{bf16, f16};

/// Reads a little-endian f16 at `b[i..i+2]` as f32.
#[inline(always)]
pub fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Rounds an f32 through f16, as ggml does when it stores a scale in a block.
#[inline(always)]
pub fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// Elements per super-block of the k-quants.
pub const QK_K: usize = 256;

/// The 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K block (ggml's `get_scale_min_k4`).
#[inline(always)]
pub fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The sixteen signed 6-bit scales of a Q3_K block, unpacked from its 12 bytes.
#[inline(always)]
pub fn q3k_scales(s: &[u8]) -> [i8; 16] {
    const KMASK1: u32 = 0x0303_0303;
    const KMASK2: u32 = 0x0f0f_0f0f;
    let mut aux = [0u32; 4];
    for (i, a) in aux.iter_mut().take(3).enumerate() {
        *a = u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]);
    }
    let tmp = aux[2];
    aux[2] = ((aux[0] >> 4) & KMASK2) | (((tmp >> 4) & KMASK1) << 4);
    aux[3] = ((aux[1] >> 4) & KMASK2) | (((tmp >> 6) & KMASK1) << 4);
    aux[0] = (aux[0] & KMASK2) | ((tmp & KMASK1) << 4);
    aux[1] = (aux[1] & KMASK2) | (((tmp >> 2) & KMASK1) << 4);
    let mut out = [0i8; 16];
    for i in 0..16 {
        out[i] = (aux[i / 4] >> (8 * (i % 4))) as u8 as i8 - 32;
    }
    out
}

/// Whether [`dequantize_row`] handles a type.
pub fn can_dequantize(ty: GgmlType) -> bool {
    use GgmlType::*;
    matches!(
        ty,
        F32 | F16
            | BF16
            | Q4_0
            | Q4_1
            | Q5_0
            | Q5_1
            | Q8_0
            | Q2_K
            | Q3_K
            | Q4_K
            | Q5_K
            | Q6_K
            | Q8_K
    )
}

/// Dequantizes one row: `src` holds `dst.len() / block_size` blocks of `ty`.
/// Returns false (and leaves `dst` untouched) for types it cannot dequantize.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> bool {
    use GgmlType::*;
    let bs = ty.block_size();
    let ts = ty.type_size();
    debug_assert_eq!(dst.len() % bs, 0);
    debug_assert!(src.len() >= dst.len() / bs * ts);
    match ty {
        F32 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            }
        }
        F16 => {
            for (i, d) in dst.iter_mut().enumerate() {
                *d = f16_at(src, 2 * i);
            }
        }
        BF16 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = bf16::from_bits(u16::from_le_bytes([s[0], s[1]])).to_f32();
            }
        }
        Q4_0 | Q4_1 => {
            let has_min = ty == Q4_1;
            for (y, b) in dst.chunks_exact_mut(32).zip(src.chunks_exact(ts)) {
                let d = f16_at(b, 0);
                let (m, qs) = if has_min {
                    (f16_at(b, 2), &b[4..20])
                } else {
                    (0.0, &b[2..18])
                };
                for j in 0..16 {
                    let (x0, x1) = ((qs[j] & 0xF) as i32, (qs[j] >> 4) as i32);
                    if has_min {
                        y[j] = x0 as f32 * d + m;
                        y[j + 16] = x1 as f32 * d + m;
                    } else {
                        y[j] = (x0 - 8) as f32 * d;
                        y[j + 16] = (x1 - 8) as f32 * d;
                    }
                }
            }
        }
        Q5_0 | Q5_1 => {
            let has_min = ty == Q5_1;
            for (y, b) in dst.chunks_exact_mut(32).zip(src.chunks_exact(ts)) {
                let d = f16_at(b, 0);
                let (m, o) = if has_min { (f16_at(b, 2), 4) } else { (0.0, 2) };
                let qh = u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
                let qs = &b[o + 4..o + 20];
                for j in 0..16 {
                    let xh0 = (((qh >> j) << 4) & 0x10) as i32;
                    let xh1 = ((qh >> (j + 12)) & 0x10) as i32;
                    let x0 = (qs[j] & 0xF) as i32 | xh0;
                    let x1 = (qs[j] >> 4) as i32 | xh1;
                    if has_min {
                        y[j] = x0 as f32 * d + m;
                        y[j + 16] = x1 as f32 * d + m;
                    } else {
                        y[j] = (x0 - 16) as f32 * d;
                        y[j + 16] = (x1 - 16) as f32 * d;
                    }
                }
            }
        }
        Q8_0 => {
            for (y, b) in dst.chunks_exact_mut(32).zip(src.chunks_exact(ts)) {
                let d = f16_at(b, 0);
                for j in 0..32 {
                    y[j] = b[2 + j] as i8 as f32 * d;
                }
            }
        }
        Q2_K => {
            for (y, b) in dst.chunks_exact_mut(QK_K).zip(src.chunks_exact(ts)) {
                let scales = &b[0..16];
                let qs = &b[16..80];
                let d = f16_at(b, 80);
                let min = f16_at(b, 82);
                let mut is = 0;
                let mut out = 0;
                for n in 0..2 {
                    let q = &qs[32 * n..32 * n + 32];
                    for shift in [0, 2, 4, 6] {
                        for half in 0..2 {
                            let sc = scales[is];
                            is += 1;
                            let dl = d * (sc & 0xF) as f32;
                            let ml = min * (sc >> 4) as f32;
                            for l in 0..16 {
                                y[out] = dl * ((q[l + 16 * half] >> shift) & 3) as i8 as f32 - ml;
                                out += 1;
                            }
                        }
                    }
                }
            }
        }
        Q3_K => {
            for (y, b) in dst.chunks_exact_mut(QK_K).zip(src.chunks_exact(ts)) {
                let hm = &b[0..32];
                let qs = &b[32..96];
                let scales = q3k_scales(&b[96..108]);
                let d_all = f16_at(b, 108);
                let mut is = 0;
                let mut m: u8 = 1;
                let mut out = 0;
                for n in 0..2 {
                    let q = &qs[32 * n..32 * n + 32];
                    for shift in [0, 2, 4, 6] {
                        for half in 0..2 {
                            let dl = d_all * scales[is] as f32;
                            is += 1;
                            for l in 0..16 {
                                let li = l + 16 * half;
                                let v = ((q[li] >> shift) & 3) as i8
                                    - if hm[li] & m != 0 { 0 } else { 4 };
                                y[out] = dl * v as f32;
                                out += 1;
                            }
                        }
                        m = m.wrapping_shl(1);
                    }
                }
            }
        }
        Q4_K | Q5_K => {
            let is5 = ty == Q5_K;
            for (y, b) in dst.chunks_exact_mut(QK_K).zip(src.chunks_exact(ts)) {
                let d = f16_at(b, 0);
                let min = f16_at(b, 2);
                let sc = &b[4..16];
                let (qh, ql) = if is5 {
                    (&b[16..48], &b[48..176])
                } else {
                    (&b[0..0], &b[16..144])
                };
                let mut u1 = 1u8;
                let mut u2 = 2u8;
                for j in 0..4 {
                    let (s1, m1) = scale_min_k4(2 * j, sc);
                    let (s2, m2) = scale_min_k4(2 * j + 1, sc);
                    let (d1, m1) = (d * s1 as f32, min * m1 as f32);
                    let (d2, m2) = (d * s2 as f32, min * m2 as f32);
                    let q = &ql[32 * j..32 * j + 32];
                    let yo = &mut y[64 * j..64 * j + 64];
                    for l in 0..32 {
                        let h1 = if is5 && qh[l] & u1 != 0 { 16 } else { 0 };
                        let h2 = if is5 && qh[l] & u2 != 0 { 16 } else { 0 };
                        yo[l] = d1 * ((q[l] & 0xF) + h1) as f32 - m1;
                        yo[l + 32] = d2 * ((q[l] >> 4) + h2) as f32 - m2;
                    }
                    u1 = u1.wrapping_shl(2);
                    u2 = u2.wrapping_shl(2);
                }
            }
        }
        Q6_K => {
            for (y, b) in dst.chunks_exact_mut(QK_K).zip(src.chunks_exact(ts)) {
                let d = f16_at(b, 208);
                for n in 0..2 {
                    let ql = &b[64 * n..64 * n + 64];
                    let qh = &b[128 + 32 * n..128 + 32 * n + 32];
                    let sc = &b[192 + 8 * n..192 + 8 * n + 8];
                    let yo = &mut y[128 * n..128 * n + 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
                        yo[l] = d * sc[is] as i8 as f32 * q1 as f32;
                        yo[l + 32] = d * sc[is + 2] as i8 as f32 * q2 as f32;
                        yo[l + 64] = d * sc[is + 4] as i8 as f32 * q3 as f32;
                        yo[l + 96] = d * sc[is + 6] as i8 as f32 * q4 as f32;
                    }
                }
            }
        }
        Q8_K => {
            for (y, b) in dst.chunks_exact_mut(QK_K).zip(src.chunks_exact(ts)) {
                let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                for j in 0..QK_K {
                    y[j] = d * b[4 + j] as i8 as f32;
                }
            }
        }
        _ => return false,
    }
    true
}

/// Quantizes `x` (a multiple of 32 values) to Q8_0 blocks in `out` (34 bytes each), as ggml's
/// `quantize_row_q8_0_ref` does: d = amax / 127, q = round-half-away(x / d). Used for the
/// quantized KV cache; checked against gguf-py's `quants.quantize`.
pub fn quantize_q8_0(x: &[f32], out: &mut [u8]) {
    for (xb, b) in x.chunks_exact(32).zip(out.chunks_exact_mut(34)) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b[..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        for (q, v) in b[2..].iter_mut().zip(xb) {
            *q = (v * id).round() as i8 as u8;
        }
    }
}

/// Quantizes `x` (a multiple of 32 values) to Q4_0 blocks in `out` (18 bytes each), as ggml's
/// `quantize_row_q4_0_ref` does: d = (the value of largest magnitude) / -8, nibbles
/// min(15, trunc(x / d + 8.5)), element j in the low nibble of byte j and element j + 16 in its
/// high nibble.
pub fn quantize_q4_0(x: &[f32], out: &mut [u8]) {
    for (xb, b) in x.chunks_exact(32).zip(out.chunks_exact_mut(18)) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in xb {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b[..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        for j in 0..16 {
            let q0 = ((xb[j] * id + 8.5) as i8).min(15) as u8;
            let q1 = ((xb[j + 16] * id + 8.5) as i8).min(15) as u8;
            b[2 + j] = q0 | (q1 << 4);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loader's finiteness check (`GgmlType::first_non_finite_block`) reads the float
    /// fields the dequantizers read: in a zero block, an f16 or f32 NaN planted at any byte
    /// offset makes the dequantized block NaN exactly when the check flags it.
    #[test]
    fn the_finiteness_check_reads_the_fields_dequantization_reads() {
        let types = [
            GgmlType::F32,
            GgmlType::F16,
            GgmlType::BF16,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
            GgmlType::Q2_K,
            GgmlType::Q3_K,
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
            GgmlType::Q8_K,
        ];
        let patterns: [&[u8]; 3] = [&[0x00, 0x7e], &[0x00, 0x00, 0xc0, 0x7f], &[0xc0, 0x7f]];
        for ty in types.into_iter().filter(|&t| can_dequantize(t)) {
            let (ts, bs) = (ty.type_size(), ty.block_size());
            let mut flagged = 0;
            for pat in patterns.into_iter().filter(|p| p.len() <= ts) {
                for o in 0..=ts - pat.len() {
                    let mut b = vec![0u8; ts];
                    b[o..o + pat.len()].copy_from_slice(pat);
                    let mut y = vec![0f32; bs];
                    assert!(dequantize_row(ty, &b, &mut y), "{ty}");
                    let nan = y.iter().any(|v| !v.is_finite());
                    let seen = ty.first_non_finite_block(&b) == Some(0);
                    assert_eq!(nan, seen, "{ty}: pattern {pat:?} at byte {o}");
                    flagged += seen as usize;
                }
            }
            assert!(flagged > 0, "{ty}: no planted NaN was found");
        }
    }

    #[test]
    fn q4_0_block_by_hand() {
        // d = 1.0 (f16 0x3c00); nibble j low = j % 16, high = 15 - j % 16
        let mut b = vec![0x00, 0x3c];
        for j in 0..16u8 {
            b.push(j | ((15 - j) << 4));
        }
        let mut y = [0f32; 32];
        assert!(dequantize_row(GgmlType::Q4_0, &b, &mut y));
        for j in 0..16 {
            assert_eq!(y[j], j as f32 - 8.0);
            assert_eq!(y[j + 16], (15 - j) as f32 - 8.0);
        }
    }

    #[test]
    fn q8_0_and_q5_0_high_bits() {
        let mut b = vec![0x00, 0x40]; // d = 2.0
        b.extend((0..32).map(|j| (j as i8 - 16) as u8));
        let mut y = [0f32; 32];
        dequantize_row(GgmlType::Q8_0, &b, &mut y);
        assert_eq!(y[0], -32.0);
        assert_eq!(y[31], 30.0);
        // Q5_0 with all high bits set and nibbles zero: every value is (16 - 16) * d = 0.
        let mut b = vec![0x00, 0x3c, 0xff, 0xff, 0xff, 0xff];
        b.extend([0u8; 16]);
        dequantize_row(GgmlType::Q5_0, &b, &mut y);
        assert!(y.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn quantizers_round_trip_within_half_a_step() {
        let mut seed = 7u64;
        let x: Vec<f32> = (0..256)
            .map(|i| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let v = ((seed >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 8.0;
                if i % 64 == 0 {
                    0.0
                } else {
                    v
                }
            })
            .collect();
        for (ty, bytes) in [(GgmlType::Q8_0, 34), (GgmlType::Q4_0, 18)] {
            let mut q = vec![0u8; x.len() / 32 * bytes];
            if ty == GgmlType::Q8_0 {
                quantize_q8_0(&x, &mut q)
            } else {
                quantize_q4_0(&x, &mut q)
            }
            let mut y = vec![0f32; x.len()];
            assert!(dequantize_row(ty, &q, &mut y));
            for (b, (xb, yb)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
                let d = f16_at(&q, b * bytes).abs();
                for (a, c) in xb.iter().zip(yb) {
                    // Half a step, plus the f16 rounding of d times the largest code.
                    assert!(
                        (a - c).abs() <= d * 0.5 + d * 8e-3 * 128.0 + 1e-6,
                        "{ty:?}: {a} vs {c} (d {d})"
                    );
                }
            }
        }
        // All zeros quantize to zeros.
        let mut q = [0xffu8; 34];
        quantize_q8_0(&[0.0; 32], &mut q);
        assert!(q.iter().all(|&b| b == 0));
    }
}
