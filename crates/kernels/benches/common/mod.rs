//! Test data and timing shared by the kernel benches (each bench uses what it needs).
#![allow(dead_code)]

use ruvllm_kernels::GgmlType;
use std::time::Instant;

/// Seconds per call of `f`: one warm-up call, then as many calls as fit in `budget_s`.
pub fn secs_per_call(budget_s: f64, mut f: impl FnMut()) -> f64 {
    f();
    let t = Instant::now();
    let mut n = 0;
    while t.elapsed().as_secs_f64() < budget_s {
        f();
        n += 1;
    }
    t.elapsed().as_secs_f64() / n as f64
}

/// `n` reproducible pseudo-random bytes from `seed` (xorshift).
pub fn random_bytes(n: usize, mut s: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect()
}

/// A random `rows × cols` matrix of `ty` (ggml layout) whose f16 scales are finite.
pub fn matrix(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let mut b = random_bytes(rows * cols / ty.block_size() * ty.type_size(), seed);
    // Keep f16 scales finite: clear the exponent's top bit of every byte pair.
    for x in b.iter_mut().skip(1).step_by(2) {
        *x &= 0x3b;
    }
    b
}
