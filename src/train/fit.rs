//! [`LlamaFineTune::fit`]: the loop of a fine-tuning run: batches drawn by the step, held-out
//! evaluation, metrics lines and checkpoints at their cadence, resumable at any checkpoint.

use std::time::Instant;

use serde_json::json;

use super::checkpoint::Checkpointer;
use super::eval::{eval_loss, exact_match};
use super::finetune::LlamaFineTune;
use super::metrics::MetricsSink;
use super::trainer::StepReport;
use crate::data::{Dataset, StepSampler};
use crate::error::{LisaError, Result};

/// How [`LlamaFineTune::fit`] runs.
#[derive(Clone, Debug, PartialEq)]
pub struct FitOptions {
    /// The run's name, written as `"method"` in every metrics line.
    pub name: String,
    /// The last step.
    pub steps: usize,
    /// Examples per optimizer step (data-parallel: of all ranks together).
    pub batch_size: usize,
    /// Micro-batches per step (gradient accumulation).
    pub grad_accum: usize,
    /// Longest sequence; longer examples are cut.
    pub seq_len: usize,
    /// Seeds the order of the examples ([`StepSampler`]).
    pub seed: u64,
    /// Steps between evaluations (and the last step).
    pub eval_every: usize,
    /// Held-out examples per evaluation (at most the held-out split).
    pub eval_size: usize,
    /// Steps between checkpoints (and the last step).
    pub save_every: usize,
    /// The padding id (the end-of-sequence id), also where generation stops for exact match.
    pub eos: u32,
}

/// What [`LlamaFineTune::fit`] tells its observer while it runs.
#[derive(Debug)]
pub enum FitEvent<'a> {
    /// A step is about to be taken (before its batch is drawn).
    BeforeStep {
        /// The step (1-based; the data position).
        step: usize,
    },
    /// A step was taken.
    Step {
        /// The step (1-based; the data position).
        step: usize,
        /// What the trainer reported.
        report: &'a StepReport,
        /// The blocks trainable now (empty without LISA).
        active_blocks: &'a [usize],
        /// Input tokens per second since the start of this call.
        tokens_per_second: f64,
    },
    /// A held-out evaluation ran (rank 0 only).
    Eval {
        /// The step it followed.
        step: usize,
        /// The held-out loss, token-weighted.
        loss: f32,
        /// Exact-match accuracy, for prompt/response data.
        accuracy: Option<f32>,
    },
}

/// What a call of [`LlamaFineTune::fit`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct FitSummary {
    /// The steps this call ran (after the one it resumed from).
    pub steps_run: usize,
    /// Mean training loss over the last ten steps.
    pub final_train_loss: f32,
    /// The last held-out loss (NaN off rank 0).
    pub eval_loss: f32,
    /// The last exact-match accuracy.
    pub accuracy: Option<f32>,
    /// Wall-clock seconds of the loop.
    pub wall_seconds: f64,
    /// Input tokens (padding included) stepped through.
    pub tokens: usize,
    /// Bytes this rank handed to the all-reduce, per step.
    pub all_reduced_bytes_per_step: f64,
}

impl LlamaFineTune {
    /// Trains from step `start + 1` to `options.steps` (or `stop_after`, if earlier): each
    /// step's batch drawn by a [`StepSampler`] from the step and the seed (this rank's share,
    /// data-parallel), a line in `sink` per step, a held-out evaluation every
    /// `eval_every` steps and at the end (rank 0), and a checkpoint every `save_every` steps
    /// and at the end when `checkpointer` is given. `start` is what
    /// [`Trainer::resume`](super::Trainer::resume) returned (0 for a fresh run), so a resumed
    /// run takes the same batches as an uninterrupted one. `observe` sees every step and
    /// evaluation, after the step and before its line goes to each of `sinks`; its error stops
    /// the loop.
    ///
    /// # Errors
    /// [`LisaError::InvalidArgument`] for a zero step count, batch size, micro-batch count,
    /// evaluation or save period; those of the trainer, the sampler, the sink and the
    /// checkpointer; `observe`'s.
    #[allow(clippy::too_many_arguments)]
    pub fn fit(
        &mut self,
        data: &Dataset,
        options: &FitOptions,
        start: usize,
        stop_after: Option<usize>,
        checkpointer: Option<&Checkpointer>,
        sinks: &mut [&mut dyn MetricsSink],
        mut observe: impl FnMut(FitEvent<'_>) -> Result<()>,
    ) -> Result<FitSummary> {
        let o = options;
        for (what, value) in [
            ("steps", o.steps),
            ("batch_size", o.batch_size),
            ("grad_accum", o.grad_accum),
            ("eval_every", o.eval_every),
            ("save_every", o.save_every),
        ] {
            if value == 0 {
                return Err(LisaError::InvalidArgument {
                    what,
                    reason: "it must be at least 1".into(),
                });
            }
        }
        let (rank, world) = (self.trainer.rank(), self.trainer.world_size());
        let device = self.trainer.device();
        let sampler = StepSampler::new(o.seed).for_rank(rank, world)?;
        let (started, mut tokens, mut recent, mut all_reduced) =
            (Instant::now(), 0usize, Vec::new(), 0usize);
        let mut last_eval = (f32::NAN, None);
        let last = o.steps.min(stop_after.unwrap_or(usize::MAX));
        for step in start + 1..=last {
            observe(FitEvent::BeforeStep { step })?;
            // A failure here or in the evaluation meets the other ranks' next collective, so
            // that they stop too instead of waiting for this rank.
            let t = Some(o.seq_len);
            let (b, micro) = (o.batch_size, o.grad_accum);
            let batches = match sampler.micro_batches(
                &data.train,
                step as u64,
                b,
                micro,
                o.eos,
                t,
                &device,
            ) {
                Ok(batches) => batches,
                Err(e) => return Err(self.trainer.fail_step(e)),
            };
            let report = self.trainer.step(&batches)?;
            all_reduced += report.all_reduced_bytes;
            tokens += batches.iter().map(|b| b.ids.elem_count()).sum::<usize>();
            recent.push(report.loss);
            if recent.len() > 10 {
                recent.remove(0);
            }
            let opt = self.trainer.optimizer();
            let elapsed = started.elapsed().as_secs_f64();
            observe(FitEvent::Step {
                step,
                report: &report,
                active_blocks: opt.active_blocks(),
                tokens_per_second: tokens as f64 / elapsed,
            })?;
            let mut line = json!({
                "method": o.name, "step": step, "loss": report.loss, "lr": report.lr,
                "grad_norm": report.grad_norm, "skipped": report.skipped,
                "active_blocks": opt.active_blocks(), "state_bytes": opt.state_bytes(),
                "elapsed_s": elapsed, "all_reduced_bytes": report.all_reduced_bytes,
            });
            if (step % o.eval_every == 0 || step == o.steps) && rank == 0 {
                last_eval = match self.evaluate(data, o) {
                    Ok(eval) => eval,
                    Err(e) => return Err(self.trainer.fail_step(e)),
                };
                let (loss, accuracy) = last_eval;
                observe(FitEvent::Eval {
                    step,
                    loss,
                    accuracy,
                })?;
                (line["eval_loss"], line["eval_accuracy"]) = (json!(loss), json!(accuracy));
            }
            for sink in sinks.iter_mut() {
                sink.record(&line)?;
            }
            if let Some(ck) = checkpointer {
                if step % o.save_every == 0 || step == o.steps {
                    self.trainer.save_checkpoint(ck, |_| Ok(()))?;
                }
            }
        }
        if last_eval.0.is_nan() && rank == 0 {
            last_eval = self.evaluate(data, o)?;
        }
        let steps_run = last.saturating_sub(start);
        Ok(FitSummary {
            steps_run,
            final_train_loss: recent.iter().sum::<f32>() / recent.len().max(1) as f32,
            eval_loss: last_eval.0,
            accuracy: last_eval.1,
            wall_seconds: started.elapsed().as_secs_f64(),
            tokens,
            all_reduced_bytes_per_step: all_reduced as f64 / steps_run.max(1) as f64,
        })
    }

    /// The held-out loss over the first `eval_size` held-out examples, and exact-match
    /// accuracy over as many held-out pairs.
    fn evaluate(&self, data: &Dataset, o: &FitOptions) -> Result<(f32, Option<f32>)> {
        let n = o.eval_size.clamp(1, data.eval.len().max(1));
        let model = self.eval_model()?;
        let device = self.trainer.device();
        let eval = &data.eval[..n.min(data.eval.len())];
        let loss = eval_loss(&model, eval, o.batch_size, o.eos, Some(o.seq_len), &device)?;
        let accuracy = exact_match(&model, &data.pairs[..n.min(data.pairs.len())], o.eos)?;
        Ok((loss, accuracy))
    }
}
