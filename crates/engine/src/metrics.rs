//! Engine counters, gauges and latency histograms, updated by the engine thread and read by
//! `/metrics` and `ruvllm bench`.

/// A cumulative histogram with fixed upper bounds (Prometheus style).
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    /// Upper bounds of the buckets, ascending (the `+Inf` bucket is implied).
    pub bounds: Vec<f64>,
    /// Observations per bucket (not cumulative); one more entry than `bounds` for `+Inf`.
    pub counts: Vec<u64>,
    /// Sum of observations.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
}

impl Histogram {
    /// An empty histogram over `bounds`.
    pub fn new(bounds: &[f64]) -> Histogram {
        Histogram {
            bounds: bounds.to_vec(),
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    /// Records one observation.
    pub fn observe(&mut self, v: f64) {
        let i = self
            .bounds
            .iter()
            .position(|&b| v <= b)
            .unwrap_or(self.bounds.len());
        self.counts[i] += 1;
        self.sum += v;
        self.count += 1;
    }

    /// Estimated quantile `q` in [0, 1] (upper bound of the bucket holding it; the largest
    /// finite bound for the `+Inf` bucket).
    pub fn quantile(&self, q: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let rank = (q * self.count as f64).ceil().max(1.0) as u64;
        let mut acc = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            acc += c;
            if acc >= rank {
                return self
                    .bounds
                    .get(i)
                    .or(self.bounds.last())
                    .copied()
                    .unwrap_or(0.0);
            }
        }
        self.bounds.last().copied().unwrap_or(0.0)
    }
}

const LATENCY_BOUNDS: [f64; 17] = [
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
    30.0,
];

/// A consistent copy of the engine's metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsSnapshot {
    /// Requests with at least one sequence running.
    pub requests_running: usize,
    /// Requests waiting for admission (or re-admission after preemption).
    pub requests_waiting: usize,
    /// Blocks held by live sequences.
    pub kv_blocks_used: usize,
    /// Free blocks still holding a cached prefix.
    pub kv_blocks_cached: usize,
    /// Blocks in the pool (the hot tier in two-tier mode).
    pub kv_blocks_total: usize,
    /// Two-tier mode: cold blocks held by live sequences.
    pub kv_cold_blocks_used: usize,
    /// Two-tier mode: blocks in the cold tier (0 otherwise).
    pub kv_cold_blocks_total: usize,
    /// Blocks moved to the cold tier.
    pub kv_migrations: u64,
    /// Full prompt blocks looked up in the prefix cache.
    pub prefix_cache_queries: u64,
    /// Of those, blocks found.
    pub prefix_cache_hits: u64,
    /// Prompt tokens of finished and running requests.
    pub prompt_tokens: u64,
    /// Prompt tokens actually computed (prefill and recompute).
    pub computed_prompt_tokens: u64,
    /// Generated tokens.
    pub generation_tokens: u64,
    /// Sequences preempted for lack of blocks.
    pub preemptions: u64,
    /// Requests finished (any reason, cancellations included).
    pub requests_finished: u64,
    /// Forward steps run.
    pub steps: u64,
    /// Seconds from submission to the first token.
    pub time_to_first_token: Histogram,
    /// Seconds between consecutive tokens of one sequence.
    pub inter_token_latency: Histogram,
    /// Seconds from submission to the last event.
    pub e2e_request_latency: Histogram,
}

/// The live metrics (owned by the engine thread under a mutex).
#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    pub(crate) s: MetricsSnapshot,
}

impl Metrics {
    pub(crate) fn new(n_blocks: usize, n_cold: usize) -> Metrics {
        Metrics {
            s: MetricsSnapshot {
                requests_running: 0,
                requests_waiting: 0,
                kv_blocks_used: 0,
                kv_blocks_cached: 0,
                kv_blocks_total: n_blocks,
                kv_cold_blocks_used: 0,
                kv_cold_blocks_total: n_cold,
                kv_migrations: 0,
                prefix_cache_queries: 0,
                prefix_cache_hits: 0,
                prompt_tokens: 0,
                computed_prompt_tokens: 0,
                generation_tokens: 0,
                preemptions: 0,
                requests_finished: 0,
                steps: 0,
                time_to_first_token: Histogram::new(&LATENCY_BOUNDS),
                inter_token_latency: Histogram::new(&LATENCY_BOUNDS),
                e2e_request_latency: Histogram::new(&LATENCY_BOUNDS),
            },
        }
    }
    pub(crate) fn snapshot(&self) -> MetricsSnapshot {
        self.s.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_quantiles() {
        let mut h = Histogram::new(&[0.1, 1.0]);
        for v in [0.05, 0.1, 0.5, 2.0] {
            h.observe(v);
        }
        assert_eq!(h.counts, vec![2, 1, 1]);
        assert_eq!(h.count, 4);
        assert!((h.sum - 2.65).abs() < 1e-12);
        assert_eq!(h.quantile(0.5), 0.1);
        assert_eq!(h.quantile(0.75), 1.0);
        assert_eq!(h.quantile(1.0), 1.0);
    }
}
