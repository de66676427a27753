//! [`LisaConfig`]: how many blocks train, how often they change, how they are drawn, and
//! which names are blocks.

use super::sampler::{
    BlockSampler, GradNormSampler, Order, OrderedSampler, UniformSampler, WeightedSampler,
};

/// Hugging Face Llama, Mistral and Qwen block names: `model.layers.{i}.…`.
pub const LLAMA_BLOCK_PATTERN: &str = "model.layers.{i}.";

/// GPT-2 block names: `transformer.h.{i}.…`.
pub const GPT2_BLOCK_PATTERN: &str = "transformer.h.{i}.";

/// Name prefixes of input embeddings: Llama-family `model.embed_tokens.`, GPT-2's token and
/// position embeddings `transformer.wte.` and `transformer.wpe.` (see
/// [`LisaConfig::train_embedding`]).
pub const EMBEDDING_PREFIXES: [&str; 3] = [
    "model.embed_tokens.",
    "transformer.wte.",
    "transformer.wpe.",
];

/// Name prefixes of LM heads (see [`LisaConfig::train_head`]).
pub const HEAD_PREFIXES: [&str; 1] = ["lm_head."];

/// The block samplers [`LisaConfig`] can name; each is seeded by [`LisaConfig::seed`].
#[derive(Clone, Debug, PartialEq, Default)]
pub enum SamplerChoice {
    /// [`UniformSampler`]: γ blocks uniformly at random without replacement (the paper's).
    #[default]
    Uniform,
    /// [`OrderedSampler`]: BAdam's ascending, descending or reshuffled orders.
    Ordered(Order),
    /// [`WeightedSampler`] over one weight per block.
    Weighted(Vec<f64>),
    /// [`GradNormSampler`] with smoothing `beta` and exploration `floor`.
    GradNorm {
        /// Smoothing of the moving average, in [0, 1).
        beta: f64,
        /// Exploration floor, a fraction of the mean score, in (0, 1].
        floor: f64,
    },
}

impl SamplerChoice {
    /// The sampler, seeded by `seed`.
    ///
    /// # Errors
    /// [`LisaError::InvalidConfig`](crate::LisaError::InvalidConfig) for invalid weights.
    pub fn build(&self, seed: u64) -> crate::Result<Box<dyn BlockSampler>> {
        Ok(match self {
            Self::Uniform => Box::new(UniformSampler::new(seed)),
            Self::Ordered(order) => Box::new(OrderedSampler::new(*order, seed)),
            Self::Weighted(w) => Box::new(WeightedSampler::new(w.clone(), seed)?),
            Self::GradNorm { beta, floor } => Box::new(GradNormSampler::new(*beta, *floor, seed)),
        })
    }
}

/// Parses a command-line name: `uniform`, `ascending`, `descending`, `reshuffle`, `gradnorm`
/// (β 0.9, floor 0.1) or `weighted:W0,W1,…`.
///
/// ```
/// use candle_lisa::optim::SamplerChoice;
/// assert_eq!("weighted:1,2".parse::<SamplerChoice>(), Ok(SamplerChoice::Weighted(vec![1.0, 2.0])));
/// assert!("sgd".parse::<SamplerChoice>().is_err());
/// ```
impl std::str::FromStr for SamplerChoice {
    type Err = String;

    fn from_str(name: &str) -> std::result::Result<Self, String> {
        Ok(match name {
            "uniform" => Self::Uniform,
            "ascending" => Self::Ordered(Order::Ascending),
            "descending" => Self::Ordered(Order::Descending),
            "reshuffle" => Self::Ordered(Order::Reshuffle),
            "gradnorm" => Self::GradNorm {
                beta: 0.9,
                floor: 0.1,
            },
            other => match other.strip_prefix("weighted:") {
                Some(list) => Self::Weighted(
                    list.split(',')
                        .map(|w| w.trim().parse::<f64>().map_err(|e| format!("{w:?}: {e}")))
                        .collect::<std::result::Result<_, _>>()?,
                ),
                None => {
                    return Err(format!(
                        "unknown sampler {other:?}: choose uniform, ascending, descending, \
                         reshuffle, gradnorm or weighted:W0,W1,…"
                    ))
                }
            },
        })
    }
}

/// LISA's own settings; the AdamW ones are [`candle_nn::ParamsAdamW`].
///
/// ```
/// use candle_lisa::LisaConfig;
/// let config = LisaConfig { gamma: 4, period: 50, ..Default::default() };
/// assert_eq!(config.block_pattern, candle_lisa::optim::LLAMA_BLOCK_PATTERN);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct LisaConfig {
    /// γ: how many blocks are trainable at a time. The paper uses 2 for 7B-class models.
    pub gamma: usize,
    /// K: the number of optimizer steps between two draws of the active blocks.
    pub period: usize,
    /// Seed of the block sampler (ChaCha8, so the sequence of draws is the same on every
    /// platform and build).
    pub seed: u64,
    /// Which blocks each draw picks: uniformly at random (the paper's default), in BAdam's
    /// orders, by fixed weights, or by gradient norm. A sampler of your own goes through
    /// [`LisaAdamW::with_sampler`](crate::LisaAdamW::with_sampler).
    pub sampler: SamplerChoice,
    /// Where the block index sits in a parameter name: the text before `{i}` must start the
    /// name, a decimal index follows, then the text after `{i}`. See [`LLAMA_BLOCK_PATTERN`] and
    /// [`GPT2_BLOCK_PATTERN`]. Every parameter that is not in a block (embedding, LM head, final
    /// norm) is always trainable.
    pub block_pattern: String,
    /// Name prefixes of parameters to train at every step even though they sit in a block.
    pub always_trainable: Vec<String>,
    /// Name prefixes of parameters never to train (no gradient use, no state).
    pub never_trainable: Vec<String>,
    /// Whether the input embedding ([`EMBEDDING_PREFIXES`]) trains at every step, as in the
    /// paper (default), or stays frozen. Frozen, it takes no gradient and no state, and the
    /// backward pass ends at the lowest active block: nothing below it tracks gradients, so
    /// candle keeps no activations there and runs no backward through it. With tied
    /// embeddings (no separate head, [`HEAD_PREFIXES`]) the embedding is the head and follows
    /// [`LisaConfig::train_head`] instead.
    pub train_embedding: bool,
    /// Whether the LM head ([`HEAD_PREFIXES`], or the embedding when tied) trains at every
    /// step (default) or stays frozen.
    pub train_head: bool,
    /// Recompute frozen blocks in the backward pass instead of keeping their activations
    /// (default off). A model built with [`Llama::from_plan`](crate::Llama::from_plan) from
    /// [`LisaAdamW::plan`](crate::LisaAdamW::plan)
    /// then runs each frozen block through [`recompute`](crate::nn::recompute::recompute): it keeps
    /// only the block's input, and pays one more forward of the block in the backward pass.
    /// Your own model reads it from [`TrainingPlan::recompute_frozen`](crate::TrainingPlan).
    pub recompute_frozen: bool,
}

impl Default for LisaConfig {
    /// γ = 2 and period 20, the official implementation's defaults; Llama block names.
    fn default() -> Self {
        Self {
            gamma: 2,
            period: 20,
            seed: 0,
            sampler: SamplerChoice::Uniform,
            block_pattern: LLAMA_BLOCK_PATTERN.to_string(),
            always_trainable: Vec::new(),
            never_trainable: Vec::new(),
            train_embedding: true,
            train_head: true,
            recompute_frozen: false,
        }
    }
}
