//! Examples and batches for causal-LM training: right padding with each example at its own
//! length, the prompt and the padding out of the loss, and sequence packing as an option.
//!
//! **Padding and attention.** Batches are right-padded. Under a causal mask a real token only
//! attends to positions before it, which are all real, so padding never enters the attention
//! of a token that counts, and positions (RoPE) start at 0 for every example; padded
//! positions carry the label [`IGNORE_INDEX`], so they are out of the loss. A padded batch
//! therefore gives every example the same loss and gradients as running it alone (tested
//! against exactly that), with no attention mask to build.

use std::path::Path;

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

use crate::error::{LisaError, Result};
use crate::nn::loss::IGNORE_INDEX;

/// One training sequence: token ids, and a label per position ([`IGNORE_INDEX`] where the
/// position is not trained on). Labels are the ids themselves; the model shifts them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    /// Token ids.
    pub ids: Vec<u32>,
    /// One label per id.
    pub labels: Vec<i64>,
}

impl Example {
    /// Plain text: every token is trained on.
    pub fn text(ids: Vec<u32>) -> Self {
        let labels = ids.iter().map(|&i| i as i64).collect();
        Self { ids, labels }
    }

    /// `prompt`, then `response` and `eos`: only the response and `eos` are trained on.
    ///
    /// ```
    /// use candle_lisa::train::Example;
    /// let e = Example::prompt_response(&[5, 6], &[7], 2);
    /// assert_eq!(e.ids, [5, 6, 7, 2]);
    /// assert_eq!(e.labels, [-100, -100, 7, 2]);
    /// ```
    pub fn prompt_response(prompt: &[u32], response: &[u32], eos: u32) -> Self {
        let ids: Vec<u32> = prompt
            .iter()
            .chain(response)
            .copied()
            .chain([eos])
            .collect();
        let labels = ids
            .iter()
            .enumerate()
            .map(|(i, &id)| {
                if i < prompt.len() {
                    IGNORE_INDEX
                } else {
                    id as i64
                }
            })
            .collect();
        Self { ids, labels }
    }

    /// Positions whose label counts, once the model shifts labels by one (the first label
    /// predicts nothing).
    pub fn trained_tokens(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l >= 0).count()
    }
}

/// A right-padded batch of `(batch, seq)` ids (u32) and labels (i64).
#[derive(Clone, Debug)]
pub struct Batch {
    /// Token ids, `(batch, seq)`.
    pub ids: Tensor,
    /// Labels, `(batch, seq)`, [`IGNORE_INDEX`] on padding and prompts.
    pub labels: Tensor,
    /// How many labels count (after the model's shift by one): the loss is their mean.
    pub tokens: usize,
}

/// Pads `examples` on the right to the longest one (cut at `max_len` when given) with
/// `pad_id` and [`IGNORE_INDEX`] labels.
///
/// # Errors
/// [`LisaError::InvalidConfig`] for no example, an example whose ids and labels differ in
/// length, or a batch whose longest example is shorter than 2 tokens.
pub fn pad_batch(
    examples: &[Example],
    pad_id: u32,
    max_len: Option<usize>,
    device: &Device,
) -> Result<Batch> {
    let bad = |m: String| LisaError::InvalidConfig(format!("pad_batch: {m}"));
    if let Some(e) = examples.iter().find(|e| e.ids.len() != e.labels.len()) {
        return Err(bad(format!(
            "an example has {} ids but {} labels",
            e.ids.len(),
            e.labels.len()
        )));
    }
    let longest = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let t = max_len.map_or(longest, |m| longest.min(m));
    if t < 2 {
        return Err(bad(format!(
            "{} examples, the longest {longest} tokens: a batch needs an example of 2 or more",
            examples.len()
        )));
    }
    let (mut ids, mut labels) = (Vec::with_capacity(examples.len() * t), Vec::new());
    let mut tokens = 0;
    for e in examples {
        let n = e.ids.len().min(t);
        ids.extend(
            e.ids[..n]
                .iter()
                .copied()
                .chain(std::iter::repeat_n(pad_id, t - n)),
        );
        let l = &e.labels[..n];
        tokens += l.iter().skip(1).filter(|&&x| x >= 0).count();
        labels.extend(
            l.iter()
                .copied()
                .chain(std::iter::repeat_n(IGNORE_INDEX, t - n)),
        );
    }
    let b = examples.len();
    Ok(Batch {
        ids: Tensor::from_vec(ids, (b, t), device)?,
        labels: Tensor::from_vec(labels, (b, t), device)?,
        tokens,
    })
}

/// Sequence packing: concatenates examples, in order, into sequences of at most `seq_len`
/// tokens, starting a new one when the next example would not fit (an example longer than
/// `seq_len` is cut). Fewer padded positions, at a price: tokens attend across example
/// boundaries inside a packed sequence (as with packing in TRL without position resets).
///
/// ```
/// use candle_lisa::train::{pack_examples, Example};
/// let ex = [Example::text(vec![1, 2]), Example::text(vec![3, 4]), Example::text(vec![5, 6, 7])];
/// let packed = pack_examples(&ex, 4);
/// assert_eq!(packed.iter().map(|e| e.ids.clone()).collect::<Vec<_>>(), [vec![1, 2, 3, 4], vec![5, 6, 7]]);
/// ```
pub fn pack_examples(examples: &[Example], seq_len: usize) -> Vec<Example> {
    let mut out: Vec<Example> = Vec::new();
    for e in examples {
        let n = e.ids.len().min(seq_len);
        match out.last_mut() {
            Some(last) if last.ids.len() + n <= seq_len => {
                last.ids.extend(&e.ids[..n]);
                last.labels.extend(&e.labels[..n]);
            }
            _ => out.push(Example {
                ids: e.ids[..n].to_vec(),
                labels: e.labels[..n].to_vec(),
            }),
        }
    }
    out
}

/// Which examples each optimizer step trains on: a function of the seed and the step alone,
/// so the data position of a run is its step and a resumed run sees the same batches.
///
/// In a data-parallel run every rank draws the same batch and keeps its own contiguous share
/// of it ([`for_rank`](Self::for_rank)), so the ranks together train on exactly the examples
/// one process would, and the data position is still the step.
///
/// ```
/// use candle_lisa::train::StepSampler;
/// let s = StepSampler::new(7);
/// assert_eq!(s.indices(12, 4, 100), s.indices(12, 4, 100));
/// assert!(s.indices(12, 4, 100).iter().all(|&i| i < 100));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepSampler {
    seed: u64,
    /// This rank and the number of ranks; (0, 1) in a single process.
    rank: usize,
    world_size: usize,
}

impl StepSampler {
    /// A sampler for `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            rank: 0,
            world_size: 1,
        }
    }

    /// The sampler of rank `rank` of `world_size`: [`micro_batches`](Self::micro_batches)
    /// gives its share of each step's batch, examples `rank·B/W .. (rank+1)·B/W` of the `B`
    /// drawn.
    ///
    /// ```
    /// use candle_lisa::train::StepSampler;
    /// let all = StepSampler::new(7).indices(3, 8, 100);
    /// let second = StepSampler::new(7).for_rank(1, 2)?;
    /// assert_eq!(second.indices(3, 8, 100), all);
    /// # Ok::<(), candle_lisa::LisaError>(())
    /// ```
    ///
    /// # Errors
    /// [`LisaError::InvalidConfig`] unless `rank < world_size`.
    pub fn for_rank(self, rank: usize, world_size: usize) -> Result<Self> {
        if rank >= world_size {
            return Err(LisaError::InvalidConfig(format!(
                "rank {rank} is out of range for {world_size} ranks"
            )));
        }
        Ok(Self {
            rank,
            world_size,
            ..self
        })
    }

    /// `count` indices below `len`, drawn with replacement for `step` (ChaCha8, the same on
    /// every platform).
    pub fn indices(&self, step: u64, count: usize, len: usize) -> Vec<usize> {
        let seed = self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..count)
            .map(|_| rng.random_range(0..len.max(1)))
            .collect()
    }

    /// The micro-batches of `step`: `batch_size` examples split into `micro` padded batches;
    /// for a sampler [`for_rank`](Self::for_rank), this rank's share of them.
    ///
    /// # Errors
    /// Those of [`pad_batch`], and [`LisaError::InvalidConfig`] for no example, or for fewer
    /// examples in a batch than ranks.
    #[allow(clippy::too_many_arguments)]
    pub fn micro_batches(
        &self,
        examples: &[Example],
        step: u64,
        batch_size: usize,
        micro: usize,
        pad_id: u32,
        max_len: Option<usize>,
        device: &Device,
    ) -> Result<Vec<Batch>> {
        if examples.is_empty() {
            return Err(LisaError::InvalidConfig("no training example".into()));
        }
        let (rank, world) = (self.rank, self.world_size);
        if batch_size < world {
            return Err(LisaError::InvalidConfig(format!(
                "a batch of {batch_size} cannot be shared by {world} ranks: give each rank \
                 one example at least"
            )));
        }
        let drawn = self.indices(step, batch_size, examples.len());
        let share = &drawn[rank * batch_size / world..(rank + 1) * batch_size / world];
        let picked: Vec<Example> = share.iter().map(|&i| examples[i].clone()).collect();
        let size = picked.len().div_ceil(micro.max(1)).max(1);
        picked
            .chunks(size)
            .map(|c| pad_batch(c, pad_id, max_len, device))
            .collect()
    }
}

/// Prompt/response pairs from a JSONL file: one object per line with string fields `prompt`
/// and `response` (blank lines skipped).
///
/// # Errors
/// [`LisaError::Io`] for an unreadable file, [`LisaError::InvalidConfig`] naming the line
/// for bad JSON or a missing field.
pub fn read_prompt_response_jsonl(path: impl AsRef<Path>) -> Result<Vec<(String, String)>> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(crate::io::io("cannot read", path))?;
    let mut pairs = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let at = |m: String| LisaError::InvalidConfig(format!("{}:{}: {m}", path.display(), i + 1));
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| at(e.to_string()))?;
        let field = |k: &str| {
            v[k].as_str()
                .map(str::to_string)
                .ok_or_else(|| at(format!("no string field {k:?}")))
        };
        pairs.push((field("prompt")?, field("response")?));
    }
    Ok(pairs)
}

/// The mean loss over every counted label of `examples`, in padded batches of `batch_size`
/// (each batch weighted by its labels), without building a graph if the model's weights are
/// detached.
///
/// # Errors
/// Those of [`pad_batch`] and of the model.
pub fn eval_loss(
    model: &impl super::CausalLm,
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
