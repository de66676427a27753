//! Model families with Hugging Face names and checkpoint I/O, built from a
//! [`TrainingPlan`](crate::nn::TrainingPlan), and tokenizers.

pub mod checkpoint;
pub mod gguf;
pub mod hub;
pub mod llama;
pub mod rope;

pub use checkpoint::{load_llama, save_llama, save_llama_with, SaveOptions, TOKENIZER_FILES};
pub use gguf::load_gguf;
pub use llama::{Llama, LlamaConfig, Sampling};
pub use rope::{Rope, RopeScaling};
