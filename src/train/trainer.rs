//! [`Trainer`]: one optimizer step over micro-batches, with gradient accumulation, global-norm
//! clipping, a learning-rate schedule, a non-finite guard, and crash-safe checkpoints.

use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

use super::checkpoint::Checkpointer;
use super::schedule::LrSchedule;
use crate::data::Batch;
use crate::dist::{self, Communicator, DEFAULT_BUCKET_BYTES};
use crate::error::{LisaError, Result};
use crate::io::io;
use crate::models::Llama;
use crate::nn::TrainingPlan;
use crate::optim::{no_decay_default, GradScaling, LisaAdamW, NonFinite};

/// A model the trainer can train: the mean loss over a batch's counted labels.
pub trait CausalLm {
    /// The mean loss of `batch` (a scalar; f32 for half-precision models is fine).
    fn loss(&self, batch: &Batch) -> Result<Tensor>;
}

impl CausalLm for Llama {
    fn loss(&self, batch: &Batch) -> Result<Tensor> {
        Llama::loss(self, &batch.ids, &batch.labels)
    }
}

/// How the trainer steps.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainerConfig {
    /// Clip the global L2 norm of the gradients to this (`None`: no clipping). The clip is a
    /// factor inside the fused update, so it copies nothing.
    pub max_grad_norm: Option<f64>,
    /// Stop with [`LisaError::TooManyNonFinite`] after this many skipped steps in a row.
    pub max_consecutive_non_finite: usize,
    /// Exclude norms, biases and embeddings from weight decay
    /// ([`no_decay_default`]); `false` decays every parameter.
    pub decay_filter: bool,
}

impl Default for TrainerConfig {
    /// Clipping at 1.0 (transformers' default), 10 non-finite steps in a row, the
    /// transformers weight-decay convention.
    fn default() -> Self {
        Self {
            max_grad_norm: Some(1.0),
            max_consecutive_non_finite: 10,
            decay_filter: true,
        }
    }
}

/// What one [`Trainer::step`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    /// Updates applied so far ([`LisaAdamW::step_count`]).
    pub step: u64,
    /// Mean loss over the micro-batches' counted labels (data-parallel: over every rank's).
    pub loss: f32,
    /// Global gradient norm before clipping (NaN when a gradient was not finite).
    pub grad_norm: f64,
    /// The learning rate used.
    pub lr: f64,
    /// Labels that counted (data-parallel: on all ranks together).
    pub tokens: usize,
    /// Whether the step was skipped for a non-finite loss or gradient (nothing written).
    pub skipped: bool,
    /// Whether LISA drew new blocks (the trainer has rebuilt the model).
    pub resampled: bool,
    /// Data-parallel: bytes of gradients this rank handed to the all-reduce, exactly the
    /// trainable parameters' bytes (for f16/bf16 over MPI, twice that: see
    /// [`Communicator::wire_bytes`]). The three numbers agreed on first, and the draw check
    /// after a redraw, are not counted. 0 in a single process.
    pub all_reduced_bytes: usize,
}

/// Rebuilds the model from a [`TrainingPlan`].
type Build<M> = Box<dyn FnMut(&TrainingPlan) -> Result<M> + Send>;

/// Trains a model with any of full fine-tuning, LoRA or LISA: the method is the optimizer (a
/// [`LisaAdamW`] built by [`LisaAdamW::new`] for LISA, or an [`AdamW`](crate::optim::AdamW)
/// over the weights or the LoRA adapters) and `build`, which makes the model from the optimizer's
/// [`TrainingPlan`] (a LoRA model ignores the plan and is built once).
///
/// Each [`step`](Self::step) takes the micro-batches of one optimizer step. Their losses are
/// weighted by their share of the counted labels, so the accumulated gradient is that of the
/// mean loss over all of them, as one large batch would give. The schedule sets the rate of
/// each update. A NaN or infinite loss or gradient skips the step (nothing is written) and is
/// counted; too many in a row is [`LisaError::TooManyNonFinite`].
///
/// Nothing here is needed to use [`LisaAdamW`] in a loop of your own.
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_lisa::data::{pad_batch, Example};
/// use candle_lisa::train::{Cosine, Trainer, TrainerConfig};
/// use candle_lisa::{load_llama, LisaAdamW, LisaConfig, Llama};
/// use candle_nn::ParamsAdamW;
///
/// let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/tiny-llama");
/// let (config, varmap) = load_llama(dir, DType::F32, &Device::Cpu)?;
/// let params = ParamsAdamW { lr: 1e-3, weight_decay: 0.01, ..Default::default() };
/// let lisa = LisaConfig { gamma: 2, period: 3, ..Default::default() };
/// let opt = LisaAdamW::new(&varmap, params, lisa)?;
/// let schedule = Cosine { peak: 1e-3, warmup: 2, total: 8, min: 1e-4 };
/// let mut trainer = Trainer::new(opt, schedule, TrainerConfig::default(), move |plan| {
///     Llama::from_plan(&config, plan)
/// })?;
/// let examples = [
///     Example::prompt_response(&[49, 43, 50, 61], &[51], 257), // "1+2=" -> "3"
///     Example::prompt_response(&[52, 52, 43, 49, 61], &[52, 53], 257),
/// ];
/// let batch = pad_batch(&examples, 257, None, &Device::Cpu)?;
/// let first = trainer.step(&[batch.clone()])?;
/// for _ in 0..7 {
///     trainer.step(&[batch.clone()])?; // or several micro-batches per step
/// }
/// let last = trainer.step(&[batch])?;
/// assert!(last.loss < first.loss);
/// assert_eq!(last.step, 9);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Trainer<M> {
    opt: LisaAdamW,
    model: M,
    build: Build<M>,
    schedule: Box<dyn LrSchedule>,
    config: TrainerConfig,
    /// Steps skipped for a non-finite loss or gradient, in all and in a row.
    skipped: u64,
    consecutive_skipped: usize,
    /// Steps taken, skipped ones included: the micro-batch lists consumed, which is where
    /// the data resumes (the optimizer's step count does not advance on a skip).
    position: u64,
    /// The other ranks of a data-parallel run, if any.
    dist: Option<Box<dyn Communicator>>,
    /// The largest bucket of gradients one all-reduce sends.
    bucket_bytes: usize,
}

impl<M: CausalLm> Trainer<M> {
    /// A trainer over `opt` (a [`LisaAdamW`], or an [`AdamW`](crate::optim::AdamW), which
    /// converts into one without blocks), building the model with `build(&opt.plan())`. Sets
    /// the optimizer to skip non-finite steps, and applies the weight-decay filter.
    ///
    /// # Errors
    /// Whatever `build` returns.
    pub fn new(
        opt: impl Into<LisaAdamW>,
        schedule: impl LrSchedule + 'static,
        config: TrainerConfig,
        build: impl FnMut(&TrainingPlan) -> Result<M> + Send + 'static,
    ) -> Result<Self> {
        let mut build: Build<M> = Box::new(build);
        let mut opt = opt.into();
        opt.set_non_finite(NonFinite::Skip);
        if config.decay_filter {
            opt.set_weight_decay_filter(no_decay_default);
        }
        let model = build(&opt.plan())?;
        Ok(Self {
            opt,
            model,
            build,
            schedule: Box::new(schedule),
            config,
            skipped: 0,
            consecutive_skipped: 0,
            position: 0,
            dist: None,
            bucket_bytes: DEFAULT_BUCKET_BYTES,
        })
    }

    /// Makes this trainer one rank of a data-parallel run over `comm` (see [`crate::dist`]):
    /// from now on each [`step`](Self::step) sums the trainable gradients over all ranks before
    /// the update, weighted by each rank's counted labels, and
    /// [`save_checkpoint`](Self::save_checkpoint) writes on rank 0 only. Give each rank its own
    /// share of every batch
    /// ([`StepSampler::for_rank`](crate::data::StepSampler::for_rank)).
    ///
    /// Collective: every rank calls it. It checks at once that all ranks built the same
    /// optimizer (the same draw, step and trainable set), as it checks after every redraw.
    ///
    /// # Errors
    /// [`LisaError::RankDisagreement`] on every rank when some rank differs from rank 0 (the
    /// trainer is then left single-process), and [`LisaError::Communication`].
    pub fn set_communicator(&mut self, comm: Box<dyn Communicator>) -> Result<()> {
        dist::check_agreement(
            comm.as_ref(),
            &self.device(),
            &dist::draw_summary(&self.opt),
        )?;
        self.dist = Some(comm);
        Ok(())
    }

    /// The largest bucket of gradients one all-reduce sends (default
    /// [`DEFAULT_BUCKET_BYTES`]; a single larger gradient goes alone). Fewer, larger buckets
    /// mean fewer calls and a larger temporary buffer.
    ///
    /// # Errors
    /// [`LisaError::InvalidArgument`] for 0.
    pub fn set_bucket_bytes(&mut self, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Err(LisaError::InvalidArgument {
                what: "bucket size",
                reason: "it must be at least one byte".into(),
            });
        }
        self.bucket_bytes = bytes;
        Ok(())
    }

    /// The communicator of a data-parallel run.
    pub fn communicator(&self) -> Option<&dyn Communicator> {
        self.dist.as_deref()
    }

    /// This process's rank: 0 in a single process.
    pub fn rank(&self) -> usize {
        self.communicator().map_or(0, |c| c.rank())
    }

    /// How many ranks train together: 1 in a single process.
    pub fn world_size(&self) -> usize {
        self.communicator().map_or(1, |c| c.world_size())
    }

    /// The device of the parameters (the CPU for a model without any).
    pub fn device(&self) -> Device {
        let device = self.opt.vars().next().map(|(_, v)| v.device().clone());
        device.unwrap_or(Device::Cpu)
    }

    /// One optimizer step over `micro_batches` (at least one).
    ///
    /// Data-parallel, an error on any rank (its loss, its backward pass, its update) ends the
    /// step with an error on every rank: the failing rank returns its own, the others
    /// [`LisaError::RankFailed`]; no rank waits in a collective for a rank that has given up.
    ///
    /// # Errors
    /// [`LisaError::InvalidArgument`] for no micro-batch, [`LisaError::TooManyNonFinite`],
    /// [`LisaError::RankFailed`], and the optimizer's and the model's errors.
    pub fn step(&mut self, micro_batches: &[Batch]) -> Result<StepReport> {
        if micro_batches.is_empty() {
            return Err(self.fail_step(LisaError::InvalidArgument {
                what: "micro-batches",
                reason: "Trainer::step needs at least one micro-batch".into(),
            }));
        }
        let lr = self.schedule.lr(self.opt.step_count() as usize + 1);
        if let Err(e) = self.opt.try_set_learning_rate(lr) {
            return Err(self.fail_step(e));
        }
        let tokens: usize = micro_batches.iter().map(|b| b.tokens).sum();
        let (mut acc, loss_sum, non_finite) = match self.local_gradients(micro_batches, tokens) {
            Ok((_, _, Some(value))) if self.dist.is_none() => return self.skip(lr, tokens, value),
            Ok((acc, loss_sum, value)) => (acc, loss_sum, value.is_some()),
            Err(e) => return Err(self.fail_step(e)),
        };
        let (mut loss, mut tokens, mut all_reduced_bytes) = (loss_sum, tokens, 0);
        let during = format!("in step {}", self.position + 1);
        if let Some(comm) = self.dist.as_deref() {
            let totals = dist::totals(comm, &self.device(), tokens, loss_sum, non_finite, false)?;
            if totals.failed > 0 {
                return Err(self.rank_failed(totals.failed, during));
            }
            if totals.non_finite {
                return self.skip(lr, totals.tokens as usize, f32::NAN);
            }
            // Each rank's gradient is of its own mean loss; weighted by its share of the
            // labels, their sum is the gradient of the mean over all of them.
            let scale = tokens as f64 / totals.tokens.max(1.0);
            let vars: Vec<Var> = self.opt.trainable_vars().map(|(_, v)| v.clone()).collect();
            all_reduced_bytes =
                dist::all_reduce_gradients(comm, &vars, &mut acc, scale, self.bucket_bytes)?;
            (loss, tokens) = (totals.loss, totals.tokens as usize);
        }
        let before = self.opt.skipped_steps();
        let updated = self.update(&acc);
        drop(acc);
        if let Some(comm) = self.dist.as_deref() {
            // The update and the rebuild are local: the ranks learn of a failure in them
            // before the next collective.
            let failed = dist::agree_on_failure(comm, &self.device(), updated.is_err())?;
            if failed > 0 && updated.is_ok() {
                return Err(self.rank_failed(failed, during));
            }
        }
        let resampled = updated?;
        let grad_norm = self.opt.last_grad_norm().unwrap_or(f64::NAN);
        if self.opt.skipped_steps() > before {
            return self.skip(lr, tokens, loss as f32);
        }
        self.consecutive_skipped = 0;
        self.position += 1;
        if resampled {
            if let Some(comm) = self.dist.as_deref() {
                let summary = dist::draw_summary(&self.opt);
                dist::check_agreement(comm, &self.device(), &summary)?;
            }
        }
        Ok(StepReport {
            step: self.opt.step_count(),
            loss: loss as f32,
            grad_norm,
            lr,
            tokens,
            skipped: false,
            resampled,
            all_reduced_bytes,
        })
    }

    /// Data-parallel: stands in for [`step`](Self::step) on a rank that cannot take it (its
    /// batch failed to load, say), or that failed between steps: it joins the point where the
    /// other ranks next agree (the first collective of their step, or of
    /// [`save_checkpoint`](Self::save_checkpoint)) with a failure, so that they return
    /// [`LisaError::RankFailed`] instead of waiting for this rank. Returns `error`. In a single
    /// process it only returns `error`.
    pub fn fail_step<E>(&mut self, error: E) -> E {
        if let Some(comm) = self.dist.as_deref() {
            // The original error is the one to report; a failing collective adds nothing.
            let _ = dist::totals(comm, &self.device(), 0, 0.0, false, true);
        }
        error
    }

    fn rank_failed(&self, failed: usize, during: String) -> LisaError {
        LisaError::RankFailed {
            rank: self.rank(),
            failed,
            world_size: self.world_size(),
            during,
        }
    }

    /// The accumulated gradients of this rank's micro-batches and their label-weighted mean
    /// loss, or, as the third value, the first loss that was not finite (the gradients then
    /// incomplete).
    fn local_gradients(
        &mut self,
        micro_batches: &[Batch],
        tokens: usize,
    ) -> Result<(GradStore, f64, Option<f32>)> {
        let mut acc = GradStore::default();
        let mut loss_sum = 0.0f64;
        for batch in micro_batches {
            // Data-parallel, a share without counted labels adds nothing (its mean loss would
            // be 0/0); its gradients go out as zeros.
            if self.dist.is_some() && batch.tokens == 0 {
                continue;
            }
            let weight = batch.tokens as f64 / tokens.max(1) as f64;
            // The loss holds the graph: it goes out of scope, and the activations with it,
            // before the gradients are accumulated.
            let (value, mut grads) = {
                let loss = self.model.loss(batch)?;
                let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
                if !value.is_finite() {
                    // Data-parallel, the other ranks learn of it before any gradient travels.
                    return Ok((acc, loss_sum, Some(value)));
                }
                let weighted = match micro_batches.len() {
                    1 => loss,
                    _ => loss.affine(weight, 0.0)?,
                };
                (value, self.opt.scale_loss(&weighted)?.backward()?)
            };
            for (_, var) in self.opt.trainable_vars() {
                if let Some(g) = grads.remove(var.as_tensor()) {
                    let sum = match acc.remove(var.as_tensor()) {
                        Some(a) => (a + g)?,
                        None => g,
                    };
                    acc.insert(var.as_tensor(), sum);
                }
            }
            loss_sum += value as f64 * weight;
        }
        Ok((acc, loss_sum, None))
    }

    /// The optimizer's update from `grads` (it may skip a non-finite step), and the model's
    /// rebuild when LISA drew new blocks; returns whether it did.
    fn update(&mut self, grads: &GradStore) -> Result<bool> {
        match self.config.max_grad_norm {
            Some(max) => self.opt.try_step_with(grads, GradScaling::ClipNorm(max))?,
            None => self.opt.try_step(grads)?,
        }
        let resampled = self.opt.resampled();
        if resampled {
            self.model = (self.build)(&self.opt.plan())?;
        }
        Ok(resampled)
    }

    fn skip(&mut self, lr: f64, tokens: usize, loss: f32) -> Result<StepReport> {
        self.skipped += 1;
        self.consecutive_skipped += 1;
        self.position += 1;
        if self.consecutive_skipped >= self.config.max_consecutive_non_finite {
            return Err(LisaError::TooManyNonFinite {
                consecutive: self.consecutive_skipped,
            });
        }
        Ok(StepReport {
            step: self.opt.step_count(),
            loss,
            grad_norm: f64::NAN,
            lr,
            tokens,
            skipped: true,
            resampled: false,
            all_reduced_bytes: 0,
        })
    }

    /// The model as of the last step.
    pub fn model(&self) -> &M {
        &self.model
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &LisaAdamW {
        &self.opt
    }

    /// The optimizer, to change its settings between steps (compact state, the loss scaler,
    /// the non-finite policy). The learning rate is the schedule's, set at every step.
    pub fn optimizer_mut(&mut self) -> &mut LisaAdamW {
        &mut self.opt
    }

    /// Steps skipped so far for a non-finite loss or gradient.
    pub fn skipped_steps(&self) -> u64 {
        self.skipped
    }

    /// Steps taken so far, skipped ones included: how many micro-batch lists
    /// [`step`](Self::step) has consumed. Checkpoints are numbered by it and
    /// [`resume`](Self::resume) returns it, so that a resumed run goes on with the next
    /// batch; [`LisaAdamW::step_count`] counts only the updates applied.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Saves a checkpoint of the step taken last, numbered by [`position`](Self::position):
    /// the optimizer's parameters (`weights.safetensors`: for LoRA, the adapters), its state
    /// (`optimizer/`), the trainer's counters and position (`trainer.json`), and whatever
    /// `extra` writes into the directory (a data position, metrics, a model export).
    ///
    /// Data-parallel, rank 0 writes (the weights are the same on every rank) and the others
    /// only wait for it, so that on return the checkpoint is complete everywhere; `extra`
    /// runs on rank 0 only.
    ///
    /// # Errors
    /// Those of [`Checkpointer::save`] ([`LisaError::CheckpointBusy`],
    /// [`LisaError::LaterCheckpoint`], [`LisaError::Io`]) and of `extra`; the previous
    /// checkpoints are untouched. Data-parallel, a failure on rank 0, or another rank's
    /// [`fail_step`](Self::fail_step) meeting this save, is [`LisaError::RankFailed`] on the
    /// ranks that did not fail (rank 0's checkpoint is complete then).
    pub fn save_checkpoint(
        &self,
        checkpointer: &Checkpointer,
        extra: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<PathBuf> {
        let Some(comm) = self.dist.as_deref() else {
            return self.write_checkpoint(checkpointer, extra);
        };
        let step = self.position;
        let written = (comm.rank() == 0).then(|| self.write_checkpoint(checkpointer, extra));
        let here = matches!(written, Some(Err(_)));
        let failed = dist::agree_on_failure(comm, &self.device(), here)?;
        match written {
            Some(Err(e)) => Err(e),
            _ if failed > 0 => {
                Err(self.rank_failed(failed, format!("saving the checkpoint of step {step}")))
            }
            Some(result) => result,
            None => Ok(checkpointer.root().join(Checkpointer::dir_name(step))),
        }
    }

    fn write_checkpoint(
        &self,
        checkpointer: &Checkpointer,
        extra: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<PathBuf> {
        checkpointer.save(self.position, |dir| {
            let tensors: std::collections::HashMap<String, Tensor> = self
                .opt
                .vars()
                .map(|(n, v)| (n.to_string(), v.as_tensor().detach()))
                .collect();
            crate::io::save_safetensors(&tensors, &dir.join(WEIGHTS))?;
            self.opt.save_state(dir.join(OPTIMIZER))?;
            let counters = serde_json::json!({
                "skipped": self.skipped,
                "consecutive_skipped": self.consecutive_skipped,
                "position": self.position,
                "optimizer_step": self.opt.step_count(),
            });
            let path = dir.join(TRAINER);
            std::fs::write(&path, counters.to_string()).map_err(io("cannot write", &path))?;
            extra(dir)
        })
    }

    /// Restores the newest complete checkpoint of `checkpointer`, if there is one, and
    /// returns its [`position`](Self::position) (steps taken, skipped ones included: feed
    /// the batches from the next one on): weights, optimizer state, counters; the model is
    /// rebuilt.
    ///
    /// Data-parallel, every rank reads the checkpoint (from a file system they share), and
    /// the ranks then check that they agree.
    ///
    /// # Errors
    /// [`LisaError::CheckpointMismatch`] for a checkpoint of another run or one that does not
    /// fit this optimizer; nothing is changed then. Data-parallel, a failure on one rank is
    /// [`LisaError::RankFailed`] on the others, and ranks that resumed to different points
    /// are [`LisaError::RankDisagreement`].
    pub fn resume(&mut self, checkpointer: &Checkpointer) -> Result<Option<u64>> {
        let result = self.resume_here(checkpointer);
        let Some(comm) = self.dist.as_deref() else {
            return result;
        };
        let device = self.device();
        let failed = dist::agree_on_failure(comm, &device, result.is_err())?;
        if failed > 0 {
            return result.and(Err(self.rank_failed(failed, "resuming".into())));
        }
        dist::check_agreement(comm, &device, &dist::draw_summary(&self.opt))?;
        result
    }

    fn resume_here(&mut self, checkpointer: &Checkpointer) -> Result<Option<u64>> {
        let Some(found) = checkpointer.latest()? else {
            return Ok(None);
        };
        let dir = &found.dir;
        let mismatch = |reason: String| LisaError::CheckpointMismatch {
            path: dir.clone(),
            reason,
        };
        let path = dir.join(WEIGHTS);
        let device = self.device();
        let mut saved = candle_core::safetensors::load(&path, &device)?;
        let mut weights = Vec::new();
        for (name, var) in self.opt.vars() {
            let t = saved
                .remove(name)
                .ok_or_else(|| mismatch(format!("it has no weights for {name}")))?;
            if t.shape() != var.shape() || t.dtype() != var.dtype() {
                return Err(mismatch(format!(
                    "{name} is {:?} {:?} there and {:?} {:?} here",
                    t.dtype(),
                    t.dims(),
                    var.dtype(),
                    var.dims()
                )));
            }
            weights.push((var.clone(), t));
        }
        if let Some(extra) = saved.keys().next() {
            return Err(mismatch(format!(
                "it holds {extra}, which this run does not train"
            )));
        }
        let path = dir.join(TRAINER);
        let text = std::fs::read_to_string(&path).map_err(io("cannot read", &path))?;
        let counters: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| LisaError::Json {
                path: path.clone(),
                source,
            })?;
        // Loads and checks everything first; it changes nothing when it fails.
        self.opt.load_state(dir.join(OPTIMIZER))?;
        for (var, t) in weights {
            var.set(&t)?;
        }
        self.skipped = counters["skipped"].as_u64().unwrap_or(0);
        self.consecutive_skipped = counters["consecutive_skipped"].as_u64().unwrap_or(0) as usize;
        self.position = found.step;
        self.model = (self.build)(&self.opt.plan())?;
        Ok(Some(found.step))
    }
}

/// The optimizer's parameters inside a checkpoint.
pub const WEIGHTS: &str = "weights.safetensors";
/// The optimizer state directory inside a checkpoint.
pub const OPTIMIZER: &str = "optimizer";
/// The trainer's counters inside a checkpoint.
pub const TRAINER: &str = "trainer.json";
