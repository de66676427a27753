//! llama.cpp GGUF checkpoints: [`load_gguf`] reads a Llama GGUF file into the same trainable
//! `VarMap` and [`LlamaConfig`] that [`load_llama`](super::load_llama) makes from a Hugging Face
//! directory.
//!
//! The header is parsed here, every count and length checked against the file's size before
//! anything is allocated; the tensors' blocks are decoded by candle's `quantized` module
//! (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the k-quants Q2_K to Q6_K). llama.cpp's
//! converter stores the q and k projections with each head's rotary halves interleaved
//! (`LlamaModel.permute` in `convert_hf_to_gguf.py`); the loader undoes that, so the weights
//! are Hugging Face's, bit for bit where the stored type is exact. Training dequantizes every
//! weight into `dtype`: a GGUF file is a way in, not a storage format for training.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
use candle_core::{DType, Device, Var};
use candle_nn::VarMap;

use crate::error::{LisaError, Result};
use crate::io::io;
use crate::models::llama::LlamaConfig;

const MAGIC: u32 = 0x4655_4747; // "GGUF", little-endian
/// The longest string (key, value or tensor name) read: chat templates run to a few KB.
const MAX_STRING: u64 = 16 << 20;
const MAX_DIMS: u32 = 4;

/// A metadata value as far as the loader reads it: arrays keep only their length (a
/// tokenizer's vocabulary is one).
#[derive(Clone, Debug, PartialEq)]
enum Meta {
    Uint(u64),
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(u64),
}

/// One tensor's entry in the header.
#[derive(Clone, Debug)]
struct TensorInfo {
    /// Hugging Face's order (outermost first), the reverse of GGUF's.
    shape: Vec<usize>,
    dtype: GgmlDType,
    /// From the start of the data section.
    offset: u64,
    bytes: u64,
}

/// A parsed header: metadata, tensors, and where their data starts.
struct Header {
    meta: BTreeMap<String, Meta>,
    tensors: BTreeMap<String, TensorInfo>,
    data_start: u64,
}

/// Reads the header of `path` with every size checked against the file's length.
struct Reader {
    file: BufReader<File>,
    path: PathBuf,
    pos: u64,
    len: u64,
}

impl Reader {
    fn bad(&self, reason: impl Into<String>) -> LisaError {
        LisaError::InvalidCheckpoint {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    fn bytes(&mut self, n: u64) -> Result<Vec<u8>> {
        if n > self.len - self.pos {
            return Err(self.bad(format!(
                "the header asks for {n} bytes at offset {} of a {}-byte file",
                self.pos, self.len
            )));
        }
        let mut buf = vec![0; n as usize];
        self.file
            .read_exact(&mut buf)
            .map_err(io("cannot read", &self.path))?;
        self.pos += n;
        Ok(buf)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let v = self.bytes(N as u64)?;
        let mut a = [0; N];
        a.copy_from_slice(&v);
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String> {
        let n = self.u64()?;
        if n > MAX_STRING {
            return Err(self.bad(format!("a string of {n} bytes at offset {}", self.pos)));
        }
        let b = self.bytes(n)?;
        String::from_utf8(b).map_err(|_| {
            self.bad(format!(
                "a string that is not UTF-8 before offset {}",
                self.pos
            ))
        })
    }

    /// The value of GGUF type `t`; arrays are skipped over and keep their length.
    fn value(&mut self, t: u32, depth: u32) -> Result<Meta> {
        Ok(match t {
            0 => Meta::Uint(self.array::<1>()?[0] as u64),
            1 => Meta::Int(self.array::<1>()?[0] as i8 as i64),
            2 => Meta::Uint(u16::from_le_bytes(self.array()?) as u64),
            3 => Meta::Int(i16::from_le_bytes(self.array()?) as i64),
            4 => Meta::Uint(self.u32()? as u64),
            5 => Meta::Int(i32::from_le_bytes(self.array()?) as i64),
            // llama.cpp writes f32 from configs' decimal values (1e-5, 500000.0): the shortest
            // decimal that rounds to the f32 is the value meant, as f64.
            6 => Meta::Float(shortest(f32::from_le_bytes(self.array()?))),
            7 => Meta::Bool(self.array::<1>()?[0] != 0),
            8 => Meta::Str(self.string()?),
            9 => {
                if depth > 0 {
                    return Err(self.bad("an array of arrays"));
                }
                let (et, n) = (self.u32()?, self.u64()?);
                let least = match et {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    _ => return Err(self.bad(format!("an array of unknown type {et}"))),
                };
                if n.checked_mul(least).is_none_or(|b| b > self.len - self.pos) {
                    return Err(
                        self.bad(format!("an array of {n} values past the end of the file"))
                    );
                }
                for _ in 0..n {
                    self.value(et, depth + 1)?;
                }
                Meta::Array(n)
            }
            10 => Meta::Uint(self.u64()?),
            11 => Meta::Int(i64::from_le_bytes(self.array()?)),
            12 => Meta::Float(f64::from_le_bytes(self.array()?)),
            _ => return Err(self.bad(format!("a metadata value of unknown type {t}"))),
        })
    }
}

/// `x` as the f64 of its shortest round-trip decimal.
fn shortest(x: f32) -> f64 {
    format!("{x}").parse().unwrap_or(x as f64)
}

fn ggml_dtype(t: u32) -> Option<GgmlDType> {
    Some(match t {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

fn read_header(path: &Path) -> Result<Header> {
    let file = File::open(path).map_err(io("cannot open", path))?;
    let len = file.metadata().map_err(io("cannot read", path))?.len();
    let mut r = Reader {
        file: BufReader::new(file),
        path: path.to_path_buf(),
        pos: 0,
        len,
    };
    if r.u32()? != MAGIC {
        return Err(r.bad("not a GGUF file (no GGUF magic)"));
    }
    let version = r.u32()?;
    if !(2..=3).contains(&version) {
        return Err(r.bad(format!("GGUF version {version}; versions 2 and 3 are read")));
    }
    let (n_tensors, n_meta) = (r.u64()?, r.u64()?);
    // Every entry takes at least 8 bytes: a count past that is a corrupt header, caught before
    // anything is allocated for it.
    if n_tensors.max(n_meta) > len / 8 {
        return Err(r.bad(format!(
            "{n_tensors} tensors and {n_meta} metadata entries in a {len}-byte file"
        )));
    }
    let mut meta = BTreeMap::new();
    for _ in 0..n_meta {
        let key = r.string()?;
        let t = r.u32()?;
        let value = r.value(t, 0)?;
        meta.insert(key, value);
    }
    let alignment = match meta.get("general.alignment") {
        None => 32,
        Some(Meta::Uint(a)) if a.is_power_of_two() => *a,
        Some(a) => return Err(r.bad(format!("general.alignment {a:?} is not a power of two"))),
    };
    let mut tensors = BTreeMap::new();
    for _ in 0..n_tensors {
        let name = r.string()?;
        let n_dims = r.u32()?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(r.bad(format!("tensor {name:?} has {n_dims} dimensions")));
        }
        let mut dims = Vec::new();
        for _ in 0..n_dims {
            dims.push(r.u64()?);
        }
        let t = r.u32()?;
        let dtype = ggml_dtype(t).ok_or_else(|| {
            r.bad(format!(
                "tensor {name:?} has ggml type {t}, which is not read"
            ))
        })?;
        let offset = r.u64()?;
        let elements = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&e| e > 0 && e <= len.saturating_mul(8))
            .ok_or_else(|| r.bad(format!("tensor {name:?} has dimensions {dims:?}")))?;
        let block = dtype.block_size() as u64;
        if elements % block != 0 || dims[0] % block != 0 {
            return Err(r.bad(format!(
                "tensor {name:?} of {dtype:?} has rows of {} values, not a multiple of its {block}-value blocks",
                dims[0]
            )));
        }
        let bytes = elements / block * dtype.type_size() as u64;
        if offset % alignment != 0 {
            return Err(r.bad(format!(
                "tensor {name:?} starts at {offset}, not a multiple of {alignment}"
            )));
        }
        let shape = dims.iter().rev().map(|&d| d as usize).collect();
        let info = TensorInfo {
            shape,
            dtype,
            offset,
            bytes,
        };
        if tensors.insert(name.clone(), info).is_some() {
            return Err(r.bad(format!("tensor {name:?} is listed twice")));
        }
    }
    let data_start = r.pos.div_ceil(alignment) * alignment;
    for (name, t) in &tensors {
        let end = data_start
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(t.bytes));
        if end.is_none_or(|e| e > len) {
            return Err(r.bad(format!(
                "tensor {name:?} ({} bytes at {}) runs past the end of the {len}-byte file",
                t.bytes, t.offset
            )));
        }
    }
    Ok(Header {
        meta,
        tensors,
        data_start,
    })
}

/// The `{arch}.…` keys the loader reads; any other key of the architecture (but zero experts
/// and no rope scaling) changes the model in a way this crate does not implement (rope
/// scaling, experts, windows, …) and is refused.
const KNOWN_KEYS: [&str; 10] = [
    "context_length",
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.layer_norm_rms_epsilon",
    "rope.freq_base",
    "rope.dimension_count",
    "vocab_size",
];

/// The Hugging Face config of a Llama GGUF header.
fn config(h: &Header) -> Result<LlamaConfig> {
    let bad = |reason: String| LisaError::InvalidConfig(format!("GGUF metadata: {reason}"));
    let arch = match h.meta.get("general.architecture") {
        Some(Meta::Str(a)) => a.clone(),
        _ => return Err(bad("no general.architecture".into())),
    };
    if arch != "llama" {
        return Err(bad(format!(
            "architecture {arch:?}; only llama (Llama, Mistral, SmolLM2 and other Llama-layout models) is read"
        )));
    }
    let prefix = format!("{arch}.");
    for (key, value) in &h.meta {
        let Some(rest) = key.strip_prefix(&prefix) else {
            continue;
        };
        let read = match rest {
            "expert_count" | "expert_used_count" => *value == Meta::Uint(0),
            "rope.scaling.type" => *value == Meta::Str("none".into()),
            other => KNOWN_KEYS.contains(&other),
        };
        if !read {
            return Err(bad(format!(
                "{key} = {value:?} changes the model in a way this crate does not implement"
            )));
        }
    }
    let uint = |k: &str| -> Result<Option<usize>> {
        match h.meta.get(&format!("{prefix}{k}")) {
            None => Ok(None),
            Some(Meta::Uint(v)) => usize::try_from(*v)
                .map(Some)
                .map_err(|_| bad(format!("{prefix}{k} = {v} is too large"))),
            Some(v) => Err(bad(format!(
                "{prefix}{k} is {v:?}, not an unsigned integer"
            ))),
        }
    };
    let need = |k: &str| -> Result<usize> {
        uint(k)?.ok_or_else(|| bad(format!("{prefix}{k} is missing")))
    };
    let float = |k: &str| -> Result<Option<f64>> {
        match h.meta.get(&format!("{prefix}{k}")) {
            None => Ok(None),
            Some(Meta::Float(v)) if v.is_finite() => Ok(Some(*v)),
            Some(v) => Err(bad(format!("{prefix}{k} is {v:?}, not a finite number"))),
        }
    };
    let hidden = need("embedding_length")?;
    let heads = need("attention.head_count")?;
    let vocab = match uint("vocab_size")? {
        Some(v) => v,
        None => match (
            h.meta.get("tokenizer.ggml.tokens"),
            h.tensors.get("token_embd.weight"),
        ) {
            (Some(Meta::Array(n)), _) => *n as usize,
            (_, Some(t)) => t.shape[0],
            _ => return Err(bad("no vocabulary size".into())),
        },
    };
    let mut c = LlamaConfig::tiny(
        vocab,
        hidden,
        need("block_count")?,
        heads,
        uint("attention.head_count_kv")?.unwrap_or(heads),
    );
    c.intermediate_size = need("feed_forward_length")?;
    c.rms_norm_eps = float("attention.layer_norm_rms_epsilon")?.ok_or_else(|| {
        bad(format!(
            "{prefix}attention.layer_norm_rms_epsilon is missing"
        ))
    })?;
    c.rope_theta = Some(float("rope.freq_base")?.unwrap_or(10_000.0));
    if let Some(n) = uint("context_length")? {
        c.max_position_embeddings = n;
    }
    c.tie_word_embeddings = !h.tensors.contains_key("output.weight");
    c.validate()?;
    if let Some(d) = uint("rope.dimension_count")? {
        if d != c.head_size() {
            return Err(bad(format!(
                "{prefix}rope.dimension_count = {d}: rotary embeddings over part of a head (head size {}) are not implemented",
                c.head_size()
            )));
        }
    }
    Ok(c)
}

/// The Hugging Face name of a llama.cpp tensor name, and the heads its rows are permuted by
/// (q and k), if it is one the loader maps.
fn hf_name(name: &str, c: &LlamaConfig) -> Option<(String, Option<usize>)> {
    let top = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(n) = top {
        return Some((n.to_string(), None));
    }
    let rest = name.strip_prefix("blk.")?;
    let (i, part) = rest.split_once('.')?;
    let i: usize = i.parse().ok()?;
    let (hf, heads) = match part {
        "attn_norm.weight" => ("input_layernorm.weight", None),
        "ffn_norm.weight" => ("post_attention_layernorm.weight", None),
        "attn_q.weight" => ("self_attn.q_proj.weight", Some(c.num_attention_heads)),
        "attn_k.weight" => ("self_attn.k_proj.weight", Some(c.kv_heads())),
        "attn_v.weight" => ("self_attn.v_proj.weight", None),
        "attn_output.weight" => ("self_attn.o_proj.weight", None),
        "ffn_gate.weight" => ("mlp.gate_proj.weight", None),
        "ffn_up.weight" => ("mlp.up_proj.weight", None),
        "ffn_down.weight" => ("mlp.down_proj.weight", None),
        _ => return None,
    };
    Some((format!("model.layers.{i}.{hf}"), heads))
}

/// Loads a llama.cpp GGUF checkpoint of a Llama-layout model into a fresh `VarMap` of
/// Hugging Face names, every tensor dequantized to `dtype` on `device`, with the config its
/// metadata describes (no `output.weight` means tied embeddings). Only the model is read:
/// the tokenizer in the file's metadata is not (use the model's `tokenizer.json`).
///
/// Tensors are read one at a time; each takes its f32 size once while it is decoded.
///
/// # Errors
/// [`LisaError::Io`] for an unreadable file; [`LisaError::InvalidCheckpoint`] for a file that
/// is not GGUF version 2 or 3, a header whose sizes run past the end of the file, or a tensor
/// type candle does not decode; [`LisaError::InvalidConfig`] for another architecture than
/// `llama`, missing sizes, or metadata that changes the model in a way this crate does not
/// implement (rope scaling, experts, partial rotary embeddings); and
/// [`LisaError::MissingTensor`], [`LisaError::UnexpectedTensor`] and
/// [`LisaError::TensorShape`] naming the tensor, as [`load_llama`](super::load_llama) does.
pub fn load_gguf(
    path: impl AsRef<Path>,
    dtype: DType,
    device: &Device,
) -> Result<(LlamaConfig, VarMap)> {
    let path = path.as_ref();
    let header = read_header(path)?;
    let config = config(&header)?;
    let mut mapped = BTreeMap::new();
    for (name, info) in &header.tensors {
        match hf_name(name, &config) {
            Some((hf, heads)) => {
                mapped.insert(hf, (info, heads));
            }
            // llama.cpp's RoPE frequency table of Llama 3.1 and the like.
            None => {
                return Err(LisaError::UnexpectedTensor {
                    name: name.clone(),
                    found: info.shape.clone(),
                })
            }
        }
    }
    let expected = config.tensor_shapes();
    super::checkpoint::check_shapes(&expected, |name| mapped.get(name).map(|(i, _)| &i.shape))?;
    let mut file = File::open(path).map_err(io("cannot open", path))?;
    let varmap = VarMap::new();
    {
        let mut data = varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::msg("the new VarMap's lock is poisoned"))?;
        for (name, _) in expected {
            let (info, heads) = mapped[&name];
            file.seek(SeekFrom::Start(header.data_start + info.offset))
                .map_err(io("cannot read", path))?;
            let mut raw = vec![0; info.bytes as usize];
            file.read_exact(&mut raw).map_err(io("cannot read", path))?;
            let q = qtensor_from_ggml(info.dtype, &raw, info.shape.clone(), &Device::Cpu)?;
            drop(raw);
            let mut w = q.dequantize(&Device::Cpu)?;
            if let Some(n) = heads {
                w = unpermute(&w, n).map_err(|reason| LisaError::InvalidCheckpoint {
                    path: path.to_path_buf(),
                    reason: format!("{name}: {reason}"),
                })?;
            }
            let w = w.to_dtype(dtype)?.to_device(device)?;
            data.insert(name, Var::from_tensor(&w)?);
        }
    }
    Ok((config, varmap))
}

/// Undoes llama.cpp's q/k permutation over `heads` heads: stored rows are, per head, the
/// rotary pairs interleaved `(0, d/2), (1, d/2 + 1), …`; Hugging Face's are the halves.
fn unpermute(
    w: &candle_core::Tensor,
    heads: usize,
) -> std::result::Result<candle_core::Tensor, String> {
    let (rows, cols) = w.dims2().map_err(|e| e.to_string())?;
    if heads == 0 || rows % (2 * heads) != 0 {
        return Err(format!(
            "{rows} rows do not split into {heads} heads of rotary pairs"
        ));
    }
    (|| {
        w.reshape((heads, rows / heads / 2, 2, cols))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((rows, cols))
    })()
    .map_err(|e: candle_core::Error| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortest_decimal_of_f32_metadata() {
        assert_eq!(shortest(1e-5f32), 1e-5);
        assert_eq!(shortest(500_000.0f32), 500_000.0);
        assert_eq!(shortest(1e-6f32), 1e-6);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() -> candle_core::Result<()> {
        // llama.cpp: reshape(n, 2, rows / n / 2, cols).swapaxes(1, 2).reshape(rows, cols).
        let (heads, rows, cols) = (2, 8, 3);
        let hf = candle_core::Tensor::arange(0f32, (rows * cols) as f32, &Device::Cpu)?
            .reshape((rows, cols))?;
        let stored = hf
            .reshape((heads, 2, rows / heads / 2, cols))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((rows, cols))?;
        // Head 0's rows 0..4 are stored as 0, 2, 1, 3 (the halves interleaved).
        let first: Vec<f32> = stored.narrow(1, 0, 1)?.flatten_all()?.to_vec1()?;
        assert_eq!(&first[..4], &[0.0, 6.0, 3.0, 9.0]);
        let back = unpermute(&stored, heads).unwrap();
        assert_eq!(back.to_vec2::<f32>()?, hf.to_vec2::<f32>()?);
        Ok(())
    }
}
