//! The symmetric power embedding φ_p (SPEC §1).
//!
//! x^{⊗p} has d^p coordinates but only C(d+p−1, p) distinct ones, one per multiset of indices
//! i_1 ≤ … ≤ i_p. φ_p keeps one coordinate per multiset, scaled by √(p!/∏ m_j!) so that
//! φ_p(x)·φ_p(y) = (x·y)^p exactly.

use crate::float::Float;

/// `C(d+p−1, p)`: the dimension of the symmetric power embedding of `R^d`.
///
/// ```
/// assert_eq!(sympow::attention::phi::sympow_dim(64, 2), 2080);
/// assert_eq!(sympow::attention::phi::sympow_dim(64, 4), 766_480);
/// assert_eq!(sympow::attention::phi::sympow_dim(16, 4), 3876);
/// ```
pub fn sympow_dim(d: usize, p: u32) -> usize {
    let mut num: u128 = 1;
    for i in 0..p as u128 {
        num = num * (d as u128 + i) / (i + 1); // exact: a product of i+1 consecutive integers
    }
    num as usize
}

/// The index table of φ_p for one (d, p): for each of the D output coordinates, its `p`
/// input indices (non-decreasing) and its multinomial scale.
#[derive(Clone, Debug)]
pub struct SymPow {
    /// Input dimension d.
    pub d: usize,
    /// Power p.
    pub p: u32,
    /// Output dimension D = C(d+p−1, p).
    pub dim: usize,
    idx: Vec<u16>,
    scale: Vec<f64>,
}

impl SymPow {
    /// Builds the table. Panics if `d` does not fit the index type or `p == 0`.
    pub fn new(d: usize, p: u32) -> Self {
        assert!(p >= 1, "symmetric power p must be at least 1");
        assert!(
            d >= 1 && d <= u16::MAX as usize,
            "head dimension {d} out of range"
        );
        let dim = sympow_dim(d, p);
        let pu = p as usize;
        let mut idx = Vec::with_capacity(dim * pu);
        let mut scale = Vec::with_capacity(dim);
        let p_fact: f64 = (1..=pu).map(|i| i as f64).product();
        let mut cur = vec![0usize; pu];
        loop {
            // multiplicities of the current non-decreasing index tuple
            let mut denom = 1.0;
            let mut run = 1usize;
            for j in 1..=pu {
                if j < pu && cur[j] == cur[j - 1] {
                    run += 1;
                } else {
                    denom *= (1..=run).map(|i| i as f64).product::<f64>();
                    run = 1;
                }
            }
            idx.extend(cur.iter().map(|&i| i as u16));
            scale.push((p_fact / denom).sqrt());
            // next non-decreasing tuple: bump the last position that can grow, reset the rest
            let Some(j) = (0..pu).rev().find(|&j| cur[j] + 1 < d) else {
                break;
            };
            let v = cur[j] + 1;
            cur[j..].fill(v);
        }
        debug_assert_eq!(scale.len(), dim);
        SymPow {
            d,
            p,
            dim,
            idx,
            scale,
        }
    }

    /// The input indices of every output coordinate, `p` per coordinate (`D × p`, row-major).
    pub fn indices(&self) -> &[u16] {
        &self.idx
    }

    /// The multinomial scale √(p!/∏ m_j!) of every output coordinate (`D`).
    pub fn scales(&self) -> &[f64] {
        &self.scale
    }

    /// φ_p of each row of `x` (`rows × d`) into `out` (`rows × D`).
    pub fn forward<F: Float>(&self, x: &[F], out: &mut [F]) {
        let (d, dim, pu) = (self.d, self.dim, self.p as usize);
        let rows = x.len() / d;
        assert_eq!(x.len(), rows * d);
        assert_eq!(out.len(), rows * dim);
        let scale: Vec<F> = self.scale.iter().map(|&s| F::of(s)).collect();
        for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(dim)) {
            for (f, o) in or.iter_mut().enumerate() {
                let ix = &self.idx[f * pu..(f + 1) * pu];
                let mut v = scale[f];
                for &i in ix {
                    v *= xr[i as usize];
                }
                *o = v;
            }
        }
    }

    /// Backward of [`forward`](Self::forward): adds ∂L/∂x to `dx` given `dout` = ∂L/∂φ(x).
    pub fn backward<F: Float>(&self, x: &[F], dout: &[F], dx: &mut [F]) {
        let (d, dim, pu) = (self.d, self.dim, self.p as usize);
        let rows = x.len() / d;
        assert_eq!(dout.len(), rows * dim);
        assert_eq!(dx.len(), rows * d);
        let scale: Vec<F> = self.scale.iter().map(|&s| F::of(s)).collect();
        let mut prefix = vec![F::one(); pu + 1];
        for ((xr, gr), dxr) in x
            .chunks_exact(d)
            .zip(dout.chunks_exact(dim))
            .zip(dx.chunks_exact_mut(d))
        {
            for f in 0..dim {
                let g = gr[f] * scale[f];
                if g == F::zero() {
                    continue;
                }
                let ix = &self.idx[f * pu..(f + 1) * pu];
                // ∂/∂x_{i_j} of ∏ x_{i_l} is the product of the other factors: prefix · suffix
                for j in 0..pu {
                    prefix[j + 1] = prefix[j] * xr[ix[j] as usize];
                }
                let mut suffix = F::one();
                for j in (0..pu).rev() {
                    dxr[ix[j] as usize] += g * prefix[j] * suffix;
                    suffix *= xr[ix[j] as usize];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dims_match_binomial() {
        assert_eq!(sympow_dim(3, 2), 6);
        assert_eq!(sympow_dim(4, 4), 35);
        for (d, p) in [(3, 2), (4, 4), (5, 6), (8, 2)] {
            assert_eq!(SymPow::new(d, p).dim, sympow_dim(d, p));
        }
    }

    #[test]
    fn p2_layout_is_squares_and_scaled_cross_terms() {
        let s = SymPow::new(2, 2);
        let mut out = [0.0f64; 3];
        s.forward(&[3.0, 5.0], &mut out);
        assert_eq!(out[0], 9.0);
        assert!((out[1] - 15.0 * 2f64.sqrt()).abs() < 1e-12);
        assert_eq!(out[2], 25.0);
    }
}
