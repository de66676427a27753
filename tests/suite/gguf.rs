//! The GGUF loader against the same weights in a Hugging Face directory
//! (`tests/fixtures/gguf`, written by `scripts/gguf_fixtures.py` with gguf-py, llama.cpp's own
//! writer: every tensor type the loader reads, q and k permuted as llama.cpp's converter does),
//! and against damaged files.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::{DType, Device, Tensor};
use candle_lisa::models::load_gguf;
use candle_lisa::{load_llama, LisaError, Llama};
use candle_nn::VarBuilder;

type Error = Box<dyn std::error::Error>;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf")
}

#[test]
fn gguf_matches_the_safetensors_checkpoint() -> Result<(), Error> {
    let dev = Device::Cpu;
    let (from_gguf, gguf_vars) = load_gguf(fixture().join("tiny.gguf"), DType::F32, &dev)?;
    let (from_hf, hf_vars) = load_llama(fixture().join("hf"), DType::F32, &dev)?;
    // The config from the metadata is the Hugging Face one, field by field that the model reads.
    assert_eq!(from_gguf.architecture()?, from_hf.architecture()?);
    assert_eq!(from_gguf.tensor_shapes(), from_hf.tensor_shapes());
    assert_eq!(from_gguf.rope()?, from_hf.rope()?);
    assert_eq!(from_gguf.rms_norm_eps, from_hf.rms_norm_eps);
    assert_eq!(from_gguf.tie_word_embeddings, from_hf.tie_word_embeddings);
    assert_eq!(
        from_gguf.max_position_embeddings,
        from_hf.max_position_embeddings
    );
    // Every tensor bit for bit: dequantized by candle and unpermuted here against gguf-py's
    // dequantization of the unpermuted blocks.
    let gguf = gguf_vars.data().lock().unwrap();
    let hf = hf_vars.data().lock().unwrap();
    assert_eq!(gguf.len(), hf.len());
    for (name, want) in hf.iter() {
        let got = gguf.get(name).ok_or(format!("{name} missing"))?;
        let got: Vec<f32> = got.flatten_all()?.to_vec1()?;
        let want: Vec<f32> = want.flatten_all()?.to_vec1()?;
        let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert!(
            got.len() == want.len() && differ == 0,
            "{name}: {differ} of {} values differ",
            want.len()
        );
    }
    drop((gguf, hf));
    // And so the same logits.
    let ids = Tensor::new(&[[3u32, 1, 4, 1, 5, 9, 2, 6, 53, 58]], &dev)?;
    let logits = |c, v| -> Result<Vec<f32>, Error> {
        let model = Llama::new(c, VarBuilder::from_varmap(v, DType::F32, &dev))?;
        Ok(model.forward(&ids)?.flatten_all()?.to_vec1()?)
    };
    let (a, b) = (logits(&from_gguf, &gguf_vars)?, logits(&from_hf, &hf_vars)?);
    assert_eq!(a, b);
    assert!(a.iter().all(|x| x.is_finite()) && a.iter().any(|&x| x != 0.0));
    Ok(())
}

/// Loads `bytes` written to a temporary file.
fn load_bytes(bytes: &[u8]) -> candle_lisa::Result<()> {
    let dir = tempfile::tempdir().map_err(|e| LisaError::InvalidArgument {
        what: "tempdir",
        reason: e.to_string(),
    })?;
    let path = dir.path().join("m.gguf");
    std::fs::write(&path, bytes).map_err(|e| LisaError::InvalidArgument {
        what: "write",
        reason: e.to_string(),
    })?;
    load_gguf(&path, DType::F32, &Device::Cpu).map(|_| ())
}

#[test]
fn damaged_files_are_errors() -> Result<(), Error> {
    let good = std::fs::read(fixture().join("tiny.gguf"))?;
    // Cut anywhere in the header or the data: an error naming the file, never a panic or a
    // huge allocation.
    let header_end = 1696; // the first tensor's data (gguf-py aligns it to 32 bytes)
    let cuts = (0..header_end)
        .step_by(7)
        .chain((header_end..good.len()).step_by(4099));
    for cut in cuts {
        match load_bytes(&good[..cut]) {
            Err(LisaError::InvalidCheckpoint { .. }) => {}
            other => panic!("cut at {cut}: {other:?}"),
        }
    }
    // A string length of 2^40 (the first key's): refused before it is allocated.
    let mut huge = good.clone();
    huge[24..32].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(matches!(
        load_bytes(&huge),
        Err(LisaError::InvalidCheckpoint { .. })
    ));
    // A tensor count of 2^60.
    let mut many = good.clone();
    many[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes());
    assert!(matches!(
        load_bytes(&many),
        Err(LisaError::InvalidCheckpoint { .. })
    ));
    // Any byte of the header flipped: loads (a value changed) or fails with a typed error.
    let mut seed = 12345u64;
    for _ in 0..400 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let at = (seed >> 33) as usize % header_end;
        let mut bad = good.clone();
        bad[at] ^= 1 << ((seed >> 20) % 8);
        let _ = load_bytes(&bad);
    }
    Ok(())
}

/// A GGUF file with this metadata and no tensors.
fn header_only(meta: &[(&str, Value)]) -> Result<Vec<u8>, Error> {
    let mut out = std::io::Cursor::new(Vec::new());
    let refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    gguf_file::write(&mut out, &refs, &[])?;
    Ok(out.into_inner())
}

fn llama_meta() -> Vec<(&'static str, Value)> {
    vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.embedding_length", Value::U32(256)),
        ("llama.block_count", Value::U32(2)),
        ("llama.feed_forward_length", Value::U32(256)),
        ("llama.attention.head_count", Value::U32(4)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.vocab_size", Value::U32(64)),
    ]
}

#[test]
fn metadata_the_model_cannot_honour_is_refused() -> Result<(), Error> {
    let config_error = |meta: Vec<(&str, Value)>| -> Result<String, Error> {
        match load_bytes(&header_only(&meta)?) {
            Err(LisaError::InvalidConfig(m)) => Ok(m),
            other => Err(format!("expected a config error, got {other:?}").into()),
        }
    };
    // The plain header is a valid config; with no tensors the first one is missing.
    assert!(matches!(
        load_bytes(&header_only(&llama_meta())?),
        Err(LisaError::MissingTensor { .. })
    ));
    let mut m = llama_meta();
    m.push(("llama.rope.scaling.type", Value::String("linear".into())));
    m.push(("llama.rope.scaling.factor", Value::F32(4.0)));
    assert!(config_error(m)?.contains("rope.scaling"));
    let mut m = llama_meta();
    m.push(("llama.expert_count", Value::U32(8)));
    assert!(config_error(m)?.contains("expert_count"));
    let mut m = llama_meta();
    m.push(("llama.rope.dimension_count", Value::U32(32)));
    assert!(config_error(m)?.contains("rope.dimension_count"));
    let mut m = llama_meta();
    m[0].1 = Value::String("gemma2".into());
    assert!(config_error(m)?.contains("gemma2"));
    let mut m = llama_meta();
    m.retain(|(k, _)| *k != "llama.block_count");
    assert!(config_error(m)?.contains("block_count"));
    // Neutral values of those keys are read.
    let mut m = llama_meta();
    m.push(("llama.rope.scaling.type", Value::String("none".into())));
    m.push(("llama.expert_count", Value::U32(0)));
    assert!(matches!(
        load_bytes(&header_only(&m)?),
        Err(LisaError::MissingTensor { .. })
    ));
    Ok(())
}
