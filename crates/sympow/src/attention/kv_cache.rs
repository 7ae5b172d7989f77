//! Softmax's decoding form: a KV cache. Each new token appends its rotated key and value and
//! attends over everything cached, so a step costs O(t·d) at context t — the cost a sympow
//! [`RecurrentState`](super::RecurrentState) does not have. This is the CPU's form (in f64, as
//! the recurrent state) and the reference the GPU's cache is checked against.

use super::{AttentionSpec, Shape};
use crate::float::Float;
use rayon::prelude::*;

/// The keys and values of every head of `batch` sequences decoded in step, in f64.
///
/// ```
/// use sympow::attention::{AttentionSpec, KvCache, Shape};
/// let spec = AttentionSpec::softmax(2);
/// let shape = Shape { batch: 1, time: 1, heads: 1, dk: 2, dv: 2 };
/// // one cached token (key [1, 0], value [1, 2]), then a second (key [0, 1], value [3, 4])
/// let mut cache = KvCache::<f32>::new(&spec, &shape, &[1.0, 0.0], &[1.0, 2.0]);
/// let y = cache.step(&[20.0, 0.0], &[0.0, 1.0], &[3.0, 4.0]);
/// // the query scores the first key far above the second: y ≈ its value
/// assert!((y[0] - 1.0).abs() < 1e-3 && (y[1] - 2.0).abs() < 1e-3);
/// assert_eq!(cache.len(), 2);
/// ```
#[derive(Clone, Debug)]
pub struct KvCache<F> {
    scale: f64,
    heads: usize,
    d: usize,
    e: usize,
    /// Per sequence and head: keys `[t, d]` and values `[t, e]`, row-major.
    keys: Vec<Vec<f64>>,
    values: Vec<Vec<f64>>,
    _f: std::marker::PhantomData<F>,
}

impl<F: Float> KvCache<F> {
    /// A cache holding `shape.time` tokens of `shape.batch` sequences: `keys` `[batch, time,
    /// heads, dk]` and `values` `[batch, time, heads, dv]`, as the forward pass lays them out.
    pub fn new(spec: &AttentionSpec, shape: &Shape, keys: &[F], values: &[F]) -> Self {
        let (b, t, h, d, e) = (shape.batch, shape.time, shape.heads, shape.dk, shape.dv);
        assert!(
            keys.len() == b * t * h * d && values.len() == b * t * h * e,
            "a KV cache takes keys [batch, time, heads, dk] and values [batch, time, heads, dv]"
        );
        // [batch, time, heads, w] → per (sequence, head) [time, w]
        let split = |x: &[F], w: usize| -> Vec<Vec<f64>> {
            (0..b * h)
                .map(|bh| {
                    let (bi, hh) = (bh / h, bh % h);
                    (0..t)
                        .flat_map(|ti| &x[((bi * t + ti) * h + hh) * w..][..w])
                        .map(|a| a.f64())
                        .collect()
                })
                .collect()
        };
        KvCache {
            scale: spec.scale,
            heads: h,
            d,
            e,
            keys: split(keys, d),
            values: split(values, e),
            _f: std::marker::PhantomData,
        }
    }

    /// Tokens cached per sequence.
    pub fn len(&self) -> usize {
        self.keys.first().map_or(0, |k| k.len() / self.d)
    }

    /// Whether no token is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of keys and values held (f64).
    pub fn bytes(&self) -> usize {
        let values: usize = self.keys.iter().chain(&self.values).map(Vec::len).sum();
        values * std::mem::size_of::<f64>()
    }

    /// One token per sequence: appends k (`[batch, heads, dk]`) and v (`[batch, heads, dv]`),
    /// then attends over the cache with q (`[batch, heads, dk]`). Returns y `[batch, heads,
    /// dv]`.
    pub fn step(&mut self, q: &[F], k: &[F], v: &[F]) -> Vec<F> {
        let (d, e) = (self.d, self.e);
        let bh = self.keys.len();
        assert!(
            q.len() == bh * d && k.len() == bh * d && v.len() == bh * e,
            "decode step: q, k must be [batch·heads, dk] and v [batch·heads, dv] of the cache's shape ({} heads)",
            self.heads
        );
        // (sequence, head) pairs are independent: one task each
        let scale = self.scale;
        let heads: Vec<Vec<F>> = (&mut self.keys, &mut self.values)
            .into_par_iter()
            .enumerate()
            .map(|(i, (keys, values))| {
                keys.extend(k[i * d..(i + 1) * d].iter().map(|a| a.f64()));
                values.extend(v[i * e..(i + 1) * e].iter().map(|a| a.f64()));
                let qi = &q[i * d..(i + 1) * d];
                let scores: Vec<f64> = keys
                    .chunks_exact(d)
                    .map(|kk| scale * kk.iter().zip(qi).map(|(a, b)| a * b.f64()).sum::<f64>())
                    .collect();
                let mx = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
                let z: f64 = w.iter().sum();
                let mut acc = vec![0.0f64; e];
                for (wi, vv) in w.iter().zip(values.chunks_exact(e)) {
                    acc.iter_mut().zip(vv).for_each(|(a, &vc)| *a += wi * vc);
                }
                acc.iter().map(|a| F::of(a / z)).collect()
            })
            .collect();
        heads.concat()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::{attention_forward, Form};
    use rand::{Rng, SeedableRng};

    /// Prefilling t0 tokens and stepping the rest gives the quadratic softmax forward's last
    /// rows, for several sequences and heads.
    #[test]
    fn steps_match_the_quadratic_forward() {
        let (b, t, t0, h, d) = (2, 12, 5, 3, 4);
        let shape = Shape {
            batch: b,
            time: t,
            heads: h,
            dk: d,
            dv: d,
        };
        let spec = AttentionSpec::softmax(d);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let mut randn =
            |n: usize| -> Vec<f64> { (0..n).map(|_| rng.gen_range(-2.0..2.0)).collect() };
        let (q, k, v) = (
            randn(b * t * h * d),
            randn(b * t * h * d),
            randn(b * t * h * d),
        );
        let full = attention_forward(&spec, Form::Quadratic, &shape, &q, &k, &v, None);
        // the first t0 tokens of each sequence, and token ti of each as a step
        let rows = |x: &[f64], t_range: std::ops::Range<usize>| -> Vec<f64> {
            (0..b)
                .flat_map(|bi| {
                    let r = t_range.clone();
                    x[(bi * t + r.start) * h * d..(bi * t + r.end) * h * d].to_vec()
                })
                .collect()
        };
        let pre = Shape { time: t0, ..shape };
        let mut cache = KvCache::<f64>::new(&spec, &pre, &rows(&k, 0..t0), &rows(&v, 0..t0));
        for ti in t0..t {
            let y = cache.step(
                &rows(&q, ti..ti + 1),
                &rows(&k, ti..ti + 1),
                &rows(&v, ti..ti + 1),
            );
            for (a, b) in y.iter().zip(rows(&full.y, ti..ti + 1)) {
                assert!((a - b).abs() < 1e-12, "token {ti}: {a} vs {b}");
            }
        }
        assert_eq!(cache.len(), t);
    }
}
