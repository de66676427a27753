//! A toy decoder with Hugging Face names, shared by the integration tests.

use candle_core::{DType, Device, Module, Result, Tensor, Var};
use candle_lisa::{linear, linear_no_bias, Linear};
use candle_nn::{embedding, Embedding, VarBuilder, VarMap};

pub const VOCAB: usize = 16;
pub const HIDDEN: usize = 12;
pub const FFN: usize = 20;

/// Embedding, `n` residual MLP blocks (`up` with bias, `down` without), a final scale and an
/// untied LM head: `model.embed_tokens`, `model.layers.{i}.mlp.{up,down}_proj`, `model.norm`,
/// `lm_head`.
pub struct Toy {
    embed: Embedding,
    pub blocks: Vec<(Linear, Linear)>,
    norm: Tensor,
    head: Linear,
}

impl Toy {
    pub fn new(n: usize, vb: VarBuilder) -> Result<Self> {
        let embed = embedding(VOCAB, HIDDEN, vb.pp("model.embed_tokens"))?;
        let blocks = (0..n)
            .map(|i| {
                let vb = vb.pp(format!("model.layers.{i}.mlp"));
                Ok((
                    linear(HIDDEN, FFN, vb.pp("up_proj"))?,
                    linear_no_bias(FFN, HIDDEN, vb.pp("down_proj"))?,
                ))
            })
            .collect::<Result<_>>()?;
        let norm = vb.get_with_hints(HIDDEN, "model.norm.weight", candle_nn::Init::Const(1.0))?;
        let head = linear_no_bias(HIDDEN, VOCAB, vb.pp("lm_head"))?;
        Ok(Self {
            embed,
            blocks,
            norm,
            head,
        })
    }

    pub fn forward(&self, tokens: &Tensor) -> Result<Tensor> {
        let mut x = self.embed.forward(tokens)?;
        for (up, down) in &self.blocks {
            x = (&x + down.forward(&up.forward(&x)?.silu()?)?)?;
        }
        self.head.forward(&x.broadcast_mul(&self.norm)?)
    }

    pub fn loss(&self, batch: &Tensor) -> Result<Tensor> {
        let t = batch.dim(1)?;
        let logits = self.forward(&batch.narrow(1, 0, t - 1)?)?;
        let targets = batch.narrow(1, 1, t - 1)?;
        candle_nn::loss::cross_entropy(&logits.flatten_to(1)?, &targets.flatten_all()?)
    }
}

/// A VarMap holding a toy model with `n` blocks, initialised from `seed` (candle cannot seed
/// its CPU generator, so the values come from ChaCha8: uniform in ±1/√fan-in).
pub fn toy_varmap(n: usize, seed: u64) -> Result<VarMap> {
    use rand::{Rng, SeedableRng};
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    Toy::new(n, VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let data = varmap.data().lock().unwrap();
    let mut names: Vec<_> = data.keys().cloned().collect();
    names.sort();
    for name in names {
        let var = &data[&name];
        let bound = 1.0 / (*var.dims().last().unwrap() as f32).sqrt();
        let values: Vec<f32> = (0..var.elem_count())
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        var.set(&Tensor::from_vec(values, var.shape(), &dev)?)?;
    }
    drop(data);
    Ok(varmap)
}

/// A deep copy of `varmap` (new storage).
pub fn clone_varmap(varmap: &VarMap) -> Result<VarMap> {
    let copy = VarMap::new();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        copy.data()
            .lock()
            .unwrap()
            .insert(name.clone(), Var::from_tensor(&var.as_tensor().copy()?)?);
    }
    Ok(copy)
}

/// A fixed batch of 2 sequences of 6 tokens (10 prediction rows).
pub fn batch() -> Result<Tensor> {
    Tensor::new(&[[1u32, 5, 2, 7, 3, 9], [4, 4, 8, 1, 0, 15]], &Device::Cpu)
}

/// Every parameter's values, by name.
pub fn snapshot(varmap: &VarMap) -> std::collections::BTreeMap<String, Vec<f32>> {
    varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(n, v)| {
            (
                n.clone(),
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            )
        })
        .collect()
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// The block index of a toy parameter name, if any.
pub fn block_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// Seeded weights for a Llama of `config` (candle's own initialisation cannot be seeded): norm
/// weights at 1, everything else uniform in ±0.2, so most weights are at or above 2^-6.
pub fn seeded_llama(config: &candle_lisa::LlamaConfig, seed: u64) -> Result<VarMap> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let out = VarMap::new();
    for (name, shape) in config.tensor_shapes() {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = if name.contains("norm") {
            vec![1.0; n]
        } else {
            (0..n).map(|_| rng.random_range(-0.2f32..0.2)).collect()
        };
        let t = Tensor::from_vec(values, shape, &Device::Cpu)?;
        out.data()
            .lock()
            .unwrap()
            .insert(name, Var::from_tensor(&t)?);
    }
    Ok(out)
}

/// LISA with γ = 2 over `varmap`, redrawing every `period` steps from `seed`.
pub fn lisa_gamma2(
    varmap: &VarMap,
    params: candle_nn::ParamsAdamW,
    period: usize,
    seed: u64,
) -> candle_lisa::Result<candle_lisa::LisaAdamW> {
    let config = candle_lisa::LisaConfig {
        gamma: 2,
        period,
        seed,
        ..Default::default()
    };
    candle_lisa::LisaAdamW::new(varmap, params, config)
}

/// `log p(ids[:, t + 1] | ids[:, ..= t])` for every position but the last: the per-token
/// log-probabilities the transformers fixtures store, `(batch, seq − 1)`, from logits
/// `(batch, seq, vocab)`.
pub fn next_token_logprobs(logits: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let t = ids.dim(1)?;
    let logp = candle_nn::ops::log_softmax(logits, candle_core::D::Minus1)?;
    let next = ids.narrow(1, 1, t - 1)?.contiguous()?.unsqueeze(2)?;
    logp.narrow(1, 0, t - 1)?
        .contiguous()?
        .gather(&next, 2)?
        .squeeze(2)
}

/// Checks a model against a transformers fixture's `expected.json`: the per-token log-probs of
/// `logits` (within 1e-4), `loss` (1e-5 relative) and the gradient norm of every parameter in
/// `vars` (1e-3 relative; the names must be the fixture's), then prints the figures for
/// `cargo test … -- --nocapture`.
pub fn check_against_fixture(
    case: &str,
    expected: &serde_json::Value,
    ids: &Tensor,
    logits: &Tensor,
    loss: &Tensor,
    vars: &VarMap,
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let got = next_token_logprobs(logits, ids)?;
    let want: Vec<Vec<f32>> = serde_json::from_value(expected["logprobs"].clone())?;
    let worst = max_abs_diff(&got, &Tensor::new(want, ids.device())?);
    assert!(worst <= 1e-4, "{case}: log-probs differ by up to {worst}");

    let (got, want) = (
        loss.to_scalar::<f32>()? as f64,
        expected["loss"].as_f64().ok_or("loss")?,
    );
    let loss_diff = (got - want).abs() / want;
    assert!(
        loss_diff <= 1e-5,
        "{case}: loss {got} against transformers' {want}"
    );

    let grads = loss.backward()?;
    let norms = expected["grad_norms"].as_object().ok_or("grad_norms")?;
    let data = vars.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    let mut want_names: Vec<&String> = norms.keys().collect();
    names.sort();
    want_names.sort();
    assert_eq!(names, want_names, "{case}: parameter names");
    let mut grad_diff = 0f64;
    for (name, var) in data.iter() {
        let g = grads
            .get(var)
            .ok_or_else(|| format!("{case}: no gradient for {name}"))?;
        let got = g.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64;
        let want = norms[name].as_f64().ok_or("norm")?;
        let diff = (got - want).abs() / want;
        grad_diff = grad_diff.max(diff);
        assert!(
            diff <= 1e-3,
            "{case}: gradient norm of {name} is {got}, transformers' {want}"
        );
    }
    eprintln!(
        "{case}: log-probs within {worst:.1e}, loss within {loss_diff:.1e} relative, gradient norms within {grad_diff:.1e} relative"
    );
    Ok(())
}
