//! The CUDA memory pool candle allocates from (`cuMemAllocAsync` on the device's default
//! pool). Its release threshold is 0 unless set: at every host synchronisation the driver
//! gives freed memory back to the system, and the next step maps it again. A 512 MB buffer
//! allocated afresh each iteration then copies at 550 GB/s instead of about 2 TB/s on an
//! H200 (docs/design.md). [`keep_freed_memory`] keeps freed memory in the pool for reuse,
//! as PyTorch's caching allocator does; the optimizers call it for their CUDA device. (For the
//! host heap the command does the same with `cli::keep_freed_memory`.)

use candle_core::Device;

use crate::error::Result;

/// Whether `device`'s memory pool keeps freed memory for reuse (`keep`) or returns it to the
/// system at each synchronisation (candle's default). Memory in use, and so every peak this
/// crate reports, is the same either way; only memory reserved by the process differs.
/// Returns whether `device` has such a pool (a CUDA device); on other devices it does
/// nothing.
///
/// # Errors
/// The driver's, when the device's context cannot be bound or has no default pool.
pub fn keep_freed_memory(device: &Device, keep: bool) -> Result<bool> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            cuda::set_release_threshold(d, if keep { u64::MAX } else { 0 })?;
            Ok(true)
        }
        _ => {
            let _ = keep;
            Ok(false)
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    use candle_core::cuda_backend::{CudaDevice, WrapErr};

    pub(super) fn set_release_threshold(d: &CudaDevice, bytes: u64) -> candle_core::Result<()> {
        let stream = d.cuda_stream();
        let ctx = stream.context();
        ctx.bind_to_thread().w()?;
        // SAFETY: the device handle comes from a live context; the release threshold is a
        // cuuint64_t attribute, read from `value` during the call.
        unsafe {
            let pool = result::device::get_mem_pool(ctx.cu_device()).w()?;
            let mut value = bytes;
            result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut value as *mut u64 as *mut _,
            )
            .w()?;
        }
        Ok(())
    }
}
