//! The `VarBuilder` backend that [`LisaAdamW::var_builder`](crate::LisaAdamW::var_builder)
//! hands out: trainable parameters tracked, frozen ones detached, all over the same storage.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

/// A snapshot of the parameters as they should be seen by a model built now.
///
/// Invariant: every tensor shares its storage with the optimizer's `Var` of the same name, so
/// updates written by the optimizer (`Var::set` writes in place) are seen by the model without
/// a copy; a trainable name maps to the `Var`'s own tensor (same id, so its gradient lands in
/// the `GradStore` under the `Var`), a frozen one to a `detach()`ed view.
pub(crate) struct LisaBackend {
    pub tensors: HashMap<String, Tensor>,
}

impl LisaBackend {
    /// A `VarBuilder` over `tensors`, in the dtype and on the device of `first` (f32 on the CPU
    /// when there is none).
    pub fn into_builder(self, first: Option<&candle_core::Var>) -> candle_nn::VarBuilder<'static> {
        let (dtype, device) = first.map_or((DType::F32, Device::Cpu), |v| {
            (v.dtype(), v.device().clone())
        });
        candle_nn::VarBuilder::from_backend(Box::new(self), dtype, device)
    }

    fn lookup(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let t = self.tensors.get(name).ok_or_else(|| {
            candle_core::Error::msg(format!(
                "the LisaAdamW VarBuilder has no parameter named {name:?}: it only hands out the \
                 parameters the optimizer was built over, so create the model once from a \
                 VarBuilder over the VarMap before building the optimizer"
            ))
        })?;
        let same_device = t.device().same_device(dev);
        if t.is_variable() && (t.dtype() != dtype || !same_device) {
            // A conversion copies: the model would train a snapshot the optimizer never sees.
            return Err(crate::error::LisaError::TrainableConversion {
                name: name.to_string(),
                dtype: t.dtype(),
                wanted_dtype: dtype,
                device: format!("{:?}", t.device().location()),
                wanted_device: format!("{:?}", dev.location()),
            }
            .into());
        }
        let t = if t.dtype() == dtype {
            t.clone()
        } else {
            t.to_dtype(dtype)?
        };
        if same_device {
            Ok(t)
        } else {
            t.to_device(dev)
        }
    }
}

impl SimpleBackend for LisaBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let t = self.lookup(name, dtype, dev)?;
        if t.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("the model asked for {name} with a shape that differs from the optimizer's parameter"),
                expected: s,
                got: t.shape().clone(),
            }
            .bt());
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.lookup(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// A `VarBuilder` that hands out every variable of `varmap` detached: a frozen model (for a
/// LoRA base, or evaluation) that stores no gradient. The dtype and device are those of the
/// first variable by name (f32 on the CPU for an empty map).
pub fn frozen_var_builder(
    varmap: &candle_nn::VarMap,
) -> candle_core::Result<candle_nn::VarBuilder<'static>> {
    let mut vars = named_vars(varmap)?;
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let tensors = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
        .collect();
    Ok(LisaBackend { tensors }.into_builder(vars.first().map(|(_, v)| v)))
}

/// Every variable of `varmap` with its name, in no particular order: the input of
/// [`LisaAdamW::from_named_vars`](crate::LisaAdamW::from_named_vars) and
/// [`LisaAdamW::all_trainable`](crate::LisaAdamW::all_trainable).
pub fn named_vars(
    varmap: &candle_nn::VarMap,
) -> candle_core::Result<Vec<(String, candle_core::Var)>> {
    let data = varmap.data().lock().map_err(|_| {
        candle_core::Error::msg("the VarMap's lock is poisoned: a thread panicked while holding it")
    })?;
    Ok(data.iter().map(|(n, v)| (n.clone(), v.clone())).collect())
}
