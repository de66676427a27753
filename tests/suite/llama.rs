//! The trainable Llama: every parameter gets a gradient, gradients match finite differences,
//! the differentiable ops match candle's fused ones, frozen blocks store no gradient.
use candle_core::{DType, Device, Tensor, Var, D};
use candle_lisa::models::llama::{Family, NormPlacement, QkNorm};
use candle_lisa::models::Sampling;
use candle_lisa::nn::loss::causal_lm_loss;
use candle_lisa::nn::ops;
use candle_lisa::{LisaAdamW, LisaConfig, LisaError, Llama, LlamaConfig, IGNORE_INDEX};
use candle_nn::{ParamsAdamW, VarBuilder, VarMap};
use serde_json::json;

fn config(tied: bool, heads: usize, kv_heads: usize) -> LlamaConfig {
    let mut c = LlamaConfig::tiny(19, 16, 3, heads, kv_heads);
    c.intermediate_size = 24;
    c.tie_word_embeddings = tied;
    c
}

/// The test config with `fields` set on top (as `config.json` would give them).
fn config_with(fields: serde_json::Value) -> LlamaConfig {
    let mut v = serde_json::to_value(config(false, 4, 2)).unwrap();
    v.as_object_mut()
        .unwrap()
        .extend(fields.as_object().unwrap().clone());
    serde_json::from_value::<LlamaConfig>(v).unwrap()
}

fn build(c: &LlamaConfig, dtype: DType) -> candle_core::Result<(VarMap, Llama)> {
    let varmap = VarMap::new();
    let model = Llama::new(c, VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu))?;
    // Norm weights start at 1; move them off so their gradients are not special.
    for (name, var) in varmap.data().lock().unwrap().iter() {
        if name.ends_with("norm.weight") {
            var.set(
                &(var.as_tensor()
                    + Tensor::randn(0f32, 0.1, var.shape(), &Device::Cpu)?.to_dtype(dtype)?)?,
            )?;
        }
    }
    Ok((varmap, model))
}

fn batch() -> candle_core::Result<(Tensor, Tensor)> {
    let ids = Tensor::new(
        &[[1u32, 5, 2, 7, 3, 9, 11], [4, 4, 8, 1, 0, 15, 18]],
        &Device::Cpu,
    )?;
    let mut labels = ids.to_dtype(DType::I64)?.to_vec2::<i64>()?;
    labels[1][1] = IGNORE_INDEX;
    labels[1][2] = IGNORE_INDEX;
    Ok((ids, Tensor::new(labels, &Device::Cpu)?))
}

#[test]
fn full_training_gives_every_parameter_a_gradient() -> Result<(), Box<dyn std::error::Error>> {
    for (tied, heads, kv) in [(false, 4, 4), (true, 4, 2), (false, 4, 1)] {
        let c = config(tied, heads, kv);
        let (varmap, model) = build(&c, DType::F32)?;
        let names: Vec<String> = c.tensor_shapes().into_iter().map(|(n, _)| n).collect();
        let data = varmap.data().lock().unwrap();
        let mut created: Vec<&String> = data.keys().collect();
        created.sort();
        assert_eq!(
            created,
            names.iter().collect::<Vec<_>>(),
            "names follow Hugging Face"
        );
        let (ids, labels) = batch()?;
        let grads = model.loss(&ids, &labels)?.backward()?;
        for name in &names {
            let g = grads
                .get(data[name].as_tensor())
                .unwrap_or_else(|| panic!("{name} got no gradient"));
            let norm = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
            assert!(
                norm > 0.0 && norm.is_finite(),
                "{name}: gradient norm {norm}"
            );
        }
    }
    Ok(())
}

/// Central finite differences in f64 on a sample of entries of every kind of parameter.
#[test]
fn gradients_match_finite_differences() -> Result<(), Box<dyn std::error::Error>> {
    let c = config(true, 4, 2);
    let (varmap, model) = build(&c, DType::F64)?;
    let (ids, labels) = batch()?;
    let loss = |m: &Llama| -> candle_core::Result<f64> {
        m.loss(&ids, &labels)
            .map_err(candle_core::Error::from)?
            .to_scalar::<f64>()
    };
    let grads = model.loss(&ids, &labels)?.backward()?;
    let h = 1e-5;
    let data = varmap.data().lock().unwrap();
    for name in [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.1.self_attn.v_proj.weight",
        "model.layers.2.self_attn.o_proj.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.2.post_attention_layernorm.weight",
        "model.layers.1.mlp.gate_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.norm.weight",
    ] {
        let var = &data[name];
        let g = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()?
            .to_vec1::<f64>()?;
        let n = var.elem_count();
        for k in [0, n / 3, n / 2, n - 1] {
            let original = var.as_tensor().flatten_all()?.to_vec1::<f64>()?;
            let mut bumped = original.clone();
            bumped[k] += h;
            var.set(&Tensor::from_vec(
                bumped.clone(),
                var.shape(),
                &Device::Cpu,
            )?)?;
            let up = loss(&model)?;
            bumped[k] -= 2.0 * h;
            var.set(&Tensor::from_vec(bumped, var.shape(), &Device::Cpu)?)?;
            let down = loss(&model)?;
            var.set(&Tensor::from_vec(original, var.shape(), &Device::Cpu)?)?;
            let numeric = (up - down) / (2.0 * h);
            let err = (numeric - g[k]).abs();
            assert!(
                err <= 1e-6 + 1e-4 * numeric.abs(),
                "{name}[{k}]: analytic {} numeric {numeric}",
                g[k]
            );
        }
    }
    Ok(())
}

/// The differentiable ops agree with candle's fused (backward-less) ones.
#[test]
fn differentiable_ops_match_candle_fused_ops() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1., (2, 3, 5, 8), &dev)?;
    let w = Tensor::randn(1f32, 0.1, 8, &dev)?;
    let fused = candle_nn::ops::rms_norm(&x, &w, 1e-5)?;
    let mine = ops::rms_norm(&x, &w, 1e-5)?;
    assert!((fused - mine)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-5);

    let cos = Tensor::randn(0f32, 1., (5, 4), &dev)?;
    let sin = Tensor::randn(0f32, 1., (5, 4), &dev)?;
    let fused = candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)?;
    let mine = ops::rope(&x, &cos, &sin)?;
    assert!((fused - mine)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-5);
    Ok(())
}

/// Constant operands get no gradient entry, and dx is the same as with candle's binary ops.
#[test]
fn constant_ops_store_no_gradient_for_the_constant() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let x = Var::randn(0f32, 1., (4, 6), &dev)?;
    let c = Tensor::randn(0f32, 1., 6, &dev)?;
    let probe = Tensor::randn(0f32, 1., (4, 6), &dev)?;
    for (mine, stock) in [
        (
            ops::mul_const(x.as_tensor(), &c)?,
            x.as_tensor().broadcast_mul(&c)?,
        ),
        (
            ops::add_const(x.as_tensor(), &c)?,
            x.as_tensor().broadcast_add(&c)?,
        ),
    ] {
        assert!((&mine - &stock)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-6);
        let g_mine = (mine * &probe)?.sum_all()?.backward()?;
        let g_stock = (stock * &probe)?.sum_all()?.backward()?;
        let dx = (g_mine.get(x.as_tensor()).unwrap() - g_stock.get(x.as_tensor()).unwrap())?;
        assert!(dx.abs()?.max_all()?.to_scalar::<f32>()? < 1e-6);
        // Stock: x, the constant's broadcast, and the product/sum nodes' leaves; mine: no entry
        // of the constant's broadcast shape beyond x's own.
        let shaped = |g: &candle_core::backprop::GradStore| {
            g.get_ids()
                .filter_map(|id| g.get_id(*id))
                .filter(|t| t.dims() == [4, 6])
                .count()
        };
        assert_eq!(shaped(&g_stock), shaped(&g_mine) + 1);
    }
    Ok(())
}

#[test]
fn loss_ignores_masked_labels_and_matches_cross_entropy() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let logits = Tensor::randn(0f32, 1., (2, 4, 7), &dev)?;
    let labels = Tensor::new(&[[0i64, 3, IGNORE_INDEX, 6], [1, IGNORE_INDEX, 2, 2]], &dev)?;
    let loss = causal_lm_loss(&logits, &labels)
        .map_err(candle_core::Error::from)?
        .to_scalar::<f32>()?;
    // Kept pairs (row, position of logits, target): (0,0,3) (0,2,6) (1,1,2) (1,2,2).
    let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1)?.to_vec3::<f32>()?;
    let expected = -(lsm[0][0][3] + lsm[0][2][6] + lsm[1][1][2] + lsm[1][2][2]) / 4.0;
    assert!((loss - expected).abs() < 1e-5, "{loss} vs {expected}");
    Ok(())
}

/// A label outside the vocabulary, or negative but not IGNORE_INDEX, is an error (it was
/// clamped to the last token and trained on).
#[test]
fn labels_outside_the_vocabulary_are_refused() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let logits = Tensor::randn(0f32, 1., (1, 4, 7), &dev)?;
    let hidden = Tensor::randn(0f32, 1., (1, 4, 5), &dev)?;
    let head = Tensor::randn(0f32, 1., (7, 5), &dev)?;
    for bad in [7i64, 100, -1, -5] {
        let labels = Tensor::new(&[[0i64, 3, bad, 6]], &dev)?;
        for result in [
            causal_lm_loss(&logits, &labels),
            candle_lisa::nn::loss::head_loss(&hidden, &head, &labels),
        ] {
            match result {
                Err(candle_lisa::LisaError::InvalidArgument {
                    what: "labels",
                    reason,
                }) => {
                    assert!(reason.contains(&format!("label {bad} ")), "{reason}")
                }
                other => panic!("label {bad}: expected InvalidArgument, got {other:?}"),
            }
        }
    }
    let labels = Tensor::new(&[[0i64, 3, IGNORE_INDEX, 6]], &dev)?;
    assert!(causal_lm_loss(&logits, &labels).is_ok());
    Ok(())
}

/// With LISA's builder, frozen blocks store no weight gradient, and only trainable parameters
/// have gradients.
#[test]
fn lisa_builder_stores_gradients_only_for_trainable_parameters(
) -> Result<(), Box<dyn std::error::Error>> {
    let c = config(false, 4, 2);
    let (varmap, _) = build(&c, DType::F32)?;
    let opt = LisaAdamW::new(
        &varmap,
        ParamsAdamW::default(),
        LisaConfig {
            gamma: 1,
            ..Default::default()
        },
    )?;
    let model = Llama::new(&c, opt.var_builder())?;
    let (ids, labels) = batch()?;
    let grads = model.loss(&ids, &labels)?.backward()?;
    let data = varmap.data().lock().unwrap();
    for (name, var) in data.iter() {
        assert_eq!(
            grads.get(var.as_tensor()).is_some(),
            opt.is_trainable(name),
            "{name}"
        );
    }
    // Nothing in the store is shaped like a frozen block's matrix (up to transposition), beyond
    // the trainable block's own seven.
    let block_shapes: Vec<Vec<usize>> = c
        .tensor_shapes()
        .into_iter()
        .filter(|(n, s)| n.starts_with("model.layers.0.") && s.len() == 2)
        .flat_map(|(_, s)| [s.clone(), s.into_iter().rev().collect()])
        .collect();
    let in_store = grads
        .get_ids()
        .filter_map(|id| grads.get_id(*id))
        .filter(|g| block_shapes.contains(&g.dims().to_vec()))
        .count();
    let trainable_block_tensors = opt
        .block_map()
        .block_params(opt.active_blocks()[0])
        .filter(|n| !n.ends_with("layernorm.weight"))
        .count();
    assert_eq!(trainable_block_tensors, 7);
    assert_eq!(in_store, trainable_block_tensors);
    Ok(())
}

#[test]
fn config_errors() {
    let mut c = config(false, 4, 2);
    c.hidden_act = "gelu".into();
    assert!(matches!(
        c.validate(),
        Err(candle_lisa::LisaError::UnsupportedConfig {
            field: "hidden_act",
            ..
        })
    ));
    let mut c = config(false, 4, 3);
    c.num_key_value_heads = Some(3);
    assert!(matches!(
        c.validate(),
        Err(candle_lisa::LisaError::InvalidConfig(_))
    ));
    use candle_lisa::LisaError::{InvalidConfig, UnsupportedConfig};
    // Every field that changes the math is computed or refused, in both config formats.
    let refused = [
        (
            json!({"rope_scaling": {"type": "dynamic", "factor": 2.0}}),
            "rope_type",
        ),
        (
            json!({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}),
            "rope_type",
        ),
        (
            json!({"rope_parameters": {"rope_theta": 1e4, "short_factor": [1.0]}}),
            "rope_parameters",
        ),
        (
            json!({"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.5}}),
            "partial_rotary_factor",
        ),
        (
            json!({"rope_parameters": {"full_attention": {"rope_theta": 1e4}, "sliding_attention": {"rope_theta": 1e4}}}),
            "rope_parameters",
        ),
        (
            json!({"layer_types": ["full_attention", "chunked_attention", "full_attention"]}),
            "layer_types",
        ),
        (json!({"pretraining_tp": 2}), "pretraining_tp"),
        (
            json!({"final_logit_softcapping": 30.0}),
            "final_logit_softcapping",
        ),
        (json!({"model_type": "gpt2"}), "model_type"),
    ];
    let with = config_with;
    for (fields, name) in refused {
        match with(fields.clone()).validate() {
            Err(UnsupportedConfig { field, .. }) if field == name => {}
            other => panic!("{fields}: expected UnsupportedConfig({name}), got {other:?}"),
        }
    }
    let invalid = [
        json!({"rope_theta": 1e4, "rope_parameters": {"rope_theta": 5e5}}),
        json!({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}),
        json!({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}),
        json!({"rope_parameters": {"rope_theta": -1.0}}),
        json!({"layer_types": ["full_attention"]}),
    ];
    for fields in invalid {
        assert!(
            matches!(with(fields.clone()).validate(), Err(InvalidConfig(_))),
            "{fields}"
        );
    }
    // transformers 4 and 5 formats of one RoPE give the same model.
    let v4 = with(json!({"rope_theta": 5e5, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}));
    let v5 =
        with(json!({"rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0}}));
    assert_eq!(v4.rope().unwrap(), v5.rope().unwrap());
    assert_eq!(with(json!({})).rope().unwrap().theta, 10_000.0);
}

/// The lean ops (outputs computed without a graph, custom backward) give the values and the
/// gradients of the same math written with candle's differentiable ops.
/// The resolved architecture: the padding id read once (a value that is no token id is an
/// error, not ignored), and the Gemma settings from the family.
#[test]
fn architecture_resolves_the_config_once() -> Result<(), Box<dyn std::error::Error>> {
    let with = config_with;
    assert_eq!(
        with(json!({"pad_token_id": 3}))
            .architecture()?
            .pad_token_id,
        Some(3)
    );
    assert_eq!(
        with(json!({"pad_token_id": null}))
            .architecture()?
            .pad_token_id,
        None
    );
    assert!(matches!(
        with(json!({"pad_token_id": -1})).architecture(),
        Err(candle_lisa::LisaError::InvalidConfig(_))
    ));
    let gemma = with(json!({"model_type": "gemma2", "hidden_activation": "gelu_pytorch_tanh"}));
    let arch = gemma.architecture()?;
    assert_eq!(arch.family, Family::Gemma2);
    assert!(arch.norm_offset);
    assert_eq!(arch.norms, NormPlacement::Sandwich);
    assert_eq!(
        arch.embedding_scale,
        Some((gemma.hidden_size as f64).sqrt())
    );
    assert_eq!(
        (arch.attention_softcap, arch.final_softcap),
        (Some(50.0), Some(30.0))
    );
    let granite = with(
        json!({"model_type": "granite", "embedding_multiplier": 12.0,
        "residual_multiplier": 0.22, "attention_multiplier": 0.0078125, "logits_scaling": 8.0}),
    )
    .architecture()?;
    assert_eq!(granite.family, Family::Granite);
    assert_eq!(
        (
            granite.embedding_scale,
            granite.residual_scale,
            granite.logits_divisor
        ),
        (Some(12.0), Some(0.22), Some(8.0))
    );
    assert_eq!(granite.attention_scale, 0.0078125);
    // transformers' GraniteConfig defaults every multiplier to 1, the attention's too.
    let plain = with(json!({"model_type": "granite"})).architecture()?;
    assert_eq!(plain.attention_scale, 1.0);
    let olmo2 = with(json!({"model_type": "olmo2"})).architecture()?;
    assert_eq!(
        (olmo2.norms, olmo2.qk_norm),
        (NormPlacement::Post, Some(QkNorm::Full))
    );
    // SmolLM3 without a list: every fourth layer has no RoPE.
    let smol = with(json!({"model_type": "smollm3", "num_hidden_layers": 8}));
    let every_fourth = [true, true, true, false, true, true, true, false];
    assert_eq!(smol.layer_uses_rope()?, every_fourth);
    let listed = with(json!({"model_type": "smollm3", "no_rope_layers": [0, 1, 1]}));
    assert_eq!(listed.layer_uses_rope()?, [false, true, true]);
    // Other families rotate in every layer whatever the fields say.
    let llama = with(json!({"no_rope_layers": [0, 0, 0]}));
    assert_eq!(llama.layer_uses_rope()?, [true; 3]);
    for bad in [
        json!({"model_type": "smollm3", "no_rope_layers": [1, 1]}),
        json!({"model_type": "smollm3", "no_rope_layers": [1, 2, 1]}),
        json!({"model_type": "smollm3", "no_rope_layer_interval": 0}),
        json!({"model_type": "granite", "logits_scaling": 0.0}),
        json!({"model_type": "granite", "residual_multiplier": "x"}),
    ] {
        assert!(
            matches!(
                with(bad.clone()).validate(),
                Err(LisaError::InvalidConfig(_))
            ),
            "{bad}"
        );
    }
    Ok(())
}

/// transformers' Gemma 2 and Gemma 3 config classes default `tie_word_embeddings` to true;
/// a `config.json` without the key must load tied for them and untied for the others.
#[test]
fn missing_tie_word_embeddings_takes_the_family_default() -> Result<(), Box<dyn std::error::Error>>
{
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("config.json");
    let cases = [
        ("gemma2", None, true),
        ("gemma3_text", None, true),
        ("gemma2", Some(false), false),
        ("llama", None, false),
        ("qwen3", None, false),
        ("llama", Some(true), true),
        ("smollm3", None, true),
        ("olmo2", None, false),
        ("granite", None, false),
        ("phi3", None, false),
    ];
    for (family, tie, want) in cases {
        let mut v = serde_json::to_value(config(false, 4, 2))?;
        let obj = v.as_object_mut().unwrap();
        obj.remove("tie_word_embeddings");
        obj.remove("rms_norm_eps");
        obj.insert("model_type".into(), json!(family));
        if family == "gemma2" {
            obj.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
            obj.insert("hidden_act".into(), json!("gelu_pytorch_tanh"));
        }
        if let Some(t) = tie {
            obj.insert("tie_word_embeddings".into(), json!(t));
        }
        std::fs::write(&path, serde_json::to_string(&v)?)?;
        let c = LlamaConfig::from_file(&path)?;
        assert_eq!(c.tie_word_embeddings, want, "{family} with {tie:?}");
        // OLMo 2's and Phi-3's config classes default the norms' ε to 1e-5, the others 1e-6.
        let eps = if matches!(family, "olmo2" | "phi3") {
            1e-5
        } else {
            1e-6
        };
        assert_eq!(c.rms_norm_eps, eps, "{family}");
    }
    Ok(())
}

#[test]
fn lean_ops_match_reference_graphs() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let close = |a: &Tensor, b: &Tensor, what: &str| {
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        let diff = diff.to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{what}: differs by {diff}");
    };
    // dL/d(inputs) of sum(out ⊙ probe) for both versions.
    let grads = |out: &Tensor, probe: &Tensor, inputs: &[&Var]| {
        let g = (out * probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        inputs
            .iter()
            .map(|v| g.get(v.as_tensor()).expect("gradient").clone())
            .collect::<Vec<_>>()
    };
    let (b, h, kv, t, d) = (2, 6, 2, 5, 4);
    let q = Var::randn(0f32, 1., (b, h, t, d), &dev)?;
    let k = Var::randn(0f32, 1., (b, kv, t, d), &dev)?;
    let v = Var::randn(0f32, 1., (b, kv, t, d), &dev)?;
    let mask = ops::causal_mask(t, DType::F32, &dev)?;
    let lean = ops::causal_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask, 0.5)?;
    let repeat = |x: &Tensor| -> candle_core::Result<Tensor> {
        Tensor::cat(&vec![x; h / kv], 2)?.reshape((b, h, t, d))
    };
    let (kr, vr) = (repeat(k.as_tensor())?, repeat(v.as_tensor())?);
    let scores = (q.as_tensor().matmul(&kr.t()?)? * 0.5)?.broadcast_add(&mask)?;
    let reference = candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(&vr)?;
    close(&lean, &reference, "attention");
    let probe = Tensor::randn(0f32, 1., lean.shape(), &dev)?;
    let vars = [&q, &k, &v];
    for (a, r) in grads(&lean, &probe, &vars)
        .iter()
        .zip(grads(&reference, &probe, &vars))
    {
        close(a, &r, "attention gradient");
    }

    let x = Var::randn(0f32, 1., (3, 7, 8), &dev)?;
    let w = Var::randn(1f32, 0.1, 8, &dev)?;
    let lean = ops::rms_norm(x.as_tensor(), w.as_tensor(), 1e-5)?;
    let reference = candle_nn::ops::rms_norm_slow(x.as_tensor(), w.as_tensor(), 1e-5)?;
    close(&lean, &reference, "rms_norm");
    let probe = Tensor::randn(0f32, 1., lean.shape(), &dev)?;
    for (a, r) in grads(&lean, &probe, &[&x, &w])
        .iter()
        .zip(grads(&reference, &probe, &[&x, &w]))
    {
        close(a, &r, "rms_norm gradient");
    }

    let x = Var::randn(0f32, 1., (2, 3, 5, 8), &dev)?;
    let cos = Tensor::randn(0f32, 1., (5, 4), &dev)?;
    let sin = Tensor::randn(0f32, 1., (5, 4), &dev)?;
    let lean = ops::rope(x.as_tensor(), &cos, &sin)?;
    let reference = candle_nn::rotary_emb::rope_slow(x.as_tensor(), &cos, &sin)?;
    close(&lean, &reference, "rope");
    let probe = Tensor::randn(0f32, 1., lean.shape(), &dev)?;
    close(
        &grads(&lean, &probe, &[&x])[0],
        &grads(&reference, &probe, &[&x])[0],
        "rope gradient",
    );

    let gate = Var::randn(0f32, 2., (4, 6), &dev)?;
    let up = Var::randn(0f32, 1., (4, 6), &dev)?;
    let lean = ops::swiglu(gate.as_tensor(), up.as_tensor())?;
    let reference = (candle_nn::ops::silu(gate.as_tensor())? * up.as_tensor())?;
    close(&lean, &reference, "swiglu");
    let probe = Tensor::randn(0f32, 1., lean.shape(), &dev)?;
    for (a, r) in
        grads(&lean, &probe, &[&gate, &up])
            .iter()
            .zip(grads(&reference, &probe, &[&gate, &up]))
    {
        close(a, &r, "swiglu gradient");
    }
    Ok(())
}

/// `Llama::loss` (head and loss as one op, logits never kept) gives the value and the
/// gradients of `causal_lm_loss` on `forward`'s logits (to 1e-5 of the largest gradient entry).
#[test]
fn fused_head_loss_matches_loss_on_logits() -> Result<(), Box<dyn std::error::Error>> {
    for tied in [false, true] {
        let c = config(tied, 4, 2);
        let (varmap, model) = build(&c, DType::F32)?;
        let (ids, labels) = batch()?;
        let fused = model.loss(&ids, &labels)?;
        let plain = causal_lm_loss(&model.forward(&ids)?, &labels)?;
        let (a, b) = (fused.to_scalar::<f32>()?, plain.to_scalar::<f32>()?);
        assert!((a - b).abs() < 1e-6, "loss {a} vs {b}");
        let (g_fused, g_plain) = (fused.backward()?, plain.backward()?);
        for (name, var) in varmap.data().lock().unwrap().iter() {
            let (x, y) = (
                g_fused.get(var.as_tensor()).expect("fused gradient"),
                g_plain.get(var.as_tensor()).expect("plain gradient"),
            );
            let diff = (x - y)?.abs()?.max_all()?.to_scalar::<f32>()?;
            // On the CPU in f32 the fused loss has its own exp (within 3e-7 of f64's) and sums
            // in another order; with random weights the difference reached 5e-7 of the largest
            // entry over 20 runs.
            let scale = y.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
            assert!(
                diff < 1e-5 * scale,
                "tied {tied}: {name} differs by {diff} (largest entry {scale})"
            );
        }
        // A second backward pass over the same graph recomputes dL/dlogits; an upstream
        // gradient other than 1 scales it. Both round differently from the first pass (the
        // model's weights are random, so sums with cancellation vary from run to run): within
        // 1e-5 of the largest entry, about 2⁻¹⁷, the f32 rounding of a sum of hundreds of terms.
        let again = fused.backward()?;
        let tripled = (model.loss(&ids, &labels)? * 3.0)?.backward()?;
        for (name, var) in varmap.data().lock().unwrap().iter() {
            let first = g_fused.get(var.as_tensor()).expect("fused gradient");
            let second = again.get(var.as_tensor()).expect("second gradient");
            let scale = first.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
            let diff = (first - second)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                diff < 1e-5 * scale,
                "tied {tied}: {name}: second backward differs by {diff}"
            );
            let third = (tripled.get(var.as_tensor()).expect("scaled gradient") / 3.0)?;
            let diff = (first - third)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                diff < 1e-5 * scale,
                "tied {tied}: {name}: 3·loss differs by {diff}"
            );
        }
    }
    Ok(())
}

/// Generation with the KV cache gives the tokens of the plain loop that reruns the whole
/// sequence for each token, and stops at any of several end-of-sequence ids.
#[test]
fn cached_generation_matches_full_recomputation() -> Result<(), Box<dyn std::error::Error>> {
    for kind in ["llama", "qwen3", "gemma2"] {
        let mut c = config(true, 4, 2);
        c.model_type = Some(kind.into());
        if kind == "gemma2" {
            c.head_dim = Some(c.hidden_size / c.num_attention_heads);
            c.extra
                .insert("attn_logit_softcapping".into(), serde_json::json!(2.0));
        }
        let (vars, model) = build(&c, DType::F32)?;
        // Weights far from the initialisation's (seeded), so the greedy tokens vary.
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(3);
        let mut names: Vec<String> = vars.data().lock().unwrap().keys().cloned().collect();
        names.sort();
        for name in names {
            let var = vars.data().lock().unwrap()[&name].clone();
            let values: Vec<f32> = (0..var.elem_count())
                .map(|_| rand::Rng::random_range(&mut rng, -1.0f32..1.0))
                .collect();
            let noise = Tensor::from_vec(values, var.shape(), &Device::Cpu)?;
            match name.ends_with("norm.weight") {
                true => var.set(&(noise + 1.0)?)?,
                false => var.set(&noise)?,
            }
        }
        let prompt = [3u32, 17, 5, 9, 1];
        let mut reference = prompt.to_vec();
        for _ in 0..12 {
            let ids = Tensor::new(reference.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
            let logits = model.forward(&ids)?.squeeze(0)?;
            let next = logits
                .get(reference.len() - 1)?
                .argmax(0)?
                .to_scalar::<u32>()?;
            reference.push(next);
        }
        let want = &reference[prompt.len()..];
        let mut distinct = want.to_vec();
        distinct.sort();
        distinct.dedup();
        assert!(
            distinct.len() >= 3,
            "{kind}: a degenerate reference: {want:?}"
        );
        let got = model.generate(
            &prompt,
            &Sampling {
                max_new_tokens: 12,
                ..Default::default()
            },
        )?;
        assert_eq!(got, want, "{kind}");
        let stop = [want[6], want[3]];
        let first_stop = want.iter().position(|t| stop.contains(t)).unwrap();
        let got = model.generate(
            &prompt,
            &Sampling {
                max_new_tokens: 12,
                stop: stop.to_vec(),
                ..Default::default()
            },
        )?;
        assert_eq!(got, &want[..=first_stop]);
    }
    Ok(())
}
