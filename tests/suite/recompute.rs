//! Frozen-block recompute on the Llama: gradients, weights after LISA steps and the choice of
//! recomputed blocks match the plain path.

use crate::common::{clone_varmap, max_abs_diff};
use candle_core::{DType, Device, Tensor};
use candle_lisa::{LisaAdamW, LisaConfig, Llama, LlamaConfig, LoraConfig};
use candle_nn::{ParamsAdamW, VarBuilder, VarMap};

fn config(tied: bool) -> LlamaConfig {
    let mut c = LlamaConfig::tiny(23, 16, 6, 4, 2);
    c.intermediate_size = 40;
    c.tie_word_embeddings = tied;
    c
}

/// Fresh weights, norm weights moved off 1 so that their gradients are not special.
fn varmap(c: &LlamaConfig) -> candle_core::Result<VarMap> {
    let varmap = VarMap::new();
    Llama::new(
        c,
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )?;
    for (name, var) in varmap.data().lock().unwrap().iter() {
        if name.ends_with("norm.weight") {
            var.set(&(var.as_tensor() + Tensor::randn(0f32, 0.1, var.shape(), &Device::Cpu)?)?)?;
        }
    }
    Ok(varmap)
}

fn lisa(varmap: &VarMap, recompute_frozen: bool) -> candle_lisa::Result<LisaAdamW> {
    let params = ParamsAdamW {
        lr: 1e-2,
        ..Default::default()
    };
    let config = LisaConfig {
        gamma: 2,
        period: 2,
        seed: 5,
        recompute_frozen,
        ..Default::default()
    };
    LisaAdamW::new(varmap, params, config)
}

fn batch() -> candle_core::Result<(Tensor, Tensor)> {
    let ids = [[1u32, 5, 2, 7, 3, 9, 11, 22], [4, 4, 8, 1, 0, 15, 18, 3]];
    let labels = ids.map(|row| row.map(|t| (t as i64 + 1) % 23));
    Ok((
        Tensor::new(&ids, &Device::Cpu)?,
        Tensor::new(&labels, &Device::Cpu)?,
    ))
}

/// The blocks a model should recompute: every block `opt` does not train now.
fn frozen_blocks(opt: &LisaAdamW) -> Vec<usize> {
    (0..opt.num_blocks())
        .filter(|b| !opt.active_blocks().contains(b))
        .collect()
}

/// `|a - b| ≤ 1e-5 · max |b|`, elementwise maximum.
fn assert_close(a: &Tensor, b: &Tensor, what: &str) {
    let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    let scale = scale.to_scalar::<f32>().unwrap().max(f32::MIN_POSITIVE);
    let diff = max_abs_diff(a, b);
    assert!(
        diff <= 1e-5 * scale,
        "{what}: differs by {diff} at scale {scale}"
    );
}

#[test]
fn gradients_agree_with_recompute_on_and_off() -> Result<(), Box<dyn std::error::Error>> {
    for tied in [false, true] {
        let c = config(tied);
        let on_map = varmap(&c)?;
        let off_map = clone_varmap(&on_map)?;
        let (on, off) = (lisa(&on_map, true)?, lisa(&off_map, false)?);
        assert_eq!(on.active_blocks(), off.active_blocks());
        let (on_model, off_model) = (
            Llama::from_plan(&c, &on.plan())?,
            Llama::from_plan(&c, &off.plan())?,
        );
        assert_eq!(on_model.recomputed_blocks(), frozen_blocks(&on));
        assert_eq!(on_model.recomputed_blocks().len(), 4);
        assert!(off_model.recomputed_blocks().is_empty());

        let (ids, labels) = batch()?;
        let (on_loss, off_loss) = (
            on_model.loss(&ids, &labels)?,
            off_model.loss(&ids, &labels)?,
        );
        assert_eq!(on_loss.to_scalar::<f32>()?, off_loss.to_scalar::<f32>()?);
        let (on_grads, off_grads) = (on_loss.backward()?, off_loss.backward()?);
        let (on_vars, off_vars) = (
            on_map.data().lock().unwrap(),
            off_map.data().lock().unwrap(),
        );
        let mut compared = 0;
        for (name, var) in on_vars.iter() {
            let (a, b) = (
                on_grads.get(var.as_tensor()),
                off_grads.get(off_vars[name].as_tensor()),
            );
            if !on.is_trainable(name) {
                assert!(a.is_none() && b.is_none(), "{name} is frozen");
                continue;
            }
            let (a, b) = (a.expect("recompute: gradient"), b.expect("plain: gradient"));
            assert_close(a, b, &format!("tied {tied}: gradient of {name}"));
            compared += 1;
        }
        // Embedding, final norm, head (unless tied), and 2 blocks of 9 tensors each.
        assert_eq!(compared, if tied { 2 } else { 3 } + 2 * 9);
    }
    Ok(())
}

#[test]
fn weights_agree_after_lisa_steps_through_resamples() -> Result<(), Box<dyn std::error::Error>> {
    let c = config(false);
    let on_map = varmap(&c)?;
    let off_map = clone_varmap(&on_map)?;
    let (mut on, mut off) = (lisa(&on_map, true)?, lisa(&off_map, false)?);
    let (mut on_model, mut off_model) = (
        Llama::from_plan(&c, &on.plan())?,
        Llama::from_plan(&c, &off.plan())?,
    );
    let (ids, labels) = batch()?;
    let mut draws = vec![on.active_blocks().to_vec()];
    for step in 0..7 {
        on.try_step(&on_model.loss(&ids, &labels)?.backward()?)?;
        off.try_step(&off_model.loss(&ids, &labels)?.backward()?)?;
        assert_eq!(on.resampled(), off.resampled());
        if on.resampled() {
            on_model = Llama::from_plan(&c, &on.plan())?;
            off_model = Llama::from_plan(&c, &off.plan())?;
            draws.push(on.active_blocks().to_vec());
        }
        assert_eq!(
            on_model.recomputed_blocks(),
            frozen_blocks(&on),
            "step {step}"
        );
        let (a, b) = (
            on_map.data().lock().unwrap(),
            off_map.data().lock().unwrap(),
        );
        for (name, var) in a.iter() {
            assert_close(
                var.as_tensor(),
                b[name].as_tensor(),
                &format!("step {step}: {name}"),
            );
        }
    }
    assert_eq!(draws.len(), 4, "three resamples");
    assert!(
        draws.windows(2).any(|w| w[0] != w[1]),
        "the active set moved"
    );
    Ok(())
}

/// Blocks with anything trainable are never recomputed: a drop-in model (every weight a
/// variable) and a LoRA model (adapters) run as usual with recompute on.
#[test]
fn only_frozen_blocks_are_recomputed() -> Result<(), Box<dyn std::error::Error>> {
    let c = config(false);
    let map = varmap(&c)?;
    let opt = lisa(&map, true)?;
    let mut drop_in = Llama::new(&c, VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu))?;
    drop_in.set_recompute_frozen(opt.recompute_frozen());
    assert!(drop_in.recomputed_blocks().is_empty());

    let adapters = VarMap::new();
    let lora = LoraConfig {
        rank: 2,
        ..Default::default()
    };
    let mut with_lora = Llama::with_lora(
        &c,
        candle_lisa::nn::frozen_var_builder(&map)?,
        &lora,
        VarBuilder::from_varmap(&adapters, DType::F32, &Device::Cpu),
    )?;
    with_lora.set_recompute_frozen(true);
    assert!(with_lora.recomputed_blocks().is_empty());

    // The same frozen base without adapters: every block is recomputed.
    let mut frozen = Llama::new(&c, candle_lisa::nn::frozen_var_builder(&map)?)?;
    frozen.set_recompute_frozen(true);
    assert_eq!(frozen.recomputed_blocks(), [0, 1, 2, 3, 4, 5]);
    frozen.set_recompute_frozen(false);
    assert!(frozen.recomputed_blocks().is_empty());
    Ok(())
}
