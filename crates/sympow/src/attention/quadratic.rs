//! The quadratic form (SPEC §2): blocks of queries against all earlier keys, in log space.
//!
//! Cost O(T²·d); memory O(T·block). The reference that the state-space forms are checked
//! against, and the only form of softmax attention.

use super::tile::{tile_backward, tile_forward, Tile, TileGrads};
use super::{
    cumsum_f64, normalise, per_head, AttentionGrads, AttentionOut, AttentionSpec, HeadData, Shape,
};
use crate::float::Float;
use rayon::prelude::*;

/// Rows per query (forward, backward dq) or key (backward dk, dv) block.
const BLOCK: usize = 64;

/// Gate offsets of rows `lo..hi` relative to the cumulative gate at `origin`, so that
/// differences between nearby rows are exact however large the totals grow.
fn rel_gates<F: Float>(
    gcum: Option<&[f64]>,
    lo: usize,
    hi: usize,
    origin: usize,
) -> Option<Vec<F>> {
    gcum.map(|g| g[lo..hi].iter().map(|&x| F::of(x - g[origin])).collect())
}

/// Quadratic-form forward; see [`super::attention_forward`].
pub fn quadratic_attention_forward<F: Float>(
    spec: &AttentionSpec,
    shape: &Shape,
    q: &[F],
    k: &[F],
    v: &[F],
    log_gates: Option<&[F]>,
) -> AttentionOut<Vec<F>> {
    let (t_len, d, e) = (shape.time, shape.dk, shape.dv);
    let outs = per_head(
        shape,
        q,
        k,
        v,
        log_gates,
        &[e, 1],
        |h: HeadData<F>, _, _| {
            let gcum = h.g.as_deref().map(cumsum_f64);
            let blocks: Vec<usize> = (0..t_len).step_by(BLOCK).collect();
            let rows: Vec<(Vec<F>, Vec<F>)> = blocks
                .par_iter()
                .map(|&r0| {
                    let m = BLOCK.min(t_len - r0);
                    let n = r0 + m;
                    let tile = Tile {
                        m,
                        n,
                        d,
                        e,
                        offset: r0 as isize,
                    };
                    let gq = rel_gates(gcum.as_deref(), r0, r0 + m, r0);
                    let gk = rel_gates(gcum.as_deref(), 0, n, r0);
                    let mut out = tile_forward(
                        spec,
                        &tile,
                        &h.q[r0 * d..n * d],
                        &h.k[..n * d],
                        &h.v[..n * e],
                        gq.as_deref(),
                        gk.as_deref(),
                    );
                    let ln: Vec<F> = (0..m)
                        .map(|i| {
                            normalise(
                                &mut out.num[i * e..(i + 1) * e],
                                out.den[i],
                                out.max[i],
                                spec.eps,
                            )
                        })
                        .collect();
                    (out.num, ln)
                })
                .collect();
            let (y, ln): (Vec<_>, Vec<_>) = rows.into_iter().unzip();
            vec![y.concat(), ln.concat()]
        },
    );
    super::forward_out(outs)
}

/// Quadratic-form backward (two passes, flash-attention style: one over query blocks for dq,
/// one over key blocks for dk and dv, each recomputing its weights).
pub fn quadratic_attention_backward<F: Float>(
    spec: &AttentionSpec,
    shape: &Shape,
    q: &[F],
    k: &[F],
    v: &[F],
    log_gates: Option<&[F]>,
    fwd: &AttentionOut<Vec<F>>,
    dy: &[F],
) -> AttentionGrads<Vec<F>> {
    let (t_len, d, e) = (shape.time, shape.dk, shape.dv);
    let gated = log_gates.is_some();
    let outs = per_head(
        shape,
        q,
        k,
        v,
        log_gates,
        &[d, d, e, 1],
        |h: HeadData<F>, b, hd| {
            let y = super::gather(&fwd.y, shape, e, b, hd);
            let ln = super::gather(&fwd.log_norm, shape, 1, b, hd);
            let dyh = super::gather(dy, shape, e, b, hd);
            let gcum = h.g.as_deref().map(cumsum_f64);
            let blocks: Vec<usize> = (0..t_len).step_by(BLOCK).collect();
            // Pass 1: query block r0..r0+m against keys 0..r0+m → dq and the queries' dG.
            let dq_parts: Vec<(Vec<F>, Vec<F>)> = blocks
                .par_iter()
                .map(|&r0| {
                    let m = BLOCK.min(t_len - r0);
                    let n = r0 + m;
                    let tile = Tile {
                        m,
                        n,
                        d,
                        e,
                        offset: r0 as isize,
                    };
                    let gq = rel_gates(gcum.as_deref(), r0, r0 + m, r0);
                    let gk = rel_gates(gcum.as_deref(), 0, n, r0);
                    let mut dq = vec![F::zero(); m * d];
                    let mut dg = vec![F::zero(); m];
                    let rows = r0 * e..n * e;
                    tile_backward(
                        spec,
                        &tile,
                        &h.q[r0 * d..n * d],
                        &h.k[..n * d],
                        &h.v[..n * e],
                        gq.as_deref(),
                        gk.as_deref(),
                        &y[rows.clone()],
                        &ln[r0..n],
                        &dyh[rows],
                        TileGrads {
                            dq: Some(&mut dq),
                            dk: None,
                            dv: None,
                            dgq: gated.then_some(&mut dg[..]),
                            dgk: None,
                        },
                    );
                    (dq, dg)
                })
                .collect();
            // Pass 2: key block r0..r0+n against queries r0..T → dk, dv and the keys' dG.
            let dkv_parts: Vec<(Vec<F>, Vec<F>, Vec<F>)> = blocks
                .par_iter()
                .map(|&r0| {
                    let n = BLOCK.min(t_len - r0);
                    let m = t_len - r0;
                    let tile = Tile {
                        m,
                        n,
                        d,
                        e,
                        offset: 0,
                    };
                    let gq = rel_gates(gcum.as_deref(), r0, t_len, r0);
                    let gk = rel_gates(gcum.as_deref(), r0, r0 + n, r0);
                    let mut dk = vec![F::zero(); n * d];
                    let mut dv = vec![F::zero(); n * e];
                    let mut dg = vec![F::zero(); n];
                    tile_backward(
                        spec,
                        &tile,
                        &h.q[r0 * d..],
                        &h.k[r0 * d..(r0 + n) * d],
                        &h.v[r0 * e..(r0 + n) * e],
                        gq.as_deref(),
                        gk.as_deref(),
                        &y[r0 * e..],
                        &ln[r0..],
                        &dyh[r0 * e..],
                        TileGrads {
                            dq: None,
                            dk: Some(&mut dk),
                            dv: Some(&mut dv),
                            dgq: None,
                            dgk: gated.then_some(&mut dg[..]),
                        },
                    );
                    (dk, dv, dg)
                })
                .collect();
            let mut dq = Vec::with_capacity(t_len * d);
            let mut dcum = Vec::with_capacity(t_len);
            for (a, g) in dq_parts {
                dq.extend(a);
                dcum.extend(g);
            }
            let mut dk = Vec::with_capacity(t_len * d);
            let mut dv = Vec::with_capacity(t_len * e);
            let mut i = 0;
            for (a, b, g) in dkv_parts {
                dk.extend(a);
                dv.extend(b);
                for x in g {
                    dcum[i] += x;
                    i += 1;
                }
            }
            vec![dq, dk, dv, reverse_cumsum(&dcum)]
        },
    );
    super::grads_out(outs, gated)
}

/// ∂L/∂g_r = Σ_{t ≥ r} ∂L/∂G_t, for G the inclusive cumulative sum of g (accumulated in f64).
pub(crate) fn reverse_cumsum<F: Float>(dcum: &[F]) -> Vec<F> {
    let mut acc = 0.0;
    let mut out: Vec<F> = dcum
        .iter()
        .rev()
        .map(|&x| {
            acc += x.f64();
            F::of(acc)
        })
        .collect();
    out.reverse();
    out
}
