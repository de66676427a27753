//! A linear layer that computes no weight gradient when its weight is frozen.
//!
//! Stock candle computes and stores dW for a detached weight in the backward pass (the
//! `Matmul` and binary-op backward always fill both operands, keyed by temporaries that
//! [`GradStore::get`](candle_core::backprop::GradStore::get) never finds). With LISA most
//! weights are frozen, so naive detaching costs more memory than full training. This layer
//! sends its weight through a custom op whose backward returns dL/dx, and dW only for a
//! trained weight.

use candle_core::backend::BackendStorage;
use candle_core::{CustomOp2, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;

use super::quant::{QuantFormat, QuantizedWeight};

/// `y = x · Wᵀ (+ b)`, like [`candle_nn::Linear`], frozen-aware.
///
/// The matmul is one custom op over the backend matmul whose backward computes a gradient only
/// for an operand that tracks gradients. For a frozen weight (a detached tensor, as
/// [`LisaAdamW::var_builder`](crate::LisaAdamW::var_builder) hands out for frozen blocks) that
/// is dL/dx alone: no dW is computed or stored. For a trained weight (a variable) dW comes out
/// in the weight's own layout, where candle's `x.matmul(&w.t())` accumulates it once for the
/// transposed view and once more for `w`. A frozen bias is a constant operand, a trained one
/// gets its gradient. Inputs are made contiguous first, which
/// also sidesteps candle 0.11.1's wrong results for non-contiguous 3-D inputs to `Linear`.
///
/// ```
/// use candle_core::{Device, Module, Tensor};
/// use candle_lisa::Linear;
/// let dev = Device::Cpu;
/// let w = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &dev)?; // detached: frozen
/// let x = candle_core::Var::new(&[[1f32, 1.]], &dev)?;
/// let y = Linear::new(w, None).forward(x.as_tensor())?;
/// assert_eq!(y.to_vec2::<f32>()?, [[3., 7., 11.]]);
/// let grads = y.sum_all()?.backward()?;
/// assert_eq!(grads.get(&x).unwrap().to_vec2::<f32>()?, [[9., 12.]]);
/// // No gradient of the weight's shape was computed or stored.
/// assert!(grads.get_ids().filter_map(|id| grads.get_id(*id)).all(|g| g.dims() != [3, 2]));
/// # Ok::<(), candle_core::Error>(())
/// ```
///
/// # Quantized weights
///
/// [`Linear::quantized`] (or [`Linear::with_storage`]) makes a frozen layer over a weight held
/// as int8 or NF4 codes ([`quant`](crate::nn::quant)): the forward pass computes from the
/// codes, the backward pass returns dL/dx from them, and no dequantized copy of the weight
/// outlives the op. A LoRA adapter on such a layer is QLoRA: `y = x · deq(W)ᵀ + scale · (x ·
/// Aᵀ) · Bᵀ`, with gradients for `A` and `B` and none for `W`. A quantized layer runs under
/// [`recompute`](crate::nn::recompute::recompute) like a dense frozen one;
/// [`observe_linear_inputs`](crate::nn::calibrate::observe_linear_inputs) does not see it.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    lora: Option<LoraAdapter>,
}

/// How a [`Linear`]'s weight is stored.
#[derive(Clone, Debug)]
pub enum LinearWeight {
    /// A tensor `(out, in)`: a variable (trained) or a detached tensor (frozen).
    Dense(Tensor),
    /// Int8 or NF4 codes of an `(out, in)` weight: always frozen.
    Quantized(QuantizedWeight),
}

/// A LoRA adapter: `y += scale · (x · Aᵀ) · Bᵀ`, with `A` of shape `(rank, in)`, `B` of shape
/// `(out, rank)` and `scale = alpha / rank`.
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    /// `A`, `(rank, in)`.
    pub a: Tensor,
    /// `B`, `(out, rank)`.
    pub b: Tensor,
    /// `alpha / rank`.
    pub scale: f64,
}

impl Linear {
    /// A layer over `weight` of shape `(out, in)` and an optional `bias` of shape `(out,)`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight: LinearWeight::Dense(weight),
            bias,
            lora: None,
        }
    }

    /// A frozen layer over a quantized weight `(out, in)` and an optional `bias` of shape
    /// `(out,)` (see [Quantized weights](Self#quantized-weights)).
    pub fn quantized(weight: QuantizedWeight, bias: Option<Tensor>) -> Self {
        Self {
            weight: LinearWeight::Quantized(weight),
            bias,
            lora: None,
        }
    }

    /// A layer over `weight` stored as `format` says: [`Linear::new`] for
    /// [`QuantFormat::Dense`], else [`Linear::quantized`] over its codes (which makes the
    /// layer frozen, whether or not `weight` is a variable).
    ///
    /// # Errors
    /// What [`QuantizedWeight::quantize`] refuses (a weight that is not 2-D, an input
    /// dimension that is not a multiple of 64, a non-finite value, …).
    pub fn with_storage(
        weight: &Tensor,
        bias: Option<Tensor>,
        format: QuantFormat,
    ) -> crate::Result<Self> {
        Ok(match format {
            QuantFormat::Dense => Self::new(weight.clone(), bias),
            format => Self::quantized(QuantizedWeight::quantize(weight, format)?, bias),
        })
    }

    /// The same layer with a LoRA adapter added to its output.
    pub fn with_lora(self, lora: LoraAdapter) -> Self {
        Self {
            lora: Some(lora),
            ..self
        }
    }

    /// The LoRA adapter, if any.
    pub fn lora(&self) -> Option<&LoraAdapter> {
        self.lora.as_ref()
    }

    /// The weight `(out, in)` as a tensor; `None` when it is stored quantized (see
    /// [`storage`](Self::storage)).
    pub fn weight(&self) -> Option<&Tensor> {
        match &self.weight {
            LinearWeight::Dense(w) => Some(w),
            LinearWeight::Quantized(_) => None,
        }
    }

    /// How the weight is stored.
    pub fn storage(&self) -> &LinearWeight {
        &self.weight
    }

    /// `(out, in)`, the weight's shape however it is stored.
    ///
    /// # Errors
    /// A candle error for a dense weight that is not 2-D.
    pub fn weight_shape(&self) -> Result<(usize, usize)> {
        match &self.weight {
            LinearWeight::Dense(w) => w.dims2(),
            LinearWeight::Quantized(q) => Ok(q.shape()),
        }
    }

    /// Whether the weight gets a gradient: a dense weight that tracks one (a variable). A
    /// quantized weight never does.
    pub fn trains_weight(&self) -> bool {
        match &self.weight {
            LinearWeight::Dense(w) => w.track_op(),
            LinearWeight::Quantized(_) => false,
        }
    }

    /// The bias, `(out,)`.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let (&in_dim, batch) = dims.split_last().ok_or_else(|| {
            candle_core::Error::msg(
                "candle_lisa::Linear needs an input with at least one dimension",
            )
        })?;
        let rows = batch.iter().product::<usize>();
        let x = x.contiguous()?;
        // The matmul takes `x` with its leading dimensions as they are: reshapes around it
        // would be graph nodes, each costing a gradient-sized zero fill and sum in candle's
        // backward pass.
        let y = match &self.weight {
            LinearWeight::Dense(w) => {
                super::calibrate::record(&x.detach().reshape((rows, in_dim))?, w)?;
                linear_matmul(&x, w, "Linear")?
            }
            LinearWeight::Quantized(q) => super::quant::quantized_matmul(&x, q)?,
        };
        let y = match &self.bias {
            None => y,
            Some(b) if b.track_op() => y.broadcast_add(b)?,
            Some(b) => crate::nn::ops::add_const(&y, b)?,
        };
        match &self.lora {
            None => Ok(y),
            Some(l) if x.device().is_cpu() => {
                let delta = lora_delta(&x, l, y.shape())?;
                y + delta
            }
            Some(l) => {
                let x2 = x.reshape((rows, in_dim))?;
                let delta = (x2.matmul(&l.a.t()?)?.matmul(&l.b.t()?)? * l.scale)?;
                let delta = delta.reshape(y.shape())?;
                y + delta
            }
        }
    }
}

/// A LoRA adapter's term `scale · (x · Aᵀ) · Bᵀ` for a contiguous `x` `(…, in)`, as one graph
/// node (on the CPU): the tensor-op chain it replaces (reshapes, two products, their
/// transposes, the scaling) is seven nodes, each a zero-filled gradient buffer and a sum in
/// candle's backward pass. The backward pass computes, with `gb = g · B` (rows × rank),
/// dx = scale · gb · A, dA = scale · gbᵀ · x and dB = scale · gᵀ · (x · Aᵀ) (the forward pass's
/// product, kept), each only for an operand that tracks gradients, by the CPU matmul of
/// [`kernels`](super::kernels).
fn lora_delta(x: &Tensor, l: &LoraAdapter, out: &Shape) -> Result<Tensor> {
    use super::kernels::matmul;
    let in_dim = x.dim(candle_core::D::Minus1)?;
    let rows = x.elem_count() / in_dim.max(1);
    let (rank, a_in) = l.a.dims2()?;
    let (b_out, b_rank) = l.b.dims2()?;
    if a_in != in_dim || b_rank != rank || out.dims().last() != Some(&b_out) {
        candle_core::bail!(
            "LoRA adapter A {:?}, B {:?} does not fit the input {:?}",
            l.a.shape(),
            l.b.shape(),
            x.shape()
        )
    }
    let scale = l.scale;
    let flat = move |x: &Tensor| x.detach().reshape((rows, in_dim));
    // x · Aᵀ (rows × rank, small) is kept for dB.
    let xa = matmul(&flat(x)?, &l.a.t()?)?;
    let delta = (matmul(&xa, &l.b.t()?)? * scale)?.reshape(out)?;
    let out = out.clone();
    super::custom_op::attach3("lisa-lora", x, &l.a, &l.b, delta, move |x, a, b, _y, g| {
        let (x_tracks, a_tracks, b_tracks) = (x.track_op(), a.track_op(), b.track_op());
        let (x2, a, b) = (flat(x)?, a.detach(), b.detach());
        let g = g.detach().reshape((rows, out.elem_count() / rows.max(1)))?;
        let gb = match x_tracks || a_tracks {
            true => Some((matmul(&g, &b)? * scale)?),
            false => None,
        };
        let dx = match (&gb, x_tracks) {
            (Some(gb), true) => Some(matmul(gb, &a)?.reshape(x.shape())?),
            _ => None,
        };
        let da = match (&gb, a_tracks) {
            (Some(gb), true) => Some(matmul(&gb.t()?, &x2)?),
            _ => None,
        };
        let db = match b_tracks {
            true => Some((matmul(&g.t()?, &xa)? * scale)?),
            false => None,
        };
        Ok((dx, da, db))
    })
}

/// `x · wᵀ` for a 2-D `x` of shape `(rows, in)` and a `w` of shape `(out, in)` that is not
/// trained: the backward pass returns dL/dx = g · w and nothing for `w`.
///
/// Use this in your own layers for frozen projections; [`Linear`] runs every weight, trained or
/// frozen, through the same op.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    linear_matmul(x, &w.detach(), "frozen_matmul")
}

/// `x · wᵀ` through [`LinearMatmul`], for a trained `w` as for a frozen one; `op` names the
/// caller in a shape error.
fn linear_matmul(x: &Tensor, w: &Tensor, op: &'static str) -> Result<Tensor> {
    let k = x.dim(candle_core::D::Minus1)?;
    let (_, k2) = w.dims2()?;
    if k != k2 {
        return Err(candle_core::Error::ShapeMismatchBinaryOp {
            lhs: x.shape().clone(),
            rhs: w.shape().clone(),
            op,
        });
    }
    // Backends take strided layouts, but cuBLAS rejects column-sliced weights and the CPU path
    // is fastest on row-major rows: give both contiguous operands.
    x.contiguous()?.apply_op2(&w.contiguous()?, LinearMatmul)
}

/// `(x, w) -> x · wᵀ`; backward `(g · w, gᵀ · x)`, each only for an operand that tracks
/// gradients. With `w` frozen that is dx alone; with `w` trained, dW comes out in `w`'s own
/// layout, where candle's `x.matmul(&w.t())` would accumulate it for the transposed view first
/// and then once more for `w` (two more weight-sized buffers at the peak of the backward pass).
struct LinearMatmul;

/// The `(rows, in)` layout of a contiguous input `(…, in)`, and the output shape `(…, out)`.
fn rows_layout(lx: &Layout, lw: &Layout) -> Result<(Layout, Shape)> {
    let (n, k) = lw.shape().dims2()?;
    if !lx.is_contiguous() || lx.dims().last() != Some(&k) {
        candle_core::bail!(
            "candle-lisa-linear-matmul: input {:?} is not contiguous with {k} features",
            lx.shape()
        )
    }
    let mut out = lx.dims().to_vec();
    *out.last_mut().unwrap_or(&mut 0) = n;
    let rows = lx.shape().elem_count() / k.max(1);
    Ok((
        Layout::contiguous_with_offset((rows, k), lx.start_offset()),
        Shape::from(out),
    ))
}

fn matmul_fwd<S: BackendStorage>(x: &S, lx: &Layout, w: &S, lw: &Layout) -> Result<(S, Shape)> {
    let (lx, out) = rows_layout(lx, lw)?;
    let (m, k) = lx.shape().dims2()?;
    let (n, _) = lw.shape().dims2()?;
    let wt = lw.transpose(0, 1)?;
    Ok((x.matmul(w, (1, m, n, k), &lx, &wt)?, out))
}

impl CustomOp2 for LinearMatmul {
    fn name(&self) -> &'static str {
        "candle-lisa-linear-matmul"
    }

    fn cpu_fwd(
        &self,
        x: &candle_core::CpuStorage,
        lx: &Layout,
        w: &candle_core::CpuStorage,
        lw: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        let (rows, out) = rows_layout(lx, lw)?;
        match super::kernels::linear_fwd_cpu(x, &rows, w, lw) {
            Some(y) => Ok((y, out)),
            None => matmul_fwd(x, lx, w, lw),
        }
    }

    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        w: &candle_core::CudaStorage,
        lw: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        matmul_fwd(x, lx, w, lw)
    }

    fn metal_fwd(
        &self,
        x: &candle_core::MetalStorage,
        lx: &Layout,
        w: &candle_core::MetalStorage,
        lw: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        matmul_fwd(x, lx, w, lw)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, k) = w.dims2()?;
        let rows = x.elem_count() / k.max(1);
        let grad = grad.detach().reshape((rows, n))?;
        let dx = match x.track_op() {
            true => Some(super::kernels::matmul(&grad, w)?.reshape(x.shape())?),
            false => None,
        };
        let dw = match w.track_op() {
            true => Some(super::kernels::matmul(
                &grad.t()?,
                &x.detach().reshape((rows, k))?,
            )?),
            false => None,
        };
        Ok((dx, dw))
    }
}

/// A [`Linear`] with bias, initialised like [`candle_nn::linear()`] when the builder creates it.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let inner = candle_nn::linear(in_dim, out_dim, vb)?;
    Ok(Linear::new(inner.weight().clone(), inner.bias().cloned()))
}

/// A [`Linear`] without bias, initialised like [`candle_nn::linear_no_bias`].
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let inner = candle_nn::linear_no_bias(in_dim, out_dim, vb)?;
    Ok(Linear::new(inner.weight().clone(), None))
}

/// [`linear`] or [`linear_no_bias`], as `bias` says.
pub fn linear_b(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    if bias {
        linear(in_dim, out_dim, vb)
    } else {
        linear_no_bias(in_dim, out_dim, vb)
    }
}
