//! One whole training step (forward, backward, optimizer step) of the SmolLM2-135M shape at
//! B = 1, T = 128: full fine-tuning, LoRA rank 16 and LISA γ = 2 (which redraws its blocks
//! every 2 steps, so resamples are part of the measurement).
//!
//! `cargo bench --bench train_step`

mod common;

use candle_lisa_testkit::training;

use criterion::{criterion_group, criterion_main, Criterion};
use training::{batch, shape_config, Training, Variant, Weights};

fn train_step(c: &mut Criterion) {
    let (dev, mut group) = common::group(c, "train_step/smollm2-135m/T128", 10, 3, 20);
    let config = shape_config("smollm2-135m").unwrap();
    let (ids, labels) = batch(&config, 1, 128, &dev).unwrap();
    for method in ["full", "lora16", "lisa2"] {
        let kind: Variant = method.parse().unwrap();
        let weights = Weights::new(config.clone(), kind, &dev, candle_core::DType::F32).unwrap();
        let uniform = candle_lisa::optim::SamplerChoice::Uniform;
        let mut training = Training::new(weights, kind, &uniform).unwrap();
        group.bench_function(method, |b| {
            b.iter(|| {
                training.step(&ids, &labels).unwrap();
                dev.synchronize().unwrap();
            })
        });
    }
    group.finish();
}

criterion_group!(benches, train_step);
criterion_main!(benches);
