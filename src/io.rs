//! Files written so that a crash never leaves a half-written one in place.

use std::path::Path;

use crate::error::{LisaError, Result};

/// Maps an [`std::io::Error`] on `path` to [`LisaError::Io`], saying what was being done.
pub(crate) fn io<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> LisaError + 'a {
    move |source| LisaError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Runs `write` on a temporary path and moves the result to `path` atomically: a temporary
/// file in the same directory, flushed to disk, then renamed over `path`. On error the
/// temporary file is removed and `path` is untouched.
pub fn atomic_write(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temporary(path);
    let result = write(&tmp).and_then(|()| {
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io("cannot flush", &tmp))?;
        std::fs::rename(&tmp, path).map_err(io("cannot rename into place", path))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes `tensors` as a safetensors file at `path`; an I/O failure (a full disk, a read-only
/// directory) is [`LisaError::Io`] naming the file, not candle's error without a path.
pub(crate) fn save_safetensors<K>(
    tensors: &std::collections::HashMap<K, candle_core::Tensor>,
    path: &Path,
) -> Result<()>
where
    K: AsRef<str> + Ord + std::fmt::Display,
{
    candle_core::safetensors::save(tensors, path).map_err(|e| {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(c) = cause {
            if let Some(source) = c.downcast_ref::<std::io::Error>() {
                let source = match source.raw_os_error() {
                    Some(code) => std::io::Error::from_raw_os_error(code),
                    None => std::io::Error::new(source.kind(), source.to_string()),
                };
                return io("cannot write", path)(source);
            }
            cause = c.source();
        }
        e.into()
    })
}

/// The temporary name a file is written under before it is renamed to `path`.
fn temporary(path: &Path) -> std::path::PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Files written under temporary names and renamed into place only once every one of them
/// is written and flushed, so that a write that fails (a full disk, a read-only directory)
/// leaves all the files of an earlier save as they were, not some of each. The temporary
/// files of an unfinished set are removed when it is dropped.
#[derive(Default)]
pub(crate) struct Staged {
    /// (temporary, final) paths, in the order they are renamed.
    files: Vec<(std::path::PathBuf, std::path::PathBuf)>,
}

impl Staged {
    /// Runs `write` on a temporary path for `path`, and flushes it.
    pub(crate) fn write(
        &mut self,
        path: &Path,
        write: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<()> {
        let tmp = temporary(path);
        self.files.push((tmp.clone(), path.to_path_buf()));
        write(&tmp)?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io("cannot flush", &tmp))
    }

    /// Renames every file into place, in the order written.
    pub(crate) fn commit(mut self) -> Result<()> {
        let files = std::mem::take(&mut self.files);
        for (i, (tmp, path)) in files.iter().enumerate() {
            if let Err(e) = std::fs::rename(tmp, path) {
                for (rest, _) in &files[i..] {
                    let _ = std::fs::remove_file(rest);
                }
                return Err(io("cannot rename into place", path)(e));
            }
        }
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        for (tmp, _) in &self.files {
            let _ = std::fs::remove_file(tmp);
        }
    }
}
