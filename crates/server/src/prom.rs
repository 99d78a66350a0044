//! Prometheus text exposition (format 0.0.4) of the engine's metrics.

use ruvllm_engine::{Histogram, MetricsSnapshot};
use std::fmt::Write;

fn scalar(out: &mut String, name: &str, kind: &str, help: &str, v: f64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
    );
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    let mut acc = 0;
    for (b, c) in h.bounds.iter().zip(&h.counts) {
        acc += c;
        let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {acc}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", h.sum, h.count);
}

/// The `/metrics` body.
pub(crate) fn render(m: &MetricsSnapshot) -> String {
    let mut o = String::new();
    scalar(
        &mut o,
        "ruvllm:requests_running",
        "gauge",
        "Requests with a sequence in the running batch.",
        m.requests_running as f64,
    );
    scalar(
        &mut o,
        "ruvllm:requests_waiting",
        "gauge",
        "Requests waiting for admission.",
        m.requests_waiting as f64,
    );
    scalar(
        &mut o,
        "ruvllm:kv_blocks_used",
        "gauge",
        "KV blocks held by live sequences.",
        m.kv_blocks_used as f64,
    );
    scalar(
        &mut o,
        "ruvllm:kv_blocks_cached",
        "gauge",
        "Free KV blocks still holding a cached prefix.",
        m.kv_blocks_cached as f64,
    );
    scalar(
        &mut o,
        "ruvllm:kv_blocks_total",
        "gauge",
        "KV blocks in the pool.",
        m.kv_blocks_total as f64,
    );
    scalar(
        &mut o,
        "ruvllm:kv_cold_blocks_used",
        "gauge",
        "Two-tier KV: cold (quantized) blocks held by live sequences.",
        m.kv_cold_blocks_used as f64,
    );
    scalar(
        &mut o,
        "ruvllm:kv_cold_blocks_total",
        "gauge",
        "Two-tier KV: blocks in the cold tier (0 when off).",
        m.kv_cold_blocks_total as f64,
    );
    scalar(
        &mut o,
        "ruvllm:kv_migrations_total",
        "counter",
        "Blocks moved from the f16 tier to the cold tier.",
        m.kv_migrations as f64,
    );
    scalar(
        &mut o,
        "ruvllm:prefix_cache_queries_total",
        "counter",
        "Prompt blocks looked up in the prefix cache.",
        m.prefix_cache_queries as f64,
    );
    scalar(
        &mut o,
        "ruvllm:prefix_cache_hits_total",
        "counter",
        "Prompt blocks found in the prefix cache.",
        m.prefix_cache_hits as f64,
    );
    scalar(
        &mut o,
        "ruvllm:prompt_tokens_total",
        "counter",
        "Prompt tokens received.",
        m.prompt_tokens as f64,
    );
    scalar(
        &mut o,
        "ruvllm:prompt_tokens_computed_total",
        "counter",
        "Prompt tokens computed (not served from the prefix cache).",
        m.computed_prompt_tokens as f64,
    );
    scalar(
        &mut o,
        "ruvllm:generation_tokens_total",
        "counter",
        "Tokens generated.",
        m.generation_tokens as f64,
    );
    scalar(
        &mut o,
        "ruvllm:preemptions_total",
        "counter",
        "Sequences preempted for lack of KV blocks.",
        m.preemptions as f64,
    );
    scalar(
        &mut o,
        "ruvllm:requests_finished_total",
        "counter",
        "Requests finished, failed or cancelled.",
        m.requests_finished as f64,
    );
    histogram(
        &mut o,
        "ruvllm:time_to_first_token_seconds",
        "Seconds from submission to the first token.",
        &m.time_to_first_token,
    );
    histogram(
        &mut o,
        "ruvllm:inter_token_latency_seconds",
        "Seconds between consecutive tokens of a sequence.",
        &m.inter_token_latency,
    );
    histogram(
        &mut o,
        "ruvllm:e2e_request_latency_seconds",
        "Seconds from submission to the end of a request.",
        &m.e2e_request_latency,
    );
    o
}
