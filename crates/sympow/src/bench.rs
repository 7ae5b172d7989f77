//! CPU benchmarks, printed as tables of ratios against a baseline measured in the same run.

use crate::attention::{attention_forward, AttentionSpec, Form, Shape};
use crate::testing::{randn, rng};
use std::time::Instant;

/// One row of the attention benchmark.
#[derive(Clone, Debug)]
pub struct AttentionBenchRow {
    /// Sequence length.
    pub time: usize,
    /// Quadratic-form time per token, microseconds.
    pub quadratic_us: f64,
    /// Chunked-form time per token, microseconds.
    pub chunked_us: f64,
}

fn time_per_token(reps: usize, tokens: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t0 = Instant::now();
        f();
        best = best.min(t0.elapsed().as_secs_f64());
    }
    best * 1e6 / tokens as f64
}

/// Times the forward of the quadratic and chunked forms (p, head dim `d`, chunk `chunk`,
/// gating on) at each sequence length, one sequence of `heads` heads, best of `reps`.
pub fn attention_cpu(
    times: &[usize],
    p: u32,
    d: usize,
    heads: usize,
    chunk: usize,
    reps: usize,
) -> Vec<AttentionBenchRow> {
    let spec = AttentionSpec::sympow(p, d).expect("valid power");
    times
        .iter()
        .map(|&t| {
            let shape = Shape {
                batch: 1,
                time: t,
                heads,
                dk: d,
                dv: d,
            };
            let mut r = rng(t as u64);
            let n = t * heads * d;
            let q: Vec<f32> = randn(&mut r, n, 1.0);
            let k: Vec<f32> = randn(&mut r, n, 1.0);
            let v: Vec<f32> = randn(&mut r, n, 1.0);
            let g: Vec<f32> = crate::testing::log_gates(&mut r, t * heads, 0.95, 0.999);
            let quadratic_us = time_per_token(reps, t, || {
                std::hint::black_box(attention_forward(
                    &spec,
                    Form::Quadratic,
                    &shape,
                    &q,
                    &k,
                    &v,
                    Some(&g),
                ));
            });
            let chunked_us = time_per_token(reps, t, || {
                std::hint::black_box(attention_forward(
                    &spec,
                    Form::Chunked(chunk),
                    &shape,
                    &q,
                    &k,
                    &v,
                    Some(&g),
                ));
            });
            AttentionBenchRow {
                time: t,
                quadratic_us,
                chunked_us,
            }
        })
        .collect()
}

/// Formats [`attention_cpu`] rows as a table; ratios are against the shortest length.
pub fn format_attention_table(rows: &[AttentionBenchRow]) -> String {
    let mut s = String::from(
        "     T | quadratic µs/token (× T0) | chunked µs/token (× T0) | quadratic/chunked\n",
    );
    s.push_str(
        "-------+---------------------------+-------------------------+------------------\n",
    );
    let (q0, c0) = rows
        .first()
        .map_or((1.0, 1.0), |r| (r.quadratic_us, r.chunked_us));
    for r in rows {
        s.push_str(&format!(
            "{:>6} | {:>12.2} ({:>6.2}×)     | {:>12.2} ({:>5.2}×)    | {:>8.2}\n",
            r.time,
            r.quadratic_us,
            r.quadratic_us / q0,
            r.chunked_us,
            r.chunked_us / c0,
            r.quadratic_us / r.chunked_us
        ));
    }
    s
}

/// One row of the decode benchmark.
#[derive(Clone, Debug)]
pub struct DecodeBenchRow {
    /// The variant's name.
    pub variant: String,
    /// How its decoder held the context: recurrent state or KV cache.
    pub form: crate::inference::DecodeForm,
    /// Sequences decoded together.
    pub batch: usize,
    /// Tokens already in each sequence's context when decoding starts.
    pub context: usize,
    /// Median time of one decode step (one token per sequence through the whole model),
    /// microseconds; `None` where the row was skipped (see [`decode`]).
    pub step_us: Option<f64>,
    /// Time of the prefill (the prompt's forward pass and the decoding states made from it),
    /// seconds.
    pub prefill_s: f64,
    /// Bytes of the batch's recurrent states or KV caches ([`Decoder::memory_bytes`]).
    ///
    /// [`Decoder::memory_bytes`]: crate::inference::Decoder::memory_bytes
    pub memory_bytes: usize,
    /// With profiling: the backend's ops over `steps` more steps, and their wall seconds.
    pub profile: Option<(Vec<crate::backend::ProfileRow>, f64)>,
    /// With profiling: the backend's ops over one more prefill, and its wall seconds.
    pub prefill_profile: Option<(Vec<crate::backend::ProfileRow>, f64)>,
}

/// Per-step decode time after a prefill of each context length, for each named variant config
/// (random weights) in its decoding form (as [`DecodeForm::resolve`] makes it: `Auto` decodes
/// softmax, and sympow p = 4 at d = 64, from KV caches, sympow p = 2 recurrently) and each batch
/// size (every sequence of a batch continues the same prompt, which is prefilled
/// once): the recurrent state makes a step independent of the context; a KV cache makes it grow
/// with it. For one variant and batch size, every context's decoder is prefilled first and their
/// steps are then timed in turn (one step of each, `steps` times), so that a drift of the
/// machine's speed during the run falls on every context alike (a step of one sequence is bound
/// by its kernel launches, whose cost drifts by tens of percent from minute to minute); this
/// holds every context's state or cache at once. A KV cache is timed only up to `cache_max`
/// tokens of context (softmax's prefill is quadratic) and `cache_max_tokens` tokens cached over
/// the batch (its memory); the rows beyond are reported as skipped. With `profile` (a backend
/// that can time its ops), each row also times its ops over `steps` more steps and over one more
/// prefill.
///
/// [`DecodeForm::resolve`]: crate::inference::DecodeForm::resolve
#[allow(clippy::too_many_arguments)]
pub fn decode<B: crate::backend::Backend>(
    make: &mut dyn FnMut() -> B,
    variants: &[(String, crate::config::Config, crate::inference::DecodeForm)],
    batches: &[usize],
    contexts: &[usize],
    steps: usize,
    cache_max: usize,
    cache_max_tokens: usize,
    profile: bool,
) -> Vec<DecodeBenchRow> {
    use crate::inference::{DecodeForm, Decoder};
    use crate::model::Model;
    let steps = steps.max(1);
    let mut rows = Vec::new();
    for (name, c, form) in variants {
        let form = *form;
        let model = Model::init(make(), c, 1);
        let vocab = model.dims.vocab as u64;
        let prompt = |ctx: usize| -> Vec<u32> {
            (0..ctx as u64)
                .map(|i| (i.wrapping_mul(2_654_435_761) % vocab) as u32)
                .collect()
        };
        let mut variant_rows = Vec::new();
        for &batch in batches {
            // sequence i's tokens at step s: distinct across the batch, like real sampling
            let tokens = |s: usize| -> Vec<u32> {
                (0..batch)
                    .map(|i| ((s * batch + i) as u64 * 40_503 % vocab) as u32)
                    .collect()
            };
            let mut live = Vec::new(); // (context, decoder, prefill seconds)
            for &ctx in contexts {
                let cached = form == DecodeForm::KvCache;
                if cached && (ctx > cache_max || batch * ctx > cache_max_tokens) {
                    variant_rows.push(DecodeBenchRow {
                        variant: name.clone(),
                        form,
                        batch,
                        context: ctx,
                        step_us: None,
                        prefill_s: 0.0,
                        memory_bytes: 0,
                        profile: None,
                        prefill_profile: None,
                    });
                    continue;
                }
                let prompt = prompt(ctx);
                let t0 = Instant::now();
                let (mut dec, _) =
                    Decoder::prefill_batch_as(&model, &vec![&prompt[..]; batch], form);
                let prefill_s = t0.elapsed().as_secs_f64();
                for s in 0..4 {
                    dec.step(&tokens(s)); // warm-up: caches, allocator
                }
                live.push((ctx, dec, prefill_s));
            }
            let mut times = vec![Vec::with_capacity(steps); live.len()];
            for s in 0..steps {
                let toks = tokens(4 + s);
                for ((_, dec, _), times) in live.iter_mut().zip(&mut times) {
                    let t0 = Instant::now();
                    std::hint::black_box(dec.step(&toks));
                    times.push(t0.elapsed().as_secs_f64() * 1e6);
                }
            }
            for ((ctx, mut dec, prefill_s), mut times) in live.into_iter().zip(times) {
                times.sort_by(f64::total_cmp);
                let profile = (profile && model.backend.set_profiling(true)).then(|| {
                    // op by op: a recorded step would time as one replay
                    dec.set_recording(false);
                    let t0 = Instant::now();
                    for s in 0..steps {
                        dec.step(&tokens(4 + steps + s));
                    }
                    let total = t0.elapsed().as_secs_f64();
                    let ops = model.backend.profile();
                    model.backend.set_profiling(false); // (clears the rows)
                    (ops, total)
                });
                let memory_bytes = dec.memory_bytes();
                drop(dec); // (its memory, before a second prefill)
                let prefill_profile = profile.is_some().then(|| {
                    model.backend.set_profiling(true);
                    let prompt = prompt(ctx);
                    let t0 = Instant::now();
                    let dec = Decoder::prefill_batch_as(&model, &vec![&prompt[..]; batch], form);
                    let total = t0.elapsed().as_secs_f64();
                    drop(dec);
                    let ops = model.backend.profile();
                    model.backend.set_profiling(false);
                    (ops, total)
                });
                variant_rows.push(DecodeBenchRow {
                    variant: name.clone(),
                    form,
                    batch,
                    context: ctx,
                    step_us: Some(times[times.len() / 2]),
                    prefill_s,
                    memory_bytes,
                    profile,
                    prefill_profile,
                });
            }
        }
        // the table's order: by context, then batch (a stable sort keeps `contexts`' order)
        let order = |ctx: usize| contexts.iter().position(|&c| c == ctx);
        variant_rows
            .sort_by_key(|r| (order(r.context), batches.iter().position(|&b| b == r.batch)));
        rows.extend(variant_rows);
    }
    rows
}

/// `bytes` in the largest binary unit that keeps the number at least 1 (`"2.5 KiB"`).
pub fn format_bytes(bytes: usize) -> String {
    let mut x = bytes as f64;
    for unit in ["B", "KiB", "MiB", "GiB"] {
        if x < 1024.0 || unit == "GiB" {
            return format!("{x:.1} {unit}");
        }
        x /= 1024.0;
    }
    unreachable!()
}

/// Formats [`decode`] rows; each row's ratio is against the same variant and batch at the
/// shortest context.
pub fn format_decode_table(rows: &[DecodeBenchRow]) -> String {
    let mut s = String::from(
        " variant    | batch | context | prefill s | µs per step | tokens/s | × shortest context | state or cache | form\n",
    );
    s.push_str(
        "------------+-------+---------+-----------+-------------+----------+--------------------+----------------+----------\n",
    );
    for r in rows {
        let base = rows
            .iter()
            .find(|b| b.variant == r.variant && b.batch == r.batch)
            .and_then(|b| b.step_us);
        match r.step_us {
            Some(us) => s.push_str(&format!(
                " {:<10} | {:>5} | {:>7} | {:>9.2} | {:>11.1} | {:>8.0} | {:>17.2}× | {:>14} | {}\n",
                r.variant,
                r.batch,
                r.context,
                r.prefill_s,
                us,
                r.batch as f64 * 1e6 / us,
                base.map_or(f64::NAN, |b| us / b),
                format_bytes(r.memory_bytes),
                r.form
            )),
            None => s.push_str(&format!(
                " {:<10} | {:>5} | {:>7} | skipped ({}): over --softmax-max or --softmax-max-cached\n",
                r.variant, r.batch, r.context, r.form
            )),
        }
    }
    s
}

/// One row of the training-step benchmark.
#[derive(Clone, Debug)]
pub struct TrainBenchRow {
    /// Attention variant (config value of `model.attention`).
    pub attention: String,
    /// Training context.
    pub context: usize,
    /// Sequences per step.
    pub batch: usize,
    /// Median wall time of one step, milliseconds.
    pub step_ms: f64,
}

impl TrainBenchRow {
    /// Training tokens per second.
    pub fn tokens_per_second(&self) -> f64 {
        (self.batch * self.context) as f64 / (self.step_ms * 1e-3)
    }
}

/// Times training steps of `model` on random tokens, `batch` sequences of `context`: forward
/// with the loss, the loss read back, backward, the gradient norm read back, AdamW on every
/// parameter — what `train` does per micro-batch and step, without the data loader. One
/// warm-up step, then the median of `steps`; returns milliseconds per step. With `profile`, the
/// backend's op timer is switched on after the set-up (the gradients and AdamW's moments are
/// made outside what it reports) for every step, warm-up included, and the second value is
/// those steps' wall seconds.
pub fn train_step_ms<B: crate::backend::Backend>(
    model: &mut crate::model::Model<B>,
    batch: usize,
    context: usize,
    steps: usize,
    profile: bool,
) -> (f64, f64) {
    use crate::float::Float;
    use crate::ops::adamw::{AdamWConfig, AdamWParam};
    use rand::Rng;
    let mut r = rng(context as u64);
    let n = batch * context;
    let vocab = model.dims.vocab as u32;
    let ids: Vec<u32> = (0..n).map(|_| r.gen_range(0..vocab)).collect();
    let targets: Vec<u32> = (0..n).map(|_| r.gen_range(0..vocab)).collect();
    let dloss = model
        .backend
        .upload(&vec![B::Scalar::of(1.0 / n as f64); n]);
    let mut m = model.zeros_like();
    let mut v = model.zeros_like();
    let ac = AdamWConfig {
        lr: 1e-4,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let mut times = Vec::with_capacity(steps);
    let mut grads = model.zeros_like();
    if profile {
        model.backend.set_profiling(true);
    }
    let start = Instant::now();
    for step in 0..=steps.max(1) {
        let t0 = Instant::now();
        model.backend.zero_all(&mut grads.refs_mut());
        let tr = model.forward(&ids, Some(&targets), batch, context, None);
        std::hint::black_box(
            model
                .backend
                .download(tr.losses.as_ref().expect("targets given")),
        );
        model.backward(&tr, &dloss, &mut grads);
        drop(tr);
        std::hint::black_box(model.backend.sum_squares_each(&grads.refs()));
        let mut params = AdamWParam::zip(
            model.params.refs_mut(),
            grads.refs(),
            m.refs_mut(),
            v.refs_mut(),
            |_| ac,
        );
        model.backend.adamw_step(step as u64 + 1, 1.0, &mut params);
        drop(params);
        // the next step's first read-back waits for this step's updates; time them here
        std::hint::black_box(model.backend.sum_squares(&model.params.wte));
        if step > 0 {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    let total = start.elapsed().as_secs_f64();
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], total)
}

/// Formats [`train_step_ms`] rows; the ratio is each row's tokens/s over the first row's at
/// the same context.
pub fn format_train_table(rows: &[TrainBenchRow]) -> String {
    let mut s = String::from(
        " attention    | context | batch | ms per step | tokens/s | × first at this context\n",
    );
    s.push_str(
        "--------------+---------+-------+-------------+----------+------------------------\n",
    );
    for r in rows {
        let base = rows
            .iter()
            .find(|b| b.context == r.context)
            .map_or(f64::NAN, TrainBenchRow::tokens_per_second);
        s.push_str(&format!(
            " {:<12} | {:>7} | {:>5} | {:>11.1} | {:>8.0} | {:>6.2}×\n",
            r.attention,
            r.context,
            r.batch,
            r.step_ms,
            r.tokens_per_second(),
            r.tokens_per_second() / base
        ));
    }
    s
}

/// Formats a profile as a table with each op's share of `total` seconds (the wall time of the
/// profiled steps; the remainder is host work between ops).
pub fn format_profile(rows: &[crate::backend::ProfileRow], total: f64) -> String {
    let mut s = String::from(" op                               |  calls |    ms total | share\n");
    s.push_str("----------------------------------+--------+-------------+------\n");
    let mut sum = 0.0;
    for r in rows {
        sum += r.seconds;
        s.push_str(&format!(
            " {:<32} | {:>6} | {:>11.2} | {:>4.1} %\n",
            r.op,
            r.calls,
            r.seconds * 1e3,
            100.0 * r.seconds / total
        ));
    }
    s.push_str(&format!(
        " {:<32} | {:>6} | {:>11.2} | {:>4.1} %\n",
        "(host, between ops)",
        "",
        (total - sum) * 1e3,
        100.0 * (total - sum) / total
    ));
    s
}
