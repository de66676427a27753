//! A trainable Llama-family decoder: Llama (2, 3.x), Mistral, Qwen2/2.5, Qwen3, Phi-3, Gemma 2
//! and Gemma 3 (text), with
//! Hugging Face tensor names and `config.json` in the formats transformers 4 and 5 write.
//!
//! Every `config.json` field that changes the computation is read or refused:
//!
//! | field | handling |
//! |---|---|
//! | `model_type` | `llama`, `mistral`, `qwen2`, `qwen3`, `phi3` (fused `qkv_proj`, `gate_up_proj`), `gemma2`, `gemma3_text`; anything else is refused |
//! | `vocab_size`, `hidden_size`, `intermediate_size`, `num_hidden_layers`, `num_attention_heads`, `num_key_value_heads`, `head_dim` | read |
//! | `hidden_act` | `silu` only (SwiGLU); Gemma 2's `hidden_activation`: `gelu_pytorch_tanh` (GeGLU) |
//! | Gemma 2's `query_pre_attn_scalar`, `attn_logit_softcapping`, `final_logit_softcapping` | read (transformers' defaults 256, 50, 30 when absent); soft-capping is refused for the other families |
//! | `use_bidirectional_attention` | false only |
//! | Gemma 3's `rope_local_base_freq`, `sliding_window_pattern`, `rope_parameters` keyed by layer kind | read: a RoPE per layer kind |
//! | `pad_token_id` | that embedding row gets no gradient from the input lookup, as `nn.Embedding(padding_idx=…)` |
//! | `rms_norm_eps` | read |
//! | `rope_theta`, `rope_scaling` (transformers 4), `rope_parameters` (transformers 5) | read: [`Rope`] (default, linear, llama3, yarn; others refused; θ given twice must agree) |
//! | `tie_word_embeddings` | read |
//! | `attention_bias` | read (q, k, v and o biases; Qwen2 always has q, k, v biases) |
//! | `mlp_bias` | read |
//! | Qwen3's `q_norm`/`k_norm` | per-head RMSNorm on queries and keys, from `model_type` |
//! | `sliding_window`, `use_sliding_window`, `layer_types` | a sequence longer than an enabled window is an error; `layer_types` other than `full_attention`/`sliding_attention` are refused |
//! | `pretraining_tp` | 1 only |
//! | `attention_dropout`, `resid_pdrop`, `embd_pdrop`, `hidden_dropout` | 0 only (no dropout here) |
//! | `partial_rotary_factor` (top level or in the RoPE object) | 1 only |
//! | `original_max_position_embeddings` (top level, Phi-3) | read for llama3/yarn RoPE |
//! | `attn_logit_softcapping`, `final_logit_softcapping` | refused unless null |
//! | `torch_dtype` (4), `dtype` (5) | storage dtype; written back under the name read |
//! | `bos_token_id`, `eos_token_id`, `max_position_embeddings` and everything else | kept and written back |
//!
//! candle-transformers' Llama uses fused ops with no backward (`rms_norm`, `rope`,
//! `softmax_last_dim`), so its gradients are silently dropped. This one uses only ops with a
//! backward ([`crate::nn::ops`]), sends every projection through the frozen-aware
//! [`Linear`], and treats masks, RoPE tables and frozen norm weights as
//! constants, so a model built from [`LisaAdamW::var_builder`](crate::LisaAdamW::var_builder)
//! stores gradients only for what trains.

use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{LisaError, Result};
use crate::nn::cpu::{self, matmul};
use crate::nn::linear::{linear_b, Linear};
use crate::nn::lora::LoraConfig;
use crate::nn::ops::{
    attach1, attach2, causal_attention_softcap, causal_attention_token_major, causal_mask,
    compute_dtype, mul_const, rms_norm, rope, rope_token_major, swiglu,
};
use crate::nn::recompute::recompute;
use crate::nn::TrainingPlan;

pub use super::rope::{Rope, RopeScaling};

/// Label value that [`causal_lm_loss`] ignores (padding, prompt tokens), as in Hugging Face.
pub const IGNORE_INDEX: i64 = -100;

fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_hidden_act() -> String {
    "silu".to_string()
}
fn default_max_position_embeddings() -> usize {
    2048
}

/// The hyper-parameters of a Llama-family model, as in a Hugging Face `config.json`.
///
/// Fields this crate does not read are kept in `extra` and written back on save.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// `llama`, `mistral`, `qwen2` or `qwen3`; absent means `llama`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_type: Option<String>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention); absent means one per query head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; absent means `hidden_size / num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// RoPE base, as transformers 4 writes it (transformers 5 writes it inside
    /// `rope_parameters`); absent from both means 10000. Read it with [`LlamaConfig::rope`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// RMSNorm epsilon.
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// MLP activation; only `silu` is supported.
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// Whether the LM head shares the embedding matrix (then there is no `lm_head.weight`).
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Longest sequence the model was trained for.
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// Llama's bias on q, k, v and o projections.
    #[serde(default)]
    pub attention_bias: bool,
    /// Llama's bias on the MLP projections.
    #[serde(default)]
    pub mlp_bias: bool,
    /// RoPE scaling as transformers 4 writes it (`rope_type` or `type`, `factor`, …); see
    /// [`Rope`] for the supported types.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<Value>,
    /// RoPE settings as transformers 5 writes them: `rope_theta`, `rope_type` and the scaling
    /// fields in one object. It takes the place of `rope_theta` and `rope_scaling`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<Value>,
    /// Per-layer attention kind as transformers 5 writes it (`full_attention`,
    /// `sliding_attention`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
    /// Mistral's and Qwen2's sliding attention window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// Beginning-of-sequence token id(s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<Value>,
    /// End-of-sequence token id(s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<Value>,
    /// Storage dtype of the checkpoint (`float32`, `bfloat16`, `float16`), as transformers 4
    /// names the field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    /// The same, as transformers 5 names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    /// Every other field, kept as read.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

impl LlamaConfig {
    /// A small config with the given sizes and Llama defaults for the rest.
    pub fn tiny(
        vocab_size: usize,
        hidden_size: usize,
        num_hidden_layers: usize,
        heads: usize,
        kv_heads: usize,
    ) -> Self {
        Self {
            model_type: Some("llama".into()),
            vocab_size,
            hidden_size,
            intermediate_size: hidden_size * 8 / 3,
            num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: Some(kv_heads),
            head_dim: None,
            rope_theta: None,
            rms_norm_eps: 1e-5,
            hidden_act: default_hidden_act(),
            tie_word_embeddings: false,
            max_position_embeddings: 1024,
            attention_bias: false,
            mlp_bias: false,
            rope_scaling: None,
            rope_parameters: None,
            layer_types: None,
            sliding_window: None,
            bos_token_id: None,
            eos_token_id: None,
            torch_dtype: None,
            dtype: None,
            extra: Default::default(),
        }
    }

    /// Reads and checks a `config.json`.
    pub fn from_file(path: impl AsRef<std::path::Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| LisaError::Io {
            action: "cannot read",
            path: path.to_path_buf(),
            source,
        })?;
        let config: Self = serde_json::from_str(&text).map_err(|source| LisaError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks that the config is consistent and asks for nothing unsupported.
    pub fn validate(&self) -> Result<()> {
        if let Some(t) = self.model_type.as_deref() {
            if !matches!(
                t,
                "llama" | "mistral" | "qwen2" | "qwen3" | "phi3" | "gemma2" | "gemma3_text"
            ) {
                return Err(LisaError::UnsupportedConfig {
                    field: "model_type",
                    value: t.to_string(),
                    hint:
                        "llama, mistral, qwen2, qwen3, phi3, gemma2 and gemma3_text are supported",
                });
            }
        }
        match (self.gemma(), self.activation().as_str()) {
            (false, "silu") | (true, "gelu_pytorch_tanh" | "gelu_tanh") => {}
            (false, other) => {
                return Err(LisaError::UnsupportedConfig {
                    field: "hidden_act",
                    value: other.to_string(),
                    hint: "silu (SwiGLU) is supported, and gelu_pytorch_tanh for Gemma 2",
                })
            }
            (true, other) => {
                return Err(LisaError::UnsupportedConfig {
                    field: "hidden_activation",
                    value: other.to_string(),
                    hint: "Gemma 2's gelu_pytorch_tanh is supported",
                })
            }
        }
        if let Some(v) = self
            .extra
            .get("use_bidirectional_attention")
            .filter(|v| v.as_bool() == Some(true))
        {
            return Err(LisaError::UnsupportedConfig {
                field: "use_bidirectional_attention",
                value: v.to_string(),
                hint: "only causal attention is supported",
            });
        }
        self.layer_ropes()?;
        if let Some(types) = &self.layer_types {
            if types.len() != self.num_hidden_layers {
                return Err(LisaError::InvalidConfig(format!(
                    "layer_types has {} entries for {} layers",
                    types.len(),
                    self.num_hidden_layers
                )));
            }
            if let Some(t) = types
                .iter()
                .find(|t| !matches!(t.as_str(), "full_attention" | "sliding_attention"))
            {
                return Err(LisaError::UnsupportedConfig {
                    field: "layer_types",
                    value: t.clone(),
                    hint: "full_attention and sliding_attention layers are supported",
                });
            }
        }
        // Dropout changes training (these models train without it here); a rotary fraction
        // below 1 changes the model.
        for field in [
            "attention_dropout",
            "resid_pdrop",
            "embd_pdrop",
            "hidden_dropout",
        ] {
            if let Some(v) = self
                .extra
                .get(field)
                .filter(|v| v.as_f64() != Some(0.0) && !v.is_null())
            {
                return Err(LisaError::UnsupportedConfig {
                    field,
                    value: v.to_string(),
                    hint: "dropout is not implemented; set it to 0.0",
                });
            }
        }
        if let Some(v) = self
            .extra
            .get("partial_rotary_factor")
            .filter(|v| v.as_f64() != Some(1.0) && !v.is_null())
        {
            return Err(LisaError::UnsupportedConfig {
                field: "partial_rotary_factor",
                value: v.to_string(),
                hint: "only RoPE over the whole head (1.0) is supported",
            });
        }
        for (field, value) in [
            ("pretraining_tp", self.extra.get("pretraining_tp")),
            (
                "attn_logit_softcapping",
                self.extra.get("attn_logit_softcapping"),
            ),
            (
                "final_logit_softcapping",
                self.extra.get("final_logit_softcapping"),
            ),
        ] {
            let harmless = match field {
                "pretraining_tp" => value.and_then(Value::as_u64).is_none_or(|tp| tp <= 1),
                // Gemma 2 computes soft-capping; a cap must be a positive number.
                _ if self.gemma() => {
                    value.is_none_or(|v| v.is_null() || v.as_f64().is_some_and(|c| c > 0.0))
                }
                _ => value.is_none_or(Value::is_null),
            };
            if !harmless {
                return Err(LisaError::UnsupportedConfig {
                    field,
                    value: value.map(Value::to_string).unwrap_or_default(),
                    hint: "this field changes the computation and is not implemented",
                });
            }
        }
        let invalid = |msg: String| Err(LisaError::InvalidConfig(msg));
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return invalid(format!("{name} must be at least 1"));
        }
        if self.head_dim.is_none() && self.hidden_size % self.num_attention_heads != 0 {
            return invalid(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}; give head_dim",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.num_attention_heads % self.kv_heads() != 0 {
            return invalid(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        if self.head_size() % 2 != 0 || self.head_size() == 0 {
            return invalid(format!(
                "head_dim {} must be even for RoPE",
                self.head_size()
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return invalid("rms_norm_eps must be finite and positive".into());
        }
        Ok(())
    }

    /// The RoPE this config describes, from either `config.json` format (see [`Rope`]); for
    /// Gemma 3, that of its full-attention layers (each layer's: [`LlamaConfig::layer_ropes`]).
    ///
    /// # Errors
    /// Those of [`Rope::from_fields`].
    pub fn rope(&self) -> Result<Rope> {
        if self.gemma3() {
            let kinds = self.layer_kinds().unwrap_or_default();
            let full = kinds
                .iter()
                .position(|k| k == "full_attention")
                .unwrap_or(0);
            return self.layer_ropes()?.into_iter().nth(full).ok_or_else(|| {
                LisaError::InvalidConfig("num_hidden_layers must be at least 1".into())
            });
        }
        Rope::from_fields(
            self.rope_parameters.as_ref(),
            self.rope_scaling.as_ref(),
            self.rope_theta,
            self.head_size(),
            self.max_position_embeddings,
            self.extra
                .get("original_max_position_embeddings")
                .and_then(Value::as_f64),
        )
    }

    /// Whether this is Gemma 2: embeddings scaled by √hidden, norms scaling by `1 + w`, norms
    /// around both the attention and the MLP, GeGLU, soft-capped scores and logits.
    pub fn gemma2(&self) -> bool {
        self.model_type.as_deref() == Some("gemma2")
    }

    /// Whether this is Gemma 3's text model: Gemma 2's layout with per-head q/k norms, no
    /// soft-capping by default, and RoPE of its own for sliding and full attention layers.
    pub fn gemma3(&self) -> bool {
        self.model_type.as_deref() == Some("gemma3_text")
    }

    /// Gemma 2 or Gemma 3.
    pub fn gemma(&self) -> bool {
        self.gemma2() || self.gemma3()
    }

    /// Each layer's attention kind: `layer_types`, or for Gemma 3 without it, every
    /// `sliding_window_pattern`-th layer (default 6) full and the others sliding, as
    /// transformers fills it in; `None` for models without per-layer kinds.
    pub fn layer_kinds(&self) -> Option<Vec<String>> {
        if let Some(types) = &self.layer_types {
            return Some(types.clone());
        }
        self.gemma3().then(|| {
            let pattern = self
                .extra
                .get("sliding_window_pattern")
                .and_then(Value::as_u64)
                .unwrap_or(6)
                .max(1) as usize;
            (0..self.num_hidden_layers)
                .map(|i| match (i + 1) % pattern {
                    0 => "full_attention".to_string(),
                    _ => "sliding_attention".to_string(),
                })
                .collect()
        })
    }

    /// The RoPE of each layer: one for every layer, or Gemma 3's for its full and sliding
    /// layers (transformers 5's `rope_parameters` keyed by layer kind; transformers 4's
    /// `rope_theta` + `rope_scaling` for full layers, default 1e6, and `rope_local_base_freq`
    /// for sliding ones, default 1e4).
    ///
    /// # Errors
    /// Those of [`Rope::from_fields`].
    pub fn layer_ropes(&self) -> Result<Vec<Rope>> {
        if !self.gemma3() {
            return Ok(vec![self.rope()?; self.num_hidden_layers]);
        }
        let nested = self
            .rope_parameters
            .as_ref()
            .filter(|p| p.get("full_attention").is_some() || p.get("sliding_attention").is_some());
        let max = self.max_position_embeddings;
        let top_original = self
            .extra
            .get("original_max_position_embeddings")
            .and_then(Value::as_f64);
        let (full, sliding) = match nested {
            Some(p) => {
                let kind = |k: &str, theta: f64| {
                    let mut o = p
                        .get(k)
                        .cloned()
                        .unwrap_or(Value::Object(Default::default()));
                    if let Some(m) = o.as_object_mut() {
                        m.entry("rope_theta").or_insert(theta.into());
                    }
                    Rope::from_fields(Some(&o), None, None, self.head_size(), max, top_original)
                };
                (
                    kind("full_attention", 1e6)?,
                    kind("sliding_attention", 1e4)?,
                )
            }
            None => {
                let full = Rope::from_fields(
                    self.rope_parameters.as_ref(),
                    self.rope_scaling.as_ref(),
                    Some(self.rope_theta.unwrap_or(1e6)),
                    self.head_size(),
                    max,
                    top_original,
                )?;
                let local = self.extra_f64("rope_local_base_freq").unwrap_or(1e4);
                let sliding =
                    Rope::from_fields(None, None, Some(local), self.head_size(), max, None)?;
                (full, sliding)
            }
        };
        let kinds = self.layer_kinds().unwrap_or_default();
        Ok((0..self.num_hidden_layers)
            .map(|i| match kinds.get(i).map(String::as_str) {
                Some("sliding_attention") => sliding.clone(),
                _ => full.clone(),
            })
            .collect())
    }

    fn extra_f64(&self, key: &str) -> Option<f64> {
        self.extra.get(key).and_then(Value::as_f64)
    }

    /// A soft-cap field: `null` turns it off; absent means transformers' Gemma 2 default.
    fn softcap(&self, key: &str, gemma2_default: f64) -> Option<f64> {
        match (self.gemma2(), self.extra.get(key)) {
            (true, None) => Some(gemma2_default),
            (_, Some(v)) => v.as_f64(),
            (false, None) => None,
        }
    }

    /// The MLP activation: Gemma 2's `hidden_activation` (default `gelu_pytorch_tanh`), else
    /// `hidden_act`.
    pub fn activation(&self) -> String {
        match (
            self.gemma(),
            self.extra.get("hidden_activation").and_then(Value::as_str),
        ) {
            (true, Some(a)) => a.to_string(),
            (true, None) => "gelu_pytorch_tanh".to_string(),
            (false, _) => self.hidden_act.clone(),
        }
    }

    /// The factor on q·kᵀ: Gemma 2's `query_pre_attn_scalar^-½` (default 256), else
    /// `head_dim^-½`.
    pub fn attention_scale(&self) -> f64 {
        match self.gemma() {
            true => self
                .extra_f64("query_pre_attn_scalar")
                .unwrap_or(256.0)
                .powf(-0.5),
            false => (self.head_size() as f64).powf(-0.5),
        }
    }

    /// Gemma 2's `attn_logit_softcapping`.
    pub fn attention_softcap(&self) -> Option<f64> {
        self.softcap("attn_logit_softcapping", 50.0)
    }

    /// Gemma 2's `final_logit_softcapping`.
    pub fn final_softcap(&self) -> Option<f64> {
        self.softcap("final_logit_softcapping", 30.0)
    }

    /// Whether the projections are Phi-3's fused `qkv_proj` and `gate_up_proj`.
    pub fn fused_projections(&self) -> bool {
        self.model_type.as_deref() == Some("phi3")
    }

    /// Whether attention has Qwen3's per-head RMSNorm on queries and keys
    /// (`self_attn.q_norm`, `self_attn.k_norm`).
    pub fn qk_norm(&self) -> bool {
        self.model_type.as_deref() == Some("qwen3") || self.gemma3()
    }

    /// Number of key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head width (Gemma 2's default is 256).
    pub fn head_size(&self) -> usize {
        match (self.head_dim, self.gemma()) {
            (Some(d), _) => d,
            (None, true) => 256,
            (None, false) => self.hidden_size / self.num_attention_heads.max(1),
        }
    }

    /// Qwen2 always has q, k and v biases; the others when `attention_bias` says so.
    fn qkv_bias(&self) -> bool {
        self.attention_bias || self.model_type.as_deref() == Some("qwen2")
    }

    /// The attention window, when the config enables one on some layer: transformers 5's
    /// `layer_types` with a `sliding_attention` layer, or (transformers 4) Mistral's
    /// `sliding_window`, Qwen's with `use_sliding_window`.
    pub fn attention_window(&self) -> Option<usize> {
        let enabled = match (self.layer_kinds(), self.model_type.as_deref()) {
            (Some(types), _) => types.iter().any(|t| t == "sliding_attention"),
            (None, Some("qwen2" | "qwen3")) => self
                .extra
                .get("use_sliding_window")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            _ => true,
        };
        self.sliding_window.filter(|_| enabled)
    }

    /// Every parameter the model has, with its shape, sorted by name.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let (q, kv) = (
            self.num_attention_heads * self.head_size(),
            self.kv_heads() * self.head_size(),
        );
        let mut out = vec![
            ("model.embed_tokens.weight".to_string(), vec![v, h]),
            ("model.norm.weight".to_string(), vec![h]),
        ];
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![v, h]));
        }
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let mut add = |name: &str, shape: Vec<usize>| out.push((format!("{p}.{name}"), shape));
            add("input_layernorm.weight", vec![h]);
            add("post_attention_layernorm.weight", vec![h]);
            if self.gemma() {
                add("pre_feedforward_layernorm.weight", vec![h]);
                add("post_feedforward_layernorm.weight", vec![h]);
            }
            if self.qk_norm() {
                add("self_attn.q_norm.weight", vec![self.head_size()]);
                add("self_attn.k_norm.weight", vec![self.head_size()]);
            }
            let projections = match self.fused_projections() {
                true => vec![
                    ("self_attn.qkv_proj", q + 2 * kv, h, self.qkv_bias()),
                    ("self_attn.o_proj", h, q, self.attention_bias),
                    ("mlp.gate_up_proj", 2 * i, h, self.mlp_bias),
                    ("mlp.down_proj", h, i, self.mlp_bias),
                ],
                false => vec![
                    ("self_attn.q_proj", q, h, self.qkv_bias()),
                    ("self_attn.k_proj", kv, h, self.qkv_bias()),
                    ("self_attn.v_proj", kv, h, self.qkv_bias()),
                    ("self_attn.o_proj", h, q, self.attention_bias),
                    ("mlp.gate_proj", i, h, self.mlp_bias),
                    ("mlp.up_proj", i, h, self.mlp_bias),
                    ("mlp.down_proj", h, i, self.mlp_bias),
                ],
            };
            for (name, rows, cols, bias) in projections {
                add(&format!("{name}.weight"), vec![rows, cols]);
                if bias {
                    add(&format!("{name}.bias"), vec![rows]);
                }
            }
        }
        out.sort();
        out
    }

    /// Number of scalars in the model.
    pub fn num_params(&self) -> usize {
        self.tensor_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }
}

/// LoRA settings and the builder of the adapters' scope (e.g. `model.layers.3.self_attn`).
type Adapters<'a> = Option<(&'a LoraConfig, &'a VarBuilder<'a>)>;

/// The projection `vb.pp(name)`, with a LoRA adapter when `lora` targets it.
fn projection(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    vb: &VarBuilder,
    name: &str,
    lora: Adapters,
) -> candle_core::Result<Linear> {
    let layer = linear_b(in_dim, out_dim, bias, vb.pp(name))?;
    match lora {
        Some((config, adapters)) => config.wrap(layer, name, adapters),
        None => Ok(layer),
    }
}

/// Query, key and value projections: three, or Phi-3's one fused `qkv_proj`.
enum Qkv {
    Split { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

impl Qkv {
    fn linears(&self) -> Vec<&Linear> {
        match self {
            Self::Split { q, k, v } => vec![q, k, v],
            Self::Fused(qkv) => vec![qkv],
        }
    }
}

struct Attention {
    qkv: Qkv,
    o: Linear,
    /// The factor on q·kᵀ, and Gemma 2's soft-cap of the scores.
    scale: f64,
    softcap: Option<f64>,
    /// Per-head RMSNorm weights on queries and keys (Qwen3; Gemma 3 with `1 + w`), epsilon.
    qk_norm: Option<(Tensor, Tensor, f64)>,
    norm_offset: bool,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    /// Queries and keys (normed for Qwen3, rotated) and values, each `(b, heads, t, d)`.
    fn project(
        &self,
        x: &Tensor,
        rope_cs: &(Tensor, Tensor),
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let split = |y: Tensor, n: usize| {
            y.reshape((b, t, n, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q_dim, kv_dim) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        let (q, k, v) = match &self.qkv {
            Qkv::Split { q, k, v } => (q.forward(x)?, k.forward(x)?, v.forward(x)?),
            Qkv::Fused(qkv) => {
                let y = qkv.forward(x)?;
                (
                    y.narrow(2, 0, q_dim)?,
                    y.narrow(2, q_dim, kv_dim)?,
                    y.narrow(2, q_dim + kv_dim, kv_dim)?,
                )
            }
        };
        let (mut q, mut k) = (split(q, self.heads)?, split(k, self.kv_heads)?);
        if let Some((qn, kn, eps)) = &self.qk_norm {
            let (qn, kn) = (
                norm_weight(qn, self.norm_offset)?,
                norm_weight(kn, self.norm_offset)?,
            );
            (q, k) = (rms_norm(&q, &qn, *eps)?, rms_norm(&k, &kn, *eps)?);
        }
        let q = rope(&q, &rope_cs.0, &rope_cs.1)?;
        let k = rope(&k, &rope_cs.0, &rope_cs.1)?;
        Ok((q, k, split(v, self.kv_heads)?))
    }

    fn new(c: &LlamaConfig, vb: VarBuilder, lora: Adapters) -> candle_core::Result<Self> {
        let (h, d) = (c.hidden_size, c.head_size());
        let proj = |in_dim, out_dim, bias, name| projection(in_dim, out_dim, bias, &vb, name, lora);
        let norm_init = candle_nn::Init::Const(if c.gemma() { 0.0 } else { 1.0 });
        let qk_norm = match c.qk_norm() {
            true => Some((
                vb.get_with_hints(d, "q_norm.weight", norm_init)?,
                vb.get_with_hints(d, "k_norm.weight", norm_init)?,
                c.rms_norm_eps,
            )),
            false => None,
        };
        let (q_dim, kv_dim) = (c.num_attention_heads * d, c.kv_heads() * d);
        let qkv = match c.fused_projections() {
            true => Qkv::Fused(proj(h, q_dim + 2 * kv_dim, c.qkv_bias(), "qkv_proj")?),
            false => Qkv::Split {
                q: proj(h, q_dim, c.qkv_bias(), "q_proj")?,
                k: proj(h, kv_dim, c.qkv_bias(), "k_proj")?,
                v: proj(h, kv_dim, c.qkv_bias(), "v_proj")?,
            },
        };
        Ok(Self {
            qk_norm,
            norm_offset: c.gemma(),
            qkv,
            scale: c.attention_scale(),
            softcap: c.attention_softcap(),
            o: proj(q_dim, h, c.attention_bias, "o_proj")?,
            heads: c.num_attention_heads,
            kv_heads: c.kv_heads(),
            head_dim: d,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rope_cs: &(Tensor, Tensor),
        mask: &Tensor,
    ) -> candle_core::Result<Tensor> {
        if let Some(y) = self.forward_token_major(x, rope_cs, mask)? {
            return Ok(y);
        }
        let (b, t, _) = x.dims3()?;
        let (q, k, v) = self.project(x, rope_cs)?;
        causal_attention_softcap(&q, &k, &v, mask, self.scale, self.softcap)?
            .transpose(1, 2)?
            .reshape((b, t, self.heads * self.head_dim))
            .and_then(|y| self.o.forward(&y))
    }
}

impl Attention {
    /// The attention on the CPU in f32, where the fused kernels take the projections as they
    /// come out, `(b, t, heads·d)`: no head transposes, and three graph nodes (two rotations
    /// and the attention) instead of fifteen. `None` where they do not apply (another device
    /// or dtype, Qwen3's per-head norms, Gemma 2's soft-capping), for the general path.
    fn forward_token_major(
        &self,
        x: &Tensor,
        rope_cs: &(Tensor, Tensor),
        mask: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        if self.qk_norm.is_some() || self.softcap.is_some() || !cpu::all_cpu_f32(&[x, mask]) {
            return Ok(None);
        }
        let (q_dim, kv_dim) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        let (q, k, v) = match &self.qkv {
            Qkv::Split { q, k, v } => (q.forward(x)?, k.forward(x)?, v.forward(x)?),
            Qkv::Fused(qkv) => {
                let y = qkv.forward(x)?;
                (
                    y.narrow(2, 0, q_dim)?.contiguous()?,
                    y.narrow(2, q_dim, kv_dim)?.contiguous()?,
                    y.narrow(2, q_dim + kv_dim, kv_dim)?.contiguous()?,
                )
            }
        };
        let (cos, sin) = rope_cs;
        let rotate = |t: &Tensor| rope_token_major(t, cos, sin, self.head_dim);
        let (Some(q), Some(k)) = (rotate(&q)?, rotate(&k)?) else {
            return Ok(None);
        };
        let heads = (self.heads, self.kv_heads);
        match causal_attention_token_major((&q, &k, &v), mask, self.scale, heads)? {
            Some(y) => self.o.forward(&y).map(Some),
            None => Ok(None),
        }
    }
}

/// Keys and values of the positions seen so far, per block, for incremental decoding.
#[derive(Default)]
struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl Attention {
    /// Attention of `x` (new positions `offset..offset + t`) over the cached positions and
    /// itself, appending its keys and values to `cache`. Inference only: nothing is tracked.
    fn forward_cached(
        &self,
        x: &Tensor,
        rope_cs: &(Tensor, Tensor),
        cache: &mut Option<(Tensor, Tensor)>,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (q, k, v) = self.project(x, rope_cs)?;
        let (k, v) = match cache.take() {
            Some((ck, cv)) => (
                Tensor::cat(&[&ck, &k], 2)?.contiguous()?,
                Tensor::cat(&[&cv, &v], 2)?.contiguous()?,
            ),
            None => (k, v),
        };
        *cache = Some((k.clone(), v.clone()));
        let (total, n) = (k.dim(2)?, self.heads / self.kv_heads);
        let offset = total - t;
        // Query i (position offset + i) sees keys 0..=offset + i.
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| {
                (0..total).map(move |j| {
                    if j > offset + i {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (t, total), x.device())?.to_dtype(x.dtype())?;
        let q = q.reshape((b, self.kv_heads, n * t, self.head_dim))?;
        let mut scores = (q.matmul(&k.t()?)? * self.scale)?;
        if let Some(c) = self.softcap {
            scores = ((scores / c)?.tanh()? * c)?;
        }
        let scores = scores
            .reshape((b, self.kv_heads, n, t, total))?
            .broadcast_add(&mask)?
            .reshape((b, self.kv_heads, n * t, total))?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        probs
            .matmul(&v)?
            .reshape((b, self.heads, t, self.head_dim))?
            .transpose(1, 2)?
            .reshape((b, t, self.heads * self.head_dim))
            .and_then(|y| self.o.forward(&y))
    }
}

/// The SwiGLU MLP: gate and up projections, or Phi-3's fused `gate_up_proj` (gate first).
enum Mlp {
    Split {
        gate: Linear,
        up: Linear,
        down: Linear,
        /// Gemma 2's GeGLU (tanh-approximated GELU) instead of SiLU.
        gelu: bool,
    },
    Fused {
        gate_up: Linear,
        down: Linear,
        width: usize,
    },
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Split {
                gate,
                up,
                down,
                gelu: false,
            } => down.forward(&swiglu(&gate.forward(x)?, &up.forward(x)?)?),
            Self::Split {
                gate,
                up,
                down,
                gelu: true,
            } => down.forward(&(gate.forward(x)?.gelu()? * up.forward(x)?)?),
            Self::Fused {
                gate_up,
                down,
                width,
            } => {
                let y = gate_up.forward(x)?;
                let (gate, up) = (
                    y.narrow(2, 0, *width)?.contiguous()?,
                    y.narrow(2, *width, *width)?.contiguous()?,
                );
                down.forward(&swiglu(&gate, &up)?)
            }
        }
    }

    fn linears(&self) -> Vec<&Linear> {
        match self {
            Self::Split { gate, up, down, .. } => vec![gate, up, down],
            Self::Fused { gate_up, down, .. } => vec![gate_up, down],
        }
    }
}

struct Block {
    input_norm: Tensor,
    attn: Attention,
    post_norm: Tensor,
    mlp: Mlp,
    /// Gemma 2's norms before and after the MLP (its `post_norm` then follows the attention).
    ff_norms: Option<(Tensor, Tensor)>,
    /// Norm weights scale by `1 + w` (Gemma).
    norm_offset: bool,
}

/// `w`, or Gemma's `1 + w` (differentiable in `w`).
fn norm_weight(w: &Tensor, offset: bool) -> candle_core::Result<Tensor> {
    match offset {
        true => w + 1.0,
        false => Ok(w.clone()),
    }
}

impl Block {
    /// The block around `attn` (the attention on the normed input): Llama's
    /// `x + attn(norm(x))` then `x + mlp(norm(x))`, or Gemma 2's with the attention output and
    /// the MLP's input and output normed too.
    fn around(
        &self,
        x: &Tensor,
        eps: f64,
        attn: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let norm = |x: &Tensor, w: &Tensor| rms_norm(x, &norm_weight(w, self.norm_offset)?, eps);
        let h = attn(&norm(x, &self.input_norm)?)?;
        match &self.ff_norms {
            None => {
                let x = (x + h)?;
                let h = self.mlp.forward(&norm(&x, &self.post_norm)?)?;
                x + h
            }
            Some((pre, post)) => {
                let x = (x + norm(&h, &self.post_norm)?)?;
                let h = self.mlp.forward(&norm(&x, pre)?)?;
                x + norm(&h, post)?
            }
        }
    }

    fn forward(
        &self,
        x: &Tensor,
        rope_cs: &(Tensor, Tensor),
        mask: &Tensor,
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
        !self.input_norm.track_op()
            && !self.post_norm.track_op()
            && a.qk_norm
                .as_ref()
                .is_none_or(|(q, k, _)| !q.track_op() && !k.track_op())
            && self
                .ff_norms
                .as_ref()
                .is_none_or(|(a, b)| !a.track_op() && !b.track_op())
            && linears.iter().all(|l| {
                l.lora().is_none()
                    && !l.weight().track_op()
                    && l.bias().is_none_or(|b| !b.track_op())
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
    /// Each layer's RoPE (the same for every layer but Gemma 3's).
    ropes: Vec<Rope>,
}

impl Llama {
    /// Builds the model; a builder over an empty `VarMap` creates weights initialised like
    /// candle's layers (norm weights at 1).
    pub fn new(config: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        Self::build(config, vb, None)
    }

    /// Builds the model with LoRA adapters on the projections `lora.targets`. The base weights
    /// come from `base` (use [`frozen_var_builder`](crate::frozen_var_builder) so they get no
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
        config.validate()?;
        let c = config;
        // Gemma's norms scale by 1 + w, so they start at 0.
        let norm_init = candle_nn::Init::Const(if c.gemma() { 0.0 } else { 1.0 });
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
                Ok(Arc::new(Block {
                    input_norm: vb.get_with_hints(h, "input_layernorm.weight", norm_init)?,
                    attn: Attention::new(c, vb.pp("self_attn"), attn_lora)?,
                    post_norm: vb.get_with_hints(
                        h,
                        "post_attention_layernorm.weight",
                        norm_init,
                    )?,
                    ff_norms: match c.gemma() {
                        true => Some((
                            vb.get_with_hints(h, "pre_feedforward_layernorm.weight", norm_init)?,
                            vb.get_with_hints(h, "post_feedforward_layernorm.weight", norm_init)?,
                        )),
                        false => None,
                    },
                    norm_offset: c.gemma(),
                    mlp: match c.fused_projections() {
                        true => Mlp::Fused {
                            gate_up: projection(h, 2 * i, bias, &mlp, "gate_up_proj", mlp_lora)?,
                            down: projection(i, h, bias, &mlp, "down_proj", mlp_lora)?,
                            width: i,
                        },
                        false => Mlp::Split {
                            gate: projection(h, i, bias, &mlp, "gate_proj", mlp_lora)?,
                            up: projection(h, i, bias, &mlp, "up_proj", mlp_lora)?,
                            down: projection(i, h, bias, &mlp, "down_proj", mlp_lora)?,
                            gelu: c.gemma(),
                        },
                    },
                }))
            })
            .collect::<candle_core::Result<_>>()?;
        let norm = vb.get_with_hints(c.hidden_size, "model.norm.weight", norm_init)?;
        let lm_head = if c.tie_word_embeddings {
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
            ropes: c.layer_ropes()?,
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

    /// The final hidden states `(batch, seq, hidden)`, after the last norm, for token ids
    /// `(batch, seq)` (u32), with a causal mask.
    pub fn hidden_states(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        if let Some(w) = self.config.attention_window().filter(|&w| t > w) {
            return Err(LisaError::UnsupportedConfig {
                field: "sliding_window",
                value: w.to_string(),
                hint:
                    "sequences longer than the sliding window are not supported; use shorter ones",
            });
        }
        let dtype = self.embed.dtype();
        let device = self.embed.device();
        let x = self
            .embed
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((b, t, self.config.hidden_size))?;
        let x = self.mask_padding_gradient(x, input_ids)?;
        let mut x = self.scale_embedding(x)?;
        let tables = self.rope_tables(t, dtype, device)?;
        let mask = causal_mask(t, dtype, device)?;
        let eps = self.config.rms_norm_eps;
        for (i, (block, rope_cs)) in self.blocks.iter().zip(&tables).enumerate() {
            x = if self.recomputed.binary_search(&i).is_ok() {
                let (block, rope_cs, mask) = (block.clone(), rope_cs.clone(), mask.clone());
                recompute(
                    &x,
                    Arc::new(move |x: &Tensor| block.forward(x, &rope_cs, &mask, eps)),
                )?
            } else {
                block.forward(&x, rope_cs, &mask, eps)?
            };
        }
        Ok(rms_norm(
            &x,
            &norm_weight(&self.norm, self.config.gemma())?,
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
        let pad = self
            .config
            .extra
            .get("pad_token_id")
            .and_then(Value::as_u64);
        match pad {
            Some(pad) if x.track_op() => {
                let (b, t) = ids.dims2()?;
                let keep = ids
                    .ne(pad as u32)?
                    .to_dtype(x.dtype())?
                    .reshape((b, t, 1))?;
                let drop = (1.0 - &keep)?;
                mul_const(&x, &keep)? + mul_const(&x.detach(), &drop)?
            }
            _ => Ok(x),
        }
    }

    /// Gemma 2 scales embeddings by √hidden (the factor rounded to the weights' dtype, as
    /// transformers does).
    fn scale_embedding(&self, x: Tensor) -> candle_core::Result<Tensor> {
        match self.config.gemma() {
            true => x * (self.config.hidden_size as f64).sqrt(),
            false => Ok(x),
        }
    }

    /// Gemma 2's final soft-cap, `c·tanh(logits / c)`; the logits unchanged otherwise.
    fn cap_logits(&self, logits: Tensor) -> Result<Tensor> {
        Ok(match self.config.final_softcap() {
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
        let mut out = Vec::with_capacity(self.ropes.len());
        for rope in &self.ropes {
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
        let softcap = self.config.final_softcap();
        match (self.lm_head.bias(), self.lm_head.lora(), softcap) {
            (None, None, None) => head_loss(&hidden, self.lm_head.weight(), labels),
            _ => causal_lm_loss(&self.cap_logits(self.lm_head.forward(&hidden)?)?, labels),
        }
    }

    /// Continues `prompt` by `max_new_tokens` tokens, stopping early at `eos`; see
    /// [`generate_until`](Self::generate_until), which takes several end-of-sequence ids.
    ///
    /// # Errors
    /// Those of [`generate_until`](Self::generate_until).
    pub fn generate(
        &self,
        prompt: &[u32],
        max_new_tokens: usize,
        temperature: f64,
        seed: u64,
        eos: Option<u32>,
    ) -> Result<Vec<u32>> {
        let stop: Vec<u32> = eos.into_iter().collect();
        self.generate_until(prompt, max_new_tokens, temperature, seed, &stop)
    }

    /// Continues `prompt` by up to `max_new_tokens` tokens, stopping after any id of `stop`
    /// (which is kept in the output). Greedy when `temperature` is 0, else sampled from
    /// softmax(logits / temperature) with a ChaCha8 generator seeded by `seed`. The prompt is
    /// run once and each new token attends to cached keys and values (a KV cache), so a token
    /// costs one position's forward pass. Builds no graph.
    ///
    /// # Errors
    /// [`LisaError::InvalidConfig`] for an empty prompt or a negative temperature; a sequence
    /// longer than an enabled sliding window; candle errors.
    pub fn generate_until(
        &self,
        prompt: &[u32],
        max_new_tokens: usize,
        temperature: f64,
        seed: u64,
        stop: &[u32],
    ) -> Result<Vec<u32>> {
        if !(temperature.is_finite() && temperature >= 0.0) {
            return Err(LisaError::InvalidConfig(format!(
                "temperature {temperature} must be finite and at least 0"
            )));
        }
        if prompt.is_empty() {
            return Err(LisaError::InvalidConfig(
                "generate needs a prompt of at least one token (a BOS id will do)".into(),
            ));
        }
        let total = prompt.len() + max_new_tokens;
        if let Some(w) = self.config.attention_window().filter(|&w| total > w) {
            return Err(LisaError::UnsupportedConfig {
                field: "sliding_window",
                value: w.to_string(),
                hint: "sequences longer than the sliding window are not supported; generate fewer tokens",
            });
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let device = self.embed.device();
        let dtype = self.embed.dtype();
        let tables = self.rope_tables(total.max(1), dtype, device)?;
        let mut cache = KvCache {
            layers: vec![None; self.blocks.len()],
        };
        let mut out: Vec<u32> = Vec::new();
        let mut input = prompt.to_vec();
        let mut offset = 0;
        for _ in 0..max_new_tokens {
            let t = input.len();
            let ids = Tensor::new(input.as_slice(), device)?;
            let mut x =
                self.scale_embedding(self.embed.detach().index_select(&ids, 0)?.unsqueeze(0)?)?;
            let eps = self.config.rms_norm_eps;
            let layers = self.blocks.iter().zip(&tables).zip(cache.layers.iter_mut());
            for ((block, (cos, sin)), layer) in layers {
                let rope_cs = (cos.narrow(0, offset, t)?, sin.narrow(0, offset, t)?);
                x = block.forward_cached(&x, &rope_cs, eps, layer)?;
            }
            let norm = norm_weight(&self.norm, self.config.gemma())?;
            let last = rms_norm(&x.narrow(1, t - 1, 1)?, &norm, eps)?;
            let logits = self
                .cap_logits(self.lm_head.forward(&last)?)?
                .detach()
                .flatten_all()?
                .to_dtype(DType::F32)?;
            let next = if temperature == 0.0 {
                logits.argmax(0)?.to_scalar::<u32>()?
            } else {
                let probs =
                    candle_nn::ops::softmax_last_dim(&(logits / temperature)?)?.to_vec1::<f32>()?;
                let mut u: f32 = rng.random();
                let mut pick = probs.len() - 1;
                for (i, p) in probs.iter().enumerate() {
                    if u < *p {
                        pick = i;
                        break;
                    }
                    u -= p;
                }
                pick as u32
            };
            out.push(next);
            if stop.contains(&next) {
                break;
            }
            offset += t;
            input = vec![next];
        }
        Ok(out)
    }
}

/// Mean cross-entropy of next-token prediction: position `t`'s logits against label `t + 1`.
///
/// `logits` is `(batch, seq, vocab)`, `labels` is `(batch, seq)` of i64 with [`IGNORE_INDEX`]
/// where no loss should be taken (padding, prompt tokens). Computed in f32 for half-precision
/// logits, else in their dtype. Returns 0 when every label is ignored. The graph keeps the
/// logits and the scalar loss only: the backward pass recomputes the softmax, where candle's
/// `log_softmax` would keep several logits-sized tensors alive.
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let targets = Targets::new(labels, b, t, v, logits.dtype())?;
    let rows = move |logits: &Tensor| logits.detach().reshape((b * t, v));
    let loss = targets.loss(&rows(logits)?)?;
    let out_dtype = logits.dtype();
    Ok(attach1(
        "lisa-causal-lm-loss",
        logits,
        loss,
        move |logits, _y, g| {
            let d = targets.dlogits(&rows(logits)?, g)?;
            Ok(Some(d.reshape((b, t, v))?.to_dtype(out_dtype)?))
        },
    )?)
}

/// [`causal_lm_loss`] of the logits `hidden · wᵀ` (an LM head without bias), as one op that
/// never keeps the `(batch, seq, vocab)` logits: the forward pass drops them once the loss is
/// computed, and the backward pass recomputes them to get dL/dhidden and, when `w` tracks
/// gradients, dL/dw. At a large vocabulary the logits are the largest activations of a
/// training step, and their gradient one more tensor of the same size.
///
/// On the CPU in f32 one fused pass over the logits computes the loss and leaves dL/dlogits in
/// their place, and the op keeps that buffer until its backward pass (which then needs no
/// second product with the head): the same size as the logits the backward pass would
/// recompute, held from the loss to the start of the backward pass, when the whole graph is
/// alive anyway, so the step's peak does not grow.
pub fn head_loss(hidden: &Tensor, w: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (b, t, h) = hidden.dims3()?;
    let (v, wh) = w.dims2()?;
    if wh != h {
        return Err(LisaError::InvalidConfig(format!(
            "head_loss: hidden states ({b}, {t}, {h}) do not match the head weight ({v}, {wh})"
        )));
    }
    let targets = Targets::new(labels, b, t, v, hidden.dtype())?;
    let rows = move |x: &Tensor| x.detach().reshape((b * t, h));
    let logits = move |x: &Tensor, w: &Tensor| matmul(&rows(x)?, &w.t()?);
    // The gradients of the hidden states and of the head from dL/dlogits.
    let grads = move |d: Tensor, x: &Tensor, w: &Tensor| -> candle_core::Result<_> {
        let dx = matmul(&d, w)?.reshape((b, t, h))?;
        let dw = match w.track_op() {
            true => Some(matmul(&d.t()?, &rows(x)?)?),
            false => None,
        };
        Ok((Some(dx), dw))
    };
    if cpu::all_cpu_f32(&[hidden, w]) {
        // One pass over each row of logits; it leaves dL/dlogits in their place.
        let (labels, weights) = targets.rows()?;
        let count = targets.count;
        let logits = move |x: &Tensor, w: &Tensor| -> candle_core::Result<Vec<f32>> {
            cpu::product::<f32>(&rows(x)?, &w.t()?)
                .map(|(l, _)| l)
                .ok_or_else(|| candle_core::Error::Msg("head_loss: logits on the CPU".into()))
        };
        // dL/dlogits comes out of the same pass and waits for the backward pass in place of
        // the logits (as large as the logits the backward pass would otherwise recompute).
        let mut d = logits(hidden, w)?;
        let sum = cpu::cross_entropy_fused(&mut d, v, &labels, &weights, (1.0 / count) as f32);
        let loss = Tensor::new((sum / count) as f32, hidden.device())?;
        let d = std::sync::Mutex::new(Some(d));
        return Ok(attach2(
            "lisa-head-loss",
            hidden,
            w,
            loss,
            move |x, w, _y, g| {
                let g = g.to_dtype(DType::F32)?.to_scalar::<f32>()?;
                let kept = d
                    .lock()
                    .map_err(|_| candle_core::Error::Msg("head_loss: poisoned lock".into()))?
                    .take();
                let d = match kept {
                    Some(mut d) => {
                        if g != 1.0 {
                            d.iter_mut().for_each(|d| *d *= g);
                        }
                        d
                    }
                    // A second backward pass over the same graph: recompute.
                    None => {
                        let coef: Vec<f32> = weights
                            .iter()
                            .map(|m| (*m as f64 * g as f64 / count) as f32)
                            .collect();
                        let mut d = logits(x, w)?;
                        cpu::cross_entropy_bwd(&mut d, v, &labels, &coef);
                        d
                    }
                };
                grads(
                    Tensor::from_vec(d, (b * t, v), &candle_core::Device::Cpu)?,
                    x,
                    w,
                )
            },
        )?);
    }
    let loss = targets.loss(&logits(hidden, w)?)?;
    Ok(attach2(
        "lisa-head-loss",
        hidden,
        w,
        loss,
        move |x, w, _y, g| {
            let d = targets.dlogits(&logits(x, w)?, g)?.to_dtype(x.dtype())?;
            grads(d, x, w)
        },
    )?)
}

/// The labels of a causal-LM loss, one per logits row: row `(i, j)` predicts label
/// `(i, j + 1)`; the last position of each sequence predicts nothing and is ignored, so every
/// row is handled alike.
struct Targets {
    /// `(rows, 1)`, 1 where a label counts, 0 where it is ignored; in `dtype`.
    mask: Tensor,
    /// `(rows, 1)` u32, the label clamped into the vocabulary (ignored rows point at 0).
    safe: Tensor,
    /// How many labels count, at least 1.
    count: f64,
    /// f32 for half-precision logits, else their dtype.
    dtype: DType,
}

impl Targets {
    fn new(labels: &Tensor, b: usize, t: usize, v: usize, dtype: DType) -> Result<Self> {
        let (lb, lt) = labels.dims2()?;
        if (lb, lt) != (b, t) || t < 2 {
            return Err(LisaError::InvalidConfig(format!(
                "labels of shape ({lb}, {lt}) do not match logits ({b}, {t}, {v}); they must be equal and seq >= 2"
            )));
        }
        let dtype = compute_dtype(dtype);
        let ignored = Tensor::full(IGNORE_INDEX, (b, 1), labels.device())?;
        let labels = Tensor::cat(&[&labels.narrow(1, 1, t - 1)?, &ignored], 1)?
            .flatten_all()?
            .to_dtype(DType::I64)?;
        let mask = labels.ge(0i64)?.to_dtype(dtype)?.unsqueeze(1)?;
        let safe = labels
            .clamp(0i64, v as i64 - 1)?
            .to_dtype(DType::U32)?
            .unsqueeze(1)?;
        let count = mask
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?
            .max(1.0);
        Ok(Self {
            mask,
            safe,
            count,
            dtype,
        })
    }

    /// Per row: the label (clamped into the vocabulary) and its weight (1, or 0 where ignored).
    fn rows(&self) -> candle_core::Result<(Vec<u32>, Vec<f32>)> {
        Ok((
            self.safe.flatten_all()?.to_vec1::<u32>()?,
            self.mask
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?,
        ))
    }

    /// The mean loss of `(rows, vocab)` logits, a scalar in `self.dtype`.
    fn loss(&self, logits: &Tensor) -> candle_core::Result<Tensor> {
        let x = logits.to_dtype(self.dtype)?;
        let max = x.max_keepdim(1)?;
        let log_sum_exp = (x.broadcast_sub(&max)?.exp()?.sum_keepdim(1)?.log()? + max)?;
        let picked = (x.gather(&self.safe, 1)? - log_sum_exp)?;
        (picked * &self.mask)?.sum_all()? * (-1.0 / self.count)
    }

    /// dL/dlogits for the incoming gradient `g` of the loss: `(softmax - one-hot) · g / count`
    /// on counted rows, 0 elsewhere; in `self.dtype`.
    fn dlogits(&self, logits: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
        let coef = (self.mask.broadcast_mul(&g.detach().to_dtype(self.dtype)?)? / self.count)?;
        let p = candle_nn::ops::softmax_last_dim(&logits.to_dtype(self.dtype)?)?;
        let d = p.broadcast_mul(&coef)?;
        d.scatter_add_set(&self.safe, &coef.neg()?, 1)?;
        Ok(d)
    }
}
