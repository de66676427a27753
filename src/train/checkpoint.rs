//! Crash-safe checkpoints: step-numbered directories that appear whole or not at all.
//!
//! [`Checkpointer::save`] writes a checkpoint into a hidden temporary directory, flushes every
//! file to disk, writes `manifest.json` (the step, a hash of the run's configuration, and
//! every file with its size) last, and renames the directory to `step-000123`. A kill at any
//! moment leaves either the complete new checkpoint or none of it, beside the older ones.
//! [`Checkpointer::latest`] returns the newest complete checkpoint, skips directories without
//! a valid manifest (or whose files do not match it), and refuses one written by a run with
//! another configuration. The last `keep` checkpoints are kept.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{LisaError, Result};
use crate::io::io;

/// Name of the manifest inside a checkpoint directory.
pub const MANIFEST_FILE: &str = "manifest.json";
const FORMAT: &str = "candle-lisa-checkpoint/1";

/// A hook called with each file's path after it is written and flushed, before the manifest:
/// for fault-injection tests.
type WriteHook = Box<dyn Fn(&Path) + Send + Sync>;

/// Step-numbered checkpoint directories under one root.
pub struct Checkpointer {
    root: PathBuf,
    keep: usize,
    run_hash: String,
    on_write: Option<WriteHook>,
}

impl std::fmt::Debug for Checkpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpointer")
            .field("root", &self.root)
            .field("keep", &self.keep)
            .field("run_hash", &self.run_hash)
            .finish_non_exhaustive()
    }
}

/// A complete checkpoint found by [`Checkpointer::latest`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// Its step.
    pub step: u64,
    /// Its directory.
    pub dir: PathBuf,
}

impl Checkpointer {
    /// Checkpoints of the run described by `run_config` under `root` (created if needed),
    /// keeping the newest `keep` (at least 1). `run_config` should hold everything that must
    /// not change across a resume (model, data, method, hyper-parameters, seed, world size);
    /// its SHA-256 goes into each manifest.
    ///
    /// # Errors
    /// [`LisaError::Io`] when `root` cannot be created.
    pub fn new(
        root: impl Into<PathBuf>,
        keep: usize,
        run_config: &serde_json::Value,
    ) -> Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(io("cannot create", &root))?;
        let hash = Sha256::digest(run_config.to_string().as_bytes());
        Ok(Self {
            root,
            keep: keep.max(1),
            run_hash: hash.iter().map(|b| format!("{b:02x}")).collect(),
            on_write: None,
        })
    }

    /// Calls `hook` with each file of a checkpoint after it is written and flushed, before
    /// the manifest is: for tests that kill the process in the middle of a save.
    pub fn on_write(mut self, hook: impl Fn(&Path) + Send + Sync + 'static) -> Self {
        self.on_write = Some(Box::new(hook));
        self
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory name of `step`'s checkpoint.
    pub fn dir_name(step: u64) -> String {
        format!("step-{step:09}")
    }

    /// Writes checkpoint `step`: `write` fills a fresh temporary directory, then the manifest
    /// is added and the directory renamed into place; older checkpoints beyond `keep` are
    /// removed. Returns the new directory.
    ///
    /// # Errors
    /// Whatever `write` returns, and [`LisaError::Io`]; a failed save leaves the previous
    /// checkpoints as they were.
    pub fn save(&self, step: u64, write: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
        let name = Self::dir_name(step);
        let tmp = self.root.join(format!(".{name}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io("cannot create", &tmp))?;
        let result = self.fill(step, &tmp, write);
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        result?;
        let dir = self.root.join(&name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io("cannot replace", &dir))?;
        }
        std::fs::rename(&tmp, &dir).map_err(io("cannot rename into place", &dir))?;
        sync_dir(&self.root)?;
        self.prune()?;
        Ok(dir)
    }

    fn fill(&self, step: u64, tmp: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        write(tmp)?;
        let mut files = serde_json::Map::new();
        for path in walk(tmp)? {
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io("cannot flush", &path))?;
            let len = std::fs::metadata(&path)
                .map_err(io("cannot read", &path))?
                .len();
            let rel = path
                .strip_prefix(tmp)
                .unwrap_or(&path)
                .to_string_lossy()
                .replace('\\', "/");
            files.insert(rel, len.into());
            if let Some(hook) = &self.on_write {
                hook(&path);
            }
        }
        let manifest = serde_json::json!({
            "format": FORMAT,
            "step": step,
            "run_hash": self.run_hash,
            "files": files,
        });
        let path = tmp.join(MANIFEST_FILE);
        std::fs::write(&path, manifest.to_string() + "\n").map_err(io("cannot write", &path))?;
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(io("cannot flush", &path))?;
        for dir in dirs(tmp)? {
            sync_dir(&dir)?;
        }
        Ok(())
    }

    /// Complete checkpoint directories, newest first.
    fn complete(&self) -> Result<Vec<(u64, PathBuf, serde_json::Value)>> {
        let mut found = Vec::new();
        let entries = std::fs::read_dir(&self.root).map_err(io("cannot read", &self.root))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(step) = name
                .strip_prefix("step-")
                .and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
            let dir = entry.path();
            if let Some(manifest) = read_manifest(&dir, step) {
                found.push((step, dir, manifest));
            }
        }
        found.sort_by_key(|f| std::cmp::Reverse(f.0));
        Ok(found)
    }

    /// The newest complete checkpoint, or `None` when there is none.
    ///
    /// # Errors
    /// [`LisaError::CheckpointMismatch`] when the newest complete checkpoint was written by a
    /// run with another configuration; [`LisaError::Io`] when the root cannot be read.
    pub fn latest(&self) -> Result<Option<Found>> {
        let Some((step, dir, manifest)) = self.complete()?.into_iter().next() else {
            return Ok(None);
        };
        if manifest["run_hash"] != self.run_hash.as_str() {
            return Err(LisaError::CheckpointMismatch {
                path: dir,
                reason: "it was written by a run with another configuration (model, data, \
                         method or hyper-parameters); resume with the same settings, or use \
                         another output directory"
                    .into(),
            });
        }
        Ok(Some(Found { step, dir }))
    }

    /// Removes all but the newest `keep` complete checkpoints, and leftover temporary
    /// directories of interrupted saves.
    fn prune(&self) -> Result<()> {
        for (_, dir, _) in self.complete()?.into_iter().skip(self.keep) {
            std::fs::remove_dir_all(&dir).map_err(io("cannot remove", &dir))?;
        }
        let entries = std::fs::read_dir(&self.root).map_err(io("cannot read", &self.root))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".step-") && name.ends_with(".tmp") {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        Ok(())
    }
}

/// The manifest of `dir`, if it is valid for `step` and every file it lists has its size.
fn read_manifest(dir: &Path, step: u64) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join(MANIFEST_FILE)).ok()?;
    let manifest: serde_json::Value = serde_json::from_str(&text).ok()?;
    if manifest["format"] != FORMAT || manifest["step"].as_u64() != Some(step) {
        return None;
    }
    for (file, len) in manifest["files"].as_object()? {
        if std::fs::metadata(dir.join(file)).ok()?.len() != len.as_u64()? {
            return None;
        }
    }
    Some(manifest)
}

/// Every file under `dir`, sorted.
fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for d in dirs(dir)? {
        for entry in std::fs::read_dir(&d)
            .map_err(io("cannot read", &d))?
            .flatten()
        {
            if entry.file_type().is_ok_and(|t| t.is_file()) {
                files.push(entry.path());
            }
        }
    }
    files.sort();
    Ok(files)
}

/// `dir` and every directory under it.
fn dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        let d = out[i].clone();
        for entry in std::fs::read_dir(&d)
            .map_err(io("cannot read", &d))?
            .flatten()
        {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                out.push(entry.path());
            }
        }
        i += 1;
    }
    Ok(out)
}

/// Flushes a directory's entries (the names created or renamed in it) to disk.
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io("cannot flush", dir))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}
