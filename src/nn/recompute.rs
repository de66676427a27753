//! Frozen-block recompute: keep a frozen block's input, not its intermediates.
//!
//! candle keeps every intermediate of the forward pass alive until the backward pass ends,
//! because each tensor holds its op's inputs. A frozen block needs none of them: its backward
//! only carries dL/dx through. [`recompute`] runs such a block without building a graph and
//! attaches its output to the graph through a custom op that holds only the block's input; the
//! op's backward runs the block again on that input, with gradient tracking, and
//! backpropagates the incoming gradient through it. The cost is one more forward of the block.

use std::sync::Arc;

use candle_core::{Tensor, Var};

use crate::nn::custom_op::attach1;

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
/// use candle_lisa::nn::recompute::recompute;
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
    attach1("lisa-recompute", x, y, move |x, _y, g| {
        let x = Var::from_tensor(&x.detach())?;
        let y = f(x.as_tensor())?;
        let grads = (y * g.detach())?.sum_all()?.backward()?;
        Ok(grads.get(x.as_tensor()).map(Tensor::detach))
    })
}
