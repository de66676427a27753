//! Models named by Hugging Face Hub id (`HuggingFaceTB/SmolLM2-135M-Instruct`), found in the
//! local Hugging Face cache, as `huggingface-cli download`, transformers and candle's examples
//! leave them. Offline: nothing is downloaded.
//!
//! The cache is `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`, as in
//! Python's `huggingface_hub`. A model `org/name` lives in `models--org--name/`: its
//! `refs/main` (or `refs/REVISION` for `org/name@REVISION`) names the snapshot
//! `snapshots/<commit>/` that holds its files.
//!
//! ```
//! use candle_lisa::models::hub::resolve_model_in;
//! let cache = tempfile::tempdir()?;
//! let repo = cache.path().join("models--org--tiny");
//! std::fs::create_dir_all(repo.join("refs"))?;
//! std::fs::write(repo.join("refs/main"), "abc123")?;
//! std::fs::create_dir_all(repo.join("snapshots/abc123"))?;
//! std::fs::write(repo.join("snapshots/abc123/config.json"), "{}")?;
//! assert_eq!(resolve_model_in("org/tiny", cache.path())?, repo.join("snapshots/abc123"));
//! assert!(resolve_model_in("org/absent", cache.path()).is_err());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo, RepoType};

use crate::error::{LisaError, Result};

/// The Hugging Face cache directory: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `~/.cache/huggingface/hub`.
pub fn hub_cache_dir() -> PathBuf {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => Cache::from_env().path().clone(),
    }
}

/// A model directory from `name`: `name` itself when it is a directory, else the snapshot of
/// the Hub id `name` (`org/model`, or `org/model@revision`) in [`hub_cache_dir`].
///
/// # Errors
/// [`LisaError::InvalidArgument`] when `name` is neither a directory nor a model in the cache,
/// naming the cache directory searched.
pub fn resolve_model(name: &Path) -> Result<PathBuf> {
    if name.is_dir() {
        return Ok(name.to_path_buf());
    }
    resolve_model_in(&name.to_string_lossy(), &hub_cache_dir())
}

/// The snapshot directory of the Hub id `name` (`org/model` or `org/model@revision`) in the
/// cache at `cache_dir`.
///
/// # Errors
/// [`LisaError::InvalidArgument`] when `name` is not a Hub id or the cache has no snapshot of
/// it with a `config.json`.
pub fn resolve_model_in(name: &str, cache_dir: &Path) -> Result<PathBuf> {
    let (id, revision) = name.split_once('@').unwrap_or((name, "main"));
    let is_id = id.split('/').count() == 2
        && id.split('/').all(|part| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        });
    if !is_id || revision.is_empty() {
        return Err(LisaError::InvalidArgument {
            what: "model",
            reason: format!(
                "{name} is not a directory, nor a Hub id such as HuggingFaceTB/SmolLM2-135M"
            ),
        });
    }
    let repo = Repo::with_revision(id.to_string(), RepoType::Model, revision.to_string());
    let folder = repo.folder_name();
    let cache = Cache::new(cache_dir.to_path_buf()).repo(repo);
    match cache.get("config.json").as_deref().and_then(Path::parent) {
        Some(dir) => Ok(dir.to_path_buf()),
        None => Err(LisaError::InvalidArgument {
            what: "model",
            reason: format!(
                "{name} is not a directory, and the Hugging Face cache at {} has no snapshot of \
                 it ({folder}/refs/{revision} naming a snapshot with a config.json); download \
                 it first, e.g. `huggingface-cli download {id}`, or set HF_HUB_CACHE or HF_HOME",
                cache_dir.display()
            ),
        }),
    }
}
