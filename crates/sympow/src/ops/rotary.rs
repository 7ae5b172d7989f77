//! Rotary embeddings: fixed RoPE and data-dependent ("learned") rotary (SPEC §5).
//!
//! Coordinates (2i, 2i+1) of a query or key at time t are rotated by the angle Θ_{t,i}.
//! Fixed: Θ_{t,i} = t·ω_i with ω_i = base^{−2i/d}. Learned: Θ_{t,i} = Σ_{r≤t} θ_{r,i} with
//! data-dependent increments θ_{r,i} = ω_i·softplus(a_r) — one logit per head
//! ([`RotaryParam::PerHead`], the default) or one per frequency ([`RotaryParam::PerFrequency`]).
//! Cumulative angles are summed in f64 and reduced modulo 2π, so they stay exact at any length.

use crate::float::Float;
use rayon::prelude::*;
use std::f64::consts::TAU;

/// How the learned rotary's increments are parameterised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RotaryParam {
    /// θ_{r,i} = ω_i·softplus(a_{r,h}): a learned per-head step size (one logit per head).
    PerHead,
    /// θ_{r,i} = ω_i·softplus(a_{r,h,i}): one logit per head and frequency.
    PerFrequency,
}

impl RotaryParam {
    /// Logits per head and token: 1, or d/2.
    pub fn logits_per_head(self, head_dim: usize) -> usize {
        match self {
            RotaryParam::PerHead => 1,
            RotaryParam::PerFrequency => head_dim / 2,
        }
    }
}

/// The logit bias at which a learned rotary takes exactly the fixed RoPE step:
/// softplus(c) = 1 ⇔ c = ln(e − 1).
pub fn learned_rotary_init_bias() -> f64 {
    (std::f64::consts::E - 1.0).ln()
}

/// ω_i = base^{−2i/d} for i < d/2.
pub fn rope_frequencies(head_dim: usize, base: f64) -> Vec<f64> {
    (0..head_dim / 2)
        .map(|i| base.powf(-2.0 * i as f64 / head_dim as f64))
        .collect()
}

fn softplus(x: f64) -> f64 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Fixed RoPE angles `[batch, time, heads, d/2]` for positions `start..start+time`.
pub fn fixed_rotary_angles<F: Float>(
    batch: usize,
    time: usize,
    heads: usize,
    head_dim: usize,
    base: f64,
    start: usize,
) -> Vec<F> {
    let w = rope_frequencies(head_dim, base);
    let mut out = Vec::with_capacity(batch * time * heads * w.len());
    for _ in 0..batch {
        for t in 0..time {
            for _ in 0..heads {
                out.extend(w.iter().map(|&wi| F::of(((t + start) as f64 * wi) % TAU)));
            }
        }
    }
    out
}

/// Learned rotary angles `[batch, time, heads, d/2]` from logits `[batch, time, heads, R]`
/// (R = [`RotaryParam::logits_per_head`]). `start` holds the cumulative angles before the
/// first token, `[batch, heads, d/2]` (None: zero), for continuing a sequence.
pub fn learned_rotary_angles<F: Float>(
    logits: &[F],
    batch: usize,
    time: usize,
    heads: usize,
    head_dim: usize,
    param: RotaryParam,
    base: f64,
    start: Option<&[F]>,
) -> Vec<F> {
    let w = rope_frequencies(head_dim, base);
    let (half, r) = (w.len(), param.logits_per_head(head_dim));
    assert_eq!(
        logits.len(),
        batch * time * heads * r,
        "rotary logits must be [batch, time, heads, {r}]"
    );
    let mut out = vec![F::zero(); batch * time * heads * half];
    for b in 0..batch {
        for h in 0..heads {
            let mut acc: Vec<f64> = (0..half)
                .map(|i| start.map_or(0.0, |s| s[(b * heads + h) * half + i].f64()))
                .collect();
            for t in 0..time {
                let row = (b * time + t) * heads + h;
                for i in 0..half {
                    let a = logits[row * r + if r == 1 { 0 } else { i }].f64();
                    acc[i] = (acc[i] + w[i] * softplus(a)) % TAU;
                    out[row * half + i] = F::of(acc[i]);
                }
            }
        }
    }
    out
}

/// Backward of [`learned_rotary_angles`]: ∂L/∂logits from ∂L/∂angles.
pub fn learned_rotary_angles_backward<F: Float>(
    logits: &[F],
    dangles: &[F],
    batch: usize,
    time: usize,
    heads: usize,
    head_dim: usize,
    param: RotaryParam,
    base: f64,
) -> Vec<F> {
    let w = rope_frequencies(head_dim, base);
    let (half, r) = (w.len(), param.logits_per_head(head_dim));
    let mut dlogits = vec![F::zero(); logits.len()];
    for b in 0..batch {
        for h in 0..heads {
            // ∂L/∂θ_t = Σ_{t' ≥ t} ∂L/∂Θ_{t'}
            let mut acc = vec![0.0f64; half];
            for t in (0..time).rev() {
                let row = (b * time + t) * heads + h;
                for i in 0..half {
                    acc[i] += dangles[row * half + i].f64();
                    let li = row * r + if r == 1 { 0 } else { i };
                    let a = logits[li].f64();
                    dlogits[li] += F::of(acc[i] * w[i] * sigmoid(a));
                }
            }
        }
    }
    dlogits
}

/// Rotates each pair (2i, 2i+1) of `x` (`[rows, d]`) by `angles` (`[rows, d/2]`).
pub fn rotary_forward<F: Float>(x: &[F], angles: &[F], head_dim: usize) -> Vec<F> {
    let half = head_dim / 2;
    assert!(
        head_dim.is_multiple_of(2),
        "rotary needs an even head dimension, got {head_dim}"
    );
    assert_eq!(
        x.len() / head_dim * half,
        angles.len(),
        "rotary: one angle per pair"
    );
    let mut y = x.to_vec();
    y.par_chunks_exact_mut(head_dim)
        .zip(angles.par_chunks_exact(half))
        .with_min_len(256)
        .for_each(|(row, ang)| {
            for i in 0..half {
                let (s, c) = ang[i].sin_cos();
                let (a, b) = (row[2 * i], row[2 * i + 1]);
                row[2 * i] = a * c - b * s;
                row[2 * i + 1] = a * s + b * c;
            }
        });
    y
}

/// Backward of [`rotary_forward`] given its output `y`: returns (∂L/∂x, ∂L/∂angles).
pub fn rotary_backward<F: Float>(
    dy: &[F],
    y: &[F],
    angles: &[F],
    head_dim: usize,
) -> (Vec<F>, Vec<F>) {
    let half = head_dim / 2;
    let mut dx = dy.to_vec();
    let mut da = vec![F::zero(); angles.len()];
    dx.par_chunks_exact_mut(head_dim)
        .zip(y.par_chunks_exact(head_dim))
        .zip(angles.par_chunks_exact(half))
        .zip(da.par_chunks_exact_mut(half))
        .with_min_len(256)
        .for_each(|(((dxr, yr), ang), dar)| {
            for i in 0..half {
                let (s, c) = ang[i].sin_cos();
                let (ga, gb) = (dxr[2 * i], dxr[2 * i + 1]);
                // x = Rᵀ y; ∂y/∂Θ = (−y_{2i+1}, y_{2i})
                dxr[2 * i] = ga * c + gb * s;
                dxr[2 * i + 1] = -ga * s + gb * c;
                dar[i] = -ga * yr[2 * i + 1] + gb * yr[2 * i];
            }
        });
    (dx, da)
}
