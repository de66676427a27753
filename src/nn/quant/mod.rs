//! Quantized storage for frozen weights: block-wise absmax int8 and QLoRA's NormalFloat4
//! with double-quantized scales, and the frozen [`Linear`](super::Linear) that computes from
//! the codes.
//!
//! LISA trains γ blocks at a time; every other block is frozen, and in bf16 those frozen
//! blocks are most of the memory of a large model (16 GB of Llama-3.1-8B's 8B parameters).
//! QLoRA ([Dettmers et al. 2023](https://arxiv.org/abs/2305.14314)) holds its frozen base in
//! 4 bits; this module gives LISA the same storage, laid out as
//! [bitsandbytes](https://github.com/bitsandbytes-foundation/bitsandbytes) lays it out, so
//! that the error a model sees is the error QLoRA users know.
//!
//! # Formats
//!
//! Both formats quantize a 2-D weight `(out, in)` in blocks of [`BLOCK`] = 64 consecutive
//! values along the input dimension of each row; `in` must be a multiple of 64 (every
//! projection of the Llama family is), anything else is an
//! [`InvalidArgument`](crate::LisaError::InvalidArgument) error rather than padding, so that
//! a block never straddles two rows. Block `b` of the row-major weight covers elements
//! `64·b .. 64·b + 64` of the flattened weight, which is also bitsandbytes' blocking.
//!
//! - [`QuantFormat::Int8`], block-wise absmax: each block stores its `absmax = max |x|` as
//!   an f32 and each value the code `c = round(x / absmax · 127)` in `-127..=127`, kept as the
//!   byte `c + 128`. `x ≈ c · (absmax / 127)`: the error is at most half a step,
//!   `absmax / 254`. 1 byte + 4/64 byte = **1.0625 bytes per parameter**.
//! - [`QuantFormat::Nf4`], NormalFloat4 with double quantization, as bitsandbytes'
//!   `quantize_4bit(.., blocksize=64, compress_statistics=True, quant_type="nf4")`: each value
//!   is the index of the nearest of the 16 [`NF4_CODE`] values to `x / absmax`, two indices a
//!   byte (the even element in the high nibble, as bitsandbytes packs them). The per-block
//!   absmax values are themselves quantized: their mean `offset` is subtracted, and the
//!   differences are quantized in groups of 256 blocks with bitsandbytes' signed 8-bit
//!   dynamic map ([`dynamic_code`]) and one f32 absmax per group. `x ≈ NF4[i] · â` with
//!   `â = dynamic[q] · scale₂ + offset`. Per parameter: 0.5 byte of codes + 1/64 byte of
//!   absmax codes + 4/(64·256) byte of group scales (+ 4 bytes of offset per weight) =
//!   **0.5159 bytes per parameter**, against 2 for bf16.
//!   The codes are picked with the exact absmax, as bitsandbytes picks them, so the error of
//!   a value is at most half the widest gap between neighbouring NF4 values
//!   ([`NF4_MAX_GAP`]) times the block's absmax, plus `|absmax − â|`. Zero is a code value,
//!   so an exact 0 stays 0 (in an all-zero block `â` may come out negative, and the zeros
//!   come back as −0).
//!
//! [`QuantFormat::Dense`] means "not quantized": the weight stays a tensor.
//!
//! # Computing with the codes
//!
//! [`Linear::quantized`](super::Linear::quantized) makes a frozen layer over a
//! [`QuantizedWeight`]. Its forward pass computes `y = x · Wᵀ` and its backward pass
//! `dL/dx = dL/dy · W` from the codes; no gradient of W is ever computed, and no dequantized
//! copy of W outlives the op. On the CPU in f32 the product is fused: each task dequantizes a
//! panel of W (128 rows for the forward pass, 64 columns of every row for the backward pass)
//! into a buffer of its own and runs one single-threaded gemm call on it, so the dense weight
//! never exists as a whole. Elsewhere (CUDA, Metal, half-precision inputs) the weight is
//! dequantized with candle ops into a transient tensor of the input's dtype, multiplied, and
//! dropped; the backward pass dequantizes it again. Both paths use the same arithmetic as
//! [`QuantizedWeight::dequantize`], so a layer computes exactly what a dense layer over the
//! dequantized weight would, up to the order in which gemm sums.
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_lisa::nn::quant::{QuantFormat, QuantizedWeight};
//! use candle_lisa::Linear;
//! let dev = Device::Cpu;
//! let w = Tensor::randn(0f32, 0.02, (128, 256), &dev)?;
//! let q = QuantizedWeight::quantize(&w, QuantFormat::Nf4)?;
//! assert_eq!(q.shape(), (128, 256));
//! assert!(q.storage_bytes() < 128 * 256 * 2 / 3); // a third of bf16
//! let deq = q.dequantize(DType::F32, &dev)?;
//! let layer = Linear::quantized(q, None);
//! let x = Tensor::randn(0f32, 1.0, (4, 256), &dev)?;
//! let y = layer.forward(&x)?;
//! let y_ref = x.matmul(&deq.t()?)?;
//! let diff = (y - y_ref)?.abs()?.max_all()?.to_scalar::<f32>()?;
//! assert!(diff < 1e-5);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod kernel;
mod tables;

use std::sync::Arc;

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};

use crate::error::{LisaError, Result};

pub(crate) use kernel::quantized_matmul;
pub use tables::{dynamic_code, NF4_CODE, NF4_MAX_GAP};

/// Values per quantization block, along the input dimension of each row.
pub const BLOCK: usize = 64;

/// Blocks per group of the NF4 format's double quantization: their absmax values share one
/// f32 scale.
pub const NF4_GROUP: usize = 256;

/// How a frozen weight is stored.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum QuantFormat {
    /// A tensor in the model's dtype, as loaded (the default).
    #[default]
    Dense,
    /// Block-wise absmax int8: 1.0625 bytes per parameter (see the [module docs](self)).
    Int8,
    /// NormalFloat4 with double-quantized absmax, as QLoRA: 0.516 bytes per parameter.
    Nf4,
}

impl QuantFormat {
    /// Storage bytes per parameter of a `(out, in)` weight in this format, with the NF4
    /// format's per-group and per-weight constants spread over the weight; `dtype` is the
    /// dense weight's.
    pub fn bytes_per_param(self, dtype: DType) -> f64 {
        match self {
            Self::Dense => dtype.size_in_bytes() as f64,
            Self::Int8 => 1.0 + 4.0 / BLOCK as f64,
            Self::Nf4 => 0.5 + 1.0 / BLOCK as f64 + 4.0 / (BLOCK * NF4_GROUP) as f64,
        }
    }
}

impl std::fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Dense => "dense",
            Self::Int8 => "int8",
            Self::Nf4 => "nf4",
        })
    }
}

impl std::str::FromStr for QuantFormat {
    type Err = LisaError;

    /// `dense`, `int8` or `nf4`.
    ///
    /// ```
    /// use candle_lisa::nn::quant::QuantFormat;
    /// assert_eq!("nf4".parse::<QuantFormat>()?, QuantFormat::Nf4);
    /// assert_eq!(QuantFormat::Int8.to_string(), "int8");
    /// assert!("fp4".parse::<QuantFormat>().is_err());
    /// # Ok::<(), candle_lisa::LisaError>(())
    /// ```
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "dense" => Ok(Self::Dense),
            "int8" => Ok(Self::Int8),
            "nf4" => Ok(Self::Nf4),
            _ => Err(LisaError::InvalidArgument {
                what: "frozen storage format",
                reason: format!("{s:?}: use dense, int8 or nf4"),
            }),
        }
    }
}

/// A 2-D weight `(out, in)` stored as int8 or NF4 codes (see the [module docs](self) for the
/// layout), on the device of the weight it was made from.
///
/// It is immutable: a weight that trains again is dequantized into a tensor, and quantized
/// anew when it is frozen. Cloning shares the codes.
#[derive(Clone, Debug)]
pub struct QuantizedWeight {
    out_dim: usize,
    in_dim: usize,
    codes: Arc<Codes>,
}

/// The stored tensors, all contiguous and on one device.
#[derive(Debug)]
enum Codes {
    /// `codes`: u8 `(out, in)`, the code `c` as `c + 128`; `absmax`: f32 `(blocks,)`.
    Int8 { codes: Tensor, absmax: Tensor },
    /// `codes`: u8 `(out · in / 2,)`, two 4-bit indices a byte, the even element high;
    /// `absmax_codes`: u8 `(blocks,)`, indices into the dynamic map; `group_scales`: f32
    /// `(ceil(blocks / 256),)`; `offset`: the mean absmax.
    Nf4 {
        codes: Tensor,
        absmax_codes: Tensor,
        group_scales: Tensor,
        offset: f32,
    },
}

/// Quantizes `weight` (see [`QuantizedWeight::quantize`]).
pub fn quantize(weight: &Tensor, format: QuantFormat) -> Result<QuantizedWeight> {
    QuantizedWeight::quantize(weight, format)
}

fn invalid(reason: String) -> LisaError {
    LisaError::InvalidArgument {
        what: "weight to quantize",
        reason,
    }
}

impl QuantizedWeight {
    /// Quantizes a 2-D float weight `(out, in)` in `format` ([`Int8`](QuantFormat::Int8) or
    /// [`Nf4`](QuantFormat::Nf4)); the codes live on the weight's device. The arithmetic runs
    /// on the host in f32 (a bf16 or f16 weight converts to f32 exactly), one pass over the
    /// weight.
    ///
    /// # Errors
    /// [`LisaError::InvalidArgument`] for [`QuantFormat::Dense`], a weight that is not 2-D,
    /// is empty, is not a float tensor, has an input dimension that is not a multiple of
    /// [`BLOCK`], or holds a NaN or an infinity; nothing is allocated on the device then.
    pub fn quantize(weight: &Tensor, format: QuantFormat) -> Result<Self> {
        if format == QuantFormat::Dense {
            return Err(LisaError::InvalidArgument {
                what: "quantization format",
                reason: "dense is not a quantized format: keep the tensor as it is \
                         (Linear::new), or pick int8 or nf4"
                    .into(),
            });
        }
        let &[out_dim, in_dim] = weight.dims() else {
            return Err(invalid(format!(
                "shape {:?}: only 2-D weights (out, in) are quantized; keep norms, biases and \
                 embeddings dense",
                weight.dims()
            )));
        };
        if out_dim == 0 || in_dim == 0 {
            return Err(invalid(format!("shape ({out_dim}, {in_dim}) is empty")));
        }
        if !weight.dtype().is_float() {
            return Err(invalid(format!(
                "dtype {:?}: only float weights are quantized",
                weight.dtype()
            )));
        }
        if in_dim % BLOCK != 0 {
            return Err(invalid(format!(
                "shape ({out_dim}, {in_dim}): the input dimension must be a multiple of the \
                 block size {BLOCK}, so that no block straddles two rows; keep this weight dense"
            )));
        }
        let host = weight
            .detach()
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        if let Some(i) = host.iter().position(|x| !x.is_finite()) {
            return Err(invalid(format!(
                "element ({}, {}) is {}: quantize only finite weights",
                i / in_dim,
                i % in_dim,
                host[i]
            )));
        }
        let dev = weight.device();
        let codes = match format {
            QuantFormat::Int8 => {
                let (codes, absmax) = quantize_int8(&host);
                Codes::Int8 {
                    codes: Tensor::from_vec(codes, (out_dim, in_dim), dev)?,
                    absmax: Tensor::from_vec(absmax, host.len() / BLOCK, dev)?,
                }
            }
            QuantFormat::Nf4 => {
                let (codes, absmax) = quantize_nf4(&host);
                let (absmax_codes, group_scales, offset) = double_quantize(&absmax);
                let (n_codes, n_groups) = (codes.len(), group_scales.len());
                Codes::Nf4 {
                    codes: Tensor::from_vec(codes, n_codes, dev)?,
                    absmax_codes: Tensor::from_vec(absmax_codes, absmax.len(), dev)?,
                    group_scales: Tensor::from_vec(group_scales, n_groups, dev)?,
                    offset,
                }
            }
            QuantFormat::Dense => unreachable!("refused above"),
        };
        Ok(Self {
            out_dim,
            in_dim,
            codes: Arc::new(codes),
        })
    }

    /// `(out, in)`, the shape of the weight.
    pub fn shape(&self) -> (usize, usize) {
        (self.out_dim, self.in_dim)
    }

    /// [`Int8`](QuantFormat::Int8) or [`Nf4`](QuantFormat::Nf4).
    pub fn format(&self) -> QuantFormat {
        match &*self.codes {
            Codes::Int8 { .. } => QuantFormat::Int8,
            Codes::Nf4 { .. } => QuantFormat::Nf4,
        }
    }

    /// The device the codes live on.
    pub fn device(&self) -> &Device {
        match &*self.codes {
            Codes::Int8 { codes, .. } | Codes::Nf4 { codes, .. } => codes.device(),
        }
    }

    /// Bytes of the codes, scales and constants: what holding this weight costs.
    pub fn storage_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        match &*self.codes {
            Codes::Int8 { codes, absmax } => bytes(codes) + bytes(absmax),
            Codes::Nf4 {
                codes,
                absmax_codes,
                group_scales,
                ..
            } => bytes(codes) + bytes(absmax_codes) + bytes(group_scales) + 4,
        }
    }

    /// The absmax each block is dequantized with, one f32 per block of 64 (row-major block
    /// order): the stored absmax for int8, the double-quantized `â` for NF4.
    pub fn block_absmax(&self) -> Result<Vec<f32>> {
        let blocks = self.out_dim * self.in_dim / BLOCK;
        let cpu = self.to_cpu()?;
        Ok(cpu.with_host(|h| (0..blocks).map(|b| h.block_absmax(b)).collect())?)
    }

    /// The weight as a dense `(out, in)` tensor of `dtype` on `device`: the values the
    /// layer computes with, in f32 and then converted. Costs one weight-sized tensor.
    ///
    /// # Errors
    /// A candle error if `dtype` is not a float type or the device cannot take the tensor.
    pub fn dequantize(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        if !dtype.is_float() {
            return Err(LisaError::InvalidArgument {
                what: "dequantized dtype",
                reason: format!("{dtype:?}: dequantize into a float dtype"),
            });
        }
        let w = match self.device() {
            Device::Cpu => {
                let mut out = vec![0f32; self.out_dim * self.in_dim];
                self.with_host(|h| {
                    for (row, dst) in out.chunks_exact_mut(self.in_dim).enumerate() {
                        h.row_segment(row, 0, dst);
                    }
                })?;
                Tensor::from_vec(out, (self.out_dim, self.in_dim), &Device::Cpu)?
            }
            _ => self.dequantize_with_ops()?,
        };
        Ok(w.to_device(device)?.to_dtype(dtype)?)
    }

    /// The dense f32 weight on the codes' device, by candle ops that every backend has: what
    /// the layer uses off the CPU. Same arithmetic as the host path, operation for operation.
    fn dequantize_with_ops(&self) -> candle_core::Result<Tensor> {
        let (n, k) = (self.out_dim, self.in_dim);
        let blocks = n * k / BLOCK;
        match &*self.codes {
            Codes::Int8 { codes, absmax } => {
                let dev = codes.device();
                let step = absmax.broadcast_div(&Tensor::new(127f32, dev)?)?;
                codes
                    .to_dtype(DType::F32)?
                    .affine(1.0, -128.0)?
                    .reshape((blocks, BLOCK))?
                    .broadcast_mul(&step.reshape((blocks, 1))?)?
                    .reshape((n, k))
            }
            Codes::Nf4 {
                codes,
                absmax_codes,
                group_scales,
                offset,
            } => {
                let dev = codes.device();
                let nf4 = Tensor::new(&NF4_CODE, dev)?;
                let dynamic = Tensor::new(dynamic_code(), dev)?;
                let group_of: Vec<u32> = (0..blocks).map(|b| (b / NF4_GROUP) as u32).collect();
                let scale = group_scales.index_select(&Tensor::new(group_of, dev)?, 0)?;
                // u32 indices: candle's index_select reads a u8 index of 255 as "no row" and
                // gives 0.
                let absmax = dynamic
                    .index_select(&absmax_codes.to_dtype(DType::U32)?, 0)?
                    .mul(&scale)?
                    .affine(1.0, *offset as f64)?;
                let bytes = codes.to_dtype(DType::F32)?;
                let hi = bytes.affine(1.0 / 16.0, 0.0)?.floor()?;
                let lo = (&bytes - hi.affine(16.0, 0.0)?)?;
                let idx = Tensor::stack(&[hi, lo], 1)?
                    .flatten_all()?
                    .to_dtype(DType::U32)?;
                nf4.index_select(&idx, 0)?
                    .reshape((blocks, BLOCK))?
                    .broadcast_mul(&absmax.reshape((blocks, 1))?)?
                    .reshape((n, k))
            }
        }
    }

    /// The same codes on the CPU (a copy unless they are there already).
    fn to_cpu(&self) -> candle_core::Result<Self> {
        if self.device().is_cpu() {
            return Ok(self.clone());
        }
        let cpu = |t: &Tensor| t.to_device(&Device::Cpu);
        let codes = match &*self.codes {
            Codes::Int8 { codes, absmax } => Codes::Int8 {
                codes: cpu(codes)?,
                absmax: cpu(absmax)?,
            },
            Codes::Nf4 {
                codes,
                absmax_codes,
                group_scales,
                offset,
            } => Codes::Nf4 {
                codes: cpu(codes)?,
                absmax_codes: cpu(absmax_codes)?,
                group_scales: cpu(group_scales)?,
                offset: *offset,
            },
        };
        Ok(Self {
            codes: Arc::new(codes),
            ..*self
        })
    }

    /// `f` on the codes borrowed from their CPU storage; an error off the CPU.
    fn with_host<R>(&self, f: impl FnOnce(&Host<'_>) -> R) -> candle_core::Result<R> {
        fn u8s(s: &Storage) -> Option<&[u8]> {
            match s {
                Storage::Cpu(CpuStorage::U8(v)) => Some(v),
                _ => None,
            }
        }
        fn f32s(s: &Storage) -> Option<&[f32]> {
            match s {
                Storage::Cpu(CpuStorage::F32(v)) => Some(v),
                _ => None,
            }
        }
        let missing =
            || candle_core::Error::Msg("candle-lisa quantized weight: codes not on the CPU".into());
        let k = self.in_dim;
        match &*self.codes {
            Codes::Int8 { codes, absmax } => {
                let (sc, lc) = codes.storage_and_layout();
                let (sa, la) = absmax.storage_and_layout();
                let host = Host::Int8 {
                    k,
                    codes: &u8s(&sc).ok_or_else(missing)?[lc.start_offset()..],
                    absmax: &f32s(&sa).ok_or_else(missing)?[la.start_offset()..],
                };
                Ok(f(&host))
            }
            Codes::Nf4 {
                codes,
                absmax_codes,
                group_scales,
                offset,
            } => {
                let (sc, lc) = codes.storage_and_layout();
                let (sq, lq) = absmax_codes.storage_and_layout();
                let (sg, lg) = group_scales.storage_and_layout();
                let host = Host::Nf4 {
                    k,
                    codes: &u8s(&sc).ok_or_else(missing)?[lc.start_offset()..],
                    absmax_codes: &u8s(&sq).ok_or_else(missing)?[lq.start_offset()..],
                    group_scales: &f32s(&sg).ok_or_else(missing)?[lg.start_offset()..],
                    offset: *offset,
                    dynamic: dynamic_code(),
                };
                Ok(f(&host))
            }
        }
    }
}

/// The codes as host slices: what the CPU kernels and [`QuantizedWeight::dequantize`] read.
enum Host<'a> {
    Int8 {
        k: usize,
        codes: &'a [u8],
        absmax: &'a [f32],
    },
    Nf4 {
        k: usize,
        codes: &'a [u8],
        absmax_codes: &'a [u8],
        group_scales: &'a [f32],
        offset: f32,
        dynamic: &'a [f32; 256],
    },
}

impl Host<'_> {
    /// The absmax block `b` dequantizes with.
    #[inline]
    fn block_absmax(&self, b: usize) -> f32 {
        match self {
            Self::Int8 { absmax, .. } => absmax[b],
            Self::Nf4 {
                absmax_codes,
                group_scales,
                offset,
                dynamic,
                ..
            } => dynamic[absmax_codes[b] as usize] * group_scales[b / NF4_GROUP] + offset,
        }
    }

    /// Writes `W[row, c0 .. c0 + dst.len()]` into `dst`; `c0` and `dst.len()` are multiples of
    /// [`BLOCK`].
    #[inline]
    fn row_segment(&self, row: usize, c0: usize, dst: &mut [f32]) {
        match *self {
            Self::Int8 { k, codes, absmax } => {
                let (start, len) = (row * k + c0, dst.len());
                for (i, (d, c)) in dst
                    .chunks_exact_mut(BLOCK)
                    .zip(codes[start..start + len].chunks_exact(BLOCK))
                    .enumerate()
                {
                    let step = absmax[start / BLOCK + i] / 127.0;
                    for (d, &c) in d.iter_mut().zip(c) {
                        *d = (c as f32 - 128.0) * step;
                    }
                }
            }
            Self::Nf4 { k, codes, .. } => {
                let (start, len) = (row * k + c0, dst.len());
                for (i, (d, c)) in dst
                    .chunks_exact_mut(BLOCK)
                    .zip(codes[start / 2..(start + len) / 2].chunks_exact(BLOCK / 2))
                    .enumerate()
                {
                    let a = self.block_absmax(start / BLOCK + i);
                    for (d, &byte) in d.chunks_exact_mut(2).zip(c) {
                        d[0] = NF4_CODE[(byte >> 4) as usize] * a;
                        d[1] = NF4_CODE[(byte & 15) as usize] * a;
                    }
                }
            }
        }
    }
}

/// Largest `|x|` of a block.
fn absmax(block: &[f32]) -> f32 {
    block.iter().fold(0f32, |m, x| m.max(x.abs()))
}

/// Int8 codes (`c + 128`) and one absmax per block of 64.
fn quantize_int8(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mut codes = Vec::with_capacity(x.len());
    let mut scales = Vec::with_capacity(x.len() / BLOCK);
    for block in x.chunks_exact(BLOCK) {
        let a = absmax(block);
        scales.push(a);
        codes.extend(block.iter().map(|&v| {
            let c = if a > 0.0 {
                (v / a * 127.0).round().clamp(-127.0, 127.0)
            } else {
                0.0
            };
            (c as i32 + 128) as u8
        }));
    }
    (codes, scales)
}

/// Index of the code value nearest to `v` in a sorted table (the lower one on a tie).
fn nearest(table: &[f32], v: f32) -> usize {
    let i = table.partition_point(|&t| t < v);
    match i {
        0 => 0,
        i if i == table.len() => i - 1,
        i if v - table[i - 1] <= table[i] - v => i - 1,
        i => i,
    }
}

/// Packed NF4 indices (the even element high) and one exact absmax per block of 64.
fn quantize_nf4(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mut codes = Vec::with_capacity(x.len() / 2);
    let mut scales = Vec::with_capacity(x.len() / BLOCK);
    for block in x.chunks_exact(BLOCK) {
        let a = absmax(block);
        scales.push(a);
        let index = |v: f32| match a > 0.0 {
            true => nearest(&NF4_CODE, v / a) as u8,
            false => tables::NF4_ZERO as u8,
        };
        codes.extend(
            block
                .chunks_exact(2)
                .map(|pair| (index(pair[0]) << 4) | index(pair[1])),
        );
    }
    (codes, scales)
}

/// bitsandbytes' double quantization of the per-block absmax values: subtract their mean,
/// then quantize blockwise (groups of [`NF4_GROUP`]) with the signed dynamic map, one f32
/// absmax per group. Returns the codes, the group scales and the mean.
fn double_quantize(absmax: &[f32]) -> (Vec<u8>, Vec<f32>, f32) {
    let offset = (absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len() as f64) as f32;
    let dynamic = dynamic_code();
    let mut codes = Vec::with_capacity(absmax.len());
    let mut scales = Vec::with_capacity(absmax.len().div_ceil(NF4_GROUP));
    for group in absmax.chunks(NF4_GROUP) {
        let centred: Vec<f32> = group.iter().map(|&a| a - offset).collect();
        let s = self::absmax(&centred);
        scales.push(s);
        codes.extend(centred.iter().map(|&v| match s > 0.0 {
            true => nearest(dynamic, v / s) as u8,
            false => nearest(dynamic, 0.0) as u8,
        }));
    }
    (codes, scales, offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The candle-op dequantization (what runs off the CPU) gives the host path's values bit
    /// for bit, run here on the CPU.
    #[test]
    fn ops_path_matches_host_path() -> Result<()> {
        let dev = Device::Cpu;
        // Several groups of 256 blocks, with a last group that is partial, and in each group
        // a block whose absmax is the group's largest, so that code 255 occurs.
        let mut v = Tensor::randn(0f32, 0.05, (70, 512), &dev)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for g in 0..3 {
            v[g * NF4_GROUP * BLOCK] = 1.0;
        }
        let w = Tensor::from_vec(v, (70, 512), &dev)?;
        for format in [QuantFormat::Int8, QuantFormat::Nf4] {
            let q = QuantizedWeight::quantize(&w, format)?;
            if let Codes::Nf4 { absmax_codes, .. } = &*q.codes {
                assert!(absmax_codes.to_vec1::<u8>()?.contains(&255));
            }
            let host = q
                .dequantize(DType::F32, &dev)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let ops = q.dequantize_with_ops()?.flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(host.len(), ops.len());
            for (i, (h, o)) in host.iter().zip(&ops).enumerate() {
                assert_eq!(h.to_bits(), o.to_bits(), "{format} element {i}: {h} vs {o}");
            }
        }
        Ok(())
    }

    #[test]
    fn nearest_picks_the_closest_value() {
        let t = [-1.0, 0.0, 0.5, 1.0];
        assert_eq!(nearest(&t, -2.0), 0);
        assert_eq!(nearest(&t, 0.2), 1);
        assert_eq!(nearest(&t, 0.25), 1);
        assert_eq!(nearest(&t, 0.3), 2);
        assert_eq!(nearest(&t, 2.0), 3);
    }
}
