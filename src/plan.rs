//! A memory planner: the bytes one training step needs, predicted from a model's config, a
//! method, the dtype, the sequence length and the batch size, without loading any weight.
//!
//! [`predict`] returns the weights, gradients, optimizer state and activations of one step
//! and its peak; [`table`] does it for a list of methods and says which GPU cards
//! ([`CARDS_GB`]) each fits. The model of bytes follows what this crate's code keeps alive,
//! and is checked against every committed `memory_report` row (`tests/suite/plan.rs`; the
//! errors per method family are in `docs/planning.md`).
//!
//! ```
//! use candle_core::DType;
//! use candle_lisa::plan::{self, Backend, Method, Setup};
//!
//! let config = plan::shape("llama3.1-8b")?;
//! assert_eq!(config.num_params(), 8_030_261_248);
//! let setup = Setup { dtype: DType::BF16, seq_len: 2048, backend: Backend::Cuda, ..Default::default() };
//! let lisa = plan::predict(&config, &"lisa2-recompute".parse::<Method>()?, &setup)?;
//! let full = plan::predict(&config, &Method::Full, &setup)?;
//! assert!(lisa.peak_bytes < full.peak_bytes / 2);
//! # Ok::<(), candle_lisa::LisaError>(())
//! ```
//!
//! # The model of bytes
//!
//! With `s` bytes per element of the weights' dtype, `N = batch × seq` tokens, `V` the
//! vocabulary, `h`, `q`, `kv`, `i` the hidden, query, key/value and intermediate widths:
//!
//! - **Weights**: every parameter at `s` bytes (LoRA adapters too); with
//!   [`QuantFormat::Int8`] or [`Nf4`](QuantFormat::Nf4) the projections of frozen blocks
//!   at 1.0625 or 0.516 bytes instead, as [`QuantFormat::bytes_per_param`] counts them (norms stay dense).
//! - **Gradients**: `s` bytes per trainable parameter, stored by the backward pass (LISA's
//!   drop-in use stores them for every parameter).
//! - **Optimizer state**: AdamW's two moments in f32 (8 bytes) per trainable parameter, plus
//!   an f32 master copy (4 bytes) when the weights are half precision; compact state keeps
//!   bf16 moments (4 bytes). `candle_nn::AdamW` keeps its moments in the weights' dtype.
//! - **Activations**: candle keeps every tensor of the graph until the backward pass ends. A
//!   block that passes gradients keeps `N·s·(6h + 3q + 3kv + 3i)` on the CPU in f32 (the fused
//!   kernels: norm, q/k/v, rotated q/k, attention output, o, residual, norm, gate, up,
//!   SwiGLU, down, residual) and `N·s·(6h + 5q + 5kv + 3i)` elsewhere (the head-major copies
//!   of q, k, v and of the attention output); LoRA adds `N·s·(r + 3·out)` per adapted
//!   projection; a recomputed frozen block keeps its output only, `N·s·h`. Add the embedding
//!   output, the final norm (`N·s·h` each) and the `(seq, seq)` causal mask.
//!
//! The peak is the largest of the moments of a step where memory culminates
//! ([`Phase`]), each on top of weights, state and activations:
//! - the loss's forward pass, with the `N × V` logits and the f32 temporaries of the log-sum-exp
//!   (12 bytes a logit, 14 for bf16: its f32 copy; on the CPU in f32 only the fused
//!   buffer that becomes dL/dlogits, 4 bytes);
//! - the head's backward pass: the recomputed logits, softmax and dL/dlogits (`s + 8` bytes a
//!   logit), then dL/dW of the head, accumulated by candle as zeros + sum (three head-sized
//!   tensors at once);
//! - a recomputed block's backward (about twice its activations: the recomputed ones and
//!   their gradients), with every gradient above it stored;
//! - the end of the backward pass: every gradient, and the embedding's gradient a second time
//!   while candle's `index_add` builds the new sum;
//! - `candle_nn::AdamW`'s step, whose expressions over `Var`s keep about 14 temporaries of the
//!   largest parameter alive (the graph is dropped by then).
//!
//! On the CPU, candle multiplies bf16 matrices by widening both operands to f32, which the
//! head's products pay for (twice the head's bytes and 6 bytes a logit). What this leaves out
//! is a few MB of small tensors, and gemm's packing buffers, which grow with the sequence
//! length on the CPU (the measured peak at T = 2048 on SmolLM2 is 11% above the prediction).
//! On CUDA the prediction is of the memory pool candle allocates from; the CUDA context and
//! cuBLAS's workspace come on top ([`CONTEXT_RESERVE`]).

use std::str::FromStr;

use candle_core::DType;

use crate::error::{LisaError, Result};
use crate::models::LlamaConfig;
use crate::nn::quant::QuantFormat;
use crate::optim::CompactState;

/// The card sizes [`table`] checks, in GB (GiB, as cards are sold).
pub const CARDS_GB: [u64; 4] = [16, 24, 48, 80];

/// Bytes kept free on a card for the CUDA context and cuBLAS's workspace, which the
/// prediction (of candle's memory pool) does not count: 1 GiB.
pub const CONTEXT_RESERVE: u64 = 1 << 30;

/// Temporaries of the largest parameter that `candle_nn::AdamW`'s step keeps alive: its update
/// is plain tensor expressions over `Var`s, so each keeps its operands in a graph until the
/// variable is set (15 tensors in the code; 14.0 measured on the CPU and on CUDA).
const CANDLE_ADAMW_TEMPORARIES: u64 = 14;

/// A training method, parsed from and printed as `memory_report` names it (`full`,
/// `adamw-candle`, `lora16`, `lisa2`, `lisa2-recompute`, `lisa2-dropin`, `lisa2-frozen-embed`,
/// `lisa2-compact`: bf16 moments for all that trains, with recompute). A LISA setting built in
/// code that has no such name prints its settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Method {
    /// The crate's AdamW over every parameter.
    Full,
    /// `candle_nn::AdamW` over every parameter (state in the weights' dtype).
    AdamwCandle,
    /// LoRA of this rank on all seven projections, the base frozen.
    Lora {
        /// The adapters' rank.
        rank: usize,
    },
    /// LISA with γ active blocks.
    Lisa(LisaMethod),
}

/// How LISA runs: the settings of [`LisaConfig`](crate::LisaConfig) and of the model that
/// change memory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LisaMethod {
    /// Active blocks (γ).
    pub gamma: usize,
    /// Frozen blocks are recomputed in the backward pass
    /// ([`LisaConfig::recompute_frozen`](crate::LisaConfig::recompute_frozen)).
    pub recompute: bool,
    /// The input embedding is frozen (`LisaConfig::train_embedding` off; no effect when the
    /// head is tied to it). The prediction is the worst draw, block 0 active, which a long run
    /// meets: then every block keeps its activations.
    pub frozen_embed: bool,
    /// Which trainable parameters keep bf16 moments
    /// ([`LisaAdamW::set_compact_state`](crate::LisaAdamW::set_compact_state)).
    pub compact: CompactState,
    /// The model is built from the `VarMap` (drop-in use): every parameter gets a gradient.
    pub drop_in: bool,
}

impl FromStr for Method {
    type Err = LisaError;

    fn from_str(name: &str) -> Result<Self> {
        let unknown = || LisaError::InvalidArgument {
            what: "method",
            reason: format!(
                "{name:?} is not a method; use full, adamw-candle, lora<rank> or \
                 lisa<gamma>[-recompute|-dropin|-frozen-embed|-compact]"
            ),
        };
        match name {
            "full" => return Ok(Method::Full),
            "adamw-candle" => return Ok(Method::AdamwCandle),
            _ => {}
        }
        if let Some(rank) = name.strip_prefix("lora") {
            return match rank.parse() {
                Ok(rank) if rank > 0 => Ok(Method::Lora { rank }),
                _ => Err(unknown()),
            };
        }
        let rest = name.strip_prefix("lisa").ok_or_else(unknown)?;
        let (gamma, variant) = rest.split_once('-').unwrap_or((rest, ""));
        let gamma = gamma.parse().ok().filter(|&g| g > 0).ok_or_else(unknown)?;
        let mut m = LisaMethod {
            gamma,
            ..Default::default()
        };
        match variant {
            "" => {}
            "recompute" => m.recompute = true,
            "dropin" => m.drop_in = true,
            "frozen-embed" => m.frozen_embed = true,
            // As memory_report measures it: compact state with recompute, the leanest LISA.
            "compact" => (m.compact, m.recompute) = (CompactState::All, true),
            _ => return Err(unknown()),
        }
        Ok(Method::Lisa(m))
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Method::Full => write!(f, "full"),
            Method::AdamwCandle => write!(f, "adamw-candle"),
            Method::Lora { rank } => write!(f, "lora{rank}"),
            Method::Lisa(m) => {
                write!(f, "lisa{}", m.gamma)?;
                let named = match (m.recompute, m.drop_in, m.frozen_embed, m.compact) {
                    (false, false, false, CompactState::Off) => Some(""),
                    (true, false, false, CompactState::Off) => Some("-recompute"),
                    (false, true, false, CompactState::Off) => Some("-dropin"),
                    (false, false, true, CompactState::Off) => Some("-frozen-embed"),
                    (true, false, false, CompactState::All) => Some("-compact"),
                    _ => None,
                };
                match named {
                    Some(suffix) => write!(f, "{suffix}"),
                    // No name parses to it: list the settings.
                    None => write!(
                        f,
                        " (recompute {}, drop-in {}, frozen embedding {}, compact {:?})",
                        m.recompute, m.drop_in, m.frozen_embed, m.compact
                    ),
                }
            }
        }
    }
}

/// Where the step runs: it decides which kernels run, and so what they keep.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backend {
    /// The CPU: fused f32 kernels for attention, SwiGLU and the head's loss; bf16 products
    /// widened to f32 by candle.
    Cpu,
    /// CUDA (or any other GPU backend): candle's kernels and plain tensor ops.
    #[default]
    Cuda,
}

/// What a step runs on, besides the model and the method.
#[derive(Clone, Debug, PartialEq)]
pub struct Setup {
    /// The dtype of weights, activations and gradients: f32, bf16 or f16.
    pub dtype: DType,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Sequences per batch.
    pub batch_size: usize,
    /// Where it runs.
    pub backend: Backend,
    /// How frozen blocks' projections are stored (predicted only; not measured yet).
    pub frozen_storage: QuantFormat,
}

impl Default for Setup {
    /// bf16, T = 2048, B = 1, on CUDA, dense frozen blocks.
    fn default() -> Self {
        Self {
            dtype: DType::BF16,
            seq_len: 2048,
            batch_size: 1,
            backend: Backend::Cuda,
            frozen_storage: QuantFormat::Dense,
        }
    }
}

/// The moment of a step where memory peaks (see the [module docs](self)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The loss's forward pass: the logits and the log-sum-exp's temporaries.
    Loss,
    /// The head's backward pass: logits again, dL/dlogits, dL/dW of the head.
    HeadBackward,
    /// The backward pass of a recomputed frozen block.
    Recompute,
    /// The end of the backward pass: every gradient, the embedding's twice.
    EndOfBackward,
    /// The optimizer step (`candle_nn::AdamW`'s temporaries).
    OptimizerStep,
}

/// The predicted bytes of one training step.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    /// Parameters of the model, LoRA adapters included.
    pub params: u64,
    /// Parameters that train (LISA: at its largest active set).
    pub trainable_params: u64,
    /// Weights (and LoRA adapters).
    pub weight_bytes: u64,
    /// Gradients stored by the backward pass.
    pub grad_bytes: u64,
    /// Optimizer state: master weights and moments.
    pub state_bytes: u64,
    /// Activations the graph keeps until the backward pass ends.
    pub activation_bytes: u64,
    /// The peak: the largest moment of the step.
    pub peak_bytes: u64,
    /// Where the peak is.
    pub phase: Phase,
}

impl Prediction {
    /// The peak less weights, gradients and state: activations and temporaries, as
    /// `memory_report`'s "rest" (`other_bytes`).
    pub fn rest_bytes(&self) -> u64 {
        self.peak_bytes
            .saturating_sub(self.weight_bytes + self.grad_bytes + self.state_bytes)
    }
}

/// One row of [`table`]: a method's prediction and the cards it fits.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanRow {
    /// The method, as [`Method`]'s names.
    pub method: String,
    /// The prediction.
    pub prediction: Prediction,
    /// Per card of [`CARDS_GB`]: whether the peak plus [`CONTEXT_RESERVE`] fits.
    pub fits: Vec<(u64, bool)>,
}

/// The methods [`table`] shows by default: full fine-tuning, LoRA 16 and 128, LISA γ = 1, 2,
/// 4 and γ = 2's variants.
pub const DEFAULT_METHODS: [&str; 10] = [
    "full",
    "lora16",
    "lora128",
    "lisa1",
    "lisa2",
    "lisa4",
    "lisa2-recompute",
    "lisa4-recompute",
    "lisa2-frozen-embed",
    "lisa2-compact",
];

/// Predictions for `methods` (names as [`Method`]'s; if empty, [`DEFAULT_METHODS`], less the
/// methods that freeze no block when the storage is quantized), with the cards each fits.
///
/// # Errors
/// An unknown method name, and [`predict`]'s.
pub fn table(config: &LlamaConfig, setup: &Setup, methods: &[&str]) -> Result<Vec<PlanRow>> {
    let methods: Vec<&str> = match methods.is_empty() {
        true => DEFAULT_METHODS
            .iter()
            .copied()
            .filter(|m| {
                setup.frozen_storage == QuantFormat::Dense || !matches!(*m, "full" | "adamw-candle")
            })
            .collect(),
        false => methods.to_vec(),
    };
    methods
        .iter()
        .map(|name| {
            let method: Method = name.parse()?;
            let prediction = predict(config, &method, setup)?;
            let fits = CARDS_GB
                .iter()
                .map(|&gb| {
                    (
                        gb,
                        prediction.peak_bytes.saturating_add(CONTEXT_RESERVE) <= gb << 30,
                    )
                })
                .collect();
            Ok(PlanRow {
                method: method.to_string(),
                prediction,
                fits,
            })
        })
        .collect()
}

/// The built-in shapes: `llama3.1-8b` and `llama3.1-70b` (Meta's configs), `llama3-8b-scaled`
/// (Llama-3.1-8B's proportions at 1/64 of its memory at T = 2048 when run at T = 256: 32
/// blocks, hidden 512, intermediate 1792, GQA 8/2, untied, vocabulary 16032), and the
/// `memory_report` shapes `smollm2-135m`, `llama2-7b-scaled`, `llama3.2-1b` and `tiny`.
pub const SHAPES: [&str; 7] = [
    "llama3.1-8b",
    "llama3.1-70b",
    "llama3-8b-scaled",
    "smollm2-135m",
    "llama2-7b-scaled",
    "llama3.2-1b",
    "tiny",
];

/// The config of a built-in shape ([`SHAPES`]).
pub fn shape(name: &str) -> Result<LlamaConfig> {
    // (vocab, hidden, blocks, heads, kv heads, intermediate, tied, rope θ)
    let (v, h, l, heads, kv, i, tied, theta) = match name {
        "llama3.1-8b" => (128256, 4096, 32, 32, 8, 14336, false, 500_000.0),
        "llama3.1-70b" => (128256, 8192, 80, 64, 8, 28672, false, 500_000.0),
        "llama3-8b-scaled" => (16032, 512, 32, 8, 2, 1792, false, 500_000.0),
        "smollm2-135m" => (49152, 576, 30, 9, 3, 1536, true, 100_000.0),
        "llama2-7b-scaled" => (4000, 512, 32, 8, 8, 1376, false, 10_000.0),
        "llama3.2-1b" => (128256, 2048, 16, 32, 8, 8192, true, 500_000.0),
        "tiny" => (258, 128, 8, 4, 2, 352, true, 10_000.0),
        _ => {
            return Err(LisaError::InvalidArgument {
                what: "shape",
                reason: format!("{name:?} is not a built-in shape; choose from {SHAPES:?}"),
            })
        }
    };
    let mut c = LlamaConfig::tiny(v, h, l, heads, kv);
    c.intermediate_size = i;
    c.tie_word_embeddings = tied;
    c.rope_theta = Some(theta);
    c.max_position_embeddings = 131_072;
    Ok(c)
}

/// Parameter counts of a model, from its config.
struct Counts {
    /// Embedding rows × hidden.
    embed: u128,
    /// The untied head (0 when tied).
    head: u128,
    /// The final norm.
    norm: u128,
    /// One block.
    block: u128,
    /// One block's projection weights (what quantized storage holds).
    block_proj: u128,
    /// The largest parameter tensor.
    largest: u128,
    /// (in, out) of each projection of a block.
    projections: Vec<(u128, u128)>,
}

fn counts(config: &LlamaConfig) -> Counts {
    let (h, i) = (config.hidden_size as u128, config.intermediate_size as u128);
    let q = (config.num_attention_heads * config.head_size()) as u128;
    let kv = (config.kv_heads() * config.head_size()) as u128;
    let mut c = Counts {
        embed: 0,
        head: 0,
        norm: 0,
        block: 0,
        block_proj: 0,
        largest: 0,
        projections: match config.fused_projections() {
            true => vec![(h, q + 2 * kv), (q, h), (h, 2 * i), (i, h)],
            false => vec![(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)],
        },
    };
    for (name, shape) in config.tensor_shapes() {
        let n: u128 = shape.iter().map(|&d| d as u128).product();
        c.largest = c.largest.max(n);
        match name.as_str() {
            "model.embed_tokens.weight" => c.embed = n,
            "lm_head.weight" => c.head = n,
            "model.norm.weight" => c.norm = n,
            _ if name.starts_with("model.layers.0.") => {
                c.block += n;
                if name.ends_with("_proj.weight") {
                    c.block_proj += n;
                }
            }
            _ => {}
        }
    }
    c
}

/// Predicts the bytes of one training step of `method` on `config` (see the
/// [module docs](self) for the model).
///
/// # Errors
///
/// [`LisaError::InvalidArgument`] for a dtype other than f32, bf16 and f16, a zero sequence
/// length or batch size, γ above the number of blocks, or quantized frozen storage with a
/// method that freezes no block; [`LisaError::InvalidConfig`] and
/// [`LisaError::UnsupportedConfig`] for a config this crate cannot build.
pub fn predict(config: &LlamaConfig, method: &Method, setup: &Setup) -> Result<Prediction> {
    let invalid = |what, reason: String| Err(LisaError::InvalidArgument { what, reason });
    // Bounds far above any real model, under which no size below can overflow.
    let widths = [
        ("vocab_size", config.vocab_size),
        ("hidden_size", config.hidden_size),
        ("intermediate_size", config.intermediate_size),
        ("head_dim", config.head_dim.unwrap_or(0)),
    ];
    let numbers = [
        ("num_hidden_layers", config.num_hidden_layers),
        ("num_attention_heads", config.num_attention_heads),
        (
            "num_key_value_heads",
            config.num_key_value_heads.unwrap_or(0),
        ),
    ];
    for (name, value) in widths {
        if value > 1 << 32 {
            return invalid("config", format!("{name} = {value} is above 2^32"));
        }
    }
    for (name, value) in numbers {
        if value > 1 << 20 {
            return invalid("config", format!("{name} = {value} is above 2^20"));
        }
    }
    if setup.seq_len > 1 << 32 || setup.batch_size > 1 << 32 {
        return invalid(
            "setup",
            "the sequence length and the batch size must be at most 2^32".into(),
        );
    }
    let arch = config.architecture()?;
    let s: u128 = match setup.dtype {
        DType::F32 => 4,
        DType::BF16 | DType::F16 => 2,
        d => return invalid("dtype", format!("{d:?}: use f32, bf16 or f16")),
    };
    if setup.seq_len == 0 || setup.batch_size == 0 {
        return invalid(
            "setup",
            "the sequence length and the batch size must be at least 1".into(),
        );
    }
    let c = counts(config);
    let blocks = config.num_hidden_layers as u128;
    let (n, t) = (
        setup.seq_len as u128 * setup.batch_size as u128,
        setup.seq_len as u128,
    );
    let (h, i, vocab) = (
        config.hidden_size as u128,
        config.intermediate_size as u128,
        config.vocab_size as u128,
    );
    let q = (config.num_attention_heads * config.head_size()) as u128;
    let kv = (config.kv_heads() * config.head_size()) as u128;
    let params = c.embed + c.head + c.norm + blocks * c.block;

    // The CPU's fused f32 kernels (token-major attention) run unless a feature needs the
    // generic path.
    let fused = setup.backend == Backend::Cpu
        && setup.dtype == DType::F32
        && arch.qk_norm.is_none()
        && arch.attention_softcap.is_none();
    let mut inner = match fused {
        true => 5 * h + 3 * q + 3 * kv + 3 * i,
        false => 5 * h + 5 * q + 5 * kv + 3 * i,
    };
    // Not measured: the extra outputs of biases, q/k norms, Gemma's norms and GeGLU, fused MLPs.
    if arch.qkv_bias {
        inner += q + 2 * kv;
    }
    if arch.qk_norm.is_some() {
        inner += q + kv;
    }
    // Gemma's two extra norms (OLMo 2's two post-norms replace the pre-norms).
    if arch.norms == crate::models::llama::NormPlacement::Sandwich {
        inner += 2 * h;
    }
    if arch.activation == crate::models::llama::Activation::GeluTanh {
        inner += i;
    }
    if arch.fused_projections {
        inner += 2 * i;
    }
    let kept_block = n * s * (inner + h);
    let kept_frozen = n * s * h;
    let constants = 2 * n * s * h + t * t * s;

    let state_per = |compact: bool| match (s, compact) {
        (4, false) => 8,
        (4, true) => 4,
        (_, false) => 12,
        (_, true) => 8,
    };
    let frozen_bytes = |frozen_blocks: u128| -> u128 {
        let proj = frozen_blocks * c.block_proj;
        let per = setup.frozen_storage.bytes_per_param(setup.dtype);
        ((proj as f64) * per).ceil() as u128 + (frozen_blocks * c.block - proj) * s
    };
    let embed_head = (c.embed + c.head + c.norm) * s;
    let (weights, grads, state, activations, trainable, embed_trains, head_trains, recomputed);
    match method {
        Method::Full | Method::AdamwCandle => {
            if setup.frozen_storage != QuantFormat::Dense {
                return invalid(
                    "frozen storage",
                    format!("{method} freezes no block; quantized storage needs LoRA or LISA"),
                );
            }
            weights = params * s;
            grads = params * s;
            state = match method {
                Method::AdamwCandle => 2 * params * s,
                _ => params * state_per(false),
            };
            trainable = params;
            activations = blocks * kept_block + constants;
            (embed_trains, head_trains, recomputed) = (true, true, false);
        }
        Method::Lora { rank } => {
            let r = *rank as u128;
            let adapters = blocks * c.projections.iter().map(|(a, b)| r * (a + b)).sum::<u128>();
            let lora_kept: u128 = c.projections.iter().map(|(_, out)| r + 3 * out).sum();
            weights = embed_head + frozen_bytes(blocks) + adapters * s;
            // The first block's input does not track gradients (the embedding is frozen), yet
            // candle's backward stores a gradient for every operand of a tracked op and frees
            // only those of tracked tensors: the q/k/v inputs, their frozen outputs and the
            // residual's input stay in the store.
            grads = adapters * s + n * s * (4 * h + q + 2 * kv);
            state = adapters * state_per(false);
            trainable = adapters;
            activations = blocks * (kept_block + n * s * lora_kept) + constants;
            (embed_trains, head_trains, recomputed) = (false, false, false);
        }
        Method::Lisa(m) => {
            let gamma = m.gamma as u128;
            if gamma == 0 || gamma > blocks {
                return invalid(
                    "gamma",
                    format!("γ = {gamma} with {blocks} blocks: use 1 to {blocks}"),
                );
            }
            let tied = c.head == 0;
            embed_trains = tied || !m.frozen_embed;
            head_trains = true;
            trainable = if embed_trains { c.embed } else { 0 } + c.head + c.norm + gamma * c.block;
            weights = embed_head + gamma * c.block * s + frozen_bytes(blocks - gamma);
            // Below the lowest active block nothing tracks gradients; the residual's input
            // there keeps a stray gradient (see LoRA's).
            let stray = if embed_trains { 0 } else { n * s * h };
            grads = if m.drop_in { params } else { trainable } * s + stray;
            let always = trainable - gamma * c.block;
            let always_compact = m.compact != CompactState::Off;
            state = always * state_per(always_compact)
                + gamma * c.block * state_per(m.compact == CompactState::All);
            // A model built from the VarMap tracks every block, so none can be recomputed.
            recomputed = m.recompute && !m.drop_in && gamma < blocks;
            activations = constants
                + match recomputed {
                    true => gamma * kept_block + (blocks - gamma) * kept_frozen,
                    false => blocks * kept_block,
                };
        }
    }
    let all = match method {
        Method::Lora { .. } => params + trainable,
        _ => params,
    };

    let base = weights + state + activations;
    let nv = n * vocab;
    let head_bytes = vocab * h * s;
    // candle's CPU bf16 product widens both operands to f32 and narrows the f32 result.
    let widen = setup.backend == Backend::Cpu && setup.dtype == DType::BF16;
    let product = match widen {
        true => 2 * head_bytes + 6 * nv,
        false => nv * s,
    };
    let head_grad = |x: u128| if head_trains { x } else { 0 };
    let (loss, head_backward) = match fused {
        true => (
            4 * nv,
            (4 * nv + head_grad(head_bytes)).max(head_grad(3 * head_bytes)),
        ),
        false => {
            let to_f32 = if s == 4 { 0 } else { s };
            let dw = match widen {
                true => 6 * nv + 3 * head_bytes,
                false => nv * s + head_bytes,
            };
            (
                product.max(nv * (to_f32 + 12)),
                product
                    .max(nv * (s + 8))
                    .max(nv * (s + to_f32 + 4))
                    .max(head_grad(dw))
                    .max(head_grad(3 * head_bytes)),
            )
        }
    };
    let mut phases = vec![
        (Phase::Loss, base + loss),
        (Phase::HeadBackward, base + head_backward),
        (
            Phase::EndOfBackward,
            base + grads + if embed_trains { c.embed * s } else { 0 },
        ),
    ];
    if recomputed {
        // The recomputed block's activations and about as many bytes of their gradients
        // (1.8 to 2.1 times the activations in the measured rows at T = 256 and 1024).
        phases.push((Phase::Recompute, base + grads + 2 * n * s * inner));
    }
    if *method == Method::AdamwCandle {
        phases.push((
            Phase::OptimizerStep,
            weights + state + grads + CANDLE_ADAMW_TEMPORARIES as u128 * c.largest * s,
        ));
    }
    // The first phase of the largest peak: phases are in step order.
    let (phase, peak_bytes) =
        phases.into_iter().fold(
            (Phase::Loss, 0),
            |best, p| if p.1 > best.1 { p } else { best },
        );
    // Sizes are computed in u128, so that no config or setup can overflow them.
    let fit = |x: u128| {
        u64::try_from(x).map_err(|_| LisaError::InvalidArgument {
            what: "setup",
            reason: format!("{x} bytes do not fit in 64 bits: the model or the batch is too large"),
        })
    };
    Ok(Prediction {
        params: fit(all)?,
        trainable_params: fit(trainable)?,
        weight_bytes: fit(weights)?,
        grad_bytes: fit(grads)?,
        state_bytes: fit(state)?,
        activation_bytes: fit(activations)?,
        peak_bytes: fit(peak_bytes)?,
        phase,
    })
}
