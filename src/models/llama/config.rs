//! `config.json` as transformers 4 and 5 write it for the Llama families, validated once:
//! every field that changes the computation is read or refused (the table in the
//! [module docs](super)).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{LisaError, Result};

use super::Rope;

pub(crate) fn default_rms_norm_eps() -> f64 {
    1e-6
}
pub(crate) fn default_hidden_act() -> String {
    "silu".to_string()
}
pub(crate) fn default_max_position_embeddings() -> usize {
    2048
}

/// The most layers a config may have (the largest models have a few hundred).
const MAX_LAYERS: usize = 1 << 16;

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
    /// When `config.json` has no such key, [`from_file`](Self::from_file) takes transformers'
    /// default for the family: true for Gemma 2 and Gemma 3, false for the others.
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
        let json = |source| LisaError::Json {
            path: path.to_path_buf(),
            source,
        };
        let mut raw: serde_json::Map<String, Value> = serde_json::from_str(&text).map_err(json)?;
        Self::fill_family_defaults(&mut raw);
        let config: Self = serde_json::from_value(Value::Object(raw)).map_err(json)?;
        config.validate()?;
        Ok(config)
    }

    /// Writes in the defaults that transformers' config class of the file's `model_type` uses
    /// where they differ from this struct's: Gemma 2, Gemma 3 and SmolLM3 tie the LM head to
    /// the embedding unless `tie_word_embeddings` says otherwise, and OLMo 2's and Phi-3's
    /// `rms_norm_eps` is 1e-5.
    pub(crate) fn fill_family_defaults(raw: &mut serde_json::Map<String, Value>) {
        let family = raw
            .get("model_type")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let family = family.as_deref();
        if matches!(family, Some("gemma2" | "gemma3_text" | "smollm3")) {
            raw.entry("tie_word_embeddings")
                .or_insert(Value::Bool(true));
        }
        if matches!(family, Some("olmo2" | "phi3")) {
            raw.entry("rms_norm_eps").or_insert(Value::from(1e-5));
        }
        // transformers 5.25's default window where a family has one (Qwen's applies only with
        // use_sliding_window); an explicit null stays null.
        if matches!(
            family,
            Some("gemma2" | "gemma3_text" | "mistral" | "qwen2" | "qwen3")
        ) {
            raw.entry("sliding_window").or_insert(Value::from(4096));
        }
    }

    /// Checks that the config is consistent and asks for nothing unsupported.
    pub fn validate(&self) -> Result<()> {
        if let Some(t) = self.model_type.as_deref() {
            super::arch::Family::from_model_type(Some(t))?;
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
        self.check_sizes()?;
        self.layer_ropes()?;
        self.layer_uses_rope()?;
        if self.model_type.as_deref() == Some("granite") {
            for field in [
                "embedding_multiplier",
                "residual_multiplier",
                "attention_multiplier",
                "logits_scaling",
            ] {
                self.granite_multiplier(field)?;
            }
        }
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
        self.layer_windows()?;
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
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return invalid(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}; give head_dim",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return invalid(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        if !self.head_size().is_multiple_of(2) || self.head_size() == 0 {
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

    /// Every size is at least 1, and the model they describe can be counted: no product
    /// overflows and its weights fit in memory at 8 bytes each. Checked before anything of
    /// a size from the file is allocated (one RoPE per layer, the tensor list).
    fn check_sizes(&self) -> Result<()> {
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return Err(LisaError::InvalidConfig(format!(
                "{name} must be at least 1"
            )));
        }
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let head = self.head_size();
        let count = || -> Option<usize> {
            let q = self.num_attention_heads.checked_mul(head)?;
            let kv = self.kv_heads().checked_mul(head)?;
            let attention = q.checked_add(kv.checked_mul(2)?)?.checked_mul(h)?;
            let layer = attention
                .checked_add(q.checked_mul(h)?)?
                .checked_add(i.checked_mul(h)?.checked_mul(3)?)?
                .checked_add(h.checked_mul(8)?)?;
            let total = layer
                .checked_mul(self.num_hidden_layers)?
                .checked_add(v.checked_mul(h)?.checked_mul(2)?)?;
            total.checked_mul(8).filter(|&b| b <= isize::MAX as usize)
        };
        if count().is_none() || self.num_hidden_layers > MAX_LAYERS {
            return Err(LisaError::InvalidConfig(format!(
                "the sizes (vocab_size {v}, hidden_size {h}, intermediate_size {i}, \
                 num_hidden_layers {}, num_attention_heads {}, head_dim {head}) describe a \
                 model too large to exist (at most {MAX_LAYERS} layers); the file is \
                 corrupt or not a model config",
                self.num_hidden_layers, self.num_attention_heads
            )));
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

    /// Whether each layer applies RoPE: SmolLM3's `no_rope_layers` (1 rotates, 0 does not;
    /// when absent, every `no_rope_layer_interval`-th layer, default 4, has no RoPE, as
    /// transformers fills it in); every layer for the other families.
    ///
    /// # Errors
    /// [`LisaError::InvalidConfig`] for a list of the wrong length or with values other than
    /// 0 and 1, or an interval of 0.
    pub fn layer_uses_rope(&self) -> Result<Vec<bool>> {
        let n = self.num_hidden_layers;
        if self.model_type.as_deref() != Some("smollm3") {
            return Ok(vec![true; n]);
        }
        let bad = |msg: String| LisaError::InvalidConfig(msg);
        match self.extra.get("no_rope_layers").filter(|v| !v.is_null()) {
            Some(list) => {
                let flags = list.as_array().filter(|l| l.len() == n).ok_or_else(|| {
                    bad(format!("no_rope_layers must list {n} entries of 0 or 1"))
                })?;
                flags
                    .iter()
                    .map(|f| match f.as_u64() {
                        Some(0) => Ok(false),
                        Some(1) => Ok(true),
                        _ => Err(bad(format!("no_rope_layers holds {f}; use 0 or 1"))),
                    })
                    .collect()
            }
            None => {
                let every = match self.extra.get("no_rope_layer_interval") {
                    None | Some(Value::Null) => 4,
                    Some(v) => v
                        .as_u64()
                        .filter(|&k| k > 0)
                        .ok_or_else(|| bad(format!("no_rope_layer_interval {v} is not above 0")))?,
                } as usize;
                Ok((0..n).map(|l| (l + 1) % every != 0).collect())
            }
        }
    }

    /// One of Granite's multipliers (`embedding_multiplier`, `residual_multiplier`,
    /// `attention_multiplier`, `logits_scaling`; 1 when absent, as transformers' default).
    ///
    /// # Errors
    /// [`LisaError::InvalidConfig`] for a value that is not a finite number above 0.
    pub(crate) fn granite_multiplier(&self, field: &str) -> Result<f64> {
        match self.extra.get(field) {
            None | Some(Value::Null) => Ok(1.0),
            Some(v) => v
                .as_f64()
                .filter(|m| m.is_finite() && *m > 0.0)
                .ok_or_else(|| {
                    LisaError::InvalidConfig(format!("{field} {v} is not a finite number above 0"))
                }),
        }
    }

    pub(crate) fn extra_f64(&self, key: &str) -> Option<f64> {
        self.extra.get(key).and_then(Value::as_f64)
    }

    /// A soft-cap field: `null` turns it off; absent means transformers' Gemma 2 default.
    pub(crate) fn softcap(&self, key: &str, gemma2_default: f64) -> Option<f64> {
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

    /// The factor on q·kᵀ: Gemma 2's `query_pre_attn_scalar^-½` (default 256), Granite's
    /// `attention_multiplier`, else `head_dim^-½`.
    pub fn attention_scale(&self) -> f64 {
        match self.model_type.as_deref() {
            _ if self.gemma() => self
                .extra_f64("query_pre_attn_scalar")
                .unwrap_or(256.0)
                .powf(-0.5),
            Some("granite") => self
                .granite_multiplier("attention_multiplier")
                .unwrap_or(1.0),
            _ => (self.head_size() as f64).powf(-0.5),
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
    pub(crate) fn qkv_bias(&self) -> bool {
        self.attention_bias || self.model_type.as_deref() == Some("qwen2")
    }

    /// The largest attention window of any layer ([`layer_windows`](Self::layer_windows)),
    /// `None` when every layer attends to all earlier positions (or the config is invalid).
    pub fn attention_window(&self) -> Option<usize> {
        self.layer_windows().ok()?.into_iter().flatten().max()
    }

    /// Each layer's sliding attention window (`None`: full causal attention), as transformers
    /// 5.25 resolves it: `layer_types` where the config has them (or Gemma 3's pattern);
    /// otherwise every layer for Mistral and Phi-3 with a `sliding_window`, the even layers for
    /// Gemma 2, and for Qwen2 and Qwen3 with `use_sliding_window` the layers from
    /// `max_window_layers` (default 28) on. Llama, Granite and OLMo 2 have no sliding window in
    /// transformers, which ignores a `sliding_window` in their configs; so does this.
    ///
    /// # Errors
    /// [`LisaError::UnsupportedConfig`] for a sliding layer without a window (or a window of
    /// 0), and for SmolLM3 with `use_sliding_window` but no `layer_types`.
    pub fn layer_windows(&self) -> Result<Vec<Option<usize>>> {
        let n = self.num_hidden_layers;
        let flag = |k: &str| self.extra.get(k).and_then(Value::as_bool).unwrap_or(false);
        let family = self.model_type.as_deref().unwrap_or("llama");
        let window = match family {
            "qwen2" | "qwen3" | "smollm3" => {
                self.sliding_window.filter(|_| flag("use_sliding_window"))
            }
            // Gemma's layers slide whatever the config says: transformers' default window.
            "gemma2" | "gemma3_text" => self.sliding_window.or(Some(4096)),
            _ => self.sliding_window,
        };
        let sliding: Vec<bool> = match (self.layer_kinds(), family) {
            (Some(types), _) => types.iter().map(|t| t == "sliding_attention").collect(),
            (None, "mistral" | "phi3") => vec![window.is_some(); n],
            (None, "gemma2") => (0..n).map(|i| i % 2 == 0).collect(),
            (None, "qwen2" | "qwen3") => {
                let from = self
                    .extra
                    .get("max_window_layers")
                    .and_then(Value::as_u64)
                    .map_or(28, |m| m as usize);
                (0..n).map(|i| window.is_some() && i >= from).collect()
            }
            (None, "smollm3") if window.is_some() => {
                return Err(LisaError::UnsupportedConfig {
                    field: "use_sliding_window",
                    value: "true".into(),
                    hint: "SmolLM3's sliding layers are read from layer_types only; add them to config.json",
                })
            }
            _ => vec![false; n],
        };
        sliding
            .into_iter()
            .map(|s| match (s, window) {
                (false, _) => Ok(None),
                (true, Some(w)) if w > 0 => Ok(Some(w)),
                (true, w) => Err(LisaError::UnsupportedConfig {
                    field: "sliding_window",
                    value: format!("{w:?}"),
                    hint: "a sliding_attention layer needs a sliding_window of at least 1 (and use_sliding_window for Qwen and SmolLM3)",
                }),
            })
            .collect()
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
            let olmo2 = self.model_type.as_deref() == Some("olmo2");
            if !olmo2 {
                add("input_layernorm.weight", vec![h]);
            }
            add("post_attention_layernorm.weight", vec![h]);
            if self.gemma() {
                add("pre_feedforward_layernorm.weight", vec![h]);
            }
            if self.gemma() || olmo2 {
                add("post_feedforward_layernorm.weight", vec![h]);
            }
            if olmo2 {
                add("self_attn.q_norm.weight", vec![q]);
                add("self_attn.k_norm.weight", vec![kv]);
            } else if self.qk_norm() {
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
