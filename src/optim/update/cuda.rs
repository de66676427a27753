//! The fused update and the gradient's sum of squares on CUDA: kernels from `kernels/lisa.cu`,
//! compiled to PTX by `build.rs` and loaded through candle's CUDA device, one launch per
//! parameter, reading and writing the operands in place.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaStorage, WrapErr};
use candle_core::{bail, DType, InplaceOp1, Layout, Result, Storage, Tensor};
use half::{bf16, f16};
use std::cell::Cell;

use super::fused::{Consts, Real};
use super::Coefficients;

mod ptx {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// The name candle caches the loaded PTX module under.
const MODULE: &str = "candle_lisa";
const THREADS: u32 = 256;
/// Enough blocks of 256 threads to fill an H100/H200 several times over (132 SMs × 8
/// resident blocks); larger tensors are covered by the kernels' grid-stride loops.
const MAX_UPDATE_BLOCKS: usize = 132 * 8 * 4;
/// Blocks of the sum of squares: one f64 partial each, summed on the host.
const MAX_SUM_BLOCKS: usize = 1024;

fn config(n: usize, max_blocks: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, max_blocks) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn offsets(l: &Layout) -> Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused AdamW: non-contiguous operand".into()))
}

fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    let (start, end) = offsets(l)?;
    Ok(s.as_cuda_slice::<T>()?.slice(start..end))
}

fn view_mut<'a, T: CudaDType>(s: &'a mut CudaStorage, l: &Layout) -> Result<CudaViewMut<'a, T>> {
    let (start, end) = offsets(l)?;
    Ok(s.as_cuda_slice_mut::<T>()?.slice_mut(start..end))
}

/// Runs `f` on the CUDA storage of a tensor, write-locked (the CUDA twin of the CPU path's
/// `WithStorage`).
struct WithCudaStorage<F>(Cell<Option<F>>);

impl<F: FnOnce(&mut CudaStorage, &Layout) -> Result<()>> InplaceOp1 for WithCudaStorage<F> {
    fn name(&self) -> &'static str {
        "lisa-fused-adamw-cuda"
    }

    fn cpu_fwd(&self, _: &mut candle_core::CpuStorage, _: &Layout) -> Result<()> {
        bail!("fused AdamW (CUDA): the operand is on the CPU")
    }

    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> Result<()> {
        match self.0.take() {
            Some(f) => f(storage, layout),
            None => bail!("fused AdamW: storage visited twice"),
        }
    }
}

fn with_storage_mut(
    t: &Tensor,
    f: impl FnOnce(&mut CudaStorage, &Layout) -> Result<()>,
) -> Result<()> {
    t.inplace_op1(&WithCudaStorage(Cell::new(Some(f))))
}

/// Pushes the constants of one update, in the order the kernels take them.
fn push_consts<'a, T: Real + DeviceRepr>(
    b: &mut candle_core::cuda_backend::cudarc::driver::LaunchArgs<'a>,
    k: &'a Consts<T>,
) {
    for x in [
        &k.b1,
        &k.omb1,
        &k.b2,
        &k.omb2,
        &k.sm,
        &k.sv,
        &k.eps,
        &k.decay,
        &k.lr,
        &k.inv_scale,
    ] {
        b.arg(x);
    }
}

/// [`super::adamw_in_place`] on CUDA: one launch of `lisa_adamw_{f32,f64,bf16,f16}`.
pub(super) fn adamw_in_place(
    c: &Coefficients,
    theta: &Tensor,
    g: &Tensor,
    master: Option<&Tensor>,
    m: &Tensor,
    v: &Tensor,
    inv_scale: f64,
) -> Result<()> {
    let n = theta.elem_count();
    let dtype = theta.dtype();
    let (g_storage, gl) = g.storage_and_layout();
    let Storage::Cuda(gs) = &*g_storage else {
        bail!("fused AdamW: the gradient is not on a CUDA device")
    };
    let cfg = config(n, MAX_UPDATE_BLOCKS);
    with_storage_mut(theta, |ts, tl| {
        with_storage_mut(m, |ms, ml| {
            with_storage_mut(v, |vs, vl| {
                let dev = ts.device().clone();
                match (dtype, master) {
                    (DType::F32 | DType::F64, None) => {
                        let name = match dtype {
                            DType::F32 => "lisa_adamw_f32",
                            _ => "lisa_adamw_f64",
                        };
                        let func = dev.get_or_load_custom_func(name, MODULE, ptx::LISA)?;
                        let mut b = func.builder();
                        macro_rules! launch {
                            ($t:ty) => {{
                                let k = Consts::<$t>::new(c, inv_scale);
                                let mut th = view_mut::<$t>(ts, tl)?;
                                let gv = view::<$t>(gs, gl)?;
                                let mut mv = view_mut::<$t>(ms, ml)?;
                                let mut vv = view_mut::<$t>(vs, vl)?;
                                b.arg(&mut th).arg(&gv).arg(&mut mv).arg(&mut vv).arg(&n);
                                push_consts(&mut b, &k);
                                unsafe { b.launch(cfg) }.w()?;
                            }};
                        }
                        match dtype {
                            DType::F32 => launch!(f32),
                            _ => launch!(f64),
                        }
                        Ok(())
                    }
                    (DType::BF16 | DType::F16, Some(master)) => {
                        with_storage_mut(master, |ws, wl| {
                            let name = match dtype {
                                DType::BF16 => "lisa_adamw_bf16",
                                _ => "lisa_adamw_f16",
                            };
                            let func = dev.get_or_load_custom_func(name, MODULE, ptx::LISA)?;
                            let k = Consts::<f32>::new(c, inv_scale);
                            let mut wv = view_mut::<f32>(ws, wl)?;
                            let mut mv = view_mut::<f32>(ms, ml)?;
                            let mut vv = view_mut::<f32>(vs, vl)?;
                            let mut b = func.builder();
                            macro_rules! launch {
                                ($h:ty) => {{
                                    let mut th = view_mut::<$h>(ts, tl)?;
                                    let gv = view::<$h>(gs, gl)?;
                                    b.arg(&mut th).arg(&gv).arg(&mut wv);
                                    b.arg(&mut mv).arg(&mut vv).arg(&n);
                                    push_consts(&mut b, &k);
                                    unsafe { b.launch(cfg) }.w()?;
                                }};
                            }
                            match dtype {
                                DType::BF16 => launch!(bf16),
                                _ => launch!(f16),
                            }
                            Ok(())
                        })
                    }
                    _ => bail!("fused AdamW: operands of unexpected dtypes"),
                }
            })
        })
    })
}

/// [`super::sum_squares`] on CUDA for a contiguous tensor: per-block f64 partial sums on the
/// device, added on the host in block order (so the result is deterministic). `None` for
/// dtypes without a kernel.
pub(super) fn sum_squares(g: &Tensor) -> Result<Option<f64>> {
    let Some((start, end)) = g.layout().contiguous_offsets() else {
        return Ok(None);
    };
    let n = end - start;
    let name = match g.dtype() {
        DType::F32 => "lisa_sum_squares_f32",
        DType::F64 => "lisa_sum_squares_f64",
        DType::BF16 => "lisa_sum_squares_bf16",
        DType::F16 => "lisa_sum_squares_f16",
        _ => return Ok(None),
    };
    let (storage, _) = g.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        return Ok(None);
    };
    let dev = s.device();
    let cfg = config(n, MAX_SUM_BLOCKS);
    let mut partial = dev.alloc_zeros::<f64>(cfg.grid_dim.0 as usize)?;
    let func = dev.get_or_load_custom_func(name, MODULE, ptx::LISA)?;
    let mut b = func.builder();
    macro_rules! launch {
        ($t:ty) => {{
            let x = s.as_cuda_slice::<$t>()?.slice(start..end);
            b.arg(&x).arg(&n).arg(&mut partial);
            unsafe { b.launch(cfg) }.w()?;
        }};
    }
    match g.dtype() {
        DType::F32 => launch!(f32),
        DType::F64 => launch!(f64),
        DType::BF16 => launch!(bf16),
        _ => launch!(f16),
    }
    let sum: f64 = dev.clone_dtoh(&partial)?.iter().sum();
    // A finite input cannot overflow f64 squares, so a non-finite sum means a non-finite
    // element; report it as NaN, as the CPU path does.
    Ok(Some(if sum.is_finite() { sum } else { f64::NAN }))
}
