//! The precision policy: what the optimizer keeps for each parameter dtype, loss scaling for
//! f16, and what a non-finite gradient does.
//!
//! # Per-parameter state, by dtype
//!
//! | parameter dtype | state while trainable | bytes per trainable parameter | frozen |
//! |---|---|---|---|
//! | f32 | m, v in f32 | 8 | nothing |
//! | f64 | m, v in f64 | 16 | nothing |
//! | bf16, f16 | f32 master copy, m, v in f32 | 12 | nothing |
//!
//! Half precision cannot carry AdamW: in bf16, β₂ = 0.999 and 1 − lr·wd round to 1, and an
//! update of 5e-5 is less than half a step of every weight with |θ| ≥ 2⁻⁶, so it is lost; in
//! f16, ε = 1e-8 rounds to 0. So for an f16 or bf16 parameter the optimizer keeps an f32
//! master copy and f32 moments while the parameter trains, runs the update in f32 on the
//! master, and writes the result rounded to nearest-even into the half-precision weight. The
//! master is made from the half-precision weight when its block is activated, and dropped with
//! the moments when the block is frozen, so a frozen block costs only its half-precision
//! weights. f32 and f64 parameters are updated in place, with the same bits as
//! `candle_nn::AdamW`.
//!
//! # Compact state
//!
//! [`LisaAdamW::set_compact_state`](crate::LisaAdamW::set_compact_state) keeps m and v in
//! bf16 instead, for the always-trainable parameters (embedding, head, final norm: under LISA
//! the largest state, held for the whole run) or for every trainable one:
//!
//! | parameter dtype | compact state while trainable | bytes per trainable parameter |
//! |---|---|---|
//! | f32 | m, v in bf16 | 4 (instead of 8) |
//! | bf16, f16 | f32 master copy, m, v in bf16 | 8 (instead of 12) |
//! | f64 | unchanged: m, v in f64 | 16 |
//!
//! The update is the same fused pass: each element's m and v are widened to f32, updated as
//! in f32, and stored back with stochastic rounding, up or down to the neighbouring bf16 values
//! with the probabilities that make the stored value right on average. Rounding to nearest
//! would stall the second moment, whose decay by β₂ = 0.999 is below half a bf16 step. The
//! random bits are a hash of the parameter's index, the element's index and the step, so a run
//! is deterministic whatever the thread count. The weights and master copies stay exact, so
//! the trajectory departs from the f32 one only by the moments' rounding (docs/custom-models.md gives the
//! measured gap). It runs on the CPU only: the CUDA kernel keeps f32 moments.
//!
//! # Non-finite gradients
//!
//! Before anything is written, every gradient the step would use is checked. A NaN or an
//! infinity then
//! - with a [`LossScaler`] set: skips the step (nothing written, the step counter unchanged),
//!   halves the scale and counts the step in
//!   [`skipped_steps`](crate::LisaAdamW::skipped_steps);
//! - else with [`NonFinite::Skip`]: skips the step and counts it the same way;
//! - else ([`NonFinite::Error`], the default): fails with
//!   [`LisaError::NonFiniteGradient`], nothing written.
//!
//! bf16 has f32's range and needs no loss scaling; f16 does (its largest value is 65504 and
//! small gradients underflow to zero).

use crate::error::{LisaError, Result};

/// Which trainable parameters keep their AdamW moments in bf16 (see
/// [compact state](self#compact-state)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CompactState {
    /// Moments in f32 (f64 for f64 parameters): the default.
    #[default]
    Off,
    /// bf16 moments for the always-trainable parameters (under LISA: embedding, head and
    /// final norm; in full fine-tuning and LoRA every parameter is always trainable).
    AlwaysTrainable,
    /// bf16 moments for every trainable parameter.
    All,
}

impl std::str::FromStr for CompactState {
    type Err = LisaError;

    /// `off`, `always` ([`AlwaysTrainable`](Self::AlwaysTrainable)) or `all`, as the
    /// `finetune` example's `--compact-state` takes them.
    ///
    /// ```
    /// use candle_lisa::optim::CompactState;
    /// assert_eq!("always".parse::<CompactState>()?, CompactState::AlwaysTrainable);
    /// assert!("half".parse::<CompactState>().is_err());
    /// # Ok::<(), candle_lisa::LisaError>(())
    /// ```
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "off" => Ok(Self::Off),
            "always" => Ok(Self::AlwaysTrainable),
            "all" => Ok(Self::All),
            _ => Err(LisaError::InvalidArgument {
                what: "compact state",
                reason: format!("{s:?}: use off, always or all"),
            }),
        }
    }
}

/// What a step does with a NaN or infinite gradient when no [`LossScaler`] is set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NonFinite {
    /// Fail with [`LisaError::NonFiniteGradient`], writing nothing (the default).
    #[default]
    Error,
    /// Skip the step, writing nothing, and count it.
    Skip,
}

/// Dynamic loss scaling for f16 training, as PyTorch's `GradScaler`.
///
/// [`LisaAdamW::backward_step`](candle_nn::Optimizer::backward_step) multiplies the loss by
/// [`scale`](Self::scale) before the backward pass, so that small gradients survive in f16,
/// and the update divides the gradients by it again. A step whose gradients hold a NaN or an
/// infinity is skipped and the scale multiplied by `backoff_factor`; after `growth_interval`
/// clean steps in a row it is multiplied by `growth_factor`.
///
/// ```
/// use candle_lisa::optim::LossScaler;
/// let s = LossScaler::default();
/// assert_eq!(s.scale(), 65536.0);
/// let s = LossScaler::new(1024.0, 2.0, 0.5, 100)?;
/// assert_eq!(s.scale(), 1024.0);
/// # Ok::<(), candle_lisa::LisaError>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct LossScaler {
    scale: f64,
    growth_factor: f64,
    backoff_factor: f64,
    growth_interval: u64,
    /// Clean steps since the scale last changed; reaches `growth_interval` at most.
    clean_steps: u64,
}

impl Default for LossScaler {
    /// PyTorch's defaults: scale 2¹⁶, growth 2, backoff 0.5, growth interval 2000.
    fn default() -> Self {
        Self {
            scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            clean_steps: 0,
        }
    }
}

impl LossScaler {
    /// A scaler starting at `scale`.
    ///
    /// # Errors
    /// [`LisaError::InvalidHyperparameter`] unless `scale` is finite and positive,
    /// `growth_factor` > 1, `backoff_factor` in (0, 1) and `growth_interval` ≥ 1.
    pub fn new(
        scale: f64,
        growth_factor: f64,
        backoff_factor: f64,
        growth_interval: u64,
    ) -> Result<Self> {
        let bad = |name, value, expected| LisaError::InvalidHyperparameter {
            name,
            value,
            expected,
        };
        if !(scale.is_finite() && scale > 0.0) {
            return Err(bad("scale", scale, "finite and greater than 0"));
        }
        if !(growth_factor.is_finite() && growth_factor > 1.0) {
            return Err(bad(
                "growth_factor",
                growth_factor,
                "finite and greater than 1",
            ));
        }
        if !(backoff_factor > 0.0 && backoff_factor < 1.0) {
            return Err(bad("backoff_factor", backoff_factor, "in (0, 1)"));
        }
        if growth_interval == 0 {
            return Err(bad("growth_interval", 0.0, "at least 1"));
        }
        Ok(Self {
            scale,
            growth_factor,
            backoff_factor,
            growth_interval,
            clean_steps: 0,
        })
    }

    /// The factor the loss is multiplied by now.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Clean steps since the scale last changed.
    pub fn clean_steps(&self) -> u64 {
        self.clean_steps
    }

    /// After a skipped step: a smaller scale, and the clean-step count starts again.
    pub(crate) fn back_off(&mut self) {
        self.scale *= self.backoff_factor;
        self.clean_steps = 0;
    }

    /// After a clean step: counts it, and grows the scale after `growth_interval` of them
    /// (unless that would overflow).
    pub(crate) fn clean_step(&mut self) {
        self.clean_steps += 1;
        if self.clean_steps >= self.growth_interval {
            let grown = self.scale * self.growth_factor;
            if grown.is_finite() {
                self.scale = grown;
            }
            self.clean_steps = 0;
        }
    }

    /// The saved form, for optimizer state files.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "scale": self.scale,
            "growth_factor": self.growth_factor,
            "backoff_factor": self.backoff_factor,
            "growth_interval": self.growth_interval,
            "clean_steps": self.clean_steps,
        })
    }

    /// Reads [`to_json`](Self::to_json)'s form; `Err` says what is missing or invalid.
    pub(crate) fn from_json(v: &serde_json::Value) -> std::result::Result<Self, String> {
        let f = |k: &str| v[k].as_f64().ok_or_else(|| format!("no number {k}"));
        let u = |k: &str| v[k].as_u64().ok_or_else(|| format!("no integer {k}"));
        let mut s = Self::new(
            f("scale")?,
            f("growth_factor")?,
            f("backoff_factor")?,
            u("growth_interval")?,
        )
        .map_err(|e| e.to_string())?;
        s.clean_steps = u("clean_steps")?;
        Ok(s)
    }
}
