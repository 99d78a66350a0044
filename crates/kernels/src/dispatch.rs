//! SIMD tier selection, done once per process.
//!
//! The tier is the best the CPU supports, lowered by `RUVLLM_SIMD=scalar|avx2|avx512|amx` (a
//! request for a tier the CPU lacks falls back to the best it has below it), so CI can exercise
//! every tier on one machine.

use crate::act::ActRow;
use crate::GgmlType;
use std::sync::OnceLock;

/// A SIMD tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tier {
    /// Portable Rust.
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512 F/BW/VL with VNNI.
    Avx512Vnni,
    /// AVX-512 VNNI plus AMX-INT8 tiles, which the packed kernels use for batches of tokens
    /// (everything else runs the AVX-512 kernels).
    Amx,
}

fn detect() -> Tier {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        let avx512 = avx2
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni");
        if avx512 && crate::amx::available() {
            return Tier::Amx;
        }
        if avx512 {
            return Tier::Avx512Vnni;
        }
        if avx2 {
            return Tier::Avx2;
        }
    }
    Tier::Scalar
}

/// The tier in use: the best available, capped by `RUVLLM_SIMD`.
pub fn tier() -> Tier {
    static TIER: OnceLock<Tier> = OnceLock::new();
    *TIER.get_or_init(|| {
        let best = best_tier();
        let cap = match std::env::var("RUVLLM_SIMD").ok().as_deref() {
            Some("scalar") => Tier::Scalar,
            Some("avx2") => Tier::Avx2,
            Some("avx512") => Tier::Avx512Vnni,
            _ => Tier::Amx,
        };
        best.min(cap)
    })
}

/// The best tier the CPU supports, ignoring `RUVLLM_SIMD` (for tests that compare tiers),
/// detected once: kernel selection asks for it on every product.
pub fn best_tier() -> Tier {
    static BEST: OnceLock<Tier> = OnceLock::new();
    *BEST.get_or_init(detect)
}

/// A row dot product: weight row bytes · activation row.
pub type DotFn = fn(&[u8], ActRow<'_>) -> f32;

/// One weight row · four activation rows; bit-identical to four [`DotFn`] calls.
pub type Dot4Fn = fn(&[u8], [ActRow<'_>; 4]) -> [f32; 4];

/// Rows `r0..r1` of a weight matrix (`row_bytes` each) times every row of `acts`, writing
/// `out[t * ld + r]`.
///
/// # Safety
/// `out` must point to at least `acts.n_rows × ld` floats that no one else writes at those
/// `(t, r)` positions meanwhile, and the CPU must support the tier the function came from
/// (guaranteed for functions obtained from [`kernels`] / [`kernels_for`]).
pub type RowsFn =
    unsafe fn(&[u8], usize, usize, usize, &crate::act::QuantActs, crate::SyncPtr<f32>, usize);

/// The kernels for one weight type at one tier.
#[derive(Clone, Copy)]
pub struct Kernels {
    /// One row · one activation row.
    pub dot: DotFn,
    /// One row · four activation rows.
    pub dot4: Dot4Fn,
    /// A block of rows × all activation rows, where the tier has a fused loop.
    pub rows: Option<RowsFn>,
}

/// The kernels for a weight type at the process's tier.
pub fn kernels(ty: GgmlType) -> Kernels {
    kernels_for(ty, tier())
}

/// The kernels for a weight type at a given tier (capped at what the CPU supports).
pub fn kernels_for(ty: GgmlType, tier: Tier) -> Kernels {
    let tier = tier.min(best_tier());
    crate::simd::select(ty, tier).unwrap_or_else(|| {
        let (dot, dot4) = scalar_fns(ty);
        Kernels {
            dot,
            dot4,
            rows: None,
        }
    })
}

/// Whether load-time repacking is allowed: on unless `RUVLLM_PACK=off` (for A/B measurements).
pub fn packing_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("RUVLLM_PACK").map_or(true, |v| v != "off" && v != "0"))
}

/// The row-interleaved kernel for `ty` at the process's tier, if there is one; a model packs a
/// weight matrix exactly when this is Some (so `RUVLLM_SIMD=avx2` or `RUVLLM_PACK=off` turn
/// packing off).
pub fn packed_rows(ty: GgmlType) -> Option<crate::packed::PackedRowsFn> {
    if tier() < Tier::Avx512Vnni || !crate::packed::packable(ty) || !packing_enabled() {
        return None;
    }
    crate::packed::simd_rows(ty, tier())
}

/// The dot functions for a weight type at a given tier.
pub fn dot_fns_for(ty: GgmlType, tier: Tier) -> (DotFn, Dot4Fn) {
    let k = kernels_for(ty, tier);
    (k.dot, k.dot4)
}

/// The scalar twins as a (single-row, four-row) pair of dot functions.
fn scalar_fns(ty: GgmlType) -> (DotFn, Dot4Fn) {
    use GgmlType::*;
    macro_rules! f {
        ($t:expr) => {
            (
                |w, a| crate::dot::dot_scalar($t, w, a),
                |w, a: [ActRow<'_>; 4]| a.map(|r| crate::dot::dot_scalar($t, w, r)),
            )
        };
    }
    match ty {
        Q4_0 => f!(Q4_0),
        Q4_1 => f!(Q4_1),
        Q5_0 => f!(Q5_0),
        Q5_1 => f!(Q5_1),
        Q8_0 => f!(Q8_0),
        Q2_K => f!(Q2_K),
        Q3_K => f!(Q3_K),
        Q4_K => f!(Q4_K),
        Q5_K => f!(Q5_K),
        Q6_K => f!(Q6_K),
        F16 => f!(F16),
        BF16 => f!(BF16),
        _ => f!(F32),
    }
}
