//! Weighted causal attention between a block of queries and a block of keys, in log space.
//!
//! This is the one implementation of the quadratic form (SPEC §2): the quadratic form runs it
//! over blocks of queries against all earlier keys, and the chunked form runs it inside each
//! chunk as its intra-chunk part. For the power kernel the log-weight of query i and key j is
//!
//!   ℓ_ij = p·ln|σ q_i·k_j| + gq_i − gk_j
//!
//! (gq, gk: cumulative log-gates relative to a common origin), for softmax ℓ_ij = σ q_i·k_j.
//! The forward returns the numerator and denominator scaled by exp(−m_i), m_i the row max, so
//! neither overflows; the backward takes the final per-row log-normaliser and works with the
//! normalised weights A_ij = exp(ℓ_ij − log_norm_i) ≤ 1.

use super::{AttentionSpec, Kernel};
use crate::float::Float;
use crate::ops::linalg::{matmul, Trans};

/// Geometry of one tile: `m` queries (rows `qa..qa+m` of the sequence) against `n` keys (rows
/// `ka..ka+n`); key j is visible to query i iff `ka + j <= qa + i`.
#[derive(Clone, Copy, Debug)]
pub struct Tile {
    /// Number of queries.
    pub m: usize,
    /// Number of keys.
    pub n: usize,
    /// Query/key dimension d.
    pub d: usize,
    /// Value dimension e.
    pub e: usize,
    /// Position of the first query minus the position of the first key.
    pub offset: isize,
}

impl Tile {
    #[inline]
    fn visible(&self, i: usize, j: usize) -> bool {
        (j as isize) <= i as isize + self.offset
    }
}

/// Unnormalised result of a tile: `num_i = Σ_j exp(ℓ_ij − max_i) v_j`, `den_i = Σ_j exp(ℓ_ij − max_i)`.
#[derive(Clone, Debug)]
pub struct TileOut<F> {
    /// `m × e`.
    pub num: Vec<F>,
    /// `m`.
    pub den: Vec<F>,
    /// `m`: the row maxima of ℓ (0 for a row with no visible finite weight).
    pub max: Vec<F>,
}

/// Log-weights ℓ (`m × n`, −∞ where masked) of a tile, from the raw scores q·k.
fn log_weights<F: Float>(
    spec: &AttentionSpec,
    t: &Tile,
    q: &[F],
    k: &[F],
    gq: Option<&[F]>,
    gk: Option<&[F]>,
) -> (Vec<F>, Vec<F>) {
    let mut dots = vec![F::zero(); t.m * t.n];
    matmul(&mut dots, q, Trans::No, k, Trans::Yes, t.m, t.d, t.n, false);
    let scale = F::of(spec.scale);
    let mut ell = vec![F::neg_infinity(); t.m * t.n];
    for i in 0..t.m {
        let g_i = gq.map_or(F::zero(), |g| g[i]);
        for j in 0..t.n {
            if !t.visible(i, j) {
                continue;
            }
            let s = scale * dots[i * t.n + j];
            let base = match spec.kernel {
                Kernel::Power(p) => F::of(p as f64) * s.abs().ln(),
                Kernel::Softmax => s,
            };
            ell[i * t.n + j] = base + g_i - gk.map_or(F::zero(), |g| g[j]);
        }
    }
    (ell, dots)
}

/// Forward of one tile.
pub fn tile_forward<F: Float>(
    spec: &AttentionSpec,
    t: &Tile,
    q: &[F],
    k: &[F],
    v: &[F],
    gq: Option<&[F]>,
    gk: Option<&[F]>,
) -> TileOut<F> {
    let (ell, _) = log_weights(spec, t, q, k, gq, gk);
    let mut w = ell;
    let mut den = vec![F::zero(); t.m];
    let mut max = vec![F::zero(); t.m];
    for i in 0..t.m {
        let row = &mut w[i * t.n..(i + 1) * t.n];
        let mx = row.iter().copied().fold(F::neg_infinity(), F::max);
        let mx = if mx.is_finite() { mx } else { F::zero() };
        let mut s = F::zero();
        for x in row.iter_mut() {
            *x = (*x - mx).exp(); // exp(−∞) = 0 for masked entries
            s += *x;
        }
        den[i] = s;
        max[i] = mx;
    }
    let mut num = vec![F::zero(); t.m * t.e];
    matmul(&mut num, &w, Trans::No, v, Trans::No, t.m, t.n, t.e, false);
    TileOut { num, den, max }
}

/// Gradient buffers a tile backward adds into; `None` skips that gradient.
pub struct TileGrads<'a, F> {
    /// `m × d`.
    pub dq: Option<&'a mut [F]>,
    /// `n × d`.
    pub dk: Option<&'a mut [F]>,
    /// `n × e`.
    pub dv: Option<&'a mut [F]>,
    /// `m`: gradient w.r.t. the queries' cumulative log-gates.
    pub dgq: Option<&'a mut [F]>,
    /// `n`: gradient w.r.t. the keys' cumulative log-gates.
    pub dgk: Option<&'a mut [F]>,
}

/// Backward of one tile, given the final outputs `y` (`m × e`), the final per-row
/// log-normalisers `log_norm` = ln(Σ_all w + ε) and `dy`. Adds into `grads`.
pub fn tile_backward<F: Float>(
    spec: &AttentionSpec,
    t: &Tile,
    q: &[F],
    k: &[F],
    v: &[F],
    gq: Option<&[F]>,
    gk: Option<&[F]>,
    y: &[F],
    log_norm: &[F],
    dy: &[F],
    grads: TileGrads<'_, F>,
) {
    let (m, n, d, e) = (t.m, t.n, t.d, t.e);
    let (ell, dots) = log_weights(spec, t, q, k, gq, gk);
    // A_ij = exp(ℓ_ij − log_norm_i): the normalised weights.
    let mut a = ell;
    for i in 0..m {
        for x in &mut a[i * n..(i + 1) * n] {
            *x = (*x - log_norm[i]).exp();
        }
    }
    if let Some(dv) = grads.dv {
        matmul(dv, &a, Trans::Yes, dy, Trans::No, n, m, e, true);
    }
    // dℓ_ij = A_ij (dy_i·v_j − dy_i·y_i), exactly as in softmax attention.
    let mut dl = vec![F::zero(); m * n];
    matmul(&mut dl, dy, Trans::No, v, Trans::Yes, m, e, n, false);
    for i in 0..m {
        let dyy: F = (0..e).map(|c| dy[i * e + c] * y[i * e + c]).sum();
        for j in 0..n {
            let aij = a[i * n + j];
            dl[i * n + j] = if aij == F::zero() {
                F::zero()
            } else {
                aij * (dl[i * n + j] - dyy)
            };
        }
    }
    if let Some(dgq) = grads.dgq {
        for i in 0..m {
            dgq[i] += dl[i * n..(i + 1) * n].iter().copied().sum();
        }
    }
    if let Some(dgk) = grads.dgk {
        for i in 0..m {
            for j in 0..n {
                dgk[j] -= dl[i * n + j];
            }
        }
    }
    // dℓ/d(q·k): p/(q·k) for the power kernel, σ for softmax.
    let mut ds = dl;
    match spec.kernel {
        Kernel::Power(p) => {
            let pf = F::of(p as f64);
            for (x, &s) in ds.iter_mut().zip(&dots) {
                if *x != F::zero() {
                    *x = *x * pf / s;
                }
            }
        }
        Kernel::Softmax => {
            let sc = F::of(spec.scale);
            ds.iter_mut().for_each(|x| *x *= sc);
        }
    }
    if let Some(dq) = grads.dq {
        matmul(dq, &ds, Trans::No, k, Trans::No, m, n, d, true);
    }
    if let Some(dk) = grads.dk {
        matmul(dk, &ds, Trans::Yes, q, Trans::No, n, m, d, true);
    }
}
