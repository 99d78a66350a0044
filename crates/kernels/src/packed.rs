//! Row-interleaved ("packed") weight layouts, made once at load time, and their scalar twins.
//!
//! A packed matrix stores groups of [`GROUP`] rows. For each group and each 32-element block it
//! keeps one record: the group's eight f16 scales (and, for Q4_1, eight f16 minima), then the
//! quants arranged so that 32-byte vector `k` holds elements `4k..4k+4` of each of the eight rows
//! (`row r` in bytes `4r..4r+4`). One `vpdpbusd` of that vector against the activation's four
//! bytes `4k..4k+4` broadcast adds four products to each row's lane, so eight of them give every
//! row's exact integer block dot in its own lane: no horizontal sums, one float FMA per block for
//! eight rows, and the same arithmetic whether one token or eight are multiplied (batch
//! invariance by construction).
//!
//! Quants are stored unsigned (`vpdpbusd` multiplies unsigned × signed bytes) with a per-type
//! offset that the kernel removes exactly by starting each block's integer sum at
//! `-offset · Σa` (the activation's block sum, [`crate::act::QuantActs::bsums`]):
//!
//! | type | record bytes | quants | offset |
//! | --- | ---: | --- | ---: |
//! | Q4_0 | 8 × 18 | four 32-byte vectors of nibble pairs: vector k holds elements 4k.. (low) and 16+4k.. (high) | 8 |
//! | Q4_1 | 8 × 20 | as Q4_0, after 8 f16 minima | 0 |
//! | Q5_0 | 8 × 22 | 8 32-bit masks of the fifth bits (mask k, bit 4r+j: element 4k+j of row r), then as Q4_0 | 16 |
//! | Q8_0 | 8 × 34 | eight 32-byte vectors, each byte `q ^ 0x80` | 128 |
//!
//! A record is exactly as large as the eight blocks it replaces, so a packed model takes no more
//! memory than the file (the original pages are released after packing).
//!
//! Per (row, token) the result is `acc = Σ_blocks fma(float(isum_b), d_w·d_a, acc)` in block order
//! (plus `Σ fma(m, s_a)` for Q4_1, added at the end), which the scalar twin [`dot_group_scalar`]
//! computes with `f32::mul_add`, so SIMD and scalar agree bit for bit.

use crate::act::ActRow;
use crate::dispatch::Tier;
use crate::GgmlType;

/// Rows per interleaved group.
pub const GROUP: usize = 8;

/// The types with a packed layout.
pub const PACKABLE: [GgmlType; 4] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q8_0,
];

/// Whether `ty` has a packed layout.
pub fn packable(ty: GgmlType) -> bool {
    PACKABLE.contains(&ty)
}

/// Whether a `rows × cols` matrix of `ty` has a packed layout.
pub fn can_pack(ty: GgmlType, rows: usize, cols: usize) -> bool {
    packable(ty) && rows % GROUP == 0 && cols % 32 == 0
}

/// Bytes of one group record (eight rows × one block).
pub fn record_bytes(ty: GgmlType) -> usize {
    GROUP * ty.type_size()
}

/// The offset added to every quant of `ty` in the packed layout.
pub fn offset(ty: GgmlType) -> i32 {
    match ty {
        GgmlType::Q4_0 => 8,
        GgmlType::Q5_0 => 16,
        GgmlType::Q8_0 => 128,
        _ => 0,
    }
}

/// Repacks a `rows × cols` matrix of `ty` (ggml layout, `data`) into the row-interleaved layout,
/// or None when the type has none or `rows` is not a multiple of [`GROUP`].
pub fn pack(ty: GgmlType, rows: usize, cols: usize, data: &[u8]) -> Option<Vec<u8>> {
    if !can_pack(ty, rows, cols) || data.len() < rows * (cols / 32) * ty.type_size() {
        return None;
    }
    let mut out = vec![0u8; rows * (cols / 32) * ty.type_size()];
    pack_rows(ty, cols, data, &mut out);
    Some(out)
}

/// Repacks whole groups: `data` holds `8n` rows of `cols` in ggml layout and `out` receives their
/// `n` packed groups (the same number of bytes). Lets a caller pack a large matrix in pieces
/// and release each piece of the source as it goes.
///
/// # Panics
/// If `ty` is not [`packable`], `cols` is not a multiple of 32, or the lengths do not match.
pub fn pack_rows(ty: GgmlType, cols: usize, data: &[u8], out: &mut [u8]) {
    assert!(
        packable(ty) && cols % 32 == 0,
        "pack_rows: {ty} × {cols} has no packed layout"
    );
    let ts = ty.type_size();
    let nb = cols / 32;
    assert!(
        data.len() == out.len() && data.len() % (GROUP * nb * ts) == 0,
        "pack_rows: whole groups only"
    );
    let rb = record_bytes(ty);
    for g in 0..data.len() / (GROUP * nb * ts) {
        for i in 0..nb {
            let rec = &mut out[(g * nb + i) * rb..(g * nb + i + 1) * rb];
            let block = |r: usize| {
                let o = ((g * GROUP + r) * nb + i) * ts;
                &data[o..o + ts]
            };
            for r in 0..GROUP {
                rec[2 * r..2 * r + 2].copy_from_slice(&block(r)[0..2]);
            }
            match ty {
                GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 => {
                    let (qs_off, q_at) = match ty {
                        GgmlType::Q4_0 => (16, 2),
                        GgmlType::Q4_1 => (32, 4),
                        _ => (48, 6),
                    };
                    if ty == GgmlType::Q4_1 {
                        for r in 0..GROUP {
                            rec[16 + 2 * r..18 + 2 * r].copy_from_slice(&block(r)[2..4]);
                        }
                    }
                    if ty == GgmlType::Q5_0 {
                        for k in 0..8 {
                            let mut mask = 0u32;
                            for r in 0..GROUP {
                                let b = block(r);
                                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                                mask |= ((qh >> (4 * k)) & 0xF) << (4 * r);
                            }
                            rec[16 + 4 * k..20 + 4 * k].copy_from_slice(&mask.to_le_bytes());
                        }
                    }
                    for k in 0..4 {
                        for r in 0..GROUP {
                            let o = qs_off + 32 * k + 4 * r;
                            rec[o..o + 4]
                                .copy_from_slice(&block(r)[q_at + 4 * k..q_at + 4 * k + 4]);
                        }
                    }
                }
                _ => {
                    for k in 0..8 {
                        for r in 0..GROUP {
                            for j in 0..4 {
                                rec[16 + 32 * k + 4 * r + j] = block(r)[2 + 4 * k + j] ^ 0x80;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The unsigned quant of element `e` (0..32) of row `r` in a packed record.
fn quant(ty: GgmlType, rec: &[u8], r: usize, e: usize) -> i32 {
    let (k, j) = (e / 4, e % 4);
    match ty {
        GgmlType::Q8_0 => rec[16 + 32 * k + 4 * r + j] as i32,
        _ => {
            let qs_off = match ty {
                GgmlType::Q4_0 => 16,
                GgmlType::Q4_1 => 32,
                _ => 48,
            };
            let byte = rec[qs_off + 32 * (k % 4) + 4 * r + j];
            let nib = if k < 4 { byte & 0xF } else { byte >> 4 } as i32;
            if ty == GgmlType::Q5_0 {
                let mask = u32::from_le_bytes([
                    rec[16 + 4 * k],
                    rec[17 + 4 * k],
                    rec[18 + 4 * k],
                    rec[19 + 4 * k],
                ]);
                nib | ((((mask >> (4 * r + j)) & 1) as i32) << 4)
            } else {
                nib
            }
        }
    }
}

fn f16_at(b: &[u8], o: usize) -> f32 {
    half::f16::from_le_bytes([b[o], b[o + 1]]).to_f32()
}

/// The scalar twin: the eight rows of group `g` of a packed matrix (`cols` inputs) · one
/// activation row, in the kernels' exact arithmetic.
pub fn dot_group_scalar(
    ty: GgmlType,
    packed: &[u8],
    cols: usize,
    g: usize,
    a: ActRow<'_>,
) -> [f32; GROUP] {
    let nb = cols / 32;
    let rb = record_bytes(ty);
    let off = offset(ty);
    let mut acc = [0f32; GROUP];
    let mut macc = [0f32; GROUP];
    for i in 0..nb {
        let rec = &packed[(g * nb + i) * rb..(g * nb + i + 1) * rb];
        for r in 0..GROUP {
            let mut isum = -off * a.bsums[i] as i32;
            for e in 0..32 {
                isum += quant(ty, rec, r, e) * a.qs[32 * i + e] as i32;
            }
            let d = f16_at(rec, 2 * r) * a.d[i];
            acc[r] = (isum as f32).mul_add(d, acc[r]);
            if ty == GgmlType::Q4_1 {
                macc[r] = f16_at(rec, 16 + 2 * r).mul_add(a.s[i], macc[r]);
            }
        }
    }
    std::array::from_fn(|r| acc[r] + macc[r])
}

/// Rows `r0..r1` (multiples of [`GROUP`]) of a packed matrix with `cols` inputs × every row
/// of `acts`, writing `out[t * ld + r]`.
///
/// # Safety
/// As [`crate::dispatch::RowsFn`]: `out` holds `acts.n_rows × ld` floats whose `(t, r0..r1)`
/// positions no one else writes meanwhile, and the CPU supports the tier the function came from.
pub type PackedRowsFn =
    unsafe fn(&[u8], usize, usize, usize, &crate::act::QuantActs, crate::SyncPtr<f32>, usize);

/// The packed kernel for `ty` at `tier` (capped at what the CPU supports): the AVX-512 VNNI
/// loop, or at [`Tier::Amx`] the tile kernel (which hands batches of fewer than
/// [`AMX_MIN_TOKENS`] tokens to the VNNI loop); None below AVX-512 VNNI.
pub(crate) fn simd_rows(ty: GgmlType, tier: Tier) -> Option<PackedRowsFn> {
    #[cfg(target_arch = "x86_64")]
    {
        match tier.min(crate::dispatch::best_tier()) {
            Tier::Amx => return x86::select_amx(ty),
            Tier::Avx512Vnni => return x86::select(ty),
            _ => {}
        }
    }
    let _ = (ty, tier);
    None
}

/// Fewest tokens of one pass that the AMX kernel multiplies with tiles; smaller batches (one
/// decoding sequence) take the VNNI loop, whose results are the same bits. Below eight tokens
/// the tiles lose (`cargo bench -p ruvllm-kernels --bench packed`, Q4_1 1536×576, one
/// thread: 4 tokens 114 vs 162 GMAC/s, 8 tokens 185 vs 167, 16 tokens 227 vs 168).
pub const AMX_MIN_TOKENS: usize = 8;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{PackedRowsFn, GROUP};
    use crate::act::{ActRow, QuantActs};
    use crate::{GgmlType, SyncPtr};
    use std::arch::x86_64::*;

    const Q4_0: u8 = 0;
    const Q4_1: u8 = 1;
    const Q5_0: u8 = 2;
    const Q8_0: u8 = 3;

    /// The instance of a kernel generic over the type code for `ty`, if it is packable.
    macro_rules! for_type {
        ($ty:expr, $kernel:ident) => {
            Some(match $ty {
                GgmlType::Q4_0 => $kernel::<Q4_0> as PackedRowsFn,
                GgmlType::Q4_1 => $kernel::<Q4_1>,
                GgmlType::Q5_0 => $kernel::<Q5_0>,
                GgmlType::Q8_0 => $kernel::<Q8_0>,
                _ => return None,
            })
        };
    }

    pub(super) fn select(ty: GgmlType) -> Option<PackedRowsFn> {
        for_type!(ty, rows)
    }

    const fn ty_of(t: u8) -> GgmlType {
        match t {
            Q4_0 => GgmlType::Q4_0,
            Q4_1 => GgmlType::Q4_1,
            Q5_0 => GgmlType::Q5_0,
            _ => GgmlType::Q8_0,
        }
    }

    /// Prefetches every cache line of the record `ahead` bytes after the one at `p` (records
    /// are 144–272 bytes, so one line per record would leave most lines to the hardware
    /// prefetcher). The kernels pass one pair of groups' records (`2·nb` records): while a
    /// pair is multiplied, the next pair streams in from L3, exactly once and in full. Eight
    /// records ahead (what this was before) left the loads waiting on L3: a batch-16 step of
    /// SmolLM2's matrices took 10.7 ms on two threads instead of ~8.5 (`benches/packed.rs
    /// step`, a host without AMX).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn prefetch_record(p: *const u8, ahead: usize, rb: usize) {
        crate::prefetch_bytes(p.wrapping_add(ahead), rb);
    }

    /// One group of eight rows × `N` activation rows over all `nb` blocks; `out[t]` gets the
    /// eight results of token t.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn group<const T: u8, const N: usize>(
        rec0: *const u8,
        nb: usize,
        a: &[ActRow<'_>; N],
        out: &mut [[f32; GROUP]; N],
    ) {
        let ty = ty_of(T);
        let rb = super::record_bytes(ty);
        let off = super::offset(ty);
        let qs_off = match T {
            Q4_0 => 16,
            Q4_1 => 32,
            Q5_0 => 48,
            _ => 16,
        };
        let m4 = _mm256_set1_epi8(0x0F);
        let sixteen = _mm256_set1_epi8(16);
        let mut acc = [_mm256_setzero_ps(); N];
        let mut macc = [_mm256_setzero_ps(); N];
        for i in 0..nb {
            // SAFETY (whole block): the caller guarantees nb records of rb bytes at rec0 and
            // activation rows of nb blocks (checked in `rows`).
            let p = unsafe { rec0.add(i * rb) };
            prefetch_record(p, 2 * nb * rb, rb);
            let dv = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(p as *const __m128i) });
            let mut w = [_mm256_setzero_si256(); 8];
            if T == Q8_0 {
                for (k, wk) in w.iter_mut().enumerate() {
                    *wk = unsafe { _mm256_loadu_si256(p.add(16 + 32 * k) as *const __m256i) };
                }
            } else {
                for k in 0..4 {
                    let v = unsafe { _mm256_loadu_si256(p.add(qs_off + 32 * k) as *const __m256i) };
                    w[k] = _mm256_and_si256(v, m4);
                    w[k + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                }
                if T == Q5_0 {
                    for (k, wk) in w.iter_mut().enumerate() {
                        let mask =
                            unsafe { std::ptr::read_unaligned(p.add(16 + 4 * k) as *const u32) };
                        *wk = _mm256_mask_add_epi8(*wk, mask, *wk, sixteen);
                    }
                }
            }
            let mv = if T == Q4_1 {
                _mm256_cvtph_ps(unsafe { _mm_loadu_si128(p.add(16) as *const __m128i) })
            } else {
                _mm256_setzero_ps()
            };
            for t in 0..N {
                let ap = unsafe { a[t].qs.as_ptr().add(32 * i) };
                let mut isum =
                    _mm256_set1_epi32(-off * unsafe { *a[t].bsums.get_unchecked(i) } as i32);
                for (k, wk) in w.iter().enumerate() {
                    let av = _mm256_set1_epi32(unsafe {
                        std::ptr::read_unaligned(ap.add(4 * k) as *const i32)
                    });
                    isum = _mm256_dpbusd_epi32(isum, *wk, av);
                }
                let d = _mm256_mul_ps(dv, _mm256_set1_ps(unsafe { *a[t].d.get_unchecked(i) }));
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), d, acc[t]);
                if T == Q4_1 {
                    macc[t] = _mm256_fmadd_ps(
                        mv,
                        _mm256_set1_ps(unsafe { *a[t].s.get_unchecked(i) }),
                        macc[t],
                    );
                }
            }
        }
        for t in 0..N {
            // SAFETY: out[t] is 8 floats.
            unsafe { _mm256_storeu_ps(out[t].as_mut_ptr(), _mm256_add_ps(acc[t], macc[t])) };
        }
    }

    /// Eight f16 values at `p + o` (group g's) and eight at `q + o` (group g + 1's) as sixteen
    /// floats: a pair's scales (o = 0) or Q4_1 minima (o = 16).
    ///
    /// # Safety
    /// 16 bytes are readable at `p + o` and at `q + o`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn halves(p: *const u8, q: *const u8, o: usize) -> __m512 {
        // SAFETY: per the contract.
        unsafe {
            _mm512_cvtph_ps(_mm256_inserti128_si256::<1>(
                _mm256_castsi128_si256(_mm_loadu_si128(p.add(o) as *const __m128i)),
                _mm_loadu_si128(q.add(o) as *const __m128i),
            ))
        }
    }

    /// The unsigned quants of one block of two groups' records (`p`: group g, `q`: group g + 1)
    /// as eight 64-byte vectors: vector k holds elements 4k..4k+4 of the sixteen rows (row r in
    /// bytes 4r..4r+4, group g's rows first) — a `vpdpbusd` operand, and row k of an AMX
    /// B tile.
    ///
    /// # Safety
    /// A whole record of type T is readable at `p` and at `q`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn unpack_pair<const T: u8>(p: *const u8, q: *const u8) -> [__m512i; 8] {
        let qs_off = match T {
            Q4_0 => 16,
            Q4_1 => 32,
            Q5_0 => 48,
            _ => 16,
        };
        // SAFETY (whole function): offsets stay inside a record (see the layout table).
        let pair = |o: usize| unsafe {
            _mm512_inserti64x4::<1>(
                _mm512_castsi256_si512(_mm256_loadu_si256(p.add(o) as *const __m256i)),
                _mm256_loadu_si256(q.add(o) as *const __m256i),
            )
        };
        let mut w = [_mm512_setzero_si512(); 8];
        if T == Q8_0 {
            for (k, wk) in w.iter_mut().enumerate() {
                *wk = pair(16 + 32 * k);
            }
            return w;
        }
        let m4 = _mm512_set1_epi8(0x0F);
        for k in 0..4 {
            let v = pair(qs_off + 32 * k);
            w[k] = _mm512_and_si512(v, m4);
            w[k + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), m4);
        }
        if T == Q5_0 {
            let sixteen = _mm512_set1_epi8(16);
            for (k, wk) in w.iter_mut().enumerate() {
                let (lo, hi) = unsafe {
                    (
                        std::ptr::read_unaligned(p.add(16 + 4 * k) as *const u32),
                        std::ptr::read_unaligned(q.add(16 + 4 * k) as *const u32),
                    )
                };
                *wk = _mm512_mask_add_epi8(*wk, lo as u64 | (hi as u64) << 32, *wk, sixteen);
            }
        }
        w
    }

    /// Two consecutive groups (sixteen rows) × `N` activation rows in 512-bit registers: each
    /// vector holds the same 32 bytes of group `g`'s record (low half) and group `g + 1`'s
    /// (high half), so one `vpdpbusd` serves sixteen rows; every lane does exactly the
    /// arithmetic of [`group`] (and of the scalar twin) for its row. `out[t]` gets the sixteen
    /// results of token t.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn group_pair<const T: u8, const N: usize>(
        rec_g: *const u8,
        rec_h: *const u8,
        nb: usize,
        a: &[ActRow<'_>; N],
        out: &mut [[f32; 2 * GROUP]; N],
    ) {
        let ty = ty_of(T);
        let rb = super::record_bytes(ty);
        let off = super::offset(ty);
        let mut acc = [_mm512_setzero_ps(); N];
        let mut macc = [_mm512_setzero_ps(); N];
        for i in 0..nb {
            // SAFETY (whole loop): the caller guarantees nb records of rb bytes at rec_g and at
            // rec_h, and activation rows of nb blocks (checked in `rows`).
            let (p, q) = unsafe { (rec_g.add(i * rb), rec_h.add(i * rb)) };
            prefetch_record(p, 2 * nb * rb, rb);
            prefetch_record(q, 2 * nb * rb, rb);
            let (dv, w) = unsafe { (halves(p, q, 0), unpack_pair::<T>(p, q)) };
            let mv = if T == Q4_1 {
                unsafe { halves(p, q, 16) }
            } else {
                _mm512_setzero_ps()
            };
            for t in 0..N {
                let ap = unsafe { a[t].qs.as_ptr().add(32 * i) };
                let mut isum =
                    _mm512_set1_epi32(-off * unsafe { *a[t].bsums.get_unchecked(i) } as i32);
                for (k, wk) in w.iter().enumerate() {
                    let av = _mm512_set1_epi32(unsafe {
                        std::ptr::read_unaligned(ap.add(4 * k) as *const i32)
                    });
                    isum = _mm512_dpbusd_epi32(isum, *wk, av);
                }
                let d = _mm512_mul_ps(dv, _mm512_set1_ps(unsafe { *a[t].d.get_unchecked(i) }));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), d, acc[t]);
                if T == Q4_1 {
                    macc[t] = _mm512_fmadd_ps(
                        mv,
                        _mm512_set1_ps(unsafe { *a[t].s.get_unchecked(i) }),
                        macc[t],
                    );
                }
            }
        }
        for t in 0..N {
            // SAFETY: out[t] is 16 floats.
            unsafe { _mm512_storeu_ps(out[t].as_mut_ptr(), _mm512_add_ps(acc[t], macc[t])) };
        }
    }

    /// Writes a group's results for tokens t0.. into `out`.
    ///
    /// # Safety
    /// As [`PackedRowsFn`]'s contract.
    unsafe fn store<const N: usize, const W: usize>(
        o: &[[f32; W]; N],
        out: SyncPtr<f32>,
        t0: usize,
        ld: usize,
        r: usize,
    ) {
        for (k, v) in o.iter().enumerate() {
            // SAFETY: the caller guarantees (t0 + k, r..r + W) is inside out and its own.
            unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), out.0.add((t0 + k) * ld + r), W) };
        }
    }

    /// Tokens `t..t + N` × groups of rows `r0..r1`; returns N.
    ///
    /// # Safety
    /// As [`rows`] after its checks: the records of those groups and the activation rows are in
    /// bounds, and `out` is the caller's at those positions.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn pass<const T: u8, const N: usize>(
        packed: &[u8],
        nb: usize,
        rb: usize,
        r0: usize,
        r1: usize,
        acts: &QuantActs,
        t: usize,
        out: SyncPtr<f32>,
        ld: usize,
    ) -> usize {
        let a: [ActRow<'_>; N] = std::array::from_fn(|k| acts.row(t + k));
        let (mut g, end) = (r0 / GROUP, r1 / GROUP);
        // Pairs of groups in 512-bit registers, a last odd group in 256-bit ones.
        while g + 2 <= end {
            let mut o = [[0f32; 2 * GROUP]; N];
            // SAFETY: groups g and g + 1's records lie inside packed and out is the caller's
            // (see above).
            unsafe {
                group_pair::<T, N>(
                    packed.as_ptr().add(g * nb * rb),
                    packed.as_ptr().add((g + 1) * nb * rb),
                    nb,
                    &a,
                    &mut o,
                );
                store(&o, out, t, ld, g * GROUP);
            }
            g += 2;
        }
        if g < end {
            let mut o = [[0f32; GROUP]; N];
            // SAFETY: as above, for group g.
            unsafe {
                group::<T, N>(packed.as_ptr().add(g * nb * rb), nb, &a, &mut o);
                store(&o, out, t, ld, g * GROUP);
            }
        }
        N
    }

    /// Checks a call's bounds ([`PackedRowsFn`]'s arguments) once, so the loops need not.
    fn check<const T: u8>(packed: &[u8], cols: usize, r0: usize, r1: usize, acts: &QuantActs) {
        let nb = cols / 32;
        let rb = super::record_bytes(ty_of(T));
        assert!(
            r0 % GROUP == 0 && r1 % GROUP == 0 && packed.len() >= r1 / GROUP * nb * rb,
            "packed rows out of range"
        );
        let n = acts.n_rows;
        // Every activation row has nb blocks (what `acts.row(t)` hands out for t < n).
        assert!(
            acts.format == Some(crate::act::ActFormat::Q8x32) && acts.cols == cols,
            "packed rows need Q8x32 activations of {cols} columns"
        );
        assert!(
            acts.qs.len() >= n * cols
                && acts.d.len() >= n * nb
                && acts.bsums.len() >= n * nb
                && (T != Q4_1 || acts.s.len() >= n * nb)
        );
    }

    /// Tokens `t..t_end` × rows `r0..r1` with the VNNI passes (8, 4, then 1 token at a time).
    ///
    /// # Safety
    /// As [`pass`].
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn vnni_tokens<const T: u8>(
        packed: &[u8],
        nb: usize,
        r0: usize,
        r1: usize,
        acts: &QuantActs,
        mut t: usize,
        t_end: usize,
        out: SyncPtr<f32>,
        ld: usize,
    ) {
        let rb = super::record_bytes(ty_of(T));
        while t < t_end {
            // SAFETY: same features; bounds per the caller; out per the caller's contract.
            t += unsafe {
                match t_end - t {
                    8.. => pass::<T, 8>(packed, nb, rb, r0, r1, acts, t, out, ld),
                    4..=7 => pass::<T, 4>(packed, nb, rb, r0, r1, acts, t, out, ld),
                    _ => pass::<T, 1>(packed, nb, rb, r0, r1, acts, t, out, ld),
                }
            };
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn rows<const T: u8>(
        packed: &[u8],
        cols: usize,
        r0: usize,
        r1: usize,
        acts: &QuantActs,
        out: SyncPtr<f32>,
        ld: usize,
    ) {
        check::<T>(packed, cols, r0, r1, acts);
        // Tokens outer, groups inner: a chunk of tokens' activations stays in L1 while the
        // task's weights (at most 512 rows) come from L2.
        // SAFETY: bounds checked above; out per the caller's contract.
        unsafe { vnni_tokens::<T>(packed, cols / 32, r0, r1, acts, 0, acts.n_rows, out, ld) };
    }

    pub(super) fn select_amx(ty: GgmlType) -> Option<PackedRowsFn> {
        if !crate::amx::available() {
            return select(ty);
        }
        for_type!(ty, rows_amx)
    }

    // The AMX kernel's tiles: int32 products (C), activation quants (A) and weight quants (B),
    // one set for even blocks and one for odd, so a block's products are read back while the
    // next block's are being computed.
    const C_EVEN: u8 = 0;
    const C_ODD: u8 = 1;
    const A_EVEN: u8 = 2;
    const A_ODD: u8 = 3;
    const B_EVEN: u8 = 4;
    const B_ODD: u8 = 5;

    /// The tile shapes for `m` tokens: C m × 16 int32, A m × 32 bytes (one block of each
    /// token), B 8 × 64 bytes (one block of sixteen rows, as [`unpack_pair`] lays it out).
    fn tile_config(m: usize) -> crate::amx::TileConfig {
        let mut c = crate::amx::TileConfig::new();
        c.set(C_EVEN as usize, m, 64)
            .set(C_ODD as usize, m, 64)
            .set(A_EVEN as usize, m, 32)
            .set(A_ODD as usize, m, 32)
            .set(B_EVEN as usize, 8, 64)
            .set(B_ODD as usize, 8, 64);
        c
    }

    /// Expands `body` once per token k in 0..n (n ≤ 16, a constant), so per-token
    /// accumulator arrays stay in registers.
    macro_rules! unroll_tokens {
        ($n:expr, |$k:ident| $body:block) => {
            unroll_tokens!(@ $n, $k, $body, 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15)
        };
        (@ $n:expr, $k:ident, $body:block, $($i:literal)*) => {
            $(
                if $i < $n {
                    let $k: usize = $i;
                    $body
                }
            )*
        };
    }

    /// Blocks between staging a block's weight quants and its tile product, and between the
    /// product and reading it back.
    const LAG: usize = 3;
    /// Buffers of each kind in the pipeline.
    const RING: usize = LAG + 1;

    /// One block's weight quants for a B tile.
    #[repr(C, align(64))]
    struct TileQuants([__m512i; 8]);

    /// One block's int32 products read back from a C tile: `[token][row]`.
    #[repr(C, align(64))]
    struct TileProducts([[i32; 16]; 16]);

    /// One block's tile product: B from `wq`, A from the activation quants at `a` (one token
    /// every `a_stride` bytes), C = A · B stored to `c`.
    ///
    /// # Safety
    /// Tiles configured by [`tile_config`] for the pass's token count, whose activation rows
    /// are readable at `a`.
    #[inline(always)]
    unsafe fn block_product<const C: u8, const A: u8, const B: u8>(
        wq: &TileQuants,
        a: *const u8,
        a_stride: usize,
        c: &mut TileProducts,
    ) {
        // SAFETY: per the contract; wq is 8 × 64 bytes and c holds 16 × 64 bytes.
        unsafe {
            crate::amx::load::<B>(wq.0.as_ptr() as *const u8, 64);
            crate::amx::load::<A>(a, a_stride);
            crate::amx::zero::<C>();
            crate::amx::dp_signed_unsigned::<C, A, B>();
            crate::amx::store::<C>(c.0.as_mut_ptr() as *mut u8, 64);
        }
    }

    /// Tokens `t..t + N` × rows `r0..r1` with tiles: per pair of groups and block, one tile
    /// product gives every (token, row) integer block dot, and the float arithmetic after it
    /// is [`group_pair`]'s, operation for operation (so the results are the same bits); a last
    /// odd group takes the VNNI loop. Returns N.
    ///
    /// # Safety
    /// As [`pass`], and the tiles are configured by [`tile_config`]`(N)`.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn pass_amx<const T: u8, const N: usize>(
        packed: &[u8],
        nb: usize,
        r0: usize,
        r1: usize,
        acts: &QuantActs,
        t: usize,
        out: SyncPtr<f32>,
        ld: usize,
    ) -> usize {
        let ty = ty_of(T);
        let rb = super::record_bytes(ty);
        let off = super::offset(ty);
        let cols = 32 * nb;
        // SAFETY: rows t..t + N exist (the caller's bounds), so their quants start here.
        let a_quants = unsafe { acts.qs.as_ptr().add(t * cols) as *const u8 };
        let mut wq: [TileQuants; RING] =
            std::array::from_fn(|_| TileQuants([_mm512_setzero_si512(); 8]));
        let mut prods: [TileProducts; RING] = std::array::from_fn(|_| TileProducts([[0; 16]; 16]));
        let (mut g, end) = (r0 / GROUP, r1 / GROUP);
        while g + 2 <= end {
            // SAFETY (whole loop): groups g and g + 1 have nb records each inside packed.
            let (rec_g, rec_h) = unsafe {
                (
                    packed.as_ptr().add(g * nb * rb),
                    packed.as_ptr().add((g + 1) * nb * rb),
                )
            };
            let rec = |i: usize| unsafe { (rec_g.add(i * rb), rec_h.add(i * rb)) };
            let mut acc = [_mm512_setzero_ps(); N];
            // The float half of block i, from its products: group_pair's arithmetic.
            // Per-token scales, quant sums and block sums: token k's block i at k·nb + i.
            let (d_at, bsum_at, s_at) = (
                acts.d[t * nb..].as_ptr(),
                acts.bsums[t * nb..].as_ptr(),
                acts.s[(t * nb).min(acts.s.len())..].as_ptr(),
            );
            let finish = |i: usize, c: &TileProducts, acc: &mut [__m512; N]| {
                let (p, q) = rec(i);
                // SAFETY: records of block i lie inside packed.
                let dv = unsafe { halves(p, q, 0) };
                unroll_tokens!(N, |k| {
                    // SAFETY: c.0[k] is 16 aligned int32; token k < N has block i < nb.
                    let (isum, d) = unsafe {
                        (
                            _mm512_add_epi32(
                                _mm512_load_si512(c.0[k].as_ptr() as *const __m512i),
                                _mm512_set1_epi32(-off * *bsum_at.add(k * nb + i) as i32),
                            ),
                            _mm512_mul_ps(dv, _mm512_set1_ps(*d_at.add(k * nb + i))),
                        )
                    };
                    acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), d, acc[k]);
                });
            };
            let stage = |i: usize, wq: &mut TileQuants| {
                let (p, q) = rec(i);
                prefetch_record(p, 2 * nb * rb, rb);
                prefetch_record(q, 2 * nb * rb, rb);
                // SAFETY: records of block i lie inside packed.
                wq.0 = unsafe { unpack_pair::<T>(p, q) };
            };
            // A pipeline LAG blocks deep: block i's quants are staged LAG blocks before its
            // tile product and its products read back LAG blocks after, so the stores have
            // retired before the tiles load them and the tile store before the floats read it
            // (neither forwards from the store buffer: a shorter distance stalls every block).
            for i in 0..LAG.min(nb) {
                stage(i, &mut wq[i % RING]);
            }
            for i in 0..nb {
                if i + LAG < nb {
                    stage(i + LAG, &mut wq[(i + LAG) % RING]);
                }
                let a_block = a_quants.wrapping_add(32 * i);
                // SAFETY: tiles configured for N tokens (the caller), whose block i quants
                // start at a_block, one row every cols bytes.
                unsafe {
                    if i % 2 == 0 {
                        block_product::<C_EVEN, A_EVEN, B_EVEN>(
                            &wq[i % RING],
                            a_block,
                            cols,
                            &mut prods[i % RING],
                        );
                    } else {
                        block_product::<C_ODD, A_ODD, B_ODD>(
                            &wq[i % RING],
                            a_block,
                            cols,
                            &mut prods[i % RING],
                        );
                    }
                }
                if i >= LAG {
                    finish(i - LAG, &prods[(i - LAG) % RING], &mut acc);
                }
            }
            for i in nb.saturating_sub(LAG)..nb {
                finish(i, &prods[i % RING], &mut acc);
            }
            let mut o = [[0f32; 2 * GROUP]; N];
            if T == Q4_1 {
                // The minima terms in their own pass (sixteen more accumulators would spill),
                // in block order as in group_pair, added at the end as there.
                let mut macc = [_mm512_setzero_ps(); N];
                for i in 0..nb {
                    let (p, q) = rec(i);
                    // SAFETY: records of block i lie inside packed.
                    let mv = unsafe { halves(p, q, 16) };
                    unroll_tokens!(N, |k| {
                        // SAFETY: token k < N has block i < nb (Q4_1 activations carry s).
                        let s = unsafe { *s_at.add(k * nb + i) };
                        macc[k] = _mm512_fmadd_ps(mv, _mm512_set1_ps(s), macc[k]);
                    });
                }
                for k in 0..N {
                    acc[k] = _mm512_add_ps(acc[k], macc[k]);
                }
            }
            for (o, acc) in o.iter_mut().zip(acc) {
                // SAFETY: o is 16 floats.
                unsafe { _mm512_storeu_ps(o.as_mut_ptr(), acc) };
            }
            // SAFETY: (t..t + N, g·8..g·8 + 16) is the caller's part of out.
            unsafe { store(&o, out, t, ld, g * GROUP) };
            g += 2;
        }
        if g < end {
            // SAFETY: as above, for the last group alone.
            unsafe { vnni_tokens::<T>(packed, nb, g * GROUP, r1, acts, t, t + N, out, ld) };
        }
        N
    }

    /// [`rows`] with AMX tiles for passes of 16 or 8 tokens, and the VNNI loop for the
    /// remaining fewer than [`super::AMX_MIN_TOKENS`].
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn rows_amx<const T: u8>(
        packed: &[u8],
        cols: usize,
        r0: usize,
        r1: usize,
        acts: &QuantActs,
        out: SyncPtr<f32>,
        ld: usize,
    ) {
        check::<T>(packed, cols, r0, r1, acts);
        let (nb, n) = (cols / 32, acts.n_rows);
        let mut t = 0;
        let mut configured = 0;
        while n - t >= super::AMX_MIN_TOKENS {
            let m = if n - t >= 16 { 16 } else { 8 };
            if m != configured {
                // SAFETY: rows_amx is only handed out when amx::available().
                unsafe { crate::amx::configure(&tile_config(m)) };
                configured = m;
            }
            // SAFETY: bounds checked above, tiles configured for m tokens, out per the
            // caller's contract.
            t += unsafe {
                if m == 16 {
                    pass_amx::<T, 16>(packed, nb, r0, r1, acts, t, out, ld)
                } else {
                    pass_amx::<T, 8>(packed, nb, r0, r1, acts, t, out, ld)
                }
            };
        }
        if configured != 0 {
            // SAFETY: as above.
            unsafe { crate::amx::release() };
        }
        // SAFETY: bounds checked above; out per the caller's contract.
        unsafe { vnni_tokens::<T>(packed, nb, r0, r1, acts, t, n, out, ld) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::act::{ActFormat, QuantActs};
    use crate::dot::dot_scalar;
    use crate::test_util::{bytes, random_row};

    /// The packed layout holds the same numbers: the scalar twin on packed data agrees with the
    /// ggml-layout scalar dot (which sums in another order) to rounding, on random and all-ones
    /// quants, for every packable type.
    #[test]
    fn packed_scalar_matches_ggml_layout_dot() {
        for ty in PACKABLE {
            for case in 0..3u64 {
                let (rows, cols) = (16, 96);
                let mut data: Vec<u8> = (0..rows)
                    .flat_map(|r| random_row(ty, cols, 7 * r as u64 + case))
                    .collect();
                if case == 2 {
                    // every quant bit set, scales kept
                    let ts = ty.type_size();
                    let sc = if ty == GgmlType::Q4_1 { 4 } else { 2 };
                    for blk in data.chunks_mut(ts) {
                        blk[sc..].fill(0xFF);
                    }
                }
                let packed = pack(ty, rows, cols, &data).expect("packable");
                assert_eq!(packed.len(), data.len());
                let x: Vec<f32> = bytes(cols, 40 + case)
                    .iter()
                    .map(|&b| (b as f32 - 128.0) / 9.0)
                    .collect();
                let mut acts = QuantActs::default();
                acts.quantize(ActFormat::Q8x32, &x, cols);
                let rb = cols / 32 * ty.type_size();
                for g in 0..rows / GROUP {
                    let got = dot_group_scalar(ty, &packed, cols, g, acts.row(0));
                    for r in 0..GROUP {
                        let row = g * GROUP + r;
                        let want = dot_scalar(ty, &data[row * rb..(row + 1) * rb], acts.row(0));
                        assert!(
                            (got[r] - want).abs() <= 1e-5 * want.abs().max(1.0) + 1e-4,
                            "{ty} case {case} row {row}: {} vs {want}",
                            got[r]
                        );
                    }
                }
            }
        }
    }

    /// The SIMD kernels (VNNI loop, AMX tiles) against their scalar twin, bit for bit, on
    /// random and extreme inputs, for 1, 5, 9, 22 and 37 tokens (the VNNI 8-, 4- and 1-token
    /// paths; AMX passes of 16 and 8 with VNNI remainders) and a row range that skips the
    /// first group and ends with an odd one.
    #[test]
    fn simd_matches_scalar_twin_bit_for_bit() {
        if !crate::amx::available() {
            eprintln!("no AMX on this CPU: the AMX case runs the VNNI kernel");
        }
        for (ty, tier) in PACKABLE
            .into_iter()
            .flat_map(|ty| [(ty, Tier::Avx512Vnni), (ty, Tier::Amx)])
        {
            let Some(f) = simd_rows(ty, tier) else {
                eprintln!("no packed SIMD kernel on this CPU");
                return;
            };
            for case in 0..5u64 {
                // Rows 8..48: groups 1–2 and 3–4 as pairs, group 5 alone.
                let (rows, cols) = (48, 160);
                let data: Vec<u8> = (0..rows)
                    .flat_map(|r| random_row(ty, cols, 3 * r as u64 + case))
                    .collect();
                let packed = pack(ty, rows, cols, &data).expect("packable");
                let n_tok = [1, 5, 9, 22, 37][case as usize];
                let x: Vec<f32> = match case {
                    1 => (0..n_tok * cols)
                        .map(|i| if i % 3 == 0 { 1e4 } else { -1e4 })
                        .collect(),
                    2 => vec![0.0; n_tok * cols],
                    _ => bytes(n_tok * cols, 9 + case)
                        .iter()
                        .map(|&b| (b as f32 - 128.0) / 7.0)
                        .collect(),
                };
                let mut acts = QuantActs::default();
                acts.quantize(ActFormat::Q8x32, &x, cols);
                let mut out = vec![f32::NAN; n_tok * rows];
                // SAFETY: out holds n_tok × rows; the function came from simd_rows.
                unsafe {
                    f(
                        &packed,
                        cols,
                        GROUP,
                        rows,
                        &acts,
                        crate::SyncPtr::new(&mut out),
                        rows,
                    )
                };
                for t in 0..n_tok {
                    assert!(
                        out[t * rows..t * rows + GROUP].iter().all(|v| v.is_nan()),
                        "rows outside the range were written"
                    );
                    for g in 1..rows / GROUP {
                        let want = dot_group_scalar(ty, &packed, cols, g, acts.row(t));
                        for r in 0..GROUP {
                            let got = out[t * rows + g * GROUP + r];
                            assert_eq!(
                                got.to_bits(),
                                want[r].to_bits(),
                                "{ty} {tier:?} case {case} token {t}/{n_tok} row {}: {got} vs {}",
                                g * GROUP + r,
                                want[r]
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn unpackable_shapes_are_refused() {
        let data = random_row(GgmlType::Q4_0, 64 * 7, 1);
        assert!(pack(GgmlType::Q4_0, 7, 64, &data).is_none());
        assert!(pack(
            GgmlType::Q4_K,
            8,
            256,
            &random_row(GgmlType::Q4_K, 256 * 8, 1)
        )
        .is_none());
        assert!(pack(GgmlType::Q4_0, 8, 64, &data[..10]).is_none());
    }
}
