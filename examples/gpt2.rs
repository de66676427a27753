//! Fine-tunes a GPT-2 (Hugging Face layout) with LISA and with full AdamW, and reports each
//! method's loss and peak memory.
//!
//! ```text
//! cargo run --release --example gpt2 -- [--model DIR] [--steps 200] [--gamma 2] [--period 10]
//! ```
//!
//! The model is written the way a candle user writes one (`testkit/src/gpt2.rs`),
//! with candle-lisa's differentiable `LayerNorm` and `Linear`, and trained with
//! `GPT2_BLOCK_PATTERN` (`transformer.h.{i}.`): the model is rebuilt from
//! `LisaAdamW::var_builder()` after each resample. Without `--model` it writes a small random
//! GPT-2 (6 blocks, width 128, byte vocabulary) to `<out>/tiny-gpt2` and trains it on the
//! bundled corpus, offline. With `--model`, the directory needs `config.json`,
//! `model.safetensors` and, for a non-byte vocabulary, `tokenizer.json`. Its forward pass and
//! gradients match transformers' `GPT2LMHeadModel` (`tests/suite/gpt2.rs`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_lisa::data::tokenizer::{ByteTokenizer, HfTokenizer, TextTokenizer};
use candle_lisa::optim::GPT2_BLOCK_PATTERN;
use candle_lisa::{LisaAdamW, LisaConfig};
use candle_nn::{Optimizer, ParamsAdamW, VarBuilder, VarMap};
use clap::Parser;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[path = "common/mod.rs"]
mod common;

use candle_lisa_testkit::alloc;

use candle_lisa_testkit::gpt2 as gpt2_model;

use gpt2_model::{Gpt2, Gpt2Config};

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

type Error = Box<dyn std::error::Error>;

#[derive(Parser, Debug)]
#[command(about = "Fine-tune a GPT-2 with LISA and full AdamW")]
struct Args {
    /// A GPT-2 directory in Hugging Face's layout (default: a small random one).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Training text (default: the bundled corpus).
    #[arg(long)]
    data: Option<PathBuf>,
    #[arg(long, default_value_t = 200)]
    steps: usize,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value_t = 64)]
    seq_len: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// LISA: blocks trained at a time.
    #[arg(long, default_value_t = 2)]
    gamma: usize,
    /// LISA: steps between draws.
    #[arg(long, default_value_t = 10)]
    period: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value = "runs/gpt2")]
    out: PathBuf,
}

/// `count` windows of `len + 0` tokens from `ids`, drawn with a seeded generator.
fn windows(ids: &[u32], len: usize, count: usize, rng: &mut ChaCha8Rng) -> Result<Tensor, Error> {
    let rows: Vec<Vec<u32>> = (0..count)
        .map(|_| {
            let start = rng.random_range(0..ids.len() - len);
            ids[start..start + len].to_vec()
        })
        .collect();
    Ok(Tensor::new(rows, &Device::Cpu)?)
}

/// Trains `method` (`lisa` or `full`) from the weights in `dir` and returns its summary.
fn train(
    method: &str,
    args: &Args,
    dir: &Path,
    train: &[u32],
    eval: &Tensor,
) -> Result<serde_json::Value, Error> {
    let base = alloc::reset_peak();
    let (config, vars) = gpt2_model::load(dir, DType::F32, &Device::Cpu)?;
    let params = ParamsAdamW {
        lr: args.lr,
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut opt = match method {
        "full" => LisaAdamW::all_trainable(candle_lisa::nn::named_vars(&vars)?, params)?,
        _ => {
            let lisa = LisaConfig {
                gamma: args.gamma,
                period: args.period,
                seed: args.seed,
                block_pattern: GPT2_BLOCK_PATTERN.into(),
                ..Default::default()
            };
            LisaAdamW::new(&vars, params, lisa)?
        }
    };
    let eval_loss =
        |model: &Gpt2| -> Result<f32, Error> { Ok(model.loss(eval)?.to_scalar::<f32>()?) };
    let frozen = Gpt2::new(&config, candle_lisa::nn::frozen_var_builder(&vars)?)?;
    let before = eval_loss(&frozen)?;
    drop(frozen);
    let mut model = Gpt2::new(&config, opt.var_builder())?;
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let started = Instant::now();
    let mut last = f32::NAN;
    for step in 1..=args.steps {
        let batch = windows(train, args.seq_len, args.batch_size, &mut rng)?;
        let loss = model.loss(&batch)?;
        last = loss.to_scalar::<f32>()?;
        opt.backward_step(&loss)?;
        if opt.resampled() {
            model = Gpt2::new(&config, opt.var_builder())?;
        }
        if step % 50 == 0 {
            println!("{method:>5} step {step:4}: train loss {last:.3}");
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let after = eval_loss(&Gpt2::new(
        &config,
        candle_lisa::nn::frozen_var_builder(&vars)?,
    )?)?;
    Ok(serde_json::json!({
        "method": method, "steps": args.steps, "eval_loss_before": before,
        "eval_loss_after": after, "last_train_loss": last, "seconds": seconds,
        "peak_heap_bytes": alloc::peak() - base, "trainable_params": opt.trainable_params(),
        "state_bytes": opt.state_bytes(),
    }))
}

fn main() -> Result<(), Error> {
    common::setup();
    let args = Args::parse();
    if args.steps == 0 || args.batch_size == 0 || args.seq_len < 2 {
        return Err("--steps and --batch-size must be at least 1, --seq-len at least 2".into());
    }
    let dir = match &args.model {
        Some(dir) => dir.clone(),
        None => {
            let dir = args.out.join("tiny-gpt2");
            let config = Gpt2Config::tiny(ByteTokenizer::VOCAB_SIZE);
            let vars = VarMap::new();
            Gpt2::new(
                &config,
                VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu),
            )?;
            gpt2_model::save(&dir, &config, &vars)?;
            dir
        }
    };
    let config = Gpt2Config::from_file(&dir.join("config.json"))?;
    if args.seq_len > config.n_positions {
        return Err(format!(
            "--seq-len {} exceeds the model's n_positions {}",
            args.seq_len, config.n_positions
        )
        .into());
    }
    let tok: Box<dyn TextTokenizer> = match dir.join("tokenizer.json") {
        p if p.is_file() => Box::new(HfTokenizer::from_file(p)?),
        _ => Box::new(ByteTokenizer),
    };
    if tok.vocab_size() > config.vocab_size {
        return Err("the tokenizer has more ids than the model's vocabulary".into());
    }
    let data = args
        .data
        .clone()
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/corpus.txt"));
    let ids = tok.encode(&std::fs::read_to_string(&data)?)?;
    let split = ids.len() * 9 / 10;
    if split < args.seq_len + 1 || ids.len() - split < args.seq_len + 1 {
        return Err(format!("{} is too short for --seq-len", data.display()).into());
    }
    let mut rng = ChaCha8Rng::seed_from_u64(u64::MAX - args.seed);
    let eval = windows(&ids[split..], args.seq_len, 16, &mut rng)?;
    let mut summaries = Vec::new();
    for method in ["lisa", "full"] {
        summaries.push(train(method, &args, &dir, &ids[..split], &eval)?);
    }
    println!(
        "\n{:<6} {:>10} {:>10} {:>9} {:>11} {:>12} {:>10}",
        "method", "eval before", "eval after", "time", "peak heap", "trainable", "opt. state"
    );
    for s in &summaries {
        println!(
            "{:<6} {:>10.3} {:>10.3} {:>8.1}s {:>8.1} MB {:>12} {:>7.1} MB",
            s["method"].as_str().unwrap_or_default(),
            s["eval_loss_before"].as_f64().unwrap_or(f64::NAN),
            s["eval_loss_after"].as_f64().unwrap_or(f64::NAN),
            s["seconds"].as_f64().unwrap_or(f64::NAN),
            s["peak_heap_bytes"].as_f64().unwrap_or(f64::NAN) / 1e6,
            s["trainable_params"],
            s["state_bytes"].as_f64().unwrap_or(f64::NAN) / 1e6,
        );
    }
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(
        args.out.join("summary.json"),
        serde_json::to_string_pretty(&summaries)? + "\n",
    )?;
    Ok(())
}
