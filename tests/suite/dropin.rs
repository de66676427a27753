//! Drop-in use with models written the usual candle way: differentiable replacements for
//! candle_nn's fast layers, checked against candle's differentiable slow forms, and an error
//! that names the real cause when gradient flow is cut.

use candle_core::{DType, Device, Module, Tensor, Var, D};
use candle_lisa::nn::ops;
use candle_lisa::optim::GPT2_BLOCK_PATTERN;
use candle_lisa::{linear, LisaAdamW, LisaConfig, LisaError};
use candle_nn::{embedding, Embedding, Optimizer, ParamsAdamW, VarBuilder, VarMap};

use crate::common::max_abs_diff;

/// Values and the gradients of every input agree with candle's differentiable form.
fn agree(
    mine: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    reference: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    inputs: &[Var],
    what: &str,
) -> candle_core::Result<()> {
    let t: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
    let (a, b) = (mine(&t)?, reference(&t)?);
    assert!(max_abs_diff(&a, &b) < 1e-5, "{what}: values differ");
    // A loss that weighs every output differently.
    let weights = Tensor::randn(0f32, 1., a.shape(), &Device::Cpu)?;
    let (ga, gb) = (
        (&a * &weights)?.sum_all()?.backward()?,
        (&b * &weights)?.sum_all()?.backward()?,
    );
    for (i, v) in inputs.iter().enumerate() {
        let (x, y) = (ga.get(v.as_tensor()), gb.get(v.as_tensor()));
        let (x, y) = (x.expect("a gradient"), y.expect("a reference gradient"));
        assert!(max_abs_diff(x, y) < 1e-4, "{what}: gradient {i} differs");
    }
    Ok(())
}

#[test]
fn replacements_match_candles_differentiable_forms() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let x = Var::randn(0f32, 1., (2, 5, 8), &dev)?;
    let w = Var::randn(1f32, 0.1, 8, &dev)?;
    let b = Var::randn(0f32, 0.1, 8, &dev)?;
    let vars = [x.clone(), w.clone(), b.clone()];
    agree(
        |t| ops::layer_norm(&t[0], &t[1], Some(&t[2]), 1e-5),
        |t| candle_nn::ops::layer_norm_slow(&t[0], &t[1], &t[2], 1e-5),
        &vars,
        "layer_norm",
    )?;
    agree(
        |t| ops::layer_norm(&t[0], &t[1], None, 1e-5),
        |t| {
            let zeros = t[1].zeros_like()?;
            candle_nn::ops::layer_norm_slow(&t[0], &t[1], &zeros, 1e-5)
        },
        &vars[..2],
        "layer_norm without bias",
    )?;
    agree(
        |t| ops::softmax_last_dim(&t[0]),
        |t| candle_nn::ops::softmax(&t[0], D::Minus1),
        &vars[..1],
        "softmax_last_dim",
    )?;
    let q = Var::randn(0f32, 1., (1, 2, 5, 8), &dev)?;
    let cos = Tensor::randn(0f32, 1., (5, 4), &dev)?;
    let sin = Tensor::randn(0f32, 1., (5, 4), &dev)?;
    agree(
        |t| ops::rope_i(&t[0], &cos, &sin),
        |t| candle_nn::rotary_emb::rope_i_slow(&t[0], &cos, &sin),
        std::slice::from_ref(&q),
        "rope_i",
    )?;
    // The layers: same values as candle_nn's, gradients where candle_nn's give none.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let mine = candle_lisa::layer_norm(8, 1e-5, vb.pp("ln"))?;
    let theirs = candle_nn::layer_norm(8, 1e-5, vb.pp("ln"))?;
    let (a, c) = (mine.forward(x.as_tensor())?, theirs.forward(x.as_tensor())?);
    assert!(max_abs_diff(&a, &c) < 1e-5);
    assert!(a.sum_all()?.backward()?.get(x.as_tensor()).is_some());
    assert!(c.sum_all()?.backward()?.get(x.as_tensor()).is_none());
    let rms = candle_lisa::rms_norm(8, 1e-5, vb.pp("rms"))?;
    let theirs = candle_nn::rms_norm(8, 1e-5, vb.pp("rms"))?;
    let (a, c) = (rms.forward(x.as_tensor())?, theirs.forward(x.as_tensor())?);
    assert!(max_abs_diff(&a, &c) < 1e-5);
    assert!(a.sum_all()?.backward()?.get(x.as_tensor()).is_some());
    // A frozen weight stores no gradient.
    let frozen = candle_lisa::LayerNorm::new(w.as_tensor().detach(), b.as_tensor().detach(), 1e-5);
    let grads = frozen.forward(x.as_tensor())?.sum_all()?.backward()?;
    let sized_8 = grads
        .get_ids()
        .filter_map(|id| grads.get_id(*id))
        .filter(|g| g.dims() == [8])
        .count();
    assert_eq!(sized_8, 0);
    Ok(())
}

/// A GPT-2-style model written the usual way: embedding, blocks of `transformer.h.{i}.` with a
/// norm and a projection, a final norm `ln_f`, a head. `fast_norms` picks candle_nn's norms
/// (no backward): then `ln_f` cuts every block off the loss.
struct Gpt2Like {
    wte: Embedding,
    blocks: Vec<(Box<dyn Module>, candle_lisa::Linear)>,
    ln_f: Box<dyn Module>,
    head: candle_lisa::Linear,
}

impl Gpt2Like {
    fn new(vb: VarBuilder, fast_norms: bool) -> candle_core::Result<Self> {
        let wte = embedding(16, 8, vb.pp("transformer.wte"))?;
        let blocks = (0..4)
            .map(|i| {
                let vb = vb.pp(format!("transformer.h.{i}"));
                let norm: Box<dyn Module> = match fast_norms {
                    true => Box::new(candle_nn::layer_norm(8, 1e-5, vb.pp("ln_1"))?),
                    false => Box::new(candle_lisa::layer_norm(8, 1e-5, vb.pp("ln_1"))?),
                };
                Ok((norm, linear(8, 8, vb.pp("mlp.c_fc"))?))
            })
            .collect::<candle_core::Result<_>>()?;
        let ln_f: Box<dyn Module> = match fast_norms {
            true => Box::new(candle_nn::layer_norm(8, 1e-5, vb.pp("transformer.ln_f"))?),
            false => Box::new(candle_lisa::layer_norm(8, 1e-5, vb.pp("transformer.ln_f"))?),
        };
        let head = candle_lisa::linear_no_bias(8, 16, vb.pp("lm_head"))?;
        Ok(Self {
            wte,
            blocks,
            ln_f,
            head,
        })
    }

    fn loss(&self, tokens: &Tensor) -> candle_core::Result<Tensor> {
        let t = tokens.dim(1)?;
        let mut x = self.wte.forward(&tokens.narrow(1, 0, t - 1)?)?;
        for (norm, fc) in &self.blocks {
            x = (&x + fc.forward(&norm.forward(&x)?)?.gelu()?)?;
        }
        let logits = self.head.forward(&self.ln_f.forward(&x)?)?.flatten_to(1)?;
        candle_nn::loss::cross_entropy(&logits, &tokens.narrow(1, 1, t - 1)?.flatten_all()?)
    }
}

fn gpt2_opt(varmap: &VarMap) -> candle_lisa::Result<LisaAdamW> {
    let config = LisaConfig {
        gamma: 2,
        period: 3,
        seed: 2,
        block_pattern: GPT2_BLOCK_PATTERN.into(),
        ..Default::default()
    };
    let params = ParamsAdamW {
        lr: 1e-2,
        weight_decay: 0.0,
        ..Default::default()
    };
    LisaAdamW::new(varmap, params, config)
}

/// With candle_nn's norms the first step fails with `GradientFlowCut`, naming the
/// replacements, and writes nothing; with the crate's norms the same model trains: every
/// active block's norm weights move and the loss falls. A model built before the last
/// resample is still told apart: `NoGradient`.
#[test]
fn cut_gradient_flow_is_named_and_the_replacements_train() -> Result<(), Box<dyn std::error::Error>>
{
    let dev = Device::Cpu;
    let tokens = Tensor::new(&[[1u32, 5, 2, 7, 3, 9, 4, 4, 8, 1]], &dev)?;
    let varmap = VarMap::new();
    Gpt2Like::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev), false)?;

    let mut opt = gpt2_opt(&varmap)?;
    let fast = Gpt2Like::new(opt.var_builder(), true)?;
    let err = opt.try_step(&fast.loss(&tokens)?.backward()?).unwrap_err();
    println!("{err}");
    assert!(matches!(err, LisaError::GradientFlowCut { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("candle_nn::LayerNorm") && text.contains("candle_lisa::"),
        "{text}"
    );
    assert_eq!(opt.step_count(), 0);

    let mut model = Gpt2Like::new(opt.var_builder(), false)?;
    let first = model.loss(&tokens)?.to_scalar::<f32>()?;
    let norm_of = |b: usize| {
        varmap.data().lock().unwrap()[&format!("transformer.h.{b}.ln_1.weight")]
            .as_tensor()
            .copy()
    };
    for _ in 0..3 {
        let active = opt.active_blocks().to_vec();
        let before: Vec<Tensor> = active
            .iter()
            .map(|&b| norm_of(b))
            .collect::<candle_core::Result<_>>()?;
        opt.backward_step(&model.loss(&tokens)?)?;
        for (b, w) in active.iter().zip(before) {
            assert!(
                max_abs_diff(&w, &norm_of(*b)?) > 0.0,
                "block {b}'s norm did not move"
            );
        }
        if opt.resampled() {
            model = Gpt2Like::new(opt.var_builder(), false)?;
        }
    }
    let stale = Gpt2Like::new(opt.var_builder(), false)?;
    for _ in 0..9 {
        opt.backward_step(&model.loss(&tokens)?)?;
        if opt.resampled() {
            model = Gpt2Like::new(opt.var_builder(), false)?;
        }
    }
    assert!(model.loss(&tokens)?.to_scalar::<f32>()? < first);
    // `stale` predates three resamples: if its blocks differ from the active ones, it is told
    // apart from a cut flow.
    match opt.try_step(&stale.loss(&tokens)?.backward()?) {
        Err(e) => {
            println!("{e}");
            assert!(matches!(e, LisaError::NoGradient { .. }), "{e}");
            assert!(e.to_string().contains("built before the last resample"));
        }
        Ok(()) => panic!("a stale model's gradients were accepted"),
    }
    Ok(())
}
