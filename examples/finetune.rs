//! Fine-tune a Llama-family model with LISA, LoRA or full AdamW, side by side.
//!
//! `cargo run --release --example finetune` fine-tunes the bundled tiny checkpoint on a
//! bundled arithmetic task (prompt `12+34=`, answer `46`, exact match on 200 held-out
//! problems) with all three methods, and writes `metrics.jsonl`, `summary.json`, `loss.png`,
//! the fine-tuned models and resumable checkpoints under `--out` (default `runs/finetune`).
//! `--help` lists the flags. Peak memory is the peak of live heap bytes, counted by a global
//! allocator in this program (CPU); on CUDA and Metal it only counts host memory.

#[path = "common/mod.rs"]
mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_lisa::models::tokenizer::{ByteTokenizer, HfTokenizer, TextTokenizer};
use candle_lisa::{
    frozen_var_builder, load_llama, merge_lora, named_vars, save_llama, LisaAdamW, LisaConfig,
    Llama, LlamaConfig, LoraConfig, LossScaler, IGNORE_INDEX,
};
use candle_nn::{Optimizer, ParamsAdamW, VarBuilder, VarMap};
use clap::{Parser, ValueEnum};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

#[path = "common/alloc.rs"]
mod alloc;

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

type Error = Box<dyn std::error::Error>;

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Method {
    Lisa,
    Lora,
    Full,
    All,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Lisa => "lisa",
            Method::Lora => "lora",
            Method::Full => "full",
            Method::All => "all",
        }
    }
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum DeviceArg {
    Cpu,
    Cuda,
    Metal,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum DtypeArg {
    F32,
    Bf16,
    F16,
}

/// Fine-tune a Llama-family model with LISA, LoRA or full AdamW.
#[derive(Parser, Debug, Clone)]
#[command(version, about)]
struct Args {
    /// Which method to run; `all` runs the three on the same data and seed.
    #[arg(long, value_enum, default_value = "all")]
    method: Method,
    /// A Hugging Face Llama-family directory (config.json, model.safetensors, optionally
    /// tokenizer.json). Default: the bundled tiny checkpoint.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Training data: plain text (`.txt`), or JSONL with "prompt" and "response" fields.
    /// Default: the bundled arithmetic task.
    #[arg(long)]
    data: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DtypeArg,
    #[arg(long, default_value_t = 300)]
    steps: usize,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Tokens per training sequence.
    #[arg(long, default_value_t = 24)]
    seq_len: usize,
    /// Peak learning rate (linear warm-up over 5% of the steps, then cosine to a tenth).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// LISA: blocks trained at a time.
    #[arg(long, default_value_t = 2)]
    gamma: usize,
    /// LISA: steps between two draws of the active blocks.
    #[arg(long, default_value_t = 20)]
    period: usize,
    /// LISA: recompute frozen blocks in the backward pass instead of keeping their
    /// activations (less memory, one more forward of each frozen block).
    #[arg(long)]
    recompute_frozen: bool,
    #[arg(long, default_value_t = 16)]
    lora_rank: usize,
    /// LoRA alpha (default: twice the rank).
    #[arg(long)]
    lora_alpha: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Steps between evaluations (and checkpoints).
    #[arg(long, default_value_t = 50)]
    eval_every: usize,
    /// How many held-out examples each evaluation uses (at most the held-out split: 200 for
    /// the bundled task, a tenth of a JSONL file).
    #[arg(long, default_value_t = 200)]
    eval_size: usize,
    #[arg(long, default_value = "runs/finetune")]
    out: PathBuf,
    /// Continue each method from its checkpoint in --out.
    #[arg(long)]
    resume: bool,
    /// Stop after this step as if interrupted (the checkpoint of the last evaluation stays).
    #[arg(long, hide = true)]
    stop_after: Option<usize>,
}

fn device(arg: DeviceArg) -> Result<Device, Error> {
    match arg {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Cuda if cfg!(feature = "cuda") => Ok(Device::new_cuda(0)?),
        DeviceArg::Metal if cfg!(feature = "metal") => Ok(Device::new_metal(0)?),
        DeviceArg::Cuda => {
            Err("this example was built without CUDA: rebuild with `--features cuda`".into())
        }
        DeviceArg::Metal => {
            Err("this example was built without Metal: rebuild with `--features metal`".into())
        }
    }
}

/// Token ids of a prompt and its response.
type Pair = (Vec<u32>, Vec<u32>);
/// (step, loss) points of a curve.
type Curve = Vec<(usize, f32)>;

/// Training and evaluation data, as token ids.
enum Data {
    /// Prompt/response pairs: loss on the response only, exact-match accuracy on eval.
    Pairs { train: Vec<Pair>, eval: Vec<Pair> },
    /// Plain text: loss on every token, no accuracy.
    Text { train: Vec<u32>, eval: Vec<u32> },
}

/// The bundled task: `a+b=` → `c` for a, b in 0..50, 200 held-out pairs chosen by the seed.
fn arithmetic(seed: u64) -> Vec<(String, String)> {
    let mut pairs: Vec<(u32, u32)> = (0..50).flat_map(|a| (0..50).map(move |b| (a, b))).collect();
    pairs.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    pairs
        .into_iter()
        .map(|(a, b)| (format!("{a}+{b}="), format!("{}", a + b)))
        .collect()
}

fn load_data(args: &Args, tok: &dyn TextTokenizer) -> Result<Data, Error> {
    let encode = |pairs: Vec<(String, String)>| -> Result<Vec<Pair>, Error> {
        pairs
            .into_iter()
            .map(|(p, r)| Ok((tok.encode(&p)?, tok.encode(&r)?)))
            .collect()
    };
    let Some(path) = &args.data else {
        let mut pairs = arithmetic(args.seed);
        let train = pairs.split_off(200);
        return Ok(Data::Pairs {
            train: encode(train)?,
            eval: encode(pairs)?,
        });
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read --data {}: {e}", path.display()))?;
    if path.extension().is_some_and(|e| e == "jsonl") {
        let mut pairs = Vec::new();
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))?;
            let field = |k: &str| {
                v[k].as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("{}:{}: no string field {k:?}", path.display(), i + 1))
            };
            pairs.push((field("prompt")?, field("response")?));
        }
        if pairs.len() < 2 {
            return Err(
                format!("{} needs at least 2 prompt/response lines", path.display()).into(),
            );
        }
        let eval = pairs.split_off(pairs.len() - (pairs.len() / 10).max(1));
        Ok(Data::Pairs {
            train: encode(pairs)?,
            eval: encode(eval)?,
        })
    } else {
        let ids = tok.encode(&text)?;
        let split = ids.len() * 9 / 10;
        if split <= args.seq_len || ids.len() - split <= args.seq_len {
            return Err(format!(
                "{} is too short for --seq-len {}",
                path.display(),
                args.seq_len
            )
            .into());
        }
        Ok(Data::Text {
            train: ids[..split].to_vec(),
            eval: ids[split..].to_vec(),
        })
    }
}

/// One padded sequence: ids and labels (prompt and padding ignored).
fn pack(prompt: &[u32], response: &[u32], eos: u32, t: usize) -> (Vec<u32>, Vec<i64>) {
    let mut ids: Vec<u32> = prompt
        .iter()
        .chain(response)
        .copied()
        .chain([eos])
        .take(t)
        .collect();
    let mut labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    for l in labels.iter_mut().take(prompt.len()) {
        *l = IGNORE_INDEX;
    }
    while ids.len() < t {
        ids.push(eos);
        labels.push(IGNORE_INDEX);
    }
    (ids, labels)
}

/// Batch number `step`, drawn from its own seed so that a resumed run sees the same batches.
fn batch(
    data: &Data,
    args: &Args,
    step: usize,
    eos: u32,
    dev: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let mut rng =
        ChaCha8Rng::seed_from_u64(args.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step as u64);
    let (b, t) = (args.batch_size, args.seq_len);
    let (mut ids, mut labels) = (Vec::with_capacity(b * t), Vec::with_capacity(b * t));
    for _ in 0..b {
        let (i, l) = match data {
            Data::Pairs { train, .. } => {
                let (p, r) = &train[rng.random_range(0..train.len())];
                pack(p, r, eos, t)
            }
            Data::Text { train, .. } => {
                let s = rng.random_range(0..train.len() - t);
                let i = train[s..s + t].to_vec();
                let l = i.iter().map(|&x| x as i64).collect();
                (i, l)
            }
        };
        ids.extend(i);
        labels.extend(l);
    }
    Ok((
        Tensor::from_vec(ids, (b, t), dev)?,
        Tensor::from_vec(labels, (b, t), dev)?,
    ))
}

/// Held-out loss, and exact-match accuracy for prompt/response data.
fn evaluate(
    model: &Llama,
    data: &Data,
    args: &Args,
    eos: u32,
    dev: &Device,
) -> Result<(f32, Option<f32>), Error> {
    let t = args.seq_len;
    match data {
        Data::Pairs { eval, .. } => {
            let eval = &eval[..args.eval_size.clamp(1, eval.len())];
            let mut loss = 0.0;
            for chunk in eval.chunks(args.batch_size.max(1)) {
                let (mut ids, mut labels) = (Vec::new(), Vec::new());
                for (p, r) in chunk {
                    let (i, l) = pack(p, r, eos, t);
                    ids.extend(i);
                    labels.extend(l);
                }
                let ids = Tensor::from_vec(ids, (chunk.len(), t), dev)?;
                let labels = Tensor::from_vec(labels, (chunk.len(), t), dev)?;
                loss += model
                    .loss(&ids, &labels)?
                    .to_dtype(DType::F32)?
                    .to_scalar::<f32>()?
                    * chunk.len() as f32;
            }
            let mut correct = 0;
            for (p, r) in eval {
                let out = model.generate(p, r.len() + 1, 0.0, 0, Some(eos))?;
                let answer: Vec<u32> = out.into_iter().take_while(|&i| i != eos).collect();
                correct += usize::from(&answer == r);
            }
            Ok((
                loss / eval.len() as f32,
                Some(correct as f32 / eval.len() as f32),
            ))
        }
        Data::Text { eval, .. } => {
            let windows: Vec<&[u32]> = eval.chunks_exact(t).take(32).collect();
            let ids: Vec<u32> = windows.concat();
            let ids = Tensor::from_vec(ids, (windows.len(), t), dev)?;
            let loss = model
                .loss(&ids, &ids.to_dtype(DType::I64)?)?
                .to_dtype(DType::F32)?
                .to_scalar::<f32>()?;
            Ok((loss, None))
        }
    }
}

/// The model and optimizer of one method.
struct Run {
    method: Method,
    config: LlamaConfig,
    base: VarMap,
    adapters: Option<(VarMap, LoraConfig)>,
    opt: LisaAdamW,
    model: Llama,
}

impl Run {
    fn new(
        method: Method,
        args: &Args,
        model_dir: &Path,
        dtype: DType,
        dev: &Device,
        checkpoint: Option<&Path>,
    ) -> Result<Self, Error> {
        let source = checkpoint.map(|c| c.join("model"));
        let (config, base) = load_llama(source.as_deref().unwrap_or(model_dir), dtype, dev)?;
        let params = ParamsAdamW {
            lr: args.lr,
            weight_decay: 0.0,
            ..Default::default()
        };
        let (opt, model, adapters) = match method {
            Method::Lisa => {
                let lisa = LisaConfig {
                    gamma: args.gamma,
                    period: args.period,
                    seed: args.seed,
                    recompute_frozen: args.recompute_frozen,
                    ..Default::default()
                };
                let opt = LisaAdamW::new(&base, params, lisa)?;
                let model = Llama::from_plan(&config, &opt.plan())?;
                (opt, model, None)
            }
            Method::Full => {
                let opt = LisaAdamW::all_trainable(named_vars(&base)?, params)?;
                let model = Llama::new(&config, opt.var_builder())?;
                (opt, model, None)
            }
            Method::Lora | Method::All => {
                let lora = LoraConfig {
                    rank: args.lora_rank,
                    alpha: args.lora_alpha.unwrap_or(2.0 * args.lora_rank as f64),
                    ..Default::default()
                };
                let mut adapters = VarMap::new();
                let model = Llama::with_lora(
                    &config,
                    frozen_var_builder(&base)?,
                    &lora,
                    VarBuilder::from_varmap(&adapters, dtype, dev),
                )?;
                init_adapters(&adapters, args.seed)?;
                if let Some(c) = checkpoint {
                    adapters.load(c.join("adapters.safetensors"))?;
                }
                let opt = LisaAdamW::all_trainable(named_vars(&adapters)?, params)?;
                (opt, model, Some((adapters, lora)))
            }
        };
        let mut opt = opt;
        if dtype == DType::F16 {
            // f16 gradients underflow and overflow without dynamic loss scaling.
            opt.set_loss_scaler(Some(LossScaler::default()));
        }
        let mut run = Run {
            method,
            config,
            base,
            adapters,
            opt,
            model,
        };
        if let Some(c) = checkpoint {
            run.opt.load_state(c.join("optimizer"))?;
            run.rebuild()?;
        }
        Ok(run)
    }

    /// The current model over detached weights: evaluation builds no graph.
    fn eval_model(&self) -> Result<Llama, Error> {
        Ok(match &self.adapters {
            None => Llama::new(&self.config, frozen_var_builder(&self.base)?)?,
            Some((adapters, lora)) => Llama::with_lora(
                &self.config,
                frozen_var_builder(&self.base)?,
                lora,
                frozen_var_builder(adapters)?,
            )?,
        })
    }

    fn rebuild(&mut self) -> Result<(), Error> {
        if self.method == Method::Lisa {
            self.model = Llama::from_plan(&self.config, &self.opt.plan())?;
        }
        Ok(())
    }

    /// The dtype the base weights are held in.
    fn dtype(&self) -> DType {
        self.base
            .all_vars()
            .first()
            .map_or(DType::F32, |v| v.dtype())
    }

    /// Weights, adapters and optimizer state, each file written atomically.
    fn save_checkpoint(&self, dir: &Path) -> Result<(), Error> {
        let dtype = self.dtype();
        save_llama(dir.join("model"), &self.config, &self.base, dtype)?;
        if let Some((adapters, _)) = &self.adapters {
            let tmp = dir.join(".adapters.safetensors.tmp");
            adapters.save(&tmp)?;
            std::fs::rename(&tmp, dir.join("adapters.safetensors"))?;
        }
        self.opt.save_state(dir.join("optimizer"))?;
        Ok(())
    }

    /// The fine-tuned model in the Hugging Face layout (LoRA merged into a copy of the base).
    fn save_model(&self, dir: &Path) -> Result<(), Error> {
        let dtype = self.dtype();
        match &self.adapters {
            None => save_llama(dir, &self.config, &self.base, dtype)?,
            Some((adapters, lora)) => {
                let merged = VarMap::new();
                for (name, var) in named_vars(&self.base)? {
                    merged
                        .data()
                        .lock()
                        .expect("fresh VarMap")
                        .insert(name, Var::from_tensor(&var.as_tensor().copy()?)?);
                }
                merge_lora(&merged, adapters, lora)?;
                save_llama(dir, &self.config, &merged, dtype)?;
            }
        }
        Ok(())
    }
}

/// LoRA A matrices from the seed (candle cannot seed its CPU generator), B stays zero.
fn init_adapters(adapters: &VarMap, seed: u64) -> candle_core::Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x10AA);
    let data = adapters.data().lock().expect("VarMap lock");
    let mut names: Vec<&String> = data
        .keys()
        .filter(|n| n.ends_with("lora_A.weight"))
        .collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let bound = 1.0 / (var.dim(1)? as f64).sqrt();
        let values: Vec<f32> = (0..var.elem_count())
            .map(|_| rng.random_range(-bound..bound) as f32)
            .collect();
        var.set(&Tensor::from_vec(values, var.shape(), var.device())?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

fn lr_at(args: &Args, step: usize) -> f64 {
    let warmup = (args.steps / 20).max(1);
    if step <= warmup {
        return args.lr * step as f64 / warmup as f64;
    }
    let p = (step - warmup) as f64 / (args.steps - warmup).max(1) as f64;
    args.lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * p.min(1.0)).cos()))
}

#[derive(Clone, Debug, Default, serde::Serialize)]
struct Summary {
    method: String,
    steps: usize,
    final_train_loss: f32,
    eval_loss: f32,
    accuracy: Option<f32>,
    wall_seconds: f64,
    tokens_per_second: f64,
    peak_bytes: usize,
    peak_source: &'static str,
    trainable_params: usize,
    state_bytes: usize,
    /// Steps skipped for a non-finite gradient (f16 loss scaling backing off).
    skipped_steps: u64,
}

fn append_metrics(path: &Path, line: serde_json::Value) -> Result<(), Error> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(f, "{line}")?;
    Ok(())
}

/// The train-loss and eval-loss curves of `method` in `metrics.jsonl`.
fn curves_from_metrics(path: &Path, method: &str) -> Result<(Curve, Curve), Error> {
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for line in std::fs::read_to_string(path)?.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let Some(step) = v["step"].as_u64().filter(|_| v["method"] == method) else {
            continue;
        };
        if let Some(loss) = v["loss"].as_f64() {
            train.push((step as usize, loss as f32));
        }
        if let Some(loss) = v["eval_loss"].as_f64() {
            eval.push((step as usize, loss as f32));
        }
    }
    Ok((train, eval))
}

/// Keeps the lines of `metrics.jsonl` from other methods, and this method's up to `step`.
fn truncate_metrics(path: &Path, method: &str, step: u64) -> Result<(), Error> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
            v["method"] != method || v["step"].as_u64().is_some_and(|s| s <= step)
        })
        .collect();
    std::fs::write(
        path,
        kept.join("\n") + if kept.is_empty() { "" } else { "\n" },
    )?;
    Ok(())
}

/// Device memory in use now (total − free) on a CUDA device; `None` elsewhere.
///
/// candle allocates CUDA memory without a caching pool, so this follows the live tensors.
/// Not yet run on a GPU by this project.
fn device_used(dev: &Device) -> Option<usize> {
    #[cfg(feature = "cuda")]
    if let Ok(cuda) = dev.as_cuda_device() {
        if let Ok((free, total)) = cuda.cuda_stream().context().mem_get_info() {
            return Some(total - free);
        }
    }
    let _ = dev;
    None
}

/// Prints above the progress bar, or plainly when there is no terminal to draw it on.
fn say(pb: &indicatif::ProgressBar, line: String) {
    if pb.is_hidden() {
        println!("{line}");
    } else {
        pb.println(line);
    }
}

fn train(
    method: Method,
    args: &Args,
    model_dir: &Path,
    data: &Data,
    eos: u32,
    dtype: DType,
    dev: &Device,
) -> Result<(Summary, Curve, Curve), Error> {
    let dir = args.out.join(method.name());
    let checkpoint = dir.join("checkpoint");
    let resume = args.resume
        && checkpoint
            .join("optimizer")
            .join("optimizer.json")
            .is_file();
    let heap_base = alloc::reset_peak();
    let mut run = Run::new(
        method,
        args,
        model_dir,
        dtype,
        dev,
        resume.then_some(checkpoint.as_path()),
    )?;
    let metrics = args.out.join("metrics.jsonl");
    let start = run.opt.step_count() as usize;
    if resume {
        truncate_metrics(&metrics, method.name(), start as u64)?;
    }
    let pb = indicatif::ProgressBar::new(args.steps as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{prefix:>5} [{bar:30}] {pos}/{len} {msg}")?
            .progress_chars("=> "),
    );
    pb.set_prefix(method.name());
    pb.set_position(start as u64);
    let mut recent = Vec::new();
    if start == 0 {
        let (loss, acc) = evaluate(&run.eval_model()?, data, args, eos, dev)?;
        let accuracy = acc.map_or(String::new(), |a| format!(", accuracy {:.1}%", 100.0 * a));
        say(
            &pb,
            format!(
                "{:>5} step    0: eval loss {loss:.3}{accuracy}",
                method.name()
            ),
        );
        append_metrics(
            &metrics,
            json!({"method": method.name(), "step": 0, "eval_loss": loss, "eval_accuracy": acc}),
        )?;
    }
    let (mut tokens, started) = (0usize, Instant::now());
    let mut device_peak = device_used(dev);
    let mut last_eval = (f32::NAN, None);
    for step in start + 1..=args.steps.min(args.stop_after.unwrap_or(usize::MAX)) {
        run.opt.try_set_learning_rate(lr_at(args, step))?;
        let (ids, labels) = batch(data, args, step, eos, dev)?;
        let n = ids.elem_count();
        let loss_t = run.model.loss(&ids, &labels)?;
        let loss = loss_t.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let grads = run.opt.scale_loss(&loss_t)?.backward()?;
        device_peak = device_peak.max(device_used(dev));
        // The loss holds the whole graph: free the activations before the optimizer step.
        drop(loss_t);
        run.opt.step(&grads)?;
        drop(grads);
        if run.opt.resampled() {
            run.rebuild()?;
        }
        tokens += n;
        recent.push(loss);
        let tps = tokens as f64 / started.elapsed().as_secs_f64();
        let active = if method == Method::Lisa {
            format!(" blocks {:?}", run.opt.active_blocks())
        } else {
            String::new()
        };
        pb.set_message(format!("loss {loss:.3} {tps:.0} tok/s{active}"));
        pb.set_position(step as u64);
        let mut line = json!({
            "method": method.name(), "step": step, "loss": loss, "lr": lr_at(args, step),
            "active_blocks": run.opt.active_blocks(), "state_bytes": run.opt.state_bytes(),
            "skipped_steps": run.opt.skipped_steps(),
            "elapsed_s": started.elapsed().as_secs_f64(),
        });
        if step % args.eval_every == 0 || step == args.steps {
            last_eval = evaluate(&run.eval_model()?, data, args, eos, dev)?;
            let acc = last_eval
                .1
                .map_or(String::new(), |a| format!(", accuracy {:.1}%", 100.0 * a));
            say(
                &pb,
                format!(
                    "{:>5} step {step:4}: eval loss {:.3}{acc}",
                    method.name(),
                    last_eval.0
                ),
            );
            line["eval_loss"] = json!(last_eval.0);
            line["eval_accuracy"] = json!(last_eval.1);
            run.save_checkpoint(&checkpoint)?;
        }
        append_metrics(&metrics, line)?;
    }
    pb.finish_and_clear();
    if last_eval.0.is_nan() {
        last_eval = evaluate(&run.eval_model()?, data, args, eos, dev)?;
    }
    run.save_model(&dir.join("model"))?;
    let tail = &recent[recent.len().saturating_sub(10)..];
    let summary = Summary {
        method: method.name().into(),
        steps: args.steps,
        final_train_loss: tail.iter().sum::<f32>() / tail.len().max(1) as f32,
        eval_loss: last_eval.0,
        accuracy: last_eval.1,
        wall_seconds: started.elapsed().as_secs_f64(),
        tokens_per_second: tokens as f64 / started.elapsed().as_secs_f64(),
        peak_bytes: device_peak.unwrap_or(alloc::peak() - heap_base),
        peak_source: if device_peak.is_some() {
            "cuda device memory in use, sampled after each backward pass"
        } else {
            "heap above the method's start, counted by the allocator"
        },
        trainable_params: run.opt.trainable_params(),
        state_bytes: run.opt.state_bytes(),
        skipped_steps: run.opt.skipped_steps(),
    };
    // From the file, so that a resumed run plots its whole history.
    let (train_curve, eval_curve) = curves_from_metrics(&metrics, method.name())?;
    Ok((summary, train_curve, eval_curve))
}

/// Runs the model once so that the matmul library's per-thread workspaces (tens of MB here,
/// kept for the life of the process) exist before any method is measured: each method's peak
/// is then the heap it allocates itself.
fn warm_up(
    model_dir: &Path,
    args: &Args,
    dtype: DType,
    dev: &Device,
    eos: u32,
) -> Result<(), Error> {
    let (config, varmap) = load_llama(model_dir, dtype, dev)?;
    let model = Llama::new(&config, VarBuilder::from_varmap(&varmap, dtype, dev))?;
    let ids = Tensor::full(eos, (args.batch_size, args.seq_len), dev)?;
    model.loss(&ids, &ids.to_dtype(DType::I64)?)?.backward()?;
    model.generate(&[eos; 8], 4, 0.0, 0, None)?;
    Ok(())
}

fn plot(path: &Path, curves: &[(String, Curve, Curve)], steps: usize) -> Result<(), Error> {
    use plotters::prelude::*;
    // plotters draws text with a font it is given; the bundled DejaVu Sans Mono (its license
    // is in assets/fonts/LICENSE) keeps this working without system fonts.
    static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSansMono.ttf");
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    let max = curves
        .iter()
        .flat_map(|(_, t, e)| t.iter().chain(e))
        .map(|p| p.1)
        .fold(0.5f32, f32::max)
        .min(4.0);
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "fine-tuning loss (thin: train, smoothed; thick: eval)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(50)
        .build_cartesian_2d(0usize..steps.max(1), 0f32..max * 1.05)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss (nats/token)")
        .draw()?;
    for (name, train, eval) in curves {
        let color = match name.as_str() {
            "lisa" => BLUE,
            "lora" => RED,
            _ => GREEN,
        };
        let smooth: Vec<(usize, f32)> = train
            .iter()
            .enumerate()
            .map(|(i, &(s, _))| {
                let w = &train[i.saturating_sub(9)..=i];
                (s, w.iter().map(|p| p.1).sum::<f32>() / w.len() as f32)
            })
            .collect();
        chart.draw_series(LineSeries::new(smooth, color.mix(0.5)))?;
        chart
            .draw_series(LineSeries::new(eval.clone(), color.stroke_width(3)))?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn mb(bytes: usize) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn run(args: Args) -> Result<Vec<Summary>, Error> {
    common::keep_freed_memory();
    if args.steps == 0 || args.batch_size == 0 || args.seq_len < 2 || args.eval_every == 0 {
        return Err(
            "--steps, --batch-size and --eval-every must be at least 1, --seq-len at least 2"
                .into(),
        );
    }
    let dev = device(args.device)?;
    let dtype = match args.dtype {
        DtypeArg::F32 => DType::F32,
        DtypeArg::Bf16 => DType::BF16,
        DtypeArg::F16 => DType::F16,
    };
    let model_dir = args
        .model
        .clone()
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny-llama"));
    if !model_dir.join("config.json").is_file() {
        return Err(format!(
            "--model {}: no config.json there; point it at a Hugging Face model directory",
            model_dir.display()
        )
        .into());
    }
    let config = LlamaConfig::from_file(model_dir.join("config.json"))?;
    if args.gamma == 0 || args.gamma > config.num_hidden_layers {
        return Err(format!(
            "--gamma {} is out of range: the model has {} blocks",
            args.gamma, config.num_hidden_layers
        )
        .into());
    }
    let tok: Box<dyn TextTokenizer> = if model_dir.join("tokenizer.json").is_file() {
        Box::new(HfTokenizer::from_file(model_dir.join("tokenizer.json"))?)
    } else {
        Box::new(ByteTokenizer)
    };
    if tok.vocab_size() > config.vocab_size {
        return Err(format!(
            "the tokenizer has {} ids but the model only {}",
            tok.vocab_size(),
            config.vocab_size
        )
        .into());
    }
    let eos = tok
        .eos_id()
        .ok_or("the tokenizer has no end-of-sequence token")?;
    let data = load_data(&args, tok.as_ref())?;
    std::fs::create_dir_all(&args.out)?;
    let metrics = args.out.join("metrics.jsonl");
    if !args.resume {
        let _ = std::fs::remove_file(&metrics);
    }
    let methods = match args.method {
        Method::All => vec![Method::Lisa, Method::Lora, Method::Full],
        m => vec![m],
    };
    warm_up(&model_dir, &args, dtype, &dev, eos)?;
    let (mut summaries, mut curves) = (Vec::new(), Vec::new());
    for method in methods {
        let (summary, train_curve, eval_curve) =
            train(method, &args, &model_dir, &data, eos, dtype, &dev)?;
        curves.push((summary.method.clone(), train_curve, eval_curve));
        summaries.push(summary);
    }
    std::fs::write(
        args.out.join("summary.json"),
        serde_json::to_string_pretty(&summaries)? + "\n",
    )?;
    plot(&args.out.join("loss.png"), &curves, args.steps)?;
    println!(
        "{:<6} {:>7} {:>10} {:>9} {:>9} {:>8} {:>9} {:>10} {:>11} {:>10}",
        "method",
        "steps",
        "train loss",
        "eval loss",
        "accuracy",
        "time",
        "tok/s",
        "peak heap",
        "trainable",
        "opt. state"
    );
    for s in &summaries {
        println!(
            "{:<6} {:>7} {:>10.3} {:>9.3} {:>9} {:>7.1}s {:>9.0} {:>10} {:>11} {:>10}",
            s.method,
            s.steps,
            s.final_train_loss,
            s.eval_loss,
            s.accuracy
                .map_or("-".into(), |a| format!("{:.1}%", 100.0 * a)),
            s.wall_seconds,
            s.tokens_per_second,
            mb(s.peak_bytes),
            s.trainable_params,
            mb(s.state_bytes),
        );
    }
    println!(
        "wrote {}/{{metrics.jsonl,summary.json,loss.png}} and the models under it",
        args.out.display()
    );
    Ok(summaries)
}

/// The exit status for a run's result, printing the error.
fn exit_code<T>(result: &Result<T, Error>) -> i32 {
    match result {
        Ok(_) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            2
        }
    }
}

fn main() {
    common::setup();
    std::process::exit(exit_code(&run(Args::parse())));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let base = [
            "finetune",
            "--steps",
            "6",
            "--eval-every",
            "3",
            "--batch-size",
            "4",
            "--period",
            "2",
        ];
        Args::try_parse_from(base.iter().chain(extra)).expect("valid arguments")
    }

    fn err(extra: &[&str]) -> String {
        let result = run(args(extra));
        assert_eq!(exit_code(&result), 2);
        result.err().map(|e| e.to_string()).unwrap_or_default()
    }

    #[test]
    fn argument_errors_are_clear() {
        let e = Args::try_parse_from(["finetune", "--method", "sgd"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(
            e.to_string().contains("invalid value 'sgd' for '--method"),
            "{e}"
        );

        let e = err(&["--gamma", "9"]);
        assert!(
            e.contains("--gamma 9 is out of range: the model has 8 blocks"),
            "{e}"
        );
        let e = err(&["--model", "/nonexistent/model"]);
        assert!(e.contains("no config.json there"), "{e}");
        let e = err(&["--data", "/nonexistent/data.jsonl"]);
        assert!(
            e.contains("cannot read --data /nonexistent/data.jsonl"),
            "{e}"
        );
        if !cfg!(feature = "cuda") {
            assert!(err(&["--device", "cuda"]).contains("--features cuda"));
        }
    }

    fn read(dir: &Path, method: &str) -> (serde_json::Value, Vec<(String, Vec<f32>)>) {
        let ck = dir.join(method).join("checkpoint");
        let text =
            std::fs::read_to_string(ck.join("optimizer/optimizer.json")).expect("optimizer.json");
        let json: serde_json::Value = serde_json::from_str(&text).expect("json");
        let mut tensors = Vec::new();
        for file in [
            "optimizer/optimizer.safetensors",
            "model/model.safetensors",
            "adapters.safetensors",
        ] {
            let Ok(map) = candle_core::safetensors::load(ck.join(file), &Device::Cpu) else {
                continue;
            };
            for (name, t) in map {
                let v = t
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                tensors.push((format!("{file}:{name}"), v));
            }
        }
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        (json, tensors)
    }

    /// Stopping after step 3 and resuming gives the same active blocks, sampler position,
    /// moments and weights at step 6 as the run that never stopped.
    #[test]
    fn resume_continues_exactly() {
        let (straight, stopped) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        for method in ["lisa", "lora"] {
            let out = |d: &tempfile::TempDir| d.path().to_str().unwrap().to_string();
            run(args(&["--method", method, "--out", &out(&straight)])).unwrap();
            run(args(&[
                "--method",
                method,
                "--out",
                &out(&stopped),
                "--stop-after",
                "3",
            ]))
            .unwrap();
            let (mid, _) = read(stopped.path(), method);
            assert_eq!(mid["steps"], 3);
            run(args(&[
                "--method",
                method,
                "--out",
                &out(&stopped),
                "--resume",
            ]))
            .unwrap();
            let (a, ta) = read(straight.path(), method);
            let (b, tb) = read(stopped.path(), method);
            assert_eq!(a["steps"], 6);
            assert_eq!(a, b, "{method}: counters, active blocks or sampler differ");
            assert_eq!(ta.len(), tb.len());
            for ((na, va), (nb, vb)) in ta.iter().zip(&tb) {
                assert_eq!(na, nb);
                assert_eq!(va, vb, "{method}: {na} differs after resume");
            }
        }
    }
}
