//! The model shapes and training methods compared by the memory report and the benches.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor};
use candle_lisa::nn::{frozen_var_builder, named_vars};
use candle_lisa::optim::{CompactState, SamplerChoice};
use candle_lisa::{LisaAdamW, LisaConfig, Llama, LlamaConfig, LoraConfig};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};

/// Shape names: SmolLM2-135M; LLaMA-2-7B's proportions at a CPU-friendly size (embedding and
/// head about 4% of the parameters, as in the real model); Llama-3.2-1B (1.24B parameters, a
/// tied 128k-token embedding: a GPU shape); Llama-3.1-8B's proportions (at T = 256, 1/64 of
/// every term of the real model at T = 2048: 32 blocks, hidden 512, GQA 8/2, vocabulary
/// 128256/8, untied); a tiny one for smoke tests.
pub const SHAPES: [&str; 5] = [
    "smollm2-135m",
    "llama2-7b-scaled",
    "llama3.2-1b",
    "llama3-8b-scaled",
    "tiny",
];

/// Variant names, in report order.
pub const METHODS: [&str; 13] = [
    "full",
    "adamw-candle",
    "lora16",
    "lora128",
    "lisa1",
    "lisa2",
    "lisa4",
    "lisa2-dropin",
    "lisa1-recompute",
    "lisa2-recompute",
    "lisa4-recompute",
    "lisa2-frozen-embed",
    "lisa2-compact",
];

/// The Llama config of a shape name.
pub fn shape_config(name: &str) -> std::result::Result<LlamaConfig, String> {
    let mut c = match name {
        "smollm2-135m" => {
            let mut c = LlamaConfig::tiny(49152, 576, 30, 9, 3);
            c.intermediate_size = 1536;
            c.tie_word_embeddings = true;
            c.rope_theta = Some(100_000.0);
            c
        }
        "llama2-7b-scaled" => {
            let mut c = LlamaConfig::tiny(4000, 512, 32, 8, 8);
            c.intermediate_size = 1376;
            c
        }
        "llama3.2-1b" => {
            let mut c = LlamaConfig::tiny(128256, 2048, 16, 32, 8);
            c.intermediate_size = 8192;
            c.tie_word_embeddings = true;
            c.rope_theta = Some(500_000.0);
            c
        }
        "llama3-8b-scaled" => {
            let mut c = LlamaConfig::tiny(16032, 512, 32, 8, 2);
            c.intermediate_size = 1792;
            c.rope_theta = Some(500_000.0);
            c
        }
        "tiny" => {
            let mut c = LlamaConfig::tiny(258, 128, 8, 4, 2);
            c.intermediate_size = 352;
            c.tie_word_embeddings = true;
            c
        }
        _ => return Err(format!("unknown shape {name:?}; choose from {SHAPES:?}")),
    };
    c.max_position_embeddings = 4096;
    Ok(c)
}

/// What a method name asks for.
#[derive(Clone, Copy, Debug)]
pub enum Variant {
    /// The crate's lean AdamW over every parameter.
    Full,
    /// `candle_nn::AdamW` over every parameter, the model built from the `VarMap`.
    AdamwCandle,
    /// LoRA of this rank on all seven projections, α = 2 × rank.
    Lora(usize),
    /// LISA with γ = `gamma`, redrawing every 2 steps.
    Lisa {
        gamma: usize,
        /// The model is built from the `VarMap`, not from the optimizer.
        drop_in: bool,
        /// Frozen blocks are recomputed in the backward pass.
        recompute: bool,
        /// The input embedding is frozen (`LisaConfig::train_embedding` off).
        frozen_embed: bool,
        /// Every trainable parameter keeps bf16 moments (`CompactState::All`, CPU only).
        compact: bool,
    },
}

impl std::str::FromStr for Variant {
    type Err = String;

    fn from_str(name: &str) -> std::result::Result<Self, String> {
        let unknown = || format!("unknown method {name:?}; choose from {METHODS:?}");
        if name == "full" {
            return Ok(Variant::Full);
        }
        if name == "adamw-candle" {
            return Ok(Variant::AdamwCandle);
        }
        if let Some(rank) = name.strip_prefix("lora") {
            return rank.parse().map(Variant::Lora).map_err(|_| unknown());
        }
        let rest = name.strip_prefix("lisa").ok_or_else(unknown)?;
        let (gamma, variant) = rest.split_once('-').unwrap_or((rest, ""));
        let gamma = gamma.parse().map_err(|_| unknown())?;
        match variant {
            "" | "dropin" | "recompute" | "frozen-embed" | "compact" => Ok(Variant::Lisa {
                gamma,
                drop_in: variant == "dropin",
                // Compact state is measured with recompute: the leanest LISA.
                recompute: variant == "recompute" || variant == "compact",
                frozen_embed: variant == "frozen-embed",
                compact: variant == "compact",
            }),
            _ => Err(unknown()),
        }
    }
}

/// Randomly initialised weights of a shape, with LoRA adapters when the method has them.
pub struct Weights {
    pub config: LlamaConfig,
    pub base: VarMap,
    pub adapters: VarMap,
    pub lora: Option<LoraConfig>,
    pub device: Device,
    pub dtype: DType,
}

impl Weights {
    /// Weights in `dtype` (adapters too).
    pub fn new(
        config: LlamaConfig,
        method: Variant,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let base = VarMap::new();
        Llama::new(&config, VarBuilder::from_varmap(&base, dtype, device))?;
        let adapters = VarMap::new();
        let lora = match method {
            Variant::Lora(rank) => {
                let lora = LoraConfig {
                    rank,
                    alpha: 2.0 * rank as f64,
                    ..Default::default()
                };
                let vb = VarBuilder::from_varmap(&adapters, dtype, device);
                Llama::with_lora(&config, frozen_var_builder(&base)?, &lora, vb)?;
                Some(lora)
            }
            _ => None,
        };
        Ok(Self {
            config,
            base,
            adapters,
            lora,
            device: device.clone(),
            dtype,
        })
    }

    /// Number of scalars in the weights and adapters.
    pub fn params(&self) -> usize {
        [&self.base, &self.adapters]
            .iter()
            .flat_map(|m| m.all_vars())
            .map(|v| v.elem_count())
            .sum()
    }

    /// Bytes of the weights and adapters.
    pub fn bytes(&self) -> usize {
        [&self.base, &self.adapters]
            .iter()
            .flat_map(|m| m.all_vars())
            .map(|v| v.elem_count() * v.dtype().size_in_bytes())
            .sum()
    }
}

enum Optim {
    Lean { opt: Box<LisaAdamW>, rebuild: bool },
    Candle(AdamW),
}

/// A model and its optimizer, ready to step.
pub struct Training {
    weights: Weights,
    optim: Optim,
    model: Llama,
}

/// What one step left behind.
pub struct Step {
    /// Bytes of the gradients the backward pass stored.
    pub grad_bytes: usize,
    /// Whether LISA drew new blocks (and the model was rebuilt).
    pub resampled: bool,
}

impl Training {
    /// Builds the optimizer (allocating its state) and the model. Learning rate 1e-5; LISA
    /// draws with `sampler`.
    pub fn new(weights: Weights, method: Variant, sampler: &SamplerChoice) -> Result<Self> {
        let params = ParamsAdamW {
            lr: 1e-5,
            ..Default::default()
        };
        let optim = match method {
            Variant::Full => Optim::Lean {
                opt: Box::new(LisaAdamW::all_trainable(
                    named_vars(&weights.base)?,
                    params,
                )?),
                rebuild: false,
            },
            Variant::Lora(_) => Optim::Lean {
                opt: Box::new(LisaAdamW::all_trainable(
                    named_vars(&weights.adapters)?,
                    params,
                )?),
                rebuild: false,
            },
            Variant::AdamwCandle => Optim::Candle(AdamW::new(weights.base.all_vars(), params)?),
            Variant::Lisa {
                gamma,
                drop_in,
                recompute,
                frozen_embed,
                compact,
            } => {
                let config = LisaConfig {
                    gamma,
                    period: 2,
                    sampler: sampler.clone(),
                    recompute_frozen: recompute,
                    train_embedding: !frozen_embed,
                    ..Default::default()
                };
                let mut opt = LisaAdamW::new(&weights.base, params, config)?;
                if compact {
                    opt.set_compact_state(CompactState::All)?;
                }
                Optim::Lean {
                    opt: Box::new(opt),
                    rebuild: !drop_in,
                }
            }
        };
        let model = build(&weights, &optim)?;
        Ok(Self {
            weights,
            optim,
            model,
        })
    }

    /// Forward, backward, optimizer step; rebuilds the model after a LISA resample.
    pub fn step(&mut self, ids: &Tensor, labels: &Tensor) -> Result<Step> {
        let grads = self.model.loss(ids, labels)?.backward()?;
        let grad_bytes = grad_bytes(&grads);
        let resampled = self.update(grads)?;
        Ok(Step {
            grad_bytes,
            resampled,
        })
    }

    /// The optimizer step on `grads`, then the model's rebuild if LISA drew new blocks;
    /// whether it did.
    fn update(&mut self, grads: GradStore) -> Result<bool> {
        let resampled = match &mut self.optim {
            Optim::Lean { opt, .. } => {
                opt.try_step(&grads)?;
                opt.resampled()
            }
            Optim::Candle(opt) => {
                opt.step(&grads)?;
                false
            }
        };
        drop(grads);
        if resampled {
            self.model = build(&self.weights, &self.optim)?;
        }
        Ok(resampled)
    }

    /// [`step`](Self::step) with `sync` (a device synchronisation) after the forward pass,
    /// the backward pass and the update: the three phases' times in milliseconds. The update
    /// includes the model's rebuild after a LISA resample.
    pub fn step_phases(
        &mut self,
        ids: &Tensor,
        labels: &Tensor,
        sync: &dyn Fn() -> Result<()>,
    ) -> Result<[f64; 3]> {
        let ms = |start: std::time::Instant| start.elapsed().as_secs_f64() * 1e3;
        sync()?;
        let start = std::time::Instant::now();
        let loss = self.model.loss(ids, labels)?;
        sync()?;
        let forward = ms(start);
        let start = std::time::Instant::now();
        let grads = loss.backward()?;
        sync()?;
        let backward = ms(start);
        let start = std::time::Instant::now();
        self.update(grads)?;
        sync()?;
        Ok([forward, backward, ms(start)])
    }

    /// Bytes of optimizer state now (candle_nn::AdamW holds m and v for every variable).
    pub fn state_bytes(&self) -> usize {
        match &self.optim {
            Optim::Lean { opt, .. } => opt.state_bytes(),
            Optim::Candle(_) => 2 * self.weights.bytes(),
        }
    }

    /// Parameters trainable now.
    pub fn trainable_params(&self) -> usize {
        match &self.optim {
            Optim::Lean { opt, .. } => opt.trainable_params(),
            Optim::Candle(_) => self.weights.params(),
        }
    }
}

/// Model FLOPs of one training step of `method` on `b` sequences of `t` tokens: matmuls
/// (2 FLOPs per multiply-add) and causal attention (half the T × T score and value products),
/// forward and backward, as the method needs them, without recomputation. Every method
/// propagates dL/dx through every block (the embedding trains, or LoRA's lowest adapters do);
/// weight gradients are those of what trains.
pub fn step_flops(c: &LlamaConfig, method: Variant, b: usize, t: usize) -> f64 {
    let (h, f, l) = (
        c.hidden_size as f64,
        c.intermediate_size as f64,
        c.num_hidden_layers as f64,
    );
    let d = (c.hidden_size / c.num_attention_heads) as f64;
    let (q, kv) = (
        c.num_attention_heads as f64 * d,
        c.num_key_value_heads.unwrap_or(c.num_attention_heads) as f64 * d,
    );
    let tokens = (b * t) as f64;
    let block = h * q + 2.0 * h * kv + q * h + 3.0 * h * f;
    let head = c.vocab_size as f64 * h;
    let linear = 2.0 * tokens * (l * block + head);
    let attention = l * b as f64 * 2.0 * (t as f64).powi(2) * q;
    let forward = linear + attention;
    let input_grads = linear + 2.0 * attention;
    match method {
        Variant::Full | Variant::AdamwCandle => 3.0 * forward,
        Variant::Lisa { gamma, .. } => {
            let trained = gamma.min(c.num_hidden_layers) as f64 * block + head;
            forward + input_grads + 2.0 * tokens * trained
        }
        Variant::Lora(r) => {
            // Seven adapters a block: A (in × r) and B (r × out) of q, k, v, o, gate, up, down.
            let per_block = r as f64 * ((h + q) + 2.0 * (h + kv) + (q + h) + 3.0 * (h + f));
            let adapters = 2.0 * tokens * l * per_block;
            forward + adapters + input_grads + 2.0 * adapters
        }
    }
}

fn build(w: &Weights, optim: &Optim) -> Result<Llama> {
    let vb = |m: &VarMap| VarBuilder::from_varmap(m, w.dtype, &w.device);
    Ok(match (optim, &w.lora) {
        (_, Some(lora)) => Llama::with_lora(
            &w.config,
            frozen_var_builder(&w.base)?,
            lora,
            vb(&w.adapters),
        )?,
        (Optim::Lean { opt, rebuild: true }, None) => Llama::from_plan(&w.config, &opt.plan())?,
        _ => Llama::new(&w.config, vb(&w.base))?,
    })
}

/// Bytes of every gradient in the store.
pub fn grad_bytes(grads: &GradStore) -> usize {
    grads
        .get_ids()
        .filter_map(|id| grads.get_id(*id))
        .map(|g| g.elem_count() * g.dtype().size_in_bytes())
        .sum()
}

/// A batch of `b` sequences of `t` token ids spread over the vocabulary, and its labels.
pub fn batch(
    config: &LlamaConfig,
    b: usize,
    t: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let ids: Vec<u32> = (0..b * t)
        .map(|i| (i as u64 * 7919 % config.vocab_size as u64) as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (b, t), device)?;
    let labels = ids.to_dtype(DType::I64)?;
    Ok((ids, labels))
}
