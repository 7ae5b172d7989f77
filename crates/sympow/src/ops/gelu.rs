//! GELU, tanh approximation (as GPT-2).

use crate::float::Float;

const K: f64 = 0.797_884_560_802_865_4; // √(2/π)

/// y = x/2 · (1 + tanh(√(2/π)(x + 0.044715 x³))).
pub fn gelu_forward<F: Float>(x: &[F]) -> Vec<F> {
    let (k, c, half) = (F::of(K), F::of(0.044715), F::of(0.5));
    x.iter()
        .map(|&x| half * x * (F::one() + (k * (x + c * x * x * x)).tanh()))
        .collect()
}

/// ∂L/∂x given ∂L/∂y.
pub fn gelu_backward<F: Float>(x: &[F], dy: &[F]) -> Vec<F> {
    let (k, c, half) = (F::of(K), F::of(0.044715), F::of(0.5));
    x.iter()
        .zip(dy)
        .map(|(&x, &d)| {
            let u = k * (x + c * x * x * x);
            let th = u.tanh();
            let du = k * (F::one() + F::of(3.0) * c * x * x);
            d * (half * (F::one() + th) + half * x * (F::one() - th * th) * du)
        })
        .collect()
}
