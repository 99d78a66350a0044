//! SONA — learning from feedback while serving. This crate starts with what every loop needs:
//! exact gradients. [`grad`] holds the backward pass of each operation of the forward pass
//! (cross-entropy, RMSNorm, linear maps with frozen weights, LoRA, SwiGLU/GeGLU, RoPE,
//! single-query causal attention), each tested against central finite differences.
//!
//! [`train`] composes them for an adapter on one layer's down projection, trained from
//! activations captured in a single forward pass.
//!
//! Not built yet (issue 6): adapters on earlier projections (a backward through attention over
//! kept activations), feedback, the instant/background/deep loops, EWC++, the ReasoningBank and persistence.
#![deny(missing_docs)]

pub mod grad;
pub mod train;
