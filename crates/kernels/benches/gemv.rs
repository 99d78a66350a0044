//! GEMV throughput against the machine's read bandwidth, both measured in this run:
//! `y = A·x` for 4096×4096 f32, f16 and mixed (f16 A, f32 x) at 1 and 2 threads, plus a batched
//! f16 case, each reported as GB/s of matrix read and as a share of a plain parallel read
//! (sum of a 256 MiB buffer with the same pool). Run: `cargo bench -p ruvllm-kernels --bench gemv`.

use half::f16;
use ruvllm_kernels::gemv::{gemv, gemv_batched, Gemv};
use ruvllm_kernels::pool::ThreadPool;
use std::hint::black_box;

mod common;

/// Seconds per call of `f` over half a second.
fn time(f: impl FnMut()) -> f64 {
    common::secs_per_call(0.5, f)
}

fn read_bandwidth(pool: &ThreadPool) -> f64 {
    let buf: Vec<u64> = (0..(256usize << 20) / 8).map(|i| i as u64).collect();
    let chunk = buf.len() / 64;
    let secs = time(|| {
        let sums: Vec<std::sync::atomic::AtomicU64> = (0..64).map(|_| Default::default()).collect();
        pool.run(64, &|t| {
            let s: u64 = buf[t * chunk..(t + 1) * chunk]
                .iter()
                .fold(0u64, |a, &b| a.wrapping_add(b));
            sums[t].store(s, std::sync::atomic::Ordering::Relaxed);
        });
        black_box(&sums);
    });
    (buf.len() * 8) as f64 / secs / 1e9
}

/// Copies of each matrix, cycled through so every call reads from memory, not the last-level
/// cache (this machine's L3 holds a whole 64 MiB matrix).
const COPIES: usize = 8;

fn main() {
    let (m, n) = (4096usize, 4096usize);
    let a32s: Vec<Vec<f32>> = (0..COPIES)
        .map(|c| {
            (0..m * n)
                .map(|i| ((i * 7919 + c) % 1000) as f32 / 1000.0 - 0.5)
                .collect()
        })
        .collect();
    let a16s: Vec<Vec<f16>> = a32s
        .iter()
        .map(|a| a.iter().map(|&v| f16::from_f32(v)).collect())
        .collect();
    let x32: Vec<f32> = (0..n).map(|i| (i % 17) as f32 / 17.0).collect();
    let x16: Vec<f16> = x32.iter().map(|&v| f16::from_f32(v)).collect();
    let g = Gemv {
        m,
        n,
        lda: n,
        alpha: 1.0,
        beta: 0.0,
    };
    println!("| threads | read GB/s | kernel | GB/s | % of read |");
    println!("| ---: | ---: | --- | ---: | ---: |");
    for threads in [1usize, 2] {
        let pool = ThreadPool::new(threads);
        let bw = read_bandwidth(&pool);
        let mut y32 = vec![0f32; m];
        let mut y16 = vec![f16::ZERO; m];
        let mut c = 0;
        let mut next = || {
            c = (c + 1) % COPIES;
            c
        };
        let cases: [(&str, f64, f64); 3] = [
            (
                "f32 4096×4096",
                (m * n * 4) as f64,
                time(|| gemv(&pool, g, &a32s[next()], &x32, &mut y32)),
            ),
            (
                "f16 4096×4096",
                (m * n * 2) as f64,
                time(|| gemv(&pool, g, &a16s[next()], &x16, &mut y16)),
            ),
            (
                "mixed f16·f32 4096×4096",
                (m * n * 2) as f64,
                time(|| gemv(&pool, g, &a16s[next()], &x32, &mut y32)),
            ),
        ];
        for (name, bytes, secs) in cases {
            let gbs = bytes / secs / 1e9;
            println!(
                "| {threads} | {bw:.1} | {name} | {gbs:.1} | {:.0}% |",
                100.0 * gbs / bw
            );
        }
        // Batched: 16 independent 1024×1024 f16 GEMVs (32 MiB in all).
        let bg = Gemv {
            m: 1024,
            n: 1024,
            lda: 1024,
            alpha: 1.0,
            beta: 0.0,
        };
        let xb: Vec<f32> = (0..16 * 1024).map(|i| (i % 13) as f32).collect();
        let mut yb = vec![0f32; 16 * 1024];
        let secs = time(|| {
            gemv_batched(
                &pool,
                bg,
                16,
                &a16s[next()],
                1024 * 1024,
                &xb,
                1024,
                &mut yb,
                1024,
            )
        });
        let gbs = (16 * 1024 * 1024 * 2) as f64 / secs / 1e9;
        println!(
            "| {threads} | {bw:.1} | batched 16× f16 1024×1024 | {gbs:.1} | {:.0}% |",
            100.0 * gbs / bw
        );
    }
}
