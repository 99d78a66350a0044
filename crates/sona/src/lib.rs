//! SONA — learning from feedback while serving. This crate starts with what every loop needs:
//! exact gradients. [`grad`] holds the backward pass of each operation of the forward pass
//! (cross-entropy, RMSNorm, linear maps with frozen weights, LoRA, SwiGLU/GeGLU, RoPE,
//! single-query causal attention), each tested against central finite differences.
//!
//! [`train`] composes them for an adapter on one layer's down projection, trained from
//! activations captured in a single forward pass (the learner's own, or the engine's through a
//! [`train::CaptureSource`]); [`fast`] trains the same adapter on candidate tokens with low-rank
//! logits. [`learner`] runs the three loops per scope on top — instant (micro-adapter, replay,
//! full-vocabulary check), background (base adapter under EWC++), deep ([`merge`]: truncated-SVD
//! consolidation) — with versioned atomic persistence and rollback. [`bank`] is the
//! ReasoningBank (exact search, and the [`hnsw`] graph past 10k entries).
//!
//! Not built yet (issue 6): adapters on earlier projections (a backward through attention over
//! kept activations), routing requests to adapters by their nearest trajectories.
#![deny(missing_docs)]

pub mod bank;
pub mod fast;
pub mod grad;
pub mod hnsw;
pub mod learner;
pub mod merge;
pub mod train;

pub use ruvllm_kernels::uniform;
