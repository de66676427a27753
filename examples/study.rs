//! A convergence study: full fine-tuning, LoRA-16, and LISA with every sampler and
//! γ ∈ {1, 2, 4}, each over several seeds, on the bundled task; the table and a plot of
//! held-out accuracy and loss (mean ± sd over seeds) and peak memory.
//!
//! ```sh
//! cargo build --release --examples
//! RAYON_NUM_THREADS=1 target/release/examples/study --out runs/study --plot docs/study.png > docs/study.md
//! ```
//!
//! Each run is one `finetune` process (the binary next to this one), with the same flags but
//! the method, the sampler, γ and the seed; the seed draws the task's problems, the data
//! order, LoRA's initialisation and LISA's blocks. Runs whose `summary.json` exists already
//! are read, not run again, so an interrupted study continues where it stopped.

#[path = "common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use serde_json::json;

type Error = Box<dyn std::error::Error>;

/// Full fine-tuning, LoRA-16 and LISA (every sampler, γ = 1, 2, 4) over several seeds.
#[derive(Parser, Debug)]
#[command(about)]
struct Args {
    /// Seeds per configuration.
    #[arg(long, default_value_t = 3)]
    seeds: u64,
    /// Steps per run (finetune --steps).
    #[arg(long, default_value_t = 500)]
    steps: usize,
    /// γ values for LISA.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 2, 4])]
    gammas: Vec<usize>,
    /// LISA samplers (`owlore` is finetune --owlore 5, the weighted sampler by outlier ratio).
    #[arg(
        long,
        value_delimiter = ',',
        default_values_t = ["uniform", "ascending", "descending", "reshuffle", "owlore", "gradnorm"].map(String::from)
    )]
    samplers: Vec<String>,
    /// Where each run writes (`<out>/<config>/seed-<s>`).
    #[arg(long, default_value = "runs/study")]
    out: PathBuf,
    /// Where to draw the plot.
    #[arg(long, default_value = "runs/study/study.png")]
    plot: PathBuf,
    /// Where to write one JSON line per configuration.
    #[arg(long, default_value = "runs/study/study.jsonl")]
    json: PathBuf,
}

/// One configuration: its name and the finetune flags that make it.
struct Config {
    name: String,
    flags: Vec<String>,
}

fn configs(args: &Args) -> Vec<Config> {
    let flags = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
    let mut out = vec![
        Config {
            name: "full".into(),
            flags: flags(&["--method", "full"]),
        },
        Config {
            name: "lora16".into(),
            flags: flags(&["--method", "lora", "--lora-rank", "16"]),
        },
    ];
    for &gamma in &args.gammas {
        for sampler in &args.samplers {
            let g = gamma.to_string();
            let mut f = flags(&["--method", "lisa", "--gamma", &g]);
            match sampler.as_str() {
                "owlore" => f.extend(flags(&["--owlore", "5"])),
                s => f.extend(flags(&["--sampler", s])),
            }
            out.push(Config {
                name: format!("lisa{gamma}-{sampler}"),
                flags: f,
            });
        }
    }
    out
}

/// Runs (or reads) one configuration at one seed: its `summary.json` line.
fn run(args: &Args, config: &Config, seed: u64) -> Result<serde_json::Value, Error> {
    let dir = args.out.join(&config.name).join(format!("seed-{seed}"));
    let summary = dir.join("summary.json");
    if !summary.is_file() {
        let exe = std::env::current_exe()?.with_file_name("finetune");
        let status = Command::new(&exe)
            .args(&config.flags)
            .args([
                "--seed",
                &seed.to_string(),
                "--steps",
                &args.steps.to_string(),
            ])
            .args(["--eval-every", &args.steps.to_string()])
            .arg("--out")
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .status()
            .map_err(|e| {
                format!(
                    "cannot run {} (cargo build --release --examples): {e}",
                    exe.display()
                )
            })?;
        if !status.success() {
            return Err(format!("{} seed {seed}: finetune failed", config.name).into());
        }
    }
    let text = std::fs::read_to_string(&summary)?;
    let rows: Vec<serde_json::Value> = serde_json::from_str(&text)?;
    rows.into_iter()
        .next()
        .ok_or_else(|| format!("{} holds no run", summary.display()).into())
}

/// Mean and sample standard deviation.
fn mean_sd(x: &[f64]) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, var.sqrt())
}

/// One configuration's figures over its seeds.
struct Row {
    name: String,
    accuracy: (f64, f64),
    eval_loss: (f64, f64),
    peak_mb: (f64, f64),
    seconds: f64,
}

fn plot(path: &Path, rows: &[Row]) -> Result<(), Error> {
    use plotters::prelude::*;
    static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSansMono.ttf");
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let root = BitMapBackend::new(path, (1000, 60 + 24 * rows.len() as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let n = rows.len();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "held-out accuracy, mean ± sd over seeds",
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(160)
        .build_cartesian_2d(0f64..100f64, (0..n).into_segmented())?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc("accuracy (%)")
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) if *i < n => rows[*i].name.clone(),
            _ => String::new(),
        })
        .y_labels(n)
        .draw()?;
    let color = |name: &str| match name {
        "full" => RED,
        "lora16" => GREEN,
        _ => BLUE,
    };
    chart.draw_series(rows.iter().enumerate().map(|(i, r)| {
        let mut bar = Rectangle::new(
            [
                (0.0, SegmentValue::Exact(i)),
                (100.0 * r.accuracy.0, SegmentValue::Exact(i + 1)),
            ],
            color(&r.name).mix(0.6).filled(),
        );
        bar.set_margin(3, 3, 0, 0);
        bar
    }))?;
    chart.draw_series(rows.iter().enumerate().map(|(i, r)| {
        let (m, s) = (100.0 * r.accuracy.0, 100.0 * r.accuracy.1);
        PathElement::new(
            vec![
                ((m - s).max(0.0), SegmentValue::CenterOf(i)),
                ((m + s).min(100.0), SegmentValue::CenterOf(i)),
            ],
            BLACK.stroke_width(2),
        )
    }))?;
    root.present()?;
    Ok(())
}

fn main() -> Result<(), Error> {
    common::setup();
    let args = Args::parse();
    if args.seeds < 2 {
        return Err("--seeds must be at least 2 (the table gives standard deviations)".into());
    }
    let mut rows = Vec::new();
    let mut lines = Vec::new();
    for config in configs(&args) {
        let mut runs = Vec::new();
        for seed in 0..args.seeds {
            eprintln!("{} seed {seed}", config.name);
            runs.push(run(&args, &config, seed)?);
        }
        let get = |key: &str| -> Vec<f64> {
            runs.iter()
                .map(|r| r[key].as_f64().unwrap_or(f64::NAN))
                .collect()
        };
        let peak: Vec<f64> = get("peak_bytes").iter().map(|b| b / 1e6).collect();
        let row = Row {
            name: config.name.clone(),
            accuracy: mean_sd(&get("accuracy")),
            eval_loss: mean_sd(&get("eval_loss")),
            peak_mb: mean_sd(&peak),
            seconds: mean_sd(&get("wall_seconds")).0,
        };
        lines.push(json!({
            "config": row.name, "flags": config.flags, "seeds": args.seeds, "steps": args.steps,
            "accuracy": get("accuracy"), "eval_loss": get("eval_loss"), "peak_mb": peak,
            "wall_seconds": get("wall_seconds"),
        }));
        rows.push(row);
    }
    if let Some(dir) = args.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    std::fs::write(&args.json, text.join("\n") + "\n")?;
    plot(&args.plot, &rows)?;

    println!("| configuration | accuracy (%) | eval loss | peak heap (MB) | seconds |");
    println!("|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.1} ± {:.1} | {:.3} ± {:.3} | {:.1} ± {:.1} | {:.0} |",
            r.name,
            100.0 * r.accuracy.0,
            100.0 * r.accuracy.1,
            r.eval_loss.0,
            r.eval_loss.1,
            r.peak_mb.0,
            r.peak_mb.1,
            r.seconds
        );
    }
    let find = |name: &str| rows.iter().find(|r| r.name == name);
    let best = rows
        .iter()
        .filter(|r| r.name.starts_with("lisa"))
        .max_by(|a, b| a.accuracy.0.total_cmp(&b.accuracy.0));
    if let (Some(best), Some(lora), Some(full)) = (best, find("lora16"), find("full")) {
        let beyond = |a: &Row, b: &Row| {
            let gap = (a.accuracy.0 - b.accuracy.0).abs();
            match gap > a.accuracy.1 + b.accuracy.1 {
                true => "beyond the seeds' spread (the gap exceeds the two sds together)",
                false => "within the seeds' spread",
            }
        };
        println!();
        println!(
            "Best LISA configuration: {} at {:.1}% (peak {:.1} MB); LoRA-16 {:.1}% (peak {:.1} \
             MB), {}; full {:.1}%, {:.1} points away, {}.",
            best.name,
            100.0 * best.accuracy.0,
            best.peak_mb.0,
            100.0 * lora.accuracy.0,
            lora.peak_mb.0,
            beyond(best, lora),
            100.0 * full.accuracy.0,
            100.0 * (full.accuracy.0 - best.accuracy.0),
            beyond(best, full)
        );
    }
    Ok(())
}
