//! Norm layers with a backward pass: drop-in replacements for `candle_nn::LayerNorm` and
//! `candle_nn::RmsNorm`, whose fused forward on contiguous input has none.
//!
//! candle_nn's norms take a fused kernel without a backward whenever their input is
//! contiguous (`RmsNorm` always does, `LayerNorm` with a bias), so no gradient reaches anything
//! below the first norm of a model built from them, and the parameters there silently never
//! train. These layers have the same constructors and `Module` behaviour, and keep only their
//! inputs and output in the graph ([`ops::layer_norm`],
//! [`ops::rms_norm`]). A frozen weight stores no gradient.

use candle_core::{Module, Result, Tensor};
use candle_nn::{LayerNormConfig, VarBuilder};

use super::ops;

/// `(x − mean) / √(var + ε) ⊙ w (+ b)` over the last dimension, like
/// [`candle_nn::LayerNorm`], with a backward pass. With `remove_mean` false in its config it
/// is an RMS norm, as candle's.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let norm = candle_lisa::layer_norm(4, 1e-5, vb.pp("ln"))?;
/// let x = candle_core::Var::new(&[[1f32, 2., 3., 4.]], &Device::Cpu)?;
/// let y = norm.forward(x.as_tensor())?;
/// let grads = y.sqr()?.sum_all()?.backward()?;
/// assert!(grads.get(x.as_tensor()).is_some()); // candle_nn::LayerNorm would give None
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Option<Tensor>,
    remove_mean: bool,
    eps: f64,
}

impl LayerNorm {
    /// A layer norm with a bias.
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self {
            weight,
            bias: Some(bias),
            remove_mean: true,
            eps,
        }
    }

    /// A layer norm without a bias.
    pub fn new_no_bias(weight: Tensor, eps: f64) -> Self {
        Self {
            weight,
            bias: None,
            remove_mean: true,
            eps,
        }
    }

    /// The weight.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.remove_mean {
            ops::layer_norm(x, &self.weight, self.bias.as_ref(), self.eps)
        } else {
            let y = ops::rms_norm(x, &self.weight, self.eps)?;
            match &self.bias {
                Some(b) => y.broadcast_add(b),
                None => Ok(y),
            }
        }
    }
}

/// `x / √(mean(x²) + ε) ⊙ w` over the last dimension, like [`candle_nn::RmsNorm`], with a
/// backward pass on every input.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// An RMS norm over `weight`.
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self { weight, eps }
    }

    /// The weight.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::rms_norm(x, &self.weight, self.eps)
    }
}

/// [`candle_nn::layer_norm()`] with a backward pass: the weight is `weight` (or `gamma`), the
/// bias `bias` (or `beta`) when the config is affine, initialised to 1 and 0.
pub fn layer_norm<C: Into<LayerNormConfig>>(
    size: usize,
    config: C,
    vb: VarBuilder,
) -> Result<LayerNorm> {
    let config = config.into();
    let name = |names: [&'static str; 2]| {
        names
            .into_iter()
            .find(|n| vb.contains_tensor(n))
            .unwrap_or(names[0])
    };
    let weight = vb.get_with_hints(size, name(["weight", "gamma"]), candle_nn::Init::Const(1.))?;
    let bias = match config.affine {
        true => {
            Some(vb.get_with_hints(size, name(["bias", "beta"]), candle_nn::Init::Const(0.))?)
        }
        false => None,
    };
    Ok(LayerNorm {
        weight,
        bias,
        remove_mean: config.remove_mean,
        eps: config.eps,
    })
}

/// [`candle_nn::rms_norm`] with a backward pass: the weight is `weight`, initialised to 1.
pub fn rms_norm(size: usize, eps: f64, vb: VarBuilder) -> Result<RmsNorm> {
    let weight = vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.))?;
    Ok(RmsNorm::new(weight, eps))
}
