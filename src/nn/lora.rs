//! LoRA adapters for [`Llama`](crate::Llama): the baseline LISA is measured against.

use candle_core::Tensor;
use candle_nn::{VarBuilder, VarMap};

use crate::error::{LisaError, Result};
use crate::nn::linear::{Linear, LoraAdapter};

/// The projections LoRA can adapt, by the last part of their Hugging Face names (Phi-3's
/// fused `qkv_proj` and `gate_up_proj` included; a model adapts those it has).
pub const LORA_TARGETS: [&str; 9] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "qkv_proj",
    "gate_up_proj",
];

/// LoRA settings.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    /// r, the adapter rank.
    pub rank: usize,
    /// α; adapters are scaled by α / r.
    pub alpha: f64,
    /// Which projections get adapters (names from [`LORA_TARGETS`]).
    pub targets: Vec<String>,
}

impl Default for LoraConfig {
    /// Rank 16, α = 32, every projection of [`LORA_TARGETS`].
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: 32.0,
            targets: LORA_TARGETS.iter().map(|t| t.to_string()).collect(),
        }
    }
}

impl LoraConfig {
    /// Checks rank, α and targets.
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(LisaError::InvalidConfig(
                "LoRA rank must be at least 1".into(),
            ));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(LisaError::InvalidConfig(format!(
                "LoRA alpha {} must be finite and positive",
                self.alpha
            )));
        }
        if let Some(t) = self
            .targets
            .iter()
            .find(|t| !LORA_TARGETS.contains(&t.as_str()))
        {
            return Err(LisaError::InvalidConfig(format!(
                "unknown LoRA target {t:?}; use some of {LORA_TARGETS:?}"
            )));
        }
        Ok(())
    }

    /// α / r.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Adds an adapter to `layer` when `name` (e.g. `q_proj`) is a target; its tensors are
    /// `lora_A.weight` `(rank, in)` (uniform in ±1/√in, as PEFT) and `lora_B.weight`
    /// `(out, rank)` (zeros, so training starts from the base model) under `vb`.
    pub(crate) fn wrap(
        &self,
        layer: Linear,
        name: &str,
        vb: &VarBuilder,
    ) -> candle_core::Result<Linear> {
        if !self.targets.iter().any(|t| t == name) {
            return Ok(layer);
        }
        let (out_dim, in_dim) = layer.weight_shape()?;
        let bound = 1.0 / (in_dim as f64).sqrt();
        let vb = vb.pp(name);
        let a = vb.get_with_hints(
            (self.rank, in_dim),
            "lora_A.weight",
            candle_nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        let b = vb.get_with_hints(
            (out_dim, self.rank),
            "lora_B.weight",
            candle_nn::Init::Const(0.0),
        )?;
        Ok(layer.with_lora(LoraAdapter {
            a,
            b,
            scale: self.scale(),
        }))
    }
}

/// Folds trained adapters into the base weights: `W += (α / r) · B · A` for every adapter in
/// `adapters`, so the base `VarMap` can be saved as a plain checkpoint.
///
/// # Errors
/// [`LisaError::MissingTensor`] when an adapter has no matching base weight or no `B`.
pub fn merge_lora(base: &VarMap, adapters: &VarMap, config: &LoraConfig) -> Result<()> {
    let poisoned = |_| candle_core::Error::msg("a VarMap's lock is poisoned");
    let adapters = adapters.data().lock().map_err(poisoned)?;
    let base = base.data().lock().map_err(poisoned)?;
    let mut names: Vec<&String> = adapters
        .keys()
        .filter(|n| n.ends_with(".lora_A.weight"))
        .collect();
    names.sort();
    // Compute every delta first, so a missing tensor leaves the base untouched.
    let mut updates: Vec<(&candle_core::Var, Tensor)> = Vec::with_capacity(names.len());
    for a_name in names {
        let prefix = a_name.trim_end_matches(".lora_A.weight");
        let b_name = format!("{prefix}.lora_B.weight");
        let w_name = format!("{prefix}.weight");
        let b = adapters
            .get(&b_name)
            .ok_or_else(|| LisaError::MissingTensor {
                name: b_name.clone(),
                expected: vec![],
            })?;
        let w = base.get(&w_name).ok_or_else(|| LisaError::MissingTensor {
            name: w_name.clone(),
            expected: vec![],
        })?;
        let a = adapters[a_name].as_tensor().detach();
        let delta = (b.as_tensor().detach().matmul(&a)? * config.scale())?.to_dtype(w.dtype())?;
        updates.push((w, (w.as_tensor().detach() + delta)?));
    }
    for (w, merged) in updates {
        w.set(&merged)?;
    }
    Ok(())
}

/// A copy of `base` with the adapters folded in ([`merge_lora`] on a copy): the fine-tuned
/// model as a plain checkpoint, while training can go on with the base and adapters apart.
///
/// # Errors
/// Those of [`merge_lora`]; candle errors when a copy cannot be allocated.
pub fn merged_copy(base: &VarMap, adapters: &VarMap, config: &LoraConfig) -> Result<VarMap> {
    let merged = VarMap::new();
    {
        let poisoned = |_| candle_core::Error::msg("a VarMap's lock is poisoned");
        let mut out = merged.data().lock().map_err(poisoned)?;
        for (name, var) in base.data().lock().map_err(poisoned)?.iter() {
            let copy = candle_core::Var::from_tensor(&var.as_tensor().copy()?)?;
            out.insert(name.clone(), copy);
        }
    }
    merge_lora(&merged, adapters, config)?;
    Ok(merged)
}

/// Initialises every `lora_A` matrix in `adapters` uniformly in ±1/√in from a ChaCha8
/// generator seeded by `seed` (candle's own initialisation cannot be seeded), and leaves `B`
/// at zero, so the adapted model starts as the base model and a run is reproducible.
///
/// # Errors
/// Candle errors when a tensor cannot be written.
pub fn seed_adapters(adapters: &VarMap, seed: u64) -> Result<()> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x10AA);
    let data = adapters
        .data()
        .lock()
        .map_err(|_| candle_core::Error::msg("a VarMap's lock is poisoned"))?;
    let mut names: Vec<&String> = data
        .keys()
        .filter(|n| n.ends_with("lora_A.weight"))
        .collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let bound = 1.0 / (var.dim(1)? as f64).sqrt();
        let values: Vec<f32> = (0..var.elem_count())
            .map(|_| rng.random_range(-bound..bound) as f32)
            .collect();
        let t = Tensor::from_vec(values, var.shape(), var.device())?.to_dtype(var.dtype())?;
        var.set(&t)?;
    }
    Ok(())
}
