//! CUDA kernels for the engine (feature `cuda`).
//!
//! The kernels are CUDA C++ sources under `kernels/cuda/` (embedded in the binary), compiled at
//! context creation by NVRTC for the device's architecture and cached on disk ([`nvrtc`]).
//! The CUDA driver and NVRTC are loaded at run time through cudarc: a build with this feature
//! runs on machines without CUDA, where [`Gpu::new`] returns an error saying what is missing
//! (nothing panics). Only the driver and NVRTC APIs are used (no cuBLAS, no cuDNN).
//!
//! [`Gpu`] owns a context, a stream and the loaded kernels; [`kernels`] has its typed, bounds-
//! checked launchers (matmuls, attention, norms, RoPE, activations, KV-cache append, embedding
//! gather, greedy unmasking). Device buffers are cudarc `CudaSlice`s; bf16 data is `u16` bits.
//!
//! Environment: `DVL_NVRTC` (NVRTC library file), `DVL_KERNEL_CACHE` (cache directory or
//! `off`), `DVL_CUDA_INCLUDE` (extra `-I` directories), `DVL_NVRTC_OPTS` (extra options).

pub mod kernels;
pub mod nvrtc;

use std::format;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::string::{String, ToString};
use std::sync::Arc;
use std::vec::Vec;

use cudarc::driver::sys::CUdevice_attribute as Attr;
use cudarc::driver::{
    CudaContext, CudaSlice, CudaStream, DevicePtr, DeviceRepr, DriverError, ValidAsZeroBits,
};

pub use kernels::{AttnMask, AttnScratch, Kernels, MatmulAlgo, UnmaskScratch};

use crate::{Error, Result};

/// A CUDA failure as an engine error: `component` says which part (driver, NVRTC, a kernel
/// file, a launch) failed.
pub(crate) fn cuda_error(component: &str, detail: impl core::fmt::Display) -> Error {
    Error::Io {
        path: format!("CUDA {component}"),
        detail: detail.to_string(),
    }
}

fn driver_err(what: &str) -> impl FnOnce(DriverError) -> Error + '_ {
    move |e| cuda_error("driver", format!("{what}: {e:?}"))
}

/// Run a cudarc call that may panic (a missing library or symbol) as a Result.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(cuda_error("driver", format!("{what}: {msg}")))
        }
    }
}

/// Whether the CUDA driver library (libcuda) can be loaded. Never panics.
pub fn driver_present() -> bool {
    // SAFETY: only probes whether the library can be opened.
    catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() }).unwrap_or(false)
}

/// Number of CUDA devices, or why there are none (no driver, no device, driver error).
pub fn device_count() -> Result<usize> {
    if !driver_present() {
        return Err(cuda_error(
            "driver",
            "libcuda not found (no NVIDIA driver on this machine, or its directory is not on \
             the library path)",
        ));
    }
    guarded("device count", || {
        cudarc::driver::result::init().map_err(driver_err("cuInit"))?;
        let n = CudaContext::device_count().map_err(driver_err("cuDeviceGetCount"))?;
        Ok(n.max(0) as usize)
    })
}

/// What the engine knows about its device.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// (major, minor), e.g. (9, 0) for an H100.
    pub compute_capability: (i32, i32),
    /// The target the kernels were compiled for (`sm_90`, or `compute_XY` PTX when NVRTC does
    /// not know the device's own architecture).
    pub target: String,
    pub multiprocessors: u32,
    pub memory_bytes: usize,
    pub l2_bytes: usize,
    /// Driver API version, e.g. 13000 for CUDA 13.0.
    pub driver_version: i32,
    /// NVRTC (major, minor).
    pub nvrtc_version: (i32, i32),
    /// Peak DRAM bandwidth from the memory clock and bus width, in GB/s (0 when the driver
    /// does not report them).
    pub peak_bandwidth_gbs: f64,
}

/// A device context, its stream and the compiled kernels.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: Kernels,
    info: DeviceInfo,
}

impl Gpu {
    /// Open device `ordinal`, compile (or load from cache) every kernel for it.
    pub fn new(ordinal: usize) -> Result<Gpu> {
        let n = device_count()?;
        if ordinal >= n {
            return Err(cuda_error(
                "driver",
                format!("device {ordinal} requested but {n} CUDA device(s) present"),
            ));
        }
        let (ctx, stream, mut info) = guarded("context", || {
            let ctx = CudaContext::new(ordinal).map_err(driver_err("context creation"))?;
            let stream = ctx.default_stream();
            let attr = |a: Attr| ctx.attribute(a).unwrap_or(0);
            let cc = (
                attr(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
                attr(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
            );
            // kHz × bits: 2 transfers per clock (DDR), bytes = bits / 8.
            let clock_khz = attr(Attr::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE) as f64;
            let bus_bits = attr(Attr::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH) as f64;
            let mut driver_version = 0;
            // SAFETY: out-pointer to a live local.
            unsafe {
                cudarc::driver::sys::cuDriverGetVersion(&mut driver_version);
            }
            let info = DeviceInfo {
                ordinal,
                name: ctx.name().unwrap_or_else(|_| "?".into()),
                compute_capability: cc,
                target: String::new(),
                multiprocessors: attr(Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).max(1) as u32,
                memory_bytes: ctx.total_mem().unwrap_or(0),
                l2_bytes: attr(Attr::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE).max(0) as usize,
                driver_version,
                nvrtc_version: (0, 0),
                peak_bandwidth_gbs: 2.0 * clock_khz * 1e3 * bus_bits / 8.0 / 1e9,
            };
            Ok((ctx, stream, info))
        })?;
        if info.compute_capability.0 < 8 {
            return Err(cuda_error(
                "driver",
                format!(
                    "{} has compute capability {}.{}; the kernels need 8.0 (Ampere) or newer \
                     (bf16 tensor-core mma.sync)",
                    info.name, info.compute_capability.0, info.compute_capability.1
                ),
            ));
        }
        let nv = nvrtc::nvrtc()?;
        info.nvrtc_version = nv.version;
        info.target = kernels::target_for(info.compute_capability, &nv.archs)?;
        let kernels = Kernels::load(&ctx, &info.target)?;
        Ok(Gpu {
            ctx,
            stream,
            kernels,
            info,
        })
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn kernels(&self) -> &Kernels {
        &self.kernels
    }

    /// Copy host data to a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(host)
            .map_err(driver_err("host-to-device copy"))
    }

    /// Copy a device buffer (or view) to the host; waits for the stream (so a fault of any
    /// kernel queued before surfaces here).
    pub fn download<T: DeviceRepr>(&self, dev: &impl DevicePtr<T>) -> Result<Vec<T>> {
        let v = self
            .stream
            .clone_dtoh(dev)
            .map_err(driver_err("device-to-host copy"))?;
        self.synchronize()?;
        Ok(v)
    }

    /// Device time of the work `f` queues, in milliseconds (CUDA events around it).
    pub fn time_ms(&self, f: impl FnOnce() -> Result<()>) -> Result<f32> {
        use cudarc::driver::sys::CUevent_flags;
        let start = self
            .ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(driver_err("event"))?;
        let end = self
            .ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(driver_err("event"))?;
        start
            .record(&self.stream)
            .map_err(driver_err("event record"))?;
        f()?;
        end.record(&self.stream)
            .map_err(driver_err("event record"))?;
        end.synchronize().map_err(driver_err("event synchronize"))?;
        start.elapsed_ms(&end).map_err(driver_err("event elapsed"))
    }

    /// A zero-filled device buffer of `n` elements.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros(n)
            .map_err(driver_err("device allocation"))
    }

    /// Wait for all work queued on the stream; reports asynchronous kernel faults.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(driver_err("synchronize"))
    }
}
