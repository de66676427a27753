//! [`LisaAdamW`]: AdamW over the always-trainable parameters and γ sampled blocks.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW, VarBuilder, VarMap};

use super::adamw::{sum_squares, Moments};
use super::config::LisaConfig;
use super::layer_map::{LayerMap, ParamGroup};
use super::precision::{CompactState, LossScaler, NonFinite};
use super::sampler::BlockSampler;
use crate::error::{LisaError, Result};
use crate::nn::{LisaBackend, TrainingPlan};

/// The configuration type of [`LisaAdamW`]'s [`Optimizer`] implementation.
///
/// `Optimizer::new` receives variables without names and so cannot build a `LisaAdamW`; it
/// returns [`LisaError::UnnamedVars`]. Use [`LisaAdamW::new`] instead.
#[derive(Clone, Debug, Default)]
pub struct LisaParams {
    /// AdamW hyper-parameters.
    pub adamw: ParamsAdamW,
    /// LISA settings.
    pub lisa: LisaConfig,
}

/// What a [`LisaAdamW`] trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Every float parameter at every step: plain AdamW, for full fine-tuning or for LoRA
    /// adapters ([`LisaAdamW::all_trainable`]).
    Full,
    /// LISA: the always-trainable parameters at every step, and `gamma` blocks redrawn every
    /// `period` steps ([`LisaAdamW::new`]).
    Lisa {
        /// γ, the number of blocks trainable at a time.
        gamma: usize,
        /// K, the number of steps between two draws.
        period: usize,
    },
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mode::Full => write!(f, "full fine-tuning"),
            Mode::Lisa { gamma, period } => {
                write!(f, "LISA with gamma {gamma} and period {period}")
            }
        }
    }
}

/// How a step scales the gradients inside the update.
#[derive(Clone, Copy, Debug)]
enum GradScale {
    /// By this factor.
    Fixed(f64),
    /// To a global norm of at most this.
    ClipTo(f64),
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

/// Layerwise Importance Sampled AdamW.
///
/// Every `period` steps it draws γ blocks to train; the parameters outside the blocks (embedding,
/// LM head, final norm) train at every step. The update is `candle_nn::AdamW`'s math (decoupled
/// weight decay, bias correction), rounded as candle rounds it, so the results are the same
/// bits for f32 and f64 parameters. f16 and bf16 parameters get an f32 master copy and f32
/// moments while they train (the [precision policy](crate::optim::precision)). On the CPU and
/// on CUDA (feature `cuda`) the update is fused: one pass per parameter (one kernel launch on
/// CUDA) that reads θ, g, m and v (and the master) once and writes them in place, allocating
/// nothing parameter-sized, with the same bits on both. Elsewhere (Metal) it runs as candle
/// tensor ops on detached tensors, so no temporary is attached to a graph. Before anything is
/// written, every gradient is checked for NaN and infinity.
///
/// **State Reset:** AdamW moments (and master copies) exist only for parameters that are
/// trainable now. A block's moments are allocated (zeros, step counter 0, and for half
/// precision a master copy of its current weights) when a draw activates it and dropped when
/// a draw leaves it out; a block drawn in two periods in a row keeps its moments. A block that
/// comes back later therefore starts fresh, bias correction included. Always-trainable
/// parameters keep their moments for the whole run.
///
/// **Rebuilding the model:** build the model from [`var_builder`](Self::var_builder), which
/// hands out trainable parameters as tracked tensors and frozen ones as detached views of the
/// same storage. Rebuild it after every step where [`resampled`](Self::resampled) is true (no
/// data is copied). With [`Linear`](crate::Linear) for projections, frozen blocks then compute
/// and store no weight gradient. A model built straight from the `VarMap` ("drop-in") also
/// trains correctly, since only active blocks and always-trainable parameters are written, but
/// candle computes and stores a gradient for every weight of it, so it uses about as much
/// memory for gradients as full fine-tuning. If an active block gets no gradient at all (a
/// model built before the last resample), [`step`](Optimizer::step) fails with
/// [`LisaError::NoGradient`] and writes nothing.
///
/// Integer parameters are skipped: never trained, handed out unchanged by the builder.
/// Parameters added to the `VarMap` after the optimizer was built are not seen by it.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{Optimizer, ParamsAdamW, VarMap};
/// use candle_lisa::{LisaAdamW, LisaConfig};
///
/// let varmap = VarMap::new();
/// let dev = Device::Cpu;
/// for name in ["model.embed_tokens.weight", "model.layers.0.w", "model.layers.1.w", "model.layers.2.w"] {
///     varmap.data().lock().unwrap().insert(name.into(), candle_core::Var::ones(4, DType::F32, &dev)?);
/// }
/// let config = LisaConfig { gamma: 1, period: 3, seed: 1, ..Default::default() };
/// let opt = LisaAdamW::new(&varmap, ParamsAdamW::default(), config)?;
/// assert_eq!(opt.num_blocks(), 3);
/// assert_eq!(opt.active_blocks().len(), 1);
/// // Moments (m and v, f32) for the embedding and one block.
/// assert_eq!(opt.state_bytes(), 2 * 2 * 4 * 4);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct LisaAdamW {
    pub(super) map: LayerMap,
    /// `vars[i]` is the parameter named `map.name_at(i)`.
    pub(super) vars: Vec<Var>,
    /// Integer parameters: handed out by the builder, never trained.
    pub(super) skipped: Vec<(String, Var)>,
    /// Invariant: `state[i].is_some()` exactly when parameter `i` is trainable now, that is its
    /// group is `Always`, or `Block(b)` with `b` in `active`.
    pub(super) state: Vec<Option<Moments>>,
    /// Sorted: `gamma` distinct indices below `map.num_blocks()` in [`Mode::Lisa`], empty in
    /// [`Mode::Full`] (whose map has no blocks).
    pub(super) active: Vec<usize>,
    /// `Some` exactly in [`Mode::Lisa`].
    pub(super) sampler: Option<Box<dyn BlockSampler>>,
    pub(super) params: ParamsAdamW,
    pub(super) mode: Mode,
    pub(super) recompute_frozen: bool,
    /// Which trainable parameters' moments are bf16 ([`Moments::is_compact`]).
    pub(super) compact: CompactState,
    pub(super) scaler: Option<LossScaler>,
    pub(super) nonfinite: NonFinite,
    /// `no_decay[i]`: parameter `i` is updated without weight decay.
    pub(super) no_decay: Vec<bool>,
    /// The global gradient norm of the last step's gradients.
    pub(super) last_grad_norm: Option<f64>,
    /// Steps skipped for a non-finite gradient; they are not counted in `steps`.
    pub(super) skipped_steps: u64,
    pub(super) steps: u64,
    pub(super) period_index: u64,
    pub(super) resampled: bool,
}

impl std::fmt::Debug for LisaAdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LisaAdamW")
            .field("num_blocks", &self.map.num_blocks())
            .field("active", &self.active)
            .field("mode", &self.mode)
            .field("steps", &self.steps)
            .field("params", &self.params)
            .field("state_bytes", &self.state_bytes())
            .finish_non_exhaustive()
    }
}

/// Float parameters by name, and the integer ones (skipped).
fn split_vars(
    vars: impl IntoIterator<Item = (String, Var)>,
) -> (HashMap<String, Var>, Vec<(String, Var)>) {
    let (floats, skipped): (Vec<_>, Vec<_>) =
        vars.into_iter().partition(|(_, v)| v.dtype().is_float());
    (floats.into_iter().collect(), skipped)
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

impl LisaAdamW {
    /// Builds the optimizer over every variable in `varmap`, drawing the first active blocks
    /// with the sampler `config.sampler` names, seeded by `config.seed`.
    ///
    /// # Errors
    /// Every configuration error of [`LisaError`]; nothing is built then.
    ///
    /// Cost: allocates optimizer state for the always-trainable parameters and the γ active
    /// blocks only: AdamW moments (2× the parameter bytes for f32 and f64), plus f32 master
    /// copies for f16 and bf16 (12 bytes per parameter in all; see the
    /// [precision policy](crate::optim::precision)).
    pub fn new(varmap: &VarMap, params: ParamsAdamW, config: LisaConfig) -> Result<Self> {
        let vars = crate::nn::named_vars(varmap)?;
        Self::from_named_vars(vars, params, config)
    }

    /// Builds the optimizer over named variables, for models whose variables do not live in a
    /// `VarMap`. Same errors and costs as [`new`](Self::new).
    pub fn from_named_vars(
        vars: impl IntoIterator<Item = (String, Var)>,
        params: ParamsAdamW,
        config: LisaConfig,
    ) -> Result<Self> {
        let sampler = config.sampler.build(config.seed)?;
        Self::with_sampler(vars, params, config, sampler)
    }

    /// Like [`from_named_vars`](Self::from_named_vars), drawing blocks with `sampler` instead
    /// of the one `config` names (`config.seed` and `config.sampler` are then unused).
    pub fn with_sampler(
        vars: impl IntoIterator<Item = (String, Var)>,
        params: ParamsAdamW,
        config: LisaConfig,
        sampler: Box<dyn BlockSampler>,
    ) -> Result<Self> {
        check_params(&params)?;
        if config.period == 0 {
            return Err(LisaError::ZeroPeriod);
        }
        let (by_name, skipped) = split_vars(vars);
        let map = LayerMap::new(by_name.keys(), &config)?;
        if config.gamma == 0 || config.gamma > map.num_blocks() {
            return Err(LisaError::InvalidGamma {
                gamma: config.gamma,
                num_blocks: map.num_blocks(),
            });
        }
        let mode = Mode::Lisa {
            gamma: config.gamma,
            period: config.period,
        };
        let mut opt = Self::build(map, by_name, skipped, params, mode, Some(sampler))?;
        opt.recompute_frozen = config.recompute_frozen;
        Ok(opt)
    }

    /// Plain AdamW over every float parameter ([`Mode::Full`]), with this optimizer's lean
    /// update and state accounting: the "full fine-tuning" baseline (also used for LoRA
    /// adapters). It has no blocks and never resamples.
    pub fn all_trainable(
        vars: impl IntoIterator<Item = (String, Var)>,
        params: ParamsAdamW,
    ) -> Result<Self> {
        check_params(&params)?;
        let (by_name, skipped) = split_vars(vars);
        let map = LayerMap::all_trainable(by_name.keys())?;
        Self::build(map, by_name, skipped, params, Mode::Full, None)
    }

    fn build(
        map: LayerMap,
        mut by_name: HashMap<String, Var>,
        skipped: Vec<(String, Var)>,
        params: ParamsAdamW,
        mode: Mode,
        sampler: Option<Box<dyn BlockSampler>>,
    ) -> Result<Self> {
        let vars = map
            .iter()
            .map(|(name, _)| by_name.remove(name).ok_or(LisaError::EmptyVarMap))
            .collect::<Result<Vec<_>>>()?;
        let mut opt = Self {
            state: (0..vars.len()).map(|_| None).collect(),
            map,
            vars,
            skipped,
            active: Vec::new(),
            sampler,
            params,
            mode,
            recompute_frozen: false,
            compact: CompactState::Off,
            scaler: None,
            nonfinite: NonFinite::Error,
            no_decay: Vec::new(),
            last_grad_norm: None,
            skipped_steps: 0,
            steps: 0,
            period_index: 0,
            resampled: false,
        };
        for i in 0..opt.vars.len() {
            if opt.map.group_at(i) == ParamGroup::Always {
                opt.state[i] = Some(Moments::new(opt.vars[i].as_tensor(), false, i as u64)?);
            }
        }
        if let Some(first) = opt.draw()? {
            opt.activate(first)?;
        }
        Ok(opt)
    }

    /// Draws the next active set and checks it; `None` in [`Mode::Full`].
    fn draw(&mut self) -> Result<Option<Vec<usize>>> {
        let (Mode::Lisa { gamma, .. }, Some(sampler)) = (self.mode, self.sampler.as_mut()) else {
            return Ok(None);
        };
        let n = self.map.num_blocks();
        let mut draw = sampler.draw(n, gamma);
        let bad = draw.clone();
        draw.sort_unstable();
        draw.dedup();
        if draw.len() != gamma || bad.len() != gamma || draw.iter().any(|&b| b >= n) {
            return Err(LisaError::InvalidDraw {
                draw: bad,
                gamma,
                num_blocks: n,
            });
        }
        Ok(Some(draw))
    }

    /// Makes `next` (sorted, checked) the active set: frees the moments of blocks that leave
    /// first, then allocates fresh ones for blocks that enter.
    fn activate(&mut self, next: Vec<usize>) -> Result<()> {
        for &b in self.active.iter().filter(|b| !next.contains(b)) {
            for &i in self.map.block_indices(b) {
                self.state[i] = None;
            }
        }
        for &b in next.iter().filter(|b| !self.active.contains(b)) {
            for &i in self.map.block_indices(b) {
                let compact = self.compact_at(i);
                self.state[i] = Some(Moments::new(self.vars[i].as_tensor(), compact, i as u64)?);
            }
        }
        self.active = next;
        Ok(())
    }

    /// Whether `grads` holds a gradient of a parameter in a block that is frozen now: the
    /// model tracks blocks the optimizer does not train, so it was built for an earlier active
    /// set (or straight from the `VarMap`), not from the current builder.
    fn grads_reach_frozen_blocks(&self, grads: &GradStore) -> bool {
        (0..self.map.num_blocks())
            .filter(|b| !self.active.contains(b))
            .flat_map(|b| self.map.block_indices(b))
            .any(|&i| grads.get(self.vars[i].as_tensor()).is_some())
    }

    /// Checks `grads` against the trainable parameters without writing anything.
    fn check_grads(&self, grads: &GradStore) -> Result<()> {
        for &b in &self.active {
            let block = self.map.block_indices(b);
            if !block
                .iter()
                .any(|&i| grads.get(self.vars[i].as_tensor()).is_some())
            {
                let first = self.map.name_at(block[0]).to_string();
                return Err(match self.grads_reach_frozen_blocks(grads) {
                    true => LisaError::NoGradient { block: b, first },
                    false => LisaError::GradientFlowCut { block: b, first },
                });
            }
        }
        for (i, var) in self.vars.iter().enumerate() {
            if self.state[i].is_none() {
                continue;
            }
            if let Some(g) = grads.get(var.as_tensor()) {
                if g.shape() != var.shape() || g.dtype() != var.dtype() {
                    return Err(LisaError::GradientMismatch {
                        name: self.map.name_at(i).to_string(),
                        expected: var.shape().clone(),
                        got: g.shape().clone(),
                        expected_dtype: var.dtype(),
                        got_dtype: g.dtype(),
                    });
                }
            }
        }
        Ok(())
    }

    /// One optimizer step with a typed error; [`Optimizer::step`] calls this.
    ///
    /// Updates every trainable parameter that has a gradient in `grads`; gradients of frozen
    /// parameters are ignored. After step number `k · period` it draws the next active blocks
    /// (see [`resampled`](Self::resampled)). With a [`LossScaler`] set, `grads` must be those
    /// of the scaled loss ([`scale_loss`](Self::scale_loss); `backward_step` does this).
    ///
    /// A gradient holding NaN or infinity skips the step or fails, as the
    /// [precision policy](crate::optim::precision) says; a skipped step writes nothing and is
    /// not counted in [`step_count`](Self::step_count).
    ///
    /// # Errors
    /// [`LisaError::NonFiniteLearningRate`], [`LisaError::NoGradient`],
    /// [`LisaError::GradientMismatch`], [`LisaError::NonFiniteGradient`] and
    /// [`LisaError::InvalidDraw`] are detected before anything is written: the weights, the
    /// moments, the step counter and the sampler are then as they were. A candle error during
    /// the update itself (out of memory) can leave it half applied.
    pub fn try_step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_with(grads, GradScale::Fixed(1.0))
    }

    /// [`try_step`](Self::try_step) with every gradient multiplied by `grad_scale` inside the
    /// update, without a copy (for example to average accumulated micro-batches).
    /// `grad_scale = 1` is `try_step`.
    ///
    /// # Errors
    /// Those of [`try_step`](Self::try_step), and [`LisaError::InvalidHyperparameter`] for a
    /// `grad_scale` that is not finite and positive.
    pub fn try_step_scaled(&mut self, grads: &GradStore, grad_scale: f64) -> Result<()> {
        if !(grad_scale.is_finite() && grad_scale > 0.0) {
            return Err(LisaError::InvalidHyperparameter {
                name: "grad_scale",
                value: grad_scale,
                expected: "finite and greater than 0",
            });
        }
        self.step_with(grads, GradScale::Fixed(grad_scale))
    }

    /// [`try_step`](Self::try_step) with the gradients clipped to a global L2 norm of at most
    /// `max_norm`: they are multiplied by `max_norm / (norm + 1e-6)` when the norm exceeds
    /// it, inside the update, without a copy. The norm comes from the pass that checks every
    /// gradient for NaN and infinity, so clipping costs no extra read; it is reported by
    /// [`last_grad_norm`](Self::last_grad_norm).
    ///
    /// # Errors
    /// Those of [`try_step`](Self::try_step), and [`LisaError::InvalidHyperparameter`] for a
    /// `max_norm` that is not finite and positive.
    pub fn try_step_clipped(&mut self, grads: &GradStore, max_norm: f64) -> Result<()> {
        if !(max_norm.is_finite() && max_norm > 0.0) {
            return Err(LisaError::InvalidHyperparameter {
                name: "max_norm",
                value: max_norm,
                expected: "finite and greater than 0",
            });
        }
        self.step_with(grads, GradScale::ClipTo(max_norm))
    }

    fn step_with(&mut self, grads: &GradStore, scale: GradScale) -> Result<()> {
        check_params(&self.params)?;
        self.check_grads(grads)?;
        // One read of every gradient: finiteness, the global norm and each block's norm.
        let squares = self.grad_squares(grads)?;
        let loss_scale = self.scaler.as_ref().map_or(1.0, |s| s.scale());
        let norm = squares.iter().map(|(_, sq)| sq).sum::<f64>().sqrt() / loss_scale;
        self.last_grad_norm = Some(norm);
        if !norm.is_finite() {
            let bad = squares.iter().find(|(_, sq)| !sq.is_finite());
            let name = bad.map_or("?", |&(i, _)| self.map.name_at(i)).to_string();
            if let Some(scaler) = self.scaler.as_mut() {
                scaler.back_off();
            } else if self.nonfinite == NonFinite::Error {
                return Err(LisaError::NonFiniteGradient { name });
            }
            self.skipped_steps += 1;
            self.resampled = false;
            return Ok(());
        }
        let next = match self.mode {
            Mode::Lisa { period, .. } if (self.steps + 1) % period as u64 == 0 => self.draw()?,
            _ => None,
        };
        let grad_scale = match scale {
            GradScale::Fixed(s) => s,
            GradScale::ClipTo(max) if norm > max => max / (norm + 1e-6),
            GradScale::ClipTo(_) => 1.0,
        };
        let inv_scale = grad_scale / loss_scale;
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
        if let Some(sampler) = self.sampler.as_mut() {
            for &b in &self.active {
                let block = self.map.block_indices(b);
                let sq: f64 = squares
                    .iter()
                    .filter(|(i, _)| block.binary_search(i).is_ok())
                    .map(|(_, sq)| sq)
                    .sum();
                sampler.observe(b, sq.sqrt() / loss_scale);
            }
        }
        self.steps += 1;
        self.resampled = next.is_some();
        if let Some(next) = next {
            self.activate(next)?;
            self.period_index += 1;
        }
        Ok(())
    }

    /// `(i, Σ g²)` for every trainable parameter `i` with a gradient in `grads`, in f64: NaN
    /// or infinite exactly when the gradient holds NaN or infinity.
    fn grad_squares(&self, grads: &GradStore) -> Result<Vec<(usize, f64)>> {
        let mut out = Vec::new();
        for (i, var) in self.vars.iter().enumerate() {
            if self.state[i].is_none() {
                continue;
            }
            if let Some(g) = grads.get(var.as_tensor()) {
                out.push((i, sum_squares(g)?));
            }
        }
        Ok(out)
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
        Ok(sum.sqrt() / self.scaler.as_ref().map_or(1.0, |s| s.scale()))
    }

    /// Every float parameter the optimizer was built over, with its name, sorted by name.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.map.iter().map(|(n, _)| n).zip(&self.vars)
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
        self.map
            .index_of(name)
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

    /// A `VarBuilder` for (re)building the model: trainable parameters as the variables' own
    /// tensors, frozen ones as detached views of the same storage (no copy). Its dtype and
    /// device are those of the first parameter by name. Asking it for a trainable parameter in
    /// another dtype or on another device fails with [`LisaError::TrainableConversion`] (a
    /// converted copy would never be updated); frozen ones are converted (a copy).
    ///
    /// Call it again after every step where [`resampled`](Self::resampled) is true.
    /// [`plan`](Self::plan) wraps it with the recompute setting.
    pub fn var_builder(&self) -> VarBuilder<'static> {
        let mut tensors = HashMap::with_capacity(self.vars.len() + self.skipped.len());
        for (i, var) in self.vars.iter().enumerate() {
            let t = if self.state[i].is_some() {
                var.as_tensor().clone()
            } else {
                var.as_tensor().detach()
            };
            tensors.insert(self.map.name_at(i).to_string(), t);
        }
        for (name, var) in &self.skipped {
            tensors.insert(name.clone(), var.as_tensor().detach());
        }
        LisaBackend { tensors }.into_builder(self.vars.first())
    }

    /// The [`TrainingPlan`] for the active set: [`var_builder`](Self::var_builder) and
    /// [`recompute_frozen`](Self::recompute_frozen). Build the model from it, for example with
    /// [`Llama::from_plan`](crate::Llama::from_plan), and again after every step where
    /// [`resampled`](Self::resampled) is true.
    pub fn plan(&self) -> TrainingPlan {
        TrainingPlan::new(self.var_builder(), self.recompute_frozen)
    }

    /// The blocks trainable now, sorted (empty in [`Mode::Full`]).
    pub fn active_blocks(&self) -> &[usize] {
        &self.active
    }

    /// Whether the last step drew new active blocks, so the model must be rebuilt from
    /// [`var_builder`](Self::var_builder) before the next forward pass.
    pub fn resampled(&self) -> bool {
        self.resampled
    }

    /// How many draws came after the first one: `step_count() / period`.
    pub fn period_index(&self) -> u64 {
        self.period_index
    }

    /// Steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.steps
    }

    /// N, the number of blocks.
    pub fn num_blocks(&self) -> usize {
        self.map.num_blocks()
    }

    /// What this optimizer trains: every parameter, or LISA's γ blocks every K steps.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// γ, the number of blocks trainable at a time: `active_blocks().len()`, so 0 in
    /// [`Mode::Full`], whose parameters are in no block.
    pub fn gamma(&self) -> usize {
        self.active.len()
    }

    /// K, the number of steps between draws; `None` in [`Mode::Full`], which never draws.
    pub fn period(&self) -> Option<usize> {
        match self.mode {
            Mode::Full => None,
            Mode::Lisa { period, .. } => Some(period),
        }
    }

    /// Keeps the AdamW moments of the parameters `compact` names in bf16 from now on, with
    /// stochastic rounding (see [compact state](crate::optim::precision#compact-state)): 4
    /// bytes of state per trainable f32 parameter instead of 8. Moments held now are
    /// converted (rounded to nearest); blocks activated later get compact moments directly.
    /// Call it before [`load_state`](Self::load_state) when resuming a run that used it.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_lisa::optim::CompactState;
    /// use candle_lisa::{load_llama, LisaAdamW, LisaConfig};
    ///
    /// let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/tiny-llama");
    /// let (_, varmap) = load_llama(dir, DType::F32, &Device::Cpu)?;
    /// let mut opt = LisaAdamW::new(&varmap, Default::default(), LisaConfig::default())?;
    /// let before = opt.state_bytes();
    /// opt.set_compact_state(CompactState::All)?;
    /// assert_eq!(2 * opt.state_bytes(), before);
    /// # Ok::<(), candle_lisa::LisaError>(())
    /// ```
    ///
    /// # Errors
    /// [`LisaError::InvalidConfig`] when a parameter is not on the CPU (the CUDA and Metal
    /// updates keep f32 moments); nothing is changed then.
    pub fn set_compact_state(&mut self, compact: CompactState) -> Result<()> {
        if compact != CompactState::Off {
            if let Some(var) = self.vars.iter().find(|v| !v.device().is_cpu()) {
                return Err(LisaError::InvalidConfig(format!(
                    "compact optimizer state ({compact:?}) is updated on the CPU only for now, \
                     and a parameter is on {:?}: keep CompactState::Off there",
                    var.device()
                )));
            }
        }
        self.compact = compact;
        for i in 0..self.vars.len() {
            let on = self.compact_at(i);
            if let Some(st) = self.state[i].as_mut() {
                st.set_compact(self.vars[i].as_tensor(), on)?;
            }
        }
        Ok(())
    }

    /// Which parameters keep compact moments ([`set_compact_state`](Self::set_compact_state)).
    pub fn compact_state(&self) -> CompactState {
        self.compact
    }

    /// Whether parameter `i` keeps compact moments when trainable.
    pub(super) fn compact_at(&self, i: usize) -> bool {
        match self.compact {
            CompactState::Off => false,
            CompactState::AlwaysTrainable => self.map.group_at(i) == ParamGroup::Always,
            CompactState::All => true,
        }
    }

    /// Whether frozen blocks should be recomputed in the backward pass
    /// ([`LisaConfig::recompute_frozen`]); [`plan`](Self::plan) carries it to the model, and
    /// a model of your own can read it there (see
    /// [`recompute`](crate::nn::recompute::recompute)).
    pub fn recompute_frozen(&self) -> bool {
        self.recompute_frozen
    }

    /// Which parameter is in which block.
    pub fn layer_map(&self) -> &LayerMap {
        &self.map
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
        self.trainable()
            .map(|v| v.elem_count() * v.dtype().size_in_bytes())
            .sum()
    }

    /// Number of scalars trainable now.
    pub fn trainable_params(&self) -> usize {
        self.trainable().map(|v| v.elem_count()).sum()
    }

    fn trainable(&self) -> impl Iterator<Item = &Var> {
        self.trainable_vars().map(|(_, v)| v)
    }

    /// Whether the parameter `name` is trainable now (false for unknown names).
    pub fn is_trainable(&self, name: &str) -> bool {
        self.map
            .index_of(name)
            .is_some_and(|i| self.state[i].is_some())
    }

    /// The AdamW state of `name`, or `None` when it is frozen or unknown.
    pub fn param_state(&self, name: &str) -> Option<ParamState<'_>> {
        let st = self.state[self.map.index_of(name)?].as_ref()?;
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

impl Optimizer for LisaAdamW {
    type Config = LisaParams;

    /// Always fails with [`LisaError::UnnamedVars`]: use [`LisaAdamW::new`].
    fn new(_vars: Vec<Var>, _config: LisaParams) -> candle_core::Result<Self> {
        Err(LisaError::UnnamedVars.into())
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
    /// nothing; [`LisaAdamW::try_set_learning_rate`] refuses it at once instead.
    fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
    }
}
