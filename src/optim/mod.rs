//! The optimizers: [`AdamW`], a lean AdamW over named variables that keeps state only for
//! what is trainable, and [`LisaAdamW`], that AdamW plus LISA's block schedule: the block
//! [`sampler`]s, the [`BlockMap`] from parameter names to blocks, and optimizer state I/O.

mod adamw;
mod block_map;
mod config;
mod lisa;
mod outliers;
pub mod precision;
pub mod sampler;
mod state;
mod update;

pub use adamw::{AdamW, GradScaling, ParamState};
pub use block_map::{BlockMap, BlockPattern, ParamRole};
pub use config::{
    LisaConfig, SamplerChoice, EMBEDDING_PREFIXES, GPT2_BLOCK_PATTERN, HEAD_PREFIXES,
    LLAMA_BLOCK_PATTERN,
};
pub use lisa::{LisaAdamW, LisaParams, Mode};
pub use outliers::outlier_ratios;
pub use precision::{CompactState, LossScaler, NonFinite};
pub use sampler::{
    BlockSampler, GradNormSampler, Order, OrderedSampler, UniformSampler, WeightedSampler,
};
pub use state::{STATE_JSON_FILE, STATE_TENSORS_FILE};

/// The transformers convention for weight decay: no decay on biases and norm weights (every
/// 1-D parameter) nor on embeddings (names containing `embed`, and GPT-2's `wte`/`wpe`).
/// Pass it to [`LisaAdamW::set_weight_decay_filter`].
///
/// ```
/// use candle_lisa::optim::no_decay_default;
/// assert!(no_decay_default("model.layers.0.input_layernorm.weight", &[576]));
/// assert!(no_decay_default("model.embed_tokens.weight", &[49152, 576]));
/// assert!(!no_decay_default("model.layers.0.mlp.up_proj.weight", &[1536, 576]));
/// ```
pub fn no_decay_default(name: &str, dims: &[usize]) -> bool {
    dims.len() <= 1 || name.contains("embed") || name.contains(".wte.") || name.contains(".wpe.")
}
