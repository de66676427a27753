//! Differentiable ops for training that keep little in the graph.
//!
//! candle keeps every intermediate of the forward pass alive until the backward pass ends,
//! and its binary-op backward computes and stores a gradient for *both* operands, even for a
//! constant (a causal mask, a frozen norm weight), keyed by a broadcast temporary. The ops here
//! avoid both:
//! - [`mul_const`] and [`add_const`] treat their second operand as a constant: their backward
//!   returns dL/dx only.
//! - [`rms_norm`], [`rope`], [`causal_attention`] and [`swiglu`] compute their output outside
//!   the graph and attach it through a custom op that keeps only the inputs and the output;
//!   their backward recomputes what it needs. [`causal_attention`] keeps no `seq × seq` tensor
//!   at all. On the CPU in f32 forward and backward are the fused kernels of `nn::kernels` (one
//!   pass each, on candle's thread pool, their output handed to the graph without a copy);
//!   elsewhere candle's fused kernels (which have no backward) and plain tensor ops.
//!
//! Unlike candle's fused `rms_norm`, `rope` and `softmax_last_dim`, every op here has a
//! backward.
//!
//! Backend calls the custom ops rely on, each implemented by candle 0.11.1's CPU, CUDA and
//! Metal storages for f32, f16 and bf16:
//! - `BackendStorage::matmul` (the frozen-aware [`Linear`](crate::Linear)'s forward);
//! - `BackendStorage::affine` (handing an attached op's precomputed output to the graph; a
//!   same-dtype `to_dtype` would be a copy on CPU and CUDA only);
//! - `BackendStorage::binary_impl` with `Add` and `Mul` ([`add_const`], [`mul_const`]).
//!
//! Everything else is ordinary `Tensor` ops on detached tensors.

use std::marker::PhantomData;
use std::sync::Arc;

use candle_core::op::{Add, Mul};
use candle_core::{DType, Result, Shape, Tensor, D};

use super::custom_op::{attach1, attach2, attach3, ConstOp, Grads3, Output};
use super::kernels::{self, matmul};

/// `x ⊙ c` with `c` broadcast to `x`'s shape and treated as a constant (no gradient for it).
pub fn mul_const(x: &Tensor, c: &Tensor) -> Result<Tensor> {
    x.apply_op2(
        &c.detach().broadcast_as(x.shape())?,
        ConstOp::<Mul>(PhantomData),
    )
}

/// `x + c` with `c` broadcast to `x`'s shape and treated as a constant (no gradient for it).
pub fn add_const(x: &Tensor, c: &Tensor) -> Result<Tensor> {
    x.apply_op2(
        &c.detach().broadcast_as(x.shape())?,
        ConstOp::<Add>(PhantomData),
    )
}

/// RMSNorm over the last dimension, `x / √(mean(x²) + ε) ⊙ w`, differentiable.
///
/// The forward pass is candle's fused `rms_norm` (with the feature `cuda`, on a CUDA device,
/// one kernel of this crate each way, forward and backward); the graph keeps `x`, `w` and the
/// output only, and the backward pass recomputes the per-row scale from `x` (in f32 for
/// half-precision inputs). A frozen `w` (not tracking gradients) gets no gradient.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let h = x.dim(D::Minus1)?;
    if kernels::all_cpu_f32(&[x, w]) && w.dims() == [h] {
        let (xc, wd) = (x.detach().contiguous()?, w.detach());
        let y = kernels::with_slices([&xc, &wd], |[x, w]| kernels::rms_norm_fwd(x, w, eps as f32))?;
        let y = Output::CpuF32(y, x.shape().clone());
        let w_tracks = w.track_op();
        return attach2("lisa-rms-norm", x, w, y, move |x, w, _y, g| {
            let (x, w, g) = (
                x.detach().contiguous()?,
                w.detach(),
                g.detach().contiguous()?,
            );
            let (dx, dw) = kernels::with_slices([&x, &w, &g], |[x, w, g]| {
                kernels::rms_norm_bwd(x, w, g, eps as f32, w_tracks)
            })?;
            let cpu = &candle_core::Device::Cpu;
            Ok((
                Some(Tensor::from_vec(dx, x.shape(), cpu)?),
                dw.map(|dw| Tensor::from_vec(dw, w.shape(), cpu))
                    .transpose()?,
            ))
        });
    }
    #[cfg(feature = "cuda")]
    if let Some((y, shape)) = kernels::cuda::rms_norm_fwd(&x.detach(), &w.detach(), eps as f32)? {
        let w_tracks = w.track_op();
        return attach2(
            "lisa-rms-norm",
            x,
            w,
            Output::Cuda(y, shape),
            move |x, w, _y, g| {
                let g = g.detach().contiguous()?;
                match kernels::cuda::rms_norm_bwd(
                    &x.detach(),
                    &w.detach(),
                    &g,
                    eps as f32,
                    w_tracks,
                )? {
                    Some((dx, dw)) => Ok((Some(dx), dw)),
                    // A gradient of another dtype or layout.
                    None => rms_norm_bwd(x, w, &g, eps, w_tracks),
                }
            },
        );
    }
    let y = match x.dtype() {
        // candle's fused op has no f64 kernel.
        DType::F64 => {
            let x = x.detach();
            let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?;
            x.broadcast_div(&r)?.broadcast_mul(&w.detach())?
        }
        _ => candle_nn::ops::rms_norm(&x.detach(), &w.detach(), eps as f32)?,
    };
    let w_tracks = w.track_op();
    attach2("lisa-rms-norm", x, w, y, move |x, w, _y, g| {
        rms_norm_bwd(x, w, g, eps, w_tracks)
    })
}

/// RMSNorm's backward by tensor ops, in f32 for half-precision operands: `(dx, dw)`, `dw`
/// only when `w_tracks`.
fn rms_norm_bwd(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    eps: f64,
    w_tracks: bool,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
    let dtype = x.dtype();
    let [x, w, g] = [x, w, g].map(|t| upcast(&t.detach()));
    let (x, w, g) = (x?, w?, g?);
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    let n = x.broadcast_mul(&r)?;
    let gw = g.broadcast_mul(&w)?;
    let dot = (&gw * &n)?.mean_keepdim(D::Minus1)?;
    let dx = (gw - n.broadcast_mul(&dot)?)?.broadcast_mul(&r)?;
    let dw = match w_tracks {
        true => {
            let h = w.elem_count();
            Some(
                (g * n)?
                    .reshape(((), h))?
                    .sum(0)?
                    .reshape(w.shape())?
                    .to_dtype(dtype)?,
            )
        }
        false => None,
    };
    Ok((Some(dx.to_dtype(dtype)?), dw))
}

/// LayerNorm over the last dimension, `(x − mean) / √(var + ε) ⊙ w (+ b)`, differentiable.
///
/// The forward pass is candle's fused `layer_norm` (f64 by plain ops); the graph keeps `x`,
/// `w`, `b` and the output, and the backward pass recomputes the normalised `x` (in f32 for
/// half-precision inputs). A frozen `w` or `b` gets no gradient.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let h = x.dim(D::Minus1)?;
    let bias = match b {
        Some(b) => b.detach(),
        None => Tensor::zeros(h, w.dtype(), w.device())?,
    };
    let y = match x.dtype() {
        DType::F64 => {
            let x = x.detach();
            let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
            let r = (centred.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?;
            centred
                .broadcast_div(&r)?
                .broadcast_mul(&w.detach())?
                .broadcast_add(&bias)?
        }
        _ => candle_nn::ops::layer_norm(&x.detach().contiguous()?, &w.detach(), &bias, eps as f32)?,
    };
    let (w_tracks, b_tracks) = (w.track_op(), b.is_some_and(|b| b.track_op()));
    let grads = move |x: &Tensor, w: &Tensor, g: &Tensor| -> Result<Grads3> {
        let dtype = x.dtype();
        let [x, w, g] = [x, w, g].map(|t| upcast(&t.detach()));
        let (x, w, g) = (x?, w?, g?);
        let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let r = (centred.sqr()?.mean_keepdim(D::Minus1)? + eps)?
            .sqrt()?
            .recip()?;
        let n = centred.broadcast_mul(&r)?;
        let gw = g.broadcast_mul(&w)?;
        let mean_gw = gw.mean_keepdim(D::Minus1)?;
        let dot = (&gw * &n)?.mean_keepdim(D::Minus1)?;
        let dx = gw
            .broadcast_sub(&mean_gw)?
            .sub(&n.broadcast_mul(&dot)?)?
            .broadcast_mul(&r)?;
        let rows = |t: Tensor| -> Result<Tensor> {
            t.reshape(((), h))?.sum(0)?.reshape(h)?.to_dtype(dtype)
        };
        let dw = if w_tracks {
            Some(rows((&g * n)?)?)
        } else {
            None
        };
        let db = if b_tracks { Some(rows(g)?) } else { None };
        Ok((Some(dx.to_dtype(dtype)?), dw, db))
    };
    match b {
        Some(b) => attach3("lisa-layer-norm", x, w, b, y, move |x, w, _b, _y, g| {
            grads(x, w, g)
        }),
        None => attach2("lisa-layer-norm", x, w, y, move |x, w, _y, g| {
            let (dx, dw, _) = grads(x, w, g)?;
            Ok((dx, dw))
        }),
    }
}

/// Softmax over the last dimension, differentiable: candle's fused `softmax_last_dim` forward
/// (which has no backward), and `dx = y ⊙ (g − Σ g ⊙ y)`; the graph keeps `x` and `y`.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let y = candle_nn::ops::softmax_last_dim(&x.detach().contiguous()?)?;
    attach1("lisa-softmax", x, y, |x, y, g| {
        let dtype = x.dtype();
        let (y, g) = (upcast(&y.detach())?, upcast(&g.detach())?);
        let dot = (&g * &y)?.sum_keepdim(D::Minus1)?;
        Ok(Some((y * g.broadcast_sub(&dot)?)?.to_dtype(dtype)?))
    })
}

/// Rotary position embedding in the interleaved layout (GPT-J, candle's `rope_i`),
/// differentiable; see [`rope`] for the shapes. The backward pass is the same rotation with
/// `-sin`.
pub fn rope_i(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rotary("lisa-rope-i", candle_nn::rotary_emb::rope_i, x, cos, sin)
}

/// A rotation by one of candle's fused rotary kernels (which have no backward), attached with
/// the inverse rotation (`-sin`) as its backward; the graph keeps only `x` and the output.
fn rotary(
    name: &'static str,
    kernel: fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    let seq = x.dim(2)?;
    let (cos, sin) = (
        cos.narrow(0, 0, seq)?.detach(),
        sin.narrow(0, 0, seq)?.detach(),
    );
    let y = kernel(&x.detach().contiguous()?, &cos, &sin)?;
    attach1(name, x, y, move |_x, _y, g| {
        Ok(Some(kernel(&g.detach().contiguous()?, &cos, &sin.neg()?)?))
    })
}

/// The dtype the ops compute in: f32 for half precision, the dtype itself otherwise.
pub(crate) fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

/// `t` in [`compute_dtype`] (the tensor itself, not a copy, when that is its dtype).
fn upcast(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(compute_dtype(t.dtype()))
}

/// Rotary position embedding, Hugging Face's "rotate half" layout, differentiable.
///
/// `x` is `(batch, heads, seq, head_dim)`; `cos` and `sin` are `(seq, head_dim / 2)`, as for
/// candle's fused `rope`, which computes the forward pass. The rotation is orthogonal, so the
/// backward pass is the same op with `-sin`; the graph keeps only `x` and the output.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, _, t, d) = x.dims4()?;
    if let Some(y) = cpu_rope(x, cos, sin, (t, d, d))? {
        return Ok(y);
    }
    rotary("lisa-rope", candle_nn::rotary_emb::rope, x, cos, sin)
}

/// [`rope`] on `x` `(b, t, heads·d)`, as the projections make it: each head's `d` elements
/// rotated by its position. Only on the CPU in f32 (the fused kernel); `None` elsewhere.
pub(crate) fn rope_token_major(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    d: usize,
) -> Result<Option<Tensor>> {
    let (_, t, row) = x.dims3()?;
    if d == 0 || row % d != 0 {
        candle_core::bail!("rope: rows of {row} are no whole number of heads of {d}")
    }
    cpu_rope(x, cos, sin, (t, d, row))
}

/// The rotation by the fused CPU kernel, rows of `row` elements at `t` positions, heads of `d`;
/// `None` off the CPU, for other dtypes, or for tables that do not fit.
fn cpu_rope(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    (t, d, row): (usize, usize, usize),
) -> Result<Option<Tensor>> {
    let fits = d % 2 == 0
        && cos.dims() == sin.dims()
        && cos.rank() == 2
        && cos.dim(1)? == d / 2
        && cos.dim(0)? >= t;
    if !kernels::all_cpu_f32(&[x, cos, sin]) || !fits {
        return Ok(None);
    }
    let [cos, sin] = [cos, sin].map(|c| c.narrow(0, 0, t)?.detach().contiguous());
    let (cos, sin) = (cos?, sin?);
    let rotate = move |x: &Tensor, sign: f32| -> Result<Output> {
        let x = x.detach().contiguous()?;
        let y = kernels::with_slices([&x, &cos, &sin], |[x, c, s]| {
            kernels::rope_fwd(x, (c, s), (t, d, row), sign)
        })?;
        Ok(Output::CpuF32(y, x.shape().clone()))
    };
    let y = rotate(x, 1.0)?;
    attach1("lisa-rope", x, y, move |_x, _y, g| {
        Ok(Some(rotate(g, -1.0)?.into_tensor(g)?))
    })
    .map(Some)
}

/// [`causal_attention`] on tensors laid out as the projections make them: `q` `(b, t, h·d)`,
/// `k` and `v` `(b, t, kv·d)`; the output is `(b, t, h·d)`, the output projection's input. No
/// transposes, so no copies and no graph nodes for them. Only on the CPU in f32 (the fused
/// kernels); `None` elsewhere.
pub(crate) fn causal_attention_token_major(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    mask: MaskRef<'_>,
    scale: f64,
    (h, kv): (usize, usize),
) -> Result<Option<Tensor>> {
    let (b, t, qw) = q.dims3()?;
    let d = qw / h.max(1);
    let fits = kv > 0
        && h % kv == 0
        && qw == h * d
        && k.dims() == [b, t, kv * d]
        && v.dims() == [b, t, kv * d]
        && match mask {
            MaskRef::Dense(m) => m.dims() == [t, t],
            MaskRef::Causal(_) => true,
        };
    if !fits {
        candle_core::bail!(
            "causal_attention: q {:?}, k {:?}, v {:?} do not fit (b, t, h·d) and (b, t, kv·d) with h = {h}, kv = {kv}",
            q.shape(),
            k.shape(),
            v.shape()
        )
    }
    let dims = kernels::AttnDims {
        b,
        h,
        kv,
        t,
        d,
        layout: kernels::HeadLayout::TokenMajor,
    };
    cpu_attention(q, k, v, mask, scale, dims)
}

/// Causal scaled dot-product attention, differentiable: `softmax(q·kᵀ·scale + mask)·v`.
///
/// `q` is `(batch, heads, seq, head_dim)`, `k` and `v` are `(batch, kv_heads, seq, head_dim)`
/// with `heads` a multiple of `kv_heads` (grouped-query attention: query head `j` reads
/// key/value head `j / (heads / kv_heads)`); `mask` is `(seq, seq)`, added to the scores.
/// The graph keeps `q`, `k`, `v` and the output, not the `seq × seq` scores and
/// probabilities: the backward pass recomputes them, as memory-efficient attention kernels do.
/// On a CUDA device (feature `cuda`) one kernel scales, masks and normalises the scores in
/// place, and one computes their gradient; the `(seq, seq)` scores of one block still exist
/// while it runs (no flash-attention kernel yet).
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    causal_attention_softcap(q, k, v, mask, scale, None)
}

/// [`causal_attention`] with Gemma 2's soft-capping of the scores: with `softcap = Some(c)`,
/// `s = c·tanh(q·kᵀ·scale / c)` before the mask.
pub fn causal_attention_softcap(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let Some(dims) = head_major_dims(q, k, v)? else {
        candle_core::bail!(
            "causal_attention: q {:?}, k {:?}, v {:?} do not fit (b, h, t, d) and (b, kv, t, d) with kv dividing h",
            q.shape(),
            k.shape(),
            v.shape()
        )
    };
    let kernels::AttnDims { b, h, kv, t, d, .. } = dims;
    if softcap.is_none() && mask.dims() == [t, t] {
        if let Some(y) = cpu_attention(q, k, v, MaskRef::Dense(mask), scale, dims)? {
            return Ok(y);
        }
    }
    let n = h / kv;
    let group = move |q: &Tensor| q.contiguous()?.reshape((b, kv, n * t, d));
    let mask = mask.detach();
    // The probabilities, and tanh(u / c) of the raw scores u when capped.
    // On CUDA without soft-capping one kernel per row scales, masks and normalises the raw
    // products in place, and one computes the scores' gradient: two passes over the (t, t)
    // scores where tensor ops take eight.
    #[cfg(feature = "cuda")]
    let fused = softcap.is_none() && q.device().is_cuda() && mask.dtype() == q.dtype();
    let probs = move |q: &Tensor, k: &Tensor| -> Result<(Tensor, Option<Tensor>)> {
        let raw = matmul(&group(q)?, &k.t()?)?;
        #[cfg(feature = "cuda")]
        if fused && kernels::cuda::attn_softmax_in_place(&raw, &mask, scale as f32)? {
            return Ok((raw, None));
        }
        let raw = (raw * scale)?;
        let (scores, tanh) = match softcap {
            None => (raw, None),
            Some(c) => {
                let th = (raw / c)?.tanh()?;
                ((&th * c)?, Some(th))
            }
        };
        let scores = scores
            .reshape((b, kv, n, t, t))?
            .broadcast_add(&mask)?
            .reshape((b, kv, n * t, t))?;
        Ok((candle_nn::ops::softmax_last_dim(&scores)?, tanh))
    };
    let (qd, kd, vd) = (
        q.detach(),
        k.detach().contiguous()?,
        v.detach().contiguous()?,
    );
    let y = matmul(&probs(&qd, &kd)?.0, &vd)?.reshape((b, h, t, d))?;
    attach3(
        "lisa-causal-attention",
        q,
        k,
        v,
        y,
        move |q, k, v, _y, g| {
            let (q, k, v) = (
                q.detach(),
                k.detach().contiguous()?,
                v.detach().contiguous()?,
            );
            let g = group(&g.detach())?;
            let (p, tanh) = probs(&q, &k)?;
            let dv = matmul(&p.t()?, &g)?;
            let dp = matmul(&g, &v.t()?)?;
            #[cfg(feature = "cuda")]
            if fused && kernels::cuda::attn_softmax_bwd_in_place(&p, &dp, scale as f32)? {
                let dq = matmul(&dp, &k)?.reshape((b, h, t, d))?;
                let dk = matmul(&dp.t()?, &group(&q)?)?;
                return Ok((Some(dq), Some(dk), Some(dv)));
            }
            let row = (&dp * &p)?.sum_keepdim(D::Minus1)?;
            let mut ds = (dp.broadcast_sub(&row)? * p)?;
            if let Some(th) = tanh {
                // d(c·tanh(u/c))/du = 1 − tanh²(u/c).
                ds = (ds * (1.0 - th.sqr()?)?)?;
            }
            let ds = (ds * scale)?;
            let dq = matmul(&ds, &k)?.reshape((b, h, t, d))?;
            let dk = matmul(&ds.t()?, &group(&q)?)?;
            Ok((Some(dq), Some(dk), Some(dv)))
        },
    )
}

/// [`causal_attention`] on the CPU in f32 by the fused kernels of [`cpu`]: one task per query
/// head on candle's barrier pool, softmax rows in place, no `(t, t)` tensor. `None` for other
/// devices and dtypes.
fn cpu_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: MaskRef<'_>,
    scale: f64,
    dims: kernels::AttnDims,
) -> Result<Option<Tensor>> {
    let (dense, window) = match mask {
        MaskRef::Dense(m) => (Some(m.detach().contiguous()?), None),
        MaskRef::Causal(w) => (None, w),
    };
    let mut all = vec![q, k, v];
    all.extend(dense.as_ref());
    if !kernels::all_cpu_f32(&all) {
        return Ok(None);
    }
    let [qd, kd, vd] = [q, k, v].map(|t| t.detach().contiguous());
    let (qd, kd, vd) = (qd?, kd?, vd?);
    let run = move |g: Option<&Tensor>| -> Result<Vec<Vec<f32>>> {
        let views = [&qd, &kd, &vd].map(kernels::f32_view);
        let [Some(q), Some(k), Some(v)] = &views else {
            candle_core::bail!("lisa-causal-attention: inputs are not contiguous f32 on the CPU")
        };
        let mask_view = dense.as_ref().map(kernels::f32_view);
        let mask = match &mask_view {
            None => kernels::AttnMask::Causal(window),
            Some(Some(m)) => kernels::AttnMask::Dense(kernels::f32_slice(m)),
            Some(None) => {
                candle_core::bail!(
                    "lisa-causal-attention: the mask is not contiguous f32 on the CPU"
                )
            }
        };
        let x = kernels::AttnInputs {
            q: kernels::f32_slice(q),
            k: kernels::f32_slice(k),
            v: kernels::f32_slice(v),
            mask,
            scale: scale as f32,
        };
        let out = match g {
            None => kernels::attention_fwd(x, dims).map(|y| vec![y]),
            Some(g) => {
                let g = g.detach().contiguous()?;
                let gv = kernels::f32_view(&g);
                let gs = gv.as_ref().map(kernels::f32_slice);
                gs.and_then(|g| kernels::attention_bwd(x, g, dims))
                    .map(|(dq, dk, dv)| vec![dq, dk, dv])
            }
        };
        out.ok_or_else(|| {
            candle_core::Error::Msg(format!("lisa-causal-attention: shapes do not fit {dims:?}"))
        })
    };
    let y = Output::CpuF32(run(None)?.remove(0), q.shape().clone());
    let shapes = [q, k, v].map(|t| t.shape().clone());
    attach3(
        "lisa-causal-attention",
        q,
        k,
        v,
        y,
        move |_q, _k, _v, _y, g| {
            let mut grads = run(Some(g))?.into_iter();
            let mut next = |shape: &Shape| -> Result<Option<Tensor>> {
                let data = grads.next().unwrap_or_default();
                Ok(Some(Tensor::from_vec(
                    data,
                    shape,
                    &candle_core::Device::Cpu,
                )?))
            };
            Ok((next(&shapes[0])?, next(&shapes[1])?, next(&shapes[2])?))
        },
    )
    .map(Some)
}

/// `silu(gate) ⊙ up`, the SwiGLU of Llama's MLP, differentiable; the graph keeps `gate`, `up`
/// and the output, not `silu(gate)`. On a CUDA device (feature `cuda`) the forward and the
/// backward are one kernel each.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if kernels::all_cpu_f32(&[gate, up]) && gate.shape() == up.shape() {
        let (g, u) = (gate.detach().contiguous()?, up.detach().contiguous()?);
        let y = kernels::with_slices([&g, &u], |[g, u]| kernels::swiglu_fwd(g, u))?;
        let y = Output::CpuF32(y, gate.shape().clone());
        return attach2("lisa-swiglu", gate, up, y, |gate, up, _y, dy| {
            let [g, u, dy] = [gate, up, dy].map(|t| t.detach().contiguous());
            let (g, u, dy) = (g?, u?, dy?);
            let (dg, du) =
                kernels::with_slices([&g, &u, &dy], |[g, u, dy]| kernels::swiglu_bwd(g, u, dy))?;
            let cpu = &candle_core::Device::Cpu;
            Ok((
                Some(Tensor::from_vec(dg, g.shape(), cpu)?),
                Some(Tensor::from_vec(du, g.shape(), cpu)?),
            ))
        });
    }
    #[cfg(feature = "cuda")]
    if let Some((y, shape)) = kernels::cuda::swiglu_fwd(&gate.detach(), &up.detach())? {
        return attach2(
            "lisa-swiglu",
            gate,
            up,
            Output::Cuda(y, shape),
            |gate, up, _y, dy| {
                let dy = dy.detach().contiguous()?;
                match kernels::cuda::swiglu_bwd(&gate.detach(), &up.detach(), &dy)? {
                    Some((dg, du)) => Ok((Some(dg), Some(du))),
                    // A gradient of another dtype or layout.
                    None => swiglu_bwd(gate, up, &dy),
                }
            },
        );
    }
    let y = (gate.detach().silu()? * up.detach())?;
    attach2("lisa-swiglu", gate, up, y, |gate, up, _y, g| {
        swiglu_bwd(gate, up, g)
    })
}

/// SwiGLU's backward by tensor ops: `(d gate, d up)`.
fn swiglu_bwd(
    gate: &Tensor,
    up: &Tensor,
    g: &Tensor,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
    let (gate, up, g) = (gate.detach(), up.detach(), g.detach());
    let sig = candle_nn::ops::sigmoid(&gate)?;
    let silu = (&gate * &sig)?;
    let dup = (&g * &silu)?;
    // silu'(x) = σ(x) + x·σ(x)·(1 − σ(x)) = σ(x)·(1 + x − silu(x))
    let dsilu = (sig * ((gate - &silu)? + 1.0)?)?;
    let dgate = ((g * up)? * dsilu)?;
    Ok((Some(dgate), Some(dup)))
}

/// [`causal_attention`] under a causal mask within an optional sliding window (query `i` sees
/// keys `j ≤ i` with `i − j < window`; `None`: every earlier key), with no mask tensor to
/// pass: on the CPU in f32 the fused kernels visit only the keys inside the window, so time
/// and memory are linear in `seq × window` (no `(seq, seq)` matrix is made); elsewhere, and
/// with `softcap`, the [`sliding_window_mask`] matrix is built and [`causal_attention_softcap`]
/// runs.
pub fn sliding_window_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    window: Option<usize>,
    scale: f64,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let t = q.dim(2)?;
    CausalMask::new(t, window, q.dtype(), q.device()).attention(q, k, v, scale, softcap)
}

/// The head-major shapes of `q` `(b, h, t, d)`, `k` and `v` `(b, kv, t, d)` with `kv` dividing
/// `h`; `None` when they do not fit that.
fn head_major_dims(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Option<kernels::AttnDims>> {
    let (b, h, t, d) = q.dims4()?;
    let kv = k.dim(1)?;
    let fits = kv > 0 && h % kv == 0 && k.dims4()? == (b, kv, t, d) && v.dims4()? == (b, kv, t, d);
    Ok(fits.then_some(kernels::AttnDims {
        b,
        h,
        kv,
        t,
        d,
        layout: kernels::HeadLayout::HeadMajor,
    }))
}

/// An attention mask as the fused CPU kernels take it: a `(t, t)` tensor, or causal within an
/// optional window with no matrix behind it.
#[derive(Clone, Copy)]
pub(crate) enum MaskRef<'a> {
    Dense(&'a Tensor),
    Causal(Option<usize>),
}

/// The causal mask of one sequence length and window as a model's layers use it: the fused CPU
/// kernels take the window alone (no `(t, t)` matrix: memory and time linear in
/// `t × window`); the other paths the matrix, built on first use and shared.
#[derive(Clone)]
pub(crate) struct CausalMask {
    t: usize,
    window: Option<usize>,
    dtype: DType,
    device: candle_core::Device,
    dense: Arc<std::sync::OnceLock<Tensor>>,
}

impl CausalMask {
    /// `t` positions within `window` (`None`: every earlier position), for tensors of `dtype`
    /// on `device`.
    pub(crate) fn new(
        t: usize,
        window: Option<usize>,
        dtype: DType,
        device: &candle_core::Device,
    ) -> Self {
        Self {
            t,
            window: window.filter(|&w| w < t),
            dtype,
            device: device.clone(),
            dense: Arc::new(std::sync::OnceLock::new()),
        }
    }

    /// The window, `None` when the mask is plainly causal.
    pub(crate) fn window(&self) -> Option<usize> {
        self.window
    }

    /// The `(t, t)` matrix ([`sliding_window_mask`]).
    pub(crate) fn dense(&self) -> Result<&Tensor> {
        if let Some(m) = self.dense.get() {
            return Ok(m);
        }
        let m = sliding_window_mask(self.t, self.window, self.dtype, &self.device)?;
        Ok(self.dense.get_or_init(|| m))
    }

    /// [`causal_attention_softcap`] under this mask: on the CPU in f32 without soft-capping
    /// the fused kernels with the window alone, elsewhere the matrix.
    pub(crate) fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
        softcap: Option<f64>,
    ) -> Result<Tensor> {
        let dims = head_major_dims(q, k, v)?.filter(|dims| dims.t == self.t);
        if let (None, Some(dims)) = (softcap, dims) {
            if let Some(y) = cpu_attention(q, k, v, MaskRef::Causal(self.window), scale, dims)? {
                return Ok(y);
            }
        }
        causal_attention_softcap(q, k, v, self.dense()?, scale, softcap)
    }
}

/// The `(seq, seq)` additive causal mask: 0 on and below the diagonal, −∞ above.
pub fn causal_mask(seq: usize, dtype: DType, device: &candle_core::Device) -> Result<Tensor> {
    sliding_window_mask(seq, None, dtype, device)
}

/// The `(seq, seq)` additive causal mask of a sliding window: query `i` sees keys `j` with
/// `j ≤ i` and `i − j < window` (0 there, −∞ elsewhere), as transformers' sliding-window
/// layers do; `None` is [`causal_mask`]. The fused CPU attention skips the keys a block of
/// queries cannot see, so a window makes its work linear in `seq × window`.
pub fn sliding_window_mask(
    seq: usize,
    window: Option<usize>,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let w = window.unwrap_or(seq).max(1);
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| {
            (0..seq).map(move |j| {
                if j > i || i - j >= w {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (seq, seq), device)?.to_dtype(dtype)
}
