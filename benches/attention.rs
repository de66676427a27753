//! Causal attention, forward and backward, with and without a sliding window, at Gemma 3 1B's
//! head shape (4 query heads, 1 key/value head, 256 per head), B = 1, through
//! `nn::ops::sliding_window_attention` (no mask matrix): the windowed kernel's work grows
//! linearly in T, the full one's quadratically.
//!
//! `cargo bench --bench attention`

mod common;

use candle_core::{DType, Tensor, Var};
use candle_lisa::nn::ops::{causal_attention, sliding_window_attention, sliding_window_mask};
use criterion::{criterion_group, criterion_main, Criterion};

fn attention(c: &mut Criterion) {
    let (dev, mut group) = common::group(c, "attention/gemma3-1b-heads", 10, 2, 10);
    let (h, kv, d) = (4, 1, 256);
    for (t, window) in [(2048, Some(512)), (8192, Some(512)), (2048, None)] {
        let var = |heads| Var::randn(0f32, 1.0, (1, heads, t, d), &dev).unwrap();
        let (q, k, v) = (var(h), var(kv), var(kv));
        let name = match window {
            Some(w) => format!("T{t}/window{w}"),
            None => format!("T{t}/full"),
        };
        group.bench_function(name, |b| {
            b.iter(|| {
                let scale = (d as f64).powf(-0.5);
                let y = sliding_window_attention(&q, &k, &v, window, scale, None).unwrap();
                let grads = y.sum_all().unwrap().backward().unwrap();
                let dq: &Tensor = grads.get(&q).unwrap();
                dev.synchronize().unwrap();
                dq.dims().len()
            })
        });
    }
    // The forward pass alone (no graph).
    for t in [2048, 8192] {
        let var = |heads| Tensor::randn(0f32, 1.0, (1, heads, t, d), &dev).unwrap();
        let (q, k, v) = (var(h), var(kv), var(kv));
        group.bench_function(format!("T{t}/window512/forward"), |b| {
            b.iter(|| {
                let scale = (d as f64).powf(-0.5);
                let y = sliding_window_attention(&q, &k, &v, Some(512), scale, None).unwrap();
                dev.synchronize().unwrap();
                y.dims().len()
            })
        });
    }
    // The same through a mask matrix (what a custom model passing its own mask gets).
    for t in [2048, 8192] {
        let var = |heads| Var::randn(0f32, 1.0, (1, heads, t, d), &dev).unwrap();
        let (q, k, v) = (var(h), var(kv), var(kv));
        let mask = sliding_window_mask(t, Some(512), DType::F32, &dev).unwrap();
        group.bench_function(format!("T{t}/window512/mask-matrix"), |b| {
            b.iter(|| {
                let y = causal_attention(&q, &k, &v, &mask, (d as f64).powf(-0.5)).unwrap();
                let grads = y.sum_all().unwrap().backward().unwrap();
                dev.synchronize().unwrap();
                grads.get(&q).unwrap().dims().len()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, attention);
criterion_main!(benches);
