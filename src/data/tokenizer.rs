//! Tokenizers: a byte-level one that needs no file, and Hugging Face `tokenizer.json` files.

use std::path::Path;

use crate::error::{LisaError, Result};

/// Text to token ids and back.
pub trait TextTokenizer {
    /// Token ids of `text`, without special tokens.
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
    /// Text of `ids`; special tokens are dropped.
    fn decode(&self, ids: &[u32]) -> Result<String>;
    /// Number of ids, special tokens included.
    fn vocab_size(&self) -> usize;
    /// The end-of-sequence id, if the tokenizer has one.
    fn eos_id(&self) -> Option<u32>;

    /// The id of a token given by its text (`<|im_end|>`), if the vocabulary has it.
    fn token_id(&self, token: &str) -> Option<u32> {
        let _ = token;
        None
    }

    /// Token ids of `text` (without special tokens added), each with the byte offset in
    /// `text` where it starts.
    fn encode_with_offsets(&self, text: &str) -> Result<Vec<(u32, usize)>>;
}

/// One token per byte (ids 0-255) plus [`BOS`](ByteTokenizer::BOS) and
/// [`EOS`](ByteTokenizer::EOS): a vocabulary of 258 that any UTF-8 text fits, used by the
/// bundled tiny model.
///
/// ```
/// use candle_lisa::data::tokenizer::{ByteTokenizer, TextTokenizer};
/// let t = ByteTokenizer;
/// let ids = t.encode("hé")?;
/// assert_eq!(ids, [104, 195, 169]);
/// assert_eq!(t.decode(&ids)?, "hé");
/// # Ok::<(), candle_lisa::LisaError>(())
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct ByteTokenizer;

impl ByteTokenizer {
    /// Beginning of sequence.
    pub const BOS: u32 = 256;
    /// End of sequence.
    pub const EOS: u32 = 257;
    /// Vocabulary size.
    pub const VOCAB_SIZE: usize = 258;
}

impl TextTokenizer for ByteTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(text.bytes().map(u32::from).collect())
    }

    /// Invalid UTF-8 (a sequence cut inside a character) becomes U+FFFD.
    fn decode(&self, ids: &[u32]) -> Result<String> {
        let bytes: Vec<u8> = ids.iter().filter_map(|&i| u8::try_from(i).ok()).collect();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn vocab_size(&self) -> usize {
        Self::VOCAB_SIZE
    }

    fn encode_with_offsets(&self, text: &str) -> Result<Vec<(u32, usize)>> {
        Ok(text
            .bytes()
            .enumerate()
            .map(|(i, b)| (u32::from(b), i))
            .collect())
    }

    fn eos_id(&self) -> Option<u32> {
        Some(Self::EOS)
    }
}

/// A Hugging Face `tokenizer.json`, through the `tokenizers` crate (no network features).
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    eos: Option<u32>,
}

impl HfTokenizer {
    /// Reads `tokenizer.json`. The end-of-sequence id is looked up among the usual names
    /// (`</s>`, `<|endoftext|>`, `<|im_end|>`, `<|end_of_text|>`, `<eos>`).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| LisaError::Tokenizer(format!("cannot load {}: {e}", path.display())))?;
        let eos = [
            "</s>",
            "<|endoftext|>",
            "<|im_end|>",
            "<|end_of_text|>",
            "<eos>",
        ]
        .iter()
        .find_map(|t| inner.token_to_id(t));
        Ok(Self { inner, eos })
    }
}

impl TextTokenizer for HfTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| LisaError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| LisaError::Tokenizer(e.to_string()))
    }

    fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    fn encode_with_offsets(&self, text: &str) -> Result<Vec<(u32, usize)>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| LisaError::Tokenizer(e.to_string()))?;
        Ok(enc
            .get_ids()
            .iter()
            .zip(enc.get_offsets())
            .map(|(&id, &(start, _))| (id, start))
            .collect())
    }

    fn eos_id(&self) -> Option<u32> {
        self.eos
    }
}
