//! Building blocks for models that train with LISA: the frozen-aware [`Linear`], lean
//! differentiable [`ops`], [`quant`]ized storage for frozen weights, frozen-block
//! [`recompute`], LoRA adapters, the CUDA memory [`pool`]'s policy, and the
//! [`TrainingPlan`] a model is built from.
//!
//! Nothing here names an optimizer: a model learns which parameters train from the builder
//! of its [`TrainingPlan`].

pub mod calibrate;
pub(crate) mod custom_op;
pub(crate) mod kernels;
pub mod linear;
pub mod lora;
pub mod loss;
pub mod norm;
pub mod ops;
pub mod peft;
mod plan;
pub mod pool;
pub mod quant;
pub mod recompute;
mod var_builder;

pub use linear::{
    frozen_matmul, linear, linear_b, linear_no_bias, Linear, LinearWeight, LoraAdapter,
};
pub use lora::{merge_lora, merged_copy, seed_adapters, LoraConfig, LORA_TARGETS};
pub use norm::{layer_norm, rms_norm, LayerNorm, RmsNorm};
pub use ops::{rope, rope_i, softmax_last_dim};
pub use peft::{load_peft, save_peft, PeftAdapter};
pub use plan::TrainingPlan;
pub(crate) use var_builder::LisaBackend;
pub use var_builder::{frozen_var_builder, named_vars};
