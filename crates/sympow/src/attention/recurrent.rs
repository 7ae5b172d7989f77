//! The recurrent form (SPEC §3): a fixed-size state per head, O(1) work per token.
//!
//!   S_t = γ_t S_{t−1} + φ(k_t) v̂_tᵀ,   y_t = φ(σq_t)ᵀ S_t[:, :e] / (φ(σq_t)ᵀ S_t[:, e] + ε)
//!
//! with v̂ = [v, 1], so the last column of S is the normaliser state z. This is what
//! generation runs after a chunked prefill.
//!
//! The state is kept in f64 whatever the input precision. The readout φ(σq)ᵀS sums D terms
//! of both signs, so its absolute error is ~ulp·|σq|^p·|k|^p per token, independent of the
//! result: when the normaliser Σa is small (early tokens, q nearly orthogonal to every k), an
//! f32 state gives errors of 1e-3 (p = 2) to 1e-1 (p = 4) relative (measured over 200 seeds
//! by `cargo run --release -p sympow --example form_errors`). In f64 the form is exact to f32
//! rounding, at O(D·e) per token — negligible next to the model's matmuls.

use super::phi::SymPow;
use super::{per_head, AttentionOut, AttentionSpec, HeadData, Shape};
use crate::float::Float;
use std::sync::Arc;

/// The recurrent state of one attention head: S and z, `D × (e+1)` numbers however long the
/// context.
///
/// ```
/// use sympow::attention::{AttentionSpec, RecurrentState};
/// let spec = AttentionSpec::sympow(2, 4).unwrap();
/// let mut st = RecurrentState::<f32>::new(&spec, 4, 3);
/// assert_eq!(st.len(), 10 * 4); // D = C(5, 2) = 10, times e + 1
/// let (y, _log_norm) = st.step(&[1.0, 0.0, 0.5, 0.0], &[1.0, 1.0, 0.0, 0.0], &[1.0, 2.0, 3.0], None);
/// // a single token attends only to itself: y = a·v/(a + ε) with a = (σq·k)² = 0.25
/// assert!((y[0] - 1.0).abs() < 1e-4 && (y[2] - 3.0).abs() < 1e-4);
/// ```
#[derive(Clone, Debug)]
pub struct RecurrentState<F> {
    sp: Arc<SymPow>,
    scale: f64,
    eps: f64,
    e: usize,
    s: Vec<f64>,
    phi: Vec<f64>,
    _f: std::marker::PhantomData<F>,
}

impl<F: Float> RecurrentState<F> {
    /// A zero state for heads with query/key dimension `d` and value dimension `e`.
    pub fn new(spec: &AttentionSpec, d: usize, e: usize) -> Self {
        Self::with_table(Arc::new(SymPow::new(d, spec.power())), spec, e)
    }

    /// Like [`new`](Self::new), sharing an existing φ_p index table.
    pub fn with_table(sp: Arc<SymPow>, spec: &AttentionSpec, e: usize) -> Self {
        let dim = sp.dim;
        RecurrentState {
            sp,
            scale: spec.scale,
            eps: spec.eps,
            e,
            s: vec![0.0; dim * (e + 1)],
            phi: vec![0.0; dim],
            _f: std::marker::PhantomData,
        }
    }

    /// Replaces the state with `[S | z]` (`D × (e+1)`), e.g. from [`super::chunked_final_states`].
    pub fn load(&mut self, state: &[F]) {
        assert_eq!(state.len(), self.s.len(), "state must be D × (e+1)");
        self.s.iter_mut().zip(state).for_each(|(a, b)| *a = b.f64());
    }

    /// Number of state values, D·(e+1).
    pub fn len(&self) -> usize {
        self.s.len()
    }

    /// Always false: a state has D·(e+1) > 0 values.
    pub fn is_empty(&self) -> bool {
        self.s.is_empty()
    }

    /// The state matrix `[S | z]`, `D × (e+1)` row-major.
    pub fn state(&self) -> &[f64] {
        &self.s
    }

    /// Mutable access to `[S | z]` (e.g. to apply an explicit map to it).
    pub fn state_mut(&mut self) -> &mut [f64] {
        &mut self.s
    }

    /// Folds one token in: S ← γS + φ(k)v̂ᵀ.
    pub fn update(&mut self, k: &[F], v: &[F], log_gate: Option<F>) {
        let e1 = self.e + 1;
        if let Some(g) = log_gate {
            let decay = g.f64().exp();
            self.s.iter_mut().for_each(|x| *x *= decay);
        }
        let k64: Vec<f64> = k.iter().map(|x| x.f64()).collect();
        self.sp.forward(&k64, &mut self.phi);
        for (row, &f) in self.s.chunks_exact_mut(e1).zip(&self.phi) {
            for (x, &vc) in row.iter_mut().zip(v) {
                *x += f * vc.f64();
            }
            row[self.e] += f;
        }
    }

    /// Reads the state with a query: returns y and ln(φ(σq)ᵀz + ε).
    pub fn query(&mut self, q: &[F]) -> (Vec<F>, F) {
        let (e, e1) = (self.e, self.e + 1);
        let qs: Vec<f64> = q.iter().map(|&x| x.f64() * self.scale).collect();
        self.sp.forward(&qs, &mut self.phi);
        let mut acc = vec![0.0; e1];
        for (row, &f) in self.s.chunks_exact(e1).zip(&self.phi) {
            for (a, &x) in acc.iter_mut().zip(row) {
                *a += f * x;
            }
        }
        let z = acc[e] + self.eps;
        let y = acc[..e].iter().map(|&x| F::of(x / z)).collect();
        (y, F::of(z.ln()))
    }

    /// One token: update with (k, v, gate), then query. Returns y and its log-normaliser.
    pub fn step(&mut self, q: &[F], k: &[F], v: &[F], log_gate: Option<F>) -> (Vec<F>, F) {
        self.update(k, v, log_gate);
        self.query(q)
    }
}

/// Recurrent-form forward over whole sequences; see [`super::attention_forward`].
pub fn recurrent_attention_forward<F: Float>(
    spec: &AttentionSpec,
    shape: &Shape,
    q: &[F],
    k: &[F],
    v: &[F],
    log_gates: Option<&[F]>,
) -> AttentionOut<Vec<F>> {
    let (t, d, e) = (shape.time, shape.dk, shape.dv);
    let sp = Arc::new(SymPow::new(d, spec.power()));
    let outs = per_head(
        shape,
        q,
        k,
        v,
        log_gates,
        &[e, 1],
        |h: HeadData<F>, _, _| {
            let mut st = RecurrentState::with_table(sp.clone(), spec, e);
            let mut y = Vec::with_capacity(t * e);
            let mut ln = Vec::with_capacity(t);
            for i in 0..t {
                let g = h.g.as_ref().map(|g| g[i]);
                let (yi, li) = st.step(
                    &h.q[i * d..(i + 1) * d],
                    &h.k[i * d..(i + 1) * d],
                    &h.v[i * e..(i + 1) * e],
                    g,
                );
                y.extend(yi);
                ln.push(li);
            }
            vec![y, ln]
        },
    );
    super::forward_out(outs)
}
