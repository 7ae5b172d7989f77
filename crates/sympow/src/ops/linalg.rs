//! Dense matrix products on the CPU, through the `gemm` crate.
//!
//! Every matrix here is row-major; a transposed operand is expressed through strides, never
//! copied.

use crate::float::Float;

/// Whether an operand is used as stored or transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trans {
    /// Use the matrix as stored.
    No,
    /// Use its transpose.
    Yes,
}

/// `c = beta_c * c + a' · b'` where `a'` is `m×k`, `b'` is `k×n`, `c` is `m×n`, and `a'`/`b'` are
/// `a`/`b` or their transposes (`a` is stored `m×k` row-major, or `k×m` when transposed).
///
/// `accumulate = false` overwrites `c` (its previous contents are never read, so it may hold
/// garbage); `true` adds to it.
pub fn matmul<F: Float>(
    c: &mut [F],
    a: &[F],
    ta: Trans,
    b: &[F],
    tb: Trans,
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) {
    assert_eq!(
        c.len(),
        m * n,
        "matmul: output has {} elements, want {m}×{n}",
        c.len()
    );
    assert_eq!(
        a.len(),
        m * k,
        "matmul: lhs has {} elements, want {m}×{k}",
        a.len()
    );
    assert_eq!(
        b.len(),
        k * n,
        "matmul: rhs has {} elements, want {k}×{n}",
        b.len()
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.fill(F::zero());
        }
        return;
    }
    // (row stride, column stride) of each operand as used.
    let (a_rs, a_cs) = match ta {
        Trans::No => (k as isize, 1),
        Trans::Yes => (1, m as isize),
    };
    let (b_rs, b_cs) = match tb {
        Trans::No => (n as isize, 1),
        Trans::Yes => (1, k as isize),
    };
    // Small products run on the calling thread: they are usually already inside a parallel
    // loop over heads or chunks, where nested parallelism only adds overhead.
    let parallelism = if m * n * k >= 1 << 21 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above guarantee every (row, col) reached through these strides lies
    // inside the slices; `c` is uniquely borrowed and does not alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            F::one(),
            F::one(),
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f64], ta: Trans, b: &[f64], tb: Trans, m: usize, k: usize, n: usize) -> Vec<f64> {
        let at = |i: usize, l: usize| {
            if ta == Trans::No {
                a[i * k + l]
            } else {
                a[l * m + i]
            }
        };
        let bt = |l: usize, j: usize| {
            if tb == Trans::No {
                b[l * n + j]
            } else {
                b[j * k + l]
            }
        };
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|l| at(i, l) * bt(l, j)).sum();
            }
        }
        c
    }

    #[test]
    fn matches_naive_for_all_transposes() {
        let (m, k, n) = (7, 5, 3);
        let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
        let b: Vec<f64> = (0..k * n).map(|i| (i as f64 * 0.91).cos()).collect();
        for ta in [Trans::No, Trans::Yes] {
            for tb in [Trans::No, Trans::Yes] {
                let want = naive(&a, ta, &b, tb, m, k, n);
                let mut c = vec![f64::NAN; m * n];
                matmul(&mut c, &a, ta, &b, tb, m, k, n, false);
                for (x, y) in c.iter().zip(&want) {
                    assert!((x - y).abs() < 1e-12, "{ta:?} {tb:?}: {x} vs {y}");
                }
                // accumulate adds on top
                matmul(&mut c, &a, ta, &b, tb, m, k, n, true);
                for (x, y) in c.iter().zip(&want) {
                    assert!((x - 2.0 * y).abs() < 1e-12);
                }
            }
        }
    }
}
