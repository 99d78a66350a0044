//! SIMD dot products for x86_64, in two tiers generated from one body by `tier!`: AVX2 (integer
//! products through `maddubs`+`madd`) and AVX-512 VNNI (`vpdpbusd` on 256-bit registers, where the
//! one-instruction form pays; the K-quants keep `maddubs` because their 16-bit partial sums feed
//! `madd` with the scales directly).
//!
//! Every kernel is generic over `N`, the number of activation rows it dots one weight row with,
//! unpacking each weight block once for all of them. Each row's arithmetic is the same sequence
//! whatever `N` is, so a batch of four gives bit-identical results to four single rows (batch
//! invariance). Integer sums per block are exact and equal the scalar twin's; only the order of
//! the final f32 accumulation differs from `dot.rs` (tests compare with a tight tolerance).

use crate::dispatch::{Kernels, Tier};
use crate::GgmlType;

/// The SIMD kernels for `ty` at `tier`, if that tier has them.
pub(crate) fn select(ty: GgmlType, tier: Tier) -> Option<Kernels> {
    #[cfg(target_arch = "x86_64")]
    {
        match tier {
            Tier::Amx | Tier::Avx512Vnni => return x86::vnni::select(ty),
            Tier::Avx2 => return x86::avx2::select(ty),
            Tier::Scalar => {}
        }
    }
    let _ = (ty, tier);
    None
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    /// Generates one tier's kernels. `$feat` is the target-feature list; `$udot` sums products
    /// of 32 unsigned × 32 signed bytes into 8 i32 lanes.
    macro_rules! tier {
        ($name:ident, $feat:literal, $tier:expr, |$u:ident, $s:ident| $udot:expr) => {
            pub(super) mod $name {
                use crate::act::{ActRow, QuantActs};
                use crate::dispatch::{best_tier, Kernels, RowsFn};
                use crate::SyncPtr;
                use crate::GgmlType;
                use std::arch::x86_64::*;

                /// Kernels for `ty`, or None when this tier has none for it.
                pub(crate) fn select(ty: GgmlType) -> Option<Kernels> {
                    if best_tier() < $tier {
                        return None;
                    }
                    /// Single-token rows two at a time (two independent chains, one activation
                    /// load), for kernels that have an R-row form.
                    macro_rules! pair_rows {
                        (none, $w:ident, $rb:ident, $r:ident, $r1:ident, $a1:ident, $out:ident, $t:ident, $ld:ident) => {};
                        ($kr:ident, $w:ident, $rb:ident, $r:ident, $r1:ident, $a1:ident, $out:ident, $t:ident, $ld:ident) => {
                            while $r + 2 <= $r1 {
                                let mut o = [[0f32; 1]; 2];
                                // SAFETY: same tier features; bounds checked inside.
                                unsafe { $kr::<2, 1>([&$w[$r * $rb..($r + 1) * $rb], &$w[($r + 1) * $rb..($r + 2) * $rb]], $a1, &mut o) };
                                // SAFETY: the caller guarantees out holds n × ld and rows r0..r1 are this call's.
                                unsafe {
                                    *$out.0.add($t * $ld + $r) = o[0][0];
                                    *$out.0.add($t * $ld + $r + 1) = o[1][0];
                                }
                                $r += 2;
                            }
                        };
                    }
                    macro_rules! pair {
                        ($k:ident) => {
                            pair!($k, none)
                        };
                        ($k:ident, $kr:tt) => {{
                            /// Rows r0..r1 × every activation row, tokens in fours; the loop
                            /// over rows lives here so the kernel inlines into it.
                            #[target_feature(enable = $feat)]
                            unsafe fn rows(w: &[u8], rb: usize, r0: usize, r1: usize, acts: &QuantActs, out: SyncPtr<f32>, ld: usize) {
                                let n = acts.n_rows;
                                let mut t = 0;
                                // Eight tokens per weight pass where the tier has 32 vector
                                // registers (AVX-512VL); the per-token arithmetic is unchanged.
                                if $tier == crate::dispatch::Tier::Avx512Vnni {
                                    while t + 8 <= n {
                                        let a8: [ActRow<'_>; 8] = std::array::from_fn(|k| acts.row(t + k));
                                        for r in r0..r1 {
                                            let mut o = [0f32; 8];
                                            // SAFETY: same tier features; bounds checked inside.
                                            unsafe { $k::<8>(&w[r * rb..(r + 1) * rb], a8, &mut o) };
                                            for (k, v) in o.into_iter().enumerate() {
                                                // SAFETY: the caller guarantees out holds n × ld and
                                                // that rows r0..r1 are this call's alone.
                                                unsafe { *out.0.add((t + k) * ld + r) = v };
                                            }
                                        }
                                        t += 8;
                                    }
                                }
                                while t + 4 <= n {
                                    let a4 = [acts.row(t), acts.row(t + 1), acts.row(t + 2), acts.row(t + 3)];
                                    for r in r0..r1 {
                                        let mut o = [0f32; 4];
                                        // SAFETY: same tier features; bounds checked inside.
                                        unsafe { $k::<4>(&w[r * rb..(r + 1) * rb], a4, &mut o) };
                                        for (k, v) in o.into_iter().enumerate() {
                                            // SAFETY: the caller guarantees out holds n × ld and
                                            // that rows r0..r1 are this call's alone.
                                            unsafe { *out.0.add((t + k) * ld + r) = v };
                                        }
                                    }
                                    t += 4;
                                }
                                while t < n {
                                    let a1 = [acts.row(t)];
                                    #[allow(unused_mut)]
                                    let mut r = r0;
                                    pair_rows!($kr, w, rb, r, r1, a1, out, t, ld);
                                    for r in r..r1 {
                                        let mut o = [0f32; 1];
                                        // SAFETY: as above.
                                        unsafe { $k::<1>(&w[r * rb..(r + 1) * rb], a1, &mut o) };
                                        unsafe { *out.0.add(t * ld + r) = o[0] };
                                    }
                                    t += 1;
                                }
                            }
                            Some(Kernels {
                                dot: |w: &[u8], a: ActRow<'_>| {
                                    let mut o = [0f32; 1];
                                    // SAFETY: the CPU has this tier's features (checked by
                                    // `select` through `best_tier`), and the kernel reads only
                                    // within `w` and `a`, whose lengths it checks.
                                    unsafe { $k::<1>(w, [a], &mut o) };
                                    o[0]
                                },
                                dot4: |w: &[u8], a: [ActRow<'_>; 4]| {
                                    let mut o = [0f32; 4];
                                    // SAFETY: as above.
                                    unsafe { $k::<4>(w, a, &mut o) };
                                    o
                                },
                                rows: Some(rows as RowsFn),
                            })
                        }};
                    }
                    match ty {
                        GgmlType::Q4_0 => pair!(q4_0, q4_0_r),
                        GgmlType::Q4_1 => pair!(q4_1, q4_1_r),
                        GgmlType::Q5_0 => pair!(q5_0, q5_0_r),
                        GgmlType::Q8_0 => pair!(q8_0, q8_0_r),
                        GgmlType::Q4_K => pair!(q4_k),
                        GgmlType::Q5_K => pair!(q5_k),
                        GgmlType::Q6_K => pair!(q6_k),
                        GgmlType::F16 => pair!(f16w),
                        GgmlType::F32 => pair!(f32w),
                        GgmlType::BF16 => pair!(bf16w),
                        _ => None,
                    }
                }

                /// How far ahead of the current weight block to prefetch. The hardware prefetcher
                /// alone reached a third of the machine's read bandwidth in `benches/kernels.rs`.
                const PREFETCH: usize = 3072;

                /// Prefetches the cache lines of the block PREFETCH bytes ahead of `p`.
                #[inline]
                #[target_feature(enable = $feat)]
                fn prefetch_block(p: *const u8, len: usize) {
                    let mut off = 0;
                    while off < len {
                        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH + off) as *const i8);
                        off += 64;
                    }
                }

                #[inline]
                #[target_feature(enable = $feat)]
                fn udot($u: __m256i, $s: __m256i) -> __m256i {
                    $udot
                }

                /// Signed × signed bytes via |x| and sign transfer (x is never -128 here).
                #[inline]
                #[target_feature(enable = $feat)]
                fn sdot(x: __m256i, y: __m256i) -> __m256i {
                    udot(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
                }

                /// The f16 at p as f32. Reads 4 bytes (callers have them: every block holds more
                /// after its scale). A zero-extending 32-bit load, not a 16-bit insert: an insert
                /// merges into a register the compiler may also use as an accumulator, chaining
                /// every block to the previous one.
                #[inline]
                #[target_feature(enable = $feat)]
                unsafe fn f16(p: *const u8) -> f32 {
                    // SAFETY: the caller guarantees 4 readable bytes at p.
                    let v = unsafe { _mm_loadu_si32(p) };
                    _mm_cvtss_f32(_mm_cvtph_ps(v))
                }

                /// The f16 at p as f32, for a scale at the very end of a block: reads the 4 bytes
                /// ending at p + 2.
                #[inline]
                #[target_feature(enable = $feat)]
                unsafe fn f16_end(p: *const u8) -> f32 {
                    // SAFETY: the caller guarantees the 2 bytes before p and 2 at p are readable.
                    let v = unsafe { _mm_loadu_si32(p.sub(2)) };
                    _mm_cvtss_f32(_mm_movehdup_ps(_mm_cvtph_ps(v)))
                }

                #[inline]
                #[target_feature(enable = $feat)]
                fn hsum(v: __m256) -> f32 {
                    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
                }

                /// 32 nibbles of 16 bytes: low nibbles (elements 0..16) then high (16..32).
                #[inline]
                #[target_feature(enable = $feat)]
                unsafe fn nibbles32(p: *const u8) -> __m256i {
                    // SAFETY: the caller guarantees 16 readable bytes at p.
                    let q = unsafe { _mm_loadu_si128(p as *const __m128i) };
                    let m = _mm_set1_epi8(0x0F);
                    _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m), _mm_and_si128(q, m))
                }

                /// 0xFF in byte j where bit j of the 32-bit word at p is set.
                #[inline]
                #[target_feature(enable = $feat)]
                unsafe fn bits32(p: *const u8) -> __m256i {
                    // SAFETY: the caller guarantees 4 readable bytes at p.
                    let x = unsafe { std::ptr::read_unaligned(p as *const u32) } as i32;
                    let shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
                    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x), shuf);
                    let mask = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe_u64 as i64);
                    _mm256_cmpeq_epi8(_mm256_or_si256(bytes, mask), _mm256_set1_epi64x(-1))
                }

                #[inline]
                #[target_feature(enable = $feat)]
                unsafe fn load(p: *const i8) -> __m256i {
                    // SAFETY: the caller guarantees 32 readable bytes at p.
                    unsafe { _mm256_loadu_si256(p as *const __m256i) }
                }

                /// Shared driver for the 32-element block formats: `block(ptr)` gives the weight
                /// block's signed (or, with `unsigned_w`, unsigned) values, and `min` adds
                /// `m·s` (Q4_1).
                /// Shared body of the 32-element block formats: `R` weight rows × `N` activation
                /// rows. `$vals` gives a weight block's signed (or unsigned) values from its
                /// pointer; `min` adds Q4_1's `m·s`. Each (row, token) pair runs the same
                /// operations in the same order whatever R and N are (batch invariance).
                macro_rules! blocks32 {
                    ($w:ident, $a:ident, $out:ident, $ts:expr, |$p:ident| $vals:expr, signed = $signed:expr, min = $min:expr) => {{
                        let nb = $w[0].len() / $ts;
                        for wr in &$w {
                            assert!(wr.len() >= nb * $ts);
                        }
                        for r in &$a {
                            assert!(r.qs.len() >= nb * 32 && r.d.len() >= nb && ($min == false || r.s.len() >= nb));
                        }
                        let mut acc0 = [[_mm256_setzero_ps(); N]; R];
                        let mut macc0 = [[0f32; N]; R];
                        macro_rules! block {
                            ($i:expr, $acc:ident, $macc:ident) => {{
                                let i = $i;
                                let mut wv = [_mm256_setzero_si256(); R];
                                let mut dw = [0f32; R];
                                let mut mw = [0f32; R];
                                for rr in 0..R {
                                    // SAFETY: i < nb, so the block lies inside row rr (asserted).
                                    let $p = unsafe { $w[rr].as_ptr().add(i * $ts) };
                                    // Prefetch PREFETCH bytes ahead (a prefetch past the end is harmless).
                                    _mm_prefetch::<_MM_HINT_T0>($p.wrapping_add(PREFETCH) as *const i8);
                                    wv[rr] = $vals;
                                    dw[rr] = unsafe { f16($p) };
                                    if $min {
                                        mw[rr] = unsafe { f16($p.add(2)) };
                                    }
                                }
                                for t in 0..N {
                                    // SAFETY: the assert above bounds every activation row.
                                    let av = unsafe { load($a[t].qs.as_ptr().add(i * 32)) };
                                    let da = unsafe { *$a[t].d.get_unchecked(i) };
                                    for rr in 0..R {
                                        let isum = if $signed { sdot(wv[rr], av) } else { udot(wv[rr], av) };
                                        let d = dw[rr] * da;
                                        $acc[rr][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(d), $acc[rr][t]);
                                        if $min {
                                            $macc[rr][t] += mw[rr] * unsafe { *$a[t].s.get_unchecked(i) };
                                        }
                                    }
                                }
                            }};
                        }
                        // One accumulator per (row, token), blocks in order: ggml's summation
                        // order, so near-ties in the logits resolve as in llama.cpp. Independent
                        // chains come from the paired rows (decode) and the tokens (prefill).
                        for i in 0..nb {
                            block!(i, acc0, macc0);
                        }
                        for rr in 0..R {
                            for t in 0..N {
                                $out[rr][t] = hsum(acc0[rr][t]) + macc0[rr][t];
                            }
                        }
                    }};
                }

                /// Defines `$name` (one row × N activations) and `$name_r` (R rows × N) for a
                /// 32-element block format.
                macro_rules! kernel32 {
                    ($kname:ident, $kname_r:ident, $ts:expr, |$p:ident| $vals:expr, signed = $signed:expr, min = $min:expr) => {
                        #[target_feature(enable = $feat)]
                        unsafe fn $kname_r<const R: usize, const N: usize>(w: [&[u8]; R], a: [ActRow<'_>; N], out: &mut [[f32; N]; R]) {
                            blocks32!(w, a, out, $ts, |$p| $vals, signed = $signed, min = $min)
                        }

                        #[target_feature(enable = $feat)]
                        unsafe fn $kname<const N: usize>(w: &[u8], a: [ActRow<'_>; N], out: &mut [f32; N]) {
                            let mut o = [[0f32; N]; 1];
                            // SAFETY: same features; the callee checks every length.
                            unsafe { $kname_r::<1, N>([w], a, &mut o) };
                            *out = o[0];
                        }
                    };
                }

                kernel32!(q4_0, q4_0_r, 18, |p| _mm256_sub_epi8(unsafe { nibbles32(p.add(2)) }, _mm256_set1_epi8(8)), signed = true, min = false);
                kernel32!(q4_1, q4_1_r, 20, |p| unsafe { nibbles32(p.add(4)) }, signed = false, min = true);
                // Q5_0: (nibble | high<<4) - 16, formed as: where the high bit is clear, OR 0xF0.
                kernel32!(q5_0, q5_0_r, 22, |p| {
                    let q = unsafe { nibbles32(p.add(6)) };
                    let hi = unsafe { bits32(p.add(2)) };
                    _mm256_or_si256(q, _mm256_andnot_si256(hi, _mm256_set1_epi8(0xF0u8 as i8)))
                }, signed = true, min = false);
                kernel32!(q8_0, q8_0_r, 34, |p| unsafe { load(p.add(2) as *const i8) }, signed = true, min = false);

                /// Decodes a Q4_K/Q5_K block's 8 scales and 8 mins (ggml's `get_scale_min_k4`).
                #[inline]
                #[target_feature(enable = $feat)]
                fn k4_scales(sc: &[u8]) -> ([u8; 8], [u8; 8]) {
                    let mut s = [0u8; 8];
                    let mut m = [0u8; 8];
                    for j in 0..8 {
                        let (a, b) = crate::quants::scale_min_k4(j, sc);
                        s[j] = a;
                        m[j] = b;
                    }
                    (s, m)
                }

                macro_rules! k4k5 {
                    ($w:ident, $a:ident, $out:ident, $ts:expr, $is5:expr) => {{
                        let nb = $w.len() / $ts;
                        for r in &$a {
                            assert!(r.qs.len() >= nb * 256 && r.d.len() >= nb && r.bsums.len() >= nb * 16);
                        }
                        let mut acc = [_mm256_setzero_ps(); N];
                        let mut macc = [0f32; N];
                        let m4 = _mm256_set1_epi8(0x0F);
                        for i in 0..nb {
                            let b = &$w[i * $ts..(i + 1) * $ts];
                            prefetch_block(b.as_ptr(), $ts);
                            // SAFETY: b has $ts bytes; the header reads are within it.
                            let (d, dmin) = unsafe { (f16(b.as_ptr()), f16(b.as_ptr().add(2))) };
                            let (sc, mn) = k4_scales(&b[4..16]);
                            let (qh, ql) = if $is5 { (&b[16..48], &b[48..176]) } else { (&b[0..0], &b[16..144]) };
                            let mut isum = [_mm256_setzero_si256(); N];
                            let hbits = if $is5 { unsafe { load(qh.as_ptr() as *const i8) } } else { _mm256_setzero_si256() };
                            for j in 0..4 {
                                // SAFETY: ql has 128 bytes; j*32+32 <= 128.
                                let q = unsafe { load(ql.as_ptr().add(32 * j) as *const i8) };
                                let mut lo = _mm256_and_si256(q, m4);
                                let mut hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
                                if $is5 {
                                    let one = _mm256_set1_epi8(1);
                                    let h1 = _mm256_and_si256(_mm256_srlv_epi64(hbits, _mm256_set1_epi64x((2 * j) as i64)), one);
                                    let h2 = _mm256_and_si256(_mm256_srlv_epi64(hbits, _mm256_set1_epi64x((2 * j + 1) as i64)), one);
                                    lo = _mm256_or_si256(lo, _mm256_slli_epi16(h1, 4));
                                    hi = _mm256_or_si256(hi, _mm256_slli_epi16(h2, 4));
                                }
                                let s1 = _mm256_set1_epi16(sc[2 * j] as i16);
                                let s2 = _mm256_set1_epi16(sc[2 * j + 1] as i16);
                                for t in 0..N {
                                    // SAFETY: the assert above bounds the activation rows.
                                    let a1 = unsafe { load($a[t].qs.as_ptr().add(256 * i + 64 * j)) };
                                    let a2 = unsafe { load($a[t].qs.as_ptr().add(256 * i + 64 * j + 32)) };
                                    let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, a1), s1);
                                    let p2 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, a2), s2);
                                    isum[t] = _mm256_add_epi32(isum[t], _mm256_add_epi32(p1, p2));
                                }
                            }
                            for t in 0..N {
                                let bs = &$a[t].bsums[16 * i..16 * i + 16];
                                let mut msum = 0i32;
                                for j in 0..8 {
                                    msum += mn[j] as i32 * (bs[2 * j] as i32 + bs[2 * j + 1] as i32);
                                }
                                let da = unsafe { *$a[t].d.get_unchecked(i) };
                                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), _mm256_set1_ps(d * da), acc[t]);
                                macc[t] += dmin * da * msum as f32;
                            }
                        }
                        for t in 0..N {
                            $out[t] = hsum(acc[t]) - macc[t];
                        }
                    }};
                }

                #[target_feature(enable = $feat)]
                unsafe fn q4_k<const N: usize>(w: &[u8], a: [ActRow<'_>; N], out: &mut [f32; N]) {
                    k4k5!(w, a, out, 144, false)
                }

                #[target_feature(enable = $feat)]
                unsafe fn q5_k<const N: usize>(w: &[u8], a: [ActRow<'_>; N], out: &mut [f32; N]) {
                    k4k5!(w, a, out, 176, true)
                }

                #[target_feature(enable = $feat)]
                unsafe fn q6_k<const N: usize>(w: &[u8], a: [ActRow<'_>; N], out: &mut [f32; N]) {
                    let nb = w.len() / 210;
                    for r in &a {
                        assert!(r.qs.len() >= nb * 256 && r.d.len() >= nb);
                    }
                    let mut acc = [_mm256_setzero_ps(); N];
                    let m4 = _mm256_set1_epi8(0x0F);
                    let m3 = _mm256_set1_epi8(0x30);
                    let m32 = _mm256_set1_epi8(32);
                    for i in 0..nb {
                        let b = &w[i * 210..(i + 1) * 210];
                        prefetch_block(b.as_ptr(), 210);
                        // SAFETY: bytes 206..210 are inside the 210-byte block.
                        let d = unsafe { f16_end(b.as_ptr().add(208)) };
                        let mut isum = [_mm256_setzero_si256(); N];
                        for n in 0..2 {
                            // SAFETY: ql is b[0..128], qh b[128..192]; each load is 32 bytes inside.
                            let (ql0, ql1, qh) = unsafe {
                                (
                                    load(b.as_ptr().add(64 * n) as *const i8),
                                    load(b.as_ptr().add(64 * n + 32) as *const i8),
                                    load(b.as_ptr().add(128 + 32 * n) as *const i8),
                                )
                            };
                            let q = [
                                _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m3)),
                                _mm256_or_si256(_mm256_and_si256(ql1, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m3)),
                                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), _mm256_and_si256(qh, m3)),
                                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4), _mm256_and_si256(_mm256_srli_epi16(qh, 2), m3)),
                            ];
                            let sc = &b[192 + 8 * n..200 + 8 * n];
                            for k in 0..4 {
                                let lo = sc[2 * k] as i8 as i16;
                                let hi = sc[2 * k + 1] as i8 as i16;
                                let scales = _mm256_set_m128i(_mm_set1_epi16(hi), _mm_set1_epi16(lo));
                                for t in 0..N {
                                    // SAFETY: the assert above bounds the activation rows.
                                    let av = unsafe { load(a[t].qs.as_ptr().add(256 * i + 128 * n + 32 * k)) };
                                    let p = _mm256_sub_epi16(_mm256_maddubs_epi16(q[k], av), _mm256_maddubs_epi16(m32, av));
                                    isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(p, scales));
                                }
                            }
                        }
                        for t in 0..N {
                            let da = unsafe { *a[t].d.get_unchecked(i) };
                            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), _mm256_set1_ps(d * da), acc[t]);
                        }
                    }
                    for t in 0..N {
                        out[t] = hsum(acc[t]);
                    }
                }

                /// Float weight rows (f16 or f32, `$es` bytes per element, `$load` widening 8 of
                /// them at element i) · f32 activations, four accumulators per row.
                macro_rules! float_rows {
                    ($fname:ident, $es:expr, |$wp:ident, $i:ident| $load:expr, |$wj:ident| $scalar:expr) => {
                        #[target_feature(enable = $feat)]
                        unsafe fn $fname<const N: usize>(w: &[u8], a: [ActRow<'_>; N], out: &mut [f32; N]) {
                            let n = w.len() / $es;
                            for r in &a {
                                assert!(r.f.len() >= n);
                            }
                            // Four accumulators per row (lanes i mod 32) hide the FMA latency.
                            let mut acc4 = [[_mm256_setzero_ps(); 4]; N];
                            let mut $i = 0;
                            let $wp = w.as_ptr();
                            while $i + 8 <= n {
                                if $i % 32 == 0 {
                                    _mm_prefetch::<_MM_HINT_T0>($wp.wrapping_add($es * $i + PREFETCH) as *const i8);
                                }
                                // SAFETY: the 8 elements at i are inside w (i + 8 <= n).
                                let wv = unsafe { $load };
                                for t in 0..N {
                                    let av = unsafe { _mm256_loadu_ps(a[t].f.as_ptr().add($i)) };
                                    acc4[t][($i / 8) % 4] = _mm256_fmadd_ps(wv, av, acc4[t][($i / 8) % 4]);
                                }
                                $i += 8;
                            }
                            for t in 0..N {
                                let acc = _mm256_add_ps(_mm256_add_ps(acc4[t][0], acc4[t][1]), _mm256_add_ps(acc4[t][2], acc4[t][3]));
                                let mut s = hsum(acc);
                                for j in $i..n {
                                    let $wj = &w[$es * j..$es * (j + 1)];
                                    s += $scalar * a[t].f[j];
                                }
                                out[t] = s;
                            }
                        }
                    };
                }

                float_rows!(f16w, 2, |wp, i| _mm256_cvtph_ps(_mm_loadu_si128(wp.add(2 * i) as *const __m128i)), |b| half::f16::from_le_bytes([b[0], b[1]]).to_f32());
                float_rows!(f32w, 4, |wp, i| _mm256_loadu_ps(wp.add(4 * i) as *const f32), |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                // bf16 is the top half of an f32: widen to 32 bits and shift left by 16 (exact).
                float_rows!(
                    bf16w,
                    2,
                    |wp, i| _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(wp.add(2 * i) as *const __m128i)), 16)),
                    |b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()
                );
            }
        };
    }

    tier!(
        avx2,
        "avx2,fma,f16c",
        crate::dispatch::Tier::Avx2,
        |u, s| _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
    );
    tier!(
        vnni,
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
        crate::dispatch::Tier::Avx512Vnni,
        |u, s| _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::act::{ActFormat, QuantActs};
    use crate::dispatch::best_tier;
    use crate::dot::dot_scalar;
    use crate::test_util::{bytes, random_row};

    const TYPES: [GgmlType; 10] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::F32,
    ];

    fn float_row(ty: GgmlType, n: usize, seed: u64) -> Vec<u8> {
        let v: Vec<f32> = bytes(n, seed)
            .iter()
            .map(|&b| (b as f32 - 128.0) / 50.0)
            .collect();
        match ty {
            GgmlType::F16 => v
                .iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect(),
            GgmlType::BF16 => v
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                .collect(),
            _ => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    /// Every SIMD kernel against its scalar twin, on random blocks and on edge cases (all-max
    /// quants, zero activations, extreme activations), for every tier this CPU has.
    #[test]
    fn simd_matches_scalar_twin() {
        let tiers: Vec<Tier> = [Tier::Avx2, Tier::Avx512Vnni]
            .into_iter()
            .filter(|&t| t <= best_tier())
            .collect();
        if tiers.is_empty() {
            eprintln!("no SIMD tier on this CPU");
        }
        for tier in tiers {
            for ty in TYPES {
                let k = select(ty, tier).unwrap_or_else(|| panic!("{ty} has no {tier:?} kernel"));
                let (dot, dot4) = (k.dot, k.dot4);
                for case in 0..6 {
                    let n = 1024;
                    let w = match ty {
                        GgmlType::F16 | GgmlType::BF16 | GgmlType::F32 => float_row(ty, n, case),
                        _ => {
                            let mut w = random_row(ty, n, 100 + case);
                            if case == 1 {
                                // all quant bits set (max nibbles, all high bits) keeping the scales
                                let fresh = random_row(ty, n, 100 + case);
                                w.iter_mut().for_each(|b| *b = 0xFF);
                                let ts = ty.type_size();
                                for (blk, f) in w.chunks_mut(ts).zip(fresh.chunks(ts)) {
                                    let off: &[usize] = match ty {
                                        GgmlType::Q4_K | GgmlType::Q5_K => &[0, 1, 2, 3],
                                        GgmlType::Q6_K => &[208, 209],
                                        GgmlType::Q4_1 => &[0, 1, 2, 3],
                                        _ => &[0, 1],
                                    };
                                    for &o in off {
                                        blk[o] = f[o];
                                    }
                                }
                            }
                            w
                        }
                    };
                    let x: Vec<f32> = match case {
                        2 => vec![0.0; 4 * n],
                        3 => (0..4 * n)
                            .map(|i| if i % 2 == 0 { 1e4 } else { -1e4 })
                            .collect(),
                        _ => bytes(4 * n, 7 + case)
                            .iter()
                            .map(|&b| (b as f32 - 128.0) / 17.0)
                            .collect(),
                    };
                    let mut acts = QuantActs::default();
                    acts.quantize(ActFormat::for_weight(ty), &x, n);
                    let rows = [acts.row(0), acts.row(1), acts.row(2), acts.row(3)];
                    let four = dot4(&w, rows);
                    for t in 0..4 {
                        let s = dot_scalar(ty, &w, rows[t]);
                        let v = dot(&w, rows[t]);
                        let tol = 1e-4 * s.abs().max(1.0)
                            + 1e-5 * x.iter().map(|v| v.abs()).sum::<f32>() / 4.0;
                        assert!(
                            (v - s).abs() <= tol,
                            "{tier:?} {ty} case {case} row {t}: simd {v} vs scalar {s}"
                        );
                        assert_eq!(
                            v.to_bits(),
                            four[t].to_bits(),
                            "{tier:?} {ty}: batch of 4 differs from single row"
                        );
                    }
                }
            }
        }
    }
}
