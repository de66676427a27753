//! CPU kernels that keep every core busy from one thread pool.
//!
//! candle 0.11.1 runs its elementwise ops on its own barrier pool (one spinning worker per
//! extra core) and its matmuls through `gemm` on rayon's global pool, so on the CPU two pools
//! compete for the same cores and each gemm call pays rayon's wake-ups several times (once per
//! packing pass and once per depth block). Measured on 2 cores at T = 256: 180–220 GFLOP/s
//! through candle's matmul, 270–295 GFLOP/s with the output split into one column block per
//! core of candle's barrier pool and each block a single-threaded gemm call (the figure
//! PyTorch's MKL reaches on the same machine). [`matmul`] does the latter.
//!
//! The rest are the f32 kernels of the model's ops, forward and backward, one pass each on
//! the same pool: attention (per query head, in blocks of 64 rows over only the keys a block
//! can see, in either head layout), RMSNorm, RoPE, SwiGLU and the LM head's cross-entropy.
//! Their inner loops are compiled for several instruction sets and picked at run time
//! (`multiversion`). Their sums run in fixed lanes and fixed row groups, so their results do
//! not depend on the thread count; a matmul's column blocks do, and gemm may then sum in
//! another order.
//!
//! Where things are:
//! - [`matmul`]: products on candle's barrier pool, one single-threaded gemm call per column
//!   block, for `Linear`, the LM head and the head-major attention fallback;
//! - [`attention`]: fused causal attention forward and backward, per query head;
//! - [`elementwise`]: SwiGLU, RMSNorm and RoPE, forward and backward;
//! - [`cross_entropy`]: the LM head's loss and dL/dlogits in one pass per row;
//! - `cuda` (feature `cuda`): the CUDA kernels of `kernels/lisa.cu` (the head's
//!   cross-entropy; the optimizer's update launches through it too);
//! - this module: the pieces they share (lane-wise `exp`, sums, dots and maxima, the pointer
//!   that tasks write through, parallel fills, and borrowing a tensor's f32 slice).

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, DType, Result, Storage, Tensor};

pub(crate) mod attention;
pub(crate) mod cross_entropy;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
pub(crate) mod elementwise;
pub(crate) mod matmul;

pub(crate) use attention::{
    attention_bwd, attention_fwd, AttnDims, AttnInputs, AttnMask, HeadLayout,
};
pub(crate) use cross_entropy::{cross_entropy_bwd, cross_entropy_fused};
pub(crate) use elementwise::{rms_norm_bwd, rms_norm_fwd, rope_fwd, swiglu_bwd, swiglu_fwd};
pub(crate) use matmul::{gemm_serial, linear_fwd_cpu, matmul, product};

/// `e^x` in f32, branch-free so that loops over slices vectorise: Cody–Waite reduction
/// `x = n·ln 2 + r`, a degree-6 polynomial for `e^r` on `|r| ≤ ln 2 / 2`, and `2^n` from
/// the exponent bits. Relative error below 3e-7 (checked against f64 in the tests); exactly 0
/// below −87.3 (so a −∞ mask gives 0), +∞ above 88.3 (a little early: e^88.7 is the largest
/// finite f32), NaN for NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer without `round`, which
    // is a library call (and no vector instruction) on baseline x86-64.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.3, 88.3);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let y = p * f32::from_bits(((n as i32 + 127) as u32) << 23);
    let y = if x > 88.3 { f32::INFINITY } else { y };
    let y = if x < -87.3 { 0.0 } else { y };
    if x.is_nan() {
        x
    } else {
        y
    }
}

/// Sum of a slice in 16 interleaved lanes (so the loop vectorises; the order of the additions
/// is fixed, so the result is deterministic).
#[inline(always)]
fn sum(xs: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let chunks = xs.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (l, x) in lanes.iter_mut().zip(c) {
            *l += x;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `Σ a_i·b_i` in 16 interleaved lanes, as [`sum`].
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Largest element (−∞ for an empty slice; NaNs are skipped, as by `f32::max`).
#[inline(always)]
fn max(xs: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = xs.chunks_exact(16);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    for c in chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l = l.max(x);
        }
    }
    lanes.iter().fold(tail, |m, &x| m.max(x))
}

/// A pointer that may cross threads: tasks write disjoint blocks of the buffer behind it.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: only used for writes to disjoint ranges, each by one task.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The element at `offset` (a method, so that closures capture the whole `SharedMut`).
    fn at(&self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }

    /// The `len` elements at `offset`.
    ///
    /// # Safety
    /// No other live slice may overlap them, and they must lie inside the buffer.
    #[allow(clippy::mut_from_ref)]
    unsafe fn block(&self, offset: usize, len: usize) -> &mut [f32] {
        unsafe { std::slice::from_raw_parts_mut(self.0.add(offset), len) }
    }
}

/// A tensor's elements as a contiguous f32 CPU slice, borrowed from its storage: the guard,
/// and the range of the elements in it. `None` off the CPU, for other dtypes, or when the
/// tensor is not contiguous.
pub(crate) fn f32_view(
    t: &Tensor,
) -> Option<(candle_core::StorageRef<'_>, std::ops::Range<usize>)> {
    if t.dtype() != DType::F32 || !t.device().is_cpu() {
        return None;
    }
    let (s, l) = t.storage_and_layout();
    let range = l.contiguous_offsets()?;
    match &*s {
        Storage::Cpu(CpuStorage::F32(_)) => Some((s, range.0..range.1)),
        _ => None,
    }
}

/// The slice an [`f32_view`] describes.
pub(crate) fn f32_slice<'a>(
    view: &'a (candle_core::StorageRef<'_>, std::ops::Range<usize>),
) -> &'a [f32] {
    match &*view.0 {
        Storage::Cpu(CpuStorage::F32(v)) => &v[view.1.clone()],
        _ => &[],
    }
}

/// Elements per task of the elementwise kernels: large enough that handing out a task costs
/// nothing next to it, small enough to balance (candle's own elementwise ops use the same).
const ELEMENTS_PER_TASK: usize = 16 * 1024;

/// `N` vectors of `len` elements, filled in parallel on candle's barrier pool: `fill(range,
/// outs)` writes every element of `outs[i]`, the slots `range` of output `i`. Ranges start
/// at multiples of `align` elements (a row length, so that no row is split).
fn par_fill<const N: usize>(
    len: usize,
    align: usize,
    fill: impl Fn(std::ops::Range<usize>, [&mut [MaybeUninit<f32>]; N]) + Sync,
) -> [Vec<f32>; N] {
    let mut outs: [Vec<f32>; N] = std::array::from_fn(|_| Vec::with_capacity(len));
    let ptrs = outs.each_mut().map(|v| SharedMut(v.as_mut_ptr()));
    let step = ELEMENTS_PER_TASK.div_ceil(align.max(1)) * align.max(1);
    let run = |task: usize| {
        let range = task * step..len.min((task + 1) * step);
        // SAFETY: the tasks' ranges are disjoint and inside each vector's capacity.
        let slots = ptrs.map(|p| unsafe {
            std::slice::from_raw_parts_mut(
                p.0.add(range.start).cast::<MaybeUninit<f32>>(),
                range.len(),
            )
        });
        fill(range, slots);
    };
    let tasks = len.div_ceil(step);
    match tasks {
        0 => {}
        1 => run(0),
        _ => candle_core::utils::barrier_pool().execute_chunked(tasks, |r| r.for_each(run)),
    }
    // SAFETY: `fill` wrote every element of every range, and the ranges cover 0..len.
    outs.each_mut()
        .iter_mut()
        .for_each(|v| unsafe { v.set_len(len) });
    outs
}

/// Whether every tensor is f32 on the CPU (what the kernels here take).
pub(crate) fn all_cpu_f32(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.dtype() == DType::F32 && t.device().is_cpu())
}

/// `f` on the elements of contiguous f32 CPU tensors, borrowed from their storage; an error
/// for any other tensor.
pub(crate) fn with_slices<const N: usize, R>(
    ts: [&Tensor; N],
    f: impl FnOnce([&[f32]; N]) -> R,
) -> Result<R> {
    let views = ts.map(f32_view);
    if views.iter().any(Option::is_none) {
        candle_core::bail!("candle-lisa CPU kernel: a tensor is not contiguous f32 on the CPU")
    }
    let slices = views
        .each_ref()
        .map(|v| v.as_ref().map_or(&[][..], f32_slice));
    Ok(f(slices))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_3e7_of_f64() {
        let mut worst = 0f64;
        for i in -2_000_000..=2_000_000 {
            let x = i as f32 * 4.3e-5;
            let want = (x as f64).exp();
            worst = worst.max(((exp(x) as f64) - want).abs() / want);
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-87.4), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }
}
