//! Memory and step time of one training step, per method, at realistic model proportions.
//!
//! ```text
//! cargo run --release --example memory_report -- --json [--shape NAME[,NAME]] [--methods LIST]
//!     [--seq-len 256] [--batch-size 1] [--steps 5] [--rounds 1] [--recompute-frozen]
//!     [--dtype f32|bf16|f16] [--device cpu|cuda] [--chart PATH]
//! cargo run --release --example memory_report -- --from results.jsonl [--chart PATH]
//! ```
//!
//! For each shape and method it runs a few real training steps (forward, backward, optimizer
//! step; LISA redraws its blocks every 2 steps, so it resamples at least once) on randomly
//! initialised weights, each method in a fresh process of its own. A global allocator counts
//! the live heap; its peak over the steps (weights included) is `peak_bytes`. With `--json`
//! it prints one JSON object per method on stdout; it always prints a table on stderr, with the
//! breakdown of the peak (weights, gradients, optimizer state, and the rest: activations and
//! temporaries), the ratios to `full`, and the peak that `candle_lisa::plan` predicts with its
//! error against the measurement. `--chart` draws the peaks as a bar chart (PNG).
//! On the CPU (`--device cpu`, the default) the peak is the process heap; with `--device cuda`
//! (built with `--features cuda`) it is the high-water mark of the CUDA memory pool candle
//! allocates from, which is exact for candle's tensors and leaves out the CUDA context and
//! cuBLAS's workspace (see `Meter` in `examples/common/report.rs`). With `--dtype bf16` or `f16` the
//! weights, activations and gradients are half precision and the crate's optimizer keeps f32
//! master weights and f32 moments for what trains (`adamw-candle` keeps its state in the
//! weights' dtype, as candle does).
//!
//! Methods: `full` (lean AdamW over everything), `lora16`, `lora128` (all seven projections),
//! `lisa1`, `lisa2`, `lisa4` (γ = 1, 2, 4 on a model rebuilt from the optimizer), their
//! `-recompute` variants (frozen blocks recomputed in the backward pass), `lisa2-dropin` (a
//! model built straight from the `VarMap`), `lisa2-frozen-embed` (the input embedding frozen:
//! no gradient below the lowest active block), `lisa2-compact` (bf16 moments for everything
//! that trains, `CompactState::All`, with recompute; CPU only, left out on other devices) and
//! `adamw-candle` (`candle_nn::AdamW`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_lisa::plan;
use clap::Parser;

#[path = "common/mod.rs"]
mod common;

use candle_lisa_testkit::alloc;

use candle_lisa_testkit::training;

#[path = "common/report.rs"]
mod report;

use report::{Record, Setup};
use training::{shape_config, Variant, METHODS};

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

type Error = Box<dyn std::error::Error>;

#[derive(Parser, Debug)]
#[command(about = "Peak memory and step time of full fine-tuning, LoRA and LISA")]
struct Args {
    /// Print one JSON object per method on stdout.
    #[arg(long)]
    json: bool,
    /// Model shapes, comma-separated: smollm2-135m, llama2-7b-scaled, llama3.2-1b,
    /// llama3-8b-scaled, tiny.
    #[arg(
        long,
        default_value = "smollm2-135m,llama2-7b-scaled",
        value_delimiter = ','
    )]
    shape: Vec<String>,
    /// Methods, comma-separated (default: all thirteen).
    #[arg(long, value_delimiter = ',', default_values_t = METHODS.map(String::from))]
    methods: Vec<String>,
    /// Tokens per sequence (T).
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Sequences per batch (B).
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// Training steps per method; the step time is the median of all but the first.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Run every method this many times, in turn, and take the step time as the median over
    /// all rounds: on a shared machine, speed drifts over minutes, and interleaving the methods
    /// spreads the drift over all of them. Memory comes out the same in every round.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Run every LISA method with frozen-block recompute (lisa2 becomes lisa2-recompute).
    #[arg(long)]
    recompute_frozen: bool,
    /// How LISA methods draw blocks: uniform, ascending, descending, reshuffle, gradnorm or
    /// weighted:W0,W1,….
    #[arg(long, default_value = "uniform")]
    sampler: String,
    /// The dtype of weights, activations and gradients: f32, bf16 or f16.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    dtype: String,
    /// Where to train: cpu, or cuda (built with `--features cuda`).
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
    device: String,
    /// Draw the peaks as a bar chart into this PNG.
    #[arg(long)]
    chart: Option<PathBuf>,
    /// Read results (JSON lines of an earlier run) instead of measuring.
    #[arg(long, conflicts_with_all = ["shape", "methods", "recompute_frozen"])]
    from: Option<PathBuf>,
    /// Measure one method in this process and print its JSON line (used by the parent run).
    #[arg(long, hide = true)]
    child: bool,
}

/// Measures one method in this process.
fn measure(args: &Args, shape: &str, name: &str) -> Result<Record, Error> {
    let dev = common::device(&args.device)?;
    let setup = Setup {
        shape,
        method: name,
        batch_size: args.batch_size,
        seq_len: args.seq_len,
        steps: args.steps,
        dtype: args.dtype.parse()?,
        sampler: &args.sampler,
    };
    report::measure(&setup, &dev)
}

/// Runs `shape` × `method` in a fresh process of this binary and reads its JSON line.
fn spawn(args: &Args, shape: &str, method: &str) -> Result<Record, Error> {
    let out = Command::new(std::env::current_exe()?)
        .args(["--child", "--shape", shape, "--methods", method])
        .args(["--seq-len", &args.seq_len.to_string()])
        .args(["--batch-size", &args.batch_size.to_string()])
        .args(["--steps", &args.steps.to_string()])
        .args(["--dtype", &args.dtype])
        .args(["--sampler", &args.sampler])
        .args(["--device", &args.device])
        .stderr(std::process::Stdio::inherit())
        .output()?;
    if !out.status.success() {
        return Err(format!("{shape} {method}: the measuring process failed").into());
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// One record from several rounds of the same method: the largest memory figures (they are
/// equal unless the allocator's timing differs), every timed step, and their median.
fn merge_rounds(runs: &[&Record]) -> Record {
    let mut merged = runs[0].clone();
    merged.step_ms = runs
        .iter()
        .flat_map(|r| r.step_ms.iter().copied())
        .collect();
    let mut timed: Vec<f64> = runs
        .iter()
        .flat_map(|r| r.step_ms[1.min(r.step_ms.len() - 1)..].iter().copied())
        .collect();
    timed.sort_by(f64::total_cmp);
    merged.step_ms_median = timed[timed.len() / 2];
    for r in &runs[1..] {
        merged.peak_bytes = merged.peak_bytes.max(r.peak_bytes);
        merged.grad_bytes = merged.grad_bytes.max(r.grad_bytes);
        merged.state_bytes = merged.state_bytes.max(r.state_bytes);
    }
    merged.other_bytes = merged
        .peak_bytes
        .saturating_sub(merged.weight_bytes + merged.grad_bytes + merged.state_bytes);
    merged.rounds = runs.len();
    merged
}

fn mb(bytes: usize) -> f64 {
    bytes as f64 / 1e6
}

/// Records measured under the same conditions (shape, B, T, device, dtype), in runs of
/// consecutive records.
fn groups(records: &[Record]) -> Vec<&[Record]> {
    let key = |r: &Record| {
        let k = (&r.shape, r.batch_size, r.seq_len, &r.device, &r.dtype);
        format!("{k:?}")
    };
    records
        .chunk_by(|a, b| key(a) == key(b))
        .collect::<Vec<&[Record]>>()
}

/// The peak `candle_lisa::plan` predicts for a measured record (`None` for a method or shape
/// it does not know).
fn planned(r: &Record) -> Option<u64> {
    let setup = plan::Setup {
        dtype: r.dtype.parse().ok()?,
        seq_len: r.seq_len,
        batch_size: r.batch_size,
        backend: match r.device.as_str() {
            "cpu" => plan::Backend::Cpu,
            _ => plan::Backend::Cuda,
        },
        frozen_storage: candle_lisa::nn::quant::QuantFormat::Dense,
    };
    let config = shape_config(&r.shape).ok()?;
    let prediction = plan::predict(&config, &r.method.parse().ok()?, &setup).ok()?;
    Some(prediction.peak_bytes)
}

/// The table on stderr: one block per shape and setting, ratios to `full` where it was
/// measured, and the planner's peak with its error.
fn print_table(records: &[Record]) {
    for rows in groups(records) {
        let shape = &rows[0].shape;
        let full = rows.iter().find(|r| r.method == "full");
        let (r0, params) = (&rows[0], rows[0].total_params as f64 / 1e6);
        eprintln!(
            "\n{shape}: {params:.1}M parameters, B = {}, T = {}, {} {}, {} threads",
            r0.batch_size, r0.seq_len, r0.device, r0.dtype, r0.threads
        );
        eprintln!(
            "{:<16} {:>9} {:>7} {:>9} {:>9} {:>9} {:>9} {:>11} {:>9} {:>7} {:>9} {:>7}",
            "method",
            "peak MB",
            "x full",
            "weights",
            "grads",
            "state",
            "rest",
            "trainable",
            "step ms",
            "x full",
            "plan MB",
            "error"
        );
        for r in rows {
            let ratio = |x: f64, f: f64| format!("{:.2}", x / f);
            let (mem_x, time_x) = full.map_or(("-".into(), "-".into()), |f| {
                (
                    ratio(r.peak_bytes as f64, f.peak_bytes as f64),
                    ratio(r.step_ms_median, f.step_ms_median),
                )
            });
            let (plan_mb, error) = planned(r).map_or(("-".into(), "-".into()), |p| {
                let error = 100.0 * (p as f64 / r.peak_bytes as f64 - 1.0);
                (format!("{:.1}", p as f64 / 1e6), format!("{error:+.1}%"))
            });
            eprintln!(
                "{:<16} {:>9.1} {:>7} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>11} {:>9.0} {:>7} {:>9} {:>7}",
                r.method,
                mb(r.peak_bytes),
                mem_x,
                mb(r.weight_bytes),
                mb(r.grad_bytes),
                mb(r.state_bytes),
                mb(r.other_bytes),
                r.trainable_params,
                r.step_ms_median,
                time_x,
                plan_mb,
                error
            );
        }
    }
}

/// Stacked horizontal bars of the peak per method (weights, gradients, state, rest), one
/// panel per shape.
fn chart(path: &Path, records: &[Record]) -> Result<(), Error> {
    use plotters::prelude::*;
    // The bundled font (license in assets/fonts/LICENSE): no system fonts needed.
    static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSansMono.ttf");
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    let groups = groups(records);
    let root =
        BitMapBackend::new(path, (1000, 120 + 34 * records.len() as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let total = records.len();
    let mut rest = root.titled(
        &format!("peak memory of a training step ({})", records[0].device),
        ("sans-serif", 18),
    )?;
    let parts = [
        ("weights", RGBColor(90, 90, 90)),
        ("gradients", RGBColor(214, 96, 77)),
        ("optimizer state", RGBColor(244, 165, 130)),
        ("activations & temporaries", RGBColor(67, 147, 195)),
    ];
    let height = rest.dim_in_pixel().1 as usize;
    for (g, group) in groups.iter().enumerate() {
        let panel_height = (height * group.len() / total.max(1)) as u32;
        let (panel, below) = rest.split_vertically(panel_height);
        rest = below;
        let recs: Vec<&Record> = group.iter().collect();
        let shape = &group[0].shape;
        let max = recs.iter().map(|r| mb(r.peak_bytes)).fold(1.0, f64::max) * 1.5;
        let r0 = recs[0];
        let n = recs.len();
        // The first method on top.
        let row = |i: usize| n - 1 - i;
        let mut chart = ChartBuilder::on(&panel)
            .caption(
                format!(
                    "{shape}, {} {}, B = {}, T = {}",
                    r0.device, r0.dtype, r0.batch_size, r0.seq_len
                ),
                ("sans-serif", 16),
            )
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(140)
            .build_cartesian_2d(0f64..max, (0..n).into_segmented())?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .light_line_style(WHITE)
            .x_desc("MB")
            .y_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) if *i < n => recs[row(*i)].method.clone(),
                _ => String::new(),
            })
            .y_labels(n)
            .draw()?;
        let sizes: Vec<[f64; 4]> = recs
            .iter()
            .map(|r| [r.weight_bytes, r.grad_bytes, r.state_bytes, r.other_bytes].map(mb))
            .collect();
        for (part, (label, color)) in parts.iter().enumerate() {
            let bars = sizes.iter().enumerate().map(|(i, s)| {
                let x0: f64 = s[..part].iter().sum();
                let mut bar = Rectangle::new(
                    [
                        (x0, SegmentValue::Exact(row(i))),
                        (x0 + s[part], SegmentValue::Exact(row(i) + 1)),
                    ],
                    color.filled(),
                );
                bar.set_margin(3, 3, 0, 0);
                bar
            });
            let series = chart.draw_series(bars)?;
            if g == 0 {
                let color = *color;
                series.label(*label).legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                });
            }
        }
        chart.draw_series(recs.iter().enumerate().map(|(i, r)| {
            Text::new(
                format!("{:.0} MB", mb(r.peak_bytes)),
                (
                    mb(r.peak_bytes) + max * 0.01,
                    SegmentValue::CenterOf(row(i)),
                ),
                ("sans-serif", 13),
            )
        }))?;
        if g == 0 {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .background_style(WHITE.mix(0.9))
                .border_style(BLACK)
                .label_font(("sans-serif", 13))
                .draw()?;
        }
    }
    root.present()?;
    Ok(())
}

fn main() -> Result<(), Error> {
    common::setup();
    let args = Args::parse();
    if args.steps < 2 {
        return Err("--steps must be at least 2 (the first step is not timed; LISA resamples after the second)".into());
    }
    if args.child {
        let (shape, method) = (&args.shape[0], &args.methods[0]);
        let record = measure(&args, shape, method)?;
        println!("{}", serde_json::to_string(&record)?);
        return Ok(());
    }
    let records = match &args.from {
        Some(path) => std::fs::read_to_string(path)?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(serde_json::from_str)
            .collect::<Result<Vec<Record>, _>>()?,
        None => {
            let methods: Vec<String> = args
                .methods
                .iter()
                .map(|m| match m.starts_with("lisa") && !m.contains('-') {
                    true if args.recompute_frozen => format!("{m}-recompute"),
                    _ => m.clone(),
                })
                // Compact state is updated on the CPU only.
                .filter(|m| args.device == "cpu" || !m.ends_with("-compact"))
                .collect();
            // Check every name before the first measurement starts.
            for shape in &args.shape {
                shape_config(shape)?;
            }
            for method in &methods {
                method.parse::<Variant>()?;
            }
            let mut records = Vec::new();
            for shape in &args.shape {
                let mut rounds: Vec<Vec<Record>> = Vec::new();
                for round in 0..args.rounds.max(1) {
                    let mut this_round = Vec::new();
                    for method in &methods {
                        eprint!("\r{shape}: {method} (round {})...{:20}", round + 1, "");
                        this_round.push(spawn(&args, shape, method)?);
                    }
                    rounds.push(this_round);
                }
                for i in 0..methods.len() {
                    let runs: Vec<&Record> = rounds.iter().map(|r| &r[i]).collect();
                    let record = merge_rounds(&runs);
                    if args.json {
                        println!("{}", serde_json::to_string(&record)?);
                        std::io::stdout().flush()?;
                    }
                    records.push(record);
                }
            }
            eprintln!("\r{:60}", "");
            records
        }
    };
    print_table(&records);
    if let Some(path) = &args.chart {
        chart(path, &records)?;
        eprintln!("\nchart: {}", path.display());
    }
    Ok(())
}
