//! Finding blocks in parameter names.
use candle_core::{DType, Device, Tensor, Var};
use candle_lisa::optim::{BlockMap, BlockPattern, ParamRole, GPT2_BLOCK_PATTERN};
use candle_lisa::{LisaAdamW, LisaConfig};
use candle_nn::{ParamsAdamW, VarMap};

fn gpt2_names(n: usize) -> Vec<String> {
    let mut names = vec![
        "transformer.wte.weight".to_string(),
        "transformer.wpe.weight".to_string(),
        "transformer.ln_f.weight".to_string(),
        "transformer.ln_f.bias".to_string(),
    ];
    for i in 0..n {
        for p in [
            "ln_1.weight",
            "attn.c_attn.weight",
            "attn.c_proj.weight",
            "mlp.c_fc.weight",
            "mlp.c_proj.weight",
        ] {
            names.push(format!("transformer.h.{i}.{p}"));
        }
    }
    names
}

#[test]
fn gpt2_names_with_two_digit_indices() -> candle_lisa::Result<()> {
    let config = LisaConfig {
        block_pattern: GPT2_BLOCK_PATTERN.into(),
        ..Default::default()
    };
    let map = BlockMap::new(gpt2_names(12), &config)?;
    assert_eq!(map.num_blocks(), 12);
    assert_eq!(map.len(), 4 + 12 * 5);
    // "transformer.h.1." must not swallow blocks 10 and 11.
    assert_eq!(map.block_params(1).count(), 5);
    assert!(map
        .block_params(1)
        .all(|n| n.starts_with("transformer.h.1.")));
    assert_eq!(
        map.group("transformer.h.11.mlp.c_fc.weight"),
        Some(ParamRole::Block(11))
    );
    assert_eq!(map.group("transformer.wte.weight"), Some(ParamRole::Always));
    assert_eq!(map.group("transformer.ln_f.bias"), Some(ParamRole::Always));
    assert_eq!(map.group("nope"), None);
    Ok(())
}

#[test]
fn map_is_sorted_and_independent_of_input_order() -> candle_lisa::Result<()> {
    let config = LisaConfig {
        block_pattern: GPT2_BLOCK_PATTERN.into(),
        ..Default::default()
    };
    let mut names = gpt2_names(3);
    let a = BlockMap::new(names.clone(), &config)?;
    names.reverse();
    let b = BlockMap::new(names, &config)?;
    let (a, b): (Vec<_>, Vec<_>) = (a.iter().collect(), b.iter().collect());
    assert_eq!(a, b);
    assert!(a.windows(2).all(|w| w[0].0 < w[1].0));
    Ok(())
}

#[test]
fn pattern_matching_rules() -> candle_lisa::Result<()> {
    let p = BlockPattern::parse("model.layers.{i}.")?;
    assert_eq!(
        p.block_index("model.layers.0.self_attn.q_proj.weight"),
        Some(0)
    );
    assert_eq!(
        p.block_index("model.layers.27.mlp.up_proj.weight"),
        Some(27)
    );
    assert_eq!(p.block_index("model.layers.x.mlp"), None);
    assert_eq!(p.block_index("model.layers.3"), None);
    assert_eq!(p.block_index("other.model.layers.3.w"), None);
    let suffix = BlockPattern::parse("blocks.{i}_")?;
    assert_eq!(suffix.block_index("blocks.4_w"), Some(4));
    assert_eq!(suffix.block_index("blocks.4.w"), None);
    Ok(())
}

#[test]
fn always_and_never_lists() -> candle_lisa::Result<()> {
    let config = LisaConfig {
        block_pattern: GPT2_BLOCK_PATTERN.into(),
        always_trainable: vec!["transformer.h.0.ln_1".into()],
        never_trainable: vec!["transformer.wpe.".into()],
        ..Default::default()
    };
    let map = BlockMap::new(gpt2_names(2), &config)?;
    assert_eq!(
        map.group("transformer.h.0.ln_1.weight"),
        Some(ParamRole::Always)
    );
    assert_eq!(
        map.group("transformer.h.0.attn.c_attn.weight"),
        Some(ParamRole::Block(0))
    );
    assert_eq!(map.group("transformer.wpe.weight"), Some(ParamRole::Never));
    assert_eq!(map.block_params(0).count(), 4);
    Ok(())
}

/// Integer parameters are skipped by the optimizer but still handed out by its builder;
/// never-trainable ones are handed out detached and hold no state.
#[test]
fn optimizer_skips_integers_and_never_trainable() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().unwrap();
        for name in [
            "model.embed_tokens.weight",
            "model.rotary.inv_freq",
            "model.layers.0.w",
            "model.layers.1.w",
        ] {
            data.insert(name.into(), Var::ones(4, DType::F32, &dev)?);
        }
        data.insert(
            "model.position_ids".into(),
            Var::from_tensor(&Tensor::new(&[0u32, 1, 2], &dev)?)?,
        );
    }
    let config = LisaConfig {
        gamma: 1,
        never_trainable: vec!["model.rotary.".into()],
        ..Default::default()
    };
    let opt = LisaAdamW::new(&varmap, ParamsAdamW::default(), config)?;
    assert_eq!(opt.block_map().len(), 4);
    assert_eq!(opt.block_map().group("model.position_ids"), None);
    assert!(!opt.is_trainable("model.rotary.inv_freq"));
    assert!(opt.param_state("model.rotary.inv_freq").is_none());
    // Embedding + one block, f32, m and v.
    assert_eq!(opt.state_bytes(), 2 * 2 * 4 * 4);
    let vb = opt.var_builder();
    assert_eq!(
        vb.get_unchecked_dtype("model.position_ids", DType::U32)?
            .to_vec1::<u32>()?,
        [0, 1, 2]
    );
    assert!(!vb.get(4, "model.rotary.inv_freq")?.track_op());
    assert!(vb.get(4, "model.embed_tokens.weight")?.is_variable());
    Ok(())
}

/// A huge block index is a gap, found without a table of that many entries (before, it
/// allocated one, or overflowed at `usize::MAX`).
#[test]
fn huge_block_indices_are_a_gap_without_allocating() {
    let config = LisaConfig::default();
    for (index, max) in [
        ("1000000000000", 1_000_000_000_000usize),
        ("18446744073709551615", usize::MAX),
    ] {
        let names = [
            "lm_head.weight".to_string(),
            "model.layers.0.w".to_string(),
            format!("model.layers.{index}.x"),
        ];
        match BlockMap::new(&names, &config) {
            Err(candle_lisa::LisaError::BlockGap { missing, max: m }) => {
                assert_eq!((missing, m), (1, max))
            }
            other => panic!("{index}: {other:?}"),
        }
    }
}
