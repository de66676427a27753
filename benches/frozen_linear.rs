//! A frozen projection, forward and backward, at SmolLM2-135M's shapes (B = 1, T = 256): the
//! crate's frozen-aware `Linear` (no weight gradient) against candle's stock `Linear` over the
//! same detached weight (which computes and stores one anyway). Then the forward product alone
//! (`x · wᵀ`, `(256, in) × (in, out)`): the crate's `frozen_matmul` (on the CPU, one
//! single-threaded gemm call per column block per thread of candle's pool) against candle's
//! `matmul` (gemm through rayon); the throughput is in multiply-adds × 2, i.e. FLOP/s.
//!
//! The same layer over int8 and NF4 codes (`nn::quant`; on the CPU each task dequantizes a
//! panel of W into its own buffer and runs one gemm call on it) sits beside the dense rows,
//! forward and backward and forward alone.
//!
//! `cargo bench --bench frozen_linear`

mod common;

use candle_core::{Module, Tensor, Var};
use candle_lisa::nn::quant::QuantFormat;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn frozen_linear(c: &mut Criterion) {
    let (dev, mut group) = common::group(c, "frozen_linear", 20, 1, 3);
    let rows = 256;
    for (proj, inp, out) in [
        ("q_o_576x576", 576, 576),
        ("k_v_576x192", 576, 192),
        ("gate_up_576x1536", 576, 1536),
        ("down_1536x576", 1536, 576),
    ] {
        let x = Var::randn(0f32, 1., (1, rows, inp), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.02, (out, inp), &dev).unwrap();
        // Forward and backward: 2 · rows · in · out FLOPs each for y and dx.
        group.throughput(Throughput::Elements((4 * rows * inp * out) as u64));
        let lisa = candle_lisa::Linear::new(w.clone(), None);
        let int8 = candle_lisa::Linear::with_storage(&w, None, QuantFormat::Int8).unwrap();
        let nf4 = candle_lisa::Linear::with_storage(&w, None, QuantFormat::Nf4).unwrap();
        let stock = candle_nn::Linear::new(w, None);
        let run = |layer: &dyn Module| {
            let grads = layer
                .forward(x.as_tensor())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            dev.synchronize().unwrap();
            grads
        };
        group.bench_function(BenchmarkId::new("lisa_frozen", proj), |b| {
            b.iter(|| run(&lisa))
        });
        group.bench_function(BenchmarkId::new("lisa_int8", proj), |b| {
            b.iter(|| run(&int8))
        });
        group.bench_function(BenchmarkId::new("lisa_nf4", proj), |b| b.iter(|| run(&nf4)));
        group.bench_function(BenchmarkId::new("candle_linear", proj), |b| {
            b.iter(|| run(&stock))
        });
    }
    group.finish();

    let (dev, mut group) = common::group(c, "matmul_forward", 20, 1, 3);
    for (proj, inp, out) in [
        ("q_o_576x576", 576, 576),
        ("k_v_576x192", 576, 192),
        ("gate_up_576x1536", 576, 1536),
        ("down_1536x576", 1536, 576),
    ] {
        let x = Tensor::randn(0f32, 1., (rows, inp), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.02, (out, inp), &dev).unwrap();
        let wt = w.t().unwrap().contiguous().unwrap();
        let int8 = candle_lisa::Linear::with_storage(&w, None, QuantFormat::Int8).unwrap();
        let nf4 = candle_lisa::Linear::with_storage(&w, None, QuantFormat::Nf4).unwrap();
        group.throughput(Throughput::Elements((2 * rows * inp * out) as u64));
        group.bench_function(BenchmarkId::new("lisa_frozen_matmul", proj), |b| {
            b.iter(|| {
                let y = candle_lisa::nn::frozen_matmul(&x, &w).unwrap();
                dev.synchronize().unwrap();
                y
            })
        });
        for (name, layer) in [("lisa_int8_forward", &int8), ("lisa_nf4_forward", &nf4)] {
            group.bench_function(BenchmarkId::new(name, proj), |b| {
                b.iter(|| {
                    let y = layer.forward(&x).unwrap();
                    dev.synchronize().unwrap();
                    y
                })
            });
        }
        group.bench_function(BenchmarkId::new("candle_matmul", proj), |b| {
            b.iter(|| {
                let y = x.matmul(&wt).unwrap();
                dev.synchronize().unwrap();
                y
            })
        });
    }
    group.finish();
}

criterion_group!(benches, frozen_linear);
criterion_main!(benches);
