//! Per-kernel throughput: matrix × vector (decode) and matrix × 16 vectors (prefill) for each
//! weight type, on a cache-resident matrix and on one far larger than the caches, reported as
//! weight GB/s and GMAC/s at every SIMD tier the CPU has. Run: `cargo bench -p ruvllm-kernels`.

use ruvllm_kernels::act::{ActFormat, QuantActs};
use ruvllm_kernels::dispatch::{best_tier, dot_fns_for, Tier};
use ruvllm_kernels::GgmlType;
use std::hint::black_box;

mod common;
use common::random_bytes;

fn matrix(ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    common::matrix(ty, rows, cols, 42)
}

fn main() {
    let filter: Option<String> = std::env::args().nth(1).filter(|a| !a.starts_with('-'));
    let tiers: Vec<Tier> = [Tier::Scalar, Tier::Avx2, Tier::Avx512Vnni]
        .into_iter()
        .filter(|&t| t <= best_tier())
        .collect();
    println!("| type | tier | shape | batch | GB/s (weights) | GMAC/s |");
    println!("| --- | --- | --- | ---: | ---: | ---: |");
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::F16,
        GgmlType::F32,
    ] {
        if filter
            .as_deref()
            .is_some_and(|f| !ty.name().eq_ignore_ascii_case(f))
        {
            continue;
        }
        for &(rows, cols) in &[(256usize, 1024usize), (16384, 4096)] {
            let w = matrix(ty, rows, cols);
            let rb = w.len() / rows;
            for &tier in &tiers {
                let (dot, dot4) = dot_fns_for(ty, tier);
                for batch in [1usize, 16] {
                    let x: Vec<f32> = random_bytes(cols * batch, 9)
                        .iter()
                        .map(|&b| b as f32 / 255.0 - 0.5)
                        .collect();
                    let mut acts = QuantActs::default();
                    acts.quantize(ActFormat::for_weight(ty), &x, cols);
                    let run = || {
                        let mut s = 0f32;
                        for r in 0..rows {
                            let wr = &w[r * rb..(r + 1) * rb];
                            if batch == 1 {
                                s += dot(wr, acts.row(0));
                            } else {
                                for t in (0..batch).step_by(4) {
                                    s += dot4(
                                        wr,
                                        [
                                            acts.row(t),
                                            acts.row(t + 1),
                                            acts.row(t + 2),
                                            acts.row(t + 3),
                                        ],
                                    )[0];
                                }
                            }
                        }
                        black_box(s)
                    };
                    let secs = common::secs_per_call(0.3, || {
                        run();
                    });
                    println!(
                        "| {ty} | {tier:?} | {rows}×{cols} | {batch} | {:.2} | {:.2} |",
                        w.len() as f64 / secs / 1e9,
                        (rows * cols * batch) as f64 / secs / 1e9
                    );
                }
            }
        }
    }
}
