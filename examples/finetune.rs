//! Fine-tune a Llama-family model with LISA, LoRA or full AdamW, side by side: the
//! `candle-lisa finetune` command (see [`candle_lisa::cli`]), runnable without installing it.
//!
//! `cargo run --release --example finetune` fine-tunes the bundled tiny checkpoint on a
//! bundled task (sorting five digits: prompt `31415=`, answer `11345`, exact match on 200
//! held-out problems; `--task add` for two-digit addition) with all three methods, and writes
//! `run.json`, `metrics.jsonl`, `summary.json`, `loss.png`, the fine-tuned models and
//! crash-safe checkpoints under `--out` (default `runs/finetune`). `--config run.toml` reads
//! the settings from a run file (flags override its keys); `--help` lists them. Everything
//! but the command line, the progress bar and the plot is the library's
//! [`train::recipe`](candle_lisa::train::recipe). Peak memory is the peak of live heap bytes,
//! counted by the global allocator below (CPU); on CUDA it is device memory.
//!
//! Data-parallel, `--dist mpi` (built with `--features mpi`) runs one rank per process under
//! `mpirun -n N`, and `--dist nccl` (built with `--features nccl`) one per GPU; each rank
//! trains on its share of every batch, and rank 0 alone prints, evaluates and writes.

use candle_lisa::cli::{alloc, setup, FinetuneCommand};

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

fn main() {
    setup();
    let cmd = FinetuneCommand::try_parse_from(std::env::args_os()).unwrap_or_else(|e| e.exit());
    std::process::exit(match cmd.run() {
        Ok(_) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            2
        }
    })
}

#[cfg(test)]
#[path = "common/finetune_tests.rs"]
mod tests;
