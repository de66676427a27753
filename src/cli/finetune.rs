//! `candle-lisa finetune` and `candle-lisa eval`: a [`FinetuneConfig`] from a run file and
//! flags, run by [`recipe::finetune`] with a progress bar, the loss plot and the summary
//! table.

use std::cell::RefCell;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use candle_core::{Tensor, Var};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, FromArgMatches};

use super::peak::DevicePeak;
use super::{alloc, plot, Error};
use crate::train::recipe::{self, FinetuneConfig, FinetuneObserver, MethodSummary, RunOptions};
use crate::train::{Checkpointer, FitEvent, LlamaFineTune};

/// `candle-lisa finetune`: every key of a run file as a flag, and the file itself.
#[derive(Args, Debug, Clone)]
pub struct FinetuneCommand {
    /// A run file: TOML, or JSON (a run's `run.json`). Flags given beside it override its keys.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The run's settings.
    #[command(flatten)]
    pub settings: FinetuneConfig,
    /// Continue each method from its newest complete checkpoint under --out (refused when the
    /// settings that change the math differ from the checkpoint's).
    #[arg(long)]
    pub resume: bool,
    /// Stop after this step as if interrupted.
    #[arg(long, hide = true)]
    pub stop_after: Option<usize>,
    /// Fault injection: SIGKILL this process after this many checkpoint files were written.
    #[arg(long, hide = true)]
    pub kill_after_writes: Option<usize>,
    /// Fault injection: SIGKILL this process right after this step's update.
    #[arg(long, hide = true)]
    pub kill_at_step: Option<usize>,
    /// Fault injection: make this step's loss NaN (one trainable weight is NaN during the
    /// step), so that the trainer skips it.
    #[arg(long, hide = true)]
    pub poison_step: Option<usize>,
    /// The settings given on the command line (they override the run file's).
    #[arg(skip)]
    given: Vec<String>,
}

impl FinetuneCommand {
    /// Parses a `finetune` command line (the program name first), as the `finetune` example
    /// takes it.
    ///
    /// # Errors
    /// clap's, for a bad command line.
    pub fn try_parse_from<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let command = Self::augment_args(clap::Command::new("finetune").version(crate_version()))
            .about("Fine-tune a Llama-family model with LISA, LoRA or full AdamW.");
        let matches = command.try_get_matches_from(args)?;
        let mut cmd = Self::from_arg_matches(&matches)?;
        cmd.note_given(&matches);
        Ok(cmd)
    }

    /// Records which settings `matches` took from the command line.
    pub(super) fn note_given(&mut self, matches: &ArgMatches) {
        self.given = matches
            .ids()
            .filter(|id| matches.value_source(id.as_str()) == Some(ValueSource::CommandLine))
            .map(|id| id.to_string())
            .collect();
    }

    /// The run's settings: the run file's (if any), with the flags given on the command line
    /// over them.
    ///
    /// # Errors
    /// An unreadable or invalid run file (an unknown key included).
    pub fn resolve(&self) -> Result<FinetuneConfig, Error> {
        let Some(file) = &self.config else {
            return Ok(self.settings.clone());
        };
        let mut config = serde_json::to_value(read_run_file(file)?)?;
        let flags = serde_json::to_value(&self.settings)?;
        for id in &self.given {
            if let Some(value) = flags.get(id) {
                config[id] = value.clone();
            }
        }
        Ok(serde_json::from_value(config)?)
    }

    /// Runs the fine-tune; rank 0 then draws `loss.png` and prints the summary table.
    ///
    /// # Errors
    /// Those of [`resolve`](Self::resolve), [`recipe::finetune`] and the plot.
    pub fn run(&self) -> Result<Vec<MethodSummary>, Error> {
        let config = self.resolve()?;
        let options = RunOptions {
            resume: self.resume,
            stop_after: self.stop_after,
        };
        let mut observer = Progress {
            cmd: self,
            steps: config.steps as u64,
            bar: None,
            heap_base: 0,
            device_peak: None,
            poison: None,
        };
        let summaries = recipe::finetune(&config, &options, &mut observer)?;
        if summaries.first().is_some_and(|s| s.rank != 0) {
            return Ok(summaries);
        }
        let metrics = config.out.join("metrics.jsonl");
        let mut curves = Vec::new();
        for s in &summaries {
            let (train, eval) = plot::curves_from_metrics(&metrics, &s.method)?;
            curves.push((s.method.clone(), train, eval));
        }
        plot::plot(&config.out.join("loss.png"), &curves, config.steps)?;
        let lines: Vec<serde_json::Value> = summaries
            .iter()
            .map(serde_json::to_value)
            .collect::<Result<_, _>>()?;
        plot::print_summaries(&lines);
        println!(
            "wrote {}/{{run.json,metrics.jsonl,summary.json,loss.png}} and the models under it",
            config.out.display()
        );
        Ok(summaries)
    }

    /// `candle-lisa eval`: [`recipe::evaluate`] of `--model` on the run's held-out split,
    /// printed as JSON.
    ///
    /// # Errors
    /// Those of [`resolve`](Self::resolve) and [`recipe::evaluate`].
    pub fn eval(&self) -> Result<(), Error> {
        let report = recipe::evaluate(&self.resolve()?)?;
        println!("{}", serde_json::to_string(&report)?);
        Ok(())
    }
}

fn crate_version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// A run file: JSON when it ends in `.json`, TOML otherwise.
fn read_run_file(path: &Path) -> Result<FinetuneConfig, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the run file {}: {e}", path.display()))?;
    let parsed = match path.extension().and_then(|e| e.to_str()) {
        Some("json") => serde_json::from_str(&text).map_err(|e| e.to_string()),
        _ => toml::from_str(&text).map_err(|e| e.to_string()),
    };
    parsed.map_err(|e| format!("invalid run file {}: {e}", path.display()).into())
}

/// What the command shows and injects while the recipe runs.
struct Progress<'a> {
    cmd: &'a FinetuneCommand,
    /// The run's last step.
    steps: u64,
    bar: Option<indicatif::ProgressBar>,
    heap_base: usize,
    device_peak: Option<DevicePeak>,
    poison: Option<Poison>,
}

impl Progress<'_> {
    /// Prints above the progress bar, or plainly when there is no terminal to draw it on.
    fn say(&self, line: String) {
        match &self.bar {
            Some(bar) if !bar.is_hidden() => bar.println(line),
            _ => println!("{line}"),
        }
    }
}

impl FinetuneObserver for Progress<'_> {
    fn method_starts(&mut self, _method: &str) -> crate::Result<()> {
        self.heap_base = alloc::reset_peak();
        Ok(())
    }

    fn checkpointer(&mut self, _method: &str, checkpointer: Checkpointer) -> Checkpointer {
        let Some(limit) = self.cmd.kill_after_writes else {
            return checkpointer;
        };
        let written = std::sync::atomic::AtomicUsize::new(0);
        checkpointer.on_write(move |_| {
            if written.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 >= limit {
                kill_self();
            }
        })
    }

    fn fitting(&mut self, method: &str, run: &LlamaFineTune, start: usize) -> crate::Result<()> {
        let bar = match run.trainer.rank() {
            0 => indicatif::ProgressBar::new(self.steps),
            _ => indicatif::ProgressBar::hidden(),
        }
        .with_prefix(method.to_string())
        .with_position(start as u64);
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{prefix:>5} [{bar:30}] {pos}/{len} {msg}")
        {
            bar.set_style(style);
        }
        self.bar = Some(bar);
        self.device_peak =
            Some(
                DevicePeak::new(&run.trainer.device()).map_err(|e| crate::LisaError::Io {
                    action: "cannot read the memory pool of",
                    path: PathBuf::from(format!("{:?}", run.trainer.device())),
                    source: std::io::Error::other(e.to_string()),
                })?,
            );
        self.poison = match self.cmd.poison_step {
            None => None,
            Some(at) => {
                let (_, var) =
                    run.trainer
                        .optimizer()
                        .trainable_vars()
                        .next()
                        .ok_or_else(|| crate::LisaError::InvalidArgument {
                            what: "poison_step",
                            reason: "nothing trains".into(),
                        })?;
                Some(Poison {
                    at,
                    var: var.clone(),
                    saved: RefCell::new(None),
                })
            }
        };
        Ok(())
    }

    fn event(&mut self, method: &str, event: &FitEvent<'_>) -> crate::Result<()> {
        match *event {
            FitEvent::BeforeStep { step } => {
                if let Some(p) = &self.poison {
                    p.before(step)?;
                }
            }
            FitEvent::Step {
                step,
                report,
                active_blocks,
                tokens_per_second,
            } => {
                if self.cmd.kill_at_step == Some(step) {
                    kill_self();
                }
                if let Some(p) = &self.poison {
                    p.after(step)?;
                }
                if let Some(bar) = &self.bar {
                    let loss = report.loss;
                    bar.set_message(format!(
                        "loss {loss:.3} {tokens_per_second:.0} tok/s blocks {active_blocks:?}"
                    ));
                    bar.set_position(step as u64);
                }
            }
            FitEvent::Eval {
                step,
                loss,
                accuracy,
            } => {
                let acc =
                    accuracy.map_or(String::new(), |a| format!(", accuracy {:.1}%", 100.0 * a));
                self.say(format!(
                    "{method:>5} step {step:4}: eval loss {loss:.3}{acc}"
                ));
            }
        }
        Ok(())
    }

    fn method_done(&mut self, summary: &mut MethodSummary) -> crate::Result<()> {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        let device = self
            .device_peak
            .take()
            .and_then(|p| p.peak().ok().flatten());
        let (bytes, source) = match device {
            Some(bytes) => (
                Some(bytes),
                Some("high-water mark of the CUDA memory pool over the run, weights included"),
            ),
            // Counted only where this program's allocator is the counting one.
            None if alloc::live() > 0 => (
                Some(alloc::peak() - self.heap_base),
                Some("heap above the method's start, counted by the allocator"),
            ),
            None => (None, None),
        };
        summary.peak_bytes = bytes;
        summary.peak_source = source.map(str::to_string);
        Ok(())
    }
}

/// `--poison-step`: the first trainable weight (by name: an always-trainable one) is NaN
/// during that step, so its loss is NaN and the trainer skips it, as it would a step that
/// overflowed.
struct Poison {
    at: usize,
    var: Var,
    /// The weight's value before step `at`, while it is poisoned.
    saved: RefCell<Option<Tensor>>,
}

impl Poison {
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

/// Kills this process at once, as a crash would (no destructors, no flushing).
fn kill_self() -> ! {
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &std::process::id().to_string()])
        .status();
    std::process::abort()
}
