//! Device discovery and context creation through cudarc.

use crate::{GpuInfo, Unavailable};
use cudarc::driver::{result, sys, CudaContext};
use std::sync::Arc;

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
