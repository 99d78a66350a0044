//! The packed (row-interleaved) int8 kernels through `matmul`, as the forward pass calls them:
//! SmolLM2's shapes (Q4_1 576×576, 1536×576, 576×1536; the Q8_0 LM head 49152×576) at batch
//! sizes 1, 8, 16 and 64, on one thread and on a pool of two, reported as GMAC/s and weight
//! GB/s; then one "step" of the whole model's matrices in layer order (30 layers' Q4_1
//! projections and the head, ~96 MB: streamed from L3/DRAM as a decode step streams them).
//! Run: `cargo bench -p ruvllm-kernels --bench packed [-- THREADS | step]`.

use ruvllm_kernels::act::{ActFormat, QuantActs};
use ruvllm_kernels::matmul::{matmul, QMatrix};
use ruvllm_kernels::packed::pack;
use ruvllm_kernels::pool::ThreadPool;
use ruvllm_kernels::GgmlType;

mod common;
use common::random_bytes;

fn main() {
    if std::env::args().nth(1).as_deref() == Some("step") {
        model_step(&[1, 2]);
        return;
    }
    let threads: Vec<usize> = match std::env::args().nth(1).and_then(|a| a.parse().ok()) {
        Some(t) => vec![t],
        None => vec![1, 2],
    };
    println!("| type | shape | threads | batch | GMAC/s | GB/s (weights) |");
    println!("| --- | --- | ---: | ---: | ---: | ---: |");
    for (ty, rows, cols) in [
        (GgmlType::Q4_1, 576, 576),
        (GgmlType::Q4_1, 1536, 576),
        (GgmlType::Q4_1, 576, 1536),
        (GgmlType::Q8_0, 49152, 576),
    ] {
        let data = common::matrix(ty, rows, cols, 42);
        let Some(packed) = pack(ty, rows, cols, &data) else {
            continue;
        };
        let w = QMatrix {
            ty,
            rows,
            cols,
            data: &data,
            packed: Some(&packed),
        };
        for &nt in &threads {
            let pool = ThreadPool::new(nt);
            for batch in [1usize, 4, 8, 16, 64] {
                let x: Vec<f32> = random_bytes(cols * batch, 9)
                    .iter()
                    .map(|&b| b as f32 / 255.0 - 0.5)
                    .collect();
                let mut acts = QuantActs::default();
                acts.quantize(ActFormat::for_weight(ty), &x, cols);
                let mut out = vec![0f32; batch * rows];
                let secs = common::secs_per_call(0.4, || matmul(&pool, &w, &acts, &mut out));
                println!(
                    "| {ty} | {rows}×{cols} | {nt} | {batch} | {:.1} | {:.2} |",
                    (rows * cols * batch) as f64 / secs / 1e9,
                    data.len() as f64 / secs / 1e9
                );
            }
        }
    }
    model_step(&threads);
}

/// SmolLM2-135M's matrices (30 layers of Q4_1 q, k, v, o, gate, up, down; the Q8_0 head),
/// random, multiplied in layer order at batch 1 and 16: the GEMM part of a serving step with
/// weights (~96 MB) that do not fit in L2.
fn model_step(threads: &[usize]) {
    let (d, kv, ff, vocab) = (576, 192, 1536, 49152);
    let random_packed = |ty: GgmlType, rows: usize, cols: usize, seed: u64| {
        pack(ty, rows, cols, &common::matrix(ty, rows, cols, seed)).expect("packable")
    };
    let mut mats: Vec<(GgmlType, usize, usize, Vec<u8>)> = Vec::new();
    for l in 0..30u64 {
        for (i, (rows, cols)) in [(d, d), (kv, d), (kv, d), (d, d), (ff, d), (ff, d), (d, ff)]
            .into_iter()
            .enumerate()
        {
            mats.push((
                GgmlType::Q4_1,
                rows,
                cols,
                random_packed(GgmlType::Q4_1, rows, cols, 7 * l + i as u64 + 1),
            ));
        }
    }
    mats.push((
        GgmlType::Q8_0,
        vocab,
        d,
        random_packed(GgmlType::Q8_0, vocab, d, 99),
    ));
    // With HUGE=1 every matrix lives in one anonymous mapping advised for transparent huge
    // pages (2 MiB), instead of its own allocation in 4 KiB pages.
    let total: usize = mats.iter().map(|m| m.3.len()).sum();
    let mut region = memmap2::MmapMut::map_anon(total + (2 << 20)).expect("anonymous map");
    let huge = std::env::var("HUGE").is_ok();
    if huge {
        region.advise(memmap2::Advice::HugePage).expect("madvise");
    }
    let base = region.as_ptr() as usize;
    let mut o = (base.next_multiple_of(2 << 20)) - base;
    let mut spans = Vec::new();
    for m in &mats {
        region[o..o + m.3.len()].copy_from_slice(&m.3);
        spans.push((o, m.3.len()));
        o += m.3.len();
    }
    let region = region.make_read_only().expect("read-only");
    let macs: usize = mats.iter().map(|m| m.1 * m.2).sum();
    let bytes: usize = mats.iter().map(|m| m.3.len()).sum();
    println!();
    println!("| model step | threads | batch | ms | GMAC/s | GB/s (weights) |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for &nt in threads {
        let pool = ThreadPool::new(nt);
        // BATCHES=16 (a comma list) measures only those batch sizes, e.g. for a profile.
        let batches: Vec<usize> = std::env::var("BATCHES")
            .ok()
            .map(|v| v.split(',').filter_map(|b| b.parse().ok()).collect())
            .unwrap_or_else(|| vec![1, 16]);
        for &batch in &batches {
            let acts_for = |cols: usize, ty: GgmlType| {
                let x: Vec<f32> = random_bytes(cols * batch, 9)
                    .iter()
                    .map(|&b| b as f32 / 255.0 - 0.5)
                    .collect();
                let mut a = QuantActs::default();
                a.quantize(ActFormat::for_weight(ty), &x, cols);
                a
            };
            let (a_d, a_ff, a_head) = (
                acts_for(d, GgmlType::Q4_1),
                acts_for(ff, GgmlType::Q4_1),
                acts_for(d, GgmlType::Q8_0),
            );
            let mut out = vec![0f32; batch * vocab];
            let step = || {
                for ((ty, rows, cols, packed), &(o, n)) in mats.iter().zip(&spans) {
                    let packed: &[u8] = if huge { &region[o..o + n] } else { packed };
                    // The packed copy stands in for the ggml bytes too (the kernels read only it).
                    let w = QMatrix {
                        ty: *ty,
                        rows: *rows,
                        cols: *cols,
                        data: packed,
                        packed: Some(packed),
                    };
                    let a = if *ty == GgmlType::Q8_0 {
                        &a_head
                    } else if *cols == ff {
                        &a_ff
                    } else {
                        &a_d
                    };
                    matmul(&pool, &w, a, &mut out[..batch * rows]);
                }
            };
            let secs = common::secs_per_call(1.0, step);
            println!(
                "| SmolLM2 shapes | {nt} | {batch} | {:.2} | {:.1} | {:.2} |",
                secs * 1e3,
                (macs * batch) as f64 / secs / 1e9,
                bytes as f64 / secs / 1e9
            );
        }
    }
}
