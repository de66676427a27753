//! Where training data comes from: the bundled tasks, plain text, prompt/response JSONL and
//! chat JSONL, each split into training and held-out examples.
//!
//! Splits are fixed by the data, not by a random draw: a file's last tenth (at least one
//! record) is held out, a bundled task's first [`Task::HELD_OUT`] problems.

use std::collections::BTreeSet;
use std::path::Path;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::chat::{chat_example, read_chat_jsonl, ChatTemplate};
use super::example::Example;
use super::tokenizer::{ByteTokenizer, HfTokenizer, TextTokenizer};
use crate::error::{LisaError, Result};

/// Training examples and held-out ones.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dataset {
    /// What the model trains on.
    pub train: Vec<Example>,
    /// Held-out examples, for the held-out loss.
    pub eval: Vec<Example>,
    /// The held-out (prompt, response) token pairs, for exact-match accuracy; empty for
    /// text and chat data.
    pub pairs: Vec<(Vec<u32>, Vec<u32>)>,
}

/// A task bundled with the crate: problems generated from a seed, answers checked by exact
/// match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// Five random digits into ascending order: `31415=` → `11345`; 5000 distinct problems.
    /// A token's answer depends on every digit of the prompt, which takes more than copying.
    Sort,
    /// `a+b=` → `a+b` for a, b in 0..50, shuffled: 2500 problems.
    Add,
}

impl std::str::FromStr for Task {
    type Err = LisaError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sort" => Ok(Self::Sort),
            "add" => Ok(Self::Add),
            _ => Err(LisaError::InvalidArgument {
                what: "task",
                reason: format!("{s:?} is not a bundled task: use sort or add"),
            }),
        }
    }
}

impl Task {
    /// How many of a task's problems are held out: the first ones.
    pub const HELD_OUT: usize = 200;

    /// The task's (prompt, response) problems for `seed`, in their order.
    ///
    /// ```
    /// use candle_lisa::data::Task;
    /// let sort = Task::Sort.problems(0);
    /// assert_eq!(sort.len(), 5000);
    /// let (prompt, answer) = &sort[0];
    /// let mut digits: Vec<char> = prompt.trim_end_matches('=').chars().collect();
    /// digits.sort();
    /// assert_eq!(answer, &digits.into_iter().collect::<String>());
    /// assert_eq!(Task::Add.problems(0).len(), 2500);
    /// ```
    pub fn problems(self, seed: u64) -> Vec<(String, String)> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        match self {
            Self::Sort => {
                let (mut seen, mut problems) = (BTreeSet::new(), Vec::new());
                while problems.len() < 5000 {
                    let digits: Vec<u8> = (0..5).map(|_| rng.random_range(b'0'..=b'9')).collect();
                    if seen.insert(digits.clone()) {
                        let mut sorted = digits.clone();
                        sorted.sort_unstable();
                        let text = |d: Vec<u8>| d.into_iter().map(char::from).collect::<String>();
                        problems.push((format!("{}=", text(digits)), text(sorted)));
                    }
                }
                problems
            }
            Self::Add => {
                let mut pairs: Vec<(u32, u32)> =
                    (0..50).flat_map(|a| (0..50).map(move |b| (a, b))).collect();
                pairs.shuffle(&mut rng);
                let text = |(a, b): (u32, u32)| (format!("{a}+{b}="), format!("{}", a + b));
                pairs.into_iter().map(text).collect()
            }
        }
    }
}

/// What a data file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataFormat {
    /// Plain text (any extension but `.jsonl`), cut into windows.
    Text,
    /// JSONL with string fields `prompt` and `response`.
    PromptResponse,
    /// JSONL with `messages` (a conversation per line).
    Chat,
}

impl DataFormat {
    /// The format of the file at `path`: text unless it ends in `.jsonl`; chat when its first
    /// record has `messages`.
    ///
    /// # Errors
    /// [`LisaError::Io`] for an unreadable `.jsonl` file.
    pub fn of(path: &Path) -> Result<Self> {
        if path.extension().is_none_or(|e| e != "jsonl") {
            return Ok(Self::Text);
        }
        let text = std::fs::read_to_string(path).map_err(crate::io::io("cannot read", path))?;
        let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("{}");
        let record: serde_json::Value = serde_json::from_str(first).unwrap_or_default();
        Ok(match record.get("messages") {
            Some(_) => Self::Chat,
            None => Self::PromptResponse,
        })
    }
}

/// The tokenizer of a model directory: its `tokenizer.json`, or the byte tokenizer of the
/// bundled checkpoints when it has none.
///
/// # Errors
/// [`LisaError::Tokenizer`] for a `tokenizer.json` that does not load.
pub fn tokenizer_for(model_dir: &Path) -> Result<Box<dyn TextTokenizer>> {
    match model_dir.join("tokenizer.json") {
        p if p.is_file() => Ok(Box::new(HfTokenizer::from_file(p)?)),
        _ => Ok(Box::new(ByteTokenizer)),
    }
}

/// How many of `n` records a file's split holds out: a tenth, at least one.
fn held_out(n: usize) -> usize {
    (n / 10).max(1)
}

fn too_few(path: &Path, what: &str) -> LisaError {
    LisaError::InvalidData {
        path: path.to_path_buf(),
        reason: format!("it needs at least 2 {what} (one to train on, one to hold out)"),
    }
}

impl Dataset {
    /// `problems` tokenized: the first `held_out` of them held out (their pairs kept for exact
    /// match), each an [`Example::prompt_response`] ending in `eos`.
    ///
    /// # Errors
    /// The tokenizer's.
    pub fn from_problems(
        problems: Vec<(String, String)>,
        held_out: usize,
        tok: &dyn TextTokenizer,
        eos: u32,
    ) -> Result<Self> {
        let mut encoded = Vec::with_capacity(problems.len());
        for (p, r) in problems {
            encoded.push((tok.encode(&p)?, tok.encode(&r)?));
        }
        let held_out = held_out.min(encoded.len());
        let example = |(p, r): &(Vec<u32>, Vec<u32>)| Example::prompt_response(p, r, eos);
        let train = encoded[held_out..].iter().map(example).collect();
        encoded.truncate(held_out);
        let eval = encoded.iter().map(example).collect();
        Ok(Self {
            train,
            eval,
            pairs: encoded,
        })
    }

    /// A bundled task for `seed`, its first [`Task::HELD_OUT`] problems held out.
    ///
    /// # Errors
    /// The tokenizer's.
    pub fn from_task(task: Task, seed: u64, tok: &dyn TextTokenizer, eos: u32) -> Result<Self> {
        Self::from_problems(task.problems(seed), Task::HELD_OUT, tok, eos)
    }

    /// Plain text, tokenized whole and cut into windows of `seq_len` tokens (every token
    /// trained on; a shorter tail is dropped); the last tenth of the windows (rounded up)
    /// held out.
    ///
    /// # Errors
    /// [`LisaError::Io`], the tokenizer's, and [`LisaError::InvalidData`] for a text shorter
    /// than two windows.
    pub fn from_text_file(path: &Path, tok: &dyn TextTokenizer, seq_len: usize) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(crate::io::io("cannot read", path))?;
        let ids = tok.encode(&text)?;
        let windows: Vec<Example> = ids
            .chunks_exact(seq_len.max(1))
            .map(|w| Example::text(w.to_vec()))
            .collect();
        if windows.len() < 2 {
            return Err(LisaError::InvalidData {
                path: path.to_path_buf(),
                reason: format!(
                    "its {} tokens make fewer than 2 windows of {seq_len}: use a shorter \
                     sequence length or more text",
                    ids.len()
                ),
            });
        }
        let split = (windows.len() * 9 / 10).max(1);
        let (train, eval) = windows.split_at(split);
        Ok(Self {
            train: train.to_vec(),
            eval: eval.to_vec(),
            pairs: Vec::new(),
        })
    }

    /// Prompt/response JSONL ([`read_prompt_response_jsonl`](super::read_prompt_response_jsonl)),
    /// its last tenth held out.
    ///
    /// # Errors
    /// Those of the reader and the tokenizer, and [`LisaError::InvalidData`] for fewer than
    /// two records.
    pub fn from_prompt_response_jsonl(
        path: &Path,
        tok: &dyn TextTokenizer,
        eos: u32,
    ) -> Result<Self> {
        let mut problems = super::read_prompt_response_jsonl(path)?;
        if problems.len() < 2 {
            return Err(too_few(path, "prompt/response lines"));
        }
        let held_out = held_out(problems.len());
        problems.rotate_right(held_out);
        Self::from_problems(problems, held_out, tok, eos)
    }

    /// Chat JSONL, each conversation rendered with `template` and only the assistant turns
    /// trained on ([`chat_example`]); its last tenth held out.
    ///
    /// # Errors
    /// Those of the reader, the template and the tokenizer, and [`LisaError::InvalidData`]
    /// for fewer than two conversations.
    pub fn from_chat_jsonl(
        path: &Path,
        template: &ChatTemplate,
        tok: &dyn TextTokenizer,
    ) -> Result<Self> {
        let chats = read_chat_jsonl(path)?;
        if chats.len() < 2 {
            return Err(too_few(path, "conversations"));
        }
        let examples = chats
            .iter()
            .map(|c| chat_example(template, tok, c))
            .collect::<Result<Vec<Example>>>()?;
        let split = examples.len() - held_out(examples.len());
        let (train, eval) = examples.split_at(split);
        Ok(Self {
            train: train.to_vec(),
            eval: eval.to_vec(),
            pairs: Vec::new(),
        })
    }

    /// The file at `path`, read as its [`DataFormat`] says; `template` is asked for only for
    /// chat data.
    ///
    /// # Errors
    /// Those of the format's reader, and `template`'s.
    pub fn from_file(
        path: &Path,
        tok: &dyn TextTokenizer,
        eos: u32,
        seq_len: usize,
        template: impl FnOnce() -> Result<ChatTemplate>,
    ) -> Result<Self> {
        match DataFormat::of(path)? {
            DataFormat::Text => Self::from_text_file(path, tok, seq_len),
            DataFormat::PromptResponse => Self::from_prompt_response_jsonl(path, tok, eos),
            DataFormat::Chat => Self::from_chat_jsonl(path, &template()?, tok),
        }
    }
}
