//! Paged KV-cache bookkeeping, in integers only: which fixed-size block of the KV pool holds
//! which tokens of which sequence. The tensors themselves live with the model runner; this crate
//! hands out block ids (as vLLM's KV-cache manager does), so it depends on no other ruvllm crate.
//!
//! * [`BlockPool`]: reference-counted blocks, an LRU free queue with O(1) removal from the middle
//!   (links are indices threaded through the block array; no allocation), and the prefix-cache
//!   index from block hash to block.
//! * [`hash_block`]: the hash chain `H(parent, tokens, extra)`; `extra` carries the adapter id
//!   and version so KV computed under other weights is never reused.
//! * [`KvManager`]: per-sequence block tables, prefix matching, slot allocation (returns `None`
//!   when blocks run out: the caller preempts), forking with copy-on-write, and freeing.
#![deny(missing_docs)]

mod manager;
mod pool;

pub use manager::{CopyOp, KvManager, SeqId};
pub use pool::{hash_block, BlockHash, BlockId, BlockPool, PoolStats};
