//! Loads a llama.cpp GGUF checkpoint with `models::load_gguf` and reports the model's loss and
//! next-token accuracy on given token ids: a real pretrained model predicts text far better
//! than chance, and a wrong weight layout (the q/k permutation, say) shows at once.
//!
//! ```text
//! python3 scripts/gguf_tokenize.py model.gguf "The capital of France is Paris. …" > ids.json
//! cargo run --release --example gguf_check -- model.gguf ids.json
//! ```

use candle_core::{DType, Device, Tensor};
use candle_lisa::Llama;
use candle_nn::VarBuilder;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: gguf_check MODEL.gguf IDS.json";
    let (path, ids) = (args.next().ok_or(usage)?, args.next().ok_or(usage)?);
    let ids: Vec<u32> = serde_json::from_str(&std::fs::read_to_string(ids)?)?;
    if ids.len() < 2 {
        return Err("IDS.json needs at least two token ids".into());
    }
    let dev = Device::Cpu;
    let start = std::time::Instant::now();
    let (c, vars) = candle_lisa::models::load_gguf(&path, DType::F32, &dev)?;
    println!(
        "loaded in {:.2} s: {} blocks, hidden {}, {}/{} heads, vocabulary {}, tied head {}",
        start.elapsed().as_secs_f64(),
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        c.kv_heads(),
        c.vocab_size,
        c.tie_word_embeddings
    );
    let model = Llama::new(&c, VarBuilder::from_varmap(&vars, DType::F32, &dev))?;
    let x = Tensor::new(ids.as_slice(), &dev)?.unsqueeze(0)?;
    let loss = model
        .loss(&x, &x.to_dtype(DType::I64)?)?
        .to_scalar::<f32>()?;
    let predicted = model.forward(&x)?.argmax(2)?.squeeze(0)?.to_vec1::<u32>()?;
    let hits = predicted
        .iter()
        .zip(&ids[1..])
        .filter(|(p, t)| p == t)
        .count();
    println!(
        "loss {loss:.3} nats per token (a uniform guess: {:.3}); next token right {hits} of {}",
        (c.vocab_size as f32).ln(),
        ids.len() - 1
    );
    Ok(())
}
