//! The gated MLP: SwiGLU (`silu`), or GeGLU for Gemma (`gelu_pytorch_tanh`); Phi-3's fused
//! `gate_up_proj`.

use crate::nn::linear::Linear;
use crate::nn::ops::swiglu;
use candle_core::{Module, Tensor};

/// The SwiGLU MLP: gate and up projections, or Phi-3's fused `gate_up_proj` (gate first).
pub(super) enum Mlp {
    Split {
        gate: Linear,
        up: Linear,
        down: Linear,
        /// Gemma 2's GeGLU (tanh-approximated GELU) instead of SiLU.
        gelu: bool,
    },
    Fused {
        gate_up: Linear,
        down: Linear,
        width: usize,
    },
}

impl Mlp {
    pub(super) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Split {
                gate,
                up,
                down,
                gelu: false,
            } => down.forward(&swiglu(&gate.forward(x)?, &up.forward(x)?)?),
            Self::Split {
                gate,
                up,
                down,
                gelu: true,
            } => down.forward(&(gate.forward(x)?.gelu()? * up.forward(x)?)?),
            Self::Fused {
                gate_up,
                down,
                width,
            } => {
                let y = gate_up.forward(x)?;
                let (gate, up) = (
                    y.narrow(2, 0, *width)?.contiguous()?,
                    y.narrow(2, *width, *width)?.contiguous()?,
                );
                down.forward(&swiglu(&gate, &up)?)
            }
        }
    }

    pub(super) fn linears(&self) -> Vec<&Linear> {
        match self {
            Self::Split { gate, up, down, .. } => vec![gate, up, down],
            Self::Fused { gate_up, down, .. } => vec![gate_up, down],
        }
    }
}
