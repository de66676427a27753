//! Peak memory of loading a checkpoint with `candle_lisa::load_llama`.
//!
//! ```text
//! cargo run --release --example load_report                 # a 1.2 GB f32 checkpoint it writes
//! cargo run --release --example load_report -- --model DIR [--dtype bf16]
//! ```
//!
//! It resets the kernel's peak-RSS counter (`/proc/self/clear_refs`, Linux), loads the model
//! onto the CPU, and prints one JSON line: the weight files' size, the resident memory before
//! the load, its peak during the load (`VmHWM`), and the peak above the starting point as a
//! ratio of the files' size. Without `--model` it first writes a Llama-shaped checkpoint of
//! 307M f32 parameters (16 blocks, hidden 1024, FFN 4096, vocabulary 32000, untied) to a
//! temporary directory.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_lisa::{load_llama, save_llama, Llama, LlamaConfig};
use candle_nn::{VarBuilder, VarMap};
use clap::Parser;

type Error = Box<dyn std::error::Error>;

#[derive(Parser, Debug)]
#[command(about = "Peak resident memory while loading a checkpoint")]
struct Args {
    /// A Hugging Face model directory (default: write a 1.2 GB one to a temporary directory).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The dtype to load into: f32, bf16 or f16 (default: the checkpoint's, f32 for the
    /// written one).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    dtype: String,
}

/// A field of `/proc/self/status` in bytes.
fn status_bytes(field: &str) -> Result<usize, Error> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .ok_or_else(|| format!("no {field} in /proc/self/status"))?;
    let kb: usize = line
        .split_whitespace()
        .nth(1)
        .ok_or("malformed /proc/self/status")?
        .parse()?;
    Ok(kb * 1024)
}

fn files_size(dir: &Path) -> Result<u64, Error> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            total += std::fs::metadata(&path)?.len();
        }
    }
    Ok(total)
}

fn main() -> Result<(), Error> {
    let args = Args::parse();
    let tmp = tempfile::tempdir()?;
    let dir = match &args.model {
        Some(dir) => dir.clone(),
        None => {
            let mut c = LlamaConfig::tiny(32000, 1024, 16, 16, 4);
            c.intermediate_size = 4096;
            let vars = VarMap::new();
            Llama::new(&c, VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu))?;
            save_llama(tmp.path(), &c, &vars, DType::F32)?;
            tmp.path().to_path_buf()
        }
    };
    let dtype: DType = args.dtype.parse()?;
    let size = files_size(&dir)?;
    // Writing 5 resets the peak resident set size to the current one (Linux 4.0+).
    std::fs::write("/proc/self/clear_refs", "5")?;
    let before = status_bytes("VmRSS:")?;
    let (config, vars) = load_llama(&dir, dtype, &Device::Cpu)?;
    let peak = status_bytes("VmHWM:")?;
    let params = config.num_params();
    drop(vars);
    let line = serde_json::json!({
        "model": args.model.as_ref().map(|p| p.display().to_string()),
        "parameters": params,
        "dtype": args.dtype,
        "file_bytes": size,
        "rss_before": before,
        "rss_peak": peak,
        "peak_above_start": peak.saturating_sub(before),
        "ratio_to_files": peak.saturating_sub(before) as f64 / size as f64,
    });
    println!("{line}");
    Ok(())
}
