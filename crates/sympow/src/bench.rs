//! CPU benchmarks, printed as tables of ratios against a baseline measured in the same run.

use crate::attention::{attention_forward, AttentionSpec, Form, Shape};
use crate::testing::{randn, rng};
use std::time::Instant;

/// One row of the attention benchmark.
#[derive(Clone, Debug)]
pub struct AttentionBenchRow {
    /// Sequence length.
    pub time: usize,
    /// Quadratic-form time per token, microseconds.
    pub quadratic_us: f64,
    /// Chunked-form time per token, microseconds.
    pub chunked_us: f64,
}

fn time_per_token(reps: usize, tokens: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t0 = Instant::now();
        f();
        best = best.min(t0.elapsed().as_secs_f64());
    }
    best * 1e6 / tokens as f64
}

/// Times the forward of the quadratic and chunked forms (p, head dim `d`, chunk `chunk`,
/// gating on) at each sequence length, one sequence of `heads` heads, best of `reps`.
pub fn attention_cpu(
    times: &[usize],
    p: u32,
    d: usize,
    heads: usize,
    chunk: usize,
    reps: usize,
) -> Vec<AttentionBenchRow> {
    let spec = AttentionSpec::sympow(p, d).expect("valid power");
    times
        .iter()
        .map(|&t| {
            let shape = Shape {
                batch: 1,
                time: t,
                heads,
                dk: d,
                dv: d,
            };
            let mut r = rng(t as u64);
            let n = t * heads * d;
            let q: Vec<f32> = randn(&mut r, n, 1.0);
            let k: Vec<f32> = randn(&mut r, n, 1.0);
            let v: Vec<f32> = randn(&mut r, n, 1.0);
            let g: Vec<f32> = crate::testing::log_gates(&mut r, t * heads, 0.95, 0.999);
            let quadratic_us = time_per_token(reps, t, || {
                std::hint::black_box(attention_forward(
                    &spec,
                    Form::Quadratic,
                    &shape,
                    &q,
                    &k,
                    &v,
                    Some(&g),
                ));
            });
            let chunked_us = time_per_token(reps, t, || {
                std::hint::black_box(attention_forward(
                    &spec,
                    Form::Chunked(chunk),
                    &shape,
                    &q,
                    &k,
                    &v,
                    Some(&g),
                ));
            });
            AttentionBenchRow {
                time: t,
                quadratic_us,
                chunked_us,
            }
        })
        .collect()
}

/// Formats [`attention_cpu`] rows as a table; ratios are against the shortest length.
pub fn format_attention_table(rows: &[AttentionBenchRow]) -> String {
    let mut s = String::from(
        "     T | quadratic µs/token (× T0) | chunked µs/token (× T0) | quadratic/chunked\n",
    );
    s.push_str(
        "-------+---------------------------+-------------------------+------------------\n",
    );
    let (q0, c0) = rows
        .first()
        .map_or((1.0, 1.0), |r| (r.quadratic_us, r.chunked_us));
    for r in rows {
        s.push_str(&format!(
            "{:>6} | {:>12.2} ({:>6.2}×)     | {:>12.2} ({:>5.2}×)    | {:>8.2}\n",
            r.time,
            r.quadratic_us,
            r.quadratic_us / q0,
            r.chunked_us,
            r.chunked_us / c0,
            r.quadratic_us / r.chunked_us
        ));
    }
    s
}
