//! Custom ops whose output is computed beforehand, outside the graph, and attached to it
//! with a backward closure ([`attach1`], [`attach2`], [`attach3`]): the graph keeps the op's
//! inputs and its output and none of the intermediates. [`Output::CpuF32`] hands a CPU
//! kernel's buffer to the graph without a copy; otherwise the forward pass copies the
//! precomputed tensor with `BackendStorage::affine`, which every backend implements for f32,
//! f16 and bf16 (a same-dtype `to_dtype` would be a copy on CPU and CUDA only).
//!
//! Also here: [`ConstOp`], the binary op of `ops::{add_const, mul_const}` that treats its
//! second operand as a constant, and the `backend_fwd!` macro that writes one forward for the
//! CPU, CUDA and Metal storages.

use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::op::{Add, BinaryOpT, Mul};
use candle_core::{CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor};

/// The `cpu_fwd`, `cuda_fwd` and `metal_fwd` of a custom op whose forward is one expression
/// generic over the backend storage: `backend_fwd!(self, |s1, l1, s2, l2| f(s1, l1, s2, l2))`
/// names the receiver and the (storage, layout) arguments; the same code runs on every device.
macro_rules! backend_fwd {
    ($this:tt, |$($s:ident, $l:ident),*| $body:expr) => {
        fn cpu_fwd(
            &$this,
            $($s: &candle_core::CpuStorage, $l: &candle_core::Layout),*
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            $body
        }

        fn cuda_fwd(
            &$this,
            $($s: &candle_core::CudaStorage, $l: &candle_core::Layout),*
        ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
            $body
        }

        fn metal_fwd(
            &$this,
            $($s: &candle_core::MetalStorage, $l: &candle_core::Layout),*
        ) -> candle_core::Result<(candle_core::MetalStorage, candle_core::Shape)> {
            $body
        }
    };
}

/// A backend's storage type, and how to find it inside a [`Storage`].
trait BackendOf: BackendStorage {
    fn of(storage: &Storage) -> Option<&Self>;

    /// A CPU storage as this backend's, for the CPU itself.
    fn from_cpu(_storage: candle_core::CpuStorage) -> Option<Self> {
        None
    }

    /// A CUDA storage as this backend's, for CUDA itself.
    #[cfg(feature = "cuda")]
    fn from_cuda(_storage: candle_core::CudaStorage) -> Option<Self> {
        None
    }
}

impl BackendOf for candle_core::CpuStorage {
    fn of(storage: &Storage) -> Option<&Self> {
        match storage {
            Storage::Cpu(s) => Some(s),
            _ => None,
        }
    }

    fn from_cpu(storage: candle_core::CpuStorage) -> Option<Self> {
        Some(storage)
    }
}

impl BackendOf for candle_core::CudaStorage {
    fn of(storage: &Storage) -> Option<&Self> {
        match storage {
            Storage::Cuda(s) => Some(s),
            _ => None,
        }
    }

    #[cfg(feature = "cuda")]
    fn from_cuda(storage: candle_core::CudaStorage) -> Option<Self> {
        Some(storage)
    }
}

impl BackendOf for candle_core::MetalStorage {
    fn of(storage: &Storage) -> Option<&Self> {
        match storage {
            Storage::Metal(s) => Some(s),
            _ => None,
        }
    }
}

/// `(x, c) -> x op c` on a `c` already broadcast to `x`'s shape; backward `(∂/∂x, None)`.
pub(crate) struct ConstOp<B>(pub(crate) PhantomData<B>);

/// A binary op whose right operand can be a constant: how dL/dx follows from dL/dy.
pub(crate) trait ConstRhs: BinaryOpT + Send + Sync + 'static {
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

    backend_fwd!(self, |x, lx, c, lc| const_fwd::<B, _>(x, lx, c, lc));

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

/// The backward pass of a one-input op: `(x, output, dL/doutput) -> dL/dx`.
pub(crate) trait Bwd1:
    Fn(&Tensor, &Tensor, &Tensor) -> Result<Option<Tensor>> + Send + Sync
{
}
impl<F: Fn(&Tensor, &Tensor, &Tensor) -> Result<Option<Tensor>> + Send + Sync> Bwd1 for F {}

/// Two inputs: `(a, b, output, dL/doutput) -> (dL/da, dL/db)`.
pub(crate) trait Bwd2:
    Fn(&Tensor, &Tensor, &Tensor, &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> + Send + Sync
{
}
impl<F> Bwd2 for F where
    F: Fn(&Tensor, &Tensor, &Tensor, &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)>
        + Send
        + Sync
{
}

pub(crate) type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

/// Three inputs: `(a, b, c, output, dL/doutput) -> (dL/da, dL/db, dL/dc)`.
pub(crate) trait Bwd3:
    Fn(&Tensor, &Tensor, &Tensor, &Tensor, &Tensor) -> Result<Grads3> + Send + Sync
{
}
impl<F> Bwd3 for F where
    F: Fn(&Tensor, &Tensor, &Tensor, &Tensor, &Tensor) -> Result<Grads3> + Send + Sync
{
}

/// The output of an attached op, computed beforehand.
pub(crate) enum Output {
    /// A tensor: the forward pass copies its storage into the graph.
    Tensor(Tensor),
    /// A contiguous f32 CPU buffer of this shape, made by the kernels of [`kernels`](super::kernels): the forward
    /// pass hands it to the graph as it is, without a copy.
    CpuF32(Vec<f32>, Shape),
    /// A CUDA kernel's fresh contiguous storage of this shape, handed over without a copy.
    #[cfg(feature = "cuda")]
    Cuda(candle_core::CudaStorage, Shape),
}

impl From<Tensor> for Output {
    fn from(t: Tensor) -> Self {
        Self::Tensor(t)
    }
}

impl Output {
    /// The output as a tensor of its own (when no input tracks gradients); `anchor` is an
    /// input of the op, on its device.
    pub(crate) fn into_tensor(self, anchor: &Tensor) -> Result<Tensor> {
        let _ = anchor;
        match self {
            Self::Tensor(t) => Ok(t),
            Self::CpuF32(v, shape) => Tensor::from_vec(v, shape, &candle_core::Device::Cpu),
            #[cfg(feature = "cuda")]
            Self::Cuda(s, shape) => super::kernels::cuda::tensor_of(s, shape, anchor),
        }
    }
}

/// A custom op whose output was computed beforehand, without a graph: the graph keeps the
/// op's inputs and its output, none of the intermediates, and `bwd` computes the gradients.
struct Attached<F> {
    name: &'static str,
    /// The output until the forward pass hands it to the graph, then `None`.
    out: Mutex<Option<Output>>,
    bwd: F,
}

impl<F> Attached<F> {
    fn new(name: &'static str, y: Output, bwd: F) -> Self {
        Self {
            name,
            out: Mutex::new(Some(y)),
            bwd,
        }
    }

    /// The output's storage and shape. A CPU buffer goes as it is; a tensor's storage is
    /// copied into a fresh contiguous one by `affine(1, 0)`, which every backend implements for
    /// every float dtype (a same-dtype `to_dtype` is not implemented on Metal); it is exact,
    /// except that −0 becomes +0.
    fn take<S: BackendOf>(&self) -> Result<(S, Shape)> {
        let out = self
            .out
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{}: poisoned lock", self.name)))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: forward run twice", self.name)))?;
        let out = match out {
            Output::Tensor(t) => t,
            Output::CpuF32(v, shape) => {
                let s = S::from_cpu(candle_core::CpuStorage::F32(v)).ok_or_else(|| {
                    candle_core::Error::Msg(format!("{}: CPU output on another device", self.name))
                })?;
                return Ok((s, shape));
            }
            #[cfg(feature = "cuda")]
            Output::Cuda(s, shape) => {
                let s = S::from_cuda(s).ok_or_else(|| {
                    candle_core::Error::Msg(format!("{}: CUDA output on another device", self.name))
                })?;
                return Ok((s, shape));
            }
        };
        let (s, l) = out.storage_and_layout();
        let s = S::of(&s).ok_or_else(|| {
            candle_core::Error::Msg(format!("{}: output on another device", self.name))
        })?;
        Ok((s.affine(l, 1.0, 0.0)?, l.shape().clone()))
    }
}

impl<F: Bwd1> CustomOp1 for Attached<F> {
    fn name(&self) -> &'static str {
        self.name
    }

    backend_fwd!(self, |_s1, _l1| self.take());

    fn bwd(&self, x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        (self.bwd)(x, res, grad)
    }
}

impl<F: Bwd2> CustomOp2 for Attached<F> {
    fn name(&self) -> &'static str {
        self.name
    }

    backend_fwd!(self, |_s1, _l1, _s2, _l2| self.take());

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (da, db) = (self.bwd)(a, b, res, grad)?;
        Ok((da.filter(|_| a.track_op()), db.filter(|_| b.track_op())))
    }
}

impl<F: Bwd3> CustomOp3 for Attached<F> {
    fn name(&self) -> &'static str {
        self.name
    }

    backend_fwd!(self, |_s1, _l1, _s2, _l2, _s3, _l3| self.take());

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<Grads3> {
        let (da, db, dc) = (self.bwd)(a, b, c, res, grad)?;
        Ok((
            da.filter(|_| a.track_op()),
            db.filter(|_| b.track_op()),
            dc.filter(|_| c.track_op()),
        ))
    }
}

/// `y`, computed from `x` without a graph, as the output of an op on `x` whose backward is
/// `bwd`; just `y` when `x` does not track gradients.
pub(crate) fn attach1(
    name: &'static str,
    x: &Tensor,
    y: impl Into<Output>,
    bwd: impl Bwd1 + 'static,
) -> Result<Tensor> {
    if !x.track_op() {
        return y.into().into_tensor(x);
    }
    x.apply_op1_arc(Arc::new(Box::new(Attached::new(name, y.into(), bwd))))
}

/// [`attach1`] for an op on `a` and `b`; gradients go only to inputs that track them.
pub(crate) fn attach2(
    name: &'static str,
    a: &Tensor,
    b: &Tensor,
    y: impl Into<Output>,
    bwd: impl Bwd2 + 'static,
) -> Result<Tensor> {
    if !a.track_op() && !b.track_op() {
        return y.into().into_tensor(a);
    }
    a.apply_op2_arc(b, Arc::new(Box::new(Attached::new(name, y.into(), bwd))))
}

/// [`attach1`] for an op on `a`, `b` and `c`; gradients go only to inputs that track them.
pub(crate) fn attach3(
    name: &'static str,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    y: impl Into<Output>,
    bwd: impl Bwd3 + 'static,
) -> Result<Tensor> {
    if !a.track_op() && !b.track_op() && !c.track_op() {
        return y.into().into_tensor(a);
    }
    a.apply_op3_arc(b, c, Arc::new(Box::new(Attached::new(name, y.into(), bwd))))
}
