//! GPT-2 in Hugging Face's layout, written the way a candle user writes a model, with
//! candle-lisa's differentiable layers (`LayerNorm`, `Linear`, causal attention) so that LISA
//! can train it. Shared by `examples/gpt2.rs` and its parity test against transformers'
//! `GPT2LMHeadModel` (`tests/suite/gpt2.rs`).
//!
//! Hugging Face stores GPT-2's projections as `Conv1D` weights of shape `(in, out)`;
//! [`load`] transposes them to `(out, in)` once, so every projection is an ordinary
//! `candle_lisa::Linear`, and [`save`] transposes them back.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_lisa::nn::ops::{causal_attention, causal_mask};
use candle_lisa::{layer_norm, linear, LayerNorm, Linear};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

type Error = Box<dyn std::error::Error>;

/// The fields of GPT-2's `config.json` that set the computation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_positions: usize,
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_activation")]
    pub activation_function: String,
    #[serde(default = "yes")]
    pub scale_attn_weights: bool,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    #[serde(default)]
    pub reorder_and_upcast_attn: bool,
    #[serde(default)]
    pub add_cross_attention: bool,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_activation() -> String {
    "gelu_new".into()
}
fn yes() -> bool {
    true
}

impl Gpt2Config {
    /// A small GPT-2 for the bundled byte-level data.
    pub fn tiny(vocab_size: usize) -> Self {
        serde_json::from_value(serde_json::json!({
            "model_type": "gpt2", "vocab_size": vocab_size, "n_embd": 128, "n_layer": 6,
            "n_head": 4, "n_positions": 256, "tie_word_embeddings": true,
        }))
        .expect("a valid config")
    }

    /// Reads `config.json`, refusing settings this implementation does not compute.
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let c: Self = serde_json::from_str(&std::fs::read_to_string(path)?)?;
        if !matches!(
            c.activation_function.as_str(),
            "gelu_new" | "gelu_pytorch_tanh"
        ) {
            return Err(format!(
                "activation_function {:?} is not supported",
                c.activation_function
            )
            .into());
        }
        if !c.scale_attn_weights
            || c.scale_attn_by_inverse_layer_idx
            || c.reorder_and_upcast_attn
            || c.add_cross_attention
        {
            return Err("scale_attn_weights=false, scale_attn_by_inverse_layer_idx, reorder_and_upcast_attn and add_cross_attention are not supported".into());
        }
        for key in ["resid_pdrop", "embd_pdrop", "attn_pdrop"] {
            if c.extra
                .get(key)
                .and_then(|v| v.as_f64())
                .is_some_and(|p| p != 0.0)
            {
                return Err(format!("{key} must be 0 (no dropout here)").into());
            }
        }
        if !c.n_embd.is_multiple_of(c.n_head) {
            return Err("n_embd must be a multiple of n_head".into());
        }
        Ok(c)
    }

    fn inner(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }
}

/// Whether a tensor is a `Conv1D` weight (stored `(in, out)` by Hugging Face).
fn is_conv1d(name: &str) -> bool {
    [".c_attn.weight", ".c_proj.weight", ".c_fc.weight"]
        .iter()
        .any(|s| name.ends_with(s))
}

/// Loads a GPT-2 directory (`config.json`, `model.safetensors`) into a `VarMap` of `dtype`,
/// with the `Conv1D` weights transposed to `(out, in)`.
pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<(Gpt2Config, VarMap), Error> {
    let config = Gpt2Config::from_file(&dir.join("config.json"))?;
    let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), device)?;
    let vars = VarMap::new();
    {
        let mut data = vars.data().lock().map_err(|_| "poisoned VarMap")?;
        for (name, t) in tensors {
            // Some checkpoints name the parameters without the `transformer.` prefix, and
            // carry the attention's causal-mask buffer.
            if name.ends_with(".attn.bias")
                || name.ends_with(".attn.masked_bias")
                || name == "lm_head.weight"
            {
                continue;
            }
            let name = match name.starts_with("transformer.") {
                true => name,
                false => format!("transformer.{name}"),
            };
            let t = match is_conv1d(&name) {
                true => t.t()?.contiguous()?,
                false => t,
            };
            data.insert(name, Var::from_tensor(&t.to_dtype(dtype)?)?);
        }
    }
    Ok((config, vars))
}

/// Saves a model in GPT-2's layout (Conv1D weights back to `(in, out)`), f32.
pub fn save(dir: &Path, config: &Gpt2Config, vars: &VarMap) -> Result<(), Error> {
    std::fs::create_dir_all(dir)?;
    let data = vars.data().lock().map_err(|_| "poisoned VarMap")?;
    let mut out: HashMap<String, Tensor> = HashMap::new();
    for (name, var) in data.iter() {
        let t = var.as_tensor().detach().to_dtype(DType::F32)?;
        let t = match is_conv1d(name) {
            true => t.t()?.contiguous()?,
            false => t,
        };
        out.insert(name.clone(), t);
    }
    candle_core::safetensors::save(&out, dir.join("model.safetensors"))?;
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(config)?,
    )?;
    Ok(())
}

struct Block {
    ln_1: LayerNorm,
    c_attn: Linear,
    attn_proj: Linear,
    ln_2: LayerNorm,
    c_fc: Linear,
    mlp_proj: Linear,
    heads: usize,
}

impl Block {
    fn forward(&self, x: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let d = h / self.heads;
        let qkv = self.c_attn.forward(&self.ln_1.forward(x)?)?;
        let split = |i: usize| {
            qkv.narrow(2, i * h, h)?
                .reshape((b, t, self.heads, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let y = causal_attention(
            &split(0)?,
            &split(1)?,
            &split(2)?,
            mask,
            (d as f64).powf(-0.5),
        )?
        .transpose(1, 2)?
        .reshape((b, t, h))?;
        let x = (x + self.attn_proj.forward(&y)?)?;
        let m = self.c_fc.forward(&self.ln_2.forward(&x)?)?.gelu()?;
        x + self.mlp_proj.forward(&m)?
    }
}

/// GPT-2 with a tied LM head, built from a `VarBuilder` (over a `VarMap` to create weights,
/// or from `LisaAdamW::var_builder()` to train with LISA).
pub struct Gpt2 {
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    head: Linear,
}

impl Gpt2 {
    pub fn new(c: &Gpt2Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let vb = vb.pp("transformer");
        let ln = candle_nn::LayerNormConfig {
            eps: c.layer_norm_epsilon,
            ..Default::default()
        };
        let init = candle_nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let wte = vb.get_with_hints((c.vocab_size, c.n_embd), "wte.weight", init)?;
        let wpe = vb.get_with_hints((c.n_positions, c.n_embd), "wpe.weight", init)?;
        let (h, i) = (c.n_embd, c.inner());
        let blocks = (0..c.n_layer)
            .map(|l| {
                let vb = vb.pp(format!("h.{l}"));
                Ok(Block {
                    ln_1: layer_norm(h, ln, vb.pp("ln_1"))?,
                    c_attn: linear(h, 3 * h, vb.pp("attn.c_attn"))?,
                    attn_proj: linear(h, h, vb.pp("attn.c_proj"))?,
                    ln_2: layer_norm(h, ln, vb.pp("ln_2"))?,
                    c_fc: linear(h, i, vb.pp("mlp.c_fc"))?,
                    mlp_proj: linear(i, h, vb.pp("mlp.c_proj"))?,
                    heads: c.n_head,
                })
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            head: Linear::new(wte.clone(), None),
            wte,
            wpe,
            blocks,
            ln_f: layer_norm(h, ln, vb.pp("ln_f"))?,
        })
    }

    /// Logits `(batch, seq, vocab)` for token ids `(batch, seq)`.
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let tokens = self
            .wte
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, ()))?;
        let positions = self.wpe.narrow(0, 0, t)?;
        let mut x = tokens.broadcast_add(&positions)?;
        let mask = causal_mask(t, x.dtype(), x.device())?;
        for block in &self.blocks {
            x = block.forward(&x, &mask)?;
        }
        self.head.forward(&self.ln_f.forward(&x)?)
    }

    /// Mean next-token cross-entropy of `ids` (every position trained on).
    pub fn loss(&self, ids: &Tensor) -> Result<Tensor, candle_lisa::LisaError> {
        let labels = ids.to_dtype(DType::I64)?;
        candle_lisa::nn::loss::causal_lm_loss(&self.forward(ids)?, &labels)
    }
}
