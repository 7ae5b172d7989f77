//! AdamW (decoupled weight decay), with bias correction.

use crate::float::Float;
use rayon::prelude::*;

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

/// One parameter tensor's part in an AdamW step ([`Backend::adamw_step`](crate::backend::Backend::adamw_step)).
pub struct AdamWParam<'a, T> {
    /// Its hyper-parameters (the weight decay differs between matrices and vectors).
    pub cfg: AdamWConfig,
    /// The parameter, updated in place.
    pub param: &'a mut T,
    /// Its gradient.
    pub grad: &'a T,
    /// First moment, updated in place.
    pub m: &'a mut T,
    /// Second moment, updated in place.
    pub v: &'a mut T,
}

impl<'a, T> AdamWParam<'a, T> {
    /// The list for one [`Backend::adamw_step`](crate::backend::Backend::adamw_step) from
    /// parameters, gradients and moments given side by side (in the same order), `cfg(i)` the
    /// hyper-parameters of the i-th tensor.
    pub fn zip(
        params: impl IntoIterator<Item = &'a mut T>,
        grads: impl IntoIterator<Item = &'a T>,
        m: impl IntoIterator<Item = &'a mut T>,
        v: impl IntoIterator<Item = &'a mut T>,
        mut cfg: impl FnMut(usize) -> AdamWConfig,
    ) -> Vec<Self> {
        params
            .into_iter()
            .zip(grads)
            .zip(m.into_iter().zip(v))
            .enumerate()
            .map(|(i, ((param, grad), (m, v)))| AdamWParam {
                cfg: cfg(i),
                param,
                grad,
                m,
                v,
            })
            .collect()
    }
}

/// One step at (1-based) step number `step`: updates `param`, `m`, `v` in place, the gradient
/// multiplied by `grad_scale` first (global-norm clipping; 1 leaves it as it is).
pub fn adamw_step<F: Float>(
    cfg: &AdamWConfig,
    step: u64,
    grad_scale: f64,
    param: &mut [F],
    grad: &[F],
    m: &mut [F],
    v: &mut [F],
) {
    let bc1 = 1.0 - cfg.beta1.powi(step as i32);
    let bc2 = 1.0 - cfg.beta2.powi(step as i32);
    let (b1, b2, gs) = (F::of(cfg.beta1), F::of(cfg.beta2), F::of(grad_scale));
    param
        .par_iter_mut()
        .zip(grad)
        .zip(m.par_iter_mut().zip(v.par_iter_mut()))
        .with_min_len(1 << 14)
        .for_each(|((p, &g), (m, v))| {
            let g = if grad_scale == 1.0 { g } else { g * gs };
            *m = b1 * *m + (F::one() - b1) * g;
            *v = b2 * *v + (F::one() - b2) * g * g;
            let mhat = m.f64() / bc1;
            let vhat = v.f64() / bc2;
            let x = p.f64();
            *p = F::of(x - cfg.lr * (mhat / (vhat.sqrt() + cfg.eps) + cfg.weight_decay * x));
        });
}
