//! ReasoningBank search latency: exact cosine search (one SIMD dot per entry, top-k selection)
//! over 1k, 10k and 100k entries of the model's embedding width (576, SmolLM2), one query at a
//! time, as milliseconds per query and GB/s of vectors read. Decides whether an approximate
//! index (HNSW) would pay off. Run: `cargo bench -p ruvllm-sona --bench bank`.

use ruvllm_sona::bank::{Bank, Trajectory};
use std::hint::black_box;
use std::time::Instant;

fn main() {
    let dim = 576;
    println!("| entries | ms per query (k = 4) | GB/s |");
    println!("| ---: | ---: | ---: |");
    for n in [1_000usize, 10_000, 100_000] {
        let mut bank = Bank::new(dim);
        let vecs = ruvllm_sona::uniform(n * dim, 7, 1.0);
        for (i, v) in vecs.chunks_exact(dim).enumerate() {
            let t = Trajectory { prompt: String::new(), answer: String::new(), rating: 1.0, scope: String::new() };
            if bank.add(v, t).is_err() {
                eprintln!("entry {i} refused");
            }
        }
        let queries: Vec<Vec<f32>> = (0..16).map(|i| ruvllm_sona::uniform(dim, 1000 + i, 1.0)).collect();
        let _ = black_box(bank.search(&queries[0], 4));
        let t = Instant::now();
        let mut q = 0;
        while t.elapsed().as_secs_f64() < 1.0 {
            black_box(bank.search(&queries[q % queries.len()], 4));
            q += 1;
        }
        let secs = t.elapsed().as_secs_f64() / q as f64;
        println!("| {n} | {:.3} | {:.1} |", secs * 1e3, (n * dim * 4) as f64 / secs / 1e9);
    }
}
