//! Activation quantization: a matmul input is quantized once, and every weight row is then
//! dotted against it with integer arithmetic (ggml's `vec_dot_type` scheme).
//!
//! * Q8_0/Q8_1 (blocks of 32): `d = amax / 127` rounded to f16, `q = round(x / d)`, and
//!   `s = d * Σq` (Q8_1's sum, used by the Q4_1 and Q5_1 dots to apply the block minimum).
//! * Q8_K (blocks of 256): `d = max / -127` with `max` the signed value of largest magnitude,
//!   plus 16 partial sums of 16 quants (used by the k-quants to apply their minima).
//!
//! References: `quantize_row_q8_0_ref`, `quantize_row_q8_1_ref`, `quantize_row_q8_K_ref` in
//! ggml's `ggml-quants.c`.

use crate::quants::{round_f16, QK_K};
use crate::GgmlType;

/// Which activation format a weight type is multiplied with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActFormat {
    /// Blocks of 32 int8 with an f16-rounded scale and block sum (serves Q8_0 and Q8_1 pairings).
    Q8x32,
    /// Blocks of 256 int8 with an f32 scale and 16 partial sums.
    Q8K,
    /// Plain f32 (for float weights).
    F32,
}

impl ActFormat {
    /// The activation format ggml pairs with a weight type.
    pub fn for_weight(ty: GgmlType) -> ActFormat {
        use GgmlType::*;
        match ty {
            Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 => ActFormat::Q8x32,
            Q2_K | Q3_K | Q4_K | Q5_K | Q6_K => ActFormat::Q8K,
            _ => ActFormat::F32,
        }
    }
}

/// A batch of quantized activation rows (`n_rows × cols`), reused across calls to avoid
/// allocation on the decode path.
#[derive(Debug, Default, Clone)]
pub struct QuantActs {
    /// The format of the rows.
    pub format: Option<ActFormat>,
    /// Row length in elements.
    pub cols: usize,
    /// Number of rows.
    pub n_rows: usize,
    /// Quants: `n_rows × cols`.
    pub qs: Vec<i8>,
    /// Scales: `n_rows × (cols / block)`.
    pub d: Vec<f32>,
    /// Q8x32: `d * Σq` per block (`n_rows × cols/32`); Q8K: the 16-element partial sums as f32
    /// would lose exactness, so they live in `bsums` instead and this is empty.
    pub s: Vec<f32>,
    /// Integer sums of the quants: Q8K per 16 (`n_rows × cols/16`), Q8x32 per block of 32
    /// (`n_rows × cols/32`, used by the row-interleaved kernels to undo their weight offset).
    pub bsums: Vec<i16>,
    /// F32 copy of the rows (`n_rows × cols`), for float weights.
    pub f: Vec<f32>,
}

/// One quantized activation row, borrowed from [`QuantActs`].
#[derive(Debug, Clone, Copy)]
pub struct ActRow<'a> {
    /// Quants (`cols`).
    pub qs: &'a [i8],
    /// Block scales.
    pub d: &'a [f32],
    /// Block sums (Q8x32).
    pub s: &'a [f32],
    /// Integer quant sums: per 16 (Q8K) or per block of 32 (Q8x32).
    pub bsums: &'a [i16],
    /// F32 values (F32 format).
    pub f: &'a [f32],
}

impl QuantActs {
    /// Sets the shape and sizes the buffers for `x.len()` values in `format`.
    fn reshape(&mut self, format: ActFormat, len: usize, cols: usize) {
        debug_assert_eq!(len % cols, 0);
        self.format = Some(format);
        self.cols = cols;
        self.n_rows = len / cols;
        match format {
            ActFormat::Q8x32 => {
                debug_assert_eq!(cols % 32, 0);
                self.qs.resize(len, 0);
                self.d.resize(len / 32, 0.0);
                self.s.resize(len / 32, 0.0);
                self.bsums.resize(len / 32, 0);
            }
            ActFormat::Q8K => {
                debug_assert_eq!(cols % QK_K, 0);
                self.qs.resize(len, 0);
                self.d.resize(len / QK_K, 0.0);
                self.bsums.resize(len / 16, 0);
            }
            ActFormat::F32 => self.f.clear(),
        }
    }

    /// Quantizes `x` (`n_rows × cols`, row-major) into `format`, reusing the buffers.
    pub fn quantize(&mut self, format: ActFormat, x: &[f32], cols: usize) {
        self.reshape(format, x.len(), cols);
        match format {
            ActFormat::F32 => self.f.extend_from_slice(x),
            _ => quantize_blocks(
                format,
                x,
                &mut self.qs,
                &mut self.d,
                &mut self.s,
                &mut self.bsums,
            ),
        }
    }

    /// Like [`QuantActs::quantize`], splitting the rows over the pool when there are several.
    pub fn quantize_par(
        &mut self,
        pool: &crate::pool::ThreadPool,
        format: ActFormat,
        x: &[f32],
        cols: usize,
    ) {
        let n_rows = x.len() / cols;
        if n_rows < 4 || format == ActFormat::F32 {
            return self.quantize(format, x, cols);
        }
        self.reshape(format, x.len(), cols);
        self.quantize_rows_par(pool, format, cols, &|r| &x[r * cols..(r + 1) * cols]);
    }

    /// Produces the rows of `x` and quantizes them in one pass over the pool: each task first
    /// runs `make(r, row)` on its row r of `x` (an RMS norm into it, an activation function in
    /// place), then quantizes it — one synchronization instead of two, and the producing step
    /// parallel too. `x` keeps the produced f32 rows.
    pub fn produce_and_quantize_par(
        &mut self,
        pool: &crate::pool::ThreadPool,
        format: ActFormat,
        x: &mut [f32],
        cols: usize,
        make: &(dyn Fn(usize, &mut [f32]) + Sync),
    ) {
        let n_rows = x.len() / cols;
        if n_rows < 4 || format == ActFormat::F32 {
            for (r, row) in x.chunks_exact_mut(cols).enumerate() {
                make(r, row);
            }
            return self.quantize(format, x, cols);
        }
        self.reshape(format, x.len(), cols);
        let xp = crate::SyncPtr::new(x);
        self.quantize_rows_par(pool, format, cols, &|r| {
            // SAFETY: row r of x belongs to this task alone, and x outlives the pool run.
            let row = unsafe { xp.slice(r * cols, cols) };
            make(r, row);
            &*row
        });
    }

    /// Quantizes row r (of `cols` values, as `row(r)` hands it out) of an already reshaped
    /// batch in pool task r.
    fn quantize_rows_par<'x>(
        &mut self,
        pool: &crate::pool::ThreadPool,
        format: ActFormat,
        cols: usize,
        row: &(dyn Fn(usize) -> &'x [f32] + Sync),
    ) {
        let n_rows = self.n_rows;
        let bs = if format == ActFormat::Q8K { QK_K } else { 32 };
        let nb_row = cols / bs;
        let (qs, d, s, bsums) = (
            crate::SyncPtr::new(&mut self.qs),
            crate::SyncPtr::new(&mut self.d),
            crate::SyncPtr::new(&mut self.s),
            crate::SyncPtr::new(&mut self.bsums),
        );
        let q8k = format == ActFormat::Q8K;
        pool.run(n_rows, &|r| {
            // SAFETY: row r's ranges of each buffer (sized by reshape) belong to this task alone;
            // the buffer a format does not use gets an empty slice.
            let (q, dd, ss, b) = unsafe {
                (
                    qs.slice(r * cols, cols),
                    d.slice(r * nb_row, nb_row),
                    if q8k {
                        s.slice(0, 0)
                    } else {
                        s.slice(r * nb_row, nb_row)
                    },
                    if q8k {
                        bsums.slice(r * cols / 16, cols / 16)
                    } else {
                        bsums.slice(r * nb_row, nb_row)
                    },
                )
            };
            quantize_blocks(format, row(r), q, dd, ss, b);
        });
    }

    /// Row `r` of the batch.
    #[inline]
    pub fn row(&self, r: usize) -> ActRow<'_> {
        let c = self.cols;
        match self.format {
            Some(ActFormat::Q8x32) => ActRow {
                qs: &self.qs[r * c..(r + 1) * c],
                d: &self.d[r * c / 32..(r + 1) * c / 32],
                s: &self.s[r * c / 32..(r + 1) * c / 32],
                bsums: &self.bsums[r * c / 32..(r + 1) * c / 32],
                f: &[],
            },
            Some(ActFormat::Q8K) => ActRow {
                qs: &self.qs[r * c..(r + 1) * c],
                d: &self.d[r * c / QK_K..(r + 1) * c / QK_K],
                s: &[],
                bsums: &self.bsums[r * c / 16..(r + 1) * c / 16],
                f: &[],
            },
            _ => ActRow {
                qs: &[],
                d: &[],
                s: &[],
                bsums: &[],
                f: &self.f[r * c..(r + 1) * c],
            },
        }
    }
}

/// Quantizes whole blocks of `x` into the quants, scales and sums of `format` (Q8x32 fills
/// `s` and one integer sum per block in `bsums`, Q8K fills 16 partial sums per block).
fn quantize_blocks(
    format: ActFormat,
    x: &[f32],
    q: &mut [i8],
    d: &mut [f32],
    s: &mut [f32],
    bsums: &mut [i16],
) {
    match format {
        ActFormat::Q8x32 => (q8x32_row())(x, q, d, s, bsums),
        ActFormat::Q8K => {
            for (i, xb) in x.chunks_exact(QK_K).enumerate() {
                d[i] = quantize_q8k_block(
                    xb,
                    &mut q[QK_K * i..QK_K * (i + 1)],
                    &mut bsums[16 * i..16 * (i + 1)],
                );
            }
        }
        ActFormat::F32 => {}
    }
}

/// Quantizes a row (`x.len()` a multiple of 32) into blocks of [`quantize_q8_block`]:
/// quants `q`, scales `d`, scaled sums `s` and quant sums `bsums`. The scalar twin of the
/// AVX2 kernel [`q8x32_row`] picks.
pub fn quantize_q8x32_row_scalar(
    x: &[f32],
    q: &mut [i8],
    d: &mut [f32],
    s: &mut [f32],
    bsums: &mut [i16],
) {
    for (i, xb) in x.chunks_exact(32).enumerate() {
        let qb = &mut q[32 * i..32 * i + 32];
        (d[i], s[i]) = quantize_q8_block(xb, qb);
        bsums[i] = qb.iter().map(|&v| v as i16).sum();
    }
}

type Q8RowFn = fn(&[f32], &mut [i8], &mut [f32], &mut [f32], &mut [i16]);

/// The row quantizer for this CPU, chosen once: AVX2 (bit-identical to the scalar twin: the
/// same max, the same single multiply, round-half-even conversion, exact integer sums) or
/// scalar.
fn q8x32_row() -> Q8RowFn {
    static F: std::sync::OnceLock<Q8RowFn> = std::sync::OnceLock::new();
    *F.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if crate::dispatch::tier() >= crate::dispatch::Tier::Avx2 {
            // SAFETY: the tier check guarantees AVX2 and F16C; the wrapper passes slices whose
            // lengths the kernel checks.
            return |x, q, d, s, b| unsafe { x86::q8x32_row(x, q, d, s, b) };
        }
        quantize_q8x32_row_scalar
    })
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// [`crate::quants::round_f16`] inline with F16C (round to nearest even, as `half`'s
    /// conversion: the row test checks the scales bit for bit), instead of a call per value.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn round_f16_f16c(x: f32) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(
            _mm_set_ss(x),
        )))
    }

    /// # Safety
    /// AVX2 and F16C (the AVX2 tier includes it). Lengths: `q` ≥ `x`, `d`, `s`, `bsums` ≥
    /// `x.len() / 32` (asserted).
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn q8x32_row(
        x: &[f32],
        q: &mut [i8],
        d: &mut [f32],
        s: &mut [f32],
        bsums: &mut [i16],
    ) {
        let nb = x.len() / 32;
        assert!(
            q.len() >= nb * 32 && d.len() >= nb && s.len() >= nb && bsums.len() >= nb,
            "q8x32_row: buffers too short"
        );
        let sign = _mm256_set1_ps(-0.0);
        for i in 0..nb {
            // SAFETY: block i's 32 values and 32 quants are inside x and q (asserted above).
            unsafe {
                let p = x.as_ptr().add(32 * i);
                let v = [
                    _mm256_loadu_ps(p),
                    _mm256_loadu_ps(p.add(8)),
                    _mm256_loadu_ps(p.add(16)),
                    _mm256_loadu_ps(p.add(24)),
                ];
                let a = v.map(|vk| _mm256_andnot_ps(sign, vk));
                let m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
                let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
                let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
                let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
                let dd = amax / 127.0;
                let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
                let r = v.map(|vk| _mm256_cvtps_epi32(_mm256_mul_ps(vk, id)));
                let sum =
                    _mm256_add_epi32(_mm256_add_epi32(r[0], r[1]), _mm256_add_epi32(r[2], r[3]));
                let sum = _mm_add_epi32(
                    _mm256_castsi256_si128(sum),
                    _mm256_extracti128_si256(sum, 1),
                );
                let sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0b01_00_11_10));
                let total =
                    _mm_cvtsi128_si32(_mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0b10_11_00_01)));
                // i32 → i16 → i8 packs work per 128-bit lane; the permute restores the order.
                let w01 = _mm256_packs_epi32(r[0], r[1]);
                let w23 = _mm256_packs_epi32(r[2], r[3]);
                let b = _mm256_permutevar8x32_epi32(
                    _mm256_packs_epi16(w01, w23),
                    _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7),
                );
                _mm256_storeu_si256(q.as_mut_ptr().add(32 * i) as *mut __m256i, b);
                d[i] = round_f16_f16c(dd);
                s[i] = round_f16_f16c(dd * total as f32);
                bsums[i] = total as i16;
            }
        }
    }
}

/// ggml's `nearest_int`: round half to even through the 1.5·2^23 trick (|x| < 2^22).
#[inline(always)]
fn nearest_int(x: f32) -> i32 {
    let v = x + 12_582_912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// Quantizes 32 values to int8 as ggml's x86 `quantize_row_q8_1` does (the path llama.cpp runs
/// on this hardware): `d = amax / 127` stored as f16, `q = round_ties_even(x · 127 / amax)`,
/// `s = f16(d · Σq)`. Returns (d, s), both f16-rounded.
pub fn quantize_q8_block(x: &[f32], q: &mut [i8]) -> (f32, f32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for (qi, &v) in q.iter_mut().zip(x) {
        let r = nearest_int(v * id);
        *qi = r as i8;
        sum += r;
    }
    (round_f16(d), round_f16(d * sum as f32))
}

/// Quantizes 256 values to Q8_K (`quantize_row_q8_K_ref`); returns d and fills the partial sums.
pub fn quantize_q8k_block(x: &[f32], q: &mut [i8], bsums: &mut [i16]) -> f32 {
    let mut amax = 0f32;
    let mut max = 0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        q.fill(0);
        bsums.fill(0);
        return 0.0;
    }
    let iscale = -127.0 / max;
    for (qi, &v) in q.iter_mut().zip(x) {
        *qi = nearest_int(iscale * v).min(127) as i8;
    }
    for (j, b) in bsums.iter_mut().enumerate() {
        *b = q[16 * j..16 * j + 16].iter().map(|&v| v as i16).sum();
    }
    1.0 / iscale
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The row quantizer this CPU uses equals its scalar twin bit for bit (quants, scales,
    /// sums), on rows with ties at .5 steps, zeros, one huge value and random values.
    #[test]
    fn q8x32_row_matches_its_scalar_twin() {
        let mut rows: Vec<Vec<f32>> = vec![
            vec![0.0; 64],
            (0..96).map(|i| (i as f32 - 40.0) * 0.5).collect(),
        ];
        rows.push(
            (0..64)
                .map(|i| if i == 17 { 3e4 } else { (i as f32).sin() })
                .collect(),
        );
        rows.push(
            crate::test_util::bytes(4096, 5)
                .iter()
                .map(|&b| (b as f32 - 127.5) / 9.0)
                .collect(),
        );
        for x in rows {
            let nb = x.len() / 32;
            let (mut q1, mut d1, mut s1, mut b1) = (
                vec![0i8; x.len()],
                vec![0f32; nb],
                vec![0f32; nb],
                vec![0i16; nb],
            );
            let (mut q2, mut d2, mut s2, mut b2) = (q1.clone(), d1.clone(), s1.clone(), b1.clone());
            (q8x32_row())(&x, &mut q1, &mut d1, &mut s1, &mut b1);
            quantize_q8x32_row_scalar(&x, &mut q2, &mut d2, &mut s2, &mut b2);
            assert_eq!(q1, q2);
            assert_eq!(b1, b2);
            assert_eq!(
                d1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                d2.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            assert_eq!(
                s1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                s2.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    /// Producing rows inside the quantizing pool pass gives the rows and the quantized
    /// batch that producing them first and quantizing afterwards gives, for both block formats
    /// and for batches below and above the parallel threshold.
    #[test]
    fn produce_and_quantize_equals_produce_then_quantize() {
        let pool = crate::pool::ThreadPool::new(2);
        for (format, cols) in [(ActFormat::Q8x32, 96), (ActFormat::Q8K, 512)] {
            for n_rows in [1usize, 3, 4, 9] {
                let src = crate::uniform(n_rows * cols, n_rows as u64, 3.0);
                // The producer: row r becomes src's row r scaled by (r + 1) and squared-signed.
                let make = |r: usize, row: &mut [f32]| {
                    for (v, &x) in row.iter_mut().zip(&src[r * cols..(r + 1) * cols]) {
                        *v = x * (r + 1) as f32 * x.abs();
                    }
                };
                let mut want_x = vec![0f32; n_rows * cols];
                for (r, row) in want_x.chunks_exact_mut(cols).enumerate() {
                    make(r, row);
                }
                let mut want = QuantActs::default();
                want.quantize(format, &want_x, cols);
                let mut got_x = vec![f32::NAN; n_rows * cols];
                let mut got = QuantActs::default();
                got.produce_and_quantize_par(&pool, format, &mut got_x, cols, &make);
                assert_eq!(got_x, want_x, "{format:?} × {n_rows}: produced rows");
                assert_eq!((got.n_rows, got.cols), (n_rows, cols));
                assert_eq!(got.qs, want.qs, "{format:?} × {n_rows}: quants");
                assert_eq!(got.bsums, want.bsums);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got.d), bits(&want.d));
                assert_eq!(bits(&got.s), bits(&want.s));
            }
        }
    }

    #[test]
    fn q8_block_round_trips_within_half_a_step() {
        let x: Vec<f32> = (0..32).map(|i| (i as f32 - 13.3) * 0.37).collect();
        let mut q = [0i8; 32];
        let (d, s) = quantize_q8_block(&x, &mut q);
        let sum: i32 = q.iter().map(|&v| v as i32).sum();
        assert!((s - sum as f32 * d).abs() <= 1e-2 * s.abs().max(1.0));
        for (v, qi) in x.iter().zip(q) {
            assert!((v - qi as f32 * d).abs() <= d * 0.5 + 1e-3);
        }
        assert_eq!(q.iter().map(|v| v.unsigned_abs()).max(), Some(127));
    }

    #[test]
    fn fast_rounding_equals_ties_even_rounding() {
        for i in -4000..=4000 {
            for frac in [0.0f32, 0.25, 0.5, 0.4999999, 0.5000001, 0.75] {
                let x = i as f32 * 0.0625 + frac;
                assert_eq!(nearest_int(x), x.round_ties_even() as i32, "{x}");
            }
        }
    }

    #[test]
    fn parallel_quantization_equals_serial() {
        let pool = crate::pool::ThreadPool::new(2);
        let x: Vec<f32> = (0..8 * 512)
            .map(|i| ((i * 7919) % 1000) as f32 / 77.0 - 6.0)
            .collect();
        for fmt in [ActFormat::Q8x32, ActFormat::Q8K] {
            let (mut a, mut b) = (QuantActs::default(), QuantActs::default());
            a.quantize(fmt, &x, 512);
            b.quantize_par(&pool, fmt, &x, 512);
            assert_eq!((a.qs, a.d), (b.qs, b.d));
            assert_eq!(a.s, b.s);
            assert_eq!(a.bsums, b.bsums);
            if fmt == ActFormat::Q8x32 {
                assert_eq!(a.s, b.s);
            }
        }
    }

    #[test]
    fn q8k_zero_block_and_extreme() {
        let mut q = [1i8; 256];
        let mut b = [1i16; 16];
        assert_eq!(quantize_q8k_block(&[0.0; 256], &mut q, &mut b), 0.0);
        assert!(q.iter().all(|&v| v == 0) && b.iter().all(|&v| v == 0));
        let mut x = [0.5f32; 256];
        x[7] = -2.0;
        let d = quantize_q8k_block(&x, &mut q, &mut b);
        assert_eq!(q[7], -127);
        assert!((q[7] as f32 * d - x[7]).abs() < 1e-6);
        assert_eq!(b[0], q[..16].iter().map(|&v| v as i16).sum::<i16>());
    }
}
