//! Linear layer y = x Wᵀ + b, with W stored `[out, in]` (PyTorch's layout).

use super::linalg::{matmul, Trans};
use crate::float::Float;

/// `x` is `[rows, cin]`, `w` is `[cout, cin]`, `b` is `[cout]`; returns `[rows, cout]`.
pub fn linear_forward<F: Float>(
    x: &[F],
    w: &[F],
    b: Option<&[F]>,
    cin: usize,
    cout: usize,
) -> Vec<F> {
    let rows = x.len() / cin;
    let mut y = vec![F::zero(); rows * cout];
    if let Some(b) = b {
        for r in y.chunks_exact_mut(cout) {
            r.copy_from_slice(b);
        }
    }
    matmul(
        &mut y,
        x,
        Trans::No,
        w,
        Trans::Yes,
        rows,
        cin,
        cout,
        b.is_some(),
    );
    y
}

/// Returns ∂L/∂x; adds ∂L/∂W into `dw` and ∂L/∂b into `db`.
pub fn linear_backward<F: Float>(
    x: &[F],
    w: &[F],
    dy: &[F],
    cin: usize,
    cout: usize,
    dw: &mut [F],
    db: Option<&mut [F]>,
) -> Vec<F> {
    let rows = x.len() / cin;
    let mut dx = vec![F::zero(); rows * cin];
    matmul(&mut dx, dy, Trans::No, w, Trans::No, rows, cout, cin, false);
    matmul(dw, dy, Trans::Yes, x, Trans::No, cout, rows, cin, true);
    if let Some(db) = db {
        for r in dy.chunks_exact(cout) {
            for (a, &g) in db.iter_mut().zip(r) {
                *a += g;
            }
        }
    }
    dx
}
