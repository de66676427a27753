//! [`Mpi`]: the [`Communicator`] between CPU processes, over the MPI library the program is
//! linked against, through the `mpi` crate.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Tensor};
use half::{bf16, f16};
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator as _, CommunicatorCollectives, Equivalence, Root};

use super::Communicator;
use crate::error::{LisaError, Result};

/// The ranks of `MPI_COMM_WORLD`, on the CPU.
///
/// f32, f64 and u32 buffers travel as they are; f16 and bf16 are summed in f32 (MPI has no
/// half type), so they count 4 bytes a value in [`Communicator::wire_bytes`].
///
/// ```no_run
/// use candle_core::{DType, Device};
/// use candle_lisa::dist::Mpi;
/// use candle_lisa::train::{Constant, Trainer, TrainerConfig};
/// use candle_lisa::{load_llama, LisaAdamW, LisaConfig, Llama};
///
/// // Under `mpirun -n 2`: every rank builds the same optimizer (the same seed) and feeds
/// // the trainer its own share of each batch.
/// let mpi = Mpi::init()?;
/// let (config, varmap) = load_llama("assets/tiny-llama", DType::F32, &Device::Cpu)?;
/// let opt = LisaAdamW::new(&varmap, Default::default(), LisaConfig::default())?;
/// let schedule = Constant { lr: 1e-3, warmup: 0 };
/// let mut trainer = Trainer::new(opt, schedule, TrainerConfig::default(), move |plan| {
///     Llama::from_plan(&config, plan)
/// })?;
/// trainer.set_communicator(Box::new(mpi))?;
/// # Ok::<(), candle_lisa::LisaError>(())
/// ```
pub struct Mpi {
    world: SimpleCommunicator,
    /// Finalises MPI when dropped, if this value initialised it.
    _universe: Option<Universe>,
}

impl Mpi {
    /// Initialises MPI and returns the world. MPI is finalised when this value is dropped.
    ///
    /// # Errors
    /// [`LisaError::Communication`] if MPI was initialised already in this process (use
    /// [`Mpi::world`] then).
    pub fn init() -> Result<Self> {
        let universe = mpi::initialize().ok_or_else(|| {
            LisaError::Communication(
                "MPI is initialised already in this process: use Mpi::world() for the world it \
                 has"
                .into(),
            )
        })?;
        Ok(Self {
            world: universe.world(),
            _universe: Some(universe),
        })
    }

    /// The world of an MPI initialised elsewhere in the process (by [`Mpi::init`] or by the
    /// `mpi` crate); it is not finalised when this value is dropped.
    ///
    /// # Errors
    /// [`LisaError::Communication`] if MPI is not initialised.
    pub fn world() -> Result<Self> {
        if !mpi::is_initialized() || mpi::is_finalized() {
            return Err(LisaError::Communication(
                "MPI is not initialised: call Mpi::init() first".into(),
            ));
        }
        Ok(Self {
            world: SimpleCommunicator::world(),
            _universe: None,
        })
    }
}

impl Communicator for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn world_size(&self) -> usize {
        self.world.size() as usize
    }

    fn all_reduce_sum(&self, buffer: &Tensor) -> Result<()> {
        run(buffer, &Collective::Sum(&self.world))
    }

    fn broadcast(&self, buffer: &Tensor, root: usize) -> Result<()> {
        if root >= self.world_size() {
            return Err(LisaError::Communication(format!(
                "broadcast from rank {root}, but there are {} ranks",
                self.world_size()
            )));
        }
        run(buffer, &Collective::Broadcast(&self.world, root))
    }

    fn wire_bytes(&self, dtype: DType, elements: usize) -> usize {
        match dtype {
            DType::F16 | DType::BF16 => 4 * elements,
            d => d.size_in_bytes() * elements,
        }
    }
}

fn run(buffer: &Tensor, op: &Collective<'_>) -> Result<()> {
    if !buffer.device().is_cpu() {
        return Err(LisaError::Communication(format!(
            "MPI sums CPU buffers, and this one is on {:?}: use the NCCL communicator \
             (feature `nccl`) for GPUs",
            buffer.device()
        )));
    }
    buffer.inplace_op1(op)?;
    Ok(())
}

/// One collective on a CPU buffer, in place.
enum Collective<'a> {
    Sum(&'a SimpleCommunicator),
    Broadcast(&'a SimpleCommunicator, usize),
}

impl Collective<'_> {
    fn apply<T: Equivalence + Copy>(&self, values: &mut [T]) {
        match self {
            Self::Sum(world) => {
                let send = values.to_vec();
                world.all_reduce_into(&send[..], values, SystemOperation::sum());
            }
            Self::Broadcast(world, root) => {
                world.process_at_rank(*root as i32).broadcast_into(values);
            }
        }
    }

    /// Half-precision values, summed in f32 (broadcast as their bits).
    fn apply_half<T: Copy>(
        &self,
        values: &mut [T],
        to_f32: fn(T) -> f32,
        from_f32: fn(f32) -> T,
        bits: fn(T) -> u16,
        from_bits: fn(u16) -> T,
    ) {
        match self {
            Self::Sum(_) => {
                let mut wide: Vec<f32> = values.iter().map(|&v| to_f32(v)).collect();
                self.apply(&mut wide);
                for (v, w) in values.iter_mut().zip(wide) {
                    *v = from_f32(w);
                }
            }
            Self::Broadcast(..) => {
                let mut raw: Vec<u16> = values.iter().map(|&v| bits(v)).collect();
                self.apply(&mut raw);
                for (v, r) in values.iter_mut().zip(raw) {
                    *v = from_bits(r);
                }
            }
        }
    }
}

impl InplaceOp1 for Collective<'_> {
    fn name(&self) -> &'static str {
        "lisa-mpi"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("MPI: the buffer must be contiguous".into()))?;
        match storage {
            CpuStorage::F32(v) => self.apply(&mut v[start..end]),
            CpuStorage::F64(v) => self.apply(&mut v[start..end]),
            CpuStorage::U32(v) => self.apply(&mut v[start..end]),
            CpuStorage::BF16(v) => self.apply_half(
                &mut v[start..end],
                bf16::to_f32,
                bf16::from_f32,
                bf16::to_bits,
                bf16::from_bits,
            ),
            CpuStorage::F16(v) => self.apply_half(
                &mut v[start..end],
                f16::to_f32,
                f16::from_f32,
                f16::to_bits,
                f16::from_bits,
            ),
            other => candle_core::bail!("MPI: no support for {:?} buffers", other.dtype()),
        }
        Ok(())
    }
}
