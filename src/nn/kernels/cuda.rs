//! CUDA kernels of this crate (`kernels/lisa.cu`, compiled to PTX by `build.rs` with nvcc and
//! loaded through candle's CUDA device), and what their launchers share: borrowing a tensor's
//! CUDA storage for writing and slicing it by layout. The optimizer's update launches from
//! here too (`optim::update::cuda`).

use std::cell::Cell;
use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaView, CudaViewMut, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, WrapErr};
use candle_core::{bail, CustomOp1, DType, InplaceOp1, Layout, Result, Shape, Storage, Tensor};
use half::{bf16, f16};

mod ptx {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// The PTX of `kernels/lisa.cu`.
pub(crate) const PTX: &str = ptx::LISA;
/// The name candle caches the loaded PTX module under.
pub(crate) const MODULE: &str = "candle_lisa";

fn offsets(l: &Layout) -> Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("CUDA kernel: non-contiguous operand".into()))
}

/// The elements of a contiguous operand, read-only.
pub(crate) fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    let (start, end) = offsets(l)?;
    Ok(s.as_cuda_slice::<T>()?.slice(start..end))
}

/// The elements of a contiguous operand, for writing.
pub(crate) fn view_mut<'a, T: CudaDType>(
    s: &'a mut CudaStorage,
    l: &Layout,
) -> Result<CudaViewMut<'a, T>> {
    let (start, end) = offsets(l)?;
    Ok(s.as_cuda_slice_mut::<T>()?.slice_mut(start..end))
}

/// Runs `f` on the CUDA storage of a tensor, write-locked (the CUDA twin of the CPU path's
/// `WithStorage`).
struct WithCudaStorage<F>(Cell<Option<F>>);

impl<F: FnOnce(&mut CudaStorage, &Layout) -> Result<()>> InplaceOp1 for WithCudaStorage<F> {
    fn name(&self) -> &'static str {
        "lisa-cuda-in-place"
    }

    fn cpu_fwd(&self, _: &mut candle_core::CpuStorage, _: &Layout) -> Result<()> {
        bail!("CUDA kernel: the operand is on the CPU")
    }

    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> Result<()> {
        match self.0.take() {
            Some(f) => f(storage, layout),
            None => bail!("CUDA kernel: storage visited twice"),
        }
    }
}

/// Runs `f` on `t`'s CUDA storage and layout, write-locked.
pub(crate) fn with_storage_mut(
    t: &Tensor,
    f: impl FnOnce(&mut CudaStorage, &Layout) -> Result<()>,
) -> Result<()> {
    t.inplace_op1(&WithCudaStorage(Cell::new(Some(f))))
}

/// Threads per row of the cross-entropy kernel (`CE_THREADS` in `kernels/lisa.cu`).
const CE_THREADS: u32 = 512;

/// The LM head's cross-entropy over contiguous `(rows, vocab)` logits of f32, bf16 or f16,
/// in one kernel: returns each row's `weight · (logsumexp − logit[label])` as f32 `(rows,)`,
/// and leaves `weight · inv_count · (softmax − onehot(label))` in `logits`' place (their
/// gradient for a loss that is the weighted sum times `inv_count`). `labels` is `(rows, 1)`
/// u32 inside the vocabulary, `weights` `(rows, 1)` f32. `None` when the operands do not fit
/// the kernel.
pub(crate) fn cross_entropy_in_place(
    logits: &Tensor,
    labels: &Tensor,
    weights: &Tensor,
    inv_count: f32,
) -> Result<Option<Tensor>> {
    let (rows, v) = logits.dims2()?;
    let fits = logits.is_contiguous()
        && labels.is_contiguous()
        && weights.is_contiguous()
        && labels.dtype() == DType::U32
        && weights.dtype() == DType::F32
        && labels.elem_count() == rows
        && weights.elem_count() == rows
        && matches!(logits.dtype(), DType::F32 | DType::BF16 | DType::F16)
        && rows > 0
        && rows <= u32::MAX as usize;
    if !fits {
        return Ok(None);
    }
    let row_loss = Tensor::zeros(rows, DType::F32, logits.device())?;
    let (ls, ll) = labels.storage_and_layout();
    let (ws, wl) = weights.storage_and_layout();
    let (Storage::Cuda(ls), Storage::Cuda(ws)) = (&*ls, &*ws) else {
        return Ok(None);
    };
    let dtype = logits.dtype();
    with_storage_mut(logits, |xs, xl| {
        with_storage_mut(&row_loss, |rs, rl| {
            let name = match dtype {
                DType::F32 => "lisa_cross_entropy_f32",
                DType::BF16 => "lisa_cross_entropy_bf16",
                _ => "lisa_cross_entropy_f16",
            };
            let func = xs.device().get_or_load_custom_func(name, MODULE, PTX)?;
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (CE_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let lv = view::<u32>(ls, ll)?;
            let wv = view::<f32>(ws, wl)?;
            let mut rv = view_mut::<f32>(rs, rl)?;
            let mut b = func.builder();
            macro_rules! launch {
                ($t:ty) => {{
                    let mut x = view_mut::<$t>(xs, xl)?;
                    b.arg(&mut x)
                        .arg(&v)
                        .arg(&lv)
                        .arg(&wv)
                        .arg(&inv_count)
                        .arg(&mut rv);
                    unsafe { b.launch(cfg) }.w()?;
                }};
            }
            match dtype {
                DType::F32 => launch!(f32),
                DType::BF16 => launch!(bf16),
                _ => launch!(f16),
            }
            Ok(())
        })
    })?;
    Ok(Some(row_loss))
}

/// A tensor holding `storage` as it is (no copy): the output of a no-graph op on `anchor`,
/// any tensor on the same device.
pub(crate) fn tensor_of(storage: CudaStorage, shape: Shape, anchor: &Tensor) -> Result<Tensor> {
    anchor.apply_op1_no_bwd(&Emit(Mutex::new(Some((storage, shape)))))
}

/// The op of [`tensor_of`]: hands its storage over once.
struct Emit(Mutex<Option<(CudaStorage, Shape)>>);

impl CustomOp1 for Emit {
    fn name(&self) -> &'static str {
        "lisa-cuda-emit"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        bail!("CUDA kernel: the anchor is on the CPU")
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.0
            .lock()
            .map_err(|_| candle_core::Error::Msg("CUDA kernel: poisoned lock".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("CUDA kernel: output taken twice".into()))
    }
}

/// The operands' common CUDA device and dtype, when every one is contiguous, on that device,
/// of that dtype, and the dtype is f32, bf16 or f16.
fn common(ts: &[&Tensor]) -> Option<(CudaDevice, DType)> {
    let first = ts.first()?;
    let candle_core::Device::Cuda(dev) = first.device() else {
        return None;
    };
    let dtype = first.dtype();
    let fits = matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
        && ts.iter().all(|t| {
            t.is_contiguous() && t.dtype() == dtype && t.device().same_device(first.device())
        });
    fits.then(|| (dev.clone(), dtype))
}

/// The kernel `{base}_{f32,bf16,f16}` of `dtype`.
fn kernel_name(base: &str, dtype: DType) -> String {
    let suffix = match dtype {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "f32",
    };
    format!("{base}_{suffix}")
}

/// A fresh device buffer of `n` elements of `dtype`, as a storage.
fn alloc(dev: &CudaDevice, dtype: DType, n: usize) -> Result<CudaStorage> {
    // SAFETY: every caller's kernel writes all `n` elements before anything reads them.
    Ok(unsafe {
        match dtype {
            DType::BF16 => CudaStorage::wrap_cuda_slice(dev.alloc::<bf16>(n)?, dev.clone()),
            DType::F16 => CudaStorage::wrap_cuda_slice(dev.alloc::<f16>(n)?, dev.clone()),
            _ => CudaStorage::wrap_cuda_slice(dev.alloc::<f32>(n)?, dev.clone()),
        }
    })
}

/// Grid-stride launch shape for `n` elements.
fn elementwise_config(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 132 * 16) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Launches `name` with the arguments: the inputs (read), the outputs (written), both of
/// `dtype` elements, then the size `n` and, when given, `eps`.
#[allow(clippy::too_many_arguments)]
fn launch(
    dev: &CudaDevice,
    name: &str,
    dtype: DType,
    inputs: &[&Tensor],
    outputs: &mut [&mut CudaStorage],
    cfg: LaunchConfig,
    n: usize,
    eps: Option<f32>,
) -> Result<()> {
    let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
    let guards: Vec<_> = inputs.iter().map(|t| t.storage_and_layout()).collect();
    let mut b = func.builder();
    macro_rules! push {
        ($t:ty) => {{
            let ins = guards
                .iter()
                .map(|(s, l)| match &**s {
                    Storage::Cuda(s) => view::<$t>(s, l),
                    _ => bail!("CUDA kernel: an operand is not on the device"),
                })
                .collect::<Result<Vec<_>>>()?;
            let mut outs = outputs
                .iter_mut()
                .map(|s| Ok(s.as_cuda_slice_mut::<$t>()?.slice_mut(..)))
                .collect::<Result<Vec<_>>>()?;
            for x in &ins {
                b.arg(x);
            }
            for y in &mut outs {
                b.arg(y);
            }
            b.arg(&n);
            if let Some(eps) = &eps {
                b.arg(eps);
            }
            unsafe { b.launch(cfg) }.w()?;
        }};
    }
    match dtype {
        DType::BF16 => push!(bf16),
        DType::F16 => push!(f16),
        _ => push!(f32),
    }
    Ok(())
}

/// SwiGLU's forward, `silu(gate) · up`, as a fresh storage of the operands' shape.
pub(crate) fn swiglu_fwd(gate: &Tensor, up: &Tensor) -> Result<Option<(CudaStorage, Shape)>> {
    let Some((dev, dtype)) = common(&[gate, up]).filter(|_| gate.shape() == up.shape()) else {
        return Ok(None);
    };
    let n = gate.elem_count();
    let mut y = alloc(&dev, dtype, n)?;
    let name = kernel_name("lisa_swiglu_fwd", dtype);
    let cfg = elementwise_config(n);
    launch(&dev, &name, dtype, &[gate, up], &mut [&mut y], cfg, n, None)?;
    Ok(Some((y, gate.shape().clone())))
}

/// SwiGLU's backward: `(d gate, d up)` for the output gradient `dy`.
pub(crate) fn swiglu_bwd(
    gate: &Tensor,
    up: &Tensor,
    dy: &Tensor,
) -> Result<Option<(Tensor, Tensor)>> {
    let fits = gate.shape() == up.shape() && gate.shape() == dy.shape();
    let Some((dev, dtype)) = common(&[gate, up, dy]).filter(|_| fits) else {
        return Ok(None);
    };
    let n = gate.elem_count();
    let (mut dg, mut du) = (alloc(&dev, dtype, n)?, alloc(&dev, dtype, n)?);
    let name = kernel_name("lisa_swiglu_bwd", dtype);
    launch(
        &dev,
        &name,
        dtype,
        &[gate, up, dy],
        &mut [&mut dg, &mut du],
        elementwise_config(n),
        n,
        None,
    )?;
    let shape = gate.shape().clone();
    Ok(Some((
        tensor_of(dg, shape.clone(), gate)?,
        tensor_of(du, shape, gate)?,
    )))
}

/// Threads per row of the RMSNorm kernels (`RMS_THREADS` in `kernels/lisa.cu`).
const RMS_THREADS: u32 = 256;

fn rows_config(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (RMS_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The rows and row length of an RMSNorm of `x` by `w`, when they fit the kernels.
fn rms_dims(x: &Tensor, w: &Tensor) -> Option<(usize, usize)> {
    let h = *x.dims().last()?;
    let rows = x.elem_count() / h.max(1);
    (h > 0 && w.dims() == [h] && rows > 0 && rows <= u32::MAX as usize).then_some((rows, h))
}

/// RMSNorm's forward over the last dimension, as a fresh storage of `x`'s shape.
pub(crate) fn rms_norm_fwd(
    x: &Tensor,
    w: &Tensor,
    eps: f32,
) -> Result<Option<(CudaStorage, Shape)>> {
    let (Some((dev, dtype)), Some((rows, h))) = (common(&[x, w]), rms_dims(x, w)) else {
        return Ok(None);
    };
    let mut y = alloc(&dev, dtype, x.elem_count())?;
    let name = kernel_name("lisa_rms_norm_fwd", dtype);
    let cfg = rows_config(rows);
    launch(
        &dev,
        &name,
        dtype,
        &[x, w],
        &mut [&mut y],
        cfg,
        h,
        Some(eps),
    )?;
    Ok(Some((y, x.shape().clone())))
}

/// RMSNorm's backward: dL/dx, and dL/dw when `w_grad` (per-element `dy · n` in f32, summed
/// over rows by candle).
pub(crate) fn rms_norm_bwd(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    eps: f32,
    w_grad: bool,
) -> Result<Option<(Tensor, Option<Tensor>)>> {
    let (Some((dev, dtype)), Some((rows, h))) = (common(&[x, w, dy]), rms_dims(x, w)) else {
        return Ok(None);
    };
    if dy.shape() != x.shape() {
        return Ok(None);
    }
    let n = x.elem_count();
    let mut dx = alloc(&dev, dtype, n)?;
    let name = kernel_name("lisa_rms_norm_bwd", dtype);
    let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
    let mut gn = match w_grad {
        true => Some(dev.alloc_zeros::<f32>(n)?),
        false => None,
    };
    {
        let guards: Vec<_> = [x, w, dy].iter().map(|t| t.storage_and_layout()).collect();
        let mut b = func.builder();
        let null: u64 = 0;
        macro_rules! push {
            ($t:ty) => {{
                let ins = guards
                    .iter()
                    .map(|(s, l)| match &**s {
                        Storage::Cuda(s) => view::<$t>(s, l),
                        _ => bail!("CUDA kernel: an operand is not on the device"),
                    })
                    .collect::<Result<Vec<_>>>()?;
                let mut out = dx.as_cuda_slice_mut::<$t>()?.slice_mut(..);
                for v in &ins {
                    b.arg(v);
                }
                b.arg(&mut out);
                match gn.as_mut() {
                    Some(gn) => b.arg(gn),
                    // The kernel skips dw's terms for a null pointer.
                    None => b.arg(&null),
                };
                b.arg(&h).arg(&eps);
                unsafe { b.launch(rows_config(rows)) }.w()?;
            }};
        }
        match dtype {
            DType::BF16 => push!(bf16),
            DType::F16 => push!(f16),
            _ => push!(f32),
        }
    }
    let dx = tensor_of(dx, x.shape().clone(), x)?;
    let dw = match gn {
        Some(gn) => {
            let gn = tensor_of(
                CudaStorage::wrap_cuda_slice(gn, dev.clone()),
                Shape::from((rows, h)),
                x,
            )?;
            Some(gn.sum(0)?.reshape(w.shape())?.to_dtype(dtype)?)
        }
        None => None,
    };
    Ok(Some((dx, dw)))
}

/// Threads per row of the attention softmax kernels (`SOFTMAX_THREADS` in `kernels/lisa.cu`).
const SOFTMAX_THREADS: u32 = 256;

/// Attention's probabilities in place over the raw products `scores` (contiguous, last
/// dimension t, every t consecutive rows one query block, so that row r is query position
/// r mod t): `softmax(scores · scale + mask)` with the `(t, t)` additive `mask` of the same
/// dtype. `false` (nothing written) when the operands do not fit the kernel.
pub(crate) fn attn_softmax_in_place(scores: &Tensor, mask: &Tensor, scale: f32) -> Result<bool> {
    let t = scores.dims().last().copied().unwrap_or(0);
    let rows = scores.elem_count() / t.max(1);
    let fits =
        t > 0 && mask.dims() == [t, t] && rows.is_multiple_of(t) && rows <= u32::MAX as usize;
    let Some((_, dtype)) = common(&[scores, mask]).filter(|_| fits) else {
        return Ok(false);
    };
    in_place_rows("lisa_attn_softmax", dtype, scores, mask, rows, t, scale)?;
    Ok(true)
}

/// The scores' gradient from the probabilities `p` and their gradient `dp` (same shape,
/// contiguous), in place over `dp`: `scale · p ⊙ (dp − Σ p ⊙ dp)` per row. `false` (nothing
/// written) when the operands do not fit the kernel.
pub(crate) fn attn_softmax_bwd_in_place(p: &Tensor, dp: &Tensor, scale: f32) -> Result<bool> {
    let t = p.dims().last().copied().unwrap_or(0);
    let rows = p.elem_count() / t.max(1);
    let fits = t > 0 && p.shape() == dp.shape() && rows <= u32::MAX as usize;
    let Some((_, dtype)) = common(&[p, dp]).filter(|_| fits) else {
        return Ok(false);
    };
    in_place_rows("lisa_attn_softmax_bwd", dtype, dp, p, rows, t, scale)?;
    Ok(true)
}

/// Launches the row kernel `base` over `rows` rows of `t`: for the forward `(target, other)`
/// are (scores, mask), for the backward (dp, p); the kernels take the read operand first in
/// the backward, the written one first in the forward.
fn in_place_rows(
    base: &str,
    dtype: DType,
    target: &Tensor,
    other: &Tensor,
    rows: usize,
    t: usize,
    scale: f32,
) -> Result<()> {
    let backward = base.ends_with("_bwd");
    let (os, ol) = other.storage_and_layout();
    let Storage::Cuda(os) = &*os else {
        bail!("CUDA kernel: an operand is not on the device")
    };
    with_storage_mut(target, |ts, tl| {
        let name = kernel_name(base, dtype);
        let func = ts.device().get_or_load_custom_func(&name, MODULE, PTX)?;
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (SOFTMAX_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = func.builder();
        macro_rules! launch {
            ($t:ty) => {{
                let o = view::<$t>(os, ol)?;
                let mut x = view_mut::<$t>(ts, tl)?;
                match backward {
                    true => b.arg(&o).arg(&mut x),
                    false => b.arg(&mut x).arg(&o),
                };
                b.arg(&t).arg(&scale);
                unsafe { b.launch(cfg) }.w()?;
            }};
        }
        match dtype {
            DType::BF16 => launch!(bf16),
            DType::F16 => launch!(f16),
            _ => launch!(f32),
        }
        Ok(())
    })
}
