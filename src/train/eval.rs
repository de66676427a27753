//! Evaluation on held-out data: the token-weighted loss, and exact-match accuracy of greedy
//! generation.

use candle_core::Device;

use super::CausalLm;
use crate::data::{pad_batch, Example};
use crate::error::Result;
use crate::models::{Llama, Sampling};

/// The mean loss over every counted label of `examples`, in padded batches of `batch_size`
/// (each batch weighted by its labels), without building a graph if the model's weights are
/// detached.
///
/// # Errors
/// Those of [`pad_batch`] and of the model.
pub fn eval_loss(
    model: &impl CausalLm,
    examples: &[Example],
    batch_size: usize,
    pad_id: u32,
    max_len: Option<usize>,
    device: &Device,
) -> Result<f32> {
    let (mut sum, mut tokens) = (0.0f64, 0usize);
    for chunk in examples.chunks(batch_size.max(1)) {
        let b = pad_batch(chunk, pad_id, max_len, device)?;
        let loss = model
            .loss(&b)?
            .to_dtype(candle_core::DType::F32)?
            .to_scalar::<f32>()?;
        sum += loss as f64 * b.tokens as f64;
        tokens += b.tokens;
    }
    Ok((sum / tokens.max(1) as f64) as f32)
}

/// The share of `pairs` whose greedy continuation of the prompt, up to `eos`, is exactly the
/// response; `None` for no pairs. Each answer gets one token more than its response, so a
/// model that does not stop is wrong.
///
/// # Errors
/// Those of [`Llama::generate`].
pub fn exact_match(model: &Llama, pairs: &[(Vec<u32>, Vec<u32>)], eos: u32) -> Result<Option<f32>> {
    let mut correct = 0;
    for (prompt, response) in pairs {
        let sampling = Sampling {
            max_new_tokens: response.len() + 1,
            stop: vec![eos],
            ..Default::default()
        };
        let out = model.generate(prompt, &sampling)?;
        correct += usize::from(out.iter().take_while(|&&i| i != eos).eq(response));
    }
    Ok((!pairs.is_empty()).then(|| correct as f32 / pairs.len() as f32))
}
