//! ReasoningBank search: exact cosine search (one SIMD dot per entry, top-k selection) against
//! the HNSW index (`sona::hnsw`, M = 16, ef_construction = 100) over 1k, 10k and 100k entries of
//! the model's embedding width (576, SmolLM2), clustered like embeddings of related questions.
//! Reports ms per query (k = 10), the index's build time, and its recall@10 against exact search
//! at two beam widths (queries are new members of the bank's clusters; their 10 nearest are 10
//! of a cluster's 25 near-equally similar members, which makes recall@10 a strict measure). Run: `cargo bench -p ruvllm-sona --bench bank`.

use ruvllm_sona::bank::{normalized, Bank, Trajectory};
use ruvllm_sona::hnsw::Hnsw;
use std::hint::black_box;
use std::time::Instant;

/// `n` unit vectors around `clusters` random centres (from `seed`), noise from `noise_seed`.
fn clustered(n: usize, dim: usize, clusters: usize, seed: u64, noise_seed: u64) -> Vec<f32> {
    let centres = ruvllm_sona::uniform(clusters * dim, seed, 1.0);
    let noise = ruvllm_sona::uniform(n * dim, noise_seed, 0.6);
    (0..n)
        .flat_map(|i| {
            let c = &centres[(i % clusters) * dim..(i % clusters + 1) * dim];
            let v: Vec<f32> = c
                .iter()
                .zip(&noise[i * dim..(i + 1) * dim])
                .map(|(a, b)| a + b)
                .collect();
            normalized(&v).unwrap_or(v)
        })
        .collect()
}

/// Seconds per call of `f`, over about half a second.
fn per_call(mut f: impl FnMut(usize)) -> f64 {
    f(0);
    let t = Instant::now();
    let mut i = 0;
    while t.elapsed().as_secs_f64() < 0.5 {
        f(i);
        i += 1;
    }
    t.elapsed().as_secs_f64() / i as f64
}

fn main() {
    let dim = 576;
    println!("| entries | exact ms/query | HNSW build s | HNSW ms/query ef=64 | recall@10 | HNSW ms/query ef=200 | recall@10 |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for n in [1_000usize, 10_000, 100_000] {
        // Clusters of 25 (cosine ~0.74 within a cluster, ~0 across).
        let clusters = n / 25;
        let vectors = clustered(n, dim, clusters, 7, 8);
        let mut bank = Bank::new(dim);
        for v in vectors.chunks_exact(dim) {
            let t = Trajectory {
                prompt: String::new(),
                answer: String::new(),
                rating: 1.0,
                scope: String::new(),
                adapter: None,
            };
            if bank.add(v, t).is_err() {
                eprintln!("entry refused");
            }
        }
        // Queries: new members of the same clusters.
        let queries: Vec<f32> = clustered(clusters, dim, clusters, 7, 9)
            .chunks_exact(dim)
            .step_by((clusters / 100).max(1))
            .take(100)
            .flatten()
            .copied()
            .collect();
        let queries: Vec<&[f32]> = queries.chunks_exact(dim).collect();
        let exact_s = per_call(|i| {
            black_box(bank.search(queries[i % queries.len()], 10));
        });
        let t = Instant::now();
        let mut h = Hnsw::new(dim, 16, 100, 1);
        for _ in 0..n {
            h.insert(&vectors);
        }
        let build = t.elapsed().as_secs_f64();
        let mut cells = Vec::new();
        for ef in [64, 200] {
            let s = per_call(|i| {
                black_box(h.search(&vectors, queries[i % queries.len()], 10, ef));
            });
            let mut hits = 0;
            for q in &queries {
                let want: Vec<usize> = bank.search(q, 10).into_iter().map(|x| x.0).collect();
                hits += h
                    .search(&vectors, q, 10, ef)
                    .iter()
                    .filter(|g| want.contains(&g.0))
                    .count();
            }
            cells.push(format!(
                "{:.3} | {:.3}",
                s * 1e3,
                hits as f64 / (10 * queries.len()) as f64
            ));
        }
        println!(
            "| {n} | {:.3} | {build:.1} | {} | {} |",
            exact_s * 1e3,
            cells[0],
            cells[1]
        );
    }
}
