//! The GPU check's profile of a training step: the phases' times, the step's model FLOPs and
//! their utilisation of the device's peak, and, under the CUPTI injection library
//! (`scripts/cupti_counts.c`), the driver calls (host synchronisations, kernel launches) and
//! device time per kernel of each step.

use candle_core::{DType, Device};
use candle_lisa_testkit::training::{self, shape_config, step_flops, Training, Variant, Weights};
use serde_json::{json, Value};
use std::time::Instant;

type Error = Box<dyn std::error::Error>;

/// Dense bf16 tensor-core peak of an H100/H200 SXM (989.4 TFLOP/s, NVIDIA's data sheet,
/// without sparsity): the denominator of the model-FLOPs utilisation.
pub const PEAK_BF16: f64 = 989.4e12;

/// The marks of the CUPTI injection library, when the process runs under it
/// (`CUDA_INJECTION64_PATH` names it; the driver has loaded it, and loading it again here
/// finds the same copy).
pub struct Cupti {
    _lib: libloading::Library,
    begin: unsafe extern "C" fn(),
    end: unsafe extern "C" fn(*const std::ffi::c_char, i32),
}

impl Cupti {
    /// The library named by `CUDA_INJECTION64_PATH`, if it is set and exports the marks.
    pub fn from_env() -> Option<Self> {
        let path = std::env::var_os("CUDA_INJECTION64_PATH")?;
        // SAFETY: the library is ours (scripts/cupti_counts.c); its initialisers only
        // register nothing until the driver calls InitializeInjection.
        let lib = unsafe { libloading::Library::new(path) }.ok()?;
        // SAFETY: the symbols have these C signatures in scripts/cupti_counts.c.
        unsafe {
            let begin = *lib
                .get::<unsafe extern "C" fn()>(b"lisa_cupti_begin")
                .ok()?;
            let end = *lib
                .get::<unsafe extern "C" fn(*const std::ffi::c_char, i32)>(b"lisa_cupti_end")
                .ok()?;
            Some(Self {
                _lib: lib,
                begin,
                end,
            })
        }
    }

    /// Starts counting from zero.
    pub fn begin(&self) {
        // SAFETY: see `from_env`.
        unsafe { (self.begin)() }
    }

    /// Prints the counts since `begin` per step, as one JSON line named `name`.
    pub fn end(&self, name: &str, steps: usize) {
        let name = std::ffi::CString::new(name.replace('"', "'")).unwrap_or_default();
        // SAFETY: see `from_env`; `name` outlives the call.
        unsafe { (self.end)(name.as_ptr(), steps as i32) }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// What one profiled run measures.
pub struct Run<'a> {
    pub shape: &'a str,
    pub method: &'a str,
    pub dtype: DType,
    pub seq_len: usize,
    /// Whether the CUDA pool keeps freed memory (the optimizers' setting); `false` measures
    /// candle's default, which returns it at every synchronisation.
    pub keep_pool: bool,
}

/// One profiled run: `steps` steps after two warm-up steps, timed whole (the step time) and
/// then by phase (with a synchronisation between phases). Returns its JSON line.
pub fn profile(
    run: &Run,
    steps: usize,
    dev: &Device,
    cupti: Option<&Cupti>,
) -> Result<Value, Error> {
    let Run {
        shape,
        method,
        dtype,
        seq_len: t,
        keep_pool,
    } = *run;
    let config = shape_config(shape)?;
    let variant: Variant = method.parse()?;
    let b = 1;
    let (ids, labels) = training::batch(&config, b, t, dev)?;
    let weights = Weights::new(config.clone(), variant, dev, dtype)?;
    let mut training = Training::new(weights, variant, &"uniform".parse()?)?;
    candle_lisa::nn::pool::keep_freed_memory(dev, keep_pool)?;
    for _ in 0..2 {
        training.step(&ids, &labels)?;
    }
    dev.synchronize()?;
    let pool = if keep_pool { "" } else { " pool-releases" };
    let name = format!("{shape} {method} {dtype:?} T={t}{pool}");
    if let Some(c) = cupti {
        c.begin();
    }
    let mut step_ms = Vec::new();
    for _ in 0..steps {
        let start = Instant::now();
        training.step(&ids, &labels)?;
        dev.synchronize()?;
        step_ms.push(start.elapsed().as_secs_f64() * 1e3);
    }
    if let Some(c) = cupti {
        c.end(&name, steps);
    }
    let sync = || dev.synchronize();
    let mut phases = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..steps {
        let p = training.step_phases(&ids, &labels, &sync)?;
        for (acc, ms) in phases.iter_mut().zip(p) {
            acc.push(ms);
        }
    }
    let step = median(step_ms.clone());
    let flops = step_flops(&config, variant, b, t);
    let tflops = flops / (step / 1e3) / 1e12;
    let [forward, backward, update] = phases.map(median);
    candle_lisa::nn::pool::keep_freed_memory(dev, true)?;
    Ok(
        json!({"check": "profile", "name": name, "shape": shape, "method": method,
        "dtype": format!("{dtype:?}").to_lowercase(), "seq_len": t, "batch_size": b,
        "keep_pool": keep_pool, "under_cupti": cupti.is_some(),
        "step_ms": step, "step_ms_all": step_ms, "forward_ms": forward, "backward_ms": backward,
        "update_ms": update, "model_tflop": flops / 1e12, "tflop_per_s": tflops,
        "mfu_bf16_peak": (dtype == DType::BF16).then_some(tflops * 1e12 / PEAK_BF16)}),
    )
}
