//! Backward passes of the forward pass's operations, in f32 (accumulations in f64 where a sum
//! runs over a whole vector). Each function takes the forward inputs and the gradient of the
//! loss with respect to the output (`dy`) and returns the gradients with respect to the inputs
//! that can carry learning signal; frozen weights get none.
//!
//! Conventions: matrices are row-major, `W: out × in` maps `x: in` to `y = W·x: out` (the GGUF
//! and PEFT orientation); LoRA is `y = scale · B·(A·x)` with `A: r × in`, `B: out × r`.

/// Softmax cross-entropy of `logits` against `target`: returns (loss = −ln p(target),
/// d loss / d logits = softmax − onehot).
pub fn cross_entropy(logits: &[f32], target: usize) -> (f32, Vec<f32>) {
    let mx = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = logits.iter().map(|&l| (l as f64 - mx).exp()).sum();
    let lse = mx + z.ln();
    let mut d: Vec<f32> = logits
        .iter()
        .map(|&l| ((l as f64 - lse).exp()) as f32)
        .collect();
    if let Some(t) = d.get_mut(target) {
        *t -= 1.0;
    }
    let loss = logits
        .get(target)
        .map_or(f64::INFINITY, |&l| lse - l as f64);
    (loss as f32, d)
}

/// Unlikelihood loss for a token the user marked wrong: −ln(1 − p(target)), bounded by
/// clamping p to at most `1 − 1e-6`; returns (loss, d loss / d logits).
pub fn unlikelihood(logits: &[f32], target: usize) -> (f32, Vec<f32>) {
    let mx = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = logits.iter().map(|&l| (l as f64 - mx).exp()).sum();
    let p: Vec<f64> = logits.iter().map(|&l| (l as f64 - mx).exp() / z).collect();
    let pt = p.get(target).copied().unwrap_or(0.0).min(1.0 - 1e-6);
    // d/dl_j of −ln(1 − p_t) = p_t (δ_tj − p_j) / (1 − p_t).
    let k = pt / (1.0 - pt);
    let d = p
        .iter()
        .enumerate()
        .map(|(j, &pj)| (k * ((j == target) as u8 as f64 - pj)) as f32)
        .collect();
    (-(1.0 - pt).ln() as f32, d)
}

/// RMSNorm `y = w ⊙ x / rms(x)`, rms = √(mean(x²) + eps): d loss / d x.
pub fn rms_norm_backward(x: &[f32], w: &[f32], eps: f32, dy: &[f32]) -> Vec<f32> {
    let n = x.len() as f64;
    let ms = x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / n + eps as f64;
    let r = 1.0 / ms.sqrt();
    // dx_i = r·w_i·dy_i − x_i · r³/n · Σ_j dy_j w_j x_j
    let dot: f64 = x
        .iter()
        .zip(w)
        .zip(dy)
        .map(|((&xi, &wi), &gi)| xi as f64 * wi as f64 * gi as f64)
        .sum();
    let c = r * r * r / n * dot;
    x.iter()
        .zip(w)
        .zip(dy)
        .map(|((&xi, &wi), &gi)| (r * wi as f64 * gi as f64 - xi as f64 * c) as f32)
        .collect()
}

/// `y = W·x` with a frozen `W` (`out × in`, rows given by `row(o, buf)`, e.g. dequantized
/// from GGUF): d loss / d x = Wᵀ·dy.
pub fn linear_backward_input(
    out: usize,
    inp: usize,
    mut row: impl FnMut(usize, &mut [f32]),
    dy: &[f32],
) -> Vec<f32> {
    let mut dx = vec![0f64; inp];
    let mut buf = vec![0f32; inp];
    for (o, &g) in dy.iter().enumerate().take(out) {
        if g == 0.0 {
            continue;
        }
        row(o, &mut buf);
        dx.iter_mut()
            .zip(&buf)
            .for_each(|(d, &w)| *d += g as f64 * w as f64);
    }
    dx.into_iter().map(|v| v as f32).collect()
}

/// Gradients of a LoRA branch `y = scale · B·(A·x)`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraGrads {
    /// d loss / d A: `r × in`.
    pub da: Vec<f32>,
    /// d loss / d B: `out × r`.
    pub db: Vec<f32>,
    /// d loss / d x (the branch's share): `in`.
    pub dx: Vec<f32>,
}

/// Backward of `y = scale · B·(A·x)` (`A: r × in`, `B: out × r`).
pub fn lora_backward(
    a: &[f32],
    b: &[f32],
    rank: usize,
    scale: f32,
    x: &[f32],
    dy: &[f32],
) -> LoraGrads {
    let (inp, out) = (x.len(), dy.len());
    let h: Vec<f64> = (0..rank)
        .map(|k| {
            a[k * inp..(k + 1) * inp]
                .iter()
                .zip(x)
                .map(|(&w, &v)| w as f64 * v as f64)
                .sum()
        })
        .collect();
    // dB = scale · dy ⊗ h; dh = scale · Bᵀ·dy; dA = dh ⊗ x; dx = Aᵀ·dh.
    let mut db = vec![0f32; out * rank];
    let mut dh = vec![0f64; rank];
    for o in 0..out {
        let g = dy[o] as f64 * scale as f64;
        for k in 0..rank {
            db[o * rank + k] = (g * h[k]) as f32;
            dh[k] += g * b[o * rank + k] as f64;
        }
    }
    let mut da = vec![0f32; rank * inp];
    let mut dx = vec![0f64; inp];
    for k in 0..rank {
        for i in 0..inp {
            da[k * inp + i] = (dh[k] * x[i] as f64) as f32;
            dx[i] += dh[k] * a[k * inp + i] as f64;
        }
    }
    LoraGrads {
        da,
        db,
        dx: dx.into_iter().map(|v| v as f32).collect(),
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// `y = silu(g) ⊙ u` (SwiGLU): returns (d loss / d g, d loss / d u).
pub fn swiglu_backward(g: &[f32], u: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut dg = Vec::with_capacity(g.len());
    let mut du = Vec::with_capacity(g.len());
    for ((&gi, &ui), &d) in g.iter().zip(u).zip(dy) {
        let (x, s) = (gi as f64, sigmoid(gi as f64));
        let silu = x * s;
        let dsilu = s * (1.0 + x * (1.0 - s));
        dg.push((d as f64 * ui as f64 * dsilu) as f32);
        du.push((d as f64 * silu) as f32);
    }
    (dg, du)
}

/// `y = gelu(g) ⊙ u` with the tanh GELU (GeGLU, Gemma): returns (d loss / d g, d loss / d u).
/// The forward pass uses ggml's f16 GELU table; its derivative is that of this smooth GELU.
pub fn geglu_backward(g: &[f32], u: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    const C: f64 = 0.797_884_560_802_865_4; // √(2/π)
    const A: f64 = 0.044715;
    let mut dg = Vec::with_capacity(g.len());
    let mut du = Vec::with_capacity(g.len());
    for ((&gi, &ui), &d) in g.iter().zip(u).zip(dy) {
        let x = gi as f64;
        let t = (C * x * (1.0 + A * x * x)).tanh();
        let gelu = 0.5 * x * (1.0 + t);
        let dgelu = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * C * (1.0 + 3.0 * A * x * x);
        dg.push((d as f64 * ui as f64 * dgelu) as f32);
        du.push((d as f64 * gelu) as f32);
    }
    (dg, du)
}

/// RoPE rotates pairs `(x[i], x[i + half])` (NeoX) or `(x[2i], x[2i+1])` (normal) by angles
/// with cosines/sines `cs`; its backward rotates `dy` back (the transpose of a rotation).
pub fn rope_backward(dy: &[f32], cs: &[(f32, f32)], neox: bool) -> Vec<f32> {
    let mut dx = dy.to_vec();
    let half = cs.len();
    for (i, &(c, s)) in cs.iter().enumerate() {
        let (a, b) = if neox {
            (i, i + half)
        } else {
            (2 * i, 2 * i + 1)
        };
        let (ga, gb) = (dy[a], dy[b]);
        // forward: ya = xa·c − xb·s; yb = xa·s + xb·c
        dx[a] = ga * c + gb * s;
        dx[b] = -ga * s + gb * c;
    }
    dx
}

/// Gradients of one query head's attention over `n` positions.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionGrads {
    /// d loss / d q: `hd`.
    pub dq: Vec<f32>,
    /// d loss / d keys: `n × hd`.
    pub dk: Vec<f32>,
    /// d loss / d values: `n × hd`.
    pub dv: Vec<f32>,
}

/// Backward of `out = Σ_p softmax(scale · q·k_p)_p · v_p` for one query over keys and values
/// `n × hd`.
pub fn attention_backward(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    scale: f32,
    dout: &[f32],
) -> AttentionGrads {
    let hd = q.len();
    let n = keys.len() / hd;
    let s: Vec<f64> = (0..n)
        .map(|p| {
            scale as f64
                * keys[p * hd..(p + 1) * hd]
                    .iter()
                    .zip(q)
                    .map(|(&k, &x)| k as f64 * x as f64)
                    .sum::<f64>()
        })
        .collect();
    let mx = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = s.iter().map(|v| (v - mx).exp()).sum();
    let p: Vec<f64> = s.iter().map(|v| (v - mx).exp() / z).collect();
    // dv_p = p_p · dout; dp_p = dout·v_p; ds_p = p_p (dp_p − Σ_j p_j dp_j).
    let dp: Vec<f64> = (0..n)
        .map(|j| {
            values[j * hd..(j + 1) * hd]
                .iter()
                .zip(dout)
                .map(|(&v, &g)| v as f64 * g as f64)
                .sum()
        })
        .collect();
    let mean: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
    let ds: Vec<f64> = p
        .iter()
        .zip(&dp)
        .map(|(pj, dpj)| pj * (dpj - mean))
        .collect();
    let mut dq = vec![0f64; hd];
    let mut dk = vec![0f32; n * hd];
    let mut dv = vec![0f32; n * hd];
    for j in 0..n {
        for d in 0..hd {
            dq[d] += ds[j] * scale as f64 * keys[j * hd + d] as f64;
            dk[j * hd + d] = (ds[j] * scale as f64 * q[d] as f64) as f32;
            dv[j * hd + d] = (p[j] * dout[d] as f64) as f32;
        }
    }
    AttentionGrads {
        dq: dq.into_iter().map(|v| v as f32).collect(),
        dk,
        dv,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        crate::uniform(n, seed, scale)
    }

    /// Central finite differences of the scalar `f` at `x`, in f64.
    fn fd(x: &[f32], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
        let h = 1e-4;
        let base: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        (0..x.len())
            .map(|i| {
                let mut p = base.clone();
                let mut m = base.clone();
                p[i] += h;
                m[i] -= h;
                (f(&p) - f(&m)) / (2.0 * h)
            })
            .collect()
    }

    fn close(what: &str, got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let scale = want.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (*g as f64 - w).abs() <= 1e-3 * scale + 1e-5,
                "{what}[{i}]: analytic {g} vs finite difference {w}"
            );
        }
    }

    /// The loss used to test a backward: ⟨y, r⟩ for a fixed random r, so dy = r.
    fn dot(y: &[f64], r: &[f32]) -> f64 {
        y.iter().zip(r).map(|(a, &b)| a * b as f64).sum()
    }

    #[test]
    fn cross_entropy_and_unlikelihood_gradients() {
        let l = vals(11, 1, 3.0);
        let (loss, d) = cross_entropy(&l, 4);
        let lse = |x: &[f64]| {
            let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            m + x.iter().map(|v| (v - m).exp()).sum::<f64>().ln()
        };
        let ld: Vec<f64> = l.iter().map(|&v| v as f64).collect();
        assert!((loss as f64 - (lse(&ld) - ld[4])).abs() < 1e-5);
        close("cross_entropy", &d, &fd(&l, |x| lse(x) - x[4]));
        let (_, d) = unlikelihood(&l, 2);
        close(
            "unlikelihood",
            &d,
            &fd(&l, |x| -(1.0 - (x[2] - lse(x)).exp()).ln()),
        );
    }

    #[test]
    fn rms_norm_gradient() {
        let (x, w, r) = (vals(16, 2, 2.0), vals(16, 3, 1.5), vals(16, 4, 1.0));
        let eps = 1e-5;
        let f = |x: &[f64]| {
            let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64 + eps as f64;
            let y: Vec<f64> = x
                .iter()
                .zip(&w)
                .map(|(v, &wi)| v / ms.sqrt() * wi as f64)
                .collect();
            dot(&y, &r)
        };
        close("rms_norm", &rms_norm_backward(&x, &w, eps, &r), &fd(&x, f));
    }

    #[test]
    fn linear_and_lora_gradients() {
        let (out, inp, rank) = (6, 9, 3);
        let (w, x, r) = (
            vals(out * inp, 5, 1.0),
            vals(inp, 6, 1.0),
            vals(out, 7, 1.0),
        );
        let fx = |x: &[f64]| {
            let y: Vec<f64> = (0..out)
                .map(|o| (0..inp).map(|i| w[o * inp + i] as f64 * x[i]).sum())
                .collect();
            dot(&y, &r)
        };
        let dx = linear_backward_input(
            out,
            inp,
            |o, buf| buf.copy_from_slice(&w[o * inp..(o + 1) * inp]),
            &r,
        );
        close("linear dx", &dx, &fd(&x, fx));

        let (a, b, scale) = (vals(rank * inp, 8, 0.5), vals(out * rank, 9, 0.5), 2.0f32);
        let y = |a: &[f64], b: &[f64], x: &[f64]| -> f64 {
            let h: Vec<f64> = (0..rank)
                .map(|k| (0..inp).map(|i| a[k * inp + i] * x[i]).sum())
                .collect();
            let y: Vec<f64> = (0..out)
                .map(|o| scale as f64 * (0..rank).map(|k| b[o * rank + k] * h[k]).sum::<f64>())
                .collect();
            dot(&y, &r)
        };
        let to64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
        let g = lora_backward(&a, &b, rank, scale, &x, &r);
        close("lora dA", &g.da, &fd(&a, |av| y(av, &to64(&b), &to64(&x))));
        close("lora dB", &g.db, &fd(&b, |bv| y(&to64(&a), bv, &to64(&x))));
        close("lora dx", &g.dx, &fd(&x, |xv| y(&to64(&a), &to64(&b), xv)));
    }

    #[test]
    fn gated_activation_gradients() {
        let (g, u, r) = (vals(12, 10, 4.0), vals(12, 11, 2.0), vals(12, 12, 1.0));
        let silu = |x: f64| x / (1.0 + (-x).exp());
        let gelu = |x: f64| {
            0.5 * x * (1.0 + (0.797_884_560_802_865_4 * x * (1.0 + 0.044715 * x * x)).tanh())
        };
        let u64: Vec<f64> = u.iter().map(|&v| v as f64).collect();
        let g64: Vec<f64> = g.iter().map(|&v| v as f64).collect();
        let (dg, du) = swiglu_backward(&g, &u, &r);
        close(
            "swiglu dg",
            &dg,
            &fd(&g, |gv| {
                dot(
                    &gv.iter()
                        .zip(&u64)
                        .map(|(a, b)| silu(*a) * b)
                        .collect::<Vec<_>>(),
                    &r,
                )
            }),
        );
        close(
            "swiglu du",
            &du,
            &fd(&u, |uv| {
                dot(
                    &g64.iter()
                        .zip(uv)
                        .map(|(a, b)| silu(*a) * b)
                        .collect::<Vec<_>>(),
                    &r,
                )
            }),
        );
        let (dg, du) = geglu_backward(&g, &u, &r);
        close(
            "geglu dg",
            &dg,
            &fd(&g, |gv| {
                dot(
                    &gv.iter()
                        .zip(&u64)
                        .map(|(a, b)| gelu(*a) * b)
                        .collect::<Vec<_>>(),
                    &r,
                )
            }),
        );
        close(
            "geglu du",
            &du,
            &fd(&u, |uv| {
                dot(
                    &g64.iter()
                        .zip(uv)
                        .map(|(a, b)| gelu(*a) * b)
                        .collect::<Vec<_>>(),
                    &r,
                )
            }),
        );
    }

    #[test]
    fn rope_gradient_for_both_layouts() {
        let x = vals(8, 13, 1.0);
        let r = vals(8, 14, 1.0);
        let cs: Vec<(f32, f32)> = (0..4)
            .map(|i| ((0.3 * i as f32 + 0.2).cos(), (0.3 * i as f32 + 0.2).sin()))
            .collect();
        for neox in [false, true] {
            let f = |x: &[f64]| {
                let mut y = x.to_vec();
                for (i, &(c, s)) in cs.iter().enumerate() {
                    let (a, b) = if neox { (i, i + 4) } else { (2 * i, 2 * i + 1) };
                    y[a] = x[a] * c as f64 - x[b] * s as f64;
                    y[b] = x[a] * s as f64 + x[b] * c as f64;
                }
                dot(&y, &r)
            };
            close(
                if neox { "rope neox" } else { "rope normal" },
                &rope_backward(&r, &cs, neox),
                &fd(&x, f),
            );
        }
    }

    #[test]
    fn attention_gradients() {
        let (hd, n) = (8, 5);
        let (q, k, v, r) = (
            vals(hd, 15, 1.0),
            vals(n * hd, 16, 1.0),
            vals(n * hd, 17, 1.0),
            vals(hd, 18, 1.0),
        );
        let scale = 1.0 / (hd as f32).sqrt();
        let f = |q: &[f64], k: &[f64], v: &[f64]| {
            let s: Vec<f64> = (0..n)
                .map(|p| scale as f64 * (0..hd).map(|d| q[d] * k[p * hd + d]).sum::<f64>())
                .collect();
            let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
            let out: Vec<f64> = (0..hd)
                .map(|d| (0..n).map(|p| (s[p] - m).exp() / z * v[p * hd + d]).sum())
                .collect();
            dot(&out, &r)
        };
        let to64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
        let g = attention_backward(&q, &k, &v, scale, &r);
        close(
            "attention dq",
            &g.dq,
            &fd(&q, |x| f(x, &to64(&k), &to64(&v))),
        );
        close(
            "attention dk",
            &g.dk,
            &fd(&k, |x| f(&to64(&q), x, &to64(&v))),
        );
        close(
            "attention dv",
            &g.dv,
            &fd(&v, |x| f(&to64(&q), &to64(&k), x)),
        );
    }
}
