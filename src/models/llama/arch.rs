//! [`Architecture`]: what a [`LlamaConfig`] means for the computation, resolved once.

use serde_json::Value;

use super::{LlamaConfig, Rope};
use crate::error::{LisaError, Result};

/// The model families the decoder implements (`model_type` in `config.json`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `llama` (Llama 2, 3.x, SmolLM2 and the other Llama-architecture checkpoints).
    Llama,
    /// `mistral`.
    Mistral,
    /// `qwen2` (Qwen2, Qwen2.5): q, k and v biases always.
    Qwen2,
    /// `qwen3`: per-head RMSNorm on queries and keys.
    Qwen3,
    /// `phi3`: fused `qkv_proj` and `gate_up_proj`.
    Phi3,
    /// `gemma2`: GeGLU, `1 + w` norms around attention and MLP, scaled embeddings,
    /// soft-capped scores and logits.
    Gemma2,
    /// `gemma3_text`: Gemma 2's layout with per-head q/k norms and a RoPE per layer kind.
    Gemma3,
    /// `granite` (Granite 3.x): Llama with multipliers on the embeddings, the residual
    /// branches and the attention scores, and the logits divided by `logits_scaling`.
    Granite,
    /// `olmo2`: norms after the attention and the MLP (none before), and RMSNorm on the whole
    /// query and key projections.
    Olmo2,
    /// `smollm3`: Llama with no RoPE on the layers `no_rope_layers` marks 0.
    SmolLm3,
}

/// The `model_type`s the decoder implements, for error messages.
pub(super) const SUPPORTED: &str =
    "supported: llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3_text, granite, olmo2, smollm3";

impl Family {
    /// The family a `model_type` names; a missing one is Llama.
    ///
    /// # Errors
    /// [`LisaError::UnsupportedConfig`] for any other `model_type`.
    pub fn from_model_type(model_type: Option<&str>) -> Result<Self> {
        Ok(match model_type {
            None | Some("llama") => Self::Llama,
            Some("mistral") => Self::Mistral,
            Some("qwen2") => Self::Qwen2,
            Some("qwen3") => Self::Qwen3,
            Some("phi3") => Self::Phi3,
            Some("gemma2") => Self::Gemma2,
            Some("gemma3_text") => Self::Gemma3,
            Some("granite") => Self::Granite,
            Some("olmo2") => Self::Olmo2,
            Some("smollm3") => Self::SmolLm3,
            Some(other) => {
                return Err(LisaError::UnsupportedConfig {
                    field: "model_type",
                    value: other.to_string(),
                    hint: SUPPORTED,
                })
            }
        })
    }

    /// Gemma 2 or Gemma 3.
    pub fn is_gemma(self) -> bool {
        matches!(self, Self::Gemma2 | Self::Gemma3)
    }
}

/// The MLP's gate activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `silu`: SwiGLU.
    Silu,
    /// `gelu_pytorch_tanh`: GeGLU with the tanh approximation.
    GeluTanh,
}

/// Where a block's RMSNorms sit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormPlacement {
    /// Llama: `x + attn(norm(x))`, then `x + mlp(norm(x))` (`input_layernorm`,
    /// `post_attention_layernorm`).
    Pre,
    /// Gemma 2 and 3: before and after each: `x + norm(attn(norm(x)))`, then
    /// `x + norm(mlp(norm(x)))` (`input_layernorm`, `post_attention_layernorm`,
    /// `pre_feedforward_layernorm`, `post_feedforward_layernorm`).
    Sandwich,
    /// OLMo 2: after each only: `x + norm(attn(x))`, then `x + norm(mlp(x))`
    /// (`post_attention_layernorm`, `post_feedforward_layernorm`).
    Post,
}

/// How queries and keys are normed before RoPE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkNorm {
    /// One RMSNorm of `head_dim` per head (Qwen3, Gemma 3).
    PerHead,
    /// One RMSNorm over all heads' projection (`heads · head_dim` for queries,
    /// `kv_heads · head_dim` for keys; OLMo 2).
    Full,
}

/// What a [`LlamaConfig`] means for the computation: every family predicate, default and
/// optional field resolved once ([`LlamaConfig::architecture`]), so that building and running
/// the model read plain fields.
#[derive(Clone, Debug, PartialEq)]
pub struct Architecture {
    /// The family.
    pub family: Family,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// RMSNorm's ε.
    pub rms_norm_eps: f64,
    /// Norms scale by `1 + w` (Gemma), so their weights start at 0.
    pub norm_offset: bool,
    /// Where the block's norms sit.
    pub norms: NormPlacement,
    /// Embeddings are multiplied by this (Gemma: √hidden, rounded to the weights' dtype;
    /// Granite: `embedding_multiplier`).
    pub embedding_scale: Option<f64>,
    /// Granite's `residual_multiplier`: the attention's and the MLP's outputs are multiplied
    /// by it before they join the residual stream.
    pub residual_scale: Option<f64>,
    /// Granite's `logits_scaling`: the logits are divided by it.
    pub logits_divisor: Option<f64>,
    /// The MLP's activation.
    pub activation: Activation,
    /// The factor on q·kᵀ.
    pub attention_scale: f64,
    /// Gemma 2's soft-cap of the attention scores.
    pub attention_softcap: Option<f64>,
    /// Gemma 2's soft-cap of the logits.
    pub final_softcap: Option<f64>,
    /// Phi-3's fused `qkv_proj` and `gate_up_proj`.
    pub fused_projections: bool,
    /// RMSNorm on queries and keys: per head (Qwen3, Gemma 3) or over the whole projection
    /// (OLMo 2).
    pub qk_norm: Option<QkNorm>,
    /// Biases on q, k and v.
    pub qkv_bias: bool,
    /// A bias on the attention's output projection.
    pub o_bias: bool,
    /// Biases on the MLP's projections.
    pub mlp_bias: bool,
    /// The largest attention window of any layer, when some layer uses one.
    pub window: Option<usize>,
    /// Each layer's sliding window (`None`: full causal attention).
    pub layer_windows: Vec<Option<usize>>,
    /// The padding id, whose embedding row gets no gradient from the input lookup.
    pub pad_token_id: Option<u32>,
    /// Each layer's RoPE.
    pub layer_ropes: Vec<Rope>,
    /// Whether each layer rotates its queries and keys (SmolLM3's NoPE layers do not).
    pub layer_uses_rope: Vec<bool>,
    /// The LM head is the embedding matrix.
    pub tied: bool,
}

impl LlamaConfig {
    /// The config resolved into an [`Architecture`], after [`validate`](Self::validate).
    ///
    /// ```
    /// use candle_lisa::models::llama::{Activation, Family};
    /// use candle_lisa::LlamaConfig;
    /// let arch = LlamaConfig::tiny(64, 32, 2, 4, 2).architecture()?;
    /// assert_eq!((arch.family, arch.activation), (Family::Llama, Activation::Silu));
    /// assert_eq!((arch.head_dim, arch.kv_heads, arch.layer_ropes.len()), (8, 2, 2));
    /// # Ok::<(), candle_lisa::LisaError>(())
    /// ```
    ///
    /// # Errors
    /// Those of [`validate`](Self::validate) and of the RoPE fields.
    pub fn architecture(&self) -> Result<Architecture> {
        self.validate()?;
        let family = Family::from_model_type(self.model_type.as_deref())?;
        let gemma = family.is_gemma();
        let pad_token_id =
            match self.extra.get("pad_token_id") {
                None | Some(Value::Null) => None,
                Some(v) => Some(v.as_u64().and_then(|p| u32::try_from(p).ok()).ok_or_else(
                    || LisaError::InvalidConfig(format!("pad_token_id {v} is not a token id")),
                )?),
            };
        Ok(Architecture {
            family,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            heads: self.num_attention_heads,
            kv_heads: self.kv_heads(),
            head_dim: self.head_size(),
            rms_norm_eps: self.rms_norm_eps,
            norm_offset: gemma,
            norms: match family {
                _ if gemma => NormPlacement::Sandwich,
                Family::Olmo2 => NormPlacement::Post,
                _ => NormPlacement::Pre,
            },
            embedding_scale: match family {
                _ if gemma => Some((self.hidden_size as f64).sqrt()),
                Family::Granite => Some(self.granite_multiplier("embedding_multiplier")?),
                _ => None,
            },
            residual_scale: match family {
                Family::Granite => Some(self.granite_multiplier("residual_multiplier")?),
                _ => None,
            },
            logits_divisor: match family {
                Family::Granite => Some(self.granite_multiplier("logits_scaling")?),
                _ => None,
            },
            activation: match gemma {
                true => Activation::GeluTanh,
                false => Activation::Silu,
            },
            attention_scale: self.attention_scale(),
            attention_softcap: self.attention_softcap(),
            final_softcap: self.final_softcap(),
            fused_projections: self.fused_projections(),
            qk_norm: match family {
                Family::Olmo2 => Some(QkNorm::Full),
                _ if self.qk_norm() => Some(QkNorm::PerHead),
                _ => None,
            },
            qkv_bias: self.qkv_bias(),
            o_bias: self.attention_bias,
            mlp_bias: self.mlp_bias,
            window: self.attention_window(),
            layer_windows: self.layer_windows()?,
            pad_token_id,
            layer_ropes: self.layer_ropes()?,
            layer_uses_rope: self.layer_uses_rope()?,
            tied: self.tie_word_embeddings,
        })
    }
}
