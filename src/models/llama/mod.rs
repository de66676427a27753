//! A trainable Llama-family decoder: Llama (2, 3.x), Mistral, Qwen2/2.5, Qwen3, Phi-3, Gemma 2,
//! Gemma 3 (text), Granite (3.x), OLMo 2 and SmolLM3, with
//! Hugging Face tensor names and `config.json` in the formats transformers 4 and 5 write.
//!
//! Every `config.json` field that changes the computation is read or refused, once: a model
//! is built from the [`Architecture`] that [`LlamaConfig::architecture`] resolves, and its
//! forward pass reads only that.
//!
//! | field | handling |
//! |---|---|
//! | `model_type` | `llama`, `mistral`, `qwen2`, `qwen3`, `phi3` (fused `qkv_proj`, `gate_up_proj`), `gemma2`, `gemma3_text`, `granite`, `olmo2`, `smollm3`; anything else is refused |
//! | `vocab_size`, `hidden_size`, `intermediate_size`, `num_hidden_layers`, `num_attention_heads`, `num_key_value_heads`, `head_dim` | read |
//! | `hidden_act` | `silu` only (SwiGLU); Gemma 2's `hidden_activation`: `gelu_pytorch_tanh` (GeGLU) |
//! | Gemma 2's `query_pre_attn_scalar`, `attn_logit_softcapping`, `final_logit_softcapping` | read (transformers' defaults 256, 50, 30 when absent); soft-capping is refused for the other families |
//! | `use_bidirectional_attention` | false only |
//! | Gemma 3's `rope_local_base_freq`, `sliding_window_pattern`, `rope_parameters` keyed by layer kind | read: a RoPE per layer kind |
//! | Granite's `embedding_multiplier`, `residual_multiplier`, `attention_multiplier`, `logits_scaling` | read (1 when absent, as transformers; the attention multiplier replaces `head_dim^-½`); each must be finite and above 0 |
//! | OLMo 2's layout (from `model_type`) | norms after attention and MLP only (`post_attention_layernorm`, `post_feedforward_layernorm`), RMSNorm over the whole q and k projections |
//! | SmolLM3's `no_rope_layers`, `no_rope_layer_interval` | read: layers marked 0 (every 4th when the list is absent) use no RoPE |
//! | `pad_token_id` | that embedding row gets no gradient from the input lookup, as `nn.Embedding(padding_idx=…)`; a value that is no token id is refused |
//! | `rms_norm_eps` | read; when absent, 1e-5 for `olmo2` and `phi3` (transformers' defaults), else 1e-6 |
//! | `rope_theta`, `rope_scaling` (transformers 4), `rope_parameters` (transformers 5) | read: [`Rope`] (default, linear, llama3, yarn; others refused; θ given twice must agree) |
//! | `tie_word_embeddings` | read; when absent, transformers' default: true for `gemma2`, `gemma3_text` and `smollm3`, false for the others |
//! | `attention_bias` | read (q, k, v and o biases; Qwen2 always has q, k, v biases) |
//! | `mlp_bias` | read |
//! | Qwen3's `q_norm`/`k_norm` | per-head RMSNorm on queries and keys, from `model_type` |
//! | `sliding_window`, `use_sliding_window`, `max_window_layers`, `layer_types` | read: each layer's window as transformers resolves it ([`LlamaConfig::layer_windows`]), at any sequence length in training; generating past a window is an error; `layer_types` other than `full_attention`/`sliding_attention` are refused |
//! | `pretraining_tp` | 1 only |
//! | `attention_dropout`, `resid_pdrop`, `embd_pdrop`, `hidden_dropout` | 0 only (no dropout here) |
//! | `partial_rotary_factor` (top level or in the RoPE object) | 1 only |
//! | `original_max_position_embeddings` (top level, Phi-3) | read for llama3/yarn RoPE |
//! | `attn_logit_softcapping`, `final_logit_softcapping` | refused unless null |
//! | `torch_dtype` (4), `dtype` (5) | storage dtype; a save writes both, as the dtype saved |
//! | `bos_token_id`, `eos_token_id`, `max_position_embeddings` and everything else | kept and written back |
//!
//! candle-transformers' Llama uses fused ops with no backward (`rms_norm`, `rope`,
//! `softmax_last_dim`), so its gradients are silently dropped. This one uses only ops with a
//! backward ([`crate::nn::ops`]), sends every projection through the frozen-aware
//! [`Linear`], and treats masks, RoPE tables and frozen norm weights as
//! constants, so a model built from [`LisaAdamW::var_builder`](crate::LisaAdamW::var_builder)
//! stores gradients only for what trains.

mod arch;
mod attention;
mod config;
mod generation;
mod mlp;

use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use crate::error::Result;
use crate::nn::linear::Linear;
use crate::nn::lora::LoraConfig;
use crate::nn::loss::{causal_lm_loss, head_loss};
use crate::nn::ops::{mul_const, rms_norm, CausalMask};
use crate::nn::recompute::recompute;
use crate::nn::TrainingPlan;

pub use arch::{Activation, Architecture, Family, NormPlacement, QkNorm};
use attention::{projection, Adapters, Attention};
pub use config::LlamaConfig;
pub use generation::Sampling;
use mlp::Mlp;

pub use super::rope::{Rope, RopeScaling};
pub use crate::nn::loss::IGNORE_INDEX;

struct Block {
    norms: BlockNorms,
    attn: Attention,
    mlp: Mlp,
    /// Norm weights scale by `1 + w` (Gemma).
    norm_offset: bool,
    /// Granite's factor on the attention's and the MLP's outputs.
    residual_scale: Option<f64>,
}

/// A block's norm weights, by where they sit ([`NormPlacement`]).
enum BlockNorms {
    /// `input_layernorm` before the attention, `post_attention_layernorm` before the MLP.
    Pre { attn_in: Tensor, mlp_in: Tensor },
    /// Gemma: before and after the attention and the MLP.
    Sandwich {
        attn_in: Tensor,
        attn_out: Tensor,
        mlp_in: Tensor,
        mlp_out: Tensor,
    },
    /// OLMo 2: after the attention and the MLP.
    Post { attn_out: Tensor, mlp_out: Tensor },
}

impl BlockNorms {
    fn tensors(&self) -> Vec<&Tensor> {
        match self {
            Self::Pre { attn_in, mlp_in } => vec![attn_in, mlp_in],
            Self::Sandwich {
                attn_in,
                attn_out,
                mlp_in,
                mlp_out,
            } => vec![attn_in, attn_out, mlp_in, mlp_out],
            Self::Post { attn_out, mlp_out } => vec![attn_out, mlp_out],
        }
    }
}

/// `w`, or Gemma's `1 + w` (differentiable in `w`).
fn norm_weight(w: &Tensor, offset: bool) -> candle_core::Result<Tensor> {
    match offset {
        true => w + 1.0,
        false => Ok(w.clone()),
    }
}

impl Block {
    /// The block around `attn` (the attention on its input, normed where the placement
    /// says): Llama's `x + attn(norm(x))` then `x + mlp(norm(x))`, Gemma's with the outputs
    /// normed too, OLMo 2's with only the outputs normed.
    fn around(
        &self,
        x: &Tensor,
        eps: f64,
        attn: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let norm = |x: &Tensor, w: &Tensor| rms_norm(x, &norm_weight(w, self.norm_offset)?, eps);
        let add = |x: &Tensor, h: Tensor| match self.residual_scale {
            Some(r) => x + (h * r)?,
            None => x + h,
        };
        match &self.norms {
            BlockNorms::Pre { attn_in, mlp_in } => {
                let x = add(x, attn(&norm(x, attn_in)?)?)?;
                let h = self.mlp.forward(&norm(&x, mlp_in)?)?;
                add(&x, h)
            }
            BlockNorms::Sandwich {
                attn_in,
                attn_out,
                mlp_in,
                mlp_out,
            } => {
                let x = add(x, norm(&attn(&norm(x, attn_in)?)?, attn_out)?)?;
                let h = self.mlp.forward(&norm(&x, mlp_in)?)?;
                add(&x, norm(&h, mlp_out)?)
            }
            BlockNorms::Post { attn_out, mlp_out } => {
                let x = add(x, norm(&attn(x)?, attn_out)?)?;
                let h = self.mlp.forward(&x)?;
                add(&x, norm(&h, mlp_out)?)
            }
        }
    }

    fn forward(
        &self,
        x: &Tensor,
        rope_cs: &(Tensor, Tensor),
        mask: &CausalMask,
        eps: f64,
    ) -> candle_core::Result<Tensor> {
        self.around(x, eps, |h| self.attn.forward(h, rope_cs, mask))
    }

    fn forward_cached(
        &self,
        x: &Tensor,
        rope_cs: &(Tensor, Tensor),
        eps: f64,
        cache: &mut Option<(Tensor, Tensor)>,
    ) -> candle_core::Result<Tensor> {
        self.around(x, eps, |h| self.attn.forward_cached(h, rope_cs, cache))
    }

    /// Whether no tensor of the block needs a gradient (no variable, no LoRA adapter): only
    /// such a block may be recomputed, since recompute passes gradients to the input only.
    fn frozen(&self) -> bool {
        let a = &self.attn;
        let mut linears = a.qkv.linears();
        linears.push(&a.o);
        linears.extend(self.mlp.linears());
        self.norms.tensors().iter().all(|w| !w.track_op())
            && a.qk_norm
                .as_ref()
                .is_none_or(|(q, k, _)| !q.track_op() && !k.track_op())
            && linears.iter().all(|l| {
                l.lora().is_none() && !l.trains_weight() && l.bias().is_none_or(|b| !b.track_op())
            })
    }
}

/// A Llama-family decoder for training, built from a `VarBuilder`.
///
/// Build it from [`LisaAdamW::var_builder`](crate::LisaAdamW::var_builder) to train with LISA
/// (frozen blocks then store no weight gradient), or from a `VarBuilder` over a `VarMap` to
/// create fresh weights. Parameter names are Hugging Face's (`model.embed_tokens.weight`,
/// `model.layers.{i}.self_attn.q_proj.weight`, …, `lm_head.weight`).
pub struct Llama {
    embed: Tensor,
    /// In `Arc`s so that a recomputed block's forward can outlive this call of `forward`.
    blocks: Vec<Arc<Block>>,
    /// Indices of the blocks that [`forward`](Self::forward) recomputes (frozen ones, when
    /// recompute is on); sorted.
    recomputed: Vec<usize>,
    norm: Tensor,
    lm_head: Linear,
    config: LlamaConfig,
    /// `config` resolved: what the forward pass reads.
    arch: Architecture,
}

impl Llama {
    /// Builds the model; a builder over an empty `VarMap` creates weights initialised like
    /// candle's layers (norm weights at 1).
    pub fn new(config: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        Self::build(config, vb, None)
    }

    /// Builds the model with LoRA adapters on the projections `lora.targets`. The base weights
    /// come from `base` (use [`frozen_var_builder`](crate::nn::frozen_var_builder) so they get no
    /// gradient), the adapters from `adapters`, named
    /// `model.layers.{i}.self_attn.q_proj.lora_A.weight` and so on (a builder over an empty
    /// `VarMap` creates them: A uniform, B zero).
    pub fn with_lora(
        config: &LlamaConfig,
        base: VarBuilder,
        lora: &LoraConfig,
        adapters: VarBuilder,
    ) -> Result<Self> {
        lora.validate()?;
        Self::build(config, base, Some((lora, &adapters)))
    }

    fn build(config: &LlamaConfig, vb: VarBuilder, lora: Adapters) -> Result<Self> {
        let arch = config.architecture()?;
        let c = config;
        let a = &arch;
        // Gemma's norms scale by 1 + w, so they start at 0.
        let norm_init = candle_nn::Init::Const(if a.norm_offset { 0.0 } else { 1.0 });
        let embed = vb.get_with_hints(
            (c.vocab_size, c.hidden_size),
            "model.embed_tokens.weight",
            candle_nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        )?;
        let blocks = (0..c.num_hidden_layers)
            .map(|l| {
                let prefix = format!("model.layers.{l}");
                let vb = vb.pp(&prefix);
                let attn_vb = lora.map(|(_, a)| a.pp(format!("{prefix}.self_attn")));
                let mlp_vb = lora.map(|(_, a)| a.pp(format!("{prefix}.mlp")));
                let attn_lora = lora.zip(attn_vb.as_ref()).map(|((cfg, _), a)| (cfg, a));
                let mlp_lora = lora.zip(mlp_vb.as_ref()).map(|((cfg, _), a)| (cfg, a));
                let mlp = vb.pp("mlp");
                let (h, i, bias) = (c.hidden_size, c.intermediate_size, c.mlp_bias);
                let norm = |name: &str| vb.get_with_hints(h, name, norm_init);
                let norms = match a.norms {
                    NormPlacement::Pre => BlockNorms::Pre {
                        attn_in: norm("input_layernorm.weight")?,
                        mlp_in: norm("post_attention_layernorm.weight")?,
                    },
                    NormPlacement::Sandwich => BlockNorms::Sandwich {
                        attn_in: norm("input_layernorm.weight")?,
                        attn_out: norm("post_attention_layernorm.weight")?,
                        mlp_in: norm("pre_feedforward_layernorm.weight")?,
                        mlp_out: norm("post_feedforward_layernorm.weight")?,
                    },
                    NormPlacement::Post => BlockNorms::Post {
                        attn_out: norm("post_attention_layernorm.weight")?,
                        mlp_out: norm("post_feedforward_layernorm.weight")?,
                    },
                };
                Ok(Arc::new(Block {
                    norms,
                    attn: Attention::new(a, vb.pp("self_attn"), attn_lora)?,
                    norm_offset: a.norm_offset,
                    residual_scale: a.residual_scale,
                    mlp: match a.fused_projections {
                        true => Mlp::Fused {
                            gate_up: projection(h, 2 * i, bias, &mlp, "gate_up_proj", mlp_lora)?,
                            down: projection(i, h, bias, &mlp, "down_proj", mlp_lora)?,
                            width: i,
                        },
                        false => Mlp::Split {
                            gate: projection(h, i, bias, &mlp, "gate_proj", mlp_lora)?,
                            up: projection(h, i, bias, &mlp, "up_proj", mlp_lora)?,
                            down: projection(i, h, bias, &mlp, "down_proj", mlp_lora)?,
                            gelu: a.activation == Activation::GeluTanh,
                        },
                    },
                }))
            })
            .collect::<candle_core::Result<_>>()?;
        let norm = vb.get_with_hints(c.hidden_size, "model.norm.weight", norm_init)?;
        let lm_head = if a.tied {
            Linear::new(embed.clone(), None)
        } else {
            Linear::new(
                vb.get_with_hints(
                    (c.vocab_size, c.hidden_size),
                    "lm_head.weight",
                    candle_nn::init::DEFAULT_KAIMING_NORMAL,
                )?,
                None,
            )
        };
        Ok(Self {
            embed,
            blocks,
            recomputed: Vec::new(),
            norm,
            lm_head,
            config: c.clone(),
            arch,
        })
    }

    /// Builds the model for training as `plan` says: parameters from its builder, frozen
    /// blocks recomputed when [`TrainingPlan::recompute_frozen`] is true. With
    /// [`LisaAdamW::plan`](crate::LisaAdamW::plan), build it again after every step where
    /// [`resampled`](crate::LisaAdamW::resampled) is true: which blocks are recomputed follows
    /// the active set.
    pub fn from_plan(config: &LlamaConfig, plan: &TrainingPlan) -> Result<Self> {
        let mut model = Self::new(config, plan.var_builder())?;
        model.set_recompute_frozen(plan.recompute_frozen());
        Ok(model)
    }

    /// Turns frozen-block recompute on or off (see
    /// [`LisaConfig::recompute_frozen`](crate::LisaConfig::recompute_frozen)). A block is
    /// frozen when none of its tensors tracks gradients, as the builder of a
    /// [`TrainingPlan`] hands out the blocks it does not train; blocks with trainable
    /// weights or LoRA adapters always run as usual.
    pub fn set_recompute_frozen(&mut self, on: bool) {
        self.recomputed = match on {
            true => (0..self.blocks.len())
                .filter(|&i| self.blocks[i].frozen())
                .collect(),
            false => Vec::new(),
        };
    }

    /// The blocks that [`forward`](Self::forward) recomputes in the backward pass, sorted.
    pub fn recomputed_blocks(&self) -> &[usize] {
        &self.recomputed
    }

    /// The configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The configuration resolved: what the forward pass reads.
    pub fn architecture(&self) -> &Architecture {
        &self.arch
    }

    /// The final hidden states `(batch, seq, hidden)`, after the last norm, for token ids
    /// `(batch, seq)` (u32), with a causal mask.
    pub fn hidden_states(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let dtype = self.embed.dtype();
        let device = self.embed.device();
        let x = self
            .embed
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((b, t, self.arch.hidden_size))?;
        let x = self.mask_padding_gradient(x, input_ids)?;
        let mut x = self.scale_embedding(x)?;
        let tables = self.rope_tables(t, dtype, device)?;
        // One mask per distinct window (a window at least the sequence is the causal mask),
        // its matrix built only if a path needs one.
        let mut masks: Vec<CausalMask> = Vec::new();
        let eps = self.arch.rms_norm_eps;
        for (i, (block, rope_cs)) in self.blocks.iter().zip(&tables).enumerate() {
            let window = self
                .arch
                .layer_windows
                .get(i)
                .copied()
                .flatten()
                .filter(|&w| w < t);
            let mask = match masks.iter().position(|m| m.window() == window) {
                Some(at) => &masks[at],
                None => {
                    masks.push(CausalMask::new(t, window, dtype, device));
                    &masks[masks.len() - 1]
                }
            };
            x = if self.recomputed.binary_search(&i).is_ok() {
                let (block, rope_cs, mask) = (block.clone(), rope_cs.clone(), mask.clone());
                recompute(
                    &x,
                    Arc::new(move |x: &Tensor| block.forward(x, &rope_cs, &mask, eps)),
                )?
            } else {
                block.forward(&x, rope_cs, mask, eps)?
            };
        }
        Ok(rms_norm(
            &x,
            &norm_weight(&self.norm, self.arch.norm_offset)?,
            eps,
        )?)
    }

    /// Logits `(batch, seq, vocab)` for token ids `(batch, seq)` (u32), with a causal mask.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.cap_logits(self.lm_head.forward(&self.hidden_states(input_ids)?)?)
    }

    /// As transformers' `nn.Embedding(..., padding_idx=pad_token_id)`: the rows looked up
    /// for the padding id pass no gradient to the embedding (their values are unchanged).
    fn mask_padding_gradient(&self, x: Tensor, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self.arch.pad_token_id {
            Some(pad) if x.track_op() => {
                let (b, t) = ids.dims2()?;
                let keep = ids.ne(pad)?.to_dtype(x.dtype())?.reshape((b, t, 1))?;
                let drop = (1.0 - &keep)?;
                mul_const(&x, &keep)? + mul_const(&x.detach(), &drop)?
            }
            _ => Ok(x),
        }
    }

    /// Gemma 2 scales embeddings by √hidden (the factor rounded to the weights' dtype, as
    /// transformers does).
    fn scale_embedding(&self, x: Tensor) -> candle_core::Result<Tensor> {
        match self.arch.embedding_scale {
            Some(scale) => x * scale,
            None => Ok(x),
        }
    }

    /// The logits from the head's output: divided by Granite's `logits_scaling`, and
    /// soft-capped by Gemma 2's `c·tanh(logits / c)`; unchanged otherwise.
    fn cap_logits(&self, logits: Tensor) -> Result<Tensor> {
        let logits = match self.arch.logits_divisor {
            Some(d) => (logits / d)?,
            None => logits,
        };
        Ok(match self.arch.final_softcap {
            Some(c) => ((logits / c)?.tanh()? * c)?,
            None => logits,
        })
    }

    /// Each layer's `(cos, sin)` of shape `(t, head_dim / 2)`, made once per forward for all
    /// the layers that share a RoPE.
    fn rope_tables(
        &self,
        t: usize,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Vec<(Tensor, Tensor)>> {
        let mut made: Vec<(&Rope, (Tensor, Tensor))> = Vec::new();
        let mut out = Vec::with_capacity(self.arch.layer_ropes.len());
        let mut identity = None;
        for (rope, &rotates) in self.arch.layer_ropes.iter().zip(&self.arch.layer_uses_rope) {
            if !rotates {
                // cos 1 and sin 0 rotate nothing, exactly: the layer has no RoPE.
                let half = rope.dim / 2;
                if identity.is_none() {
                    identity = Some((
                        Tensor::ones((t, half), dtype, device)?,
                        Tensor::zeros((t, half), dtype, device)?,
                    ));
                }
                out.extend(identity.clone());
                continue;
            }
            if let Some((_, cs)) = made.iter().find(|(r, _)| *r == rope) {
                out.push(cs.clone());
                continue;
            }
            let d = rope.dim;
            let inv_freq = Tensor::from_vec(rope.inv_freq(), (1, d / 2), device)?;
            let pos = Tensor::arange(0u32, t as u32, device)?
                .to_dtype(DType::F32)?
                .reshape((t, 1))?;
            let freqs = pos.matmul(&inv_freq)?;
            let scale = rope.attention_factor();
            let (cos, sin) = match scale == 1.0 {
                true => (freqs.cos()?, freqs.sin()?),
                false => ((freqs.cos()? * scale)?, (freqs.sin()? * scale)?),
            };
            let cs = (cos.to_dtype(dtype)?, sin.to_dtype(dtype)?);
            made.push((rope, cs.clone()));
            out.push(cs);
        }
        Ok(out)
    }

    /// The causal-LM loss of `input_ids` against `labels` (i64, [`IGNORE_INDEX`] to skip):
    /// the value of [`causal_lm_loss`] on [`forward`](Self::forward)'s logits, but the
    /// `(batch, seq, vocab)` logits are never kept: the LM head and the loss are one op whose
    /// backward recomputes them (on the CPU in f32 it keeps their gradient from the forward
    /// pass instead; see [`head_loss`]).
    pub fn loss(&self, input_ids: &Tensor, labels: &Tensor) -> Result<Tensor> {
        let hidden = self.hidden_states(input_ids)?;
        let softcap = self.arch.final_softcap;
        let head = &self.lm_head;
        match (head.weight(), head.bias(), head.lora(), softcap) {
            // Granite's logits / s are the head of hidden / s.
            (Some(w), None, None, None) => match self.arch.logits_divisor {
                Some(d) => head_loss(&(hidden / d)?, w, labels),
                None => head_loss(&hidden, w, labels),
            },
            _ => causal_lm_loss(&self.cap_logits(self.lm_head.forward(&hidden)?)?, labels),
        }
    }
}
