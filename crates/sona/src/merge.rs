//! The deep loop's merge: several LoRA branches on one projection (the base adapter and the
//! micro-adapter) as one branch of at most a given rank, by a truncated SVD of their sum.
//!
//! The sum `ΔW = Σ sᵢ·Bᵢ·Aᵢ = U·Vᵀ` (`U = [sᵢ·Bᵢ]`: `out × R`, `V = [Aᵢᵀ]`: `in × R`) is never
//! formed: with QR factorizations `U = Qu·Ru` and `V = Qv·Rv`, `ΔW = Qu·(Ru·Rvᵀ)·Qvᵀ`, and the SVD
//! of the small `R × R` core (one-sided Jacobi, f64) gives `ΔW`'s singular values and vectors.
//! Keeping the largest `r` is the best rank-`r` approximation (Eckart–Young); directions below a
//! relative threshold are pruned.

/// One LoRA branch `scale·B·A` (`A: rank × in`, `B: out × rank`), borrowed: what a merge
/// takes, and what a trainer holds fixed while another branch trains (the scope's base
/// adapter under its micro-adapter).
#[derive(Debug, Clone, Copy)]
pub struct Branch<'a> {
    /// `A: rank × in`.
    pub a: &'a [f32],
    /// `B: out × rank`.
    pub b: &'a [f32],
    /// Rank.
    pub rank: usize,
    /// Multiplier of `B·A`.
    pub scale: f32,
}

impl Branch<'_> {
    /// Adds `scale·B·A·x` to `out` (`x: in`, `out: out`).
    pub fn add_to(&self, x: &[f32], out: &mut [f32]) {
        let inp = x.len();
        for k in 0..self.rank {
            let h: f32 = self.a[k * inp..(k + 1) * inp]
                .iter()
                .zip(x)
                .map(|(w, v)| w * v)
                .sum();
            for (j, o) in out.iter_mut().enumerate() {
                *o += self.scale * self.b[j * self.rank + k] * h;
            }
        }
    }
}

/// The merged branch.
#[derive(Debug, Clone, PartialEq)]
pub struct Merged {
    /// `A: rank × in`.
    pub a: Vec<f32>,
    /// `B: out × rank`.
    pub b: Vec<f32>,
    /// Rank kept (`≤ max_rank`; columns past it in a caller's fixed-rank layout are zero).
    pub rank: usize,
    /// Singular values of the sum, descending (all of them, kept or not).
    pub singular: Vec<f64>,
    /// Directions dropped because they fell below the pruning threshold (not the rank cap).
    pub pruned: usize,
}

/// Orthonormalizes the columns of `m` (`rows × cols`, column-major as `cols` vectors) in place
/// by modified Gram–Schmidt; returns `R` (`cols × cols`, row-major) with `m_in = Q·R`. A column
/// that is (numerically) dependent on the earlier ones becomes zero with a zero diagonal.
fn qr(cols: &mut [Vec<f64>]) -> Vec<f64> {
    let n = cols.len();
    let mut r = vec![0f64; n * n];
    let scale = cols
        .iter()
        .map(|c| c.iter().map(|x| x * x).sum::<f64>())
        .fold(0f64, f64::max)
        .sqrt();
    for j in 0..n {
        let (done, rest) = cols.split_at_mut(j);
        let cj = &mut rest[0];
        for (i, qi) in done.iter().enumerate() {
            let d: f64 = qi.iter().zip(cj.iter()).map(|(x, y)| x * y).sum();
            r[i * n + j] = d;
            cj.iter_mut().zip(qi).for_each(|(y, x)| *y -= d * x);
        }
        let norm = cols[j].iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm <= 1e-12 * scale.max(f64::MIN_POSITIVE) {
            cols[j].iter_mut().for_each(|x| *x = 0.0);
        } else {
            r[j * n + j] = norm;
            cols[j].iter_mut().for_each(|x| *x /= norm);
        }
    }
    r
}

/// SVD of the square `k` (`n × n`, row-major) by one-sided Jacobi: returns `(σ, X, Y)` with
/// `k = X·diag(σ)·Yᵀ`, `X` and `Y` as `n` column vectors each (unsorted).
fn jacobi_svd(k: &[f64], n: usize) -> (Vec<f64>, Vec<Vec<f64>>, Vec<Vec<f64>>) {
    // Columns of W = K·Y, Y starting at the identity.
    let mut w: Vec<Vec<f64>> = (0..n)
        .map(|j| (0..n).map(|i| k[i * n + j]).collect())
        .collect();
    let mut y: Vec<Vec<f64>> = (0..n)
        .map(|j| (0..n).map(|i| (i == j) as u8 as f64).collect())
        .collect();
    for _sweep in 0..100 {
        let mut rotated = false;
        for p in 0..n {
            for q in p + 1..n {
                let alpha: f64 = w[p].iter().map(|x| x * x).sum();
                let beta: f64 = w[q].iter().map(|x| x * x).sum();
                let gamma: f64 = w[p].iter().zip(&w[q]).map(|(x, y)| x * y).sum();
                if gamma.abs() <= 1e-15 * (alpha * beta).sqrt() || gamma == 0.0 {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                for m in [&mut w, &mut y] {
                    for i in 0..n {
                        let (xp, xq) = (m[p][i], m[q][i]);
                        m[p][i] = c * xp - s * xq;
                        m[q][i] = s * xp + c * xq;
                    }
                }
            }
        }
        if !rotated {
            break;
        }
    }
    let sigma: Vec<f64> = w
        .iter()
        .map(|c| c.iter().map(|x| x * x).sum::<f64>().sqrt())
        .collect();
    let x = w
        .into_iter()
        .zip(&sigma)
        .map(|(c, &s)| {
            if s > 0.0 {
                c.into_iter().map(|v| v / s).collect()
            } else {
                vec![0.0; n]
            }
        })
        .collect();
    (sigma, x, y)
}

/// Merges `branches` (all `out × in`) into one branch of rank at most `max_rank` with multiplier
/// `scale`, dropping directions whose singular value is below `prune_rel` times the largest.
/// The factors are balanced (`B` and `A` carry `√σ` each).
pub fn merge(
    branches: &[Branch<'_>],
    out: usize,
    inp: usize,
    max_rank: usize,
    prune_rel: f64,
    scale: f32,
) -> Merged {
    let mut u: Vec<Vec<f64>> = Vec::new();
    let mut v: Vec<Vec<f64>> = Vec::new();
    for br in branches {
        for k in 0..br.rank {
            u.push(
                (0..out)
                    .map(|j| br.scale as f64 * br.b[j * br.rank + k] as f64)
                    .collect(),
            );
            v.push(
                br.a[k * inp..(k + 1) * inp]
                    .iter()
                    .map(|&x| x as f64)
                    .collect(),
            );
        }
    }
    let n = u.len();
    let ru = qr(&mut u);
    let rv = qr(&mut v);
    // Core = Ru·Rvᵀ.
    let mut core = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            core[i * n + j] = (0..n).map(|m| ru[i * n + m] * rv[j * n + m]).sum();
        }
    }
    let (sigma, x, y) = jacobi_svd(&core, n);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| sigma[j].total_cmp(&sigma[i]));
    let singular: Vec<f64> = order.iter().map(|&i| sigma[i]).collect();
    let top = singular.first().copied().unwrap_or(0.0);
    let above = singular
        .iter()
        .take_while(|&&s| s > prune_rel * top && s > 0.0)
        .count();
    let rank = above.min(max_rank);
    let pruned = n.min(max_rank) - rank;
    let mut a = vec![0f32; max_rank * inp];
    let mut b = vec![0f32; out * max_rank];
    let s = scale as f64;
    for (k, &i) in order.iter().take(rank).enumerate() {
        let root = (sigma[i] / s).sqrt();
        // B[:, k] = Qu·x_i·√(σ/s); A[k, :] = √(σ/s)·(Qv·y_i)ᵀ.
        for j in 0..out {
            b[j * max_rank + k] = ((0..n).map(|m| u[m][j] * x[i][m]).sum::<f64>() * root) as f32;
        }
        for j in 0..inp {
            a[k * inp + j] = ((0..n).map(|m| v[m][j] * y[i][m]).sum::<f64>() * root) as f32;
        }
    }
    Merged {
        a,
        b,
        rank,
        singular,
        pruned,
    }
}

/// The `m` leading principal directions (right singular vectors, unit length, `[m × cols]`)
/// of the rows of `x` (`[rows × cols]`), strongest first, computed through the small Gram
/// matrix `x·xᵀ` (rows ≪ cols). Directions with a zero singular value are left out.
pub fn principal_directions(x: &[f32], cols: usize, m: usize) -> Vec<f32> {
    let rows: Vec<&[f32]> = x.chunks_exact(cols).collect();
    let n = rows.len();
    let mut gram = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let g: f64 = rows[i]
                .iter()
                .zip(rows[j])
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum();
            gram[i * n + j] = g;
            gram[j * n + i] = g;
        }
    }
    // x = V·Σ·Wᵀ ⇒ x·xᵀ = V·Σ²·Vᵀ and W = xᵀ·V·Σ⁻¹.
    let (sigma2, _, v) = jacobi_svd(&gram, n);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| sigma2[j].total_cmp(&sigma2[i]));
    let mut out = Vec::new();
    for &i in order.iter().take(m) {
        if sigma2[i] <= 1e-12 * sigma2[order[0]].max(f64::MIN_POSITIVE) {
            break;
        }
        let s = sigma2[i].sqrt();
        out.extend(
            (0..cols)
                .map(|c| ((0..n).map(|r| rows[r][c] as f64 * v[i][r]).sum::<f64>() / s) as f32),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dense(brs: &[Branch<'_>], out: usize, inp: usize) -> Vec<f64> {
        let mut w = vec![0f64; out * inp];
        for br in brs {
            for o in 0..out {
                for i in 0..inp {
                    w[o * inp + i] += br.scale as f64
                        * (0..br.rank)
                            .map(|k| br.b[o * br.rank + k] as f64 * br.a[k * inp + i] as f64)
                            .sum::<f64>();
                }
            }
        }
        w
    }

    fn frob(x: &[f64], y: &[f64]) -> f64 {
        x.iter()
            .zip(y)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f64>()
            .sqrt()
    }

    #[test]
    fn merging_within_the_rank_is_exact_and_truncation_is_optimal() {
        let (out, inp) = (40, 70);
        let (a1, b1) = (
            crate::uniform(3 * inp, 1, 0.3),
            crate::uniform(out * 3, 2, 0.5),
        );
        let (a2, b2) = (
            crate::uniform(2 * inp, 3, 0.3),
            crate::uniform(out * 2, 4, 0.5),
        );
        let brs = [
            Branch {
                a: &a1,
                b: &b1,
                rank: 3,
                scale: 2.0,
            },
            Branch {
                a: &a2,
                b: &b2,
                rank: 2,
                scale: 0.5,
            },
        ];
        let w = dense(&brs, out, inp);
        let total: f64 = w.iter().map(|x| x * x).sum::<f64>();
        // Rank 5 holds the sum exactly.
        let m = merge(&brs, out, inp, 5, 0.0, 2.0);
        assert_eq!((m.rank, m.pruned), (5, 0));
        let got = dense(
            &[Branch {
                a: &m.a,
                b: &m.b,
                rank: 5,
                scale: 2.0,
            }],
            out,
            inp,
        );
        assert!(frob(&got, &w) < 1e-5 * total.sqrt(), "{}", frob(&got, &w));
        // ‖ΔW‖² = Σσ² and the singular values descend.
        let s2: f64 = m.singular.iter().map(|s| s * s).sum();
        assert!((s2 - total).abs() < 1e-9 * total);
        assert!(m.singular.windows(2).all(|p| p[0] >= p[1]));
        // Rank 3: the error is exactly the two dropped singular values (Eckart–Young).
        let m3 = merge(&brs, out, inp, 3, 0.0, 2.0);
        let got = dense(
            &[Branch {
                a: &m3.a,
                b: &m3.b,
                rank: 3,
                scale: 2.0,
            }],
            out,
            inp,
        );
        let expect = (m.singular[3].powi(2) + m.singular[4].powi(2)).sqrt();
        assert!(
            (frob(&got, &w) - expect).abs() < 1e-5 * total.sqrt(),
            "{} vs {expect}",
            frob(&got, &w)
        );
    }

    #[test]
    fn principal_directions_are_orthonormal_and_capture_the_energy() {
        // Rows spanned by two known directions plus small noise.
        let cols = 30;
        let (d1, d2) = (crate::uniform(cols, 1, 1.0), crate::uniform(cols, 2, 1.0));
        let coef = crate::uniform(40, 3, 1.0);
        let noise = crate::uniform(20 * cols, 4, 1e-3);
        let (coef, d1, d2) = (&coef, &d1, &d2);
        let x: Vec<f32> = (0..20)
            .flat_map(|r| {
                (0..cols).map(move |c| 5.0 * coef[2 * r] * d1[c] + 2.0 * coef[2 * r + 1] * d2[c])
            })
            .zip(&noise)
            .map(|(v, e)| v + e)
            .collect();
        let u = principal_directions(&x, cols, 3);
        assert_eq!(u.len(), 3 * cols);
        let dot = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| *x as f64 * *y as f64)
                .sum::<f64>()
        };
        for i in 0..3 {
            for j in 0..3 {
                let d = dot(&u[i * cols..(i + 1) * cols], &u[j * cols..(j + 1) * cols]);
                assert!((d - (i == j) as u8 as f64).abs() < 1e-4, "{i} {j} {d}");
            }
        }
        // The first two span the data: projecting them out leaves only the noise.
        let resid: f64 = x
            .chunks_exact(cols)
            .map(|row| {
                let mut r: Vec<f64> = row.iter().map(|&v| v as f64).collect();
                for k in 0..2 {
                    let uk = &u[k * cols..(k + 1) * cols];
                    let p = dot(row, uk);
                    r.iter_mut().zip(uk).for_each(|(v, &w)| *v -= p * w as f64);
                }
                r.iter().map(|v| v * v).sum::<f64>()
            })
            .sum();
        assert!(resid < 20.0 * cols as f64 * 1e-6, "{resid}");
    }

    #[test]
    fn zero_and_tiny_directions_are_pruned() {
        let (out, inp) = (16, 24);
        let (a1, b1) = (
            crate::uniform(2 * inp, 5, 0.3),
            crate::uniform(out * 2, 6, 0.5),
        );
        let a2 = crate::uniform(2 * inp, 7, 0.3);
        let b0 = vec![0f32; out * 2];
        // A branch with B = 0 (a reset micro-adapter) adds nothing: rank 2 remains.
        let m = merge(
            &[
                Branch {
                    a: &a1,
                    b: &b1,
                    rank: 2,
                    scale: 1.0,
                },
                Branch {
                    a: &a2,
                    b: &b0,
                    rank: 2,
                    scale: 1.0,
                },
            ],
            out,
            inp,
            4,
            1e-6,
            1.0,
        );
        assert_eq!((m.rank, m.pruned), (2, 2));
        assert!(
            m.a[2 * inp..].iter().all(|&x| x == 0.0)
                && (0..out).all(|j| m.b[j * 4 + 2] == 0.0 && m.b[j * 4 + 3] == 0.0)
        );
        // Nothing at all: rank 0.
        let z = merge(
            &[Branch {
                a: &a2,
                b: &b0,
                rank: 2,
                scale: 1.0,
            }],
            out,
            inp,
            2,
            1e-6,
            1.0,
        );
        assert_eq!(z.rank, 0);
        assert!(z.b.iter().all(|&x| x == 0.0));
    }
}
