//! Paged KV storage in f16: per layer, a pool of `n_blocks` blocks of `block_size` positions.
//! A sequence reaches its positions through a block table (`&[u32]` of block ids, as handed out
//! by `ruvllm-kv`); a single sequence with one block of the whole context is the contiguous
//! special case the [`Runner`](crate::Runner) uses.

use half::f16;
use half::slice::HalfBitsSliceExt;
use ruvllm_kernels::quants::{quantize_q4_0, quantize_q8_0};
use ruvllm_kernels::SyncPtr;

/// How keys and values are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvType {
    /// 4 bytes per value (debugging).
    F32,
    /// 2 bytes per value (default; what llama.cpp uses).
    F16,
    /// ggml Q8_0: 34 bytes per 32 values (8.5 bits).
    Q8_0,
    /// ggml Q4_0: 18 bytes per 32 values (4.5 bits).
    Q4_0,
}

impl KvType {
    /// Parses `f32`, `f16`, `q8_0` or `q4_0`.
    pub fn parse(s: &str) -> Option<KvType> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Some(KvType::F32),
            "f16" => Some(KvType::F16),
            "q8_0" => Some(KvType::Q8_0),
            "q4_0" => Some(KvType::Q4_0),
            _ => None,
        }
    }
    /// The name `parse` reads.
    pub fn name(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::F16 => "f16",
            KvType::Q8_0 => "q8_0",
            KvType::Q4_0 => "q4_0",
        }
    }
    /// Bytes of one row of `n` values (`n` a multiple of 32 for the quantized types).
    pub fn row_bytes(self, n: usize) -> usize {
        match self {
            KvType::F32 => 4 * n,
            KvType::F16 => 2 * n,
            KvType::Q8_0 => n / 32 * 34,
            KvType::Q4_0 => n / 32 * 18,
        }
    }
    /// K and V bytes per token of a model with `n_layer` layers of `kv_dim` values.
    pub fn bytes_per_token(self, n_layer: usize, kv_dim: usize) -> usize {
        Self::pair_bytes_per_token(self, self, n_layer, kv_dim)
    }
    /// K and V bytes per token with keys stored as `k` and values as `v`.
    pub fn pair_bytes_per_token(k: KvType, v: KvType, n_layer: usize, kv_dim: usize) -> usize {
        n_layer * (k.row_bytes(kv_dim) + v.row_bytes(kv_dim))
    }
    /// The f16 tail a cache of this type keeps unless told otherwise (`--kv-tail`): 32
    /// positions for q4_0, none for the others. A whole-cache 4-bit cache loses most by its
    /// newest keys — queries attend sharply to their own and their neighbours' positions — so,
    /// as KIVI keeps a full-precision residual, q4_0 quantizes a block once it has fallen 32
    /// positions behind: +0.5% / +1.1% perplexity (SmolLM2 / Gemma-3) instead of +5.2% /
    /// +11.7% (docs/BENCHMARKS.md), for 32–47 positions of f16 per running sequence (at most
    /// 1.1 MB on SmolLM2).
    pub fn default_tail(self) -> Option<usize> {
        (self == KvType::Q4_0).then_some(32)
    }
    /// Whether the type stores 32-value blocks with a scale (q8_0, q4_0): heads must hold
    /// whole blocks, and the cache stores them Hadamard-rotated.
    pub fn is_quantized(self) -> bool {
        matches!(self, KvType::Q8_0 | KvType::Q4_0)
    }
}

/// Keys and values of every layer, in blocks.
pub struct KvCache {
    /// Per layer, key rows as 16-bit words (f16 bits, f32 halves, or the bytes of ggml blocks
    /// in little-endian pairs): `[n_blocks × block_size × row_words]`. u16 so the allocation is
    /// zeroed by the allocator (calloc) and pages become resident only when written.
    k: Vec<Vec<u16>>,
    /// Per layer, value rows: `[n_blocks × block_size × row_words]`.
    v: Vec<Vec<u16>>,
    kv_dim: usize,
    block_size: usize,
    n_blocks: usize,
    /// How keys are stored.
    k_ty: KvType,
    /// How values are stored.
    v_ty: KvType,
    /// 16-bit words per key row.
    k_words: usize,
    /// 16-bit words per value row.
    v_words: usize,
    /// Two-tier mode: the cold tier, holding block ids `n_blocks..n_blocks + cold.n_blocks`
    /// (rows after the hot ones) in a quantized type.
    cold: Option<Box<KvCache>>,
}

impl KvCache {
    /// f16 storage for `n_blocks` blocks of `block_size` positions in each of `n_layer` layers.
    pub fn new(n_layer: usize, kv_dim: usize, block_size: usize, n_blocks: usize) -> KvCache {
        Self::build(
            n_layer,
            kv_dim,
            block_size,
            n_blocks,
            KvType::F16,
            KvType::F16,
        )
    }

    /// Storage of type `ty`; the quantized types need heads of a multiple of 32 values (their
    /// blocks must not straddle heads). Returns `None` otherwise.
    pub fn with_type(
        n_layer: usize,
        kv_dim: usize,
        head_dim: usize,
        block_size: usize,
        n_blocks: usize,
        ty: KvType,
    ) -> Option<KvCache> {
        Self::with_types(n_layer, kv_dim, head_dim, block_size, n_blocks, ty, ty)
    }

    /// Keys stored as `k_ty` and values as `v_ty` (llama.cpp's `-ctk`/`-ctv`): 4-bit keys are
    /// what a 4-bit cache loses most by (docs/BENCHMARKS.md), so q8_0 keys with q4_0 values
    /// keep most of the saving. `None` as [`with_type`](Self::with_type).
    #[allow(clippy::too_many_arguments)]
    pub fn with_types(
        n_layer: usize,
        kv_dim: usize,
        head_dim: usize,
        block_size: usize,
        n_blocks: usize,
        k_ty: KvType,
        v_ty: KvType,
    ) -> Option<KvCache> {
        if (k_ty.is_quantized() || v_ty.is_quantized()) && head_dim % 32 != 0 {
            return None;
        }
        Some(Self::build(
            n_layer, kv_dim, block_size, n_blocks, k_ty, v_ty,
        ))
    }

    fn build(
        n_layer: usize,
        kv_dim: usize,
        block_size: usize,
        n_blocks: usize,
        k_ty: KvType,
        v_ty: KvType,
    ) -> KvCache {
        let (k_words, v_words) = (k_ty.row_bytes(kv_dim) / 2, v_ty.row_bytes(kv_dim) / 2);
        let rows = n_blocks * block_size;
        KvCache {
            k: (0..n_layer).map(|_| vec![0u16; rows * k_words]).collect(),
            v: (0..n_layer).map(|_| vec![0u16; rows * v_words]).collect(),
            kv_dim,
            block_size,
            n_blocks,
            k_ty,
            v_ty,
            k_words,
            v_words,
            cold: None,
        }
    }

    /// Two tiers: `n_hot` f16 blocks for recent tokens and `n_cold` blocks of `cold_ty` that
    /// older blocks migrate to ([`migrate_block`](Self::migrate_block)); cold block ids follow
    /// the hot ones, as `ruvllm-kv`'s two-tier manager hands them out. Keys and values are
    /// stored Hadamard-rotated in both tiers (see [`rotated`](Self::rotated)).
    pub fn with_tiers(
        n_layer: usize,
        kv_dim: usize,
        head_dim: usize,
        block_size: usize,
        n_hot: usize,
        n_cold: usize,
        cold_ty: KvType,
    ) -> Option<KvCache> {
        let mut kv = Self::build(n_layer, kv_dim, block_size, n_hot, KvType::F16, KvType::F16);
        kv.cold = Some(Box::new(Self::with_type(
            n_layer, kv_dim, head_dim, block_size, n_cold, cold_ty,
        )?));
        Some(kv)
    }

    fn hot_rows(&self) -> usize {
        self.n_blocks * self.block_size
    }

    /// Converts hot block `src` into cold block `dst` (ids as the manager gives them).
    pub fn migrate_block(&mut self, src: u32, dst: u32) {
        let (bs, kvd, n_hot) = (self.block_size, self.kv_dim, self.n_blocks as u32);
        let Some(cold) = self.cold.as_mut() else {
            return;
        };
        if src >= n_hot || dst < n_hot {
            return;
        }
        let mut k = vec![0f32; kvd];
        let mut v = vec![0f32; kvd];
        for layer in 0..self.k.len() {
            for j in 0..bs {
                let (hs, cs) = (src as usize * bs + j, (dst - n_hot) as usize * bs + j);
                decode_row(
                    self.k_ty,
                    &self.k[layer][hs * self.k_words..(hs + 1) * self.k_words],
                    0,
                    &mut k,
                );
                decode_row(
                    self.v_ty,
                    &self.v[layer][hs * self.v_words..(hs + 1) * self.v_words],
                    0,
                    &mut v,
                );
                cold.write(layer, cs, &k, &v);
            }
        }
    }

    /// How keys are stored.
    pub fn key_type(&self) -> KvType {
        self.k_ty
    }

    /// How values are stored.
    pub fn value_type(&self) -> KvType {
        self.v_ty
    }

    /// Whether keys and values of heads of `head_dim` values are stored Hadamard-rotated: for
    /// the quantized types when `head_dim` is a power of two. Queries are rotated the same way
    /// (dot products are unchanged) and attention outputs rotated back, so the model computes
    /// the same function while 4-bit blocks no longer lose a head's small channels to its one
    /// outlier channel.
    pub fn rotated(&self, head_dim: usize) -> bool {
        let quantized = |c: &KvCache| c.k_ty.is_quantized() || c.v_ty.is_quantized();
        (quantized(self) || self.cold.as_deref().is_some_and(quantized))
            && head_dim.is_power_of_two()
    }
    /// Positions per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    /// Blocks per layer (both tiers).
    pub fn n_blocks(&self) -> usize {
        self.n_blocks + self.cold.as_ref().map_or(0, |c| c.n_blocks)
    }
    /// Positions the storage can hold across all blocks.
    pub fn capacity(&self) -> usize {
        self.n_blocks() * self.block_size
    }
    /// Bytes of K and V per token over all layers.
    pub fn bytes_per_token(&self) -> usize {
        KvType::pair_bytes_per_token(self.k_ty, self.v_ty, self.k.len(), self.kv_dim)
    }
    /// Bytes allocated (both tiers).
    pub fn bytes(&self) -> usize {
        self.bytes_per_token() * self.hot_rows() + self.cold.as_ref().map_or(0, |c| c.bytes())
    }
    /// Row index of position `pos` of a sequence with block table `table`, or None when the
    /// table does not reach that far or names a block outside the pool.
    #[inline]
    pub fn slot(&self, table: &[u32], pos: usize) -> Option<usize> {
        let b = *table.get(pos / self.block_size)? as usize;
        (b < self.n_blocks()).then_some(b * self.block_size + pos % self.block_size)
    }
    /// Copies a whole block's keys and values (copy-on-write of a shared block).
    pub fn copy_block(&mut self, src: u32, dst: u32) {
        let n_hot = self.n_blocks as u32;
        if src >= n_hot || dst >= n_hot {
            match (self.cold.as_mut(), src >= n_hot, dst >= n_hot) {
                (Some(c), true, true) => c.copy_block(src - n_hot, dst - n_hot),
                (Some(_), false, true) => self.migrate_block(src, dst),
                _ => {}
            }
            return;
        }
        for (layers, words) in [(&mut self.k, self.k_words), (&mut self.v, self.v_words)] {
            let w = self.block_size * words;
            let (s, d) = (src as usize * w, dst as usize * w);
            for layer in layers.iter_mut() {
                layer.copy_within(s..s + w, d);
            }
        }
    }

    /// Stores one position's keys and values for a layer at row `slot`.
    pub(crate) fn write(&mut self, layer: usize, slot: usize, k: &[f32], v: &[f32]) {
        let hot = self.hot_rows();
        if slot >= hot {
            if let Some(c) = self.cold.as_mut() {
                c.write(layer, slot - hot, k, v);
            }
            return;
        }
        let (kw, vw) = (self.k_words, self.v_words);
        encode_row(self.k_ty, k, &mut self.k[layer][slot * kw..(slot + 1) * kw]);
        encode_row(self.v_ty, v, &mut self.v[layer][slot * vw..(slot + 1) * vw]);
    }

    /// A writer of layer `layer`'s hot rows that several pool tasks share, each storing its own
    /// positions ([`RowWriter::write`]): a batch's tokens store their keys and values in
    /// parallel.
    pub(crate) fn row_writer(&mut self, layer: usize) -> RowWriter<'_> {
        let hot = self.hot_rows();
        RowWriter {
            k: SyncPtr::new(&mut self.k[layer]),
            v: SyncPtr::new(&mut self.v[layer]),
            hot,
            k_words: self.k_words,
            v_words: self.v_words,
            k_ty: self.k_ty,
            v_ty: self.v_ty,
            _cache: std::marker::PhantomData,
        }
    }

    /// Key rows of a layer as f16, when the cache stores f16 (the fast path; hot rows only in
    /// two-tier mode): `[rows × kv_dim]`.
    pub(crate) fn keys_f16(&self, layer: usize) -> Option<&[f16]> {
        (self.k_ty == KvType::F16).then(|| self.k[layer].reinterpret_cast())
    }

    /// Whether older blocks migrate to a quantized cold tier ([`with_tiers`](Self::with_tiers)).
    pub(crate) fn has_cold(&self) -> bool {
        self.cold.is_some()
    }

    /// Value rows of a layer as f16, when the cache stores f16: `[rows × kv_dim]`.
    pub(crate) fn values_f16(&self, layer: usize) -> Option<&[f16]> {
        (self.v_ty == KvType::F16).then(|| self.v[layer].reinterpret_cast())
    }

    /// Values `off..off + hd` of rows `slot..slot + m` (`m = out.len() / hd`, consecutive slots
    /// of one block) of a layer's keys or values into `out` (`[m × hd]`), as [`read`](Self::read)
    /// row by row.
    pub(crate) fn read_run(
        &self,
        layer: usize,
        value: bool,
        slot: usize,
        off: usize,
        hd: usize,
        out: &mut [f32],
    ) {
        let hot = self.hot_rows();
        if slot >= hot {
            if let Some(c) = self.cold.as_ref() {
                c.read_run(layer, value, slot - hot, off, hd, out);
            }
            return;
        }
        let (rows, words, ty) = if value {
            (&self.v[layer], self.v_words, self.v_ty)
        } else {
            (&self.k[layer], self.k_words, self.k_ty)
        };
        for (r, o) in out.chunks_exact_mut(hd).enumerate() {
            let s = slot + r;
            decode_row(ty, &rows[s * words..(s + 1) * words], off, o);
        }
    }

    /// Values `off..off + out.len()` of row `slot` of a layer's keys (`value = false`) or values,
    /// as f32. For the quantized types `off` and the length are multiples of 32.
    pub(crate) fn read(&self, layer: usize, value: bool, slot: usize, off: usize, out: &mut [f32]) {
        self.read_run(layer, value, slot, off, out.len(), out);
    }
}

/// One layer's hot rows, written by several pool tasks at once ([`KvCache::row_writer`]).
pub(crate) struct RowWriter<'a> {
    k: SyncPtr<u16>,
    v: SyncPtr<u16>,
    /// Hot rows of the layer (the buffers hold `hot × k_words` and `hot × v_words` words).
    hot: usize,
    k_words: usize,
    v_words: usize,
    k_ty: KvType,
    v_ty: KvType,
    _cache: std::marker::PhantomData<&'a mut KvCache>,
}

impl RowWriter<'_> {
    /// Stores one position's keys and values at row `slot`, as [`KvCache::write`] does; false
    /// (nothing written) when `slot` is not a hot row (a two-tier cache's cold rows go through
    /// [`KvCache::write`]).
    ///
    /// # Safety
    /// No other call writes the same `slot` meanwhile.
    pub(crate) unsafe fn write(&self, slot: usize, k: &[f32], v: &[f32]) -> bool {
        if slot >= self.hot {
            return false;
        }
        // SAFETY: slot < hot, so both rows lie inside the layer's buffers, which the writer
        // borrows mutably for its lifetime; the caller guarantees no other task touches the slot.
        let (kr, vr) = unsafe {
            (
                self.k.slice(slot * self.k_words, self.k_words),
                self.v.slice(slot * self.v_words, self.v_words),
            )
        };
        encode_row(self.k_ty, k, kr);
        encode_row(self.v_ty, v, vr);
        true
    }
}

/// Encodes `x` as one row of 16-bit words of type `ty`.
fn encode_row(ty: KvType, x: &[f32], out: &mut [u16]) {
    match ty {
        KvType::F16 => ruvllm_kernels::ops::f32_to_f16(x, out.reinterpret_cast_mut()),
        KvType::F32 => {
            for (s, d) in x.iter().zip(out.chunks_exact_mut(2)) {
                let b = s.to_bits();
                d[0] = b as u16;
                d[1] = (b >> 16) as u16;
            }
        }
        KvType::Q8_0 | KvType::Q4_0 => {
            let bytes_per = if ty == KvType::Q8_0 { 34 } else { 18 };
            let mut blk = [0u8; 34];
            for (xb, ob) in x.chunks_exact(32).zip(out.chunks_exact_mut(bytes_per / 2)) {
                if ty == KvType::Q8_0 {
                    quantize_q8_0(xb, &mut blk[..34]);
                } else {
                    quantize_q4_0(xb, &mut blk[..18]);
                }
                for (w, b) in ob.iter_mut().zip(blk.chunks_exact(2)) {
                    *w = u16::from_le_bytes([b[0], b[1]]);
                }
            }
        }
    }
}

/// Decodes values `off..off + out.len()` of a row of type `ty`.
fn decode_row(ty: KvType, row: &[u16], off: usize, out: &mut [f32]) {
    match ty {
        KvType::F16 => {
            let h: &[f16] = row.reinterpret_cast();
            ruvllm_kernels::ops::f16_to_f32(&h[off..off + out.len()], out);
        }
        KvType::F32 => {
            for (d, w) in out.iter_mut().zip(row[2 * off..].chunks_exact(2)) {
                *d = f32::from_bits(w[0] as u32 | (w[1] as u32) << 16);
            }
        }
        KvType::Q8_0 => ruvllm_kernels::ops::dequant_q8_0(&row[off / 32 * 17..], out),
        KvType::Q4_0 => ruvllm_kernels::ops::dequant_q4_0(&row[off / 32 * 9..], out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ruvllm_gguf::GgmlType;
    use ruvllm_kernels::quants::dequantize_row;

    #[test]
    fn every_type_round_trips_through_its_rows() {
        let kvd = 128;
        let x: Vec<f32> = (0..kvd)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let y: Vec<f32> = x.iter().map(|v| -v * 0.5).collect();
        for (ty, tol) in [
            (KvType::F32, 0.0),
            (KvType::F16, 4e-3),
            (KvType::Q8_0, 0.03),
            (KvType::Q4_0, 0.5),
        ] {
            let mut kv = KvCache::with_type(2, kvd, 64, 4, 3, ty).unwrap();
            assert_eq!(kv.bytes_per_token(), 2 * 2 * ty.row_bytes(kvd));
            kv.write(1, 7, &x, &y);
            kv.copy_block(1, 2); // slot 7 (block 1) → slot 11 (block 2)
            for slot in [7, 11] {
                let mut out = vec![0f32; 64];
                kv.read(1, false, slot, 64, &mut out);
                for (a, b) in out.iter().zip(&x[64..]) {
                    assert!(
                        (a - b).abs() <= tol * b.abs().max(1.0),
                        "{ty:?} key: {a} vs {b}"
                    );
                }
                kv.read(1, true, slot, 0, &mut out);
                for (a, b) in out.iter().zip(&y[..64]) {
                    assert!(
                        (a - b).abs() <= tol * b.abs().max(1.0),
                        "{ty:?} value: {a} vs {b}"
                    );
                }
            }
            // Other layers and rows are untouched.
            let mut out = vec![1f32; kvd];
            kv.read(0, false, 7, 0, &mut out);
            assert!(out.iter().all(|&v| v == 0.0));
        }
        assert!(
            KvCache::with_type(1, 96, 48, 4, 1, KvType::Q8_0).is_none(),
            "heads must hold whole blocks"
        );
    }

    /// Keys and values of different types: each row in its own type (sizes, round trip within
    /// that type's tolerance, block copies of both), and the cache is rotated when either is
    /// quantized.
    #[test]
    fn keys_and_values_keep_their_own_types() {
        let kvd = 128;
        let x: Vec<f32> = (0..kvd)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let y: Vec<f32> = x.iter().map(|v| -v * 0.5).collect();
        for (k_ty, v_ty, k_tol, v_tol) in [
            (KvType::Q8_0, KvType::Q4_0, 0.03, 0.5),
            (KvType::F16, KvType::Q8_0, 4e-3, 0.03),
            (KvType::Q4_0, KvType::F32, 0.5, 0.0),
        ] {
            let mut kv = KvCache::with_types(2, kvd, 64, 4, 3, k_ty, v_ty).unwrap();
            assert_eq!(
                kv.bytes_per_token(),
                2 * (k_ty.row_bytes(kvd) + v_ty.row_bytes(kvd))
            );
            assert_eq!((kv.key_type(), kv.value_type()), (k_ty, v_ty));
            assert!(kv.rotated(64));
            assert_eq!(kv.keys_f16(1).is_some(), k_ty == KvType::F16);
            assert_eq!(kv.values_f16(1).is_some(), v_ty == KvType::F16);
            kv.write(1, 7, &x, &y);
            kv.copy_block(1, 2);
            for slot in [7, 11] {
                let mut out = vec![0f32; kvd];
                kv.read(1, false, slot, 0, &mut out);
                assert!(
                    out.iter()
                        .zip(&x)
                        .all(|(a, b)| (a - b).abs() <= k_tol * b.abs().max(1.0)),
                    "{k_ty:?} keys"
                );
                kv.read(1, true, slot, 0, &mut out);
                assert!(
                    out.iter()
                        .zip(&y)
                        .all(|(a, b)| (a - b).abs() <= v_tol * b.abs().max(1.0)),
                    "{v_ty:?} values"
                );
            }
        }
        assert!(
            KvCache::with_types(1, 96, 48, 4, 1, KvType::F16, KvType::Q4_0).is_none(),
            "heads must hold whole blocks"
        );
    }

    #[test]
    fn two_tiers_address_blocks_past_the_hot_ones_and_migrate() {
        let kvd = 64;
        let x: Vec<f32> = (0..kvd).map(|i| (i as f32 * 0.37).sin()).collect();
        // 2 hot blocks (ids 0, 1) and 2 cold ones (ids 2, 3) of 4 positions.
        let mut kv = KvCache::with_tiers(1, kvd, 64, 4, 2, 2, KvType::Q8_0).unwrap();
        assert_eq!(kv.n_blocks(), 4);
        assert_eq!(kv.slot(&[1, 3], 5), Some(13));
        assert!(kv.rotated(64));
        kv.write(0, 6, &x, &x); // block 1, position 2
        kv.migrate_block(1, 3);
        let mut out = vec![0f32; kvd];
        kv.read(0, false, 14, 0, &mut out); // block 3, position 2
        for (a, b) in out.iter().zip(&x) {
            assert!((a - b).abs() < 0.02, "{a} vs {b}");
        }
        // Writes to cold rows land in the cold tier.
        kv.write(0, 9, &x, &x);
        kv.read(0, true, 9, 0, &mut out);
        assert!((out[3] - x[3]).abs() < 0.02);
        assert_eq!(kv.keys_f16(0).map(|k| k.len()), Some(8 * kvd));
    }

    #[test]
    fn quantized_rows_decode_like_ggml_blocks() {
        // The word packing is the ggml block layout: decoding equals ggml's dequantization of
        // the same quantized bytes.
        let x: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        for (ty, gt, bytes) in [
            (KvType::Q8_0, GgmlType::Q8_0, 34),
            (KvType::Q4_0, GgmlType::Q4_0, 18),
        ] {
            let mut q = vec![0u8; 2 * bytes];
            if ty == KvType::Q8_0 {
                quantize_q8_0(&x, &mut q)
            } else {
                quantize_q4_0(&x, &mut q)
            }
            let mut want = vec![0f32; 64];
            assert!(dequantize_row(gt, &q, &mut want));
            let mut kv = KvCache::with_type(1, 64, 64, 1, 1, ty).unwrap();
            kv.write(0, 0, &x, &x);
            let mut got = vec![0f32; 64];
            kv.read(0, false, 0, 0, &mut got);
            assert_eq!(got, want, "{ty:?}");
        }
    }
}
