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
    let loss = model.loss(&ids)?;
    crate::common::check_against_fixture(
        "gpt2",
        &expected,
        &ids,
        &model.forward(&ids)?,
        &loss,
        &vars,
    )
}
