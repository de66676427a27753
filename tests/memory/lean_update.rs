//! The fused update allocates nothing parameter-sized: it writes θ, m and v in place, where
//! candle_nn::AdamW's step holds fifteen parameter-sized temporaries, all attached to the graph
//! of the new value (DESIGN.md fact 2). Measured here (`cargo test --test memory --
//! --nocapture`): 0.07 and 15.01 parameters.
//!
//! The counting allocator is global to the binary, so the test takes `serial()` first.

use candle_core::{DType, Device, Var};
use candle_lisa::{LisaAdamW, LisaConfig};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};

use crate::{alloc, serial};

/// Bytes allocated on top of what was live before `f`, at the peak of `f`.
fn transient_peak(f: impl FnOnce()) -> usize {
    let base = alloc::reset_peak();
    f();
    alloc::peak() - base
}

const SIDE: usize = 256;
const PARAM_BYTES: usize = SIDE * SIDE * 4;

fn varmap(blocks: usize) -> candle_core::Result<VarMap> {
    let varmap = VarMap::new();
    let dev = Device::Cpu;
    let mut names = vec!["lm_head.weight".to_string()];
    names.extend((0..blocks).map(|i| format!("model.layers.{i}.w")));
    for name in names {
        let var = Var::randn(0f32, 1., (SIDE, SIDE), &dev)?;
        varmap.data().lock().unwrap().insert(name, var);
    }
    Ok(varmap)
}

fn grads(varmap: &VarMap) -> candle_core::Result<candle_core::backprop::GradStore> {
    let mut loss = candle_core::Tensor::zeros((), DType::F32, &Device::Cpu)?;
    for var in varmap.all_vars() {
        loss = (loss + var.as_tensor().sqr()?.sum_all()?)?;
    }
    loss.backward()
}

#[test]
fn update_allocates_nothing_parameter_sized() -> candle_core::Result<()> {
    let _serial = serial();
    let n = 6;
    let lisa_map = varmap(n)?;
    let config = LisaConfig {
        gamma: n,
        period: 100,
        ..Default::default()
    };
    let mut lisa = LisaAdamW::new(&lisa_map, ParamsAdamW::default(), config)?;
    let g = grads(&lisa_map)?;
    let mut result = Ok(());
    let lisa_peak = transient_peak(|| result = lisa.step(&g));
    std::mem::replace(&mut result, Ok(()))?;

    let candle_map = varmap(n)?;
    let mut candle = AdamW::new(candle_map.all_vars(), ParamsAdamW::default())?;
    let g = grads(&candle_map)?;
    let candle_peak = transient_peak(|| result = candle.step(&g));
    result?;

    let (lisa_x, candle_x) = (
        lisa_peak as f64 / PARAM_BYTES as f64,
        candle_peak as f64 / PARAM_BYTES as f64,
    );
    println!("transient peak of one step, in parameters: LisaAdamW {lisa_x:.2}, candle_nn::AdamW {candle_x:.2}");
    assert!(
        lisa_x < 0.25,
        "LisaAdamW's step allocated {lisa_x:.2} parameters at once"
    );
    assert!(
        candle_x >= 10.0,
        "candle_nn::AdamW's step held only {candle_x:.2} parameters"
    );
    Ok(())
}
