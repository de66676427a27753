//! Device selection for the benches: `CANDLE_LISA_DEVICE=cpu|cuda|metal` (default cpu).
#![allow(dead_code)]

use candle_core::Device;

/// The device named by `CANDLE_LISA_DEVICE`, and its name for the benchmark group.
pub fn device() -> (Device, &'static str) {
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

/// The settings of `examples/common`: thread count, malloc thresholds.
pub fn setup() {
    #[path = "../../examples/common/mod.rs"]
    mod examples_common;
    examples_common::setup();
}
