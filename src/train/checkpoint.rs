//! Crash-safe checkpoints: step-numbered directories that appear whole or not at all.
//!
//! [`Checkpointer::save`] writes a checkpoint into a hidden temporary directory of its own
//! (named after the step, the process and a counter, never reused), flushes every file to
//! disk, writes `manifest.json` (the step, a hash of the run's configuration, and every file
//! with its size) last, and renames the directory to `step-000123`. Re-saving a step moves
//! the old directory aside (`.step-000123.old-K`) before the new one is renamed in, and
//! removes it after; until then the aside copy counts as that step's checkpoint. A kill at
//! any moment leaves either the complete new checkpoint or the complete old one, beside the
//! older ones. A save holds a lock on the root directory (`flock`, released by the system
//! when the process dies; on Unix), so two processes never write into one root at once.
//! [`Checkpointer::latest`] returns the newest complete checkpoint, skips directories without
//! a valid manifest (or whose files do not match it), and refuses one written by a run with
//! another configuration.
//!
//! Retention: after a save, this run's newest `keep` complete checkpoints are kept (the one
//! just written always among them); checkpoints written by runs with another configuration
//! are never removed. A save refuses to write a step below a complete checkpoint already in
//! the root ([`LisaError::LaterCheckpoint`]): that checkpoint is what a resume would pick up,
//! so the run would silently jump to it.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{LisaError, Result};
use crate::io::io;

/// Name of the manifest inside a checkpoint directory.
pub const MANIFEST_FILE: &str = "manifest.json";
const FORMAT: &str = "candle-lisa-checkpoint/1";

/// A hook called with a path at a point of a save: for fault-injection tests.
type Hook = Box<dyn Fn(&Path) + Send + Sync>;

/// Step-numbered checkpoint directories under one root.
pub struct Checkpointer {
    root: PathBuf,
    keep: usize,
    run_hash: String,
    on_write: Option<Hook>,
    on_replace: Option<Hook>,
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
    /// Its directory (`step-…`, or the aside copy of an interrupted re-save).
    pub dir: PathBuf,
}

/// A complete checkpoint directory in the root.
struct Complete {
    step: u64,
    dir: PathBuf,
    manifest: serde_json::Value,
}

/// What a name in the root is.
enum Entry {
    /// `step-N`.
    Step(u64),
    /// `.step-N.old-K`: the previous copy of step N, moved aside by a re-save.
    Aside(u64),
    /// `.step-N.tmp…`: a save's temporary directory.
    Temp,
    Other,
}

fn entry_kind(name: &str) -> Entry {
    if let Some(step) = name.strip_prefix("step-").and_then(|s| s.parse().ok()) {
        return Entry::Step(step);
    }
    let Some(rest) = name.strip_prefix(".step-") else {
        return Entry::Other;
    };
    match rest.split_once('.') {
        Some((step, kind)) if kind.starts_with("old-") => {
            step.parse().map_or(Entry::Other, Entry::Aside)
        }
        Some((_, kind)) if kind.starts_with("tmp") => Entry::Temp,
        _ => Entry::Other,
    }
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
            on_replace: None,
        })
    }

    /// Calls `hook` with each file of a checkpoint after it is written and flushed, before
    /// the manifest is: for tests that kill the process in the middle of a save.
    pub fn on_write(mut self, hook: impl Fn(&Path) + Send + Sync + 'static) -> Self {
        self.on_write = Some(Box::new(hook));
        self
    }

    /// Calls `hook` with the aside directory when a re-save of a step has moved the old
    /// checkpoint aside, before the new one is renamed in: for tests that kill the process
    /// there.
    pub fn on_replace(mut self, hook: impl Fn(&Path) + Send + Sync + 'static) -> Self {
        self.on_replace = Some(Box::new(hook));
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
    /// is added and the directory renamed into place (an existing checkpoint of `step` is
    /// replaced); this run's checkpoints beyond the newest `keep` are removed. Returns the
    /// new directory.
    ///
    /// # Errors
    /// [`LisaError::CheckpointBusy`] while another save holds the root,
    /// [`LisaError::LaterCheckpoint`] when the root holds a complete checkpoint of a later
    /// step, whatever `write` returns, and [`LisaError::Io`]; a failed save leaves the
    /// previous checkpoints as they were.
    pub fn save(&self, step: u64, write: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
        let _lock = RootLock::acquire(&self.root)?;
        if let Some(later) = self.complete()?.into_iter().find(|c| c.step > step) {
            return Err(LisaError::LaterCheckpoint {
                step,
                later: later.step,
                path: later.dir,
            });
        }
        let name = Self::dir_name(step);
        let tmp = fresh_dir(&self.root, &format!(".{name}.tmp-{}-", std::process::id()))?;
        let result = self.fill(step, &tmp, write);
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        result?;
        let dir = self.root.join(&name);
        let aside = match dir.exists() {
            true => {
                let aside = free_name(&self.root, &format!(".{name}.old-"));
                std::fs::rename(&dir, &aside).map_err(io("cannot move aside", &dir))?;
                if let Some(hook) = &self.on_replace {
                    hook(&aside);
                }
                Some(aside)
            }
            false => None,
        };
        std::fs::rename(&tmp, &dir).map_err(io("cannot rename into place", &dir))?;
        sync_dir(&self.root)?;
        // The new checkpoint is in place; an aside copy left behind is pruned later.
        if let Some(aside) = aside {
            let _ = std::fs::remove_dir_all(&aside);
        }
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

    /// Complete checkpoints, newest first: each `step-N` with a valid manifest, and for a
    /// step without one, an aside copy with a valid manifest.
    fn complete(&self) -> Result<Vec<Complete>> {
        let mut found: Vec<Complete> = Vec::new();
        let mut asides = Vec::new();
        let entries = std::fs::read_dir(&self.root).map_err(io("cannot read", &self.root))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let (step, list) = match entry_kind(&name) {
                Entry::Step(step) => (step, &mut found),
                Entry::Aside(step) => (step, &mut asides),
                Entry::Temp | Entry::Other => continue,
            };
            let dir = entry.path();
            if let Some(manifest) = read_manifest(&dir, step) {
                list.push(Complete {
                    step,
                    dir,
                    manifest,
                });
            }
        }
        asides.sort_by(|a, b| a.dir.cmp(&b.dir));
        for aside in asides {
            if !found.iter().any(|c| c.step == aside.step) {
                found.push(aside);
            }
        }
        found.sort_by_key(|c| std::cmp::Reverse(c.step));
        Ok(found)
    }

    /// The newest complete checkpoint, or `None` when there is none.
    ///
    /// # Errors
    /// [`LisaError::CheckpointMismatch`] when the newest complete checkpoint was written by a
    /// run with another configuration; [`LisaError::Io`] when the root cannot be read.
    pub fn latest(&self) -> Result<Option<Found>> {
        let Some(newest) = self.complete()?.into_iter().next() else {
            return Ok(None);
        };
        if newest.manifest["run_hash"] != self.run_hash.as_str() {
            return Err(LisaError::CheckpointMismatch {
                path: newest.dir,
                reason: "it was written by a run with another configuration (model, data, \
                         method or hyper-parameters); resume with the same settings, or use \
                         another output directory"
                    .into(),
            });
        }
        Ok(Some(Found {
            step: newest.step,
            dir: newest.dir,
        }))
    }

    /// Removes all but this run's newest `keep` complete checkpoints (never another run's),
    /// aside copies that are no longer needed, and leftover temporary directories of
    /// interrupted saves. Called with the root locked, so no other save is under way.
    fn prune(&self) -> Result<()> {
        let complete = self.complete()?;
        let ours = complete
            .iter()
            .filter(|c| c.manifest["run_hash"] == self.run_hash.as_str());
        for c in ours.skip(self.keep) {
            std::fs::remove_dir_all(&c.dir).map_err(io("cannot remove", &c.dir))?;
        }
        let entries = std::fs::read_dir(&self.root).map_err(io("cannot read", &self.root))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            let stale = match entry_kind(&name) {
                Entry::Temp => true,
                Entry::Aside(_) => !complete.iter().any(|c| c.dir == path),
                Entry::Step(_) | Entry::Other => false,
            };
            if stale {
                let _ = std::fs::remove_dir_all(&path);
            }
        }
        Ok(())
    }
}

/// A new, empty directory `root/<prefix>K` for the first K that is free.
fn fresh_dir(root: &Path, prefix: &str) -> Result<PathBuf> {
    for k in 0u64.. {
        let dir = root.join(format!("{prefix}{k}"));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io("cannot create", &dir)(e)),
        }
    }
    unreachable!("u64 names run out")
}

/// `root/<prefix>K` for the first K that names nothing.
fn free_name(root: &Path, prefix: &str) -> PathBuf {
    (0u64..)
        .map(|k| root.join(format!("{prefix}{k}")))
        .find(|p| std::fs::symlink_metadata(p).is_err())
        .unwrap_or_else(|| root.join(prefix))
}

/// An exclusive lock on a checkpoint root directory, held while a save writes into it.
struct RootLock {
    _dir: Option<std::fs::File>,
}

impl RootLock {
    fn acquire(root: &Path) -> Result<Self> {
        #[cfg(unix)]
        {
            use std::os::fd::AsRawFd;
            extern "C" {
                fn flock(fd: i32, operation: i32) -> i32;
            }
            const LOCK_EX: i32 = 2;
            const LOCK_NB: i32 = 4;
            let dir = std::fs::File::open(root).map_err(io("cannot open", root))?;
            // SAFETY: flock only takes a lock on the open descriptor, which `dir` owns.
            if unsafe { flock(dir.as_raw_fd(), LOCK_EX | LOCK_NB) } != 0 {
                let e = std::io::Error::last_os_error();
                return Err(match e.kind() {
                    std::io::ErrorKind::WouldBlock => LisaError::CheckpointBusy {
                        root: root.to_path_buf(),
                    },
                    _ => io("cannot lock", root)(e),
                });
            }
            Ok(Self { _dir: Some(dir) })
        }
        #[cfg(not(unix))]
        {
            let _ = root;
            Ok(Self { _dir: None })
        }
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
