//! What every bench starts with: the examples' process settings, the device from
//! `CANDLE_LISA_DEVICE=cpu|cuda|metal` (default cpu), and a group named after both.

use std::time::Duration;

use candle_core::Device;
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion};

/// Sets the process up, picks the device, and opens the group `{name}/{device}` with
/// `samples` samples, `warm_up` and `measure` seconds.
pub fn group<'a>(
    c: &'a mut Criterion,
    name: &str,
    samples: usize,
    warm_up: u64,
    measure: u64,
) -> (Device, BenchmarkGroup<'a, WallTime>) {
    setup();
    let (dev, device_name) = device();
    let mut group = c.benchmark_group(format!("{name}/{device_name}"));
    group
        .sample_size(samples)
        .warm_up_time(Duration::from_secs(warm_up))
        .measurement_time(Duration::from_secs(measure));
    (dev, group)
}

/// The device named by `CANDLE_LISA_DEVICE`, and its name for the benchmark group.
fn device() -> (Device, &'static str) {
    let name = std::env::var("CANDLE_LISA_DEVICE").unwrap_or_else(|_| "cpu".into());
    let made = match name.as_str() {
        "cpu" => Ok((Device::Cpu, "cpu")),
        "cuda" => Device::new_cuda(0).map(|d| (d, "cuda")),
        "metal" => Device::new_metal(0).map(|d| (d, "metal")),
        other => panic!("CANDLE_LISA_DEVICE={other}: expected cpu, cuda or metal"),
    };
    made.unwrap_or_else(|e| {
        panic!("CANDLE_LISA_DEVICE={name}: {e} (was the crate built with --features {name}?)")
    })
}

/// The examples' process settings: thread count, malloc thresholds.
fn setup() {
    candle_lisa_testkit::setup();
}
