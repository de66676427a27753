//! LoRA adapters in PEFT's format: `adapter_config.json` and `adapter_model.safetensors`,
//! tensors named `base_model.model.<module>.lora_A.weight` / `lora_B.weight`, so adapters
//! trained here load in PEFT (`PeftModel.from_pretrained`) and PEFT's load here.
//!
//! Reading refuses every `adapter_config.json` setting that changes the adapted model and that
//! this crate does not compute: another `peft_type`, rsLoRA, DoRA, per-module rank or alpha
//! patterns, LoRA biases, `fan_in_fan_out`, `modules_to_save`, layer subsets or replication,
//! regex or unknown `target_modules`. `lora_dropout` is read and returned: this crate's LoRA
//! trains without dropout, so it only matters if you continue training elsewhere.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use serde_json::{json, Value};

use crate::error::{LisaError, Result};
use crate::io::{atomic_write, io};
use crate::nn::lora::{LoraConfig, LORA_TARGETS};

/// PEFT's adapter configuration file.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
/// PEFT's adapter weights file.
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The prefix PEFT gives a causal LM's module names.
const PREFIX: &str = "base_model.model.";

/// An adapter read from a PEFT directory.
pub struct PeftAdapter {
    /// Rank, α and targets.
    pub config: LoraConfig,
    /// The adapter tensors under this crate's names (`model.layers.0.self_attn.q_proj.lora_A.weight`),
    /// ready for [`Llama::with_lora`](crate::Llama::with_lora).
    pub adapters: VarMap,
    /// PEFT's `lora_dropout` (not applied here).
    pub dropout: f64,
    /// PEFT's `base_model_name_or_path`, when given.
    pub base_model: Option<String>,
}

impl std::fmt::Debug for PeftAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeftAdapter")
            .field("config", &self.config)
            .field("adapters", &self.adapters.all_vars().len())
            .field("dropout", &self.dropout)
            .field("base_model", &self.base_model)
            .finish()
    }
}

fn refused(field: &'static str, value: &Value) -> LisaError {
    LisaError::UnsupportedConfig {
        field,
        value: value.to_string(),
        hint: "this PEFT setting changes the adapted model and is not computed by candle-lisa",
    }
}

/// Reads a PEFT LoRA adapter directory, converting the tensors to `dtype` on `device`.
///
/// # Errors
/// [`LisaError::Io`]/[`LisaError::Json`] for unreadable files, [`LisaError::UnsupportedConfig`]
/// naming a refused setting (see the module docs), [`LisaError::InvalidConfig`] for a bad
/// rank, α or target, [`LisaError::UnexpectedTensor`] for a tensor that is not a LoRA
/// matrix of a target, and [`LisaError::MissingAdapterTensor`] for a `lora_A` without its
/// `lora_B` (or the reverse), or a layer without a target the other layers have.
pub fn load_peft(dir: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<PeftAdapter> {
    let dir = dir.as_ref();
    let path = dir.join(ADAPTER_CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(io("cannot read", &path))?;
    let c: Value = serde_json::from_str(&text).map_err(|source| LisaError::Json {
        path: path.clone(),
        source,
    })?;
    let is_set = |v: &Value| match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Object(o) => !o.is_empty(),
        Value::Array(a) => !a.is_empty(),
        _ => true,
    };
    if c["peft_type"] != "LORA" {
        return Err(refused("peft_type", &c["peft_type"]));
    }
    for field in [
        "use_rslora",
        "use_dora",
        "rank_pattern",
        "alpha_pattern",
        "lora_bias",
        "fan_in_fan_out",
        "modules_to_save",
        "layers_to_transform",
        "layer_replication",
        "exclude_modules",
        "target_parameters",
        "trainable_token_indices",
        "alora_invocation_tokens",
        "use_qalora",
        "use_bdlora",
    ] {
        if is_set(&c[field]) {
            return Err(refused(field, &c[field]));
        }
    }
    if !matches!(&c["bias"], Value::Null) && c["bias"] != "none" {
        return Err(refused("bias", &c["bias"]));
    }
    let targets: Vec<String> = match &c["target_modules"] {
        Value::Array(a) => a
            .iter()
            .map(|t| {
                t.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| refused("target_modules", t))
            })
            .collect::<Result<_>>()?,
        other => return Err(refused("target_modules", other)),
    };
    let mut targets: Vec<String> = LORA_TARGETS
        .iter()
        .filter(|t| targets.iter().any(|x| x == *t))
        .map(|t| t.to_string())
        .chain(
            targets
                .iter()
                .filter(|t| !LORA_TARGETS.contains(&t.as_str()))
                .cloned(),
        )
        .collect();
    targets.dedup();
    let number = |key: &str| c[key].as_f64();
    let config = LoraConfig {
        rank: c["r"].as_u64().unwrap_or(0) as usize,
        alpha: number("lora_alpha").unwrap_or(8.0),
        targets,
    };
    config.validate()?;

    let weights = dir.join(ADAPTER_WEIGHTS_FILE);
    let tensors = candle_core::safetensors::load(&weights, &Device::Cpu)?;
    check_complete(&tensors)?;
    let adapters = VarMap::new();
    {
        let mut data = adapters
            .data()
            .lock()
            .map_err(|_| candle_core::Error::msg("the new VarMap's lock is poisoned"))?;
        for (name, t) in tensors {
            let ours = name.strip_prefix(PREFIX).unwrap_or(&name).to_string();
            let target = ours
                .strip_suffix(".lora_A.weight")
                .or_else(|| ours.strip_suffix(".lora_B.weight"))
                .and_then(|m| m.rsplit('.').next());
            if !target.is_some_and(|t| config.targets.iter().any(|x| x == t)) {
                return Err(LisaError::UnexpectedTensor {
                    name,
                    found: t.dims().to_vec(),
                });
            }
            data.insert(
                ours,
                Var::from_tensor(&t.to_dtype(dtype)?.to_device(device)?)?,
            );
        }
    }
    Ok(PeftAdapter {
        config,
        adapters,
        dropout: number("lora_dropout").unwrap_or(0.0),
        base_model: c["base_model_name_or_path"].as_str().map(str::to_string),
    })
}

/// Every adapted module has both matrices, and every layer the same adapted modules: a
/// module left out would get a fresh (zero) adapter from `Llama::with_lora` without a word.
fn check_complete(tensors: &HashMap<String, Tensor>) -> Result<()> {
    let missing = |name: String, have: String| LisaError::MissingAdapterTensor {
        name: format!("{PREFIX}{name}.weight"),
        have: format!("{PREFIX}{have}.weight"),
    };
    let mut modules = std::collections::BTreeSet::new();
    for name in tensors.keys() {
        let ours = name.strip_prefix(PREFIX).unwrap_or(name);
        if let Some(m) = ours.strip_suffix(".lora_A.weight") {
            modules.insert(m.to_string());
        } else if let Some(m) = ours.strip_suffix(".lora_B.weight") {
            modules.insert(m.to_string());
        }
    }
    let has = |module: &str, matrix: &str| {
        let name = format!("{module}.{matrix}.weight");
        tensors.contains_key(&format!("{PREFIX}{name}")) || tensors.contains_key(&name)
    };
    for m in &modules {
        for (matrix, other) in [("lora_A", "lora_B"), ("lora_B", "lora_A")] {
            if !has(m, matrix) {
                return Err(missing(format!("{m}.{matrix}"), format!("{m}.{other}")));
            }
        }
    }
    let in_layer = |m: &str| {
        let (layer, rest) = m.strip_prefix("model.layers.")?.split_once('.')?;
        Some((layer.parse::<usize>().ok()?, rest.to_string()))
    };
    let in_layers: Vec<(usize, String)> = modules.iter().filter_map(|m| in_layer(m)).collect();
    let layers: std::collections::BTreeSet<usize> = in_layers.iter().map(|l| l.0).collect();
    for (have_layer, rest) in &in_layers {
        if let Some(layer) = layers
            .iter()
            .find(|&&l| !in_layers.iter().any(|x| x.0 == l && &x.1 == rest))
        {
            return Err(missing(
                format!("model.layers.{layer}.{rest}.lora_A"),
                format!("model.layers.{have_layer}.{rest}.lora_A"),
            ));
        }
    }
    Ok(())
}

/// Writes `adapters` (as [`Llama::with_lora`](crate::Llama::with_lora) names them) and
/// `config` as a PEFT LoRA adapter directory, in `dtype`; `base_model` goes into
/// `base_model_name_or_path`. Both files are written atomically.
///
/// # Errors
/// [`LisaError::InvalidConfig`] for an invalid config, [`LisaError::Io`] when a file cannot be
/// written.
pub fn save_peft(
    dir: impl AsRef<Path>,
    adapters: &VarMap,
    config: &LoraConfig,
    base_model: Option<&str>,
    dtype: DType,
) -> Result<()> {
    let dir = dir.as_ref();
    config.validate()?;
    let tensors: HashMap<String, Tensor> = {
        let data = adapters
            .data()
            .lock()
            .map_err(|_| candle_core::Error::msg("the VarMap's lock is poisoned"))?;
        data.iter()
            .map(|(name, var)| {
                Ok((
                    format!("{PREFIX}{name}"),
                    var.as_tensor().detach().to_dtype(dtype)?,
                ))
            })
            .collect::<candle_core::Result<_>>()?
    };
    // Only the targets the model has (a Llama has no qkv_proj).
    let targets: Vec<&String> = config
        .targets
        .iter()
        .filter(|t| {
            tensors
                .keys()
                .any(|n| n.ends_with(&format!(".{t}.lora_A.weight")))
        })
        .collect();
    let peft_config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "base_model_name_or_path": base_model,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    });
    std::fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
    atomic_write(&dir.join(ADAPTER_WEIGHTS_FILE), |tmp| {
        crate::io::save_safetensors(&tensors, tmp)
    })?;
    let text = serde_json::to_string_pretty(&peft_config).map_err(|source| LisaError::Json {
        path: dir.join(ADAPTER_CONFIG_FILE),
        source,
    })?;
    atomic_write(&dir.join(ADAPTER_CONFIG_FILE), |tmp| {
        std::fs::write(tmp, text + "\n").map_err(io("cannot write", tmp))
    })
}
