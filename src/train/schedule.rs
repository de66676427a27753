//! Learning-rate schedules: a small trait and the three schedules fine-tuning recipes use.

/// The learning rate at each optimizer step.
///
/// `step` counts from 1 (the first update). A schedule holds no state: the rate is a function
/// of the step, so a resumed run needs nothing saved but the step.
pub trait LrSchedule: Send + Sync {
    /// The learning rate of update number `step` (1-based).
    fn lr(&self, step: usize) -> f64;
}

/// Linear warm-up from 0 over `warmup` steps: `peak · step / warmup`.
fn warm(peak: f64, warmup: usize, step: usize) -> Option<f64> {
    (step <= warmup && warmup > 0).then(|| peak * step as f64 / warmup as f64)
}

/// Progress through the decay in [0, 1] after the warm-up.
fn progress(warmup: usize, total: usize, step: usize) -> f64 {
    let span = total.saturating_sub(warmup).max(1);
    (step.saturating_sub(warmup) as f64 / span as f64).min(1.0)
}

/// `lr` at every step after a linear warm-up.
///
/// ```
/// use candle_lisa::train::{Constant, LrSchedule};
/// let s = Constant { lr: 1e-3, warmup: 10 };
/// assert_eq!(s.lr(5), 5e-4);
/// assert_eq!(s.lr(500), 1e-3);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Constant {
    /// The rate after the warm-up.
    pub lr: f64,
    /// Warm-up steps (0 for none).
    pub warmup: usize,
}

impl LrSchedule for Constant {
    fn lr(&self, step: usize) -> f64 {
        warm(self.lr, self.warmup, step).unwrap_or(self.lr)
    }
}

/// Linear warm-up to `peak`, then a straight line down to `end` at step `total`.
///
/// ```
/// use candle_lisa::train::{LinearDecay, LrSchedule};
/// let s = LinearDecay { peak: 1.0, warmup: 0, total: 10, end: 0.0 };
/// assert_eq!(s.lr(5), 0.5);
/// assert_eq!(s.lr(10), 0.0);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinearDecay {
    /// The rate at the end of the warm-up.
    pub peak: f64,
    /// Warm-up steps.
    pub warmup: usize,
    /// The step at which the rate reaches `end` (and stays).
    pub total: usize,
    /// The final rate.
    pub end: f64,
}

impl LrSchedule for LinearDecay {
    fn lr(&self, step: usize) -> f64 {
        warm(self.peak, self.warmup, step).unwrap_or_else(|| {
            let p = progress(self.warmup, self.total, step);
            self.peak + (self.end - self.peak) * p
        })
    }
}

/// Linear warm-up to `peak`, then half a cosine down to `min` at step `total`.
///
/// ```
/// use candle_lisa::train::{Cosine, LrSchedule};
/// let s = Cosine { peak: 1.0, warmup: 10, total: 110, min: 0.1 };
/// assert_eq!(s.lr(10), 1.0);
/// assert!((s.lr(60) - 0.55).abs() < 1e-12);
/// assert!((s.lr(110) - 0.1).abs() < 1e-12);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cosine {
    /// The rate at the end of the warm-up.
    pub peak: f64,
    /// Warm-up steps.
    pub warmup: usize,
    /// The step at which the rate reaches `min` (and stays).
    pub total: usize,
    /// The final rate.
    pub min: f64,
}

impl LrSchedule for Cosine {
    fn lr(&self, step: usize) -> f64 {
        warm(self.peak, self.warmup, step).unwrap_or_else(|| {
            let p = progress(self.warmup, self.total, step);
            self.min + (self.peak - self.min) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
        })
    }
}
