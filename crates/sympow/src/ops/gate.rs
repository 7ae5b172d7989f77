//! The data-dependent scalar gate (SPEC §5): g = logsigmoid(a) ≤ 0 per head and token, a the
//! gate logit from the fused QKV projection.

use crate::float::Float;

/// Logit bias giving γ = sigmoid(b) ≈ 0.999 at initialisation: ln(0.999/0.001) ≈ 6.9.
pub const GATE_INIT_BIAS: f64 = 6.906_754_778_648_553;

/// g = logsigmoid(a) = −softplus(−a), computed without overflow.
pub fn log_gate_forward<F: Float>(logits: &[F]) -> Vec<F> {
    logits
        .iter()
        .map(|&a| {
            let a = a.f64();
            F::of(if a < -30.0 { a } else { -(-a).exp().ln_1p() })
        })
        .collect()
}

/// ∂L/∂a = ∂L/∂g · sigmoid(−a).
pub fn log_gate_backward<F: Float>(logits: &[F], dg: &[F]) -> Vec<F> {
    logits
        .iter()
        .zip(dg)
        .map(|(&a, &d)| d * F::of(1.0 / (1.0 + a.f64().exp())))
        .collect()
}
