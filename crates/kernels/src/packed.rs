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
use crate::GgmlType;

/// Rows per interleaved group.
pub const GROUP: usize = 8;

/// Whether `ty` has a packed layout.
pub fn packable(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q8_0
    )
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

/// The AVX-512 VNNI kernel for `ty`'s packed layout, if the CPU has that tier.
pub(crate) fn simd_rows(ty: GgmlType) -> Option<PackedRowsFn> {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::dispatch::best_tier() >= crate::dispatch::Tier::Avx512Vnni {
            return x86::select(ty);
        }
    }
    let _ = ty;
    None
}

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

    pub(super) fn select(ty: GgmlType) -> Option<PackedRowsFn> {
        Some(match ty {
            GgmlType::Q4_0 => rows::<Q4_0>,
            GgmlType::Q4_1 => rows::<Q4_1>,
            GgmlType::Q5_0 => rows::<Q5_0>,
            GgmlType::Q8_0 => rows::<Q8_0>,
            _ => return None,
        })
    }

    const fn ty_of(t: u8) -> GgmlType {
        match t {
            Q4_0 => GgmlType::Q4_0,
            Q4_1 => GgmlType::Q4_1,
            Q5_0 => GgmlType::Q5_0,
            _ => GgmlType::Q8_0,
        }
    }

    /// Records ahead of the one in use that the kernels ask the cache for.
    const PREFETCH_RECORDS: usize = 8;

    /// Prefetches every cache line of the record [`PREFETCH_RECORDS`] after the one at `p`
    /// (records are 144–272 bytes, so one line per record would leave most lines to the
    /// hardware prefetcher).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn prefetch_record(p: *const u8, rb: usize) {
        crate::prefetch_bytes(p.wrapping_add(PREFETCH_RECORDS * rb), rb);
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
            prefetch_record(p, rb);
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
        let qs_off = match T {
            Q4_0 => 16,
            Q4_1 => 32,
            Q5_0 => 48,
            _ => 16,
        };
        let m4 = _mm512_set1_epi8(0x0F);
        let sixteen = _mm512_set1_epi8(16);
        let mut acc = [_mm512_setzero_ps(); N];
        let mut macc = [_mm512_setzero_ps(); N];
        // SAFETY (whole loop): the caller guarantees nb records of rb bytes at rec_g and at
        // rec_h, and activation rows of nb blocks (checked in `rows`).
        let pair = |p: *const u8, q: *const u8, o: usize| unsafe {
            _mm512_inserti64x4::<1>(
                _mm512_castsi256_si512(_mm256_loadu_si256(p.add(o) as *const __m256i)),
                _mm256_loadu_si256(q.add(o) as *const __m256i),
            )
        };
        let halves = |p: *const u8, q: *const u8, o: usize| unsafe {
            _mm512_cvtph_ps(_mm256_inserti128_si256::<1>(
                _mm256_castsi128_si256(_mm_loadu_si128(p.add(o) as *const __m128i)),
                _mm_loadu_si128(q.add(o) as *const __m128i),
            ))
        };
        for i in 0..nb {
            let (p, q) = unsafe { (rec_g.add(i * rb), rec_h.add(i * rb)) };
            prefetch_record(p, rb);
            prefetch_record(q, rb);
            let dv = halves(p, q, 0);
            let mut w = [_mm512_setzero_si512(); 8];
            if T == Q8_0 {
                for (k, wk) in w.iter_mut().enumerate() {
                    *wk = pair(p, q, 16 + 32 * k);
                }
            } else {
                for k in 0..4 {
                    let v = pair(p, q, qs_off + 32 * k);
                    w[k] = _mm512_and_si512(v, m4);
                    w[k + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), m4);
                }
                if T == Q5_0 {
                    for (k, wk) in w.iter_mut().enumerate() {
                        let (lo, hi) = unsafe {
                            (
                                std::ptr::read_unaligned(p.add(16 + 4 * k) as *const u32),
                                std::ptr::read_unaligned(q.add(16 + 4 * k) as *const u32),
                            )
                        };
                        *wk =
                            _mm512_mask_add_epi8(*wk, lo as u64 | (hi as u64) << 32, *wk, sixteen);
                    }
                }
            }
            let mv = if T == Q4_1 {
                halves(p, q, 16)
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
        let ty = ty_of(T);
        let nb = cols / 32;
        let rb = super::record_bytes(ty);
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
        // Tokens outer, groups inner: a chunk of tokens' activations stays in L1 while the
        // task's weights (at most 512 rows) come from L2.
        let mut t = 0;
        while t < n {
            // SAFETY: same features; bounds asserted above; out per the caller's contract.
            t += unsafe {
                match n - t {
                    8.. => pass::<T, 8>(packed, nb, rb, r0, r1, acts, t, out, ld),
                    4..=7 => pass::<T, 4>(packed, nb, rb, r0, r1, acts, t, out, ld),
                    _ => pass::<T, 1>(packed, nb, rb, r0, r1, acts, t, out, ld),
                }
            };
        }
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
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q8_0,
        ] {
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

    /// The SIMD kernel against its scalar twin, bit for bit, on random and extreme inputs, for
    /// 1..=13 tokens (the 8-, 4- and 1-token paths) and a row range that skips the first group.
    #[test]
    fn simd_matches_scalar_twin_bit_for_bit() {
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q8_0,
        ] {
            let Some(f) = simd_rows(ty) else {
                eprintln!("no packed SIMD kernel on this CPU");
                return;
            };
            for case in 0..4u64 {
                // Rows 8..32: groups 1–2 as a 512-bit pair, group 3 alone.
                let (rows, cols) = (32, 160);
                let data: Vec<u8> = (0..rows)
                    .flat_map(|r| random_row(ty, cols, 3 * r as u64 + case))
                    .collect();
                let packed = pack(ty, rows, cols, &data).expect("packable");
                let n_tok = 1 + (case as usize * 4) % 13 + if case == 3 { 9 } else { 0 };
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
                                "{ty} case {case} token {t}/{n_tok} row {}: {got} vs {}",
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
