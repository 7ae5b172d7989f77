//! Worst-case f32 error of each attention form against the float64 reference over 200
//! random seeds (p = 2 and 4, no gating, T = 37): the measurement behind the precision notes
//! in `attention::recurrent` and `attention::chunked`.
//!
//! `cargo run --release -p sympow --example form_errors`

use sympow::attention::reference::reference_attention;
use sympow::attention::{attention_forward, AttentionSpec, Form, Shape};
use sympow::testing::*;
fn main() {
    let shape = Shape {
        batch: 2,
        time: 37,
        heads: 2,
        dk: 8,
        dv: 5,
    };
    for p in [2u32, 4] {
        let spec = AttentionSpec::sympow(p, 8).unwrap();
        let mut worst = [0.0f64; 5];
        for seed in 0..200 {
            let mut r = rng(seed);
            let n = 2 * 37 * 2;
            let q: Vec<f64> = randn(&mut r, n * 8, 1.0);
            let k: Vec<f64> = randn(&mut r, n * 8, 1.0);
            let v: Vec<f64> = randn(&mut r, n * 5, 1.0);
            let want = reference_attention(&spec, &shape, &q, &k, &v, None);
            for (i, f) in [
                Form::Quadratic,
                Form::Recurrent,
                Form::Chunked(2),
                Form::Chunked(5),
                Form::Chunked(37),
            ]
            .iter()
            .enumerate()
            {
                let y = attention_forward(
                    &spec,
                    *f,
                    &shape,
                    &to_f32(&q),
                    &to_f32(&k),
                    &to_f32(&v),
                    None,
                )
                .y;
                worst[i] = worst[i].max(rel_err(&y, &want));
            }
        }
        println!(
            "p={p} worst over 200 seeds: quad {:.2e} rec {:.2e} c2 {:.2e} c5 {:.2e} c37 {:.2e}",
            worst[0], worst[1], worst[2], worst[3], worst[4]
        );
    }
}
