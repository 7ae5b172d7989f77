//! The CUDA backend of sympow.
//!
//! Built with the `cuda` feature it links `cudarc` with dynamic loading: nothing of CUDA is
//! needed to build, and the driver, cuBLAS and NVRTC are opened when a GPU is first asked for.
//! Without the feature (and on machines without a driver) [`detect`] reports why no GPU is
//! available and callers use the CPU backend; it never panics.

#[cfg(feature = "cuda")]
mod backend;
#[cfg(feature = "cuda")]
pub use backend::{
    set_default_matmul, CudaBackend, CudaDecodeState, CudaKvCache, CudaRecording, MatmulPrecision,
};
#[cfg(feature = "cuda")]
pub mod bench;
#[cfg(feature = "cuda")]
pub mod check;
#[cfg(feature = "cuda")]
pub mod chunked;
#[cfg(feature = "cuda")]
mod device;
#[cfg(feature = "cuda")]
pub mod flash;
#[cfg(feature = "cuda")]
mod lt;
#[cfg(feature = "cuda")]
pub mod parallel;
#[cfg(feature = "cuda")]
pub mod profile;
#[cfg(feature = "cuda")]
pub use device::CudaGpu;

/// Head dimensions (dk = dv) the fused chunked-sympow kernels are built for.
pub const FUSED_HEAD_DIMS: [usize; 3] = [32, 64, 128];

/// Default chunk length: on the H100, d = 64, gated, forward+backward of 65,536 tokens at
/// T = 4k / 64k — chunk 256 → 8.19 / 8.24 ms, 512 → 7.38 / 7.49, 768 → 7.47 / 7.59, 1024 →
/// 7.69 / 7.77, 1536 → 8.18 / 8.36 (shorter chunks: less intra-chunk work, more states to
/// sum; docs/PERFORMANCE.md). Any multiple of 128 up to [`MAX_CHUNK`].
pub const DEFAULT_CHUNK: usize = 512;
/// Largest chunk length (shared memory of the gate scans: 4 bytes a token).
pub const MAX_CHUNK: usize = 4096;

/// Why the CUDA backend is not available.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Unavailable {
    /// This build has no CUDA support.
    #[error("this binary was built without the `cuda` feature")]
    NotCompiled,
    /// The driver library (libcuda) could not be opened.
    #[error("no NVIDIA driver found (libcuda could not be loaded)")]
    NoDriver,
    /// The driver loaded but reported an error or no devices.
    #[error("CUDA driver error: {0}")]
    Driver(String),
}

/// A short description of the GPU that would be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    /// Device ordinal.
    pub ordinal: usize,
    /// Marketing name, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Total device memory in bytes.
    pub memory_bytes: usize,
}

/// Looks for GPU `ordinal` without panicking: checks that the driver library can be loaded
/// before any cudarc call (cudarc panics when libcuda is absent).
pub fn detect(ordinal: usize) -> Result<GpuInfo, Unavailable> {
    #[cfg(feature = "cuda")]
    {
        device::detect(ordinal)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = ordinal;
        Err(Unavailable::NotCompiled)
    }
}

#[cfg(test)]
mod tests {
    /// Every kernel module compiles under NVRTC with the options it is built with at run time,
    /// without a GPU: NVRTC needs no driver, so a compile error shows here, not first on the
    /// GPU machine. `scripts/nvrtc_check.sh` fetches NVRTC (the `nvidia-cuda-nvrtc` wheel) and
    /// runs this test with `SYMPOW_REQUIRE_NVRTC` set; where no NVRTC loads and that is unset
    /// (CI's machine has none), the test says so and compiles nothing.
    #[cfg(feature = "cuda")]
    #[test]
    fn kernels_compile_with_nvrtc() {
        // SAFETY: only tries to dlopen the NVRTC library.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            assert!(
                std::env::var_os("SYMPOW_REQUIRE_NVRTC").is_none(),
                "SYMPOW_REQUIRE_NVRTC is set but no NVRTC library loads (LD_LIBRARY_PATH?)"
            );
            eprintln!("kernels_compile_with_nvrtc: no NVRTC library found; nothing compiled");
            return;
        }
        let compiled = [
            (
                "ops, attention, decode",
                cudarc::nvrtc::compile_ptx(crate::backend::SOURCE),
            ),
            (
                "fused chunked sympow (mma.sync)",
                crate::device::compile_tensor_core(crate::chunked::SOURCE, "compute_80"),
            ),
            (
                "fused chunked sympow (wgmma)",
                crate::device::compile_tensor_core(crate::chunked::SOURCE, "compute_90a"),
            ),
            (
                "flash softmax",
                crate::device::compile_tensor_core(crate::flash::SOURCE, "compute_80"),
            ),
        ];
        for (what, ptx) in compiled {
            match ptx {
                Ok(_) => {}
                Err(cudarc::nvrtc::CompileError::CompileError { log, .. }) => {
                    panic!("NVRTC ({what}):\n{}", log.to_string_lossy())
                }
                Err(e) => panic!("NVRTC ({what}): {e:?}"),
            }
        }
    }

    #[test]
    fn detect_never_panics() {
        // On CI (no GPU) this is an error naming the reason; on a GPU machine, a device.
        match super::detect(0) {
            Ok(info) => assert!(!info.name.is_empty()),
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
}
