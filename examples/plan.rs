//! The memory a training step needs, per method, predicted without loading weights: the
//! `candle-lisa plan` command.
//!
//! ```text
//! cargo run --release --example plan -- --shape llama3.1-8b [--config path/to/config.json]
//!     [--dtype bf16] [--seq-len 2048] [--batch-size 1] [--device cuda|cpu]
//!     [--frozen-storage dense|int8|nf4] [--methods full,lora16,lisa2,...]
//! ```

use candle_lisa::cli::PlanCommand;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Predicted memory of a training step, per method")]
struct Args {
    #[command(flatten)]
    plan: PlanCommand,
}

fn main() -> Result<(), candle_lisa::cli::Error> {
    Args::parse().plan.run()
}
