//! Compute kernels for ruvllm.
//!
//! * [`quants`]: ggml block formats and their scalar dequantization (the reference).
//! * [`act`]: activation quantization (Q8_0/Q8_1 blocks of 32, Q8_K blocks of 256), done once per
//!   matmul input so the weight × activation products are integer dot products, as in ggml.
//! * [`dot`]: row dot products per weight type, scalar twins plus SIMD tiers picked once by
//!   [`dispatch`].
//! * [`matmul`]: weight matrix × batch of activations, split over the [`pool`].
//! * [`ops`]: norms, RoPE, activations, softmax.
#![deny(missing_docs)]

pub mod act;
pub mod dispatch;
pub mod dot;
pub mod matmul;
pub mod ops;
pub mod pool;
pub mod quants;
mod simd;
#[cfg(test)]
pub(crate) mod test_util;

pub use ruvllm_gguf::GgmlType;
