//! OwLore's block weights: sample blocks in proportion to their share of outlier weights.

use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;

use super::block_map::BlockPattern;
use crate::error::{LisaError, Result};
use crate::nn::calibrate::LinearInputs;
use crate::nn::named_vars;

/// OWL's and OwLore's layerwise outlier ratio of every block, the weights to sample blocks by
/// with [`SamplerChoice::Weighted`](crate::optim::SamplerChoice::Weighted) (OwLore, arXiv
/// 2405.18380, after OWL, arXiv 2310.05175).
///
/// `inputs` comes from one calibration pass: the model's forward over a few batches inside
/// [`observe_linear_inputs`](crate::nn::calibrate::observe_linear_inputs). For every 2-D weight
/// `W` (out × in) of block `l` that a [`Linear`](crate::Linear) used there, each element gets
/// Wanda's score
///
/// `A_ij = |W_ij| · ‖X_j‖₂`,
///
/// where `‖X_j‖₂` is the L2 norm of input feature `j` over every calibration token. With `Ā_l`
/// the mean score over all of block `l`'s weights, the block's outlier ratio is
///
/// `D_l = #{(i, j) : A_ij > M · Ā_l} / #{(i, j)}`,
///
/// counted over the same weights, with `M = threshold`. OwLore samples block `l` with
/// probability `D_l / Σ_k D_k`; [`WeightedSampler`](crate::optim::WeightedSampler) normalises
/// the weights itself, so the ratios can be passed as they are. The papers choose `M` per
/// model (OWL reports 5 to 10 for LLaMA); a larger `M` counts only stronger outliers.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_lisa::nn::calibrate::observe_linear_inputs;
/// use candle_lisa::optim::{outlier_ratios, SamplerChoice};
/// use candle_lisa::{load_llama, Llama, LisaConfig, TrainingPlan};
/// use candle_lisa::nn::frozen_var_builder;
/// use candle_lisa::optim::LLAMA_BLOCK_PATTERN;
///
/// let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/tiny-llama");
/// let (config, varmap) = load_llama(dir, DType::F32, &Device::Cpu)?;
/// let plan = TrainingPlan::new(frozen_var_builder(&varmap)?, false);
/// let model = Llama::from_plan(&config, &plan)?;
/// let ids = Tensor::new(&[b"Hello, world! 12+34=46".map(u32::from)], &Device::Cpu)?;
/// let (_, inputs) = observe_linear_inputs(|| Ok(model.forward(&ids)?))?;
/// let ratios = outlier_ratios(&varmap, LLAMA_BLOCK_PATTERN, &inputs, 5.0)?;
/// assert_eq!(ratios.len(), config.num_hidden_layers);
/// let lisa = LisaConfig { sampler: SamplerChoice::Weighted(ratios), ..Default::default() };
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`LisaError::InvalidHyperparameter`] for a `threshold` that is not finite and positive;
/// [`LisaError::InvalidArgument`] when a block has no weight the calibration pass used, or when
/// no weight of any block exceeds `threshold` times its block's mean (lower it then).
pub fn outlier_ratios(
    varmap: &VarMap,
    block_pattern: &str,
    inputs: &LinearInputs,
    threshold: f64,
) -> Result<Vec<f64>> {
    if !(threshold.is_finite() && threshold > 0.0) {
        return Err(LisaError::InvalidHyperparameter {
            name: "threshold",
            value: threshold,
            expected: "finite and greater than 0",
        });
    }
    let pattern = BlockPattern::parse(block_pattern)?;
    // Each block's weights and their scores.
    let mut blocks: Vec<Vec<Tensor>> = Vec::new();
    for (name, var) in named_vars(varmap)? {
        let Some(b) = pattern.block_index(&name) else {
            continue;
        };
        if blocks.len() <= b {
            blocks.resize(b + 1, Vec::new());
        }
        if let Some(sq) = inputs.squared_norms(var.as_tensor()) {
            blocks[b].push(scores(&var, sq)?);
        }
    }
    let mut ratios = Vec::with_capacity(blocks.len());
    for (b, scores) in blocks.iter().enumerate() {
        if scores.is_empty() {
            return Err(LisaError::InvalidArgument {
                what: "calibration pass",
                reason: format!(
                    "no weight of block {b} was used in it; run the model's forward inside \
                     observe_linear_inputs, with every block in it"
                ),
            });
        }
        let (mut sum, mut count) = (0f64, 0usize);
        for a in scores {
            sum += a.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            count += a.elem_count();
        }
        let cut = threshold * sum / count as f64;
        let mut outliers = 0f64;
        for a in scores {
            let above = a.gt(cut)?.to_dtype(DType::F64)?.sum_all()?;
            outliers += above.to_scalar::<f64>()?;
        }
        ratios.push(outliers / count as f64);
    }
    if ratios.iter().all(|&r| r == 0.0) {
        return Err(LisaError::InvalidArgument {
            what: "threshold",
            reason: format!(
                "no weight scores above {threshold} times its block's mean; lower the threshold"
            ),
        });
    }
    Ok(ratios)
}

/// `|W_ij| · ‖X_j‖₂` for a weight `(out, in)` and its inputs' `Σ x_j²` `(in,)`, in f32.
fn scores(var: &Var, squared_norms: &Tensor) -> Result<Tensor> {
    let w = var.as_tensor().detach().to_dtype(DType::F32)?;
    let norms = squared_norms.sqrt()?;
    Ok(w.abs()?.broadcast_mul(&norms.unsqueeze(0)?)?)
}
