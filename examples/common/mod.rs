//! Helpers shared by the examples.
#![allow(dead_code)]

// Each example uses some of them.
#[allow(unused_imports)]
pub use candle_lisa_testkit::{keep_freed_memory, set_thread_count, setup};

/// Keeps the lines of `metrics.jsonl` from other methods, and this method's up to `step`;
/// drops lines that are not JSON (torn by a kill).
pub fn truncate_metrics(
    path: &std::path::Path,
    method: &str,
    step: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| {
                v["method"] != method || v["step"].as_u64().is_some_and(|s| s <= step)
            })
        })
        .collect();
    let text = kept.join("\n") + if kept.is_empty() { "" } else { "\n" };
    // Atomically: a kill here must not lose the lines kept.
    candle_lisa::io::atomic_write(path, |tmp| {
        std::fs::write(tmp, text).map_err(|source| candle_lisa::LisaError::Io {
            action: "cannot write",
            path: tmp.to_path_buf(),
            source,
        })
    })?;
    Ok(())
}

#[cfg(feature = "cuda")]
pub use candle_lisa::cli::peak::CudaPool;
pub use candle_lisa::cli::peak::DevicePeak;

/// Prints above the progress bar, or plainly when there is no terminal to draw it on.
pub fn say(pb: &indicatif::ProgressBar, line: String) {
    if pb.is_hidden() {
        println!("{line}");
    } else {
        pb.println(line);
    }
}

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

/// Kills this process at once, as a crash would (no destructors, no flushing).
pub fn kill_self() -> ! {
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &std::process::id().to_string()])
        .status();
    std::process::abort()
}
