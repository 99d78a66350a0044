//! Compute kernels for ruvllm.
//!
//! * [`quants`]: ggml block formats and their scalar dequantization (the reference).
//! * [`act`]: activation quantization (Q8_0/Q8_1 blocks of 32, Q8_K blocks of 256), done once per
//!   matmul input so the weight × activation products are integer dot products, as in ggml.
//! * [`dot`]: row dot products per weight type, scalar twins plus SIMD tiers picked once by
//!   [`dispatch`].
//! * [`matmul`]: weight matrix × batch of activations, split over the [`pool`].
//! * [`packed`]: row-interleaved weight layouts made at load time for the VNNI tier.
//! * [`ops`]: norms, RoPE, activations, softmax.
#![deny(missing_docs)]

pub mod act;
pub mod dispatch;
pub mod gemv;
pub mod dot;
pub mod matmul;
pub mod ops;
pub mod packed;
pub mod pool;
pub mod quants;
mod simd;
#[cfg(test)]
pub(crate) mod test_util;

pub use ruvllm_gguf::GgmlType;

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
