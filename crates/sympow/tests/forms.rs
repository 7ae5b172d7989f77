//! The three forms of gated power attention agree with each other and with a float64
//! reference, with and without gating, with fixed and learned rotary, for several chunk sizes.

mod common;
use common::{apply_rotary, Rot};
use rand::Rng;
use sympow::attention::reference::{reference_attention, reference_attention_at};
use sympow::attention::{attention_forward, AttentionSpec, Form, Shape};
use sympow::ops::rotary::RotaryParam;
use sympow::testing::{log_gates, randn, rel_err, rng, to_f32, to_f64, uniform};

/// Inputs drawn in f64; the f32 forms get them rounded.
struct Case {
    shape: Shape,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    g: Option<Vec<f64>>,
    rot_logits: Vec<f64>,
}

fn case(r: &mut impl Rng, shape: Shape, gates: Option<(f64, f64)>, rot: Rot) -> Case {
    let mut rr = sympow::testing::rng(r.gen());
    let n = shape.batch * shape.time * shape.heads;
    let r_per = match rot {
        Rot::Learned(p) => p.logits_per_head(shape.dk),
        _ => 1,
    };
    Case {
        shape,
        q: randn(&mut rr, n * shape.dk, 1.0),
        k: randn(&mut rr, n * shape.dk, 1.0),
        v: randn(&mut rr, n * shape.dv, 1.0),
        g: gates.map(|(lo, hi)| log_gates(&mut rr, n, lo, hi)),
        rot_logits: uniform(&mut rr, n * r_per, -1.0, 2.0),
    }
}

/// Adds to every row of `x` (rows of `m.len()`) the direction `m` scaled to length `len`: q and k
/// shifted alike have q·k ≈ len², away from 0, where power attention's weights (q·k)^p are
/// ill-conditioned in any finite precision.
fn shift_along(x: &mut [f64], m: &[f64], len: f64) {
    let c = len / m.iter().map(|v| v * v).sum::<f64>().sqrt();
    for (i, v) in x.iter_mut().enumerate() {
        *v += c * m[i % m.len()];
    }
}

fn check_case(spec: &AttentionSpec, c: &Case, rot: Rot, chunks: &[usize], label: &str) {
    let s = &c.shape;
    // float64 reference on the f64-rotated inputs
    let (q64, k64) = apply_rotary(
        rot,
        &c.q,
        &c.k,
        &c.rot_logits,
        s.batch,
        s.time,
        s.heads,
        s.dk,
    );
    let want = reference_attention(spec, s, &q64, &k64, &c.v, c.g.as_deref());
    // f32 path: rotary in f32, then each form
    let (q32, k32) = apply_rotary(
        rot,
        &to_f32(&c.q),
        &to_f32(&c.k),
        &to_f32(&c.rot_logits),
        s.batch,
        s.time,
        s.heads,
        s.dk,
    );
    let v32 = to_f32(&c.v);
    let g32 = c.g.as_deref().map(to_f32);
    let mut forms = vec![Form::Quadratic, Form::Recurrent];
    forms.extend(chunks.iter().map(|&ch| Form::Chunked(ch)));
    let outs: Vec<(Form, Vec<f32>)> = forms
        .iter()
        .map(|&f| {
            (
                f,
                attention_forward(spec, f, s, &q32, &k32, &v32, g32.as_deref()).y,
            )
        })
        .collect();
    for (f, y) in &outs {
        let e = rel_err(y, &want);
        assert!(e < 1e-4, "{label} {f:?}: rel err vs f64 reference {e:.3e}");
        let e = rel_err(y, &outs[0].1);
        assert!(e < 1e-4, "{label} {f:?}: rel err vs quadratic {e:.3e}");
    }
    // the f64 instantiation of the same code is exact, down to one-token chunks (which in f32
    // leave early tokens, whose Σa is tiny, to the state's absolute rounding error)
    for ch in [1, 2, 3, chunks[0]] {
        let y64 = attention_forward(spec, Form::Chunked(ch), s, &q64, &k64, &c.v, c.g.as_deref()).y;
        let e = rel_err(&y64, &want);
        assert!(
            e < 1e-10,
            "{label}: f64 chunked c={ch} vs reference {e:.3e}"
        );
    }
}

#[test]
fn forms_agree_for_p2_and_p4_gating_and_rotary() {
    let mut r = rng(common::seed("forms_agree"));
    let shape = Shape {
        batch: 2,
        time: 37,
        heads: 2,
        dk: 8,
        dv: 5,
    };
    let rots = [
        Rot::None,
        Rot::Fixed,
        Rot::Learned(RotaryParam::PerHead),
        Rot::Learned(RotaryParam::PerFrequency),
    ];
    for p in [2u32, 4] {
        let spec = AttentionSpec::sympow(p, shape.dk).unwrap();
        for gates in [None, Some((0.5, 0.99)), Some((0.95, 0.9999))] {
            for rot in rots {
                let mut c = case(&mut r, shape, gates, rot);
                // q and k share a direction (q·k ≈ 4d ± 3√d before rotation): with independent
                // q, k a first token's single weight can cancel (p = 4: φ(q)·φ(k), a sum of signed
                // feature products), where no precision is exact — 0.4 % of seeds missed the f64
                // bound of 1e-10 (e.g. 342564038, 690)
                let m: Vec<f64> = randn(&mut r, shape.dk, 1.0);
                let len = 2.0 * (shape.dk as f64).sqrt();
                shift_along(&mut c.q, &m, len);
                shift_along(&mut c.k, &m, len);
                // c = T, c not dividing T, c > T
                check_case(
                    &spec,
                    &c,
                    rot,
                    &[shape.time, 8, 5, 64],
                    &format!("p={p} gates={gates:?} rot={rot:?}"),
                );
            }
        }
    }
}

#[test]
fn forms_agree_at_realistic_head_dim() {
    let mut r = rng(common::seed("forms_head64"));
    let shape = Shape {
        batch: 1,
        time: 300,
        heads: 1,
        dk: 32,
        dv: 32,
    };
    let spec = AttentionSpec::sympow(2, shape.dk).unwrap();
    let c = case(
        &mut r,
        shape,
        Some((0.9, 0.999)),
        Rot::Learned(RotaryParam::PerHead),
    );
    check_case(
        &spec,
        &c,
        Rot::Learned(RotaryParam::PerHead),
        &[128, 100],
        "d=32",
    );
}

#[test]
fn softmax_quadratic_matches_reference() {
    let mut r = rng(common::seed("softmax_ref"));
    let shape = Shape {
        batch: 2,
        time: 130,
        heads: 3,
        dk: 8,
        dv: 4,
    };
    let spec = AttentionSpec::softmax(shape.dk);
    let c = case(&mut r, shape, None, Rot::Fixed);
    let (q, k) = apply_rotary(Rot::Fixed, &c.q, &c.k, &[], 2, 130, 3, 8);
    let want = reference_attention(&spec, &shape, &q, &k, &c.v, None);
    let got = attention_forward(
        &spec,
        Form::Quadratic,
        &shape,
        &to_f32(&q),
        &to_f32(&k),
        &to_f32(&c.v),
        None,
    )
    .y;
    assert!(rel_err(&got, &want) < 1e-5);
}

/// T = 16,384 with strong gating (γ ≈ 0.5) and with none: every output finite, and every form
/// matches the float64 reference on sampled positions.
#[test]
fn long_sequences_are_finite_and_exact() {
    let mut r = rng(common::seed("long_t16k"));
    let shape = Shape {
        batch: 1,
        time: 16_384,
        heads: 1,
        dk: 16,
        dv: 16,
    };
    let spec = AttentionSpec::sympow(2, shape.dk).unwrap();
    // q and k share a direction (q·k ≈ 4d ± 3√d): with independent q, k the first token's
    // single weight (σq·k)² can cancel to O(ε) in f32, where y = v·a/(a + ε) is ill-conditioned
    // (1 of 150 seeds missed 1e-4 at t = 0) — a limit of f32 scores, not of any form
    let m: Vec<f64> = randn(&mut r, shape.dk, 1.0);
    let len = 2.0 * (shape.dk as f64).sqrt();
    for gates in [Some((0.45, 0.55)), None] {
        let mut c = case(&mut r, shape, gates, Rot::None);
        shift_along(&mut c.q, &m, len);
        shift_along(&mut c.k, &m, len);
        let (q, k, v) = (to_f32(&c.q), to_f32(&c.k), to_f32(&c.v));
        let g = c.g.as_deref().map(to_f32);
        let mut positions: Vec<usize> = (0..24).map(|_| r.gen_range(0..shape.time)).collect();
        positions.extend([0, 1, 127, 128, 129, shape.time - 1]);
        for form in [
            Form::Chunked(128),
            Form::Chunked(1000),
            Form::Recurrent,
            Form::Quadratic,
        ] {
            let out = attention_forward(&spec, form, &shape, &q, &k, &v, g.as_deref());
            assert!(
                out.y.iter().chain(&out.log_norm).all(|x| x.is_finite()),
                "{form:?} gates={gates:?}: non-finite output"
            );
            for &t in &positions {
                let want =
                    reference_attention_at(&spec, &shape, &c.q, &c.k, &c.v, c.g.as_deref(), t);
                let got = &out.y[t * shape.dv..(t + 1) * shape.dv];
                let e = rel_err(got, &want);
                assert!(e < 1e-4, "{form:?} gates={gates:?} t={t}: rel err {e:.3e}");
            }
        }
    }
}

/// A gate of exactly 1 (g = 0) is the same as no gate.
#[test]
fn unit_gates_equal_no_gates() {
    let mut r = rng(common::seed("unit_gates"));
    let shape = Shape {
        batch: 1,
        time: 20,
        heads: 2,
        dk: 4,
        dv: 4,
    };
    let spec = AttentionSpec::sympow(2, 4).unwrap();
    let c = case(&mut r, shape, None, Rot::None);
    let zeros = vec![0.0; 40];
    for form in [Form::Quadratic, Form::Chunked(6)] {
        let a = attention_forward(&spec, form, &shape, &c.q, &c.k, &c.v, None).y;
        let b = attention_forward(&spec, form, &shape, &c.q, &c.k, &c.v, Some(&zeros)).y;
        assert!(rel_err(&a, &b) < 1e-14);
    }
    let _ = to_f64(&[0f32]);
}

#[test]
fn odd_powers_are_rejected() {
    for p in [0u32, 1, 3, 5] {
        let err = AttentionSpec::sympow(p, 8).unwrap_err();
        assert!(err.to_string().contains(&format!("p = {p}")), "{err}");
    }
}

/// The backend's batched decode step, fed a batch of sequences token by token from a zero
/// state, gives every position's output of the float64 reference (p = 2 and 4, gated or not).
#[test]
fn backend_decode_steps_reproduce_the_reference() {
    use sympow::backend::{Backend, CpuBackend};
    let seed = common::seed("backend_decode");
    let mut r = rng(seed);
    let be = CpuBackend::<f64>::new();
    for (p, d, gated) in [(2, 8, true), (2, 8, false), (4, 4, true)] {
        let spec = AttentionSpec::sympow(p, d).unwrap();
        let shape = Shape {
            batch: 2,
            time: 17,
            heads: 3,
            dk: d,
            dv: 5,
        };
        let n = shape.batch * shape.time * shape.heads;
        // q and k share a direction m: with independent q, k some first tokens have q·k ≈ 0,
        // where the decode step's φ(q)·φ(k) — a sum of signed feature products equal to
        // (q·k)^p — cancels to far below its terms and a/(a + ε) is ill-conditioned (2 % of
        // seeds missed 1e-10 at p = 4), a limit of the feature form in any precision, not
        // of the step. Here q·k ≈ 6 ± 2 for every pair.
        let m: Vec<f64> = randn(&mut r, d, 1.0);
        let (mut q, mut k) = (randn(&mut r, n * d, 0.5), randn(&mut r, n * d, 0.5));
        shift_along(&mut q, &m, 2.5);
        shift_along(&mut k, &m, 2.5);
        let v: Vec<f64> = randn(&mut r, n * 5, 1.0);
        let g: Vec<f64> = log_gates(&mut r, n, 0.8, 0.99);
        let want = reference_attention(&spec, &shape, &q, &k, &v, gated.then_some(&g[..]));
        let one = Shape { time: 1, ..shape };
        let zero =
            vec![0.0; shape.batch * shape.heads * sympow::attention::phi::sympow_dim(d, p) * 6];
        let mut state = be.decode_state(&spec, &one, &zero);
        let bh = shape.batch * shape.heads;
        for t in 0..shape.time {
            // rows of token t of every sequence: [batch, heads, ·]
            let rows = |x: &[f64], w: usize| -> Vec<f64> {
                (0..shape.batch)
                    .flat_map(|b| {
                        let o = ((b * shape.time + t) * shape.heads) * w;
                        x[o..o + shape.heads * w].to_vec()
                    })
                    .collect()
            };
            let gt = rows(&g, 1);
            let y = be.sympow_decode_step(
                &spec,
                &mut state,
                &rows(&q, d),
                &rows(&k, d),
                &rows(&v, 5),
                gated.then_some(&gt),
            );
            assert_eq!(y.len(), bh * 5);
            let e = rel_err(&y, &rows(&want, 5));
            assert!(
                e < 1e-10,
                "p={p} gated={gated} t={t}: rel err {e:.2e} (seed {seed})"
            );
        }
    }
}
