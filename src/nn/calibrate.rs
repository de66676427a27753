//! What each [`Linear`](super::Linear) reads during a calibration pass: for every input
//! feature j, `Σ x_j²` over all the rows (tokens) it saw, the squared `‖X_j‖₂` that outlier
//! scores such as Wanda's and OwLore's weigh each weight column by.

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::{DType, Result, Storage, Tensor};

thread_local! {
    /// `Some` inside [`observe_linear_inputs`]: the input statistics by weight storage.
    static OBSERVED: RefCell<Option<HashMap<usize, Tensor>>> = const { RefCell::new(None) };
}

/// Identifies a tensor's storage: the same for a variable and every detached view of it, as a
/// model holds its frozen weights (and what the fused update checks for aliasing).
pub(crate) fn storage_key(t: &Tensor) -> usize {
    let (storage, _) = t.storage_and_layout();
    &*storage as *const Storage as usize
}

/// Called by every [`Linear`](super::Linear) forward with its input `x` `(rows, in)` and
/// weight; records `Σ x²` per column while [`observe_linear_inputs`] runs, else does nothing.
pub(crate) fn record(x: &Tensor, weight: &Tensor) -> Result<()> {
    OBSERVED.with(|observed| {
        let mut observed = observed.borrow_mut();
        let Some(map) = observed.as_mut() else {
            return Ok(());
        };
        let sq = x.detach().to_dtype(DType::F32)?.sqr()?.sum(0)?;
        let key = storage_key(weight);
        let sum = match map.remove(&key) {
            Some(before) => (before + sq)?,
            None => sq,
        };
        map.insert(key, sum);
        Ok(())
    })
}

/// The inputs each linear weight saw in [`observe_linear_inputs`].
#[derive(Debug, Default)]
pub struct LinearInputs {
    sums: HashMap<usize, Tensor>,
}

impl LinearInputs {
    /// `Σ x_j²` over every row the layer with weight `weight` (a variable or a view of it)
    /// read, one f32 per input feature; `None` for a weight no [`Linear`](super::Linear) used.
    pub fn squared_norms(&self, weight: &Tensor) -> Option<&Tensor> {
        self.sums.get(&storage_key(weight))
    }

    /// How many weights were seen.
    pub fn len(&self) -> usize {
        self.sums.len()
    }

    /// Whether no [`Linear`](super::Linear) ran.
    pub fn is_empty(&self) -> bool {
        self.sums.is_empty()
    }
}

/// Runs `f` (forward passes over calibration batches) and returns what it returned with the
/// input statistics of every [`Linear`](super::Linear) that ran inside it, on this thread.
///
/// ```
/// use candle_core::{Device, Module, Tensor};
/// use candle_lisa::nn::calibrate::observe_linear_inputs;
/// use candle_lisa::Linear;
/// let dev = Device::Cpu;
/// let w = Tensor::new(&[[1f32, 0.], [0., 1.]], &dev)?;
/// let layer = Linear::new(w.clone(), None);
/// let x = Tensor::new(&[[1f32, 2.], [3., 4.]], &dev)?;
/// let (_, seen) = observe_linear_inputs(|| layer.forward(&x))?;
/// assert_eq!(seen.squared_norms(&w).unwrap().to_vec1::<f32>()?, [10., 20.]);
/// # Ok::<(), candle_core::Error>(())
/// ```
///
/// # Errors
/// Whatever `f` returns; the observation ends either way.
pub fn observe_linear_inputs<R>(f: impl FnOnce() -> Result<R>) -> Result<(R, LinearInputs)> {
    OBSERVED.with(|o| *o.borrow_mut() = Some(HashMap::new()));
    let result = f();
    let sums = OBSERVED.with(|o| o.borrow_mut().take()).unwrap_or_default();
    Ok((result?, LinearInputs { sums }))
}
