//! The optimizer update on 1M to 64M parameters: the crate's fused update, candle_nn::AdamW,
//! and a plain copy of the same number of bytes (the bandwidth floor), in the same run.
//!
//! `cargo bench --bench adamw_update`; throughput is in bytes: AdamW reads θ, g, m and v and
//! writes θ, m and v (28 bytes per f32 parameter), so every variant is credited with those
//! 28 bytes per parameter and the copy moves exactly that many (14 read, 14 written).
//! `lisa_fused_bf16` is the update of a bf16 parameter with its f32 master copy and f32
//! moments: it reads θ and g (2 bytes each) and master, m, v (4 each), and writes θ, master, m
//! and v, so it is credited with 30 bytes per parameter.

mod common;

use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};
use candle_lisa::LisaAdamW;
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rayon::prelude::*;

const BYTES_PER_PARAM: u64 = 28;
const BYTES_PER_BF16_PARAM: u64 = 30;

/// A parameter of `n` elements in `dtype` and a GradStore holding its gradient.
fn param(n: usize, dtype: DType, dev: &Device) -> candle_core::Result<(Var, GradStore)> {
    let var = Var::from_tensor(&Tensor::randn(0f32, 1., n, dev)?.to_dtype(dtype)?)?;
    let c = Tensor::randn(0f32, 1e-3, n, dev)?.to_dtype(dtype)?;
    let grads = (var.as_tensor() * c)?.sum_all()?.backward()?;
    Ok((var, grads))
}

fn update(c: &mut Criterion) {
    let (dev, mut group) = common::group(c, "adamw_update", 10, 1, 4);
    for millions in [1usize, 4, 16, 64] {
        let n = millions << 20;
        let id = |what: &str| BenchmarkId::new(what, format!("{millions}M"));

        for (dtype, name, bytes) in [
            (DType::F32, "lisa_fused", BYTES_PER_PARAM),
            (DType::BF16, "lisa_fused_bf16", BYTES_PER_BF16_PARAM),
        ] {
            group.throughput(Throughput::Bytes(bytes * n as u64));
            let (var, grads) = param(n, dtype, &dev).unwrap();
            let mut fused =
                LisaAdamW::all_trainable([("w".to_string(), var)], ParamsAdamW::default()).unwrap();
            group.bench_function(id(name), |b| {
                b.iter(|| {
                    fused.try_step(&grads).unwrap();
                    dev.synchronize().unwrap();
                })
            });
        }
        group.throughput(Throughput::Bytes(BYTES_PER_PARAM * n as u64));

        let (var, grads) = param(n, DType::F32, &dev).unwrap();
        let mut candle = AdamW::new(vec![var], ParamsAdamW::default()).unwrap();
        group.bench_function(id("candle_adamw"), |b| {
            b.iter(|| {
                candle.step(&grads).unwrap();
                dev.synchronize().unwrap();
            })
        });
        drop((candle, grads));

        // 14 bytes read and 14 written per parameter: 3.5 f32 copied.
        let len = n * 7 / 2;
        if dev.is_cpu() {
            let src = vec![1f32; len];
            let mut dst = vec![0f32; len];
            group.bench_function(id("copy"), |b| {
                b.iter(|| {
                    dst.par_chunks_mut(1 << 15)
                        .zip(src.par_chunks(1 << 15))
                        .for_each(|(d, s)| d.copy_from_slice(s))
                })
            });
        } else {
            let src = Tensor::ones(len, candle_core::DType::F32, &dev).unwrap();
            group.bench_function(id("copy"), |b| {
                b.iter(|| {
                    let copy = src.copy().unwrap();
                    dev.synchronize().unwrap();
                    copy
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, update);
criterion_main!(benches);
