//! Paged KV storage in f16: per layer, a pool of `n_blocks` blocks of `block_size` positions.
//! A sequence reaches its positions through a block table (`&[u32]` of block ids, as handed out
//! by `ruvllm-kv`); a single sequence with one block of the whole context is the contiguous
//! special case the [`Runner`](crate::Runner) uses.

use half::f16;
use half::slice::HalfBitsSliceExt;

/// Keys and values of every layer, in blocks.
pub struct KvCache {
    /// Per layer, keys as f16 bit patterns: `[n_blocks × block_size × kv_dim]`. Stored as u16 so
    /// the allocation is zeroed by the allocator (calloc) and pages become resident only when a
    /// position is written.
    k: Vec<Vec<u16>>,
    /// Per layer, values as f16 bits: `[n_blocks × block_size × kv_dim]`.
    v: Vec<Vec<u16>>,
    kv_dim: usize,
    block_size: usize,
    n_blocks: usize,
}

impl KvCache {
    /// Storage for `n_blocks` blocks of `block_size` positions in each of `n_layer` layers.
    pub fn new(n_layer: usize, kv_dim: usize, block_size: usize, n_blocks: usize) -> KvCache {
        let n = n_blocks * block_size * kv_dim;
        KvCache {
            k: (0..n_layer).map(|_| vec![0u16; n]).collect(),
            v: (0..n_layer).map(|_| vec![0u16; n]).collect(),
            kv_dim,
            block_size,
            n_blocks,
        }
    }
    /// Positions per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    /// Blocks per layer.
    pub fn n_blocks(&self) -> usize {
        self.n_blocks
    }
    /// Positions the storage can hold across all blocks.
    pub fn capacity(&self) -> usize {
        self.n_blocks * self.block_size
    }
    /// Bytes of K and V per token over all layers.
    pub fn bytes_per_token(&self) -> usize {
        self.k.len() * 2 * self.kv_dim * 2
    }
    /// Bytes allocated.
    pub fn bytes(&self) -> usize {
        self.bytes_per_token() * self.capacity()
    }
    /// Row index of position `pos` of a sequence with block table `table`, or None when the
    /// table does not reach that far or names a block outside the pool.
    #[inline]
    pub fn slot(&self, table: &[u32], pos: usize) -> Option<usize> {
        let b = *table.get(pos / self.block_size)? as usize;
        (b < self.n_blocks).then_some(b * self.block_size + pos % self.block_size)
    }
    /// Copies a whole block's keys and values (copy-on-write of a shared block).
    pub fn copy_block(&mut self, src: u32, dst: u32) {
        let w = self.block_size * self.kv_dim;
        let (s, d) = (src as usize * w, dst as usize * w);
        for layer in self.k.iter_mut().chain(self.v.iter_mut()) {
            layer.copy_within(s..s + w, d);
        }
    }
    /// Stores one position's keys and values for a layer at row `slot`.
    pub(crate) fn write(&mut self, layer: usize, slot: usize, k: &[f32], v: &[f32]) {
        let o = slot * self.kv_dim;
        for (d, s) in self.k[layer][o..o + self.kv_dim].iter_mut().zip(k) {
            *d = f16::from_f32(*s).to_bits();
        }
        for (d, s) in self.v[layer][o..o + self.kv_dim].iter_mut().zip(v) {
            *d = f16::from_f32(*s).to_bits();
        }
    }
    /// All key rows of a layer: `[rows × kv_dim]`.
    pub(crate) fn keys(&self, layer: usize) -> &[f16] {
        self.k[layer].reinterpret_cast()
    }
    /// All value rows of a layer: `[rows × kv_dim]`.
    pub(crate) fn values(&self, layer: usize) -> &[f16] {
        self.v[layer].reinterpret_cast()
    }
}
