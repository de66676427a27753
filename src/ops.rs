//! Differentiable ops for training, with constant operands that cost no gradient.
//!
//! candle's binary-op backward computes and stores a gradient for *both* operands, even for a
//! constant (a causal mask, RoPE tables, a frozen norm weight), keyed by a broadcast temporary
//! and kept until the `GradStore` is dropped: activation-sized memory for nothing. The ops here
//! treat their second operand as a constant: their backward returns dL/dx only. And unlike
//! candle's fused `rms_norm`, `rope` and `softmax_last_dim`, every op here has a backward.

use candle_core::backend::BackendStorage;
use candle_core::op::{Add, BinaryOpT, Mul};
use std::marker::PhantomData;

use candle_core::{CustomOp2, DType, Layout, Result, Shape, Tensor, D};

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

/// `x ⊙ w`, `w` broadcast over the leading dimensions: differentiable in `w` when `w` tracks
/// gradients (a trainable weight), a constant otherwise (a frozen weight).
pub fn scale(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if w.track_op() {
        x.broadcast_mul(w)
    } else {
        mul_const(x, w)
    }
}

/// RMSNorm over the last dimension, `x / √(mean(x²) + ε) ⊙ w`, differentiable, computed in
/// f32 for half-precision inputs. A frozen `w` gets no gradient (see [`scale`]).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = match dtype {
        DType::F16 | DType::BF16 => x.to_dtype(DType::F32)?,
        _ => x.clone(),
    };
    let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_div(&(ms + eps)?.sqrt()?)?.to_dtype(dtype)?;
    scale(&normed, w)
}

/// Rotary position embedding, Hugging Face's "rotate half" layout, differentiable.
///
/// `x` is `(batch, heads, seq, head_dim)`; `cos` and `sin` are `(seq, head_dim / 2)`, as for
/// candle's `rope`. A model applying RoPE in every layer should call [`rope_tables_full`]
/// once and [`rope_full`] per layer.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let seq = x.dim(2)?;
    let (cos, sin) = rope_tables_full(&cos.narrow(0, 0, seq)?, &sin.narrow(0, 0, seq)?)?;
    rope_full(x, &cos, &sin)
}

/// Half-width `(seq, head_dim / 2)` tables widened to `(seq, head_dim)`, as [`rope_full`]
/// takes them.
pub fn rope_tables_full(cos: &Tensor, sin: &Tensor) -> Result<(Tensor, Tensor)> {
    Ok((
        Tensor::cat(&[cos, cos], D::Minus1)?,
        Tensor::cat(&[sin, sin], D::Minus1)?,
    ))
}

/// [`rope`] with full-width `(seq, head_dim)` tables from [`rope_tables_full`].
pub fn rope_full(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let rotated = Tensor::cat(
        &[
            &x.narrow(D::Minus1, half, half)?.neg()?,
            &x.narrow(D::Minus1, 0, half)?,
        ],
        D::Minus1,
    )?;
    mul_const(x, cos)? + mul_const(&rotated, sin)?
}

/// The `(seq, seq)` additive causal mask: 0 on and below the diagonal, −∞ above.
pub fn causal_mask(seq: usize, dtype: DType, device: &candle_core::Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| (0..seq).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (seq, seq), device)?.to_dtype(dtype)
}

/// The `cpu_fwd`, `cuda_fwd` and `metal_fwd` of a `CustomOp2` whose forward is one function
/// generic over `BackendStorage`: the same code runs on every device.
macro_rules! backend_fwd2 {
    ($($fwd:tt)+) => {
        fn cpu_fwd(
            &self,
            s1: &candle_core::CpuStorage,
            l1: &candle_core::Layout,
            s2: &candle_core::CpuStorage,
            l2: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            $($fwd)+(s1, l1, s2, l2)
        }

        fn cuda_fwd(
            &self,
            s1: &candle_core::CudaStorage,
            l1: &candle_core::Layout,
            s2: &candle_core::CudaStorage,
            l2: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
            $($fwd)+(s1, l1, s2, l2)
        }

        fn metal_fwd(
            &self,
            s1: &candle_core::MetalStorage,
            l1: &candle_core::Layout,
            s2: &candle_core::MetalStorage,
            l2: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::MetalStorage, candle_core::Shape)> {
            $($fwd)+(s1, l1, s2, l2)
        }
    };
}
pub(crate) use backend_fwd2;

/// `(x, c) -> x op c` on a `c` already broadcast to `x`'s shape; backward `(∂/∂x, None)`.
struct ConstOp<B>(PhantomData<B>);

/// A binary op whose right operand can be a constant: how dL/dx follows from dL/dy.
trait ConstRhs: BinaryOpT + Send + Sync + 'static {
    fn dx(grad: &Tensor, c: &Tensor) -> Result<Tensor>;
}

impl ConstRhs for Add {
    fn dx(grad: &Tensor, _c: &Tensor) -> Result<Tensor> {
        Ok(grad.clone())
    }
}

impl ConstRhs for Mul {
    fn dx(grad: &Tensor, c: &Tensor) -> Result<Tensor> {
        grad.mul(c)
    }
}

fn const_fwd<B: BinaryOpT, S: BackendStorage>(
    x: &S,
    lx: &Layout,
    c: &S,
    lc: &Layout,
) -> Result<(S, Shape)> {
    Ok((x.binary_impl::<B>(c, lx, lc)?, lx.shape().clone()))
}

impl<B: ConstRhs> CustomOp2 for ConstOp<B> {
    fn name(&self) -> &'static str {
        B::NAME
    }

    backend_fwd2!(const_fwd::<B, _>);

    fn bwd(
        &self,
        _x: &Tensor,
        c: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(B::dx(grad, c)?), None))
    }
}
