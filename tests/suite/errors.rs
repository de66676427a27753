//! Every error path: a clear, typed error, and nothing built or written.

use crate::common::*;
use candle_core::{DType, Device, Tensor, Var};
use candle_lisa::optim::{BlockSampler, LisaParams};
use candle_lisa::{LisaAdamW, LisaConfig, LisaError};
use candle_nn::{Optimizer, ParamsAdamW, VarMap};

fn varmap_with(names: &[&str]) -> VarMap {
    let varmap = VarMap::new();
    for name in names {
        let var = Var::ones((2, 3), DType::F32, &Device::Cpu).unwrap();
        varmap.data().lock().unwrap().insert(name.to_string(), var);
    }
    varmap
}

fn build(varmap: &VarMap, config: LisaConfig) -> Result<LisaAdamW, LisaError> {
    LisaAdamW::new(varmap, ParamsAdamW::default(), config)
}

fn blocks(n: usize) -> VarMap {
    let mut names = vec![
        "model.embed_tokens.weight".to_string(),
        "lm_head.weight".to_string(),
    ];
    names.extend((0..n).map(|i| format!("model.layers.{i}.mlp.up_proj.weight")));
    varmap_with(&names.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn gamma_zero_or_too_large() {
    let varmap = blocks(4);
    for gamma in [0, 5] {
        match build(
            &varmap,
            LisaConfig {
                gamma,
                ..Default::default()
            },
        ) {
            Err(e @ LisaError::InvalidGamma { .. }) => {
                assert!(e.to_string().contains("between 1 and 4"), "{e}");
            }
            other => panic!("gamma {gamma}: {other:?}"),
        }
    }
    assert!(build(
        &varmap,
        LisaConfig {
            gamma: 4,
            ..Default::default()
        }
    )
    .is_ok());
}

#[test]
fn period_zero() {
    let err = build(
        &blocks(4),
        LisaConfig {
            period: 0,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, LisaError::ZeroPeriod), "{err:?}");
    assert!(err
        .to_string()
        .contains("set LisaConfig::period to 1 or more"));
}

#[test]
fn pattern_that_matches_no_block() {
    let config = LisaConfig {
        block_pattern: "transformer.h.{i}.".into(),
        ..Default::default()
    };
    match build(&blocks(4), config).unwrap_err() {
        LisaError::NoBlocks {
            pattern,
            num_params,
            example,
        } => {
            assert_eq!(pattern, "transformer.h.{i}.");
            assert_eq!(num_params, 6);
            assert_eq!(example, "lm_head.weight");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn malformed_patterns() {
    for pattern in ["model.layers.", "h.{i}.{i}.", "h.{i}0"] {
        let config = LisaConfig {
            block_pattern: pattern.into(),
            ..Default::default()
        };
        let err = build(&blocks(4), config).unwrap_err();
        assert!(
            matches!(err, LisaError::InvalidPattern { .. }),
            "{pattern}: {err:?}"
        );
    }
}

#[test]
fn block_indices_with_gaps() {
    let varmap = varmap_with(&[
        "lm_head.weight",
        "model.layers.0.w",
        "model.layers.1.w",
        "model.layers.3.w",
    ]);
    match build(&varmap, LisaConfig::default()).unwrap_err() {
        LisaError::BlockGap { missing, max } => assert_eq!((missing, max), (2, 3)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn empty_varmap_and_only_integer_parameters() {
    assert!(matches!(
        build(&VarMap::new(), LisaConfig::default()),
        Err(LisaError::EmptyVarMap)
    ));
    let varmap = VarMap::new();
    let ints = Var::from_tensor(&Tensor::new(&[1u32, 2], &Device::Cpu).unwrap()).unwrap();
    varmap
        .data()
        .lock()
        .unwrap()
        .insert("model.layers.0.ids".into(), ints);
    assert!(matches!(
        build(&varmap, LisaConfig::default()),
        Err(LisaError::EmptyVarMap)
    ));
}

#[test]
fn non_finite_learning_rate_at_construction() {
    for lr in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let params = ParamsAdamW {
            lr,
            ..Default::default()
        };
        let err = LisaAdamW::new(&blocks(4), params, LisaConfig::default()).unwrap_err();
        assert!(
            matches!(err, LisaError::NonFiniteLearningRate { .. }),
            "{err:?}"
        );
    }
}

#[test]
fn invalid_hyperparameters() {
    let cases = [
        ParamsAdamW {
            beta1: 1.0,
            ..Default::default()
        },
        ParamsAdamW {
            beta2: -0.1,
            ..Default::default()
        },
        ParamsAdamW {
            eps: 0.0,
            ..Default::default()
        },
        ParamsAdamW {
            weight_decay: f64::NAN,
            ..Default::default()
        },
    ];
    for params in cases {
        let err = LisaAdamW::new(&blocks(4), params.clone(), LisaConfig::default()).unwrap_err();
        assert!(
            matches!(err, LisaError::InvalidHyperparameter { .. }),
            "{params:?}: {err:?}"
        );
    }
}

#[test]
fn list_entries_that_match_nothing_or_conflict_or_empty_a_block() {
    let varmap = blocks(4);
    let config = LisaConfig {
        always_trainable: vec!["model.nrm".into()],
        ..Default::default()
    };
    match build(&varmap, config).unwrap_err() {
        LisaError::UnmatchedPrefix { list, prefix } => {
            assert_eq!((list, prefix.as_str()), ("always_trainable", "model.nrm"))
        }
        other => panic!("{other:?}"),
    }
    let config = LisaConfig {
        always_trainable: vec!["model.layers.1.".into()],
        never_trainable: vec!["model.layers.1.mlp".into()],
        ..Default::default()
    };
    assert!(matches!(
        build(&varmap, config),
        Err(LisaError::ConflictingLists { .. })
    ));
    let config = LisaConfig {
        never_trainable: vec!["model.layers.2.".into()],
        ..Default::default()
    };
    assert!(matches!(
        build(&varmap, config),
        Err(LisaError::EmptyBlock { block: 2 })
    ));
}

#[test]
fn optimizer_trait_new_explains_itself() {
    let err = <LisaAdamW as Optimizer>::new(vec![], LisaParams::default()).unwrap_err();
    assert!(
        err.to_string()
            .contains("LisaAdamW::new(&varmap, params, config)"),
        "{err}"
    );
}

/// A non-finite learning rate set through the trait makes the next step fail, writing nothing;
/// `try_set_learning_rate` refuses it at once.
#[test]
fn non_finite_learning_rate_at_step_writes_nothing() -> candle_core::Result<()> {
    let n = 4;
    let varmap = toy_varmap(n, 12)?;
    let mut opt = LisaAdamW::new(&varmap, ParamsAdamW::default(), LisaConfig::default())?;
    let model = Toy::new(n, opt.var_builder())?;
    let err = opt.try_set_learning_rate(f64::NAN).unwrap_err();
    assert!(matches!(err, LisaError::NonFiniteLearningRate { .. }));
    assert_eq!(opt.learning_rate(), ParamsAdamW::default().lr);

    opt.set_learning_rate(f64::INFINITY);
    let before = snapshot(&varmap);
    let grads = model.loss(&batch()?)?.backward()?;
    let err = opt.try_step(&grads).unwrap_err();
    assert!(
        matches!(err, LisaError::NonFiniteLearningRate { .. }),
        "{err:?}"
    );
    assert_eq!(snapshot(&varmap), before);
    assert_eq!(opt.step_count(), 0);
    assert_eq!(opt.param_state("lm_head.weight").unwrap().step, 0);

    opt.set_learning_rate(1e-3);
    opt.step(&grads)?;
    assert_ne!(snapshot(&varmap), before);
    Ok(())
}

#[test]
fn gradient_of_the_wrong_shape_writes_nothing() -> candle_core::Result<()> {
    let n = 4;
    let varmap = toy_varmap(n, 13)?;
    let mut opt = LisaAdamW::new(&varmap, ParamsAdamW::default(), LisaConfig::default())?;
    let model = Toy::new(n, opt.var_builder())?;
    let mut grads = model.loss(&batch()?)?.backward()?;
    let head = varmap.data().lock().unwrap()["lm_head.weight"].clone();
    grads.insert(
        head.as_tensor(),
        Tensor::zeros((3, 3), DType::F32, &Device::Cpu)?,
    );
    let before = snapshot(&varmap);
    match opt.try_step(&grads).unwrap_err() {
        LisaError::GradientMismatch { name, .. } => assert_eq!(name, "lm_head.weight"),
        other => panic!("{other:?}"),
    }
    assert_eq!(snapshot(&varmap), before);
    assert_eq!(opt.step_count(), 0);
    Ok(())
}

/// Returns the same block twice after the first draw.
struct Broken(usize);

impl BlockSampler for Broken {
    fn draw(&mut self, _num_blocks: usize, gamma: usize) -> Vec<usize> {
        self.0 += 1;
        if self.0 == 1 {
            (0..gamma).collect()
        } else {
            vec![0; gamma]
        }
    }
}

#[test]
fn a_broken_sampler_is_caught_before_anything_is_written() -> candle_core::Result<()> {
    let n = 4;
    let varmap = toy_varmap(n, 14)?;
    let vars = candle_lisa::nn::named_vars(&varmap)?;
    let config = LisaConfig {
        gamma: 2,
        period: 1,
        ..Default::default()
    };
    let mut opt =
        LisaAdamW::with_sampler(vars, ParamsAdamW::default(), config, Box::new(Broken(0)))?;
    assert_eq!(opt.active_blocks(), [0, 1]);
    let model = Toy::new(n, opt.var_builder())?;
    let before = snapshot(&varmap);
    let grads = model.loss(&batch()?)?.backward()?;
    match opt.try_step(&grads).unwrap_err() {
        LisaError::InvalidDraw {
            draw,
            gamma,
            num_blocks,
        } => assert_eq!((draw, gamma, num_blocks), (vec![0, 0], 2, 4)),
        other => panic!("{other:?}"),
    }
    assert_eq!(snapshot(&varmap), before);
    assert_eq!(opt.active_blocks(), [0, 1]);
    Ok(())
}

#[test]
fn builder_refuses_unknown_names_and_wrong_shapes() -> candle_core::Result<()> {
    let opt = build(&blocks(4), LisaConfig::default()).unwrap();
    let vb = opt.var_builder();
    let err = vb.get((2, 3), "model.norm.weight").unwrap_err().to_string();
    assert!(
        err.contains("no parameter named \"model.norm.weight\""),
        "{err}"
    );
    let err = vb.get((3, 2), "lm_head.weight").unwrap_err().to_string();
    assert!(err.contains("lm_head.weight"), "{err}");
    assert_eq!(vb.get((2, 3), "lm_head.weight")?.dims(), [2, 3]);
    Ok(())
}

/// Candle code sees the same message through `candle_core::Error`.
#[test]
fn converts_into_candle_errors_with_its_message() {
    let e: candle_core::Error = LisaError::ZeroPeriod.into();
    // candle appends a backtrace when RUST_BACKTRACE is set.
    assert!(
        e.to_string()
            .starts_with(&LisaError::ZeroPeriod.to_string()),
        "{e}"
    );
}
