//! LisaAdamW against candle_nn::AdamW.

use crate::common::*;
use candle_lisa::{LisaAdamW, LisaConfig};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder};

fn params() -> ParamsAdamW {
    ParamsAdamW {
        lr: 3e-3,
        weight_decay: 0.1,
        ..Default::default()
    }
}

/// With γ = N and no resample, k steps of LisaAdamW equal k steps of candle_nn::AdamW, bit for
/// bit: the fused update rounds every intermediate as candle's tensor ops do.
#[test]
fn all_blocks_active_matches_candle_adamw() -> candle_core::Result<()> {
    let n = 4;
    let lisa_map = toy_varmap(n, 1)?;
    let ref_map = clone_varmap(&lisa_map)?;
    let dev = candle_core::Device::Cpu;
    let config = LisaConfig {
        gamma: n,
        period: 100,
        ..Default::default()
    };
    let mut lisa = LisaAdamW::new(&lisa_map, params(), config)?;
    let lisa_model = Toy::new(n, lisa.var_builder())?;
    let mut reference = AdamW::new(ref_map.all_vars(), params())?;
    let ref_model = Toy::new(
        n,
        VarBuilder::from_varmap(&ref_map, candle_core::DType::F32, &dev),
    )?;
    let batch = batch()?;
    for step in 0..6 {
        lisa.backward_step(&lisa_model.loss(&batch)?)?;
        reference.backward_step(&ref_model.loss(&batch)?)?;
        let (a, b) = (
            lisa_map.data().lock().unwrap(),
            ref_map.data().lock().unwrap(),
        );
        assert_eq!(a.len(), b.len());
        for (name, var) in a.iter() {
            let diff = max_abs_diff(var.as_tensor(), b[name].as_tensor());
            assert!(diff <= 0.0, "step {step}: {name} differs by {diff}");
        }
    }
    Ok(())
}

/// A drop-in model (built from the VarMap) and a rebuilt one (frozen-aware) follow the same
/// trajectory through several resamples.
#[test]
fn drop_in_and_rebuilt_models_agree() -> candle_core::Result<()> {
    let n = 6;
    let drop_map = toy_varmap(n, 2)?;
    let rebuilt_map = clone_varmap(&drop_map)?;
    let dev = candle_core::Device::Cpu;
    let config = LisaConfig {
        gamma: 2,
        period: 3,
        seed: 5,
        ..Default::default()
    };
    let mut drop_opt = LisaAdamW::new(&drop_map, params(), config.clone())?;
    let mut rebuilt_opt = LisaAdamW::new(&rebuilt_map, params(), config)?;
    let drop_model = Toy::new(
        n,
        VarBuilder::from_varmap(&drop_map, candle_core::DType::F32, &dev),
    )?;
    let mut rebuilt_model = Toy::new(n, rebuilt_opt.var_builder())?;
    let batch = batch()?;
    for step in 0..12 {
        drop_opt.backward_step(&drop_model.loss(&batch)?)?;
        rebuilt_opt.backward_step(&rebuilt_model.loss(&batch)?)?;
        assert_eq!(drop_opt.active_blocks(), rebuilt_opt.active_blocks());
        if rebuilt_opt.resampled() {
            rebuilt_model = Toy::new(n, rebuilt_opt.var_builder())?;
        }
        let (a, b) = (
            drop_map.data().lock().unwrap(),
            rebuilt_map.data().lock().unwrap(),
        );
        for (name, var) in a.iter() {
            let diff = max_abs_diff(var.as_tensor(), b[name].as_tensor());
            assert!(diff <= 0.0, "step {step}: {name} differs by {diff}");
        }
    }
    assert_eq!(rebuilt_opt.period_index(), 4);
    Ok(())
}

/// `optim::AdamW`, built from named variables or through `Optimizer::new` (unnamed, as
/// candle's AdamW is), and a `LisaAdamW` converted from it all equal candle_nn::AdamW bit for
/// bit, step for step.
#[test]
fn plain_adamw_matches_candle_adamw() -> Result<(), Box<dyn std::error::Error>> {
    let n = 3;
    let reference_map = toy_varmap(n, 7)?;
    let maps: Vec<_> = (0..3)
        .map(|_| clone_varmap(&reference_map))
        .collect::<candle_core::Result<_>>()?;
    let dev = candle_core::Device::Cpu;
    let vb = |m: &candle_nn::VarMap| VarBuilder::from_varmap(m, candle_core::DType::F32, &dev);
    let mut reference = AdamW::new(reference_map.all_vars(), params())?;
    let mut named = candle_lisa::optim::AdamW::new(&maps[0], params())?;
    let mut unnamed = <candle_lisa::optim::AdamW as Optimizer>::new(maps[1].all_vars(), params())?;
    let mut converted: LisaAdamW = candle_lisa::optim::AdamW::new(&maps[2], params())?.into();
    assert_eq!(converted.mode(), candle_lisa::optim::Mode::Full);
    assert_eq!(converted.state_bytes(), named.state_bytes());
    let models = [
        Toy::new(n, vb(&reference_map))?,
        Toy::new(n, named.var_builder())?,
        Toy::new(n, vb(&maps[1]))?,
        Toy::new(n, converted.var_builder())?,
    ];
    let batch = batch()?;
    for step in 0..5 {
        reference.backward_step(&models[0].loss(&batch)?)?;
        named.backward_step(&models[1].loss(&batch)?)?;
        unnamed.backward_step(&models[2].loss(&batch)?)?;
        converted.backward_step(&models[3].loss(&batch)?)?;
        assert!(!converted.resampled());
        let want = reference_map.data().lock().unwrap();
        for map in &maps {
            let got = map.data().lock().unwrap();
            assert_eq!(got.len(), want.len());
            for (name, var) in got.iter() {
                let diff = max_abs_diff(var.as_tensor(), want[name].as_tensor());
                assert!(diff <= 0.0, "step {step}: {name} differs by {diff}");
            }
        }
    }
    assert_eq!(named.step_count(), 5);
    assert_eq!(converted.step_count(), 5);
    Ok(())
}
