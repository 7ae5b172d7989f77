//! AdamW (decoupled weight decay), with bias correction.

use crate::float::Float;

/// Hyper-parameters of one AdamW step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate for this step.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay (0 for parameters that take none).
    pub weight_decay: f64,
}

/// One step at (1-based) step number `step`: updates `param`, `m`, `v` in place.
pub fn adamw_step<F: Float>(
    cfg: &AdamWConfig,
    step: u64,
    param: &mut [F],
    grad: &[F],
    m: &mut [F],
    v: &mut [F],
) {
    let bc1 = 1.0 - cfg.beta1.powi(step as i32);
    let bc2 = 1.0 - cfg.beta2.powi(step as i32);
    let (b1, b2) = (F::of(cfg.beta1), F::of(cfg.beta2));
    for i in 0..param.len() {
        let g = grad[i];
        m[i] = b1 * m[i] + (F::one() - b1) * g;
        v[i] = b2 * v[i] + (F::one() - b2) * g * g;
        let mhat = m[i].f64() / bc1;
        let vhat = v[i].f64() / bc2;
        let p = param[i].f64();
        param[i] = F::of(p - cfg.lr * (mhat / (vhat.sqrt() + cfg.eps) + cfg.weight_decay * p));
    }
}
