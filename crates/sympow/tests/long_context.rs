//! Long-context numerics: at T = 65,536 chunked sympow attention stays finite and matches the
//! float64 reference at sampled positions, with strong gating and with none, for f32 inputs
//! and for inputs rounded to bf16 (bf16 storage, f32 arithmetic, as mixed-precision training
//! keeps activations).

mod common;
use rand::Rng;
use sympow::attention::reference::reference_attention_at;
use sympow::attention::{attention_forward, AttentionSpec, Form, Shape};
use sympow::testing::{log_gates, randn, rel_err, rng, to_f32};

/// Rounds to the nearest bf16 (8 significant bits), ties to even.
fn bf16(x: f32) -> f32 {
    let b = x.to_bits();
    let round = ((b >> 16) & 1) + 0x7fff;
    f32::from_bits((b.wrapping_add(round)) & 0xffff_0000)
}

/// How far f32 rounding of the q·k products can move row `t`, relative to the row: the weighted
/// mean, over the keys s ≤ t with weights a_ts (the row's own), of the dot products' condition
/// numbers Σ_i |q_ti k_si| / |q_t·k_s|. A row whose weights come from nearly cancelling dot
/// products — t = 0 with q_0 almost orthogonal to k_0, a single term — is ill-conditioned in any
/// f32 arithmetic, not in ours only; every other row averages thousands of terms.
fn row_condition(q: &[f64], k: &[f64], g: Option<&[f64]>, t: usize, d: usize) -> f64 {
    let qt = &q[t * d..(t + 1) * d];
    let (mut num, mut den, mut log_decay) = (0.0, 0.0, 0.0);
    for s in (0..=t).rev() {
        let ks = &k[s * d..(s + 1) * d];
        let dot: f64 = qt.iter().zip(ks).map(|(a, b)| a * b).sum();
        let abs: f64 = qt.iter().zip(ks).map(|(a, b)| (a * b).abs()).sum();
        let a = dot * dot * f64::exp(log_decay);
        if a > 0.0 {
            num += a * abs / dot.abs();
            den += a;
        }
        if let Some(g) = g {
            log_decay += g[s];
        }
    }
    if den > 0.0 {
        num / den
    } else {
        1.0
    }
}

#[test]
fn t65536_is_finite_and_exact_in_f32_and_bf16_inputs() {
    let mut r = rng(common::seed("t65536"));
    let shape = Shape {
        batch: 1,
        time: 65_536,
        heads: 1,
        dk: 16,
        dv: 16,
    };
    let spec = AttentionSpec::sympow(2, 16).unwrap();
    let n = shape.time * 16;
    for gates in [Some((0.45, 0.55)), Some((0.999, 0.99999)), None] {
        let q: Vec<f64> = randn(&mut r, n, 1.0);
        let k: Vec<f64> = randn(&mut r, n, 1.0);
        let v: Vec<f64> = randn(&mut r, n, 1.0);
        let g: Option<Vec<f64>> = gates.map(|(lo, hi)| log_gates(&mut r, shape.time, lo, hi));
        let mut positions: Vec<usize> = (0..12).map(|_| r.gen_range(0..shape.time)).collect();
        positions.extend([0, 1023, 1024, shape.time - 1]);
        for bf in [false, true] {
            let round = |x: &[f64]| -> Vec<f32> {
                to_f32(x)
                    .into_iter()
                    .map(|a| if bf { bf16(a) } else { a })
                    .collect()
            };
            let (q32, k32, v32) = (round(&q), round(&k), round(&v));
            let g32 = g.as_deref().map(to_f32);
            let out = attention_forward(
                &spec,
                Form::Chunked(1024),
                &shape,
                &q32,
                &k32,
                &v32,
                g32.as_deref(),
            );
            assert!(
                out.y.iter().chain(&out.log_norm).all(|x| x.is_finite()),
                "non-finite output, gates {gates:?}, bf16 {bf}"
            );
            // the reference takes the same (rounded) inputs: the error measured is the arithmetic's
            let (q64, k64, v64): (Vec<f64>, Vec<f64>, Vec<f64>) = (
                q32.iter().map(|&x| x as f64).collect(),
                k32.iter().map(|&x| x as f64).collect(),
                v32.iter().map(|&x| x as f64).collect(),
            );
            for &t in &positions {
                let want = reference_attention_at(&spec, &shape, &q64, &k64, &v64, g.as_deref(), t);
                let e = rel_err(&out.y[t * 16..(t + 1) * 16], &want);
                // 1e-4, widened for a row that f32 dot products of length 16 cannot resolve
                let kappa = row_condition(&q64, &k64, g.as_deref(), t, 16);
                let tol = 1e-4 + 16.0 * f64::from(f32::EPSILON) * kappa;
                assert!(
                    e < tol,
                    "gates {gates:?}, bf16 inputs {bf}, t = {t}: rel err {e:.3e} (bound {tol:.1e}, row condition {kappa:.1})"
                );
            }
        }
    }
}
