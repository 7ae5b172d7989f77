//! The conformal-sympow transformer (SPEC §6), generic over the [`Backend`].
//!
//! Token embedding → L blocks [x += Attn(LN(x)); x += MLP(LN(x))] → LN → LM head. Attention:
//! one fused linear map x → (q, k, v, gate logits, rotary logits); rotary on q and k; gated
//! sympow (or softmax) attention; output projection. The forward pass keeps what the backward
//! needs in a [`Trace`]; [`Model::backward`] is the forward written out in reverse.

use crate::attention::phi::sympow_dim;
use crate::attention::{AttentionOut, AttentionSpec, Form, Shape};
use crate::backend::{
    Backend, LayerNormSaved, LinearSaved, MlpGrads, MlpSaved, MlpWeights, QkvInputGrads, QkvInputs,
};
use crate::config::{AttentionKind, Config, FormKind, GateKind, LayerNormKind, RotaryKind};
use crate::ops::gate::GATE_INIT_BIAS;
use crate::ops::rotary::{learned_rotary_init_bias, RotaryParam};
use crate::testing::randn;
use crate::Float;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How a parameter is initialised.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Normal with this standard deviation.
    Normal(f64),
    /// Every element this value.
    Const(f64),
    /// The fused projection's bias: 0 for q, k, v; the gate's initial bias (γ ≈ 0.999); the
    /// learned rotary's initial bias (a step of exactly ω, i.e. plain RoPE).
    FusedBias,
}

/// Name, shape, initialisation and weight-decay flag of one parameter tensor.
#[derive(Clone, Debug)]
pub struct ParamInfo {
    /// e.g. `blocks.3.qkv.weight` (safetensors key).
    pub name: String,
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// Initialisation.
    pub init: Init,
    /// Whether AdamW decays it (matrices do, vectors do not).
    pub decay: bool,
}

impl ParamInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Sizes derived from the config.
#[derive(Clone, Debug, PartialEq)]
pub struct Dims {
    /// Vocabulary (the tokens the model predicts).
    pub vocab: usize,
    /// Rows of the token embedding and LM head: `vocab` rounded up to a multiple of 64, so that
    /// the LM head's matrix products are tensor-core aligned (GPT-2's 50,257 is odd, and cuBLAS
    /// then falls back to kernels ~3× slower). The padding rows never meet a token: their
    /// logits are outside the loss and the sampler.
    pub padded_vocab: usize,
    /// Width.
    pub width: usize,
    /// Heads.
    pub heads: usize,
    /// Head dimension (q, k and v).
    pub head_dim: usize,
    /// MLP hidden width.
    pub hidden: usize,
    /// Rotary logits per head (0 unless learned rotary).
    pub rot_per_head: usize,
    /// Column widths of the fused projection: q, k, v, then gate and rotary logits if present,
    /// then `qkv_pad` unused columns if any.
    pub qkv_widths: Vec<usize>,
    /// Which of `qkv_widths`' blocks holds the data-dependent gate's logits, if any.
    pub gate_block: Option<usize>,
    /// Which of `qkv_widths`' blocks holds learned rotary's logits, if any.
    pub rot_block: Option<usize>,
    /// Columns that round the fused projection up to a multiple of 8, so its bf16 products are
    /// 16-byte aligned (q, k, v and a gate logit per head make gpt2-124m's 2,316 columns, and
    /// cuBLAS's unaligned kernels cost sympow-gated ≈ 4 ms a step). Their outputs are never
    /// read and their gradient is zero.
    pub qkv_pad: usize,
}

impl Dims {
    /// Derives the sizes.
    pub fn new(cfg: &Config) -> Self {
        let m = &cfg.model;
        let hd = m.heads * m.head_dim;
        let rot_per_head = match cfg.rotary() {
            RotaryKind::Learned => RotaryParam::from(m.rotary_param).logits_per_head(m.head_dim),
            _ => 0,
        };
        let mut qkv_widths = vec![hd, hd, hd];
        let mut block = |width| {
            qkv_widths.push(width);
            qkv_widths.len() - 1
        };
        let gate_block = (cfg.gate() == GateKind::Data).then(|| block(m.heads));
        let rot_block = (rot_per_head > 0).then(|| block(m.heads * rot_per_head));
        let used: usize = qkv_widths.iter().sum();
        let qkv_pad = used.next_multiple_of(8) - used;
        if qkv_pad > 0 {
            qkv_widths.push(qkv_pad);
        }
        Dims {
            vocab: m.vocab_size,
            padded_vocab: m.vocab_size.next_multiple_of(64),
            width: m.width,
            heads: m.heads,
            head_dim: m.head_dim,
            hidden: m.mlp_ratio * m.width,
            rot_per_head,
            qkv_widths,
            gate_block,
            rot_block,
            qkv_pad,
        }
    }

    /// Columns of the fused projection (the sum of `qkv_widths`).
    pub fn qkv_out(&self) -> usize {
        self.qkv_widths.iter().sum()
    }
}

/// Learned layer-norm scale and bias.
#[derive(Clone, Debug)]
pub struct LayerNormParams<T> {
    /// Scale, `[width]`.
    pub weight: T,
    /// Bias, `[width]`.
    pub bias: T,
}

/// One transformer block's parameters.
#[derive(Clone, Debug)]
pub struct Block<T> {
    /// Pre-attention layer norm (None: parameter-free).
    pub ln1: Option<LayerNormParams<T>>,
    /// Fused projection to q, k, v, gate and rotary logits, `[qkv_out, width]`.
    pub qkv_w: T,
    /// Its bias, `[qkv_out]` (holds the gate and rotary initial biases).
    pub qkv_b: T,
    /// The data-independent learned gate's logit per head, `[heads]`.
    pub gate_bias: Option<T>,
    /// Attention output projection, `[width, heads·head_dim]`.
    pub proj_w: T,
    /// Its bias.
    pub proj_b: T,
    /// Pre-MLP layer norm.
    pub ln2: Option<LayerNormParams<T>>,
    /// MLP up-projection, `[hidden, width]`.
    pub fc_w: T,
    /// Its bias.
    pub fc_b: T,
    /// MLP down-projection, `[width, hidden]`.
    pub fc2_w: T,
    /// Its bias.
    pub fc2_b: T,
}

impl<T> Block<T> {
    /// The MLP's four tensors.
    pub fn mlp_weights(&self) -> MlpWeights<'_, T> {
        MlpWeights {
            fc_w: &self.fc_w,
            fc_b: &self.fc_b,
            fc2_w: &self.fc2_w,
            fc2_b: &self.fc2_b,
        }
    }
    /// The same four, to add gradients into (a `Block` of gradients).
    pub fn mlp_grads(&mut self) -> MlpGrads<'_, T> {
        MlpGrads {
            fc_w: &mut self.fc_w,
            fc_b: &mut self.fc_b,
            fc2_w: &mut self.fc2_w,
            fc2_b: &mut self.fc2_b,
        }
    }
}

/// All parameters (or gradients, or optimizer moments: anything shaped like them).
#[derive(Clone, Debug)]
pub struct Params<T> {
    /// Token embedding, `[padded_vocab, width]`.
    pub wte: T,
    /// The blocks.
    pub blocks: Vec<Block<T>>,
    /// Final layer norm.
    pub lnf: Option<LayerNormParams<T>>,
    /// LM head `[padded_vocab, width]`, None when tied to `wte`.
    pub lm_head: Option<T>,
}

/// The parameter list, in canonical order (the order of [`Params::refs`]).
pub fn layout(cfg: &Config) -> Vec<ParamInfo> {
    let d = Dims::new(cfg);
    let m = &cfg.model;
    let resid_std = 0.02 / (2.0 * m.layers as f64).sqrt();
    let p = |name: String, shape: Vec<usize>, init: Init, decay: bool| ParamInfo {
        name,
        shape,
        init,
        decay,
    };
    let mut v = vec![p(
        "wte.weight".into(),
        vec![d.padded_vocab, d.width],
        Init::Normal(0.02),
        true,
    )];
    let ln = |v: &mut Vec<ParamInfo>, name: &str| {
        if m.layer_norm == LayerNormKind::Learned {
            v.push(p(
                format!("{name}.weight"),
                vec![d.width],
                Init::Const(1.0),
                false,
            ));
            v.push(p(
                format!("{name}.bias"),
                vec![d.width],
                Init::Const(0.0),
                false,
            ));
        }
    };
    for l in 0..m.layers {
        let b = format!("blocks.{l}");
        ln(&mut v, &format!("{b}.ln1"));
        v.push(p(
            format!("{b}.qkv.weight"),
            vec![d.qkv_out(), d.width],
            Init::Normal(0.02),
            true,
        ));
        v.push(p(
            format!("{b}.qkv.bias"),
            vec![d.qkv_out()],
            Init::FusedBias,
            false,
        ));
        if cfg.gate() == GateKind::Learned {
            v.push(p(
                format!("{b}.gate.bias"),
                vec![d.heads],
                Init::Const(GATE_INIT_BIAS),
                false,
            ));
        }
        v.push(p(
            format!("{b}.proj.weight"),
            vec![d.width, d.heads * d.head_dim],
            Init::Normal(resid_std),
            true,
        ));
        v.push(p(
            format!("{b}.proj.bias"),
            vec![d.width],
            Init::Const(0.0),
            false,
        ));
        ln(&mut v, &format!("{b}.ln2"));
        v.push(p(
            format!("{b}.fc.weight"),
            vec![d.hidden, d.width],
            Init::Normal(0.02),
            true,
        ));
        v.push(p(
            format!("{b}.fc.bias"),
            vec![d.hidden],
            Init::Const(0.0),
            false,
        ));
        v.push(p(
            format!("{b}.fc2.weight"),
            vec![d.width, d.hidden],
            Init::Normal(resid_std),
            true,
        ));
        v.push(p(
            format!("{b}.fc2.bias"),
            vec![d.width],
            Init::Const(0.0),
            false,
        ));
    }
    ln(&mut v, "lnf");
    if !m.tie_weights {
        v.push(p(
            "lm_head.weight".into(),
            vec![d.padded_vocab, d.width],
            Init::Normal(0.02),
            true,
        ));
    }
    v
}

impl<T> Params<T> {
    /// Builds from tensors given in [`layout`] order.
    pub fn from_vec(cfg: &Config, tensors: Vec<T>) -> Self {
        let m = &cfg.model;
        let mut it = tensors.into_iter();
        let mut next = || it.next().expect("tensor count matches the layout");
        let learned_ln = m.layer_norm == LayerNormKind::Learned;
        let wte = next();
        let mut blocks = Vec::with_capacity(m.layers);
        for _ in 0..m.layers {
            let ln1 = learned_ln.then(|| LayerNormParams {
                weight: next(),
                bias: next(),
            });
            let (qkv_w, qkv_b) = (next(), next());
            let gate_bias = (cfg.gate() == GateKind::Learned).then(&mut next);
            let (proj_w, proj_b) = (next(), next());
            let ln2 = learned_ln.then(|| LayerNormParams {
                weight: next(),
                bias: next(),
            });
            let (fc_w, fc_b, fc2_w, fc2_b) = (next(), next(), next(), next());
            blocks.push(Block {
                ln1,
                qkv_w,
                qkv_b,
                gate_bias,
                proj_w,
                proj_b,
                ln2,
                fc_w,
                fc_b,
                fc2_w,
                fc2_b,
            });
        }
        let lnf = learned_ln.then(|| LayerNormParams {
            weight: next(),
            bias: next(),
        });
        let lm_head = (!m.tie_weights).then(next);
        Params {
            wte,
            blocks,
            lnf,
            lm_head,
        }
    }

    /// Every tensor, in [`layout`] order.
    pub fn refs(&self) -> Vec<&T> {
        let mut v = vec![&self.wte];
        for b in &self.blocks {
            if let Some(l) = &b.ln1 {
                v.extend([&l.weight, &l.bias]);
            }
            v.extend([&b.qkv_w, &b.qkv_b]);
            v.extend(b.gate_bias.as_ref());
            v.extend([&b.proj_w, &b.proj_b]);
            if let Some(l) = &b.ln2 {
                v.extend([&l.weight, &l.bias]);
            }
            v.extend([&b.fc_w, &b.fc_b, &b.fc2_w, &b.fc2_b]);
        }
        if let Some(l) = &self.lnf {
            v.extend([&l.weight, &l.bias]);
        }
        v.extend(self.lm_head.as_ref());
        v
    }

    /// Every tensor, mutably, in [`layout`] order.
    pub fn refs_mut(&mut self) -> Vec<&mut T> {
        let mut v = vec![&mut self.wte];
        for b in &mut self.blocks {
            if let Some(l) = &mut b.ln1 {
                v.extend([&mut l.weight, &mut l.bias]);
            }
            v.extend([&mut b.qkv_w, &mut b.qkv_b]);
            v.extend(b.gate_bias.as_mut());
            v.extend([&mut b.proj_w, &mut b.proj_b]);
            if let Some(l) = &mut b.ln2 {
                v.extend([&mut l.weight, &mut l.bias]);
            }
            v.extend([&mut b.fc_w, &mut b.fc_b, &mut b.fc2_w, &mut b.fc2_b]);
        }
        if let Some(l) = &mut self.lnf {
            v.extend([&mut l.weight, &mut l.bias]);
        }
        v.extend(self.lm_head.as_mut());
        v
    }
}

/// Host values of one parameter at initialisation.
fn init_values(info: &ParamInfo, cfg: &Config, rng: &mut ChaCha8Rng) -> Vec<f64> {
    match info.init {
        Init::Normal(std) => randn(rng, info.numel(), std),
        Init::Const(c) => vec![c; info.numel()],
        Init::FusedBias => {
            // fused bias: 0 for q, k, v; the gate's γ ≈ 0.999; the rotary step softplus(c) = 1
            let d = Dims::new(cfg);
            let mut v = vec![0.0; 3 * d.heads * d.head_dim];
            if cfg.gate() == GateKind::Data {
                v.extend(std::iter::repeat_n(GATE_INIT_BIAS, d.heads));
            }
            v.extend(std::iter::repeat_n(
                learned_rotary_init_bias(),
                d.heads * d.rot_per_head,
            ));
            v.resize(v.len() + d.qkv_pad, 0.0);
            v
        }
    }
}

/// What one block's forward keeps for its backward.
pub struct BlockTrace<T> {
    /// The block's input.
    pub(crate) x: T,
    pub(crate) inputs: AttentionInputs<T>,
    pub(crate) att: AttentionOut<T>,
    pub(crate) tail: BlockTail<T>,
}

/// A block's first half, up to its attention ([`Model::attention_inputs`]): what the
/// attention takes, and what the block's backward keeps of the rest.
pub(crate) struct AttentionInputs<T> {
    pub(crate) ln1_out: T,
    pub(crate) ln1_saved: LayerNormSaved<T>,
    pub(crate) qkv_saved: LinearSaved,
    pub(crate) gate_logits: Option<T>,
    pub(crate) rot_logits: Option<T>,
    /// The rotary angles of these tokens (learned: cumulative from the sequence's start).
    pub(crate) angles: Option<T>,
    pub(crate) qr: T,
    pub(crate) kr: T,
    pub(crate) v: T,
    pub(crate) log_gates: Option<T>,
}

/// A block's second half, from its attention's output ([`Model::block_tail`]): what the
/// block's backward keeps of it.
pub(crate) struct BlockTail<T> {
    pub(crate) proj_saved: LinearSaved,
    pub(crate) proj_mask: Option<T>,
    pub(crate) x_mid: T,
    pub(crate) ln2_out: T,
    pub(crate) ln2_saved: LayerNormSaved<T>,
    pub(crate) mlp: MlpSaved<T>,
    pub(crate) mlp_mask: Option<T>,
}

/// A forward pass's activations and losses.
pub struct Trace<T> {
    pub(crate) ids: Vec<u32>,
    pub(crate) targets: Vec<u32>,
    pub(crate) shape: Shape,
    pub(crate) blocks: Vec<BlockTrace<T>>,
    pub(crate) x_final: T,
    pub(crate) lnf_out: T,
    pub(crate) lnf_saved: LayerNormSaved<T>,
    pub(crate) head_saved: LinearSaved,
    /// `[batch·time, padded_vocab]`; the first `vocab` columns are the logits.
    pub logits: T,
    /// Per-token cross-entropy `[batch·time]` (0 where the target is ignored), if targets were given.
    pub losses: Option<T>,
}

/// Dropout for one forward: None at evaluation.
#[derive(Clone, Copy, Debug)]
pub struct DropoutCtx {
    /// Seed of the masks (derived from the run seed, step and micro-batch).
    pub seed: u64,
}

/// What every block of one forward shares ([`Model::forward`] and the prefill of
/// [`crate::inference::Decoder`]).
pub(crate) struct ForwardCtx<T> {
    pub(crate) shape: Shape,
    pub(crate) spec: AttentionSpec,
    pub(crate) form: Form,
    /// Fixed rotary's angles (`[batch·time, heads, d/2]`), made once for every block.
    pub(crate) fixed_angles: Option<T>,
    pub(crate) dropout: Option<DropoutCtx>,
}

/// A model: its config, backend and parameters.
pub struct Model<B: Backend> {
    /// The backend the parameters live on.
    pub backend: B,
    /// The configuration it was built from.
    pub cfg: Config,
    /// Sizes.
    pub dims: Dims,
    /// Parameters.
    pub params: Params<B::Tensor>,
}

/// A layer norm's weight and where its gradients go (none when it has no parameters).
fn layer_norm_grads<'a, T>(
    p: &'a Option<LayerNormParams<T>>,
    g: &'a mut Option<LayerNormParams<T>>,
) -> (Option<&'a T>, Option<&'a mut T>, Option<&'a mut T>) {
    let w = p.as_ref().map(|p| &p.weight);
    match g {
        Some(g) => (w, Some(&mut g.weight), Some(&mut g.bias)),
        None => (w, None, None),
    }
}

impl<B: Backend> Model<B> {
    /// A freshly initialised model (deterministic in `seed`).
    pub fn init(backend: B, cfg: &Config, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let tensors = layout(cfg)
            .iter()
            .map(|info| {
                let host: Vec<B::Scalar> = init_values(info, cfg, &mut rng)
                    .into_iter()
                    .map(B::Scalar::of)
                    .collect();
                backend.upload(&host)
            })
            .collect();
        Self::from_params(backend, cfg, Params::from_vec(cfg, tensors))
    }

    /// Wraps existing parameters.
    pub fn from_params(backend: B, cfg: &Config, params: Params<B::Tensor>) -> Self {
        Model {
            backend,
            cfg: cfg.clone(),
            dims: Dims::new(cfg),
            params,
        }
    }

    /// Zero tensors shaped like the parameters (gradients, optimizer moments).
    pub fn zeros_like(&self) -> Params<B::Tensor> {
        Params::from_vec(
            &self.cfg,
            layout(&self.cfg)
                .iter()
                .map(|i| self.backend.zeros(i.numel()))
                .collect(),
        )
    }

    /// Number of parameters (a tied head counted once).
    pub fn num_params(&self) -> usize {
        layout(&self.cfg).iter().map(ParamInfo::numel).sum()
    }

    /// The attention function of every layer.
    pub fn attention_spec(&self) -> AttentionSpec {
        match self.cfg.model.attention {
            AttentionKind::Softmax => AttentionSpec::softmax(self.dims.head_dim),
            _ => AttentionSpec::sympow(self.cfg.model.power, self.dims.head_dim)
                .expect("validated config"),
        }
    }

    /// The attention form for sequences of `time` tokens: as configured, or for `auto` the
    /// one with fewer FLOPs per token (quadratic ~T·2d, chunked ~4·D·(d+1) + 2c·d).
    pub fn attention_form(&self, time: usize) -> Form {
        let m = &self.cfg.model;
        if m.attention == AttentionKind::Softmax {
            return Form::Quadratic;
        }
        match m.form {
            FormKind::Quadratic => Form::Quadratic,
            FormKind::Chunked => Form::Chunked(m.chunk),
            FormKind::Auto => {
                let d = self.dims.head_dim;
                let quadratic = time * 2 * d;
                let chunked = 4 * sympow_dim(d, m.power) * (d + 1) + 2 * m.chunk.min(time) * d;
                if chunked < quadratic {
                    Form::Chunked(m.chunk)
                } else {
                    Form::Quadratic
                }
            }
        }
    }

    fn layer_norm(
        &self,
        x: &B::Tensor,
        p: &Option<LayerNormParams<B::Tensor>>,
    ) -> (B::Tensor, LayerNormSaved<B::Tensor>) {
        let (w, b) = p.as_ref().map(|p| (&p.weight, &p.bias)).unzip();
        self.backend.layer_norm_forward(x, self.dims.width, w, b)
    }

    fn dropout_mask(
        &self,
        ctx: Option<DropoutCtx>,
        layer: usize,
        site: u64,
        len: usize,
    ) -> Option<B::Tensor> {
        let p = self.cfg.model.dropout;
        let ctx = ctx.filter(|_| p > 0.0)?;
        let mut rng = ChaCha8Rng::seed_from_u64(ctx.seed ^ ((layer as u64) << 32) ^ (site << 48));
        let keep = B::Scalar::of(1.0 / (1.0 - p));
        let mask: Vec<B::Scalar> = (0..len)
            .map(|_| {
                if rng.gen::<f64>() < p {
                    B::Scalar::of(0.0)
                } else {
                    keep
                }
            })
            .collect();
        Some(self.backend.upload(&mask))
    }

    /// Forward over `batch` sequences of `time` tokens (`ids` row-major). With targets, also
    /// the per-token losses. With a dropout context, applies dropout (training).
    pub fn forward(
        &self,
        ids: &[u32],
        targets: Option<&[u32]>,
        batch: usize,
        time: usize,
        dropout: Option<DropoutCtx>,
    ) -> Trace<B::Tensor> {
        let be = &self.backend;
        let ctx = self.forward_ctx(batch, time, &[0], dropout);
        let mut x = self.embed(ids, batch, time);
        let mut blocks = Vec::with_capacity(self.params.blocks.len());
        for l in 0..self.params.blocks.len() {
            let (x_out, trace) = self.block_forward(l, x, &ctx);
            blocks.push(trace);
            x = x_out;
        }
        let (lnf_out, lnf_saved, logits, head_saved) = self.head_forward(&x);
        let losses = targets.map(|t| {
            assert_eq!(t.len(), batch * time, "targets must be batch × time");
            be.cross_entropy_forward(&logits, t, self.dims.vocab, self.dims.padded_vocab)
        });
        Trace {
            ids: ids.to_vec(),
            targets: targets.map(<[u32]>::to_vec).unwrap_or_default(),
            shape: ctx.shape,
            blocks,
            x_final: x,
            lnf_out,
            lnf_saved,
            head_saved,
            logits,
            losses,
        }
    }

    /// What every block of one forward shares. `starts`: the position of the sequences' first
    /// token here — one for every sequence (`[0]` for whole sequences), or, for a decoder's
    /// step of one token a sequence, each sequence's own (the tokens it has consumed).
    pub(crate) fn forward_ctx(
        &self,
        batch: usize,
        time: usize,
        starts: &[usize],
        dropout: Option<DropoutCtx>,
    ) -> ForwardCtx<B::Tensor> {
        let (h, hd) = (self.dims.heads, self.dims.head_dim);
        let fixed_angles = (self.cfg.rotary() == RotaryKind::Fixed)
            .then(|| self.fixed_angles(batch, time, starts));
        ForwardCtx {
            shape: Shape {
                batch,
                time,
                heads: h,
                dk: hd,
                dv: hd,
            },
            spec: self.attention_spec(),
            form: self.attention_form(time),
            fixed_angles,
            dropout,
        }
    }

    /// Fixed rotary's angles `[batch·time, heads, d/2]` for sequences starting at `starts`
    /// (see [`forward_ctx`](Self::forward_ctx)).
    fn fixed_angles(&self, batch: usize, time: usize, starts: &[usize]) -> B::Tensor {
        let be = &self.backend;
        let (h, hd, base) = (
            self.dims.heads,
            self.dims.head_dim,
            self.cfg.model.rotary_base,
        );
        let first = starts[0];
        if starts.iter().all(|&p| p == first) {
            return be.fixed_rotary_angles(batch, time, h, hd, base, first);
        }
        assert!(
            time == 1 && starts.len() == batch,
            "sequences at several positions take one token each, one start a sequence"
        );
        // a merged decoder's step: each position's angles once, then a row for each sequence
        let mut distinct = starts.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        let rows: Vec<B::Tensor> = distinct
            .iter()
            .map(|&p| be.fixed_rotary_angles(1, 1, h, hd, base, p))
            .collect();
        let w = h * hd / 2;
        let table = be.concat_columns(&rows.iter().collect::<Vec<_>>(), &vec![w; rows.len()]);
        let ids: Vec<u32> = starts
            .iter()
            .map(|p| distinct.binary_search(p).unwrap() as u32)
            .collect();
        be.embedding_forward(&table, &ids, w)
    }

    /// The token embeddings of `ids` (`batch × time`, row-major): the first block's input.
    pub(crate) fn embed(&self, ids: &[u32], batch: usize, time: usize) -> B::Tensor {
        assert_eq!(ids.len(), batch * time, "ids must be batch × time");
        (self.backend).embedding_forward(&self.params.wte, ids, self.dims.width)
    }

    /// Block `l` on its input `x`: its output, and what its backward (or a decoder) keeps.
    pub(crate) fn block_forward(
        &self,
        l: usize,
        x: B::Tensor,
        ctx: &ForwardCtx<B::Tensor>,
    ) -> (B::Tensor, BlockTrace<B::Tensor>) {
        let a = self.attention_inputs(l, &x, ctx, None);
        let att = self.backend.attention_forward(
            &ctx.spec,
            ctx.form,
            &ctx.shape,
            &a.qr,
            &a.kr,
            &a.v,
            a.log_gates.as_ref(),
        );
        let (out, tail) = self.block_tail(l, &x, &att.y, ctx);
        let trace = BlockTrace {
            x,
            inputs: a,
            att,
            tail,
        };
        (out, trace)
    }

    /// Block `l`'s first half on its input `x`, up to its attention: the layer norm, the fused
    /// projection split into q, k, v, gate and rotary logits, the log-gates, the rotary angles
    /// and the rotated q and k. `prev_angles`: a decoder's cumulative learned rotary angles
    /// before this token (None: the sequence starts here).
    pub(crate) fn attention_inputs(
        &self,
        l: usize,
        x: &B::Tensor,
        ctx: &ForwardCtx<B::Tensor>,
        prev_angles: Option<&B::Tensor>,
    ) -> AttentionInputs<B::Tensor> {
        let be = &self.backend;
        let dm = &self.dims;
        let p = &self.params.blocks[l];
        let shape = &ctx.shape;
        let (n, c, hd) = (shape.batch * shape.time, dm.width, dm.head_dim);
        let (ln1_out, ln1_saved) = self.layer_norm(x, &p.ln1);
        let (qkv, qkv_saved) =
            be.linear_forward(&ln1_out, &p.qkv_w, Some(&p.qkv_b), c, dm.qkv_out());
        // the column blocks: q, k, v, then the gate's logits and the rotary logits if any
        let rot_logits = dm
            .rot_block
            .map(|i| be.column_block(&qkv, &dm.qkv_widths, i));
        let angles = match self.cfg.rotary() {
            RotaryKind::Learned => Some(be.learned_rotary_angles(
                rot_logits.as_ref().unwrap(),
                shape,
                self.cfg.model.rotary_param.into(),
                self.cfg.model.rotary_base,
                prev_angles,
            )),
            RotaryKind::Fixed => ctx.fixed_angles.clone(),
            RotaryKind::None => None,
        };
        let QkvInputs {
            qr,
            kr,
            v,
            mut gate_logits,
            mut log_gates,
        } = be.qkv_rotary_gate_forward(&qkv, &dm.qkv_widths, hd, angles.as_ref(), dm.gate_block);
        if self.cfg.gate() == GateKind::Learned {
            let logits = be.broadcast_rows(p.gate_bias.as_ref().unwrap(), n);
            log_gates = Some(be.log_gate_forward(&logits));
            gate_logits = Some(logits);
        }
        AttentionInputs {
            ln1_out,
            ln1_saved,
            qkv_saved,
            gate_logits,
            rot_logits,
            angles,
            qr,
            kr,
            v,
            log_gates,
        }
    }

    /// Block `l`'s second half, from its attention's output `y`: the output projection and
    /// the residual sum with the block's input `x`, then the MLP and its residual sum. Returns
    /// the block's output.
    pub(crate) fn block_tail(
        &self,
        l: usize,
        x: &B::Tensor,
        y: &B::Tensor,
        ctx: &ForwardCtx<B::Tensor>,
    ) -> (B::Tensor, BlockTail<B::Tensor>) {
        let be = &self.backend;
        let dm = &self.dims;
        let p = &self.params.blocks[l];
        let (n, c, h, hd) = (
            ctx.shape.batch * ctx.shape.time,
            dm.width,
            dm.heads,
            dm.head_dim,
        );
        // each branch's output plus the residual stream, the sum in the product's epilogue
        // unless dropout comes between them (x itself is kept for the backward)
        let (proj_w, proj_b) = (&p.proj_w, Some(&p.proj_b));
        let proj_mask = self.dropout_mask(ctx.dropout, l, 0, n * c);
        let (x_mid, proj_saved) = match &proj_mask {
            Some(m) => {
                let (o, saved) = be.linear_forward(y, proj_w, proj_b, h * hd, c);
                let mut o = be.mul(&o, m);
                be.add_assign(&mut o, x);
                (o, saved)
            }
            None => be.linear_residual_forward(y, proj_w, proj_b, x, h * hd, c),
        };
        let (ln2_out, ln2_saved) = self.layer_norm(&x_mid, &p.ln2);
        let mlp_mask = self.dropout_mask(ctx.dropout, l, 1, n * c);
        let (mo, mlp) = match &mlp_mask {
            Some(m) => {
                let (mo, mlp) = be.mlp_forward(&ln2_out, p.mlp_weights(), c, dm.hidden, None);
                let mut mo = be.mul(&mo, m);
                be.add_assign(&mut mo, &x_mid);
                (mo, mlp)
            }
            None => be.mlp_forward(&ln2_out, p.mlp_weights(), c, dm.hidden, Some(&x_mid)),
        };
        let tail = BlockTail {
            proj_saved,
            proj_mask,
            x_mid,
            ln2_out,
            ln2_saved,
            mlp,
            mlp_mask,
        };
        (mo, tail)
    }

    /// The final layer norm and the LM head on the last block's output rows `x`: (the norm's
    /// output, its saved statistics, the padded logits `[rows, padded_vocab]`, the head's
    /// saved operand).
    #[allow(clippy::type_complexity)]
    pub(crate) fn head_forward(
        &self,
        x: &B::Tensor,
    ) -> (B::Tensor, LayerNormSaved<B::Tensor>, B::Tensor, LinearSaved) {
        let (c, pv) = (self.dims.width, self.dims.padded_vocab);
        let (lnf_out, lnf_saved) = self.layer_norm(x, &self.params.lnf);
        let head = self.params.lm_head.as_ref().unwrap_or(&self.params.wte);
        let (logits, head_saved) = self.backend.linear_forward(&lnf_out, head, None, c, pv);
        (lnf_out, lnf_saved, logits, head_saved)
    }

    /// Backward of [`forward`](Self::forward) for L = Σ_tokens dloss·loss: adds every
    /// parameter's gradient into `grads`. The forward, in reverse order.
    pub fn backward(
        &self,
        tr: &Trace<B::Tensor>,
        dloss: &B::Tensor,
        grads: &mut Params<B::Tensor>,
    ) {
        let be = &self.backend;
        let dm = &self.dims;
        let (c, h, hd) = (dm.width, dm.heads, dm.head_dim);
        let shape = tr.shape;
        let n = shape.batch * shape.time;
        let spec = self.attention_spec();
        let form = self.attention_form(shape.time);
        let base = self.cfg.model.rotary_base;

        let losses = tr
            .losses
            .as_ref()
            .expect("backward needs a forward with targets");
        let (v, vp) = (dm.vocab, dm.padded_vocab);
        let head = self.params.lm_head.as_ref().unwrap_or(&self.params.wte);
        let dhead = grads.lm_head.as_mut().unwrap_or(&mut grads.wte);
        let dlnf = be.classifier_backward(
            &tr.lnf_out,
            head,
            &tr.logits,
            &tr.targets,
            losses,
            dloss,
            (c, v, vp),
            dhead,
            &tr.head_saved,
        );
        let mut dx = self.layer_norm_backward(
            &tr.x_final,
            &dlnf,
            &self.params.lnf,
            &tr.lnf_saved,
            &mut grads.lnf,
        );

        for (l, (p, t)) in self.params.blocks.iter().zip(&tr.blocks).enumerate().rev() {
            let g = &mut grads.blocks[l];
            // x_out = x_mid + dropout(fc2(gelu(fc(ln2(x_mid)))))
            let masked = t.tail.mlp_mask.as_ref().map(|m| be.mul(&dx, m));
            let dln2 = be.mlp_backward(
                &t.tail.ln2_out,
                masked.as_ref().unwrap_or(&dx),
                p.mlp_weights(),
                c,
                dm.hidden,
                &t.tail.mlp,
                g.mlp_grads(),
            );
            let mut dx_mid = dx;
            self.layer_norm_backward_add(
                &t.tail.x_mid,
                &dln2,
                &p.ln2,
                &t.tail.ln2_saved,
                &mut g.ln2,
                &mut dx_mid,
            );
            // x_mid = x + dropout(proj(attention(rotary(q), rotary(k), v, gate)))
            let masked = t.tail.proj_mask.as_ref().map(|m| be.mul(&dx_mid, m));
            let dy = be.linear_backward(
                &t.att.y,
                &p.proj_w,
                masked.as_ref().unwrap_or(&dx_mid),
                h * hd,
                c,
                &mut g.proj_w,
                Some(&mut g.proj_b),
                &t.tail.proj_saved,
            );
            let ga = be.attention_backward(
                &spec,
                form,
                &shape,
                &t.inputs.qr,
                &t.inputs.kr,
                &t.inputs.v,
                t.inputs.log_gates.as_ref(),
                &t.att,
                &dy,
            );
            let gate = t.inputs.gate_logits.as_ref().zip(ga.dlog_gates.as_ref());
            let QkvInputGrads {
                dq,
                dk,
                dangles,
                dgate_logits,
            } = be.qkv_rotary_gate_backward(
                ga.dq,
                ga.dk,
                &t.inputs.qr,
                &t.inputs.kr,
                t.inputs.angles.as_ref(),
                hd,
                gate,
            );
            // each column block's gradient where Dims puts it; the padding's is zero
            let mut dparts: Vec<Option<B::Tensor>> = vec![Some(dq), Some(dk), Some(ga.dv)];
            dparts.resize_with(dm.qkv_widths.len(), || None);
            if let Some(dlogits) = dgate_logits {
                match (self.cfg.gate(), dm.gate_block) {
                    (GateKind::Data, Some(i)) => dparts[i] = Some(dlogits),
                    (GateKind::Learned, _) => {
                        let db = be.sum_rows(&dlogits, h);
                        be.add_assign(g.gate_bias.as_mut().unwrap(), &db);
                    }
                    _ => unreachable!("gate logits without a gate or its column block"),
                }
            }
            if let (Some(rl), Some(i)) = (&t.inputs.rot_logits, dm.rot_block) {
                let dang = dangles.as_ref().expect("learned rotary has angles");
                dparts[i] = Some(be.learned_rotary_angles_backward(
                    rl,
                    dang,
                    &shape,
                    self.cfg.model.rotary_param.into(),
                    base,
                ));
            }
            let dparts: Vec<B::Tensor> = dparts
                .into_iter()
                .zip(&dm.qkv_widths)
                .map(|(d, &w)| d.unwrap_or_else(|| be.zeros(n * w)))
                .collect();
            let dln1 = be.linear_backward_columns(
                &t.inputs.ln1_out,
                &p.qkv_w,
                &dparts.iter().collect::<Vec<_>>(),
                &dm.qkv_widths,
                c,
                &mut g.qkv_w,
                Some(&mut g.qkv_b),
                &t.inputs.qkv_saved,
            );
            dx = dx_mid;
            self.layer_norm_backward_add(
                &t.x,
                &dln1,
                &p.ln1,
                &t.inputs.ln1_saved,
                &mut g.ln1,
                &mut dx,
            );
        }
        debug_assert_eq!(tr.ids.len(), n);
        be.embedding_backward(&mut grads.wte, &tr.ids, &dx, c);
    }

    /// Where a forward pass first produced a non-finite value: `"blocks.3 attention output"`,
    /// `"logits"`, …; None if everything is finite.
    pub fn locate_non_finite(&self, tr: &Trace<B::Tensor>) -> Option<String> {
        let bad = |t: &B::Tensor| !self.backend.sum_squares(t).is_finite();
        for (l, b) in tr.blocks.iter().enumerate() {
            for (what, t) in [
                ("input", &b.x),
                ("attention output", &b.att.y),
                ("residual after attention", &b.tail.x_mid),
            ] {
                if bad(t) {
                    return Some(format!("blocks.{l} {what}"));
                }
            }
            if !self.backend.mlp_hidden_finite(&b.tail.mlp) {
                return Some(format!("blocks.{l} MLP hidden"));
            }
        }
        [("final residual", &tr.x_final), ("logits", &tr.logits)]
            .into_iter()
            .find(|(_, t)| bad(t))
            .map(|(w, _)| w.to_string())
    }

    /// Whether every parameter is finite.
    pub fn params_finite(&self) -> bool {
        self.backend
            .sum_squares_each(&self.params.refs())
            .iter()
            .all(|s| s.is_finite())
    }

    fn layer_norm_backward(
        &self,
        x: &B::Tensor,
        dy: &B::Tensor,
        p: &Option<LayerNormParams<B::Tensor>>,
        saved: &LayerNormSaved<B::Tensor>,
        g: &mut Option<LayerNormParams<B::Tensor>>,
    ) -> B::Tensor {
        let (w, dw, db) = layer_norm_grads(p, g);
        self.backend
            .layer_norm_backward(x, dy, self.dims.width, w, saved, dw, db)
    }

    /// [`layer_norm_backward`](Self::layer_norm_backward), ∂x added into `dx`.
    fn layer_norm_backward_add(
        &self,
        x: &B::Tensor,
        dy: &B::Tensor,
        p: &Option<LayerNormParams<B::Tensor>>,
        saved: &LayerNormSaved<B::Tensor>,
        g: &mut Option<LayerNormParams<B::Tensor>>,
        dx: &mut B::Tensor,
    ) {
        let (w, dw, db) = layer_norm_grads(p, g);
        self.backend
            .layer_norm_backward_add(x, dy, self.dims.width, w, saved, dw, db, dx)
    }
}
