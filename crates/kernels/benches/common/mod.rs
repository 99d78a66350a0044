//! Test data shared by the kernel benches.

use ruvllm_kernels::GgmlType;

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
