//! The fused update and the gradient's sum of squares on CUDA: kernels from `kernels/lisa.cu`
//! (loaded through `nn::kernels::cuda`), one launch per parameter, reading and writing the
//! operands in place.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, DType, Result, Storage, Tensor};
use half::{bf16, f16};

use super::fused::{Consts, Real};
use super::Coefficients;

use crate::nn::kernels::cuda::{view, view_mut, with_storage_mut, MODULE, PTX};

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
                        let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
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
                            let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
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

/// The kernel of the sum of squares of a contiguous CUDA tensor of a dtype that has one:
/// its name, storage offsets and launch shape.
fn sum_plan(g: &Tensor) -> Option<(&'static str, usize, usize, LaunchConfig)> {
    let (start, end) = g.layout().contiguous_offsets()?;
    let name = match g.dtype() {
        DType::F32 => "lisa_sum_squares_f32",
        DType::F64 => "lisa_sum_squares_f64",
        DType::BF16 => "lisa_sum_squares_bf16",
        DType::F16 => "lisa_sum_squares_f16",
        _ => return None,
    };
    g.device().is_cuda().then(|| {
        let cfg = config(end - start, MAX_SUM_BLOCKS);
        (name, start, end, cfg)
    })
}

/// Launches the sum of squares of `g` (planned by [`sum_plan`]), one f64 partial per block
/// into `partial`.
fn launch_sum(
    g: &Tensor,
    (name, start, end, cfg): (&'static str, usize, usize, LaunchConfig),
    partial: &mut CudaViewMut<'_, f64>,
) -> Result<()> {
    let (storage, _) = g.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        bail!("sum of squares: the gradient is not on a CUDA device")
    };
    let n = end - start;
    let func = s.device().get_or_load_custom_func(name, MODULE, PTX)?;
    let mut b = func.builder();
    macro_rules! launch {
        ($t:ty) => {{
            let x = s.as_cuda_slice::<$t>()?.slice(start..end);
            b.arg(&x).arg(&n).arg(partial);
            unsafe { b.launch(cfg) }.w()?;
        }};
    }
    match g.dtype() {
        DType::F32 => launch!(f32),
        DType::F64 => launch!(f64),
        DType::BF16 => launch!(bf16),
        _ => launch!(f16),
    }
    Ok(())
}

/// A sum of partial sums, added in block order (so the result is deterministic). A finite
/// input cannot overflow f64 squares, so a non-finite sum means a non-finite element; it is
/// reported as NaN, as the CPU path does.
fn total(partial: &[f64]) -> f64 {
    let sum: f64 = partial.iter().sum();
    if sum.is_finite() {
        sum
    } else {
        f64::NAN
    }
}

/// [`super::sum_squares`] on CUDA for a contiguous tensor: per-block f64 partial sums on the
/// device, added on the host. `None` for dtypes without a kernel.
pub(super) fn sum_squares(g: &Tensor) -> Result<Option<f64>> {
    Ok(sum_squares_all(&[g])?.pop().flatten())
}

/// [`sum_squares`] of many tensors with one read of the device: the partial sums of every
/// tensor on the first one's CUDA device go into one buffer, copied to the host once. `None`
/// for the others (another device, a strided layout, a dtype without a kernel).
pub(super) fn sum_squares_all(gs: &[&Tensor]) -> Result<Vec<Option<f64>>> {
    let Some(first) = gs.iter().map(|g| g.device()).find(|d| d.is_cuda()) else {
        return Ok(vec![None; gs.len()]);
    };
    let candle_core::Device::Cuda(dev) = first else {
        return Ok(vec![None; gs.len()]);
    };
    let plans: Vec<_> = gs
        .iter()
        .map(|g| sum_plan(g).filter(|_| g.device().same_device(first)))
        .collect();
    let blocks = |p: &(&str, usize, usize, LaunchConfig)| p.3.grid_dim.0 as usize;
    let sizes: usize = plans.iter().flatten().map(blocks).sum();
    if sizes == 0 {
        return Ok(vec![None; gs.len()]);
    }
    let mut partial = dev.alloc_zeros::<f64>(sizes)?;
    let mut at = 0;
    for (g, plan) in gs.iter().zip(&plans) {
        if let Some(plan) = plan {
            let n = blocks(plan);
            launch_sum(g, *plan, &mut partial.slice_mut(at..at + n))?;
            at += n;
        }
    }
    let host = dev.clone_dtoh(&partial)?;
    let mut at = 0;
    Ok(plans
        .iter()
        .map(|plan| {
            plan.as_ref().map(|plan| {
                let n = blocks(plan);
                at += n;
                total(&host[at - n..at])
            })
        })
        .collect())
}
