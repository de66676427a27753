//! Memory and step time of one training step, per method, at realistic model proportions.
//!
//! ```text
//! cargo run --release --example memory_report -- --json [--shape NAME[,NAME]] [--methods LIST]
//!     [--seq-len 256] [--batch-size 1] [--steps 5] [--recompute-frozen] [--chart PATH]
//! cargo run --release --example memory_report -- --from results.jsonl [--chart PATH]
//! ```
//!
//! For each shape and method it runs a few real training steps (forward, backward, optimizer
//! step; LISA redraws its blocks every 2 steps, so it resamples at least once) on randomly
//! initialised weights, each method in a fresh process of its own. A global allocator counts
//! the live heap; its peak over the steps (weights included) is `peak_bytes`. With `--json`
//! it prints one JSON object per method on stdout; it always prints a table on stderr, with the
//! breakdown of the peak (weights, gradients, optimizer state, and the rest: activations and
//! temporaries) and the ratios to `full`. `--chart` draws the peaks as a bar chart (PNG).
//!
//! Methods: `full` (lean AdamW over everything), `lora16`, `lora128` (all seven projections),
//! `lisa1`, `lisa2`, `lisa4` (γ = 1, 2, 4 on a model rebuilt from the optimizer), their
//! `-recompute` variants (frozen blocks recomputed in the backward pass), `lisa2-dropin` (a
//! model built straight from the `VarMap`) and `adamw-candle` (`candle_nn::AdamW`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use candle_lisa::{
    frozen_var_builder, named_vars, LisaAdamW, LisaConfig, Llama, LlamaConfig, LoraConfig,
};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use clap::Parser;
use serde::{Deserialize, Serialize};

#[path = "common/mod.rs"]
mod common;

#[path = "common/alloc.rs"]
mod alloc;

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

type Error = Box<dyn std::error::Error>;

const SHAPES: [&str; 3] = ["smollm2-135m", "llama2-7b-scaled", "tiny"];
const METHODS: [&str; 11] = [
    "full",
    "adamw-candle",
    "lora16",
    "lora128",
    "lisa1",
    "lisa2",
    "lisa4",
    "lisa2-dropin",
    "lisa1-recompute",
    "lisa2-recompute",
    "lisa4-recompute",
];

#[derive(Parser, Debug)]
#[command(about = "Peak memory and step time of full fine-tuning, LoRA and LISA")]
struct Args {
    /// Print one JSON object per method on stdout.
    #[arg(long)]
    json: bool,
    /// Model shapes, comma-separated: smollm2-135m, llama2-7b-scaled, tiny.
    #[arg(
        long,
        default_value = "smollm2-135m,llama2-7b-scaled",
        value_delimiter = ','
    )]
    shape: Vec<String>,
    /// Methods, comma-separated (default: all eleven).
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
    /// Run every LISA method with frozen-block recompute (lisa2 becomes lisa2-recompute).
    #[arg(long)]
    recompute_frozen: bool,
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

/// One measured method, as printed in the JSON lines.
#[derive(Serialize, Deserialize, Debug, Clone)]
struct Record {
    shape: String,
    method: String,
    #[serde(rename = "B")]
    batch_size: usize,
    #[serde(rename = "T")]
    seq_len: usize,
    /// Highest live heap during the steps, weights included.
    peak_bytes: usize,
    /// Weights (and LoRA adapters).
    weight_bytes: usize,
    /// Gradients the backward pass stored, at their largest step.
    grad_bytes: usize,
    /// Optimizer state, at its largest step.
    state_bytes: usize,
    /// The rest of the peak: activations and temporaries.
    other_bytes: usize,
    trainable_params: usize,
    total_params: usize,
    step_ms_median: f64,
    step_ms: Vec<f64>,
    resamples: usize,
    threads: usize,
    device: String,
}

fn shape_config(name: &str) -> Result<LlamaConfig, Error> {
    let mut c = match name {
        "smollm2-135m" => {
            let mut c = LlamaConfig::tiny(49152, 576, 30, 9, 3);
            c.intermediate_size = 1536;
            c.tie_word_embeddings = true;
            c.rope_theta = 100_000.0;
            c
        }
        "llama2-7b-scaled" => {
            let mut c = LlamaConfig::tiny(4000, 512, 32, 8, 8);
            c.intermediate_size = 1376;
            c
        }
        "tiny" => {
            let mut c = LlamaConfig::tiny(258, 128, 8, 4, 2);
            c.intermediate_size = 352;
            c.tie_word_embeddings = true;
            c
        }
        _ => return Err(format!("unknown shape {name:?}; choose from {SHAPES:?}").into()),
    };
    c.max_position_embeddings = 4096;
    Ok(c)
}

/// What a method name asks for.
enum Method {
    Full,
    AdamwCandle,
    Lora(usize),
    Lisa {
        gamma: usize,
        drop_in: bool,
        recompute: bool,
    },
}

fn parse_method(name: &str) -> Result<Method, Error> {
    let unknown = || format!("unknown method {name:?}; choose from {METHODS:?}");
    Ok(match name {
        "full" => Method::Full,
        "adamw-candle" => Method::AdamwCandle,
        _ => {
            if let Some(rank) = name.strip_prefix("lora") {
                Method::Lora(rank.parse().map_err(|_| unknown())?)
            } else if let Some(rest) = name.strip_prefix("lisa") {
                let (gamma, variant) = rest.split_once('-').unwrap_or((rest, ""));
                let gamma = gamma.parse().map_err(|_| unknown())?;
                match variant {
                    "" | "dropin" | "recompute" => Method::Lisa {
                        gamma,
                        drop_in: variant == "dropin",
                        recompute: variant == "recompute",
                    },
                    _ => return Err(unknown().into()),
                }
            } else {
                return Err(unknown().into());
            }
        }
    })
}

fn grad_bytes(grads: &GradStore) -> usize {
    grads
        .get_ids()
        .filter_map(|id| grads.get_id(*id))
        .map(|g| g.elem_count() * g.dtype().size_in_bytes())
        .sum()
}

fn var_bytes(varmap: &VarMap) -> usize {
    varmap
        .all_vars()
        .iter()
        .map(|v| v.elem_count() * v.dtype().size_in_bytes())
        .sum()
}

/// The optimizer of a method, and how to (re)build its model.
enum Trainer {
    Lean { opt: LisaAdamW, rebuild: bool },
    Candle(AdamW),
}

/// Measures one method in this process.
fn measure(args: &Args, shape: &str, method: &str) -> Result<Record, Error> {
    let config = shape_config(shape)?;
    let kind = parse_method(method)?;
    let dev = Device::Cpu;
    let (b, t) = (args.batch_size, args.seq_len);
    let ids: Vec<u32> = (0..b * t)
        .map(|i| (i as u64 * 7919 % config.vocab_size as u64) as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (b, t), &dev)?;
    let labels = ids.to_dtype(DType::I64)?;
    let params = ParamsAdamW {
        lr: 1e-5,
        ..Default::default()
    };

    let base = VarMap::new();
    Llama::new(&config, VarBuilder::from_varmap(&base, DType::F32, &dev))?;
    let adapters = VarMap::new();
    let lora = match kind {
        Method::Lora(rank) => {
            let lora = LoraConfig {
                rank,
                alpha: 2.0 * rank as f64,
                ..Default::default()
            };
            let vb = VarBuilder::from_varmap(&adapters, DType::F32, &dev);
            Llama::with_lora(&config, frozen_var_builder(&base)?, &lora, vb)?;
            Some(lora)
        }
        _ => None,
    };
    let weight_bytes = var_bytes(&base) + var_bytes(&adapters);
    let total_params = weight_bytes / 4;

    // Everything from here on counts: the optimizer's state is allocated in the steps' peak.
    alloc::reset_peak();
    let mut trainer = match kind {
        Method::Full => Trainer::Lean {
            opt: LisaAdamW::all_trainable(named_vars(&base)?, params)?,
            rebuild: false,
        },
        Method::Lora(_) => Trainer::Lean {
            opt: LisaAdamW::all_trainable(named_vars(&adapters)?, params)?,
            rebuild: false,
        },
        Method::AdamwCandle => Trainer::Candle(AdamW::new(base.all_vars(), params)?),
        Method::Lisa {
            gamma,
            drop_in,
            recompute,
        } => {
            let lisa = LisaConfig {
                gamma,
                period: 2,
                recompute_frozen: recompute,
                ..Default::default()
            };
            Trainer::Lean {
                opt: LisaAdamW::new(&base, params, lisa)?,
                rebuild: !drop_in,
            }
        }
    };
    let build = |trainer: &Trainer| -> Result<Llama, Error> {
        Ok(match (trainer, &lora) {
            (_, Some(lora)) => Llama::with_lora(
                &config,
                frozen_var_builder(&base)?,
                lora,
                VarBuilder::from_varmap(&adapters, DType::F32, &dev),
            )?,
            (Trainer::Lean { opt, rebuild: true }, None) => Llama::from_optimizer(&config, opt)?,
            _ => Llama::new(&config, VarBuilder::from_varmap(&base, DType::F32, &dev))?,
        })
    };
    let mut model = build(&trainer)?;
    let (mut grads_max, mut state_max, mut trainable, mut resamples) = (0, 0, 0, 0);
    let mut step_ms = Vec::new();
    for _ in 0..args.steps {
        let start = Instant::now();
        let grads = model.loss(&ids, &labels)?.backward()?;
        grads_max = grads_max.max(grad_bytes(&grads));
        match &mut trainer {
            Trainer::Lean { opt, .. } => {
                trainable = trainable.max(opt.trainable_params());
                opt.try_step(&grads)?;
                state_max = state_max.max(opt.state_bytes());
            }
            Trainer::Candle(opt) => {
                opt.step(&grads)?;
                // candle_nn::AdamW holds m and v for every variable from the start.
                trainable = total_params;
                state_max = 2 * weight_bytes;
            }
        }
        drop(grads);
        if let Trainer::Lean { opt, .. } = &trainer {
            if opt.resampled() {
                resamples += 1;
                model = build(&trainer)?;
            }
        }
        step_ms.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let peak_bytes = alloc::peak();
    let mut timed = step_ms[1.min(step_ms.len() - 1)..].to_vec();
    timed.sort_by(f64::total_cmp);
    Ok(Record {
        shape: shape.into(),
        method: method.into(),
        batch_size: b,
        seq_len: t,
        peak_bytes,
        weight_bytes,
        grad_bytes: grads_max,
        state_bytes: state_max,
        other_bytes: peak_bytes.saturating_sub(weight_bytes + grads_max + state_max),
        trainable_params: trainable,
        total_params,
        step_ms_median: timed[timed.len() / 2],
        step_ms,
        resamples,
        threads: candle_core::utils::get_num_threads(),
        device: "cpu".into(),
    })
}

/// Runs `shape` × `method` in a fresh process of this binary and reads its JSON line.
fn spawn(args: &Args, shape: &str, method: &str) -> Result<Record, Error> {
    let out = Command::new(std::env::current_exe()?)
        .args(["--child", "--shape", shape, "--methods", method])
        .args(["--seq-len", &args.seq_len.to_string()])
        .args(["--batch-size", &args.batch_size.to_string()])
        .args(["--steps", &args.steps.to_string()])
        .stderr(std::process::Stdio::inherit())
        .output()?;
    if !out.status.success() {
        return Err(format!("{shape} {method}: the measuring process failed").into());
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn mb(bytes: usize) -> f64 {
    bytes as f64 / 1e6
}

/// The table on stderr: one block per shape, ratios to `full` where it was measured.
fn print_table(records: &[Record]) {
    let mut shapes: Vec<&str> = records.iter().map(|r| r.shape.as_str()).collect();
    shapes.dedup();
    for shape in shapes {
        let rows: Vec<&Record> = records.iter().filter(|r| r.shape == shape).collect();
        let full = rows.iter().find(|r| r.method == "full");
        let (r0, params) = (rows[0], rows[0].total_params as f64 / 1e6);
        eprintln!(
            "\n{shape}: {params:.1}M parameters, B = {}, T = {}, CPU f32, {} threads",
            r0.batch_size, r0.seq_len, r0.threads
        );
        eprintln!(
            "{:<16} {:>9} {:>7} {:>9} {:>9} {:>9} {:>9} {:>11} {:>9} {:>7}",
            "method",
            "peak MB",
            "x full",
            "weights",
            "grads",
            "state",
            "rest",
            "trainable",
            "step ms",
            "x full"
        );
        for r in &rows {
            let ratio = |x: f64, f: f64| format!("{:.2}", x / f);
            let (mem_x, time_x) = full.map_or(("-".into(), "-".into()), |f| {
                (
                    ratio(r.peak_bytes as f64, f.peak_bytes as f64),
                    ratio(r.step_ms_median, f.step_ms_median),
                )
            });
            eprintln!(
                "{:<16} {:>9.1} {:>7} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>11} {:>9.0} {:>7}",
                r.method,
                mb(r.peak_bytes),
                mem_x,
                mb(r.weight_bytes),
                mb(r.grad_bytes),
                mb(r.state_bytes),
                mb(r.other_bytes),
                r.trainable_params,
                r.step_ms_median,
                time_x
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
    let mut shapes: Vec<&str> = records.iter().map(|r| r.shape.as_str()).collect();
    shapes.dedup();
    let height = 120 + 34 * records.len() as u32;
    let root = BitMapBackend::new(path, (1000, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let rows: Vec<usize> = shapes
        .iter()
        .map(|s| records.iter().filter(|r| r.shape == *s).count())
        .collect();
    let total: usize = rows.iter().sum();
    let mut rest = root.titled(
        "peak heap per training step (CPU, f32): weights | gradients | optimizer state | activations & temporaries",
        ("sans-serif", 15),
    )?;
    let parts = [
        ("weights", RGBColor(90, 90, 90)),
        ("gradients", RGBColor(214, 96, 77)),
        ("optimizer state", RGBColor(244, 165, 130)),
        ("activations & temporaries", RGBColor(67, 147, 195)),
    ];
    for (shape, n) in shapes.iter().zip(&rows) {
        let panel_height = (rest.dim_in_pixel().1 as usize * n / total.max(1)) as u32;
        let (panel, below) = rest.split_vertically(panel_height);
        rest = below;
        let recs: Vec<&Record> = records.iter().filter(|r| r.shape == *shape).collect();
        let max = recs.iter().map(|r| mb(r.peak_bytes)).fold(1.0, f64::max) * 1.18;
        let r0 = recs[0];
        let mut chart = ChartBuilder::on(&panel)
            .caption(
                format!("{shape}, B = {}, T = {}", r0.batch_size, r0.seq_len),
                ("sans-serif", 16),
            )
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(140)
            .build_cartesian_2d(0f64..max, (0..recs.len()).into_segmented())?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .x_desc("MB")
            .y_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => {
                    recs.get(*i).map_or(String::new(), |r| r.method.clone())
                }
                _ => String::new(),
            })
            .y_labels(recs.len())
            .draw()?;
        for (i, r) in recs.iter().enumerate() {
            let sizes = [r.weight_bytes, r.grad_bytes, r.state_bytes, r.other_bytes].map(mb);
            let mut x = 0.0;
            for ((_, color), size) in parts.iter().zip(sizes) {
                let bar = Rectangle::new(
                    [
                        (x, SegmentValue::Exact(i)),
                        (x + size, SegmentValue::Exact(i + 1)),
                    ],
                    color.filled(),
                );
                chart.draw_series(std::iter::once(bar))?;
                x += size;
            }
            chart.draw_series(std::iter::once(Text::new(
                format!("{:.0} MB", mb(r.peak_bytes)),
                (x + max * 0.01, SegmentValue::CenterOf(i)),
                ("sans-serif", 13),
            )))?;
        }
    }
    root.present()?;
    Ok(())
}

fn main() -> Result<(), Error> {
    common::setup();
    let args = Args::parse();
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
                .collect();
            // Check every name before the first measurement starts.
            for shape in &args.shape {
                shape_config(shape)?;
            }
            for method in &methods {
                parse_method(method)?;
            }
            let mut records = Vec::new();
            for shape in &args.shape {
                for method in &methods {
                    eprint!("\r{shape}: {method}...{:20}", "");
                    let record = spawn(&args, shape, method)?;
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
