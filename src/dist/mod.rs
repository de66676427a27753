//! Data-parallel training that sends only what trains.
//!
//! Each process (a *rank*) holds the whole model, reads its own share of every batch, and
//! computes gradients for it. Before the update the ranks sum their gradients with an
//! all-reduce, so every rank applies the same update and the weights stay identical. Under
//! LISA only the trainable parameters have gradients, so only they travel: the frozen blocks
//! are never sent. At Llama-3-8B proportions with γ = 2 that is 1.49B of 8.03B parameters, 81%
//! less traffic than full fine-tuning (docs/distributed.md has the figures).
//!
//! The engines are existing ones, behind the small [`Communicator`] trait:
//! - `Mpi` (feature `mpi`) between CPU processes, over the MPI library the program is
//!   linked against (Open MPI, MPICH). Launch with `mpirun -n 2 …`.
//! - `Nccl` (feature `nccl`) between GPUs, one process per GPU.
//!
//! [`Trainer::set_communicator`](crate::train::Trainer::set_communicator) makes a trainer
//! data-parallel. Each step then:
//! 1. all-reduces three numbers: the rank's counted labels, its loss times those labels, and
//!    whether its loss was finite; a non-finite loss anywhere skips the step everywhere;
//! 2. flattens the trainable gradients, in the optimizer's order (sorted by name), into
//!    buckets of at most [`DEFAULT_BUCKET_BYTES`], each scaled by the rank's share of the
//!    labels, and all-reduces them: the sum is the gradient of the mean loss over every
//!    rank's labels, as one process with the whole batch would compute it;
//! 3. updates, and after every redraw of the blocks checks that all ranks drew the same ones
//!    (a hash of the draw, broadcast from rank 0; [`LisaError::RankDisagreement`] if not).
//!
//! Every rank must give the optimizer the same seed: the ranks then draw the same blocks
//! without sending anything. Statistics a sampler takes from the gradients
//! ([`GradNormSampler`](crate::optim::GradNormSampler)) see the reduced ones, so they agree
//! too. [`StepSampler::for_rank`](crate::data::StepSampler::for_rank)
//! gives each rank its share of a step's batch, and only rank 0 writes checkpoints.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use sha2::{Digest, Sha256};

use crate::error::{LisaError, Result};
use crate::optim::LisaAdamW;

mod launch;
#[cfg(feature = "mpi")]
mod mpi;
pub use self::launch::RankEnv;
#[cfg(feature = "mpi")]
pub use self::mpi::Mpi;

#[cfg(feature = "nccl")]
mod nccl;
#[cfg(feature = "nccl")]
pub use self::nccl::{Nccl, NcclId};

/// The largest bucket of gradients sent in one all-reduce: 25 MiB, PyTorch DDP's default.
pub const DEFAULT_BUCKET_BYTES: usize = 25 << 20;

/// A group of processes that can sum buffers and share them: the one thing data-parallel
/// training needs from a communication engine.
///
/// Every method is collective: all ranks call it, in the same order, with buffers of the same
/// dtype and length, or the program hangs or fails inside the engine. The buffers are
/// contiguous rank-1 tensors on the device the engine works on, written in place.
pub trait Communicator {
    /// This process's rank, `0..world_size()`.
    fn rank(&self) -> usize;

    /// How many ranks there are.
    fn world_size(&self) -> usize;

    /// Replaces `buffer` on every rank by its sum over all ranks.
    ///
    /// # Errors
    /// [`LisaError::Communication`] when the engine fails or cannot take the buffer.
    fn all_reduce_sum(&self, buffer: &Tensor) -> Result<()>;

    /// Replaces `buffer` on every rank by rank `root`'s.
    ///
    /// # Errors
    /// [`LisaError::Communication`] when the engine fails or cannot take the buffer.
    fn broadcast(&self, buffer: &Tensor, root: usize) -> Result<()>;

    /// Bytes [`all_reduce_sum`](Self::all_reduce_sum) hands the engine for `elements` values
    /// of `dtype`: by default their size; an engine that widens a dtype on the wire says so.
    fn wire_bytes(&self, dtype: DType, elements: usize) -> usize {
        elements * dtype.size_in_bytes()
    }
}

/// One communicator shared by several trainers of a process (the methods of a comparison, a
/// reference run): `Rc<Mpi>` and `Arc<Nccl>` are communicators too.
macro_rules! shared_communicator {
    ($($pointer:ident)::+) => {
        impl<C: Communicator + ?Sized> Communicator for $($pointer)::+<C> {
            fn rank(&self) -> usize {
                (**self).rank()
            }
            fn world_size(&self) -> usize {
                (**self).world_size()
            }
            fn all_reduce_sum(&self, buffer: &Tensor) -> Result<()> {
                (**self).all_reduce_sum(buffer)
            }
            fn broadcast(&self, buffer: &Tensor, root: usize) -> Result<()> {
                (**self).broadcast(buffer, root)
            }
            fn wire_bytes(&self, dtype: DType, elements: usize) -> usize {
                (**self).wire_bytes(dtype, elements)
            }
        }
    };
}
shared_communicator!(std::rc::Rc);
shared_communicator!(std::sync::Arc);

/// What the ranks agree on before the gradients travel.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Totals {
    /// Counted labels over all ranks.
    pub tokens: f64,
    /// The mean loss over all ranks' labels.
    pub loss: f64,
    /// Whether some rank's loss was not finite.
    pub non_finite: bool,
    /// How many ranks failed (an error, not a non-finite loss).
    pub failed: usize,
}

/// Sums each rank's labels, label-weighted loss, non-finite flag and failure flag (one
/// all-reduce of four f64s on `device`). Every point where the ranks agree on a failure is
/// this same all-reduce, so a rank that failed between two of them
/// ([`Trainer::fail_step`](crate::train::Trainer::fail_step)) meets the others at whichever
/// one they are at, instead of leaving them waiting in a collective it never joins.
pub(crate) fn totals(
    comm: &dyn Communicator,
    device: &Device,
    tokens: usize,
    loss: f64,
    non_finite: bool,
    failed: bool,
) -> Result<Totals> {
    let weighted = if non_finite || failed {
        0.0
    } else {
        loss * tokens as f64
    };
    let flag = |b: bool| f64::from(u8::from(b));
    let buffer = Tensor::new(
        &[tokens as f64, weighted, flag(non_finite), flag(failed)],
        device,
    )?;
    comm.all_reduce_sum(&buffer)?;
    let [tokens, weighted, non_finite, failed] = buffer.to_vec1::<f64>()?[..] else {
        unreachable!("a buffer of four stays four")
    };
    Ok(Totals {
        tokens,
        loss: weighted / tokens.max(1.0),
        non_finite: non_finite > 0.0,
        failed: failed.round() as usize,
    })
}

/// Replaces the gradient of every var in `vars` (a missing one counts as zeros) by the sum
/// over all ranks of `scale` times it, sending them in buckets of at most `bucket_bytes` of
/// one dtype, in the order of `vars`. Returns the bytes handed to the all-reduce.
pub(crate) fn all_reduce_gradients<'a>(
    comm: &dyn Communicator,
    vars: impl IntoIterator<Item = &'a Var>,
    grads: &mut GradStore,
    scale: f64,
    bucket_bytes: usize,
) -> Result<usize> {
    let mut sent = 0;
    let mut bucket: Vec<(&Var, Tensor)> = Vec::new();
    let mut filled = 0;
    for var in vars {
        let g = match grads.remove(var.as_tensor()) {
            Some(g) => g,
            None => var.as_tensor().zeros_like()?,
        };
        let bytes = g.elem_count() * g.dtype().size_in_bytes();
        let other_dtype = bucket.first().is_some_and(|(_, b)| b.dtype() != g.dtype());
        if !bucket.is_empty() && (filled + bytes > bucket_bytes || other_dtype) {
            sent += send_bucket(comm, &mut bucket, grads, scale)?;
            filled = 0;
        }
        filled += bytes;
        bucket.push((var, g.flatten_all()?));
    }
    if !bucket.is_empty() {
        sent += send_bucket(comm, &mut bucket, grads, scale)?;
    }
    Ok(sent)
}

fn send_bucket(
    comm: &dyn Communicator,
    bucket: &mut Vec<(&Var, Tensor)>,
    grads: &mut GradStore,
    scale: f64,
) -> Result<usize> {
    let flat: Vec<&Tensor> = bucket.iter().map(|(_, g)| g).collect();
    // The buffer is written in place, so it must own its storage: candle hands the same
    // gradient tensor to several inputs of one op, and `cat` of one tensor is that tensor.
    let buffer = match (flat.as_slice(), scale == 1.0) {
        ([one], true) => one.copy()?,
        (_, true) => Tensor::cat(&flat, 0)?,
        (_, false) => Tensor::cat(&flat, 0)?.affine(scale, 0.0)?,
    };
    comm.all_reduce_sum(&buffer)?;
    let mut offset = 0;
    for (var, g) in bucket.drain(..) {
        let n = g.elem_count();
        let reduced = buffer.narrow(0, offset, n)?.reshape(var.shape())?;
        grads.insert(var.as_tensor(), reduced);
        offset += n;
    }
    Ok(comm.wire_bytes(buffer.dtype(), buffer.elem_count()))
}

/// What every rank must agree on for the next step: the updates taken, the period, the
/// active blocks, the trainable set and the moments' format (ranks rounding their moments
/// differently would drift apart).
pub(crate) fn draw_summary(opt: &LisaAdamW) -> String {
    format!(
        "step {}, period {}, active blocks {:?}, {} trainable parameters, compact state {:?}",
        opt.step_count(),
        opt.period_index(),
        opt.active_blocks(),
        opt.trainable_params(),
        opt.compact_state()
    )
}

/// Checks that every rank's [`draw_summary`] is rank 0's: rank 0 broadcasts a hash of its
/// own, each rank compares, and one all-reduce counts the ranks that differ, so that every
/// rank returns the same verdict.
pub(crate) fn check_agreement(
    comm: &dyn Communicator,
    device: &Device,
    summary: &str,
) -> Result<()> {
    let digest = Sha256::digest(summary.as_bytes());
    let words: Vec<u32> = digest
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let buffer = Tensor::new(words.as_slice(), device)?;
    comm.broadcast(&buffer, 0)?;
    let differs = buffer.to_vec1::<u32>()? != words;
    let count = Tensor::new(&[f64::from(u8::from(differs))], device)?;
    comm.all_reduce_sum(&count)?;
    let disagreeing = count.to_vec1::<f64>()?[0].round() as usize;
    if disagreeing > 0 {
        return Err(LisaError::RankDisagreement {
            rank: comm.rank(),
            disagreeing,
            world_size: comm.world_size(),
            local: summary.to_string(),
            differs,
        });
    }
    Ok(())
}

/// Tells every rank how many ranks `failed` (the all-reduce of [`totals`]), so that a
/// failure of one rank (rank 0's checkpoint write, one rank's batch) becomes an error on all
/// of them rather than a hang.
pub(crate) fn agree_on_failure(
    comm: &dyn Communicator,
    device: &Device,
    failed: bool,
) -> Result<usize> {
    Ok(totals(comm, device, 0, 0.0, false, failed)?.failed)
}
