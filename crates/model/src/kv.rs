//! A contiguous per-sequence KV cache in f16 (llama.cpp's default KV type). The paged,
//! multi-sequence cache of the serving engine is a separate component.

use half::f16;
use half::slice::HalfBitsSliceExt;

/// Keys and values of one sequence for every layer.
pub struct KvCache {
    /// Per layer, keys as f16 bit patterns: `[capacity × kv_dim]`. Stored as u16 so the
    /// allocation is zeroed by the allocator (calloc) and pages become resident only when a
    /// position is written: a 4096-token cache costs memory for the tokens actually used.
    k: Vec<Vec<u16>>,
    /// Per layer, values as f16 bits: `[capacity × kv_dim]`.
    v: Vec<Vec<u16>>,
    kv_dim: usize,
    capacity: usize,
    len: usize,
}

impl KvCache {
    /// A cache for `capacity` positions.
    pub fn new(n_layer: usize, kv_dim: usize, capacity: usize) -> KvCache {
        KvCache {
            k: (0..n_layer).map(|_| vec![0u16; capacity * kv_dim]).collect(),
            v: (0..n_layer).map(|_| vec![0u16; capacity * kv_dim]).collect(),
            kv_dim,
            capacity,
            len: 0,
        }
    }
    /// Positions filled.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Positions it can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    /// Forgets positions from `n` on (to reuse a common prefix).
    pub fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n);
    }
    pub(crate) fn set_len(&mut self, n: usize) {
        self.len = n;
    }
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.k.len() * 2 * self.capacity * self.kv_dim * 2
    }
    /// Stores one position's keys and values for a layer.
    pub(crate) fn write(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let o = pos * self.kv_dim;
        for (d, s) in self.k[layer][o..o + self.kv_dim].iter_mut().zip(k) {
            *d = f16::from_f32(*s).to_bits();
        }
        for (d, s) in self.v[layer][o..o + self.kv_dim].iter_mut().zip(v) {
            *d = f16::from_f32(*s).to_bits();
        }
    }
    /// All keys of a layer: `[capacity × kv_dim]`.
    pub(crate) fn keys(&self, layer: usize) -> &[f16] {
        self.k[layer].reinterpret_cast()
    }
    /// All values of a layer: `[capacity × kv_dim]`.
    pub(crate) fn values(&self, layer: usize) -> &[f16] {
        self.v[layer].reinterpret_cast()
    }
}
