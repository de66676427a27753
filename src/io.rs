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
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
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
