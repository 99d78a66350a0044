//! Compute kernels for ruvllm.
//!
//! * [`quants`]: ggml block formats and their scalar dequantization (the reference).
//! * [`act`]: activation quantization (Q8_0/Q8_1 blocks of 32, Q8_K blocks of 256), done once per
//!   matmul input so the weight × activation products are integer dot products, as in ggml.
//! * [`dot`]: row dot products per weight type, scalar twins plus SIMD tiers picked once by
//!   [`dispatch`].
//! * [`matmul`]: weight matrix × batch of activations, split over the [`pool`].
//! * [`packed`]: row-interleaved weight layouts made at load time for the VNNI tier, multiplied
//!   with AMX tiles ([`amx`]) where the CPU has them.
//! * [`ops`]: norms, RoPE, activations, softmax.
#![deny(missing_docs)]

pub mod act;
pub mod amx;
pub mod dispatch;
pub mod dot;
pub mod gemv;
pub mod matmul;
pub mod ops;
pub mod packed;
pub mod pool;
pub mod quants;
mod simd;
#[cfg(test)]
pub(crate) mod test_util;

pub use ruvllm_gguf::GgmlType;

/// A xorshift64 stream: reproducible pseudo-random numbers for initializations and test data
/// (not for sampling, which has its own generator).
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// A stream from `seed` (any value; the state is never zero).
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// `n` deterministic values uniform in [−scale, scale] from [`XorShift`] `seed`: adapter
/// initialization, and reproducible test data.
pub fn uniform(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut r = XorShift::new(seed);
    (0..n)
        .map(|_| ((r.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale)
        .collect()
}

/// Asks the cache for every line of the `len` bytes at `p`, the last one included whatever the
/// alignment: the kernels' software prefetch. A hint: nothing is dereferenced, so an address
/// past the end of a buffer is harmless.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "sse")]
pub(crate) fn prefetch_bytes(p: *const u8, len: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    let mut o = 0;
    while o < len {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(o) as *const i8);
        o += 64;
    }
    if len > 0 {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(len - 1) as *const i8);
    }
}

/// A raw pointer that parallel tasks use to write disjoint parts of one buffer.
///
/// Whoever creates it promises that the buffer outlives every task and that no two tasks write
/// the same index; `ThreadPool::run` returning means all tasks are done.
#[derive(Clone, Copy)]
pub struct SyncPtr<T>(pub *mut T);
// SAFETY: see the type's contract: disjoint writes into a buffer that outlives the tasks.
unsafe impl<T> Send for SyncPtr<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    /// Wraps a mutable slice.
    pub fn new(s: &mut [T]) -> Self {
        SyncPtr(s.as_mut_ptr())
    }
    /// A mutable sub-slice `[start, start + len)`.
    ///
    /// # Safety
    /// The range must lie inside the wrapped buffer and no other task may touch it meanwhile.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, start: usize, len: usize) -> &mut [T] {
        // SAFETY: guaranteed by the caller (in bounds, exclusive).
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}
