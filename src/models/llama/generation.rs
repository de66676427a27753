//! Text generation with a KV cache: greedy or sampled continuation of a prompt.

use candle_core::{DType, Module, Tensor};
use rand::{Rng, SeedableRng};

use crate::error::{LisaError, Result};
use crate::nn::ops::rms_norm;

use super::attention::KvCache;
use super::{norm_weight, Llama};

/// How [`Llama::generate`] continues a prompt.
///
/// ```
/// use candle_lisa::models::Sampling;
/// let greedy = Sampling { max_new_tokens: 20, stop: vec![2], ..Default::default() };
/// assert_eq!(greedy.temperature, 0.0);
/// let sampled = Sampling { temperature: 0.8, seed: 7, ..greedy.clone() };
/// assert_eq!(sampled.max_new_tokens, 20);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    /// The most tokens to add (default 64).
    pub max_new_tokens: usize,
    /// 0 (the default) picks the most likely token; above 0, tokens are drawn from
    /// softmax(logits / temperature).
    pub temperature: f64,
    /// Seeds the ChaCha8 generator that draws tokens when `temperature` is above 0.
    pub seed: u64,
    /// Generation stops after any of these ids (kept in the output): the end-of-sequence ids.
    pub stop: Vec<u32>,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 0.0,
            seed: 0,
            stop: Vec::new(),
        }
    }
}

impl Llama {
    /// Continues `prompt` by up to `sampling.max_new_tokens` tokens, stopping after any id of
    /// `sampling.stop`. Greedy at temperature 0, else sampled (see [`Sampling`]). The prompt
    /// is run once and each new token attends to cached keys and values (a KV cache), so a
    /// token costs one position's forward pass. Builds no graph.
    ///
    /// # Errors
    /// [`LisaError::InvalidArgument`] for an empty prompt or a temperature that is negative or
    /// not finite; a sequence longer than an enabled sliding window; candle errors.
    pub fn generate(&self, prompt: &[u32], sampling: &Sampling) -> Result<Vec<u32>> {
        let Sampling {
            max_new_tokens,
            temperature,
            seed,
            ref stop,
        } = *sampling;
        if !(temperature.is_finite() && temperature >= 0.0) {
            return Err(LisaError::InvalidArgument {
                what: "temperature",
                reason: format!("{temperature} must be finite and at least 0"),
            });
        }
        if prompt.is_empty() {
            return Err(LisaError::InvalidArgument {
                what: "prompt",
                reason: "generate needs a prompt of at least one token (a BOS id will do)".into(),
            });
        }
        let total = prompt.len() + max_new_tokens;
        if let Some(w) = self.arch.window.filter(|&w| total > w) {
            return Err(LisaError::UnsupportedConfig {
                field: "sliding_window",
                value: w.to_string(),
                hint: "generating past the sliding window is not supported (the key/value cache keeps every position); generate fewer tokens",
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
            let eps = self.arch.rms_norm_eps;
            let layers = self.blocks.iter().zip(&tables).zip(cache.layers.iter_mut());
            for ((block, (cos, sin)), layer) in layers {
                let rope_cs = (cos.narrow(0, offset, t)?, sin.narrow(0, offset, t)?);
                x = block.forward_cached(&x, &rope_cs, eps, layer)?;
            }
            let norm = norm_weight(&self.norm, self.arch.norm_offset)?;
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
