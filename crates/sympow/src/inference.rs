//! Generation: a prompt is prefilled with the training form (chunked for sympow), then each
//! new token costs the same whatever the context — sympow updates a recurrent state per head
//! (SPEC §9), softmax appends to a KV cache.
//!
//! A step runs entirely through the backend. On a GPU, sympow's recurrent state stays on the
//! device and [`Backend::sympow_decode_step`] updates and reads it in one pass (f64 state, as on
//! the CPU); softmax's KV cache stays there too and [`Backend::softmax_decode_step`] appends to
//! it and attends over it (linear in the context, as softmax must be).

use crate::attention::{chunked_final_states, AttentionSpec, Form, Shape};
use crate::backend::Backend;
use crate::config::{GateKind, RotaryKind};
use crate::model::{Dims, Model, Trace};
use crate::Float;

enum LayerState<S, C> {
    /// Sympow: one recurrent state per head, owned by the backend.
    Recurrent(S),
    /// Softmax: every head's rotated keys and values so far, owned by the backend.
    Cache(C),
}

/// Incremental decoder over a model (batch of one sequence).
pub struct Decoder<'m, B: Backend> {
    model: &'m Model<B>,
    layers: Vec<LayerState<B::DecodeState, B::KvCache>>,
    /// Cumulative rotary angles per layer `[heads·d/2]` (learned rotary).
    angles: Vec<Option<B::Tensor>>,
    pos: usize,
}

fn to_f64<F: Float>(x: &[F]) -> Vec<f64> {
    x.iter().map(|v| v.f64()).collect()
}

/// The vocabulary's logits (`[rows, vocab]`) from the LM head's padded rows
/// (`[rows, padded_vocab]`): the padding columns are not tokens.
fn vocab_logits<F: Float>(dims: &Dims, padded: &[F]) -> Vec<f64> {
    padded
        .chunks_exact(dims.padded_vocab)
        .flat_map(|row| to_f64(&row[..dims.vocab]))
        .collect()
}

impl<'m, B: Backend> Decoder<'m, B> {
    /// Runs the prompt through the model in one forward pass and keeps the state for
    /// decoding. Returns the decoder and the logits at every prompt position (`[len, vocab]`).
    pub fn prefill(model: &'m Model<B>, prompt: &[u32]) -> (Self, Vec<f64>) {
        assert!(!prompt.is_empty(), "prefill needs at least one token");
        let t = prompt.len();
        let trace: Trace<B::Tensor> = model.forward(prompt, None, 1, t, None);
        let be = &model.backend;
        let (h, d) = (model.dims.heads, model.dims.head_dim);
        let spec = model.attention_spec();
        let shape = Shape {
            batch: 1,
            time: t,
            heads: h,
            dk: d,
            dv: d,
        };
        let mut layers = Vec::new();
        let mut angles = Vec::new();
        for bt in &trace.blocks {
            layers.push(
                if model.cfg.model.attention == crate::config::AttentionKind::Softmax {
                    LayerState::Cache(be.kv_cache(&spec, &shape, &bt.kr, &bt.v))
                } else {
                    // the chunked algorithm's final state, in f64 (see `RecurrentState`)
                    let chunk = match model.attention_form(t) {
                        Form::Chunked(c) => c,
                        _ => model.cfg.model.chunk,
                    };
                    let k = to_f64(&be.download(&bt.kr));
                    let v = to_f64(&be.download(&bt.v));
                    let g = bt.log_gates.as_ref().map(|g| to_f64(&be.download(g)));
                    let states = chunked_final_states(&spec, chunk, &shape, &k, &v, g.as_deref());
                    let one = Shape { time: 1, ..shape };
                    LayerState::Recurrent(be.decode_state(&spec, &one, &states.concat()))
                },
            );
            angles.push(match &bt.angles {
                Some(a) if model.cfg.rotary() == RotaryKind::Learned => {
                    let a = be.download(a);
                    Some(be.upload(&a[(t - 1) * h * d / 2..]))
                }
                _ => None,
            });
        }
        let logits = vocab_logits(&model.dims, &be.download(&trace.logits));
        (
            Decoder {
                model,
                layers,
                angles,
                pos: t,
            },
            logits,
        )
    }

    /// Tokens consumed so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Feeds one token; returns the next-token logits (`[vocab]`).
    pub fn step(&mut self, token: u32) -> Vec<f64> {
        let m = self.model;
        let be = &m.backend;
        let dm = &m.dims;
        let (c, h, d) = (dm.width, dm.heads, dm.head_dim);
        let spec: AttentionSpec = m.attention_spec();
        let base = m.cfg.model.rotary_base;
        let one = Shape {
            batch: 1,
            time: 1,
            heads: h,
            dk: d,
            dv: d,
        };
        let mut x = be.embedding_forward(&m.params.wte, &[token], c);
        for (l, p) in m.params.blocks.iter().enumerate() {
            let (w, b) = p.ln1.as_ref().map(|p| (&p.weight, &p.bias)).unzip();
            let (hn, _) = be.layer_norm_forward(&x, c, w, b);
            let qkv = be
                .linear_forward(&hn, &p.qkv_w, Some(&p.qkv_b), c, dm.qkv_out())
                .0;
            // columns: q, k, v, [gate logits], [rotary logits] — as in `Model::forward`
            let mut parts = be.split_columns(&qkv, &dm.qkv_widths).into_iter();
            let (q, k, v) = (
                parts.next().unwrap(),
                parts.next().unwrap(),
                parts.next().unwrap(),
            );
            let log_gates = match m.cfg.gate() {
                GateKind::Data => Some(be.log_gate_forward(&parts.next().unwrap())),
                GateKind::Learned => Some(be.log_gate_forward(p.gate_bias.as_ref().unwrap())),
                GateKind::None => None,
            };
            let angles = match m.cfg.rotary() {
                RotaryKind::None => None,
                RotaryKind::Fixed => Some(be.fixed_rotary_angles(1, 1, h, d, base, self.pos)),
                RotaryKind::Learned => {
                    let a = be.learned_rotary_angles(
                        &parts.next().unwrap(),
                        &one,
                        m.cfg.model.rotary_param.into(),
                        base,
                        self.angles[l].as_ref(),
                    );
                    self.angles[l] = Some(a.clone());
                    Some(a)
                }
            };
            let (q, k) = match &angles {
                Some(a) => (be.rotary_forward(&q, a, d), be.rotary_forward(&k, a, d)),
                None => (q, k),
            };
            let y = match &mut self.layers[l] {
                LayerState::Recurrent(state) => {
                    be.sympow_decode_step(&spec, state, &q, &k, &v, log_gates.as_ref())
                }
                LayerState::Cache(cache) => be.softmax_decode_step(&spec, cache, &q, &k, &v),
            };
            let (o, _) = be.linear_forward(&y, &p.proj_w, Some(&p.proj_b), h * d, c);
            be.add_assign(&mut x, &o);
            let (w, b) = p.ln2.as_ref().map(|p| (&p.weight, &p.bias)).unzip();
            let (hn, _) = be.layer_norm_forward(&x, c, w, b);
            let (fc, _) = be.linear_forward(&hn, &p.fc_w, Some(&p.fc_b), c, dm.hidden);
            let f = be.gelu_forward(&fc);
            let (mo, _) = be.linear_forward(&f, &p.fc2_w, Some(&p.fc2_b), dm.hidden, c);
            be.add_assign(&mut x, &mo);
        }
        let (w, b) = m.params.lnf.as_ref().map(|p| (&p.weight, &p.bias)).unzip();
        let (hn, _) = be.layer_norm_forward(&x, c, w, b);
        let head = m.params.lm_head.as_ref().unwrap_or(&m.params.wte);
        self.pos += 1;
        let (logits, _) = be.linear_forward(&hn, head, None, c, dm.padded_vocab);
        vocab_logits(dm, &be.download(&logits))
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
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if s.top_k > 0 {
        idx.truncate(s.top_k);
    }
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

/// Generates up to `max_tokens` after `prompt`, calling `on_token` with each as it comes.
/// Memory per step is constant for sympow (recurrent state), linear for softmax (KV cache).
pub fn generate<B: Backend>(
    model: &Model<B>,
    prompt: &[u32],
    max_tokens: usize,
    sampling: &Sampling,
    seed: u64,
    mut on_token: impl FnMut(u32),
) -> Vec<u32> {
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (mut dec, logits) = Decoder::prefill(model, prompt);
    let v = model.dims.vocab;
    let mut next = sample(&logits[(prompt.len() - 1) * v..], sampling, &mut rng);
    let mut out = Vec::with_capacity(max_tokens);
    for i in 0..max_tokens {
        out.push(next);
        on_token(next);
        if i + 1 == max_tokens {
            break;
        }
        let logits = dec.step(next);
        next = sample(&logits, sampling, &mut rng);
    }
    out
}
