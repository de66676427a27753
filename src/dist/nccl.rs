//! [`Nccl`]: the [`Communicator`] between GPUs, one process per GPU, over NCCL through
//! candle's `nccl` feature (cudarc).

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::CudaViewMut;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, NcclType, ReduceOp};
use candle_core::cuda_backend::CudaStorage;
use candle_core::{DType, Device, InplaceOp1, Layout, Tensor};
use half::{bf16, f16};

use super::Communicator;
use crate::error::{LisaError, Result};
use crate::io::{atomic_write, io};

/// The unique id that ties the ranks of one NCCL communicator together: rank 0 makes it and
/// every other rank must receive it before [`Nccl::new`] (through a file,
/// [`NcclId::share_through_file`], or any channel of your own: [`NcclId::to_bytes`]).
#[derive(Clone, Copy, Debug)]
pub struct NcclId(Id);

impl NcclId {
    /// A new id (call on rank 0 only).
    ///
    /// # Errors
    /// [`LisaError::Communication`] when NCCL cannot make one.
    pub fn new() -> Result<Self> {
        Id::new()
            .map(Self)
            .map_err(|e| LisaError::Communication(format!("ncclGetUniqueId failed: {e:?}")))
    }

    /// The id's 128 bytes.
    pub fn to_bytes(&self) -> [u8; 128] {
        self.0.internal().map(|c| c as u8)
    }

    /// The id from [`to_bytes`](Self::to_bytes).
    ///
    /// # Errors
    /// [`LisaError::Communication`] unless `bytes` holds exactly 128 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let bytes: [u8; 128] = bytes.try_into().map_err(|_| {
            LisaError::Communication(format!(
                "an NCCL id is 128 bytes, and this one is {}",
                bytes.len()
            ))
        })?;
        Ok(Self(Id::uninit(bytes.map(|b| b as _))))
    }

    /// Rank 0 makes an id and writes it to `path` (atomically); every other rank waits up to
    /// `timeout` for the file and reads it. `path` must be on a file system all ranks see, and
    /// must not hold an id of an earlier run (remove it before launching).
    ///
    /// # Errors
    /// [`LisaError::Io`] when the file cannot be written or read, and
    /// [`LisaError::Communication`] when it does not appear in time.
    pub fn share_through_file(
        path: impl AsRef<Path>,
        rank: usize,
        timeout: Duration,
    ) -> Result<Self> {
        let path = path.as_ref();
        if rank == 0 {
            let id = Self::new()?;
            atomic_write(path, |tmp| {
                std::fs::write(tmp, id.to_bytes()).map_err(io("cannot write", tmp))
            })?;
            return Ok(id);
        }
        let started = Instant::now();
        loop {
            if path.is_file() {
                let bytes = std::fs::read(path).map_err(io("cannot read", path))?;
                return Self::from_bytes(&bytes);
            }
            if started.elapsed() > timeout {
                return Err(LisaError::Communication(format!(
                    "rank {rank} waited {timeout:?} for rank 0 to write the NCCL id to {}",
                    path.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// One rank of an NCCL communicator, on one GPU. Its collectives run on the candle device's
/// stream, so they are ordered with the kernels that make and use the buffers.
///
/// f32, f64, f16, bf16 and u32 buffers travel as they are.
pub struct Nccl {
    comm: Comm,
}

impl Nccl {
    /// Joins the communicator `id` as `rank` of `world_size`, on `device` (a CUDA device;
    /// one per process). Blocks until every rank has joined.
    ///
    /// # Errors
    /// [`LisaError::Communication`] for a device that is not CUDA, a rank out of range, or an
    /// NCCL failure.
    pub fn new(device: &Device, rank: usize, world_size: usize, id: NcclId) -> Result<Self> {
        let Device::Cuda(cuda) = device else {
            return Err(LisaError::Communication(format!(
                "NCCL runs on CUDA devices, and this is {device:?}: use the MPI communicator \
                 (feature `mpi`) for CPU processes"
            )));
        };
        if rank >= world_size {
            return Err(LisaError::Communication(format!(
                "rank {rank} is out of range for {world_size} ranks"
            )));
        }
        let comm = Comm::from_rank(cuda.cuda_stream(), rank, world_size, id.0)
            .map_err(|e| LisaError::Communication(format!("ncclCommInitRank failed: {e:?}")))?;
        Ok(Self { comm })
    }
}

impl Communicator for Nccl {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn all_reduce_sum(&self, buffer: &Tensor) -> Result<()> {
        buffer.inplace_op1(&Collective {
            comm: &self.comm,
            root: None,
        })?;
        Ok(())
    }

    fn broadcast(&self, buffer: &Tensor, root: usize) -> Result<()> {
        if root >= self.world_size() {
            return Err(LisaError::Communication(format!(
                "broadcast from rank {root}, but there are {} ranks",
                self.world_size()
            )));
        }
        buffer.inplace_op1(&Collective {
            comm: &self.comm,
            root: Some(root),
        })?;
        Ok(())
    }
}

/// A sum over all ranks (`root: None`) or a broadcast from `root`, in place.
struct Collective<'a> {
    comm: &'a Comm,
    root: Option<usize>,
}

impl Collective<'_> {
    fn apply<T: NcclType>(&self, values: &mut CudaViewMut<'_, T>) -> candle_core::Result<()> {
        let result = match self.root {
            None => self.comm.all_reduce_in_place(values, &ReduceOp::Sum),
            Some(root) => self.comm.broadcast_in_place(values, root as i32),
        };
        result
            .map(|_| ())
            .map_err(|e| candle_core::Error::Cuda(format!("NCCL: {e:?}").into()))
    }
}

impl InplaceOp1 for Collective<'_> {
    fn name(&self) -> &'static str {
        "lisa-nccl"
    }

    fn cpu_fwd(&self, _: &mut candle_core::CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("NCCL buffers live on the GPU: use the MPI communicator for the CPU")
    }

    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> candle_core::Result<()> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("NCCL: the buffer must be contiguous".into()))?;
        match storage.dtype() {
            DType::F32 => {
                self.apply(&mut storage.as_cuda_slice_mut::<f32>()?.slice_mut(start..end))
            }
            DType::F64 => {
                self.apply(&mut storage.as_cuda_slice_mut::<f64>()?.slice_mut(start..end))
            }
            DType::BF16 => {
                self.apply(&mut storage.as_cuda_slice_mut::<bf16>()?.slice_mut(start..end))
            }
            DType::F16 => {
                self.apply(&mut storage.as_cuda_slice_mut::<f16>()?.slice_mut(start..end))
            }
            DType::U32 => {
                self.apply(&mut storage.as_cuda_slice_mut::<u32>()?.slice_mut(start..end))
            }
            other => candle_core::bail!("NCCL: no support for {other:?} buffers"),
        }
    }
}
