//! Fine-tune a Llama-family model with LISA, LoRA or full AdamW, side by side.
//!
//! `cargo run --release --example finetune` fine-tunes the bundled tiny checkpoint on a
//! bundled task (sorting five digits: prompt `31415=`, answer `11345`, exact match on 200
//! held-out problems; `--task add` for two-digit addition) with all three methods, and writes
//! `metrics.jsonl`, `summary.json`, `loss.png`, the fine-tuned models and crash-safe
//! checkpoints under `--out` (default `runs/finetune`).
//! `--help` lists the flags. Everything but the command line, the progress bar and the plot
//! is the library's [`train`](candle_lisa::train) module. Peak memory is the peak of live heap
//! bytes, counted by a global allocator in this program (CPU); on CUDA it is device memory.
//!
//! Data-parallel, `--dist mpi` (built with `--features mpi`) runs one rank per process under
//! `mpirun -n N`, and `--dist nccl` (built with `--features nccl`) one per GPU; each rank
//! trains on its share of every batch, and rank 0 alone prints, evaluates and writes.

#[path = "common/mod.rs"]
mod common;
#[path = "common/plot.rs"]
mod plot;

use std::path::{Path, PathBuf};
use std::rc::Rc;

use candle_core::{DType, Device};
use candle_lisa::data::chat::{ChatTemplate, SpecialTokens};
use candle_lisa::data::tokenizer::TextTokenizer;
use candle_lisa::data::{tokenizer_for, Dataset};
use candle_lisa::dist::Communicator;
use candle_lisa::models::SaveOptions;
use candle_lisa::optim::{CompactState, SamplerChoice};
use candle_lisa::train::{
    self, owlore_weights, Checkpointer, Cosine, FitEvent, FitOptions, JsonlSink, LlamaFineTune,
    MetricsSink, TrainerConfig,
};
use candle_lisa::{load_llama, LisaConfig, LisaError, LlamaConfig, LoraConfig};
use candle_nn::ParamsAdamW;
use clap::{Parser, ValueEnum};
use serde_json::json;

use candle_lisa_testkit::alloc;

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

type Error = Box<dyn std::error::Error>;

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum MethodArg {
    Lisa,
    Lora,
    Full,
    All,
}

/// Fine-tune a Llama-family model with LISA, LoRA or full AdamW.
#[derive(Parser, Debug, Clone)]
#[command(version, about)]
struct Args {
    /// Which method to run; `all` runs the three on the same data and seed.
    #[arg(long, value_enum, default_value = "all")]
    method: MethodArg,
    /// A Hugging Face Llama-family directory (config.json, model.safetensors, optionally
    /// tokenizer.json). Default: the bundled tiny checkpoint.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Training data: plain text (`.txt`), JSONL with "prompt" and "response" fields, or chat
    /// JSONL with "messages" (rendered with the model's chat template; only the assistant
    /// turns are trained on). Default: the bundled task (--task).
    #[arg(long)]
    data: Option<PathBuf>,
    /// The bundled task, without --data: `sort` (five digits into ascending order: `31415=` →
    /// `11345`) or `add` (`12+34=` → `46`); exact match on 200 held-out problems.
    #[arg(long, default_value = "sort", value_parser = ["sort", "add"])]
    task: String,
    /// A Jinja chat template for chat data, when the model directory has none
    /// (`chat_template.jinja` or `tokenizer_config.json`).
    #[arg(long)]
    chat_template: Option<PathBuf>,
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda", "metal"])]
    device: String,
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    dtype: String,
    #[arg(long, default_value_t = 500)]
    steps: usize,
    /// Examples per optimizer step.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Split each step's batch into this many micro-batches (gradient accumulation).
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Longest training sequence; shorter examples are padded to the longest in the batch.
    #[arg(long, default_value_t = 24)]
    seq_len: usize,
    /// Peak learning rate (linear warm-up over 5% of the steps, then cosine to a tenth).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// AdamW weight decay (never on norms, biases and embeddings).
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Clip the global gradient norm to this; 0 turns clipping off.
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// LISA: blocks trained at a time.
    #[arg(long, default_value_t = 2)]
    gamma: usize,
    /// LISA: steps between two draws of the active blocks.
    #[arg(long, default_value_t = 20)]
    period: usize,
    /// LISA: how blocks are drawn: uniform, ascending, descending, reshuffle, gradnorm, or
    /// weighted:W0,W1,… (one weight per block).
    #[arg(long, default_value = "uniform")]
    sampler: SamplerChoice,
    /// LISA: sample blocks by OwLore's outlier ratios with threshold M (instead of --sampler),
    /// from a calibration pass over 64 training examples before training.
    #[arg(long, value_name = "M")]
    owlore: Option<f64>,
    /// LISA: recompute frozen blocks in the backward pass instead of keeping their
    /// activations (less memory, one more forward of each frozen block).
    #[arg(long)]
    recompute_frozen: bool,
    #[arg(long, default_value_t = 16)]
    lora_rank: usize,
    /// Keep AdamW moments in bf16 (stochastic rounding): `off`, `always` (the always-trainable
    /// parameters: embedding, head, final norm; every parameter in full fine-tuning and LoRA)
    /// or `all`. CPU only.
    #[arg(long, default_value = "off", value_parser = ["off", "always", "all"])]
    compact_state: String,
    /// LoRA alpha (default: twice the rank).
    #[arg(long)]
    lora_alpha: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Steps between evaluations.
    #[arg(long, default_value_t = 50)]
    eval_every: usize,
    /// How many held-out examples each evaluation uses (at most the held-out split: 200 for
    /// the bundled task, a tenth of a JSONL file).
    #[arg(long, default_value_t = 200)]
    eval_size: usize,
    /// Steps between checkpoints (`<out>/<method>/checkpoints/step-N`; default: --eval-every).
    #[arg(long)]
    save_every: Option<usize>,
    /// How many checkpoints to keep.
    #[arg(long, default_value_t = 2)]
    keep: usize,
    #[arg(long, default_value = "runs/finetune")]
    out: PathBuf,
    /// Also write TensorBoard event files, one run per method: DIR/<method>/.
    #[arg(long, value_name = "DIR")]
    tensorboard: Option<PathBuf>,
    /// Continue each method from its newest complete checkpoint in --out.
    #[arg(long)]
    resume: bool,
    /// Data-parallel training: `mpi` for CPU processes launched by `mpirun -n N` (build with
    /// `--features mpi`), `nccl` for one process per GPU (build with `--features nccl`; rank
    /// and world size from RANK/WORLD_SIZE/LOCAL_RANK or Open MPI's environment). --batch-size
    /// is the batch of all ranks together.
    #[arg(long, default_value = "none", value_parser = ["none", "mpi", "nccl"])]
    dist: String,
    /// `--dist nccl`: the file through which rank 0 hands the other ranks the NCCL id (on a
    /// file system they share; rank 0 removes it once every rank has joined).
    #[arg(long, default_value = "runs/nccl-id")]
    nccl_id_file: PathBuf,
    /// Stop after this step as if interrupted.
    #[arg(long, hide = true)]
    stop_after: Option<usize>,
    /// Fault injection: SIGKILL this process after this many checkpoint files were written.
    #[arg(long, hide = true)]
    kill_after_writes: Option<usize>,
    /// Fault injection: SIGKILL this process right after this step's update.
    #[arg(long, hide = true)]
    kill_at_step: Option<usize>,
    /// Fault injection: make this step's loss NaN (one trainable weight is NaN during the
    /// step), so that the trainer skips it.
    #[arg(long, hide = true)]
    poison_step: Option<usize>,
}

/// `--poison-step`: the first trainable weight (by name: an always-trainable one) is NaN
/// during that step, so its loss is NaN and the trainer skips it, as it would a step that
/// overflowed.
struct Poison {
    at: usize,
    var: candle_core::Var,
    /// The weight's value before step `at`, while it is poisoned.
    saved: std::cell::RefCell<Option<candle_core::Tensor>>,
}

impl Poison {
    fn new(at: Option<usize>, run: &LlamaFineTune) -> Result<Option<Self>, Error> {
        let Some(at) = at else { return Ok(None) };
        let (_, var) = run
            .trainer
            .optimizer()
            .trainable_vars()
            .next()
            .ok_or("nothing trains")?;
        let saved = std::cell::RefCell::new(None);
        Ok(Some(Self {
            at,
            var: var.clone(),
            saved,
        }))
    }

    /// Before step `at`: the weight is kept aside and becomes NaN.
    fn before(&self, step: usize) -> candle_core::Result<()> {
        if step == self.at {
            let saved = self.var.as_tensor().copy()?;
            self.var.set(&(saved.ones_like()? * f64::NAN)?)?;
            *self.saved.borrow_mut() = Some(saved);
        }
        Ok(())
    }

    /// After step `at` (before its checkpoint): the weight is restored.
    fn after(&self, step: usize) -> candle_core::Result<()> {
        match (step == self.at, self.saved.borrow_mut().take()) {
            (true, Some(saved)) => self.var.set(&saved),
            _ => Ok(()),
        }
    }
}

/// The data --data names, or the bundled --task; chat data is rendered with --chat-template
/// or the model's own template.
fn load_data(args: &Args, tok: &dyn TextTokenizer, eos: u32) -> Result<Dataset, Error> {
    let Some(path) = &args.data else {
        return Ok(Dataset::from_task(args.task.parse()?, args.seed, tok, eos)?);
    };
    if let Err(e) = std::fs::File::open(path) {
        return Err(format!("cannot read --data {}: {e}", path.display()).into());
    }
    let model_dir = model_dir(args);
    let template = || match &args.chat_template {
        Some(file) => ChatTemplate::from_file_for_dir(file, &model_dir),
        None => ChatTemplate::from_dir(&model_dir)?.ok_or_else(|| LisaError::InvalidData {
            path: path.clone(),
            reason: format!(
                "it is chat data but {} has no chat template; pass --chat-template FILE",
                model_dir.display()
            ),
        }),
    };
    Ok(Dataset::from_file(path, tok, eos, args.seq_len, template)?)
}

/// The model directory: --model, or the bundled checkpoint.
fn model_dir(args: &Args) -> PathBuf {
    args.model
        .clone()
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny-llama"))
}

/// One method's fine-tuning set-up.
fn fine_tune(
    method: MethodArg,
    args: &Args,
    model_dir: &Path,
    data: &Dataset,
    dtype: DType,
    dev: &Device,
) -> Result<LlamaFineTune, Error> {
    let (config, base) = load_llama(model_dir, dtype, dev)?;
    let sampler = match args.owlore {
        Some(m) if method == MethodArg::Lisa => {
            let examples = &data.train[..data.train.len().min(64)];
            let ratios = owlore_weights(&config, &base, examples, m, args.seq_len, dev)?;
            let shown: Vec<String> = ratios.iter().map(|r| format!("{r:.4}")).collect();
            eprintln!("OwLore outlier ratios (M = {m}): [{}]", shown.join(", "));
            SamplerChoice::Weighted(ratios)
        }
        _ => args.sampler.clone(),
    };
    let params = ParamsAdamW {
        lr: args.lr,
        weight_decay: args.weight_decay,
        ..Default::default()
    };
    let method = match method {
        MethodArg::Lisa => train::Method::Lisa(LisaConfig {
            gamma: args.gamma,
            period: args.period,
            seed: args.seed,
            sampler,
            recompute_frozen: args.recompute_frozen,
            ..Default::default()
        }),
        MethodArg::Lora => {
            let alpha = args.lora_alpha.unwrap_or(2.0 * args.lora_rank as f64);
            train::Method::Lora(
                LoraConfig {
                    rank: args.lora_rank,
                    alpha,
                    ..Default::default()
                },
                args.seed,
            )
        }
        MethodArg::Full | MethodArg::All => train::Method::Full,
    };
    let warmup = (args.steps / 20).max(1);
    let schedule = Cosine {
        peak: args.lr,
        warmup,
        total: args.steps,
        min: 0.1 * args.lr,
    };
    let clip = (args.max_grad_norm > 0.0).then_some(args.max_grad_norm);
    let cfg = TrainerConfig {
        max_grad_norm: clip,
        ..Default::default()
    };
    Ok(LlamaFineTune::new(
        config, base, method, params, schedule, cfg,
    )?)
}

/// Everything a resumed run must share with the one it continues (its hash is in each
/// checkpoint's manifest).
fn run_config(args: &Args, method: &str) -> serde_json::Value {
    json!({
        "method": method, "model": args.model, "data": args.data, "task": args.task, "dtype": args.dtype,
        "chat_template": args.chat_template,
        "steps": args.steps, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
        "seq_len": args.seq_len, "lr": args.lr, "weight_decay": args.weight_decay,
        "max_grad_norm": args.max_grad_norm, "gamma": args.gamma, "period": args.period,
        "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha, "seed": args.seed,
        "sampler": format!("{:?}", args.sampler), "owlore": args.owlore,
        "recompute_frozen": args.recompute_frozen, "compact_state": args.compact_state,
    })
}

/// Trains one method; returns its summary line for `summary.json`.
#[allow(clippy::too_many_arguments)]
fn train(
    method: MethodArg,
    args: &Args,
    model_dir: &Path,
    data: &Dataset,
    eos: u32,
    dtype: DType,
    dev: &Device,
    comm: Option<&Rc<dyn Communicator>>,
) -> Result<serde_json::Value, Error> {
    let name = format!("{method:?}").to_lowercase();
    let heap_base = alloc::reset_peak();
    let mut run = fine_tune(method, args, model_dir, data, dtype, dev)?;
    let compact: CompactState = args.compact_state.parse()?;
    run.trainer.optimizer_mut().set_compact_state(compact)?;
    if let Some(comm) = comm {
        run.trainer.set_communicator(Box::new(comm.clone()))?;
    }
    let (rank, world) = (run.trainer.rank(), run.trainer.world_size());
    let dir = args.out.join(&name);
    if !args.resume && rank == 0 {
        // A fresh run: an older run's checkpoints would otherwise be the newest to resume.
        let _ = std::fs::remove_dir_all(dir.join("checkpoints"));
    }
    let mut ck = Checkpointer::new(dir.join("checkpoints"), args.keep, &run_config(args, &name))?;
    if let Some(limit) = args.kill_after_writes {
        let written = std::sync::atomic::AtomicUsize::new(0);
        ck = ck.on_write(move |_| {
            if written.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 >= limit {
                common::kill_self();
            }
        });
    }
    let start = match args.resume {
        true => run.trainer.resume(&ck)?.unwrap_or(0) as usize,
        false => 0,
    };
    let metrics = args.out.join("metrics.jsonl");
    // Rank 0 alone writes metrics; the others' sink goes nowhere.
    let mut sink = match rank {
        0 => {
            common::truncate_metrics(&metrics, &name, start as u64)?;
            Some(JsonlSink::append(&metrics)?)
        }
        _ => None,
    };
    let mut tensorboard = match (rank, &args.tensorboard) {
        (0, Some(dir)) => Some(train::TensorBoardSink::create(
            dir.join(&name),
            start as u64,
        )?),
        _ => None,
    };
    let pb = match rank {
        0 => indicatif::ProgressBar::new(args.steps as u64),
        _ => indicatif::ProgressBar::hidden(),
    }
    .with_prefix(name.clone())
    .with_position(start as u64);
    pb.set_style(indicatif::ProgressStyle::with_template(
        "{prefix:>5} [{bar:30}] {pos}/{len} {msg}",
    )?);
    let device_peak = common::DevicePeak::new(dev)?;
    let options = FitOptions {
        name: name.clone(),
        steps: args.steps,
        batch_size: args.batch_size,
        grad_accum: args.grad_accum,
        seq_len: args.seq_len,
        seed: args.seed,
        eval_every: args.eval_every,
        eval_size: args.eval_size,
        save_every: args.save_every.unwrap_or(args.eval_every),
        eos,
    };
    let poison = Poison::new(args.poison_step, &run)?;
    let mut sinks: Vec<&mut dyn MetricsSink> = Vec::new();
    sinks.extend(sink.as_mut().map(|s| s as &mut dyn MetricsSink));
    sinks.extend(tensorboard.as_mut().map(|s| s as &mut dyn MetricsSink));
    let fit = run.fit(
        data,
        &options,
        start,
        args.stop_after,
        Some(&ck),
        &mut sinks,
        |event| {
            match event {
                FitEvent::BeforeStep { step } => {
                    if let Some(p) = &poison {
                        p.before(step)?;
                    }
                }
                FitEvent::Step {
                    step,
                    report,
                    active_blocks,
                    tokens_per_second,
                } => {
                    if args.kill_at_step == Some(step) {
                        common::kill_self();
                    }
                    if let Some(p) = &poison {
                        p.after(step)?;
                    }
                    let (loss, tps) = (report.loss, tokens_per_second);
                    pb.set_message(format!(
                        "loss {loss:.3} {tps:.0} tok/s blocks {active_blocks:?}"
                    ));
                    pb.set_position(step as u64);
                }
                FitEvent::Eval {
                    step,
                    loss,
                    accuracy,
                } => {
                    let acc =
                        accuracy.map_or(String::new(), |a| format!(", accuracy {:.1}%", 100.0 * a));
                    common::say(
                        &pb,
                        format!("{name:>5} step {step:4}: eval loss {loss:.3}{acc}"),
                    );
                }
            }
            Ok(())
        },
    )?;
    pb.finish_and_clear();
    if rank != 0 {
        return Ok(json!({"method": name, "rank": rank}));
    }
    // The tokenizer files travel with the weights, so the saved model can be used as it is.
    let options = SaveOptions {
        copy_files_from: Some(model_dir.to_path_buf()),
        ..Default::default()
    };
    run.save_model_with(dir.join("model"), dtype, &options)?;
    // LoRA's adapters alone, in PEFT's format (PeftModel.from_pretrained loads them).
    let base = model_dir.to_string_lossy();
    run.save_adapter(dir.join("adapter"), dtype, Some(&base))?;
    // The training loss of the last ten steps, those before a resume included.
    let mut losses: Vec<f32> = train::read_jsonl(&metrics)?
        .iter()
        .filter(|l| l["method"] == name.as_str())
        .map(|l| l["loss"].as_f64().map_or(f32::NAN, |x| x as f32))
        .collect();
    losses.drain(..losses.len().saturating_sub(10));
    let final_train_loss = losses.iter().sum::<f32>() / losses.len().max(1) as f32;
    let opt = run.trainer.optimizer();
    let device_peak = device_peak.peak()?;
    Ok(json!({
        "method": name, "steps": args.steps,
        "final_train_loss": final_train_loss, "eval_loss": fit.eval_loss, "accuracy": fit.accuracy,
        "wall_seconds": fit.wall_seconds, "tokens_per_second": fit.tokens as f64 / fit.wall_seconds,
        "peak_bytes": device_peak.unwrap_or(alloc::peak() - heap_base),
        "peak_source": if device_peak.is_some() { "high-water mark of the CUDA memory pool over the run, weights included" } else { "heap above the method's start, counted by the allocator" },
        "trainable_params": opt.trainable_params(), "state_bytes": opt.state_bytes(),
        "skipped_steps": run.trainer.skipped_steps(), "world_size": world,
        "all_reduced_bytes_per_step": fit.all_reduced_bytes_per_step,
    }))
}

fn run(args: Args) -> Result<Vec<serde_json::Value>, Error> {
    common::keep_freed_memory();
    if args.steps == 0
        || args.batch_size == 0
        || args.seq_len < 2
        || args.eval_every == 0
        || args.grad_accum == 0
        || args.save_every == Some(0)
    {
        return Err("--steps, --batch-size, --grad-accum, --eval-every and --save-every must be at least 1, --seq-len at least 2".into());
    }
    let (comm, dev) = communicator(&args)?;
    let dtype: DType = args.dtype.parse()?;
    let model_dir = model_dir(&args);
    if !model_dir.join("config.json").is_file() {
        let dir = model_dir.display();
        return Err(format!(
            "--model {dir}: no config.json there; point it at a Hugging Face model directory"
        )
        .into());
    }
    let config = LlamaConfig::from_file(model_dir.join("config.json"))?;
    if args.gamma == 0 || args.gamma > config.num_hidden_layers {
        let n = config.num_hidden_layers;
        return Err(format!(
            "--gamma {} is out of range: the model has {n} blocks",
            args.gamma
        )
        .into());
    }
    let tok = tokenizer_for(&model_dir)?;
    if tok.vocab_size() > config.vocab_size {
        return Err(format!(
            "the tokenizer has {} ids but the model only {}",
            tok.vocab_size(),
            config.vocab_size
        )
        .into());
    }
    // The end of a turn as the model's files define it (generation_config.json, config.json,
    // tokenizer_config.json, in transformers' precedence).
    let special = SpecialTokens::from_dir(&model_dir, tok.as_ref())?;
    let eos = special
        .eos
        .first()
        .copied()
        .ok_or("the model defines no end-of-sequence token")?;
    let data = load_data(&args, tok.as_ref(), eos)?;
    let rank = comm.as_ref().map_or(0, |c| c.rank());
    std::fs::create_dir_all(&args.out)?;
    let metrics = args.out.join("metrics.jsonl");
    if !args.resume && rank == 0 {
        let _ = std::fs::remove_file(&metrics);
    }
    let methods = match args.method {
        MethodArg::All => vec![MethodArg::Lisa, MethodArg::Lora, MethodArg::Full],
        m => vec![m],
    };
    let (mut summaries, mut curves) = (Vec::new(), Vec::new());
    for method in methods {
        let summary = train(
            method,
            &args,
            &model_dir,
            &data,
            eos,
            dtype,
            &dev,
            comm.as_ref(),
        )?;
        if rank != 0 {
            continue;
        }
        let name = summary["method"].as_str().unwrap_or_default().to_string();
        let (train_curve, eval_curve) = plot::curves_from_metrics(&metrics, &name)?;
        curves.push((name, train_curve, eval_curve));
        summaries.push(summary);
    }
    if rank != 0 {
        return Ok(summaries);
    }
    std::fs::write(
        args.out.join("summary.json"),
        serde_json::to_string_pretty(&summaries)? + "\n",
    )?;
    plot::plot(&args.out.join("loss.png"), &curves, args.steps)?;
    plot::print_summaries(&summaries);
    println!(
        "wrote {}/{{metrics.jsonl,summary.json,loss.png}} and the models under it",
        args.out.display()
    );
    Ok(summaries)
}

/// The communicator `--dist` asks for, and the device of this rank.
fn communicator(args: &Args) -> Result<(Option<Rc<dyn Communicator>>, Device), Error> {
    match args.dist.as_str() {
        "none" => Ok((None, common::device(&args.device)?)),
        #[cfg(feature = "mpi")]
        "mpi" => {
            let mpi = candle_lisa::dist::Mpi::init()?;
            Ok((Some(Rc::new(mpi)), common::device(&args.device)?))
        }
        #[cfg(feature = "nccl")]
        "nccl" => {
            use candle_lisa::dist::{Nccl, NcclId, RankEnv};
            let RankEnv {
                rank,
                world_size: world,
                local_rank,
            } = RankEnv::from_env()?;
            if args.device != "cuda" {
                return Err("--dist nccl trains on GPUs: add --device cuda".into());
            }
            let dev = Device::new_cuda(local_rank)?;
            let wait = std::time::Duration::from_secs(300);
            let id = NcclId::share_through_file(&args.nccl_id_file, rank, wait)?;
            let nccl = Nccl::new(&dev, rank, world, id)?;
            // Every rank has joined: the next launch must not find this run's id.
            if rank == 0 {
                std::fs::remove_file(&args.nccl_id_file)?;
            }
            Ok((Some(Rc::new(nccl)), dev))
        }
        other => {
            Err(format!("--dist {other} needs this example built with `--features {other}`").into())
        }
    }
}

/// The exit status for a run's result, printing the error.
fn exit_code<T>(result: &Result<T, Error>) -> i32 {
    result.as_ref().map_or_else(
        |e| {
            eprintln!("error: {e}");
            2
        },
        |_| 0,
    )
}

fn main() {
    common::setup();
    std::process::exit(exit_code(&run(Args::parse())));
}

#[cfg(test)]
#[path = "common/finetune_tests.rs"]
mod tests;
