//! GELU, tanh approximation (as GPT-2).

use crate::float::Float;
use rayon::prelude::*;

const MIN_LEN: usize = 1 << 14;

/// tanh(u) = 1 − 2/(1 + e^{2u}): one `exp` instead of libm's slower `tanh`; its absolute
/// error (~1e-7 in f32) is negligible where GELU uses it, added to 1. Saturates correctly.
#[inline(always)]
fn tanh<F: Float>(u: F) -> F {
    F::one() - F::of(2.0) / (F::one() + (u + u).exp())
}

const K: f64 = 0.797_884_560_802_865_4; // √(2/π)

/// y = x/2 · (1 + tanh(√(2/π)(x + 0.044715 x³))).
pub fn gelu_forward<F: Float>(x: &[F]) -> Vec<F> {
    let (k, c, half) = (F::of(K), F::of(0.044715), F::of(0.5));
    x.iter()
        .map(|&x| half * x * (F::one() + tanh(k * (x + c * x * x * x))))
        .collect()
}

/// ∂L/∂x given ∂L/∂y.
pub fn gelu_backward<F: Float>(x: &[F], dy: &[F]) -> Vec<F> {
    let (k, c, half) = (F::of(K), F::of(0.044715), F::of(0.5));
    x.par_iter()
        .zip(dy)
        .with_min_len(MIN_LEN)
        .map(|(&x, &d)| {
            let u = k * (x + c * x * x * x);
            let th = tanh(u);
            let du = k * (F::one() + F::of(3.0) * c * x * x);
            d * (half * (F::one() + th) + half * x * (F::one() - th * th) * du)
        })
        .collect()
}
