//! The multi-head attention kernels at decode shapes (SmolLM2: head size 64, three query heads
//! per KV head, rows of 192 f16 values): scores (`dot_rows_f16_heads`) and the weighted sum
//! (`weighted_sum_f16_heads`) over a 256-position context, called once per run of `m`
//! consecutive rows as the paged cache hands them out (a block of 16, or longer runs), so the
//! per-call cost shows next to the arithmetic. Reported as ns per context position (all three
//! heads) and GMAC/s. Run: `cargo bench -p ruvllm-kernels --bench attention`.

use half::f16;
use ruvllm_kernels::ops;
use std::hint::black_box;

mod common;
use common::random_bytes;

fn main() {
    let (hd, heads, stride, ctx) = (64usize, 3usize, 192usize, 256usize);
    let rows: Vec<f16> = random_bytes(ctx * stride, 3)
        .iter()
        .map(|&b| f16::from_f32(b as f32 / 128.0 - 1.0))
        .collect();
    let q: Vec<f32> = random_bytes(heads * hd, 5)
        .iter()
        .map(|&b| b as f32 / 255.0 - 0.5)
        .collect();
    let w: Vec<f32> = random_bytes(heads * ctx, 7)
        .iter()
        .map(|&b| b as f32 / 255.0 / ctx as f32)
        .collect();
    println!("| kernel | rows per call | ns per position | GMAC/s |");
    println!("| --- | ---: | ---: | ---: |");
    for m in [16usize, 64, 256] {
        let mut out = vec![0f32; heads * ctx];
        let secs = common::secs_per_call(0.3, || {
            for p in (0..ctx).step_by(m) {
                ops::dot_rows_f16_heads(
                    &q,
                    hd,
                    &rows[p * stride..(p + m - 1) * stride + hd],
                    stride,
                    m,
                    &mut out[p..],
                    ctx,
                );
            }
            black_box(&out);
        });
        report("scores", m, secs, ctx, heads * hd);
        let mut acc = vec![0f32; heads * hd];
        let secs = common::secs_per_call(0.3, || {
            acc.iter_mut().for_each(|a| *a = 0.0);
            for p in (0..ctx).step_by(m) {
                ops::weighted_sum_f16_heads(
                    &w[p..],
                    ctx,
                    &rows[p * stride..(p + m - 1) * stride + hd],
                    stride,
                    m,
                    &mut acc,
                    hd,
                );
            }
            black_box(&acc);
        });
        report("weighted sum", m, secs, ctx, heads * hd);
    }
}

fn report(name: &str, m: usize, secs: f64, ctx: usize, macs_per_row: usize) {
    println!(
        "| {name} | {m} | {:.2} | {:.1} |",
        secs * 1e9 / ctx as f64,
        (ctx * macs_per_row) as f64 / secs / 1e9
    );
}
