//! The optimizer: [`LisaAdamW`], its AdamW update, the block [`sampler`]s, the [`LayerMap`]
//! from parameter names to blocks, and optimizer state I/O.

mod adamw;
mod config;
mod layer_map;
mod lisa;
pub mod precision;
pub mod sampler;
mod state;

pub use config::{LisaConfig, GPT2_BLOCK_PATTERN, LLAMA_BLOCK_PATTERN};
pub use layer_map::{BlockPattern, LayerMap, ParamGroup};
pub use lisa::{LisaAdamW, LisaParams, Mode, ParamState};
pub use precision::{LossScaler, NonFinite};
pub use sampler::{BlockSampler, UniformSampler};
pub use state::{STATE_JSON_FILE, STATE_TENSORS_FILE};
