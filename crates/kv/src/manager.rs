//! Per-sequence block tables over a [`BlockPool`]: prefix matching, slot allocation,
//! copy-on-write forks, freeing.
//!
//! Token layout of a sequence with block size 4 and 10 tokens:
//! ```text
//!  block table: [ 7 ][ 2 ][ 9 ]
//!  tokens:      t0..t3 t4..t7 t8 t9 _ _
//!               full   full   partial (never cached, may be shared after a fork)
//! ```

use crate::pool::{hash_block, BlockHash, BlockId, BlockPool, PoolStats};
use std::collections::HashMap;

/// A sequence's id, chosen by the caller.
pub type SeqId = u64;

/// A block's keys and values must be copied from `src` to `dst` before the sequence writes into
/// `dst` (copy-on-write of a shared partial block).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyOp {
    /// Shared block to copy from.
    pub src: BlockId,
    /// The sequence's new private block.
    pub dst: BlockId,
}

#[derive(Debug, Clone)]
struct Seq {
    blocks: Vec<BlockId>,
    tokens: Vec<u32>,
    /// Chain hashes of the full blocks, in order.
    hashes: Vec<BlockHash>,
    extra: Vec<u64>,
}

/// Block tables of all live sequences over one pool.
#[derive(Debug)]
pub struct KvManager {
    pool: BlockPool,
    block_size: usize,
    prefix_caching: bool,
    seqs: HashMap<SeqId, Seq>,
    /// Prefix-cache lookups (full prompt blocks looked up).
    pub prefix_queries: u64,
    /// Prefix-cache hits (blocks reused).
    pub prefix_hits: u64,
}

impl KvManager {
    /// A manager of `n_blocks` blocks of `block_size` tokens.
    pub fn new(n_blocks: usize, block_size: usize, prefix_caching: bool) -> KvManager {
        assert!(block_size > 0);
        KvManager { pool: BlockPool::new(n_blocks), block_size, prefix_caching, seqs: HashMap::new(), prefix_queries: 0, prefix_hits: 0 }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Starts sequence `id` and attaches the longest cached prefix of `prompt` (full blocks
    /// only, and never the whole prompt: its last token must be computed for its logits).
    /// `extra` (adapter id, version, ...) is part of every block hash. Returns the number of
    /// prompt tokens already in the cache; the caller then [`append`](Self::append)s the rest.
    pub fn add_sequence(&mut self, id: SeqId, prompt: &[u32], extra: &[u64]) -> usize {
        assert!(!self.seqs.contains_key(&id), "sequence {id} exists");
        let mut seq = Seq { blocks: Vec::new(), tokens: Vec::new(), hashes: Vec::new(), extra: extra.to_vec() };
        if self.prefix_caching && !prompt.is_empty() {
            let max_blocks = (prompt.len() - 1) / self.block_size;
            let mut parent = None;
            for chunk in prompt.chunks_exact(self.block_size).take(max_blocks) {
                let h = hash_block(parent, chunk, extra);
                self.prefix_queries += 1;
                let Some(b) = self.pool.lookup(h) else { break };
                self.prefix_hits += 1;
                self.pool.acquire(b);
                seq.blocks.push(b);
                seq.hashes.push(h);
                seq.tokens.extend_from_slice(chunk);
                parent = Some(h);
            }
        }
        let n = seq.tokens.len();
        self.seqs.insert(id, seq);
        n
    }

    /// Reserves slots for `tokens` appended to sequence `id` and records them. Returns the
    /// copies to make first (copy-on-write), or `None` — changing nothing — when the pool lacks
    /// free blocks (the caller preempts someone and retries).
    pub fn append(&mut self, id: SeqId, tokens: &[u32]) -> Option<Vec<CopyOp>> {
        let bs = self.block_size;
        let seq = self.seqs.get(&id)?;
        let n0 = seq.tokens.len();
        let partial_shared = n0 % bs != 0 && seq.blocks.last().is_some_and(|&b| self.pool.ref_count(b) > 1);
        let needed = (n0 + tokens.len()).div_ceil(bs).saturating_sub(seq.blocks.len()) + partial_shared as usize;
        if needed > self.pool.n_free() {
            return None;
        }
        let mut copies = Vec::new();
        let seq = self.seqs.get_mut(&id)?;
        if partial_shared && !tokens.is_empty() {
            let old = seq.blocks.pop()?;
            let new = self.pool.allocate()?;
            self.pool.release(old);
            seq.blocks.push(new);
            copies.push(CopyOp { src: old, dst: new });
        }
        while seq.blocks.len() < (n0 + tokens.len()).div_ceil(bs) {
            let b = self.pool.allocate()?;
            seq.blocks.push(b);
        }
        seq.tokens.extend_from_slice(tokens);
        // Register blocks that became full.
        if self.prefix_caching {
            while seq.hashes.len() < seq.tokens.len() / bs {
                let i = seq.hashes.len();
                let h = hash_block(seq.hashes.last().copied(), &seq.tokens[i * bs..(i + 1) * bs], &seq.extra);
                seq.hashes.push(h);
                self.pool.cache(seq.blocks[i], h);
            }
        }
        Some(copies)
    }

    /// Forks `parent` into a new sequence `child` that shares every block (copy-on-write).
    pub fn fork(&mut self, parent: SeqId, child: SeqId) -> bool {
        if self.seqs.contains_key(&child) {
            return false;
        }
        let Some(seq) = self.seqs.get(&parent).cloned() else { return false };
        for &b in &seq.blocks {
            self.pool.acquire(b);
        }
        self.seqs.insert(child, seq);
        true
    }

    /// Ends a sequence (finished, cancelled or preempted), releasing its blocks last-first so
    /// the deepest blocks of its chain are evicted first.
    pub fn free(&mut self, id: SeqId) -> bool {
        let Some(seq) = self.seqs.remove(&id) else { return false };
        for &b in seq.blocks.iter().rev() {
            self.pool.release(b);
        }
        true
    }

    /// A sequence's block table.
    pub fn block_table(&self, id: SeqId) -> Option<&[BlockId]> {
        self.seqs.get(&id).map(|s| s.blocks.as_slice())
    }

    /// Tokens recorded for a sequence.
    pub fn num_tokens(&self, id: SeqId) -> Option<usize> {
        self.seqs.get(&id).map(|s| s.tokens.len())
    }

    /// Live sequences.
    pub fn num_seqs(&self) -> usize {
        self.seqs.len()
    }

    /// Pool counts (used, cached, empty).
    pub fn stats(&self) -> PoolStats {
        self.pool.stats()
    }

    /// Free blocks.
    pub fn n_free(&self) -> usize {
        self.pool.n_free()
    }

    /// The pool (for inspection).
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_block_ids_prefix_reuse_and_eviction_order() {
        // 10 blocks of 4 tokens.
        let mut m = KvManager::new(10, 4, true);
        let prompt: Vec<u32> = (100..110).collect(); // 10 tokens: 2 full blocks + 2
        assert_eq!(m.add_sequence(1, &prompt, &[]), 0);
        assert_eq!(m.append(1, &prompt), Some(vec![]));
        assert_eq!(m.block_table(1).unwrap(), &[0, 1, 2]);
        assert_eq!(m.stats(), PoolStats { total: 10, used: 3, cached: 0, empty: 7 });

        // Same prompt again: the two full blocks are shared, the partial one is not.
        assert_eq!(m.add_sequence(2, &prompt, &[]), 8);
        assert_eq!(m.append(2, &prompt[8..]), Some(vec![]));
        assert_eq!(m.block_table(2).unwrap(), &[0, 1, 3]);
        // Seq 1 looked up one block (a miss), seq 2 two (both hits).
        assert_eq!((m.prefix_queries, m.prefix_hits), (3, 2));
        assert_eq!(m.stats().used, 4);

        // A different adapter never reuses those blocks.
        assert_eq!(m.add_sequence(3, &prompt, &[7, 1]), 0);
        m.free(3);

        // Free seq 1: blocks 0 and 1 are still held by seq 2; block 2 goes to the back.
        m.free(1);
        assert_eq!(m.pool().free_queue(), vec![4, 5, 6, 7, 8, 9, 2]);
        m.free(2);
        // Released last-first: 3 (partial), then 1, then 0 (the root is evicted last).
        assert_eq!(m.pool().free_queue(), vec![4, 5, 6, 7, 8, 9, 2, 3, 1, 0]);
        assert_eq!(m.stats(), PoolStats { total: 10, used: 0, cached: 2, empty: 8 });

        // The cached prefix survives until evicted.
        assert_eq!(m.add_sequence(4, &prompt, &[]), 8);
        assert_eq!(m.block_table(4).unwrap(), &[0, 1]);
    }

    #[test]
    fn never_caches_the_whole_prompt() {
        let mut m = KvManager::new(4, 4, true);
        let p: Vec<u32> = (0..8).collect();
        m.add_sequence(1, &p, &[]);
        m.append(1, &p).unwrap();
        m.free(1);
        // 8 tokens = 2 full blocks, but the last token must be computed: only 1 block reused.
        assert_eq!(m.add_sequence(2, &p, &[]), 4);
    }

    #[test]
    fn copy_on_write_of_a_shared_partial_block() {
        let mut m = KvManager::new(6, 4, true);
        m.add_sequence(1, &[1, 2, 3, 4, 5, 6], &[]);
        m.append(1, &[1, 2, 3, 4, 5, 6]).unwrap();
        assert!(m.fork(1, 2));
        assert_eq!(m.block_table(2).unwrap(), &[0, 1]);
        assert_eq!(m.pool().ref_count(1), 2);
        // Seq 2 writes into the shared partial block 1: it gets a private copy.
        assert_eq!(m.append(2, &[7]), Some(vec![CopyOp { src: 1, dst: 2 }]));
        assert_eq!(m.block_table(2).unwrap(), &[0, 2]);
        assert_eq!(m.pool().ref_count(1), 1);
        // Seq 1 now owns block 1 alone: no copy.
        assert_eq!(m.append(1, &[8]), Some(vec![]));
        assert_eq!(m.block_table(1).unwrap(), &[0, 1]);
    }

    #[test]
    fn allocation_failure_changes_nothing() {
        let mut m = KvManager::new(2, 4, false);
        m.add_sequence(1, &[], &[]);
        assert_eq!(m.append(1, &[0; 8]), Some(vec![]));
        m.add_sequence(2, &[], &[]);
        assert_eq!(m.append(2, &[0; 1]), None);
        assert_eq!(m.num_tokens(2), Some(0));
        assert_eq!(m.block_table(2).unwrap(), &[] as &[u32]);
        m.free(1);
        assert_eq!(m.append(2, &[0; 1]), Some(vec![]));
    }

    /// 1,000 random requests with random sharing, forks and cancellations: at every step each
    /// block's reference count equals the number of live sequences holding it, used blocks equal
    /// the distinct blocks held, every sequence has exactly ceil(tokens / block size) blocks;
    /// at the end every block is free (empty or cached) and nothing leaks.
    #[test]
    fn random_requests_never_leak_blocks() {
        let mut rng = 0x2545_F491_4F6C_DD1Du64;
        let mut rnd = move |m: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % m
        };
        let bs = 4;
        let mut m = KvManager::new(64, bs, true);
        let prefixes: Vec<Vec<u32>> = (0..5).map(|p| (0..12).map(|i| p * 100 + i).collect()).collect();
        let mut live: Vec<SeqId> = Vec::new();
        let mut next_id = 0u64;
        for _ in 0..1000 {
            match rnd(10) {
                0..=3 => {
                    let mut prompt = prefixes[rnd(5) as usize][..rnd(13) as usize].to_vec();
                    prompt.extend((0..rnd(10)).map(|_| rnd(1000) as u32));
                    let id = next_id;
                    next_id += 1;
                    let cached = m.add_sequence(id, &prompt, &[rnd(2)]);
                    if m.append(id, &prompt[cached..]).is_some() {
                        live.push(id);
                    } else {
                        m.free(id); // could not admit: give back what the prefix attached
                    }
                }
                4..=5 if !live.is_empty() => {
                    let id = live[rnd(live.len() as u64) as usize];
                    let n = 1 + rnd(6) as usize;
                    let toks: Vec<u32> = (0..n).map(|_| rnd(1000) as u32).collect();
                    let _ = m.append(id, &toks); // None = would preempt; fine here
                }
                6 if !live.is_empty() => {
                    let id = live[rnd(live.len() as u64) as usize];
                    let child = next_id;
                    next_id += 1;
                    assert!(m.fork(id, child));
                    live.push(child);
                }
                _ if !live.is_empty() => {
                    let i = rnd(live.len() as u64) as usize;
                    assert!(m.free(live.swap_remove(i)));
                }
                _ => {}
            }
            // Invariants.
            let mut holders: HashMap<BlockId, u32> = HashMap::new();
            for &id in &live {
                let t = m.block_table(id).unwrap();
                assert_eq!(t.len(), m.num_tokens(id).unwrap().div_ceil(bs), "seq {id}");
                for &b in t {
                    *holders.entry(b).or_default() += 1;
                }
            }
            for b in 0..64u32 {
                assert_eq!(m.pool().ref_count(b), holders.get(&b).copied().unwrap_or(0), "block {b}");
            }
            assert_eq!(m.stats().used, holders.len());
            assert_eq!(m.n_free(), 64 - holders.len());
        }
        for id in live.drain(..) {
            m.free(id);
        }
        let s = m.stats();
        assert_eq!(s.used, 0);
        assert_eq!(s.cached + s.empty, 64);
        assert_eq!(m.n_free(), 64);
        assert!(m.prefix_hits > 0, "the shared prefixes were reused");
    }
}
