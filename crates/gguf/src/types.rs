//! The ggml tensor type table: ids, block sizes and bytes per block, as ggml defines them
//! (`ggml.h` `enum ggml_type` and `ggml.c` `type_traits`).

use crate::{Error, ErrorKind};

/// A ggml element type that ruvllm knows the layout of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs, non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    I8,
    I16,
    I32,
    I64,
    F64,
    BF16,
}

impl GgmlType {
    /// Maps the on-disk type id to a type; unknown or unsupported ids (the IQ family, TQ) are an error.
    pub fn from_id(id: u32) -> Result<GgmlType, Error> {
        use GgmlType::*;
        Ok(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2_K,
            11 => Q3_K,
            12 => Q4_K,
            13 => Q5_K,
            14 => Q6_K,
            15 => Q8_K,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            30 => BF16,
            _ => return Err(Error::new(ErrorKind::UnknownTensorType(id))),
        })
    }

    /// The on-disk type id.
    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2_K => 10,
            Q3_K => 11,
            Q4_K => 12,
            Q5_K => 13,
            Q6_K => 14,
            Q8_K => 15,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            BF16 => 30,
        }
    }

    /// Elements per block (1 for plain types).
    pub fn block_size(self) -> usize {
        use GgmlType::*;
        match self {
            Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q8_1 => 32,
            Q2_K | Q3_K | Q4_K | Q5_K | Q6_K | Q8_K => 256,
            _ => 1,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        use GgmlType::*;
        match self {
            F32 | I32 => 4,
            F16 | BF16 | I16 => 2,
            I8 => 1,
            I64 | F64 => 8,
            Q4_0 => 18,
            Q4_1 => 20,
            Q5_0 => 22,
            Q5_1 => 24,
            Q8_0 => 34,
            Q8_1 => 36,
            Q2_K => 84,
            Q3_K => 110,
            Q4_K => 144,
            Q5_K => 176,
            Q6_K => 210,
            Q8_K => 292,
        }
    }

    /// The name ggml prints for the type (`q4_K`, `f16`, ...).
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "f32",
            F16 => "f16",
            Q4_0 => "q4_0",
            Q4_1 => "q4_1",
            Q5_0 => "q5_0",
            Q5_1 => "q5_1",
            Q8_0 => "q8_0",
            Q8_1 => "q8_1",
            Q2_K => "q2_K",
            Q3_K => "q3_K",
            Q4_K => "q4_K",
            Q5_K => "q5_K",
            Q6_K => "q6_K",
            Q8_K => "q8_K",
            I8 => "i8",
            I16 => "i16",
            I32 => "i32",
            I64 => "i64",
            F64 => "f64",
            BF16 => "bf16",
        }
    }

    /// Where each block of this type keeps its floating-point fields: (byte offset, width in
    /// bytes, whether a 2-byte field is bf16 rather than f16). Quantized blocks keep only their
    /// scales (and minima) as floats, at the offsets ggml's block structs put them; plain float
    /// types are one field per element; integer types have none.
    fn float_fields(self) -> &'static [(usize, usize, bool)] {
        use GgmlType::*;
        match self {
            F32 => &[(0, 4, false)],
            F64 => &[(0, 8, false)],
            F16 => &[(0, 2, false)],
            BF16 => &[(0, 2, true)],
            Q4_0 | Q5_0 | Q8_0 => &[(0, 2, false)],
            Q4_1 | Q5_1 | Q8_1 | Q4_K | Q5_K => &[(0, 2, false), (2, 2, false)],
            // scales[16], qs[64], then d and dmin.
            Q2_K => &[(80, 2, false), (82, 2, false)],
            // hmask[32], qs[64], scales[12], then d.
            Q3_K => &[(108, 2, false)],
            // ql[128], qh[64], scales[16], then d.
            Q6_K => &[(208, 2, false)],
            Q8_K => &[(0, 4, false)],
            I8 | I16 | I32 | I64 => &[],
        }
    }

    /// The index of the first block of `data` (whole blocks of this type; a partial block at
    /// the end is ignored) whose floating-point fields — a plain float value, or a quantized
    /// block's scale or minimum — are NaN or infinite, the check llama.cpp runs with
    /// `--check-tensors`. No valid model has such a block: one makes every output that reads
    /// it NaN, so a loader refuses the file instead of serving garbage.
    pub fn first_non_finite_block(self, data: &[u8]) -> Option<usize> {
        let fields = self.float_fields();
        let ts = self.type_size();
        let f16_bad = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]) & 0x7c00 == 0x7c00;
        // The common layouts in tight loops (a model's matrices are scanned at every load).
        match *fields {
            [] => return None,
            [(0, 4, false)] if ts == 4 => {
                return data
                    .chunks_exact(4)
                    .position(|b| !f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite())
            }
            [(o, 2, false)] => return data.chunks_exact(ts).position(|b| f16_bad(b, o)),
            [(o, 2, false), (p, 2, false)] => {
                return data
                    .chunks_exact(ts)
                    .position(|b| f16_bad(b, o) | f16_bad(b, p))
            }
            _ => {}
        }
        let bad = |b: &[u8]| {
            fields.iter().any(|&(o, w, bf)| match (w, bf) {
                (2, false) => f16_bad(b, o),
                (2, true) => u16::from_le_bytes([b[o], b[o + 1]]) & 0x7f80 == 0x7f80,
                (4, _) => !f32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]).is_finite(),
                _ => {
                    let mut x = [0u8; 8];
                    x.copy_from_slice(&b[o..o + 8]);
                    !f64::from_le_bytes(x).is_finite()
                }
            })
        };
        data.chunks_exact(ts).position(bad)
    }

    /// Bytes needed for a row of `n` elements, or `None` if `n` is not a whole number of blocks
    /// or the size overflows.
    pub fn row_bytes(self, n: u64) -> Option<u64> {
        let bs = self.block_size() as u64;
        if n % bs != 0 {
            return None;
        }
        (n / bs).checked_mul(self.type_size() as u64)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_sizes_match_ggml() {
        for id in 0..40 {
            if let Ok(t) = GgmlType::from_id(id) {
                assert_eq!(t.id(), id);
            }
        }
        assert!(GgmlType::from_id(16).is_err(), "IQ2_XXS is not supported");
        assert_eq!(GgmlType::Q4_K.row_bytes(512), Some(288));
        assert_eq!(GgmlType::Q4_0.row_bytes(33), None);
        assert_eq!(GgmlType::Q8_K.type_size(), 4 + 256 + 2 * 16);
    }

    /// Every float field of every type is seen when it holds a NaN or an infinity (in the
    /// block it is in), and bytes outside those fields — quants that happen to look like an
    /// f16 NaN — never are.
    #[test]
    fn non_finite_scales_are_found_and_quants_are_not_mistaken_for_them() {
        use GgmlType::*;
        let all = [
            F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K, I8,
            I16, I32, I64, F64, BF16,
        ];
        for ty in all {
            let ts = ty.type_size();
            let fields = ty.float_fields();
            let covered: Vec<usize> = fields.iter().flat_map(|&(o, w, _)| o..o + w).collect();
            // Three blocks of all-0xFF bytes except the float fields, which hold 1.0.
            let one = |w: usize, bf: bool| -> Vec<u8> {
                match (w, bf) {
                    (2, false) => 0x3c00u16.to_le_bytes().to_vec(),
                    (2, true) => 0x3f80u16.to_le_bytes().to_vec(),
                    (4, _) => 1f32.to_le_bytes().to_vec(),
                    _ => 1f64.to_le_bytes().to_vec(),
                }
            };
            let mut data = vec![0xFFu8; 3 * ts];
            for b in 0..3 {
                for &(o, w, bf) in fields {
                    data[b * ts + o..b * ts + o + w].copy_from_slice(&one(w, bf));
                }
            }
            assert_eq!(ty.first_non_finite_block(&data), None, "{ty}: 0xFF quants");
            assert!(
                covered.iter().all(|&o| o < ts),
                "{ty}: field past the block"
            );
            // A partial block at the end is not read.
            assert_eq!(ty.first_non_finite_block(&data[..3 * ts - 1]), None, "{ty}");
            for &(o, w, bf) in fields {
                for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
                    let mut d = data.clone();
                    let bytes = match (w, bf) {
                        (2, false) => (if bad.is_nan() {
                            0x7e00u16
                        } else if bad > 0.0 {
                            0x7c00
                        } else {
                            0xfc00
                        })
                        .to_le_bytes()
                        .to_vec(),
                        (2, true) => (if bad.is_nan() {
                            0x7fc0u16
                        } else if bad > 0.0 {
                            0x7f80
                        } else {
                            0xff80
                        })
                        .to_le_bytes()
                        .to_vec(),
                        (4, _) => (bad as f32).to_le_bytes().to_vec(),
                        _ => bad.to_le_bytes().to_vec(),
                    };
                    d[2 * ts + o..2 * ts + o + w].copy_from_slice(&bytes);
                    assert_eq!(
                        ty.first_non_finite_block(&d),
                        Some(2),
                        "{ty} field {o}: {bad}"
                    );
                }
            }
        }
    }
}
