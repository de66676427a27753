//! [`LlamaFineTune`]: a Llama-family model and its [`Trainer`] for any of full fine-tuning,
//! LoRA or LISA, with evaluation and export.

use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::{ParamsAdamW, VarBuilder, VarMap};

use super::schedule::LrSchedule;
use super::trainer::{Trainer, TrainerConfig};
use crate::data::{pad_batch, Example};
use crate::error::Result;
use crate::models::{save_llama_with, Llama, LlamaConfig, SaveOptions};
use crate::nn::calibrate::observe_linear_inputs;
use crate::nn::{
    frozen_var_builder, merged_copy, named_vars, seed_adapters, LoraConfig, TrainingPlan,
};
use crate::optim::{outlier_ratios, AdamW, LisaAdamW, LisaConfig, LossScaler, LLAMA_BLOCK_PATTERN};

/// OwLore's block weights for sampling ([`SamplerChoice::Weighted`](crate::optim::SamplerChoice::Weighted)):
/// the layerwise outlier ratio of each block at threshold `m`
/// ([`outlier_ratios`]), from one forward pass of the frozen base model over `examples`, 8
/// at a time, cut to `seq_len` tokens, with every projection's input observed.
///
/// # Errors
/// Those of the model, of [`pad_batch`] and of [`outlier_ratios`].
pub fn owlore_weights(
    config: &LlamaConfig,
    base: &VarMap,
    examples: &[Example],
    m: f64,
    seq_len: usize,
    device: &Device,
) -> Result<Vec<f64>> {
    let plan = TrainingPlan::new(frozen_var_builder(base)?, false);
    let model = Llama::from_plan(config, &plan)?;
    let (_, inputs) = observe_linear_inputs(|| {
        for chunk in examples.chunks(8) {
            let batch = pad_batch(chunk, 0, Some(seq_len), device)?;
            model.forward(&batch.ids)?;
        }
        Ok(())
    })?;
    outlier_ratios(base, LLAMA_BLOCK_PATTERN, &inputs, m)
}

/// How to fine-tune.
#[derive(Clone, Debug, PartialEq)]
pub enum Method {
    /// AdamW over every weight.
    Full,
    /// LoRA adapters (seeded by the given seed) over frozen weights.
    Lora(LoraConfig, u64),
    /// LISA over every weight.
    Lisa(LisaConfig),
}

/// A Llama-family model being fine-tuned: its base weights, the LoRA adapters if the method
/// has them, and the trainer.
///
/// An f16 model gets a [`LossScaler`] (f16 gradients underflow and overflow without one).
pub struct LlamaFineTune {
    /// The trainer; step it with [`Trainer::step`].
    pub trainer: Trainer<Llama>,
    config: LlamaConfig,
    base: VarMap,
    lora: Option<(VarMap, LoraConfig)>,
}

impl LlamaFineTune {
    /// Sets up `method` over the weights `base` of a model described by `config` (as
    /// [`load_llama`](crate::load_llama) returns them).
    ///
    /// # Errors
    /// The optimizer's configuration errors, and candle errors.
    pub fn new(
        config: LlamaConfig,
        base: VarMap,
        method: Method,
        params: ParamsAdamW,
        schedule: impl LrSchedule + 'static,
        trainer_config: TrainerConfig,
    ) -> Result<Self> {
        let first = named_vars(&base)?.into_iter().next().map(|(_, v)| v);
        let (dtype, device) = first.map_or((DType::F32, candle_core::Device::Cpu), |v| {
            (v.dtype(), v.device().clone())
        });
        let (mut opt, lora) = match method {
            Method::Full => (
                AdamW::from_named_vars(named_vars(&base)?, params)?.into(),
                None,
            ),
            Method::Lisa(lisa) => (LisaAdamW::new(&base, params, lisa)?, None),
            Method::Lora(lora, seed) => {
                let adapters = VarMap::new();
                let vb = VarBuilder::from_varmap(&adapters, dtype, &device);
                Llama::with_lora(&config, frozen_var_builder(&base)?, &lora, vb)?;
                seed_adapters(&adapters, seed)?;
                let opt = AdamW::from_named_vars(named_vars(&adapters)?, params)?.into();
                (opt, Some((adapters, lora)))
            }
        };
        if dtype == DType::F16 {
            opt.set_loss_scaler(Some(LossScaler::default()));
        }
        let (c, frozen_base, adapters) = (config.clone(), frozen_var_builder(&base)?, lora.clone());
        let trainer = Trainer::new(opt, schedule, trainer_config, move |plan| match &adapters {
            None => Llama::from_plan(&c, plan),
            Some((adapters, lora)) => {
                let vb = VarBuilder::from_varmap(adapters, dtype, &device);
                Llama::with_lora(&c, frozen_base.clone(), lora, vb)
            }
        })?;
        Ok(Self {
            trainer,
            config,
            base,
            lora,
        })
    }

    /// The model over detached weights, for evaluation: it builds no graph.
    ///
    /// # Errors
    /// Candle errors.
    pub fn eval_model(&self) -> Result<Llama> {
        let base = frozen_var_builder(&self.base)?;
        match &self.lora {
            None => Llama::new(&self.config, base),
            Some((adapters, lora)) => {
                Llama::with_lora(&self.config, base, lora, frozen_var_builder(adapters)?)
            }
        }
    }

    /// Saves the fine-tuned model in the Hugging Face layout, in the weights' dtype (LoRA
    /// adapters merged into a copy of the base).
    ///
    /// # Errors
    /// Those of [`save_llama`](crate::models::save_llama).
    pub fn save_model(&self, dir: impl AsRef<Path>, dtype: DType) -> Result<()> {
        self.save_model_with(dir, dtype, &SaveOptions::default())
    }

    /// For LoRA, writes the adapters in PEFT's format (`adapter_config.json`,
    /// `adapter_model.safetensors`; see [`save_peft`](crate::nn::save_peft)) with `base_model`
    /// as `base_model_name_or_path`, and returns true; for the other methods writes nothing
    /// and returns false.
    ///
    /// # Errors
    /// Those of [`save_peft`](crate::nn::save_peft).
    pub fn save_adapter(
        &self,
        dir: impl AsRef<Path>,
        dtype: DType,
        base_model: Option<&str>,
    ) -> Result<bool> {
        match &self.lora {
            None => Ok(false),
            Some((adapters, lora)) => {
                crate::nn::save_peft(dir, adapters, lora, base_model, dtype)?;
                Ok(true)
            }
        }
    }

    /// [`save_model`](Self::save_model) with [`SaveOptions`]: shard size, and the directory
    /// the tokenizer files are copied from (the model's own, usually).
    ///
    /// # Errors
    /// Those of [`save_llama_with`].
    pub fn save_model_with(
        &self,
        dir: impl AsRef<Path>,
        dtype: DType,
        options: &SaveOptions,
    ) -> Result<()> {
        match &self.lora {
            None => save_llama_with(dir, &self.config, &self.base, dtype, options),
            Some((adapters, lora)) => save_llama_with(
                dir,
                &self.config,
                &merged_copy(&self.base, adapters, lora)?,
                dtype,
                options,
            ),
        }
    }
}
