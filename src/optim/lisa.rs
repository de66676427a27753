//! [`LisaAdamW`]: an [`AdamW`] whose trainable set is the always-trainable parameters and γ
//! blocks, redrawn every K steps.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW, VarBuilder, VarMap};

use super::adamw::{check_params, AdamW, GradScaling, ParamState};
use super::block_map::{BlockMap, ParamRole};
use super::config::LisaConfig;
use super::precision::{CompactState, LossScaler, NonFinite};
use super::sampler::BlockSampler;
use crate::error::{LisaError, Result};
use crate::nn::TrainingPlan;

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
    /// Every float parameter at every step: plain [`AdamW`], for full fine-tuning or for LoRA
    /// adapters ([`LisaAdamW::all_trainable`], or an [`AdamW`] converted with `into()`).
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

/// Layerwise Importance Sampled AdamW.
///
/// Every `period` steps it draws γ blocks to train; the parameters outside the blocks (embedding,
/// LM head, final norm) train at every step. It is an [`AdamW`] plus that block schedule: the
/// update, its precision policy, clipping, loss scaling and the non-finite policy are
/// [`AdamW`]'s ([`adamw`](Self::adamw) gives that view), and the schedule decides which
/// parameters are trainable. An [`AdamW`] converts into a `LisaAdamW` with no blocks
/// ([`Mode::Full`]), for code such as the [`Trainer`](crate::train::Trainer) that takes
/// either.
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
    /// The update and its state. Invariant: parameter `i` is trainable in it exactly when its
    /// group is `Always`, or `Block(b)` with `b` in `active`; [`activate`](Self::activate)
    /// keeps it so.
    pub(super) adamw: AdamW,
    /// Its names are `adamw`'s, in the same order.
    pub(super) map: BlockMap,
    /// Sorted: `gamma` distinct indices below `map.num_blocks()` in [`Mode::Lisa`], empty in
    /// [`Mode::Full`] (whose map has no blocks).
    pub(super) active: Vec<usize>,
    /// `Some` exactly in [`Mode::Lisa`].
    pub(super) sampler: Option<Box<dyn BlockSampler>>,
    pub(super) mode: Mode,
    pub(super) recompute_frozen: bool,
    /// Which trainable parameters' moments are bf16.
    pub(super) compact: CompactState,
    pub(super) period_index: u64,
    pub(super) resampled: bool,
}

impl std::fmt::Debug for LisaAdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LisaAdamW")
            .field("num_blocks", &self.map.num_blocks())
            .field("active", &self.active)
            .field("mode", &self.mode)
            .field("steps", &self.adamw.steps)
            .field("params", &self.adamw.params)
            .field("state_bytes", &self.state_bytes())
            .finish_non_exhaustive()
    }
}

impl From<AdamW> for LisaAdamW {
    /// `adamw` with no block schedule ([`Mode::Full`]): every parameter trains at every step.
    fn from(adamw: AdamW) -> Self {
        Self {
            map: BlockMap::all_trainable_sorted(adamw.names.clone()),
            adamw,
            active: Vec::new(),
            sampler: None,
            mode: Mode::Full,
            recompute_frozen: false,
            compact: CompactState::Off,
            period_index: 0,
            resampled: false,
        }
    }
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
    /// [precision policy](crate::optim::precision)). On a CUDA device the device's memory
    /// pool keeps freed memory for reuse
    /// ([`keep_freed_memory`](crate::nn::pool::keep_freed_memory)).
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
        let adamw = AdamW::frozen(vars, params)?;
        let map = BlockMap::new(&adamw.names, &config)?;
        if config.gamma == 0 || config.gamma > map.num_blocks() {
            return Err(LisaError::InvalidGamma {
                gamma: config.gamma,
                num_blocks: map.num_blocks(),
            });
        }
        let mut opt = Self {
            adamw,
            map,
            active: Vec::new(),
            sampler: Some(sampler),
            mode: Mode::Lisa {
                gamma: config.gamma,
                period: config.period,
            },
            recompute_frozen: config.recompute_frozen,
            compact: CompactState::Off,
            period_index: 0,
            resampled: false,
        };
        for i in 0..opt.map.len() {
            if opt.map.group_at(i) == ParamRole::Always {
                opt.adamw.set_trainable(i, true)?;
            }
        }
        if let Some(first) = opt.draw()? {
            opt.activate(first)?;
        }
        Ok(opt)
    }

    /// Plain AdamW over every float parameter ([`Mode::Full`]): the "full fine-tuning"
    /// baseline (also used for LoRA adapters), as [`AdamW::from_named_vars`] converted with
    /// `into()`. It has no blocks and never resamples.
    pub fn all_trainable(
        vars: impl IntoIterator<Item = (String, Var)>,
        params: ParamsAdamW,
    ) -> Result<Self> {
        Ok(AdamW::from_named_vars(vars, params)?.into())
    }

    /// The [`AdamW`] underneath: its update, state and settings.
    pub fn adamw(&self) -> &AdamW {
        &self.adamw
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

    /// Makes `next` (sorted, checked) the active set: freezes the blocks that leave first
    /// (dropping their state), then makes the blocks that enter trainable (fresh state).
    fn activate(&mut self, next: Vec<usize>) -> Result<()> {
        for &b in self.active.iter().filter(|b| !next.contains(b)) {
            for &i in self.map.block_indices(b) {
                self.adamw.set_trainable(i, false)?;
            }
        }
        for &b in next.iter().filter(|b| !self.active.contains(b)) {
            for &i in self.map.block_indices(b) {
                self.adamw.set_trainable(i, true)?;
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
            .any(|&i| grads.get(self.adamw.vars[i].as_tensor()).is_some())
    }

    /// Checks that every active block has a gradient, without writing anything.
    fn check_blocks(&self, grads: &GradStore) -> Result<()> {
        for &b in &self.active {
            let block = self.map.block_indices(b);
            if !block
                .iter()
                .any(|&i| grads.get(self.adamw.vars[i].as_tensor()).is_some())
            {
                let first = self.map.name_at(block[0]).to_string();
                return Err(match self.grads_reach_frozen_blocks(grads) {
                    true => LisaError::NoGradient { block: b, first },
                    false => LisaError::GradientFlowCut { block: b, first },
                });
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
        self.step_with(grads, GradScaling::By(1.0))
    }

    /// [`try_step`](Self::try_step) with the gradients scaled or clipped inside the update
    /// ([`GradScaling`], as [`AdamW::try_step_with`]).
    ///
    /// # Errors
    /// Those of [`try_step`](Self::try_step), and [`LisaError::InvalidHyperparameter`] for a
    /// factor or norm that is not finite and positive.
    pub fn try_step_with(&mut self, grads: &GradStore, scaling: GradScaling) -> Result<()> {
        self.step_with(grads, scaling)
    }

    fn step_with(&mut self, grads: &GradStore, scale: GradScaling) -> Result<()> {
        let scale = scale.checked()?;
        check_params(&self.adamw.params)?;
        self.check_blocks(grads)?;
        let Some(checked) = self.adamw.check(grads)? else {
            self.resampled = false;
            return Ok(());
        };
        let next = match self.mode {
            Mode::Lisa { period, .. } if (self.adamw.steps + 1).is_multiple_of(period as u64) => {
                self.draw()?
            }
            _ => None,
        };
        self.adamw.apply(grads, &checked, scale)?;
        if let Some(sampler) = self.sampler.as_mut() {
            for &b in &self.active {
                let block = self.map.block_indices(b);
                let sq: f64 = checked
                    .squares
                    .iter()
                    .filter(|(i, _)| block.binary_search(i).is_ok())
                    .map(|(_, sq)| sq)
                    .sum();
                sampler.observe(b, sq.sqrt() / checked.loss_scale);
            }
        }
        self.resampled = next.is_some();
        if let Some(next) = next {
            self.activate(next)?;
            self.period_index += 1;
        }
        Ok(())
    }

    /// As [`AdamW::last_grad_norm`].
    pub fn last_grad_norm(&self) -> Option<f64> {
        self.adamw.last_grad_norm()
    }

    /// As [`AdamW::grad_norm`].
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        self.adamw.grad_norm(grads)
    }

    /// Every float parameter the optimizer was built over, with its name, sorted by name.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.adamw.vars()
    }

    /// The parameters trainable now, with their names, sorted by name.
    pub fn trainable_vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.adamw.trainable_vars()
    }

    /// As [`AdamW::set_weight_decay_filter`].
    pub fn set_weight_decay_filter(&mut self, exclude: impl Fn(&str, &[usize]) -> bool) {
        self.adamw.set_weight_decay_filter(exclude)
    }

    /// As [`AdamW::excluded_from_weight_decay`].
    pub fn excluded_from_weight_decay(&self, name: &str) -> bool {
        self.adamw.excluded_from_weight_decay(name)
    }

    /// As [`AdamW::scale_loss`].
    pub fn scale_loss(&self, loss: &Tensor) -> candle_core::Result<Tensor> {
        self.adamw.scale_loss(loss)
    }

    /// As [`AdamW::set_loss_scaler`].
    pub fn set_loss_scaler(&mut self, scaler: Option<LossScaler>) {
        self.adamw.set_loss_scaler(scaler)
    }

    /// The loss scaler, if one is set.
    pub fn loss_scaler(&self) -> Option<&LossScaler> {
        self.adamw.loss_scaler()
    }

    /// As [`AdamW::set_non_finite`].
    pub fn set_non_finite(&mut self, policy: NonFinite) {
        self.adamw.set_non_finite(policy)
    }

    /// Steps skipped so far because a gradient was not finite.
    pub fn skipped_steps(&self) -> u64 {
        self.adamw.skipped_steps()
    }

    /// A `VarBuilder` for (re)building the model, as [`AdamW::var_builder`]: the active
    /// blocks and always-trainable parameters tracked, frozen blocks as detached views.
    ///
    /// Call it again after every step where [`resampled`](Self::resampled) is true.
    /// [`plan`](Self::plan) wraps it with the recompute setting.
    pub fn var_builder(&self) -> VarBuilder<'static> {
        self.adamw.var_builder()
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
        self.adamw.step_count()
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
    /// [`LisaError::InvalidArgument`] when a parameter is not on the CPU (the CUDA and Metal
    /// updates keep f32 moments); nothing is changed then.
    pub fn set_compact_state(&mut self, compact: CompactState) -> Result<()> {
        let mask = (0..self.map.len())
            .map(|i| self.compact_at(compact, i))
            .collect();
        self.adamw.set_compact_mask(compact, mask)?;
        self.compact = compact;
        Ok(())
    }

    /// Which parameters keep compact moments ([`set_compact_state`](Self::set_compact_state)).
    pub fn compact_state(&self) -> CompactState {
        self.compact
    }

    /// Whether parameter `i` keeps compact moments under `compact` when trainable.
    pub(super) fn compact_at(&self, compact: CompactState, i: usize) -> bool {
        match compact {
            CompactState::Off => false,
            CompactState::AlwaysTrainable => self.map.group_at(i) == ParamRole::Always,
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
    pub fn block_map(&self) -> &BlockMap {
        &self.map
    }

    /// As [`AdamW::state_bytes`].
    pub fn state_bytes(&self) -> usize {
        self.adamw.state_bytes()
    }

    /// Bytes of the parameters trainable now.
    pub fn trainable_bytes(&self) -> usize {
        self.adamw.trainable_bytes()
    }

    /// Number of scalars trainable now.
    pub fn trainable_params(&self) -> usize {
        self.adamw.trainable_params()
    }

    /// Whether the parameter `name` is trainable now (false for unknown names).
    pub fn is_trainable(&self, name: &str) -> bool {
        self.adamw.is_trainable(name)
    }

    /// The AdamW state of `name`, or `None` when it is frozen or unknown.
    pub fn param_state(&self, name: &str) -> Option<ParamState<'_>> {
        self.adamw.param_state(name)
    }

    /// The AdamW hyper-parameters.
    pub fn params(&self) -> &ParamsAdamW {
        self.adamw.params()
    }

    /// As [`AdamW::set_params`].
    ///
    /// # Errors
    /// [`LisaError::NonFiniteLearningRate`] or [`LisaError::InvalidHyperparameter`]; the old
    /// ones are kept then.
    pub fn set_params(&mut self, params: ParamsAdamW) -> Result<()> {
        self.adamw.set_params(params)
    }

    /// Sets the learning rate, refusing a non-finite one with
    /// [`LisaError::NonFiniteLearningRate`] (the old rate is kept then).
    pub fn try_set_learning_rate(&mut self, lr: f64) -> Result<()> {
        self.adamw.try_set_learning_rate(lr)
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
        self.adamw.params.lr
    }

    /// Sets the learning rate. A non-finite rate is stored as given and makes the next
    /// [`step`](Optimizer::step) fail with [`LisaError::NonFiniteLearningRate`], writing
    /// nothing; [`LisaAdamW::try_set_learning_rate`] refuses it at once instead.
    fn set_learning_rate(&mut self, lr: f64) {
        self.adamw.params.lr = lr;
    }
}
