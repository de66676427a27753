//! Models named by Hub id, from a Hugging Face cache laid out in a temporary directory as
//! `huggingface_hub` lays it out: blobs named by hash, snapshot files linking to them, refs
//! naming the snapshot.

use std::path::Path;

use candle_core::{DType, Device};
use candle_lisa::models::hub::{resolve_model, resolve_model_in};
use candle_lisa::{load_llama, LisaError};

/// The bundled tiny model in a cache at `cache` as `org/tiny`, revision `main` at commit
/// `commit`; its snapshot files link into `blobs/` (on Unix), as the Hub's do.
fn lay_out(cache: &Path, commit: &str) -> std::io::Result<()> {
    let repo = cache.join("models--org--tiny");
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot)?;
    std::fs::create_dir_all(repo.join("blobs"))?;
    std::fs::create_dir_all(repo.join("refs"))?;
    std::fs::write(repo.join("refs/main"), commit)?;
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny-llama");
    for entry in std::fs::read_dir(&tiny)? {
        let entry = entry?;
        let blob = repo.join("blobs").join(entry.file_name());
        std::fs::copy(entry.path(), &blob)?;
        #[cfg(unix)]
        std::os::unix::fs::symlink(&blob, snapshot.join(entry.file_name()))?;
        #[cfg(not(unix))]
        std::fs::copy(&blob, snapshot.join(entry.file_name()))?;
    }
    Ok(())
}

/// A Hub id resolves to its snapshot, which loads the same weights as the directory itself;
/// a revision picks its own ref; what the cache lacks is an error naming the cache.
#[test]
fn hub_ids_resolve_through_the_cache() -> Result<(), Box<dyn std::error::Error>> {
    let cache = tempfile::tempdir()?;
    lay_out(cache.path(), "0123abcd")?;
    let dir = resolve_model_in("org/tiny", cache.path())?;
    assert_eq!(
        dir,
        cache.path().join("models--org--tiny/snapshots/0123abcd")
    );
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny-llama");
    let (a, b) = (
        load_llama(&dir, DType::F32, &Device::Cpu)?.1,
        load_llama(&tiny, DType::F32, &Device::Cpu)?.1,
    );
    let (a, b) = (a.data().lock().unwrap(), b.data().lock().unwrap());
    assert_eq!(a.len(), b.len());
    for (name, var) in a.iter() {
        let diff = (var.as_tensor() - b[name].as_tensor())?.abs()?.sum_all()?;
        assert_eq!(diff.to_scalar::<f32>()?, 0.0, "{name}");
    }
    // A directory is taken as it is.
    assert_eq!(resolve_model(&tiny)?, tiny);
    // Another revision needs its own ref.
    let e = resolve_model_in("org/tiny@v2", cache.path()).unwrap_err();
    assert!(
        matches!(e, LisaError::InvalidArgument { what: "model", .. }),
        "{e}"
    );
    std::fs::write(cache.path().join("models--org--tiny/refs/v2"), "0123abcd")?;
    assert_eq!(resolve_model_in("org/tiny@v2", cache.path())?, dir);
    let e = resolve_model_in("org/absent", cache.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains(&cache.path().display().to_string()), "{e}");
    assert!(e.contains("models--org--absent/refs/main"), "{e}");
    assert!(e.contains("huggingface-cli download org/absent"), "{e}");
    for bad in ["tiny", "a/b/c", "org/", "org/tiny@", "org/ti ny"] {
        let e = resolve_model_in(bad, cache.path()).unwrap_err().to_string();
        assert!(e.contains("nor a Hub id"), "{bad}: {e}");
    }
    Ok(())
}
