//! [`LisaAdamW`]: AdamW over the always-trainable parameters and γ sampled blocks.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW, VarBuilder, VarMap};

use crate::adamw::Moments;
use crate::config::LisaConfig;
use crate::error::{LisaError, Result};
use crate::layers::{LayerMap, ParamGroup};
use crate::sampler::{BlockSampler, UniformSampler};
use crate::var_builder::LisaBackend;

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
    /// Updates applied since this state was created (0 right after activation).
    pub step: u64,
}

/// Layerwise Importance Sampled AdamW.
///
/// Every `period` steps it draws γ blocks to train; the parameters outside the blocks (embedding,
/// LM head, final norm) train at every step. The update is `candle_nn::AdamW`'s math (decoupled
/// weight decay, bias correction), rounded as candle rounds it, so the results are the same
/// bits. On the CPU, for contiguous f32 and f64 parameters, it is fused: one pass per parameter
/// that reads θ, g, m and v once and writes θ, m and v in place, allocating nothing
/// parameter-sized. Elsewhere (CUDA, Metal, f16, bf16) it runs as candle tensor ops on
/// detached tensors, so no temporary is attached to a graph.
///
/// **State Reset:** AdamW moments exist only for parameters that are trainable now. A block's
/// moments are allocated (zeros, step counter 0) when a draw activates it and dropped when a
/// draw leaves it out; a block drawn in two periods in a row keeps its moments. A block that
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
    map: LayerMap,
    /// `vars[i]` is the parameter named `map.name_at(i)`.
    vars: Vec<Var>,
    /// Integer parameters: handed out by the builder, never trained.
    skipped: Vec<(String, Var)>,
    /// Invariant: `state[i].is_some()` exactly when parameter `i` is trainable now, that is its
    /// group is `Always`, or `Block(b)` with `b` in `active`.
    state: Vec<Option<Moments>>,
    /// Sorted, `gamma` distinct indices below `map.num_blocks()`.
    active: Vec<usize>,
    sampler: Box<dyn BlockSampler>,
    params: ParamsAdamW,
    gamma: usize,
    period: usize,
    recompute_frozen: bool,
    steps: u64,
    period_index: u64,
    resampled: bool,
}

impl std::fmt::Debug for LisaAdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LisaAdamW")
            .field("num_blocks", &self.map.num_blocks())
            .field("active", &self.active)
            .field("gamma", &self.gamma)
            .field("period", &self.period)
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

fn check_params(p: &ParamsAdamW) -> Result<()> {
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
    /// with a [`UniformSampler`] seeded by `config.seed`.
    ///
    /// # Errors
    /// Every configuration error of [`LisaError`]; nothing is built then.
    ///
    /// Cost: allocates AdamW moments (2× the parameter bytes) for the always-trainable
    /// parameters and the γ active blocks only.
    pub fn new(varmap: &VarMap, params: ParamsAdamW, config: LisaConfig) -> Result<Self> {
        let vars = crate::var_builder::named_vars(varmap)?;
        Self::from_named_vars(vars, params, config)
    }

    /// Builds the optimizer over named variables, for models whose variables do not live in a
    /// `VarMap`. Same errors and costs as [`new`](Self::new).
    pub fn from_named_vars(
        vars: impl IntoIterator<Item = (String, Var)>,
        params: ParamsAdamW,
        config: LisaConfig,
    ) -> Result<Self> {
        let sampler = Box::new(UniformSampler::new(config.seed));
        Self::with_sampler(vars, params, config, sampler)
    }

    /// Like [`from_named_vars`](Self::from_named_vars), drawing blocks with `sampler` instead
    /// of the uniform one (`config.seed` is then unused).
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
        let mut opt = Self::build(
            map,
            by_name,
            skipped,
            params,
            config.gamma,
            config.period,
            sampler,
        )?;
        opt.recompute_frozen = config.recompute_frozen;
        Ok(opt)
    }

    /// Plain AdamW over every float parameter, with this optimizer's lean update and state
    /// accounting: the "full fine-tuning" baseline (also used for LoRA adapters).
    pub fn all_trainable(
        vars: impl IntoIterator<Item = (String, Var)>,
        params: ParamsAdamW,
    ) -> Result<Self> {
        check_params(&params)?;
        let (by_name, skipped) = split_vars(vars);
        let map = LayerMap::all_trainable(by_name.keys())?;
        Self::build(
            map,
            by_name,
            skipped,
            params,
            0,
            usize::MAX,
            Box::new(UniformSampler::new(0)),
        )
    }

    fn build(
        map: LayerMap,
        mut by_name: HashMap<String, Var>,
        skipped: Vec<(String, Var)>,
        params: ParamsAdamW,
        gamma: usize,
        period: usize,
        sampler: Box<dyn BlockSampler>,
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
            gamma,
            period,
            recompute_frozen: false,
            steps: 0,
            period_index: 0,
            resampled: false,
        };
        for i in 0..opt.vars.len() {
            if opt.map.group_at(i) == ParamGroup::Always {
                opt.state[i] = Some(Moments::zeros_like(opt.vars[i].as_tensor())?);
            }
        }
        let first = opt.draw()?;
        opt.activate(first)?;
        Ok(opt)
    }

    /// Draws the next active set and checks it.
    fn draw(&mut self) -> Result<Vec<usize>> {
        let n = self.map.num_blocks();
        let mut draw = self.sampler.draw(n, self.gamma);
        let bad = draw.clone();
        draw.sort_unstable();
        draw.dedup();
        if draw.len() != self.gamma || bad.len() != self.gamma || draw.iter().any(|&b| b >= n) {
            return Err(LisaError::InvalidDraw {
                draw: bad,
                gamma: self.gamma,
                num_blocks: n,
            });
        }
        Ok(draw)
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
                self.state[i] = Some(Moments::zeros_like(self.vars[i].as_tensor())?);
            }
        }
        self.active = next;
        Ok(())
    }

    /// Checks `grads` against the trainable parameters without writing anything.
    fn check_grads(&self, grads: &GradStore) -> Result<()> {
        for &b in &self.active {
            let block = self.map.block_indices(b);
            if !block
                .iter()
                .any(|&i| grads.get(self.vars[i].as_tensor()).is_some())
            {
                return Err(LisaError::NoGradient {
                    block: b,
                    first: self.map.name_at(block[0]).to_string(),
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
    /// (see [`resampled`](Self::resampled)).
    ///
    /// # Errors
    /// [`LisaError::NonFiniteLearningRate`], [`LisaError::NoGradient`],
    /// [`LisaError::GradientMismatch`] and [`LisaError::InvalidDraw`] are detected before
    /// anything is written: the weights, the moments, the step counter and the sampler are
    /// then as they were. A candle error during the update itself (out of memory) can leave it
    /// half applied.
    pub fn try_step(&mut self, grads: &GradStore) -> Result<()> {
        check_params(&self.params)?;
        self.check_grads(grads)?;
        let next = if (self.steps + 1) % self.period as u64 == 0 {
            Some(self.draw()?)
        } else {
            None
        };
        for (var, state) in self.vars.iter().zip(self.state.iter_mut()) {
            let (Some(st), Some(g)) = (state.as_mut(), grads.get(var.as_tensor())) else {
                continue;
            };
            st.update(&self.params, var, g)?;
        }
        self.steps += 1;
        self.resampled = next.is_some();
        if let Some(next) = next {
            self.activate(next)?;
            self.period_index += 1;
        }
        Ok(())
    }

    /// A `VarBuilder` for (re)building the model: trainable parameters as the variables' own
    /// tensors, frozen ones as detached views of the same storage (no copy). Its dtype and
    /// device are those of the first parameter by name; asking it for another dtype or device
    /// converts, which copies.
    ///
    /// Call it again after every step where [`resampled`](Self::resampled) is true.
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

    /// The blocks trainable now, sorted.
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

    /// γ.
    pub fn gamma(&self) -> usize {
        self.gamma
    }

    /// K, the number of steps between draws.
    pub fn period(&self) -> usize {
        self.period
    }

    /// Whether frozen blocks should be recomputed in the backward pass
    /// ([`LisaConfig::recompute_frozen`]); [`Llama::from_optimizer`](crate::Llama::from_optimizer)
    /// reads it, and so can a model of your own (see [`recompute`](crate::recompute::recompute)).
    pub fn recompute_frozen(&self) -> bool {
        self.recompute_frozen
    }

    /// Which parameter is in which block.
    pub fn layer_map(&self) -> &LayerMap {
        &self.map
    }

    /// Bytes held by AdamW moments now: exactly 2 × [`trainable_bytes`](Self::trainable_bytes).
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
        self.vars
            .iter()
            .zip(&self.state)
            .filter(|(_, s)| s.is_some())
            .map(|(v, _)| v)
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

/// File of the moments written by [`LisaAdamW::save_state`].
pub const STATE_TENSORS_FILE: &str = "optimizer.safetensors";
/// File of the counters, active blocks and sampler position written by
/// [`LisaAdamW::save_state`].
pub const STATE_JSON_FILE: &str = "optimizer.json";
const STATE_FORMAT: &str = "candle-lisa-optimizer/1";

impl LisaAdamW {
    /// Saves everything a resumed run needs besides the weights: the AdamW moments and step
    /// counter of every trainable parameter, the active blocks, the step and period counters,
    /// the hyper-parameters and the sampler's position, as `optimizer.safetensors` and
    /// `optimizer.json` in `dir` (created if needed), each written atomically.
    ///
    /// # Errors
    /// [`LisaError::Io`] when a file cannot be written.
    pub fn save_state(&self, dir: impl AsRef<std::path::Path>) -> Result<()> {
        use crate::checkpoint::{atomic_write, io};
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
        let mut tensors = HashMap::new();
        let mut steps = serde_json::Map::new();
        for (i, st) in self.state.iter().enumerate() {
            if let Some(st) = st {
                let name = self.map.name_at(i);
                tensors.insert(format!("m/{name}"), st.m.clone());
                tensors.insert(format!("v/{name}"), st.v.clone());
                steps.insert(name.to_string(), st.step.into());
            }
        }
        let p = &self.params;
        let json = serde_json::json!({
            "format": STATE_FORMAT,
            "gamma": self.gamma,
            "period": self.period,
            "steps": self.steps,
            "period_index": self.period_index,
            "resampled": self.resampled,
            "active": self.active,
            "params": {"lr": p.lr, "beta1": p.beta1, "beta2": p.beta2, "eps": p.eps, "weight_decay": p.weight_decay},
            "param_steps": steps,
            "names": self.map.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            "sampler": self.sampler.state(),
        });
        atomic_write(&dir.join(STATE_TENSORS_FILE), |tmp| {
            Ok(candle_core::safetensors::save(&tensors, tmp)?)
        })?;
        let text = serde_json::to_string_pretty(&json).unwrap_or_default();
        atomic_write(&dir.join(STATE_JSON_FILE), |tmp| {
            std::fs::write(tmp, text).map_err(io("cannot write", tmp))
        })
    }

    /// Restores a state written by [`save_state`](Self::save_state) into an optimizer built
    /// over the same parameters with the same γ and period. With the weights of the same step
    /// (for example from [`save_llama`](crate::save_llama)), the run then goes on exactly as if
    /// it had not stopped: same active blocks, same moments, same future draws.
    ///
    /// # Errors
    /// [`LisaError::InvalidState`] when the state does not fit (other γ or period, unknown
    /// parameter, a moment of the wrong shape, a sampler that cannot restore), [`LisaError::Io`]
    /// or [`LisaError::Json`] for unreadable files. Nothing is changed then.
    pub fn load_state(&mut self, dir: impl AsRef<std::path::Path>) -> Result<()> {
        use crate::checkpoint::io;
        let dir = dir.as_ref();
        let bad = |reason: String| LisaError::InvalidState {
            path: dir.to_path_buf(),
            reason,
        };
        let json_path = dir.join(STATE_JSON_FILE);
        let text = std::fs::read_to_string(&json_path).map_err(io("cannot read", &json_path))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| LisaError::Json {
                path: json_path.clone(),
                source,
            })?;
        if json["format"] != STATE_FORMAT {
            return Err(bad(format!(
                "format is {}, expected {STATE_FORMAT}",
                json["format"]
            )));
        }
        let num = |key: &str| {
            json[key]
                .as_u64()
                .ok_or_else(|| bad(format!("no integer {key:?}")))
        };
        let (gamma, period) = (num("gamma")?, num("period")?);
        if gamma != self.gamma as u64 || period != self.period as u64 {
            return Err(bad(format!(
                "it was saved with gamma {gamma} and period {period}, this optimizer has gamma {} and period {}",
                self.gamma, self.period
            )));
        }
        let names: Vec<String> = serde_json::from_value(json["names"].clone())
            .map_err(|e| bad(format!("bad \"names\": {e}")))?;
        if !names
            .iter()
            .map(String::as_str)
            .eq(self.map.iter().map(|(n, _)| n))
        {
            return Err(bad(format!(
                "it was saved for {} parameters that differ from this optimizer's {}",
                names.len(),
                self.map.len()
            )));
        }
        let active: Vec<usize> = serde_json::from_value(json["active"].clone())
            .map_err(|e| bad(format!("bad \"active\": {e}")))?;
        if active.len() != self.gamma || active.iter().any(|&b| b >= self.map.num_blocks()) {
            return Err(bad(format!(
                "active blocks {active:?} do not fit {} blocks",
                self.map.num_blocks()
            )));
        }
        let params: ParamsAdamW = {
            let p = &json["params"];
            let f = |k: &str| {
                p[k].as_f64()
                    .ok_or_else(|| bad(format!("no number params.{k}")))
            };
            ParamsAdamW {
                lr: f("lr")?,
                beta1: f("beta1")?,
                beta2: f("beta2")?,
                eps: f("eps")?,
                weight_decay: f("weight_decay")?,
            }
        };
        check_params(&params)?;
        let steps = json["param_steps"]
            .as_object()
            .ok_or_else(|| bad("no \"param_steps\" object".into()))?;
        let tensors_path = dir.join(STATE_TENSORS_FILE);
        let device = self
            .vars
            .first()
            .map_or(Device::Cpu, |v| v.device().clone());
        let mut tensors = candle_core::safetensors::load(&tensors_path, &device)?;
        let mut state: Vec<Option<Moments>> = (0..self.vars.len()).map(|_| None).collect();
        for (i, var) in self.vars.iter().enumerate() {
            let name = self.map.name_at(i);
            let trainable = match self.map.group_at(i) {
                ParamGroup::Always => true,
                ParamGroup::Block(b) => active.contains(&b),
                ParamGroup::Never => false,
            };
            if !trainable {
                continue;
            }
            let step = steps.get(name).and_then(|s| s.as_u64());
            let (m, v) = (
                tensors.remove(&format!("m/{name}")),
                tensors.remove(&format!("v/{name}")),
            );
            let (Some(step), Some(m), Some(v)) = (step, m, v) else {
                return Err(bad(format!("no state for trainable parameter {name}")));
            };
            if m.shape() != var.shape() || v.shape() != var.shape() || m.dtype() != var.dtype() {
                return Err(bad(format!(
                    "the moments of {name} do not match its shape {:?}",
                    var.shape()
                )));
            }
            state[i] = Some(Moments { m, v, step });
        }
        if let Some(extra) = tensors.keys().next() {
            return Err(bad(format!(
                "it holds {extra}, which this optimizer does not train"
            )));
        }
        let (taken, period_index) = (num("steps")?, num("period_index")?);
        // The last fallible change: everything above left the optimizer untouched.
        if !json["sampler"].is_null() {
            self.sampler
                .restore(&json["sampler"])
                .map_err(|e| bad(format!("sampler: {e}")))?;
        }
        self.state = state;
        self.active = active;
        self.params = params;
        self.steps = taken;
        self.period_index = period_index;
        self.resampled = json["resampled"].as_bool().unwrap_or(false);
        Ok(())
    }
}
