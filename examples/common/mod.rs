//! Helpers shared by the examples.
#![allow(dead_code)]

// Each example uses some of them.
#[allow(unused_imports)]
pub use candle_lisa_testkit::{keep_freed_memory, set_thread_count, setup};

/// Keeps the lines of `metrics.jsonl` from other methods, and this method's up to `step`;
/// drops lines that are not JSON (torn by a kill).
pub fn truncate_metrics(
    path: &std::path::Path,
    method: &str,
    step: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| {
                v["method"] != method || v["step"].as_u64().is_some_and(|s| s <= step)
            })
        })
        .collect();
    let text = kept.join("\n") + if kept.is_empty() { "" } else { "\n" };
    // Atomically: a kill here must not lose the lines kept.
    candle_lisa::io::atomic_write(path, |tmp| {
        std::fs::write(tmp, text).map_err(|source| candle_lisa::LisaError::Io {
            action: "cannot write",
            path: tmp.to_path_buf(),
            source,
        })
    })?;
    Ok(())
}

#[cfg(feature = "cuda")]
use candle_core::cuda_backend::cudarc::driver::{result, sys};

/// The memory pool candle's CUDA allocations come from (`cuMemAllocAsync` on the device's
/// current pool), and its exact statistics: bytes handed out now and their high-water mark.
#[cfg(feature = "cuda")]
pub struct CudaPool {
    device: candle_core::cuda_backend::CudaDevice,
    pool: sys::CUmemoryPool,
}

#[cfg(feature = "cuda")]
impl CudaPool {
    pub fn new(
        device: &candle_core::cuda_backend::CudaDevice,
    ) -> Result<Self, Box<dyn std::error::Error>> {
        let stream = device.cuda_stream();
        let ctx = stream.context();
        ctx.bind_to_thread()?;
        // SAFETY: the device handle comes from a live context.
        let pool = unsafe { result::device::get_mem_pool(ctx.cu_device()) }?;
        Ok(Self {
            device: device.clone(),
            pool,
        })
    }

    fn get(&self, attr: sys::CUmemPool_attribute) -> Result<usize, Box<dyn std::error::Error>> {
        self.device.cuda_stream().synchronize()?;
        let mut value: u64 = 0;
        // SAFETY: the pool is the device's; these attributes are cuuint64_t.
        unsafe {
            result::mem_pool::get_attribute(self.pool, attr, &mut value as *mut u64 as *mut _)
        }?;
        Ok(value as usize)
    }

    /// Starts a new high-water mark from the bytes in use now.
    pub fn reset(&self) -> Result<(), Box<dyn std::error::Error>> {
        self.device.cuda_stream().synchronize()?;
        // Zero is the only value the high-water mark accepts: it restarts from the bytes
        // in use now.
        let mut zero: u64 = 0;
        // SAFETY: as in `get`.
        unsafe {
            result::mem_pool::set_attribute(
                self.pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                &mut zero as *mut u64 as *mut _,
            )
        }?;
        Ok(())
    }

    /// The most bytes in use since the last reset.
    pub fn peak(&self) -> Result<usize, Box<dyn std::error::Error>> {
        self.get(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)
    }

    /// Bytes in use now.
    pub fn used(&self) -> Result<usize, Box<dyn std::error::Error>> {
        self.get(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)
    }
}

/// Peak device memory over a stretch of a run: the CUDA pool's high-water mark from
/// [`DevicePeak::new`] on (see [`CudaPool`]); nothing on other devices.
pub struct DevicePeak {
    #[cfg(feature = "cuda")]
    pool: Option<CudaPool>,
}

impl DevicePeak {
    /// Starts measuring on `dev`.
    pub fn new(dev: &candle_core::Device) -> Result<Self, Box<dyn std::error::Error>> {
        #[cfg(feature = "cuda")]
        {
            let pool = match dev {
                candle_core::Device::Cuda(d) => Some(CudaPool::new(d)?),
                _ => None,
            };
            if let Some(pool) = &pool {
                pool.reset()?;
            }
            Ok(Self { pool })
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = dev;
            Ok(Self {})
        }
    }

    /// The most device memory in use since [`DevicePeak::new`]; `None` off CUDA.
    pub fn peak(&self) -> Result<Option<usize>, Box<dyn std::error::Error>> {
        #[cfg(feature = "cuda")]
        if let Some(pool) = &self.pool {
            return Ok(Some(pool.peak()?));
        }
        Ok(None)
    }
}

/// Prints above the progress bar, or plainly when there is no terminal to draw it on.
pub fn say(pb: &indicatif::ProgressBar, line: String) {
    if pb.is_hidden() {
        println!("{line}");
    } else {
        pb.println(line);
    }
}

/// The device named on the command line, or an error naming the feature to enable.
pub fn device(name: &str) -> Result<candle_core::Device, Box<dyn std::error::Error>> {
    match name {
        "cuda" if cfg!(feature = "cuda") => Ok(candle_core::Device::new_cuda(0)?),
        "metal" if cfg!(feature = "metal") => Ok(candle_core::Device::new_metal(0)?),
        "cpu" => Ok(candle_core::Device::Cpu),
        other => Err(format!(
            "this example was built without {other}: rebuild with `--features {other}`"
        )
        .into()),
    }
}

/// Kills this process at once, as a crash would (no destructors, no flushing).
pub fn kill_self() -> ! {
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &std::process::id().to_string()])
        .status();
    std::process::abort()
}
