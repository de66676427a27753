//! [`LisaConfig`]: how many blocks train, how often they change, and which names are blocks.

/// Hugging Face Llama, Mistral and Qwen block names: `model.layers.{i}.…`.
pub const LLAMA_BLOCK_PATTERN: &str = "model.layers.{i}.";

/// GPT-2 block names: `transformer.h.{i}.…`.
pub const GPT2_BLOCK_PATTERN: &str = "transformer.h.{i}.";

/// LISA's own settings; the AdamW ones are [`candle_nn::ParamsAdamW`].
///
/// ```
/// use candle_lisa::LisaConfig;
/// let config = LisaConfig { gamma: 4, period: 50, ..Default::default() };
/// assert_eq!(config.block_pattern, candle_lisa::LLAMA_BLOCK_PATTERN);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LisaConfig {
    /// γ: how many blocks are trainable at a time. The paper uses 2 for 7B-class models.
    pub gamma: usize,
    /// K: the number of optimizer steps between two draws of the active blocks.
    pub period: usize,
    /// Seed of the block sampler (ChaCha8, so the sequence of draws is the same on every
    /// platform and build).
    pub seed: u64,
    /// Where the block index sits in a parameter name: the text before `{i}` must start the
    /// name, a decimal index follows, then the text after `{i}`. See [`LLAMA_BLOCK_PATTERN`] and
    /// [`GPT2_BLOCK_PATTERN`]. Every parameter that is not in a block (embedding, LM head, final
    /// norm) is always trainable.
    pub block_pattern: String,
    /// Name prefixes of parameters to train at every step even though they sit in a block.
    pub always_trainable: Vec<String>,
    /// Name prefixes of parameters never to train (no gradient use, no state).
    pub never_trainable: Vec<String>,
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
            block_pattern: LLAMA_BLOCK_PATTERN.to_string(),
            always_trainable: Vec::new(),
            never_trainable: Vec::new(),
            recompute_frozen: false,
        }
    }
}
