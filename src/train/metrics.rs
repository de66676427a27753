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

/// TensorBoard event files: each number in a record becomes a scalar summary tagged with its
/// key (`loss`, `lr`, `grad_norm`, `eval_loss`, ...) at the record's `step`; strings, arrays
/// and nulls are left out. The file is `events.out.tfevents.<seconds>.candle-lisa.<pid>.<n>`
/// in the directory given (a TensorBoard "run"), in TFRecord framing with masked CRC-32C, as
/// TensorFlow writes it. Each record goes out in one write.
#[derive(Debug)]
pub struct TensorBoardSink {
    path: PathBuf,
    file: std::fs::File,
    records: u64,
}

impl TensorBoardSink {
    /// Creates `dir` if needed and a new event file in it. With `start_step` above 0 (a resumed
    /// run), the file begins with a session start at that step, on which TensorBoard drops the
    /// points of earlier files at or after it, as it does for TensorFlow's restarts.
    ///
    /// # Errors
    /// [`LisaError::Io`] when the directory or the file cannot be created or written.
    pub fn create(dir: impl AsRef<Path>, start_step: u64) -> Result<Self> {
        static FILES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
        let n = FILES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let path = dir.join(format!(
            "events.out.tfevents.{secs:010}.candle-lisa.{}.{n}",
            std::process::id()
        ));
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(io("cannot create", &path))?;
        let mut sink = Self {
            path,
            file,
            records: 0,
        };
        let mut out = Vec::new();
        // Event.file_version, which readers expect first.
        let mut version = event_header(wall_time(), 0);
        proto_bytes(&mut version, 3, b"brain.Event:2");
        tf_record(&mut out, &version);
        if start_step > 0 {
            // Event.session_log = SessionLog { status: START }.
            let mut start = event_header(wall_time(), start_step as i64);
            proto_bytes(&mut start, 7, &[0x08, 0x01]);
            tf_record(&mut out, &start);
        }
        sink.write(&out)?;
        Ok(sink)
    }

    /// The event file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.file
            .write_all(bytes)
            .map_err(io("cannot write", &self.path))
    }
}

impl MetricsSink for TensorBoardSink {
    fn record(&mut self, record: &serde_json::Value) -> Result<()> {
        self.records += 1;
        let step = record
            .get("step")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(self.records);
        let mut summary = Vec::new();
        for (tag, value) in record.as_object().into_iter().flatten() {
            let Some(x) = value.as_f64().filter(|_| tag != "step") else {
                continue;
            };
            // Summary.Value { tag = 1, simple_value = 2 (float) }.
            let mut v = Vec::new();
            proto_bytes(&mut v, 1, tag.as_bytes());
            v.push(0x15);
            v.extend_from_slice(&(x as f32).to_le_bytes());
            proto_bytes(&mut summary, 1, &v);
        }
        if summary.is_empty() {
            return Ok(());
        }
        let mut event = event_header(wall_time(), step as i64);
        proto_bytes(&mut event, 5, &summary);
        let mut out = Vec::new();
        tf_record(&mut out, &event);
        self.write(&out)
    }
}

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `Event.wall_time` (field 1, double) and `Event.step` (field 2, int64).
fn event_header(wall_time: f64, step: i64) -> Vec<u8> {
    let mut e = vec![0x09];
    e.extend_from_slice(&wall_time.to_le_bytes());
    e.push(0x10);
    varint(&mut e, step as u64);
    e
}

fn varint(out: &mut Vec<u8>, mut x: u64) {
    while x >= 0x80 {
        out.push(x as u8 | 0x80);
        x >>= 7;
    }
    out.push(x as u8);
}

/// A length-delimited protobuf field.
fn proto_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    varint(out, field << 3 | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// TFRecord framing: length (u64 LE), masked CRC-32C of the length, data, masked CRC-32C of
/// the data.
fn tf_record(out: &mut Vec<u8>, data: &[u8]) {
    let len = (data.len() as u64).to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
}

/// CRC-32C (Castagnoli), masked as TFRecord stores it.
fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 == 1 {
                    0x82f6_3b78 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    !data.iter().fold(!0u32, |c, &b| {
        TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(super::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(super::crc32c(b""), 0);
    }
}
