//! The [`Backend`] trait: the ops the model is written against, each with an explicit forward
//! and backward, and [`CpuBackend`], the reference implementation.
//!
//! A backend owns its tensors (host vectors on the CPU, device buffers on CUDA) and exposes
//! them to the model only through these ops, so the model code — forward, then backward in
//! reverse order, as in llm.c — is the same on every device. Shapes travel explicitly as
//! arguments; a tensor is a flat buffer.

use crate::attention::{self, AttentionSpec, Form, Shape};
pub use crate::attention::{AttentionGrads, AttentionOut, Saved};
use rayon::prelude::*;

/// What a linear layer's forward hands its backward besides the input itself: a backend's
/// own form of the input as a product operand (the CUDA backend's bf16 copy, so that the
/// backward does not round the input again); None on the CPU.
pub type LinearSaved = Option<Saved>;
use crate::float::Float;
pub use crate::ops::adamw::{AdamWConfig, AdamWParam};
pub use crate::ops::layer_norm::LayerNormSaved;
use crate::ops::rotary::RotaryParam;
use crate::ops::*;
use std::marker::PhantomData;

/// An MLP's parameters ([`Backend::mlp_forward`]): fc `[hidden, c]` and its bias, fc2
/// `[c, hidden]` and its bias.
pub struct MlpWeights<'a, T> {
    pub fc_w: &'a T,
    pub fc_b: &'a T,
    pub fc2_w: &'a T,
    pub fc2_b: &'a T,
}

// by hand: derived, they would ask T to be Copy too
impl<T> Clone for MlpWeights<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for MlpWeights<'_, T> {}

/// Where [`Backend::mlp_backward`] adds an MLP's gradients.
pub struct MlpGrads<'a, T> {
    pub fc_w: &'a mut T,
    pub fc_b: &'a mut T,
    pub fc2_w: &'a mut T,
    pub fc2_b: &'a mut T,
}

/// The attention's inputs made from the fused q/k/v projection's output by
/// [`Backend::qkv_rotary_gate_forward`].
pub struct QkvInputs<T> {
    /// q and k, rotated when the forward was given angles.
    pub qr: T,
    pub kr: T,
    pub v: T,
    /// The gate's column block and its logsigmoid (the log-gates), when the forward named one.
    pub gate_logits: Option<T>,
    pub log_gates: Option<T>,
}

/// What [`Backend::qkv_rotary_gate_backward`] returns.
pub struct QkvInputGrads<T> {
    /// ∂q and ∂k before the rotation.
    pub dq: T,
    pub dk: T,
    /// ∂angles, q's and k's parts summed (when rotated).
    pub dangles: Option<T>,
    /// ∂gate logits (when gated).
    pub dgate_logits: Option<T>,
}

/// What an MLP's forward hands its backward.
pub struct MlpSaved<T> {
    /// fc's output and the GELU's, where the backend keeps them as tensors (None: a GPU
    /// backend's bf16 copies in `fc_saved`/`fc2_saved` stand for them).
    pub hidden: Option<(T, T)>,
    /// fc's [`LinearSaved`] (its input's operand copy).
    pub fc_saved: LinearSaved,
    /// fc2's (its input's operand copy: the GELU's output), or a backend's own record of the
    /// hidden layer.
    pub fc2_saved: LinearSaved,
}

/// [`Backend::mlp_forward`] as its linear and GELU ops (what a backend without a fused form
/// runs).
pub fn mlp_forward_ops<B: Backend + ?Sized>(
    be: &B,
    x: &B::Tensor,
    w: MlpWeights<'_, B::Tensor>,
    c: usize,
    hidden: usize,
    residual: Option<&B::Tensor>,
) -> (B::Tensor, MlpSaved<B::Tensor>) {
    let (h, fc_saved) = be.linear_forward(x, w.fc_w, Some(w.fc_b), c, hidden);
    let g = be.gelu_forward(&h);
    let (y, fc2_saved) = match residual {
        Some(r) => be.linear_residual_forward(&g, w.fc2_w, Some(w.fc2_b), r, hidden, c),
        None => be.linear_forward(&g, w.fc2_w, Some(w.fc2_b), hidden, c),
    };
    let saved = MlpSaved {
        hidden: Some((h, g)),
        fc_saved,
        fc2_saved,
    };
    (y, saved)
}

/// [`Backend::mlp_backward`] as its ops, after [`mlp_forward_ops`].
#[allow(clippy::too_many_arguments)]
pub fn mlp_backward_ops<B: Backend + ?Sized>(
    be: &B,
    x: &B::Tensor,
    dy: &B::Tensor,
    w: MlpWeights<'_, B::Tensor>,
    c: usize,
    hidden: usize,
    saved: &MlpSaved<B::Tensor>,
    g: MlpGrads<'_, B::Tensor>,
) -> B::Tensor {
    let (h, gl) = saved
        .hidden
        .as_ref()
        .expect("an MLP's backward runs under the forward's matmul precision");
    let (fc2, fc) = (&saved.fc2_saved, &saved.fc_saved);
    let dg = be.linear_backward(gl, w.fc2_w, dy, hidden, c, g.fc2_w, Some(g.fc2_b), fc2);
    let dh = be.gelu_backward(h, &dg);
    be.linear_backward(x, w.fc_w, &dh, c, hidden, g.fc_w, Some(g.fc_b), fc)
}

/// Time spent in one op while profiling ([`Backend::set_profiling`]).
#[derive(Clone, Debug, PartialEq)]
pub struct ProfileRow {
    /// The `Backend` method.
    pub op: &'static str,
    /// Calls.
    pub calls: u64,
    /// Wall seconds, the device synchronised before and after each call.
    pub seconds: f64,
}

/// Memory a generation state holds on its device: what serving a batch costs beside the
/// weights (a sympow state is the same at every context; a KV cache grows with it).
pub trait Footprint {
    /// Bytes allocated.
    fn bytes(&self) -> usize;
}

impl<F: Float> Footprint for Vec<attention::RecurrentState<F>> {
    fn bytes(&self) -> usize {
        self.iter()
            .map(|s| s.len() * std::mem::size_of::<f64>())
            .sum()
    }
}

impl<F: Float> Footprint for attention::KvCache<F> {
    fn bytes(&self) -> usize {
        attention::KvCache::bytes(self)
    }
}

/// The ops of a conformal-sympow transformer, forward and backward.
///
/// ```
/// use sympow::backend::{Backend, CpuBackend};
/// let be = CpuBackend::<f32>::new();
/// let x = be.upload(&[1.0, 2.0, 3.0, 4.0]); // 2 rows of 2
/// let w = be.upload(&[1.0, 0.0, 0.0, 1.0, 1.0, 1.0]); // 3 outputs × 2 inputs
/// let (y, _) = be.linear_forward(&x, &w, None, 2, 3);
/// assert_eq!(be.download(&y), vec![1.0, 2.0, 3.0, 3.0, 4.0, 7.0]);
/// ```
pub trait Backend: Send + Sync {
    /// The host scalar type at the API boundary (`f32`, or `f64` for reference checks).
    type Scalar: Float;
    /// A flat buffer owned by the backend.
    type Tensor: Clone + Send + Sync;
    /// Recurrent sympow states of a batch of sequences being generated: one `D × (e+1)`
    /// matrix `[S | z]` per sequence and head, kept in f64 (see
    /// [`RecurrentState`](crate::attention::RecurrentState) for why).
    type DecodeState: Send + Sync + Footprint;
    /// Softmax's KV caches of a batch of sequences being generated: every head's rotated keys
    /// and values so far (see [`KvCache`](crate::attention::KvCache)).
    type KvCache: Send + Sync + Footprint;
    /// A sequence of ops recorded for replay ([`record`](Self::record)): a CUDA graph. The CPU
    /// backend records nothing (`Infallible`).
    type Recording: Send + Sync;

    /// Human-readable device name.
    fn name(&self) -> String;

    // ---- memory -------------------------------------------------------------------------
    /// Copies host data in.
    fn upload(&self, data: &[Self::Scalar]) -> Self::Tensor;
    /// Copies a tensor out.
    fn download(&self, t: &Self::Tensor) -> Vec<Self::Scalar>;
    /// Copies a tensor out into `out` (of the tensor's length), a buffer the caller keeps: a
    /// decoder's logits every step, without a fresh allocation (and its page faults) each time.
    fn download_into(&self, t: &Self::Tensor, out: &mut [Self::Scalar]) {
        out.copy_from_slice(&self.download(t));
    }
    /// A zero tensor of `len` elements.
    fn zeros(&self, len: usize) -> Self::Tensor;
    /// `dst = src`, in place (same length): a buffer that a [`Recording`](Self::Recording)
    /// reads or writes keeps its address.
    fn copy_into(&self, dst: &mut Self::Tensor, src: &Self::Tensor);
    /// Sets every tensor of `xs` to 0 in place (the gradient buffers at each step's start; a
    /// GPU backend does them all in one launch, where fresh `zeros` cost one allocation and
    /// one memset each).
    fn zero_all(&self, xs: &mut [&mut Self::Tensor]);
    /// `dst += src` (residual connections, gradient accumulation).
    fn add_assign(&self, dst: &mut Self::Tensor, src: &Self::Tensor);
    /// Elementwise product `a ⊙ b` (dropout masks).
    fn mul(&self, a: &Self::Tensor, b: &Self::Tensor) -> Self::Tensor;
    /// `[rows, c]`: `row` (`[c]`) repeated (per-head constants such as a learned gate).
    fn broadcast_rows(&self, row: &Self::Tensor, rows: usize) -> Self::Tensor;
    /// `[c]`: the column sums of `x` (`[rows, c]`), the backward of [`broadcast_rows`](Self::broadcast_rows).
    fn sum_rows(&self, x: &Self::Tensor, c: usize) -> Self::Tensor;
    /// Σ x², accumulated in f64 (gradient-norm clipping).
    fn sum_squares(&self, x: &Self::Tensor) -> f64;
    /// [`sum_squares`](Self::sum_squares) of each tensor; a GPU backend reads them all back in
    /// one transfer (one synchronisation per step for gradient clipping, not one per tensor).
    fn sum_squares_each(&self, xs: &[&Self::Tensor]) -> Vec<f64> {
        xs.iter().map(|x| self.sum_squares(x)).collect()
    }
    /// Splits each row of `x` (`[rows, Σ widths]`) into column blocks of the given widths.
    fn split_columns(&self, x: &Self::Tensor, widths: &[usize]) -> Vec<Self::Tensor>;
    /// Inverse of [`split_columns`](Self::split_columns).
    fn concat_columns(&self, parts: &[&Self::Tensor], widths: &[usize]) -> Self::Tensor;

    // ---- dense layers -----------------------------------------------------------------------
    /// y = x Wᵀ + b; x `[rows, cin]`, W `[cout, cin]`. Also returns what the backward can reuse
    /// of the forward's work on x (a GPU's bf16 copy of it).
    fn linear_forward(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        b: Option<&Self::Tensor>,
        cin: usize,
        cout: usize,
    ) -> (Self::Tensor, LinearSaved);
    /// y = x Wᵀ + b + `residual` (`[rows, cout]`): a layer whose output is added to the
    /// residual stream. A GPU reads the residual in the product's epilogue; this default adds it
    /// after [`linear_forward`](Self::linear_forward). The backward is the layer's own (the
    /// residual's gradient is ∂y).
    #[allow(clippy::too_many_arguments)]
    fn linear_residual_forward(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        b: Option<&Self::Tensor>,
        residual: &Self::Tensor,
        cin: usize,
        cout: usize,
    ) -> (Self::Tensor, LinearSaved) {
        let (mut y, saved) = self.linear_forward(x, w, b, cin, cout);
        self.add_assign(&mut y, residual);
        (y, saved)
    }
    /// Returns ∂x; adds into ∂W, ∂b. `saved` is the forward's (or None).
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        dy: &Self::Tensor,
        cin: usize,
        cout: usize,
        dw: &mut Self::Tensor,
        db: Option<&mut Self::Tensor>,
        saved: &LinearSaved,
    ) -> Self::Tensor;
    /// [`linear_backward`](Self::linear_backward) of a layer whose ∂y arrives as column blocks
    /// (the fused q/k/v/gate/rotary projection's parts): [`concat_columns`](Self::concat_columns)
    /// first; a GPU backend under bf16 products writes the blocks straight into the products'
    /// bf16 operand, never forming ∂y in f32.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward_columns(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        dy_parts: &[&Self::Tensor],
        widths: &[usize],
        cin: usize,
        dw: &mut Self::Tensor,
        db: Option<&mut Self::Tensor>,
        saved: &LinearSaved,
    ) -> Self::Tensor {
        let dy = self.concat_columns(dy_parts, widths);
        let cout = widths.iter().sum();
        self.linear_backward(x, w, &dy, cin, cout, dw, db, saved)
    }
    /// Layer norm over rows of `c`, with optional affine.
    fn layer_norm_forward(
        &self,
        x: &Self::Tensor,
        c: usize,
        w: Option<&Self::Tensor>,
        b: Option<&Self::Tensor>,
    ) -> (Self::Tensor, LayerNormSaved<Self::Tensor>);
    /// Returns ∂x; adds into ∂w, ∂b.
    fn layer_norm_backward(
        &self,
        x: &Self::Tensor,
        dy: &Self::Tensor,
        c: usize,
        w: Option<&Self::Tensor>,
        saved: &LayerNormSaved<Self::Tensor>,
        dw: Option<&mut Self::Tensor>,
        db: Option<&mut Self::Tensor>,
    ) -> Self::Tensor;
    /// [`layer_norm_backward`](Self::layer_norm_backward) with ∂x added into `dx` (the
    /// residual stream's gradient, where a pre-norm block's input gradient goes) instead of
    /// returned: a GPU backend adds it in the same kernel, the same f32 sum as `add_assign`.
    #[allow(clippy::too_many_arguments)]
    fn layer_norm_backward_add(
        &self,
        x: &Self::Tensor,
        dy: &Self::Tensor,
        c: usize,
        w: Option<&Self::Tensor>,
        saved: &LayerNormSaved<Self::Tensor>,
        dw: Option<&mut Self::Tensor>,
        db: Option<&mut Self::Tensor>,
        dx: &mut Self::Tensor,
    ) {
        let d = self.layer_norm_backward(x, dy, c, w, saved, dw, db);
        self.add_assign(dx, &d);
    }
    /// GELU (tanh approximation).
    fn gelu_forward(&self, x: &Self::Tensor) -> Self::Tensor;
    /// ∂x from ∂y.
    fn gelu_backward(&self, x: &Self::Tensor, dy: &Self::Tensor) -> Self::Tensor;
    /// Rows of `table` (`[vocab, c]`) for `ids`.
    fn embedding_forward(&self, table: &Self::Tensor, ids: &[u32], c: usize) -> Self::Tensor;
    /// Adds ∂table.
    fn embedding_backward(
        &self,
        dtable: &mut Self::Tensor,
        ids: &[u32],
        dout: &Self::Tensor,
        c: usize,
    );

    // ---- attention-specific -----------------------------------------------------------------
    /// Fixed RoPE angles `[B,T,H,d/2]` for positions `start..start+T`.
    fn fixed_rotary_angles(
        &self,
        batch: usize,
        time: usize,
        heads: usize,
        head_dim: usize,
        base: f64,
        start: usize,
    ) -> Self::Tensor;
    /// Learned rotary angles `[B,T,H,d/2]` from logits `[B,T,H,R]`, continuing from `start`.
    fn learned_rotary_angles(
        &self,
        logits: &Self::Tensor,
        shape: &Shape,
        param: RotaryParam,
        base: f64,
        start: Option<&Self::Tensor>,
    ) -> Self::Tensor;
    /// ∂logits from ∂angles.
    fn learned_rotary_angles_backward(
        &self,
        logits: &Self::Tensor,
        dangles: &Self::Tensor,
        shape: &Shape,
        param: RotaryParam,
        base: f64,
    ) -> Self::Tensor;
    /// Rotates pairs of `x` (`[rows, d]`) by `angles` (`[rows, d/2]`).
    fn rotary_forward(
        &self,
        x: &Self::Tensor,
        angles: &Self::Tensor,
        head_dim: usize,
    ) -> Self::Tensor;
    /// (∂x, ∂angles) from ∂y, given the forward's output y.
    fn rotary_backward(
        &self,
        dy: &Self::Tensor,
        y: &Self::Tensor,
        angles: &Self::Tensor,
        head_dim: usize,
    ) -> (Self::Tensor, Self::Tensor);
    /// g = logsigmoid(a).
    fn log_gate_forward(&self, logits: &Self::Tensor) -> Self::Tensor;
    /// ∂a from ∂g.
    fn log_gate_backward(&self, logits: &Self::Tensor, dg: &Self::Tensor) -> Self::Tensor;
    /// Column block `i` of `x` (`[rows, Σ widths]`), as [`split_columns`](Self::split_columns)
    /// would return it, without copying the others.
    fn column_block(&self, x: &Self::Tensor, widths: &[usize], i: usize) -> Self::Tensor {
        self.split_columns(x, widths).swap_remove(i)
    }
    /// The attention's inputs from the fused q/k/v projection's output `qkv` (`[rows, Σ
    /// widths]`, its first three column blocks q, k and v, `heads·head_dim` wide): q and k
    /// rotated by `angles` (`[rows, heads·head_dim/2]`) when given, and — when `gate` names a
    /// column block — the gate's logits and the log-gates, their logsigmoid. The other blocks
    /// (rotary logits, padding) are not copied. One pass over `qkv` on a GPU, where the
    /// composition of [`split_columns`](Self::split_columns),
    /// [`rotary_forward`](Self::rotary_forward) and
    /// [`log_gate_forward`](Self::log_gate_forward) (this default, the reference) reads and
    /// writes q and k twice and launches a kernel a block.
    fn qkv_rotary_gate_forward(
        &self,
        qkv: &Self::Tensor,
        widths: &[usize],
        head_dim: usize,
        angles: Option<&Self::Tensor>,
        gate: Option<usize>,
    ) -> QkvInputs<Self::Tensor> {
        let mut parts: Vec<Option<Self::Tensor>> = self
            .split_columns(qkv, widths)
            .into_iter()
            .map(Some)
            .collect();
        let gate_logits = gate.map(|i| parts[i].take().expect("the gate is a block of its own"));
        let mut take = |i: usize| parts[i].take().unwrap();
        let (q, k, v) = (take(0), take(1), take(2));
        let (qr, kr) = match angles {
            Some(a) => (
                self.rotary_forward(&q, a, head_dim),
                self.rotary_forward(&k, a, head_dim),
            ),
            None => (q, k),
        };
        let log_gates = gate_logits.as_ref().map(|g| self.log_gate_forward(g));
        QkvInputs {
            qr,
            kr,
            v,
            gate_logits,
            log_gates,
        }
    }
    /// Backward of [`qkv_rotary_gate_forward`](Self::qkv_rotary_gate_forward) from the
    /// attention's ∂q and ∂k (of the rotated q and k, which the forward returned as `qr`, `kr`)
    /// and, when gated, the gate's logits with ∂log-gates (a learned gate's broadcast logits
    /// too). One pass on a GPU; this default composes
    /// [`rotary_backward`](Self::rotary_backward) and
    /// [`log_gate_backward`](Self::log_gate_backward).
    #[allow(clippy::too_many_arguments)]
    fn qkv_rotary_gate_backward(
        &self,
        dqr: Self::Tensor,
        dkr: Self::Tensor,
        qr: &Self::Tensor,
        kr: &Self::Tensor,
        angles: Option<&Self::Tensor>,
        head_dim: usize,
        gate: Option<(&Self::Tensor, &Self::Tensor)>,
    ) -> QkvInputGrads<Self::Tensor> {
        let (dq, dk, dangles) = match angles {
            Some(a) => {
                let (dq, mut dang) = self.rotary_backward(&dqr, qr, a, head_dim);
                let (dk, dang_k) = self.rotary_backward(&dkr, kr, a, head_dim);
                self.add_assign(&mut dang, &dang_k);
                (dq, dk, Some(dang))
            }
            None => (dqr, dkr, None),
        };
        let dgate_logits = gate.map(|(logits, dlg)| self.log_gate_backward(logits, dlg));
        QkvInputGrads {
            dq,
            dk,
            dangles,
            dgate_logits,
        }
    }
    /// Gated sympow or softmax attention.
    fn attention_forward(
        &self,
        spec: &AttentionSpec,
        form: Form,
        shape: &Shape,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        log_gates: Option<&Self::Tensor>,
    ) -> AttentionOut<Self::Tensor>;
    /// Its backward.
    fn attention_backward(
        &self,
        spec: &AttentionSpec,
        form: Form,
        shape: &Shape,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        log_gates: Option<&Self::Tensor>,
        out: &AttentionOut<Self::Tensor>,
        dy: &Self::Tensor,
    ) -> AttentionGrads<Self::Tensor>;

    // ---- generation ---------------------------------------------------------------------------
    /// Decode states for `shape.batch` sequences of `shape.heads` heads from `states`
    /// (`[batch·heads, D, e+1]`, e.g. the prefill's final chunked states).
    fn decode_state(
        &self,
        spec: &AttentionSpec,
        shape: &Shape,
        states: &[f64],
    ) -> Self::DecodeState;
    /// Decode states after a prefill: each (sequence, head)'s `[S | z]` after the `shape.time`
    /// tokens of keys `k` and values `v` (`[batch, time, heads, d]`, the forward's rotated keys
    /// and its values) and log gates (`[batch, time, heads]`), S = Σ_t (Π_{s>t} γ_s)
    /// φ(k_t)[v_t, 1]ᵀ in f64 (SPEC §9). Sequence i of the result continues sequence
    /// `seqs[i]` of the inputs (a prompt prefilled once for several samples). The default
    /// computes them on the host with the chunked algorithm (chunks of `chunk`,
    /// [`chunked_final_states`](crate::attention::chunked_final_states)); a GPU keeps them
    /// there.
    #[allow(clippy::too_many_arguments)]
    fn sympow_prefill_state(
        &self,
        spec: &AttentionSpec,
        shape: &Shape,
        chunk: usize,
        k: &Self::Tensor,
        v: &Self::Tensor,
        log_gates: Option<&Self::Tensor>,
        seqs: &[usize],
    ) -> Self::DecodeState {
        let f64s =
            |t: &Self::Tensor| -> Vec<f64> { self.download(t).iter().map(|x| x.f64()).collect() };
        let g = log_gates.map(f64s);
        let states =
            attention::chunked_final_states(spec, chunk, shape, &f64s(k), &f64s(v), g.as_deref());
        let h = shape.heads;
        let states: Vec<f64> = seqs
            .iter()
            .flat_map(|&s| states[s * h..(s + 1) * h].concat())
            .collect();
        let one = Shape {
            batch: seqs.len(),
            time: 1,
            ..*shape
        };
        self.decode_state(spec, &one, &states)
    }
    /// The sequences of `parts` (decode states as [`decode_state`](Self::decode_state) or
    /// [`sympow_prefill_state`](Self::sympow_prefill_state) made them, of one spec and shape)
    /// as one batch, in order: a recurrent state does not depend on how many tokens made it,
    /// so decoders of prompts of different lengths can step together.
    fn concat_decode_states(&self, parts: Vec<Self::DecodeState>) -> Self::DecodeState;
    /// One token of sympow attention per sequence and head, in the recurrent form (SPEC §9):
    /// S ← γS + φ(k)[v, 1]ᵀ, then y = φ(σq)ᵀS[:, :e] / (φ(σq)ᵀS[:, e] + ε). q, k are
    /// `[batch, heads, d]`, v `[batch, heads, e]`, log gates `[batch, heads]`; returns y
    /// `[batch, heads, e]`. Its cost is independent of the context length.
    fn sympow_decode_step(
        &self,
        spec: &AttentionSpec,
        state: &mut Self::DecodeState,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        log_gates: Option<&Self::Tensor>,
    ) -> Self::Tensor;
    /// KV caches for `shape.batch` sequences of `shape.heads` heads holding their first
    /// `shape.time` tokens: `keys` `[batch, time, heads, dk]`, `values` `[batch, time, heads,
    /// dv]` and, for gated attention, `log_gates` `[batch, time, heads]` (the prefill's rotated
    /// keys, its values and gates, as the forward lays them out). Softmax decodes from one;
    /// sympow does where its recurrent state would be larger
    /// ([`DecodeForm`](crate::inference::DecodeForm)).
    fn kv_cache(
        &self,
        spec: &AttentionSpec,
        shape: &Shape,
        keys: &Self::Tensor,
        values: &Self::Tensor,
        log_gates: Option<&Self::Tensor>,
    ) -> Self::KvCache;
    /// One token of attention per sequence and head from a KV cache (the quadratic form's last
    /// row, softmax or power): appends k (`[batch, heads, dk]`), v (`[batch, heads, dv]`) and,
    /// for a gated cache, the log gates (`[batch, heads]`) to the cache and attends over it
    /// with q (`[batch, heads, dk]`); returns y `[batch, heads, dv]`. Its cost grows linearly
    /// with the context.
    fn kv_cache_decode_step(
        &self,
        spec: &AttentionSpec,
        cache: &mut Self::KvCache,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        log_gates: Option<&Self::Tensor>,
    ) -> Self::Tensor;
    /// Room in `cache` for `more` tokens a sequence after the `len` each holds, without moving
    /// it; returns whether it moved. A step recorded over the cache ([`record`](Self::record))
    /// appends to and reads it where it was when recorded, so a decoder makes room before it
    /// records and before each replay, and records anew when the cache moved. `len` is the
    /// decoder's count, which replays advance unseen by the ops. The default does nothing: a
    /// backend that does not record grows its caches in the step itself.
    fn kv_cache_reserve(&self, _cache: &mut Self::KvCache, _len: usize, _more: usize) -> bool {
        false
    }

    // ---- loss and optimiser -------------------------------------------------------------
    /// Per-row cross-entropy of `logits` (`[rows, row_len]`) over their first `vocab`
    /// columns (the rest is the LM head's alignment padding, outside the softmax).
    fn cross_entropy_forward(
        &self,
        logits: &Self::Tensor,
        targets: &[u32],
        vocab: usize,
        row_len: usize,
    ) -> Self::Tensor;
    /// ∂logits for L = Σ dloss·loss (0 in the padding columns), given the forward's `losses`.
    fn cross_entropy_backward(
        &self,
        logits: &Self::Tensor,
        targets: &[u32],
        losses: &Self::Tensor,
        dloss: &Self::Tensor,
        vocab: usize,
        row_len: usize,
    ) -> Self::Tensor;
    /// The LM head's backward from its loss: ∂x for x `[rows, cin]` → logits `[rows, row_len]`
    /// = x Wᵀ → cross-entropy over the first `vocab` columns, adding into ∂W (no bias).
    /// [`cross_entropy_backward`](Self::cross_entropy_backward) then
    /// [`linear_backward`](Self::linear_backward); a GPU backend fuses the step between them
    /// (∂logits, the step's largest tensor, written once in the products' bf16, never in f32).
    #[allow(clippy::too_many_arguments)]
    fn classifier_backward(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        logits: &Self::Tensor,
        targets: &[u32],
        losses: &Self::Tensor,
        dloss: &Self::Tensor,
        (cin, vocab, row_len): (usize, usize, usize),
        dw: &mut Self::Tensor,
        saved: &LinearSaved,
    ) -> Self::Tensor {
        let dlogits = self.cross_entropy_backward(logits, targets, losses, dloss, vocab, row_len);
        self.linear_backward(x, w, &dlogits, cin, row_len, dw, None, saved)
    }
    /// The MLP of a block, y = fc2(GELU(fc(x))) with biases, plus `residual` when given (as
    /// [`linear_residual_forward`](Self::linear_residual_forward) adds it); x `[rows, c]`, the
    /// hidden layer `[rows, hidden]`. The linear and GELU ops in turn; a GPU backend under bf16
    /// products keeps the hidden activations (the block's largest) in bf16 only — the
    /// products' operand copies, written once — instead of f32 tensors rounded again for every
    /// product.
    fn mlp_forward(
        &self,
        x: &Self::Tensor,
        w: MlpWeights<'_, Self::Tensor>,
        c: usize,
        hidden: usize,
        residual: Option<&Self::Tensor>,
    ) -> (Self::Tensor, MlpSaved<Self::Tensor>) {
        mlp_forward_ops(self, x, w, c, hidden, residual)
    }
    /// Whether the hidden activations an MLP's forward kept (fc's output and the GELU's, in
    /// whatever form the backend keeps them) are all finite: where a diverging run first went
    /// wrong ([`crate::model::Model::locate_non_finite`]).
    fn mlp_hidden_finite(&self, saved: &MlpSaved<Self::Tensor>) -> bool {
        saved
            .hidden
            .as_ref()
            .is_none_or(|(h, g)| self.sum_squares_each(&[h, g]).iter().all(|s| s.is_finite()))
    }
    /// Its backward: returns ∂x; adds into the four gradients.
    #[allow(clippy::too_many_arguments)]
    fn mlp_backward(
        &self,
        x: &Self::Tensor,
        dy: &Self::Tensor,
        w: MlpWeights<'_, Self::Tensor>,
        c: usize,
        hidden: usize,
        saved: &MlpSaved<Self::Tensor>,
        g: MlpGrads<'_, Self::Tensor>,
    ) -> Self::Tensor {
        mlp_backward_ops(self, x, dy, w, c, hidden, saved, g)
    }
    /// One AdamW step (1-based `step`) of every tensor in `params`, in place, each gradient
    /// multiplied by `grad_scale` first (global-norm clipping; 1 leaves it as it is). A GPU
    /// backend updates them all in one launch.
    fn adamw_step(&self, step: u64, grad_scale: f64, params: &mut [AdamWParam<'_, Self::Tensor>]);

    // ---- weights held for decoding ------------------------------------------------------
    /// Keeps each of `weights` in the form the matrix products read (a GPU backend: their bf16
    /// copies, under bf16 products) until [`release_weights`](Self::release_weights), so that
    /// the products stop converting them at every call: for one sequence's decode step the
    /// conversions move more bytes than the products. Holds count (two holds, two releases).
    /// The caller must not change a tensor while it is held, nor drop it before releasing it.
    fn hold_weights(&self, _weights: &[&Self::Tensor]) {}
    /// Ends one [`hold_weights`](Self::hold_weights) of each of `weights`.
    fn release_weights(&self, _weights: &[&Self::Tensor]) {}

    // ---- recording ----------------------------------------------------------------------
    /// Records the ops that `ops` calls, without running them, for [`replay`](Self::replay) to
    /// run again and again at the cost of one launch: a decode step of one sequence is a chain
    /// of a few hundred small kernels, bound by launching them one by one. A replay reads and
    /// writes the very buffers the ops were given when recorded — the caller keeps them alive
    /// and unmoved and puts each replay's inputs into them ([`copy_into`](Self::copy_into)),
    /// and it keeps the backend's settings of when it was made. So `ops` must not move data
    /// between host and device, and must not drop a tensor made before recording began (the
    /// tensors it makes itself it may). None where the backend cannot record (the CPU's
    /// default), or did not manage to: then nothing ran, and the caller runs the ops itself.
    fn record(&self, _ops: &mut dyn FnMut()) -> Option<Self::Recording> {
        None
    }
    /// Runs a [`record`](Self::record)ed sequence of ops once more.
    fn replay(&self, recording: &Self::Recording);

    // ---- diagnostics --------------------------------------------------------------------
    /// Starts per-op timing (clearing earlier rows) or stops it; returns false if this
    /// backend cannot time its ops (`sympow bench train --profile`).
    fn set_profiling(&self, _on: bool) -> bool {
        false
    }
    /// Time per op since profiling started, most first.
    fn profile(&self) -> Vec<ProfileRow> {
        Vec::new()
    }
}

/// The CPU backend: pure Rust, `gemm` for matrix products, `rayon` for parallel loops.
/// At `F = f32` it is what runs; at `F = f64` it is the reference.
#[derive(Clone, Debug, Default)]
pub struct CpuBackend<F> {
    _f: PhantomData<F>,
}

impl<F: Float> CpuBackend<F> {
    /// The CPU backend (uses rayon's global thread pool).
    pub fn new() -> Self {
        CpuBackend { _f: PhantomData }
    }
}

impl<F: Float> Backend for CpuBackend<F> {
    type Scalar = F;
    type Tensor = Vec<F>;
    type DecodeState = Vec<attention::RecurrentState<F>>;
    type KvCache = attention::KvCache<F>;
    type Recording = std::convert::Infallible;

    fn name(&self) -> String {
        format!(
            "cpu ({} threads, {})",
            rayon::current_num_threads(),
            std::any::type_name::<F>()
        )
    }
    fn upload(&self, data: &[F]) -> Vec<F> {
        data.to_vec()
    }
    fn download(&self, t: &Vec<F>) -> Vec<F> {
        t.clone()
    }
    fn download_into(&self, t: &Vec<F>, out: &mut [F]) {
        out.copy_from_slice(t);
    }
    fn zeros(&self, len: usize) -> Vec<F> {
        vec![F::zero(); len]
    }
    fn copy_into(&self, dst: &mut Vec<F>, src: &Vec<F>) {
        dst.copy_from_slice(src);
    }
    fn zero_all(&self, xs: &mut [&mut Vec<F>]) {
        xs.iter_mut().for_each(|x| x.fill(F::zero()));
    }
    fn add_assign(&self, dst: &mut Vec<F>, src: &Vec<F>) {
        assert_eq!(dst.len(), src.len(), "add_assign: length mismatch");
        dst.iter_mut().zip(src).for_each(|(a, &b)| *a += b);
    }
    fn mul(&self, a: &Vec<F>, b: &Vec<F>) -> Vec<F> {
        assert_eq!(a.len(), b.len(), "mul: length mismatch");
        a.iter().zip(b).map(|(&x, &y)| x * y).collect()
    }
    fn broadcast_rows(&self, row: &Vec<F>, rows: usize) -> Vec<F> {
        row.repeat(rows)
    }
    fn sum_rows(&self, x: &Vec<F>, c: usize) -> Vec<F> {
        let mut out = vec![F::zero(); c];
        for r in x.chunks_exact(c) {
            out.iter_mut().zip(r).for_each(|(a, &b)| *a += b);
        }
        out
    }
    fn sum_squares(&self, x: &Vec<F>) -> f64 {
        x.iter().map(|v| v.f64() * v.f64()).sum()
    }
    fn split_columns(&self, x: &Vec<F>, widths: &[usize]) -> Vec<Vec<F>> {
        let total: usize = widths.iter().sum();
        let rows = x.len() / total;
        let mut parts: Vec<Vec<F>> = widths
            .iter()
            .map(|&w| Vec::with_capacity(rows * w))
            .collect();
        for row in x.chunks_exact(total) {
            let mut o = 0;
            for (p, &w) in parts.iter_mut().zip(widths) {
                p.extend_from_slice(&row[o..o + w]);
                o += w;
            }
        }
        parts
    }
    fn column_block(&self, x: &Vec<F>, widths: &[usize], i: usize) -> Vec<F> {
        let (total, col0): (usize, usize) = (widths.iter().sum(), widths[..i].iter().sum());
        x.chunks_exact(total)
            .flat_map(|row| &row[col0..col0 + widths[i]])
            .copied()
            .collect()
    }
    fn concat_columns(&self, parts: &[&Vec<F>], widths: &[usize]) -> Vec<F> {
        let rows = parts.first().map_or(0, |p| p.len() / widths[0].max(1));
        let mut out = Vec::with_capacity(rows * widths.iter().sum::<usize>());
        for r in 0..rows {
            for (p, &w) in parts.iter().zip(widths) {
                out.extend_from_slice(&p[r * w..(r + 1) * w]);
            }
        }
        out
    }
    fn linear_forward(
        &self,
        x: &Vec<F>,
        w: &Vec<F>,
        b: Option<&Vec<F>>,
        cin: usize,
        cout: usize,
    ) -> (Vec<F>, LinearSaved) {
        (
            linear::linear_forward(x, w, b.map(|b| &b[..]), cin, cout),
            None,
        )
    }
    fn linear_backward(
        &self,
        x: &Vec<F>,
        w: &Vec<F>,
        dy: &Vec<F>,
        cin: usize,
        cout: usize,
        dw: &mut Vec<F>,
        db: Option<&mut Vec<F>>,
        _saved: &LinearSaved,
    ) -> Vec<F> {
        linear::linear_backward(x, w, dy, cin, cout, dw, db.map(|b| &mut b[..]))
    }
    fn layer_norm_forward(
        &self,
        x: &Vec<F>,
        c: usize,
        w: Option<&Vec<F>>,
        b: Option<&Vec<F>>,
    ) -> (Vec<F>, LayerNormSaved<Vec<F>>) {
        layer_norm::layer_norm_forward(x, c, w.map(|w| &w[..]), b.map(|b| &b[..]))
    }
    fn layer_norm_backward(
        &self,
        x: &Vec<F>,
        dy: &Vec<F>,
        c: usize,
        w: Option<&Vec<F>>,
        saved: &LayerNormSaved<Vec<F>>,
        dw: Option<&mut Vec<F>>,
        db: Option<&mut Vec<F>>,
    ) -> Vec<F> {
        layer_norm::layer_norm_backward(
            x,
            dy,
            c,
            w.map(|w| &w[..]),
            saved,
            dw.map(|d| &mut d[..]),
            db.map(|d| &mut d[..]),
        )
    }
    fn gelu_forward(&self, x: &Vec<F>) -> Vec<F> {
        gelu::gelu_forward(x)
    }
    fn gelu_backward(&self, x: &Vec<F>, dy: &Vec<F>) -> Vec<F> {
        gelu::gelu_backward(x, dy)
    }
    fn embedding_forward(&self, table: &Vec<F>, ids: &[u32], c: usize) -> Vec<F> {
        embedding::embedding_forward(table, ids, c)
    }
    fn embedding_backward(&self, dtable: &mut Vec<F>, ids: &[u32], dout: &Vec<F>, c: usize) {
        embedding::embedding_backward(dtable, ids, dout, c)
    }
    fn fixed_rotary_angles(
        &self,
        batch: usize,
        time: usize,
        heads: usize,
        head_dim: usize,
        base: f64,
        start: usize,
    ) -> Vec<F> {
        rotary::fixed_rotary_angles(batch, time, heads, head_dim, base, start)
    }
    fn learned_rotary_angles(
        &self,
        logits: &Vec<F>,
        shape: &Shape,
        param: RotaryParam,
        base: f64,
        start: Option<&Vec<F>>,
    ) -> Vec<F> {
        rotary::learned_rotary_angles(
            logits,
            shape.batch,
            shape.time,
            shape.heads,
            shape.dk,
            param,
            base,
            start.map(|s| &s[..]),
        )
    }
    fn learned_rotary_angles_backward(
        &self,
        logits: &Vec<F>,
        dangles: &Vec<F>,
        shape: &Shape,
        param: RotaryParam,
        base: f64,
    ) -> Vec<F> {
        rotary::learned_rotary_angles_backward(
            logits,
            dangles,
            shape.batch,
            shape.time,
            shape.heads,
            shape.dk,
            param,
            base,
        )
    }
    fn rotary_forward(&self, x: &Vec<F>, angles: &Vec<F>, head_dim: usize) -> Vec<F> {
        rotary::rotary_forward(x, angles, head_dim)
    }
    fn rotary_backward(
        &self,
        dy: &Vec<F>,
        y: &Vec<F>,
        angles: &Vec<F>,
        head_dim: usize,
    ) -> (Vec<F>, Vec<F>) {
        rotary::rotary_backward(dy, y, angles, head_dim)
    }
    fn log_gate_forward(&self, logits: &Vec<F>) -> Vec<F> {
        gate::log_gate_forward(logits)
    }
    fn log_gate_backward(&self, logits: &Vec<F>, dg: &Vec<F>) -> Vec<F> {
        gate::log_gate_backward(logits, dg)
    }
    fn attention_forward(
        &self,
        spec: &AttentionSpec,
        form: Form,
        shape: &Shape,
        q: &Vec<F>,
        k: &Vec<F>,
        v: &Vec<F>,
        log_gates: Option<&Vec<F>>,
    ) -> AttentionOut<Vec<F>> {
        attention::attention_forward(spec, form, shape, q, k, v, log_gates.map(|g| &g[..]))
    }
    fn attention_backward(
        &self,
        spec: &AttentionSpec,
        form: Form,
        shape: &Shape,
        q: &Vec<F>,
        k: &Vec<F>,
        v: &Vec<F>,
        log_gates: Option<&Vec<F>>,
        out: &AttentionOut<Vec<F>>,
        dy: &Vec<F>,
    ) -> AttentionGrads<Vec<F>> {
        attention::attention_backward(
            spec,
            form,
            shape,
            q,
            k,
            v,
            log_gates.map(|g| &g[..]),
            out,
            dy,
        )
    }
    fn decode_state(
        &self,
        spec: &AttentionSpec,
        shape: &Shape,
        states: &[f64],
    ) -> Vec<attention::RecurrentState<F>> {
        let table = std::sync::Arc::new(attention::phi::SymPow::new(shape.dk, spec.power()));
        let n = table.dim * (shape.dv + 1);
        assert_eq!(
            states.len(),
            shape.batch * shape.heads * n,
            "decode states must be [batch·heads, D, e+1]"
        );
        states
            .chunks_exact(n)
            .map(|s| {
                let mut st = attention::RecurrentState::with_table(table.clone(), spec, shape.dv);
                st.state_mut().copy_from_slice(s);
                st
            })
            .collect()
    }
    fn concat_decode_states(
        &self,
        parts: Vec<Vec<attention::RecurrentState<F>>>,
    ) -> Vec<attention::RecurrentState<F>> {
        parts.into_iter().flatten().collect()
    }
    fn sympow_decode_step(
        &self,
        _spec: &AttentionSpec,
        state: &mut Vec<attention::RecurrentState<F>>,
        q: &Vec<F>,
        k: &Vec<F>,
        v: &Vec<F>,
        log_gates: Option<&Vec<F>>,
    ) -> Vec<F> {
        let (d, e) = (q.len() / state.len(), v.len() / state.len());
        // (sequence, head) states are independent: one task each
        let heads: Vec<Vec<F>> = state
            .par_iter_mut()
            .enumerate()
            .map(|(i, st)| {
                let (r, rv) = (i * d..(i + 1) * d, i * e..(i + 1) * e);
                st.step(&q[r.clone()], &k[r], &v[rv], log_gates.map(|g| g[i]))
                    .0
            })
            .collect();
        heads.concat()
    }
    fn kv_cache(
        &self,
        spec: &AttentionSpec,
        shape: &Shape,
        keys: &Vec<F>,
        values: &Vec<F>,
        log_gates: Option<&Vec<F>>,
    ) -> attention::KvCache<F> {
        attention::KvCache::new(spec, shape, keys, values, log_gates.map(|g| &g[..]))
    }
    fn kv_cache_decode_step(
        &self,
        _spec: &AttentionSpec,
        cache: &mut attention::KvCache<F>,
        q: &Vec<F>,
        k: &Vec<F>,
        v: &Vec<F>,
        log_gates: Option<&Vec<F>>,
    ) -> Vec<F> {
        cache.step(q, k, v, log_gates.map(|g| &g[..]))
    }
    fn cross_entropy_forward(
        &self,
        logits: &Vec<F>,
        targets: &[u32],
        vocab: usize,
        row_len: usize,
    ) -> Vec<F> {
        cross_entropy::cross_entropy_forward(logits, targets, vocab, row_len)
    }
    fn cross_entropy_backward(
        &self,
        logits: &Vec<F>,
        targets: &[u32],
        losses: &Vec<F>,
        dloss: &Vec<F>,
        vocab: usize,
        row_len: usize,
    ) -> Vec<F> {
        cross_entropy::cross_entropy_backward(logits, targets, losses, dloss, vocab, row_len)
    }
    fn replay(&self, recording: &std::convert::Infallible) {
        match *recording {}
    }
    fn adamw_step(&self, step: u64, grad_scale: f64, params: &mut [AdamWParam<'_, Vec<F>>]) {
        for t in params {
            adamw::adamw_step(&t.cfg, step, grad_scale, t.param, t.grad, t.m, t.v);
        }
    }
}
