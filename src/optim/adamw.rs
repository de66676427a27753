//! [`AdamW`]: a lean AdamW over named variables, with state only for what is trainable.
//!
//! It is the optimizer [`LisaAdamW`](super::LisaAdamW) is built on (LISA adds a block schedule
//! that decides which parameters are trainable), and a plain AdamW of its own: full
//! fine-tuning, or LoRA adapters.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW, VarBuilder, VarMap};

use super::precision::{CompactState, LossScaler, NonFinite};
use super::update::{sum_squares_all, Moments};
use crate::error::{LisaError, Result};
use crate::nn::{LisaBackend, TrainingPlan};

/// How [`AdamW::try_step_with`] (and [`LisaAdamW::try_step_with`](super::LisaAdamW::try_step_with))
/// scales the gradients: inside the fused update, without a copy of any gradient.
///
/// ```
/// use candle_lisa::optim::GradScaling;
/// // Averaging four accumulated micro-batches, and clipping as PyTorch's clip_grad_norm_(1.0).
/// let (mean, clip) = (GradScaling::By(0.25), GradScaling::ClipNorm(1.0));
/// assert_ne!(mean, clip);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum GradScaling {
    /// Every gradient multiplied by this factor (finite and above 0), for example to average
    /// accumulated micro-batches.
    By(f64),
    /// The gradients clipped to a global L2 norm of at most this (finite and above 0): they
    /// are multiplied by `max_norm / (norm + 1e-6)` when the norm exceeds it. The norm comes
    /// from the pass that checks every gradient for NaN and infinity, so clipping costs no
    /// extra read; it is reported by [`AdamW::last_grad_norm`].
    ClipNorm(f64),
}

impl GradScaling {
    /// Itself, refusing a factor or norm that is not finite and positive.
    pub(crate) fn checked(self) -> Result<Self> {
        match self {
            Self::By(s) => positive("grad_scale", s).map(Self::By),
            Self::ClipNorm(max) => positive("max_norm", max).map(Self::ClipNorm),
        }
    }
}

fn positive(name: &'static str, value: f64) -> Result<f64> {
    match value.is_finite() && value > 0.0 {
        true => Ok(value),
        false => Err(LisaError::InvalidHyperparameter {
            name,
            value,
            expected: "finite and greater than 0",
        }),
    }
}

/// A read-only view of one parameter's AdamW state.
///
/// The tensors are the optimizer's own: the fused CPU update writes them in place, so a clone
/// of `m` or `v` (which shares their storage) changes with the next step. Use
/// `Tensor::copy` to keep a snapshot.
#[derive(Clone, Copy, Debug)]
pub struct ParamState<'a> {
    /// First moment.
    pub m: &'a Tensor,
    /// Second moment.
    pub v: &'a Tensor,
    /// The f32 master copy of an f16 or bf16 parameter (`None` for f32 and f64 ones): the
    /// update runs on it and the parameter holds its rounded value.
    pub master: Option<&'a Tensor>,
    /// Updates applied since this state was created (0 right after activation).
    pub step: u64,
}

/// What the checks of a step found, before anything is written.
pub(crate) struct Checked {
    /// `(i, Σ g²)` for every trainable parameter `i` with a gradient.
    pub squares: Vec<(usize, f64)>,
    /// The global gradient norm, the loss scale undone.
    pub norm: f64,
    /// The loss scale the gradients carry (1 without a scaler).
    pub loss_scale: f64,
}

/// AdamW with `candle_nn::AdamW`'s math, over named variables, keeping state only for the
/// parameters that are trainable now.
///
/// The update is `candle_nn::AdamW`'s (decoupled weight decay, bias correction), rounded as
/// candle rounds it, so the results are the same bits for f32 and f64 parameters. f16 and
/// bf16 parameters get an f32 master copy and f32 moments while they train (the
/// [precision policy](crate::optim::precision)). On the CPU and on CUDA (feature `cuda`) the
/// update is fused: one pass per parameter (one kernel launch on CUDA) that reads θ, g, m and
/// v (and the master) once and writes them in place, allocating nothing parameter-sized,
/// with the same bits on both. Elsewhere (Metal) it runs as candle tensor ops on detached
/// tensors, so no temporary is attached to a graph. Before anything is written, every
/// gradient is checked for NaN and infinity, and its global norm computed in the same read.
///
/// Every float parameter is trainable when the optimizer is built. Integer parameters are
/// skipped: never trained, handed out unchanged by the builder.
///
/// **State Reset:** a parameter has moments (and a master copy) exactly while it is
/// trainable. Making it trainable allocates them (zeros, step counter 0, the master copied
/// from its current weights); freezing it drops them. [`LisaAdamW`](super::LisaAdamW) freezes
/// and unfreezes blocks this way, so a block that comes back starts fresh, bias correction
/// included.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{linear, Module, Optimizer, ParamsAdamW, VarBuilder, VarMap};
/// use candle_lisa::optim::AdamW;
///
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let layer = linear(4, 1, vb.pp("layer"))?;
/// let mut opt = AdamW::new(&varmap, ParamsAdamW { lr: 0.1, ..Default::default() })?;
/// let x = Tensor::ones((8, 4), DType::F32, &Device::Cpu)?;
/// // The random initial output is within ±2.5 of 0, so the target is at least 7.5 away.
/// let loss = |layer: &candle_nn::Linear| (layer.forward(&x)? - 10.0)?.sqr()?.mean_all();
/// let first = loss(&layer)?.to_scalar::<f32>()?;
/// for _ in 0..20 {
///     opt.backward_step(&loss(&layer)?)?;
/// }
/// assert!(loss(&layer)?.to_scalar::<f32>()? < first);
/// assert_eq!(opt.state_bytes(), 2 * opt.trainable_bytes()); // m and v, f32
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct AdamW {
    /// Sorted and distinct; `vars[i]` is the parameter named `names[i]`.
    pub(super) names: Vec<String>,
    pub(super) vars: Vec<Var>,
    /// Integer parameters: handed out by the builder, never trained.
    pub(super) skipped: Vec<(String, Var)>,
    /// Invariant: `state[i].is_some()` exactly when parameter `i` is trainable now; only
    /// [`set_trainable`](Self::set_trainable) creates or drops an entry after construction.
    pub(super) state: Vec<Option<Moments>>,
    /// `compact[i]`: parameter `i` keeps bf16 moments while it trains.
    pub(super) compact: Vec<bool>,
    pub(super) params: ParamsAdamW,
    pub(super) scaler: Option<LossScaler>,
    pub(super) nonfinite: NonFinite,
    /// `no_decay[i]`: parameter `i` is updated without weight decay.
    pub(super) no_decay: Vec<bool>,
    /// The global gradient norm of the last step's gradients.
    pub(super) last_grad_norm: Option<f64>,
    /// Steps skipped for a non-finite gradient; they are not counted in `steps`.
    pub(super) skipped_steps: u64,
    pub(super) steps: u64,
}

impl std::fmt::Debug for AdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamW")
            .field("num_params", &self.vars.len())
            .field("steps", &self.steps)
            .field("params", &self.params)
            .field("state_bytes", &self.state_bytes())
            .finish_non_exhaustive()
    }
}

pub(super) fn check_params(p: &ParamsAdamW) -> Result<()> {
    if !p.lr.is_finite() {
        return Err(LisaError::NonFiniteLearningRate { lr: p.lr });
    }
    let bad = |name, value, expected| LisaError::InvalidHyperparameter {
        name,
        value,
        expected,
    };
    if !(0.0..1.0).contains(&p.beta1) {
        return Err(bad("beta1", p.beta1, "in [0, 1)"));
    }
    if !(0.0..1.0).contains(&p.beta2) {
        return Err(bad("beta2", p.beta2, "in [0, 1)"));
    }
    if !(p.eps.is_finite() && p.eps > 0.0) {
        return Err(bad("eps", p.eps, "finite and greater than 0"));
    }
    if !p.weight_decay.is_finite() {
        return Err(bad("weight_decay", p.weight_decay, "finite"));
    }
    Ok(())
}

impl AdamW {
    /// AdamW over every float variable in `varmap`, all trainable.
    ///
    /// # Errors
    /// [`LisaError::NonFiniteLearningRate`] or [`LisaError::InvalidHyperparameter`] for bad
    /// `params`, [`LisaError::EmptyVarMap`] when there is no float variable.
    ///
    /// Cost: AdamW moments for every float parameter (2× the parameter bytes for f32 and
    /// f64), plus f32 master copies for f16 and bf16 (12 bytes per parameter in all).
    ///
    /// On a CUDA device this also makes the device's memory pool keep freed memory for
    /// reuse ([`keep_freed_memory`](crate::nn::pool::keep_freed_memory)).
    pub fn new(varmap: &VarMap, params: ParamsAdamW) -> Result<Self> {
        Self::from_named_vars(crate::nn::named_vars(varmap)?, params)
    }

    /// AdamW over named variables, for models whose variables do not live in a `VarMap`.
    /// Same errors and costs as [`new`](Self::new).
    pub fn from_named_vars(
        vars: impl IntoIterator<Item = (String, Var)>,
        params: ParamsAdamW,
    ) -> Result<Self> {
        let mut opt = Self::frozen(vars, params)?;
        for i in 0..opt.vars.len() {
            opt.set_trainable(i, true)?;
        }
        Ok(opt)
    }

    /// The optimizer over `vars` with every parameter frozen (no state yet).
    pub(super) fn frozen(
        vars: impl IntoIterator<Item = (String, Var)>,
        params: ParamsAdamW,
    ) -> Result<Self> {
        check_params(&params)?;
        let (floats, skipped): (Vec<_>, Vec<_>) =
            vars.into_iter().partition(|(_, v)| v.dtype().is_float());
        let mut floats: Vec<(String, Var)> = floats
            .into_iter()
            .collect::<HashMap<_, _>>()
            .into_iter()
            .collect();
        floats.sort_by(|a, b| a.0.cmp(&b.0));
        if floats.is_empty() {
            return Err(LisaError::EmptyVarMap);
        }
        let (names, vars): (Vec<_>, Vec<_>) = floats.into_iter().unzip();
        // Without this a CUDA step remaps its temporaries after every synchronisation.
        crate::nn::pool::keep_freed_memory(vars[0].device(), true)?;
        Ok(Self {
            state: (0..vars.len()).map(|_| None).collect(),
            compact: vec![false; vars.len()],
            no_decay: Vec::new(),
            names,
            vars,
            skipped,
            params,
            scaler: None,
            nonfinite: NonFinite::Error,
            last_grad_norm: None,
            skipped_steps: 0,
            steps: 0,
        })
    }

    /// Makes parameter `i` (in name order) trainable, with fresh state, or frozen, dropping
    /// its state; nothing changes when it already is.
    pub(super) fn set_trainable(&mut self, i: usize, on: bool) -> Result<()> {
        match (on, self.state[i].is_some()) {
            (true, false) => {
                let theta = self.vars[i].as_tensor();
                self.state[i] = Some(Moments::new(theta, self.compact[i], i as u64)?);
            }
            (false, true) => self.state[i] = None,
            _ => {}
        }
        Ok(())
    }

    /// The index of `name` in name order.
    pub(super) fn index_of(&self, name: &str) -> Option<usize> {
        self.names.binary_search_by(|n| n.as_str().cmp(name)).ok()
    }

    /// Keeps the moments of the parameters `compact` marks in bf16 from now on (held moments
    /// are converted), after checking that every parameter is on the CPU.
    pub(super) fn set_compact_mask(
        &mut self,
        what: CompactState,
        compact: Vec<bool>,
    ) -> Result<()> {
        if what != CompactState::Off {
            if let Some(var) = self.vars.iter().find(|v| !v.device().is_cpu()) {
                return Err(LisaError::InvalidArgument {
                    what: "compact state",
                    reason: format!(
                        "compact optimizer state ({what:?}) is updated on the CPU only for now, \
                         and a parameter is on {:?}: keep CompactState::Off there",
                        var.device()
                    ),
                });
            }
        }
        self.compact = compact;
        for (i, st) in self.state.iter_mut().enumerate() {
            if let Some(st) = st.as_mut() {
                st.set_compact(self.vars[i].as_tensor(), self.compact[i])?;
            }
        }
        Ok(())
    }

    /// Keeps the AdamW moments in bf16 from now on, with stochastic rounding (see
    /// [compact state](crate::optim::precision#compact-state)): 4 bytes of state per f32
    /// parameter instead of 8. Every parameter of a plain AdamW is always trainable, so
    /// [`CompactState::AlwaysTrainable`] means the same as [`CompactState::All`].
    ///
    /// # Errors
    /// [`LisaError::InvalidArgument`] when a parameter is not on the CPU (the CUDA and Metal
    /// updates keep f32 moments); nothing is changed then.
    pub fn set_compact_state(&mut self, compact: CompactState) -> Result<()> {
        let on = compact != CompactState::Off;
        self.set_compact_mask(compact, vec![on; self.vars.len()])
    }

    /// Checks the hyper-parameters and `grads` against the trainable parameters, reads every
    /// gradient once (finiteness, the global norm) and decides what a non-finite gradient
    /// does. `Ok(None)`: the step is skipped (counted, the loss scaler backed off), nothing
    /// else written. Errors leave everything but [`last_grad_norm`](Self::last_grad_norm) as
    /// it was.
    pub(crate) fn check(&mut self, grads: &GradStore) -> Result<Option<Checked>> {
        check_params(&self.params)?;
        for (i, var) in self.vars.iter().enumerate() {
            if self.state[i].is_none() {
                continue;
            }
            if let Some(g) = grads.get(var.as_tensor()) {
                if g.shape() != var.shape() || g.dtype() != var.dtype() {
                    return Err(LisaError::GradientMismatch {
                        name: self.names[i].clone(),
                        expected: var.shape().clone(),
                        got: g.shape().clone(),
                        expected_dtype: var.dtype(),
                        got_dtype: g.dtype(),
                    });
                }
            }
        }
        let squares = self.grad_squares(grads)?;
        let loss_scale = self.loss_scale();
        let norm = squares.iter().map(|(_, sq)| sq).sum::<f64>().sqrt() / loss_scale;
        self.last_grad_norm = Some(norm);
        if norm.is_finite() {
            return Ok(Some(Checked {
                squares,
                norm,
                loss_scale,
            }));
        }
        let bad = squares.iter().find(|(_, sq)| !sq.is_finite());
        let name = bad
            .map_or("?", |&(i, _)| self.names[i].as_str())
            .to_string();
        if let Some(scaler) = self.scaler.as_mut() {
            scaler.back_off();
        } else if self.nonfinite == NonFinite::Error {
            return Err(LisaError::NonFiniteGradient { name });
        }
        self.skipped_steps += 1;
        Ok(None)
    }

    /// Updates every trainable parameter that has a gradient in `grads`, as `check` found
    /// them, scaled by `scale`; counts the step.
    pub(crate) fn apply(
        &mut self,
        grads: &GradStore,
        checked: &Checked,
        scale: GradScaling,
    ) -> Result<()> {
        let grad_scale = match scale {
            GradScaling::By(s) => s,
            GradScaling::ClipNorm(max) if checked.norm > max => max / (checked.norm + 1e-6),
            GradScaling::ClipNorm(_) => 1.0,
        };
        let inv_scale = grad_scale / checked.loss_scale;
        let no_decay = ParamsAdamW {
            weight_decay: 0.0,
            ..self.params.clone()
        };
        for (i, (var, state)) in self.vars.iter().zip(self.state.iter_mut()).enumerate() {
            let (Some(st), Some(g)) = (state.as_mut(), grads.get(var.as_tensor())) else {
                continue;
            };
            let params = match self.no_decay.get(i) {
                Some(true) => &no_decay,
                _ => &self.params,
            };
            st.update(params, var, g, inv_scale)?;
        }
        if let Some(scaler) = self.scaler.as_mut() {
            scaler.clean_step();
        }
        self.steps += 1;
        Ok(())
    }

    fn step_with(&mut self, grads: &GradStore, scale: GradScaling) -> Result<()> {
        let scale = scale.checked()?;
        match self.check(grads)? {
            Some(checked) => self.apply(grads, &checked, scale),
            None => Ok(()),
        }
    }

    /// One optimizer step with a typed error; [`Optimizer::step`] calls this.
    ///
    /// Updates every trainable parameter that has a gradient in `grads`. With a
    /// [`LossScaler`] set, `grads` must be those of the scaled loss
    /// ([`scale_loss`](Self::scale_loss); `backward_step` does this). A gradient holding NaN
    /// or infinity skips the step or fails, as the [precision policy](crate::optim::precision)
    /// says; a skipped step writes nothing and is not counted in
    /// [`step_count`](Self::step_count).
    ///
    /// # Errors
    /// [`LisaError::NonFiniteLearningRate`], [`LisaError::GradientMismatch`] and
    /// [`LisaError::NonFiniteGradient`] are detected before anything is written. A candle
    /// error during the update itself (out of memory) can leave it half applied.
    pub fn try_step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_with(grads, GradScaling::By(1.0))
    }

    /// [`try_step`](Self::try_step) with the gradients scaled or clipped inside the update
    /// ([`GradScaling`]).
    ///
    /// # Errors
    /// Those of [`try_step`](Self::try_step), and [`LisaError::InvalidHyperparameter`] for a
    /// factor or norm that is not finite and positive.
    pub fn try_step_with(&mut self, grads: &GradStore, scaling: GradScaling) -> Result<()> {
        self.step_with(grads, scaling)
    }

    /// `(i, Σ g²)` for every trainable parameter `i` with a gradient in `grads`, in f64: NaN
    /// or infinite exactly when the gradient holds NaN or infinity.
    fn grad_squares(&self, grads: &GradStore) -> Result<Vec<(usize, f64)>> {
        let mut index = Vec::new();
        let mut tensors = Vec::new();
        for (i, var) in self.vars.iter().enumerate() {
            if self.state[i].is_none() {
                continue;
            }
            if let Some(g) = grads.get(var.as_tensor()) {
                index.push(i);
                tensors.push(g);
            }
        }
        Ok(index.into_iter().zip(sum_squares_all(&tensors)?).collect())
    }

    fn loss_scale(&self) -> f64 {
        self.scaler.as_ref().map_or(1.0, |s| s.scale())
    }

    /// The global L2 norm of the gradients the last step read (the loss scale undone, before
    /// clipping; NaN or infinite for a step skipped for a non-finite gradient); `None` before
    /// the first step.
    pub fn last_grad_norm(&self) -> Option<f64> {
        self.last_grad_norm
    }

    /// The global L2 norm of the trainable parameters' gradients in `grads`, as the loss
    /// itself would give them (divided by the loss scale when a [`LossScaler`] is set); NaN or
    /// infinite when a gradient is. One read of each gradient.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let sum: f64 = self.grad_squares(grads)?.iter().map(|(_, sq)| sq).sum();
        Ok(sum.sqrt() / self.loss_scale())
    }

    /// Every float parameter the optimizer was built over, with its name, sorted by name.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.names.iter().map(String::as_str).zip(&self.vars)
    }

    /// The parameters trainable now, with their names, sorted by name.
    pub fn trainable_vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.vars()
            .zip(&self.state)
            .filter(|(_, s)| s.is_some())
            .map(|(v, _)| v)
    }

    /// Excludes from weight decay every parameter for which `exclude(name, dims)` is true (by
    /// default none is excluded; [`no_decay_default`](crate::optim::no_decay_default) is the
    /// transformers convention). Applies to the next step on; moments are unchanged.
    pub fn set_weight_decay_filter(&mut self, exclude: impl Fn(&str, &[usize]) -> bool) {
        self.no_decay = self.vars().map(|(n, v)| exclude(n, v.dims())).collect();
    }

    /// Whether `name` is updated without weight decay ([`set_weight_decay_filter`](Self::set_weight_decay_filter)).
    pub fn excluded_from_weight_decay(&self, name: &str) -> bool {
        self.index_of(name)
            .is_some_and(|i| self.no_decay.get(i).copied().unwrap_or(false))
    }

    /// `loss` multiplied by the loss scale, or `loss` itself without a [`LossScaler`]: call
    /// `backward` on this when you do not use `backward_step`.
    pub fn scale_loss(&self, loss: &Tensor) -> candle_core::Result<Tensor> {
        match &self.scaler {
            Some(s) => loss.affine(s.scale(), 0.0),
            None => Ok(loss.clone()),
        }
    }

    /// Sets or removes dynamic loss scaling (for f16 training; see
    /// [`LossScaler`]). With a scaler, gradients passed to [`step`](Optimizer::step) must be
    /// those of [`scale_loss`](Self::scale_loss); `backward_step` takes care of it.
    pub fn set_loss_scaler(&mut self, scaler: Option<LossScaler>) {
        self.scaler = scaler;
    }

    /// The loss scaler, if one is set.
    pub fn loss_scaler(&self) -> Option<&LossScaler> {
        self.scaler.as_ref()
    }

    /// What a NaN or infinite gradient does when no loss scaler is set (default
    /// [`NonFinite::Error`]).
    pub fn set_non_finite(&mut self, policy: NonFinite) {
        self.nonfinite = policy;
    }

    /// Steps skipped so far because a gradient was not finite.
    pub fn skipped_steps(&self) -> u64 {
        self.skipped_steps
    }

    /// Steps taken so far (skipped ones not counted).
    pub fn step_count(&self) -> u64 {
        self.steps
    }

    /// A `VarBuilder` for (re)building the model: trainable parameters as the variables' own
    /// tensors, frozen ones as detached views of the same storage (no copy). Its dtype and
    /// device are those of the first parameter by name. Asking it for a trainable parameter in
    /// another dtype or on another device fails with [`LisaError::TrainableConversion`] (a
    /// converted copy would never be updated); frozen ones are converted (a copy).
    pub fn var_builder(&self) -> VarBuilder<'static> {
        let mut tensors = HashMap::with_capacity(self.vars.len() + self.skipped.len());
        for (i, var) in self.vars.iter().enumerate() {
            let t = match self.state[i].is_some() {
                true => var.as_tensor().clone(),
                false => var.as_tensor().detach(),
            };
            tensors.insert(self.names[i].clone(), t);
        }
        for (name, var) in &self.skipped {
            tensors.insert(name.clone(), var.as_tensor().detach());
        }
        LisaBackend { tensors }.into_builder(self.vars.first())
    }

    /// The [`TrainingPlan`] to build a model from: [`var_builder`](Self::var_builder), no
    /// block recomputed.
    pub fn plan(&self) -> TrainingPlan {
        TrainingPlan::new(self.var_builder(), false)
    }

    /// Bytes of optimizer state held now: AdamW moments and, for half-precision parameters,
    /// f32 master copies. Per trainable parameter that is 8 bytes in f32, 16 in f64 and 12
    /// in f16 or bf16 (see the [precision policy](crate::optim::precision)); so exactly
    /// 2 × [`trainable_bytes`](Self::trainable_bytes) when every parameter is f32 or f64.
    /// With [compact state](Self::set_compact_state), 4 in f32 and 8 in f16 or bf16.
    pub fn state_bytes(&self) -> usize {
        self.state.iter().flatten().map(Moments::bytes).sum()
    }

    /// Bytes of the parameters trainable now.
    pub fn trainable_bytes(&self) -> usize {
        self.trainable_vars()
            .map(|(_, v)| v.elem_count() * v.dtype().size_in_bytes())
            .sum()
    }

    /// Number of scalars trainable now.
    pub fn trainable_params(&self) -> usize {
        self.trainable_vars().map(|(_, v)| v.elem_count()).sum()
    }

    /// Whether the parameter `name` is trainable now (false for unknown names).
    pub fn is_trainable(&self, name: &str) -> bool {
        self.index_of(name).is_some_and(|i| self.state[i].is_some())
    }

    /// The AdamW state of `name`, or `None` when it is frozen or unknown.
    pub fn param_state(&self, name: &str) -> Option<ParamState<'_>> {
        let st = self.state[self.index_of(name)?].as_ref()?;
        Some(ParamState {
            m: &st.m,
            v: &st.v,
            master: st.master.as_ref(),
            step: st.step,
        })
    }

    /// The AdamW hyper-parameters.
    pub fn params(&self) -> &ParamsAdamW {
        &self.params
    }

    /// Replaces the AdamW hyper-parameters.
    ///
    /// # Errors
    /// [`LisaError::NonFiniteLearningRate`] or [`LisaError::InvalidHyperparameter`]; the old
    /// ones are kept then.
    pub fn set_params(&mut self, params: ParamsAdamW) -> Result<()> {
        check_params(&params)?;
        self.params = params;
        Ok(())
    }

    /// Sets the learning rate, refusing a non-finite one with
    /// [`LisaError::NonFiniteLearningRate`] (the old rate is kept then).
    pub fn try_set_learning_rate(&mut self, lr: f64) -> Result<()> {
        self.set_params(ParamsAdamW {
            lr,
            ..self.params.clone()
        })
    }
}

impl Optimizer for AdamW {
    type Config = ParamsAdamW;

    /// AdamW over `vars`, named by their position (`"0"`, `"1"`, …), all trainable.
    fn new(vars: Vec<Var>, params: ParamsAdamW) -> candle_core::Result<Self> {
        let width = vars.len().to_string().len();
        let named = vars
            .into_iter()
            .enumerate()
            .map(|(i, v)| (format!("{i:0width$}"), v));
        Ok(Self::from_named_vars(named, params)?)
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        Ok(self.try_step(grads)?)
    }

    /// `loss` scaled by the [`LossScaler`] if one is set, backward, then
    /// [`step`](Optimizer::step).
    fn backward_step(&mut self, loss: &Tensor) -> candle_core::Result<()> {
        let grads = self.scale_loss(loss)?.backward()?;
        self.step(&grads)
    }

    fn learning_rate(&self) -> f64 {
        self.params.lr
    }

    /// Sets the learning rate. A non-finite rate is stored as given and makes the next
    /// [`step`](Optimizer::step) fail with [`LisaError::NonFiniteLearningRate`], writing
    /// nothing; [`AdamW::try_set_learning_rate`] refuses it at once instead.
    fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
    }
}
