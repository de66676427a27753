//! Chat data: a model's own chat template (Jinja, rendered with minijinja as transformers'
//! `apply_chat_template` renders it with jinja2), its special tokens as transformers resolves
//! them, and training examples where only the assistant's turns are in the loss.
//!
//! ```
//! use candle_lisa::data::chat::{ChatMessage, ChatTemplate};
//! let chatml = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
//!               {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
//! let t = ChatTemplate::new(chatml, None, None)?;
//! let chat = [ChatMessage::new("user", "2+2?"), ChatMessage::new("assistant", "4")];
//! let (text, spans) = t.render_with_assistant_spans(&chat)?;
//! assert_eq!(text, "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n");
//! assert_eq!(&text[spans[0].clone()], "4<|im_end|>\n");
//! # Ok::<(), candle_lisa::LisaError>(())
//! ```

use std::ops::Range;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::tokenizer::TextTokenizer;
use super::Example;
use crate::error::{LisaError, Result};
use crate::io::io;
use crate::IGNORE_INDEX;

/// One turn of a conversation, as in the `messages` of Hugging Face chat data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` (or whatever the template knows).
    pub role: String,
    /// The text of the turn.
    pub content: String,
}

impl ChatMessage {
    /// A message of `role` with `content`.
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A Jinja chat template with the special-token strings it may refer to (`bos_token`,
/// `eos_token`).
#[derive(Debug)]
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
    fuel: u64,
}

/// The instructions one rendering may execute by default ([`ChatTemplate::set_fuel`]): real
/// templates take a few thousand per message; this stops a runaway one within about a second.
pub const DEFAULT_TEMPLATE_FUEL: u64 = 10_000_000;

fn template_error(e: minijinja::Error) -> LisaError {
    LisaError::Tokenizer(format!("chat template: {e:#}"))
}

/// A special token as `tokenizer_config.json` writes it: a string or `{"content": ...}`.
fn token_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(io("cannot read", path))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| LisaError::Json {
            path: path.to_path_buf(),
            source,
        })
}

impl ChatTemplate {
    /// Compiles `source`. `raise_exception(msg)` fails the rendering with `msg`, as in
    /// transformers; `strftime_now` is not defined, so templates that test for it fall back
    /// to their fixed date and the rendering does not depend on the day.
    ///
    /// # Errors
    /// [`LisaError::Tokenizer`] for a template that does not compile.
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template_owned("chat", source.to_string())
            .map_err(template_error)?;
        env.set_fuel(Some(DEFAULT_TEMPLATE_FUEL));
        Ok(Self {
            env,
            bos_token: bos_token.unwrap_or_default().into(),
            eos_token: eos_token.unwrap_or_default().into(),
            fuel: DEFAULT_TEMPLATE_FUEL,
        })
    }

    /// How many template instructions one rendering may execute (default
    /// [`DEFAULT_TEMPLATE_FUEL`]); past it the rendering fails with
    /// [`LisaError::TemplateFuelExhausted`] instead of running on.
    pub fn set_fuel(&mut self, fuel: u64) {
        self.fuel = fuel;
        self.env.set_fuel(Some(fuel));
    }

    /// The template of a model directory: `chat_template.jinja`, else `chat_template` in
    /// `tokenizer_config.json` (a string, or the entry named `default` of a list), with that
    /// file's `bos_token` and `eos_token`. `None` when the model has none.
    ///
    /// # Errors
    /// Unreadable or malformed files, and templates that do not compile.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Option<Self>> {
        let dir = dir.as_ref();
        let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let bos = token_string(&config["bos_token"]);
        let eos = token_string(&config["eos_token"]);
        let jinja = dir.join("chat_template.jinja");
        let source = if jinja.is_file() {
            Some(std::fs::read_to_string(&jinja).map_err(io("cannot read", &jinja))?)
        } else {
            match &config["chat_template"] {
                Value::String(s) => Some(s.clone()),
                Value::Array(list) => list
                    .iter()
                    .find(|t| t["name"] == "default")
                    .and_then(|t| t["template"].as_str())
                    .map(str::to_string),
                _ => None,
            }
        };
        source
            .map(|s| Self::new(&s, bos.as_deref(), eos.as_deref()))
            .transpose()
    }

    /// The template in `file`, with the `bos_token` and `eos_token` of `dir`'s
    /// `tokenizer_config.json` (if any): for a model directory that has no template of its
    /// own, or to override it.
    ///
    /// # Errors
    /// Unreadable or malformed files, and templates that do not compile.
    pub fn from_file_for_dir(file: impl AsRef<Path>, dir: impl AsRef<Path>) -> Result<Self> {
        let file = file.as_ref();
        let source = std::fs::read_to_string(file).map_err(io("cannot read", file))?;
        let config = read_json(&dir.as_ref().join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let (bos, eos) = (
            token_string(&config["bos_token"]),
            token_string(&config["eos_token"]),
        );
        Self::new(&source, bos.as_deref(), eos.as_deref())
    }

    /// The conversation as text, with the assistant prompt appended when
    /// `add_generation_prompt` (as `apply_chat_template(..., tokenize=False)`).
    ///
    /// # Errors
    /// [`LisaError::Tokenizer`] when the template fails (`raise_exception`, a bad role order),
    /// [`LisaError::TemplateFuelExhausted`] when it runs past its budget
    /// ([`set_fuel`](Self::set_fuel)).
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self.env.get_template("chat").map_err(template_error)?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(|e| match e.kind() {
                minijinja::ErrorKind::OutOfFuel => {
                    LisaError::TemplateFuelExhausted { fuel: self.fuel }
                }
                _ => template_error(e),
            })
    }

    /// The conversation as text, and the byte range of each assistant turn's reply in it:
    /// from the end of the conversation before it, rendered with the assistant prompt, to the
    /// end of the conversation that includes it (so the reply's end-of-turn tokens are in).
    ///
    /// # Errors
    /// Those of [`ChatTemplate::render`], and [`LisaError::InvalidArgument`] when the template
    /// does not render a conversation as a prefix of its continuation (then the turns cannot
    /// be located).
    pub fn render_with_assistant_spans(
        &self,
        messages: &[ChatMessage],
    ) -> Result<(String, Vec<Range<usize>>)> {
        let text = self.render(messages, false)?;
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let before = self.render(&messages[..i], true)?;
            let through = self.render(&messages[..=i], false)?;
            if !through.starts_with(&before) || !text.starts_with(&through) {
                return Err(LisaError::InvalidArgument {
                    what: "chat template",
                    reason: format!(
                        "it does not render turn {i} as a continuation of the turns before it, \
                         so assistant turns cannot be located"
                    ),
                });
            }
            if before.len() < through.len() {
                spans.push(before.len()..through.len());
            }
        }
        Ok((text, spans))
    }
}

/// A chat as a training example: the rendered conversation tokenized once, with labels only
/// on tokens that start inside an assistant turn (see
/// [`ChatTemplate::render_with_assistant_spans`]); everything else is [`IGNORE_INDEX`].
///
/// # Errors
/// Those of the template and the tokenizer, and [`LisaError::InvalidArgument`] for a chat
/// without an assistant turn.
pub fn chat_example(
    template: &ChatTemplate,
    tokenizer: &dyn TextTokenizer,
    messages: &[ChatMessage],
) -> Result<Example> {
    let (text, spans) = template.render_with_assistant_spans(messages)?;
    if spans.is_empty() {
        return Err(LisaError::InvalidArgument {
            what: "conversation",
            reason: "a chat example needs at least one assistant turn to train on".into(),
        });
    }
    let tokens = tokenizer.encode_with_offsets(&text)?;
    let ids: Vec<u32> = tokens.iter().map(|(id, _)| *id).collect();
    let labels = tokens
        .iter()
        .map(
            |&(id, start)| match spans.iter().any(|s| s.contains(&start)) {
                true => id as i64,
                false => IGNORE_INDEX,
            },
        )
        .collect();
    Ok(Example { ids, labels })
}

/// Chats from a JSONL file: one object per line with `messages`, a list of `{role, content}`
/// (blank lines skipped).
///
/// # Errors
/// [`LisaError::Io`] for an unreadable file, [`LisaError::InvalidData`] naming the line for
/// bad JSON or a missing field.
pub fn read_chat_jsonl(path: impl AsRef<Path>) -> Result<Vec<Vec<ChatMessage>>> {
    super::example::read_jsonl_records(path.as_ref(), |v| {
        let messages = v
            .get("messages")
            .ok_or_else(|| "no \"messages\" field".to_string())?;
        serde_json::from_value(messages.clone()).map_err(|e| format!("messages: {e}"))
    })
}

/// A model's beginning- and end-of-sequence ids, as transformers resolves them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// The beginning-of-sequence id.
    pub bos: Option<u32>,
    /// Every id that ends generation; the first is the one appended to training responses.
    pub eos: Vec<u32>,
}

fn ids(v: &Value) -> Vec<u32> {
    match v {
        Value::Number(n) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Value::Array(a) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

impl SpecialTokens {
    /// The special tokens of a model directory.
    ///
    /// The end-of-sequence ids that stop generation come from `generation_config.json` when it
    /// has them, else from `config.json` (transformers' `GenerationConfig` precedence); the
    /// tokenizer's own `eos_token` (`tokenizer_config.json`, looked up in `tokenizer`) comes
    /// first, since it is what ends a turn in the training data (Llama 3 Instruct's
    /// `<|eot_id|>`, Qwen Instruct's `<|im_end|>`). BOS likewise, generation settings first.
    ///
    /// # Errors
    /// Malformed JSON files.
    pub fn from_dir(dir: impl AsRef<Path>, tokenizer: &dyn TextTokenizer) -> Result<Self> {
        let dir = dir.as_ref();
        let generation = read_json(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);
        let config = read_json(&dir.join("config.json"))?.unwrap_or(Value::Null);
        let tok_config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let lookup =
            |key: &str| token_string(&tok_config[key]).and_then(|t| tokenizer.token_id(&t));
        let first = |key: &str| {
            let from_generation = ids(&generation[key]);
            match from_generation.is_empty() {
                false => from_generation,
                true => ids(&config[key]),
            }
        };
        let mut eos: Vec<u32> = lookup("eos_token").into_iter().collect();
        for id in first("eos_token_id") {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
        if eos.is_empty() {
            eos.extend(tokenizer.eos_id());
        }
        let bos = first("bos_token_id")
            .first()
            .copied()
            .or_else(|| lookup("bos_token"));
        Ok(Self { bos, eos })
    }
}
