//! Metrics sinks: where a training loop sends one JSON object per step or evaluation.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::error::{LisaError, Result};
use crate::io::io;

/// Receives metrics records.
pub trait MetricsSink {
    /// Records one object (a step, an evaluation).
    fn record(&mut self, record: &serde_json::Value) -> Result<()>;
}

/// One JSON object per line, appended and flushed as it comes, so a killed run loses nothing
/// it has recorded. Each line goes out in one write; a kill in the middle of one can still
/// leave it torn (without its newline), which [`append`](Self::append) cuts off and
/// [`read_jsonl`] skips.
#[derive(Debug)]
pub struct JsonlSink {
    path: PathBuf,
    file: std::fs::File,
}

impl JsonlSink {
    /// Appends to `path`, creating it if needed. A last line without its newline is ended
    /// when it is whole JSON and removed when it is not (torn by a kill), so that the next
    /// record starts a line of its own.
    ///
    /// # Errors
    /// [`LisaError::Io`] when the file cannot be opened or repaired.
    pub fn append(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io("cannot open", &path))?;
        let keep = whole_lines_len(&mut file).map_err(io("cannot read", &path))?;
        let mut tail = Vec::new();
        file.seek(std::io::SeekFrom::Start(keep))
            .and_then(|_| file.read_to_end(&mut tail))
            .map_err(io("cannot read", &path))?;
        if serde_json::from_slice::<serde_json::Value>(&tail).is_ok() {
            file.write_all(b"\n").map_err(io("cannot write", &path))?;
        } else if !tail.is_empty() {
            file.set_len(keep).map_err(io("cannot truncate", &path))?;
        }
        Ok(Self { path, file })
    }
}

/// The length of `file` up to and including its last newline.
fn whole_lines_len(file: &mut std::fs::File) -> std::io::Result<u64> {
    let mut end = file.metadata()?.len();
    let mut buf = [0u8; 4096];
    while end > 0 {
        let n = buf.len().min(end as usize);
        file.seek(std::io::SeekFrom::Start(end - n as u64))?;
        file.read_exact(&mut buf[..n])?;
        if let Some(i) = buf[..n].iter().rposition(|&b| b == b'\n') {
            return Ok(end - n as u64 + i as u64 + 1);
        }
        end -= n as u64;
    }
    Ok(0)
}

impl MetricsSink for JsonlSink {
    fn record(&mut self, record: &serde_json::Value) -> Result<()> {
        let line = record.to_string() + "\n";
        self.file
            .write_all(line.as_bytes())
            .map_err(io("cannot write", &self.path))
    }
}

impl MetricsSink for Vec<serde_json::Value> {
    fn record(&mut self, record: &serde_json::Value) -> Result<()> {
        self.push(record.clone());
        Ok(())
    }
}

/// The records of a JSONL metrics file, skipping blank lines and a last line torn by a kill
/// (one without its newline that does not parse).
///
/// # Errors
/// [`LisaError::Io`] for an unreadable file, [`LisaError::InvalidData`] naming the line
/// for any other line that is not JSON.
pub fn read_jsonl(path: impl AsRef<Path>) -> Result<Vec<serde_json::Value>> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(io("cannot read", path))?;
    let mut records = Vec::new();
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(v) => records.push(v),
            Err(_) if !line.ends_with('\n') => {}
            Err(e) => {
                return Err(LisaError::InvalidData {
                    path: format!("{}:{}", path.display(), i + 1).into(),
                    reason: e.to_string(),
                })
            }
        }
    }
    Ok(records)
}
