//! What moves and what does not: frozen blocks, always-trainable parameters, active blocks.

use std::collections::BTreeSet;

use crate::common::*;
use candle_core::{DType, Device};
use candle_lisa::{LisaAdamW, LisaConfig, LisaError};
use candle_nn::{Optimizer, ParamsAdamW, VarBuilder};

fn params() -> ParamsAdamW {
    ParamsAdamW {
        lr: 1e-2,
        ..Default::default()
    }
}

/// Runs 15 steps (5 periods) and checks after each one that exactly the active blocks and the
/// always-trainable parameters changed, and that frozen blocks are bitwise unchanged.
fn check_only_active_move(rebuild: bool) -> candle_core::Result<()> {
    let n = 8;
    let gamma = 3;
    let varmap = toy_varmap(n, 3)?;
    let config = LisaConfig {
        gamma,
        period: 3,
        seed: 11,
        ..Default::default()
    };
    let mut opt = LisaAdamW::new(&varmap, params(), config)?;
    let drop_in = Toy::new(
        n,
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )?;
    let mut model = Toy::new(n, opt.var_builder())?;
    let batch = batch()?;
    let mut draws = BTreeSet::new();
    for step in 0..15 {
        let active: BTreeSet<usize> = opt.active_blocks().iter().copied().collect();
        draws.insert(opt.active_blocks().to_vec());
        let before = snapshot(&varmap);
        let loss = if rebuild {
            model.loss(&batch)?
        } else {
            drop_in.loss(&batch)?
        };
        opt.backward_step(&loss)?;
        let after = snapshot(&varmap);
        let mut changed_blocks = BTreeSet::new();
        for (name, old) in &before {
            let changed = old != &after[name];
            match block_of(name) {
                Some(b) if changed => {
                    changed_blocks.insert(b);
                }
                Some(b) => assert!(
                    !active.contains(&b),
                    "step {step}: active {name} did not move"
                ),
                None => assert!(changed, "step {step}: always-trainable {name} did not move"),
            }
        }
        assert_eq!(
            changed_blocks, active,
            "step {step}: moved blocks are not the active ones"
        );
        assert_eq!(changed_blocks.len(), gamma);
        if opt.resampled() {
            model = Toy::new(n, opt.var_builder())?;
        }
    }
    assert!(
        draws.len() >= 4,
        "expected several distinct draws, got {draws:?}"
    );
    Ok(())
}

#[test]
fn only_active_blocks_move_rebuilt_model() -> candle_core::Result<()> {
    check_only_active_move(true)
}

#[test]
fn only_active_blocks_move_drop_in_model() -> candle_core::Result<()> {
    check_only_active_move(false)
}

/// A model that was not rebuilt after a resample gives the new active blocks no gradient:
/// the step fails naming the block, and writes nothing.
#[test]
fn stale_model_is_an_error_and_writes_nothing() -> candle_core::Result<()> {
    let n = 8;
    let varmap = toy_varmap(n, 4)?;
    let config = LisaConfig {
        gamma: 2,
        period: 2,
        seed: 1,
        ..Default::default()
    };
    let mut opt = LisaAdamW::new(&varmap, params(), config)?;
    let model = Toy::new(n, opt.var_builder())?;
    let batch = batch()?;
    let first = opt.active_blocks().to_vec();
    opt.backward_step(&model.loss(&batch)?)?;
    opt.backward_step(&model.loss(&batch)?)?;
    assert!(opt.resampled());
    let new_blocks: Vec<usize> = opt
        .active_blocks()
        .iter()
        .copied()
        .filter(|b| !first.contains(b))
        .collect();
    assert!(
        !new_blocks.is_empty(),
        "seed 1 must draw a new block at the first resample"
    );

    let before = snapshot(&varmap);
    let (state_before, steps_before) = (opt.state_bytes(), opt.step_count());
    let active_before = opt.active_blocks().to_vec();
    let m_before = opt
        .param_state("model.norm.weight")
        .unwrap()
        .m
        .to_vec1::<f32>()?;
    let grads = model.loss(&batch)?.backward()?;
    match opt.try_step(&grads) {
        Err(LisaError::NoGradient { block, first }) => {
            assert_eq!(block, new_blocks[0]);
            assert_eq!(first, format!("model.layers.{block}.mlp.down_proj.weight"));
        }
        other => panic!("expected NoGradient, got {other:?}"),
    }
    let msg = opt.step(&grads).unwrap_err().to_string();
    assert!(
        msg.contains("rebuild it from `LisaAdamW::var_builder()`"),
        "{msg}"
    );
    assert_eq!(snapshot(&varmap), before);
    assert_eq!(opt.state_bytes(), state_before);
    assert_eq!(opt.step_count(), steps_before);
    assert_eq!(opt.active_blocks(), active_before);
    assert_eq!(
        opt.param_state("model.norm.weight")
            .unwrap()
            .m
            .to_vec1::<f32>()?,
        m_before
    );

    // Rebuilding fixes it.
    let model = Toy::new(n, opt.var_builder())?;
    opt.backward_step(&model.loss(&batch)?)?;
    Ok(())
}

/// Frozen blocks get no gradient entry from a rebuilt model; a drop-in model stores one for
/// every weight.
#[test]
fn rebuilt_model_stores_gradients_only_for_trainable_parameters() -> candle_core::Result<()> {
    let n = 8;
    let varmap = toy_varmap(n, 5)?;
    let config = LisaConfig {
        gamma: 2,
        ..Default::default()
    };
    let opt = LisaAdamW::new(&varmap, params(), config)?;
    let batch = batch()?;
    // Block weights are (FFN, HIDDEN) and (HIDDEN, FFN); a stock dW for either, keyed by the
    // weight or its transpose, has one of these shapes.
    let weight_shaped = |grads: &candle_core::backprop::GradStore| {
        grads
            .get_ids()
            .filter_map(|id| grads.get_id(*id))
            .filter(|g| g.dims() == [FFN, HIDDEN] || g.dims() == [HIDDEN, FFN])
            .count()
    };

    let model = Toy::new(n, opt.var_builder())?;
    let grads = model.loss(&batch)?.backward()?;
    assert_eq!(weight_shaped(&grads), 2 * opt.gamma());
    for (name, var) in varmap.data().lock().unwrap().iter() {
        assert_eq!(
            grads.get(var.as_tensor()).is_some(),
            opt.is_trainable(name),
            "{name}: gradient present iff trainable"
        );
    }
    for (b, (up, down)) in model.blocks.iter().enumerate() {
        let active = opt.active_blocks().contains(&b);
        assert_eq!(grads.get(up.weight().unwrap()).is_some(), active);
        assert_eq!(grads.get(up.bias().unwrap()).is_some(), active);
        assert_eq!(grads.get(down.weight().unwrap()).is_some(), active);
    }
    let bias_shaped = grads
        .get_ids()
        .filter_map(|id| grads.get_id(*id))
        .filter(|g| g.dims() == [FFN])
        .count();
    assert_eq!(bias_shaped, opt.gamma());

    let drop_in = Toy::new(
        n,
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )?;
    let grads = drop_in.loss(&batch)?.backward()?;
    assert_eq!(weight_shaped(&grads), 2 * n);
    Ok(())
}

/// The embedding and head policy: a frozen embedding gets no gradient, takes no state and
/// does not move while the head does; a frozen head likewise; tied embeddings follow the
/// head's setting. (What the frozen embedding saves in the backward pass is measured by the
/// memory report's `lisa2-frozen-embed`.)
#[test]
fn embedding_and_head_policy() -> Result<(), Box<dyn std::error::Error>> {
    use candle_lisa::{Llama, LlamaConfig};
    let mut c = LlamaConfig::tiny(40, 16, 6, 4, 2);
    c.intermediate_size = 24;
    let ids = candle_core::Tensor::new(&[[1u32, 5, 9, 3, 7, 2, 8, 4]], &Device::Cpu)?;
    let labels = ids.to_dtype(DType::I64)?;
    // A seed whose first draw leaves block 0 frozen, so blocks lie below the active ones.
    let config = |seed: u64| LisaConfig {
        gamma: 2,
        period: 100,
        seed,
        ..Default::default()
    };
    let mut seed = 0;
    while LisaAdamW::new(&seeded_llama(&c, 4)?, params(), config(seed))?
        .active_blocks()
        .contains(&0)
    {
        seed += 1;
    }
    let run = |c: &LlamaConfig,
               train_embedding: bool,
               train_head: bool|
     -> Result<_, Box<dyn std::error::Error>> {
        let varmap = seeded_llama(c, 4)?;
        let config = LisaConfig {
            train_embedding,
            train_head,
            ..config(seed)
        };
        let mut opt = LisaAdamW::new(&varmap, params(), config)?;
        let model = Llama::new(c, opt.var_builder())?;
        let before = snapshot(&varmap);
        let grads = model.loss(&ids, &labels)?.backward()?;
        let embed_var = varmap.data().lock().unwrap()["model.embed_tokens.weight"].clone();
        let embed_grad = grads.get(embed_var.as_tensor()).is_some();
        opt.step(&grads)?;
        let after = snapshot(&varmap);
        let moved: BTreeSet<String> = before
            .iter()
            .filter(|(n, v)| after[*n] != **v)
            .map(|(n, _)| n.clone())
            .collect();
        Ok((opt, embed_grad, moved))
    };
    let (embed, head) = ("model.embed_tokens.weight", "lm_head.weight");
    let (opt, embed_grad, moved) = run(&c, true, true)?;
    assert!(embed_grad);
    assert!(moved.contains(embed) && moved.contains(head));
    assert!(!opt.active_blocks().contains(&0));
    let (opt, embed_grad, moved) = run(&c, false, true)?;
    assert!(!moved.contains(embed) && moved.contains(head), "{moved:?}");
    assert!(
        opt.trainable_vars().all(|(n, _)| n != embed),
        "a frozen embedding has no state"
    );
    assert!(!embed_grad, "a frozen embedding gets no gradient");
    let (_, _, moved) = run(&c, true, false)?;
    assert!(moved.contains(embed) && !moved.contains(head), "{moved:?}");

    // Tied: the embedding is the head.
    c.tie_word_embeddings = true;
    let (_, _, moved) = run(&c, false, true)?;
    assert!(
        moved.contains(embed),
        "a tied embedding trains with the head"
    );
    let (_, _, moved) = run(&c, true, false)?;
    assert!(
        !moved.contains(embed),
        "a tied embedding freezes with the head"
    );
    Ok(())
}
