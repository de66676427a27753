//! Saving and restoring a [`LisaAdamW`]'s state: moments, counters, active blocks and the
//! sampler's position.
//!
//! The state is a record ([`StateRecord`], the JSON file, and the moment tensors by name) that
//! [`LisaAdamW::save_state`] takes from the optimizer and writes, and
//! [`LisaAdamW::load_state`] reads, checks against the optimizer and only then moves in: the
//! files are I/O, the record is the format, the optimizer's fields are touched in one place.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor};
use candle_nn::ParamsAdamW;
use serde::{Deserialize, Serialize};

use super::adamw::check_params;
use super::block_map::ParamRole;
use super::lisa::{LisaAdamW, Mode};
use super::precision::LossScaler;
use super::update::{can_compact, is_half, Moments};
use crate::error::{LisaError, Result};

/// File of the moments written by [`LisaAdamW::save_state`].
pub const STATE_TENSORS_FILE: &str = "optimizer.safetensors";
/// File of the counters, active blocks and sampler position written by
/// [`LisaAdamW::save_state`].
pub const STATE_JSON_FILE: &str = "optimizer.json";
const STATE_FORMAT: &str = "candle-lisa-optimizer/3";
/// The format before `optimizer.json` recorded the hash of the tensors file; read unchecked.
const STATE_FORMAT_UNBOUND: &str = "candle-lisa-optimizer/2";

/// The SHA-256 of a file, in hex.
fn file_sha256(path: &std::path::Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut file = std::fs::File::open(path).map_err(crate::io::io("cannot read", path))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(crate::io::io("cannot read", path))?;
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// `optimizer.json`: everything of the state but the tensors.
#[derive(Debug, Serialize, Deserialize)]
struct StateRecord {
    /// The SHA-256 of the tensors file of the same save (absent in format 2).
    #[serde(default)]
    tensors_sha256: Option<String>,
    format: String,
    mode: ModeRecord,
    steps: u64,
    period_index: u64,
    #[serde(default)]
    resampled: bool,
    active: Vec<usize>,
    params: ParamsRecord,
    param_steps: BTreeMap<String, u64>,
    names: Vec<String>,
    sampler: Option<serde_json::Value>,
    loss_scaler: Option<serde_json::Value>,
    skipped_steps: u64,
}

/// A [`Mode`] as `optimizer.json` writes it: `"full"` or `{"lisa": {"gamma", "period"}}`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ModeRecord {
    Full,
    Lisa { gamma: usize, period: usize },
}

impl From<Mode> for ModeRecord {
    fn from(mode: Mode) -> Self {
        match mode {
            Mode::Full => Self::Full,
            Mode::Lisa { gamma, period } => Self::Lisa { gamma, period },
        }
    }
}

impl From<ModeRecord> for Mode {
    fn from(mode: ModeRecord) -> Self {
        match mode {
            ModeRecord::Full => Self::Full,
            ModeRecord::Lisa { gamma, period } => Self::Lisa { gamma, period },
        }
    }
}

/// [`ParamsAdamW`] as `optimizer.json` writes it.
#[derive(Debug, Serialize, Deserialize)]
struct ParamsRecord {
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
}

impl From<&ParamsRecord> for ParamsAdamW {
    fn from(p: &ParamsRecord) -> Self {
        Self {
            lr: p.lr,
            beta1: p.beta1,
            beta2: p.beta2,
            eps: p.eps,
            weight_decay: p.weight_decay,
        }
    }
}

impl LisaAdamW {
    /// Saves everything a resumed run needs besides the weights: the AdamW moments, f32
    /// master copies and step counter of every trainable parameter, the loss scaler, the
    /// active blocks, the step and period counters, the hyper-parameters and the sampler's
    /// position, as `optimizer.safetensors` and `optimizer.json` in `dir` (created if
    /// needed), each written atomically. The tensors are written first and `optimizer.json`
    /// records their file's SHA-256, so a kill between the two writes leaves a pair that
    /// [`load_state`](Self::load_state) refuses.
    ///
    /// # Errors
    /// [`LisaError::Io`] when a file cannot be written.
    pub fn save_state(&self, dir: impl AsRef<std::path::Path>) -> Result<()> {
        use crate::io::{atomic_write, io};
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
        let (mut record, tensors) = self.state_record();
        let tensors_path = dir.join(STATE_TENSORS_FILE);
        atomic_write(&tensors_path, |tmp| {
            crate::io::save_safetensors(&tensors, tmp)
        })?;
        record.tensors_sha256 = Some(file_sha256(&tensors_path)?);
        let text = serde_json::to_string_pretty(&record).unwrap_or_default();
        atomic_write(&dir.join(STATE_JSON_FILE), |tmp| {
            std::fs::write(tmp, text).map_err(io("cannot write", tmp))
        })
    }

    /// The state as a record and its tensors (`m/NAME`, `v/NAME`, `master/NAME`).
    fn state_record(&self) -> (StateRecord, HashMap<String, Tensor>) {
        let mut tensors = HashMap::new();
        let mut param_steps = BTreeMap::new();
        for (i, st) in self.adamw.state.iter().enumerate() {
            if let Some(st) = st {
                let name = self.map.name_at(i);
                tensors.insert(format!("m/{name}"), st.m.clone());
                tensors.insert(format!("v/{name}"), st.v.clone());
                if let Some(w) = &st.master {
                    tensors.insert(format!("master/{name}"), w.clone());
                }
                param_steps.insert(name.to_string(), st.step);
            }
        }
        let p = &self.adamw.params;
        let record = StateRecord {
            tensors_sha256: None,
            format: STATE_FORMAT.into(),
            mode: self.mode.into(),
            steps: self.adamw.steps,
            period_index: self.period_index,
            resampled: self.resampled,
            active: self.active.clone(),
            params: ParamsRecord {
                lr: p.lr,
                beta1: p.beta1,
                beta2: p.beta2,
                eps: p.eps,
                weight_decay: p.weight_decay,
            },
            param_steps,
            names: self.map.iter().map(|(n, _)| n.to_string()).collect(),
            sampler: self.sampler.as_ref().and_then(|s| s.state()),
            loss_scaler: self.adamw.scaler.as_ref().map(LossScaler::to_json),
            skipped_steps: self.adamw.skipped_steps,
        };
        (record, tensors)
    }

    /// Restores a state written by [`save_state`](Self::save_state) into an optimizer built
    /// over the same parameters in the same [`Mode`] (same γ and period). With the weights of
    /// the same step (for example from [`save_llama`](crate::save_llama)), the run then goes
    /// on exactly as if it had not stopped: same active blocks, same moments, same future
    /// draws.
    ///
    /// # Errors
    /// [`LisaError::InvalidState`] when the state does not fit (another mode, γ or period,
    /// unknown parameter, a moment of the wrong shape, a sampler that cannot restore),
    /// [`LisaError::TornState`] when the two files are not from the same save,
    /// [`LisaError::Io`] or [`LisaError::Json`] for unreadable files. Nothing is changed then.
    pub fn load_state(&mut self, dir: impl AsRef<std::path::Path>) -> Result<()> {
        use crate::io::io;
        let dir = dir.as_ref();
        let bad = |reason: String| LisaError::InvalidState {
            path: dir.to_path_buf(),
            reason,
        };
        let json_path = dir.join(STATE_JSON_FILE);
        let text = std::fs::read_to_string(&json_path).map_err(io("cannot read", &json_path))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| LisaError::Json {
                path: json_path.clone(),
                source,
            })?;
        // The format first: a file of another format is reported as such, not by its fields.
        if json["format"] != STATE_FORMAT && json["format"] != STATE_FORMAT_UNBOUND {
            return Err(bad(format!(
                "format is {}, expected {STATE_FORMAT}",
                json["format"]
            )));
        }
        let record: StateRecord =
            serde_json::from_value(json).map_err(|e| bad(format!("{STATE_JSON_FILE}: {e}")))?;
        let tensors_path = dir.join(STATE_TENSORS_FILE);
        if record.format == STATE_FORMAT {
            let recorded = record
                .tensors_sha256
                .as_deref()
                .ok_or_else(|| bad("no \"tensors_sha256\"".into()))?;
            if file_sha256(&tensors_path)? != recorded {
                return Err(LisaError::TornState {
                    path: dir.to_path_buf(),
                });
            }
        }
        let device = self
            .adamw
            .vars
            .first()
            .map_or(Device::Cpu, |v| v.device().clone());
        check_params(&ParamsAdamW::from(&record.params))?;
        let tensors = candle_core::safetensors::load(&tensors_path, &device)?;
        self.restore(record, tensors).map_err(bad)
    }

    /// Moves `record` and its `tensors` into the optimizer after checking every part against
    /// it (its hyper-parameters are checked already); on an error (the reason) nothing is
    /// changed.
    fn restore(
        &mut self,
        record: StateRecord,
        mut tensors: HashMap<String, Tensor>,
    ) -> std::result::Result<(), String> {
        let saved = Mode::from(record.mode);
        if saved != self.mode {
            return Err(format!(
                "it was saved by {saved}, this optimizer is {}",
                self.mode
            ));
        }
        let names = &record.names;
        if !names
            .iter()
            .map(String::as_str)
            .eq(self.map.iter().map(|(n, _)| n))
        {
            return Err(format!(
                "it was saved for {} parameters that differ from this optimizer's {}",
                names.len(),
                self.map.len()
            ));
        }
        let active = record.active;
        let gamma = match self.mode {
            Mode::Full => 0,
            Mode::Lisa { gamma, .. } => gamma,
        };
        if active.len() != gamma || active.iter().any(|&b| b >= self.map.num_blocks()) {
            return Err(format!(
                "active blocks {active:?} do not fit {} blocks",
                self.map.num_blocks()
            ));
        }
        let params = ParamsAdamW::from(&record.params);
        let mut state: Vec<Option<Moments>> = (0..self.adamw.vars.len()).map(|_| None).collect();
        for (i, var) in self.adamw.vars.iter().enumerate() {
            let name = self.map.name_at(i);
            let trainable = match self.map.group_at(i) {
                ParamRole::Always => true,
                ParamRole::Block(b) => active.contains(&b),
                ParamRole::Never => false,
            };
            if !trainable {
                continue;
            }
            let step = record.param_steps.get(name).copied();
            let (m, v) = (
                tensors.remove(&format!("m/{name}")),
                tensors.remove(&format!("v/{name}")),
            );
            let master = tensors.remove(&format!("master/{name}"));
            let (Some(step), Some(m), Some(v)) = (step, m, v) else {
                return Err(format!("no state for trainable parameter {name}"));
            };
            let state_dtype = if is_half(var.dtype()) {
                DType::F32
            } else {
                var.dtype()
            };
            let compact = self.compact_at(self.compact, i) && can_compact(var.dtype());
            let moments_dtype = if compact { DType::BF16 } else { state_dtype };
            let fits = |t: &Tensor, dtype| t.shape() == var.shape() && t.dtype() == dtype;
            if !fits(&m, moments_dtype) || !fits(&v, moments_dtype) {
                return Err(format!(
                    "the moments of {name} are not {moments_dtype:?} of its shape {:?} \
                     (call set_compact_state as the saved run did before load_state)",
                    var.shape()
                ));
            }
            match (&master, is_half(var.dtype())) {
                (Some(w), true) if fits(w, DType::F32) => {}
                (None, false) => {}
                _ => {
                    return Err(format!(
                        "{name} is {:?}, which needs {} f32 master copy of shape {:?}",
                        var.dtype(),
                        if is_half(var.dtype()) { "an" } else { "no" },
                        var.shape()
                    ))
                }
            }
            let salt = i as u64;
            state[i] = Some(Moments {
                m,
                v,
                master,
                step,
                salt,
            });
        }
        if let Some(extra) = tensors.keys().next() {
            return Err(format!(
                "it holds {extra}, which this optimizer does not train"
            ));
        }
        let scaler = match (&record.loss_scaler, &self.adamw.scaler) {
            (None, None) => None,
            (Some(saved), Some(_)) => {
                Some(LossScaler::from_json(saved).map_err(|e| format!("loss_scaler: {e}"))?)
            }
            (saved, _) => {
                return Err(format!(
                    "it was saved {} a loss scaler and this optimizer has {}; set the same \
                     LisaAdamW::set_loss_scaler before loading",
                    if saved.is_none() { "without" } else { "with" },
                    if self.adamw.scaler.is_some() {
                        "one"
                    } else {
                        "none"
                    },
                ))
            }
        };
        // The last fallible change: everything above left the optimizer untouched.
        if let (Some(saved), Some(sampler)) = (&record.sampler, self.sampler.as_mut()) {
            sampler
                .restore(saved)
                .map_err(|e| format!("sampler: {e}"))?;
        }
        self.adamw.state = state;
        self.adamw.scaler = scaler;
        self.adamw.skipped_steps = record.skipped_steps;
        self.active = active;
        self.adamw.params = params;
        self.adamw.steps = record.steps;
        self.period_index = record.period_index;
        self.resampled = record.resampled;
        Ok(())
    }
}
