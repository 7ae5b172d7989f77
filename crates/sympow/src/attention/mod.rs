//! Gated symmetric-power attention and its softmax baseline (SPEC §2–§4).
//!
//! One function, three implementations ([`Form`]): the quadratic form (log space, row max),
//! the recurrent form (explicit state S, z — also usable one token at a time through
//! [`RecurrentState`]) and the chunked form (update_state → discumsum → query_state +
//! intra-chunk attention → combine). All take tensors laid out `[batch, time, heads, dim]`
//! and optional log-gates `[batch, time, heads]` (g_t = ln γ_t ≤ 0), and return the output
//! together with the per-row log-normaliser ln(Σ_s a_ts + ε) that the backward pass needs.
//! Softmax has only the quadratic form; it decodes one token at a time from a [`KvCache`].
//!
//! ```
//! use sympow::attention::{attention_forward, AttentionSpec, Form, Shape};
//! let shape = Shape { batch: 1, time: 10, heads: 2, dk: 4, dv: 4 };
//! let spec = AttentionSpec::sympow(2, shape.dk).unwrap();
//! let n = shape.batch * shape.time * shape.heads * shape.dk;
//! let q: Vec<f32> = (0..n).map(|i| (i as f32 * 0.7).sin()).collect();
//! let k: Vec<f32> = (0..n).map(|i| (i as f32 * 1.3).cos()).collect();
//! let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.1).sin()).collect();
//! let quad = attention_forward(&spec, Form::Quadratic, &shape, &q, &k, &v, None);
//! let chunked = attention_forward(&spec, Form::Chunked(4), &shape, &q, &k, &v, None);
//! let rec = attention_forward(&spec, Form::Recurrent, &shape, &q, &k, &v, None);
//! for ((a, b), c) in quad.y.iter().zip(&chunked.y).zip(&rec.y) {
//!     assert!((a - b).abs() < 1e-5 && (a - c).abs() < 1e-5);
//! }
//! ```

pub mod chunked;
pub mod kv_cache;
pub mod phi;
pub mod quadratic;
pub mod recurrent;
pub mod reference;
pub mod tile;

pub use chunked::{chunked_attention_backward, chunked_attention_forward, chunked_final_states};
pub use kv_cache::KvCache;
pub use quadratic::{quadratic_attention_backward, quadratic_attention_forward};
pub use recurrent::{recurrent_attention_forward, RecurrentState};

use crate::float::Float;
use rayon::prelude::*;

/// How a query scores a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// Symmetric power attention: a_ts = (σ q_t·k_s)^p with p even.
    Power(u32),
    /// Softmax attention: a_ts = exp(σ q_t·k_s). Only the quadratic form exists.
    Softmax,
}

/// The attention function: its kernel, the query scale σ and the denominator's ε.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionSpec {
    /// Power or softmax.
    pub kernel: Kernel,
    /// σ, usually 1/√d.
    pub scale: f64,
    /// ε in y_t = Σ a v / (Σ a + ε); 0 for softmax.
    pub eps: f64,
}

/// Why an attention spec is invalid.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AttentionError {
    /// Odd (or zero) powers give signed weights, so the normaliser can vanish.
    #[error("symmetric power p must be a positive even integer, got p = {0}")]
    OddPower(u32),
    /// The scale must be a positive finite number.
    #[error("attention scale must be positive and finite, got {0}")]
    BadScale(f64),
    /// ε must be non-negative and finite.
    #[error("attention epsilon must be non-negative and finite, got {0}")]
    BadEps(f64),
}

/// Default ε of the sympow denominator.
pub const DEFAULT_EPS: f64 = 1e-6;

impl AttentionSpec {
    /// Sympow attention of power `p` for heads of dimension `head_dim`: σ = 1/√d, ε = 1e-6.
    pub fn sympow(p: u32, head_dim: usize) -> Result<Self, AttentionError> {
        Self::new(
            Kernel::Power(p),
            1.0 / (head_dim as f64).sqrt(),
            DEFAULT_EPS,
        )
    }

    /// Softmax attention for heads of dimension `head_dim`: σ = 1/√d.
    pub fn softmax(head_dim: usize) -> Self {
        Self::new(Kernel::Softmax, 1.0 / (head_dim as f64).sqrt(), 0.0).expect("valid softmax spec")
    }

    /// A validated spec.
    pub fn new(kernel: Kernel, scale: f64, eps: f64) -> Result<Self, AttentionError> {
        if let Kernel::Power(p) = kernel {
            if p == 0 || p % 2 == 1 {
                return Err(AttentionError::OddPower(p));
            }
        }
        if !(scale.is_finite() && scale > 0.0) {
            return Err(AttentionError::BadScale(scale));
        }
        if !(eps.is_finite() && eps >= 0.0) {
            return Err(AttentionError::BadEps(eps));
        }
        Ok(AttentionSpec { kernel, scale, eps })
    }

    /// The power p; panics for softmax, which has no state-space forms.
    pub(crate) fn power(&self) -> u32 {
        match self.kernel {
            Kernel::Power(p) => p,
            Kernel::Softmax => panic!("softmax attention has only the quadratic form"),
        }
    }
}

/// Which of the equivalent implementations to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    /// O(T²): every query against every earlier key, in log space.
    Quadratic,
    /// O(T) sequential: the explicit state S_t, z_t. Forward only (inference).
    Recurrent,
    /// O(T): chunks of this many tokens; states between chunks, attention within.
    Chunked(usize),
}

/// Tensor geometry: q and k are `[batch, time, heads, dk]`, v and y `[batch, time, heads, dv]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Sequences.
    pub batch: usize,
    /// Tokens per sequence.
    pub time: usize,
    /// Heads.
    pub heads: usize,
    /// Query/key head dimension d.
    pub dk: usize,
    /// Value head dimension e.
    pub dv: usize,
}

impl Shape {
    fn check<F>(&self, q: &[F], k: &[F], v: &[F], g: Option<&[F]>) {
        let (b, t, h) = (self.batch, self.time, self.heads);
        assert_eq!(
            q.len(),
            b * t * h * self.dk,
            "q must be [batch, time, heads, dk] = {self:?}"
        );
        assert_eq!(
            k.len(),
            b * t * h * self.dk,
            "k must be [batch, time, heads, dk] = {self:?}"
        );
        assert_eq!(
            v.len(),
            b * t * h * self.dv,
            "v must be [batch, time, heads, dv] = {self:?}"
        );
        if let Some(g) = g {
            assert_eq!(
                g.len(),
                b * t * h,
                "log-gates must be [batch, time, heads] = {self:?}"
            );
        }
    }
}

/// Output of a forward pass (`T` a tensor: `Vec<F>` here, a device buffer on a GPU backend).
#[derive(Clone, Debug)]
pub struct AttentionOut<T> {
    /// `[batch, time, heads, dv]`.
    pub y: T,
    /// `[batch, time, heads]`: ln(Σ_s a_ts + ε) in true scale (for softmax, the log-sum-exp).
    pub log_norm: T,
    /// What else the implementation that ran the forward kept for its own backward, so that the
    /// backward need not recompute it (the fused GPU kernels' bf16 operands and chunk states);
    /// `None` for the reference forms. A backward given `None` recomputes.
    pub saved: Option<Saved>,
}

/// Implementation-specific activations of an [`AttentionOut`] (type-erased: only the
/// implementation that made them reads them back).
pub type Saved = std::sync::Arc<dyn std::any::Any + Send + Sync>;

/// Gradients of a backward pass.
#[derive(Clone, Debug)]
pub struct AttentionGrads<T> {
    /// `[batch, time, heads, dk]`.
    pub dq: T,
    /// `[batch, time, heads, dk]`.
    pub dk: T,
    /// `[batch, time, heads, dv]`.
    pub dv: T,
    /// `[batch, time, heads]`, present iff log-gates were given.
    pub dlog_gates: Option<T>,
}

/// Gated attention forward in the chosen form.
pub fn attention_forward<F: Float>(
    spec: &AttentionSpec,
    form: Form,
    shape: &Shape,
    q: &[F],
    k: &[F],
    v: &[F],
    log_gates: Option<&[F]>,
) -> AttentionOut<Vec<F>> {
    match form {
        Form::Quadratic => quadratic_attention_forward(spec, shape, q, k, v, log_gates),
        Form::Recurrent => recurrent_attention_forward(spec, shape, q, k, v, log_gates),
        Form::Chunked(c) => chunked_attention_forward(spec, c, shape, q, k, v, log_gates),
    }
}

/// Gated attention backward: gradients w.r.t. q, k, v and the log-gates given ∂L/∂y.
///
/// `fwd` is the forward's output (any form: they agree). Panics for [`Form::Recurrent`],
/// which exists for inference; train through the chunked form.
pub fn attention_backward<F: Float>(
    spec: &AttentionSpec,
    form: Form,
    shape: &Shape,
    q: &[F],
    k: &[F],
    v: &[F],
    log_gates: Option<&[F]>,
    fwd: &AttentionOut<Vec<F>>,
    dy: &[F],
) -> AttentionGrads<Vec<F>> {
    match form {
        Form::Quadratic => quadratic_attention_backward(spec, shape, q, k, v, log_gates, fwd, dy),
        Form::Chunked(c) => chunked_attention_backward(spec, c, shape, q, k, v, log_gates, fwd, dy),
        Form::Recurrent => panic!("the recurrent form has no backward: use Form::Chunked"),
    }
}

/// One head's slices, gathered from `[batch, time, heads, dim]` into contiguous `[time, dim]`.
pub(crate) struct HeadData<F> {
    pub q: Vec<F>,
    pub k: Vec<F>,
    pub v: Vec<F>,
    pub g: Option<Vec<F>>,
}

pub(crate) fn gather<F: Float>(x: &[F], shape: &Shape, dim: usize, b: usize, h: usize) -> Vec<F> {
    let (t, hs) = (shape.time, shape.heads);
    let mut out = Vec::with_capacity(t * dim);
    for ti in 0..t {
        let o = ((b * t + ti) * hs + h) * dim;
        out.extend_from_slice(&x[o..o + dim]);
    }
    out
}

pub(crate) fn scatter<F: Float>(
    dst: &mut [F],
    src: &[F],
    shape: &Shape,
    dim: usize,
    b: usize,
    h: usize,
) {
    let (t, hs) = (shape.time, shape.heads);
    for ti in 0..t {
        let o = ((b * t + ti) * hs + h) * dim;
        dst[o..o + dim].copy_from_slice(&src[ti * dim..(ti + 1) * dim]);
    }
}

/// Runs `f` on every (batch, head) in parallel and scatters its per-head outputs, each
/// `[time, dims[i]]`, into `[batch, time, heads, dims[i]]` tensors.
pub(crate) fn per_head<F: Float, R>(
    shape: &Shape,
    q: &[F],
    k: &[F],
    v: &[F],
    g: Option<&[F]>,
    dims: &[usize],
    f: R,
) -> Vec<Vec<F>>
where
    R: Fn(HeadData<F>, usize, usize) -> Vec<Vec<F>> + Sync,
{
    shape.check(q, k, v, g);
    let heads: Vec<(usize, usize)> = (0..shape.batch)
        .flat_map(|b| (0..shape.heads).map(move |h| (b, h)))
        .collect();
    let results: Vec<Vec<Vec<F>>> = heads
        .par_iter()
        .map(|&(b, h)| {
            let data = HeadData {
                q: gather(q, shape, shape.dk, b, h),
                k: gather(k, shape, shape.dk, b, h),
                v: gather(v, shape, shape.dv, b, h),
                g: g.map(|g| gather(g, shape, 1, b, h)),
            };
            f(data, b, h)
        })
        .collect();
    let n = shape.batch * shape.time * shape.heads;
    let mut outs: Vec<Vec<F>> = dims.iter().map(|&d| vec![F::zero(); n * d]).collect();
    for (&(b, h), res) in heads.iter().zip(&results) {
        for ((out, r), &d) in outs.iter_mut().zip(res).zip(dims) {
            scatter(out, r, shape, d, b, h);
        }
    }
    outs
}

/// The forward's per-head outputs `[y, log_norm]`, scattered, as an [`AttentionOut`].
pub(crate) fn forward_out<F>(outs: Vec<Vec<F>>) -> AttentionOut<Vec<F>> {
    let [y, log_norm]: [Vec<F>; 2] = outs.try_into().ok().expect("y and log_norm");
    AttentionOut {
        y,
        log_norm,
        saved: None,
    }
}

/// The backward's per-head outputs `[dq, dk, dv, dg]`, scattered, as [`AttentionGrads`].
pub(crate) fn grads_out<F>(outs: Vec<Vec<F>>, gated: bool) -> AttentionGrads<Vec<F>> {
    let [dq, dk, dv, dg]: [Vec<F>; 4] = outs.try_into().ok().expect("dq, dk, dv and dg");
    AttentionGrads {
        dq,
        dk,
        dv,
        dlog_gates: gated.then_some(dg),
    }
}

/// Inclusive cumulative sums of `g`, accumulated in f64. Callers subtract a nearby origin
/// before rounding back to `F`, so gate differences keep full precision at any length.
pub(crate) fn cumsum_f64<F: Float>(g: &[F]) -> Vec<f64> {
    let mut acc = 0.0;
    g.iter()
        .map(|&x| {
            acc += x.f64();
            acc
        })
        .collect()
}

/// Finishes a row: y = num / (den + ε e^{−max}), log_norm = max + ln(den + ε e^{−max}).
pub(crate) fn normalise<F: Float>(num: &mut [F], den: F, max: F, eps: f64) -> F {
    let z = den + F::of(eps) * (-max).exp();
    for x in num.iter_mut() {
        *x /= z;
    }
    max + z.ln()
}
