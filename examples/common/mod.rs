//! Helpers shared by the examples.
#![allow(dead_code)]

// Each example uses some of them.
#[allow(unused_imports)]
pub use candle_lisa_testkit::{set_thread_count, setup};

#[cfg(feature = "cuda")]
#[allow(unused_imports)]
pub use candle_lisa::cli::peak::CudaPool;

/// The device named on the command line, or an error naming the feature to enable.
pub fn device(name: &str) -> Result<candle_core::Device, Box<dyn std::error::Error>> {
    match name {
        "cuda" if cfg!(feature = "cuda") => Ok(candle_core::Device::new_cuda(0)?),
        "metal" if cfg!(feature = "metal") => Ok(candle_core::Device::new_metal(0)?),
        "cpu" => Ok(candle_core::Device::Cpu),
        other => Err(format!(
            "this example was built without {other}: rebuild with `--features {other}`"
        )
        .into()),
    }
}
