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
/// use candle_lisa::optim::BlockSampler;
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

    /// Called by the optimizer at every step it applies, before a draw, with the L2 norm of
    /// each active block's gradients (of the loss itself: loss scaling undone, before any
    /// clipping). It costs nothing: the optimizer reads every gradient anyway to check it is
    /// finite. The default ignores it; [`GradNormSampler`] samples by it.
    fn observe(&mut self, _block: usize, _grad_norm: f64) {}
}

/// A ChaCha8 generator's seed and position, as samplers save them.
fn rng_state(seed: u64, rng: &ChaCha8Rng) -> serde_json::Value {
    serde_json::json!({"seed": seed, "word_pos": rng.get_word_pos().to_string()})
}

/// Reads [`rng_state`]'s form back.
fn rng_restore(state: &serde_json::Value) -> std::result::Result<(u64, ChaCha8Rng), String> {
    let seed = state["seed"].as_u64().ok_or("no integer \"seed\"")?;
    let pos: u128 = state["word_pos"]
        .as_str()
        .and_then(|p| p.parse().ok())
        .ok_or("no decimal \"word_pos\"")?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_word_pos(pos);
    Ok((seed, rng))
}

/// The paper's sampler: γ blocks drawn uniformly at random without replacement.
///
/// It runs on [`ChaCha8Rng`], whose stream is fixed for a given seed whatever the platform, so
/// the same seed gives the same sequence of draws.
///
/// ```
/// use candle_lisa::optim::{BlockSampler, UniformSampler};
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
        Some(rng_state(self.seed, &self.rng))
    }

    fn restore(&mut self, state: &serde_json::Value) -> std::result::Result<(), String> {
        let (seed, rng) = rng_restore(state)?;
        *self = Self { seed, rng };
        Ok(())
    }
}

/// The order in which [`OrderedSampler`] walks the blocks (BAdam's orders).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// 0, 1, 2, …: the first γ blocks, then the next γ, wrapping around.
    Ascending,
    /// N−1, N−2, …, wrapping around.
    Descending,
    /// A fresh random permutation of the blocks every epoch (every block once per epoch).
    Reshuffle,
}

/// Walks the blocks in a fixed or reshuffled order, γ at a time, as BAdam
/// ([arXiv 2404.02827](https://arxiv.org/abs/2404.02827)) does: every block is drawn once per
/// epoch of ⌈N / γ⌉ draws. When N is not a multiple of γ, a draw that crosses into the next
/// epoch takes the first blocks of the next epoch's order that it does not already hold, so
/// every draw still has γ distinct blocks.
///
/// ```
/// use candle_lisa::optim::sampler::{Order, OrderedSampler};
/// use candle_lisa::optim::BlockSampler;
/// let mut s = OrderedSampler::new(Order::Ascending, 0);
/// assert_eq!(s.draw(5, 2), [0, 1]);
/// assert_eq!(s.draw(5, 2), [2, 3]);
/// assert_eq!(s.draw(5, 2), [0, 4]); // 4, then 0 from the next epoch
/// assert_eq!(s.draw(5, 2), [1, 2]);
/// ```
#[derive(Clone, Debug)]
pub struct OrderedSampler {
    order: Order,
    seed: u64,
    rng: ChaCha8Rng,
    /// Blocks still to draw, in order: the rest of this epoch, then the next epochs'.
    queue: Vec<usize>,
}

impl OrderedSampler {
    /// A sampler walking the blocks in `order`; `seed` drives [`Order::Reshuffle`].
    pub fn new(order: Order, seed: u64) -> Self {
        Self {
            order,
            seed,
            rng: ChaCha8Rng::seed_from_u64(seed),
            queue: Vec::new(),
        }
    }

    fn epoch(&mut self, n: usize) -> Vec<usize> {
        match self.order {
            Order::Ascending => (0..n).collect(),
            Order::Descending => (0..n).rev().collect(),
            Order::Reshuffle => {
                use rand::seq::SliceRandom;
                let mut p: Vec<usize> = (0..n).collect();
                p.shuffle(&mut self.rng);
                p
            }
        }
    }
}

impl BlockSampler for OrderedSampler {
    fn draw(&mut self, num_blocks: usize, gamma: usize) -> Vec<usize> {
        let gamma = gamma.min(num_blocks);
        self.queue.retain(|&b| b < num_blocks);
        let mut draw = Vec::with_capacity(gamma);
        while draw.len() < gamma {
            if self.queue.iter().all(|b| draw.contains(b)) {
                let next = self.epoch(num_blocks);
                self.queue.extend(next);
            }
            let i = self
                .queue
                .iter()
                .position(|b| !draw.contains(b))
                .unwrap_or(0);
            draw.push(self.queue.remove(i));
        }
        draw.sort_unstable();
        draw
    }

    fn state(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({"rng": rng_state(self.seed, &self.rng), "queue": self.queue}))
    }

    fn restore(&mut self, state: &serde_json::Value) -> std::result::Result<(), String> {
        let (seed, rng) = rng_restore(&state["rng"])?;
        let queue = serde_json::from_value(state["queue"].clone())
            .map_err(|e| format!("bad \"queue\": {e}"))?;
        (self.seed, self.rng, self.queue) = (seed, rng, queue);
        Ok(())
    }
}

/// γ distinct indices drawn without replacement, each with probability proportional to its
/// weight among those not yet drawn (successive sampling, as `numpy.random.choice` with
/// `replace=False` and `p`). Zero weights are never drawn while positive ones remain.
fn weighted_draw(rng: &mut ChaCha8Rng, weights: &[f64], gamma: usize) -> Vec<usize> {
    use rand::Rng;
    let mut left: Vec<(usize, f64)> = weights.iter().copied().enumerate().collect();
    let mut draw = Vec::with_capacity(gamma);
    while draw.len() < gamma && !left.is_empty() {
        let total: f64 = left.iter().map(|(_, w)| w).sum();
        let i = if total > 0.0 {
            let mut u = rng.random::<f64>() * total;
            left.iter()
                .position(|&(_, w)| {
                    u -= w;
                    u < 0.0
                })
                .unwrap_or(left.len() - 1)
        } else {
            rng.random_range(0..left.len())
        };
        draw.push(left.remove(i).0);
    }
    draw.sort_unstable();
    draw
}

/// Samples blocks without replacement in proportion to fixed weights, for example per-block
/// importance scores such as OwLore's outlier ratios
/// ([arXiv 2405.18380](https://arxiv.org/abs/2405.18380)): with γ = 1 block `b` is drawn with
/// probability `w_b / Σ w`; with γ > 1 the blocks are drawn one after another, each in
/// proportion to its weight among those left.
///
/// ```
/// use candle_lisa::optim::sampler::WeightedSampler;
/// use candle_lisa::optim::BlockSampler;
/// let mut s = WeightedSampler::new(vec![0.0, 1.0, 3.0], 7)?;
/// let d = s.draw(3, 1);
/// assert!(d == [1] || d == [2]);
/// # Ok::<(), candle_lisa::LisaError>(())
/// ```
#[derive(Clone, Debug)]
pub struct WeightedSampler {
    weights: Vec<f64>,
    seed: u64,
    rng: ChaCha8Rng,
}

impl WeightedSampler {
    /// A sampler over one non-negative, finite weight per block (not all zero).
    ///
    /// # Errors
    /// [`LisaError::InvalidArgument`](crate::LisaError::InvalidArgument) for a negative or
    /// non-finite weight, or weights that are all zero.
    pub fn new(weights: Vec<f64>, seed: u64) -> crate::Result<Self> {
        if weights.iter().any(|w| !w.is_finite() || *w < 0.0) || weights.iter().all(|&w| w == 0.0) {
            return Err(crate::LisaError::InvalidArgument {
                what: "sampler weights",
                reason: format!(
                    "they must be finite, non-negative and not all zero, got {weights:?}"
                ),
            });
        }
        Ok(Self {
            weights,
            seed,
            rng: ChaCha8Rng::seed_from_u64(seed),
        })
    }

    /// The weights.
    pub fn weights(&self) -> &[f64] {
        &self.weights
    }
}

impl BlockSampler for WeightedSampler {
    /// Blocks past the weights' length get weight 0.
    fn draw(&mut self, num_blocks: usize, gamma: usize) -> Vec<usize> {
        let w: Vec<f64> = (0..num_blocks)
            .map(|b| self.weights.get(b).copied().unwrap_or(0.0))
            .collect();
        weighted_draw(&mut self.rng, &w, gamma.min(num_blocks))
    }

    fn state(&self) -> Option<serde_json::Value> {
        Some(rng_state(self.seed, &self.rng))
    }

    fn restore(&mut self, state: &serde_json::Value) -> std::result::Result<(), String> {
        (self.seed, self.rng) = rng_restore(state)?;
        Ok(())
    }
}

/// Samples blocks in proportion to an exponential moving average of their gradient norms,
/// measured at no cost while they train ([`BlockSampler::observe`]); in the spirit of GRASS
/// (arXiv 2604.07808).
///
/// Block `b`'s score `s_b` starts unknown; each observed step sets it to `g` the first time
/// and to `β·s_b + (1 − β)·g` after that; a frozen block keeps its last score. A block is
/// drawn (without replacement, as [`WeightedSampler`]) with weight
/// `max(s_b, floor · mean(s))`, where a block never observed counts as the largest score
/// seen, so every block is tried early and none starves.
///
/// ```
/// use candle_lisa::optim::sampler::GradNormSampler;
/// use candle_lisa::optim::BlockSampler;
/// let mut s = GradNormSampler::new(0.9, 0.1, 3);
/// s.observe(0, 10.0);
/// s.observe(1, 0.0);
/// assert_eq!(s.scores()[0], Some(10.0));
/// assert_eq!(s.draw(3, 3), [0, 1, 2]);
/// ```
#[derive(Clone, Debug)]
pub struct GradNormSampler {
    beta: f64,
    floor: f64,
    seed: u64,
    rng: ChaCha8Rng,
    scores: Vec<Option<f64>>,
}

impl GradNormSampler {
    /// A sampler with smoothing `beta` in [0, 1) and exploration `floor` in (0, 1].
    pub fn new(beta: f64, floor: f64, seed: u64) -> Self {
        Self {
            beta: beta.clamp(0.0, 0.999_999),
            floor: floor.clamp(1e-6, 1.0),
            seed,
            rng: ChaCha8Rng::seed_from_u64(seed),
            scores: Vec::new(),
        }
    }

    /// Each block's score so far (`None`: never observed).
    pub fn scores(&self) -> &[Option<f64>] {
        &self.scores
    }

    /// The sampling weight of each of `num_blocks` blocks now.
    pub fn weights(&self, num_blocks: usize) -> Vec<f64> {
        let seen: Vec<f64> = self.scores.iter().flatten().copied().collect();
        let max = seen.iter().copied().fold(0.0, f64::max);
        let mean = if seen.is_empty() {
            1.0
        } else {
            seen.iter().sum::<f64>() / seen.len() as f64
        };
        (0..num_blocks)
            .map(|b| match self.scores.get(b).copied().flatten() {
                Some(s) => s.max(self.floor * mean),
                None => max.max(self.floor * mean).max(f64::MIN_POSITIVE),
            })
            .collect()
    }
}

impl BlockSampler for GradNormSampler {
    fn draw(&mut self, num_blocks: usize, gamma: usize) -> Vec<usize> {
        let w = self.weights(num_blocks);
        weighted_draw(&mut self.rng, &w, gamma.min(num_blocks))
    }

    fn observe(&mut self, block: usize, grad_norm: f64) {
        if !grad_norm.is_finite() {
            return;
        }
        if self.scores.len() <= block {
            self.scores.resize(block + 1, None);
        }
        let s = &mut self.scores[block];
        *s = Some(match *s {
            None => grad_norm,
            Some(old) => self.beta * old + (1.0 - self.beta) * grad_norm,
        });
    }

    fn state(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({"rng": rng_state(self.seed, &self.rng), "scores": self.scores}))
    }

    fn restore(&mut self, state: &serde_json::Value) -> std::result::Result<(), String> {
        let (seed, rng) = rng_restore(&state["rng"])?;
        let scores = serde_json::from_value(state["scores"].clone())
            .map_err(|e| format!("bad \"scores\": {e}"))?;
        (self.seed, self.rng, self.scores) = (seed, rng, scores);
        Ok(())
    }
}
