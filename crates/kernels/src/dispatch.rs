//! SIMD tier selection, done once per process.
//!
//! The tier is the best the CPU supports, lowered by `RUVLLM_SIMD=scalar|avx2|avx512` (a request
//! for a tier the CPU lacks falls back to the best it has below it), so CI can exercise every
//! tier on one machine.

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
}

fn detect() -> Tier {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
        let avx512 = avx2
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni");
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
        let best = detect();
        let cap = match std::env::var("RUVLLM_SIMD").ok().as_deref() {
            Some("scalar") => Tier::Scalar,
            Some("avx2") => Tier::Avx2,
            _ => Tier::Avx512Vnni,
        };
        best.min(cap)
    })
}

/// The best tier the CPU supports, ignoring `RUVLLM_SIMD` (for tests that compare tiers).
pub fn best_tier() -> Tier {
    detect()
}

/// A row dot product: weight row bytes · activation row.
pub type DotFn = fn(&[u8], ActRow<'_>) -> f32;

/// The dot function for a weight type at the process's tier.
pub fn dot_fn(ty: GgmlType) -> DotFn {
    dot_fn_for(ty, tier())
}

/// The dot function for a weight type at a given tier (which must not exceed [`best_tier`]).
pub fn dot_fn_for(ty: GgmlType, tier: Tier) -> DotFn {
    crate::simd::select(ty, tier).unwrap_or_else(|| scalar_fn(ty))
}

fn scalar_fn(ty: GgmlType) -> DotFn {
    use GgmlType::*;
    macro_rules! f {
        ($t:expr) => {
            |w, a| crate::dot::dot_scalar($t, w, a)
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
