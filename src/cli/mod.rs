//! The `candle-lisa` command (feature `cli`): fine-tuning runs from a config file, generation,
//! evaluation, LoRA merging and memory planning, on the library's [`train::recipe`](crate::train::recipe).
//!
//! ```text
//! cargo install candle-lisa --features cli
//! candle-lisa finetune --config run.toml [--steps 100 …]   # flags override the file's keys
//! candle-lisa eval --model runs/finetune/lisa/model --task sort
//! candle-lisa generate --model runs/finetune/lisa/model --prompt "31415="
//! candle-lisa merge --base BASE_DIR --adapter runs/finetune/lora/adapter --out merged
//! candle-lisa plan --config path/to/model --seq-len 2048 --frozen-storage nf4
//! ```
//!
//! Each subcommand is a [`Command`]; [`run_from`] runs a command line and [`main`] is the
//! binary's `main`. The [`alloc`] counter and [`setup`] are what the binary (and the
//! crate's examples) measure and run with.

pub mod alloc;
mod finetune;
mod models;
pub mod peak;
mod plan;
mod plot;

use std::ffi::OsString;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

pub use finetune::FinetuneCommand;
pub use models::{GenerateCommand, MergeCommand};
pub use plan::PlanCommand;

/// What a command returns on failure.
pub type Error = Box<dyn std::error::Error>;

/// `candle-lisa`: LISA, LoRA and full fine-tuning of Llama-family models on candle.
#[derive(Parser, Debug)]
#[command(name = "candle-lisa", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Fine-tune with LISA, LoRA or full AdamW, from a run file and/or flags.
    Finetune(FinetuneCommand),
    /// The held-out loss and exact-match accuracy of a model on a run's data (no training).
    Eval(FinetuneCommand),
    /// Continue a prompt with a model.
    Generate(GenerateCommand),
    /// Fold a PEFT LoRA adapter into its base model and save a Hugging Face checkpoint.
    Merge(MergeCommand),
    /// Predict the memory of a training step per method, without loading weights.
    Plan(PlanCommand),
}

/// Parses `args` (the program name first) and runs the command.
///
/// # Errors
/// clap's for a bad command line (its `Display` is the usage message), and the command's.
pub fn run_from<I, T>(args: I) -> Result<(), Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let matches = Cli::command().try_get_matches_from(args)?;
    let mut cli = Cli::from_arg_matches(&matches)?;
    match &mut cli.command {
        Command::Finetune(cmd) | Command::Eval(cmd) => {
            if let Some((_, sub)) = matches.subcommand() {
                cmd.note_given(sub);
            }
        }
        _ => {}
    }
    match cli.command {
        Command::Finetune(cmd) => cmd.run().map(drop),
        Command::Eval(cmd) => cmd.eval(),
        Command::Generate(cmd) => cmd.run(),
        Command::Merge(cmd) => cmd.run(),
        Command::Plan(cmd) => cmd.run(),
    }
}

/// The binary: [`setup`], then the command line, exiting with 2 (after printing the error)
/// when it fails.
pub fn main() -> ! {
    setup();
    let code = match run_from(std::env::args_os()) {
        Ok(()) => 0,
        Err(e) => match e.downcast_ref::<clap::Error>() {
            Some(clap) => clap.exit(),
            None => {
                eprintln!("error: {e}");
                2
            }
        },
    };
    std::process::exit(code)
}

/// Process-wide settings for CPU training; call first thing in `main`, before any thread
/// starts.
///
/// - [`keep_freed_memory`].
/// - candle 0.11.1 works out its thread count on every CPU matmul, reading `/proc/cpuinfo`
///   each time, unless `RAYON_NUM_THREADS` is set. Setting the variable to the machine's
///   parallelism (when the user has not set it) skips that; compare
///   `RAYON_NUM_THREADS= perf record` of a fine-tune with and without it.
pub fn setup() {
    keep_freed_memory();
    set_thread_count();
}

/// Sets `RAYON_NUM_THREADS` to the machine's parallelism unless the user set it (see
/// [`setup`]); call before any thread starts.
pub fn set_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// Keeps freed memory in the process instead of returning it to the OS.
///
/// glibc's malloc serves large blocks with fresh `mmap`s and gives them back on free, so
/// candle's many parameter- and activation-sized temporaries are page-faulted in again at
/// every op (`perf` shows the page faults and TLB flushes). Raising the mmap and trim
/// thresholds makes malloc reuse the memory. It changes nothing on other platforms.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_THRESHOLD: i32 = -3;
        // SAFETY: mallopt only sets allocator tunables; called before any thread starts.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 32 << 20);
            mallopt(M_TRIM_THRESHOLD, i32::MAX);
        }
    }
}
