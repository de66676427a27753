//! LoRA adapters in PEFT's format against PEFT itself: `scripts/peft_fixtures.py` (peft
//! 0.21.2, transformers 5.24.0, torch 2.15.0) saved a LoRA of the `llama` parity fixture and
//! the log-probabilities of the adapted model.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_lisa::nn::frozen_var_builder;
use candle_lisa::nn::{load_peft, save_peft};
use candle_lisa::{load_llama, LisaError, Llama};
use candle_nn::VarBuilder;
use serde_json::Value;

type Error = Box<dyn std::error::Error>;

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn logprobs(model: &Llama, ids: &Tensor) -> Result<Tensor, Error> {
    Ok(crate::common::next_token_logprobs(
        &model.forward(ids)?,
        ids,
    )?)
}

#[test]
fn peft_adapter_loads_and_matches_peft() -> Result<(), Error> {
    let dir = fixtures().join("peft/llama-lora");
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json"))?)?;
    let dev = Device::Cpu;
    let (config, base) = load_llama(fixtures().join("parity/llama"), DType::F32, &dev)?;
    let adapter = load_peft(&dir, DType::F32, &dev)?;
    assert_eq!((adapter.config.rank, adapter.config.alpha), (4, 8.0));
    assert_eq!(adapter.config.targets.len(), 7);
    let vb = VarBuilder::from_varmap(&adapter.adapters, DType::F32, &dev);
    let model = Llama::with_lora(&config, frozen_var_builder(&base)?, &adapter.config, vb)?;
    let ids: Vec<Vec<u32>> = serde_json::from_value(expected["input_ids"].clone())?;
    let ids = Tensor::new(ids, &dev)?;
    let want: Vec<Vec<f32>> = serde_json::from_value(expected["logprobs"].clone())?;
    let got = logprobs(&model, &ids)?;
    let worst = crate::common::max_abs_diff(&got, &Tensor::new(want, &dev)?);
    assert!(worst <= 1e-4, "log-probs differ from PEFT's by {worst}");
    // The adapter matters: the base model alone is far off.
    let plain = Llama::new(&config, frozen_var_builder(&base)?)?;
    let off = (logprobs(&plain, &ids)? - &got)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    assert!(
        off > 0.05,
        "the adapter changes the log-probs by only {off}"
    );

    // Saved again, it has PEFT's tensor names and loads back bit for bit.
    let out = tempfile::tempdir()?;
    save_peft(
        out.path(),
        &adapter.adapters,
        &adapter.config,
        adapter.base_model.as_deref(),
        DType::F32,
    )?;
    let names = |p: &Path| -> Result<Vec<String>, Error> {
        let mut n: Vec<String> =
            candle_core::safetensors::load(p.join("adapter_model.safetensors"), &dev)?
                .into_keys()
                .collect();
        n.sort();
        Ok(n)
    };
    assert_eq!(names(out.path())?, names(&dir)?);
    let again = load_peft(out.path(), DType::F32, &dev)?;
    assert_eq!(again.config, adapter.config);
    for (name, var) in adapter.adapters.data().lock().unwrap().iter() {
        let other = again.adapters.data().lock().unwrap()[name]
            .as_tensor()
            .clone();
        assert_eq!(
            var.as_tensor().flatten_all()?.to_vec1::<f32>()?,
            other.flatten_all()?.to_vec1::<f32>()?
        );
    }
    Ok(())
}

#[test]
fn peft_settings_that_change_the_model_are_refused() -> Result<(), Error> {
    let src = fixtures().join("peft/llama-lora");
    let base: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json"))?)?;
    let cases = [
        ("use_dora", serde_json::json!(true)),
        ("use_rslora", serde_json::json!(true)),
        ("rank_pattern", serde_json::json!({"q_proj": 8})),
        ("modules_to_save", serde_json::json!(["lm_head"])),
        ("layers_to_transform", serde_json::json!([0])),
        ("bias", serde_json::json!("all")),
        ("peft_type", serde_json::json!("IA3")),
        ("target_modules", serde_json::json!("all-linear")),
    ];
    for (field, value) in cases {
        let dir = tempfile::tempdir()?;
        std::fs::copy(
            src.join("adapter_model.safetensors"),
            dir.path().join("adapter_model.safetensors"),
        )?;
        let mut config = base.clone();
        config[field] = value.clone();
        std::fs::write(dir.path().join("adapter_config.json"), config.to_string())?;
        match load_peft(dir.path(), DType::F32, &Device::Cpu) {
            Err(LisaError::UnsupportedConfig { field: f, .. }) if f == field => {}
            other => panic!("{field} = {value}: expected UnsupportedConfig, got {other:?}"),
        }
    }
    Ok(())
}

/// An adapter file without one `lora_B`, or without one layer's module, is refused naming the
/// missing tensor, instead of that module silently getting a fresh zero adapter.
#[test]
fn incomplete_adapters_name_the_missing_tensor() -> Result<(), Error> {
    let src = fixtures().join("peft/llama-lora");
    let full = candle_core::safetensors::load(src.join("adapter_model.safetensors"), &Device::Cpu)?;
    let b = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight";
    let a = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight";
    assert!(full.contains_key(a) && full.contains_key(b));
    let cases: [(&[&str], &str, &str); 2] = [
        (&[b], b, a),
        (
            &[a, b],
            a,
            "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight",
        ),
    ];
    for (removed, missing, have) in cases {
        let dir = tempfile::tempdir()?;
        std::fs::copy(
            src.join("adapter_config.json"),
            dir.path().join("adapter_config.json"),
        )?;
        let mut tensors = full.clone();
        for name in removed {
            tensors.remove(*name);
        }
        candle_core::safetensors::save(&tensors, dir.path().join("adapter_model.safetensors"))?;
        match load_peft(dir.path(), DType::F32, &Device::Cpu) {
            Err(LisaError::MissingAdapterTensor { name, have: h }) => {
                assert_eq!((name.as_str(), h.as_str()), (missing, have))
            }
            other => panic!("without {removed:?}: {other:?}"),
        }
    }
    Ok(())
}
