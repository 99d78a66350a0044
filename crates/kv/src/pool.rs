//! The block pool: reference counts, LRU free queue, prefix-cache index.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

/// Index of a block in the pool.
pub type BlockId = u32;

/// Hash of a full block's content and everything before it.
pub type BlockHash = u64;

const NIL: u32 = u32::MAX;

/// `H(parent, tokens, extra)`: the identity of a full block of tokens given its whole prefix
/// (through `parent`) and anything else its keys and values depend on (`extra`: adapter id and
/// version). FNV-1a over the little-endian words: stable across runs and platforms.
pub fn hash_block(parent: Option<BlockHash>, tokens: &[u32], extra: &[u64]) -> BlockHash {
    struct Fnv(u64);
    impl Hasher for Fnv {
        fn finish(&self) -> u64 {
            self.0
        }
        fn write(&mut self, bytes: &[u8]) {
            for b in bytes {
                self.0 ^= *b as u64;
                self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
    }
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    parent.unwrap_or(0x9e37_79b9_7f4a_7c15).hash(&mut h);
    tokens.len().hash(&mut h);
    for t in tokens {
        t.hash(&mut h);
    }
    extra.hash(&mut h);
    h.finish()
}

#[derive(Debug, Clone)]
struct Meta {
    ref_count: u32,
    hash: Option<BlockHash>,
    prev: u32,
    next: u32,
    in_free: bool,
}

/// Counts for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Blocks in the pool.
    pub total: usize,
    /// Blocks held by at least one sequence.
    pub used: usize,
    /// Free blocks that still hold a cached prefix (reusable until evicted).
    pub cached: usize,
    /// Free blocks holding nothing.
    pub empty: usize,
}

/// A fixed pool of KV blocks.
#[derive(Debug)]
pub struct BlockPool {
    meta: Vec<Meta>,
    /// Free queue: front is evicted first.
    head: u32,
    tail: u32,
    n_free: usize,
    cached: HashMap<BlockHash, BlockId>,
}

impl BlockPool {
    /// A pool of `n_blocks` blocks, all free, ids in ascending order in the free queue.
    pub fn new(n_blocks: usize) -> BlockPool {
        assert!(n_blocks < NIL as usize, "too many blocks");
        let mut p = BlockPool {
            meta: Vec::with_capacity(n_blocks),
            head: NIL,
            tail: NIL,
            n_free: 0,
            cached: HashMap::new(),
        };
        for i in 0..n_blocks {
            p.meta.push(Meta {
                ref_count: 0,
                hash: None,
                prev: NIL,
                next: NIL,
                in_free: false,
            });
            p.push_back(i as u32);
        }
        p
    }

    /// Blocks in the pool.
    pub fn len(&self) -> usize {
        self.meta.len()
    }

    /// Whether the pool has no blocks.
    pub fn is_empty(&self) -> bool {
        self.meta.is_empty()
    }

    /// Free blocks (empty or cached).
    pub fn n_free(&self) -> usize {
        self.n_free
    }

    fn push_back(&mut self, b: u32) {
        let m = &mut self.meta[b as usize];
        debug_assert!(!m.in_free);
        m.in_free = true;
        m.prev = self.tail;
        m.next = NIL;
        if self.tail != NIL {
            self.meta[self.tail as usize].next = b;
        } else {
            self.head = b;
        }
        self.tail = b;
        self.n_free += 1;
    }

    fn unlink(&mut self, b: u32) {
        let (prev, next) = {
            let m = &self.meta[b as usize];
            debug_assert!(m.in_free);
            (m.prev, m.next)
        };
        if prev != NIL {
            self.meta[prev as usize].next = next;
        } else {
            self.head = next;
        }
        if next != NIL {
            self.meta[next as usize].prev = prev;
        } else {
            self.tail = prev;
        }
        let m = &mut self.meta[b as usize];
        m.in_free = false;
        m.prev = NIL;
        m.next = NIL;
        self.n_free -= 1;
    }

    /// Takes the least recently freed block (evicting its cached prefix, if any) with a
    /// reference count of 1; `None` when every block is in use.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let b = self.head;
        if b == NIL {
            return None;
        }
        self.unlink(b);
        if let Some(h) = self.meta[b as usize].hash.take() {
            if self.cached.get(&h) == Some(&b) {
                self.cached.remove(&h);
            }
        }
        self.meta[b as usize].ref_count = 1;
        Some(b)
    }

    /// Adds a reference to a block (sharing, or reusing a cached block taken off the free queue).
    pub fn acquire(&mut self, b: BlockId) {
        if self.meta[b as usize].in_free {
            self.unlink(b);
        }
        self.meta[b as usize].ref_count += 1;
    }

    /// Drops a reference; at zero the block joins the back of the free queue, keeping its
    /// cached prefix until it is evicted.
    pub fn release(&mut self, b: BlockId) {
        let m = &mut self.meta[b as usize];
        assert!(m.ref_count > 0, "release of free block {b}");
        m.ref_count -= 1;
        if m.ref_count == 0 {
            self.push_back(b);
        }
    }

    /// References to a block.
    pub fn ref_count(&self, b: BlockId) -> u32 {
        self.meta[b as usize].ref_count
    }

    /// Registers a full block under its chain hash (the first block with a hash keeps it).
    pub fn cache(&mut self, b: BlockId, h: BlockHash) {
        if self.meta[b as usize].hash.is_some() {
            return;
        }
        if let std::collections::hash_map::Entry::Vacant(e) = self.cached.entry(h) {
            e.insert(b);
            self.meta[b as usize].hash = Some(h);
        }
    }

    /// The cached block for a hash.
    pub fn lookup(&self, h: BlockHash) -> Option<BlockId> {
        self.cached.get(&h).copied()
    }

    /// The free queue, front (next evicted) first. For tests and debugging.
    pub fn free_queue(&self) -> Vec<BlockId> {
        let mut v = Vec::with_capacity(self.n_free);
        let mut b = self.head;
        while b != NIL {
            v.push(b);
            b = self.meta[b as usize].next;
        }
        v
    }

    /// Counts of used, cached and empty blocks.
    pub fn stats(&self) -> PoolStats {
        let used = self.meta.iter().filter(|m| m.ref_count > 0).count();
        let cached = self
            .meta
            .iter()
            .filter(|m| m.ref_count == 0 && m.hash.is_some())
            .count();
        PoolStats {
            total: self.meta.len(),
            used,
            cached,
            empty: self.meta.len() - used - cached,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_queue_is_lru_with_o1_middle_removal() {
        let mut p = BlockPool::new(10);
        assert_eq!(p.free_queue(), (0..10).collect::<Vec<_>>());
        let a: Vec<_> = (0..4).map(|_| p.allocate().unwrap()).collect();
        assert_eq!(a, vec![0, 1, 2, 3]);
        // Free in reverse (as a sequence does): its tail is evicted first.
        for &b in a.iter().rev() {
            p.release(b);
        }
        assert_eq!(p.free_queue(), vec![4, 5, 6, 7, 8, 9, 3, 2, 1, 0]);
        // Take block 2 out of the middle (a cache hit) and give it back.
        p.acquire(2);
        assert_eq!(p.free_queue(), vec![4, 5, 6, 7, 8, 9, 3, 1, 0]);
        assert_eq!(p.ref_count(2), 1);
        p.release(2);
        assert_eq!(p.free_queue(), vec![4, 5, 6, 7, 8, 9, 3, 1, 0, 2]);
    }

    #[test]
    fn allocation_evicts_cached_hashes() {
        let mut p = BlockPool::new(2);
        let b = p.allocate().unwrap();
        p.cache(b, 42);
        p.release(b);
        assert_eq!(p.lookup(42), Some(b));
        assert_eq!(
            p.stats(),
            PoolStats {
                total: 2,
                used: 0,
                cached: 1,
                empty: 1
            }
        );
        let x = p.allocate().unwrap();
        assert_eq!(x, 1, "the empty block goes first");
        let y = p.allocate().unwrap();
        assert_eq!(y, b);
        assert_eq!(p.lookup(42), None, "reusing the block evicts its prefix");
        assert!(p.allocate().is_none());
    }

    #[test]
    fn hash_depends_on_parent_tokens_and_extra() {
        let h = hash_block(None, &[1, 2, 3], &[]);
        assert_eq!(h, hash_block(None, &[1, 2, 3], &[]));
        assert_ne!(h, hash_block(Some(7), &[1, 2, 3], &[]));
        assert_ne!(h, hash_block(None, &[1, 2, 4], &[]));
        assert_ne!(
            h,
            hash_block(None, &[1, 2, 3], &[5, 1]),
            "adapter id/version"
        );
        assert_ne!(
            hash_block(None, &[1, 2, 3], &[5, 1]),
            hash_block(None, &[1, 2, 3], &[5, 2]),
            "adapter version"
        );
    }
}
