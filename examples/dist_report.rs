//! What data-parallel training sends: the gradient bytes each rank all-reduces per step, for
//! full fine-tuning, LoRA-16 and LISA (γ = 1, 2, 4), measured and computed.
//!
//! ```sh
//! cargo build --release --features mpi --example dist_report
//! mpirun -n 2 target/release/examples/dist_report
//! ```
//!
//! Under MPI it trains each method for `--steps` steps on each shape of the memory report,
//! with random weights and tokens, and takes the bytes from the trainer's
//! [`StepReport::all_reduced_bytes`](candle_lisa::train::StepReport::all_reduced_bytes); it
//! checks that they are the trainable bytes. Then it computes, from the tensor shapes alone,
//! the same for Llama-2-7B and Llama-3-8B, where no weights are needed. Rank 0 prints a
//! Markdown table and writes JSON lines to `--json`.

use candle_lisa_testkit::training;

use std::rc::Rc;

use candle_core::{DType, Device};
use candle_lisa::data::{pad_batch, Example};
use candle_lisa::dist::{Communicator, Mpi};
use candle_lisa::nn::LORA_TARGETS;
use candle_lisa::optim::LLAMA_BLOCK_PATTERN;
use candle_lisa::train::{Constant, LlamaFineTune, Method, TrainerConfig};
use candle_lisa::{LisaConfig, Llama, LlamaConfig, LoraConfig};
use candle_nn::{ParamsAdamW, VarBuilder, VarMap};
use clap::Parser;
use serde_json::json;

type Error = Box<dyn std::error::Error>;

/// Gradient bytes all-reduced per step, by method and shape.
#[derive(Parser, Debug)]
#[command(about)]
struct Args {
    /// Shapes to measure (comma-separated; see the memory report).
    #[arg(long, default_value = "tiny,llama2-7b-scaled,smollm2-135m")]
    shapes: String,
    /// Steps per method (each checked).
    #[arg(long, default_value_t = 2)]
    steps: usize,
    /// Tokens per sequence (one sequence per rank).
    #[arg(long, default_value_t = 64)]
    seq_len: usize,
    /// Where rank 0 writes one JSON line per row.
    #[arg(long, default_value = "runs/dist_report.jsonl")]
    json: std::path::PathBuf,
}

const METHODS: [&str; 5] = ["full", "lora16", "lisa1", "lisa2", "lisa4"];

fn method(name: &str) -> Method {
    match name {
        "full" => Method::Full,
        "lora16" => Method::Lora(
            LoraConfig {
                rank: 16,
                alpha: 32.0,
                ..Default::default()
            },
            0,
        ),
        lisa => Method::Lisa(LisaConfig {
            gamma: lisa[4..].parse().unwrap_or(2),
            period: 1000,
            ..Default::default()
        }),
    }
}

/// Trains `name` on `shape` for `steps` steps; returns the bytes sent per step (the same at
/// every step, or an error).
fn measure(
    comm: &Rc<Mpi>,
    config: &LlamaConfig,
    name: &str,
    args: &Args,
) -> Result<(usize, usize), Error> {
    let dev = Device::Cpu;
    let base = VarMap::new();
    Llama::new(config, VarBuilder::from_varmap(&base, DType::F32, &dev))?;
    let schedule = Constant {
        lr: 1e-4,
        warmup: 0,
    };
    let params = ParamsAdamW {
        lr: 1e-4,
        ..Default::default()
    };
    let mut run = LlamaFineTune::new(
        config.clone(),
        base,
        method(name),
        params,
        schedule,
        TrainerConfig::default(),
    )?;
    run.trainer.set_communicator(Box::new(comm.clone()))?;
    let mut sent = None;
    for step in 0..args.steps {
        let trainable = run.trainer.optimizer().trainable_bytes();
        let ids: Vec<u32> = (0..args.seq_len)
            .map(|i| ((i * 31 + comm.rank() * 7 + step) % config.vocab_size) as u32)
            .collect();
        let batch = pad_batch(&[Example::text(ids)], 0, None, &dev)?;
        let report = run.trainer.step(&[batch])?;
        if report.all_reduced_bytes != trainable || sent.is_some_and(|s| s != trainable) {
            return Err(format!(
                "{name}: step {step} sent {} bytes, the trainable bytes are {trainable}",
                report.all_reduced_bytes
            )
            .into());
        }
        sent = Some(trainable);
    }
    let params = run.trainer.optimizer().trainable_params();
    Ok((sent.unwrap_or(0), params))
}

/// Parameters a method trains, from the tensor shapes alone: everything (full), the LoRA
/// adapters of rank 16 on the seven projections, or everything outside the blocks plus γ
/// blocks (Llama blocks are all the same size).
fn computed(config: &LlamaConfig, name: &str) -> usize {
    let shapes = config.tensor_shapes();
    let count = |s: &Vec<usize>| s.iter().product::<usize>();
    let block = LLAMA_BLOCK_PATTERN
        .split("{i}")
        .next()
        .unwrap_or("model.layers.");
    match name {
        "full" => shapes.iter().map(|(_, s)| count(s)).sum(),
        "lora16" => shapes
            .iter()
            .filter(|(n, _)| {
                LORA_TARGETS
                    .iter()
                    .any(|t| n.ends_with(&format!("{t}.weight")))
            })
            .map(|(_, s)| 16 * (s[0] + s[1]))
            .sum(),
        lisa => {
            let gamma: usize = lisa[4..].parse().unwrap_or(2);
            let outside: usize = shapes
                .iter()
                .filter(|(n, _)| !n.starts_with(block))
                .map(|(_, s)| count(s))
                .sum();
            let first = format!("{block}0.");
            let one_block: usize = shapes
                .iter()
                .filter(|(n, _)| n.starts_with(&first))
                .map(|(_, s)| count(s))
                .sum();
            outside + gamma * one_block
        }
    }
}

fn real_shapes() -> Vec<(&'static str, LlamaConfig)> {
    let mut llama2 = LlamaConfig::tiny(32000, 4096, 32, 32, 32);
    llama2.intermediate_size = 11008;
    let mut llama3 = LlamaConfig::tiny(128256, 4096, 32, 32, 8);
    llama3.intermediate_size = 14336;
    for c in [&mut llama2, &mut llama3] {
        c.tie_word_embeddings = false;
    }
    vec![("llama2-7b", llama2), ("llama3-8b", llama3)]
}

fn main() -> Result<(), Error> {
    let args = Args::parse();
    let comm = Rc::new(Mpi::init()?);
    let root = comm.rank() == 0;
    let mut rows = Vec::new();
    for shape in args.shapes.split(',').filter(|s| !s.is_empty()) {
        let config = training::shape_config(shape)?;
        for name in METHODS {
            let (bytes, params) = measure(&comm, &config, name, &args)?;
            if params != computed(&config, name) {
                return Err(format!(
                    "{shape} {name}: {params} trainable, computed {}",
                    computed(&config, name)
                )
                .into());
            }
            rows.push(json!({"shape": shape, "method": name, "trainable_params": params,
                "bytes_per_step": bytes, "dtype": "f32", "source": "measured", "ranks": comm.world_size()}));
        }
    }
    for (shape, config) in real_shapes() {
        for name in METHODS {
            let params = computed(&config, name);
            rows.push(
                json!({"shape": shape, "method": name, "trainable_params": params,
                "bytes_per_step": 2 * params, "dtype": "bf16", "source": "computed"}),
            );
        }
    }
    if !root {
        return Ok(());
    }
    if let Some(dir) = args.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let lines: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
    std::fs::write(&args.json, lines.join("\n") + "\n")?;
    println!("| shape | method | trainable parameters | all-reduced per step | vs full | source |");
    println!("|---|---|---|---|---|---|");
    for row in &rows {
        let full = rows
            .iter()
            .find(|r| r["shape"] == row["shape"] && r["method"] == "full")
            .and_then(|r| r["bytes_per_step"].as_f64())
            .unwrap_or(f64::NAN);
        let bytes = row["bytes_per_step"].as_f64().unwrap_or(f64::NAN);
        println!(
            "| {} | {} | {} | {:.1} MB ({}) | {:.3}× | {} |",
            row["shape"].as_str().unwrap_or(""),
            row["method"].as_str().unwrap_or(""),
            row["trainable_params"],
            bytes / 1e6,
            row["dtype"].as_str().unwrap_or(""),
            bytes / full,
            row["source"].as_str().unwrap_or("")
        );
    }
    Ok(())
}
