//! Block samplers: which γ blocks train during the next period.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Chooses the blocks to train for the next period.
///
/// [`LisaAdamW`](crate::LisaAdamW) calls [`draw`](BlockSampler::draw) once when it is built and
/// once after every `period` steps, and checks the answer: γ distinct indices below
/// `num_blocks`, or [`LisaError::InvalidDraw`](crate::LisaError::InvalidDraw). Ordered,
/// weighted or gradient-driven samplers implement this trait.
///
/// ```
/// use candle_lisa::BlockSampler;
///
/// /// Walks through the blocks in order, γ at a time.
/// struct Cyclic(usize);
///
/// impl BlockSampler for Cyclic {
///     fn draw(&mut self, num_blocks: usize, gamma: usize) -> Vec<usize> {
///         let draw = (0..gamma).map(|k| (self.0 + k) % num_blocks).collect();
///         self.0 = (self.0 + gamma) % num_blocks;
///         draw
///     }
/// }
///
/// let mut s = Cyclic(0);
/// assert_eq!(s.draw(5, 2), [0, 1]);
/// assert_eq!(s.draw(5, 2), [2, 3]);
/// assert_eq!(s.draw(5, 2), [4, 0]);
/// ```
pub trait BlockSampler: Send {
    /// Returns `gamma` distinct block indices in `0..num_blocks`, in any order.
    fn draw(&mut self, num_blocks: usize, gamma: usize) -> Vec<usize>;

    /// The sampler's position, saved by [`LisaAdamW::save_state`](crate::LisaAdamW::save_state)
    /// so a resumed run draws what the uninterrupted one would have. `None` (the default)
    /// means it has none to save; a resumed run then goes on from the sampler as built.
    fn state(&self) -> Option<serde_json::Value> {
        None
    }

    /// Restores a position returned by [`state`](BlockSampler::state); an `Err` says why not.
    fn restore(&mut self, _state: &serde_json::Value) -> std::result::Result<(), String> {
        Err("this sampler cannot restore a saved state".into())
    }
}

/// The paper's sampler: γ blocks drawn uniformly at random without replacement.
///
/// It runs on [`ChaCha8Rng`], whose stream is fixed for a given seed whatever the platform, so
/// the same seed gives the same sequence of draws.
///
/// ```
/// use candle_lisa::{BlockSampler, UniformSampler};
/// let mut a = UniformSampler::new(7);
/// let mut b = UniformSampler::new(7);
/// let draw = a.draw(30, 2);
/// assert_eq!(draw, b.draw(30, 2));
/// assert!(draw[0] < draw[1] && draw[1] < 30);
/// ```
#[derive(Clone, Debug)]
pub struct UniformSampler {
    seed: u64,
    rng: ChaCha8Rng,
}

impl UniformSampler {
    /// A sampler seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }
}

impl BlockSampler for UniformSampler {
    /// Sorted indices. Draws more blocks than there are are cut to `num_blocks`; the optimizer
    /// never asks for that.
    fn draw(&mut self, num_blocks: usize, gamma: usize) -> Vec<usize> {
        let mut draw =
            rand::seq::index::sample(&mut self.rng, num_blocks, gamma.min(num_blocks)).into_vec();
        draw.sort_unstable();
        draw
    }

    /// `{"seed": …, "word_pos": "…"}`: the seed and the position in ChaCha8's stream.
    fn state(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({
            "seed": self.seed,
            "word_pos": self.rng.get_word_pos().to_string(),
        }))
    }

    fn restore(&mut self, state: &serde_json::Value) -> std::result::Result<(), String> {
        let seed = state["seed"].as_u64().ok_or("no integer \"seed\"")?;
        let pos: u128 = state["word_pos"]
            .as_str()
            .and_then(|p| p.parse().ok())
            .ok_or("no decimal \"word_pos\"")?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_word_pos(pos);
        *self = Self { seed, rng };
        Ok(())
    }
}
