//! Hugging Face model directories: `config.json` plus `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;

use crate::error::{LisaError, Result};
use crate::io::io;
use crate::models::llama::LlamaConfig;

/// File name of a single-file checkpoint.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// File name of the shard index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// File name of the model configuration.
pub const CONFIG_FILE: &str = "config.json";

/// The safetensors files of a model directory: `model.safetensors` when present, else the
/// shards named in `model.safetensors.index.json`, each a plain file name inside `dir`.
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
    let bad = |reason: String| LisaError::InvalidCheckpoint {
        path: index.clone(),
        reason,
    };
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no \"weight_map\" object".into()))?;
    let mut files: Vec<PathBuf> = Vec::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("weight_map[{tensor:?}] is not a file name")))?;
        // A shard is a file of the model directory: no other directory, no parent, no root.
        let mut parts = Path::new(file).components();
        match (parts.next(), parts.next()) {
            (Some(std::path::Component::Normal(_)), None) => {}
            _ => {
                return Err(bad(format!(
                    "shard {file:?} (for {tensor:?}) is not a file name inside the model directory"
                )))
            }
        }
        let path = dir.join(file);
        if !files.contains(&path) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// One tensor's place in a safetensors file.
struct Entry {
    dtype: DType,
    shape: Vec<usize>,
    /// Where its bytes start in the file (their length is checked against the shape).
    start: u64,
}

/// The tensors a safetensors file holds, from its header (the data is not read).
fn read_header(path: &Path) -> Result<Vec<(String, Entry)>> {
    use std::io::Read;
    let bad = |reason: String| LisaError::InvalidCheckpoint {
        path: path.to_path_buf(),
        reason,
    };
    let mut file = std::fs::File::open(path).map_err(io("cannot read", path))?;
    let file_len = file.metadata().map_err(io("cannot read", path))?.len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(io("cannot read", path))?;
    let header_len = u64::from_le_bytes(len);
    if header_len > file_len.saturating_sub(8) || header_len > 100 << 20 {
        return Err(bad(format!(
            "header length {header_len} does not fit the file"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .map_err(io("cannot read", path))?;
    let json: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|source| LisaError::Json {
            path: path.to_path_buf(),
            source,
        })?;
    let data_start = 8 + header_len;
    let mut out = Vec::new();
    for (name, info) in json {
        if name == "__metadata__" {
            continue;
        }
        let dtype = match info["dtype"].as_str() {
            Some("F32") => DType::F32,
            Some("F16") => DType::F16,
            Some("BF16") => DType::BF16,
            Some("F64") => DType::F64,
            other => {
                return Err(bad(format!(
                    "{name:?} has dtype {other:?}; expected F32, F16, BF16 or F64"
                )))
            }
        };
        let shape: Vec<usize> = serde_json::from_value(info["shape"].clone())
            .map_err(|_| bad(format!("{name:?} has no valid shape")))?;
        let offsets: [u64; 2] = serde_json::from_value(info["data_offsets"].clone())
            .map_err(|_| bad(format!("{name:?} has no valid data_offsets")))?;
        // The header is untrusted: every product and sum is checked, and the extent must lie
        // inside the file before anything of its size is allocated.
        let bytes = shape
            .iter()
            .try_fold(dtype.size_in_bytes() as u64, |n, &d| {
                n.checked_mul(d as u64)
            })
            .filter(|&n| usize::try_from(n).is_ok())
            .ok_or_else(|| bad(format!("{name:?}: shape {shape:?} is too large")))?;
        let extent = data_start
            .checked_add(offsets[0])
            .zip(data_start.checked_add(offsets[1]));
        match extent {
            Some((start, end)) if start <= end && end - start == bytes && end <= file_len => {}
            _ => {
                return Err(bad(format!(
                    "{name:?}: data_offsets {offsets:?} do not hold {bytes} bytes inside the file"
                )))
            }
        }
        let start = data_start + offsets[0];
        out.push((
            name,
            Entry {
                dtype,
                shape,
                start,
            },
        ));
    }
    Ok(out)
}

/// Reads one tensor straight into a buffer of its own dtype and makes it a variable of
/// `dtype` on `device`: without a copy when the file already holds `dtype` and `device` is
/// the CPU, else through one conversion.
fn read_var(path: &Path, e: &Entry, dtype: DType, device: &Device) -> Result<Var> {
    let mut file = std::fs::File::open(path).map_err(io("cannot read", path))?;
    let n: usize = e.shape.iter().product();
    let direct = e.dtype == dtype && device.is_cpu();
    fn read_into<T: Copy + Default + candle_core::WithDType>(
        file: &mut std::fs::File,
        path: &Path,
        e: &Entry,
        n: usize,
        direct: bool,
    ) -> Result<std::result::Result<Var, Tensor>> {
        let mut buf = vec![T::default(); n];
        // SAFETY: `buf` is `n` initialised values of a plain number type; its bytes are
        // overwritten with the file's little-endian values of the same type.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(
                buf.as_mut_ptr() as *mut u8,
                n * std::mem::size_of::<T>(),
            )
        };
        use std::io::{Read, Seek};
        file.seek(std::io::SeekFrom::Start(e.start))
            .and_then(|_| file.read_exact(bytes))
            .map_err(io("cannot read", path))?;
        Ok(match direct {
            true => Ok(Var::from_vec(buf, e.shape.as_slice(), &Device::Cpu)?),
            false => Err(Tensor::from_vec(buf, e.shape.as_slice(), &Device::Cpu)?),
        })
    }
    let read = match e.dtype {
        DType::F32 => read_into::<f32>(&mut file, path, e, n, direct)?,
        DType::F64 => read_into::<f64>(&mut file, path, e, n, direct)?,
        DType::F16 => read_into::<half::f16>(&mut file, path, e, n, direct)?,
        _ => read_into::<half::bf16>(&mut file, path, e, n, direct)?,
    };
    Ok(match read {
        Ok(var) => var,
        Err(t) => Var::from_tensor(&t.to_dtype(dtype)?.to_device(device)?)?,
    })
}

/// Loads a Llama-family model directory into a fresh `VarMap`, converting every tensor to
/// `dtype` on `device`.
///
/// Each tensor the config implies must be present with its shape; any other tensor is an
/// error, except `lm_head.weight` in a checkpoint with tied embeddings and the
/// `rotary_emb.inv_freq` buffers some old checkpoints carry, which are skipped. Tensors are
/// read one at a time, each straight into its final buffer when no conversion is needed, so
/// the memory a load takes is about the model's size (see `examples/load_report.rs`).
///
/// # Errors
/// [`LisaError::Io`] and [`LisaError::Json`] for unreadable files, the config errors of
/// [`LlamaConfig::validate`], [`LisaError::InvalidCheckpoint`] for a shard index naming a
/// file outside `dir`, a tensor stored twice or a malformed file, and
/// [`LisaError::MissingTensor`], [`LisaError::UnexpectedTensor`] and
/// [`LisaError::TensorShape`] naming the tensor.
pub fn load_llama(
    dir: impl AsRef<Path>,
    dtype: DType,
    device: &Device,
) -> Result<(LlamaConfig, VarMap)> {
    let dir = dir.as_ref();
    let config = LlamaConfig::from_file(dir.join(CONFIG_FILE))?;
    let mut entries: HashMap<String, (PathBuf, Entry)> = HashMap::new();
    for file in weight_files(dir)? {
        if !file.is_file() {
            return Err(io("cannot read", &file)(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "shard listed in the index is missing",
            )));
        }
        for (name, entry) in read_header(&file)? {
            if let Some((first, _)) = entries.get(&name) {
                return Err(LisaError::InvalidCheckpoint {
                    path: file.clone(),
                    reason: format!("tensor {name:?} is also in {}", first.display()),
                });
            }
            entries.insert(name, (file.clone(), entry));
        }
    }
    let expected = config.tensor_shapes();
    for (name, (_, e)) in &entries {
        let known = expected.iter().any(|(n, _)| n == name);
        let skipped = (config.tie_word_embeddings && name == "lm_head.weight")
            || name.ends_with("rotary_emb.inv_freq");
        if !known && !skipped {
            return Err(LisaError::UnexpectedTensor {
                name: name.clone(),
                found: e.shape.clone(),
            });
        }
    }
    check_shapes(&expected, |name| entries.get(name).map(|(_, e)| &e.shape))?;
    let varmap = VarMap::new();
    {
        let mut data = varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::msg("the new VarMap's lock is poisoned"))?;
        for (name, _) in expected {
            let (file, e) = &entries[&name];
            data.insert(name, read_var(file, e, dtype, device)?);
        }
    }
    Ok((config, varmap))
}

/// Every tensor of `expected` is `found` with its shape: [`LisaError::MissingTensor`] or
/// [`LisaError::TensorShape`] naming the first that is not.
pub(crate) fn check_shapes<'a>(
    expected: &[(String, Vec<usize>)],
    found: impl Fn(&str) -> Option<&'a Vec<usize>>,
) -> Result<()> {
    for (name, shape) in expected {
        let got = found(name).ok_or_else(|| LisaError::MissingTensor {
            name: name.clone(),
            expected: shape.clone(),
        })?;
        if got != shape {
            return Err(LisaError::TensorShape {
                name: name.clone(),
                expected: shape.clone(),
                found: got.clone(),
            });
        }
    }
    Ok(())
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

/// How [`save_llama_with`] writes a model.
#[derive(Clone, Debug)]
pub struct SaveOptions {
    /// Largest shard in bytes (5 GB, as transformers' default): a model larger than this is
    /// written as `model-0000i-of-0000n.safetensors` files plus `model.safetensors.index.json`,
    /// and one that fits as a single `model.safetensors`. A tensor larger than a shard gets a
    /// shard of its own.
    pub max_shard_bytes: usize,
    /// A model directory whose tokenizer and generation files ([`TOKENIZER_FILES`]) are copied
    /// next to the weights, when present there.
    pub copy_files_from: Option<PathBuf>,
}

impl Default for SaveOptions {
    fn default() -> Self {
        Self {
            max_shard_bytes: 5_000_000_000,
            copy_files_from: None,
        }
    }
}

/// The files beside the weights that a model directory needs to be used again: tokenizer,
/// its configuration and chat template, and generation settings.
pub const TOKENIZER_FILES: [&str; 7] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
];

/// Saves a model in the Hugging Face layout with default [`SaveOptions`] (one file up to
/// 5 GB, shards beyond); see [`save_llama_with`].
///
/// # Errors
/// Those of [`save_llama_with`].
pub fn save_llama(
    dir: impl AsRef<Path>,
    config: &LlamaConfig,
    varmap: &VarMap,
    dtype: DType,
) -> Result<()> {
    save_llama_with(dir, config, varmap, dtype, &SaveOptions::default())
}

/// Saves a model in the Hugging Face layout: `config.json` and `model.safetensors`, or shards
/// and `model.safetensors.index.json` (see [`SaveOptions::max_shard_bytes`]), in `dtype`
/// (the config's `torch_dtype` and `dtype` both say so), plus the tokenizer files of
/// [`SaveOptions::copy_files_from`].
///
/// Every file is first written in full under a temporary name and flushed, and only then
/// are they renamed into place (the weights before the index and the config), so a save that
/// fails (a full disk, a read-only directory) leaves an earlier save in `dir` whole, never a
/// truncated file or shards of two saves; a stale index or single file of an earlier save is
/// removed last. Only one shard's tensors are converted to `dtype` at a time.
///
/// # Errors
/// [`LisaError::MissingTensor`] or [`LisaError::TensorShape`] when `varmap` does not hold the
/// model `config` describes (nothing is written then), [`LisaError::Io`] when a file cannot be
/// written or copied.
pub fn save_llama_with(
    dir: impl AsRef<Path>,
    config: &LlamaConfig,
    varmap: &VarMap,
    dtype: DType,
    options: &SaveOptions,
) -> Result<()> {
    let dir = dir.as_ref();
    config.validate()?;
    let vars: Vec<(String, Var)> = {
        let data = varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::msg("the VarMap's lock is poisoned"))?;
        let mut vars = Vec::new();
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
            vars.push((name, var.clone()));
        }
        vars
    };
    // Shards in name order, each filled up to the limit.
    let mut shards: Vec<Vec<(String, Var)>> = vec![Vec::new()];
    let mut bytes = 0usize;
    for (name, var) in vars {
        let size = var.elem_count() * dtype.size_in_bytes();
        if bytes + size > options.max_shard_bytes && !shards[shards.len() - 1].is_empty() {
            shards.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        if let Some(s) = shards.last_mut() {
            s.push((name, var));
        }
    }
    std::fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
    let n = shards.len();
    let file_name = |i: usize| match n {
        1 => WEIGHTS_FILE.to_string(),
        _ => format!("model-{:05}-of-{n:05}.safetensors", i + 1),
    };
    // Every file is written before any replaces its namesake of an earlier save.
    let mut staged = crate::io::Staged::default();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    for (i, shard) in shards.iter().enumerate() {
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for (name, var) in shard {
            let t = var.as_tensor().detach().to_dtype(dtype)?;
            total += t.elem_count() * dtype.size_in_bytes();
            weight_map.insert(name.clone(), file_name(i).into());
            tensors.insert(name.clone(), t);
        }
        staged.write(&dir.join(file_name(i)), |tmp| {
            crate::io::save_safetensors(&tensors, tmp)
        })?;
    }
    let stale = match n {
        1 => INDEX_FILE,
        _ => {
            let index = serde_json::json!({
                "metadata": {"total_size": total},
                "weight_map": weight_map,
            });
            let path = dir.join(INDEX_FILE);
            let text = serde_json::to_string_pretty(&index).map_err(|source| LisaError::Json {
                path: path.clone(),
                source,
            })?;
            staged.write(&path, |tmp| {
                std::fs::write(tmp, text + "\n").map_err(io("cannot write", tmp))
            })?;
            WEIGHTS_FILE
        }
    };
    if let Some(from) = &options.copy_files_from {
        for name in TOKENIZER_FILES {
            let src = from.join(name);
            if src.is_file() && from != dir {
                staged.write(&dir.join(name), |tmp| {
                    std::fs::copy(&src, tmp)
                        .map(|_| ())
                        .map_err(io("cannot copy", &src))
                })?;
            }
        }
    }
    let mut config = config.clone();
    // transformers 4 reads `torch_dtype` and 5 reads `dtype`: a stale one would make the two
    // load different dtypes, so both name the dtype saved.
    config.torch_dtype = dtype_name(dtype).map(str::to_string);
    config.dtype = config.torch_dtype.clone();
    let json = serde_json::to_string_pretty(&config).map_err(|source| LisaError::Json {
        path: dir.join(CONFIG_FILE),
        source,
    })?;
    staged.write(&dir.join(CONFIG_FILE), |tmp| {
        std::fs::write(tmp, json + "\n").map_err(io("cannot write", tmp))
    })?;
    staged.commit()?;
    // The other layout of an earlier save would shadow this one (the loader prefers the
    // single file) or lie about it.
    let stale = dir.join(stale);
    if stale.is_file() {
        std::fs::remove_file(&stale).map_err(io("cannot remove", &stale))?;
    }
    Ok(())
}
