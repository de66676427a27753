//! Saving and restoring a [`LisaAdamW`]'s state: moments, counters, active blocks and the
//! sampler's position.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::ParamsAdamW;

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

impl LisaAdamW {
    /// Saves everything a resumed run needs besides the weights: the AdamW moments, f32
    /// master copies and step counter of every trainable parameter, the loss scaler, the active blocks, the step and period counters,
    /// the hyper-parameters and the sampler's position, as `optimizer.safetensors` and
    /// `optimizer.json` in `dir` (created if needed), each written atomically. The tensors
    /// are written first and `optimizer.json` records their file's SHA-256, so a kill between
    /// the two writes leaves a pair that [`load_state`](Self::load_state) refuses.
    ///
    /// # Errors
    /// [`LisaError::Io`] when a file cannot be written.
    pub fn save_state(&self, dir: impl AsRef<std::path::Path>) -> Result<()> {
        use crate::io::{atomic_write, io};
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
        let mut tensors = HashMap::new();
        let mut steps = serde_json::Map::new();
        for (i, st) in self.adamw.state.iter().enumerate() {
            if let Some(st) = st {
                let name = self.map.name_at(i);
                tensors.insert(format!("m/{name}"), st.m.clone());
                tensors.insert(format!("v/{name}"), st.v.clone());
                if let Some(w) = &st.master {
                    tensors.insert(format!("master/{name}"), w.clone());
                }
                steps.insert(name.to_string(), st.step.into());
            }
        }
        let tensors_path = dir.join(STATE_TENSORS_FILE);
        atomic_write(&tensors_path, |tmp| {
            crate::io::save_safetensors(&tensors, tmp)
        })?;
        let p = &self.adamw.params;
        let json = serde_json::json!({
            "tensors_sha256": file_sha256(&tensors_path)?,
            "format": STATE_FORMAT,
            "mode": mode_json(self.mode),
            "steps": self.adamw.steps,
            "period_index": self.period_index,
            "resampled": self.resampled,
            "active": self.active,
            "params": {"lr": p.lr, "beta1": p.beta1, "beta2": p.beta2, "eps": p.eps, "weight_decay": p.weight_decay},
            "param_steps": steps,
            "names": self.map.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            "sampler": self.sampler.as_ref().and_then(|s| s.state()),
            "loss_scaler": self.adamw.scaler.as_ref().map(LossScaler::to_json),
            "skipped_steps": self.adamw.skipped_steps,
        });
        let text = serde_json::to_string_pretty(&json).unwrap_or_default();
        atomic_write(&dir.join(STATE_JSON_FILE), |tmp| {
            std::fs::write(tmp, text).map_err(io("cannot write", tmp))
        })
    }

    /// Restores a state written by [`save_state`](Self::save_state) into an optimizer built
    /// over the same parameters in the same [`Mode`] (same γ and period). With the weights of the same step
    /// (for example from [`save_llama`](crate::save_llama)), the run then goes on exactly as if
    /// it had not stopped: same active blocks, same moments, same future draws.
    ///
    /// # Errors
    /// [`LisaError::InvalidState`] when the state does not fit (another mode, γ or period, unknown
    /// parameter, a moment of the wrong shape, a sampler that cannot restore),
    /// [`LisaError::TornState`] when the two files are not from the same save, [`LisaError::Io`]
    /// or [`LisaError::Json`] for unreadable files. Nothing is changed then.
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
        if json["format"] != STATE_FORMAT && json["format"] != STATE_FORMAT_UNBOUND {
            return Err(bad(format!(
                "format is {}, expected {STATE_FORMAT}",
                json["format"]
            )));
        }
        let tensors_path = dir.join(STATE_TENSORS_FILE);
        if json["format"] == STATE_FORMAT {
            let recorded = json["tensors_sha256"]
                .as_str()
                .ok_or_else(|| bad("no \"tensors_sha256\"".into()))?;
            if file_sha256(&tensors_path)? != recorded {
                return Err(LisaError::TornState {
                    path: dir.to_path_buf(),
                });
            }
        }
        let num = |key: &str| {
            json[key]
                .as_u64()
                .ok_or_else(|| bad(format!("no integer {key:?}")))
        };
        let saved = mode_from_json(&json["mode"])
            .ok_or_else(|| bad(format!("bad \"mode\": {}", json["mode"])))?;
        if saved != self.mode {
            return Err(bad(format!(
                "it was saved by {saved}, this optimizer is {}",
                self.mode
            )));
        }
        let names: Vec<String> = serde_json::from_value(json["names"].clone())
            .map_err(|e| bad(format!("bad \"names\": {e}")))?;
        if !names
            .iter()
            .map(String::as_str)
            .eq(self.map.iter().map(|(n, _)| n))
        {
            return Err(bad(format!(
                "it was saved for {} parameters that differ from this optimizer's {}",
                names.len(),
                self.map.len()
            )));
        }
        let active: Vec<usize> = serde_json::from_value(json["active"].clone())
            .map_err(|e| bad(format!("bad \"active\": {e}")))?;
        let gamma = match self.mode {
            Mode::Full => 0,
            Mode::Lisa { gamma, .. } => gamma,
        };
        if active.len() != gamma || active.iter().any(|&b| b >= self.map.num_blocks()) {
            return Err(bad(format!(
                "active blocks {active:?} do not fit {} blocks",
                self.map.num_blocks()
            )));
        }
        let params: ParamsAdamW = {
            let p = &json["params"];
            let f = |k: &str| {
                p[k].as_f64()
                    .ok_or_else(|| bad(format!("no number params.{k}")))
            };
            ParamsAdamW {
                lr: f("lr")?,
                beta1: f("beta1")?,
                beta2: f("beta2")?,
                eps: f("eps")?,
                weight_decay: f("weight_decay")?,
            }
        };
        check_params(&params)?;
        let steps = json["param_steps"]
            .as_object()
            .ok_or_else(|| bad("no \"param_steps\" object".into()))?;
        let device = self
            .adamw
            .vars
            .first()
            .map_or(Device::Cpu, |v| v.device().clone());
        let mut tensors = candle_core::safetensors::load(&tensors_path, &device)?;
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
            let step = steps.get(name).and_then(|s| s.as_u64());
            let (m, v) = (
                tensors.remove(&format!("m/{name}")),
                tensors.remove(&format!("v/{name}")),
            );
            let master = tensors.remove(&format!("master/{name}"));
            let (Some(step), Some(m), Some(v)) = (step, m, v) else {
                return Err(bad(format!("no state for trainable parameter {name}")));
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
                return Err(bad(format!(
                    "the moments of {name} are not {moments_dtype:?} of its shape {:?} \
                     (call set_compact_state as the saved run did before load_state)",
                    var.shape()
                )));
            }
            match (&master, is_half(var.dtype())) {
                (Some(w), true) if fits(w, DType::F32) => {}
                (None, false) => {}
                _ => {
                    return Err(bad(format!(
                        "{name} is {:?}, which needs {} f32 master copy of shape {:?}",
                        var.dtype(),
                        if is_half(var.dtype()) { "an" } else { "no" },
                        var.shape()
                    )))
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
            return Err(bad(format!(
                "it holds {extra}, which this optimizer does not train"
            )));
        }
        let (taken, period_index) = (num("steps")?, num("period_index")?);
        let skipped_steps = num("skipped_steps")?;
        let scaler = match (&json["loss_scaler"], &self.adamw.scaler) {
            (serde_json::Value::Null, None) => None,
            (saved, Some(_)) if !saved.is_null() => {
                Some(LossScaler::from_json(saved).map_err(|e| bad(format!("loss_scaler: {e}")))?)
            }
            (saved, _) => {
                return Err(bad(format!(
                    "it was saved {} a loss scaler and this optimizer has {}; set the same \
                     LisaAdamW::set_loss_scaler before loading",
                    if saved.is_null() { "without" } else { "with" },
                    if self.adamw.scaler.is_some() {
                        "one"
                    } else {
                        "none"
                    },
                )))
            }
        };
        // The last fallible change: everything above left the optimizer untouched.
        if let (false, Some(sampler)) = (json["sampler"].is_null(), self.sampler.as_mut()) {
            sampler
                .restore(&json["sampler"])
                .map_err(|e| bad(format!("sampler: {e}")))?;
        }
        self.adamw.state = state;
        self.adamw.scaler = scaler;
        self.adamw.skipped_steps = skipped_steps;
        self.active = active;
        self.adamw.params = params;
        self.adamw.steps = taken;
        self.period_index = period_index;
        self.resampled = json["resampled"].as_bool().unwrap_or(false);
        Ok(())
    }
}

/// How a [`Mode`] is written in `optimizer.json`.
fn mode_json(mode: Mode) -> serde_json::Value {
    match mode {
        Mode::Full => serde_json::json!("full"),
        Mode::Lisa { gamma, period } => {
            serde_json::json!({"lisa": {"gamma": gamma, "period": period}})
        }
    }
}

/// Reads [`mode_json`]'s form.
fn mode_from_json(v: &serde_json::Value) -> Option<Mode> {
    if v == "full" {
        return Some(Mode::Full);
    }
    let lisa = &v["lisa"];
    Some(Mode::Lisa {
        gamma: usize::try_from(lisa["gamma"].as_u64()?).ok()?,
        period: usize::try_from(lisa["period"].as_u64()?).ok()?,
    })
}
