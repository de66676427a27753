//! The library trainer: padding, accumulation, clipping, weight-decay groups, the
//! non-finite guard, crash-safe checkpoints and exact resume.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_lisa::data::{pack_examples, pad_batch, Batch, Example};
use candle_lisa::optim::GradScaling;
use candle_lisa::train::{Checkpointer, Constant, StepReport, Trainer, TrainerConfig};
use candle_lisa::{LisaAdamW, LisaError, Llama, LlamaConfig, TrainingPlan};
use candle_nn::{ParamsAdamW, VarMap};

fn config() -> LlamaConfig {
    let mut c = LlamaConfig::tiny(40, 32, 4, 4, 2);
    c.intermediate_size = 64;
    c
}

fn varmap() -> candle_core::Result<VarMap> {
    crate::common::seeded_llama(&config(), 9)
}

fn examples() -> Vec<Example> {
    (0..6u32)
        .map(|i| {
            let prompt: Vec<u32> = (0..3 + i % 3).map(|k| (i * 5 + k * 3) % 39).collect();
            let response: Vec<u32> = (0..2 + i % 4).map(|k| (i * 7 + k) % 39).collect();
            Example::prompt_response(&prompt, &response, 39)
        })
        .collect()
}

fn params() -> ParamsAdamW {
    ParamsAdamW {
        lr: 1e-2,
        weight_decay: 0.1,
        ..Default::default()
    }
}

fn lisa(varmap: &VarMap) -> candle_lisa::Result<LisaAdamW> {
    lisa_with(varmap, params())
}

fn lisa_with(varmap: &VarMap, params: ParamsAdamW) -> candle_lisa::Result<LisaAdamW> {
    crate::common::lisa_gamma2(varmap, params, 2, 4)
}

fn trainer(varmap: &VarMap, config: TrainerConfig) -> candle_lisa::Result<Trainer<Llama>> {
    trainer_with(varmap, config, params())
}

fn trainer_with(
    varmap: &VarMap,
    config: TrainerConfig,
    params: ParamsAdamW,
) -> candle_lisa::Result<Trainer<Llama>> {
    let c = self::config();
    let build = move |plan: &TrainingPlan| Llama::from_plan(&c, plan);
    let schedule = Constant {
        lr: params.lr,
        warmup: 0,
    };
    Trainer::new(lisa_with(varmap, params)?, schedule, config, build)
}

fn values(varmap: &VarMap) -> Vec<(String, Vec<f32>)> {
    let data = varmap.data().lock().unwrap();
    let mut out: Vec<_> = data
        .iter()
        .map(|(n, v)| {
            let t = v
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            (n.clone(), t.to_vec1::<f32>().unwrap())
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// A right-padded batch gives each example the loss and gradients it has alone: the loss is
/// the token-weighted mean of the examples' own losses, and so is every gradient.
#[test]
fn padding_stays_out_of_loss_and_attention() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let varmap = varmap()?;
    let opt = LisaAdamW::all_trainable(candle_lisa::nn::named_vars(&varmap)?, params())?;
    let model = Llama::from_plan(&config(), &opt.plan())?;
    let ex = examples();
    let batch = pad_batch(&ex, 0, None, &dev)?;
    assert_eq!(
        batch.tokens,
        ex.iter().map(Example::trained_tokens).sum::<usize>()
    );
    let loss = model.loss(&batch.ids, &batch.labels)?;
    let grads = loss.backward()?;
    let (mut want_loss, mut want_grads) = (0.0f64, Vec::<Tensor>::new());
    let vars: Vec<Var> = opt.vars().map(|(_, v)| v.clone()).collect();
    for e in &ex {
        let alone = pad_batch(std::slice::from_ref(e), 0, None, &dev)?;
        let w = e.trained_tokens() as f64 / batch.tokens as f64;
        let l = model.loss(&alone.ids, &alone.labels)?;
        want_loss += l.to_scalar::<f32>()? as f64 * w;
        let g = (l * w)?.backward()?;
        for (i, v) in vars.iter().enumerate() {
            let gi = g.get(v.as_tensor()).unwrap().clone();
            match want_grads.get_mut(i) {
                Some(acc) => *acc = (&*acc + gi)?,
                None => want_grads.push(gi),
            }
        }
    }
    let got = loss.to_scalar::<f32>()? as f64;
    assert!(
        (got - want_loss).abs() < 1e-5 * want_loss,
        "{got} vs {want_loss}"
    );
    for (v, want) in vars.iter().zip(&want_grads) {
        let got = grads.get(v.as_tensor()).unwrap();
        let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(
            diff <= 1e-5 * scale.max(1e-3),
            "gradient differs by {diff} (max {scale})"
        );
    }
    Ok(())
}

#[test]
fn pad_batch_and_packing_errors() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    assert!(matches!(
        pad_batch(&[], 0, None, &dev),
        Err(LisaError::InvalidArgument { .. })
    ));
    let bad = Example {
        ids: vec![1, 2],
        labels: vec![1],
    };
    assert!(matches!(
        pad_batch(&[bad], 0, None, &dev),
        Err(LisaError::InvalidArgument { .. })
    ));
    let b = pad_batch(&examples(), 7, Some(5), &dev)?;
    assert_eq!(b.ids.dims(), [6, 5]);
    let packed = pack_examples(&examples(), 12);
    let total: usize = examples().iter().map(|e| e.ids.len()).sum();
    assert_eq!(packed.iter().map(|e| e.ids.len()).sum::<usize>(), total);
    assert!(packed
        .iter()
        .all(|e| e.ids.len() <= 12 && e.ids.len() == e.labels.len()));
    Ok(())
}

/// Two micro-batches accumulate to the gradient of the whole batch: at every step the loss
/// and the gradient norm match a one-batch run within 1e-5 relative (a plain mean of the two
/// micro-batch losses would be off by far more: their token counts differ), and so do the
/// weights after five steps through resamples, within 1e-6 relative. ε = 1 makes the AdamW
/// update nearly linear in the gradient here; with a tiny ε it is about lr·sign(g), which
/// turns f32 rounding of near-zero gradients (the batches are padded to other lengths, so
/// sums run in another order) into whole steps.
#[test]
fn accumulation_matches_one_large_batch() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let ex = examples();
    let whole = pad_batch(&ex, 0, None, &dev)?;
    let halves = [
        pad_batch(&ex[..2], 0, None, &dev)?,
        pad_batch(&ex[2..], 0, None, &dev)?,
    ];
    let cfg = TrainerConfig {
        max_grad_norm: None,
        ..Default::default()
    };
    let (a, b) = (varmap()?, varmap()?);
    let linear = ParamsAdamW {
        eps: 1.0,
        ..params()
    };
    let (mut ta, mut tb) = (
        trainer_with(&a, cfg.clone(), linear.clone())?,
        trainer_with(&b, cfg, linear)?,
    );
    for _ in 0..5 {
        let (ra, rb) = (ta.step(std::slice::from_ref(&whole))?, tb.step(&halves)?);
        assert!((ra.loss - rb.loss).abs() < 1e-5 * ra.loss, "{ra:?} {rb:?}");
        assert_eq!(ra.resampled, rb.resampled);
        assert!((ra.grad_norm - rb.grad_norm).abs() < 1e-5 * ra.grad_norm);
    }
    assert_eq!(ta.optimizer().period_index(), 2);
    for ((n, x), (_, y)) in values(&a).iter().zip(values(&b)) {
        for (x, y) in x.iter().zip(&y) {
            assert!((x - y).abs() <= 1e-6 * x.abs().max(1e-2), "{n}: {x} vs {y}");
        }
    }
    Ok(())
}

/// Clipping multiplies the gradients by max_norm / norm inside the update: the same bits as
/// the optimizer stepping on gradients scaled by hand. The norm is reported before clipping.
#[test]
fn clipping_scales_by_max_over_norm() -> Result<(), Box<dyn std::error::Error>> {
    let batch = pad_batch(&examples(), 0, None, &Device::Cpu)?;
    let clipped = varmap()?;
    let cfg = TrainerConfig {
        max_grad_norm: Some(0.05),
        ..Default::default()
    };
    let mut t = trainer(&clipped, cfg)?;
    let report: StepReport = t.step(std::slice::from_ref(&batch))?;

    let manual = varmap()?;
    let mut opt = lisa(&manual)?;
    opt.set_weight_decay_filter(candle_lisa::optim::no_decay_default);
    let model = Llama::from_plan(&config(), &opt.plan())?;
    let grads = model.loss(&batch.ids, &batch.labels)?.backward()?;
    let norm = opt.grad_norm(&grads)?;
    let by_hand: f64 = opt
        .trainable_vars()
        .map(|(_, v)| {
            grads
                .get(v.as_tensor())
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
        })
        .map(|s| s.to_scalar::<f32>().unwrap() as f64)
        .sum::<f64>()
        .sqrt();
    assert!((norm - by_hand).abs() < 1e-4 * by_hand);
    assert!(norm > 0.05);
    assert_eq!(report.grad_norm, norm);
    opt.try_step_with(&grads, GradScaling::By(0.05 / (norm + 1e-6)))?;
    assert_eq!(values(&clipped), values(&manual));
    Ok(())
}

/// The default filter leaves norms and the embedding out of weight decay.
#[test]
fn weight_decay_groups() -> Result<(), Box<dyn std::error::Error>> {
    let varmap = varmap()?;
    let t = trainer(&varmap, TrainerConfig::default())?;
    let opt = t.optimizer();
    assert!(opt.excluded_from_weight_decay("model.norm.weight"));
    assert!(opt.excluded_from_weight_decay("model.embed_tokens.weight"));
    assert!(!opt.excluded_from_weight_decay("lm_head.weight"));
    let t = trainer(
        &varmap,
        TrainerConfig {
            decay_filter: false,
            ..Default::default()
        },
    )?;
    assert!(!t
        .optimizer()
        .excluded_from_weight_decay("model.norm.weight"));
    Ok(())
}

/// A NaN loss skips the step and writes nothing; too many in a row is an error.
#[test]
fn non_finite_steps_are_skipped_then_stop() -> Result<(), Box<dyn std::error::Error>> {
    let varmap = varmap()?;
    let cfg = TrainerConfig {
        max_consecutive_non_finite: 3,
        ..Default::default()
    };
    let mut t = trainer(&varmap, cfg)?;
    let good = pad_batch(&examples(), 0, None, &Device::Cpu)?;
    t.step(std::slice::from_ref(&good))?;
    let before = values(&varmap);
    // Labels past the vocabulary are clamped; ids past it cannot be looked up. A NaN weight
    // in the head makes the loss NaN.
    let head = varmap.data().lock().unwrap()["lm_head.weight"].clone();
    let saved = head.as_tensor().copy()?;
    head.set(&(saved.ones_like()? * f64::NAN)?)?;
    let nan_before = values(&varmap);
    for i in 1..=2 {
        let r = t.step(std::slice::from_ref(&good))?;
        assert!(r.skipped && r.step == 1, "{r:?}");
        assert_eq!(t.skipped_steps(), i);
        assert!(values(&varmap)
            .iter()
            .zip(&nan_before)
            .all(|(a, b)| a.0 == b.0
                && a.1
                    .iter()
                    .zip(&b.1)
                    .all(|(x, y)| x.to_bits() == y.to_bits())));
    }
    assert!(matches!(
        t.step(std::slice::from_ref(&good)),
        Err(LisaError::TooManyNonFinite { consecutive: 3 })
    ));
    head.set(&saved)?;
    assert_eq!(values(&varmap), before);
    Ok(())
}

/// Checkpoints: a stopped and resumed run is bit-identical to the uninterrupted one; only
/// the newest `keep` remain; an interrupted save (no manifest, or a truncated file) is
/// skipped; a checkpoint of another run is refused and changes nothing.
#[test]
fn checkpoints_resume_exactly_and_survive_interruptions() -> Result<(), Box<dyn std::error::Error>>
{
    let dev = Device::Cpu;
    let batches: Vec<Batch> = (0..6)
        .map(|i| {
            let ex = examples();
            pad_batch(&ex[i % 3..i % 3 + 3], 0, None, &dev).unwrap()
        })
        .collect();
    let run_config = serde_json::json!({"test": "resume", "lr": 1e-2});
    let straight = varmap()?;
    let mut t = trainer(&straight, TrainerConfig::default())?;
    for b in &batches {
        t.step(std::slice::from_ref(b))?;
    }

    let root = tempfile::tempdir()?;
    let ck = Checkpointer::new(root.path(), 2, &run_config)?;
    let first = varmap()?;
    let mut t1 = trainer(&first, TrainerConfig::default())?;
    for (i, b) in batches.iter().take(4).enumerate() {
        t1.step(std::slice::from_ref(b))?;
        t1.save_checkpoint(&ck, |_| Ok(()))?;
        assert_eq!(ck.latest()?.unwrap().step, i as u64 + 1);
    }
    let mut dirs: Vec<String> = std::fs::read_dir(root.path())?
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    assert_eq!(dirs, ["step-000000003", "step-000000004"]);

    // An interrupted save of step 5: files without a manifest, under the final name.
    let fake = root.path().join(Checkpointer::dir_name(5));
    std::fs::create_dir_all(&fake)?;
    std::fs::write(fake.join("weights.safetensors"), b"partial")?;
    // A checkpoint whose weights file was cut short.
    let step4 = root.path().join(Checkpointer::dir_name(4));
    let w = step4.join("weights.safetensors");
    let full = std::fs::read(&w)?;
    std::fs::write(&w, &full[..full.len() / 2])?;
    assert_eq!(ck.latest()?.unwrap().step, 3);
    std::fs::write(&w, &full)?;

    let resumed = varmap()?;
    let mut t2 = trainer(&resumed, TrainerConfig::default())?;
    assert_eq!(t2.resume(&ck)?, Some(4));
    for b in &batches[4..] {
        t2.step(std::slice::from_ref(b))?;
    }
    assert_eq!(values(&resumed), values(&straight));
    assert_eq!(
        t2.optimizer().active_blocks(),
        t.optimizer().active_blocks()
    );

    let other = Checkpointer::new(root.path(), 2, &serde_json::json!({"test": "other"}))?;
    let fresh = varmap()?;
    let mut t3 = trainer(&fresh, TrainerConfig::default())?;
    assert!(matches!(
        t3.resume(&other),
        Err(LisaError::CheckpointMismatch { .. })
    ));
    assert_eq!(values(&fresh), values(&varmap()?));
    assert_eq!(t3.optimizer().step_count(), 0);
    Ok(())
}

/// A line torn by a kill (no newline) is cut off when the sink reopens the file, so the next
/// record gets a line of its own; the reader skips a torn last line and names any other bad one.
#[test]
fn torn_metrics_lines_are_cut_and_skipped() -> Result<(), Box<dyn std::error::Error>> {
    use candle_lisa::train::{read_jsonl, JsonlSink, MetricsSink};
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("metrics.jsonl");
    std::fs::write(
        &path,
        "{\"step\":1}\n{\"step\":2}\n{\"method\":\"lisa\",\"st",
    )?;
    let steps = |records: Vec<serde_json::Value>| -> Vec<u64> {
        records
            .iter()
            .map(|r| r["step"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(steps(read_jsonl(&path)?), [1, 2]);
    let mut sink = JsonlSink::append(&path)?;
    sink.record(&serde_json::json!({"step": 3}))?;
    drop(sink);
    assert_eq!(
        std::fs::read_to_string(&path)?,
        "{\"step\":1}\n{\"step\":2}\n{\"step\":3}\n"
    );
    assert_eq!(steps(read_jsonl(&path)?), [1, 2, 3]);
    // A whole last line without its newline is kept and ended.
    std::fs::write(&path, "{\"step\":1}\n{\"step\":2}")?;
    JsonlSink::append(&path)?.record(&serde_json::json!({"step": 3}))?;
    assert_eq!(steps(read_jsonl(&path)?), [1, 2, 3]);
    std::fs::write(&path, "{\"step\":1}\n{\"st\n{\"step\":3}\n")?;
    match read_jsonl(&path) {
        Err(LisaError::InvalidData { path, .. }) => {
            assert!(
                path.to_string_lossy().ends_with("metrics.jsonl:2"),
                "{path:?}"
            )
        }
        other => panic!("{other:?}"),
    }
    Ok(())
}

/// One decoded `tensorboard.Event`: step, file_version, session_log status, scalars.
#[derive(Debug, Default, PartialEq)]
struct Event {
    wall_time: f64,
    step: i64,
    file_version: Option<String>,
    session_status: Option<u64>,
    scalars: Vec<(String, f32)>,
}

/// CRC-32C bit by bit (the sink uses a table), masked as TFRecord stores it.
fn masked_crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0x82f6_3b78 & 0u32.wrapping_sub(crc & 1));
        }
    }
    (!crc).rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(b: &[u8], i: &mut usize) -> u64 {
    let (mut x, mut shift) = (0u64, 0);
    loop {
        let byte = b[*i];
        *i += 1;
        x |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return x;
        }
        shift += 7;
    }
}

/// The (field, wire type, payload) triples of a protobuf message; varints come as 8 LE bytes.
fn fields(b: &[u8]) -> Vec<(u64, u64, Vec<u8>)> {
    let (mut out, mut i) = (Vec::new(), 0);
    while i < b.len() {
        let key = varint(b, &mut i);
        let payload = match key & 7 {
            0 => varint(b, &mut i).to_le_bytes().to_vec(),
            1 => (b[i..i + 8].to_vec(), i += 8).0,
            2 => {
                let n = varint(b, &mut i) as usize;
                (b[i..i + n].to_vec(), i += n).0
            }
            5 => (b[i..i + 4].to_vec(), i += 4).0,
            w => panic!("wire type {w}"),
        };
        out.push((key >> 3, key & 7, payload));
    }
    out
}

/// Reads an event file, checking both CRCs of every record.
fn read_events(path: &Path) -> Vec<Event> {
    let bytes = std::fs::read(path).unwrap();
    let (mut events, mut i) = (Vec::new(), 0);
    while i < bytes.len() {
        let len = &bytes[i..i + 8];
        let n = u64::from_le_bytes(len.try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(bytes[i + 8..i + 12].try_into().unwrap());
        assert_eq!(crc, masked_crc32c(len), "length CRC at {i}");
        let data = &bytes[i + 12..i + 12 + n];
        let crc = u32::from_le_bytes(bytes[i + 12 + n..i + 16 + n].try_into().unwrap());
        assert_eq!(crc, masked_crc32c(data), "data CRC at {i}");
        i += 16 + n;
        let mut e = Event::default();
        for (field, wire, p) in fields(data) {
            match (field, wire) {
                (1, 1) => e.wall_time = f64::from_le_bytes(p.try_into().unwrap()),
                (2, 0) => e.step = i64::from_le_bytes(p.try_into().unwrap()),
                (3, 2) => e.file_version = Some(String::from_utf8(p).unwrap()),
                (5, 2) => {
                    for (_, _, value) in fields(&p) {
                        let v = fields(&value);
                        assert_eq!((v[0].0, v[0].1, v[1].0, v[1].1), (1, 2, 2, 5));
                        e.scalars.push((
                            String::from_utf8(v[0].2.clone()).unwrap(),
                            f32::from_le_bytes(v[1].2.clone().try_into().unwrap()),
                        ));
                    }
                }
                (7, 2) => {
                    e.session_status =
                        Some(u64::from_le_bytes(fields(&p)[0].2[..8].try_into().unwrap()))
                }
                other => panic!("unexpected field {other:?}"),
            }
        }
        events.push(e);
    }
    events
}

/// Numbers become scalars at the record's step, framed and checksummed as TensorFlow does; a
/// resumed sink starts with a session start at its step, in a file of its own.
#[test]
fn tensorboard_events_read_back() -> Result<(), Box<dyn std::error::Error>> {
    use candle_lisa::train::{MetricsSink, TensorBoardSink};
    let dir = tempfile::tempdir()?;
    let run = dir.path().join("runs").join("lisa");
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    let mut sink = TensorBoardSink::create(&run, 0)?;
    sink.record(&serde_json::json!({
        "method": "lisa", "step": 1, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.75,
        "active_blocks": [0, 3], "eval_accuracy": null,
    }))?;
    sink.record(
        &serde_json::json!({"step": 300, "loss": 1.25, "eval_loss": 1.5, "eval_accuracy": 0.875}),
    )?;
    sink.record(&serde_json::json!({"step": 301, "method": "lisa"}))?;
    let path = sink.path().to_path_buf();
    drop(sink);
    assert_eq!(path.parent(), Some(run.as_path()));
    assert!(path
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("events.out.tfevents."));
    let events = read_events(&path);
    assert_eq!(
        events.len(),
        3,
        "a record without numbers writes nothing: {events:?}"
    );
    assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
    assert!(events[0].wall_time >= before.as_secs_f64() - 1.0);
    assert_eq!(events[1].step, 1);
    let tags = |e: &Event| {
        let mut s = e.scalars.clone();
        s.sort_by(|a, b| a.0.cmp(&b.0));
        s
    };
    assert_eq!(
        tags(&events[1]),
        [
            ("grad_norm".into(), 0.75),
            ("loss".into(), 2.5),
            ("lr".into(), 1e-3f32)
        ]
    );
    assert_eq!(events[2].step, 300);
    assert_eq!(
        tags(&events[2]),
        [
            ("eval_accuracy".into(), 0.875),
            ("eval_loss".into(), 1.5),
            ("loss".into(), 1.25)
        ]
    );

    let resumed = TensorBoardSink::create(&run, 200)?;
    assert_ne!(resumed.path(), path);
    let events = read_events(resumed.path());
    assert_eq!(events.len(), 2);
    assert_eq!((events[1].step, events[1].session_status), (200, Some(1)));

    // A directory that cannot be made is an error, not a panic.
    std::fs::write(dir.path().join("file"), "")?;
    assert!(matches!(
        TensorBoardSink::create(dir.path().join("file").join("run"), 0),
        Err(LisaError::Io { .. })
    ));
    Ok(())
}

/// Writes a one-file checkpoint of `step` whose file `a` holds `text`.
fn save_text(ck: &Checkpointer, step: u64, text: &str) -> candle_lisa::Result<std::path::PathBuf> {
    ck.save(step, |dir| {
        std::fs::write(dir.join("a"), text).map_err(|source| LisaError::Io {
            action: "cannot write",
            path: dir.join("a"),
            source,
        })
    })
}

fn names_in(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Two writers in one root (a killed `cargo run` leaves its child running beside the resumed
/// run): the second is refused while the first saves, and cannot destroy the first's save.
#[cfg(unix)]
#[test]
fn a_second_writer_is_refused_while_a_save_runs() -> Result<(), Box<dyn std::error::Error>> {
    use std::sync::{Arc, Mutex};
    let root = tempfile::tempdir()?;
    let run = serde_json::json!({"test": "busy"});
    let other = Arc::new(Mutex::new(None));
    let (seen, path) = (other.clone(), root.path().to_path_buf());
    let cfg = run.clone();
    let first = Checkpointer::new(root.path(), 2, &run)?.on_write(move |_| {
        let mut seen = seen.lock().unwrap();
        if seen.is_none() {
            let second = Checkpointer::new(&path, 2, &cfg).unwrap();
            *seen = Some(match save_text(&second, 4, "second") {
                Err(LisaError::CheckpointBusy { root }) => Ok(root),
                other => Err(format!("{other:?}")),
            });
        }
    });
    let dir = save_text(&first, 4, "first")?;
    let busy = other.lock().unwrap().take().expect("the hook ran");
    assert_eq!(busy, Ok(root.path().to_path_buf()));
    assert_eq!(std::fs::read_to_string(dir.join("a"))?, "first");
    assert_eq!(first.latest()?.map(|f| f.step), Some(4));
    assert_eq!(names_in(root.path()), ["step-000000004"]);
    // Once the first save is done, the second writer may save.
    let second = Checkpointer::new(root.path(), 2, &run)?;
    save_text(&second, 5, "second")?;
    assert_eq!(names_in(root.path()), ["step-000000004", "step-000000005"]);
    Ok(())
}

/// A kill between moving the old copy of a re-saved step aside and renaming the new one in
/// leaves the old copy, which resume finds and the next save keeps until it is replaced.
#[test]
fn a_resave_killed_between_its_renames_keeps_the_old_copy() -> Result<(), Box<dyn std::error::Error>>
{
    let root = tempfile::tempdir()?;
    let run = serde_json::json!({"test": "resave"});
    let ck = Checkpointer::new(root.path(), 1, &run)?;
    save_text(&ck, 3, "old")?;
    let dying = Checkpointer::new(root.path(), 1, &run)?.on_replace(|_| panic!("killed"));
    let killed =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| save_text(&dying, 3, "new")));
    assert!(killed.is_err(), "the save was not interrupted");
    let found = ck.latest()?.expect("the old copy of step 3 counts");
    assert_eq!(found.step, 3);
    assert_eq!(std::fs::read_to_string(found.dir.join("a"))?, "old");
    // Re-saving step 3 replaces the aside copy; with keep = 1 only it remains.
    save_text(&ck, 3, "new")?;
    assert_eq!(names_in(root.path()), ["step-000000003"]);
    let found = ck.latest()?.unwrap();
    assert_eq!(std::fs::read_to_string(found.dir.join("a"))?, "new");
    // Killed again, then the next step: the aside copy is pruned like any older checkpoint.
    let killed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        save_text(&dying, 3, "newer")
    }));
    assert!(killed.is_err());
    save_text(&ck, 4, "four")?;
    assert_eq!(names_in(root.path()), ["step-000000004"]);
    Ok(())
}

/// Retention never removes the checkpoint just written: a save below a complete checkpoint
/// of a later step is refused and changes nothing, and another run's checkpoints are not
/// this run's to prune.
#[test]
fn retention_never_removes_the_checkpoint_just_written() -> Result<(), Box<dyn std::error::Error>> {
    let root = tempfile::tempdir()?;
    let run = serde_json::json!({"test": "retention"});
    save_text(&Checkpointer::new(root.path(), 2, &run)?, 60, "earlier run")?;
    let ck = Checkpointer::new(root.path(), 1, &run)?;
    match save_text(&ck, 7, "this run") {
        Err(LisaError::LaterCheckpoint { step, later, path }) => {
            assert_eq!((step, later), (7, 60));
            assert_eq!(path, root.path().join("step-000000060"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(names_in(root.path()), ["step-000000060"]);
    assert_eq!(ck.latest()?.map(|f| f.step), Some(60));

    let root = tempfile::tempdir()?;
    let other = Checkpointer::new(root.path(), 2, &serde_json::json!({"test": "other"}))?;
    save_text(&other, 1, "other run")?;
    save_text(&other, 2, "other run")?;
    for step in [3, 4] {
        let dir = save_text(&ck_in(root.path(), &run)?, step, "this run")?;
        assert!(dir.join("a").is_file());
    }
    assert_eq!(
        names_in(root.path()),
        ["step-000000001", "step-000000002", "step-000000004"]
    );
    Ok(())
}

fn ck_in(root: &std::path::Path, run: &serde_json::Value) -> candle_lisa::Result<Checkpointer> {
    Checkpointer::new(root, 1, run)
}

/// A skipped step consumes its batch but does not advance the optimizer: the checkpoint is
/// numbered by the batches consumed, and a resumed run goes on with the next batch, as the
/// uninterrupted run does.
#[test]
fn skipped_steps_do_not_replay_batches_on_resume() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let ex = examples();
    let batches: Vec<Batch> = (0..4)
        .map(|i| pad_batch(&ex[i..i + 3], 0, None, &dev).unwrap())
        .collect();
    let root = tempfile::tempdir()?;
    let ck = Checkpointer::new(root.path(), 2, &serde_json::json!({"test": "skip"}))?;
    let straight = varmap()?;
    let mut t = trainer(&straight, TrainerConfig::default())?;
    t.step(std::slice::from_ref(&batches[0]))?;
    let head = straight.data().lock().unwrap()["lm_head.weight"].clone();
    let saved = head.as_tensor().copy()?;
    head.set(&(saved.ones_like()? * f64::NAN)?)?;
    assert!(t.step(std::slice::from_ref(&batches[1]))?.skipped);
    head.set(&saved)?;
    assert_eq!((t.position(), t.optimizer().step_count()), (2, 1));
    let dir = t.save_checkpoint(&ck, |_| Ok(()))?;
    assert_eq!(dir, root.path().join(Checkpointer::dir_name(2)));

    let resumed = varmap()?;
    let mut t2 = trainer(&resumed, TrainerConfig::default())?;
    assert_eq!(t2.resume(&ck)?, Some(2));
    assert_eq!((t2.position(), t2.optimizer().step_count()), (2, 1));
    assert_eq!(t2.skipped_steps(), 1);
    for b in &batches[2..] {
        t.step(std::slice::from_ref(b))?;
        t2.step(std::slice::from_ref(b))?;
    }
    assert_eq!(values(&resumed), values(&straight));
    Ok(())
}
