//! The GEMV family (as the seed's Metal shader offers it), on the CPU:
//! `y = α·A·x + β·y` with a leading dimension, for f32, f16 and mixed (f16 matrix × f32 vector
//! → f32), single or batched (independent GEMVs over a batch), SIMD (AVX2/FMA/F16C) and split
//! over the worker pool by rows. With `β = 0`, `y` is not read (BLAS semantics: NaN in `y` is
//! ignored). Used for float weights (LoRA adapters, f16 tensors).

use crate::pool::ThreadPool;
use crate::SyncPtr;
use half::f16;

/// Element storage of a matrix or vector.
pub trait Elem: Copy + Send + Sync + 'static {
    /// Widen to f32.
    fn to_f32(self) -> f32;
    /// Narrow from f32 (round to nearest even for f16).
    fn from_f32(v: f32) -> Self;
}
impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}
impl Elem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// Shape and scalars of one GEMV: `A` is `m × n` with row stride `lda ≥ n`.
#[derive(Debug, Clone, Copy)]
pub struct Gemv {
    /// Rows of A (length of y).
    pub m: usize,
    /// Columns of A (length of x).
    pub n: usize,
    /// Row stride of A in elements.
    pub lda: usize,
    /// Scale of the product.
    pub alpha: f32,
    /// Scale of the old y (0: y is write-only).
    pub beta: f32,
}

/// Rows per pool task.
const ROWS_PER_TASK: usize = 32;

/// `R` row dots `Σ a[r][j]·x[j]` for the element types, scalar twin and SIMD; each row's result
/// is the same for every R.
/// `ahead` is the prefetch distance in bytes.
fn row_dots<const R: usize, A: Elem, X: Elem>(a: [&[A]; R], x: &[X], ahead: usize) -> [f32; R] {
    #[cfg(target_arch = "x86_64")]
    if crate::dispatch::tier() >= crate::dispatch::Tier::Avx2 {
        use std::any::TypeId;
        let (ta, tx) = (TypeId::of::<A>(), TypeId::of::<X>());
        // SAFETY: the tier check guarantees AVX2/FMA/F16C; the casts reinterpret slices whose
        // element type was just checked to be exactly the target type.
        unsafe {
            if ta == TypeId::of::<f32>() && tx == TypeId::of::<f32>() {
                return x86::dot_f32_f32(
                    std::mem::transmute_copy::<[&[A]; R], [&[f32]; R]>(&a),
                    std::mem::transmute::<&[X], &[f32]>(x),
                    ahead,
                );
            }
            if ta == TypeId::of::<f16>() && tx == TypeId::of::<f32>() {
                return x86::dot_f16_f32(
                    std::mem::transmute_copy::<[&[A]; R], [&[f16]; R]>(&a),
                    std::mem::transmute::<&[X], &[f32]>(x),
                    ahead,
                );
            }
            if ta == TypeId::of::<f16>() && tx == TypeId::of::<f16>() {
                return x86::dot_f16_f16(
                    std::mem::transmute_copy::<[&[A]; R], [&[f16]; R]>(&a),
                    std::mem::transmute::<&[X], &[f16]>(x),
                    ahead,
                );
            }
        }
    }
    a.map(|r| row_dot_scalar(r, x))
}

/// The scalar twin of the row dot (four accumulators, like the SIMD paths' lanes).
pub fn row_dot_scalar<A: Elem, X: Elem>(a: &[A], x: &[X]) -> f32 {
    let mut acc = [0f32; 4];
    let n = a.len().min(x.len());
    for j in 0..n {
        acc[j % 4] += a[j].to_f32() * x[j].to_f32();
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3])
}

/// `y = α·A·x + β·y` for a single GEMV (matrix `A: m × lda`, `x: n`, `y: m`), multi-threaded.
pub fn gemv<A: Elem, X: Elem, Y: Elem>(pool: &ThreadPool, g: Gemv, a: &[A], x: &[X], y: &mut [Y]) {
    gemv_batched(pool, g, 1, a, 0, x, 0, y, 0);
}

/// `batch` independent GEMVs: matrix `b` starts at `a[b·stride_a]`, its vectors at
/// `x[b·stride_x]` and `y[b·stride_y]`. Rows of all GEMVs are split over the pool together.
#[allow(clippy::too_many_arguments)]
pub fn gemv_batched<A: Elem, X: Elem, Y: Elem>(
    pool: &ThreadPool,
    g: Gemv,
    batch: usize,
    a: &[A],
    stride_a: usize,
    x: &[X],
    stride_x: usize,
    y: &mut [Y],
    stride_y: usize,
) {
    if g.m == 0 || batch == 0 {
        return;
    }
    assert!(g.lda >= g.n, "lda {} < n {}", g.lda, g.n);
    let last = batch - 1;
    assert!(
        a.len() >= last * stride_a + (g.m - 1) * g.lda + g.n,
        "A too short"
    );
    assert!(x.len() >= last * stride_x + g.n, "x too short");
    assert!(y.len() >= last * stride_y + g.m, "y too short");
    assert!(batch == 1 || stride_y >= g.m, "outputs of a batch overlap");
    let tasks_per = g.m.div_ceil(ROWS_PER_TASK);
    let yp = SyncPtr::new(y);
    pool.run(batch * tasks_per, &|task| {
        let (b, t) = (task / tasks_per, task % tasks_per);
        let (r0, r1) = (t * ROWS_PER_TASK, ((t + 1) * ROWS_PER_TASK).min(g.m));
        let xb = &x[b * stride_x..b * stride_x + g.n];
        // SAFETY: rows r0..r1 of output b belong to this task alone (stride_y ≥ m, asserted).
        let yb = unsafe { yp.slice(b * stride_y + r0, r1 - r0) };
        let row = |r: usize| &a[b * stride_a + r * g.lda..b * stride_a + r * g.lda + g.n];
        let mut put = |r: usize, v: f32| {
            let (k, v) = (r - r0, g.alpha * v);
            yb[k] = Y::from_f32(if g.beta == 0.0 {
                v
            } else {
                v + g.beta * yb[k].to_f32()
            });
        };
        // Rows in fours (four memory streams), then singly. Prefetch 2 KiB ahead inside long
        // rows; short rows are read whole, so prefetch the next four rows instead.
        let row_bytes = g.n * std::mem::size_of::<A>();
        let ahead = if row_bytes >= 4096 {
            2048
        } else {
            4 * g.lda * std::mem::size_of::<A>()
        };
        let mut r = r0;
        while r + 4 <= r1 {
            let v = row_dots([row(r), row(r + 1), row(r + 2), row(r + 3)], xb, ahead);
            for (j, v) in v.into_iter().enumerate() {
                put(r + j, v);
            }
            r += 4;
        }
        for r in r..r1 {
            put(r, row_dots([row(r)], xb, ahead)[0]);
        }
    });
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::f16;
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn reduce(a: __m256, b: __m256, c: __m256, d: __m256) -> f32 {
        let v = _mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, d));
        let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)))
    }

    /// Defines `$name::<R>`: R rows · one vector, the rows interleaved so R memory streams are
    /// in flight and each vector load (and f16 widening) serves all of them. Each row keeps its
    /// own four accumulators in the same order whatever R is, so results do not depend on R.
    macro_rules! dot_kernel {
        ($name:ident, $ta:ty, $tx:ty, |$pa:ident, $px:ident, $i:ident| ($la:expr, $lx:expr)) => {
            #[target_feature(enable = "avx2,fma,f16c")]
            pub(super) unsafe fn $name<const R: usize>(
                a: [&[$ta]; R],
                x: &[$tx],
                ahead: usize,
            ) -> [f32; R] {
                let mut n = x.len();
                for r in &a {
                    n = n.min(r.len());
                }
                let $px = x.as_ptr();
                let mut acc = [[_mm256_setzero_ps(); 4]; R];
                let mut $i = 0;
                while $i + 32 <= n {
                    for r in 0..R {
                        // Prefetch each matrix stream `ahead` bytes on (the vector stays in L1).
                        _mm_prefetch::<_MM_HINT_T0>(
                            (a[r].as_ptr().wrapping_add($i) as *const u8).wrapping_add(ahead)
                                as *const i8,
                        );
                    }
                    for k in 0..4 {
                        let $i = $i + 8 * k;
                        // SAFETY: i + 8 <= n for the vector.
                        let vx = unsafe { $lx };
                        for r in 0..R {
                            let $pa = a[r].as_ptr();
                            // SAFETY: i + 8 <= n for every row.
                            let va = unsafe { $la };
                            acc[r][k] = _mm256_fmadd_ps(va, vx, acc[r][k]);
                        }
                    }
                    $i += 32;
                }
                std::array::from_fn(|r| {
                    let mut s = reduce(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
                    for j in $i..n {
                        s += f32::from(a[r][j].to_f32_lossless()) * x[j].to_f32_lossless();
                    }
                    s
                })
            }
        };
    }

    trait Widen {
        fn to_f32_lossless(self) -> f32;
    }
    impl Widen for f32 {
        fn to_f32_lossless(self) -> f32 {
            self
        }
    }
    impl Widen for f16 {
        fn to_f32_lossless(self) -> f32 {
            self.to_f32()
        }
    }

    dot_kernel!(dot_f32_f32, f32, f32, |pa, px, i| (
        _mm256_loadu_ps(pa.add(i)),
        _mm256_loadu_ps(px.add(i))
    ));
    dot_kernel!(dot_f16_f32, f16, f32, |pa, px, i| (
        _mm256_cvtph_ps(_mm_loadu_si128(pa.add(i) as *const __m128i)),
        _mm256_loadu_ps(px.add(i))
    ));
    dot_kernel!(dot_f16_f16, f16, f16, |pa, px, i| (
        _mm256_cvtph_ps(_mm_loadu_si128(pa.add(i) as *const __m128i)),
        _mm256_cvtph_ps(_mm_loadu_si128(px.add(i) as *const __m128i))
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i + seed) * 7919) % 201) as f32 / 100.0 - 1.0)
            .collect()
    }

    fn reference(g: Gemv, a: &[f32], x: &[f32], y: &[f32]) -> Vec<f64> {
        (0..g.m)
            .map(|r| {
                let d: f64 = (0..g.n)
                    .map(|j| a[r * g.lda + j] as f64 * x[j] as f64)
                    .sum();
                g.alpha as f64 * d
                    + if g.beta == 0.0 {
                        0.0
                    } else {
                        g.beta as f64 * y[r] as f64
                    }
            })
            .collect()
    }

    #[test]
    fn all_variants_match_f64_reference_with_leading_dimension() {
        let pool = ThreadPool::new(2);
        for &(m, n, lda) in &[
            (1usize, 1usize, 1usize),
            (37, 100, 101),
            (64, 4096, 4096),
            (5, 33, 40),
        ] {
            let a32 = vals(m * lda, 1);
            let x32 = vals(n, 2);
            let y0 = vals(m, 3);
            let a16: Vec<f16> = a32.iter().map(|&v| f16::from_f32(v)).collect();
            let x16: Vec<f16> = x32.iter().map(|&v| f16::from_f32(v)).collect();
            let a16w: Vec<f32> = a16.iter().map(|v| v.to_f32()).collect();
            let x16w: Vec<f32> = x16.iter().map(|v| v.to_f32()).collect();
            for (alpha, beta) in [(1.0f32, 0.0f32), (0.5, 2.0), (-1.5, 1.0)] {
                let g = Gemv {
                    m,
                    n,
                    lda,
                    alpha,
                    beta,
                };
                let tol = |r: &[f64], i: usize| 1e-4 * (n as f64).sqrt() * (1.0 + r[i].abs());
                // f32
                let mut y = y0.clone();
                gemv(&pool, g, &a32, &x32, &mut y);
                let r = reference(g, &a32, &x32, &y0);
                (0..m).for_each(|i| {
                    assert!(
                        (y[i] as f64 - r[i]).abs() <= tol(&r, i),
                        "f32 {m}x{n} row {i}"
                    )
                });
                // mixed f16 × f32 → f32
                let mut y = y0.clone();
                gemv(&pool, g, &a16, &x32, &mut y);
                let r = reference(g, &a16w, &x32, &y0);
                (0..m).for_each(|i| {
                    assert!(
                        (y[i] as f64 - r[i]).abs() <= tol(&r, i),
                        "mixed {m}x{n} row {i}"
                    )
                });
                // f16 everywhere: compare within f16 output rounding
                let y16_0: Vec<f16> = y0.iter().map(|&v| f16::from_f32(v)).collect();
                let mut y16 = y16_0.clone();
                gemv(&pool, g, &a16, &x16, &mut y16);
                let y16w0: Vec<f32> = y16_0.iter().map(|v| v.to_f32()).collect();
                let r = reference(g, &a16w, &x16w, &y16w0);
                (0..m).for_each(|i| {
                    let got = y16[i].to_f32() as f64;
                    assert!(
                        (got - r[i]).abs() <= tol(&r, i) + 1e-3 * r[i].abs().max(1.0),
                        "f16 {m}x{n} row {i}: {got} vs {}",
                        r[i]
                    );
                });
            }
        }
    }

    #[test]
    fn beta_zero_ignores_nan_in_y_and_simd_matches_scalar() {
        let pool = ThreadPool::new(2);
        let (m, n) = (9, 77);
        let a = vals(m * n, 4);
        let x = vals(n, 5);
        let mut y = vec![f32::NAN; m];
        gemv(
            &pool,
            Gemv {
                m,
                n,
                lda: n,
                alpha: 1.0,
                beta: 0.0,
            },
            &a,
            &x,
            &mut y,
        );
        for r in 0..m {
            let s = row_dot_scalar(&a[r * n..(r + 1) * n], &x);
            assert!(y[r].is_finite() && (y[r] - s).abs() <= 1e-4 * s.abs().max(1.0));
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_in_a_group_of_four_and_alone() {
        // m = 5 rows with equal contents: rows 0..4 go through the four-row kernel, row 4 alone.
        let pool = ThreadPool::new(1);
        for n in [8usize, 100, 1000] {
            let row = vals(n, 11);
            let a: Vec<f16> = (0..5)
                .flat_map(|_| row.iter().map(|&v| f16::from_f32(v)))
                .collect();
            let x = vals(n, 12);
            let mut y = vec![0f32; 5];
            gemv(
                &pool,
                Gemv {
                    m: 5,
                    n,
                    lda: n,
                    alpha: 1.0,
                    beta: 0.0,
                },
                &a,
                &x,
                &mut y,
            );
            assert!(
                y.iter().all(|v| v.to_bits() == y[4].to_bits()),
                "{n}: {y:?}"
            );
        }
    }

    #[test]
    fn batched_equals_separate_calls() {
        let pool = ThreadPool::new(2);
        let (m, n, batch) = (40, 64, 5);
        let a: Vec<f16> = vals(batch * m * n, 6)
            .iter()
            .map(|&v| f16::from_f32(v))
            .collect();
        let x = vals(batch * n, 7);
        let g = Gemv {
            m,
            n,
            lda: n,
            alpha: 0.7,
            beta: 0.0,
        };
        let mut yb = vec![0f32; batch * m];
        gemv_batched(&pool, g, batch, &a, m * n, &x, n, &mut yb, m);
        for b in 0..batch {
            let mut y = vec![0f32; m];
            gemv(
                &pool,
                g,
                &a[b * m * n..(b + 1) * m * n],
                &x[b * n..(b + 1) * n],
                &mut y,
            );
            assert_eq!(&yb[b * m..(b + 1) * m], &y[..]);
        }
    }
}
