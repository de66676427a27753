//! Soak report: optimizer state and process memory over 10,000 LISA steps that redraw the
//! active blocks at every step.
//!
//! ```text
//! cargo run --release --example soak -- [--steps 10000] [--every 500] [--keep-state]
//! ```
//!
//! Trains the bundled tiny checkpoint with γ = 2 and period 1 (the most resampling there can
//! be) on windows of the bundled corpus, and prints the optimizer's state bytes and the
//! process's resident memory (`VmRSS` from `/proc/self/status`, Linux) at steps 1, 2, 4, … and
//! then every `--every` steps,
//! as a table on stderr and JSON lines on stdout. `--keep-state` emulates the official
//! implementation's optimizer, which keeps AdamW moments for every parameter that was ever
//! trainable: besides `LisaAdamW`'s own state, it holds two zero tensors the size of each
//! parameter from its first activation on, and never frees them.

#[path = "common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_lisa::data::tokenizer::{ByteTokenizer, TextTokenizer};
use candle_lisa::data::{pad_batch, Example};
use candle_lisa::{load_llama, LisaAdamW, LisaConfig, Llama};
use candle_nn::{Optimizer, ParamsAdamW};
use clap::Parser;
use rand::{Rng, SeedableRng};

#[derive(Parser, Debug)]
#[command(about = "Optimizer state and RSS over many LISA steps with period 1")]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    steps: usize,
    /// Report every this many steps.
    #[arg(long, default_value_t = 500)]
    every: usize,
    /// Emulate an optimizer that keeps the moments of every parameter ever trained.
    #[arg(long)]
    keep_state: bool,
}

/// Resident memory of this process in bytes (Linux; 0 elsewhere).
fn rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok());
    kb.unwrap_or(0) * 1024
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    common::setup();
    let args = Args::parse();
    let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets");
    let (config, varmap) = load_llama(assets.join("tiny-llama"), DType::F32, &Device::Cpu)?;
    let corpus = ByteTokenizer.encode(&std::fs::read_to_string(assets.join("corpus.txt"))?)?;
    let lisa = LisaConfig {
        gamma: 2,
        period: 1,
        seed: 1,
        ..Default::default()
    };
    let params = ParamsAdamW {
        lr: 1e-4,
        ..Default::default()
    };
    let mut opt = LisaAdamW::new(&varmap, params, lisa)?;
    let mut model = Llama::from_plan(&config, &opt.plan())?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let mut kept: HashMap<String, (Tensor, Tensor)> = HashMap::new();
    eprintln!(
        "{:>7} {:>12} {:>12} {:>10} {:>8}",
        "step", "state MB", "kept MB", "RSS MB", "loss"
    );
    for step in 1..=args.steps {
        let windows: Vec<Example> = (0..2)
            .map(|_| {
                let s = rng.random_range(0..corpus.len() - 64);
                Example::text(corpus[s..s + 64].to_vec())
            })
            .collect();
        let batch = pad_batch(&windows, 0, None, &Device::Cpu)?;
        let loss = model.loss(&batch.ids, &batch.labels)?;
        let value = loss.to_scalar::<f32>()?;
        opt.backward_step(&loss)?;
        drop(loss);
        model = Llama::from_plan(&config, &opt.plan())?;
        if args.keep_state {
            for (name, var) in opt.trainable_vars() {
                if !kept.contains_key(name) {
                    let zeros = var.as_tensor().zeros_like()?;
                    kept.insert(name.to_string(), (zeros.clone(), zeros.zeros_like()?));
                }
            }
        }
        if step % args.every == 0 || step.is_power_of_two() && step < args.every {
            let kept_bytes: usize = kept.values().map(|(m, _)| 2 * m.elem_count() * 4).sum();
            let (state, rss) = (opt.state_bytes(), rss());
            let mb = |b: usize| b as f64 / 1e6;
            eprintln!(
                "{step:>7} {:>12.2} {:>12.2} {:>10.1} {value:>8.3}",
                mb(state),
                mb(kept_bytes),
                mb(rss)
            );
            println!(
                "{}",
                serde_json::json!({"step": step, "state_bytes": state, "kept_bytes": kept_bytes,
                    "rss_bytes": rss, "loss": value, "keep_state": args.keep_state})
            );
        }
    }
    Ok(())
}
