//! The Llama-family model against transformers itself: small random checkpoints saved by
//! `scripts/parity_fixtures.py` (transformers 5.24.0, torch 2.15.0; the versions are in each
//! `expected.json`), with the per-token log-probabilities, the loss and every parameter's
//! gradient norm that transformers computed for them.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_lisa::{load_llama, named_vars, Llama};
use candle_nn::VarBuilder;
use serde_json::Value;

type Error = Box<dyn std::error::Error>;

fn check(case: &str) -> Result<(), Error> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/parity")
        .join(case);
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json"))?)?;
    let dev = Device::Cpu;
    let (config, vars) = load_llama(&dir, DType::F32, &dev)?;
    assert_eq!(
        config.model_type.as_deref(),
        expected["model_type"].as_str()
    );
    let model = Llama::new(&config, VarBuilder::from_varmap(&vars, DType::F32, &dev))?;

    let ids: Vec<Vec<u32>> = serde_json::from_value(expected["input_ids"].clone())?;
    let b = ids.len();
    let ids = Tensor::new(ids, &dev)?;
    let got = crate::common::next_token_logprobs(&model.forward(&ids)?, &ids)?;
    let want: Vec<Vec<f32>> = serde_json::from_value(expected["logprobs"].clone())?;
    let worst = (got - Tensor::new(want, &dev)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    assert!(worst <= 1e-4, "{case}: log-probs differ by up to {worst}");
    assert_eq!(b, 2);

    let loss = model.loss(&ids, &ids.to_dtype(DType::I64)?)?;
    let (got, want) = (
        loss.to_scalar::<f32>()? as f64,
        expected["loss"].as_f64().ok_or("loss")?,
    );
    assert!(
        (got - want).abs() / want <= 1e-5,
        "{case}: loss {got} against transformers' {want}"
    );

    let loss_diff = (got - want).abs() / want;
    let grads = loss.backward()?;
    let norms = expected["grad_norms"].as_object().ok_or("grad_norms")?;
    let named = named_vars(&vars)?;
    let mut names: Vec<&str> = named.iter().map(|(n, _)| n.as_str()).collect();
    let mut want_names: Vec<&str> = norms.keys().map(String::as_str).collect();
    names.sort();
    want_names.sort();
    assert_eq!(names, want_names, "{case}: parameter names");
    let mut grad_diff = 0f64;
    for (name, var) in &named {
        let g = grads
            .get(var)
            .ok_or_else(|| format!("{case}: no gradient for {name}"))?;
        let got = g.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64;
        let want = norms[name].as_f64().ok_or("norm")?;
        grad_diff = grad_diff.max((got - want).abs() / want);
        assert!(
            (got - want).abs() / want <= 1e-3,
            "{case}: gradient norm of {name} is {got}, transformers' {want}"
        );
    }
    // The figures, for `cargo test parity_hf -- --nocapture`.
    eprintln!(
        "{case}: log-probs within {worst:.1e}, loss within {loss_diff:.1e} relative, gradient norms within {grad_diff:.1e} relative"
    );
    Ok(())
}

macro_rules! parity {
    ($($test:ident => $case:literal),* $(,)?) => {$(
        #[test]
        fn $test() -> Result<(), Error> {
            check($case)
        }
    )*};
}

parity! {
    llama => "llama",
    llama_tied => "llama-tied",
    llama3_rope_scaling => "llama3-rope",
    llama3_rope_scaling_transformers_4_config => "llama3-rope-v4",
    llama_linear_rope_scaling => "llama-linear-rope",
    mistral => "mistral",
    qwen2 => "qwen2",
    qwen2_yarn => "qwen2-yarn",
    qwen2_yarn_transformers_4_config => "qwen2-yarn-v4",
    qwen3 => "qwen3",
    phi3 => "phi3",
    gemma2 => "gemma2",
    gemma3 => "gemma3",
    gemma3_transformers_4_config => "gemma3-v4",
}
