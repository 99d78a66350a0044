//! Weight matrix × a batch of activation rows, split across the worker pool by weight rows.
//!
//! Each weight row is dotted with every activation row while it is hot in cache, so a prefill
//! batch reads the weights once. A row's result never depends on the batch it is in: the same
//! dot function runs on the same quantized activation row in the same order.

use crate::act::{ActFormat, QuantActs};
use crate::dispatch::{kernels, packed_rows};
use crate::packed::GROUP;
use crate::pool::ThreadPool;
use crate::{GgmlType, SyncPtr};

/// A 2-D weight matrix in a ggml block format, borrowed from the model file.
#[derive(Debug, Clone, Copy)]
pub struct QMatrix<'a> {
    /// Element type.
    pub ty: GgmlType,
    /// Output features (rows).
    pub rows: usize,
    /// Input features (elements per row).
    pub cols: usize,
    /// `rows × row_bytes` bytes.
    pub data: &'a [u8],
    /// The same matrix in the row-interleaved layout of [`crate::packed`], when the model made
    /// one at load time; every product then uses it (one arithmetic for every batch size).
    pub packed: Option<&'a [u8]>,
}

impl QMatrix<'_> {
    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.cols / self.ty.block_size() * self.ty.type_size()
    }
    /// The bytes of row `r`.
    pub fn row(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }
    /// The activation format this matrix multiplies with.
    pub fn act_format(&self) -> ActFormat {
        ActFormat::for_weight(self.ty)
    }
}

/// Rows per task: about four tasks per thread, at least 16 rows (to amortize the task hand-out,
/// an atomic shared by all threads, and a kernel call's set-up) and at most 512 (so a task's
/// weights stay in L2 while a batch of tokens reuses them). Even, so single-token rows pair up.
/// Four beat eight and sixteen per thread on 2 threads (session 9: SmolLM2 16 streams
/// 1079–1093 → 1095–1105 decode t/s, pp512 870–884 → 923–962; Gemma-3 tg64 97–99 → 101–103).
fn rows_per_task(rows: usize, n_threads: usize) -> usize {
    (rows / (n_threads * 4)).clamp(16, 512).next_multiple_of(2)
}

/// One product of a [`matmul_many`] call: `out[t][r] = w.row(r) · acts.row(t)`.
pub struct MatJob<'a> {
    /// The weights.
    pub w: QMatrix<'a>,
    /// The quantized inputs (in `w.act_format()`).
    pub acts: &'a QuantActs,
    /// The output, `acts.n_rows × w.rows`.
    pub out: &'a mut [f32],
}

/// `out[t][r] = w.row(r) · acts.row(t)` for every activation row `t` (`out`: `n_rows × w.rows`).
pub fn matmul(pool: &ThreadPool, w: &QMatrix<'_>, acts: &QuantActs, out: &mut [f32]) {
    matmul_many(pool, &mut [MatJob { w: *w, acts, out }]);
}

/// Most products one [`matmul_many`] call takes.
pub const MAX_JOBS: usize = 4;

/// Several independent products in one pass over the pool (e.g. Q, K and V of one input), so
/// the threads synchronize once instead of once per matrix.
pub fn matmul_many(pool: &ThreadPool, jobs: &mut [MatJob<'_>]) {
    struct Prepared<'a> {
        w: QMatrix<'a>,
        acts: &'a QuantActs,
        out: SyncPtr<f32>,
        kernels: crate::dispatch::Kernels,
        packed: Option<(&'a [u8], crate::packed::PackedRowsFn)>,
        first_task: usize,
        chunk: usize,
    }
    // A fixed array, not a Vec: this runs hundreds of times per decoded token.
    assert!(
        jobs.len() <= MAX_JOBS,
        "matmul_many takes at most {MAX_JOBS} products"
    );
    let mut prepared: [Option<Prepared<'_>>; MAX_JOBS] = [None, None, None, None];
    let mut n_tasks = 0;
    for (slot, j) in prepared.iter_mut().zip(jobs.iter_mut()) {
        debug_assert_eq!(j.acts.cols, j.w.cols);
        debug_assert_eq!(j.acts.format, Some(j.w.act_format()));
        assert!(
            j.out.len() >= j.acts.n_rows * j.w.rows,
            "matmul output too small"
        );
        let packed = j.w.packed.and_then(|p| Some((p, packed_rows(j.w.ty)?)));
        let mut chunk = rows_per_task(j.w.rows, pool.n_threads());
        if packed.is_some() {
            // Whole pairs of groups: the kernels' 512-bit (and AMX) paths take sixteen rows.
            chunk = chunk.next_multiple_of(2 * GROUP);
        }
        *slot = Some(Prepared {
            w: j.w,
            acts: j.acts,
            out: SyncPtr::new(j.out),
            kernels: kernels(j.w.ty),
            packed,
            first_task: n_tasks,
            chunk,
        });
        n_tasks += j.w.rows.div_ceil(chunk);
    }
    let prepared = &prepared[..jobs.len()];
    pool.run(n_tasks, &|task| {
        let Some(j) = prepared
            .iter()
            .rev()
            .flatten()
            .find(|p| p.first_task <= task)
        else {
            return;
        };
        let (w, rows, n_tok, p) = (&j.w, j.w.rows, j.acts.n_rows, j.out);
        let r0 = (task - j.first_task) * j.chunk;
        let r1 = (r0 + j.chunk).min(rows);
        if let Some((data, f)) = j.packed {
            // SAFETY: as below; r0 and r1 are multiples of GROUP (chunk is, and packing
            // requires rows to be), and `packed_rows` only hands out supported functions.
            unsafe { f(data, w.cols, r0, r1, j.acts, p, rows) };
            return;
        }
        if let Some(f) = j.kernels.rows {
            // SAFETY: out holds n_tok × rows floats (asserted above) and rows r0..r1 belong to
            // this task alone; `kernels` only hands out functions the CPU supports.
            unsafe { f(w.data, w.row_bytes(), r0, r1, j.acts, p, rows) };
            return;
        }
        let (dot, dot4) = (j.kernels.dot, j.kernels.dot4);
        for r in r0..r1 {
            let wr = w.row(r);
            let mut t = 0;
            while t + 4 <= n_tok {
                let v = dot4(
                    wr,
                    [
                        j.acts.row(t),
                        j.acts.row(t + 1),
                        j.acts.row(t + 2),
                        j.acts.row(t + 3),
                    ],
                );
                for (k, v) in v.into_iter().enumerate() {
                    // SAFETY: index (t+k)*rows + r is in bounds (asserted above) and row r
                    // belongs to this task alone.
                    unsafe { *p.0.add((t + k) * rows + r) = v };
                }
                t += 4;
            }
            while t < n_tok {
                let v = dot(wr, j.acts.row(t));
                // SAFETY: as above.
                unsafe { *p.0.add(t * rows + r) = v };
                t += 1;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dot::dot_scalar;

    /// Batch invariance on random shapes: every (row, token) result of a batched matmul is
    /// bit-identical to the same token run alone, and to the single-row dot, for every weight
    /// type with a SIMD kernel (this covers the 4-token and the paired-row paths).
    #[test]
    fn batch_invariance_on_random_shapes() {
        let pool = ThreadPool::new(2);
        let mut seed = 17u64;
        let mut rnd = move |m: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % m as u64) as usize
        };
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q8_0,
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
            GgmlType::F16,
            GgmlType::BF16,
        ] {
            for _ in 0..4 {
                let bs = ty.block_size().max(32);
                let cols = bs * (1 + rnd(6));
                let rows = 1 + rnd(70);
                let n_tok = 1 + rnd(9);
                let data: Vec<u8> = (0..rows)
                    .flat_map(|r| crate::test_util::random_row(ty, cols, (r * 31 + cols) as u64))
                    .collect();
                let value = |i: usize| ((i * 7) % 19) as f32 / 9.0 - 1.0;
                let data = match ty {
                    GgmlType::F16 => (0..rows * cols)
                        .flat_map(|i| half::f16::from_f32(value(i)).to_le_bytes())
                        .collect(),
                    GgmlType::BF16 => (0..rows * cols)
                        .flat_map(|i| half::bf16::from_f32(value(i)).to_le_bytes())
                        .collect(),
                    _ => data,
                };
                let w = QMatrix {
                    ty,
                    rows,
                    cols,
                    data: &data,
                    packed: None,
                };
                let x: Vec<f32> = (0..n_tok * cols)
                    .map(|i| ((i * 7919) % 97) as f32 / 13.0 - 3.5)
                    .collect();
                let mut batch = QuantActs::default();
                batch.quantize(w.act_format(), &x, cols);
                let mut out = vec![0f32; n_tok * rows];
                matmul(&pool, &w, &batch, &mut out);
                let k = kernels(ty);
                for t in 0..n_tok {
                    let mut one = QuantActs::default();
                    one.quantize(w.act_format(), &x[t * cols..(t + 1) * cols], cols);
                    let mut o1 = vec![0f32; rows];
                    matmul(&pool, &w, &one, &mut o1);
                    for r in 0..rows {
                        assert_eq!(
                            o1[r].to_bits(),
                            out[t * rows + r].to_bits(),
                            "{ty} {rows}x{cols} batch {n_tok}: token {t} row {r}"
                        );
                        assert_eq!(
                            o1[r].to_bits(),
                            (k.dot)(w.row(r), one.row(0)).to_bits(),
                            "{ty}: matmul vs dot, row {r}"
                        );
                    }
                }
            }
        }
    }

    /// The same for packed matrices through `matmul`: random batch sizes (1..=19, so 8-, 4- and
    /// 1-token passes mix) give each token bit-identical results to it alone and to the scalar
    /// twin of the packed layout.
    #[test]
    fn packed_matmul_is_batch_invariant() {
        let pool = ThreadPool::new(2);
        for ty in crate::packed::PACKABLE {
            if packed_rows(ty).is_none() {
                eprintln!("no packed kernels at this tier");
                return;
            }
            for (rows, cols, n_tok) in [(8, 32, 1), (40, 96, 19), (136, 64, 12), (64, 256, 5)] {
                let data: Vec<u8> = (0..rows)
                    .flat_map(|r| crate::test_util::random_row(ty, cols, (r * 13 + cols) as u64))
                    .collect();
                let packed = crate::packed::pack(ty, rows, cols, &data).expect("packable");
                let w = QMatrix {
                    ty,
                    rows,
                    cols,
                    data: &data,
                    packed: Some(&packed),
                };
                let x: Vec<f32> = (0..n_tok * cols)
                    .map(|i| ((i * 7919) % 101) as f32 / 11.0 - 4.5)
                    .collect();
                let mut batch = QuantActs::default();
                batch.quantize(w.act_format(), &x, cols);
                let mut out = vec![0f32; n_tok * rows];
                matmul(&pool, &w, &batch, &mut out);
                for t in 0..n_tok {
                    let mut one = QuantActs::default();
                    one.quantize(w.act_format(), &x[t * cols..(t + 1) * cols], cols);
                    let mut o1 = vec![0f32; rows];
                    matmul(&pool, &w, &one, &mut o1);
                    for g in 0..rows / GROUP {
                        let twin =
                            crate::packed::dot_group_scalar(ty, &packed, cols, g, one.row(0));
                        for r in 0..GROUP {
                            let row = g * GROUP + r;
                            assert_eq!(
                                o1[row].to_bits(),
                                out[t * rows + row].to_bits(),
                                "{ty} {rows}x{cols} batch {n_tok}: token {t} row {row}"
                            );
                            assert_eq!(
                                o1[row].to_bits(),
                                twin[r].to_bits(),
                                "{ty}: packed matmul vs scalar twin, row {row}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn batched_rows_equal_single_rows_bit_for_bit() {
        let pool = ThreadPool::new(2);
        let (rows, cols) = (37, 256);
        let mut data = Vec::new();
        for r in 0..rows {
            data.extend(crate::test_util::random_row(GgmlType::Q4_K, cols, r as u64));
        }
        let w = QMatrix {
            ty: GgmlType::Q4_K,
            rows,
            cols,
            data: &data,
            packed: None,
        };
        let x: Vec<f32> = (0..5 * cols)
            .map(|i| ((i * 7919) % 97) as f32 / 13.0 - 3.5)
            .collect();
        let mut batch = QuantActs::default();
        batch.quantize(ActFormat::Q8K, &x, cols);
        let mut out = vec![0f32; 5 * rows];
        matmul(&pool, &w, &batch, &mut out);
        for t in 0..5 {
            let mut one = QuantActs::default();
            one.quantize(ActFormat::Q8K, &x[t * cols..(t + 1) * cols], cols);
            let mut o1 = vec![0f32; rows];
            matmul(&pool, &w, &one, &mut o1);
            for r in 0..rows {
                assert_eq!(o1[r].to_bits(), out[t * rows + r].to_bits());
                let s = dot_scalar(GgmlType::Q4_K, w.row(r), one.row(0));
                assert!((s - o1[r]).abs() <= 1e-4 * s.abs().max(1.0));
            }
        }
    }
}
