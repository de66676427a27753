//! The order in which training examples are drawn: a pure function of the seed and the step,
//! so a resumed run draws what the uninterrupted one would, and each rank of a data-parallel
//! run keeps its own share of every batch.

use candle_core::Device;
use rand::{Rng, SeedableRng};

use super::example::{pad_batch, Batch, Example};
use crate::error::{LisaError, Result};

/// Which examples each optimizer step trains on: a function of the seed and the step alone,
/// so the data position of a run is its step and a resumed run sees the same batches.
///
/// In a data-parallel run every rank draws the same batch and keeps its own contiguous share
/// of it ([`for_rank`](Self::for_rank)), so the ranks together train on exactly the examples
/// one process would, and the data position is still the step.
///
/// ```
/// use candle_lisa::data::StepSampler;
/// let s = StepSampler::new(7);
/// assert_eq!(s.indices(12, 4, 100), s.indices(12, 4, 100));
/// assert!(s.indices(12, 4, 100).iter().all(|&i| i < 100));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepSampler {
    seed: u64,
    /// This rank and the number of ranks; (0, 1) in a single process.
    rank: usize,
    world_size: usize,
}

impl StepSampler {
    /// A sampler for `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            rank: 0,
            world_size: 1,
        }
    }

    /// The sampler of rank `rank` of `world_size`: [`micro_batches`](Self::micro_batches)
    /// gives its share of each step's batch, examples `rank·B/W .. (rank+1)·B/W` of the `B`
    /// drawn.
    ///
    /// ```
    /// use candle_lisa::data::StepSampler;
    /// let all = StepSampler::new(7).indices(3, 8, 100);
    /// let second = StepSampler::new(7).for_rank(1, 2)?;
    /// assert_eq!(second.indices(3, 8, 100), all);
    /// # Ok::<(), candle_lisa::LisaError>(())
    /// ```
    ///
    /// # Errors
    /// [`LisaError::InvalidArgument`] unless `rank < world_size`.
    pub fn for_rank(self, rank: usize, world_size: usize) -> Result<Self> {
        if rank >= world_size {
            return Err(LisaError::InvalidArgument {
                what: "rank",
                reason: format!("rank {rank} is out of range for {world_size} ranks"),
            });
        }
        Ok(Self {
            rank,
            world_size,
            ..self
        })
    }

    /// `count` indices below `len`, drawn with replacement for `step` (ChaCha8, the same on
    /// every platform).
    pub fn indices(&self, step: u64, count: usize, len: usize) -> Vec<usize> {
        let seed = self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..count)
            .map(|_| rng.random_range(0..len.max(1)))
            .collect()
    }

    /// The micro-batches of `step`: `batch_size` examples split into `micro` padded batches;
    /// for a sampler [`for_rank`](Self::for_rank), this rank's share of them.
    ///
    /// # Errors
    /// Those of [`pad_batch`], and [`LisaError::InvalidArgument`] for no example, or for fewer
    /// examples in a batch than ranks.
    #[allow(clippy::too_many_arguments)]
    pub fn micro_batches(
        &self,
        examples: &[Example],
        step: u64,
        batch_size: usize,
        micro: usize,
        pad_id: u32,
        max_len: Option<usize>,
        device: &Device,
    ) -> Result<Vec<Batch>> {
        if examples.is_empty() {
            return Err(LisaError::InvalidArgument {
                what: "examples",
                reason: "there is no training example to draw from".into(),
            });
        }
        let (rank, world) = (self.rank, self.world_size);
        if batch_size < world {
            return Err(LisaError::InvalidArgument {
                what: "batch_size",
                reason: format!(
                    "a batch of {batch_size} cannot be shared by {world} ranks: give each rank \
                 one example at least"
                ),
            });
        }
        let drawn = self.indices(step, batch_size, examples.len());
        let share = &drawn[rank * batch_size / world..(rank + 1) * batch_size / world];
        let picked: Vec<Example> = share.iter().map(|&i| examples[i].clone()).collect();
        let size = picked.len().div_ceil(micro.max(1)).max(1);
        picked
            .chunks(size)
            .map(|c| pad_batch(c, pad_id, max_len, device))
            .collect()
    }
}
