//! Causal softmax attention (ungated) through cuBLAS: the baseline's attention at long context.
//!
//! Queries are taken R at a time. For a block, one strided-batched sgemm over the heads writes
//! every score σ q_t·k_s (s < r0 + R) into a scratch `[H, R, Tk]`, a row kernel turns the
//! scores into probabilities, and a second sgemm gives y. The backward recomputes the block's
//! probabilities from the saved log-sum-exp and takes dV += Pᵀ dY, dP = dY Vᵀ,
//! dS = P ∘ (dP − dy·y), dQ = σ dS K, dK += σ dSᵀ Q. Memory is two H·R·T scratch buffers
//! (R is chosen to keep each under [`SCRATCH_FLOATS`]), time O(T²·d) on cuBLAS rather than the
//! naive kernels' CUDA-core loops; not FlashAttention (the scores go through memory), but
//! within a small factor of it at the baseline's sizes.
//!
//! Layout as everywhere: q, k `[B, T, H, d]`, v, y `[B, T, H, e]`, log_norm `[B, T, H]`. A
//! head's Q is then a column-major d×T matrix with leading dimension H·d starting at h·d, so
//! the heads of one sequence are one strided batch (stride d).

use super::{grid, rows_cfg, CudaBackend};
use cudarc::cublas::{sys::cublasOperation_t as Op, Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, PushKernelArg};
use sympow::attention::{AttentionGrads, AttentionOut, AttentionSpec, Shape};

/// Largest scratch buffer, in floats (1 GiB).
const SCRATCH_FLOATS: usize = 1 << 28;

/// Queries per block: all of them when the scores fit, else as many as fit (at least 64).
pub(super) fn block_rows(shape: &Shape, forced: usize) -> usize {
    if forced > 0 {
        return forced.min(shape.time);
    }
    (SCRATCH_FLOATS / (shape.heads * shape.time).max(1))
        .max(64)
        .min(shape.time)
}

/// One strided-batched sgemm over the heads (column-major, as cuBLAS).
struct Batched {
    ta: Op,
    tb: Op,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    beta: f32,
    /// (leading dimension, stride between heads) of A, B and C.
    lda: (usize, usize),
    ldb: (usize, usize),
    ldc: (usize, usize),
}

impl CudaBackend {
    fn batched<A: DevicePtr<f32>, B: DevicePtr<f32>, C: DevicePtrMut<f32>>(
        &self,
        g: Batched,
        heads: usize,
        a: &A,
        b: &B,
        c: &mut C,
    ) {
        let cfg = StridedBatchedConfig {
            gemm: GemmConfig {
                transa: g.ta,
                transb: g.tb,
                m: g.m as i32,
                n: g.n as i32,
                k: g.k as i32,
                alpha: g.alpha,
                lda: g.lda.0 as i32,
                ldb: g.ldb.0 as i32,
                beta: g.beta,
                ldc: g.ldc.0 as i32,
            },
            batch_size: heads as i32,
            stride_a: g.lda.1 as i64,
            stride_b: g.ldb.1 as i64,
            stride_c: g.ldc.1 as i64,
        };
        // SAFETY: the callers' dimensions, leading dimensions and strides stay inside the
        // tensors' and scratch buffers' extents (see the layout in the module doc).
        unsafe { self.blas.gemm_strided_batched(cfg, a, b, c) }.expect("cuBLAS strided sgemm");
    }

    /// Scores σ Kᵀ Q of queries r0..r0+R of sequence b into `s` ([H, R, Tk]).
    #[allow(clippy::too_many_arguments)]
    fn block_scores(
        &self,
        spec: &AttentionSpec,
        sh: &Shape,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        b: usize,
        r0: usize,
        r: usize,
        s: &mut CudaSlice<f32>,
    ) {
        let (h, d, tk) = (sh.heads, sh.dk, r0 + r);
        let seq = b * sh.time * h * d;
        self.batched(
            Batched {
                ta: Op::CUBLAS_OP_T,
                tb: Op::CUBLAS_OP_N,
                m: tk,
                n: r,
                k: d,
                alpha: spec.scale as f32,
                beta: 0.0,
                lda: (h * d, d),
                ldb: (h * d, d),
                ldc: (tk, tk * r),
            },
            h,
            &k.slice(seq..),
            &q.slice(seq + r0 * h * d..),
            s,
        );
    }

    pub(super) fn softmax_attention_forward(
        &self,
        spec: &AttentionSpec,
        sh: &Shape,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
    ) -> AttentionOut<CudaSlice<f32>> {
        let (t, h, e) = (sh.time, sh.heads, sh.dv);
        let rows = block_rows(sh, self.softmax_rows());
        let (mut y, mut log_norm) = (
            self.alloc_zeroed(sh.batch * t * h * e),
            self.alloc_zeroed(sh.batch * t * h),
        );
        let mut s = self.alloc_zeroed(h * rows * t);
        let (ti, hi) = (t as i32, h as i32);
        for b in 0..sh.batch {
            for r0 in (0..t).step_by(rows) {
                let r = rows.min(t - r0);
                let tk = r0 + r;
                self.block_scores(spec, sh, q, k, b, r0, r, &mut s);
                let (ri, tki, r0i, bi) = (r as i32, tk as i32, r0 as i32, b as i32);
                launch!(
                    self,
                    "softmax_rows_forward",
                    rows_cfg(h * r),
                    &mut s,
                    &mut log_norm,
                    &ri,
                    &tki,
                    &r0i,
                    &ti,
                    &hi,
                    &bi,
                );
                // y_blk = P V: (e×Tk)·(Tk×R)
                let seq = b * t * h * e;
                self.batched(
                    Batched {
                        ta: Op::CUBLAS_OP_N,
                        tb: Op::CUBLAS_OP_N,
                        m: e,
                        n: r,
                        k: tk,
                        alpha: 1.0,
                        beta: 0.0,
                        lda: (h * e, e),
                        ldb: (tk, tk * r),
                        ldc: (h * e, e),
                    },
                    h,
                    &v.slice(seq..),
                    &s,
                    &mut y.slice_mut(seq + r0 * h * e..),
                );
            }
        }
        AttentionOut {
            y,
            log_norm,
            saved: None,
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn softmax_attention_backward(
        &self,
        spec: &AttentionSpec,
        sh: &Shape,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        out: &AttentionOut<CudaSlice<f32>>,
        dy: &CudaSlice<f32>,
    ) -> AttentionGrads<CudaSlice<f32>> {
        let (t, h, d, e) = (sh.time, sh.heads, sh.dk, sh.dv);
        let n = sh.batch * t * h;
        let mut dd = self.alloc_zeroed(n);
        let (nr, ei) = (n as i64, e as i32);
        launch!(
            self,
            "attention_row_dot",
            grid(n),
            &mut dd,
            dy,
            &out.y,
            &nr,
            &ei
        );
        let (mut dq, mut dk, mut dv) = (
            self.alloc_zeroed(n * d),
            self.alloc_zeroed(n * d),
            self.alloc_zeroed(n * e),
        );
        let rows = block_rows(sh, self.softmax_rows());
        let (mut p, mut ds) = (
            self.alloc_zeroed(h * rows * t),
            self.alloc_zeroed(h * rows * t),
        );
        let (ti, hi) = (t as i32, h as i32);
        let sigma = spec.scale as f32;
        for b in 0..sh.batch {
            let (sk, sv) = (b * t * h * d, b * t * h * e);
            for r0 in (0..t).step_by(rows) {
                let r = rows.min(t - r0);
                let tk = r0 + r;
                let (qb, yb) = (sk + r0 * h * d, sv + r0 * h * e);
                self.block_scores(spec, sh, q, k, b, r0, r, &mut p);
                let (ri, tki, r0i, bi) = (r as i32, tk as i32, r0 as i32, b as i32);
                launch!(
                    self,
                    "softmax_rows_recompute",
                    rows_cfg(h * r),
                    &mut p,
                    &out.log_norm,
                    &ri,
                    &tki,
                    &r0i,
                    &ti,
                    &hi,
                    &bi,
                );
                // dV[0..Tk] += dY_blk Pᵀ: (e×R)·(R×Tk)
                self.batched(
                    Batched {
                        ta: Op::CUBLAS_OP_N,
                        tb: Op::CUBLAS_OP_T,
                        m: e,
                        n: tk,
                        k: r,
                        alpha: 1.0,
                        beta: 1.0,
                        lda: (h * e, e),
                        ldb: (tk, tk * r),
                        ldc: (h * e, e),
                    },
                    h,
                    &dy.slice(yb..),
                    &p,
                    &mut dv.slice_mut(sv..),
                );
                // dP = Vᵀ dY_blk: (Tk×e)·(e×R)
                self.batched(
                    Batched {
                        ta: Op::CUBLAS_OP_T,
                        tb: Op::CUBLAS_OP_N,
                        m: tk,
                        n: r,
                        k: e,
                        alpha: 1.0,
                        beta: 0.0,
                        lda: (h * e, e),
                        ldb: (h * e, e),
                        ldc: (tk, tk * r),
                    },
                    h,
                    &v.slice(sv..),
                    &dy.slice(yb..),
                    &mut ds,
                );
                launch!(
                    self,
                    "softmax_rows_grad",
                    rows_cfg(h * r),
                    &mut ds,
                    &p,
                    &dd,
                    &ri,
                    &tki,
                    &r0i,
                    &ti,
                    &hi,
                    &bi,
                );
                // dQ_blk = σ K dS: (d×Tk)·(Tk×R)
                self.batched(
                    Batched {
                        ta: Op::CUBLAS_OP_N,
                        tb: Op::CUBLAS_OP_N,
                        m: d,
                        n: r,
                        k: tk,
                        alpha: sigma,
                        beta: 0.0,
                        lda: (h * d, d),
                        ldb: (tk, tk * r),
                        ldc: (h * d, d),
                    },
                    h,
                    &k.slice(sk..),
                    &ds,
                    &mut dq.slice_mut(qb..),
                );
                // dK[0..Tk] += σ Q_blk dSᵀ: (d×R)·(R×Tk)
                self.batched(
                    Batched {
                        ta: Op::CUBLAS_OP_N,
                        tb: Op::CUBLAS_OP_T,
                        m: d,
                        n: tk,
                        k: r,
                        alpha: sigma,
                        beta: 1.0,
                        lda: (h * d, d),
                        ldb: (tk, tk * r),
                        ldc: (h * d, d),
                    },
                    h,
                    &q.slice(qb..),
                    &ds,
                    &mut dk.slice_mut(sk..),
                );
            }
        }
        AttentionGrads {
            dq,
            dk,
            dv,
            dlog_gates: None,
        }
    }
}
