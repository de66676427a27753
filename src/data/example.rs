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
    /// use candle_lisa::data::Example;
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
/// [`LisaError::InvalidArgument`] for no example, an example whose ids and labels differ in
/// length, or a batch whose longest example is shorter than 2 tokens.
pub fn pad_batch(
    examples: &[Example],
    pad_id: u32,
    max_len: Option<usize>,
    device: &Device,
) -> Result<Batch> {
    let bad = |reason: String| LisaError::InvalidArgument {
        what: "pad_batch examples",
        reason,
    };
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
/// use candle_lisa::data::{pack_examples, Example};
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

/// Prompt/response pairs from a JSONL file: one object per line with string fields `prompt`
/// and `response` (blank lines skipped).
///
/// # Errors
/// [`LisaError::Io`] for an unreadable file, [`LisaError::InvalidData`] naming the line
/// for bad JSON or a missing field.
pub fn read_prompt_response_jsonl(path: impl AsRef<Path>) -> Result<Vec<(String, String)>> {
    read_jsonl_records(path.as_ref(), |v| {
        let field = |k: &str| {
            v[k].as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("no string field {k:?}"))
        };
        Ok((field("prompt")?, field("response")?))
    })
}

/// Every record of a JSONL file (blank lines skipped), each turned into a `T` by `record`;
/// bad JSON or a record `record` refuses is [`LisaError::InvalidData`] naming the line.
pub(crate) fn read_jsonl_records<T>(
    path: &Path,
    mut record: impl FnMut(serde_json::Value) -> std::result::Result<T, String>,
) -> Result<Vec<T>> {
    let text = std::fs::read_to_string(path).map_err(crate::io::io("cannot read", path))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |reason: String| LisaError::InvalidData {
            path: format!("{}:{}", path.display(), i + 1).into(),
            reason,
        };
        let v = serde_json::from_str(line).map_err(|e| at(e.to_string()))?;
        out.push(record(v).map_err(at)?);
    }
    Ok(out)
}
