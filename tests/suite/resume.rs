//! Saving and restoring the optimizer: a resumed run is the uninterrupted run.

use crate::common::*;
use candle_lisa::{LisaAdamW, LisaConfig, LisaError};
use candle_nn::{Optimizer, ParamsAdamW, VarMap};

fn config() -> LisaConfig {
    LisaConfig {
        gamma: 2,
        period: 3,
        seed: 4,
        ..Default::default()
    }
}

fn params() -> ParamsAdamW {
    ParamsAdamW {
        lr: 1e-2,
        weight_decay: 0.05,
        ..Default::default()
    }
}

/// Runs `steps` steps of LISA on `varmap` with `opt`, rebuilding after resamples.
fn run(varmap: &VarMap, opt: &mut LisaAdamW, steps: usize, n: usize) -> candle_core::Result<()> {
    let _ = varmap;
    let mut model = Toy::new(n, opt.var_builder())?;
    for _ in 0..steps {
        opt.backward_step(&model.loss(&batch()?)?)?;
        if opt.resampled() {
            model = Toy::new(n, opt.var_builder())?;
        }
    }
    Ok(())
}

#[test]
fn resumed_run_equals_uninterrupted_run() -> Result<(), Box<dyn std::error::Error>> {
    let n = 8;
    // Uninterrupted: 14 steps.
    let straight = toy_varmap(n, 21)?;
    let mut opt = LisaAdamW::new(&straight, params(), config())?;
    run(&straight, &mut opt, 14, n)?;

    // Interrupted after 7 steps (mid-period): weights and optimizer saved, then a fresh process
    // (fresh VarMap, fresh optimizer) loads both and runs 7 more.
    let first = toy_varmap(n, 21)?;
    let mut opt1 = LisaAdamW::new(&first, params(), config())?;
    run(&first, &mut opt1, 7, n)?;
    let dir = tempfile::tempdir()?;
    opt1.save_state(dir.path())?;
    let resumed = clone_varmap(&first)?;
    let mut opt2 = LisaAdamW::new(&resumed, ParamsAdamW::default(), config())?;
    opt2.load_state(dir.path())?;
    assert_eq!(opt2.active_blocks(), opt1.active_blocks());
    assert_eq!(opt2.step_count(), 7);
    assert_eq!(opt2.learning_rate(), params().lr);
    run(&resumed, &mut opt2, 7, n)?;

    assert_eq!(opt2.active_blocks(), opt.active_blocks());
    assert_eq!(opt2.period_index(), opt.period_index());
    assert_eq!(snapshot(&resumed), snapshot(&straight), "weights differ");
    for (name, _) in opt.block_map().iter() {
        match (opt.param_state(name), opt2.param_state(name)) {
            (None, None) => {}
            (Some(a), Some(b)) => {
                assert_eq!(a.step, b.step, "{name}");
                assert_eq!(max_abs_diff(a.m, b.m), 0.0, "{name}");
                assert_eq!(max_abs_diff(a.v, b.v), 0.0, "{name}");
            }
            _ => panic!("{name}: state present in one run only"),
        }
    }
    Ok(())
}

#[test]
fn state_that_does_not_fit_is_refused_and_changes_nothing() -> Result<(), Box<dyn std::error::Error>>
{
    let n = 8;
    let varmap = toy_varmap(n, 22)?;
    let mut opt = LisaAdamW::new(&varmap, params(), config())?;
    run(&varmap, &mut opt, 4, n)?;
    let dir = tempfile::tempdir()?;
    opt.save_state(dir.path())?;

    let other = LisaConfig {
        gamma: 3,
        ..config()
    };
    let mut wrong = LisaAdamW::new(&varmap, params(), other)?;
    let before = (
        wrong.active_blocks().to_vec(),
        wrong.step_count(),
        wrong.state_bytes(),
    );
    match wrong.load_state(dir.path()) {
        Err(LisaError::InvalidState { reason, .. }) => {
            assert!(reason.contains("gamma 2"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        before,
        (
            wrong.active_blocks().to_vec(),
            wrong.step_count(),
            wrong.state_bytes()
        )
    );

    let smaller = toy_varmap(n - 1, 22)?;
    let mut fewer = LisaAdamW::new(&smaller, params(), config())?;
    assert!(matches!(
        fewer.load_state(dir.path()),
        Err(LisaError::InvalidState { .. })
    ));
    assert!(matches!(
        opt.load_state(dir.path().join("missing")),
        Err(LisaError::Io { .. })
    ));
    Ok(())
}

/// The all-trainable optimizer is plain AdamW: state for every parameter, no blocks.
#[test]
fn all_trainable_is_plain_adamw() -> Result<(), Box<dyn std::error::Error>> {
    let n = 4;
    let a = toy_varmap(n, 23)?;
    let b = clone_varmap(&a)?;
    let vars = candle_lisa::nn::named_vars(&a)?;
    let mut full = LisaAdamW::all_trainable(vars, params())?;
    assert_eq!(full.num_blocks(), 0);
    let total: usize = a.all_vars().iter().map(|v| v.elem_count() * 4).sum();
    assert_eq!(full.state_bytes(), 2 * total);
    let mut reference = candle_nn::AdamW::new(b.all_vars(), params())?;
    let (ma, mb) = (
        Toy::new(n, full.var_builder())?,
        Toy::new(
            n,
            candle_nn::VarBuilder::from_varmap(
                &b,
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            ),
        )?,
    );
    for _ in 0..4 {
        full.backward_step(&ma.loss(&batch()?)?)?;
        reference.backward_step(&mb.loss(&batch()?)?)?;
        assert!(!full.resampled());
    }
    let (sa, sb) = (snapshot(&a), snapshot(&b));
    for (name, va) in &sa {
        let diff = va
            .iter()
            .zip(&sb[name])
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(diff <= 1e-6, "{name}: {diff}");
    }
    Ok(())
}

/// A kill between the two files of `save_state` leaves new moments beside the old counters:
/// the pair is refused with a typed error, and the optimizer is left as it was.
#[test]
fn state_files_from_different_saves_are_refused() -> Result<(), Box<dyn std::error::Error>> {
    let n = 8;
    let varmap = toy_varmap(n, 24)?;
    let mut opt = LisaAdamW::new(&varmap, params(), config())?;
    run(&varmap, &mut opt, 4, n)?;
    let dir = tempfile::tempdir()?;
    opt.save_state(dir.path())?;
    let json = dir.path().join(candle_lisa::optim::STATE_JSON_FILE);
    let old_json = std::fs::read(&json)?;
    run(&varmap, &mut opt, 1, n)?;
    opt.save_state(dir.path())?;
    // The moments of step 5 (written first) with the counters of step 4.
    std::fs::write(&json, old_json)?;
    let mut fresh = LisaAdamW::new(&varmap, params(), config())?;
    let before = (fresh.step_count(), fresh.state_bytes());
    match fresh.load_state(dir.path()) {
        Err(LisaError::TornState { path }) => assert_eq!(path, dir.path()),
        other => panic!("{other:?}"),
    }
    assert_eq!((fresh.step_count(), fresh.state_bytes()), before);
    assert_eq!(before.0, 0);
    // The consistent pair of step 5 loads.
    opt.save_state(dir.path())?;
    fresh.load_state(dir.path())?;
    assert_eq!(fresh.step_count(), 5);
    Ok(())
}
