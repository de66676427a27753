//! `candle-lisa generate` and `candle-lisa merge`: a model's continuation of a prompt, and a
//! LoRA adapter folded into its base.

use std::path::PathBuf;

use candle_core::{DType, Device};
use clap::Args;

use super::Error;
use crate::data::chat::SpecialTokens;
use crate::data::tokenizer_for;
use crate::models::hub::resolve_model;
use crate::models::{load_llama, save_llama_with, Llama, Sampling, SaveOptions};
use crate::nn::{frozen_var_builder, load_peft, merged_copy};

/// The dtype a flag names.
fn dtype(name: &str) -> Result<DType, Error> {
    match name {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        other => Err(format!("--dtype {other}: use f32, bf16 or f16").into()),
    }
}

/// `candle-lisa generate`: continues a prompt (greedy, or sampled above temperature 0) and
/// prints the continuation.
#[derive(Args, Debug, Clone)]
pub struct GenerateCommand {
    /// A Hugging Face Llama-family directory (a fine-tune's `<out>/<method>/model`, say), or a
    /// Hub id in the local Hugging Face cache.
    #[arg(long)]
    pub model: PathBuf,
    /// The text to continue, as it is (no chat template is applied).
    #[arg(long)]
    pub prompt: String,
    /// The most tokens to add.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0 picks the most likely token; above 0 tokens are drawn from softmax(logits / T).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Seeds the draws above temperature 0.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The dtype the weights are loaded in.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    pub dtype: String,
}

impl GenerateCommand {
    /// Loads the model and prints the prompt's continuation, up to an end-of-sequence token
    /// of the model's (not printed).
    ///
    /// # Errors
    /// Those of loading the model and tokenizer, and of [`Llama::generate`].
    pub fn run(&self) -> Result<(), Error> {
        let dev = Device::Cpu;
        let dir = resolve_model(&self.model)?;
        let tok = tokenizer_for(&dir)?;
        let special = SpecialTokens::from_dir(&dir, tok.as_ref())?;
        let (config, weights) = load_llama(&dir, dtype(&self.dtype)?, &dev)?;
        let model = Llama::new(&config, frozen_var_builder(&weights)?)?;
        let sampling = Sampling {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            seed: self.seed,
            stop: special.eos.clone(),
        };
        let ids = model.generate(&tok.encode(&self.prompt)?, &sampling)?;
        let kept: Vec<u32> = ids
            .into_iter()
            .take_while(|id| !special.eos.contains(id))
            .collect();
        println!("{}", tok.decode(&kept)?);
        Ok(())
    }
}

/// `candle-lisa merge`: a PEFT LoRA adapter (as `finetune --method lora` writes it, or PEFT)
/// folded into its base model, saved as a plain Hugging Face checkpoint with the base's
/// tokenizer files.
#[derive(Args, Debug, Clone)]
pub struct MergeCommand {
    /// The base model's directory, or its Hub id in the local Hugging Face cache.
    #[arg(long)]
    pub base: PathBuf,
    /// The adapter's directory (`adapter_config.json`, `adapter_model.safetensors`).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Where the merged model goes.
    #[arg(long)]
    pub out: PathBuf,
    /// The dtype the merge is computed and saved in.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    pub dtype: String,
}

impl MergeCommand {
    /// Merges and saves.
    ///
    /// # Errors
    /// Those of [`load_llama`], [`load_peft`], [`merged_copy`] and [`save_llama_with`].
    pub fn run(&self) -> Result<(), Error> {
        let (dev, dtype) = (Device::Cpu, dtype(&self.dtype)?);
        let base_dir = resolve_model(&self.base)?;
        let (config, base) = load_llama(&base_dir, dtype, &dev)?;
        let adapter = load_peft(&self.adapter, dtype, &dev)?;
        let merged = merged_copy(&base, &adapter.adapters, &adapter.config)?;
        let options = SaveOptions {
            copy_files_from: Some(base_dir),
            ..Default::default()
        };
        save_llama_with(&self.out, &config, &merged, dtype, &options)?;
        println!("wrote {}", self.out.display());
        Ok(())
    }
}
