//! The GPT-2 of `examples/gpt2.rs` (Hugging Face layout, `Conv1D` weights, learned positions)
//! against transformers' `GPT2LMHeadModel`: the `gpt2` fixture of
//! `scripts/parity_fixtures.py` (transformers 5.24.0, torch 2.15.0).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde_json::Value;

use crate::gpt2_model::{load, Gpt2};

type Error = Box<dyn std::error::Error>;

#[test]
fn gpt2_matches_transformers() -> Result<(), Error> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity/gpt2");
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json"))?)?;
    let dev = Device::Cpu;
    let (config, vars) = load(&dir, DType::F32, &dev)?;
    let model = Gpt2::new(&config, VarBuilder::from_varmap(&vars, DType::F32, &dev))?;
    let ids: Vec<Vec<u32>> = serde_json::from_value(expected["input_ids"].clone())?;
    let ids = Tensor::new(ids, &dev)?;
    let got = crate::common::next_token_logprobs(&model.forward(&ids)?, &ids)?;
    let want: Vec<Vec<f32>> = serde_json::from_value(expected["logprobs"].clone())?;
    let worst = (got - Tensor::new(want, &dev)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    assert!(
        worst <= 1e-4,
        "log-probs differ from transformers' by {worst}"
    );

    let loss = model.loss(&ids)?;
    let (got, want) = (
        loss.to_scalar::<f32>()? as f64,
        expected["loss"].as_f64().ok_or("loss")?,
    );
    assert!(
        (got - want).abs() / want <= 1e-5,
        "loss {got} against {want}"
    );
    let grads = loss.backward()?;
    let norms = expected["grad_norms"].as_object().ok_or("grad_norms")?;
    let data = vars.data().lock().unwrap();
    let mut grad_diff = 0f64;
    assert_eq!(data.len(), norms.len(), "parameter count");
    for (name, want) in norms {
        let var = data
            .get(name)
            .ok_or_else(|| format!("no parameter {name}"))?;
        let g = grads
            .get(var)
            .ok_or_else(|| format!("no gradient for {name}"))?;
        let got = g.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64;
        let want = want.as_f64().ok_or("norm")?;
        grad_diff = grad_diff.max((got - want).abs() / want);
        assert!(
            (got - want).abs() / want <= 1e-3,
            "{name}: gradient norm {got}, transformers' {want}"
        );
    }
    let loss_diff = (loss.to_scalar::<f32>()? as f64 - expected["loss"].as_f64().unwrap_or(0.0))
        .abs()
        / expected["loss"].as_f64().unwrap_or(1.0);
    // The figures, for `cargo test gpt2 -- --nocapture`.
    eprintln!("gpt2: log-probs within {worst:.1e}, loss within {loss_diff:.1e}, gradient norms within {grad_diff:.1e}");
    Ok(())
}
