//! Where the memory of one training step goes: full AdamW vs LISA, drop-in vs rebuilt model.
//!
//! `cargo run --release --example grad_memory [-- --blocks 16 --hidden 512 --ffn 1376 --vocab 4000 --seq-len 128 --gamma 2]`
//!
//! Builds a decoder-shaped stack (embedding, residual MLP blocks named `model.layers.{i}.mlp.*`,
//! untied LM head), runs forward, backward and one optimizer step per method, and prints, per
//! method: the bytes of the gradients the backward pass stored, the optimizer state, and the
//! peak heap above the weights, counted by a global allocator. Each method starts from the same
//! live heap (the weights), so the peaks compare.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_lisa::{linear_no_bias, Linear, LisaAdamW, LisaConfig};
use candle_nn::{embedding, AdamW, Embedding, Optimizer, ParamsAdamW, VarBuilder, VarMap};

#[path = "common/mod.rs"]
mod common;

#[path = "common/alloc.rs"]
mod alloc;

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

struct Shape {
    blocks: usize,
    hidden: usize,
    ffn: usize,
    vocab: usize,
    seq_len: usize,
    gamma: usize,
}

struct Model {
    embed: Embedding,
    blocks: Vec<(Linear, Linear)>,
    head: Linear,
}

impl Model {
    fn new(s: &Shape, vb: VarBuilder) -> Result<Self> {
        let embed = embedding(s.vocab, s.hidden, vb.pp("model.embed_tokens"))?;
        let blocks = (0..s.blocks)
            .map(|i| {
                let vb = vb.pp(format!("model.layers.{i}.mlp"));
                Ok((
                    linear_no_bias(s.hidden, s.ffn, vb.pp("up_proj"))?,
                    linear_no_bias(s.ffn, s.hidden, vb.pp("down_proj"))?,
                ))
            })
            .collect::<Result<_>>()?;
        let head = linear_no_bias(s.hidden, s.vocab, vb.pp("lm_head"))?;
        Ok(Self {
            embed,
            blocks,
            head,
        })
    }

    fn loss(&self, tokens: &Tensor) -> Result<Tensor> {
        let t = tokens.dim(1)?;
        let mut x = self.embed.forward(&tokens.narrow(1, 0, t - 1)?)?;
        for (up, down) in &self.blocks {
            x = (&x + down.forward(&up.forward(&x)?.silu()?)?)?;
        }
        let logits = self.head.forward(&x)?;
        candle_nn::loss::cross_entropy(
            &logits.flatten_to(1)?,
            &tokens.narrow(1, 1, t - 1)?.flatten_all()?,
        )
    }
}

fn grad_bytes(grads: &GradStore) -> usize {
    grads
        .get_ids()
        .filter_map(|id| grads.get_id(*id))
        .map(|g| g.elem_count() * g.dtype().size_in_bytes())
        .sum()
}

fn mb(bytes: usize) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} takes a number, got {v}"))
        })
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    // Not keep_freed_memory: it would not change what is counted, only the speed.
    common::set_thread_count();
    let args: Vec<String> = std::env::args().collect();
    let s = Shape {
        blocks: arg(&args, "--blocks", 16),
        hidden: arg(&args, "--hidden", 512),
        ffn: arg(&args, "--ffn", 1376),
        vocab: arg(&args, "--vocab", 4000),
        seq_len: arg(&args, "--seq-len", 128),
        gamma: arg(&args, "--gamma", 2),
    };
    let dev = Device::Cpu;
    let ids: Vec<u32> = (0..s.seq_len as u32)
        .map(|i| (i * 7919) % s.vocab as u32)
        .collect();
    let tokens = Tensor::from_vec(ids, (1, s.seq_len), &dev)?;
    let varmap = VarMap::new();
    Model::new(&s, VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;
    let weights: usize = varmap.all_vars().iter().map(|v| v.elem_count() * 4).sum();
    println!(
        "{} blocks, hidden {}, ffn {}, vocab {}, T = {}, gamma = {}: weights {}",
        s.blocks,
        s.hidden,
        s.ffn,
        s.vocab,
        s.seq_len,
        s.gamma,
        mb(weights)
    );
    println!(
        "{:<22} {:>12} {:>12} {:>14}",
        "method", "gradients", "opt. state", "peak - weights"
    );
    let lisa_config = LisaConfig {
        gamma: s.gamma,
        ..Default::default()
    };
    for method in ["candle_nn::AdamW", "lisa drop-in", "lisa rebuilt"] {
        let base = alloc::reset_peak();
        let (grads, state) = match method {
            "candle_nn::AdamW" => {
                let mut opt = AdamW::new(varmap.all_vars(), ParamsAdamW::default())?;
                let model = Model::new(&s, VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;
                let grads = model.loss(&tokens)?.backward()?;
                opt.step(&grads)?;
                (grad_bytes(&grads), 2 * weights)
            }
            _ => {
                let mut opt = LisaAdamW::new(&varmap, ParamsAdamW::default(), lisa_config.clone())?;
                let vb = if method == "lisa drop-in" {
                    VarBuilder::from_varmap(&varmap, DType::F32, &dev)
                } else {
                    opt.var_builder()
                };
                let model = Model::new(&s, vb)?;
                let grads = model.loss(&tokens)?.backward()?;
                opt.step(&grads)?;
                (grad_bytes(&grads), opt.state_bytes())
            }
        };
        let peak = alloc::peak() - base;
        println!(
            "{method:<22} {:>12} {:>12} {:>14}",
            mb(grads),
            mb(state),
            mb(peak)
        );
    }
    Ok(())
}
