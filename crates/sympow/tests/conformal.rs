//! The conformal-map identity (SPEC §5): updating the recurrent state with an explicit
//! conformal map, S_t = γ_t·P_p(ρ_t)·S_{t−1} + φ(k_t)v̂_tᵀ with P_p(ρ) the D×D matrix of a
//! rotation ρ acting on φ-space, gives the same outputs as rotating q and k by the cumulative
//! angle (rotary) and running the plain recurrence.

mod common;
use sympow::attention::phi::SymPow;
use sympow::attention::{attention_forward, AttentionSpec, Form, RecurrentState, Shape};
use sympow::ops::rotary;
use sympow::testing::{log_gates, randn, rel_err, rng, uniform};

/// Solves A X = B for square A (n×n) and B (n×m) by Gaussian elimination with partial pivoting.
fn solve(mut a: Vec<f64>, mut b: Vec<f64>, n: usize, m: usize) -> Vec<f64> {
    for col in 0..n {
        let piv = (col..n)
            .max_by(|&i, &j| a[i * n + col].abs().total_cmp(&a[j * n + col].abs()))
            .unwrap();
        for c in 0..n {
            a.swap(col * n + c, piv * n + c);
        }
        for c in 0..m {
            b.swap(col * m + c, piv * m + c);
        }
        let d = a[col * n + col];
        for row in 0..n {
            if row != col {
                let f = a[row * n + col] / d;
                for c in 0..n {
                    a[row * n + c] -= f * a[col * n + c];
                }
                for c in 0..m {
                    b[row * m + c] -= f * b[col * m + c];
                }
            }
        }
    }
    for row in 0..n {
        let d = a[row * n + row];
        for c in 0..m {
            b[row * m + c] /= d;
        }
    }
    b
}

/// P_p(R) (D×D, row-major) for the rotation R by `angles` (one per coordinate pair), fitted
/// from φ(R x) = P φ(x) over many random x (least squares; exact since the map is linear).
fn sympow_rotation(sp: &SymPow, angles: &[f64], r: &mut rand_chacha::ChaCha8Rng) -> Vec<f64> {
    let (d, dim) = (sp.d, sp.dim);
    let n = 3 * dim;
    let x: Vec<f64> = randn(r, n * d, 1.0);
    let rep: Vec<f64> = (0..n).flat_map(|_| angles.iter().copied()).collect();
    let rx = rotary::rotary_forward(&x, &rep, d);
    let (mut px, mut prx) = (vec![0.0; n * dim], vec![0.0; n * dim]);
    sp.forward(&x, &mut px);
    sp.forward(&rx, &mut prx);
    // (ΦxᵀΦx) Pᵀ = Φxᵀ Φrx
    let mut ata = vec![0.0; dim * dim];
    let mut atb = vec![0.0; dim * dim];
    for s in 0..n {
        for i in 0..dim {
            for j in 0..dim {
                ata[i * dim + j] += px[s * dim + i] * px[s * dim + j];
                atb[i * dim + j] += px[s * dim + i] * prx[s * dim + j];
            }
        }
    }
    let pt = solve(ata, atb, dim, dim);
    (0..dim * dim)
        .map(|ij| pt[(ij % dim) * dim + ij / dim])
        .collect() // transpose
}

#[test]
fn explicit_conformal_state_map_equals_rotary_on_queries_and_keys() {
    let mut r = rng(common::seed("conformal_identity"));
    let (t, d, e) = (24, 4, 3);
    for p in [2u32, 4] {
        let spec = AttentionSpec::sympow(p, d).unwrap();
        let sp = SymPow::new(d, p);
        let dim = sp.dim;
        let q: Vec<f64> = randn(&mut r, t * d, 1.0);
        let k: Vec<f64> = randn(&mut r, t * d, 1.0);
        let v: Vec<f64> = randn(&mut r, t * e, 1.0);
        let g: Vec<f64> = log_gates(&mut r, t, 0.7, 0.99);
        // data-dependent per-token increments θ_t (one per pair), as the learned rotary makes
        let theta: Vec<f64> = uniform(&mut r, t * d / 2, -1.5, 1.5);

        // (a) rotary: rotate q_t, k_t by Θ_t = Σ_{r≤t} θ_r, run the plain recurrence
        let mut cum = vec![0.0; d / 2];
        let big_theta: Vec<f64> = theta
            .chunks(d / 2)
            .flat_map(|th| {
                cum.iter_mut().zip(th).for_each(|(c, x)| *c += x);
                cum.clone()
            })
            .collect();
        let (qr, kr) = (
            rotary::rotary_forward(&q, &big_theta, d),
            rotary::rotary_forward(&k, &big_theta, d),
        );
        let shape = Shape {
            batch: 1,
            time: t,
            heads: 1,
            dk: d,
            dv: e,
        };
        let want = attention_forward(&spec, Form::Recurrent, &shape, &qr, &kr, &v, Some(&g)).y;

        // (b) unrotated q, k; the state is mapped by γ_t·P_p(ρ_t) with ρ_t = R(−θ_t) each step
        // (φ(R_a q)ᵀφ(R_b k) = φ(q)ᵀP(R_{b−a})φ(k): the state carries key rotations relative
        // to the current query, hence the inverse increment).
        let mut st = RecurrentState::<f64>::new(&spec, d, e);
        let mut got = Vec::new();
        for i in 0..t {
            let neg: Vec<f64> = theta[i * d / 2..(i + 1) * d / 2]
                .iter()
                .map(|x| -x)
                .collect();
            let pm = sympow_rotation(&sp, &neg, &mut r);
            // P is orthogonal: the map is conformal (γ times an isometry)
            for a in 0..dim {
                for b in 0..dim {
                    let ip: f64 = (0..dim).map(|c| pm[c * dim + a] * pm[c * dim + b]).sum();
                    assert!(
                        (ip - f64::from(u8::from(a == b))).abs() < 1e-8,
                        "P_p(ρ) not orthogonal"
                    );
                }
            }
            let s = st.state().to_vec();
            let out = st.state_mut();
            for row in 0..dim {
                for c in 0..=e {
                    out[row * (e + 1) + c] = (0..dim)
                        .map(|j| pm[row * dim + j] * s[j * (e + 1) + c])
                        .sum();
                }
            }
            let (y, _) = st.step(
                &q[i * d..(i + 1) * d],
                &k[i * d..(i + 1) * d],
                &v[i * e..(i + 1) * e],
                Some(g[i]),
            );
            got.extend(y);
        }
        let err = rel_err(&got, &want);
        assert!(
            err < 1e-8,
            "p={p}: explicit conformal map vs rotary rel err {err:.3e}"
        );
        // and the rotation matters: without it the outputs differ
        let plain = attention_forward(&spec, Form::Recurrent, &shape, &q, &k, &v, Some(&g)).y;
        assert!(rel_err(&plain, &want) > 1e-3);
    }
}
