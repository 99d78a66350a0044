//! The packed (row-interleaved) int8 kernels through `matmul`, as the forward pass calls them:
//! SmolLM2's shapes (Q4_1 576×576, 1536×576, 576×1536; the Q8_0 LM head 49152×576) at batch
//! sizes 1, 8, 16 and 64, on one thread and on a pool of two, reported as GMAC/s and weight
//! GB/s. Run: `cargo bench -p ruvllm-kernels --bench packed [-- THREADS]`.

use ruvllm_kernels::act::{ActFormat, QuantActs};
use ruvllm_kernels::matmul::{matmul, QMatrix};
use ruvllm_kernels::packed::pack;
use ruvllm_kernels::pool::ThreadPool;
use ruvllm_kernels::GgmlType;
use std::time::Instant;

fn random_bytes(n: usize, mut s: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect()
}

fn main() {
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
        let mut data = random_bytes(rows * cols / 32 * ty.type_size(), 42);
        // Finite f16 scales: clear the exponent's top bits of every byte pair.
        for x in data.iter_mut().skip(1).step_by(2) {
            *x &= 0x3b;
        }
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
            for batch in [1usize, 8, 16, 64] {
                let x: Vec<f32> = random_bytes(cols * batch, 9)
                    .iter()
                    .map(|&b| b as f32 / 255.0 - 0.5)
                    .collect();
                let mut acts = QuantActs::default();
                acts.quantize(ActFormat::for_weight(ty), &x, cols);
                let mut out = vec![0f32; batch * rows];
                matmul(&pool, &w, &acts, &mut out);
                let t = Instant::now();
                let mut iters = 0;
                while t.elapsed().as_secs_f64() < 0.4 {
                    matmul(&pool, &w, &acts, &mut out);
                    iters += 1;
                }
                let secs = t.elapsed().as_secs_f64() / iters as f64;
                println!(
                    "| {ty} | {rows}×{cols} | {nt} | {batch} | {:.1} | {:.2} |",
                    (rows * cols * batch) as f64 / secs / 1e9,
                    data.len() as f64 / secs / 1e9
                );
            }
        }
    }
}
