//! SwiGLU, RMSNorm and RoPE in f32, forward and backward, one pass each over rows on
//! candle's barrier pool; RMSNorm's weight gradient sums fixed 32-row partials, so the bits do
//! not depend on the thread count.

use std::mem::MaybeUninit;

use multiversion::multiversion;

use super::{dot, exp, par_fill};

/// `silu(gate) ⊙ up`, elementwise, `σ(x) = 1 / (1 + e^−x)`.
pub(crate) fn swiglu_fwd(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let [y] = par_fill(gate.len(), 1, |r, [y]| {
        swiglu_chunk(&gate[r.clone()], &up[r], y)
    });
    y
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon",
))]
fn swiglu_chunk(gate: &[f32], up: &[f32], y: &mut [MaybeUninit<f32>]) {
    for ((y, &g), &u) in y.iter_mut().zip(gate).zip(up) {
        y.write(g * u / (1.0 + exp(-g)));
    }
}

/// `(dL/dgate, dL/dup)` of [`swiglu_fwd`] for the output gradient `dy`:
/// `dup = dy·silu(gate)`, `dgate = dy·up·σ(gate)·(1 + gate − silu(gate))`.
pub(crate) fn swiglu_bwd(gate: &[f32], up: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let [dgate, dup] = par_fill(gate.len(), 1, |r, [dgate, dup]| {
        swiglu_bwd_chunk(&gate[r.clone()], &up[r.clone()], &dy[r], dgate, dup)
    });
    (dgate, dup)
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon",
))]
fn swiglu_bwd_chunk(
    gate: &[f32],
    up: &[f32],
    dy: &[f32],
    dgate: &mut [MaybeUninit<f32>],
    dup: &mut [MaybeUninit<f32>],
) {
    let ins = gate.iter().zip(up).zip(dy);
    for ((dg, du), ((&g, &u), &d)) in dgate.iter_mut().zip(dup.iter_mut()).zip(ins) {
        let s = 1.0 / (1.0 + exp(-g));
        let silu = g * s;
        du.write(d * silu);
        dg.write(d * u * s * (1.0 + g - silu));
    }
}

/// `x / √(mean(x²) + ε) ⊙ w` over rows of `w.len()` elements.
pub(crate) fn rms_norm_fwd(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let h = w.len();
    let [y] = par_fill(x.len(), h, |r, [y]| rms_norm_rows(&x[r], w, eps, y));
    y
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon",
))]
fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, y: &mut [MaybeUninit<f32>]) {
    let h = w.len();
    for (y, x) in y.chunks_exact_mut(h).zip(x.chunks_exact(h)) {
        let inv = 1.0 / (dot(x, x) / h as f32 + eps).sqrt();
        for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
            y.write(x * inv * w);
        }
    }
}

/// Rows per partial sum of the norm weight's gradient: the partial sums, and the order they
/// are added in, do not depend on the number of threads.
const ROWS_PER_PARTIAL: usize = 32;

/// `(dL/dx, dL/dw)` of [`rms_norm_fwd`] for the output gradient `dy`, with `r = 1/√(mean(x²)
/// + ε)` and `n = x·r`: `dx = (dy⊙w − n·mean(dy⊙w⊙n))·r`, `dw = Σ_rows dy⊙n` (when
/// `with_dw`).
pub(crate) fn rms_norm_bwd(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    eps: f32,
    with_dw: bool,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let h = w.len();
    let [dx] = par_fill(x.len(), h, |r, [dx]| {
        rms_norm_bwd_rows(&x[r.clone()], &dy[r], w, eps, dx)
    });
    let dw = with_dw.then(|| {
        let rows = x.len() / h.max(1);
        let partials = rows.div_ceil(ROWS_PER_PARTIAL);
        let [parts] = par_fill(partials * h, h, |r, [out]| {
            for (p, out) in (r.start / h..r.end / h).zip(out.chunks_exact_mut(h)) {
                let acc: &mut [f32] = &mut vec![0f32; h];
                let first = p * ROWS_PER_PARTIAL;
                let span = first * h..rows.min(first + ROWS_PER_PARTIAL) * h;
                rms_norm_dw_rows(&x[span.clone()], &dy[span], eps, acc);
                for (o, &a) in out.iter_mut().zip(acc.iter()) {
                    o.write(a);
                }
            }
        });
        let mut dw = vec![0f32; h];
        for part in parts.chunks_exact(h) {
            dw.iter_mut().zip(part).for_each(|(d, p)| *d += p);
        }
        dw
    });
    (dx, dw)
}

/// dL/dx of [`rms_norm_rows`] for whole rows of `x` and `dy`.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon",
))]
fn rms_norm_bwd_rows(x: &[f32], dy: &[f32], w: &[f32], eps: f32, dx: &mut [MaybeUninit<f32>]) {
    let h = w.len();
    let rows = x.chunks_exact(h).zip(dy.chunks_exact(h));
    for (dx, (x, dy)) in dx.chunks_exact_mut(h).zip(rows) {
        let inv = 1.0 / (dot(x, x) / h as f32 + eps).sqrt();
        let mut lanes = [0f32; 16];
        let mut tail = 0f32;
        // mean(dy⊙w⊙n) = r·Σ dy·w·x / h
        let (cx, cd, cw) = (x.chunks_exact(16), dy.chunks_exact(16), w.chunks_exact(16));
        for ((&x, &d), &w) in cx
            .remainder()
            .iter()
            .zip(cd.remainder())
            .zip(cw.remainder())
        {
            tail += d * w * x;
        }
        for ((x, d), w) in cx.zip(cd).zip(cw) {
            for i in 0..16 {
                lanes[i] += d[i] * w[i] * x[i];
            }
        }
        let mean = (lanes.iter().sum::<f32>() + tail) * inv / h as f32;
        for (((dx, &x), &d), &w) in dx.iter_mut().zip(x).zip(dy).zip(w) {
            dx.write((d * w - x * inv * mean) * inv);
        }
    }
}

/// `acc += Σ_rows dy ⊙ x·r` over whole rows of `x` and `dy` (rows of `acc.len()`).
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon",
))]
fn rms_norm_dw_rows(x: &[f32], dy: &[f32], eps: f32, acc: &mut [f32]) {
    let h = acc.len();
    for (x, dy) in x.chunks_exact(h).zip(dy.chunks_exact(h)) {
        let inv = 1.0 / (dot(x, x) / h as f32 + eps).sqrt();
        for ((a, &x), &d) in acc.iter_mut().zip(x).zip(dy) {
            *a += d * x * inv;
        }
    }
}

/// Rotary embedding in the "rotate half" layout over rows of `row` elements, each `row / d`
/// heads of `d`: for row `i` (position `i mod t`) and `j < d/2` in each head, `y_j = x_j·cos −
/// x_{j+d/2}·sin` and `y_{j+d/2} = x_{j+d/2}·cos + x_j·sin`, with `cos`, `sin` `(t, d/2)`. With
/// `sign = −1` it is the inverse rotation (the backward pass). `row = d` for `(b, h, t, d)`,
/// `row = h·d` for `(b, t, h·d)`.
pub(crate) fn rope_fwd(
    x: &[f32],
    (cos, sin): (&[f32], &[f32]),
    (t, d, row): (usize, usize, usize),
    sign: f32,
) -> Vec<f32> {
    let [y] = par_fill(x.len(), row, |r, [y]| {
        let first = r.start / row;
        rope_rows(&x[r], (cos, sin), (t, d, row), sign, first, y)
    });
    y
}

/// [`rope_fwd`] on whole rows of `x`, the first of which is row `first`.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon",
))]
fn rope_rows(
    x: &[f32],
    (cos, sin): (&[f32], &[f32]),
    (t, d, row): (usize, usize, usize),
    sign: f32,
    first: usize,
    y: &mut [MaybeUninit<f32>],
) {
    let half = d / 2;
    for (i, (y, x)) in y.chunks_exact_mut(row).zip(x.chunks_exact(row)).enumerate() {
        let pos = (first + i) % t;
        let (c, s) = (
            &cos[pos * half..(pos + 1) * half],
            &sin[pos * half..(pos + 1) * half],
        );
        for (y, x) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
            let (x1, x2) = x.split_at(half);
            let (y1, y2) = y.split_at_mut(half);
            for j in 0..half {
                let sj = sign * s[j];
                y1[j].write(x1[j] * c[j] - x2[j] * sj);
                y2[j].write(x2[j] * c[j] + x1[j] * sj);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Result, Tensor};

    /// The ops' f32 CPU paths (these kernels) against their f64 paths (plain candle ops,
    /// checked by finite differences in the model's gradient test): outputs and every input's
    /// gradient, through candle's autograd, on rows that are no multiple of the vector width.
    #[test]
    fn fused_ops_match_their_f64_paths() -> Result<()> {
        use crate::nn::ops;
        use candle_core::Var;
        type Op = fn(&[Tensor]) -> Result<Tensor>;
        let dev = Device::Cpu;
        let (b, h, t, d) = (2, 3, 21, 10);
        let cos = Tensor::randn(0f32, 1.0, (t + 4, d / 2), &dev)?;
        let sin = Tensor::randn(0f32, 1.0, (t + 4, d / 2), &dev)?;
        let cases: Vec<(&str, Vec<Tensor>, Op)> = vec![
            (
                "swiglu",
                vec![
                    Tensor::randn(0f32, 3.0, (b, t, 37), &dev)?,
                    Tensor::randn(0f32, 1.0, (b, t, 37), &dev)?,
                ],
                |x| ops::swiglu(&x[0], &x[1]),
            ),
            (
                "rms_norm",
                vec![
                    Tensor::randn(0f32, 1.0, (b, t, 37), &dev)?,
                    Tensor::randn(1f32, 0.2, 37, &dev)?,
                ],
                |x| ops::rms_norm(&x[0], &x[1], 1e-5),
            ),
            (
                "rope",
                vec![Tensor::randn(0f32, 1.0, (b, h, t, d), &dev)?, cos, sin],
                |x| ops::rope(&x[0], &x[1], &x[2]),
            ),
        ];
        for (name, inputs, op) in cases {
            let probe = Tensor::randn(0f64, 1.0, op(&inputs)?.shape(), &dev)?;
            let run = |dtype: DType| -> Result<(Vec<f64>, Vec<Vec<f64>>)> {
                let vars = inputs
                    .iter()
                    .map(|x| Var::from_tensor(&x.to_dtype(dtype)?))
                    .collect::<Result<Vec<_>>>()?;
                let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
                let y = op(&ts)?;
                let grads = (&y * probe.to_dtype(dtype)?)?.sum_all()?.backward()?;
                let flat = |t: &Tensor| t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>();
                let gs = vars
                    .iter()
                    .map(|v| grads.get(v.as_tensor()).map(flat).transpose())
                    .collect::<Result<Vec<_>>>()?;
                Ok((flat(&y)?, gs.into_iter().flatten().collect()))
            };
            let (y32, g32) = run(DType::F32)?;
            let (y64, g64) = run(DType::F64)?;
            assert_eq!(g32.len(), g64.len(), "{name}: gradients");
            let pairs = std::iter::once((&y32, &y64)).chain(g32.iter().zip(&g64));
            for (i, (got, want)) in pairs.enumerate() {
                assert_eq!(got.len(), want.len());
                for (g, w) in got.iter().zip(want) {
                    let ok = (g - w).abs() <= 2e-5 * (1.0 + w.abs());
                    assert!(ok, "{name} output {i} (0: y, then gradients): {g} vs {w}");
                }
            }
        }
        Ok(())
    }
}
