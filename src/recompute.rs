//! Frozen-block recompute: keep a frozen block's input, not its intermediates.
//!
//! candle keeps every intermediate of the forward pass alive until the backward pass ends,
//! because each tensor holds its op's inputs. A frozen block needs none of them: its backward
//! only carries dL/dx through. [`recompute`] runs such a block without building a graph and
//! attaches its output to the graph through a custom op that holds only the block's input; the
//! op's backward runs the block again on that input, with gradient tracking, and
//! backpropagates the incoming gradient through it. The cost is one more forward of the block.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CustomOp1, Layout, Shape, Tensor, Var};

/// A block's forward: deterministic, with weights that do not change between the forward and
/// the backward pass.
pub type BlockFn = dyn Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync;

/// `f(x)`, with `f`'s intermediates freed once the forward pass leaves it; the backward pass
/// reruns `f` on `x` to get dL/dx.
///
/// `f` must be a *frozen* block: no tensor inside it may need a gradient, since gradients
/// reach only `x` this way (parameters inside `f` would silently get none). With
/// [`Llama`](crate::Llama) that is decided for you (see
/// [`LisaConfig::recompute_frozen`](crate::LisaConfig::recompute_frozen)); in a model of your
/// own, call this only for blocks whose weights come from
/// [`LisaAdamW::var_builder`](crate::LisaAdamW::var_builder) as frozen (not
/// [`is_variable`](Tensor::is_variable), no gradient tracking).
///
/// When `x` does not track gradients (inference), this is just `f(x)`.
///
/// ```
/// use std::sync::Arc;
/// use candle_core::{Device, Tensor, Var};
/// use candle_lisa::recompute::recompute;
///
/// let w = Tensor::new(&[[2f32, 0.], [0., 3.]], &Device::Cpu)?; // frozen: a plain tensor
/// let x = Var::new(&[[1f32, 1.]], &Device::Cpu)?;
/// let block = Arc::new(move |x: &Tensor| x.matmul(&w)?.tanh());
/// let y = recompute(x.as_tensor(), block)?;
/// let grads = y.sum_all()?.backward()?;
/// let dx = grads.get(x.as_tensor()).expect("dL/dx");
/// let want = [2. * (1. - 2f32.tanh().powi(2)), 3. * (1. - 3f32.tanh().powi(2))];
/// for (got, want) in dx.flatten_all()?.to_vec1::<f32>()?.iter().zip(want) {
///     assert!((got - want).abs() < 1e-6);
/// }
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn recompute(x: &Tensor, f: Arc<BlockFn>) -> candle_core::Result<Tensor> {
    if !x.track_op() {
        return f(x);
    }
    let y = f(&x.detach())?;
    x.apply_op1_arc(Arc::new(Box::new(Recompute {
        f,
        out: Mutex::new(Some(y)),
    })))
}

/// The op in the graph: forward hands out the precomputed output (then drops it), backward
/// reruns the block.
struct Recompute {
    f: Arc<BlockFn>,
    /// The block's output until the forward pass copies it into the graph, then `None`.
    out: Mutex<Option<Tensor>>,
}

impl Recompute {
    /// The output's storage, copied into a fresh one of its own layout (`to_dtype` to its own
    /// dtype is a copy on every backend).
    fn take<S: BackendStorage>(
        &self,
        storage: impl FnOnce(&candle_core::Storage) -> Option<&S>,
    ) -> candle_core::Result<(S, Shape)> {
        let out = self
            .out
            .lock()
            .map_err(|_| candle_core::Error::Msg("recompute: poisoned lock".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("recompute: forward run twice".into()))?;
        let (s, l) = out.storage_and_layout();
        let s = storage(&s)
            .ok_or_else(|| candle_core::Error::Msg("recompute: output on another device".into()))?;
        Ok((s.to_dtype(l, out.dtype())?, l.shape().clone()))
    }
}

impl CustomOp1 for Recompute {
    fn name(&self) -> &'static str {
        "lisa-recompute"
    }

    fn cpu_fwd(
        &self,
        _s: &candle_core::CpuStorage,
        _l: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        self.take(|s| match s {
            candle_core::Storage::Cpu(s) => Some(s),
            _ => None,
        })
    }

    fn cuda_fwd(
        &self,
        _s: &candle_core::CudaStorage,
        _l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.take(|s| match s {
            candle_core::Storage::Cuda(s) => Some(s),
            _ => None,
        })
    }

    fn metal_fwd(
        &self,
        _s: &candle_core::MetalStorage,
        _l: &Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, Shape)> {
        self.take(|s| match s {
            candle_core::Storage::Metal(s) => Some(s),
            _ => None,
        })
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let x = Var::from_tensor(&arg.detach())?;
        let y = (self.f)(x.as_tensor())?;
        let grads = (y * grad_res.detach())?.sum_all()?.backward()?;
        Ok(grads.get(x.as_tensor()).map(Tensor::detach))
    }
}
