//! Writes the bundled corpus and pretrains the bundled tiny Llama on it.
//!
//! `cargo run --release --example pretrain` regenerates `assets/corpus.txt` and
//! `assets/tiny-llama/{config.json,model.safetensors}` from fixed seeds. Flags: `--steps N`
//! (default 400), `--out DIR` (default `assets/tiny-llama`), `--corpus-only`.
//!
//! The corpus is synthetic: sentences drawn from a small grammar over a fixed word list, and
//! number facts, made by this program from a ChaCha8 seed, so it is the project's own work
//! under the project's license (MIT OR Apache-2.0). The model is a byte-level Llama (vocab 258,
//! hidden 128, 8 blocks, 4 query / 2 key-value heads, tied embeddings, 1.5M parameters),
//! initialised from ChaCha8 (candle cannot seed its CPU generator) and trained with the
//! library's [`Trainer`](candle_lisa::train::Trainer) and full AdamW (no clipping, decay on
//! every weight). The same program on the same machine and thread count writes the same
//! bytes (see `assets/README.md` for how the committed weights relate to this version).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_lisa::data::tokenizer::{ByteTokenizer, TextTokenizer};
use candle_lisa::data::{pad_batch, Batch, Example};
use candle_lisa::models::Sampling;
use candle_lisa::nn::named_vars;
use candle_lisa::train::{Cosine, Trainer, TrainerConfig};
use candle_lisa::{save_llama, LisaAdamW, Llama, LlamaConfig};
use candle_nn::{ParamsAdamW, VarBuilder, VarMap};
use clap::Parser;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[path = "common/mod.rs"]
mod common;

const NAMES: &[&str] = &[
    "Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kit", "Lena", "Milo",
    "Nia", "Otto", "Pia",
];
const VERBS: &[&str] = &[
    "found", "painted", "carried", "lost", "fixed", "sold", "bought", "hid", "cleaned", "opened",
    "dropped", "shared",
];
const ADJS: &[&str] = &[
    "red", "small", "old", "bright", "heavy", "green", "quiet", "round", "blue", "soft", "tall",
    "warm",
];
const NOUNS: &[&str] = &[
    "box", "lamp", "boat", "key", "book", "chair", "kite", "cup", "map", "bell", "coat", "clock",
    "drum", "shell",
];
const PLACES: &[&str] = &[
    "in the garden",
    "at the market",
    "near the river",
    "on the hill",
    "by the door",
    "in the kitchen",
    "under the bridge",
    "at school",
    "in the attic",
    "on the boat",
];
const TIMES: &[&str] = &[
    "In the morning",
    "At noon",
    "Later",
    "That evening",
    "On Monday",
    "Once",
    "Then",
];

fn sentence(rng: &mut ChaCha8Rng) -> String {
    let pick =
        |rng: &mut ChaCha8Rng, list: &[&'static str]| *list.choose(rng).expect("non-empty list");
    match rng.random_range(0..6) {
        0 => format!(
            "{} {} the {} {} {}.",
            pick(rng, NAMES),
            pick(rng, VERBS),
            pick(rng, ADJS),
            pick(rng, NOUNS),
            pick(rng, PLACES)
        ),
        1 => format!(
            "{}, {} {} a {} {}.",
            pick(rng, TIMES),
            pick(rng, NAMES),
            pick(rng, VERBS),
            pick(rng, ADJS),
            pick(rng, NOUNS)
        ),
        2 => format!(
            "The {} {} was {}.",
            pick(rng, NOUNS),
            pick(rng, PLACES),
            pick(rng, ADJS)
        ),
        3 => {
            let (a, b) = (rng.random_range(0..50u32), rng.random_range(0..50u32));
            format!("{a} plus {b} is {}.", a + b)
        }
        4 => {
            let n = rng.random_range(1..10u32);
            format!("{} has {n} {}s.", pick(rng, NAMES), pick(rng, NOUNS))
        }
        _ => format!(
            "{} and {} {} the {} together.",
            pick(rng, NAMES),
            pick(rng, NAMES),
            pick(rng, VERBS),
            pick(rng, NOUNS)
        ),
    }
}

/// About 240 KB of text in paragraphs of 3 to 6 sentences.
fn corpus() -> String {
    let mut rng = ChaCha8Rng::seed_from_u64(2024);
    let mut text = String::new();
    while text.len() < 240_000 {
        let n = rng.random_range(3..7);
        let para: Vec<String> = (0..n).map(|_| sentence(&mut rng)).collect();
        text.push_str(&para.join(" "));
        text.push('\n');
    }
    text
}

pub fn model_config() -> LlamaConfig {
    let mut c = LlamaConfig::tiny(ByteTokenizer::VOCAB_SIZE, 128, 8, 4, 2);
    c.intermediate_size = 352;
    c.tie_word_embeddings = true;
    c.max_position_embeddings = 256;
    c.bos_token_id = Some(ByteTokenizer::BOS.into());
    c.eos_token_id = Some(ByteTokenizer::EOS.into());
    c
}

/// Deterministic initialisation: uniform with standard deviation 0.02 for matrices
/// (0.02/√(2·layers) for output projections, as GPT-2 does), 1 for norm weights.
fn init(varmap: &VarMap, layers: usize, seed: u64) -> candle_core::Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let data = varmap.data().lock().expect("fresh VarMap");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        if name.ends_with("norm.weight") {
            var.set(&Tensor::ones(var.shape(), DType::F32, &Device::Cpu)?)?;
            continue;
        }
        let std = if name.contains("o_proj") || name.contains("down_proj") {
            0.02 / (2.0 * layers as f64).sqrt()
        } else {
            0.02
        };
        let bound = (3f64).sqrt() * std;
        let values: Vec<f32> = (0..var.elem_count())
            .map(|_| rng.random_range(-bound..bound) as f32)
            .collect();
        var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu)?)?;
    }
    Ok(())
}

/// `b` random windows of `t` tokens.
fn batch(data: &[u32], rng: &mut ChaCha8Rng, b: usize, t: usize) -> candle_lisa::Result<Batch> {
    let windows: Vec<Example> = (0..b)
        .map(|_| {
            let start = rng.random_range(0..data.len() - t);
            Example::text(data[start..start + t].to_vec())
        })
        .collect();
    pad_batch(&windows, 0, None, &Device::Cpu)
}

/// Writes the bundled corpus and pretrains the bundled tiny Llama on it.
#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value_t = 400)]
    steps: usize,
    /// Where to write the model (default: assets/tiny-llama).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write the corpus only.
    #[arg(long)]
    corpus_only: bool,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    common::setup();
    let args = Args::parse();
    let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets");
    let steps = args.steps;
    let out = args.out.unwrap_or_else(|| assets.join("tiny-llama"));
    let text = corpus();
    std::fs::write(assets.join("corpus.txt"), &text)?;
    println!(
        "wrote {} ({} bytes)",
        assets.join("corpus.txt").display(),
        text.len()
    );
    if args.corpus_only {
        return Ok(());
    }

    let tok = ByteTokenizer;
    let ids = tok.encode(&text)?;
    let split = ids.len() * 95 / 100;
    let (train, eval) = (&ids[..split], &ids[split..]);
    let config = model_config();
    let varmap = VarMap::new();
    Llama::new(
        &config,
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )?;
    init(&varmap, config.num_hidden_layers, 7)?;
    println!("{} parameters", config.num_params());

    let lr = 3e-3;
    let params = ParamsAdamW {
        lr,
        weight_decay: 0.01,
        ..Default::default()
    };
    let opt = LisaAdamW::all_trainable(named_vars(&varmap)?, params)?;
    let schedule = Cosine {
        peak: lr,
        warmup: steps / 20,
        total: steps,
        min: 0.1 * lr,
    };
    let plain = TrainerConfig {
        max_grad_norm: None,
        decay_filter: false,
        ..Default::default()
    };
    let c = config.clone();
    let mut trainer = Trainer::new(opt, schedule, plain, move |plan| Llama::from_plan(&c, plan))?;
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut eval_rng = ChaCha8Rng::seed_from_u64(12);
    let eval_batches: Vec<_> = (0..4)
        .map(|_| batch(eval, &mut eval_rng, 16, 128))
        .collect::<candle_lisa::Result<_>>()?;
    let started = std::time::Instant::now();
    for step in 1..=steps {
        let report = trainer.step(&[batch(train, &mut rng, 16, 128)?])?;
        if step % 50 == 0 || step == steps {
            let model = trainer.model();
            let mut eval_loss = 0.0;
            for b in &eval_batches {
                let loss = model.loss(&b.ids, &b.labels)?.to_scalar::<f32>()?;
                eval_loss += loss / eval_batches.len() as f32;
            }
            println!(
                "step {step:4}  train loss {:.3}  eval loss {eval_loss:.3}  {:.0}s",
                report.loss,
                started.elapsed().as_secs_f64()
            );
        }
    }
    save_llama(&out, &config, &varmap, DType::F32)?;
    println!("saved {}", out.display());
    let prompt = tok.encode("Ada found the")?;
    let sample = trainer.model().generate(
        &prompt,
        &Sampling {
            max_new_tokens: 60,
            stop: vec![ByteTokenizer::EOS],
            ..Default::default()
        },
    )?;
    println!("greedy sample: Ada found the{}", tok.decode(&sample)?);
    Ok(())
}
