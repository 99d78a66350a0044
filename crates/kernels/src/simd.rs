//! SIMD dot products. Each function here has a scalar twin in `dot.rs` and a test that compares
//! them on random blocks (`tests` at the bottom).

use crate::dispatch::{DotFn, Tier};
use crate::GgmlType;

/// The SIMD dot for `ty` at `tier`, if one exists.
pub(crate) fn select(_ty: GgmlType, _tier: Tier) -> Option<DotFn> {
    None
}
