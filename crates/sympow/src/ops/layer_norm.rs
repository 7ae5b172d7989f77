//! Layer normalisation over the last dimension, with optional learned affine.

use crate::float::Float;
use rayon::prelude::*;

/// What the backward pass needs from the forward (`T` a tensor: `Vec<F>` here, a device
/// buffer on a GPU backend).
#[derive(Clone, Debug)]
pub struct LayerNormSaved<T> {
    /// Per-row mean.
    pub mean: T,
    /// Per-row 1/√(var + eps).
    pub rstd: T,
}

/// Normalisation epsilon.
pub const LN_EPS: f64 = 1e-5;

/// y = (x − μ)/σ · w + b over rows of `c`; `w`, `b` absent for the parameter-free variant.
pub fn layer_norm_forward<F: Float>(
    x: &[F],
    c: usize,
    w: Option<&[F]>,
    b: Option<&[F]>,
) -> (Vec<F>, LayerNormSaved<Vec<F>>) {
    let mut y = vec![F::zero(); x.len()];
    let stats: Vec<(F, F)> = x
        .par_chunks_exact(c)
        .zip(y.par_chunks_exact_mut(c))
        .with_min_len(64)
        .map(|(xr, yr)| {
            let mu = xr.iter().map(|v| v.f64()).sum::<f64>() / c as f64;
            let var = xr.iter().map(|v| (v.f64() - mu).powi(2)).sum::<f64>() / c as f64;
            let (muf, rsf) = (F::of(mu), F::of(1.0 / (var + LN_EPS).sqrt()));
            for j in 0..c {
                let n = (xr[j] - muf) * rsf;
                yr[j] = n * w.map_or(F::one(), |w| w[j]) + b.map_or(F::zero(), |b| b[j]);
            }
            (muf, rsf)
        })
        .collect();
    let (mean, rstd) = stats.into_iter().unzip();
    (y, LayerNormSaved { mean, rstd })
}

/// Returns ∂L/∂x and adds ∂L/∂w, ∂L/∂b into `dw`, `db` when the affine is present.
pub fn layer_norm_backward<F: Float>(
    x: &[F],
    dy: &[F],
    c: usize,
    w: Option<&[F]>,
    saved: &LayerNormSaved<Vec<F>>,
    mut dw: Option<&mut [F]>,
    mut db: Option<&mut [F]>,
) -> Vec<F> {
    let mut dx = vec![F::zero(); x.len()];
    let inv_c = F::one() / F::of(c as f64);
    x.par_chunks_exact(c)
        .zip(dy.par_chunks_exact(c))
        .zip(dx.par_chunks_exact_mut(c))
        .enumerate()
        .with_min_len(64)
        .for_each(|(r, ((xr, dyr), dxr))| {
            let (mu, rs) = (saved.mean[r], saved.rstd[r]);
            let mut sum_g = F::zero();
            let mut sum_gn = F::zero();
            for j in 0..c {
                let g = dyr[j] * w.map_or(F::one(), |w| w[j]);
                sum_g += g;
                sum_gn += g * (xr[j] - mu) * rs;
            }
            for j in 0..c {
                let n = (xr[j] - mu) * rs;
                let g = dyr[j] * w.map_or(F::one(), |w| w[j]);
                dxr[j] = rs * (g - inv_c * sum_g - n * inv_c * sum_gn);
            }
        });
    // parameter gradients: a reduction over rows, kept sequential so results are deterministic
    if dw.is_some() || db.is_some() {
        for (r, (xr, dyr)) in x.chunks_exact(c).zip(dy.chunks_exact(c)).enumerate() {
            let (mu, rs) = (saved.mean[r], saved.rstd[r]);
            for j in 0..c {
                if let Some(dw) = dw.as_deref_mut() {
                    dw[j] += dyr[j] * (xr[j] - mu) * rs;
                }
                if let Some(db) = db.as_deref_mut() {
                    db[j] += dyr[j];
                }
            }
        }
    }
    dx
}
