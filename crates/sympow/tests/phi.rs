//! φ_p: the kernel identity φ_p(x)·φ_p(y) = (x·y)^p, and its backward.

mod common;
use sympow::attention::phi::{sympow_dim, SymPow};
use sympow::testing::{numerical_grad, randn, rel_err, rng};

#[test]
fn inner_product_is_power_of_dot_product_in_f32() {
    let mut r = rng(common::seed("phi_identity"));
    for p in [2u32, 4, 6] {
        for d in [3usize, 8, 16] {
            if sympow_dim(d, p) > 200_000 {
                continue;
            }
            let sp = SymPow::new(d, p);
            for _ in 0..20 {
                let x: Vec<f32> = randn(&mut r, d, 1.0 / (d as f64).sqrt());
                let y: Vec<f32> = randn(&mut r, d, 1.0 / (d as f64).sqrt());
                let (mut px, mut py) = (vec![0f32; sp.dim], vec![0f32; sp.dim]);
                sp.forward(&x, &mut px);
                sp.forward(&y, &mut py);
                let got: f64 = px.iter().zip(&py).map(|(a, b)| *a as f64 * *b as f64).sum();
                let dot: f64 = x.iter().zip(&y).map(|(a, b)| *a as f64 * *b as f64).sum();
                let want = dot.powi(p as i32);
                // relative to the product of norms^p: the natural scale of the sum
                let nx: f64 = x.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
                let ny: f64 = y.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
                let err = (got - want).abs() / (nx * ny).powi(p as i32);
                assert!(
                    err < 1e-5,
                    "p={p} d={d}: φ·φ = {got}, (x·y)^p = {want}, rel err {err}"
                );
            }
        }
    }
}

#[test]
fn norm_of_embedding_is_norm_to_the_p() {
    let mut r = rng(common::seed("phi_norm"));
    for p in [2u32, 4] {
        let sp = SymPow::new(5, p);
        let x: Vec<f64> = randn(&mut r, 5, 1.0);
        let mut px = vec![0.0; sp.dim];
        sp.forward(&x, &mut px);
        let n2: f64 = x.iter().map(|a| a * a).sum();
        let pn2: f64 = px.iter().map(|a| a * a).sum();
        assert!((pn2 - n2.powi(p as i32)).abs() < 1e-10 * pn2);
    }
}

#[test]
fn backward_matches_finite_differences() {
    let mut r = rng(common::seed("phi_backward"));
    for p in [2u32, 4, 6] {
        let (rows, d) = (3, 4);
        let sp = SymPow::new(d, p);
        let x: Vec<f64> = randn(&mut r, rows * d, 1.0);
        let w: Vec<f64> = randn(&mut r, rows * sp.dim, 1.0);
        let mut f = |x: &[f64]| {
            let mut o = vec![0.0; rows * sp.dim];
            sp.forward(x, &mut o);
            o.iter().zip(&w).map(|(a, b)| a * b).sum::<f64>()
        };
        let num = numerical_grad(&mut f, &x, 1e-5);
        let mut dx = vec![0.0; rows * d];
        sp.backward(&x, &w, &mut dx);
        let e = rel_err(&dx, &num);
        assert!(e < 1e-7, "p={p}: φ backward rel err {e}");
    }
}
