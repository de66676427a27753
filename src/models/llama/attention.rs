//! Self-attention: the q, k, v and o projections (fused `qkv_proj` for Phi-3), RoPE per layer
//! kind, Qwen3's per-head q/k norms and OLMo 2's over the whole projection, Gemma 2's soft-capping, and the KV cache of generation.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::nn::kernels;
use crate::nn::linear::{linear_b, Linear};
use crate::nn::lora::LoraConfig;
use crate::nn::ops::{
    causal_attention_token_major, rms_norm, rope, rope_token_major, CausalMask, MaskRef,
};

use super::{norm_weight, Architecture, QkNorm};

/// LoRA settings and the builder of the adapters' scope (e.g. `model.layers.3.self_attn`).
pub(super) type Adapters<'a> = Option<(&'a LoraConfig, &'a VarBuilder<'a>)>;

/// The projection `vb.pp(name)`, with a LoRA adapter when `lora` targets it.
pub(super) fn projection(
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
pub(super) enum Qkv {
    Split { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

impl Qkv {
    pub(super) fn linears(&self) -> Vec<&Linear> {
        match self {
            Self::Split { q, k, v } => vec![q, k, v],
            Self::Fused(qkv) => vec![qkv],
        }
    }
}

pub(super) struct Attention {
    pub(super) qkv: Qkv,
    pub(super) o: Linear,
    /// The factor on q·kᵀ, and Gemma 2's soft-cap of the scores.
    pub(super) scale: f64,
    pub(super) softcap: Option<f64>,
    /// RMSNorm weights on queries and keys (Qwen3; Gemma 3 with `1 + w`; OLMo 2 over the
    /// whole projection), epsilon.
    pub(super) qk_norm: Option<(Tensor, Tensor, f64)>,
    /// Whether `qk_norm` is over the whole projection (OLMo 2) rather than per head.
    pub(super) qk_norm_full: bool,
    pub(super) norm_offset: bool,
    pub(super) heads: usize,
    pub(super) kv_heads: usize,
    pub(super) head_dim: usize,
}

impl Attention {
    /// Queries and keys (normed for Qwen3, rotated) and values, each `(b, heads, t, d)`.
    pub(super) fn project(
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
        let (q, k) = match (&self.qk_norm, self.qk_norm_full) {
            (Some((qn, kn, eps)), true) => (rms_norm(&q, qn, *eps)?, rms_norm(&k, kn, *eps)?),
            _ => (q, k),
        };
        let (mut q, mut k) = (split(q, self.heads)?, split(k, self.kv_heads)?);
        if let (Some((qn, kn, eps)), false) = (&self.qk_norm, self.qk_norm_full) {
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

    pub(super) fn new(
        a: &Architecture,
        vb: VarBuilder,
        lora: Adapters,
    ) -> candle_core::Result<Self> {
        let (h, d) = (a.hidden_size, a.head_dim);
        let proj = |in_dim, out_dim, bias, name| projection(in_dim, out_dim, bias, &vb, name, lora);
        let norm_init = candle_nn::Init::Const(if a.norm_offset { 0.0 } else { 1.0 });
        let (q_dim, kv_dim) = (a.heads * d, a.kv_heads * d);
        let qk_norm = match a.qk_norm {
            Some(kind) => {
                let (qd, kd) = match kind {
                    QkNorm::PerHead => (d, d),
                    QkNorm::Full => (q_dim, kv_dim),
                };
                Some((
                    vb.get_with_hints(qd, "q_norm.weight", norm_init)?,
                    vb.get_with_hints(kd, "k_norm.weight", norm_init)?,
                    a.rms_norm_eps,
                ))
            }
            None => None,
        };
        let qkv = match a.fused_projections {
            true => Qkv::Fused(proj(h, q_dim + 2 * kv_dim, a.qkv_bias, "qkv_proj")?),
            false => Qkv::Split {
                q: proj(h, q_dim, a.qkv_bias, "q_proj")?,
                k: proj(h, kv_dim, a.qkv_bias, "k_proj")?,
                v: proj(h, kv_dim, a.qkv_bias, "v_proj")?,
            },
        };
        Ok(Self {
            qk_norm,
            qk_norm_full: a.qk_norm == Some(QkNorm::Full),
            norm_offset: a.norm_offset,
            qkv,
            scale: a.attention_scale,
            softcap: a.attention_softcap,
            o: proj(q_dim, h, a.o_bias, "o_proj")?,
            heads: a.heads,
            kv_heads: a.kv_heads,
            head_dim: d,
        })
    }

    pub(super) fn forward(
        &self,
        x: &Tensor,
        rope_cs: &(Tensor, Tensor),
        mask: &CausalMask,
    ) -> candle_core::Result<Tensor> {
        if let Some(y) = self.forward_token_major(x, rope_cs, mask)? {
            return Ok(y);
        }
        let (b, t, _) = x.dims3()?;
        let (q, k, v) = self.project(x, rope_cs)?;
        mask.attention(&q, &k, &v, self.scale, self.softcap)?
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
    pub(super) fn forward_token_major(
        &self,
        x: &Tensor,
        rope_cs: &(Tensor, Tensor),
        mask: &CausalMask,
    ) -> candle_core::Result<Option<Tensor>> {
        if self.qk_norm.is_some() || self.softcap.is_some() || !kernels::all_cpu_f32(&[x]) {
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
        let mask = MaskRef::Causal(mask.window());
        match causal_attention_token_major((&q, &k, &v), mask, self.scale, heads)? {
            Some(y) => self.o.forward(&y).map(Some),
            None => Ok(None),
        }
    }
}

/// Keys and values of the positions seen so far, per block, for incremental decoding.
#[derive(Default)]
pub(super) struct KvCache {
    pub(super) layers: Vec<Option<(Tensor, Tensor)>>,
}

impl Attention {
    /// Attention of `x` (new positions `offset..offset + t`) over the cached positions and
    /// itself, appending its keys and values to `cache`. Inference only: nothing is tracked.
    pub(super) fn forward_cached(
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
