//! Peak device memory over a stretch of a run: on CUDA, the high-water mark of the memory pool
//! candle allocates from; nothing on other devices (the heap is [`alloc`](super::alloc)'s).

/// What the pool's calls return.
pub type Error = Box<dyn std::error::Error>;

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
    /// The pool of `device`'s current context.
    ///
    /// # Errors
    /// The driver's, when the context cannot be bound or has no pool.
    pub fn new(device: &candle_core::cuda_backend::CudaDevice) -> Result<Self, Error> {
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

    fn get(&self, attr: sys::CUmemPool_attribute) -> Result<usize, Error> {
        self.device.cuda_stream().synchronize()?;
        let mut value: u64 = 0;
        // SAFETY: the pool is the device's; these attributes are cuuint64_t.
        unsafe {
            result::mem_pool::get_attribute(self.pool, attr, &mut value as *mut u64 as *mut _)
        }?;
        Ok(value as usize)
    }

    /// Starts a new high-water mark from the bytes in use now.
    pub fn reset(&self) -> Result<(), Error> {
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
    pub fn peak(&self) -> Result<usize, Error> {
        self.get(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)
    }

    /// Bytes in use now.
    pub fn used(&self) -> Result<usize, Error> {
        self.get(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)
    }
}

/// Peak device memory over a stretch of a run: the CUDA pool's high-water mark from
/// [`DevicePeak::new`] on (see `CudaPool`, in CUDA builds); nothing on other devices.
pub struct DevicePeak {
    #[cfg(feature = "cuda")]
    pool: Option<CudaPool>,
}

impl DevicePeak {
    /// Starts measuring on `dev`.
    pub fn new(dev: &candle_core::Device) -> Result<Self, Error> {
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
    pub fn peak(&self) -> Result<Option<usize>, Error> {
        #[cfg(feature = "cuda")]
        if let Some(pool) = &self.pool {
            return Ok(Some(pool.peak()?));
        }
        Ok(None)
    }
}
