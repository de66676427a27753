//! One measured training run of the memory report (shared by `memory_report` and `gpu_check`):
//! a few steps of a method on a shape, with the peak memory of the device it ran on.
#![allow(dead_code)]

use std::time::Instant;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use candle_lisa_testkit::alloc;
use candle_lisa_testkit::training::{batch, shape_config, Training, Variant, Weights};

type Error = Box<dyn std::error::Error>;

/// One measured method, as printed in the JSON lines.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Record {
    pub shape: String,
    pub method: String,
    #[serde(rename = "B")]
    pub batch_size: usize,
    #[serde(rename = "T")]
    pub seq_len: usize,
    /// Highest memory in use during the steps, weights included: the process heap on the CPU,
    /// the CUDA memory pool's high-water mark on a GPU (see [`Meter`]).
    pub peak_bytes: usize,
    /// Weights (and LoRA adapters).
    pub weight_bytes: usize,
    /// Gradients the backward pass stored, at their largest step.
    pub grad_bytes: usize,
    /// Optimizer state, at its largest step.
    pub state_bytes: usize,
    /// The rest of the peak: activations and temporaries.
    pub other_bytes: usize,
    pub trainable_params: usize,
    pub total_params: usize,
    /// Median of the steps after the first of each round.
    pub step_ms_median: f64,
    /// Every step, round after round.
    pub step_ms: Vec<f64>,
    #[serde(default = "one")]
    pub rounds: usize,
    pub resamples: usize,
    pub threads: usize,
    pub device: String,
    /// The dtype of weights, activations and gradients.
    #[serde(default = "f32_name")]
    pub dtype: String,
    /// How LISA drew its blocks.
    #[serde(default = "uniform_name")]
    pub sampler: String,
}

fn uniform_name() -> String {
    "uniform".into()
}

fn one() -> usize {
    1
}

fn f32_name() -> String {
    "f32".into()
}

/// What one measurement runs.
pub struct Setup<'a> {
    pub shape: &'a str,
    pub method: &'a str,
    pub batch_size: usize,
    pub seq_len: usize,
    pub steps: usize,
    pub dtype: DType,
    /// A LISA sampler name (`uniform`, `gradnorm`, …).
    pub sampler: &'a str,
}

/// Measures one method on `dev`. On the CPU the peak is the counting allocator's, so run one
/// method per process there (the parent's heap would count); on CUDA it is the memory pool's
/// high-water mark, reset at the start, so methods may run one after another in one process
/// once the previous one's tensors are dropped.
pub fn measure(s: &Setup, dev: &Device) -> Result<Record, Error> {
    let config = shape_config(s.shape)?;
    let method: Variant = s.method.parse()?;
    let (b, t) = (s.batch_size, s.seq_len);
    let meter = Meter::new(dev)?;
    let (ids, labels) = batch(&config, b, t, dev)?;
    let weights = Weights::new(config, method, dev, s.dtype)?;
    let total_params = weights.params();
    let weight_bytes = weights.bytes();

    // Everything from here on counts: the optimizer's state is allocated in the steps' peak.
    meter.reset()?;
    let sampler: candle_lisa::optim::SamplerChoice = s.sampler.parse()?;
    let mut training = Training::new(weights, method, &sampler)?;
    let (mut grads_max, mut state_max, mut trainable, mut resamples) = (0, 0, 0, 0);
    let mut step_ms = Vec::new();
    for _ in 0..s.steps {
        let start = Instant::now();
        trainable = trainable.max(training.trainable_params());
        let step = training.step(&ids, &labels)?;
        dev.synchronize()?;
        step_ms.push(start.elapsed().as_secs_f64() * 1e3);
        grads_max = grads_max.max(step.grad_bytes);
        state_max = state_max.max(training.state_bytes());
        resamples += usize::from(step.resampled);
    }
    let peak_bytes = meter.peak()?;
    let mut timed = step_ms[1.min(step_ms.len() - 1)..].to_vec();
    timed.sort_by(f64::total_cmp);
    Ok(Record {
        shape: s.shape.into(),
        method: s.method.into(),
        batch_size: b,
        seq_len: t,
        peak_bytes,
        weight_bytes,
        grad_bytes: grads_max,
        state_bytes: state_max,
        other_bytes: peak_bytes.saturating_sub(weight_bytes + grads_max + state_max),
        trainable_params: trainable,
        total_params,
        step_ms_median: timed[timed.len() / 2],
        step_ms,
        rounds: 1,
        resamples,
        threads: candle_core::utils::get_num_threads(),
        device: device_name(dev),
        dtype: format!("{:?}", s.dtype).to_lowercase(),
        sampler: s.sampler.into(),
    })
}

/// `cpu`, `cuda` or `metal`.
pub fn device_name(dev: &Device) -> String {
    match dev {
        Device::Cpu => "cpu",
        Device::Cuda(_) => "cuda",
        Device::Metal(_) => "metal",
    }
    .into()
}

/// Peak memory in use, from the device that holds it.
///
/// - CPU: the process heap, counted by the [`alloc::Counting`] global allocator (exact: every
///   allocation and free).
/// - CUDA: candle allocates device memory with `cuMemAllocAsync` from the device's memory pool,
///   and the pool keeps exact statistics: its `USED_MEM_HIGH` attribute is the highest number
///   of bytes handed out to live allocations since it was last reset. It is exact for what
///   candle allocates; it leaves out the CUDA context and cuBLAS's workspace, which are
///   allocated outside the pool (a fixed amount per process, the same for every method).
pub enum Meter {
    Heap,
    #[cfg(feature = "cuda")]
    CudaPool(crate::common::CudaPool),
}

impl Meter {
    pub fn new(dev: &Device) -> Result<Self, Error> {
        match dev {
            Device::Cpu => Ok(Self::Heap),
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => Ok(Self::CudaPool(crate::common::CudaPool::new(d)?)),
            _ => Err("memory is measured on the CPU and on CUDA only".into()),
        }
    }

    /// Starts a new peak from the bytes in use now.
    pub fn reset(&self) -> Result<(), Error> {
        match self {
            Self::Heap => {
                alloc::reset_peak();
            }
            #[cfg(feature = "cuda")]
            Self::CudaPool(p) => p.reset()?,
        }
        Ok(())
    }

    /// The highest number of bytes in use since the last [`Meter::reset`].
    pub fn peak(&self) -> Result<usize, Error> {
        match self {
            Self::Heap => Ok(alloc::peak()),
            #[cfg(feature = "cuda")]
            Self::CudaPool(p) => p.peak(),
        }
    }

    /// Bytes in use now.
    pub fn used(&self) -> Result<usize, Error> {
        match self {
            Self::Heap => Ok(alloc::live()),
            #[cfg(feature = "cuda")]
            Self::CudaPool(p) => p.used(),
        }
    }
}
