//! Every backward pass against central finite differences in f64.

mod common;
use sympow::attention::{
    attention_backward, attention_forward, AttentionSpec, Form, Kernel, Shape,
};
use sympow::backend::{Backend, CpuBackend};
use sympow::ops::rotary::{self, RotaryParam};
use sympow::ops::{cross_entropy, embedding, gate, gelu, layer_norm, linear};
use sympow::testing::{numerical_grad, randn, rel_err, rng, uniform};

const H: f64 = 1e-5;
const TOL: f64 = 1e-6;

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn assert_close(label: &str, analytic: &[f64], numerical: &[f64], tol: f64) {
    let e = rel_err(analytic, numerical);
    assert!(
        e < tol,
        "{label}: analytic vs finite-difference gradient rel err {e:.3e}"
    );
    assert!(
        numerical.iter().any(|x| x.abs() > 1e-8),
        "{label}: gradient is identically zero"
    );
}

/// How the attention inputs are produced from raw parameters.
#[derive(Clone, Copy, Debug)]
struct Variant {
    kernel: Kernel,
    gated: bool,
    rot: Option<RotaryParam>, // None: fixed RoPE
    form: Form,
}

/// Everything differentiable in one attention layer, flattened: q, k, v, gate logits,
/// rotary logits.
struct Params {
    shape: Shape,
    v: Variant,
    sizes: [usize; 5],
}

impl Params {
    fn split<'a>(&self, x: &'a [f64]) -> [&'a [f64]; 5] {
        let mut o = 0;
        let mut parts: [&[f64]; 5] = [&[]; 5];
        for (i, &n) in self.sizes.iter().enumerate() {
            parts[i] = &x[o..o + n];
            o += n;
        }
        parts
    }

    fn spec(&self) -> AttentionSpec {
        match self.v.kernel {
            Kernel::Power(p) => AttentionSpec::sympow(p, self.shape.dk).unwrap(),
            Kernel::Softmax => AttentionSpec::softmax(self.shape.dk),
        }
    }

    fn angles(&self, rot_logits: &[f64]) -> Vec<f64> {
        let s = &self.shape;
        match self.v.rot {
            Some(param) => rotary::learned_rotary_angles(
                rot_logits, s.batch, s.time, s.heads, s.dk, param, 100.0, None,
            ),
            None => rotary::fixed_rotary_angles(s.batch, s.time, s.heads, s.dk, 100.0, 0),
        }
    }

    /// Σ w ⊙ y.
    fn loss(&self, x: &[f64], w: &[f64]) -> f64 {
        let [q, k, v, gl, rl] = self.split(x);
        let ang = self.angles(rl);
        let (qr, kr) = (
            rotary::rotary_forward(q, &ang, self.shape.dk),
            rotary::rotary_forward(k, &ang, self.shape.dk),
        );
        let g = self.v.gated.then(|| gate::log_gate_forward(gl));
        dot(
            &attention_forward(
                &self.spec(),
                self.v.form,
                &self.shape,
                &qr,
                &kr,
                v,
                g.as_deref(),
            )
            .y,
            w,
        )
    }

    /// The analytic gradient, by the ops' backward passes in reverse order.
    fn grad(&self, x: &[f64], w: &[f64]) -> Vec<f64> {
        let s = &self.shape;
        let [q, k, v, gl, rl] = self.split(x);
        let ang = self.angles(rl);
        let (qr, kr) = (
            rotary::rotary_forward(q, &ang, s.dk),
            rotary::rotary_forward(k, &ang, s.dk),
        );
        let g = self.v.gated.then(|| gate::log_gate_forward(gl));
        let spec = self.spec();
        let fwd = attention_forward(&spec, self.v.form, s, &qr, &kr, v, g.as_deref());
        let ga = attention_backward(&spec, self.v.form, s, &qr, &kr, v, g.as_deref(), &fwd, w);
        let (dq, dang_q) = rotary::rotary_backward(&ga.dq, &qr, &ang, s.dk);
        let (dk, dang_k) = rotary::rotary_backward(&ga.dk, &kr, &ang, s.dk);
        let dgl = match &ga.dlog_gates {
            Some(dg) => gate::log_gate_backward(gl, dg),
            None => vec![0.0; gl.len()],
        };
        let drl = match self.v.rot {
            Some(param) => {
                let dang: Vec<f64> = dang_q.iter().zip(&dang_k).map(|(a, b)| a + b).collect();
                rotary::learned_rotary_angles_backward(
                    rl, &dang, s.batch, s.time, s.heads, s.dk, param, 100.0,
                )
            }
            None => vec![0.0; rl.len()],
        };
        [dq, dk, ga.dv, dgl, drl].concat()
    }
}

fn check_attention(v: Variant, shape: Shape, seed: u64) {
    let mut r = rng(seed);
    let n = shape.batch * shape.time * shape.heads;
    let r_per = v.rot.map_or(1, |p| p.logits_per_head(shape.dk));
    let p = Params {
        shape,
        v,
        sizes: [n * shape.dk, n * shape.dk, n * shape.dv, n, n * r_per],
    };
    let x: Vec<f64> = [
        randn(&mut r, p.sizes[0], 1.0),
        randn(&mut r, p.sizes[1], 1.0),
        randn(&mut r, p.sizes[2], 1.0),
        uniform(&mut r, p.sizes[3], -1.0, 4.0), // γ from 0.27 to 0.98: strong gating
        uniform(&mut r, p.sizes[4], -1.0, 2.0),
    ]
    .concat();
    let w: Vec<f64> = randn(&mut r, n * shape.dv, 1.0);
    let analytic = p.grad(&x, &w);
    let numerical = numerical_grad(&mut |x| p.loss(x, &w), &x, H);
    let names = ["q", "k", "v", "gate logits", "rotary logits"];
    let mut o = 0;
    for (name, &size) in names.iter().zip(&p.sizes) {
        let (a, b) = (&analytic[o..o + size], &numerical[o..o + size]);
        o += size;
        if (*name == "gate logits" && !v.gated) || (*name == "rotary logits" && v.rot.is_none()) {
            assert!(
                a.iter().chain(b).all(|x| x.abs() < 1e-9),
                "{v:?}: {name} should not matter"
            );
            continue;
        }
        assert_close(&format!("{v:?} ∂{name}"), a, b, TOL);
    }
}

#[test]
fn chunked_sympow_backward_matches_finite_differences() {
    let seed = common::seed("chunked_grads");
    let shape = Shape {
        batch: 2,
        time: 11,
        heads: 2,
        dk: 4,
        dv: 3,
    };
    let mut i = 0;
    for p in [2u32, 4] {
        for gated in [true, false] {
            for rot in [
                Some(RotaryParam::PerHead),
                Some(RotaryParam::PerFrequency),
                None,
            ] {
                for chunk in [3, 4, 11, 16] {
                    i += 1;
                    check_attention(
                        Variant {
                            kernel: Kernel::Power(p),
                            gated,
                            rot,
                            form: Form::Chunked(chunk),
                        },
                        shape,
                        seed + i,
                    );
                }
            }
        }
    }
}

#[test]
fn quadratic_sympow_backward_matches_finite_differences() {
    let seed = common::seed("quadratic_grads");
    // T > the quadratic form's 64-row blocks, so both backward passes cross block boundaries
    let shape = Shape {
        batch: 1,
        time: 70,
        heads: 1,
        dk: 4,
        dv: 2,
    };
    for (i, p) in [2u32, 4].into_iter().enumerate() {
        let v = Variant {
            kernel: Kernel::Power(p),
            gated: true,
            rot: Some(RotaryParam::PerHead),
            form: Form::Quadratic,
        };
        check_attention(v, shape, seed + i as u64);
    }
}

#[test]
fn softmax_backward_matches_finite_differences() {
    let seed = common::seed("softmax_grads");
    for (i, shape) in [
        Shape {
            batch: 2,
            time: 9,
            heads: 2,
            dk: 4,
            dv: 3,
        },
        Shape {
            batch: 1,
            time: 70,
            heads: 1,
            dk: 4,
            dv: 2,
        },
    ]
    .into_iter()
    .enumerate()
    {
        check_attention(
            Variant {
                kernel: Kernel::Softmax,
                gated: false,
                rot: None,
                form: Form::Quadratic,
            },
            shape,
            seed + i as u64,
        );
    }
}

/// At realistic sizes in f32, chunked and quadratic backward agree with the f64 backward.
#[test]
fn f32_backward_matches_f64_backward() {
    let mut r = rng(common::seed("f32_backward"));
    let shape = Shape {
        batch: 1,
        time: 200,
        heads: 2,
        dk: 16,
        dv: 16,
    };
    let spec = AttentionSpec::sympow(2, 16).unwrap();
    let n = shape.batch * shape.time * shape.heads;
    let q: Vec<f64> = randn(&mut r, n * 16, 1.0);
    let k: Vec<f64> = randn(&mut r, n * 16, 1.0);
    let v: Vec<f64> = randn(&mut r, n * 16, 1.0);
    let g: Vec<f64> = sympow::testing::log_gates(&mut r, n, 0.8, 0.999);
    let dy: Vec<f64> = randn(&mut r, n * 16, 1.0);
    let f32v = |x: &[f64]| x.iter().map(|&a| a as f32).collect::<Vec<f32>>();
    let fwd64 = attention_forward(&spec, Form::Quadratic, &shape, &q, &k, &v, Some(&g));
    let want = attention_backward(
        &spec,
        Form::Quadratic,
        &shape,
        &q,
        &k,
        &v,
        Some(&g),
        &fwd64,
        &dy,
    );
    for form in [Form::Chunked(64), Form::Chunked(48), Form::Quadratic] {
        let (q32, k32, v32, g32, dy32) = (f32v(&q), f32v(&k), f32v(&v), f32v(&g), f32v(&dy));
        let fwd = attention_forward(&spec, form, &shape, &q32, &k32, &v32, Some(&g32));
        let got = attention_backward(
            &spec,
            form,
            &shape,
            &q32,
            &k32,
            &v32,
            Some(&g32),
            &fwd,
            &dy32,
        );
        for (name, a, b) in [
            ("dq", &got.dq, &want.dq),
            ("dk", &got.dk, &want.dk),
            ("dv", &got.dv, &want.dv),
            (
                "dg",
                got.dlog_gates.as_ref().unwrap(),
                want.dlog_gates.as_ref().unwrap(),
            ),
        ] {
            let e = rel_err(a, b);
            assert!(e < 1e-4, "{form:?} {name}: f32 vs f64 rel err {e:.3e}");
        }
    }
}

// ---- the other ops --------------------------------------------------------------------------

#[test]
fn linear_backward_matches_finite_differences() {
    let mut r = rng(common::seed("linear_grads"));
    let (rows, cin, cout) = (5, 4, 3);
    let x: Vec<f64> = randn(&mut r, rows * cin, 1.0);
    let w: Vec<f64> = randn(&mut r, cout * cin, 1.0);
    let b: Vec<f64> = randn(&mut r, cout, 1.0);
    let gy: Vec<f64> = randn(&mut r, rows * cout, 1.0);
    let mut dw = vec![0.0; w.len()];
    let mut db = vec![0.0; b.len()];
    let dx = linear::linear_backward(&x, &w, &gy, cin, cout, &mut dw, Some(&mut db));
    let nx = numerical_grad(
        &mut |x| dot(&linear::linear_forward(x, &w, Some(&b), cin, cout), &gy),
        &x,
        H,
    );
    let nw = numerical_grad(
        &mut |w| dot(&linear::linear_forward(&x, w, Some(&b), cin, cout), &gy),
        &w,
        H,
    );
    let nb = numerical_grad(
        &mut |b| dot(&linear::linear_forward(&x, &w, Some(b), cin, cout), &gy),
        &b,
        H,
    );
    assert_close("linear ∂x", &dx, &nx, TOL);
    assert_close("linear ∂W", &dw, &nw, TOL);
    assert_close("linear ∂b", &db, &nb, TOL);
}

#[test]
fn layer_norm_backward_matches_finite_differences() {
    let mut r = rng(common::seed("ln_grads"));
    let (rows, c) = (4, 6);
    let x: Vec<f64> = randn(&mut r, rows * c, 2.0);
    let w: Vec<f64> = randn(&mut r, c, 1.0);
    let b: Vec<f64> = randn(&mut r, c, 1.0);
    let gy: Vec<f64> = randn(&mut r, rows * c, 1.0);
    for affine in [true, false] {
        let (wo, bo) = if affine {
            (Some(&w[..]), Some(&b[..]))
        } else {
            (None, None)
        };
        let (_, cache) = layer_norm::layer_norm_forward(&x, c, wo, bo);
        let mut dw = vec![0.0; c];
        let mut db = vec![0.0; c];
        let dx =
            layer_norm::layer_norm_backward(&x, &gy, c, wo, &cache, Some(&mut dw), Some(&mut db));
        let nx = numerical_grad(
            &mut |x| dot(&layer_norm::layer_norm_forward(x, c, wo, bo).0, &gy),
            &x,
            H,
        );
        assert_close("layer norm ∂x", &dx, &nx, TOL);
        if affine {
            let nw = numerical_grad(
                &mut |w| dot(&layer_norm::layer_norm_forward(&x, c, Some(w), bo).0, &gy),
                &w,
                H,
            );
            let nb = numerical_grad(
                &mut |b| dot(&layer_norm::layer_norm_forward(&x, c, wo, Some(b)).0, &gy),
                &b,
                H,
            );
            assert_close("layer norm ∂w", &dw, &nw, TOL);
            assert_close("layer norm ∂b", &db, &nb, TOL);
        }
    }
}

#[test]
fn gelu_backward_matches_finite_differences() {
    let mut r = rng(common::seed("gelu_grads"));
    let x: Vec<f64> = randn(&mut r, 50, 2.0);
    let gy: Vec<f64> = randn(&mut r, 50, 1.0);
    let n = numerical_grad(&mut |x| dot(&gelu::gelu_forward(x), &gy), &x, H);
    assert_close("gelu", &gelu::gelu_backward(&x, &gy), &n, TOL);
}

#[test]
fn gate_backward_matches_finite_differences() {
    let mut r = rng(common::seed("gate_grads"));
    let a: Vec<f64> = uniform(&mut r, 40, -40.0, 40.0);
    let gy: Vec<f64> = randn(&mut r, 40, 1.0);
    let n = numerical_grad(&mut |a| dot(&gate::log_gate_forward(a), &gy), &a, H);
    assert_close("log gate", &gate::log_gate_backward(&a, &gy), &n, TOL);
    // γ = exp(g) ∈ (0, 1), and the initial bias gives γ ≈ 0.999
    assert!(gate::log_gate_forward(&a)
        .iter()
        .all(|&g| g <= 0.0 && g.is_finite()));
    let g0 = gate::log_gate_forward(&[gate::GATE_INIT_BIAS])[0];
    assert!((g0.exp() - 0.999).abs() < 1e-9);
}

#[test]
fn embedding_backward_matches_finite_differences() {
    let mut r = rng(common::seed("emb_grads"));
    let (vocab, c) = (7, 3);
    let table: Vec<f64> = randn(&mut r, vocab * c, 1.0);
    let ids = [3u32, 0, 3, 6, 1];
    let gy: Vec<f64> = randn(&mut r, ids.len() * c, 1.0);
    let mut dt = vec![0.0; table.len()];
    embedding::embedding_backward(&mut dt, &ids, &gy, c);
    let n = numerical_grad(
        &mut |t| dot(&embedding::embedding_forward(t, &ids, c), &gy),
        &table,
        H,
    );
    assert_close("embedding", &dt, &n, TOL);
}

#[test]
fn cross_entropy_backward_matches_finite_differences() {
    let mut r = rng(common::seed("ce_grads"));
    let (rows, vocab) = (4, 9);
    // unpadded rows, and rows padded past the vocabulary (the LM head's alignment padding: those
    // columns are outside the softmax, so both sides must give them zero gradient)
    for row_len in [vocab, vocab + 3] {
        let logits: Vec<f64> = randn(&mut r, rows * row_len, 3.0);
        let targets = [2u32, 8, cross_entropy::IGNORE, 0];
        let dl: Vec<f64> = uniform(&mut r, rows, 0.1, 1.0);
        let losses = cross_entropy::cross_entropy_forward(&logits, &targets, vocab, row_len);
        let d =
            cross_entropy::cross_entropy_backward(&logits, &targets, &losses, &dl, vocab, row_len);
        let n = numerical_grad(
            &mut |l| {
                dot(
                    &cross_entropy::cross_entropy_forward(l, &targets, vocab, row_len),
                    &dl,
                )
            },
            &logits,
            H,
        );
        assert_close("cross entropy", &d, &n, TOL);
        // against the definition for one row
        let row = &logits[..row_len];
        let z: f64 = row[..vocab].iter().map(|x| x.exp()).sum();
        let want = -(row[2].exp() / z).ln();
        let got = cross_entropy::cross_entropy_forward(row, &[2], vocab, row_len)[0];
        assert!(
            (got - want).abs() < 1e-12,
            "row_len {row_len}: {got} vs {want}"
        );
    }
}

#[test]
fn rotary_backward_matches_finite_differences() {
    let mut r = rng(common::seed("rotary_grads"));
    let (rows, d) = (6, 8);
    let x: Vec<f64> = randn(&mut r, rows * d, 1.0);
    let ang: Vec<f64> = uniform(&mut r, rows * d / 2, -7.0, 7.0);
    let gy: Vec<f64> = randn(&mut r, rows * d, 1.0);
    let y = rotary::rotary_forward(&x, &ang, d);
    let (dx, da) = rotary::rotary_backward(&gy, &y, &ang, d);
    let nx = numerical_grad(
        &mut |x| dot(&rotary::rotary_forward(x, &ang, d), &gy),
        &x,
        H,
    );
    let na = numerical_grad(
        &mut |a| dot(&rotary::rotary_forward(&x, a, d), &gy),
        &ang,
        H,
    );
    assert_close("rotary ∂x", &dx, &nx, TOL);
    assert_close("rotary ∂angles", &da, &na, TOL);
    // a rotation preserves norms
    let n2 = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>();
    assert!((n2(&x) - n2(&y)).abs() < 1e-10 * n2(&x));
}

#[test]
fn qkv_rotary_gate_backward_matches_finite_differences() {
    // the projection's output as the model lays it out: q, k, v (heads·d wide), the gate's
    // logits (a column a head), the rotary logits and padding, which the op leaves alone
    let be = CpuBackend::<f64>::new();
    let mut r = rng(common::seed("qkv_rotary_gate_grads"));
    let (rows, heads, d) = (5, 2, 4);
    let c = heads * d;
    let widths = [c, c, c, heads, heads, 3];
    let total: usize = widths.iter().sum();
    let qkv: Vec<f64> = randn(&mut r, rows * total, 1.0);
    let ang: Vec<f64> = uniform(&mut r, rows * c / 2, -7.0, 7.0);
    assert_eq!(
        be.column_block(&qkv, &widths, 4),
        be.split_columns(&qkv, &widths)[4]
    );
    let (wq, wk, wv, wg): (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) = (
        randn(&mut r, rows * c, 1.0),
        randn(&mut r, rows * c, 1.0),
        randn(&mut r, rows * c, 1.0),
        randn(&mut r, rows * heads, 1.0),
    );
    for (rotated, gated) in [(true, true), (false, true), (true, false)] {
        let angles = rotated.then_some(&ang);
        let gate = gated.then_some(3);
        let loss = |x: &[f64], a: &[f64]| {
            let out = be.qkv_rotary_gate_forward(
                &x.to_vec(),
                &widths,
                d,
                rotated.then_some(&a.to_vec()),
                gate,
            );
            dot(&out.qr, &wq)
                + dot(&out.kr, &wk)
                + dot(&out.v, &wv)
                + out.log_gates.map_or(0.0, |g| dot(&g, &wg))
        };
        let out = be.qkv_rotary_gate_forward(&qkv, &widths, d, angles, gate);
        assert_eq!(out.gate_logits.is_some(), gated);
        let g = be.qkv_rotary_gate_backward(
            wq.clone(),
            wk.clone(),
            &out.qr,
            &out.kr,
            angles,
            d,
            out.gate_logits.as_ref().map(|l| (l, &wg)),
        );
        // ∂qkv: the op's column blocks in place (∂v = its weights), zero elsewhere
        let mut dqkv = vec![0.0; qkv.len()];
        for row in 0..rows {
            let o = row * total;
            dqkv[o..o + c].copy_from_slice(&g.dq[row * c..(row + 1) * c]);
            dqkv[o + c..o + 2 * c].copy_from_slice(&g.dk[row * c..(row + 1) * c]);
            dqkv[o + 2 * c..o + 3 * c].copy_from_slice(&wv[row * c..(row + 1) * c]);
            if let Some(dg) = &g.dgate_logits {
                dqkv[o + 3 * c..o + 3 * c + heads]
                    .copy_from_slice(&dg[row * heads..(row + 1) * heads]);
            }
        }
        let n = numerical_grad(&mut |x| loss(x, &ang), &qkv, H);
        assert_close("qkv_rotary_gate ∂qkv", &dqkv, &n, TOL);
        assert_eq!(g.dangles.is_some(), rotated);
        if let Some(da) = &g.dangles {
            let n = numerical_grad(&mut |a| loss(&qkv, a), &ang, H);
            assert_close("qkv_rotary_gate ∂angles", da, &n, TOL);
        }
    }
}

#[test]
fn learned_rotary_at_init_is_fixed_rope() {
    let (b, t, h, d) = (2, 50, 3, 8);
    let logits = vec![rotary::learned_rotary_init_bias(); b * t * h];
    let learned =
        rotary::learned_rotary_angles(&logits, b, t, h, d, RotaryParam::PerHead, 10000.0, None);
    // learned angles at t include the step of token t itself: fixed RoPE at position t + 1
    let fixed: Vec<f64> = rotary::fixed_rotary_angles(b, t, h, d, 10000.0, 1);
    assert!(learned
        .iter()
        .zip(&fixed)
        .all(|(a, b)| (a - b).abs() < 1e-9));
}
