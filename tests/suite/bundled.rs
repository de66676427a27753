//! The bundled assets: the tiny checkpoint knows the corpus, and LISA fine-tunes it.
use crate::common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_lisa::data::tokenizer::{ByteTokenizer, TextTokenizer};
use candle_lisa::models::Sampling;
use candle_lisa::{load_llama, LisaAdamW, LisaConfig, Llama};
use candle_nn::{Optimizer, ParamsAdamW};

fn assets() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets")
}

/// Two windows of 64 bytes from the held-out end of the corpus.
fn held_out_batch() -> candle_core::Result<Tensor> {
    let text = std::fs::read_to_string(assets().join("corpus.txt")).expect("assets/corpus.txt");
    let ids = ByteTokenizer.encode(&text).expect("bytes");
    let start = ids.len() - 1000;
    let rows: Vec<u32> = [&ids[start..start + 64], &ids[start + 500..start + 564]].concat();
    Tensor::from_vec(rows, (2, 64), &Device::Cpu)
}

#[test]
fn bundled_checkpoint_knows_the_corpus() -> Result<(), Box<dyn std::error::Error>> {
    let (config, varmap) = load_llama(assets().join("tiny-llama"), DType::F32, &Device::Cpu)?;
    assert_eq!(
        (config.num_hidden_layers, config.vocab_size),
        (8, ByteTokenizer::VOCAB_SIZE)
    );
    assert!(config.tie_word_embeddings);
    let model = Llama::new(
        &config,
        candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )?;
    let batch = held_out_batch()?;
    let loss = model
        .loss(&batch, &batch.to_dtype(DType::I64)?)?
        .to_scalar::<f32>()?;
    // Uniform guessing over 258 bytes costs ln 258 = 5.55 nats.
    assert!(loss < 1.5, "held-out loss {loss}");
    Ok(())
}

/// LISA on the bundled checkpoint: only the sampled blocks (and the always-trainable
/// embedding and final norm) change, and the loss on a fixed batch falls.
#[test]
fn lisa_fine_tunes_the_bundled_checkpoint() -> Result<(), Box<dyn std::error::Error>> {
    let (config, varmap) = load_llama(assets().join("tiny-llama"), DType::F32, &Device::Cpu)?;
    let params = ParamsAdamW {
        lr: 5e-4,
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut opt = LisaAdamW::new(
        &varmap,
        params,
        LisaConfig {
            gamma: 2,
            period: 100,
            seed: 3,
            ..Default::default()
        },
    )?;
    let model = Llama::new(&config, opt.var_builder())?;
    let batch = held_out_batch()?;
    let labels = batch.to_dtype(DType::I64)?;
    let before = common::snapshot(&varmap);
    let first = model.loss(&batch, &labels)?.to_scalar::<f32>()?;
    for _ in 0..5 {
        opt.backward_step(&model.loss(&batch, &labels)?)?;
    }
    let last = model.loss(&batch, &labels)?.to_scalar::<f32>()?;
    assert!(last < first * 0.9, "loss {first} -> {last}");
    let after = common::snapshot(&varmap);
    let active = opt.active_blocks().to_vec();
    assert_eq!(active.len(), 2);
    for (name, old) in &before {
        let block = name
            .strip_prefix("model.layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok());
        let moved = old != &after[name];
        match block {
            Some(b) => assert_eq!(moved, active.contains(&b), "{name}"),
            None => assert!(moved, "{name} is always trainable"),
        }
    }
    Ok(())
}

#[test]
fn hugging_face_tokenizer_json() -> Result<(), Box<dyn std::error::Error>> {
    use candle_lisa::data::tokenizer::HfTokenizer;
    let dir = tempfile::tempdir()?;
    let json = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
        "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,
        "decoder":null,"model":{"type":"WordLevel","vocab":{"hello":0,"world":1,"</s>":2,"[UNK]":3},
        "unk_token":"[UNK]"}}"#;
    std::fs::write(dir.path().join("tokenizer.json"), json)?;
    let tok = HfTokenizer::from_file(dir.path().join("tokenizer.json"))?;
    assert_eq!(tok.encode("hello world moon")?, [0, 1, 3]);
    assert_eq!(tok.vocab_size(), 4);
    assert_eq!(tok.eos_id(), Some(2));
    let err = HfTokenizer::from_file(dir.path().join("missing.json"))
        .err()
        .expect("missing file");
    assert!(err.to_string().contains("missing.json"), "{err}");
    Ok(())
}

/// Greedy generation continues the corpus's grammar; sampling is reproducible per seed.
#[test]
fn generation_greedy_and_sampled() -> Result<(), Box<dyn std::error::Error>> {
    let (config, varmap) = load_llama(assets().join("tiny-llama"), DType::F32, &Device::Cpu)?;
    let model = Llama::new(
        &config,
        candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )?;
    let tok = ByteTokenizer;
    let prompt = tok.encode("Ada found the")?;
    let greedy = tok.decode(&model.generate(
        &prompt,
        &Sampling {
            max_new_tokens: 24,
            stop: vec![ByteTokenizer::EOS],
            ..Default::default()
        },
    )?)?;
    let nouns = [
        "box", "lamp", "boat", "key", "book", "chair", "kite", "cup", "map", "bell", "coat",
        "clock", "drum", "shell",
    ];
    let adjs = [
        "red", "small", "old", "bright", "heavy", "green", "quiet", "round", "blue", "soft",
        "tall", "warm",
    ];
    let first_word = greedy.split_whitespace().next().unwrap_or_default();
    assert!(
        nouns.contains(&first_word) || adjs.contains(&first_word),
        "greedy continuation {greedy:?} does not follow the corpus"
    );
    let sampled = Sampling {
        max_new_tokens: 24,
        temperature: 0.8,
        seed: 5,
        stop: vec![],
    };
    let a = model.generate(&prompt, &sampled)?;
    let b = model.generate(&prompt, &sampled)?;
    assert_eq!(a, b);
    assert_eq!(a.len(), 24);
    assert!(model
        .generate(
            &prompt,
            &Sampling {
                temperature: f64::NAN,
                ..Default::default()
            }
        )
        .is_err());
    assert!(
        model.generate(&[], &Sampling::default()).is_err(),
        "an empty prompt is an error, not a panic"
    );
    Ok(())
}
