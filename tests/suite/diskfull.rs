//! A full disk and a read-only directory during a checkpoint save and a model save, on a small
//! tmpfs the test mounts (a real ENOSPC and EROFS, which permissions cannot give as root).
//! Mounting needs root or CAP_SYS_ADMIN; where `mount` is refused, the tests say so and
//! return.

use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device};
use candle_lisa::data::{pad_batch, Example};
use candle_lisa::models::{save_llama_with, SaveOptions};
use candle_lisa::train::{Checkpointer, Constant, Trainer, TrainerConfig};
use candle_lisa::{load_llama, LisaAdamW, LisaConfig, LisaError, Llama, LlamaConfig};
use candle_nn::VarMap;

type Error = Box<dyn std::error::Error>;

/// A tmpfs of a given size on a temporary directory, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(bytes: u64) -> Option<Self> {
        let dir = tempfile::tempdir().ok()?;
        let size = format!("size={}", bytes.div_ceil(4096) * 4096);
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &size, "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipped: cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)");
            return None;
        }
        Some(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn read_only(&self) -> Result<(), Error> {
        let status = Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(self.path())
            .status()?;
        assert!(status.success(), "remount read-only failed");
        Ok(())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn config() -> LlamaConfig {
    let mut c = LlamaConfig::tiny(40, 32, 4, 4, 2);
    c.intermediate_size = 64;
    c
}

fn trainer(varmap: &VarMap) -> Result<Trainer<Llama>, Error> {
    let lisa = LisaConfig {
        gamma: 2,
        period: 3,
        seed: 4,
        ..Default::default()
    };
    let opt = LisaAdamW::new(varmap, Default::default(), lisa)?;
    let c = config();
    let schedule = Constant {
        lr: 1e-2,
        warmup: 0,
    };
    Ok(Trainer::new(
        opt,
        schedule,
        TrainerConfig::default(),
        move |plan| Llama::from_plan(&c, plan),
    )?)
}

fn steps(t: &mut Trainer<Llama>, n: usize) -> Result<(), Error> {
    let examples: Vec<Example> = (0..4u32)
        .map(|i| Example::prompt_response(&[1 + i, 2, 3, 4], &[5 + i, 6], 39))
        .collect();
    let batch = pad_batch(&examples, 39, None, &Device::Cpu)?;
    for _ in 0..n {
        t.step(std::slice::from_ref(&batch))?;
    }
    Ok(())
}

fn bits(varmap: &VarMap) -> Result<Vec<(String, Vec<u32>)>, Error> {
    let mut out = Vec::new();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        let v = var.flatten_all()?.to_vec1::<f32>()?;
        out.push((name.clone(), v.iter().map(|x| x.to_bits()).collect()));
    }
    out.sort();
    Ok(out)
}

fn dir_bytes(dir: &Path) -> u64 {
    walk(dir)
        .iter()
        .map(|p| p.metadata().map_or(0, |m| m.len()))
        .sum()
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        match p.is_dir() {
            true => out.extend(walk(&p)),
            false => out.push(p),
        }
    }
    out
}

/// Free bytes on the file system of `dir`.
fn available(dir: &Path) -> Result<u64, Error> {
    let out = Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(dir)
        .output()?;
    let text = String::from_utf8(out.stdout)?;
    Ok(text
        .lines()
        .nth(1)
        .ok_or("df printed nothing")?
        .trim()
        .parse()?)
}

/// The error is the I/O error of the device, typed, with the path it was writing.
fn assert_io(e: &LisaError, errno: i32) {
    match e {
        LisaError::Io { source, path, .. } => {
            // Some writers re-wrap the system's error with a message that keeps its code.
            let code = source.raw_os_error() == Some(errno)
                || source.to_string().contains(&format!("(os error {errno})"));
            assert!(code, "{e}");
            assert!(!path.as_os_str().is_empty());
        }
        other => panic!("expected LisaError::Io with errno {errno}, got {other:?}"),
    }
}

const ENOSPC: i32 = 28;
const EROFS: i32 = 30;

/// A save into a root with room for one checkpoint and a half fails with ENOSPC, leaves no
/// partial directory, and the previous checkpoint stays the newest and resumes to its
/// weights; the same on the root remounted read-only (EROFS).
#[test]
fn checkpoint_save_on_a_full_or_read_only_disk_keeps_the_previous_one() -> Result<(), Error> {
    let varmap = crate::common::seeded_llama(&config(), 9)?;
    let mut t = trainer(&varmap)?;
    steps(&mut t, 2)?;
    let run = serde_json::json!({"disk": 1});
    let probe = tempfile::tempdir()?;
    let dir = t.save_checkpoint(&Checkpointer::new(probe.path(), 1, &run)?, |_| Ok(()))?;
    let size = dir_bytes(&dir);
    let Some(fs) = Tmpfs::mount(size + size / 2) else {
        return Ok(());
    };
    let ck = Checkpointer::new(fs.path(), 1, &run)?;
    t.save_checkpoint(&ck, |_| Ok(()))?;
    let saved = bits(&varmap)?;
    steps(&mut t, 2)?;
    let e = t.save_checkpoint(&ck, |_| Ok(())).unwrap_err();
    assert_io(&e, ENOSPC);
    let check = |ck: &Checkpointer| -> Result<(), Error> {
        let names: Vec<String> = std::fs::read_dir(fs.path())?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()?;
        assert_eq!(
            names,
            ["step-000000002"],
            "only the previous checkpoint is left"
        );
        assert_eq!(ck.latest()?.map(|f| f.step), Some(2));
        let fresh = crate::common::seeded_llama(&config(), 10)?;
        let mut again = trainer(&fresh)?;
        assert_eq!(again.resume(ck)?, Some(2));
        assert!(
            bits(&fresh)? == saved,
            "the resumed weights are not the checkpoint's"
        );
        Ok(())
    };
    check(&ck)?;
    fs.read_only()?;
    let e = t.save_checkpoint(&ck, |_| Ok(())).unwrap_err();
    assert_io(&e, EROFS);
    check(&ck)
}

/// A sharded model saved over an earlier save on a disk that fills after its first shards
/// fails with ENOSPC and leaves the earlier model whole (not some shards of each, which
/// would load without an error); read-only, the same.
#[test]
fn model_save_on_a_full_or_read_only_disk_keeps_the_previous_one() -> Result<(), Error> {
    let config = config();
    let (a, b) = (
        crate::common::seeded_llama(&config, 1)?,
        crate::common::seeded_llama(&config, 2)?,
    );
    let options = SaveOptions {
        max_shard_bytes: 16 << 10,
        ..Default::default()
    };
    let probe = tempfile::tempdir()?;
    save_llama_with(probe.path(), &config, &a, DType::F32, &options)?;
    let size = dir_bytes(probe.path());
    // The shards' sizes in tmpfs pages, in the order they are written.
    let mut shards: Vec<_> = walk(probe.path())
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    shards.sort();
    let pages: Vec<u64> = shards
        .iter()
        .map(|p| p.metadata().map_or(0, |m| m.len().div_ceil(4096) * 4096))
        .collect();
    // Room for every shard before shard `i` but not for shard `i`: the disk fills there.
    let i = (1..pages.len())
        .find(|&i| pages[i] > pages[..i].iter().copied().max().unwrap_or(0))
        .expect("a shard larger than those before it");
    let room = pages[..i].iter().copied().max().unwrap_or(0);
    let Some(fs) = Tmpfs::mount(2 * size) else {
        return Ok(());
    };
    let dir = fs.path().join("model");
    save_llama_with(&dir, &config, &a, DType::F32, &options)?;
    let filler = available(fs.path())? - room;
    std::fs::write(fs.path().join("filler"), vec![0u8; filler as usize])?;
    assert_eq!(available(fs.path())?, room);
    let e = save_llama_with(&dir, &config, &b, DType::F32, &options).unwrap_err();
    assert_io(&e, ENOSPC);
    let check = || -> Result<(), Error> {
        let (_, loaded) = load_llama(&dir, DType::F32, &Device::Cpu)?;
        assert!(
            bits(&loaded)? == bits(&a)?,
            "the earlier model is not whole"
        );
        let left: Vec<_> = walk(&dir)
            .into_iter()
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with('.'))
            .collect();
        assert!(left.is_empty(), "temporary files left: {left:?}");
        Ok(())
    };
    check()?;
    fs.read_only()?;
    let e = save_llama_with(&dir, &config, &b, DType::F32, &options).unwrap_err();
    assert_io(&e, EROFS);
    check()
}
