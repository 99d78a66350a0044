//! An approximate nearest-neighbour index for the ReasoningBank: a hierarchical navigable
//! small-world graph (HNSW; Malkov & Yashunin, 2016) over unit vectors, similarity = dot product.
//!
//! Each node gets a top level drawn from a geometric distribution (`P(level ≥ l) = M^-l`, from a
//! seeded generator, so an index is reproducible); on every level up to it, it links to at most
//! `M` neighbours (`2M` on level 0) chosen by the paper's heuristic (a candidate is kept only if
//! it is closer to the new node than to every neighbour kept so far, which keeps links spread
//! over directions and clusters connected). A search descends greedily from the entry point
//! through the upper levels and runs a best-first search with a beam of `ef` on level 0.
//!
//! The index holds links only; vectors stay in the caller's `[n × dim]` matrix, so the bank
//! keeps one copy. Node ids are insertion order (row numbers of that matrix).

use ruvllm_kernels::ops::dot_f32;
use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashSet};

/// A similarity with a total order (for heaps).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Sim(f32, u32);

impl Eq for Sim {}

impl PartialOrd for Sim {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Sim {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0).then(other.1.cmp(&self.1))
    }
}

/// The graph. See the module documentation.
#[derive(Debug, Clone)]
pub struct Hnsw {
    dim: usize,
    /// Links per node on levels ≥ 1 (`2m` on level 0).
    m: usize,
    /// Beam width while inserting.
    ef_construction: usize,
    /// `links[node][level]`: neighbour ids.
    links: Vec<Vec<Vec<u32>>>,
    entry: Option<u32>,
    top: usize,
    rng: u64,
}

impl Hnsw {
    /// An empty index of `dim`-dimensional unit vectors with `m` links per node and level
    /// (16 is typical) and a construction beam of `ef_construction` (100–200); `seed` fixes the
    /// levels drawn.
    pub fn new(dim: usize, m: usize, ef_construction: usize, seed: u64) -> Hnsw {
        Hnsw {
            dim,
            m: m.max(2),
            ef_construction: ef_construction.max(1),
            links: Vec::new(),
            entry: None,
            top: 0,
            rng: seed | 1,
        }
    }

    /// Nodes indexed.
    pub fn len(&self) -> usize {
        self.links.len()
    }

    /// Whether nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    fn vec<'a>(&self, vectors: &'a [f32], id: u32) -> &'a [f32] {
        &vectors[id as usize * self.dim..(id as usize + 1) * self.dim]
    }

    fn sim(&self, vectors: &[f32], q: &[f32], id: u32) -> Sim {
        Sim(dot_f32(q, self.vec(vectors, id)), id)
    }

    fn random_level(&mut self) -> usize {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let u = ((self.rng >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        ((-u.ln()) / (self.m as f64).ln()).floor().min(16.0) as usize
    }

    /// Adds the next row of `vectors` (`[n × dim]`, row `len()` must exist) to the index.
    ///
    /// # Panics
    /// If `vectors` has no row `len()`.
    pub fn insert(&mut self, vectors: &[f32]) {
        let id = self.links.len() as u32;
        assert!(
            (id as usize + 1) * self.dim <= vectors.len(),
            "hnsw: row {id} is not in the matrix"
        );
        let level = self.random_level();
        self.links.push(vec![Vec::new(); level + 1]);
        let Some(mut ep) = self.entry else {
            self.entry = Some(id);
            self.top = level;
            return;
        };
        let q = self.vec(vectors, id);
        for l in (level + 1..=self.top).rev() {
            ep = self.greedy(vectors, q, ep, l);
        }
        let mut eps = vec![ep];
        for l in (0..=level.min(self.top)).rev() {
            let found = self.search_layer(vectors, q, &eps, self.ef_construction, l);
            let max = if l == 0 { 2 * self.m } else { self.m };
            let chosen = self.select(vectors, &found, self.m);
            self.links[id as usize][l] = chosen.iter().map(|s| s.1).collect();
            for s in &chosen {
                let n = s.1 as usize;
                self.links[n][l].push(id);
                if self.links[n][l].len() > max {
                    // Too many links: keep the heuristic's choice among them.
                    let nv = self.vec(vectors, s.1);
                    let cands: Vec<Sim> = self.links[n][l]
                        .iter()
                        .map(|&c| self.sim(vectors, nv, c))
                        .collect();
                    self.links[n][l] = self
                        .select(vectors, &cands, max)
                        .iter()
                        .map(|s| s.1)
                        .collect();
                }
            }
            eps = found.iter().map(|s| s.1).collect();
        }
        if level > self.top {
            self.top = level;
            self.entry = Some(id);
        }
    }

    /// The paper's neighbour heuristic: candidates by decreasing similarity, each kept if it is
    /// more similar to the query than to every one kept; then the best of the rest fill up to `m`.
    fn select(&self, vectors: &[f32], cands: &[Sim], m: usize) -> Vec<Sim> {
        let mut sorted = cands.to_vec();
        sorted.sort_by(|a, b| b.cmp(a));
        let mut kept: Vec<Sim> = Vec::with_capacity(m);
        let mut rest = Vec::new();
        for c in sorted {
            if kept.len() >= m {
                break;
            }
            let cv = self.vec(vectors, c.1);
            if kept
                .iter()
                .all(|k| dot_f32(cv, self.vec(vectors, k.1)) < c.0)
            {
                kept.push(c);
            } else {
                rest.push(c);
            }
        }
        for c in rest {
            if kept.len() >= m {
                break;
            }
            kept.push(c);
        }
        kept
    }

    /// Greedy walk on level `l` towards `q` from `ep`.
    fn greedy(&self, vectors: &[f32], q: &[f32], mut ep: u32, l: usize) -> u32 {
        let mut best = self.sim(vectors, q, ep);
        loop {
            let mut moved = false;
            for &n in self.links[ep as usize]
                .get(l)
                .map_or(&[][..], |v| v.as_slice())
            {
                let s = self.sim(vectors, q, n);
                if s > best {
                    best = s;
                    ep = n;
                    moved = true;
                }
            }
            if !moved {
                return ep;
            }
        }
    }

    /// Best-first search on level `l` with a beam of `ef`; the found nodes, any order.
    fn search_layer(
        &self,
        vectors: &[f32],
        q: &[f32],
        eps: &[u32],
        ef: usize,
        l: usize,
    ) -> Vec<Sim> {
        let mut visited: HashSet<u32> = eps.iter().copied().collect();
        let mut cands: BinaryHeap<Sim> = BinaryHeap::new();
        let mut found: BinaryHeap<Reverse<Sim>> = BinaryHeap::new();
        for &e in eps {
            let s = self.sim(vectors, q, e);
            cands.push(s);
            found.push(Reverse(s));
            if found.len() > ef {
                found.pop();
            }
        }
        while let Some(c) = cands.pop() {
            if found.len() >= ef && found.peek().is_some_and(|w| c < w.0) {
                break;
            }
            for &n in self.links[c.1 as usize]
                .get(l)
                .map_or(&[][..], |v| v.as_slice())
            {
                if !visited.insert(n) {
                    continue;
                }
                let s = self.sim(vectors, q, n);
                if found.len() < ef || found.peek().is_some_and(|w| s > w.0) {
                    cands.push(s);
                    found.push(Reverse(s));
                    if found.len() > ef {
                        found.pop();
                    }
                }
            }
        }
        found.into_iter().map(|r| r.0).collect()
    }

    /// The `k` nodes most similar to the unit vector `q` that a beam of `ef` (≥ k) finds, best
    /// first, as (id, similarity). Approximate: see the recall test and the bench.
    pub fn search(&self, vectors: &[f32], q: &[f32], k: usize, ef: usize) -> Vec<(usize, f32)> {
        let Some(mut ep) = self.entry else {
            return Vec::new();
        };
        if q.len() != self.dim || k == 0 {
            return Vec::new();
        }
        for l in (1..=self.top).rev() {
            ep = self.greedy(vectors, q, ep, l);
        }
        let mut found = self.search_layer(vectors, q, &[ep], ef.max(k), 0);
        found.sort_by(|a, b| b.cmp(a));
        found.truncate(k);
        found.into_iter().map(|s| (s.1 as usize, s.0)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bank::normalized;

    /// `n` unit vectors around `clusters` random centres from `seed` (what embeddings of related
    /// questions look like), noise from `noise_seed`.
    fn clustered(n: usize, dim: usize, clusters: usize, seed: u64, noise_seed: u64) -> Vec<f32> {
        let centres = crate::uniform(clusters * dim, seed, 1.0);
        let noise = crate::uniform(n * dim, noise_seed, 0.6);
        let mut out = Vec::with_capacity(n * dim);
        for i in 0..n {
            let c = &centres[(i % clusters) * dim..(i % clusters + 1) * dim];
            let v: Vec<f32> = c
                .iter()
                .zip(&noise[i * dim..(i + 1) * dim])
                .map(|(a, b)| a + b)
                .collect();
            out.extend(normalized(&v).unwrap_or(v));
        }
        out
    }

    fn exact(vectors: &[f32], dim: usize, q: &[f32], k: usize) -> Vec<usize> {
        let mut s: Vec<(usize, f32)> = vectors
            .chunks_exact(dim)
            .map(|v| dot_f32(q, v))
            .enumerate()
            .collect();
        s.sort_by(|a, b| b.1.total_cmp(&a.1));
        s.into_iter().take(k).map(|x| x.0).collect()
    }

    /// Recall@10 ≥ 0.95 against exact search on clustered and on uniform data, every level's links
    /// within bounds, and the same index from the same seed.
    #[test]
    fn recall_against_exact_search_and_bounded_links() {
        let dim = 64;
        // Uniform random directions are the hard case (all neighbours nearly equally far): a
        // wider beam.
        for (name, ef, vectors) in [
            ("clustered", 64, clustered(3000, dim, 40, 5, 6)),
            ("uniform", 160, {
                let v = crate::uniform(3000 * dim, 9, 1.0);
                v.chunks_exact(dim)
                    .flat_map(|r| normalized(r).unwrap_or_default())
                    .collect::<Vec<f32>>()
            }),
        ] {
            let mut h = Hnsw::new(dim, 16, 100, 42);
            for _ in 0..vectors.len() / dim {
                h.insert(&vectors);
            }
            assert_eq!(h.len(), 3000);
            for node in &h.links {
                for (l, links) in node.iter().enumerate() {
                    assert!(links.len() <= if l == 0 { 32 } else { 16 });
                }
            }
            // New members of the same clusters.
            let queries = clustered(100, dim, 40, 5, 77);
            let mut hits = 0;
            for q in queries.chunks_exact(dim) {
                let want = exact(&vectors, dim, q, 10);
                let got: Vec<usize> = h
                    .search(&vectors, q, 10, ef)
                    .into_iter()
                    .map(|x| x.0)
                    .collect();
                hits += got.iter().filter(|g| want.contains(g)).count();
            }
            let recall = hits as f64 / 1000.0;
            assert!(recall >= 0.95, "{name}: recall@10 {recall}");
            // Reproducible.
            let mut h2 = Hnsw::new(dim, 16, 100, 42);
            for _ in 0..vectors.len() / dim {
                h2.insert(&vectors);
            }
            assert_eq!(h.links, h2.links);
        }
        assert!(Hnsw::new(4, 16, 100, 1)
            .search(&[], &[1.0, 0.0, 0.0, 0.0], 3, 10)
            .is_empty());
    }
}
