//! Generation: a batch of prompts is prefilled with the training form (chunked for sympow), then
//! each new token costs the same whatever the context — sympow updates a recurrent state per
//! sequence and head (SPEC §9), softmax appends to a KV cache. Where a sympow head's recurrent
//! state would be larger than a KV cache of any context it will meet (p = 4: [`DecodeForm`]),
//! sympow decodes from a KV cache too.
//!
//! A step runs entirely through the backend, for every sequence of the batch at once. On a GPU,
//! sympow's recurrent states are made from the prompt there
//! ([`Backend::sympow_prefill_state`]) and stay there; [`Backend::sympow_decode_step`] updates
//! and reads them in one pass (f64 states, as on the CPU); KV caches stay there too and
//! [`Backend::kv_cache_decode_step`] appends to them and attends over them (linear in the
//! context, as softmax must be). One sequence's step is a few hundred small kernels; where
//! the backend can record them ([`Backend::record`]: a CUDA graph), the step is recorded at the
//! first step and replayed as one launch after that (a KV-cache decoder's again whenever its
//! caches move to more room: [`Backend::kv_cache_reserve`]).

use crate::attention::{Form, Shape};
use crate::backend::{Backend, Footprint};
use crate::config::RotaryKind;
use crate::model::{Dims, ForwardCtx, Model};
use crate::Float;
use rayon::prelude::*;

/// Sympow decodes recurrently (with [`DecodeForm::Auto`]) while its state holds no more numbers
/// than a KV cache of this many tokens: a step then also costs fewer FLOPs than the cache's
/// would beyond this context (≈ 2·D·(e+1) against ≈ 2·(d+e)·t). At d = 64 that is p = 2 (a
/// state the size of 1,056 tokens of cache) and not p = 4 (389,000 tokens).
pub const RECURRENT_HORIZON: usize = 65_536;

/// How a decoder holds each attention layer's context from step to step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeForm {
    /// [`Recurrent`](Self::Recurrent) for sympow whose state is no larger than a KV cache of
    /// [`RECURRENT_HORIZON`] tokens, [`KvCache`](Self::KvCache) otherwise (softmax always).
    Auto,
    /// Sympow's recurrent state (SPEC §9): the same cost and memory per token at any context.
    Recurrent,
    /// Every token's rotated key, value (and cumulative gate), attended over at each step: cost
    /// and memory grow with the context.
    KvCache,
}

impl std::str::FromStr for DecodeForm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "recurrent" => Ok(Self::Recurrent),
            "kv-cache" => Ok(Self::KvCache),
            _ => Err(format!(
                "unknown decode form {s:?} (expected auto, recurrent or kv-cache)"
            )),
        }
    }
}

impl std::fmt::Display for DecodeForm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Recurrent => "recurrent",
            Self::KvCache => "kv-cache",
        })
    }
}

impl DecodeForm {
    /// The form a model of config `cfg` decodes in: `Auto` made concrete; an error for a
    /// recurrent softmax, which has no recurrent state.
    ///
    /// ```
    /// use sympow::{config::Config, inference::DecodeForm};
    /// let mut cfg = Config::preset("gpt2-124m").unwrap(); // conformal sympow, p = 2, d = 64
    /// assert_eq!(DecodeForm::Auto.resolve(&cfg), Ok(DecodeForm::Recurrent));
    /// cfg.set("model.power", "4").unwrap(); // D = 766,480: a state of 389k tokens of cache
    /// assert_eq!(DecodeForm::Auto.resolve(&cfg), Ok(DecodeForm::KvCache));
    /// cfg.set("model.attention", "softmax").unwrap();
    /// assert!(DecodeForm::Recurrent.resolve(&cfg).is_err());
    /// ```
    pub fn resolve(self, cfg: &crate::config::Config) -> Result<Self, String> {
        let m = &cfg.model;
        let softmax = m.attention == crate::config::AttentionKind::Softmax;
        match self {
            Self::Recurrent if softmax => {
                Err("softmax attention has no recurrent state: it decodes from a KV cache".into())
            }
            Self::Auto if softmax => Ok(Self::KvCache),
            Self::Auto => {
                let (state, token) = head_sizes(cfg);
                Ok(if state <= token * RECURRENT_HORIZON {
                    Self::Recurrent
                } else {
                    Self::KvCache
                })
            }
            form => Ok(form),
        }
    }
}

/// A head's recurrent state (D·(e+1) numbers) and its KV cache's numbers per token (key, value
/// and, gated, the cumulative gate).
fn head_sizes(cfg: &crate::config::Config) -> (usize, usize) {
    let (d, p) = (cfg.model.head_dim, cfg.model.power);
    let gated = usize::from(cfg.gate() != crate::config::GateKind::None);
    (
        crate::attention::phi::sympow_dim(d, p) * (d + 1),
        2 * d + gated,
    )
}

/// What decoding a model of config `cfg` holds, in its default form ([`DecodeForm::Auto`]): a
/// line for the training log.
///
/// ```
/// use sympow::{config::Config, inference::decoding_memory};
/// let mut cfg = Config::preset("small").unwrap(); // 6 layers, 6 heads × 64, conformal p = 2
/// assert!(decoding_memory(&cfg).starts_with("recurrent state: 4867200 numbers (37.1 MiB"));
/// cfg.set_all(&[("model.attention", "sympow"), ("model.power", "4")]).unwrap();
/// assert!(decoding_memory(&cfg).starts_with("KV cache: 4608 numbers per token"));
/// ```
pub fn decoding_memory(cfg: &crate::config::Config) -> String {
    let m = &cfg.model;
    let heads = m.layers * m.heads;
    let (state, token) = head_sizes(cfg);
    let (state, token) = (heads * state, heads * token);
    let mib = |n: usize, bytes: usize| (n * bytes) as f64 / (1 << 20) as f64;
    match DecodeForm::Auto.resolve(cfg) {
        Ok(DecodeForm::Recurrent) => format!(
            "recurrent state: {state} numbers ({:.1} MiB a sequence in f64, as the decoder keeps it), the same at any context length",
            mib(state, 8)
        ),
        _ => {
            let mut s = format!(
                "KV cache: {token} numbers per token ({:.1} KiB/token in f32), growing with context",
                mib(token, 4) * 1024.0
            );
            if m.attention != crate::config::AttentionKind::Softmax {
                s += &format!(
                    " (its recurrent state would be {state} numbers, {:.1} GiB a sequence in f64)",
                    mib(state, 8) / 1024.0
                );
            }
            s
        }
    }
}

enum LayerState<S, C> {
    /// Sympow: one recurrent state per head, owned by the backend.
    Recurrent(S),
    /// Softmax, or sympow decoded from a cache: every head's rotated keys and values (and
    /// cumulative gates) so far, owned by the backend.
    Cache(C),
}

/// Incremental decoder over a batch of sequences: each step feeds one token to every sequence
/// and returns every sequence's next-token logits, through one forward of the batch (the
/// backend's decode kernels take it whole). The sequences of a prefill stand at one position;
/// [`merge`](Self::merge) joins decoders whose sequences stand at others.
pub struct Decoder<'m, B: Backend> {
    model: &'m Model<B>,
    layers: Vec<LayerState<B::DecodeState, B::KvCache>>,
    /// Recurrent or KV cache, resolved.
    form: DecodeForm,
    /// Cumulative rotary angles per layer `[batch, heads, d/2]` (learned rotary).
    angles: Vec<Option<B::Tensor>>,
    batch: usize,
    /// Tokens each sequence has consumed.
    pos: Vec<usize>,
    /// The last step's logits, padded as the LM head writes them and then as returned: kept
    /// from step to step (a batch's logits are megabytes; fresh buffers each step cost more
    /// in page faults than the copy).
    padded: Vec<B::Scalar>,
    logits: Vec<f64>,
    /// The step's layers and head, recorded at the first step where the backend records
    /// ([`Backend::record`]) and replayed at every later one (until KV caches move).
    graph: Option<StepGraph<B>>,
    /// Whether to try recording at the next step (a backend that did not record at the first
    /// step is not asked again; one that did is asked again when KV caches move).
    try_graph: bool,
    /// Last, so that it is released after the recording that reads it is gone.
    _weights: HeldWeights<'m, B>,
}

/// The model's weights held by its backend in the form its products read
/// ([`Backend::hold_weights`]) for as long as a decoder lives: the decoder borrows the model,
/// so they cannot change meanwhile.
struct HeldWeights<'m, B: Backend>(&'m Model<B>);

impl<'m, B: Backend> HeldWeights<'m, B> {
    fn new(model: &'m Model<B>) -> Self {
        model.backend.hold_weights(&model.params.refs());
        HeldWeights(model)
    }
}

impl<B: Backend> Drop for HeldWeights<'_, B> {
    fn drop(&mut self) {
        self.0.backend.release_weights(&self.0.params.refs());
    }
}

/// A decode step's layers and LM head as one [`Backend::Recording`], with the buffers it reads
/// and writes: each step copies its embedded tokens (and fixed rotary's angles) into `x` and
/// `ctx`, replays, and reads the logits from `logits`. The states it updates and learned
/// rotary's running angles are the decoder's own, updated in place.
struct StepGraph<B: Backend> {
    recording: B::Recording,
    x: B::Tensor,
    ctx: ForwardCtx<B::Tensor>,
    logits: B::Tensor,
}

/// The vocabulary's logits (`out`, `[rows, vocab]`) from the LM head's padded rows (`[rows,
/// padded_vocab]`): the padding columns are not tokens.
fn vocab_logits<F: Float>(dims: &Dims, padded: &[F], out: &mut Vec<f64>) {
    out.resize(padded.len() / dims.padded_vocab * dims.vocab, 0.0);
    out.par_chunks_mut(dims.vocab)
        .zip(padded.par_chunks(dims.padded_vocab))
        .for_each(|(o, row)| o.iter_mut().zip(row).for_each(|(o, x)| *o = x.f64()));
}

impl<'m, B: Backend> Decoder<'m, B> {
    /// [`prefill_batch`](Self::prefill_batch) of one prompt: the decoder and the next-token
    /// logits (`[vocab]`).
    pub fn prefill(model: &'m Model<B>, prompt: &[u32]) -> (Self, Vec<f64>) {
        Self::prefill_batch(model, &[prompt])
    }

    /// Runs the prompts through the model in one forward pass and keeps each one's state for
    /// decoding. The prompts must all have the same (nonzero) length; identical prompts are run
    /// once, so sampling several continuations of one prompt costs one prompt's forward.
    /// Returns the decoder and each sequence's next-token logits (`[batch, vocab]`).
    ///
    /// ```
    /// use sympow::{backend::CpuBackend, config::Config, inference::Decoder, model::Model};
    /// let cfg = Config::preset("tiny").unwrap();
    /// let model = Model::init(CpuBackend::<f32>::new(), &cfg, 0);
    /// let prompts: [&[u32]; 3] = [&[1, 2, 3], &[1, 2, 3], &[7, 8, 9]];
    /// let (mut dec, logits) = Decoder::prefill_batch(&model, &prompts);
    /// let vocab = model.dims.vocab;
    /// assert_eq!((dec.batch(), logits.len()), (3, 3 * vocab));
    /// assert_eq!(logits[..vocab], logits[vocab..2 * vocab]); // the same prompt
    /// let next = dec.step(&[4, 5, 10]); // one token per sequence
    /// assert_eq!((next.len(), dec.positions()), (3 * vocab, &[4, 4, 4][..]));
    /// ```
    pub fn prefill_batch(model: &'m Model<B>, prompts: &[&[u32]]) -> (Self, Vec<f64>) {
        Self::prefill_batch_as(model, prompts, DecodeForm::Auto)
    }

    /// [`prefill_batch`](Self::prefill_batch) into the decoding form `form` ([`DecodeForm`]):
    /// e.g. sympow from a KV cache, to compare its steps with the recurrent state's. Panics
    /// where the model has no such form (a recurrent softmax: check with
    /// [`DecodeForm::resolve`]).
    ///
    /// ```
    /// use sympow::{backend::CpuBackend, config::Config, inference::*, model::Model};
    /// let model = Model::init(CpuBackend::<f64>::new(), &Config::preset("tiny").unwrap(), 0);
    /// let (mut rec, a) = Decoder::prefill_batch_as(&model, &[&[1, 2, 3]], DecodeForm::Recurrent);
    /// let (mut kv, b) = Decoder::prefill_batch_as(&model, &[&[1, 2, 3]], DecodeForm::KvCache);
    /// assert_eq!((rec.form(), kv.form()), (DecodeForm::Recurrent, DecodeForm::KvCache));
    /// // the same function of the context either way
    /// let close = |x: &[f64], y: &[f64]| x.iter().zip(y).all(|(x, y)| (x - y).abs() < 1e-9);
    /// assert!(close(&a, &b));
    /// assert!(close(&rec.step(&[4]).to_vec(), kv.step(&[4])));
    /// ```
    pub fn prefill_batch_as(
        model: &'m Model<B>,
        prompts: &[&[u32]],
        form: DecodeForm,
    ) -> (Self, Vec<f64>) {
        let form = form.resolve(&model.cfg).unwrap_or_else(|e| panic!("{e}"));
        assert!(!prompts.is_empty(), "prefill needs at least one prompt");
        let t = prompts[0].len();
        assert!(t > 0, "prefill needs at least one token");
        assert!(
            prompts.iter().all(|p| p.len() == t),
            "the prompts of a batch must have the same length"
        );
        // each distinct prompt once; sequence i continues distinct prompt `src[i]`
        let mut distinct: Vec<&[u32]> = Vec::new();
        let mut seen = std::collections::HashMap::new();
        let src: Vec<usize> = prompts
            .iter()
            .map(|&p| {
                *seen.entry(p).or_insert_with(|| {
                    distinct.push(p);
                    distinct.len() - 1
                })
            })
            .collect();
        let last_rows: Vec<u32> = src.iter().map(|&s| (s * t + t - 1) as u32).collect();
        let (n, batch) = (distinct.len(), prompts.len());
        let weights = HeldWeights::new(model);
        let be = &model.backend;
        let (h, d) = (model.dims.heads, model.dims.head_dim);
        // block by block, each block's activations dropped once its decoding state is made:
        // the prefill holds one block's activations, not a training forward's every one
        let ctx = model.forward_ctx(n, t, &[0], None);
        let shape = ctx.shape;
        // KV caches: each sequence's keys, values (and gates) are its prompt's rows, gathered on
        // the device where a prompt repeats
        let cache_rows: Option<Vec<u32>> = (n < batch).then(|| {
            src.iter()
                .flat_map(|&s| (s * t..(s + 1) * t).map(|r| r as u32))
                .collect()
        });
        let mut layers = Vec::new();
        let mut angles = Vec::new();
        let mut x = model.embed(&distinct.concat(), n, t);
        for l in 0..model.params.blocks.len() {
            let (x_out, bt) = model.block_forward(l, x, &ctx);
            let a = &bt.inputs;
            x = x_out;
            layers.push(if form == DecodeForm::KvCache {
                let shape = Shape { batch, ..shape };
                let g = a.log_gates.as_ref();
                LayerState::Cache(match &cache_rows {
                    None => be.kv_cache(&ctx.spec, &shape, &a.kr, &a.v, g),
                    Some(rows) => {
                        let k = be.embedding_forward(&a.kr, rows, h * d);
                        let v = be.embedding_forward(&a.v, rows, h * d);
                        let g = g.map(|g| be.embedding_forward(g, rows, h));
                        be.kv_cache(&ctx.spec, &shape, &k, &v, g.as_ref())
                    }
                })
            } else {
                // the state after the prompt, in f64 (see `RecurrentState`)
                let chunk = match ctx.form {
                    Form::Chunked(c) => c,
                    _ => model.cfg.model.chunk,
                };
                let g = a.log_gates.as_ref();
                LayerState::Recurrent(
                    be.sympow_prefill_state(&ctx.spec, &shape, chunk, &a.kr, &a.v, g, &src),
                )
            });
            angles.push(match &a.angles {
                Some(cum) if model.cfg.rotary() == RotaryKind::Learned => {
                    Some(be.embedding_forward(cum, &last_rows, h * d / 2))
                }
                _ => None,
            });
        }
        // the logits of each sequence's last token only
        let x_last = be.embedding_forward(&x, &last_rows, model.dims.width);
        let (_, _, padded, _) = model.head_forward(&x_last);
        let mut logits = Vec::new();
        vocab_logits(&model.dims, &be.download(&padded), &mut logits);
        (
            Decoder {
                model,
                layers,
                form,
                angles,
                batch,
                pos: vec![t; batch],
                padded: Vec::new(),
                logits: Vec::new(),
                graph: None,
                try_graph: true,
                _weights: weights,
            },
            logits,
        )
    }

    /// Sequences decoded together.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// How the decoder holds its context: [`DecodeForm::Recurrent`] or
    /// [`DecodeForm::KvCache`].
    pub fn form(&self) -> DecodeForm {
        self.form
    }

    /// Whether the steps replay a recording of their ops ([`Backend::record`]; see
    /// [`step`](Self::step)).
    pub fn is_recorded(&self) -> bool {
        self.graph.is_some()
    }

    /// Turns the recording of steps off (every step then runs its ops one by one, as on a
    /// backend that cannot record) or back on (tried at the next step).
    pub fn set_recording(&mut self, on: bool) {
        self.try_graph = on;
        if !on {
            self.graph = None;
        }
    }

    /// Tokens consumed so far by each sequence.
    pub fn positions(&self) -> &[usize] {
        &self.pos
    }

    /// One decoder of the sequences of `parts`, in order, each at its own position: prompts of
    /// different lengths, prefilled one length at a time, then stepped as one batch (one
    /// forward a step, not one for each length). Recurrent decoders only: a recurrent state is
    /// the same size after any number of tokens, where KV caches of different lengths do not
    /// make one batch (panics). The parts' states are copied into the merged decoder's, so
    /// for a moment both are held.
    ///
    /// ```
    /// use sympow::{backend::CpuBackend, config::Config, inference::Decoder, model::Model};
    /// let cfg = Config::preset("tiny").unwrap(); // conformal-sympow
    /// let model = Model::init(CpuBackend::<f32>::new(), &cfg, 0);
    /// let (short, _) = Decoder::prefill(&model, &[1, 2]);
    /// let (long, _) = Decoder::prefill_batch(&model, &[&[3, 4, 5, 6], &[7, 8, 9, 10]]);
    /// let mut dec = Decoder::merge(vec![short, long]);
    /// let next = dec.step(&[11, 12, 13]);
    /// assert_eq!((next.len(), dec.positions()), (3 * model.dims.vocab, &[3, 5, 5][..]));
    /// ```
    pub fn merge(parts: Vec<Decoder<'m, B>>) -> Self {
        assert!(!parts.is_empty(), "merge needs at least one decoder");
        let model = parts[0].model;
        assert!(
            parts.iter().all(|d| std::ptr::eq(d.model, model)),
            "merged decoders must decode one model"
        );
        let layers = model.params.blocks.len();
        // (held again before the parts let go of them)
        let weights = HeldWeights::new(model);
        let mut states: Vec<Vec<B::DecodeState>> = (0..layers).map(|_| Vec::new()).collect();
        let mut angles: Vec<Vec<B::Tensor>> = (0..layers).map(|_| Vec::new()).collect();
        let (mut pos, mut batches) = (Vec::new(), Vec::new());
        for d in parts {
            pos.extend(d.pos);
            batches.push(d.batch);
            for (l, layer) in d.layers.into_iter().enumerate() {
                match layer {
                    LayerState::Recurrent(s) => states[l].push(s),
                    LayerState::Cache(_) => panic!(
                        "KV-cache decoders do not merge (caches of different lengths): step them side by side"
                    ),
                }
            }
            for (l, a) in d.angles.into_iter().enumerate() {
                angles[l].extend(a);
            }
        }
        let be = &model.backend;
        // learned rotary's cumulative angles, [batch, heads, d/2] a part: one row each
        let w = model.dims.heads * model.dims.head_dim / 2;
        let widths: Vec<usize> = batches.iter().map(|b| b * w).collect();
        Decoder {
            model,
            layers: states
                .into_iter()
                .map(|s| LayerState::Recurrent(be.concat_decode_states(s)))
                .collect(),
            form: DecodeForm::Recurrent,
            angles: angles
                .into_iter()
                .map(|a| match a.len() {
                    0 => None,
                    1 => a.into_iter().next(),
                    _ => Some(be.concat_columns(&a.iter().collect::<Vec<_>>(), &widths)),
                })
                .collect(),
            batch: batches.iter().sum(),
            pos,
            padded: Vec::new(),
            logits: Vec::new(),
            graph: None,
            try_graph: true,
            _weights: weights,
        }
    }

    /// Bytes the batch's recurrent states or KV caches hold on the backend's device, over every
    /// layer: constant in the context for a recurrent state, linear in it for a cache.
    pub fn memory_bytes(&self) -> usize {
        let angles: usize = self.angles.iter().flatten().count() * self.batch;
        let angles = angles * self.model.dims.heads * self.model.dims.head_dim / 2;
        angles * std::mem::size_of::<B::Scalar>()
            + self
                .layers
                .iter()
                .map(|l| match l {
                    LayerState::Recurrent(s) => s.bytes(),
                    LayerState::Cache(c) => c.bytes(),
                })
                .sum::<usize>()
    }

    /// Feeds one token to each sequence (`tokens[i]` to sequence i); returns their next-token
    /// logits (`[batch, vocab]`).
    ///
    /// On a backend that records ([`Backend::record`], CUDA graphs) the step is recorded at
    /// the first step and replayed from then on: the same ops, one launch. A KV-cache decoder's
    /// is recorded again each time its caches move to more room (twice the room each time:
    /// [`Backend::kv_cache_reserve`]).
    pub fn step(&mut self, tokens: &[u32]) -> &[f64] {
        assert_eq!(
            tokens.len(),
            self.batch,
            "a decode step takes one token per sequence"
        );
        let m = self.model;
        let be = &m.backend;
        let b = self.batch;
        // the model's own block halves around each layer's decode step (one token a sequence)
        let ctx = m.forward_ctx(b, 1, &self.pos, None);
        let x = m.embed(tokens, b, 1);
        // KV caches: room for this token in each before the step is recorded or replayed (their
        // sequences all stand at one position: KV-cache decoders do not merge)
        let mut moved = false;
        for layer in &mut self.layers {
            if let LayerState::Cache(cache) = layer {
                moved |= be.kv_cache_reserve(cache, self.pos[0], 1);
            }
        }
        if moved && self.graph.take().is_some() {
            self.try_graph = true; // the recording appended where the caches were
        }
        self.pos.iter_mut().for_each(|p| *p += 1);
        // (learned rotary's running angles exist from the prefill on: a recording updates them)
        let recordable =
            m.cfg.rotary() != RotaryKind::Learned || self.angles.iter().all(Option::is_some);
        // a recorded step reads its inputs from the buffers it was recorded with
        let inputs = match &mut self.graph {
            Some(g) => {
                be.copy_into(&mut g.x, &x);
                if let (Some(dst), Some(src)) = (&mut g.ctx.fixed_angles, &ctx.fixed_angles) {
                    be.copy_into(dst, src);
                }
                None
            }
            None => Some((x, ctx)),
        };
        let inputs = match inputs {
            Some((x, ctx)) if self.try_graph && recordable => {
                self.try_graph = false;
                match self.record_step(x, ctx) {
                    Ok(g) => {
                        self.graph = Some(g);
                        None
                    }
                    Err(inputs) => Some(inputs),
                }
            }
            inputs => inputs,
        };
        let eager;
        let logits = match inputs {
            None => {
                let g = self.graph.as_ref().expect("a recorded step");
                be.replay(&g.recording);
                &g.logits
            }
            Some((x, ctx)) => {
                eager = Self::layers_and_head(m, &mut self.layers, &mut self.angles, &x, &ctx);
                &eager
            }
        };
        let dm = &m.dims;
        self.padded.resize(b * dm.padded_vocab, B::Scalar::of(0.0));
        be.download_into(logits, &mut self.padded);
        vocab_logits(dm, &self.padded, &mut self.logits);
        &self.logits
    }

    /// Records a step's layers and head over the inputs `x` and `ctx`, which the recording
    /// keeps (nothing runs yet); gives them back where the backend did not record.
    #[allow(clippy::type_complexity)]
    fn record_step(
        &mut self,
        x: B::Tensor,
        ctx: ForwardCtx<B::Tensor>,
    ) -> Result<StepGraph<B>, (B::Tensor, ForwardCtx<B::Tensor>)> {
        let m = self.model;
        let be = &m.backend;
        let mut logits = be.zeros(self.batch * m.dims.padded_vocab);
        let (layers, angles) = (&mut self.layers, &mut self.angles);
        let recording = be.record(&mut || {
            let out = Self::layers_and_head(m, layers, angles, &x, &ctx);
            be.copy_into(&mut logits, &out);
        });
        match recording {
            Some(recording) => Ok(StepGraph {
                recording,
                x,
                ctx,
                logits,
            }),
            None => Err((x, ctx)),
        }
    }

    /// A step's ops after the embedding (`x`, `[batch, width]`): every layer, its state or
    /// cache and learned rotary's running angles updated in place, then the LM head's padded
    /// logits.
    fn layers_and_head(
        m: &Model<B>,
        layers: &mut [LayerState<B::DecodeState, B::KvCache>],
        angles: &mut [Option<B::Tensor>],
        x: &B::Tensor,
        ctx: &ForwardCtx<B::Tensor>,
    ) -> B::Tensor {
        let be = &m.backend;
        let mut h: Option<B::Tensor> = None;
        for (l, (layer, angle)) in layers.iter_mut().zip(angles.iter_mut()).enumerate() {
            let xl = h.as_ref().unwrap_or(x);
            let mut a = m.attention_inputs(l, xl, ctx, angle.as_ref());
            let y = match layer {
                LayerState::Recurrent(state) => be.sympow_decode_step(
                    &ctx.spec,
                    state,
                    &a.qr,
                    &a.kr,
                    &a.v,
                    a.log_gates.as_ref(),
                ),
                LayerState::Cache(cache) => be.kv_cache_decode_step(
                    &ctx.spec,
                    cache,
                    &a.qr,
                    &a.kr,
                    &a.v,
                    a.log_gates.as_ref(),
                ),
            };
            if m.cfg.rotary() == RotaryKind::Learned {
                // cumulative: the next token's angles continue from this one's, in the same
                // buffer (a recorded step reads them from there)
                let next = a.angles.take().expect("learned rotary makes angles");
                match angle {
                    Some(a) => be.copy_into(a, &next),
                    None => *angle = Some(next),
                }
            }
            h = Some(m.block_tail(l, xl, &y, ctx).0);
        }
        m.head_forward(h.as_ref().unwrap_or(x)).2
    }
}

/// How to pick the next token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// Softmax temperature; 0 picks the most likely token.
    pub temperature: f64,
    /// Keep only the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1: all).
    pub top_p: f64,
}

/// Draws a token from `logits`.
pub fn sample(logits: &[f64], s: &Sampling, rng: &mut impl rand::Rng) -> u32 {
    if s.temperature <= 0.0 {
        return logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i as u32);
    }
    // most likely first, ties by token id (a total order: the same draw whichever way it sorts)
    let by_logit = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    if s.top_k > 0 && s.top_k < idx.len() {
        idx.select_nth_unstable_by(s.top_k - 1, by_logit);
        idx.truncate(s.top_k);
    }
    idx.sort_unstable_by(by_logit);
    let mx = logits[idx[0]];
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| ((logits[i] - mx) / s.temperature).exp())
        .collect();
    let z: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= z);
    if s.top_p < 1.0 {
        let mut acc = 0.0;
        let keep = probs.iter().position(|p| {
            acc += p;
            acc >= s.top_p
        });
        let keep = keep.map_or(probs.len(), |k| k + 1);
        probs.truncate(keep);
        idx.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut u = rng.gen::<f64>() * total;
    for (p, &i) in probs.iter().zip(&idx) {
        u -= p;
        if u <= 0.0 {
            return i as u32;
        }
    }
    *idx.last().unwrap() as u32
}

/// Generates up to `max_tokens` after `prompt`, decoding in `form`, calling `on_token` with
/// each token as it comes. Memory per step is constant for a recurrent state, linear for a KV
/// cache. The same as the first sequence of [`generate_batch`] with this seed.
pub fn generate<B: Backend>(
    model: &Model<B>,
    prompt: &[u32],
    max_tokens: usize,
    sampling: &Sampling,
    form: DecodeForm,
    seed: u64,
    mut on_token: impl FnMut(u32),
) -> Vec<u32> {
    let mut out = generate_batch(
        model,
        &[prompt],
        max_tokens,
        sampling,
        form,
        seed,
        |_, t| on_token(t),
    );
    out.pop().unwrap()
}

/// Generates up to `max_tokens` after each of `prompts` (repeat one prompt for several samples
/// of it), decoding them together in `form` (panics where the model has no such form:
/// [`DecodeForm::resolve`]): the prompts of each length are prefilled as one batch, and
/// then every sequence steps in one batch ([`Decoder::merge`]) — for a KV cache (softmax, or
/// sympow whose state is too large: [`DecodeForm::Auto`]), whose caches of different lengths do
/// not merge, one batch per length, stepped side by side. Sequence i
/// draws from its own random stream (stream i of ChaCha8 seeded with `seed`), so its tokens do
/// not depend on the other sequences. `on_token(i, token)` is called with each token as it
/// comes, a step's tokens in sequence order.
///
/// ```
/// use sympow::{backend::CpuBackend, config::Config, inference::*, model::Model};
/// let model = Model::init(CpuBackend::<f32>::new(), &Config::preset("tiny").unwrap(), 0);
/// let greedy = Sampling { temperature: 0.0, top_k: 0, top_p: 1.0 };
/// let prompts: [&[u32]; 3] = [&[1, 2, 3], &[4, 5], &[6, 7, 8]];
/// let auto = DecodeForm::Auto;
/// let outs = generate_batch(&model, &prompts, 5, &greedy, auto, 0, |_, _| {});
/// assert_eq!(outs[1], generate(&model, &[4, 5], 5, &greedy, auto, 0, |_| {}));
/// ```
pub fn generate_batch<B: Backend>(
    model: &Model<B>,
    prompts: &[&[u32]],
    max_tokens: usize,
    sampling: &Sampling,
    form: DecodeForm,
    seed: u64,
    mut on_token: impl FnMut(usize, u32),
) -> Vec<Vec<u32>> {
    use rand::SeedableRng;
    let mut rngs: Vec<rand_chacha::ChaCha8Rng> = (0..prompts.len())
        .map(|i| {
            let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            r.set_stream(i as u64);
            r
        })
        .collect();
    let mut outs = vec![Vec::with_capacity(max_tokens); prompts.len()];
    if max_tokens == 0 {
        return outs;
    }
    assert!(!prompts.is_empty(), "generation needs at least one prompt");
    // the sequences of each prompt length, shortest first, and their decoders
    let mut lengths: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
    lengths.sort_unstable();
    lengths.dedup();
    let mut groups: Vec<Vec<usize>> = lengths
        .iter()
        .map(|&n| {
            (0..prompts.len())
                .filter(|&i| prompts[i].len() == n)
                .collect()
        })
        .collect();
    let v = model.dims.vocab;
    // every sequence's next-token logits, in sequence order
    let mut logits = vec![0.0; prompts.len() * v];
    let scatter = |logits: &mut [f64], group: &[usize], rows: &[f64]| {
        for (&i, row) in group.iter().zip(rows.chunks_exact(v)) {
            logits[i * v..(i + 1) * v].copy_from_slice(row);
        }
    };
    let mut decoders: Vec<Decoder<B>> = groups
        .iter()
        .map(|g| {
            let ps: Vec<&[u32]> = g.iter().map(|&i| prompts[i]).collect();
            let (dec, rows) = Decoder::prefill_batch_as(model, &ps, form);
            scatter(&mut logits, g, &rows);
            dec
        })
        .collect();
    if decoders.len() > 1 && decoders[0].form() == DecodeForm::Recurrent {
        // recurrent states: one batch of every length (its rows in the groups' order)
        decoders = vec![Decoder::merge(decoders)];
        groups = vec![groups.concat()];
    }
    loop {
        // each sequence its own stream: drawn in parallel, the same tokens
        let next: Vec<u32> = logits
            .par_chunks_exact(v)
            .zip(rngs.par_iter_mut())
            .map(|(l, r)| sample(l, sampling, r))
            .collect();
        for (i, (&t, out)) in next.iter().zip(&mut outs).enumerate() {
            out.push(t);
            on_token(i, t);
        }
        if outs[0].len() == max_tokens {
            return outs;
        }
        for (g, dec) in groups.iter().zip(&mut decoders) {
            let tokens: Vec<u32> = g.iter().map(|&i| next[i]).collect();
            scatter(&mut logits, g, dec.step(&tokens));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// Draws `n` tokens and returns each token's frequency.
    fn frequencies(logits: &[f64], s: &Sampling, n: usize) -> Vec<f64> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let mut count = vec![0usize; logits.len()];
        for _ in 0..n {
            count[sample(logits, s, &mut rng) as usize] += 1;
        }
        count.iter().map(|&c| c as f64 / n as f64).collect()
    }

    fn close(got: &[f64], want: &[f64]) -> bool {
        // 20,000 draws: a frequency's standard deviation is at most 0.0035
        got.iter().zip(want).all(|(g, w)| (g - w).abs() < 0.015)
    }

    #[test]
    fn sampling_follows_temperature_top_k_and_top_p() {
        let p = [0.2, 0.5, 0.3, 1e-9];
        let logits: Vec<f64> = p.iter().map(|x: &f64| x.ln() + 7.0).collect();
        let s = |temperature, top_k, top_p| Sampling {
            temperature,
            top_k,
            top_p,
        };
        let n = 20_000;
        // temperature 0: the most likely token, every time
        assert_eq!(
            frequencies(&logits, &s(0.0, 0, 1.0), 50),
            [0.0, 1.0, 0.0, 0.0]
        );
        // temperature 1: the softmax of the logits
        let f = frequencies(&logits, &s(1.0, 0, 1.0), n);
        assert!(close(&f, &p), "{f:?}");
        // temperature 1/2 squares the probabilities
        let z = 0.04 + 0.25 + 0.09;
        let f = frequencies(&logits, &s(0.5, 0, 1.0), n);
        assert!(close(&f, &[0.04 / z, 0.25 / z, 0.09 / z, 0.0]), "{f:?}");
        // top-k 2: the two most likely, renormalised
        let f = frequencies(&logits, &s(1.0, 2, 1.0), n);
        assert!(close(&f, &[0.0, 0.625, 0.375, 0.0]), "{f:?}");
        // top-p 0.75: 0.5 + 0.3 reaches it, 0.2 is cut
        let f = frequencies(&logits, &s(1.0, 0, 0.75), n);
        assert!(close(&f, &[0.0, 0.625, 0.375, 0.0]), "{f:?}");
        // top-k 1 is greedy at any temperature
        assert_eq!(
            frequencies(&logits, &s(5.0, 1, 1.0), 50),
            [0.0, 1.0, 0.0, 0.0]
        );
        // ties go to the lower token id, whichever way the candidates are chosen
        let tied = [1.0, 3.0, 3.0, 3.0];
        assert_eq!(
            frequencies(&tied, &s(1.0, 1, 1.0), 20),
            [0.0, 1.0, 0.0, 0.0]
        );
    }
}
