//! The LoRA baseline: starts at the base model, trains only adapters, merges exactly.
use candle_core::{DType, Device, Tensor};
use candle_lisa::nn::{frozen_var_builder, merge_lora};
use candle_lisa::{LisaAdamW, Llama, LlamaConfig, LoraConfig};
use candle_nn::{Optimizer, ParamsAdamW, VarBuilder, VarMap};

fn setup() -> candle_core::Result<(LlamaConfig, VarMap)> {
    let mut c = LlamaConfig::tiny(21, 16, 3, 4, 2);
    c.intermediate_size = 24;
    let base = VarMap::new();
    Llama::new(&c, VarBuilder::from_varmap(&base, DType::F32, &Device::Cpu))
        .map_err(candle_core::Error::from)?;
    Ok((c, base))
}

fn batch() -> candle_core::Result<(Tensor, Tensor)> {
    let ids = Tensor::new(
        &[[1u32, 5, 2, 7, 3, 9, 11], [4, 4, 8, 1, 0, 15, 18]],
        &Device::Cpu,
    )?;
    Ok((ids.clone(), ids.to_dtype(DType::I64)?))
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn lora_trains_adapters_only_and_merges_exactly() -> Result<(), Box<dyn std::error::Error>> {
    let (c, base) = setup()?;
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        ..Default::default()
    };
    let adapters = VarMap::new();
    let model = Llama::with_lora(
        &c,
        frozen_var_builder(&base)?,
        &lora,
        VarBuilder::from_varmap(&adapters, DType::F32, &Device::Cpu),
    )?;
    let plain = Llama::new(&c, frozen_var_builder(&base)?)?;
    let (ids, labels) = batch()?;

    // B starts at zero: the adapted model is the base model.
    assert_eq!(max_diff(&model.forward(&ids)?, &plain.forward(&ids)?), 0.0);
    {
        let data = adapters.data().lock().unwrap();
        assert_eq!(data.len(), 3 * 7 * 2);
        assert_eq!(
            data["model.layers.0.self_attn.k_proj.lora_A.weight"].dims(),
            [4, 16]
        );
        assert_eq!(
            data["model.layers.0.self_attn.k_proj.lora_B.weight"].dims(),
            [8, 4]
        );
        assert_eq!(
            data["model.layers.2.mlp.down_proj.lora_A.weight"].dims(),
            [4, 24]
        );
    }

    // Gradients only for adapters.
    let grads = model.loss(&ids, &labels)?.backward()?;
    for var in base.all_vars() {
        assert!(grads.get(var.as_tensor()).is_none());
    }
    let big = grads
        .get_ids()
        .filter_map(|id| grads.get_id(*id))
        .filter(|g| g.dims() == [24, 16] || g.dims() == [16, 24])
        .count();
    assert_eq!(big, 0, "no gradient shaped like an MLP base weight");

    let vars = candle_lisa::nn::named_vars(&adapters)?;
    let mut opt = LisaAdamW::all_trainable(
        vars,
        ParamsAdamW {
            lr: 1e-2,
            ..Default::default()
        },
    )?;
    let first = model.loss(&ids, &labels)?.to_scalar::<f32>()?;
    for _ in 0..15 {
        opt.backward_step(&model.loss(&ids, &labels)?)?;
    }
    let trained = model.forward(&ids)?;
    assert!(model.loss(&ids, &labels)?.to_scalar::<f32>()? < first - 0.1);

    let base_before: Vec<f32> = base.data().lock().unwrap()["model.norm.weight"]
        .as_tensor()
        .to_vec1()?;
    merge_lora(&base, &adapters, &lora)?;
    let merged = Llama::new(&c, frozen_var_builder(&base)?)?;
    let diff = max_diff(&merged.forward(&ids)?, &trained);
    assert!(diff < 1e-4, "merged model differs by {diff}");
    let base_after: Vec<f32> = base.data().lock().unwrap()["model.norm.weight"]
        .as_tensor()
        .to_vec1()?;
    assert_eq!(base_before, base_after, "norms have no adapter");
    Ok(())
}

#[test]
fn lora_targets_and_config_errors() -> Result<(), Box<dyn std::error::Error>> {
    let (c, base) = setup()?;
    let lora = LoraConfig {
        rank: 2,
        alpha: 4.0,
        targets: vec!["q_proj".into(), "v_proj".into()],
    };
    let adapters = VarMap::new();
    Llama::with_lora(
        &c,
        frozen_var_builder(&base)?,
        &lora,
        VarBuilder::from_varmap(&adapters, DType::F32, &Device::Cpu),
    )?;
    assert_eq!(adapters.data().lock().unwrap().len(), 3 * 2 * 2);
    for bad in [
        LoraConfig {
            rank: 0,
            ..Default::default()
        },
        LoraConfig {
            alpha: f64::NAN,
            ..Default::default()
        },
        LoraConfig {
            targets: vec!["qkv".into()],
            ..Default::default()
        },
    ] {
        let err = Llama::with_lora(
            &c,
            frozen_var_builder(&base)?,
            &bad,
            VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu),
        );
        assert!(
            matches!(err, Err(candle_lisa::LisaError::InvalidConfig(_))),
            "{bad:?}"
        );
    }
    Ok(())
}

/// A LoRA layer's output and gradients (one graph node on the CPU) against candle's autograd
/// through the plain formula `x · Wᵀ + s · (x · Aᵀ) · Bᵀ` in f64, for a 3-D input, with the
/// input, A and B each tracking gradients or not.
#[test]
fn lora_layer_matches_autograd_of_its_formula() -> Result<(), Box<dyn std::error::Error>> {
    use candle_core::Var;
    use candle_lisa::nn::LoraAdapter;
    let dev = Device::Cpu;
    let (rows, input, out, rank, s) = ((2, 5), 12, 9, 3, 0.7);
    for (x_tracks, a_tracks, b_tracks) in
        [(true, true, true), (false, true, true), (true, false, true)]
    {
        let var = |shape: &[usize], tracks: bool| -> candle_core::Result<Tensor> {
            let t = Tensor::randn(0f32, 1.0, shape, &dev)?;
            Ok(match tracks {
                true => Var::from_tensor(&t)?.as_tensor().clone(),
                false => t,
            })
        };
        let x = var(&[rows.0, rows.1, input], x_tracks)?;
        let w = var(&[out, input], false)?;
        let a = var(&[rank, input], a_tracks)?;
        let b = var(&[out, rank], b_tracks)?;
        let layer = candle_lisa::Linear::new(w.clone(), None).with_lora(LoraAdapter {
            a: a.clone(),
            b: b.clone(),
            scale: s,
        });
        let r = Tensor::randn(0f32, 1.0, (rows.0, rows.1, out), &dev)?;
        let y = candle_core::Module::forward(&layer, &x)?;
        let grads = (&y * &r)?.sum_all()?.backward()?;

        let f64v = |t: &Tensor| Var::from_tensor(&t.to_dtype(DType::F64).unwrap()).unwrap();
        let (x6, a6, b6) = (f64v(&x), f64v(&a), f64v(&b));
        let w6 = w.to_dtype(DType::F64)?;
        let x2 = x6.as_tensor().reshape((rows.0 * rows.1, input))?;
        let want = (x2.matmul(&w6.t()?)?
            + (x2
                .matmul(&a6.as_tensor().t()?)?
                .matmul(&b6.as_tensor().t()?)?
                * s)?)?
            .reshape((rows.0, rows.1, out))?;
        let want_grads = (&want * &r.to_dtype(DType::F64)?)?.sum_all()?.backward()?;
        let close = |got: &Tensor, want: &Tensor| -> f32 {
            max_diff(
                &got.to_dtype(DType::F32).unwrap(),
                &want.to_dtype(DType::F32).unwrap(),
            )
        };
        assert!(close(&y, &want) < 1e-5);
        for (t, t6, tracks, name) in [
            (&x, &x6, x_tracks, "x"),
            (&a, &a6, a_tracks, "A"),
            (&b, &b6, b_tracks, "B"),
        ] {
            match (grads.get(t), tracks) {
                (Some(g), true) => {
                    let d = close(g, want_grads.get(t6.as_tensor()).unwrap());
                    assert!(d < 1e-4, "d{name} differs by {d}");
                }
                (None, false) => {}
                (got, _) => panic!(
                    "d{name}: {:?} with tracking {tracks}",
                    got.map(|g| g.shape().clone())
                ),
            }
        }
    }
    Ok(())
}
