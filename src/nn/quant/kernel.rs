//! `x · Wᵀ` and `g · W` from a [`QuantizedWeight`]'s codes: fused on the CPU in f32, a
//! transient dequantized tensor elsewhere.

use candle_core::{Device, Result, Shape, Tensor};

use super::{Host, QuantizedWeight, BLOCK};
use crate::nn::custom_op::{attach1, Output};
use crate::nn::kernels::{f32_slice, f32_view, gemm_serial, matmul};

/// Rows of W one forward task dequantizes at a time, at most: a panel of `128 · in` f32.
const FWD_ROWS: usize = 128;

/// Columns of W (two blocks, or one when the input dimension is small) one backward task
/// dequantizes at a time, for every row: a panel of `out · 128` f32 at most.
const BWD_COLS: usize = 2 * BLOCK;

/// Below this many multiply-adds a product runs on the calling thread alone (as the dense
/// matmul's threshold).
const PARALLEL_MIN_WORK: usize = 1 << 16;

/// `x · Wᵀ` for `x` of shape `(…, in)`; the backward pass returns dL/dx = g · W, computed
/// from the codes again, and nothing for W. The graph keeps `x` and the shared codes, no
/// dequantized weight.
pub(crate) fn quantized_matmul(x: &Tensor, q: &QuantizedWeight) -> Result<Tensor> {
    let (n, k) = q.shape();
    let dims = x.dims();
    if dims.last() != Some(&k) {
        return Err(candle_core::Error::ShapeMismatchBinaryOp {
            lhs: x.shape().clone(),
            rhs: Shape::from((n, k)),
            op: "quantized Linear",
        });
    }
    let rows = x.elem_count() / k;
    let mut out_dims = dims.to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = n;
    }
    let x = x.contiguous()?;
    let y = forward(&x.detach().reshape((rows, k))?, q, Shape::from(out_dims))?;
    let q = q.clone();
    attach1(
        "candle-lisa-quantized-linear",
        &x,
        y,
        move |x: &Tensor, _res: &Tensor, grad: &Tensor| {
            let g = grad.detach().contiguous()?.reshape((rows, n))?;
            Ok(Some(backward(&g, &q)?.reshape(x.shape())?))
        },
    )
}

fn forward(x: &Tensor, q: &QuantizedWeight, out: Shape) -> Result<Output> {
    let (n, k) = q.shape();
    let m = x.dim(0)?;
    if let (true, Some(view)) = (q.device().is_cpu(), f32_view(x)) {
        let x = f32_slice(&view);
        let y = q.with_host(|h| forward_cpu(x, h, m, n, k))?;
        return Ok(Output::CpuF32(y, out));
    }
    let w = q.dequantize(x.dtype(), x.device())?;
    Ok(Output::Tensor(matmul(x, &w.t()?)?.reshape(out)?))
}

fn backward(g: &Tensor, q: &QuantizedWeight) -> Result<Tensor> {
    let (n, k) = q.shape();
    let m = g.dim(0)?;
    if let (true, Some(view)) = (q.device().is_cpu(), f32_view(g)) {
        let g = f32_slice(&view);
        let dx = q.with_host(|h| backward_cpu(g, h, m, n, k))?;
        return Tensor::from_vec(dx, (m, k), &Device::Cpu);
    }
    let w = q.dequantize(g.dtype(), g.device())?;
    matmul(g, &w)
}

/// The threads of candle's barrier pool, the caller's included.
fn threads() -> usize {
    candle_core::utils::barrier_pool().n_workers() + 1
}

/// Runs `task(i)` for `i in 0..tasks`, spread over candle's barrier pool when the product
/// is large enough; each worker allocates its `scratch` f32 buffer once.
fn run_tasks(tasks: usize, work: usize, scratch: usize, task: impl Fn(usize, &mut [f32]) + Sync) {
    let run = |range: std::ops::Range<usize>| {
        let mut buf = vec![0f32; scratch];
        range.for_each(|i| task(i, &mut buf));
    };
    let pool = candle_core::utils::barrier_pool();
    if tasks <= 1 || pool.n_workers() == 0 || work < PARALLEL_MIN_WORK {
        run(0..tasks);
    } else {
        pool.execute_chunked(tasks, run);
    }
}

/// `y (m × n) = x (m × k) · Wᵀ`: each task dequantizes a panel of at most [`FWD_ROWS`] rows
/// of W into its buffer and computes those output columns with one gemm call.
fn forward_cpu(x: &[f32], h: &Host<'_>, m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut y: Vec<f32> = Vec::with_capacity(m * n);
    let dst = y.as_mut_ptr() as usize;
    let x_ptr = x.as_ptr() as usize;
    // Panels of equal width (a multiple of 16, gemm's widest register tile), so that no
    // panel is a sliver (gemm sums a narrow product, m · width ≤ 256, in another order), and
    // as many as a multiple of the thread count, so that the threads finish together.
    let panels = n.div_ceil(FWD_ROWS).next_multiple_of(threads());
    let width = n.div_ceil(panels).next_multiple_of(16).min(FWD_ROWS);
    run_tasks(n.div_ceil(width), m * n * k, width * k, |p, buf| {
        let (j0, j1) = (p * width, n.min((p + 1) * width));
        for (r, row) in buf.chunks_exact_mut(k).take(j1 - j0).enumerate() {
            h.row_segment(j0 + r, 0, row);
        }
        // SAFETY: `x` holds m·k elements and `buf` (j1 − j0)·k (its rows, read transposed);
        // the tasks write disjoint column ranges of `y`, whose capacity is m·n.
        unsafe {
            gemm_serial(
                (m, j1 - j0, k),
                (dst as *mut f32).add(j0),
                n,
                false,
                x_ptr as *const f32,
                (k, 1),
                buf.as_ptr(),
                (1, k),
            );
        }
    });
    // SAFETY: the gemm calls wrote every column of every row.
    unsafe { y.set_len(m * n) };
    y
}

/// `dx (m × k) = g (m × n) · W`: each task dequantizes [`BWD_COLS`] (or [`BLOCK`]) columns of
/// every row of W into its buffer and computes those columns of dx with one gemm call.
fn backward_cpu(g: &[f32], h: &Host<'_>, m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut dx: Vec<f32> = Vec::with_capacity(m * k);
    let dst = dx.as_mut_ptr() as usize;
    let g_ptr = g.as_ptr() as usize;
    // One block per panel when two would leave too few tasks to share out evenly.
    let cols = match k / BWD_COLS < 4 * threads() {
        true => BLOCK,
        false => BWD_COLS,
    };
    run_tasks(k.div_ceil(cols), m * n * k, n * cols, |p, buf| {
        let (c0, c1) = (p * cols, k.min((p + 1) * cols));
        let width = c1 - c0;
        for (j, row) in buf.chunks_exact_mut(width).take(n).enumerate() {
            h.row_segment(j, c0, row);
        }
        // SAFETY: `g` holds m·n elements and `buf` n·width; the tasks write disjoint column
        // ranges of `dx`, whose capacity is m·k.
        unsafe {
            gemm_serial(
                (m, width, n),
                (dst as *mut f32).add(c0),
                k,
                false,
                g_ptr as *const f32,
                (n, 1),
                buf.as_ptr(),
                (width, 1),
            );
        }
    });
    // SAFETY: the gemm calls wrote every column of every row.
    unsafe { dx.set_len(m * k) };
    dx
}
