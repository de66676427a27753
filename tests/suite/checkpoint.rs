//! Hugging Face checkpoint I/O: round trips, shards, dtypes, clear errors, atomic saves.
use crate::common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_lisa::models::{save_llama_with, SaveOptions};
use candle_lisa::{load_llama, save_llama, LisaAdamW, LisaConfig, LisaError, Llama, LlamaConfig};
use candle_nn::{Optimizer, ParamsAdamW, VarBuilder, VarMap};

fn config(tied: bool, kv_heads: usize) -> LlamaConfig {
    let mut c = LlamaConfig::tiny(23, 16, 4, 4, kv_heads);
    c.intermediate_size = 24;
    c.tie_word_embeddings = tied;
    c.extra.insert(
        "architectures".into(),
        serde_json::json!(["LlamaForCausalLM"]),
    );
    c
}

fn random_model(c: &LlamaConfig) -> candle_core::Result<VarMap> {
    let varmap = VarMap::new();
    Llama::new(
        c,
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )
    .map_err(candle_core::Error::from)?;
    Ok(varmap)
}

#[test]
fn load_save_load_is_bit_exact() -> Result<(), Box<dyn std::error::Error>> {
    let c = config(false, 2);
    let original = random_model(&c)?;
    let (a, b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    save_llama(a.path(), &c, &original, DType::F32)?;
    let (c1, m1) = load_llama(a.path(), DType::F32, &Device::Cpu)?;
    save_llama(b.path(), &c1, &m1, DType::F32)?;
    let (c2, m2) = load_llama(b.path(), DType::F32, &Device::Cpu)?;
    assert_eq!(common::snapshot(&original), common::snapshot(&m2));
    assert_eq!(c1, c2);
    assert_eq!(
        c2.extra["architectures"],
        serde_json::json!(["LlamaForCausalLM"])
    );
    assert_eq!(c2.torch_dtype.as_deref(), Some("float32"));
    let bytes = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert_eq!(
        bytes(a.path()),
        bytes(b.path()),
        "the same model writes the same bytes"
    );
    Ok(())
}

#[test]
fn half_precision_weights_are_converted_on_load() -> Result<(), Box<dyn std::error::Error>> {
    let c = config(true, 2);
    let original = random_model(&c)?;
    for dtype in [DType::BF16, DType::F16] {
        let dir = tempfile::tempdir()?;
        save_llama(dir.path(), &c, &original, dtype)?;
        let (_, loaded) = load_llama(dir.path(), DType::F32, &Device::Cpu)?;
        let data = loaded.data().lock().unwrap();
        for (name, var) in original.data().lock().unwrap().iter() {
            assert_eq!(data[name].dtype(), DType::F32);
            let rounded = var.as_tensor().to_dtype(dtype)?.to_dtype(DType::F32)?;
            let diff = (data[name].as_tensor() - rounded)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "{name} in {dtype:?}");
        }
        let (_, as_bf16) = load_llama(dir.path(), DType::BF16, &Device::Cpu)?;
        assert!(as_bf16.all_vars().iter().all(|v| v.dtype() == DType::BF16));
    }
    Ok(())
}

/// A sharded checkpoint (two files and an index) loads to the same tensors.
/// transformers 4 reads `torch_dtype` and 5 reads `dtype`: a save writes both, with the dtype
/// saved, whichever of them the source config had.
#[test]
fn saved_config_names_the_saved_dtype_under_both_keys() -> Result<(), Box<dyn std::error::Error>> {
    let c = config(false, 2);
    let original = random_model(&c)?;
    let source = [
        (Some("float32"), None),
        (None, Some("float32")),
        (Some("float32"), Some("float32")),
        (Some("bfloat16"), Some("bfloat16")),
        (None, None),
    ];
    for (torch_dtype, dtype) in source {
        for (saved, name) in [(DType::BF16, "bfloat16"), (DType::F32, "float32")] {
            let (src, dst) = (tempfile::tempdir()?, tempfile::tempdir()?);
            let mut c = c.clone();
            c.torch_dtype = torch_dtype.map(str::to_string);
            c.dtype = dtype.map(str::to_string);
            save_llama(src.path(), &c, &original, DType::F32)?;
            let (loaded, varmap) = load_llama(src.path(), DType::F32, &Device::Cpu)?;
            save_llama(dst.path(), &loaded, &varmap, saved)?;
            let text = std::fs::read_to_string(dst.path().join("config.json"))?;
            let json: serde_json::Value = serde_json::from_str(&text)?;
            let case = format!("source {torch_dtype:?}/{dtype:?}, saved {saved:?}");
            assert_eq!(json["torch_dtype"], name, "{case}");
            assert_eq!(json["dtype"], name, "{case}");
            let (reread, _) = load_llama(dst.path(), DType::F32, &Device::Cpu)?;
            assert_eq!(reread.torch_dtype.as_deref(), Some(name), "{case}");
            assert_eq!(reread.dtype.as_deref(), Some(name), "{case}");
        }
    }
    Ok(())
}

/// A model whose vocabulary grew is saved only with a config that says so, and its saved
/// config then gives the new size.
#[test]
fn saved_vocab_size_matches_the_embedding() -> Result<(), Box<dyn std::error::Error>> {
    let c = config(true, 2);
    let mut grown = c.clone();
    grown.vocab_size = 30;
    let varmap = random_model(&grown)?;
    let dir = tempfile::tempdir()?;
    match save_llama(dir.path(), &c, &varmap, DType::F32) {
        Err(LisaError::TensorShape {
            name,
            expected,
            found,
        }) => assert_eq!(
            (name.as_str(), expected, found),
            ("model.embed_tokens.weight", vec![23, 16], vec![30, 16])
        ),
        other => panic!("{other:?}"),
    }
    assert!(!dir.path().join("config.json").exists());
    save_llama(dir.path(), &grown, &varmap, DType::F32)?;
    let (saved, loaded) = load_llama(dir.path(), DType::F32, &Device::Cpu)?;
    assert_eq!((saved.vocab_size, saved.tie_word_embeddings), (30, true));
    assert_eq!(common::snapshot(&loaded), common::snapshot(&varmap));
    Ok(())
}

#[test]
fn sharded_checkpoint_loads() -> Result<(), Box<dyn std::error::Error>> {
    let c = config(false, 4);
    let original = random_model(&c)?;
    let dir = tempfile::tempdir()?;
    let (mut one, mut two) = (HashMap::new(), HashMap::new());
    let mut weight_map = serde_json::Map::new();
    for (name, var) in original.data().lock().unwrap().iter() {
        let (shard, file) = if name.contains("layers.0") || name.contains("layers.1") {
            (&mut one, "model-00001-of-00002.safetensors")
        } else {
            (&mut two, "model-00002-of-00002.safetensors")
        };
        shard.insert(name.clone(), var.as_tensor().clone());
        weight_map.insert(name.clone(), file.into());
    }
    candle_core::safetensors::save(&one, dir.path().join("model-00001-of-00002.safetensors"))?;
    candle_core::safetensors::save(&two, dir.path().join("model-00002-of-00002.safetensors"))?;
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )?;
    std::fs::write(dir.path().join("config.json"), serde_json::to_string(&c)?)?;
    let (_, loaded) = load_llama(dir.path(), DType::F32, &Device::Cpu)?;
    assert_eq!(common::snapshot(&loaded), common::snapshot(&original));

    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors"))?;
    let err = load_err(dir.path());
    assert!(
        err.to_string().contains("model-00002-of-00002.safetensors"),
        "{err}"
    );
    Ok(())
}

/// A save over the shard limit writes shards and an index that load back bit for bit, copies
/// the tokenizer files, and replaces an earlier single-file save; shard indexes that point
/// outside the directory or store a tensor twice are refused.
#[test]
fn sharded_save_round_trips_and_bad_indexes_are_refused() -> Result<(), Box<dyn std::error::Error>>
{
    let c = config(false, 2);
    let original = random_model(&c)?;
    let (src, dir) = (tempfile::tempdir()?, tempfile::tempdir()?);
    std::fs::write(src.path().join("tokenizer.json"), "{}")?;
    std::fs::write(
        src.path().join("generation_config.json"),
        r#"{"eos_token_id": [1, 2]}"#,
    )?;
    save_llama(dir.path(), &c, &original, DType::F32)?;
    let options = SaveOptions {
        max_shard_bytes: 8 << 10,
        copy_files_from: Some(src.path().to_path_buf()),
    };
    save_llama_with(dir.path(), &c, &original, DType::F32, &options)?;
    let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        dir.path().join("model.safetensors.index.json"),
    )?)?;
    let map = index["weight_map"].as_object().unwrap();
    let mut files: Vec<&str> = map.values().map(|v| v.as_str().unwrap()).collect();
    files.sort();
    files.dedup();
    assert!(files.len() > 2, "{files:?}");
    assert_eq!(
        files[0],
        format!("model-00001-of-{:05}.safetensors", files.len())
    );
    for f in &files {
        assert!(
            std::fs::metadata(dir.path().join(f))?.len() <= 8 << 10 | 4096,
            "{f}"
        );
    }
    let params: usize = c.num_params();
    assert_eq!(
        index["metadata"]["total_size"],
        serde_json::json!(params * 4)
    );
    assert!(
        !dir.path().join("model.safetensors").exists(),
        "the earlier single file is gone"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("tokenizer.json"))?,
        "{}"
    );
    assert!(dir.path().join("generation_config.json").is_file());
    let (_, loaded) = load_llama(dir.path(), DType::F32, &Device::Cpu)?;
    assert_eq!(common::snapshot(&loaded), common::snapshot(&original));

    // A shard outside the directory, and a tensor in two shards.
    let write_index = |map: &serde_json::Map<String, serde_json::Value>| {
        let index = serde_json::json!({"metadata": {}, "weight_map": map});
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            index.to_string(),
        )
        .unwrap();
    };
    for escape in [
        "../model.safetensors",
        "/tmp/model.safetensors",
        "sub/model.safetensors",
    ] {
        let mut bad = map.clone();
        bad.insert("model.norm.weight".into(), escape.into());
        write_index(&bad);
        let err = load_err(dir.path());
        assert!(
            matches!(&err, LisaError::InvalidCheckpoint { reason, .. } if reason.contains(escape)),
            "{escape}: {err}"
        );
    }
    let first = dir.path().join(files[0]);
    let mut tensors = candle_core::safetensors::load(&first, &Device::Cpu)?;
    let (name, _) = tensors
        .iter()
        .next()
        .map(|(n, t)| (n.clone(), t.clone()))
        .unwrap();
    let dup = original.data().lock().unwrap()[&name].as_tensor().clone();
    let other = if map[&name] == files[0] {
        files[1]
    } else {
        files[0]
    };
    let mut again = candle_core::safetensors::load(dir.path().join(other), &Device::Cpu)?;
    again.insert(name.clone(), dup);
    candle_core::safetensors::save(&again, dir.path().join(other))?;
    tensors.clear();
    write_index(map);
    let err = load_err(dir.path());
    assert!(
        matches!(&err, LisaError::InvalidCheckpoint { reason, .. } if reason.contains(&name)),
        "{err}"
    );
    Ok(())
}

fn load_err(dir: &Path) -> LisaError {
    match load_llama(dir, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e,
    }
}

/// Writes `tensors` as the checkpoint in `dir` with config `c`.
fn write_raw(dir: &Path, c: &LlamaConfig, tensors: &HashMap<String, Tensor>) {
    candle_core::safetensors::save(tensors, dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), serde_json::to_string(c).unwrap()).unwrap();
}

fn raw(varmap: &VarMap) -> HashMap<String, Tensor> {
    varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect()
}

#[test]
fn missing_unexpected_and_misshapen_tensors_are_named() -> Result<(), Box<dyn std::error::Error>> {
    let c = config(false, 2);
    let model = random_model(&c)?;
    let dir = tempfile::tempdir()?;

    let mut t = raw(&model);
    t.remove("model.layers.2.mlp.up_proj.weight");
    write_raw(dir.path(), &c, &t);
    match load_err(dir.path()) {
        LisaError::MissingTensor { name, expected } => {
            assert_eq!(
                (name.as_str(), expected),
                ("model.layers.2.mlp.up_proj.weight", vec![24, 16])
            );
        }
        other => panic!("{other:?}"),
    }

    let mut t = raw(&model);
    t.insert(
        "model.layers.4.mlp.up_proj.weight".into(),
        Tensor::zeros((24, 16), DType::F32, &Device::Cpu)?,
    );
    write_raw(dir.path(), &c, &t);
    match load_err(dir.path()) {
        LisaError::UnexpectedTensor { name, found } => {
            assert_eq!(
                (name.as_str(), found),
                ("model.layers.4.mlp.up_proj.weight", vec![24, 16])
            );
        }
        other => panic!("{other:?}"),
    }

    let mut t = raw(&model);
    t.insert(
        "model.layers.1.self_attn.k_proj.weight".into(),
        Tensor::zeros((16, 16), DType::F32, &Device::Cpu)?,
    );
    write_raw(dir.path(), &c, &t);
    let err = load_err(dir.path());
    match &err {
        LisaError::TensorShape {
            name,
            expected,
            found,
        } => {
            assert_eq!(name, "model.layers.1.self_attn.k_proj.weight");
            assert_eq!(
                (expected.clone(), found.clone()),
                (vec![8, 16], vec![16, 16])
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(
        err.to_string().contains("[16, 16]") && err.to_string().contains("[8, 16]"),
        "{err}"
    );

    let err = load_err(&dir.path().join("nope"));
    assert!(matches!(err, LisaError::Io { .. }), "{err:?}");
    Ok(())
}

/// A save that fails leaves the previous checkpoint loadable and unchanged.
#[test]
fn failed_save_keeps_the_previous_checkpoint() -> Result<(), Box<dyn std::error::Error>> {
    let c = config(false, 2);
    let first = random_model(&c)?;
    let dir = tempfile::tempdir()?;
    save_llama(dir.path(), &c, &first, DType::F32)?;
    let before = std::fs::read(dir.path().join("model.safetensors"))?;

    // Block the temporary file's path with a directory, so writing it fails.
    let blocker = dir
        .path()
        .join(format!(".model.safetensors.tmp-{}", std::process::id()));
    std::fs::create_dir(&blocker)?;
    let second = random_model(&c)?;
    assert!(save_llama(dir.path(), &c, &second, DType::F32).is_err());
    assert_eq!(std::fs::read(dir.path().join("model.safetensors"))?, before);
    let (_, loaded) = load_llama(dir.path(), DType::F32, &Device::Cpu)?;
    assert_eq!(common::snapshot(&loaded), common::snapshot(&first));

    // A VarMap that does not match the config is refused before anything is written.
    std::fs::remove_dir(&blocker)?;
    let wrong = random_model(&config(false, 4))?;
    assert!(matches!(
        save_llama(dir.path(), &c, &wrong, DType::F32),
        Err(LisaError::TensorShape { .. })
    ));
    assert_eq!(std::fs::read(dir.path().join("model.safetensors"))?, before);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        2,
        "only config.json and model.safetensors: {leftovers:?}"
    );
    Ok(())
}

/// Tied-embedding and grouped-query configs load from disk and train with LISA.
#[test]
fn tied_and_grouped_query_checkpoints_load_and_train() -> Result<(), Box<dyn std::error::Error>> {
    for (tied, kv) in [(true, 4), (false, 1), (true, 2)] {
        let c = config(tied, kv);
        let dir = tempfile::tempdir()?;
        save_llama(dir.path(), &c, &random_model(&c)?, DType::F32)?;
        if tied {
            let names =
                candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu)?;
            assert!(
                !names.contains_key("lm_head.weight"),
                "a tied head is not written"
            );
        }
        let (c, varmap) = load_llama(dir.path(), DType::F32, &Device::Cpu)?;
        let params = ParamsAdamW {
            lr: 1e-2,
            ..Default::default()
        };
        let mut opt = LisaAdamW::new(
            &varmap,
            params,
            LisaConfig {
                gamma: 2,
                period: 100,
                ..Default::default()
            },
        )?;
        let model = Llama::new(&c, opt.var_builder())?;
        let ids = Tensor::new(&[[1u32, 5, 2, 7, 3, 9, 11, 4]], &Device::Cpu)?;
        let labels = ids.to_dtype(DType::I64)?;
        let first = model.loss(&ids, &labels)?.to_scalar::<f32>()?;
        for _ in 0..10 {
            opt.backward_step(&model.loss(&ids, &labels)?)?;
        }
        let last = model.loss(&ids, &labels)?.to_scalar::<f32>()?;
        assert!(
            last < first - 0.1,
            "tied {tied}, kv {kv}: loss {first} -> {last}"
        );
    }
    Ok(())
}

/// Safetensors headers are untrusted: shapes whose size overflows and offsets that wrap
/// around are refused with a typed error (before, they overflowed the arithmetic).
#[test]
fn header_arithmetic_that_overflows_is_refused() -> Result<(), Box<dyn std::error::Error>> {
    let c = config(false, 2);
    let dir = tempfile::tempdir()?;
    write_raw(dir.path(), &c, &raw(&random_model(&c)?));
    let max = u64::MAX;
    let cases = [
        (
            serde_json::json!({"x": {"dtype": "F32", "shape": [1u64 << 32, 1u64 << 32, 16], "data_offsets": [0, 0]}}),
            "is too large",
        ),
        (
            serde_json::json!({"x": {"dtype": "F32", "shape": [1], "data_offsets": [max - 3, max]}}),
            "do not hold 4 bytes inside the file",
        ),
    ];
    for (header, reason) in cases {
        let header = header.to_string().into_bytes();
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend(&header);
        file.extend([0u8; 16]);
        std::fs::write(dir.path().join("model.safetensors"), file)?;
        match load_err(dir.path()) {
            LisaError::InvalidCheckpoint { reason: r, .. } => {
                assert!(r.contains(reason), "{r}")
            }
            other => panic!("{other:?}"),
        }
    }
    Ok(())
}
