//! What candle-lisa's tests, benches and examples share, as one crate instead of files pulled
//! in with `#[path]`: the counting [`alloc`]ator of the memory figures, [`gpt2`] written the
//! way a candle user writes a model, the [`training`] set-ups the reports and benches
//! compare, and the process settings of CPU training ([`setup`]). Not published.

pub use candle_lisa::cli::{alloc, keep_freed_memory, set_thread_count, setup};
pub mod gpt2;
pub mod training;
