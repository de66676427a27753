//! [`FinetuneConfig`] and [`finetune`]: a whole fine-tuning run described by data (the model,
//! the data, the methods and every setting), as `candle-lisa finetune --config run.toml` and
//! the `finetune` example run it.
//!
//! A config is what a run file holds: every key has a default ([`FinetuneConfig::default`]),
//! unknown keys are refused, and the values stay as written (`dtype = "bf16"`); [`finetune`]
//! checks them against the model before anything trains. The run writes, under `out`:
//! `run.json` (the config it ran, which `--config` takes back), `metrics.jsonl`,
//! `summary.json`, and per method `model/` (Hugging Face layout, LoRA merged), `adapter/`
//! (LoRA, PEFT's format) and `checkpoints/`, whose manifests carry the hash of the settings
//! that change the math ([`FinetuneConfig::run_identity`]), so a resume under other settings
//! is refused.
//!
//! ```no_run
//! use candle_lisa::train::recipe::{finetune, FinetuneConfig, MethodChoice, RunOptions};
//! let config = FinetuneConfig {
//!     method: MethodChoice::Lisa,
//!     steps: 20,
//!     out: "runs/quick".into(),
//!     ..Default::default()
//! };
//! let summaries = finetune(&config, &RunOptions::default(), &mut ())?;
//! println!("{}", summaries[0].final_train_loss);
//! # Ok::<(), candle_lisa::LisaError>(())
//! ```

use std::path::{Path, PathBuf};
use std::rc::Rc;

use candle_core::{DType, Device};
use candle_nn::ParamsAdamW;
use serde::{Deserialize, Serialize};

use super::checkpoint::Checkpointer;
use super::finetune::{owlore_weights, LlamaFineTune, Method};
use super::fit::{FitEvent, FitOptions};
use super::metrics::{read_jsonl, JsonlSink, MetricsSink, TensorBoardSink};
use super::schedule::Cosine;
use super::trainer::TrainerConfig;
use crate::data::chat::{ChatTemplate, SpecialTokens};
use crate::data::tokenizer::TextTokenizer;
use crate::data::{tokenizer_for, Dataset, Task};
use crate::dist::Communicator;
use crate::error::{LisaError, Result};
use crate::models::{load_llama, LlamaConfig, SaveOptions};
use crate::nn::LoraConfig;
use crate::optim::{CompactState, LisaConfig, SamplerChoice};

/// Which method a run trains with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum MethodChoice {
    /// LISA: γ sampled blocks at a time, the embedding and head always.
    Lisa,
    /// LoRA adapters on every projection.
    Lora,
    /// AdamW over every weight.
    Full,
    /// The three, one after the other, on the same data and seed.
    #[default]
    All,
}

impl MethodChoice {
    /// The methods this choice runs, by name.
    pub fn methods(self) -> &'static [&'static str] {
        match self {
            Self::Lisa => &["lisa"],
            Self::Lora => &["lora"],
            Self::Full => &["full"],
            Self::All => &["lisa", "lora", "full"],
        }
    }
}

/// Every setting of a fine-tuning run: the keys of a run file, the flags of
/// `candle-lisa finetune` (and the `finetune` example) under the same names with `-` for `_`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct FinetuneConfig {
    /// Which method to run; `all` runs the three on the same data and seed.
    #[cfg_attr(feature = "cli", arg(long, value_enum, default_value = "all"))]
    pub method: MethodChoice,
    /// A Hugging Face Llama-family directory (config.json, model.safetensors, optionally
    /// tokenizer.json), or a Hub id (`org/name`, `org/name@revision`) found in the local
    /// Hugging Face cache ([`models::hub`](crate::models::hub); nothing is downloaded).
    /// Default: the bundled tiny checkpoint.
    #[cfg_attr(feature = "cli", arg(long))]
    pub model: Option<PathBuf>,
    /// Training data: plain text (`.txt`), JSONL with "prompt" and "response" fields, or chat
    /// JSONL with "messages" (rendered with the model's chat template; only the assistant
    /// turns are trained on). Default: the bundled task (`task`).
    #[cfg_attr(feature = "cli", arg(long))]
    pub data: Option<PathBuf>,
    /// The bundled task, without `data`: `sort` (five digits into ascending order: `31415=` →
    /// `11345`) or `add` (`12+34=` → `46`); exact match on 200 held-out problems.
    #[cfg_attr(feature = "cli", arg(long, default_value = "sort", value_parser = ["sort", "add"]))]
    pub task: String,
    /// A Jinja chat template for chat data, when the model directory has none
    /// (`chat_template.jinja` or `tokenizer_config.json`).
    #[cfg_attr(feature = "cli", arg(long))]
    pub chat_template: Option<PathBuf>,
    /// `cpu`, `cuda` (built with the feature `cuda`) or `metal` (feature `metal`).
    #[cfg_attr(feature = "cli", arg(long, default_value = "cpu", value_parser = ["cpu", "cuda", "metal"]))]
    pub device: String,
    /// The weights' dtype: `f32`, `bf16` or `f16` (f32 master weights and moments for what
    /// trains in the half-precision ones).
    #[cfg_attr(feature = "cli", arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"]))]
    pub dtype: String,
    /// Optimizer steps.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 500))]
    pub steps: usize,
    /// Examples per optimizer step.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 16))]
    pub batch_size: usize,
    /// Split each step's batch into this many micro-batches (gradient accumulation).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 1))]
    pub grad_accum: usize,
    /// Longest training sequence; shorter examples are padded to the longest in the batch.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 24))]
    pub seq_len: usize,
    /// Peak learning rate (linear warm-up over 5% of the steps, then cosine to a tenth).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 1e-3))]
    pub lr: f64,
    /// AdamW weight decay (never on norms, biases and embeddings).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0.0))]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this; 0 turns clipping off.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 1.0))]
    pub max_grad_norm: f64,
    /// LISA: blocks trained at a time.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 2))]
    pub gamma: usize,
    /// LISA: steps between two draws of the active blocks.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 20))]
    pub period: usize,
    /// LISA: how blocks are drawn: `uniform`, `ascending`, `descending`, `reshuffle`,
    /// `gradnorm`, or `weighted:W0,W1,…` (one weight per block).
    #[cfg_attr(feature = "cli", arg(long, default_value = "uniform"))]
    pub sampler: String,
    /// LISA: sample blocks by OwLore's outlier ratios with threshold M (instead of
    /// `sampler`), from a calibration pass over 64 training examples before training.
    #[cfg_attr(feature = "cli", arg(long, value_name = "M"))]
    pub owlore: Option<f64>,
    /// LISA: recompute frozen blocks in the backward pass instead of keeping their
    /// activations (less memory, one more forward of each frozen block).
    #[cfg_attr(feature = "cli", arg(long))]
    pub recompute_frozen: bool,
    /// LoRA rank.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 16))]
    pub lora_rank: usize,
    /// LoRA alpha (default: twice the rank).
    #[cfg_attr(feature = "cli", arg(long))]
    pub lora_alpha: Option<f64>,
    /// Keep AdamW moments in bf16 (stochastic rounding): `off`, `always` (the
    /// always-trainable parameters: embedding, head, final norm; every parameter in full
    /// fine-tuning and LoRA) or `all`. CPU only.
    #[cfg_attr(feature = "cli", arg(long, default_value = "off", value_parser = ["off", "always", "all"]))]
    pub compact_state: String,
    /// Seeds the data order, the splits, LoRA's initialisation and LISA's draws.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0))]
    pub seed: u64,
    /// Steps between evaluations.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 50))]
    pub eval_every: usize,
    /// How many held-out examples each evaluation uses (at most the held-out split: 200 for
    /// the bundled task, a tenth of a JSONL file).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 200))]
    pub eval_size: usize,
    /// Steps between checkpoints (`<out>/<method>/checkpoints/step-N`; default:
    /// `eval_every`).
    #[cfg_attr(feature = "cli", arg(long))]
    pub save_every: Option<usize>,
    /// How many checkpoints to keep.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 2))]
    pub keep: usize,
    /// Where the run writes.
    #[cfg_attr(feature = "cli", arg(long, default_value = "runs/finetune"))]
    pub out: PathBuf,
    /// Also write TensorBoard event files: one run per method, in a folder of DIR named after it.
    #[cfg_attr(feature = "cli", arg(long, value_name = "DIR"))]
    pub tensorboard: Option<PathBuf>,
    /// Data-parallel training: `mpi` for CPU processes launched by `mpirun -n N` (feature
    /// `mpi`), `nccl` for one process per GPU (feature `nccl`; rank and world size from
    /// RANK/WORLD_SIZE/LOCAL_RANK or Open MPI's environment). `batch_size` is the batch of all
    /// ranks together.
    #[cfg_attr(feature = "cli", arg(long, default_value = "none", value_parser = ["none", "mpi", "nccl"]))]
    pub dist: String,
    /// `dist = "nccl"`: the file through which rank 0 hands the other ranks the NCCL id (on a
    /// file system they share; rank 0 removes it once every rank has joined).
    #[cfg_attr(feature = "cli", arg(long, default_value = "runs/nccl-id"))]
    pub nccl_id_file: PathBuf,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        Self {
            method: MethodChoice::All,
            model: None,
            data: None,
            task: "sort".into(),
            chat_template: None,
            device: "cpu".into(),
            dtype: "f32".into(),
            steps: 500,
            batch_size: 16,
            grad_accum: 1,
            seq_len: 24,
            lr: 1e-3,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            gamma: 2,
            period: 20,
            sampler: "uniform".into(),
            owlore: None,
            recompute_frozen: false,
            lora_rank: 16,
            lora_alpha: None,
            compact_state: "off".into(),
            seed: 0,
            eval_every: 50,
            eval_size: 200,
            save_every: None,
            keep: 2,
            out: "runs/finetune".into(),
            tensorboard: None,
            dist: "none".into(),
            nccl_id_file: "runs/nccl-id".into(),
        }
    }
}

impl FinetuneConfig {
    /// The model directory: `model` (a directory, or a Hub id in the local cache), or the
    /// bundled tiny checkpoint.
    ///
    /// # Errors
    /// Those of [`resolve_model`](crate::models::hub::resolve_model).
    pub fn model_dir(&self) -> Result<PathBuf> {
        match &self.model {
            Some(name) => crate::models::hub::resolve_model(name),
            None => Ok(Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny-llama")),
        }
    }

    /// What a resumed run of `method` must share with the one it continues: every setting
    /// that changes the math (not where it writes, how often it evaluates or how many
    /// checkpoints it keeps). Its hash is in each checkpoint's manifest.
    pub fn run_identity(&self, method: &str) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(map) = v.as_object_mut() {
            for key in [
                "device",
                "eval_every",
                "eval_size",
                "save_every",
                "keep",
                "out",
                "tensorboard",
                "dist",
                "nccl_id_file",
            ] {
                map.remove(key);
            }
            map.insert("method".into(), method.into());
        }
        v
    }

    /// The settings checked against each other and parsed, before anything loads.
    fn settings(&self) -> Result<Settings> {
        let arg = |what: &'static str, reason: String| LisaError::InvalidArgument { what, reason };
        for (what, value) in [
            ("steps", self.steps),
            ("batch_size", self.batch_size),
            ("grad_accum", self.grad_accum),
            ("eval_every", self.eval_every),
            ("save_every", self.save_every.unwrap_or(1)),
        ] {
            if value == 0 {
                return Err(arg(what, "it must be at least 1".into()));
            }
        }
        if self.seq_len < 2 {
            return Err(arg("seq_len", format!("{} is below 2", self.seq_len)));
        }
        let dtype = match self.dtype.as_str() {
            "f32" => DType::F32,
            "bf16" => DType::BF16,
            "f16" => DType::F16,
            other => return Err(arg("dtype", format!("{other:?}: use f32, bf16 or f16"))),
        };
        Ok(Settings {
            dtype,
            task: self.task.parse()?,
            sampler: self.sampler.parse().map_err(|e| arg("sampler", e))?,
            compact: self.compact_state.parse()?,
        })
    }
}

/// A config's values, parsed.
struct Settings {
    dtype: DType,
    task: Task,
    sampler: SamplerChoice,
    compact: CompactState,
}

/// How [`finetune`] runs a config, beyond the config itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunOptions {
    /// Continue each method from its newest complete checkpoint under `out`; without it, a
    /// method's old checkpoints and metrics are removed first.
    pub resume: bool,
    /// Stop after this step, as if interrupted.
    pub stop_after: Option<usize>,
}

/// What one method's run did: a line of `summary.json`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MethodSummary {
    /// `lisa`, `lora` or `full`.
    pub method: String,
    /// This process's rank (0 without data parallelism).
    pub rank: usize,
    /// The run's last step.
    pub steps: usize,
    /// Mean training loss of the last ten steps, those before a resume included.
    pub final_train_loss: f32,
    /// The last held-out loss (NaN off rank 0).
    pub eval_loss: f32,
    /// The last exact-match accuracy, for prompt/response data.
    pub accuracy: Option<f32>,
    /// Wall-clock seconds of this call's steps.
    pub wall_seconds: f64,
    /// Input tokens per second over this call's steps.
    pub tokens_per_second: f64,
    /// Peak memory, as the observer measured it ([`FinetuneObserver::method_done`]).
    pub peak_bytes: Option<usize>,
    /// What `peak_bytes` counts.
    pub peak_source: Option<String>,
    /// Parameters trainable at the end.
    pub trainable_params: usize,
    /// Optimizer state bytes at the end.
    pub state_bytes: usize,
    /// Steps skipped for a non-finite loss or gradient.
    pub skipped_steps: u64,
    /// Ranks.
    pub world_size: usize,
    /// Bytes this rank handed to the all-reduce, per step.
    pub all_reduced_bytes_per_step: f64,
}

/// What a caller of [`finetune`] sees of the run: progress, fault injection, memory figures.
/// Every method has a default that does nothing; `()` observes nothing.
pub trait FinetuneObserver {
    /// `method` is about to load its model.
    fn method_starts(&mut self, _method: &str) -> Result<()> {
        Ok(())
    }

    /// The checkpointer `method` saves with; the observer may wrap it (e.g.
    /// [`Checkpointer::on_write`]).
    fn checkpointer(&mut self, _method: &str, checkpointer: Checkpointer) -> Checkpointer {
        checkpointer
    }

    /// `method` is set up and about to train from step `start + 1` (`start` > 0 after a
    /// resume).
    fn fitting(&mut self, _method: &str, _run: &LlamaFineTune, _start: usize) -> Result<()> {
        Ok(())
    }

    /// A step or evaluation of `method` (see [`LlamaFineTune::fit`]); an error stops the run.
    fn event(&mut self, _method: &str, _event: &FitEvent<'_>) -> Result<()> {
        Ok(())
    }

    /// `method` finished training; the summary is written after this returns.
    fn method_done(&mut self, _summary: &mut MethodSummary) -> Result<()> {
        Ok(())
    }
}

impl FinetuneObserver for () {}

/// Runs `config`: each of its methods in turn on the same data, with checkpoints, metrics and
/// the outputs the [module docs](self) list. Data-parallel (`dist`), rank 0 alone evaluates
/// and writes. Returns one summary per method.
///
/// # Errors
/// [`LisaError::InvalidArgument`] for a setting that is out of range or names something
/// this build cannot do (a device or `dist` without its feature, `gamma` above the model's
/// block count, a tokenizer larger than the model's vocabulary); [`LisaError::InvalidData`]
/// for data that cannot be used; those of loading, training, checkpointing and saving.
pub fn finetune(
    config: &FinetuneConfig,
    options: &RunOptions,
    observer: &mut dyn FinetuneObserver,
) -> Result<Vec<MethodSummary>> {
    let settings = config.settings()?;
    let model_dir = config.model_dir()?;
    let (model_config, tok, eos) = model_files(&model_dir)?;
    let blocks = model_config.num_hidden_layers;
    if config.gamma == 0 || config.gamma > blocks {
        return Err(LisaError::InvalidArgument {
            what: "gamma",
            reason: format!(
                "{} is out of range: the model has {blocks} blocks",
                config.gamma
            ),
        });
    }
    let (comm, device) = connect(config)?;
    let data = load_data(config, settings.task, &model_dir, tok.as_ref(), eos)?;
    let rank = comm.as_ref().map_or(0, |c| c.rank());
    let io = |action: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| LisaError::Io {
            action,
            path,
            source,
        }
    };
    std::fs::create_dir_all(&config.out).map_err(io("cannot create", &config.out))?;
    let metrics = config.out.join("metrics.jsonl");
    if rank == 0 {
        if !options.resume {
            let _ = std::fs::remove_file(&metrics);
        }
        let run = config.out.join("run.json");
        let text = serde_json::to_string_pretty(config).unwrap_or_default() + "\n";
        std::fs::write(&run, text).map_err(io("cannot write", &run))?;
    }
    let mut summaries = Vec::new();
    for method in config.method.methods() {
        let job = Job {
            config,
            settings: &settings,
            options,
            model_dir: &model_dir,
            data: &data,
            eos,
            device: &device,
            comm: comm.as_ref(),
        };
        summaries.push(job.run(method, observer)?);
    }
    if rank == 0 {
        let path = config.out.join("summary.json");
        let text = serde_json::to_string_pretty(&summaries).unwrap_or_default() + "\n";
        std::fs::write(&path, text).map_err(io("cannot write", &path))?;
    }
    Ok(summaries)
}

/// What [`evaluate`] measured.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EvalReport {
    /// The held-out loss, token-weighted (nats per token).
    pub loss: f32,
    /// Exact-match accuracy, for prompt/response data.
    pub accuracy: Option<f32>,
    /// Held-out examples the loss is over.
    pub examples: usize,
}

/// Evaluates `config.model` as it is, on the held-out split of `config`'s data (the split a
/// fine-tune with the same data, task and seed holds out): the first `eval_size` examples,
/// `batch_size` at a time, cut to `seq_len` tokens. Trains nothing and writes nothing.
///
/// # Errors
/// As [`finetune`]'s, before training.
pub fn evaluate(config: &FinetuneConfig) -> Result<EvalReport> {
    let settings = config.settings()?;
    let model_dir = config.model_dir()?;
    let (_, device) = connect(&FinetuneConfig {
        dist: "none".into(),
        ..config.clone()
    })?;
    let (_, tok, eos) = model_files(&model_dir)?;
    let (model_config, weights) = load_llama(&model_dir, settings.dtype, &device)?;
    let data = load_data(config, settings.task, &model_dir, tok.as_ref(), eos)?;
    let model = crate::models::Llama::new(&model_config, crate::nn::frozen_var_builder(&weights)?)?;
    let n = config
        .eval_size
        .clamp(1, data.eval.len().max(1))
        .min(data.eval.len());
    let eval = &data.eval[..n];
    let loss = super::eval::eval_loss(
        &model,
        eval,
        config.batch_size,
        eos,
        Some(config.seq_len),
        &device,
    )?;
    let accuracy = super::eval::exact_match(&model, &data.pairs[..n.min(data.pairs.len())], eos)?;
    Ok(EvalReport {
        loss,
        accuracy,
        examples: n,
    })
}

/// The config, tokenizer and end-of-sequence id of the model in `model_dir`, checked
/// against each other.
fn model_files(model_dir: &Path) -> Result<(LlamaConfig, Box<dyn TextTokenizer>, u32)> {
    if !model_dir.join("config.json").is_file() {
        return Err(LisaError::InvalidArgument {
            what: "model",
            reason: format!(
                "{}: no config.json there; point it at a Hugging Face model directory",
                model_dir.display()
            ),
        });
    }
    let model_config = LlamaConfig::from_file(model_dir.join("config.json"))?;
    let tok = tokenizer_for(model_dir)?;
    if tok.vocab_size() > model_config.vocab_size {
        return Err(LisaError::InvalidArgument {
            what: "model",
            reason: format!(
                "the tokenizer has {} ids but the model only {}",
                tok.vocab_size(),
                model_config.vocab_size
            ),
        });
    }
    // The end of a turn as the model's files define it (generation_config.json, config.json,
    // tokenizer_config.json, in transformers' precedence).
    let special = SpecialTokens::from_dir(model_dir, tok.as_ref())?;
    let eos = special
        .eos
        .first()
        .copied()
        .ok_or_else(|| LisaError::InvalidArgument {
            what: "model",
            reason: "it defines no end-of-sequence token".into(),
        })?;
    Ok((model_config, tok, eos))
}

/// The device `config.device` names, and the communicator `config.dist` asks for.
fn connect(config: &FinetuneConfig) -> Result<(Option<Rc<dyn Communicator>>, Device)> {
    let missing = |what, name: &str| LisaError::InvalidArgument {
        what,
        reason: format!("{name} needs candle-lisa built with `--features {name}`"),
    };
    let device = || match config.device.as_str() {
        "cpu" => Ok(Device::Cpu),
        "cuda" if cfg!(feature = "cuda") => Ok(Device::new_cuda(0)?),
        "metal" if cfg!(feature = "metal") => Ok(Device::new_metal(0)?),
        name @ ("cuda" | "metal") => Err(missing("device", name)),
        other => Err(LisaError::InvalidArgument {
            what: "device",
            reason: format!("{other:?}: use cpu, cuda or metal"),
        }),
    };
    match config.dist.as_str() {
        "none" => Ok((None, device()?)),
        #[cfg(feature = "mpi")]
        "mpi" => {
            let mpi = crate::dist::Mpi::init()?;
            Ok((Some(Rc::new(mpi)), device()?))
        }
        #[cfg(feature = "nccl")]
        "nccl" => {
            use crate::dist::{Nccl, NcclId, RankEnv};
            let RankEnv {
                rank,
                world_size,
                local_rank,
            } = RankEnv::from_env()?;
            if config.device != "cuda" {
                return Err(LisaError::InvalidArgument {
                    what: "dist",
                    reason: "nccl trains on GPUs: set device to cuda".into(),
                });
            }
            let dev = Device::new_cuda(local_rank)?;
            let wait = std::time::Duration::from_secs(300);
            let id = NcclId::share_through_file(&config.nccl_id_file, rank, wait)?;
            let nccl = Nccl::new(&dev, rank, world_size, id)?;
            // Every rank has joined: the next launch must not find this run's id.
            if rank == 0 {
                std::fs::remove_file(&config.nccl_id_file).map_err(|source| LisaError::Io {
                    action: "cannot remove",
                    path: config.nccl_id_file.clone(),
                    source,
                })?;
            }
            Ok((Some(Rc::new(nccl)), dev))
        }
        // The features left out of this build.
        #[allow(unreachable_patterns)]
        name @ ("mpi" | "nccl") => Err(missing("dist", name)),
        other => Err(LisaError::InvalidArgument {
            what: "dist",
            reason: format!("{other:?}: use none, mpi or nccl"),
        }),
    }
}

/// The data `config.data` names, or the bundled task; chat data is rendered with
/// `chat_template` or the model's own template.
fn load_data(
    config: &FinetuneConfig,
    task: Task,
    model_dir: &Path,
    tok: &dyn TextTokenizer,
    eos: u32,
) -> Result<Dataset> {
    let Some(path) = &config.data else {
        return Dataset::from_task(task, config.seed, tok, eos);
    };
    if let Err(e) = std::fs::File::open(path) {
        return Err(LisaError::InvalidArgument {
            what: "data",
            reason: format!("cannot read {}: {e}", path.display()),
        });
    }
    let template = || match &config.chat_template {
        Some(file) => ChatTemplate::from_file_for_dir(file, model_dir),
        None => ChatTemplate::from_dir(model_dir)?.ok_or_else(|| LisaError::InvalidData {
            path: path.clone(),
            reason: format!(
                "it is chat data but {} has no chat template; give one with chat_template \
                 (--chat-template FILE)",
                model_dir.display()
            ),
        }),
    };
    Dataset::from_file(path, tok, eos, config.seq_len, template)
}

/// One method's run of a config, and what it shares with the others.
struct Job<'a> {
    config: &'a FinetuneConfig,
    settings: &'a Settings,
    options: &'a RunOptions,
    model_dir: &'a Path,
    data: &'a Dataset,
    eos: u32,
    device: &'a Device,
    comm: Option<&'a Rc<dyn Communicator>>,
}

impl Job<'_> {
    /// The method's model, optimizer and schedule.
    fn set_up(&self, method: &str) -> Result<LlamaFineTune> {
        let (c, s) = (self.config, self.settings);
        let (model_config, base) = load_llama(self.model_dir, s.dtype, self.device)?;
        let sampler = match c.owlore {
            Some(m) if method == "lisa" => {
                let examples = &self.data.train[..self.data.train.len().min(64)];
                let ratios =
                    owlore_weights(&model_config, &base, examples, m, c.seq_len, self.device)?;
                SamplerChoice::Weighted(ratios)
            }
            _ => s.sampler.clone(),
        };
        let params = ParamsAdamW {
            lr: c.lr,
            weight_decay: c.weight_decay,
            ..Default::default()
        };
        let method = match method {
            "lisa" => Method::Lisa(LisaConfig {
                gamma: c.gamma,
                period: c.period,
                seed: c.seed,
                sampler,
                recompute_frozen: c.recompute_frozen,
                ..Default::default()
            }),
            "lora" => Method::Lora(
                LoraConfig {
                    rank: c.lora_rank,
                    alpha: c.lora_alpha.unwrap_or(2.0 * c.lora_rank as f64),
                    ..Default::default()
                },
                c.seed,
            ),
            _ => Method::Full,
        };
        let schedule = Cosine {
            peak: c.lr,
            warmup: (c.steps / 20).max(1),
            total: c.steps,
            min: 0.1 * c.lr,
        };
        let trainer_config = TrainerConfig {
            max_grad_norm: (c.max_grad_norm > 0.0).then_some(c.max_grad_norm),
            ..Default::default()
        };
        let mut run =
            LlamaFineTune::new(model_config, base, method, params, schedule, trainer_config)?;
        run.trainer.optimizer_mut().set_compact_state(s.compact)?;
        if let Some(comm) = self.comm {
            run.trainer.set_communicator(Box::new(comm.clone()))?;
        }
        Ok(run)
    }

    fn run(&self, method: &str, observer: &mut dyn FinetuneObserver) -> Result<MethodSummary> {
        let c = self.config;
        observer.method_starts(method)?;
        let mut run = self.set_up(method)?;
        let (rank, world_size) = (run.trainer.rank(), run.trainer.world_size());
        let dir = c.out.join(method);
        if !self.options.resume && rank == 0 {
            // A fresh run: an older run's checkpoints would otherwise be the newest to resume.
            let _ = std::fs::remove_dir_all(dir.join("checkpoints"));
        }
        let ck = Checkpointer::new(dir.join("checkpoints"), c.keep, &c.run_identity(method))?;
        let ck = observer.checkpointer(method, ck);
        let start = match self.options.resume {
            true => run.trainer.resume(&ck)?.unwrap_or(0) as usize,
            false => 0,
        };
        let metrics = c.out.join("metrics.jsonl");
        // Rank 0 alone writes metrics.
        let (mut jsonl, mut tensorboard) = (None, None);
        if rank == 0 {
            keep_metrics_up_to(&metrics, method, start as u64)?;
            jsonl = Some(JsonlSink::append(&metrics)?);
            if let Some(tb) = &c.tensorboard {
                tensorboard = Some(TensorBoardSink::create(tb.join(method), start as u64)?);
            }
        }
        let mut sinks: Vec<&mut dyn MetricsSink> = Vec::new();
        sinks.extend(jsonl.as_mut().map(|s| s as &mut dyn MetricsSink));
        sinks.extend(tensorboard.as_mut().map(|s| s as &mut dyn MetricsSink));
        observer.fitting(method, &run, start)?;
        let fit_options = FitOptions {
            name: method.to_string(),
            steps: c.steps,
            batch_size: c.batch_size,
            grad_accum: c.grad_accum,
            seq_len: c.seq_len,
            seed: c.seed,
            eval_every: c.eval_every,
            eval_size: c.eval_size,
            save_every: c.save_every.unwrap_or(c.eval_every),
            eos: self.eos,
        };
        let fit = run.fit(
            self.data,
            &fit_options,
            start,
            self.options.stop_after,
            Some(&ck),
            &mut sinks,
            |event| observer.event(method, &event),
        )?;
        drop(sinks);
        let final_train_loss = match rank {
            0 => {
                // The training loss of the last ten steps, those before a resume included.
                let mut losses: Vec<f32> = read_jsonl(&metrics)?
                    .iter()
                    .filter(|l| l["method"] == method)
                    .map(|l| l["loss"].as_f64().map_or(f32::NAN, |x| x as f32))
                    .collect();
                losses.drain(..losses.len().saturating_sub(10));
                losses.iter().sum::<f32>() / losses.len().max(1) as f32
            }
            _ => fit.final_train_loss,
        };
        let opt = run.trainer.optimizer();
        let mut summary = MethodSummary {
            method: method.to_string(),
            rank,
            steps: c.steps,
            final_train_loss,
            eval_loss: fit.eval_loss,
            accuracy: fit.accuracy,
            wall_seconds: fit.wall_seconds,
            tokens_per_second: fit.tokens as f64 / fit.wall_seconds,
            peak_bytes: None,
            peak_source: None,
            trainable_params: opt.trainable_params(),
            state_bytes: opt.state_bytes(),
            skipped_steps: run.trainer.skipped_steps(),
            world_size,
            all_reduced_bytes_per_step: fit.all_reduced_bytes_per_step,
        };
        observer.method_done(&mut summary)?;
        if rank == 0 {
            let dtype = self.settings.dtype;
            // The tokenizer files travel with the weights, so the saved model can be used as
            // it is.
            let save = SaveOptions {
                copy_files_from: Some(self.model_dir.to_path_buf()),
                ..Default::default()
            };
            run.save_model_with(dir.join("model"), dtype, &save)?;
            // LoRA's adapters alone, in PEFT's format (PeftModel.from_pretrained loads them);
            // the base is named as the run named it (a Hub id stays one).
            let base = c
                .model
                .as_deref()
                .unwrap_or(self.model_dir)
                .to_string_lossy();
            run.save_adapter(dir.join("adapter"), dtype, Some(&base))?;
        }
        Ok(summary)
    }
}

/// Keeps the lines of `metrics.jsonl` from other methods, and this method's up to `step`;
/// drops lines that are not JSON (torn by a kill).
fn keep_metrics_up_to(path: &Path, method: &str, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| {
                v["method"] != method || v["step"].as_u64().is_some_and(|s| s <= step)
            })
        })
        .collect();
    let text = kept.join("\n") + if kept.is_empty() { "" } else { "\n" };
    // Atomically: a kill here must not lose the lines kept.
    crate::io::atomic_write(path, |tmp| {
        std::fs::write(tmp, text).map_err(|source| LisaError::Io {
            action: "cannot write",
            path: tmp.to_path_buf(),
            source,
        })
    })
}
