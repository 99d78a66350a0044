//! The ReasoningBank's index: trajectories (a prompt's embedding from the model's own hidden
//! states, the prompt, the answer that was confirmed or corrected, its rating, its scope) found
//! again by cosine similarity over a contiguous `n × dim` matrix of unit vectors: exact search
//! (one SIMD dot product per entry) below [`HNSW_MIN_ENTRIES`], the HNSW graph
//! ([`crate::hnsw`]) from there on. `cargo bench -p ruvllm-sona --bench bank` (576-dim,
//! clustered): exact 0.06 / 0.84 / 20.4 ms per query at 1k / 10k / 100k entries, HNSW (ef 64)
//! 0.08 / 0.24 / 0.58 ms with recall@10 = 1.0 at each size.

use crate::hnsw::Hnsw;
use ruvllm_kernels::ops::dot_f32;

/// Entries from which [`Bank::search`] uses the HNSW graph instead of exact search (where the
/// bench shows it 3.5× faster at equal recall; at 1k entries exact search is faster).
pub const HNSW_MIN_ENTRIES: usize = 10_000;

/// A remembered exchange.
#[derive(Debug, Clone, PartialEq)]
pub struct Trajectory {
    /// The prompt as text.
    pub prompt: String,
    /// The answer that feedback confirmed or supplied.
    pub answer: String,
    /// Feedback: 1 for a correction or a fully positive rating, down to -1.
    pub rating: f32,
    /// Whose feedback it was.
    pub scope: String,
    /// The named adapter the answer was produced with (`None`: the scope's own adapter or the
    /// base model): what routing by nearest successful trajectories picks.
    pub adapter: Option<String>,
}

/// Why an entry was refused.
#[derive(Debug, Clone, PartialEq)]
pub enum BankError {
    /// The embedding's length is not the bank's dimension.
    Dimension {
        /// The bank's.
        expected: usize,
        /// The entry's.
        got: usize,
    },
    /// The embedding has a NaN/infinite value or is all zeros.
    NotFinite,
}

impl std::fmt::Display for BankError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BankError::Dimension { expected, got } => {
                write!(f, "embedding of {got} values, the bank holds {expected}")
            }
            BankError::NotFinite => write!(f, "embedding is zero or not finite"),
        }
    }
}

impl std::error::Error for BankError {}

/// A nearest-neighbour index of trajectories.
#[derive(Debug, Clone)]
pub struct Bank {
    dim: usize,
    /// Unit embeddings: `[len × dim]`.
    vectors: Vec<f32>,
    items: Vec<Trajectory>,
    /// Per entry: a later positive rating of the same prompt replaced its answer (the user's
    /// latest word wins), so retrieval and routing skip it. Derived from the order of `add`
    /// and `rate` calls (a log replayed in order rebuilds it); the entry itself is kept.
    superseded: Vec<bool>,
    /// Kept up to date from the first entry (each insert costs ~0.1 ms at 1k entries, ~0.9 ms
    /// at 100k), searched from `index_from` entries on.
    index: Hnsw,
    index_from: usize,
}

/// Where [`Bank::route`] sends a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// The winning adapter name (`None`: the scope's own adapter / the base model).
    pub adapter: Option<String>,
    /// Its votes: Σ similarity × rating over the neighbours that used it.
    pub weight: f32,
    /// Successful neighbours that voted (for any adapter).
    pub voters: usize,
}

/// `v / |v|`, or None for a zero or non-finite vector.
pub fn normalized(v: &[f32]) -> Option<Vec<f32>> {
    let n = v
        .iter()
        .map(|x| (*x as f64) * (*x as f64))
        .sum::<f64>()
        .sqrt();
    (n.is_finite() && n > 0.0).then(|| v.iter().map(|x| (*x as f64 / n) as f32).collect())
}

/// Generic prompts, questions and openings of text, that nobody taught: a question nearer
/// to one of them than to every question a scope was taught about gets the base model (see
/// [`Gate`]). None of them is a question the tests or benchmarks ask.
pub const GENERIC_PROMPTS: [&str; 24] = [
    "How many days are in a week?",
    "Can you suggest a name for a cat?",
    "Explain what a noun is.",
    "What should I pack for a beach trip?",
    "Summarize the plot of Cinderella.",
    "Write a sentence about the sea.",
    "What is the tallest mountain in the world?",
    "How do airplanes fly?",
    "Tell me a joke.",
    "What are the benefits of drinking water?",
    "Describe a sunset.",
    "Who painted the Mona Lisa?",
    "The weather today is",
    "My favourite food is",
    "The best way to learn a language is",
    "In 1969, the first person to walk on the moon was",
    "The main ingredient of bread is",
    "A good book to read on holiday is",
    "List five colours.",
    "How does a computer work?",
    "What is the population of Japan?",
    "Write a short story about a dog.",
    "Why do leaves fall in autumn?",
    "The largest ocean on Earth is",
];

/// Decides whether a scope's learned adapter applies to a request. The adapter sits on the
/// last layer and acts on every prompt it runs on: one taught correction changed the answers
/// to all 12 unrelated questions of `sona-bench --corrections` and put its words into 3 of
/// them. So the adapter runs only for a question nearer (by the bank's embedding) to one the
/// scope was taught about than to every [`GENERIC_PROMPTS`] entry — a threshold relative to
/// generic text, because a small model's mean-pooled embeddings put unrelated questions at
/// cosine 0.8–0.94 of each other, which no fixed threshold separates from paraphrases
/// (0.88–0.96 of their taught phrasing).
#[derive(Debug, Clone)]
pub struct Gate {
    /// Unit embeddings of the generic prompts, `[n × dim]`.
    generic: Vec<f32>,
    dim: usize,
}

impl Gate {
    /// From the generic prompts' embeddings (any lengths-`dim` vectors; non-finite or zero
    /// ones are skipped).
    pub fn new(dim: usize, generic: &[Vec<f32>]) -> Gate {
        let generic = generic
            .iter()
            .filter(|v| v.len() == dim)
            .filter_map(|v| normalized(v))
            .flatten()
            .collect();
        Gate { generic, dim }
    }

    /// Whether `bank`'s scope adapter applies to a question embedded as `query`: some taught
    /// entry is more similar to it than every generic prompt.
    pub fn opens(&self, bank: &Bank, query: &[f32]) -> bool {
        let Some(q) = bank.unit(query).filter(|q| q.len() == self.dim) else {
            return false;
        };
        let Some(taught) = bank.nearest_taught_unit(&q) else {
            return false;
        };
        let generic = self
            .generic
            .chunks_exact(self.dim.max(1))
            .map(|g| dot_f32(&q, g))
            .fold(f32::NEG_INFINITY, f32::max);
        taught > generic
    }
}

impl Bank {
    /// An empty bank of `dim`-dimensional embeddings.
    pub fn new(dim: usize) -> Bank {
        Self::with_index_from(dim, HNSW_MIN_ENTRIES)
    }

    /// A bank that searches its HNSW graph once it holds `n` entries (tests; tuning).
    pub fn with_index_from(dim: usize, n: usize) -> Bank {
        Bank {
            dim,
            vectors: Vec::new(),
            items: Vec::new(),
            superseded: Vec::new(),
            index: Hnsw::new(dim, 16, 100, 0x5eed),
            index_from: n,
        }
    }

    /// `query` normalized, when it has this bank's length and a finite, non-zero norm (what
    /// every search compares).
    fn unit(&self, query: &[f32]) -> Option<Vec<f32>> {
        (query.len() == self.dim)
            .then(|| normalized(query))
            .flatten()
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the bank is empty.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Entry `i`.
    pub fn get(&self, i: usize) -> Option<&Trajectory> {
        self.items.get(i)
    }

    /// Entry `i`'s unit embedding.
    pub fn vector(&self, i: usize) -> Option<&[f32]> {
        self.vectors.get(i * self.dim..(i + 1) * self.dim)
    }

    /// Adds a trajectory under `embedding` (any length-`dim` vector; it is normalized).
    pub fn add(&mut self, embedding: &[f32], t: Trajectory) -> Result<usize, BankError> {
        if embedding.len() != self.dim {
            return Err(BankError::Dimension {
                expected: self.dim,
                got: embedding.len(),
            });
        }
        let u = normalized(embedding).ok_or(BankError::NotFinite)?;
        self.vectors.extend_from_slice(&u);
        self.index.insert(&self.vectors);
        let positive = t.rating > 0.0;
        self.items.push(t);
        self.superseded.push(false);
        let i = self.items.len() - 1;
        if positive {
            self.supersede_others(i);
        }
        Ok(i)
    }

    /// The largest cosine similarity between `query` and an entry that taught its scope
    /// (rated or corrected: rating ≠ 0, superseded or not), None when there is none. A scan
    /// of those entries only: feedback is rare next to completions.
    pub fn nearest_taught(&self, query: &[f32]) -> Option<f32> {
        self.nearest_taught_unit(&self.unit(query)?)
    }

    /// [`nearest_taught`](Self::nearest_taught) of a unit query of this bank's length.
    fn nearest_taught_unit(&self, q: &[f32]) -> Option<f32> {
        self.items
            .iter()
            .enumerate()
            .filter(|(_, t)| t.rating != 0.0)
            .filter_map(|(i, _)| self.vector(i).map(|v| dot_f32(q, v)))
            .reduce(f32::max)
    }

    /// Whether a later positive rating of the same prompt replaced entry `i`'s answer.
    pub fn is_superseded(&self, i: usize) -> bool {
        self.superseded.get(i).copied().unwrap_or(false)
    }

    /// Entry `i` was just rated positively: it replaces every other positively rated entry
    /// of the same prompt (a second correction of a question is the one to retrieve; an empty
    /// prompt identifies nothing).
    fn supersede_others(&mut self, i: usize) {
        self.superseded[i] = false;
        let prompt = &self.items[i].prompt;
        if prompt.is_empty() {
            return;
        }
        for (j, t) in self.items.iter().enumerate() {
            if j != i && t.rating > 0.0 && t.prompt == *prompt {
                self.superseded[j] = true;
            }
        }
    }

    /// Records feedback on entry `i`: its rating and, for a correction, the answer that
    /// replaces the one given. False when there is no entry `i`.
    pub fn rate(&mut self, i: usize, rating: f32, answer: Option<String>) -> bool {
        let Some(t) = self.items.get_mut(i) else {
            return false;
        };
        t.rating = rating;
        if let Some(a) = answer {
            t.answer = a;
        }
        if rating > 0.0 {
            self.supersede_others(i);
        }
        true
    }

    /// Routing by nearest successful trajectories: among the `k` successful entries (rated
    /// above 0) nearest to `query`, each votes for the adapter their answer came from, weighted by similarity ×
    /// rating; the heaviest adapter wins (ties: the nearest voter's). None when no neighbour
    /// succeeded (the request keeps its default).
    pub fn route(&self, query: &[f32], k: usize) -> Option<Route> {
        let mut votes: Vec<(Option<String>, f32)> = Vec::new();
        let mut voters = 0;
        for (i, sim) in self.search_rated(query, k) {
            let Some(t) = self.items.get(i) else { continue };
            voters += 1;
            match votes.iter_mut().find(|v| v.0 == t.adapter) {
                Some(v) => v.1 += sim * t.rating,
                None => votes.push((t.adapter.clone(), sim * t.rating)),
            }
        }
        // First-seen order is nearest-first, so `max_by` keeping the earlier on ties needs a
        // strict comparison.
        let best = votes
            .into_iter()
            .reduce(|a, b| if b.1 > a.1 { b } else { a })?;
        Some(Route {
            adapter: best.0,
            weight: best.1,
            voters,
        })
    }

    /// The `k` entries most similar to `query` (cosine), best first, as (index, similarity):
    /// exact below the index threshold (ties keep insertion order), from the HNSW graph with a
    /// beam of `max(64, 4k)` above it. A query of the wrong length or zero gives nothing.
    pub fn search(&self, query: &[f32], k: usize) -> Vec<(usize, f32)> {
        let Some(q) = self.unit(query) else {
            return Vec::new();
        };
        if self.len() >= self.index_from {
            return self.index.search(&self.vectors, &q, k, (4 * k).max(64));
        }
        self.exact(&q, k, |_| true)
    }

    /// [`search`](Self::search) among the entries rated above 0 only (confirmed or corrected
    /// answers; unrated and failed trajectories are skipped, and those a later positive rating
    /// of the same prompt superseded): what retrieval and routing use.
    /// From the HNSW graph, the beam widens (×4) until it holds `k` such entries; a bank with
    /// fewer than `k` of them in its graph's reach is searched exactly.
    pub fn search_rated(&self, query: &[f32], k: usize) -> Vec<(usize, f32)> {
        let Some(q) = self.unit(query) else {
            return Vec::new();
        };
        let rated =
            |i: usize| self.items.get(i).is_some_and(|t| t.rating > 0.0) && !self.is_superseded(i);
        if self.len() >= self.index_from {
            let mut ef = (4 * k).max(64);
            while ef < self.len() {
                let found: Vec<(usize, f32)> = self
                    .index
                    .search(&self.vectors, &q, ef, ef)
                    .into_iter()
                    .filter(|(i, _)| rated(*i))
                    .take(k)
                    .collect();
                if found.len() >= k {
                    return found;
                }
                ef *= 4;
            }
        }
        self.exact(&q, k, rated)
    }

    /// Exact cosine search of unit query `q` among the entries `keep` admits.
    fn exact(&self, q: &[f32], k: usize, keep: impl Fn(usize) -> bool) -> Vec<(usize, f32)> {
        let mut scored: Vec<(usize, f32)> = self
            .vectors
            .chunks_exact(self.dim.max(1))
            .map(|v| dot_f32(q, v))
            .enumerate()
            .filter(|(i, _)| keep(*i))
            .collect();
        let order = |a: &(usize, f32), b: &(usize, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        // Select the k best first (linear), then sort only them.
        if k < scored.len() && k > 0 {
            scored.select_nth_unstable_by(k - 1, order);
        }
        scored.truncate(k);
        scored.sort_by(order);
        scored
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gate opens for a question nearer a taught entry than every generic prompt, and
    /// never without a taught entry (unrated trajectories teach nothing).
    #[test]
    fn gate_opens_only_near_taught_questions() {
        let t = |rating: f32| Trajectory {
            prompt: "q".into(),
            answer: "a".into(),
            rating,
            scope: "s".into(),
            adapter: None,
        };
        let mut bank = Bank::new(3);
        let gate = Gate::new(
            3,
            &[vec![0.0, 1.0, 0.0], vec![0.0, 0.0, 2.0], vec![f32::NAN; 3]],
        );
        bank.add(&[1.0, 0.1, 0.0], t(0.0)).unwrap();
        assert!(
            !gate.opens(&bank, &[1.0, 0.0, 0.0]),
            "unrated: nothing taught"
        );
        bank.add(&[1.0, 0.2, 0.0], t(-1.0)).unwrap();
        assert!(bank
            .nearest_taught(&[1.0, 0.2, 0.0])
            .is_some_and(|c| c > 0.999));
        assert!(gate.opens(&bank, &[1.0, 0.3, 0.0]));
        assert!(
            !gate.opens(&bank, &[0.2, 1.0, 0.0]),
            "nearer a generic prompt"
        );
        assert!(!gate.opens(&bank, &[0.1, 0.0, 1.0]));
        assert!(!gate.opens(&bank, &[1.0, 0.0]), "wrong length");
        assert_eq!(bank.nearest_taught(&[0.0; 3]), None);
    }

    fn t(i: usize) -> Trajectory {
        Trajectory {
            prompt: format!("p{i}"),
            answer: format!("a{i}"),
            rating: 1.0,
            scope: "s".into(),
            adapter: None,
        }
    }

    /// Unrated (0) and failed (< 0) trajectories are never retrieved nor vote, exactly or
    /// through the graph (whose beam widens past a crowd of unrated neighbours); rating one
    /// makes it findable.
    #[test]
    fn rated_search_skips_unrated_entries() {
        let dim = 16;
        for index_from in [usize::MAX, 1] {
            let mut bank = Bank::with_index_from(dim, index_from);
            let centre = crate::uniform(dim, 1, 1.0);
            // 300 unrated entries right around the query, 2 rated ones further away.
            for i in 0..300 {
                let v: Vec<f32> = centre
                    .iter()
                    .zip(crate::uniform(dim, 10 + i, 0.05))
                    .map(|(c, n)| c + n)
                    .collect();
                bank.add(
                    &v,
                    Trajectory {
                        rating: 0.0,
                        ..t(i as usize)
                    },
                )
                .unwrap();
            }
            let far: Vec<f32> = centre
                .iter()
                .zip(crate::uniform(dim, 5000, 0.6))
                .map(|(c, n)| c + n)
                .collect();
            let a = bank.add(&far, t(1000)).unwrap();
            let b = bank
                .add(
                    &crate::uniform(dim, 5001, 1.0),
                    Trajectory {
                        rating: -1.0,
                        ..t(1001)
                    },
                )
                .unwrap();
            assert!(
                bank.search(&centre, 5).iter().all(|(i, _)| *i < 300),
                "plain search sees the unrated crowd"
            );
            let got = bank.search_rated(&centre, 5);
            assert_eq!(
                got.iter().map(|x| x.0).collect::<Vec<_>>(),
                vec![a],
                "index_from {index_from}"
            );
            assert_eq!(bank.route(&centre, 8).map(|r| r.voters), Some(1));
            assert!(bank.rate(7, 0.5, Some("fixed".into())) && !bank.rate(99_999, 1.0, None));
            assert_eq!(
                bank.get(7).map(|t| (t.rating, t.answer.as_str())),
                Some((0.5, "fixed"))
            );
            let got: Vec<usize> = bank.search_rated(&centre, 5).iter().map(|x| x.0).collect();
            assert_eq!(
                (got[0], got.len(), got.contains(&b)),
                (7, 2, false),
                "index_from {index_from}"
            );
        }
    }

    #[test]
    fn search_equals_brute_force_in_f64() {
        let dim = 37;
        let mut bank = Bank::new(dim);
        let vecs: Vec<Vec<f32>> = (0..200)
            .map(|i| crate::uniform(dim, 100 + i, 1.0))
            .collect();
        for (i, v) in vecs.iter().enumerate() {
            bank.add(v, t(i)).unwrap();
        }
        for qi in 0..20 {
            let q = crate::uniform(dim, 9000 + qi, 1.0);
            let cos = |a: &[f32], b: &[f32]| {
                let d: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
                let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
                d / (n(a) * n(b))
            };
            let mut want: Vec<(usize, f64)> = vecs
                .iter()
                .enumerate()
                .map(|(i, v)| (i, cos(&q, v)))
                .collect();
            want.sort_by(|a, b| b.1.total_cmp(&a.1));
            let got = bank.search(&q, 5);
            assert_eq!(got.len(), 5);
            for (g, w) in got.iter().zip(&want) {
                assert!((g.1 as f64 - w.1).abs() < 1e-5, "{g:?} vs {w:?}");
            }
            // The top hit is the true nearest unless two are within rounding.
            assert!(got[0].0 == want[0].0 || (want[0].1 - want[1].1).abs() < 1e-5);
        }
    }

    /// Past the threshold the graph answers: on clustered entries its hits equal exact search's.
    #[test]
    fn the_hnsw_graph_answers_past_its_threshold() {
        let dim = 48;
        let centres = crate::uniform(30 * dim, 3, 1.0);
        let point = |i: usize, seed: u64| -> Vec<f32> {
            let noise = crate::uniform(dim, seed, 0.5);
            centres[(i % 30) * dim..(i % 30 + 1) * dim]
                .iter()
                .zip(&noise)
                .map(|(c, n)| c + n)
                .collect()
        };
        let (mut graph, mut exact) = (
            Bank::with_index_from(dim, 100),
            Bank::with_index_from(dim, usize::MAX),
        );
        for i in 0..1500 {
            let v = point(i, 1000 + i as u64);
            graph.add(&v, t(i)).unwrap();
            exact.add(&v, t(i)).unwrap();
        }
        let mut hits = 0;
        for qi in 0..50 {
            let q = point(qi, 90_000 + qi as u64);
            let want: Vec<usize> = exact.search(&q, 5).into_iter().map(|x| x.0).collect();
            let got = graph.search(&q, 5);
            assert_eq!(got.len(), 5);
            assert!(got.windows(2).all(|w| w[0].1 >= w[1].1), "best first");
            hits += got.iter().filter(|g| want.contains(&g.0)).count();
        }
        assert!(hits >= 245, "recall@5 {}/250", hits);
    }

    /// Routing follows the nearest successful trajectories: failed ones do not vote, similarity
    /// and rating weigh, and nothing is decided without a successful neighbour.
    #[test]
    fn routing_follows_the_nearest_successful_trajectories() {
        let mut bank = Bank::new(3);
        let entry = |rating: f32, adapter: Option<&str>| Trajectory {
            prompt: String::new(),
            answer: String::new(),
            rating,
            scope: "s".into(),
            adapter: adapter.map(str::to_owned),
        };
        assert_eq!(bank.route(&[1.0, 0.0, 0.0], 4), None);
        bank.add(&[1.0, 0.05, 0.0], entry(-1.0, Some("bad")))
            .unwrap();
        assert_eq!(
            bank.route(&[1.0, 0.0, 0.0], 4),
            None,
            "a failed trajectory does not vote"
        );
        bank.add(&[1.0, 0.1, 0.0], entry(1.0, Some("law"))).unwrap();
        bank.add(&[1.0, 0.2, 0.0], entry(0.5, Some("law"))).unwrap();
        bank.add(&[0.9, 0.0, 0.3], entry(1.0, None)).unwrap();
        bank.add(&[0.0, 0.0, 1.0], entry(1.0, Some("med"))).unwrap();
        // The 4 nearest successful trajectories vote (the failed one is skipped, not counted).
        let r = bank.route(&[1.0, 0.0, 0.0], 4).unwrap();
        assert_eq!((r.adapter.as_deref(), r.voters), (Some("law"), 4));
        assert_eq!(
            bank.route(&[0.0, 0.1, 1.0], 1).unwrap().adapter.as_deref(),
            Some("med")
        );
        assert_eq!(
            bank.route(&[0.9, 0.0, 0.35], 1).unwrap().adapter,
            None,
            "the scope's own adapter can win"
        );
    }

    #[test]
    fn scale_does_not_matter_and_bad_input_is_refused() {
        let mut bank = Bank::new(3);
        bank.add(&[1.0, 0.0, 0.0], t(0)).unwrap();
        bank.add(&[0.0, 5.0, 0.0], t(1)).unwrap();
        assert_eq!(bank.search(&[0.0, 0.1, 0.0], 1)[0].0, 1);
        assert_eq!(
            bank.search(&[100.0, 1.0, 0.0], 2)
                .iter()
                .map(|x| x.0)
                .collect::<Vec<_>>(),
            vec![0, 1]
        );
        assert_eq!(bank.search(&[1.0, 0.0, 0.0], 10).len(), 2);
        assert!(bank.search(&[0.0, 0.0, 0.0], 1).is_empty());
        assert!(bank.search(&[1.0, 0.0], 1).is_empty());
        assert_eq!(
            bank.add(&[1.0, 2.0], t(2)),
            Err(BankError::Dimension {
                expected: 3,
                got: 2
            })
        );
        assert_eq!(
            bank.add(&[0.0, f32::NAN, 1.0], t(2)),
            Err(BankError::NotFinite)
        );
        assert_eq!(bank.add(&[0.0; 3], t(2)), Err(BankError::NotFinite));
        assert_eq!(bank.len(), 2);
        assert_eq!(bank.get(1).map(|x| x.answer.as_str()), Some("a1"));
    }

    /// Two corrections of the same question: retrieval finds only the latest (exactly and
    /// through the graph); rating the older one again brings it back instead; other prompts
    /// are untouched, and a superseded entry is kept.
    #[test]
    fn the_latest_positive_rating_of_a_prompt_supersedes_the_others() {
        let dim = 8;
        for index_from in [usize::MAX, 1] {
            let mut bank = Bank::with_index_from(dim, index_from);
            let q = crate::uniform(dim, 7, 1.0);
            let same = |answer: &str, rating: f32| Trajectory {
                prompt: "What is the capital of Velmora?".into(),
                answer: answer.into(),
                rating,
                ..t(0)
            };
            let old = bank.add(&q, same("Ostrand", 1.0)).unwrap();
            let other = bank.add(&crate::uniform(dim, 8, 1.0), t(1)).unwrap();
            let unrated = bank.add(&q, same("Velmar City", 0.0)).unwrap();
            let ids = |b: &Bank| -> Vec<usize> {
                let mut v: Vec<usize> = b.search_rated(&q, 5).into_iter().map(|x| x.0).collect();
                v.sort_unstable();
                v
            };
            assert_eq!(ids(&bank), vec![old, other]);
            assert!(bank.rate(unrated, 1.0, Some("Kirravel".into())));
            assert_eq!(ids(&bank), vec![other, unrated]);
            assert!(bank.is_superseded(old) && bank.get(old).is_some());
            assert!(bank.rate(old, 1.0, None));
            assert_eq!(ids(&bank), vec![old, other]);
            // A negative rating supersedes nothing.
            assert!(bank.rate(unrated, -1.0, None));
            assert_eq!(ids(&bank), vec![old, other]);
        }
    }
}
