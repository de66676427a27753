//! Hugging Face model directories: `config.json` plus `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;

use crate::error::{LisaError, Result};
use crate::io::{atomic_write, io};
use crate::models::llama::LlamaConfig;

/// File name of a single-file checkpoint.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// File name of the shard index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// File name of the model configuration.
pub const CONFIG_FILE: &str = "config.json";

/// The safetensors files of a model directory: `model.safetensors` when present, else the
/// shards named in `model.safetensors.index.json`.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(WEIGHTS_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(INDEX_FILE);
    if !index.is_file() {
        return Err(LisaError::Io {
            action: "no model weights in",
            path: dir.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("expected {WEIGHTS_FILE} or {INDEX_FILE}"),
            ),
        });
    }
    let text = std::fs::read_to_string(&index).map_err(io("cannot read", &index))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| LisaError::Json {
            path: index.clone(),
            source,
        })?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| {
            LisaError::InvalidConfig(format!("{} has no \"weight_map\" object", index.display()))
        })?;
    let mut files: Vec<PathBuf> = Vec::new();
    for file in map.values() {
        let file = file.as_str().ok_or_else(|| {
            LisaError::InvalidConfig(format!(
                "{}: weight_map values must be file names",
                index.display()
            ))
        })?;
        let path = dir.join(file);
        if !files.contains(&path) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Loads a Llama-family model directory into a fresh `VarMap`, converting every tensor to
/// `dtype` on `device`.
///
/// Each tensor the config implies must be present with its shape; any other tensor is an
/// error, except `lm_head.weight` in a checkpoint with tied embeddings and the
/// `rotary_emb.inv_freq` buffers some old checkpoints carry, which are skipped.
///
/// # Errors
/// [`LisaError::Io`] and [`LisaError::Json`] for unreadable files, the config errors of
/// [`LlamaConfig::validate`], and [`LisaError::MissingTensor`],
/// [`LisaError::UnexpectedTensor`] and [`LisaError::TensorShape`] naming the tensor.
pub fn load_llama(
    dir: impl AsRef<Path>,
    dtype: DType,
    device: &Device,
) -> Result<(LlamaConfig, VarMap)> {
    let dir = dir.as_ref();
    let config = LlamaConfig::from_file(dir.join(CONFIG_FILE))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for file in weight_files(dir)? {
        if !file.is_file() {
            return Err(io("cannot read", &file)(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "shard listed in the index is missing",
            )));
        }
        tensors.extend(candle_core::safetensors::load(&file, device)?);
    }
    let expected = config.tensor_shapes();
    for (name, t) in &tensors {
        let known = expected.iter().any(|(n, _)| n == name);
        let skipped = (config.tie_word_embeddings && name == "lm_head.weight")
            || name.ends_with("rotary_emb.inv_freq");
        if !known && !skipped {
            return Err(LisaError::UnexpectedTensor {
                name: name.clone(),
                found: t.dims().to_vec(),
            });
        }
    }
    let varmap = VarMap::new();
    {
        let mut data = varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::msg("the new VarMap's lock is poisoned"))?;
        for (name, shape) in expected {
            let t = tensors
                .remove(&name)
                .ok_or_else(|| LisaError::MissingTensor {
                    name: name.clone(),
                    expected: shape.clone(),
                })?;
            if t.dims() != shape.as_slice() {
                return Err(LisaError::TensorShape {
                    name,
                    expected: shape,
                    found: t.dims().to_vec(),
                });
            }
            data.insert(name, Var::from_tensor(&t.to_dtype(dtype)?)?);
        }
    }
    Ok((config, varmap))
}

fn dtype_name(dtype: DType) -> Option<&'static str> {
    match dtype {
        DType::F32 => Some("float32"),
        DType::F16 => Some("float16"),
        DType::BF16 => Some("bfloat16"),
        DType::F64 => Some("float64"),
        _ => None,
    }
}

/// Saves a model in the Hugging Face layout: `config.json` and a single `model.safetensors`,
/// in `dtype` (the config's `torch_dtype` is set to match).
///
/// Each file is written atomically (a temporary file, then a rename), so a failed save never
/// leaves a truncated file in place of a previous checkpoint. The weights are written before
/// the config. A stale shard index in `dir` is ignored by [`load_llama`], which prefers
/// `model.safetensors`.
///
/// # Errors
/// [`LisaError::MissingTensor`] or [`LisaError::TensorShape`] when `varmap` does not hold the
/// model `config` describes, [`LisaError::Io`] when a file cannot be written.
pub fn save_llama(
    dir: impl AsRef<Path>,
    config: &LlamaConfig,
    varmap: &VarMap,
    dtype: DType,
) -> Result<()> {
    let dir = dir.as_ref();
    config.validate()?;
    let data = varmap
        .data()
        .lock()
        .map_err(|_| candle_core::Error::msg("the VarMap's lock is poisoned"))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, shape) in config.tensor_shapes() {
        let var = data.get(&name).ok_or_else(|| LisaError::MissingTensor {
            name: name.clone(),
            expected: shape.clone(),
        })?;
        if var.dims() != shape.as_slice() {
            return Err(LisaError::TensorShape {
                name,
                expected: shape,
                found: var.dims().to_vec(),
            });
        }
        tensors.insert(name, var.as_tensor().detach().to_dtype(dtype)?);
    }
    drop(data);
    std::fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
    atomic_write(&dir.join(WEIGHTS_FILE), |tmp| {
        Ok(candle_core::safetensors::save(&tensors, tmp)?)
    })?;
    let mut config = config.clone();
    // Written under the name the config came with (transformers 5: `dtype`).
    match config.dtype.is_some() {
        true => config.dtype = dtype_name(dtype).map(str::to_string),
        false => config.torch_dtype = dtype_name(dtype).map(str::to_string),
    }
    let json = serde_json::to_string_pretty(&config).map_err(|source| LisaError::Json {
        path: dir.join(CONFIG_FILE),
        source,
    })?;
    atomic_write(&dir.join(CONFIG_FILE), |tmp| {
        std::fs::write(tmp, json + "\n").map_err(io("cannot write", tmp))
    })
}
