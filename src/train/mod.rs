//! Training around the optimizer: a [`Trainer`] for full fine-tuning, LoRA or LISA with
//! gradient accumulation, clipping and a non-finite guard; learning-rate [`schedule`]s;
//! evaluation ([`eval_loss`], [`exact_match`]); crash-safe [`checkpoint`]s; metrics sinks; and
//! whole runs described by a config ([`recipe`]), as the `candle-lisa` command runs them.
//!
//! Everything here is optional: [`LisaAdamW`](crate::LisaAdamW) in a loop of your own loses
//! nothing.

pub mod checkpoint;
mod eval;
mod finetune;
mod fit;
pub mod metrics;
pub mod recipe;
pub mod schedule;
mod trainer;

pub use checkpoint::Checkpointer;
pub use eval::{eval_loss, exact_match};
pub use finetune::{owlore_weights, LlamaFineTune, Method};
pub use fit::{FitEvent, FitOptions, FitSummary};
pub use metrics::{read_jsonl, JsonlSink, MetricsSink, TensorBoardSink};
pub use schedule::{Constant, Cosine, LinearDecay, LrSchedule};
pub use trainer::{CausalLm, StepReport, Trainer, TrainerConfig, OPTIMIZER, TRAINER, WEIGHTS};
