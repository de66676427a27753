//! The memory planner against hand-derived parameter counts and the committed
//! `memory_report` measurements.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::DType;
use candle_lisa::nn::quant::QuantFormat;
use candle_lisa::plan::{self, Backend, Method, Setup};
use candle_lisa::LisaError;
use candle_lisa_testkit::training::{shape_config, step_flops, Variant, SHAPES};

/// The fields of a `memory_report` JSON line the planner is checked on.
#[derive(serde::Deserialize)]
struct Row {
    shape: String,
    method: String,
    #[serde(rename = "B")]
    batch_size: usize,
    #[serde(rename = "T")]
    seq_len: usize,
    peak_bytes: u64,
    weight_bytes: u64,
    grad_bytes: u64,
    state_bytes: u64,
    device: String,
    #[serde(default = "f32_name")]
    dtype: String,
}

fn f32_name() -> String {
    "f32".into()
}

/// Every measured row of the `memory_report*.jsonl` files in `dir`, with its file name.
fn rows(dir: &str) -> Vec<(String, Row)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.starts_with("memory_report") && name.ends_with(".jsonl")
        })
        .collect();
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            if !line.trim().is_empty() {
                out.push((name.clone(), serde_json::from_str(line).unwrap()));
            }
        }
    }
    assert!(!out.is_empty(), "no rows in {}", dir.display());
    out
}

/// The method family a bound is stated for.
fn family(method: &str) -> &'static str {
    match method {
        "full" => "full",
        "adamw-candle" => "adamw-candle",
        m if m.starts_with("lora") => "lora",
        m if m.ends_with("-recompute") => "lisa-recompute",
        m if m.ends_with("-dropin") => "lisa-dropin",
        m if m.ends_with("-frozen-embed") => "lisa-frozen-embed",
        m if m.ends_with("-compact") => "lisa-compact",
        _ => "lisa",
    }
}

/// The planner's prediction for a measured row, the shape taken from memory_report's table.
fn predicted(row: &Row, backend: Backend) -> plan::Prediction {
    let config = shape_config(&row.shape).unwrap();
    let setup = Setup {
        dtype: row.dtype.parse::<DType>().unwrap(),
        seq_len: row.seq_len,
        batch_size: row.batch_size,
        backend,
        frozen_storage: QuantFormat::Dense,
    };
    plan::predict(&config, &row.method.parse().unwrap(), &setup).unwrap()
}

/// Signed relative errors of the predicted peaks per family; weights, gradients and state
/// are checked exactly.
fn errors(rows: &[(String, Row)], backend: Backend) -> BTreeMap<&'static str, Vec<f64>> {
    let mut by_family: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for (file, row) in rows {
        let p = predicted(row, backend);
        let what = format!("{file}: {} {} {}", row.shape, row.method, row.dtype);
        assert_eq!(p.weight_bytes, row.weight_bytes, "weights, {what}");
        assert_eq!(p.state_bytes, row.state_bytes, "state, {what}");
        assert_eq!(p.grad_bytes, row.grad_bytes, "grads, {what}");
        let err = (p.peak_bytes as f64 - row.peak_bytes as f64) / row.peak_bytes as f64;
        eprintln!(
            "{what:<60} measured {:>8.1} MB, predicted {:>8.1} MB ({:+.1}%, {:?})",
            row.peak_bytes as f64 / 1e6,
            p.peak_bytes as f64 / 1e6,
            100.0 * err,
            p.phase
        );
        by_family.entry(family(&row.method)).or_default().push(err);
    }
    by_family
}

/// Asserts the largest |error| of each family against its bound, and that every family seen
/// has one.
fn check_bounds(by_family: &BTreeMap<&str, Vec<f64>>, bounds: &[(&str, f64)]) {
    for (family, errs) in by_family {
        let worst = errs.iter().fold(0f64, |m, e| m.max(e.abs()));
        let bound = bounds
            .iter()
            .find(|(f, _)| f == family)
            .unwrap_or_else(|| panic!("no bound stated for {family}"))
            .1;
        eprintln!(
            "{family:<18} {} rows, max |error| {:.1}% (bound {:.0}%)",
            errs.len(),
            100.0 * worst,
            100.0 * bound
        );
        assert!(
            worst <= bound,
            "{family}: {:.1}% > {:.0}%",
            100.0 * worst,
            100.0 * bound
        );
    }
}

// Llama-3.1-8B by hand: embedding and head 2 × 128256 × 4096 = 1,050,673,152; a block:
// q, o 2 × 4096² = 33,554,432, k, v 2 × 4096 × 1024 = 8,388,608, MLP 3 × 4096 × 14336 =
// 176,160,768, two norms 8192: 218,112,000; 32 blocks and the final norm (4096):
// 8,030,261,248. 70B: 2 × 128256 × 8192 = 2,101,346,304; a block 2 × 8192² + 2 × 8192 × 1024
// + 3 × 8192 × 28672 + 2 × 8192 = 855,654,400; × 80 + 8192: 70,553,706,496.
#[test]
fn parameter_counts_are_exact() {
    let p8 = plan::shape("llama3.1-8b").unwrap();
    let p70 = plan::shape("llama3.1-70b").unwrap();
    assert_eq!(p8.num_params(), 8_030_261_248);
    assert_eq!(p70.num_params(), 70_553_706_496);
    let setup = Setup::default();
    let lisa2 = plan::predict(&p8, &"lisa2".parse().unwrap(), &setup).unwrap();
    // 1,050,673,152 + 4096 + 2 × 218,112,000.
    assert_eq!(lisa2.trainable_params, 1_486_901_248);
    assert_eq!(lisa2.params, 8_030_261_248);
    // bf16: 2 bytes a weight and gradient, 12 of master and moments per trainable parameter.
    assert_eq!(lisa2.weight_bytes, 2 * 8_030_261_248);
    assert_eq!(lisa2.state_bytes, 12 * 1_486_901_248);
    let lora16 = plan::predict(&p8, &Method::Lora { rank: 16 }, &setup).unwrap();
    // 32 blocks × 16 × Σ(in + out) = 16 × (4096+4096)·2 + (4096+1024)·2 + (4096+14336)·3.
    let per_block = 16 * ((8192 * 2) + (5120 * 2) + (18432 * 3));
    assert_eq!(lora16.trainable_params, 32 * per_block);
}

#[test]
fn shapes_are_memory_reports() {
    for name in SHAPES {
        let ours = plan::shape(name).unwrap();
        let report = shape_config(name).unwrap();
        assert_eq!(ours.tensor_shapes(), report.tensor_shapes(), "{name}");
        assert_eq!(
            ours.tie_word_embeddings, report.tie_word_embeddings,
            "{name}"
        );
    }
}

/// Every CPU row committed under docs/. Bounds per family, as achieved:
/// - full, adamw-candle, lisa-dropin, lisa-compact: 5% (issue 25's target).
/// - lisa 8%: the T = 2048 SmolLM2 row is 5.1% low (gemm's packing buffers, which grow with
///   T, are not modelled), and `memory_report_frozen_embed.jsonl`'s lisa2, measured with the
///   code of 2026-11-28, 7.5% low (the same row of `memory_report.jsonl` is within 1%).
/// - lisa-recompute 12%: the T = 2048 SmolLM2 row is 11.2% low (the same gemm buffers).
/// - lora 10%: `memory_report_compact.jsonl`'s lora16 (2026-11-28 code) is 9.6% low; the same
///   row of `memory_report.jsonl` is within 1%, and the others within 2%.
/// - lisa-frozen-embed 20%: the prediction is the worst draw (block 0 active, which a long
///   run meets), the measured 5-step runs did not draw it: 19% and 13% above.
#[test]
fn peaks_match_cpu_measurements() {
    let rows: Vec<_> = rows("docs")
        .into_iter()
        .filter(|(_, r)| r.device == "cpu")
        .collect();
    let by_family = errors(&rows, Backend::Cpu);
    check_bounds(
        &by_family,
        &[
            ("full", 0.05),
            ("adamw-candle", 0.05),
            ("lora", 0.10),
            ("lisa", 0.08),
            ("lisa-recompute", 0.12),
            ("lisa-dropin", 0.05),
            ("lisa-frozen-embed", 0.20),
            ("lisa-compact", 0.05),
        ],
    );
    // The worst-draw prediction of lisa-frozen-embed is an upper bound.
    for ((_, row), err) in rows
        .iter()
        .filter(|(_, r)| family(&r.method) == "lisa-frozen-embed")
        .zip(&by_family["lisa-frozen-embed"])
    {
        assert!(*err > -0.05, "{} {}: {err}", row.shape, row.method);
    }
    // The rows of today's code (2026-11-29) at T = 256 all meet the 5% target.
    let today: Vec<_> = rows
        .into_iter()
        .filter(|(f, r)| f == "memory_report.jsonl" && !r.method.ends_with("-frozen-embed"))
        .collect();
    for errs in errors(&today, Backend::Cpu).values() {
        assert!(errs.iter().all(|e| e.abs() <= 0.05), "{errs:?}");
    }
}

/// The CUDA rows under docs/gpu (an H200; the pool's high-water mark): all within 5%.
#[test]
fn peaks_match_cuda_measurements() {
    let rows: Vec<_> = rows("docs/gpu")
        .into_iter()
        .filter(|(_, r)| r.device == "cuda")
        .collect();
    let by_family = errors(&rows, Backend::Cuda);
    let bounds: Vec<_> = by_family.keys().map(|f| (*f, 0.05)).collect();
    check_bounds(&by_family, &bounds);
}

/// The scaled shape keeps Llama-3.1-8B's ratios at T = 256 against the real model at
/// T = 2048, so 64 times its prediction is the 8B's (LoRA's rank does not scale: rank 16 on
/// the 8B is rank 2 on the scaled shape).
#[test]
fn scaled_shape_times_64_is_8b() {
    let scaled = plan::shape("llama3-8b-scaled").unwrap();
    let real = plan::shape("llama3.1-8b").unwrap();
    let at = |seq_len| Setup {
        seq_len,
        ..Default::default()
    };
    for (small, big) in [
        ("full", "full"),
        ("lora2", "lora16"),
        ("lisa2", "lisa2"),
        ("lisa2-recompute", "lisa2-recompute"),
        ("lisa2-frozen-embed", "lisa2-frozen-embed"),
        ("lisa2-compact", "lisa2-compact"),
    ] {
        let a = plan::predict(&scaled, &small.parse().unwrap(), &at(256)).unwrap();
        let b = plan::predict(&real, &big.parse().unwrap(), &at(2048)).unwrap();
        let ratio = 64.0 * a.peak_bytes as f64 / b.peak_bytes as f64;
        eprintln!(
            "{small:<20} scaled {:>7.1} MB, x 64 = {:>6.2} GB; {big} on Llama-3.1-8B {:>6.2} GB ({:+.2}%)",
            a.peak_bytes as f64 / 1e6,
            64.0 * a.peak_bytes as f64 / 1e9,
            b.peak_bytes as f64 / 1e9,
            100.0 * (ratio - 1.0)
        );
        assert!((ratio - 1.0).abs() <= 0.10, "{small}: {ratio}");
    }
}

#[test]
fn table_marks_the_cards_that_fit() {
    let config = plan::shape("llama3.1-8b").unwrap();
    let rows = plan::table(&config, &Setup::default(), &[]).unwrap();
    assert_eq!(rows.len(), plan::DEFAULT_METHODS.len());
    for row in &rows {
        for &(gb, fits) in &row.fits {
            assert_eq!(
                fits,
                row.prediction.peak_bytes + plan::CONTEXT_RESERVE <= gb << 30
            );
        }
    }
    // Full fine-tuning at 8B in bf16 with f32 master and moments: 16 B a parameter before
    // activations, 128 GB: no card.
    assert!(rows[0].prediction.peak_bytes > 16 * 8_030_261_248);
    assert!(rows[0].fits.iter().all(|(_, fits)| !fits));
    // NF4 frozen blocks take LISA γ = 2 with recompute below its dense peak.
    let nf4 = Setup {
        frozen_storage: QuantFormat::Nf4,
        ..Default::default()
    };
    let dense = plan::table(&config, &Setup::default(), &["lisa2-recompute"]).unwrap();
    let quant = plan::table(&config, &nf4, &["lisa2-recompute"]).unwrap();
    // 30 frozen blocks' projections, 218,103,808 each, from 2 to 0.516 bytes.
    let saved = dense[0].prediction.weight_bytes - quant[0].prediction.weight_bytes;
    let expected = 30.0 * 218_103_808.0 * (2.0 - (0.5 + 1.0 / 64.0 + 4.0 / 16384.0));
    assert!(
        (saved as f64 - expected).abs() < 30.0,
        "{saved} vs {expected}"
    );
    // The default table over quantized storage leaves out what freezes no block, in order.
    let names: Vec<String> = plan::table(&config, &nf4, &[])
        .unwrap()
        .into_iter()
        .map(|r| r.method)
        .collect();
    let want: Vec<&str> = plan::DEFAULT_METHODS[1..].to_vec();
    assert_eq!(names, want);
    assert!(plan::table(&config, &nf4, &["full"]).is_err());
}

/// `candle-lisa plan` reads a model directory's config.json and refuses a bad storage name.
#[test]
fn the_plan_command_reads_a_model_directory() {
    let dir = tempfile::tempdir().unwrap();
    let config = plan::shape("tiny").unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::to_string(&config).unwrap(),
    )
    .unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["candle-lisa", "plan", "--config"];
        args.push(dir.path().to_str().unwrap());
        args.extend_from_slice(extra);
        candle_lisa::cli::run_from(args)
    };
    run(&["--seq-len", "64", "--device", "cpu"]).unwrap();
    run(&["--frozen-storage", "nf4"]).unwrap();
    let err = run(&["--frozen-storage", "int4"]).unwrap_err().to_string();
    assert!(err.contains("int4"), "{err}");
}

#[test]
fn bad_inputs_are_typed_errors() {
    let config = plan::shape("tiny").unwrap();
    let setup = Setup::default();
    fn invalid<T>(r: candle_lisa::Result<T>) -> bool {
        matches!(r, Err(LisaError::InvalidArgument { .. }))
    }
    for name in ["lisa0", "lisa", "lora0", "lisa2-fast", "adam", "lora-16"] {
        assert!(invalid(name.parse::<Method>()), "{name}");
    }
    assert!(invalid(plan::predict(
        &config,
        &"lisa9".parse().unwrap(),
        &setup
    )));
    let u8 = Setup {
        dtype: DType::U8,
        ..Default::default()
    };
    assert!(invalid(plan::predict(&config, &Method::Full, &u8)));
    let empty = Setup {
        seq_len: 0,
        ..Default::default()
    };
    assert!(invalid(plan::predict(&config, &Method::Full, &empty)));
    let huge = Setup {
        seq_len: usize::MAX,
        batch_size: usize::MAX,
        ..Default::default()
    };
    assert!(invalid(plan::predict(&config, &Method::Full, &huge)));
    let nf4 = Setup {
        frozen_storage: QuantFormat::Nf4,
        ..Default::default()
    };
    assert!(invalid(plan::predict(&config, &Method::Full, &nf4)));
    assert!(invalid(plan::shape("gpt5")));
    assert!(invalid("int4".parse::<QuantFormat>()));
    // Names print back as they parse.
    for name in plan::DEFAULT_METHODS {
        assert_eq!(name.parse::<Method>().unwrap().to_string(), name);
    }
}

#[test]
fn compact_state_for_the_always_trainable_only() {
    let config = plan::shape("llama3.1-8b").unwrap();
    let f32 = Setup {
        dtype: DType::F32,
        ..Default::default()
    };
    let method = Method::Lisa(plan::LisaMethod {
        gamma: 2,
        compact: candle_lisa::optim::CompactState::AlwaysTrainable,
        ..Default::default()
    });
    let p = plan::predict(&config, &method, &f32).unwrap();
    // bf16 moments (4 bytes) for embedding, head and final norm (1,050,677,248), f32 ones
    // (8 bytes) for the two blocks (2 × 218,112,000).
    assert_eq!(p.state_bytes, 4 * 1_050_677_248 + 8 * 436_224_000);
    assert!(method.to_string().starts_with("lisa2 ("), "{method}");
}

/// The GPU check's model FLOPs (its MFU numerator) at Llama-3.2-1B's shape, T = 2048, against
/// sums done by hand: a block's projections hold 2·2048² + 2·2048·512 + 3·2048·8192 =
/// 60,817,408 weights, the tied head 128,256·2048 = 262,668,288; the forward pass is
/// 2·2048·(16·60,817,408 + 262,668,288) = 5,061,618,958,336 in products plus
/// 16·2·2048²·2048 = 274,877,906,944 in causal attention.
#[test]
fn step_flops_match_the_hand_count() {
    let c = shape_config("llama3.2-1b").unwrap();
    let forward = 5_061_618_958_336.0 + 274_877_906_944.0;
    // Full: forward, input gradients and weight gradients, each one forward's worth.
    assert_eq!(step_flops(&c, Variant::Full, 1, 2048), 3.0 * forward);
    // LISA γ = 2: forward, input gradients everywhere (attention's twice), the weight
    // gradients of two blocks and the head.
    let lisa = forward
        + (5_061_618_958_336.0 + 2.0 * 274_877_906_944.0)
        + 2.0 * 2048.0 * (2.0 * 60_817_408.0 + 262_668_288.0);
    let lisa2: Variant = "lisa2".parse().unwrap();
    assert_eq!(step_flops(&c, lisa2, 1, 2048), lisa);
    assert_eq!(lisa, 12_521_977_151_488.0);
    // LoRA-16: the adapters hold 16·(2·(2048 + 2048) + 2·(2048 + 512) + 3·(2048 + 8192))
    // = 704,512 weights a block; forward, then input and weight gradients of the adapters.
    let adapters = 2.0 * 2048.0 * 16.0 * 704_512.0;
    let lora = forward + (5_061_618_958_336.0 + 2.0 * 274_877_906_944.0) + 3.0 * adapters;
    assert_eq!(step_flops(&c, Variant::Lora(16), 1, 2048), lora);
}
