//! The linear layers' products with their bias in cuBLASLt's epilogue: forward, D =
//! op(A)·op(B) + bias written once — instead of filling D with the bias and accumulating the
//! product onto it, two more passes over the layer's output (≈ 3 % of a gpt2-124m step);
//! backward, ∂b = the column sums of ∂y taken while the ∂W product reads ∂y anyway, instead of
//! a pass of its own over ∂y in f32.

use crate::MatmulPrecision;
use cudarc::cublaslt::{result, sys};
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use std::ffi::c_void;
use std::sync::Arc;

/// Workspace cuBLASLt may use (NVIDIA's recommendation for Hopper).
const WORKSPACE: usize = 32 << 20;

/// A cuBLASLt handle and its workspace on one stream.
pub(crate) struct BiasGemm {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
}

// SAFETY: the handle is only used with the owning backend's stream, one call at a time.
unsafe impl Send for BiasGemm {}
unsafe impl Sync for BiasGemm {}

impl Drop for BiasGemm {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once.
        unsafe { result::destroy_handle(self.handle) }.ok();
    }
}

/// What the product does with the bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Epilogue {
    /// D = op(A)·op(B) + bias, the bias (m elements) added to every column.
    Bias,
    /// D += op(A)·op(B), and the bias pointer receives (is overwritten with) the sums of op(B)
    /// over k, one per column of D (n elements): a linear layer's ∂b beside its ∂W.
    BiasGrad,
}

/// The element type of D (and of the bias the epilogue adds: the same).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Out {
    F32,
    Bf16,
}

/// Descriptors destroyed on every path out of [`BiasGemm::run`].
struct Descriptors {
    desc: sys::cublasLtMatmulDesc_t,
    layouts: Vec<sys::cublasLtMatrixLayout_t>,
    pref: sys::cublasLtMatmulPreference_t,
}

impl Drop for Descriptors {
    fn drop(&mut self) {
        // SAFETY: each handle was created once and is destroyed once, after its last use.
        unsafe {
            for l in &self.layouts {
                result::destroy_matrix_layout(*l).ok();
            }
            if !self.desc.is_null() {
                result::destroy_matmul_desc(self.desc).ok();
            }
            if !self.pref.is_null() {
                result::destroy_matmul_pref(self.pref).ok();
            }
        }
    }
}

impl BiasGemm {
    pub(crate) fn new(stream: &Arc<CudaStream>) -> Result<Self, String> {
        let handle = result::create_handle().map_err(|e| format!("cuBLASLt: {e:?}"))?;
        // SAFETY: scratch memory for cuBLASLt, never read by us.
        let workspace = unsafe { stream.alloc::<u8>(WORKSPACE) }.map_err(|e| e.to_string())?;
        Ok(BiasGemm { handle, workspace })
    }

    /// D (col-major m×n, leading dimension ldd) = op(A)·op(B) + bias (+ C when a `residual` C
    /// is given: f32, D's layout, read in the epilogue in place of an add of its own), or D +=
    /// op(A)·op(B) with the bias gradient written ([`Epilogue`]); D and the bias f32 or bf16
    /// ([`Out`]; a bias gradient f32); A and B as in BLAS, bf16 under
    /// [`MatmulPrecision::Bf16`], else f32.
    ///
    /// # Safety
    /// The pointers must hold matrices of the sizes the dimensions describe, on `stream`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn run(
        &self,
        stream: &Arc<CudaStream>,
        precision: MatmulPrecision,
        (transa, transb): (bool, bool),
        (m, n, k): (usize, usize, usize),
        (a, lda): (CUdeviceptr, usize),
        (b, ldb): (CUdeviceptr, usize),
        (epilogue, bias): (Epilogue, CUdeviceptr),
        (d, ldd, out): (CUdeviceptr, usize, Out),
        residual: Option<CUdeviceptr>,
    ) -> Result<(), String> {
        use sys::cublasComputeType_t as C;
        use sys::cudaDataType_t as T;
        let err = |e: result::CublasError| format!("cuBLASLt: {e:?}");
        let (elem, compute) = match precision {
            MatmulPrecision::F32 => (T::CUDA_R_32F, C::CUBLAS_COMPUTE_32F),
            MatmulPrecision::Tf32 => (T::CUDA_R_32F, C::CUBLAS_COMPUTE_32F_FAST_TF32),
            MatmulPrecision::Bf16 => (T::CUDA_R_16BF, C::CUBLAS_COMPUTE_32F),
        };
        let mut ds = Descriptors {
            desc: std::ptr::null_mut(),
            layouts: Vec::new(),
            pref: std::ptr::null_mut(),
        };
        ds.desc = result::create_matmul_desc(compute, T::CUDA_R_32F).map_err(err)?;
        let set = |attr, value: *const c_void, size| {
            // SAFETY: each attribute is given a value of the type the cuBLASLt docs name.
            unsafe { result::set_matmul_desc_attribute(ds.desc, attr, value, size) }.map_err(err)
        };
        use sys::cublasLtMatmulDescAttributes_t as A;
        let (ta, tb) = (i32::from(transa), i32::from(transb));
        use sys::cublasLtEpilogue_t as Ep;
        assert!(
            residual.is_none() || (epilogue == Epilogue::Bias && out == Out::F32),
            "a residual is added to an f32 product with its bias"
        );
        let (epilogue, beta) = match epilogue {
            Epilogue::Bias if residual.is_some() => (Ep::CUBLASLT_EPILOGUE_BIAS, 1.0f32),
            Epilogue::Bias => (Ep::CUBLASLT_EPILOGUE_BIAS, 0.0f32),
            Epilogue::BiasGrad => (Ep::CUBLASLT_EPILOGUE_BGRADB, 1.0f32),
        };
        let d_type = match out {
            Out::F32 => T::CUDA_R_32F,
            Out::Bf16 => T::CUDA_R_16BF,
        };
        let bias_type = d_type;
        set(A::CUBLASLT_MATMUL_DESC_TRANSA, &ta as *const i32 as _, 4)?;
        set(A::CUBLASLT_MATMUL_DESC_TRANSB, &tb as *const i32 as _, 4)?;
        set(
            A::CUBLASLT_MATMUL_DESC_EPILOGUE,
            &epilogue as *const _ as _,
            4,
        )?;
        set(
            A::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
            &bias as *const CUdeviceptr as _,
            8,
        )?;
        set(
            A::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
            &bias_type as *const _ as _,
            4,
        )?;
        let (ar, ac) = if transa { (k, m) } else { (m, k) };
        let (br, bc) = if transb { (n, k) } else { (k, n) };
        for (ty, r, c, ld) in [
            (elem, ar, ac, lda),
            (elem, br, bc, ldb),
            (d_type, m, n, ldd),
        ] {
            let l = result::create_matrix_layout(ty, r as u64, c as u64, ld as i64).map_err(err)?;
            ds.layouts.push(l);
        }
        ds.pref = result::create_matmul_pref().map_err(err)?;
        let ws = WORKSPACE as u64;
        result::set_matmul_pref_attribute(
            ds.pref,
            sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            &ws as *const u64 as _,
            8,
        )
        .map_err(err)?;
        let (la, lb, ld) = (ds.layouts[0], ds.layouts[1], ds.layouts[2]);
        let heuristic =
            result::get_matmul_algo_heuristic(self.handle, ds.desc, la, lb, ld, ld, ds.pref)
                .map_err(err)?;
        let alpha = 1.0f32;
        let (w, _w) = self.workspace.device_ptr(stream);
        // C = D (read only with beta = 1: Bias leaves D uninitialised until written) or the
        // residual, in D's layout
        let c = residual.unwrap_or(d);
        result::matmul(
            self.handle,
            ds.desc,
            &alpha as *const f32 as _,
            &beta as *const f32 as _,
            a as _,
            la,
            b as _,
            lb,
            c as _,
            ld,
            d as _,
            ld,
            &heuristic.algo,
            w as _,
            WORKSPACE,
            stream.cu_stream() as _,
        )
        .map_err(err)
    }
}
