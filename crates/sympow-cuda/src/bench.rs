//! `sympow bench attention` on the GPU: forward and forward+backward times of the fused chunked
//! sympow kernels against the cuBLAS softmax and the naive GPU quadratic kernels, at a fixed
//! number of tokens per call, as a table and as JSON lines that `bench/peers.py` merges with
//! its peers' timings.

use crate::CudaBackend;
use cudarc::driver::CudaSlice;
use std::time::Instant;
use sympow::attention::{AttentionSpec, Form, Shape};
use sympow::backend::Backend;
use sympow::testing::{log_gates, randn, rng};

/// One timing.
#[derive(Clone, Debug)]
pub struct Timing {
    /// Implementation.
    pub method: String,
    /// Sequence length.
    pub time: usize,
    /// Median forward time, ms.
    pub fwd_ms: f64,
    /// Median forward+backward time, ms.
    pub fwd_bwd_ms: f64,
}

impl Timing {
    /// One JSON object (the format `bench/peers.py` reads).
    pub fn json(&self, heads: usize, d: usize, tokens: usize) -> String {
        format!(
            "{{\"method\":\"{}\",\"T\":{},\"heads\":{heads},\"d\":{d},\"tokens\":{tokens},\"fwd_ms\":{:.4},\"fwd_bwd_ms\":{:.4}}}",
            self.method, self.time, self.fwd_ms, self.fwd_bwd_ms
        )
    }
}

/// Random inputs of one benchmark problem: `tokens / t` sequences of `t` tokens, gates in
/// [0.95, 0.999].
struct BenchInputs {
    shape: Shape,
    q: CudaSlice<f32>,
    k: CudaSlice<f32>,
    v: CudaSlice<f32>,
    dy: CudaSlice<f32>,
    g: CudaSlice<f32>,
}

impl BenchInputs {
    fn new(gpu: &CudaBackend, t: usize, tokens: usize, heads: usize, d: usize) -> Self {
        let shape = Shape {
            batch: (tokens / t).max(1),
            time: t,
            heads,
            dk: d,
            dv: d,
        };
        let n = shape.batch * t * heads;
        let mut r = rng(t as u64);
        let up = |x: Vec<f32>| gpu.upload(&x);
        let q = up(randn(&mut r, n * d, 1.0));
        let k = up(randn(&mut r, n * d, 1.0));
        let v = up(randn(&mut r, n * d, 1.0));
        let dy = up(randn(&mut r, n * d, 1.0));
        let g = up(log_gates(&mut r, n, 0.95, 0.999));
        BenchInputs {
            shape,
            q,
            k,
            v,
            dy,
            g,
        }
    }
}

fn median_ms(gpu: &CudaBackend, reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    gpu.stream().synchronize().expect("synchronize");
    let mut v: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let t0 = Instant::now();
            f();
            gpu.stream().synchronize().expect("synchronize");
            t0.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Times each implementation at each T with `tokens` tokens per call (batch = tokens / T),
/// `heads` heads of dimension `d`, gating on for sympow. The naive quadratic kernels are timed
/// only up to `naive_max_t` (they are O(T²) on CUDA cores).
pub fn attention_gpu(
    gpu: &CudaBackend,
    times: &[usize],
    tokens: usize,
    heads: usize,
    d: usize,
    reps: usize,
    naive_max_t: usize,
) -> Vec<Timing> {
    let mut out = Vec::new();
    for &t in times {
        let BenchInputs {
            shape,
            q,
            k,
            v,
            dy,
            g,
        } = BenchInputs::new(gpu, t, tokens, heads, d);
        let sym = AttentionSpec::sympow(2, d).expect("p = 2");
        let soft = AttentionSpec::softmax(d);
        let mut run = |method: &str, spec: &AttentionSpec, gates: bool, fused: bool| {
            gpu.set_fused_attention(fused);
            let gg = gates.then_some(&g);
            let form = Form::Chunked(1024);
            let fwd_ms = median_ms(gpu, reps, || {
                std::hint::black_box(gpu.attention_forward(spec, form, &shape, &q, &k, &v, gg));
            });
            let fwd_bwd_ms = median_ms(gpu, reps, || {
                let o = gpu.attention_forward(spec, form, &shape, &q, &k, &v, gg);
                std::hint::black_box(
                    gpu.attention_backward(spec, form, &shape, &q, &k, &v, gg, &o, &dy),
                );
            });
            out.push(Timing {
                method: method.into(),
                time: t,
                fwd_ms,
                fwd_bwd_ms,
            });
        };
        let fused = match gpu.fused_kernels() {
            Some(k) => format!("sympow fused chunked p=2 gated ({})", k.state_products(d)),
            None => "sympow fused chunked p=2 gated".to_string(),
        };
        run(&fused, &sym, true, true);
        run("softmax flash (bf16 tensor cores)", &soft, false, true);
        let p4 = AttentionSpec::sympow(4, d).expect("p = 4");
        run("sympow flash quadratic p=4 ungated", &p4, false, true);
        gpu.set_flash_softmax(false);
        run("softmax cuBLAS (scores in memory)", &soft, false, true);
        gpu.set_flash_softmax(true);
        if t <= naive_max_t {
            run("sympow naive quadratic p=2 gated", &sym, true, false);
            run("softmax naive quadratic", &soft, false, false);
        }
        gpu.set_fused_attention(true);
    }
    out
}

/// The timings as a table, with each method's time relative to the fused kernel at the same T.
pub fn format_table(rows: &[Timing]) -> String {
    let mut s = format!(
        "{:>6} | {:<34} | {:>10} | {:>12} | {:>14}\n",
        "T", "method", "fwd ms", "fwd+bwd ms", "× fused (f+b)"
    );
    s.push_str(&format!("{}\n", "-".repeat(88)));
    for r in rows {
        let base = rows
            .iter()
            .find(|b| b.time == r.time && b.method.starts_with("sympow fused"))
            .map_or(f64::NAN, |b| b.fwd_bwd_ms);
        s.push_str(&format!(
            "{:>6} | {:<34} | {:>10.3} | {:>12.3} | {:>13.2}×\n",
            r.time,
            r.method,
            r.fwd_ms,
            r.fwd_bwd_ms,
            r.fwd_bwd_ms / base
        ));
    }
    s
}

/// Per-stage wall times of one fused forward+backward at each T (each stage synchronised).
pub fn fused_stages(
    gpu: &CudaBackend,
    times: &[usize],
    tokens: usize,
    heads: usize,
    d: usize,
) -> String {
    let Some(kernels) = gpu.fused_kernels() else {
        return "fused kernels unavailable\n".into();
    };
    let mut s = String::new();
    for &t in times {
        let BenchInputs {
            shape,
            q,
            k,
            v,
            dy,
            g,
        } = BenchInputs::new(gpu, t, tokens, heads, d);
        let spec = AttentionSpec::sympow(2, d).expect("p = 2");
        let form = Form::Chunked(1024);
        let run = || {
            let o = gpu.attention_forward(&spec, form, &shape, &q, &k, &v, Some(&g));
            gpu.attention_backward(&spec, form, &shape, &q, &k, &v, Some(&g), &o, &dy);
        };
        run();
        kernels.start_profile();
        run();
        let stages = kernels.take_profile();
        let total: f64 = stages.iter().map(|x| x.1).sum();
        s.push_str(&format!(
            "T = {t}: {total:.3} ms in stages (synchronised)\n"
        ));
        for (name, ms) in stages {
            s.push_str(&format!(
                "  {name:<28} {ms:>8.3} ms  {:>5.1}%\n",
                100.0 * ms / total
            ));
        }
    }
    s
}
