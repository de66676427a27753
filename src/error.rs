//! The crate's error type.

use candle_core::Shape;

/// Everything that can go wrong when building or stepping a [`LisaAdamW`](crate::LisaAdamW).
///
/// Every variant says what was wrong and how to fix it. An error returned by a constructor means
/// nothing was built; an error returned by a step means no weight and no optimizer state was
/// written. `LisaError` converts into [`candle_core::Error`], so `?` works inside candle code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LisaError {
    /// γ is zero or larger than the number of blocks.
    #[error(
        "gamma = {gamma} is out of range: LISA trains between 1 and {num_blocks} blocks at a time \
         (the model has {num_blocks}); set LisaConfig::gamma within that range"
    )]
    InvalidGamma {
        /// The γ that was asked for.
        gamma: usize,
        /// How many blocks the layer map found.
        num_blocks: usize,
    },

    /// The resampling period is zero.
    #[error(
        "period = 0 is invalid: the active blocks are redrawn every `period` steps; \
         set LisaConfig::period to 1 or more (the paper's default is 20)"
    )]
    ZeroPeriod,

    /// The block pattern is malformed.
    #[error(
        "block pattern {pattern:?} is invalid: {reason}; write it as the names' prefix with `{{i}}` \
         where the block index goes, e.g. \"model.layers.{{i}}.\" or \"transformer.h.{{i}}.\""
    )]
    InvalidPattern {
        /// The pattern as given.
        pattern: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// The block pattern matched none of the parameter names.
    #[error(
        "block pattern {pattern:?} matches none of the {num_params} parameter names \
         (for example {example:?}); set LisaConfig::block_pattern to the prefix your model uses \
         for its blocks, with `{{i}}` for the index"
    )]
    NoBlocks {
        /// The pattern as given.
        pattern: String,
        /// How many float parameters were looked at.
        num_params: usize,
        /// The first parameter name, sorted, to show what names look like.
        example: String,
    },

    /// The block indices found do not run 0, 1, …, N-1.
    #[error(
        "block indices have a gap: block {missing} is missing while the highest index is {max}; \
         LISA needs blocks numbered 0..N without gaps, so check LisaConfig::block_pattern \
         or register every block's parameters before building the optimizer"
    )]
    BlockGap {
        /// The first index that has no parameter.
        missing: usize,
        /// The highest index found.
        max: usize,
    },

    /// A block has no parameter left to train once the always/never lists were applied.
    #[error(
        "block {block} has no trainable parameter left after `always_trainable` and \
         `never_trainable` were applied; drawing it would train nothing, so remove the entries \
         that cover the whole block"
    )]
    EmptyBlock {
        /// The block index.
        block: usize,
    },

    /// The VarMap (or the list of named variables) holds no float parameter.
    #[error(
        "there is no float parameter to optimize: build the model from a VarBuilder over the \
         VarMap first, so that its variables exist, then build the optimizer"
    )]
    EmptyVarMap,

    /// An `always_trainable` or `never_trainable` prefix matches no parameter.
    #[error(
        "LisaConfig::{list} entry {prefix:?} matches no parameter name; entries are name \
         prefixes such as \"lm_head.\" or \"model.norm.weight\""
    )]
    UnmatchedPrefix {
        /// Which list the entry is in.
        list: &'static str,
        /// The entry.
        prefix: String,
    },

    /// A parameter is listed both as always-trainable and as never-trainable.
    #[error(
        "parameter {name:?} is covered by both always_trainable ({always:?}) and \
         never_trainable ({never:?}); keep it in one list only"
    )]
    ConflictingLists {
        /// The parameter name.
        name: String,
        /// The always-trainable entry that covers it.
        always: String,
        /// The never-trainable entry that covers it.
        never: String,
    },

    /// The learning rate is NaN or infinite.
    #[error("learning rate {lr} is not finite; pass a finite value such as 1e-5")]
    NonFiniteLearningRate {
        /// The value given.
        lr: f64,
    },

    /// An AdamW hyper-parameter is out of its range.
    #[error("AdamW hyper-parameter {name} = {value} is invalid: it must be {expected}")]
    InvalidHyperparameter {
        /// The field of `ParamsAdamW`.
        name: &'static str,
        /// The value given.
        value: f64,
        /// The range it must be in.
        expected: &'static str,
    },

    /// An active block received no gradient while a block that is frozen now did: the model
    /// was built for an earlier active set.
    #[error(
        "block {block} is active but none of its parameters received a gradient (the first is \
         {first:?}), so it would silently never train; the model was most likely built before \
         the last resample: rebuild it from `LisaAdamW::var_builder()` (or `plan()`) whenever \
         `resampled()` is true. If it was rebuilt, or built straight from the VarMap, gradient \
         flow is cut below the block instead: see LisaError::GradientFlowCut"
    )]
    NoGradient {
        /// The active block that got nothing.
        block: usize,
        /// Its first parameter name.
        first: String,
    },

    /// An active block received no gradient, and no frozen block did either: the model is
    /// current, but something in it drops gradients on their way to the block.
    #[error(
        "block {block} is active but none of its parameters received a gradient (the first is \
         {first:?}), and no frozen block did either, so the model is not stale: gradient flow \
         is cut between the loss and this block. The usual cause is a candle_nn fast op \
         that has no backward pass: candle_nn::LayerNorm / layer_norm, RmsNorm / rms_norm, \
         ops::softmax_last_dim, ops::rms_norm, ops::layer_norm, rotary_emb::rope / rope_i. \
         Use candle_lisa::{{LayerNorm, layer_norm, RmsNorm, rms_norm}} and \
         candle_lisa::nn::{{softmax_last_dim, rope, rope_i}} instead (docs/custom-models.md: Training your \
         own candle model); a `detach()` in the forward pass has the same effect"
    )]
    GradientFlowCut {
        /// The active block that got nothing.
        block: usize,
        /// Its first parameter name.
        first: String,
    },

    /// A gradient does not match its parameter.
    #[error(
        "the gradient of {name:?} has shape {got:?} and dtype {got_dtype:?}, but the parameter \
         has shape {expected:?} and dtype {expected_dtype:?}; pass the GradStore that \
         `loss.backward()` returned for this model"
    )]
    GradientMismatch {
        /// The parameter name.
        name: String,
        /// The parameter's shape.
        expected: Shape,
        /// The gradient's shape.
        got: Shape,
        /// The parameter's dtype.
        expected_dtype: candle_core::DType,
        /// The gradient's dtype.
        got_dtype: candle_core::DType,
    },

    /// A trainable parameter's gradient holds NaN or infinity, and the optimizer is set to fail.
    #[error(
        "the gradient of {name:?} holds NaN or infinity, so the step wrote nothing; lower the \
         learning rate or clip gradients, set a LossScaler for f16 training \
         (LisaAdamW::set_loss_scaler), or skip such steps with \
         LisaAdamW::set_non_finite(NonFinite::Skip)"
    )]
    NonFiniteGradient {
        /// The first parameter whose gradient is not finite.
        name: String,
    },

    /// A model asked the optimizer's `VarBuilder` for a trainable parameter in another dtype or
    /// on another device, which would hand it a copy that the optimizer never updates.
    #[error(
        "the model asked for trainable parameter {name:?} as {wanted_dtype:?} on {wanted_device}, \
         but it is {dtype:?} on {device}: a converted copy would train while the optimizer \
         updates the original; load the weights in the dtype and on the device you compute in \
         (e.g. load_llama(dir, DType::BF16, &device)) instead of converting in the VarBuilder"
    )]
    TrainableConversion {
        /// The parameter name.
        name: String,
        /// The parameter's dtype.
        dtype: candle_core::DType,
        /// The dtype the model asked for.
        wanted_dtype: candle_core::DType,
        /// The parameter's device.
        device: String,
        /// The device the model asked for.
        wanted_device: String,
    },

    /// Too many training steps in a row were skipped for a non-finite loss or gradient.
    #[error(
        "{consecutive} steps in a row had a NaN or infinite loss or gradient and were skipped; \
         training has diverged: lower the learning rate, clip gradients (max_grad_norm), or \
         for f16 use a LossScaler"
    )]
    TooManyNonFinite {
        /// Skipped steps in a row.
        consecutive: usize,
    },

    /// A checkpoint does not belong to this run.
    #[error("cannot resume from checkpoint {path}: {reason}")]
    CheckpointMismatch {
        /// The checkpoint directory.
        path: std::path::PathBuf,
        /// What does not match.
        reason: String,
    },

    /// Another save holds the checkpoint root's lock.
    #[error(
        "cannot save into {root}: another process (or another Checkpointer) is saving a \
         checkpoint there; two runs must not share a checkpoint directory, so stop the other \
         one (a killed `cargo run` can leave its child process running) or use another directory"
    )]
    CheckpointBusy {
        /// The checkpoint root.
        root: std::path::PathBuf,
    },

    /// A save was asked for a step below a complete checkpoint already in the root.
    #[error(
        "refusing to save step {step}: {path} is a complete checkpoint of the later step \
         {later}, which a resume would pick up instead of this run's; resume from it, or move \
         it away (or use another directory) to start over"
    )]
    LaterCheckpoint {
        /// The step being saved.
        step: u64,
        /// The step of the later checkpoint.
        later: u64,
        /// Its directory.
        path: std::path::PathBuf,
    },

    /// A sampler returned a draw that is not γ distinct blocks in range.
    #[error(
        "the block sampler drew {draw:?}, but LISA needs {gamma} distinct block indices below \
         {num_blocks}; fix the BlockSampler implementation"
    )]
    InvalidDraw {
        /// What the sampler returned.
        draw: Vec<usize>,
        /// How many it had to return.
        gamma: usize,
        /// The number of blocks.
        num_blocks: usize,
    },

    /// `Optimizer::new` was called: it receives variables without their names.
    #[error(
        "LisaAdamW needs parameter names to find the blocks, which `Optimizer::new(vars, ..)` does \
         not carry; build it with `LisaAdamW::new(&varmap, params, config)` or \
         `LisaAdamW::from_named_vars(..)`"
    )]
    UnnamedVars,

    /// A model configuration asks for something this crate does not implement.
    #[error("config field {field} = {value} is not supported: {hint}")]
    UnsupportedConfig {
        /// The `config.json` field.
        field: &'static str,
        /// Its value, as written.
        value: String,
        /// What is supported instead.
        hint: &'static str,
    },

    /// A checkpoint's files are inconsistent: a shard index naming a file outside the model
    /// directory, a tensor stored twice, a truncated or malformed safetensors file.
    #[error("invalid checkpoint {path}: {reason}")]
    InvalidCheckpoint {
        /// The file at fault.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A model configuration is inconsistent.
    #[error("invalid model config: {0}")]
    InvalidConfig(String),

    /// An argument of a call, or a setting read from the environment, is out of range.
    #[error("invalid {what}: {reason}")]
    InvalidArgument {
        /// Which argument or setting.
        what: &'static str,
        /// What is wrong with it, and what would be right.
        reason: String,
    },

    /// A data file cannot be used for training as it is.
    #[error("invalid data {path}: {reason}")]
    InvalidData {
        /// The file at fault (with `:line` where one line is).
        path: std::path::PathBuf,
        /// What is wrong with it, and how to fix it.
        reason: String,
    },

    /// A checkpoint lacks a tensor the model needs.
    #[error(
        "checkpoint has no tensor {name:?} (expected shape {expected:?}); the config.json does not match the weights, or the checkpoint is not a Llama-family model"
    )]
    MissingTensor {
        /// The tensor name.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
    },

    /// A PEFT adapter lacks one matrix of a LoRA pair, or a module the other layers adapt.
    #[error(
        "the adapter has no tensor {name:?} although it has {have:?}; the adapter file is \
         incomplete (an interrupted save or a bad conversion): save it again from its training run"
    )]
    MissingAdapterTensor {
        /// The tensor that is missing.
        name: String,
        /// A tensor present that implies it.
        have: String,
    },

    /// A checkpoint holds a tensor the model does not know.
    #[error(
        "checkpoint has an unexpected tensor {name:?} of shape {found:?}; the config.json does not match the weights (check num_hidden_layers, tie_word_embeddings and the bias flags)"
    )]
    UnexpectedTensor {
        /// The tensor name.
        name: String,
        /// Its shape.
        found: Vec<usize>,
    },

    /// A checkpoint tensor has the wrong shape.
    #[error("checkpoint tensor {name:?} has shape {found:?}, but the config implies {expected:?}")]
    TensorShape {
        /// The tensor name.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },

    /// Reading or writing a file failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done ("cannot read", "cannot write", ...).
        action: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// A JSON file could not be parsed.
    #[error("cannot parse {path}: {source}")]
    Json {
        /// The file.
        path: std::path::PathBuf,
        /// The underlying error.
        source: serde_json::Error,
    },

    /// A saved optimizer state does not fit this optimizer.
    #[error("cannot resume from {path}: {reason}")]
    InvalidState {
        /// The state directory.
        path: std::path::PathBuf,
        /// What does not fit.
        reason: String,
    },

    /// The two files of a saved optimizer state are not from the same save.
    #[error(
        "cannot resume from {path}: optimizer.safetensors is not the file optimizer.json was \
         saved with (its SHA-256 differs; a save was most likely killed between the two \
         writes); resume from an older complete checkpoint, or save the state again"
    )]
    TornState {
        /// The state directory.
        path: std::path::PathBuf,
    },

    /// A chat template ran out of its rendering budget.
    #[error(
        "the chat template did not finish within {fuel} instructions (nested loops that \
         multiply, or a loop that never ends); fix the template, or raise the budget with \
         ChatTemplate::set_fuel for very long conversations"
    )]
    TemplateFuelExhausted {
        /// The budget it had.
        fuel: u64,
    },

    /// The `tokenizers` crate failed.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),

    /// The ranks of a data-parallel run do not agree on what to train next.
    #[error(
        "rank {rank} of {world_size}: {disagreeing} rank(s) drew other blocks than rank 0 \
         (this rank has {local}{note}); every rank must build its optimizer with the same \
         LisaConfig (seed and sampler included) and resume from the same checkpoint",
        note = if *differs { ", which differs" } else { ", as rank 0 does" }
    )]
    RankDisagreement {
        /// This process's rank.
        rank: usize,
        /// How many ranks differ from rank 0.
        disagreeing: usize,
        /// How many ranks there are.
        world_size: usize,
        /// This rank's step, period, active blocks and trainable count.
        local: String,
        /// Whether this rank is one of those that differ.
        differs: bool,
    },

    /// Another rank of a data-parallel run failed, so this one stops too instead of waiting.
    #[error(
        "rank {rank} of {world_size} stops {during}: {failed} other rank(s) failed there (their \
         own error says why); fix that, then resume every rank from the last checkpoint"
    )]
    RankFailed {
        /// This process's rank.
        rank: usize,
        /// How many other ranks failed.
        failed: usize,
        /// How many ranks there are.
        world_size: usize,
        /// Where ("in step 12", "saving the checkpoint of step 12", "resuming").
        during: String,
    },

    /// The communication engine of a data-parallel run failed, or another rank did.
    #[error("data-parallel communication failed: {0}")]
    Communication(String),

    /// An error from candle itself.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl From<LisaError> for candle_core::Error {
    fn from(e: LisaError) -> Self {
        match e {
            LisaError::Candle(e) => e,
            e => candle_core::Error::wrap(e),
        }
    }
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, LisaError>;
