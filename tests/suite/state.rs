//! AdamW state: only for what trains now, fresh when a block comes back.

use std::collections::BTreeSet;

use crate::common::*;
use candle_core::Tensor;
use candle_lisa::{LisaAdamW, LisaConfig};
use candle_nn::{Optimizer, ParamsAdamW};

/// State bytes are exactly 2 × the bytes of the trainable parameters after every step, across
/// many resamples, and a frozen block holds no state at all.
#[test]
fn state_bytes_track_trainable_bytes() -> candle_core::Result<()> {
    let n = 10;
    let varmap = toy_varmap(n, 6)?;
    let config = LisaConfig {
        gamma: 2,
        period: 2,
        seed: 9,
        ..Default::default()
    };
    let mut opt = LisaAdamW::new(&varmap, ParamsAdamW::default(), config)?;
    let mut model = Toy::new(n, opt.var_builder())?;
    let batch = batch()?;
    let block_bytes = (2 * FFN * HIDDEN + FFN) * 4;
    let always_bytes = (2 * VOCAB * HIDDEN + HIDDEN) * 4;
    let mut resamples = 0;
    for _ in 0..14 {
        opt.backward_step(&model.loss(&batch)?)?;
        resamples += usize::from(opt.resampled());
        if opt.resampled() {
            model = Toy::new(n, opt.var_builder())?;
        }
        assert_eq!(opt.trainable_bytes(), always_bytes + 2 * block_bytes);
        assert_eq!(opt.state_bytes(), 2 * opt.trainable_bytes());
        for (name, _) in opt.block_map().iter() {
            let active = block_of(name).is_none_or(|b| opt.active_blocks().contains(&b));
            assert_eq!(opt.param_state(name).is_some(), active, "{name}");
        }
    }
    assert_eq!(resamples, 7);
    Ok(())
}

/// A block that comes back after being frozen starts from zero moments and t = 1: its first
/// update is θ(1 − lr·λ) − lr·g/(|g| + ε), whatever it learnt before. A block drawn twice in a
/// row keeps its moments.
#[test]
fn returning_block_starts_fresh_and_staying_block_keeps_state() -> candle_core::Result<()> {
    let n = 8;
    let p = ParamsAdamW {
        lr: 1e-2,
        weight_decay: 0.1,
        ..Default::default()
    };
    let varmap = toy_varmap(n, 7)?;
    // Seed 0 draws [4, 5], [3, 5], [3, 5], [0, 3], [1, 7], ... (see tests/sampler.rs).
    let config = LisaConfig {
        gamma: 2,
        period: 2,
        seed: 0,
        ..Default::default()
    };
    let mut opt = LisaAdamW::new(&varmap, p.clone(), config)?;
    let mut model = Toy::new(n, opt.var_builder())?;
    let batch = batch()?;
    let mut seen = BTreeSet::new();
    let (mut returns, mut stays) = (0, 0);
    let mut previous: Vec<usize> = Vec::new();
    // Steps a block has trained since it last became active.
    let mut run = [0u64; 8];
    for step in 0..40 {
        let active = opt.active_blocks().to_vec();
        let grads = model.loss(&batch)?.backward()?;
        let fresh_start = opt.step_count() % 2 == 0;
        let mut expected = Vec::new();
        for &b in &active {
            let returning = fresh_start && seen.contains(&b) && !previous.contains(&b);
            let staying = fresh_start && previous.contains(&b);
            for name in opt.block_map().block_params(b) {
                let st = opt.param_state(name).unwrap();
                if staying {
                    assert_eq!(st.step, run[b], "step {step}: {name} kept its state");
                    stays += 1;
                }
                if returning {
                    assert_eq!(st.step, 0, "step {step}: {name} came back with old state");
                    let var = varmap.data().lock().unwrap()[name].clone();
                    let g = grads.get(var.as_tensor()).unwrap().clone();
                    let theta = var.as_tensor().copy()?;
                    let hand = ((&theta * (1.0 - p.lr * p.weight_decay))?
                        - ((&g / (g.abs()? + p.eps)?)? * p.lr)?)?;
                    expected.push((name.to_string(), var, g, hand));
                    returns += 1;
                }
            }
        }
        for (b, r) in run.iter_mut().enumerate() {
            *r = if active.contains(&b) { *r + 1 } else { 0 };
        }
        previous = active.clone();
        seen.extend(active);
        opt.step(&grads)?;
        for (name, var, g, hand) in expected {
            let diff = max_abs_diff(var.as_tensor(), &hand);
            assert!(
                diff <= 1e-6,
                "step {step}: {name} is {diff} away from a fresh first step"
            );
            let st = opt.param_state(&name).unwrap();
            assert_eq!(st.step, 1);
            assert!(max_abs_diff(st.m, &(&g * (1.0 - p.beta1))?) <= 1e-7);
            assert!(max_abs_diff(st.v, &(g.sqr()? * (1.0 - p.beta2))?) <= 1e-9);
        }
        if opt.resampled() {
            model = Toy::new(n, opt.var_builder())?;
        }
    }
    assert!(returns > 0, "no block came back in 20 periods");
    assert!(stays > 0, "no block stayed active across a resample");
    let always = opt.param_state("lm_head.weight").unwrap().step;
    assert_eq!(always, 40, "always-trainable state lives for the whole run");
    Ok(())
}

/// Moments are plain tensors: nothing in the optimizer's state is attached to a graph.
#[test]
fn state_is_detached() -> candle_core::Result<()> {
    let n = 8;
    let varmap = toy_varmap(n, 8)?;
    let mut opt = LisaAdamW::new(&varmap, ParamsAdamW::default(), LisaConfig::default())?;
    let model = Toy::new(n, opt.var_builder())?;
    opt.backward_step(&model.loss(&batch()?)?)?;
    let names: Vec<String> = opt.block_map().iter().map(|(n, _)| n.to_string()).collect();
    let mut checked = 0;
    for name in &names {
        if let Some(st) = opt.param_state(name) {
            let tracked = |t: &Tensor| t.track_op();
            assert!(!tracked(st.m) && !tracked(st.v), "{name}");
            checked += 1;
        }
    }
    assert_eq!(checked, 3 + 2 * 3);
    Ok(())
}

/// The soak report in small (`cargo run --release --example soak` runs 10,000 steps): 300
/// steps redrawing the active blocks at every step, and the state never grows past what the
/// first draw allocated; every block has been active along the way.
#[test]
fn state_stays_flat_over_300_resampling_steps() -> candle_core::Result<()> {
    let n = 10;
    let varmap = toy_varmap(n, 3)?;
    let config = LisaConfig {
        gamma: 2,
        period: 1,
        seed: 5,
        ..Default::default()
    };
    let mut opt = LisaAdamW::new(&varmap, ParamsAdamW::default(), config)?;
    let first = opt.state_bytes();
    let mut model = Toy::new(n, opt.var_builder())?;
    let batch = batch()?;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..300 {
        opt.backward_step(&model.loss(&batch)?)?;
        assert!(opt.resampled());
        model = Toy::new(n, opt.var_builder())?;
        seen.extend(opt.active_blocks().iter().copied());
        assert_eq!(opt.state_bytes(), first);
    }
    assert_eq!(seen.len(), n);
    Ok(())
}
