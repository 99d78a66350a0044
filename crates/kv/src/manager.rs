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

/// Block tables of all live sequences over one pool, and optionally a second, cold pool that
/// older blocks migrate to (two-tier KV: recent tokens in full precision, older ones quantized).
/// Cold block ids follow the hot ones (`n_hot..n_hot + n_cold`); cold blocks are never in the
/// prefix cache (the hot original keeps its hash until evicted).
#[derive(Debug)]
pub struct KvManager {
    pool: BlockPool,
    cold: Option<BlockPool>,
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
        KvManager {
            pool: BlockPool::new(n_blocks),
            cold: None,
            block_size,
            prefix_caching,
            seqs: HashMap::new(),
            prefix_queries: 0,
            prefix_hits: 0,
        }
    }

    /// A manager of `n_hot` blocks that new tokens go to and `n_cold` blocks that full blocks
    /// can [`migrate`](Self::migrate) to.
    pub fn with_cold_tier(
        n_hot: usize,
        n_cold: usize,
        block_size: usize,
        prefix_caching: bool,
    ) -> KvManager {
        let mut m = Self::new(n_hot, block_size, prefix_caching);
        m.cold = Some(BlockPool::new(n_cold));
        m
    }

    fn acquire_any(&mut self, b: BlockId) {
        let n_hot = self.pool.len() as u32;
        match &mut self.cold {
            Some(c) if b >= n_hot => c.acquire(b - n_hot),
            _ => self.pool.acquire(b),
        }
    }

    fn release_any(&mut self, b: BlockId) {
        let n_hot = self.pool.len() as u32;
        match &mut self.cold {
            Some(c) if b >= n_hot => c.release(b - n_hot),
            _ => self.pool.release(b),
        }
    }

    /// The reference count of block `b` (hot or cold).
    pub fn ref_count(&self, b: BlockId) -> u32 {
        let n_hot = self.pool.len() as u32;
        match &self.cold {
            Some(c) if b >= n_hot => c.ref_count(b - n_hot),
            _ => self.pool.ref_count(b),
        }
    }

    /// Whether block `b` is in the cold tier.
    pub fn is_cold(&self, b: BlockId) -> bool {
        self.cold.is_some() && b as usize >= self.pool.len()
    }

    /// Moves block `index` of sequence `id` to the cold tier: only a full hot block that no
    /// other sequence shares, and only when a cold block is free. Returns the copy to make
    /// (hot `src` → cold `dst`, converting precision); the hot block is released and stays in
    /// the prefix cache until evicted.
    pub fn migrate(&mut self, id: SeqId, index: usize) -> Option<CopyOp> {
        let bs = self.block_size;
        let n_hot = self.pool.len() as u32;
        let seq = self.seqs.get(&id)?;
        let b = *seq.blocks.get(index)?;
        if b >= n_hot || (index + 1) * bs > seq.tokens.len() || self.pool.ref_count(b) != 1 {
            return None;
        }
        let c = self.cold.as_mut()?.allocate()? + n_hot;
        let seq = self.seqs.get_mut(&id)?;
        seq.blocks[index] = c;
        self.pool.release(b);
        Some(CopyOp { src: b, dst: c })
    }

    /// Counts of the cold pool (None without a cold tier).
    pub fn cold_stats(&self) -> Option<PoolStats> {
        self.cold.as_ref().map(BlockPool::stats)
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
        self.add_sequence_computing_from(id, prompt, extra, prompt.len().saturating_sub(1))
    }

    /// [`add_sequence`](Self::add_sequence) for a caller that needs the model's outputs at
    /// positions `from..` (training captures): only blocks that end at or before `from` are
    /// taken from the cache.
    pub fn add_sequence_computing_from(
        &mut self,
        id: SeqId,
        prompt: &[u32],
        extra: &[u64],
        from: usize,
    ) -> usize {
        assert!(!self.seqs.contains_key(&id), "sequence {id} exists");
        let mut seq = Seq {
            blocks: Vec::new(),
            tokens: Vec::new(),
            hashes: Vec::new(),
            extra: extra.to_vec(),
        };
        if self.prefix_caching && !prompt.is_empty() {
            let max_blocks = from.min(prompt.len() - 1) / self.block_size;
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
        let partial_shared =
            n0 % bs != 0 && seq.blocks.last().is_some_and(|&b| self.ref_count(b) > 1);
        let needed = (n0 + tokens.len())
            .div_ceil(bs)
            .saturating_sub(seq.blocks.len())
            + partial_shared as usize;
        if needed > self.pool.n_free() {
            return None;
        }
        let mut copies = Vec::new();
        let seq = self.seqs.get_mut(&id)?;
        if partial_shared && !tokens.is_empty() {
            let old = seq.blocks.pop()?;
            let new = self.pool.allocate()?;
            seq.blocks.push(new);
            self.release_any(old);
            copies.push(CopyOp { src: old, dst: new });
        }
        let seq = self.seqs.get_mut(&id)?;
        while seq.blocks.len() < (n0 + tokens.len()).div_ceil(bs) {
            let b = self.pool.allocate()?;
            seq.blocks.push(b);
        }
        seq.tokens.extend_from_slice(tokens);
        // Register blocks that became full.
        if self.prefix_caching {
            while seq.hashes.len() < seq.tokens.len() / bs {
                let i = seq.hashes.len();
                let h = hash_block(
                    seq.hashes.last().copied(),
                    &seq.tokens[i * bs..(i + 1) * bs],
                    &seq.extra,
                );
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
        let Some(seq) = self.seqs.get(&parent).cloned() else {
            return false;
        };
        for &b in &seq.blocks {
            self.acquire_any(b);
        }
        self.seqs.insert(child, seq);
        true
    }

    /// Ends a sequence (finished, cancelled or preempted), releasing its blocks last-first so
    /// the deepest blocks of its chain are evicted first.
    pub fn free(&mut self, id: SeqId) -> bool {
        let Some(seq) = self.seqs.remove(&id) else {
            return false;
        };
        for &b in seq.blocks.iter().rev() {
            self.release_any(b);
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
        assert_eq!(
            m.stats(),
            PoolStats {
                total: 10,
                used: 3,
                cached: 0,
                empty: 7
            }
        );

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
        assert_eq!(
            m.stats(),
            PoolStats {
                total: 10,
                used: 0,
                cached: 2,
                empty: 8
            }
        );

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
    fn full_unshared_blocks_migrate_to_the_cold_tier() {
        // 4 hot blocks (ids 0..4) and 3 cold ones (ids 4..7), 4 tokens per block.
        let mut m = KvManager::with_cold_tier(4, 3, 4, true);
        let p: Vec<u32> = (0..10).collect();
        m.add_sequence(1, &p, &[]);
        m.append(1, &p).unwrap();
        assert_eq!(m.block_table(1).unwrap(), &[0, 1, 2]);
        // Block 2 is partial: stays hot.
        assert_eq!(m.migrate(1, 2), None);
        assert_eq!(m.migrate(1, 0), Some(CopyOp { src: 0, dst: 4 }));
        assert_eq!(m.block_table(1).unwrap(), &[4, 1, 2]);
        assert!(m.is_cold(4) && !m.is_cold(1));
        assert_eq!(m.ref_count(4), 1);
        assert_eq!(m.ref_count(0), 0);
        assert_eq!(m.cold_stats().unwrap().used, 1);
        // The hot original stays cached: a new sequence with the same prefix reuses it.
        assert_eq!(m.add_sequence(2, &p, &[]), 8);
        assert_eq!(m.block_table(2).unwrap(), &[0, 1]);
        // Shared blocks do not migrate; forks share cold blocks with reference counts.
        assert_eq!(m.migrate(1, 1), None);
        assert!(m.fork(1, 3));
        assert_eq!(m.ref_count(4), 2);
        m.free(1);
        m.free(3);
        m.free(2);
        assert_eq!(m.cold_stats().unwrap().used, 0);
        assert_eq!(m.stats().used, 0);
        // A full cold tier: migration declines, nothing changes.
        let mut m = KvManager::with_cold_tier(4, 1, 4, false);
        m.add_sequence(1, &[], &[]);
        m.append(1, &[0; 12]).unwrap();
        assert!(m.migrate(1, 0).is_some());
        assert_eq!(m.migrate(1, 1), None);
        assert_eq!(m.block_table(1).unwrap(), &[4, 1, 2]);
        // Without a cold tier nothing migrates.
        let mut m = KvManager::new(4, 4, false);
        m.add_sequence(1, &[], &[]);
        m.append(1, &[0; 8]).unwrap();
        assert_eq!(m.migrate(1, 0), None);
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
        random_requests(false);
    }

    #[test]
    fn random_requests_with_a_cold_tier_never_leak_blocks() {
        random_requests(true);
    }

    fn random_requests(cold: bool) {
        let mut rng = 0x2545_F491_4F6C_DD1Du64;
        let mut rnd = move |m: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % m
        };
        let bs = 4;
        let n_cold = if cold { 16 } else { 0 };
        let mut m = if cold {
            KvManager::with_cold_tier(64, n_cold, bs, true)
        } else {
            KvManager::new(64, bs, true)
        };
        let mut migrated = 0;
        let prefixes: Vec<Vec<u32>> = (0..5)
            .map(|p| (0..12).map(|i| p * 100 + i).collect())
            .collect();
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
                7 if cold && !live.is_empty() => {
                    let id = live[rnd(live.len() as u64) as usize];
                    let n = m.block_table(id).unwrap().len();
                    if n > 0 && m.migrate(id, rnd(n as u64) as usize).is_some() {
                        migrated += 1;
                    }
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
            for b in 0..(64 + n_cold) as u32 {
                assert_eq!(
                    m.ref_count(b),
                    holders.get(&b).copied().unwrap_or(0),
                    "block {b}"
                );
            }
            let hot_held = holders.keys().filter(|&&b| b < 64).count();
            assert_eq!(m.stats().used, hot_held);
            assert_eq!(m.n_free(), 64 - hot_held);
            if cold {
                assert_eq!(m.cold_stats().unwrap().used, holders.len() - hot_held);
            }
        }
        assert_eq!(migrated > 0, cold);
        for id in live.drain(..) {
            m.free(id);
        }
        let s = m.stats();
        assert_eq!(s.used, 0);
        assert_eq!(s.cached + s.empty, 64);
        if cold {
            assert_eq!(m.cold_stats().unwrap().used, 0);
        }
        assert_eq!(m.n_free(), 64);
        assert!(m.prefix_hits > 0, "the shared prefixes were reused");
    }
}
