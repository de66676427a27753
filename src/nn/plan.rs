//! [`TrainingPlan`]: what a model needs to know to be built for training.

use candle_nn::VarBuilder;

/// Which parameters train and how frozen blocks run: what a model takes to be built for
/// training, whatever optimizer made the plan.
///
/// The builder hands out trainable parameters as tracked tensors and frozen ones as detached
/// views of the same storage, so a model built from it computes gradients only for what
/// trains; [`recompute_frozen`](Self::recompute_frozen) says whether blocks whose weights are
/// all frozen should keep their input only and run again in the backward pass (see
/// [`recompute`](crate::nn::recompute::recompute)). [`LisaAdamW::plan`](crate::LisaAdamW::plan)
/// makes one for its active set; a plan over a plain `VarMap` builder trains everything.
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_nn::{VarBuilder, VarMap};
/// use candle_lisa::{Llama, LlamaConfig, TrainingPlan};
///
/// let varmap = VarMap::new();
/// let plan = TrainingPlan::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), false);
/// let model = Llama::from_plan(&LlamaConfig::tiny(32, 16, 2, 2, 1), &plan)?;
/// assert!(model.recomputed_blocks().is_empty());
/// # Ok::<(), candle_lisa::LisaError>(())
/// ```
#[derive(Clone)]
pub struct TrainingPlan {
    vb: VarBuilder<'static>,
    recompute_frozen: bool,
}

impl TrainingPlan {
    /// A plan over `vb`, recomputing frozen blocks when `recompute_frozen` is true.
    pub fn new(vb: VarBuilder<'static>, recompute_frozen: bool) -> Self {
        Self {
            vb,
            recompute_frozen,
        }
    }

    /// The builder to take the parameters from (a cheap clone).
    pub fn var_builder(&self) -> VarBuilder<'static> {
        self.vb.clone()
    }

    /// Whether blocks with no trainable tensor should be recomputed in the backward pass.
    pub fn recompute_frozen(&self) -> bool {
        self.recompute_frozen
    }
}

impl std::fmt::Debug for TrainingPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainingPlan")
            .field("dtype", &self.vb.dtype())
            .field("device", self.vb.device())
            .field("recompute_frozen", &self.recompute_frozen)
            .finish()
    }
}
