//! Metrics sinks: where a training loop sends one JSON object per step or evaluation.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::io::io;

/// Receives metrics records.
pub trait MetricsSink {
    /// Records one object (a step, an evaluation).
    fn record(&mut self, record: &serde_json::Value) -> Result<()>;
}

/// One JSON object per line, appended and flushed as it comes, so a killed run loses nothing
/// it has recorded.
#[derive(Debug)]
pub struct JsonlSink {
    path: PathBuf,
    file: std::fs::File,
}

impl JsonlSink {
    /// Appends to `path`, creating it if needed.
    ///
    /// # Errors
    /// [`LisaError::Io`](crate::LisaError::Io) when the file cannot be opened.
    pub fn append(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io("cannot open", &path))?;
        Ok(Self { path, file })
    }
}

impl MetricsSink for JsonlSink {
    fn record(&mut self, record: &serde_json::Value) -> Result<()> {
        writeln!(self.file, "{record}").map_err(io("cannot write", &self.path))
    }
}

impl MetricsSink for Vec<serde_json::Value> {
    fn record(&mut self, record: &serde_json::Value) -> Result<()> {
        self.push(record.clone());
        Ok(())
    }
}
