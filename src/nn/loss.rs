//! Causal-LM losses: [`causal_lm_loss`] on logits, and [`head_loss`], the LM head and the loss
//! as one op that never keeps the `(rows, vocab)` logits.

use candle_core::{DType, Tensor};

use crate::error::{LisaError, Result};
use crate::nn::custom_op::{attach1, attach2};
use crate::nn::kernels::{self, matmul};
use crate::nn::ops::compute_dtype;

/// Label value that [`causal_lm_loss`] ignores (padding, prompt tokens), as in Hugging Face.
pub const IGNORE_INDEX: i64 = -100;

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
/// On the CPU in f32, and on a CUDA device (feature `cuda`) in f32, bf16 or f16, one fused
/// pass over the logits computes the loss and leaves dL/dlogits in their place (in the
/// logits' dtype), and the op keeps that buffer until its backward pass (which then needs no
/// second product with the head): the same size as the logits the backward pass would
/// recompute, held from the loss to the start of the backward pass, when the whole graph is
/// alive anyway, so the step's peak does not grow.
pub fn head_loss(hidden: &Tensor, w: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (b, t, h) = hidden.dims3()?;
    let (v, wh) = w.dims2()?;
    if wh != h {
        return Err(LisaError::InvalidArgument {
            what: "head_loss shapes",
            reason: format!(
                "hidden states ({b}, {t}, {h}) do not match the head weight ({v}, {wh})"
            ),
        });
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
    if kernels::all_cpu_f32(&[hidden, w]) {
        // One pass over each row of logits; it leaves dL/dlogits in their place.
        let (labels, weights) = targets.rows()?;
        let count = targets.count;
        let logits = move |x: &Tensor, w: &Tensor| -> candle_core::Result<Vec<f32>> {
            kernels::product::<f32>(&rows(x)?, &w.t()?)
                .map(|(l, _)| l)
                .ok_or_else(|| candle_core::Error::Msg("head_loss: logits on the CPU".into()))
        };
        // dL/dlogits comes out of the same pass and waits for the backward pass in place of
        // the logits (as large as the logits the backward pass would otherwise recompute).
        let mut d = logits(hidden, w)?;
        let sum = kernels::cross_entropy_fused(&mut d, v, &labels, &weights, (1.0 / count) as f32);
        let loss = Tensor::new((sum / count) as f32, hidden.device())?;
        let d = std::sync::Mutex::new(Some(d));
        return Ok(attach2(
            "lisa-head-loss",
            hidden,
            w,
            loss,
            move |x, w, _y, g| {
                let g = g.to_dtype(DType::F32)?.to_scalar::<f32>()?;
                let kept = take_kept(&d)?;
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
                        kernels::cross_entropy_bwd(&mut d, v, &labels, &coef);
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
    #[cfg(feature = "cuda")]
    if hidden.device().is_cuda() && targets.dtype == DType::F32 {
        // One kernel per step computes the loss and leaves dL/dlogits in the logits' place
        // (in their dtype), kept until the backward pass, as on the CPU.
        let (safe, mask, inv_count) = (
            targets.safe.clone(),
            targets.mask.clone(),
            1.0 / targets.count,
        );
        let fused = move |x: &Tensor,
                          w: &Tensor|
              -> candle_core::Result<Option<(Tensor, Tensor)>> {
            let d = logits(x, w)?;
            let rows = kernels::cuda::cross_entropy_in_place(&d, &safe, &mask, inv_count as f32)?;
            Ok(rows.map(|rows| (d, rows)))
        };
        if let Some((d, rows)) = fused(hidden, w)? {
            let loss = (rows.sum_all()? * inv_count)?;
            let d = std::sync::Mutex::new(Some(d));
            return Ok(attach2(
                "lisa-head-loss",
                hidden,
                w,
                loss,
                move |x, w, _y, g| {
                    let kept = take_kept(&d)?;
                    let d = match kept {
                        Some(d) => d,
                        // A second backward pass over the same graph: recompute.
                        None => {
                            fused(x, w)?
                                .ok_or_else(|| {
                                    candle_core::Error::Msg(
                                        "head_loss: kernel refused its operands".into(),
                                    )
                                })?
                                .0
                        }
                    };
                    // Scaled by g on the device: reading g would synchronise the backward pass.
                    let d = d.broadcast_mul(&g.detach().to_dtype(d.dtype())?)?;
                    grads(d, x, w)
                },
            )?);
        }
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

/// The dL/dlogits buffer the forward pass left for the backward pass; `None` once taken (a
/// second backward pass over the same graph recomputes it).
fn take_kept<T>(kept: &std::sync::Mutex<Option<T>>) -> candle_core::Result<Option<T>> {
    Ok(kept
        .lock()
        .map_err(|_| candle_core::Error::Msg("head_loss: poisoned lock".into()))?
        .take())
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
            return Err(LisaError::InvalidArgument {
                what: "labels",
                reason: format!(
                    "labels of shape ({lb}, {lt}) do not match logits ({b}, {t}, {v}); they \
                     must be equal and seq >= 2"
                ),
            });
        }
        // A label outside the vocabulary would otherwise be clamped to the last token and
        // train on it silently.
        let host = labels
            .flatten_all()?
            .to_dtype(DType::I64)?
            .to_vec1::<i64>()?;
        if let Some(bad) = host
            .iter()
            .find(|&&l| l >= v as i64 || (l < 0 && l != IGNORE_INDEX))
        {
            return Err(LisaError::InvalidArgument {
                what: "labels",
                reason: format!(
                    "label {bad} is neither a token id below the vocabulary size {v} nor \
                     {IGNORE_INDEX} (ignored): check the tokenizer against the model's vocab_size"
                ),
            });
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
        // The counted labels are each row's from position 1 on (the host copy read above, so
        // no second read of the device).
        let count = host
            .chunks(t)
            .map(|row| row[1..].iter().filter(|&&l| l >= 0).count())
            .sum::<usize>()
            .max(1) as f64;
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
