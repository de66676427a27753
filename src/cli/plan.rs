//! `candle-lisa plan`: the memory a training step needs, per method, predicted without
//! loading weights. Prints one row per method (weights, gradients, optimizer state,
//! activations, peak, in GiB as cards are sized) and which 16/24/48/80 GB cards it fits with
//! 1 GiB left for the CUDA context; the model of bytes is [`crate::plan`]'s.

use std::path::PathBuf;

use crate::plan::{self, Backend, Setup, CARDS_GB};
use crate::LlamaConfig;

use super::Error;

/// `candle-lisa plan`: the memory a training step needs, per method, predicted from a
/// `config.json` (or a built-in shape) without loading weights, and the cards it fits.
#[derive(clap::Args, Debug, Clone)]
pub struct PlanCommand {
    /// A built-in shape: llama3.1-8b, llama3.1-70b, llama3-8b-scaled, smollm2-135m, ….
    #[arg(long, default_value = "llama3.1-8b")]
    pub shape: String,
    /// A Hugging Face config.json, or the model directory holding it (instead of --shape).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The dtype of weights, activations and gradients: f32, bf16 or f16.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 2048)]
    pub seq_len: usize,
    /// Sequences per batch.
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Where the step runs: cuda or cpu.
    #[arg(long, default_value = "cuda", value_parser = ["cuda", "cpu"])]
    pub device: String,
    /// How frozen blocks' projections are stored: dense, int8 or nf4 (predicted only).
    #[arg(long, default_value = "dense")]
    pub frozen_storage: String,
    /// Print MB (10^6 bytes) instead of GiB.
    #[arg(long)]
    pub mb: bool,
    /// Methods, comma-separated (default: plan::DEFAULT_METHODS).
    #[arg(long, value_delimiter = ',')]
    pub methods: Vec<String>,
}

impl PlanCommand {
    /// Prints the table.
    ///
    /// # Errors
    /// An unreadable or unsupported config, an unknown shape, dtype, storage or method.
    pub fn run(&self) -> Result<(), Error> {
        let args = self;
        let (name, config) = match &args.config {
            Some(path) if path.is_dir() => (
                path.display().to_string(),
                LlamaConfig::from_file(path.join("config.json"))?,
            ),
            Some(path) => (path.display().to_string(), LlamaConfig::from_file(path)?),
            None => (args.shape.clone(), plan::shape(&args.shape)?),
        };
        let setup = Setup {
            dtype: args.dtype.parse()?,
            seq_len: args.seq_len,
            batch_size: args.batch_size,
            backend: match args.device.as_str() {
                "cpu" => Backend::Cpu,
                _ => Backend::Cuda,
            },
            frozen_storage: args.frozen_storage.parse()?,
        };
        let methods: Vec<&str> = args.methods.iter().map(String::as_str).collect();
        let rows = plan::table(&config, &setup, &methods)?;
        println!(
            "{name}: {:.2}B parameters, {} {}, T = {}, B = {}, frozen blocks {}",
            config.num_params() as f64 / 1e9,
            args.device,
            args.dtype,
            args.seq_len,
            args.batch_size,
            args.frozen_storage
        );
        let (unit, scale) = match args.mb {
            true => ("(MB) at", 1e6),
            false => ("(GiB) at", (1u64 << 30) as f64),
        };
        let cards: Vec<String> = CARDS_GB.iter().map(|gb| format!("{gb}G")).collect();
        println!(
            "{:<20} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8}  {:<15} fits",
            "method", "trainable", "weights", "grads", "state", "activ.", "peak", unit
        );
        for row in &rows {
            let p = &row.prediction;
            let gb = |b: u64| format!("{:.1}", b as f64 / scale);
            let fits: Vec<&str> = row
                .fits
                .iter()
                .zip(&cards)
                .filter(|((_, fits), _)| *fits)
                .map(|(_, c)| c.as_str())
                .collect();
            println!(
                "{:<20} {:>8.2}B {:>8} {:>8} {:>8} {:>8} {:>8}  {:<15} {}",
                row.method,
                p.trainable_params as f64 / 1e9,
                gb(p.weight_bytes),
                gb(p.grad_bytes),
                gb(p.state_bytes),
                gb(p.activation_bytes),
                gb(p.peak_bytes),
                format!("{:?}", p.phase),
                if fits.is_empty() {
                    "none".to_string()
                } else {
                    fits.join(" ")
                }
            );
        }
        Ok(())
    }
}
