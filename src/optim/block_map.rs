//! [`BlockMap`]: which parameter belongs to which block.

use super::config::{LisaConfig, EMBEDDING_PREFIXES, HEAD_PREFIXES};
use crate::error::{LisaError, Result};

/// Where a parameter stands in LISA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParamRole {
    /// Trained at every step (embedding, LM head, final norm, or named in `always_trainable`).
    Always,
    /// Trained only while block `i` is active.
    Block(usize),
    /// Never trained (named in `never_trainable`).
    Never,
}

/// A parsed block pattern such as `model.layers.{i}.`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockPattern {
    prefix: String,
    suffix: String,
}

impl BlockPattern {
    /// Parses a pattern that holds `{i}` exactly once.
    ///
    /// ```
    /// use candle_lisa::optim::BlockPattern;
    /// let p = BlockPattern::parse("transformer.h.{i}.")?;
    /// assert_eq!(p.block_index("transformer.h.11.attn.c_attn.weight"), Some(11));
    /// assert_eq!(p.block_index("transformer.wte.weight"), None);
    /// # Ok::<(), candle_lisa::LisaError>(())
    /// ```
    pub fn parse(pattern: &str) -> Result<Self> {
        let invalid = |reason| LisaError::InvalidPattern {
            pattern: pattern.to_string(),
            reason,
        };
        let (prefix, suffix) = pattern
            .split_once("{i}")
            .ok_or_else(|| invalid("it has no `{i}` placeholder"))?;
        if suffix.contains("{i}") {
            return Err(invalid("it has more than one `{i}` placeholder"));
        }
        if suffix.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(invalid(
                "a digit right after `{i}` makes the index ambiguous",
            ));
        }
        Ok(Self {
            prefix: prefix.to_string(),
            suffix: suffix.to_string(),
        })
    }

    /// The block index of `name`, or `None` when the name is not in a block.
    pub fn block_index(&self, name: &str) -> Option<usize> {
        let rest = name.strip_prefix(self.prefix.as_str())?;
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || !rest[digits..].starts_with(self.suffix.as_str()) {
            return None;
        }
        rest[..digits].parse().ok()
    }
}

/// The map from parameter names to [`ParamRole`]s.
///
/// Invariant: `names` is sorted and holds each float parameter once; `groups[i]` is the group
/// of `names[i]`; `blocks[b]` lists, in order, the indices of every parameter in block `b`, and
/// no block is empty.
#[derive(Clone, Debug)]
pub struct BlockMap {
    names: Vec<String>,
    groups: Vec<ParamRole>,
    blocks: Vec<Vec<usize>>,
}

impl BlockMap {
    /// Builds the map for the given parameter names (duplicates are ignored).
    ///
    /// # Errors
    /// [`LisaError::EmptyVarMap`] for no name, [`LisaError::InvalidPattern`],
    /// [`LisaError::NoBlocks`], [`LisaError::BlockGap`], [`LisaError::UnmatchedPrefix`],
    /// [`LisaError::ConflictingLists`] and [`LisaError::EmptyBlock`], as their docs say.
    pub fn new<S: AsRef<str>>(
        names: impl IntoIterator<Item = S>,
        config: &LisaConfig,
    ) -> Result<Self> {
        let mut names: Vec<String> = names.into_iter().map(|s| s.as_ref().to_string()).collect();
        names.sort();
        names.dedup();
        if names.is_empty() {
            return Err(LisaError::EmptyVarMap);
        }
        let pattern = BlockPattern::parse(&config.block_pattern)?;
        let indices: Vec<Option<usize>> = names.iter().map(|n| pattern.block_index(n)).collect();
        let max = indices
            .iter()
            .flatten()
            .copied()
            .max()
            .ok_or_else(|| LisaError::NoBlocks {
                pattern: config.block_pattern.clone(),
                num_params: names.len(),
                example: names[0].clone(),
            })?;
        // The first gap, from the distinct indices rather than a table of `max + 1` entries:
        // a name like `model.layers.1000000000000.x` must not allocate that many.
        let mut present: Vec<usize> = indices.iter().flatten().copied().collect();
        present.sort_unstable();
        present.dedup();
        if let Some(missing) = (0..present.len()).find(|&i| present[i] != i) {
            return Err(LisaError::BlockGap { missing, max });
        }
        for (list, prefixes) in [
            ("always_trainable", &config.always_trainable),
            ("never_trainable", &config.never_trainable),
        ] {
            if let Some(p) = prefixes
                .iter()
                .find(|p| !names.iter().any(|n| n.starts_with(p.as_str())))
            {
                return Err(LisaError::UnmatchedPrefix {
                    list,
                    prefix: p.clone(),
                });
            }
        }
        // The embedding and head policy adds to the never-trained prefixes. Tied embeddings
        // (no head of their own) are the head.
        let mut never = config.never_trainable.clone();
        let matching = |prefixes: &[&str]| -> Vec<String> {
            prefixes
                .iter()
                .filter(|p| names.iter().any(|n| n.starts_with(*p)))
                .map(|p| p.to_string())
                .collect()
        };
        let (embedding, head) = (matching(&EMBEDDING_PREFIXES), matching(&HEAD_PREFIXES));
        let tied = head.is_empty();
        let token_embedding = ["model.embed_tokens.", "transformer.wte."];
        for p in embedding {
            let is_head = tied && token_embedding.contains(&p.as_str());
            let train = if is_head {
                config.train_head
            } else {
                config.train_embedding
            };
            if !train {
                never.push(p);
            }
        }
        if !config.train_head {
            never.extend(head);
        }
        let covering = |list: &[String], name: &str| {
            list.iter().find(|p| name.starts_with(p.as_str())).cloned()
        };
        let mut groups = Vec::with_capacity(names.len());
        let mut blocks = vec![Vec::new(); max + 1];
        for (i, (name, index)) in names.iter().zip(&indices).enumerate() {
            let always = covering(&config.always_trainable, name);
            let never = covering(&never, name);
            let group = match (always, never, index) {
                (Some(always), Some(never), _) => {
                    return Err(LisaError::ConflictingLists {
                        name: name.clone(),
                        always,
                        never,
                    })
                }
                (None, Some(_), _) => ParamRole::Never,
                (Some(_), None, _) | (None, None, None) => ParamRole::Always,
                (None, None, Some(b)) => {
                    blocks[*b].push(i);
                    ParamRole::Block(*b)
                }
            };
            groups.push(group);
        }
        if let Some(block) = blocks.iter().position(Vec::is_empty) {
            return Err(LisaError::EmptyBlock { block });
        }
        Ok(Self {
            names,
            groups,
            blocks,
        })
    }

    /// A map with no blocks: every parameter is [`ParamRole::Always`]. This is plain AdamW.
    ///
    /// # Errors
    /// [`LisaError::EmptyVarMap`] for no name.
    pub fn all_trainable<S: AsRef<str>>(names: impl IntoIterator<Item = S>) -> Result<Self> {
        let mut names: Vec<String> = names.into_iter().map(|s| s.as_ref().to_string()).collect();
        names.sort();
        names.dedup();
        if names.is_empty() {
            return Err(LisaError::EmptyVarMap);
        }
        Ok(Self::all_trainable_sorted(names))
    }

    /// [`all_trainable`](Self::all_trainable) over names that are already sorted and distinct.
    pub(super) fn all_trainable_sorted(names: Vec<String>) -> Self {
        Self {
            groups: vec![ParamRole::Always; names.len()],
            names,
            blocks: Vec::new(),
        }
    }

    /// The number of blocks, N.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// The number of parameters (tensors) in the map.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether the map is empty; never true for a map that was built successfully.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The group of `name`, or `None` when the map does not know the name.
    pub fn group(&self, name: &str) -> Option<ParamRole> {
        self.index_of(name).map(|i| self.groups[i])
    }

    pub(crate) fn index_of(&self, name: &str) -> Option<usize> {
        self.names.binary_search_by(|n| n.as_str().cmp(name)).ok()
    }

    /// The names of block `block`'s parameters, sorted; empty when out of range.
    pub fn block_params(&self, block: usize) -> impl Iterator<Item = &str> {
        self.blocks
            .get(block)
            .into_iter()
            .flatten()
            .map(|&i| self.names[i].as_str())
    }

    /// All parameter names with their groups, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, ParamRole)> {
        self.names
            .iter()
            .map(String::as_str)
            .zip(self.groups.iter().copied())
    }

    pub(crate) fn block_indices(&self, block: usize) -> &[usize] {
        &self.blocks[block]
    }

    pub(crate) fn group_at(&self, index: usize) -> ParamRole {
        self.groups[index]
    }

    pub(crate) fn name_at(&self, index: usize) -> &str {
        &self.names[index]
    }
}
