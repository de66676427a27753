//! The AdamW update as a pure function, and the per-parameter state it reads.

use candle_core::{Result, Tensor};
use candle_nn::ParamsAdamW;

/// AdamW moments of one parameter.
///
/// Invariant: `step` counts the updates applied since this state was created, so a parameter
/// that comes back after being frozen starts at 0 and its first update uses bias correction
/// for t = 1.
#[derive(Debug)]
pub(crate) struct Moments {
    pub m: Tensor,
    pub v: Tensor,
    pub step: u64,
}

impl Moments {
    pub fn zeros_like(t: &Tensor) -> Result<Self> {
        Ok(Self {
            m: t.zeros_like()?,
            v: t.zeros_like()?,
            step: 0,
        })
    }

    pub fn bytes(&self) -> usize {
        (self.m.elem_count() + self.v.elem_count()) * self.m.dtype().size_in_bytes()
    }
}

/// One AdamW step (candle_nn::AdamW's math, op for op): returns `(θ', m', v')` for the update
/// number `t` (1-based) of this parameter. Every input must be detached, so nothing it builds
/// is attached to a graph and each temporary is freed as soon as the next op has read it.
pub(crate) fn adamw(
    p: &ParamsAdamW,
    t: u64,
    theta: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let t = i32::try_from(t).unwrap_or(i32::MAX);
    let scale_m = 1f64 / (1f64 - p.beta1.powi(t));
    let scale_v = 1f64 / (1f64 - p.beta2.powi(t));
    let next_m = ((m * p.beta1)? + (g * (1.0 - p.beta1))?)?;
    let next_v = ((v * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
    let adjusted = ((&next_m * scale_m)? / (((&next_v * scale_v)?.sqrt()? + p.eps)?))?;
    let next_theta = ((theta * (1f64 - p.lr * p.weight_decay))? - (adjusted * p.lr)?)?;
    Ok((next_theta, next_m, next_v))
}
