//! Synthetic blocks for kernel tests.
#![allow(missing_docs)]
use crate::GgmlType;

/// A deterministic pseudo-random byte stream (xorshift) for synthetic blocks.
pub fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut r = crate::XorShift::new(seed);
    (0..n).map(|_| (r.next_u64() >> 24) as u8).collect()
}

/// Random blocks with sane (small, finite) f16 scales at the given byte offsets.
pub fn random_row(ty: GgmlType, n: usize, seed: u64) -> Vec<u8> {
    let ts = ty.type_size();
    let mut b = bytes(n / ty.block_size() * ts, seed);
    let scale_offsets: &[usize] = match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 => &[0, 2],
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q3_K => &[108],
        GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q6_K => &[208],
        _ => &[],
    };
    for blk in b.chunks_exact_mut(ts) {
        for &o in scale_offsets {
            let v = half::f16::from_f32(0.001 + (blk[o] as f32) / 4096.0)
                .to_bits()
                .to_le_bytes();
            blk[o] = v[0];
            blk[o + 1] = v[1];
        }
    }
    b
}
