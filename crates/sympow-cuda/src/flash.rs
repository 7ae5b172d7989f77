//! Causal softmax attention, flash-style on tensor cores (`kernels/flash_softmax.cu`): the
//! baseline's attention with the scores kept on chip, bf16 operands and f32 accumulation, for
//! ungated softmax with ε = 0 and head dimension 32, 64 or 128 (dk = dv). The same kernels take
//! ungated symmetric power attention in its quadratic form (p = 4, whose chunked state is too
//! large to keep): the weights (σq·k)^p as e^ℓ with ℓ = p·ln|σq·k|, and any ε.
//!
//! Forward: q (×σ), k, v staged to bf16 `[B, H, T, D]`, then one launch (y and the log-sum-exp
//! per row); the staged copies go to the backward in [`AttentionOut::saved`]. Backward: ∂y staged
//! (q, k, v too when the output carries no saved copies), Δ = rowsum(∂y ∘ y), then a pass over
//! query tiles for ∂q and one over key tiles for ∂k, ∂v — deterministic, no atomics.

use crate::device::alloc_output;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};
use std::collections::HashMap;
use std::sync::Arc;
use sympow::attention::{AttentionGrads, AttentionOut, AttentionSpec, Kernel, Shape};

pub(crate) const SOURCE: &str = concat!(
    include_str!("../kernels/reduce.cuh"),
    include_str!("../kernels/mma.cuh"),
    include_str!("../kernels/flash_softmax.cu")
);
/// Threads per block (`FTHREADS` in the kernel source); the rows a block takes come from
/// `flash_smem_sizes`.
const THREADS: u32 = 128;
/// Entries per head dimension of the `flash_smem_sizes` table: fwd, dq and dkv bytes, rows a block.
const SIZE_ENTRIES: usize = 4;
const KERNELS: [&str; 3] = ["flash_fwd", "flash_bwd_dq", "flash_bwd_dkv"];
/// Each kernel's two kinds: `{kernel}_{D}` for softmax, `{kernel}_pow_{D}` for a power.
const KINDS: [&str; 2] = ["", "pow_"];

/// The forward's bf16 staging of σq, k, v, kept for the backward.
struct FlashSaved {
    q: CudaSlice<u16>,
    k: CudaSlice<u16>,
    v: CudaSlice<u16>,
}

/// The compiled flash softmax kernels.
pub struct FlashSoftmax {
    _module: Arc<CudaModule>,
    fns: HashMap<String, CudaFunction>,
    /// Per head dimension: shared-memory bytes of fwd, dq, dkv, and the rows (queries, or keys
    /// for dkv) each block takes.
    sizes: HashMap<usize, [u32; 4]>,
}

impl FlashSoftmax {
    /// Compiles the kernels (compute capability ≥ 8.0) and sizes their shared memory.
    pub fn new(ctx: &Arc<CudaContext>, stream: &Arc<CudaStream>) -> Result<Self, String> {
        let (module, sizes) = crate::device::load_tensor_core_module(
            ctx,
            stream,
            SOURCE,
            "flash softmax",
            false,
            "flash_smem_sizes",
            SIZE_ENTRIES * crate::FUSED_HEAD_DIMS.len(),
        )?;
        let mut fns = HashMap::new();
        let mut per_d = HashMap::new();
        for (i, d) in crate::FUSED_HEAD_DIMS.into_iter().enumerate() {
            let s = [0, 1, 2, 3].map(|j| sizes[i * SIZE_ENTRIES + j] as u32);
            for (j, k) in KERNELS.iter().enumerate() {
                for kind in KINDS {
                    let name = format!("{k}_{kind}{d}");
                    let f = crate::device::load_with_shared_memory(&module, &name, s[j])?;
                    fns.insert(name, f);
                }
            }
            per_d.insert(d, s);
        }
        for name in ["flash_bwd_delta", "flash_stage"] {
            let f = crate::device::load_with_shared_memory(&module, name, 0)?;
            fns.insert(name.into(), f);
        }
        Ok(FlashSoftmax {
            _module: module,
            fns,
            sizes: per_d,
        })
    }

    /// Whether these kernels take the problem: ungated softmax with ε = 0, or ungated power
    /// attention; dk = dv ∈ {32, 64, 128}.
    pub fn supports(spec: &AttentionSpec, shape: &Shape, gated: bool) -> bool {
        let kernel = match spec.kernel {
            Kernel::Softmax => spec.eps == 0.0,
            Kernel::Power(_) => true,
        };
        kernel && !gated && shape.dk == shape.dv && crate::FUSED_HEAD_DIMS.contains(&shape.dk)
    }

    /// The power p the kernels take (0: softmax), and ε.
    fn power(spec: &AttentionSpec) -> (f32, f32) {
        match spec.kernel {
            Kernel::Softmax => (0.0, 0.0),
            Kernel::Power(p) => (p as f32, spec.eps as f32),
        }
    }

    fn launch(
        &self,
        spec: &AttentionSpec,
        shape: &Shape,
        which: usize,
    ) -> (&CudaFunction, LaunchConfig) {
        let d = shape.dk;
        let kind = match spec.kernel {
            Kernel::Softmax => KINDS[0],
            Kernel::Power(_) => KINDS[1],
        };
        let f = &self.fns[&format!("{}_{kind}{d}", KERNELS[which])];
        let sizes = self.sizes[&d];
        let cfg = LaunchConfig {
            grid_dim: (
                shape.time.div_ceil(sizes[3] as usize) as u32,
                (shape.batch * shape.heads) as u32,
                1,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: sizes[which],
        };
        (f, cfg)
    }

    /// `mul · x` (`[B, T, H, D]` f32) as bf16 `[B, H, T, D]`: each head's rows contiguous.
    fn stage(
        &self,
        stream: &Arc<CudaStream>,
        shape: &Shape,
        x: &CudaSlice<f32>,
        mul: f32,
    ) -> CudaSlice<u16> {
        let mut out = alloc_output::<u16>(stream, x.len());
        let n8 = x.len() / 8;
        let (t, h, d, n) = (
            shape.time as i32,
            shape.heads as i32,
            shape.dk as i32,
            n8 as i64,
        );
        let mut l = stream.launch_builder(&self.fns["flash_stage"]);
        l.arg(&mut out)
            .arg(x)
            .arg(&t)
            .arg(&h)
            .arg(&d)
            .arg(&n)
            .arg(&mul);
        // SAFETY: one thread per 8 elements of two buffers of x.len() elements (D % 8 == 0).
        unsafe { l.launch(LaunchConfig::for_num_elems(n8 as u32)) }.expect("flash_stage");
        out
    }

    /// The bf16 staging of σq, k, v (see [`stage`](Self::stage)).
    fn stage_qkv(
        &self,
        stream: &Arc<CudaStream>,
        spec: &AttentionSpec,
        shape: &Shape,
        [q, k, v]: [&CudaSlice<f32>; 3],
    ) -> FlashSaved {
        FlashSaved {
            q: self.stage(stream, shape, q, spec.scale as f32),
            k: self.stage(stream, shape, k, 1.0),
            v: self.stage(stream, shape, v, 1.0),
        }
    }

    /// y and the log-sum-exp of each row.
    pub fn forward(
        &self,
        stream: &Arc<CudaStream>,
        spec: &AttentionSpec,
        shape: &Shape,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
    ) -> AttentionOut<CudaSlice<f32>> {
        let rows = shape.batch * shape.time * shape.heads;
        let mut y = alloc_output::<f32>(stream, rows * shape.dv);
        let mut lse = alloc_output::<f32>(stream, rows);
        let st = self.stage_qkv(stream, spec, shape, [q, k, v]);
        let (t, h) = (shape.time as i32, shape.heads as i32);
        let (pw, eps) = Self::power(spec);
        let (f, cfg) = self.launch(spec, shape, 0);
        let mut l = stream.launch_builder(f);
        l.arg(&mut y).arg(&mut lse).arg(&st.q).arg(&st.k).arg(&st.v);
        l.arg(&t).arg(&h).arg(&pw).arg(&eps);
        // SAFETY: arguments match flash_fwd's declaration; the grid covers every query tile of
        // every (sequence, head), and the kernel bounds rows past T.
        unsafe { l.launch(cfg) }.expect("flash_fwd");
        AttentionOut {
            y,
            log_norm: lse,
            saved: Some(Arc::new(st)),
        }
    }

    /// ∂q, ∂k, ∂v from ∂y, given the forward's output.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        stream: &Arc<CudaStream>,
        spec: &AttentionSpec,
        shape: &Shape,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        out: &AttentionOut<CudaSlice<f32>>,
        dy: &CudaSlice<f32>,
    ) -> AttentionGrads<CudaSlice<f32>> {
        let rows = shape.batch * shape.time * shape.heads;
        let n = rows * shape.dk;
        let alloc = |len| stream.alloc_zeros::<f32>(len).expect("device allocation");
        let (mut delta, mut nlse) = (alloc(rows), alloc(rows));
        let (mut dq, mut dk, mut dv) = (alloc(n), alloc(n), alloc(n));
        let (r, di) = (rows as i64, shape.dv as i32);
        let mut l = stream.launch_builder(&self.fns["flash_bwd_delta"]);
        l.arg(&mut delta)
            .arg(&mut nlse)
            .arg(dy)
            .arg(&out.y)
            .arg(&out.log_norm);
        l.arg(&r).arg(&di);
        let threads = u32::try_from(rows * 32).expect("rows for one launch");
        // SAFETY: one warp per row of [rows, D] buffers of that size.
        unsafe { l.launch(LaunchConfig::for_num_elems(threads)) }.expect("flash_bwd_delta");
        let saved = out
            .saved
            .as_ref()
            .and_then(|s| s.downcast_ref::<FlashSaved>())
            .filter(|s| s.q.len() == q.len());
        let restaged;
        let st = match saved {
            Some(s) => s,
            None => {
                restaged = self.stage_qkv(stream, spec, shape, [q, k, v]);
                &restaged
            }
        };
        let (qs, ks, vs) = (&st.q, &st.k, &st.v);
        let dys = self.stage(stream, shape, dy, 1.0);
        let (t, h, scale) = (shape.time as i32, shape.heads as i32, spec.scale as f32);
        let (pw, _) = Self::power(spec);
        let (f, cfg) = self.launch(spec, shape, 1);
        let mut l = stream.launch_builder(f);
        l.arg(&mut dq).arg(qs).arg(ks).arg(vs).arg(&dys);
        l.arg(&nlse)
            .arg(&delta)
            .arg(&t)
            .arg(&h)
            .arg(&scale)
            .arg(&pw);
        // SAFETY: arguments match flash_bwd_dq's declaration; grid as in the forward.
        unsafe { l.launch(cfg) }.expect("flash_bwd_dq");
        let (f, cfg) = self.launch(spec, shape, 2);
        let mut l = stream.launch_builder(f);
        l.arg(&mut dk)
            .arg(&mut dv)
            .arg(qs)
            .arg(ks)
            .arg(vs)
            .arg(&dys);
        l.arg(&nlse).arg(&delta).arg(&t).arg(&h).arg(&pw);
        // SAFETY: arguments match flash_bwd_dkv's declaration; one block per key tile.
        unsafe { l.launch(cfg) }.expect("flash_bwd_dkv");
        AttentionGrads {
            dq,
            dk,
            dv,
            dlog_gates: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host's copies of the kernel source's shapes (a launch shaped by a stale one leaves
    /// rows unwritten or reads past a buffer on the GPU; here it fails on any machine).
    #[test]
    fn host_constants_match_the_kernel_source() {
        assert!(SOURCE.contains(&format!("#define FTHREADS {THREADS} ")));
        for (i, d) in crate::FUSED_HEAD_DIMS.into_iter().enumerate() {
            assert!(
                SOURCE.contains(&format!("FLASH_SIZES({i}, {d});")),
                "the sizes table has no row {i} for head dimension {d}"
            );
            assert!(SOURCE.contains(&format!("FLASH_INSTANCES({d})")));
        }
        // each row's last entry, the rows a block takes, at SIZE_ENTRIES − 1
        let last = format!(
            "o[{SIZE_ENTRIES} * i + {}] = Flash<D>::QF",
            SIZE_ENTRIES - 1
        );
        assert!(SOURCE.contains(&last), "no `{last}` in the sizes table");
        for k in KERNELS {
            assert!(
                SOURCE.contains(&format!("{k}_##KIND##D(")),
                "kernel {k} is not declared"
            );
        }
        assert!(SOURCE.contains("FLASH_KERNELS(D, , false) FLASH_KERNELS(D, pow_, true)"));
    }
}
