//! The chunked form (SPEC §4): linear in T, what training runs.
//!
//! Split T into chunks of `c` tokens (the last may be shorter). With local cumulative log-gates
//! G_τ inside a chunk and the chunk total Γ = G_last:
//! 1. [`update_state`]: ΔS = Σ_τ e^{Γ−G_τ} φ(k_τ) v̂_τᵀ, computed as φ(K̃)ᵀV̂ with
//!    k̃_τ = e^{(Γ−G_τ)/p} k_τ (homogeneity of φ).
//! 2. [`discumsum`]: S entering chunk i+1 is e^{Γ_i} S_i + ΔS_i.
//! 3. [`query_state`]: the inter-chunk part φ(Q̃) S_i with q̃_τ = e^{G_τ/p} σ q_τ.
//! 4. [`intra_chunk_attention`]: the quadratic form inside the chunk.
//! 5. [`combine`]: (inter + intra) numerators over denominators, with a common stabiliser.
//!
//! v̂ = [v, 1] carries the denominator z as an extra value column, so S is `D × (e+1)` and one
//! matrix product serves both numerator and denominator. The backward pass is chunked too:
//! it recomputes the chunk states, runs the discounted cumsum in reverse for the state
//! gradients, then differentiates each chunk independently. Memory is O(T/c · D·e).
//!
//! Precision: the inter-chunk part has an absolute error ~ulp·|σq|^p·|k|^p per earlier token,
//! whatever the result. It matters only where Σa is itself tiny — early tokens of a sequence
//! whose queries are nearly orthogonal to every key — and those are answered by the exact
//! intra-chunk attention unless the chunks are tiny. In f32 with p = 4, one- and two-token
//! chunks give up to 1e-2 relative error there; c ≥ 5 stays below 1e-5 (see the
//! `form_errors` example). Use c ≥ 16 in practice (64–1024 is typical).

use super::phi::SymPow;
use super::quadratic::reverse_cumsum;
use super::tile::{tile_backward, tile_forward, Tile, TileGrads, TileOut};
use super::{per_head, AttentionGrads, AttentionOut, AttentionSpec, HeadData, Shape};
use crate::float::Float;
use crate::ops::linalg::{matmul, Trans};
use rayon::prelude::*;

/// Local inclusive cumulative log-gates of one chunk (accumulated in f64).
pub fn local_cumulative_gates<F: Float>(g: &[F]) -> Vec<F> {
    super::cumsum_f64(g).into_iter().map(F::of).collect()
}

/// `[v, 1]` row by row: `L × (e+1)`.
fn augment<F: Float>(v: &[F], e: usize) -> Vec<F> {
    v.chunks_exact(e)
        .flat_map(|r| r.iter().copied().chain(std::iter::once(F::one())))
        .collect()
}

/// Keys scaled by e^{(Γ−G_τ)/p}, the decay from their position to the end of the chunk.
fn decayed_keys<F: Float>(k: &[F], d: usize, gcum: Option<&[F]>, p: u32) -> Vec<F> {
    let mut kt = k.to_vec();
    if let Some(g) = gcum {
        let total = *g.last().unwrap();
        for (row, &gt) in kt.chunks_exact_mut(d).zip(g) {
            let s = ((total - gt) / F::of(p as f64)).exp();
            row.iter_mut().for_each(|x| *x *= s);
        }
    }
    kt
}

/// Queries scaled by σ·e^{G_τ/p}, the decay from the chunk start to their position.
fn decayed_queries<F: Float>(q: &[F], d: usize, gcum: Option<&[F]>, p: u32, scale: f64) -> Vec<F> {
    let mut qt = q.to_vec();
    let rows = q.len() / d;
    for (i, row) in qt.chunks_exact_mut(d).enumerate().take(rows) {
        let s = F::of(scale) * gcum.map_or(F::one(), |g| (g[i] / F::of(p as f64)).exp());
        row.iter_mut().for_each(|x| *x *= s);
    }
    qt
}

/// Step 1: one chunk's contribution to the state, ΔS = φ(K̃)ᵀ[V, 1] (`D × (e+1)`).
pub fn update_state<F: Float>(
    sp: &SymPow,
    k: &[F],
    v: &[F],
    gcum: Option<&[F]>,
    e: usize,
) -> Vec<F> {
    let l = v.len() / e;
    let kt = decayed_keys(k, sp.d, gcum, sp.p);
    let mut phi = vec![F::zero(); l * sp.dim];
    sp.forward(&kt, &mut phi);
    let mut ds = vec![F::zero(); sp.dim * (e + 1)];
    matmul(
        &mut ds,
        &phi,
        Trans::Yes,
        &augment(v, e),
        Trans::No,
        sp.dim,
        l,
        e + 1,
        false,
    );
    ds
}

/// Step 2: discounted cumulative sum over chunks. Takes every chunk's ΔS and total log-gate
/// Γ and turns `states[i]` into the state *entering* chunk i: S_0 = 0,
/// S_{i+1} = e^{Γ_i} S_i + ΔS_i. Sequential in i; each step is one scaled add.
pub fn discumsum<F: Float>(states: &mut [Vec<F>], totals: &[F]) {
    let mut carry: Option<Vec<F>> = None;
    for (s, &gamma) in states.iter_mut().zip(totals) {
        let delta = std::mem::take(s);
        let entering = carry.take().unwrap_or_else(|| vec![F::zero(); delta.len()]);
        let decay = gamma.exp();
        let next: Vec<F> = entering
            .iter()
            .zip(&delta)
            .map(|(&a, &b)| decay * a + b)
            .collect();
        *s = entering;
        carry = Some(next);
    }
}

/// Step 3: the inter-chunk part for each query of a chunk, φ(Q̃) S (`L × (e+1)`: numerator
/// then denominator).
pub fn query_state<F: Float>(
    sp: &SymPow,
    q: &[F],
    gcum: Option<&[F]>,
    scale: f64,
    state: &[F],
    e: usize,
) -> Vec<F> {
    let l = q.len() / sp.d;
    let qt = decayed_queries(q, sp.d, gcum, sp.p, scale);
    let mut phi = vec![F::zero(); l * sp.dim];
    sp.forward(&qt, &mut phi);
    let mut out = vec![F::zero(); l * (e + 1)];
    matmul(
        &mut out,
        &phi,
        Trans::No,
        state,
        Trans::No,
        l,
        sp.dim,
        e + 1,
        false,
    );
    out
}

/// Step 4: the quadratic form restricted to one chunk (local gates; causal inside the chunk).
pub fn intra_chunk_attention<F: Float>(
    spec: &AttentionSpec,
    q: &[F],
    k: &[F],
    v: &[F],
    gcum: Option<&[F]>,
    d: usize,
    e: usize,
) -> TileOut<F> {
    let l = q.len() / d;
    tile_forward(
        spec,
        &Tile {
            m: l,
            n: l,
            d,
            e,
            offset: 0,
        },
        q,
        k,
        v,
        gcum,
        gcum,
    )
}

/// Step 5: y = (inter_num + intra_num) / (inter_den + intra_den + ε) per query, in place of
/// `intra.num`; returns the log-normalisers. Both parts are rescaled by e^{−M} with
/// M = max(m, 0) (m the intra row max), so neither overflows and a tiny intra part is not
/// lost against the inter part.
pub fn combine<F: Float>(
    inter: &[F],
    intra: &mut TileOut<F>,
    eps: f64,
    e: usize,
) -> (Vec<F>, Vec<F>) {
    let l = intra.den.len();
    let mut y = vec![F::zero(); l * e];
    let mut ln = vec![F::zero(); l];
    for i in 0..l {
        let mx = intra.max[i];
        let big = mx.max(F::zero());
        let (s_intra, s_inter) = ((mx - big).exp(), (-big).exp());
        let yi = &mut y[i * e..(i + 1) * e];
        for c in 0..e {
            yi[c] = intra.num[i * e + c] * s_intra + inter[i * (e + 1) + c] * s_inter;
        }
        let den = intra.den[i] * s_intra + inter[i * (e + 1) + e] * s_inter;
        ln[i] = super::normalise(yi, den, big, eps);
    }
    (y, ln)
}

/// Chunk boundaries `(start, end)` covering `0..t`.
fn chunks(t: usize, c: usize) -> Vec<(usize, usize)> {
    assert!(c > 0, "chunk size must be positive");
    (0..t).step_by(c).map(|s| (s, (s + c).min(t))).collect()
}

/// One head's per-chunk local gates and entering states (steps 1–2), shared by forward and
/// backward.
struct ChunkStates<F> {
    bounds: Vec<(usize, usize)>,
    gcum: Vec<Option<Vec<F>>>,
    totals: Vec<F>,
    states: Vec<Vec<F>>,
}

fn chunk_states<F: Float>(
    sp: &SymPow,
    h: &HeadData<F>,
    c: usize,
    t: usize,
    e: usize,
) -> ChunkStates<F> {
    let d = sp.d;
    let bounds = chunks(t, c);
    let gcum: Vec<Option<Vec<F>>> = bounds
        .iter()
        .map(|&(a, b)| h.g.as_ref().map(|g| local_cumulative_gates(&g[a..b])))
        .collect();
    let totals: Vec<F> = gcum
        .iter()
        .map(|g| g.as_ref().map_or(F::zero(), |g| *g.last().unwrap()))
        .collect();
    let mut states: Vec<Vec<F>> = bounds
        .par_iter()
        .zip(&gcum)
        .map(|(&(a, b), g)| {
            update_state(sp, &h.k[a * d..b * d], &h.v[a * e..b * e], g.as_deref(), e)
        })
        .collect();
    discumsum(&mut states, &totals);
    ChunkStates {
        bounds,
        gcum,
        totals,
        states,
    }
}

/// Chunked-form forward; see [`super::attention_forward`].
pub fn chunked_attention_forward<F: Float>(
    spec: &AttentionSpec,
    chunk: usize,
    shape: &Shape,
    q: &[F],
    k: &[F],
    v: &[F],
    log_gates: Option<&[F]>,
) -> AttentionOut<Vec<F>> {
    let (t, d, e) = (shape.time, shape.dk, shape.dv);
    let sp = SymPow::new(d, spec.power());
    let outs = per_head(
        shape,
        q,
        k,
        v,
        log_gates,
        &[e, 1],
        |h: HeadData<F>, _, _| {
            let cs = chunk_states(&sp, &h, chunk, t, e);
            let parts: Vec<(Vec<F>, Vec<F>)> = cs
                .bounds
                .par_iter()
                .enumerate()
                .map(|(i, &(a, b))| {
                    let g = cs.gcum[i].as_deref();
                    let (qc, kc, vc) = (&h.q[a * d..b * d], &h.k[a * d..b * d], &h.v[a * e..b * e]);
                    let inter = query_state(&sp, qc, g, spec.scale, &cs.states[i], e);
                    let mut intra = intra_chunk_attention(spec, qc, kc, vc, g, d, e);
                    combine(&inter, &mut intra, spec.eps, e)
                })
                .collect();
            let (y, ln): (Vec<_>, Vec<_>) = parts.into_iter().unzip();
            vec![y.concat(), ln.concat()]
        },
    );
    super::forward_out(outs)
}

/// The state after the last token of each (batch, head) — `[S | z]`, `D × (e+1)` — computed
/// with the chunked algorithm (update_state per chunk, then one more discumsum step). This is
/// what a chunked prefill hands to the recurrent decoder.
pub fn chunked_final_states<F: Float>(
    spec: &AttentionSpec,
    chunk: usize,
    shape: &Shape,
    k: &[F],
    v: &[F],
    log_gates: Option<&[F]>,
) -> Vec<Vec<F>> {
    let (t, d, e) = (shape.time, shape.dk, shape.dv);
    let sp = SymPow::new(d, spec.power());
    let mut out = Vec::with_capacity(shape.batch * shape.heads);
    for b in 0..shape.batch {
        for h in 0..shape.heads {
            let head = HeadData {
                q: Vec::new(),
                k: super::gather(k, shape, d, b, h),
                v: super::gather(v, shape, e, b, h),
                g: log_gates.map(|g| super::gather(g, shape, 1, b, h)),
            };
            if t == 0 {
                out.push(vec![F::zero(); sp.dim * (e + 1)]);
                continue;
            }
            let cs = chunk_states(&sp, &head, chunk, t, e);
            let last = cs.bounds.len() - 1;
            let (a, bnd) = cs.bounds[last];
            let g = cs.gcum[last].as_deref();
            let delta = update_state(&sp, &head.k[a * d..bnd * d], &head.v[a * e..bnd * e], g, e);
            let decay = cs.totals[last].exp();
            out.push(
                cs.states[last]
                    .iter()
                    .zip(&delta)
                    .map(|(&s, &x)| decay * s + x)
                    .collect(),
            );
        }
    }
    out
}

/// ∂L/∂(numerator, denominator) per query, `L × (e+1)`: the gradient that flows into both
/// the inter- and intra-chunk parts. With y = N/(Z+ε): ∂N = dy/(Z+ε), ∂Z = −dy·y/(Z+ε).
fn output_grads<F: Float>(y: &[F], dy: &[F], log_norm: &[F], e: usize) -> Vec<F> {
    let mut out = Vec::with_capacity(log_norm.len() * (e + 1));
    for (i, &ln) in log_norm.iter().enumerate() {
        let inv = (-ln).exp();
        let (yr, dyr) = (&y[i * e..(i + 1) * e], &dy[i * e..(i + 1) * e]);
        out.extend(dyr.iter().map(|&x| x * inv));
        out.push(-yr.iter().zip(dyr).map(|(&a, &b)| a * b).sum::<F>() * inv);
    }
    out
}

/// Backward of [`update_state`] given ∂L/∂ΔS (`D × (e+1)`): adds into dk, dv and the local
/// gate gradients (∂/∂G_τ into `dgcum`, ∂/∂Γ returned).
pub fn update_state_backward<F: Float>(
    sp: &SymPow,
    k: &[F],
    v: &[F],
    gcum: Option<&[F]>,
    e: usize,
    d_delta: &[F],
    dk: &mut [F],
    dv: &mut [F],
    dgcum: &mut [F],
) -> F {
    let (d, dim) = (sp.d, sp.dim);
    let l = v.len() / e;
    let kt = decayed_keys(k, d, gcum, sp.p);
    let mut phi = vec![F::zero(); l * dim];
    sp.forward(&kt, &mut phi);
    let vhat = augment(v, e);
    let mut dvhat = vec![F::zero(); l * (e + 1)];
    matmul(
        &mut dvhat,
        &phi,
        Trans::No,
        d_delta,
        Trans::No,
        l,
        dim,
        e + 1,
        false,
    );
    for i in 0..l {
        for c in 0..e {
            dv[i * e + c] += dvhat[i * (e + 1) + c];
        }
    }
    let mut dphi = phi; // reuse the buffer
    matmul(
        &mut dphi,
        &vhat,
        Trans::No,
        d_delta,
        Trans::Yes,
        l,
        e + 1,
        dim,
        false,
    );
    let mut dkt = vec![F::zero(); l * d];
    sp.backward(&kt, &dphi, &mut dkt);
    let inv_p = F::one() / F::of(sp.p as f64);
    let mut dtotal = F::zero();
    for i in 0..l {
        let s = gcum.map_or(F::one(), |g| ((*g.last().unwrap() - g[i]) * inv_p).exp());
        let (ktr, dktr) = (&kt[i * d..(i + 1) * d], &dkt[i * d..(i + 1) * d]);
        for c in 0..d {
            dk[i * d + c] += s * dktr[c];
        }
        if gcum.is_some() {
            // k̃ = e^{(Γ−G)/p} k  ⇒  ∂k̃/∂(Γ−G) = k̃/p
            let dexp = inv_p * ktr.iter().zip(dktr).map(|(&a, &b)| a * b).sum::<F>();
            dtotal += dexp;
            dgcum[i] -= dexp;
        }
    }
    dtotal
}

/// Backward of [`discumsum`]: given ∂L/∂S_i taken directly by each chunk's queries
/// (`direct[i]`, i ≥ 1; `direct[0]` is ignored since S_0 = 0), returns for every chunk
/// ∂L/∂ΔS_i (the total gradient of the state leaving chunk i) and adds ∂L/∂Γ_i into `dtotals`.
pub fn discumsum_backward<F: Float>(
    mut direct: Vec<Vec<F>>,
    states: &[Vec<F>],
    totals: &[F],
    dtotals: &mut [F],
) -> Vec<Vec<F>> {
    let n = direct.len();
    // out[i] = ∂L/∂S_{i+1}; S_n leaves the sequence, so out[n−1] = 0.
    let size = direct.first().map_or(0, Vec::len);
    let mut out: Vec<Vec<F>> = Vec::with_capacity(n);
    let mut next = vec![F::zero(); size];
    for i in (0..n).rev() {
        // S_{i+1} = e^{Γ_i} S_i + ΔS_i
        let decay = totals[i].exp();
        dtotals[i] += decay * states[i].iter().zip(&next).map(|(&a, &b)| a * b).sum::<F>();
        let mut cur = std::mem::take(&mut direct[i]);
        if i == 0 {
            cur = vec![F::zero(); size];
        } else {
            cur.iter_mut()
                .zip(&next)
                .for_each(|(c, &x)| *c += decay * x);
        }
        out.push(std::mem::replace(&mut next, cur));
    }
    out.reverse();
    out
}

/// Backward of [`query_state`] given ∂L/∂(inter part) `dout` (`L × (e+1)`): adds into dq and
/// `dgcum`, and returns ∂L/∂S taken by these queries, φ(Q̃)ᵀ dout.
pub fn query_state_backward<F: Float>(
    sp: &SymPow,
    q: &[F],
    gcum: Option<&[F]>,
    scale: f64,
    state: &[F],
    e: usize,
    dout: &[F],
    dq: &mut [F],
    dgcum: &mut [F],
) -> Vec<F> {
    let (d, dim) = (sp.d, sp.dim);
    let l = q.len() / d;
    let qt = decayed_queries(q, d, gcum, sp.p, scale);
    let mut phi = vec![F::zero(); l * dim];
    sp.forward(&qt, &mut phi);
    let mut dstate = vec![F::zero(); dim * (e + 1)];
    matmul(
        &mut dstate,
        &phi,
        Trans::Yes,
        dout,
        Trans::No,
        dim,
        l,
        e + 1,
        false,
    );
    let mut dphi = phi;
    matmul(
        &mut dphi,
        dout,
        Trans::No,
        state,
        Trans::Yes,
        l,
        e + 1,
        dim,
        false,
    );
    let mut dqt = vec![F::zero(); l * d];
    sp.backward(&qt, &dphi, &mut dqt);
    let inv_p = F::one() / F::of(sp.p as f64);
    for i in 0..l {
        let s = F::of(scale) * gcum.map_or(F::one(), |g| (g[i] * inv_p).exp());
        for c in 0..d {
            dq[i * d + c] += s * dqt[i * d + c];
        }
        if gcum.is_some() {
            dgcum[i] += inv_p * (0..d).map(|c| qt[i * d + c] * dqt[i * d + c]).sum::<F>();
        }
    }
    dstate
}

/// Chunked-form backward; memory linear in T.
pub fn chunked_attention_backward<F: Float>(
    spec: &AttentionSpec,
    chunk: usize,
    shape: &Shape,
    q: &[F],
    k: &[F],
    v: &[F],
    log_gates: Option<&[F]>,
    fwd: &AttentionOut<Vec<F>>,
    dy: &[F],
) -> AttentionGrads<Vec<F>> {
    let (t, d, e) = (shape.time, shape.dk, shape.dv);
    let sp = SymPow::new(d, spec.power());
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
            let cs = chunk_states(&sp, &h, chunk, t, e);
            let n = cs.bounds.len();
            let dout: Vec<Vec<F>> = cs
                .bounds
                .iter()
                .map(|&(a, b)| output_grads(&y[a * e..b * e], &dyh[a * e..b * e], &ln[a..b], e))
                .collect();
            // Query side first: dq and ∂L/∂S_i from each chunk's own queries.
            let query_side: Vec<(Vec<F>, Vec<F>, Vec<F>)> = (0..n)
                .into_par_iter()
                .map(|i| {
                    let (a, b) = cs.bounds[i];
                    let mut dq = vec![F::zero(); (b - a) * d];
                    let mut dg = vec![F::zero(); b - a];
                    let g = cs.gcum[i].as_deref();
                    let ds = query_state_backward(
                        &sp,
                        &h.q[a * d..b * d],
                        g,
                        spec.scale,
                        &cs.states[i],
                        e,
                        &dout[i],
                        &mut dq,
                        &mut dg,
                    );
                    (dq, dg, ds)
                })
                .collect();
            let mut dtotals = vec![F::zero(); n];
            let mut dq_parts = Vec::with_capacity(n);
            let mut dg_parts = Vec::with_capacity(n);
            let mut direct = Vec::with_capacity(n);
            for (dq, dg, ds) in query_side {
                dq_parts.push(dq);
                dg_parts.push(dg);
                direct.push(ds);
            }
            let d_delta = discumsum_backward(direct, &cs.states, &cs.totals, &mut dtotals);
            // Key side and intra-chunk attention, chunk by chunk.
            let key_side: Vec<[Vec<F>; 4]> = (0..n)
                .into_par_iter()
                .zip(dq_parts.into_par_iter().zip(dg_parts.into_par_iter()))
                .map(|(i, (mut dq, mut dg))| {
                    let (a, b) = cs.bounds[i];
                    let l = b - a;
                    let g = cs.gcum[i].as_deref();
                    let (qc, kc, vc) = (&h.q[a * d..b * d], &h.k[a * d..b * d], &h.v[a * e..b * e]);
                    let mut dk = vec![F::zero(); l * d];
                    let mut dv = vec![F::zero(); l * e];
                    let mut dtotal = dtotals[i];
                    dtotal += update_state_backward(
                        &sp,
                        kc,
                        vc,
                        g,
                        e,
                        &d_delta[i],
                        &mut dk,
                        &mut dv,
                        &mut dg,
                    );
                    let mut dgk = vec![F::zero(); l];
                    tile_backward(
                        spec,
                        &Tile {
                            m: l,
                            n: l,
                            d,
                            e,
                            offset: 0,
                        },
                        qc,
                        kc,
                        vc,
                        g,
                        g,
                        &y[a * e..b * e],
                        &ln[a..b],
                        &dyh[a * e..b * e],
                        TileGrads {
                            dq: Some(&mut dq),
                            dk: Some(&mut dk),
                            dv: Some(&mut dv),
                            dgq: gated.then_some(&mut dg[..]),
                            dgk: gated.then_some(&mut dgk[..]),
                        },
                    );
                    // G_τ = Σ_{r≤τ} g_r and Γ = G_last: ∂L/∂g_r = Σ_{τ≥r} ∂L/∂G_τ + ∂L/∂Γ.
                    let dcum: Vec<F> = dg.iter().zip(&dgk).map(|(&a, &b)| a + b).collect();
                    let dlocal: Vec<F> = reverse_cumsum(&dcum)
                        .into_iter()
                        .map(|x| x + dtotal)
                        .collect();
                    [dq, dk, dv, dlocal]
                })
                .collect();
            let mut res = vec![
                Vec::with_capacity(t * d),
                Vec::with_capacity(t * d),
                Vec::with_capacity(t * e),
                Vec::with_capacity(t),
            ];
            for parts in key_side {
                for (r, p) in res.iter_mut().zip(parts) {
                    r.extend(p);
                }
            }
            res
        },
    );
    super::grads_out(outs, gated)
}

#[cfg(test)]
mod tests {
    //! Each step of the chunked algorithm against its defining formula, in f64.
    use super::*;
    use crate::attention::reference::reference_attention;
    use crate::testing::{log_gates, randn, rel_err, rng};

    const D: usize = 3;
    const E: usize = 2;

    fn phi(sp: &SymPow, x: &[f64]) -> Vec<f64> {
        let mut o = vec![0.0; sp.dim];
        sp.forward(x, &mut o);
        o
    }

    #[test]
    fn update_state_is_the_decayed_sum_of_outer_products() {
        let mut r = rng(1);
        let sp = SymPow::new(D, 2);
        let l = 5;
        let (k, v): (Vec<f64>, Vec<f64>) = (randn(&mut r, l * D, 1.0), randn(&mut r, l * E, 1.0));
        let g = local_cumulative_gates(&log_gates::<f64>(&mut r, l, 0.5, 0.9));
        let got = update_state(&sp, &k, &v, Some(&g), E);
        let mut want = vec![0.0; sp.dim * (E + 1)];
        for t in 0..l {
            let w = (g[l - 1] - g[t]).exp();
            let f = phi(&sp, &k[t * D..(t + 1) * D]);
            for i in 0..sp.dim {
                for c in 0..E {
                    want[i * (E + 1) + c] += w * f[i] * v[t * E + c];
                }
                want[i * (E + 1) + E] += w * f[i];
            }
        }
        assert!(rel_err(&got, &want) < 1e-12);
    }

    #[test]
    fn discumsum_is_the_discounted_recursion() {
        let mut r = rng(2);
        let deltas: Vec<Vec<f64>> = (0..4).map(|_| randn(&mut r, 6, 1.0)).collect();
        let totals: Vec<f64> = vec![-0.1, -2.0, 0.0, -0.5];
        let mut states = deltas.clone();
        discumsum(&mut states, &totals);
        let mut s = vec![0.0; 6];
        for i in 0..4 {
            assert!(
                rel_err(&states[i], &s) < 1e-15
                    || s.iter().all(|&x| x == 0.0) && states[i].iter().all(|&x| x == 0.0)
            );
            s = s
                .iter()
                .zip(&deltas[i])
                .map(|(a, b)| totals[i].exp() * a + b)
                .collect();
        }
    }

    #[test]
    fn query_state_reads_the_state_with_decayed_queries() {
        let mut r = rng(3);
        let sp = SymPow::new(D, 4);
        let l = 4;
        let q: Vec<f64> = randn(&mut r, l * D, 1.0);
        let state: Vec<f64> = randn(&mut r, sp.dim * (E + 1), 1.0);
        let g = local_cumulative_gates(&log_gates::<f64>(&mut r, l, 0.5, 0.9));
        let got = query_state(&sp, &q, Some(&g), 0.7, &state, E);
        for t in 0..l {
            let qs: Vec<f64> = q[t * D..(t + 1) * D].iter().map(|x| x * 0.7).collect();
            let f = phi(&sp, &qs);
            for c in 0..=E {
                let want: f64 = g[t].exp()
                    * (0..sp.dim)
                        .map(|i| f[i] * state[i * (E + 1) + c])
                        .sum::<f64>();
                assert!((got[t * (E + 1) + c] - want).abs() < 1e-12 * (1.0 + want.abs()));
            }
        }
    }

    #[test]
    fn intra_chunk_attention_with_combine_is_attention_within_the_chunk() {
        let mut r = rng(4);
        let spec = AttentionSpec::sympow(2, D).unwrap();
        let l = 6;
        let (q, k, v): (Vec<f64>, Vec<f64>, Vec<f64>) = (
            randn(&mut r, l * D, 1.0),
            randn(&mut r, l * D, 1.0),
            randn(&mut r, l * E, 1.0),
        );
        let lg = log_gates::<f64>(&mut r, l, 0.5, 0.9);
        let g = local_cumulative_gates(&lg);
        let mut intra = intra_chunk_attention(&spec, &q, &k, &v, Some(&g), D, E);
        // with an empty state the inter part is zero and combine normalises the intra part
        let (y, _) = combine(&vec![0.0; l * (E + 1)], &mut intra, spec.eps, E);
        let shape = Shape {
            batch: 1,
            time: l,
            heads: 1,
            dk: D,
            dv: E,
        };
        let want = reference_attention(&spec, &shape, &q, &k, &v, Some(&lg));
        assert!(rel_err(&y, &want) < 1e-12);
    }

    #[test]
    fn combine_adds_numerators_and_denominators() {
        // one query: intra num 2 (scaled by e^{−m}, m = 1), den 1; inter num 3, den 4
        let mut intra = TileOut {
            num: vec![2.0],
            den: vec![1.0],
            max: vec![1.0],
        };
        let (y, ln) = combine(&[3.0, 4.0], &mut intra, 0.5, 1);
        let (num, den) = (2.0 * 1f64.exp() + 3.0, 1f64.exp() + 4.0 + 0.5);
        assert!((y[0] - num / den).abs() < 1e-14);
        assert!((ln[0] - den.ln()).abs() < 1e-14);
    }
}
