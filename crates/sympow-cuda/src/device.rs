//! Device discovery and context creation through cudarc.

use crate::{GpuInfo, Unavailable};
use cudarc::driver::{
    result, sys, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtrMut,
    DeviceRepr,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Whether [`alloc_output`] fills its buffers with 0xFF bytes (see [`poison_outputs`]).
static POISON_OUTPUTS: AtomicBool = AtomicBool::new(false);

/// Makes every uninitialised output buffer from now on start as 0xFF bytes — NaN in f32 and
/// bf16 — so that an element a kernel fails to write shows up as a NaN in `sympow
/// device-check`'s rows instead of a stale value that may happen to be right. Off by default
/// (it costs the memsets that leaving outputs uninitialised saves).
pub fn poison_outputs(on: bool) {
    POISON_OUTPUTS.store(on, Ordering::Relaxed);
}

/// A buffer of `n` elements for a launch that writes every one of them before anything reads
/// it: uninitialised, as zeroing it first would be a wasted pass over memory (≈ 40 GB a
/// `gpt2-124m` step at 16k), or poisoned under [`poison_outputs`].
pub(crate) fn alloc_output<T: DeviceRepr>(stream: &Arc<CudaStream>, n: usize) -> CudaSlice<T> {
    let n = n.max(1);
    // SAFETY: the callers' kernels write every element before it is read; device-check runs
    // with the buffers poisoned to catch one that does not.
    let mut buf = unsafe { stream.alloc::<T>(n) }.expect("device allocation");
    if POISON_OUTPUTS.load(Ordering::Relaxed) {
        let bytes = n * std::mem::size_of::<T>();
        let (ptr, _sync) = buf.device_ptr_mut(stream);
        // SAFETY: the pointer spans `bytes` bytes of this stream's allocation; 0xFF bytes are a
        // NaN pattern, never read as anything but a value to be overwritten.
        unsafe { result::memset_d8_async(ptr, 0xff, bytes, stream.cu_stream()) }
            .expect("device memset");
    }
    buf
}

/// A GPU ready for work: its context and description.
pub struct CudaGpu {
    /// The primary context of the device.
    pub ctx: Arc<CudaContext>,
    /// What it is.
    pub info: GpuInfo,
}

impl CudaGpu {
    /// Opens GPU `ordinal`, or says why not.
    pub fn open(ordinal: usize) -> Result<Self, Unavailable> {
        let info = detect(ordinal)?;
        let ctx = CudaContext::new(ordinal).map_err(|e| Unavailable::Driver(e.to_string()))?;
        Ok(CudaGpu { ctx, info })
    }
}

/// Makes allocation cheap on a context that allocates on one stream (the backend's): the
/// device's default stream-ordered memory pool keeps the memory freed into it instead of
/// returning it to the driver at every synchronisation (its default release threshold is 0), and
/// slices carry no CUDA events (cudarc creates two per allocation to order uses across streams;
/// one stream needs none — the fused sympow backward's second stream orders its uses itself,
/// between joins). Every op allocates its output, so a training step otherwise mapped fresh
/// pages for most of its buffers each time — the cost PyTorch's caching allocator avoids. If
/// the pool cannot be configured, allocation still works, only slower.
pub(crate) fn single_stream_allocation(ctx: &CudaContext, ordinal: usize) {
    // SAFETY: the caller's context allocates and frees every slice on one stream; the one other
    // stream (chunked.rs, backward) uses slices only between a join of it to that stream, after
    // their allocation, and a join back, before their free.
    unsafe { ctx.disable_event_tracking() };
    if !ctx.has_async_alloc() {
        return;
    }
    let Ok(dev) = result::device::get(ordinal as i32) else {
        return;
    };
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: the driver is initialised (the context exists); the pool handle is written by the
    // first call and the attribute takes a u64, as documented for RELEASE_THRESHOLD.
    unsafe {
        if sys::cuDeviceGetDefaultMemPool(&mut pool, dev) == sys::CUresult::CUDA_SUCCESS {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut threshold as *mut u64 as *mut std::ffi::c_void,
            );
        }
    }
}

pub(crate) fn detect(ordinal: usize) -> Result<GpuInfo, Unavailable> {
    // SAFETY: only tries to dlopen the driver library; touches no CUDA state.
    if !unsafe { sys::is_culib_present() } {
        return Err(Unavailable::NoDriver);
    }
    let drv = |e: result::DriverError| Unavailable::Driver(e.to_string());
    result::init().map_err(drv)?;
    let count = result::device::get_count().map_err(drv)? as usize;
    if ordinal >= count {
        return Err(Unavailable::Driver(format!(
            "GPU {ordinal} requested but {count} found"
        )));
    }
    let dev = result::device::get(ordinal as i32).map_err(drv)?;
    let name = result::device::get_name(dev).map_err(drv)?;
    let memory_bytes = unsafe { result::device::total_mem(dev) }.map_err(drv)?;
    let attr = |a| unsafe { result::device::get_attribute(dev, a) }.map_err(drv);
    let major = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    let minor = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    Ok(GpuInfo {
        ordinal,
        name,
        compute_capability: (major, minor),
        memory_bytes,
    })
}

/// NVRTC-compiles a tensor-core kernel source for `arch`: `compute_80` (`mma.sync` on bf16
/// needs compute capability 8.0) or `compute_90a` (Hopper's `wgmma` too: a source sees
/// `__CUDA_ARCH_FEAT_SM90_ALL` defined and may use it).
pub(crate) fn compile_tensor_core(
    source: &str,
    arch: &'static str,
) -> Result<cudarc::nvrtc::Ptx, cudarc::nvrtc::CompileError> {
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(source, opts)
}

/// The architecture the tensor-core kernels compile for on a GPU of compute capability
/// `(major, minor)`: `compute_90a` on Hopper (9.0) unless `SYMPOW_NO_WGMMA` is set (to run
/// and check the `mma.sync` kernels there too), else `compute_80`.
pub(crate) fn tensor_core_arch(cc: (i32, i32)) -> &'static str {
    if cc == (9, 0) && std::env::var_os("SYMPOW_NO_WGMMA").is_none() {
        "compute_90a"
    } else {
        "compute_80"
    }
}

/// Compiles a fused-kernel source for tensor cores (compute capability ≥ 8.0: `mma.sync` on
/// bf16; for a source with `wgmma` forms, `hopper`, those on Hopper: see [`tensor_core_arch`]),
/// loads it, and runs its shared-memory table kernel `sizes_kernel`, which writes `n_sizes`
/// ints (bytes per kernel and head dimension). `what` names the source in errors.
pub(crate) fn load_tensor_core_module(
    ctx: &Arc<CudaContext>,
    stream: &Arc<CudaStream>,
    source: &str,
    what: &str,
    hopper: bool,
    sizes_kernel: &str,
    n_sizes: usize,
) -> Result<(Arc<CudaModule>, Vec<i32>), String> {
    use cudarc::driver::{LaunchConfig, PushKernelArg};
    let cc = ctx.compute_capability().map_err(|e| e.to_string())?;
    if cc.0 < 8 {
        return Err(format!(
            "compute capability {}.{}: the {what} kernels need 8.0 or newer",
            cc.0, cc.1
        ));
    }
    let arch = if hopper {
        tensor_core_arch(cc)
    } else {
        "compute_80"
    };
    let build = |arch| -> Result<Arc<CudaModule>, String> {
        let ptx = compile_tensor_core(source, arch).map_err(|e| e.to_string())?;
        ctx.load_module(ptx).map_err(|e| e.to_string())
    };
    // an NVRTC or driver too old for compute_90a keeps the mma.sync forms rather than no kernels
    let module = build(arch)
        .or_else(|e| match arch {
            "compute_80" => Err(e),
            _ => build("compute_80").map_err(|e80| format!("{arch}: {e}; compute_80: {e80}")),
        })
        .map_err(|e| format!("NVRTC ({what}): {e}"))?;
    let f = module
        .load_function(sizes_kernel)
        .map_err(|e| e.to_string())?;
    let mut sizes = stream
        .alloc_zeros::<i32>(n_sizes)
        .map_err(|e| e.to_string())?;
    let mut l = stream.launch_builder(&f);
    l.arg(&mut sizes);
    // SAFETY: the kernel writes n_sizes ints, the length of the buffer.
    unsafe { l.launch(LaunchConfig::for_num_elems(1)) }.map_err(|e| e.to_string())?;
    let sizes = stream.clone_dtoh(&sizes).map_err(|e| e.to_string())?;
    Ok((module, sizes))
}

/// Loads kernel `name`, letting it use `bytes` of dynamic shared memory (beyond the default
/// 48 KiB a kernel must opt in).
pub(crate) fn load_with_shared_memory(
    module: &Arc<CudaModule>,
    name: &str,
    bytes: u32,
) -> Result<CudaFunction, String> {
    let f = module.load_function(name).map_err(|e| e.to_string())?;
    if bytes > 48 * 1024 {
        f.set_attribute(
            sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as i32,
        )
        .map_err(|e| format!("{name}: {bytes} bytes of shared memory: {e}"))?;
    }
    Ok(f)
}
