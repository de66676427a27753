//! Attention keeps no mask of its own: with grouped-query attention the causal mask is
//! broadcast over each group's query heads, not repeated, so what the graph keeps per layer
//! is linear in the sequence length.

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
    // A first call, so that the matmul library's per-thread workspaces (kept for the life of
    // the process) exist before counting.
    drop(causal_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask, 0.25)?);
    let before = alloc::live();
    let y = causal_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask, 0.25)?;
    let kept = alloc::live().saturating_sub(before);
    let out = b * h * t * d * 4;
    println!("attention output {out} B, kept {kept} B");
    assert!(
        kept <= out + 4096,
        "attention keeps {kept} B for an output of {out} B"
    );
    let grads = y.sum_all()?.backward()?;
    assert!(grads.get(q.as_tensor()).is_some() && grads.get(k.as_tensor()).is_some());
    Ok(())
}
