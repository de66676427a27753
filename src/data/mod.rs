//! Training data: tokenizers, chat templates, [`Example`]s and padded [`Batch`]es, the order
//! examples are drawn in ([`StepSampler`]), and the [`Dataset`]s of the bundled tasks and of
//! text, prompt/response and chat files.
//!
//! Nothing here names a model or an optimizer: a model takes a [`Batch`]'s ids and labels.

pub mod chat;
mod example;
mod order;
mod sources;
pub mod tokenizer;

pub use example::{pack_examples, pad_batch, read_prompt_response_jsonl, Batch, Example};
pub use order::StepSampler;
pub use sources::{tokenizer_for, DataFormat, Dataset, Task};
