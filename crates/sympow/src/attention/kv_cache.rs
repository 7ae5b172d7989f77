//! The KV-cache decoding form: each new token appends its rotated key and value (and, gated,
//! its cumulative log gate) and attends over everything cached, so a step costs O(t·d) at
//! context t. Softmax can only decode this way. Sympow decodes this way where its recurrent
//! state ([`RecurrentState`](super::RecurrentState), D·(e+1) numbers a head) would outweigh
//! the cache — at p = 4 and d = 64, D = C(67, 4) = 766,480, so the state is the size of a cache
//! of 389k tokens. A step is the quadratic form's last row: one [`tile_forward`] of one query
//! against the cached keys. This is the CPU's form (in f64, as the recurrent state) and the
//! reference the GPU's cache is checked against.

use super::tile::{tile_forward, Tile};
use super::{cumsum_f64, normalise, AttentionSpec, Shape};
use crate::float::Float;
use rayon::prelude::*;

/// The keys and values of every head of `batch` sequences decoded in step, in f64.
///
/// ```
/// use sympow::attention::{AttentionSpec, KvCache, Shape};
/// let spec = AttentionSpec::softmax(2);
/// let shape = Shape { batch: 1, time: 1, heads: 1, dk: 2, dv: 2 };
/// // one cached token (key [1, 0], value [1, 2]), then a second (key [0, 1], value [3, 4])
/// let mut cache = KvCache::<f32>::new(&spec, &shape, &[1.0, 0.0], &[1.0, 2.0], None);
/// let y = cache.step(&[20.0, 0.0], &[0.0, 1.0], &[3.0, 4.0], None);
/// // the query scores the first key far above the second: y ≈ its value
/// assert!((y[0] - 1.0).abs() < 1e-3 && (y[1] - 2.0).abs() < 1e-3);
/// assert_eq!(cache.len(), 2);
/// ```
#[derive(Clone, Debug)]
pub struct KvCache<F> {
    spec: AttentionSpec,
    heads: usize,
    d: usize,
    e: usize,
    /// Per sequence and head: keys `[t, d]` and values `[t, e]`, row-major.
    keys: Vec<Vec<f64>>,
    values: Vec<Vec<f64>>,
    /// Gated attention: per sequence and head, each cached token's cumulative log gate
    /// G_s = Σ_{u≤s} ln γ_u (a key's weight at query t carries exp(G_t − G_s)).
    gates: Option<Vec<Vec<f64>>>,
    _f: std::marker::PhantomData<F>,
}

impl<F: Float> KvCache<F> {
    /// A cache holding `shape.time` tokens of `shape.batch` sequences: `keys` `[batch, time,
    /// heads, dk]`, `values` `[batch, time, heads, dv]` and, for gated attention, `log_gates`
    /// `[batch, time, heads]`, as the forward pass lays them out. Its steps then take log
    /// gates too.
    pub fn new(
        spec: &AttentionSpec,
        shape: &Shape,
        keys: &[F],
        values: &[F],
        log_gates: Option<&[F]>,
    ) -> Self {
        let (b, t, h, d, e) = (shape.batch, shape.time, shape.heads, shape.dk, shape.dv);
        assert!(
            keys.len() == b * t * h * d
                && values.len() == b * t * h * e
                && log_gates.is_none_or(|g| g.len() == b * t * h),
            "a KV cache takes keys [batch, time, heads, dk], values [batch, time, heads, dv] and log gates [batch, time, heads]"
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
            spec: *spec,
            heads: h,
            d,
            e,
            keys: split(keys, d),
            values: split(values, e),
            gates: log_gates.map(|g| split(g, 1).iter().map(|g| cumsum_f64(g)).collect()),
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

    /// Bytes of keys, values and cumulative gates held (f64).
    pub fn bytes(&self) -> usize {
        let gates = self.gates.iter().flatten();
        let values: usize = self
            .keys
            .iter()
            .chain(&self.values)
            .chain(gates)
            .map(Vec::len)
            .sum();
        values * std::mem::size_of::<f64>()
    }

    /// One token per sequence: appends k (`[batch, heads, dk]`), v (`[batch, heads, dv]`) and,
    /// for a gated cache, the log gate (`[batch, heads]`), then attends over the cache with q
    /// (`[batch, heads, dk]`). Returns y `[batch, heads, dv]`.
    pub fn step(&mut self, q: &[F], k: &[F], v: &[F], log_gates: Option<&[F]>) -> Vec<F> {
        let (d, e) = (self.d, self.e);
        let bh = self.keys.len();
        assert!(
            q.len() == bh * d && k.len() == bh * d && v.len() == bh * e,
            "decode step: q, k must be [batch·heads, dk] and v [batch·heads, dv] of the cache's shape ({} heads)",
            self.heads
        );
        assert!(
            log_gates.is_some() == self.gates.is_some() && log_gates.is_none_or(|g| g.len() == bh),
            "decode step: a gated cache takes log gates [batch·heads], an ungated one none"
        );
        let spec = self.spec;
        let mut gates: Vec<Option<&mut Vec<f64>>> = match &mut self.gates {
            Some(g) => g.iter_mut().map(Some).collect(),
            None => (0..bh).map(|_| None).collect(),
        };
        // (sequence, head) pairs are independent: one task each
        let heads: Vec<Vec<F>> = (&mut self.keys, &mut self.values, &mut gates)
            .into_par_iter()
            .enumerate()
            .map(|(i, (keys, values, gates))| {
                keys.extend(k[i * d..(i + 1) * d].iter().map(|a| a.f64()));
                values.extend(v[i * e..(i + 1) * e].iter().map(|a| a.f64()));
                let n = keys.len() / d;
                // the gates relative to the query's own: exp(G_t − G_s) exactly where it matters
                let gk: Option<Vec<f64>> = gates.as_mut().zip(log_gates).map(|(g, lg)| {
                    g.push(g.last().copied().unwrap_or(0.0) + lg[i].f64());
                    g.iter().map(|&x| x - g[n - 1]).collect()
                });
                let tile = Tile {
                    m: 1,
                    n,
                    d,
                    e,
                    offset: n as isize - 1,
                };
                let qi: Vec<f64> = q[i * d..(i + 1) * d].iter().map(|a| a.f64()).collect();
                let gq = gk.as_ref().map(|_| &[0.0][..]); // the query's own, relative to itself
                let mut out = tile_forward(&spec, &tile, &qi, keys, values, gq, gk.as_deref());
                normalise(&mut out.num, out.den[0], out.max[0], spec.eps);
                out.num.iter().map(|&a| F::of(a)).collect()
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

    /// Prefilling t0 tokens and stepping the rest gives the quadratic forward's last rows, for
    /// several sequences and heads: softmax, and sympow at p = 2 and 4, gated and not (strong
    /// gates, so that the decay's exp(G_t − G_s) matters).
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
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let mut randn = |n: usize, lo: f64, hi: f64| -> Vec<f64> {
            (0..n).map(|_| rng.gen_range(lo..hi)).collect()
        };
        let (q, k, v) = (
            randn(b * t * h * d, -2.0, 2.0),
            randn(b * t * h * d, -2.0, 2.0),
            randn(b * t * h * d, -2.0, 2.0),
        );
        let gates = randn(b * t * h, -1.5, 0.0);
        // the rows of tokens `r` of each sequence, of width w
        let rows = |x: &[f64], r: std::ops::Range<usize>, w: usize| -> Vec<f64> {
            (0..b)
                .flat_map(|bi| x[(bi * t + r.start) * h * w..(bi * t + r.end) * h * w].to_vec())
                .collect()
        };
        let specs = [
            AttentionSpec::softmax(d),
            AttentionSpec::sympow(2, d).unwrap(),
            AttentionSpec::sympow(4, d).unwrap(),
        ];
        for spec in specs {
            for gated in [false, true] {
                let g = gated.then_some(&gates[..]);
                let full = attention_forward(&spec, Form::Quadratic, &shape, &q, &k, &v, g);
                let pre = Shape { time: t0, ..shape };
                let mut cache = KvCache::<f64>::new(
                    &spec,
                    &pre,
                    &rows(&k, 0..t0, d),
                    &rows(&v, 0..t0, d),
                    g.map(|g| rows(g, 0..t0, 1)).as_deref(),
                );
                for ti in t0..t {
                    let y = cache.step(
                        &rows(&q, ti..ti + 1, d),
                        &rows(&k, ti..ti + 1, d),
                        &rows(&v, ti..ti + 1, d),
                        g.map(|g| rows(g, ti..ti + 1, 1)).as_deref(),
                    );
                    for (a, b) in y.iter().zip(rows(&full.y, ti..ti + 1, d)) {
                        assert!(
                            (a - b).abs() < 1e-12,
                            "{:?}, gated {gated}, token {ti}: {a} vs {b}",
                            spec.kernel
                        );
                    }
                }
                assert_eq!(cache.len(), t);
            }
        }
    }

    /// A gated cache refuses an ungated step (and the other way round) instead of decoding
    /// with the wrong weights.
    #[test]
    #[should_panic(expected = "a gated cache takes log gates")]
    fn a_gated_cache_needs_gates() {
        let spec = AttentionSpec::sympow(2, 2).unwrap();
        let shape = Shape {
            batch: 1,
            time: 1,
            heads: 1,
            dk: 2,
            dv: 2,
        };
        let mut cache = KvCache::<f32>::new(&spec, &shape, &[1.0, 0.0], &[1.0, 2.0], Some(&[-0.1]));
        cache.step(&[1.0, 0.0], &[0.0, 1.0], &[3.0, 4.0], None);
    }
}
