//! LISA (Layerwise Importance Sampled AdamW, [Pan et al. 2024](https://arxiv.org/abs/2403.17919))
//! for [candle](https://github.com/huggingface/candle).
//!
//! [`LisaAdamW`] trains the embedding, the LM head and the final norm at every step, and γ
//! transformer blocks that it redraws every K steps; AdamW state exists only for what is
//! trainable now. Build the model from [`LisaAdamW::var_builder`] and use [`Linear`] for its
//! projections, and frozen blocks cost neither weight gradients nor optimizer state.
//! [`Llama`] is a trainable Llama-family decoder built that way, [`load_llama`] and
//! [`save_llama`] read and write Hugging Face checkpoints, and [`LoraConfig`] with
//! [`Llama::with_lora`] and [`AdamW`] (the lean AdamW that `LisaAdamW` is built on) give the
//! LoRA and full fine-tuning baselines LISA is compared with. With
//! [`LisaConfig::recompute_frozen`](crate::LisaConfig::recompute_frozen), frozen blocks keep
//! no activations either: [`recompute`](crate::nn::recompute::recompute) runs them again in
//! the backward pass. The model's attention, norms, RoPE, SwiGLU and loss ([`nn::ops`]) keep
//! only their inputs and outputs in the graph. Half-precision models train correctly: the
//! optimizer keeps f32 master weights and moments for what trains
//! ([precision policy](optim::precision), [`LossScaler`](optim::LossScaler) for f16).
//!
//! The crate's modules, with dependencies pointing one way (each uses only those listed
//! below it):
//! - [`train`]: an optional [`Trainer`](train::Trainer) over any of them, the fine-tuning
//!   loop, schedules, evaluation and crash-safe checkpoints;
//! - [`plan`]: the memory planner, which predicts a step's memory per method from a config
//!   without loading weights;
//! - [`dist`]: data-parallel training over MPI or NCCL that sends only the trainable
//!   gradients, which the trainer uses;
//! - [`optim`]: [`AdamW`] and [`LisaAdamW`], the update, samplers, block map and state I/O;
//! - [`models`]: model families and Hugging Face checkpoint I/O;
//! - [`data`]: tokenizers, chat templates, examples, batches and datasets;
//! - [`nn`]: building blocks ([`Linear`], lean ops, losses, recompute, LoRA, the CPU
//!   kernels) and the [`TrainingPlan`] a model is built from, which [`LisaAdamW::plan`]
//!   produces;
//! - [`io`] and [`error`]: atomic writes and the error type.
//!
//! `optim`, `models` and `data` do not use each other: models and building blocks never name
//! the optimizer type.
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_nn::{embedding, Embedding, Optimizer, ParamsAdamW, VarBuilder, VarMap};
//! use candle_lisa::{linear_no_bias, Linear, LisaAdamW, LisaConfig};
//!
//! /// A toy decoder: embedding, four residual blocks, LM head, with Hugging Face names.
//! struct Model {
//!     embed: Embedding,
//!     blocks: Vec<Linear>,
//!     head: Linear,
//! }
//!
//! impl Model {
//!     fn new(vb: VarBuilder) -> candle_core::Result<Self> {
//!         let embed = embedding(16, 8, vb.pp("model.embed_tokens"))?;
//!         let blocks = (0..4)
//!             .map(|i| linear_no_bias(8, 8, vb.pp(format!("model.layers.{i}.mlp"))))
//!             .collect::<candle_core::Result<_>>()?;
//!         let head = linear_no_bias(8, 16, vb.pp("lm_head"))?;
//!         Ok(Self { embed, blocks, head })
//!     }
//!
//!     fn forward(&self, tokens: &Tensor) -> candle_core::Result<Tensor> {
//!         let mut x = self.embed.forward(tokens)?;
//!         for block in &self.blocks {
//!             x = (&x + block.forward(&x)?.tanh()?)?;
//!         }
//!         self.head.forward(&x)
//!     }
//! }
//!
//! let dev = Device::Cpu;
//! let varmap = VarMap::new();
//! Model::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev))?; // creates the weights
//!
//! let params = ParamsAdamW { lr: 1e-2, ..Default::default() };
//! let config = LisaConfig { gamma: 2, period: 5, ..Default::default() };
//! let mut opt = LisaAdamW::new(&varmap, params, config)?;
//! let mut model = Model::new(opt.var_builder())?;
//!
//! let tokens = Tensor::new(&[[1u32, 2, 3, 4, 5, 6, 7, 8]], &dev)?;
//! let (inputs, targets) = (tokens.narrow(1, 0, 7)?, tokens.narrow(1, 1, 7)?);
//! let mut losses = Vec::new();
//! for _ in 0..20 {
//!     let logits = model.forward(&inputs)?;
//!     let loss = candle_nn::loss::cross_entropy(&logits.flatten_to(1)?, &targets.flatten_all()?)?;
//!     losses.push(loss.to_scalar::<f32>()?);
//!     opt.backward_step(&loss)?;
//!     if opt.resampled() {
//!         model = Model::new(opt.var_builder())?; // new active blocks: rebuild, no copy
//!     }
//! }
//! assert_eq!(opt.active_blocks().len(), 2);
//! assert_eq!(opt.state_bytes(), 2 * opt.trainable_bytes());
//! assert!(losses[19] < losses[0]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]
#![deny(rustdoc::broken_intra_doc_links)]

#[cfg(feature = "cli")]
pub mod cli;
pub mod data;
pub mod dist;
pub mod error;
pub mod io;
pub mod models;
pub mod nn;
pub mod optim;
pub mod plan;
pub mod train;

pub use error::{LisaError, Result};
pub use models::{load_llama, save_llama, Llama, LlamaConfig};
pub use nn::loss::IGNORE_INDEX;
pub use nn::{
    layer_norm, linear, linear_b, linear_no_bias, rms_norm, LayerNorm, Linear, LoraConfig, RmsNorm,
    TrainingPlan,
};
pub use optim::{AdamW, LisaAdamW, LisaConfig};

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

#[cfg(doctest)]
#[doc = include_str!("../docs/finetuning.md")]
pub struct FinetuningGuideDoctests;

#[cfg(doctest)]
#[doc = include_str!("../docs/custom-models.md")]
pub struct CustomModelsGuideDoctests;

#[cfg(doctest)]
#[doc = include_str!("../docs/precision.md")]
pub struct PrecisionGuideDoctests;

#[cfg(doctest)]
#[doc = include_str!("../docs/distributed.md")]
pub struct DistributedGuideDoctests;
