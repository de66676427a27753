//! Attention keeps no mask of its own: with grouped-query attention the causal mask is
//! broadcast over each group's query heads, not repeated, so what the graph keeps per layer
//! is its output, linear in the sequence length. (The repeated mask this replaced kept
//! 1 MiB per layer here: the test fails with it.)

use candle_core::{DType, Device, Var};
use candle_lisa::nn::ops::{causal_attention, causal_mask};

use crate::{alloc, serial};

#[test]
fn grouped_query_attention_keeps_only_its_output() -> candle_core::Result<()> {
    let _serial = serial();
    let dev = Device::Cpu;
    // 8 query heads over 2 key/value heads: groups of 4. A repeated mask would be 4·T² floats
    // (1 MiB at T = 256) per call.
    let (b, h, kv, t, d) = (1, 8, 2, 256, 16);
    let q = Var::randn(0f32, 1., (b, h, t, d), &dev)?;
    let k = Var::randn(0f32, 1., (b, kv, t, d), &dev)?;
    let v = Var::randn(0f32, 1., (b, kv, t, d), &dev)?;
    let mask = causal_mask(t, DType::F32, &dev)?;
    let attention = || causal_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask, 0.25);
    // The matmul library keeps a workspace per thread, made or grown on first use of a size:
    // a first call makes them before counting. Eight layers' outputs are then alive at once,
    // as in a forward pass; workspaces that still grow (at most a 2 MiB score matrix on each
    // of two threads here) land in the count once, a repeated mask 1 MiB a layer (11.5 MB in
    // all when this test was checked against it).
    drop(attention()?);
    let layers = 8;
    let before = alloc::live();
    let ys = (0..layers)
        .map(|_| attention())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let kept = alloc::live().saturating_sub(before);
    let out = b * h * t * d * 4;
    println!("{layers} attention outputs of {out} B each: kept {kept} B");
    let bound = layers * (out + 4096) + (4 << 20) + (256 << 10);
    assert!(
        kept <= bound,
        "attention keeps {kept} B for {layers} outputs of {out} B"
    );
    let grads = ys[0].sum_all()?.backward()?;
    assert!(grads.get(q.as_tensor()).is_some() && grads.get(k.as_tensor()).is_some());
    Ok(())
}
