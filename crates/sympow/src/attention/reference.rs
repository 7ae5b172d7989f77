//! Float64 reference: the defining formula of SPEC §2 evaluated directly, one query at a time.
//!
//! Slow and obviously right; every form and every gradient is tested against it.

use super::{AttentionSpec, Kernel, Shape};

/// y at time `t` for every (batch, head), `[batch, heads, dv]`, computed in f64 from
/// `y_t = Σ_{s≤t} a_ts v_s / (Σ_{s≤t} a_ts + ε)` with
/// a_ts = (σ q_t·k_s)^p · exp(Σ_{s<r≤t} g_r) (power) or exp(σ q_t·k_s) (softmax).
pub fn reference_attention_at(
    spec: &AttentionSpec,
    shape: &Shape,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    log_gates: Option<&[f64]>,
    t: usize,
) -> Vec<f64> {
    let (tt, hs, d, e) = (shape.time, shape.heads, shape.dk, shape.dv);
    let mut out = Vec::with_capacity(shape.batch * hs * e);
    for b in 0..shape.batch {
        for h in 0..hs {
            let row = |x: &[f64], s: usize, dim: usize| -> Vec<f64> {
                let o = ((b * tt + s) * hs + h) * dim;
                x[o..o + dim].to_vec()
            };
            let qt = row(q, t, d);
            let dots: Vec<f64> = (0..=t)
                .map(|s| {
                    spec.scale
                        * row(k, s, d)
                            .iter()
                            .zip(&qt)
                            .map(|(a, b)| a * b)
                            .sum::<f64>()
                })
                .collect();
            let mut weights = vec![0.0; t + 1];
            match spec.kernel {
                Kernel::Power(p) => {
                    // decay from s to t: exp(g_{s+1} + … + g_t), summed backwards from t
                    let mut log_decay = 0.0f64;
                    for s in (0..=t).rev() {
                        weights[s] = dots[s].powi(p as i32) * log_decay.exp();
                        if let Some(g) = log_gates {
                            log_decay += g[(b * tt + s) * hs + h];
                        }
                    }
                }
                Kernel::Softmax => {
                    let mx = dots.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    for s in 0..=t {
                        weights[s] = (dots[s] - mx).exp();
                    }
                }
            }
            let den: f64 = weights.iter().sum::<f64>() + spec.eps;
            for c in 0..e {
                let num: f64 = (0..=t)
                    .map(|s| weights[s] * v[((b * tt + s) * hs + h) * e + c])
                    .sum();
                out.push(num / den);
            }
        }
    }
    out
}

/// y at every time step, `[batch, time, heads, dv]` (O(T²); for small tests).
pub fn reference_attention(
    spec: &AttentionSpec,
    shape: &Shape,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    log_gates: Option<&[f64]>,
) -> Vec<f64> {
    let (b, t, h, e) = (shape.batch, shape.time, shape.heads, shape.dv);
    let per_t: Vec<Vec<f64>> = (0..t)
        .map(|ti| reference_attention_at(spec, shape, q, k, v, log_gates, ti))
        .collect();
    let mut y = vec![0.0; b * t * h * e];
    for (ti, r) in per_t.iter().enumerate() {
        for bi in 0..b {
            for hi in 0..h {
                let o = ((bi * t + ti) * h + hi) * e;
                y[o..o + e].copy_from_slice(&r[(bi * h + hi) * e..(bi * h + hi + 1) * e]);
            }
        }
    }
    y
}
