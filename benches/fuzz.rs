//! A fuzz driver for every reader of files that a crash or a hostile user can leave, on stable
//! Rust: the safetensors header (through `load_llama`), `config.json`, the shard index, a
//! checkpoint (manifest, `trainer.json`, weights: `Checkpointer::latest` and
//! `Trainer::resume`), the optimizer state (`load_state`), a PEFT adapter, the JSONL data
//! readers, metrics, chat templates (compiled and rendered), and GGUF files.
//!
//! `cargo bench --bench fuzz -- --inputs 100000 [--seed 1] [--reader safetensors,config]`
//!
//! The seed corpus is made by the crate itself (a tiny model saved whole and sharded, a
//! checkpoint of three LISA steps, an optimizer state, a LoRA adapter, metrics, data) plus the
//! bundled assets and test fixtures. Each input is a seed mutated by a ChaCha8 RNG (bit flips,
//! boundary bytes and integers, truncation, deletions, duplications, splices of two seeds,
//! JSON keys removed, duplicated or retyped, numbers replaced by boundary values, and the
//! safetensors header mutated as JSON with its length kept right), written to a file and read.
//! It fails on a panic (caught), on an input that takes more than 1 s, and on an input whose
//! reading allocates more than 64 MiB plus 16 times the input's bytes at its peak; one
//! allocation over 1 GiB, and an input still running after 20 s, abort the run at once (the
//! input is left at the path printed first). Failing inputs are kept in
//! `target/fuzz-failures/`. `--inputs` is per reader (default 400).

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor, Var};
use candle_lisa::data::chat::{read_chat_jsonl, ChatMessage, ChatTemplate};
use candle_lisa::data::{pad_batch, read_prompt_response_jsonl, Example};
use candle_lisa::models::{save_llama, save_llama_with, SaveOptions};
use candle_lisa::nn::{load_peft, save_peft, seed_adapters, LoraConfig};
use candle_lisa::train::{read_jsonl, Checkpointer, Constant, JsonlSink, MetricsSink, Trainer};
use candle_lisa::{load_llama, LisaAdamW, LisaConfig, Llama, LlamaConfig, TrainingPlan};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

type Error = Box<dyn std::error::Error>;

/// Counts live heap bytes and their peak; aborts on one allocation over 1 GiB.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
const LARGEST: usize = 1 << 30;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > LARGEST {
            oversized();
        }
        let p = System.alloc(layout);
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), SeqCst) + layout.size();
            PEAK.fetch_max(live, SeqCst);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        System.dealloc(p, layout);
        LIVE.fetch_sub(layout.size(), SeqCst);
    }
    unsafe fn realloc(&self, p: *mut u8, layout: Layout, size: usize) -> *mut u8 {
        if size > LARGEST {
            oversized();
        }
        let q = System.realloc(p, layout, size);
        if !q.is_null() {
            LIVE.fetch_sub(layout.size(), SeqCst);
            let live = LIVE.fetch_add(size, SeqCst) + size;
            PEAK.fetch_max(live, SeqCst);
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn oversized() -> ! {
    use std::io::Write;
    // No allocation here: the message is static.
    let _ = std::io::stderr()
        .write_all(b"fuzz: a reader asked for more than 1 GiB at once (the input: see above)\n");
    std::process::abort()
}

type Reader = Box<dyn Fn(&Path) -> candle_lisa::Result<()>>;

/// One reader under test: its seed inputs (each a set of files in one directory; one file of
/// the set is mutated per input) and the call that reads the directory.
struct Target {
    name: &'static str,
    /// Seed sets: (file name, bytes) each.
    seeds: Vec<Vec<(String, Vec<u8>)>>,
    /// Files of a set that are mutated (the others stay as seeded).
    mutate: Vec<&'static str>,
    /// Reads the directory; an `Err` is the expected outcome for most inputs.
    read: Reader,
    /// After mutating `optimizer.safetensors`, sometimes record its new hash in
    /// `optimizer.json`, so that the input gets past the torn-state check.
    fix_state_hash: bool,
    /// After mutating a file of a checkpoint, sometimes record its new size in the
    /// manifest, so that the input gets past the manifest's check.
    fix_manifest: bool,
}

fn tiny_config() -> LlamaConfig {
    let mut c = LlamaConfig::tiny(40, 16, 2, 2, 1);
    c.intermediate_size = 24;
    c
}

fn seeded(config: &LlamaConfig, seed: u64) -> Result<VarMap, Error> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let map = VarMap::new();
    for (name, shape) in config.tensor_shapes() {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| rng.random_range(-0.2f32..0.2)).collect();
        let t = Tensor::from_vec(values, shape, &Device::Cpu)?;
        map.data()
            .lock()
            .unwrap()
            .insert(name, Var::from_tensor(&t)?);
    }
    Ok(map)
}

fn files_of(dir: &Path) -> Result<Vec<(String, Vec<u8>)>, Error> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir)?.to_string_lossy().into_owned();
                out.push((rel, std::fs::read(&p)?));
            }
        }
    }
    out.sort();
    Ok(out)
}

fn lisa() -> LisaConfig {
    LisaConfig {
        gamma: 1,
        period: 2,
        seed: 3,
        ..Default::default()
    }
}

fn trainer(map: &VarMap) -> candle_lisa::Result<Trainer<Llama>> {
    let opt = LisaAdamW::new(map, Default::default(), lisa())?;
    let c = tiny_config();
    let schedule = Constant {
        lr: 1e-3,
        warmup: 0,
    };
    Trainer::new(
        opt,
        schedule,
        Default::default(),
        move |plan: &TrainingPlan| Llama::from_plan(&c, plan),
    )
}

/// A fresh copy of `map`'s weights, so that a reader that writes them (resume) leaves the
/// seed alone.
fn copy_of(map: &VarMap) -> candle_lisa::Result<VarMap> {
    let out = VarMap::new();
    for (name, var) in map.data().lock().unwrap().iter() {
        let t = var.as_tensor().copy()?;
        out.data()
            .lock()
            .unwrap()
            .insert(name.clone(), Var::from_tensor(&t)?);
    }
    Ok(out)
}

fn targets(work: &Path) -> Result<Vec<Target>, Error> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = tiny_config();
    let map = seeded(&config, 1)?;
    let mut out = Vec::new();

    // A model directory, whole, in f32 and bf16.
    let mut model_seeds = Vec::new();
    for (k, dtype) in [DType::F32, DType::BF16].into_iter().enumerate() {
        let dir = work.join(format!("seed-model-{k}"));
        save_llama(&dir, &config, &map, dtype)?;
        model_seeds.push(files_of(&dir)?);
    }
    out.push(Target {
        name: "safetensors header",
        seeds: model_seeds,
        mutate: vec!["model.safetensors"],
        read: Box::new(|dir| load_llama(dir, DType::F32, &Device::Cpu).map(|_| ())),
        fix_state_hash: false,
        fix_manifest: false,
    });

    // llama.cpp's format: the gguf-py fixture (every tensor type the loader reads).
    out.push(Target {
        name: "GGUF (load_gguf)",
        seeds: vec![vec![(
            "m.gguf".to_string(),
            std::fs::read(root.join("tests/fixtures/gguf/tiny.gguf"))?,
        )]],
        mutate: vec!["m.gguf"],
        read: Box::new(|dir| {
            candle_lisa::models::load_gguf(dir.join("m.gguf"), DType::F32, &Device::Cpu).map(|_| ())
        }),
        fix_state_hash: false,
        fix_manifest: false,
    });

    let mut configs = vec![vec![(
        "config.json".to_string(),
        std::fs::read(root.join("assets/tiny-llama/config.json"))?,
    )]];
    for e in std::fs::read_dir(root.join("tests/fixtures/parity"))? {
        let p = e?.path().join("config.json");
        if p.is_file() {
            configs.push(vec![("config.json".into(), std::fs::read(p)?)]);
        }
    }
    out.push(Target {
        name: "config.json",
        seeds: configs,
        mutate: vec!["config.json"],
        read: Box::new(|dir| LlamaConfig::from_file(dir.join("config.json")).map(|_| ())),
        fix_state_hash: false,
        fix_manifest: false,
    });

    // Sharded: every tensor in a shard of its own, and the index.
    let dir = work.join("seed-sharded");
    let options = SaveOptions {
        max_shard_bytes: 1,
        ..Default::default()
    };
    save_llama_with(&dir, &config, &map, DType::F32, &options)?;
    out.push(Target {
        name: "safetensors index",
        seeds: vec![files_of(&dir)?],
        mutate: vec!["model.safetensors.index.json"],
        read: Box::new(|dir| load_llama(dir, DType::F32, &Device::Cpu).map(|_| ())),
        fix_state_hash: false,
        fix_manifest: false,
    });

    // A checkpoint of three LISA steps (a redraw among them), with an optimizer state.
    let mut t = trainer(&copy_of(&map)?)?;
    let examples: Vec<Example> = (0..4u32)
        .map(|i| Example::prompt_response(&[1 + i, 2, 3], &[4 + i, 5], 39))
        .collect();
    let batch = pad_batch(&examples, 39, None, &Device::Cpu)?;
    for _ in 0..3 {
        t.step(std::slice::from_ref(&batch))?;
    }
    let run = serde_json::json!({"fuzz": 1});
    let ck_root = work.join("seed-checkpoints");
    let ck = Checkpointer::new(&ck_root, 2, &run)?;
    let ck_dir = t.save_checkpoint(&ck, |_| Ok(()))?;
    let ck_files: Vec<(String, Vec<u8>)> = files_of(&ck_root)?;
    let base = map.clone();
    let run2 = run.clone();
    out.push(Target {
        name: "checkpoint (manifest, trainer.json, weights)",
        seeds: vec![ck_files],
        mutate: vec![
            "step-000000003/manifest.json",
            "step-000000003/trainer.json",
            "step-000000003/weights.safetensors",
        ],
        read: Box::new(move |dir| {
            let ck = Checkpointer::new(dir, 2, &run2)?;
            ck.latest()?;
            let mut t = trainer(&copy_of(&base)?)?;
            t.resume(&ck).map(|_| ())
        }),
        fix_state_hash: false,
        fix_manifest: true,
    });

    let state = files_of(&ck_dir.join("optimizer"))?;
    let base = map.clone();
    out.push(Target {
        name: "optimizer state (load_state)",
        seeds: vec![state],
        mutate: vec!["optimizer.json", "optimizer.safetensors"],
        read: Box::new(move |dir| {
            let mut opt = LisaAdamW::new(&copy_of(&base)?, Default::default(), lisa())?;
            opt.load_state(dir)
        }),
        fix_state_hash: true,
        fix_manifest: false,
    });

    // A LoRA adapter saved by the crate, and the PEFT fixture.
    let adapters = VarMap::new();
    let lora = LoraConfig {
        rank: 2,
        alpha: 4.0,
        ..Default::default()
    };
    let vb = VarBuilder::from_varmap(&adapters, DType::F32, &Device::Cpu);
    Llama::with_lora(
        &config,
        candle_lisa::nn::frozen_var_builder(&map)?,
        &lora,
        vb,
    )?;
    seed_adapters(&adapters, 5)?;
    let dir = work.join("seed-adapter");
    save_peft(&dir, &adapters, &lora, Some("tiny"), DType::F32)?;
    let fixture = root.join("tests/fixtures/peft/llama-lora");
    let fixture: Vec<(String, Vec<u8>)> = ["adapter_config.json", "adapter_model.safetensors"]
        .iter()
        .map(|f| Ok((f.to_string(), std::fs::read(fixture.join(f))?)))
        .collect::<Result<_, Error>>()?;
    out.push(Target {
        name: "PEFT adapter",
        seeds: vec![files_of(&dir)?, fixture],
        mutate: vec!["adapter_config.json", "adapter_model.safetensors"],
        read: Box::new(|dir| load_peft(dir, DType::F32, &Device::Cpu).map(|_| ())),
        fix_state_hash: false,
        fix_manifest: false,
    });

    let pairs: String = candle_lisa::data::Task::Sort
        .problems(0)
        .iter()
        .take(20)
        .map(|(p, r)| serde_json::json!({"prompt": p, "response": r}).to_string() + "\n")
        .collect();
    out.push(Target {
        name: "prompt/response JSONL",
        seeds: vec![vec![("data.jsonl".into(), pairs.into_bytes())]],
        mutate: vec!["data.jsonl"],
        read: Box::new(|dir| read_prompt_response_jsonl(dir.join("data.jsonl")).map(|_| ())),
        fix_state_hash: false,
        fix_manifest: false,
    });

    let chat = std::fs::read_to_string(root.join("assets/chat.jsonl"))?;
    let chat: String = chat.lines().take(20).map(|l| format!("{l}\n")).collect();
    out.push(Target {
        name: "chat JSONL",
        seeds: vec![vec![("chat.jsonl".into(), chat.into_bytes())]],
        mutate: vec!["chat.jsonl"],
        read: Box::new(|dir| read_chat_jsonl(dir.join("chat.jsonl")).map(|_| ())),
        fix_state_hash: false,
        fix_manifest: false,
    });

    let metrics = work.join("seed-metrics.jsonl");
    let mut sink = JsonlSink::append(&metrics)?;
    for step in 1..=10u64 {
        sink.record(&serde_json::json!({
            "method": "lisa", "step": step, "loss": 2.5 / step as f64, "lr": 1e-3,
            "grad_norm": 0.5, "skipped": false, "active_blocks": [0, 1],
            "eval_loss": if step % 5 == 0 { serde_json::json!(1.5) } else { serde_json::Value::Null },
        }))?;
    }
    drop(sink);
    out.push(Target {
        name: "metrics JSONL (read_jsonl)",
        seeds: vec![vec![("metrics.jsonl".into(), std::fs::read(&metrics)?)]],
        mutate: vec!["metrics.jsonl"],
        read: Box::new(|dir| read_jsonl(dir.join("metrics.jsonl")).map(|_| ())),
        fix_state_hash: false,
        fix_manifest: false,
    });

    let mut templates = vec![vec![(
        "chat_template.jinja".to_string(),
        std::fs::read(root.join("assets/chat_template.jinja"))?,
    )]];
    for name in ["chatml", "llama3"] {
        let p = root
            .join("tests/fixtures/chat")
            .join(name)
            .join("chat_template.jinja");
        templates.push(vec![("chat_template.jinja".into(), std::fs::read(p)?)]);
    }
    out.push(Target {
        name: "chat template (new, render)",
        seeds: templates,
        mutate: vec!["chat_template.jinja"],
        read: Box::new(|dir| {
            let bytes = std::fs::read(dir.join("chat_template.jinja")).map_err(|source| {
                candle_lisa::LisaError::Io {
                    action: "cannot read",
                    path: dir.to_path_buf(),
                    source,
                }
            })?;
            let source = String::from_utf8_lossy(&bytes);
            let template = ChatTemplate::new(&source, Some("<s>"), Some("</s>"))?;
            let chat = [
                ChatMessage::new("system", "Be brief."),
                ChatMessage::new("user", "31415="),
                ChatMessage::new("assistant", "11345"),
                ChatMessage::new("user", "27182="),
            ];
            template.render(&chat, true)?;
            template.render_with_assistant_spans(&chat[..3]).map(|_| ())
        }),
        fix_state_hash: false,
        fix_manifest: false,
    });
    Ok(out)
}

const NUMBERS: &[&str] = &[
    "0",
    "-1",
    "1",
    "-0",
    "255",
    "65536",
    "2147483648",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999999",
    "1e308",
    "-1e308",
    "1e999",
    "5e-324",
    "0.5",
    "NaN",
    "null",
];

const VALUES: &[&str] = &[
    "null",
    "true",
    "\"\"",
    "[]",
    "{}",
    "[-1]",
    "[18446744073709551615, 18446744073709551615]",
    "\"F32\"",
    "\"../../etc/passwd\"",
    "\"/abs\"",
    "[0, 18446744073709551615]",
    "[4294967296, 4294967296, 4294967296]",
    "{\"a\": 1}",
];

fn boundary_u64(rng: &mut ChaCha8Rng, len: usize) -> u64 {
    match rng.random_range(0..8) {
        0 => 0,
        1 => u64::MAX,
        2 => 1 << 63,
        3 => u32::MAX as u64 + 1,
        4 => len as u64,
        5 => len as u64 + 1,
        6 => (len as u64).wrapping_sub(8),
        _ => 100 << 20,
    }
}

/// Replaces one number in `text` with a boundary value.
fn replace_number(rng: &mut ChaCha8Rng, text: &mut Vec<u8>) {
    let starts: Vec<usize> = (0..text.len())
        .filter(|&i| text[i].is_ascii_digit() && (i == 0 || !text[i - 1].is_ascii_alphanumeric()))
        .collect();
    if starts.is_empty() {
        return;
    }
    let a = starts[rng.random_range(0..starts.len())];
    let mut b = a;
    while b < text.len() && (text[b].is_ascii_digit() || b"+-.eE".contains(&text[b])) {
        b += 1;
    }
    let n = NUMBERS[rng.random_range(0..NUMBERS.len())];
    text.splice(a..b, n.bytes());
}

/// A JSON-level mutation of an object: a key removed, duplicated (textually: JSON allows it
/// in the text), or given a value of another type, at any depth.
fn mutate_json(rng: &mut ChaCha8Rng, value: &mut serde_json::Value) -> Option<String> {
    use serde_json::Value;
    // Walk down to a random object.
    let mut path: Vec<String> = Vec::new();
    let mut node = &*value;
    loop {
        let keys: Vec<String> = match node {
            Value::Object(m) => m.keys().cloned().collect(),
            Value::Array(a) if !a.is_empty() => (0..a.len()).map(|i| i.to_string()).collect(),
            _ => break,
        };
        if keys.is_empty() || (!path.is_empty() && rng.random_bool(0.4)) {
            break;
        }
        let k = keys[rng.random_range(0..keys.len())].clone();
        let next = match node {
            Value::Object(m) => &m[&k],
            Value::Array(a) => &a[k.parse::<usize>().ok()?],
            _ => unreachable!(),
        };
        if !matches!(next, Value::Object(_) | Value::Array(_)) {
            path.push(k);
            break;
        }
        path.push(k);
        node = next;
    }
    let key = path.pop()?;
    let parent = path.iter().try_fold(&mut *value, |v, k| match v {
        Value::Object(m) => m.get_mut(k),
        Value::Array(a) => a.get_mut(k.parse::<usize>().ok()?),
        _ => None,
    })?;
    let new: Value = serde_json::from_str(VALUES[rng.random_range(0..VALUES.len())]).ok()?;
    match (rng.random_range(0..3), parent) {
        (0, Value::Object(m)) => {
            m.remove(&key);
        }
        (1, Value::Object(m)) => {
            // Duplicate the key: a map holds it once, so a stand-in key is renamed in the text.
            m.insert("\u{1}dup".into(), new);
            let text = serde_json::to_string(value).ok()?;
            return Some(text.replace("\"\\u0001dup\"", &serde_json::to_string(&key).ok()?));
        }
        (_, Value::Object(m)) => {
            m.insert(key, new);
        }
        (_, Value::Array(a)) => {
            let i: usize = key.parse().ok()?;
            match rng.random_bool(0.5) {
                true => a[i] = new,
                false => {
                    a.remove(i);
                }
            }
        }
        _ => return None,
    }
    serde_json::to_string(value).ok()
}

/// One mutation of `data`; `other` is another seed file, for splices.
fn mutate(rng: &mut ChaCha8Rng, data: &mut Vec<u8>, other: &[u8]) {
    let len = data.len();
    let pos = |rng: &mut ChaCha8Rng| rng.random_range(0..=len);
    match rng.random_range(0..11) {
        0 if len > 0 => {
            for _ in 0..rng.random_range(1..=8) {
                let i = rng.random_range(0..len);
                data[i] ^= 1 << rng.random_range(0..8);
            }
        }
        1 if len > 0 => {
            let i = rng.random_range(0..len);
            data[i] = [0u8, 0xff, 0x7f, 0x80, b'"', b'{', b'}', b'\n'][rng.random_range(0..8)];
        }
        2 => data.truncate(pos(rng)),
        3 => {
            let a = pos(rng);
            let b = (a + rng.random_range(0..64)).min(len);
            data.drain(a..b);
        }
        4 => {
            let a = pos(rng);
            let b = (a + rng.random_range(0..256)).min(len);
            let chunk = data[a..b].to_vec();
            let at = pos(rng);
            data.splice(at..at, chunk);
        }
        5 if !other.is_empty() => {
            let a = rng.random_range(0..other.len());
            let b = (a + rng.random_range(0..512)).min(other.len());
            let at = pos(rng);
            let end = (at + rng.random_range(0..512)).min(len);
            data.splice(at..end, other[a..b].iter().copied());
        }
        6 if len >= 8 => {
            // A boundary integer at the start (the safetensors header length) or anywhere.
            let at = match rng.random_bool(0.5) {
                true => 0,
                false => rng.random_range(0..=len - 8),
            };
            let v = boundary_u64(rng, len);
            data[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        7 | 8 => replace_number(rng, data),
        9 => {
            // JSON-level: the whole file, or a safetensors header kept self-consistent.
            if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(data) {
                if let Some(text) = mutate_json(rng, &mut v) {
                    *data = text.into_bytes();
                }
            } else if len >= 8 {
                let n = u64::from_le_bytes(data[..8].try_into().unwrap()) as usize;
                if n <= len - 8 {
                    if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&data[8..8 + n])
                    {
                        if let Some(text) = mutate_json(rng, &mut v) {
                            let mut out = (text.len() as u64).to_le_bytes().to_vec();
                            out.extend_from_slice(text.as_bytes());
                            out.extend_from_slice(&data[8 + n..]);
                            *data = out;
                        }
                    }
                }
            }
        }
        _ => {
            // Lines: one removed, duplicated or swapped with another seed's.
            let mut lines: Vec<Vec<u8>> = data.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
            let i = rng.random_range(0..lines.len());
            match rng.random_range(0..3) {
                0 => {
                    lines.remove(i);
                }
                1 => {
                    let l = lines[i].clone();
                    lines.insert(i, l);
                }
                _ => {
                    let theirs: Vec<&[u8]> = other.split(|&b| b == b'\n').collect();
                    lines[i] = theirs[rng.random_range(0..theirs.len())].to_vec();
                }
            }
            *data = lines.join(&b'\n');
        }
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What went wrong with one input.
struct Failure {
    kind: &'static str,
    detail: String,
}

static PANIC: Mutex<Option<String>> = Mutex::new(None);
static RUNNING_SINCE_MS: AtomicU64 = AtomicU64::new(0);
static DONE: AtomicBool = AtomicBool::new(false);

fn main() -> Result<(), Error> {
    let mut inputs = 400usize;
    let mut seed = 1u64;
    let mut only: Option<Vec<String>> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--inputs" => inputs = args.next().ok_or("--inputs N")?.parse()?,
            "--seed" => seed = args.next().ok_or("--seed S")?.parse()?,
            "--reader" => {
                only = Some(
                    args.next()
                        .ok_or("--reader NAME,…")?
                        .split(',')
                        .map(String::from)
                        .collect(),
                )
            }
            "--bench" => {}
            other => {
                return Err(format!(
                    "unknown argument {other}: --inputs N, --seed S, --reader NAME,…"
                )
                .into())
            }
        }
    }
    std::panic::set_hook(Box::new(|info| {
        let at = info
            .location()
            .map_or(String::new(), |l| format!("{}:{}", l.file(), l.line()));
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        *PANIC.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("{at}: {msg}"));
    }));
    let scratch = match Path::new("/dev/shm").is_dir() {
        true => tempfile::tempdir_in("/dev/shm")?,
        false => tempfile::tempdir()?,
    };
    let failures_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-failures");
    let all = targets(&scratch.path().join("seeds"))?;
    let started = Instant::now();
    std::thread::spawn(|| loop {
        std::thread::sleep(Duration::from_millis(500));
        let since = RUNNING_SINCE_MS.load(SeqCst);
        let now = started_ms();
        if !DONE.load(SeqCst) && since > 0 && now.saturating_sub(since) > 20_000 {
            eprintln!("fuzz: an input has run for 20 s (a hang); it is left in place, see above");
            std::process::exit(3);
        }
    });
    let mut table = Vec::new();
    let mut failed_total = 0;
    for (t_index, target) in all.iter().enumerate() {
        if only
            .as_ref()
            .is_some_and(|o| !o.iter().any(|n| target.name.starts_with(n.as_str())))
        {
            continue;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ ((t_index as u64) << 32));
        let dir = scratch.path().join(format!("input-{t_index}"));
        eprintln!(
            "fuzz: {} ({inputs} inputs; the current one is in {})",
            target.name,
            dir.display()
        );
        let mut failures: BTreeMap<String, (usize, PathBuf)> = BTreeMap::new();
        let mut slowest = Duration::ZERO;
        let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
        for n in 0..inputs {
            let set = &target.seeds[rng.random_range(0..target.seeds.len())];
            let which = target.mutate[rng.random_range(0..target.mutate.len())];
            let _ = std::fs::remove_dir_all(&dir);
            let mut written = 0usize;
            let mut fixed_state: Option<Vec<u8>> = None;
            for (name, bytes) in set {
                let path = dir.join(name);
                std::fs::create_dir_all(path.parent().unwrap())?;
                if name == which {
                    let mut data = bytes.clone();
                    let other_set = &target.seeds[rng.random_range(0..target.seeds.len())];
                    let other = &other_set[rng.random_range(0..other_set.len())].1;
                    for _ in 0..rng.random_range(1..=3) {
                        mutate(&mut rng, &mut data, other);
                    }
                    if target.fix_state_hash
                        && name == "optimizer.safetensors"
                        && rng.random_bool(0.5)
                    {
                        fixed_state = Some(data.clone());
                    }
                    written += data.len();
                    std::fs::write(&path, &data)?;
                } else {
                    written += bytes.len();
                    std::fs::write(&path, bytes)?;
                }
            }
            if let Some((step_dir, file)) = which.split_once('/').filter(|_| target.fix_manifest) {
                if file != "manifest.json" && rng.random_bool(0.5) {
                    let manifest = dir.join(step_dir).join("manifest.json");
                    let mut v: serde_json::Value =
                        serde_json::from_slice(&std::fs::read(&manifest)?)?;
                    let len = std::fs::metadata(dir.join(which))?.len();
                    v["files"][file] = len.into();
                    std::fs::write(&manifest, v.to_string())?;
                }
            }
            if let Some(state) = fixed_state {
                let json = dir.join("optimizer.json");
                let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json)?)?;
                v["tensors_sha256"] = sha256_hex(&state).into();
                std::fs::write(&json, v.to_string())?;
            }
            let base = LIVE.load(SeqCst);
            PEAK.store(base, SeqCst);
            RUNNING_SINCE_MS.store(started_ms().max(1), SeqCst);
            let t0 = Instant::now();
            let result = catch_unwind(AssertUnwindSafe(|| (target.read)(&dir)));
            let took = t0.elapsed();
            RUNNING_SINCE_MS.store(0, SeqCst);
            let grew = PEAK.load(SeqCst).saturating_sub(base);
            slowest = slowest.max(took);
            let limit = (64 << 20) + 16 * written;
            let failure = match result {
                Err(_) => Some(Failure {
                    kind: "panic",
                    detail: PANIC.lock().unwrap().take().unwrap_or_default(),
                }),
                Ok(_) if took > Duration::from_secs(1) => Some(Failure {
                    kind: "slow",
                    detail: format!("{took:?}"),
                }),
                Ok(_) if grew > limit => Some(Failure {
                    kind: "memory",
                    detail: format!("{grew} bytes for {written} bytes of input"),
                }),
                Ok(Ok(())) => {
                    *outcomes.entry("ok".into()).or_default() += 1;
                    None
                }
                Ok(Err(e)) => {
                    let kind = format!("{e:?}");
                    let kind = kind
                        .split([' ', '(', '{'])
                        .next()
                        .unwrap_or_default()
                        .to_string();
                    *outcomes.entry(kind).or_default() += 1;
                    None
                }
            };
            if let Some(f) = failure {
                let key = format!("{}: {}", f.kind, f.detail);
                let entry = failures.entry(key).or_insert_with(|| {
                    let keep = failures_dir.join(format!("{t_index}-{n}"));
                    let _ = std::fs::create_dir_all(&keep);
                    for (name, _) in set {
                        let to = keep.join(name.replace('/', "_"));
                        let _ = std::fs::copy(dir.join(name), to);
                    }
                    (0, keep)
                });
                entry.0 += 1;
            }
        }
        let found: usize = failures.values().map(|(c, _)| c).sum();
        failed_total += found;
        for (key, (count, keep)) in &failures {
            eprintln!("  FAIL x{count}: {key} (an input: {})", keep.display());
        }
        eprintln!("  outcomes: {outcomes:?}; slowest input {slowest:?}");
        table.push((target.name, inputs, failures.len(), found, slowest));
    }
    DONE.store(true, SeqCst);
    println!("| reader | inputs | distinct failures | failing inputs | slowest input |");
    println!("|---|---:|---:|---:|---:|");
    for (name, inputs, distinct, found, slowest) in &table {
        println!(
            "| {name} | {inputs} | {distinct} | {found} | {:.1} ms |",
            slowest.as_secs_f64() * 1e3
        );
    }
    println!("seed {seed}, {:.0} s", started.elapsed().as_secs_f64());
    if failed_total > 0 {
        return Err(format!("{failed_total} failing inputs").into());
    }
    Ok(())
}

fn started_ms() -> u64 {
    use std::sync::OnceLock;
    static T0: OnceLock<Instant> = OnceLock::new();
    T0.get_or_init(Instant::now).elapsed().as_millis() as u64
}
