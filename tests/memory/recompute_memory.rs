//! A recomputed block's intermediates are freed when the forward pass leaves it: counted with
//! the allocator of the memory report. The allocator's counters are
//! global, so the test takes `serial()` first.

use std::sync::Arc;

use candle_core::{Device, Module, Tensor, Var};
use candle_lisa::nn::recompute::recompute;
use candle_lisa::{Linear, LisaAdamW, LisaConfig, Llama, LlamaConfig};
use candle_nn::{ParamsAdamW, VarBuilder, VarMap};

use crate::{alloc, serial};

/// Heap bytes that `f`'s result keeps alive: the least over three calls (the last call's
/// result is returned). A call can also leave allocations that outlive its result: the
/// first matmul a thread of candle's pool runs allocates that thread's gemm scratch, and
/// which threads take part in a product depends on scheduling (one call in about seven kept
/// 590 kB here that way).
fn retained<T>(mut f: impl FnMut() -> T) -> (T, usize) {
    let mut least = usize::MAX;
    let mut out = None;
    for _ in 0..3 {
        drop(out.take());
        let before = alloc::live();
        out = Some(f());
        least = least.min(alloc::live().saturating_sub(before));
    }
    (out.expect("three calls"), least)
}

const F32: usize = 4;

#[test]
fn recomputed_intermediates_are_not_alive_after_the_forward_pass() -> candle_core::Result<()> {
    let _serial = serial();
    let dev = Device::Cpu;
    // A frozen MLP block, 256 -> 1024 -> 256, on 64 rows: its intermediates (the hidden layer
    // before and after tanh) are 64 x 1024 floats each; its output 64 x 256.
    let (rows, dim, hidden) = (64, 256, 1024);
    let up = Linear::new(Tensor::randn(0f32, 0.05, (hidden, dim), &dev)?, None);
    let down = Linear::new(Tensor::randn(0f32, 0.05, (dim, hidden), &dev)?, None);
    let block = Arc::new(move |x: &Tensor| down.forward(&up.forward(x)?.tanh()?));
    let x = Var::randn(0f32, 1., (rows, dim), &dev)?;
    let out_bytes = rows * dim * F32;
    let hidden_bytes = rows * hidden * F32;

    let (plain, plain_bytes) = retained(|| block(x.as_tensor()));
    let plain = plain?;
    let (re, re_bytes) = retained(|| recompute(x.as_tensor(), block.clone()));
    let re = re?;
    println!("MLP block: plain keeps {plain_bytes} B, recompute keeps {re_bytes} B");
    assert!(plain_bytes >= out_bytes + 2 * hidden_bytes);
    // The output, and no more than a few hundred bytes of graph bookkeeping.
    assert!(re_bytes <= out_bytes + 1024, "recompute keeps {re_bytes} B");
    let (g_plain, g_re) = (plain.sum_all()?.backward()?, re.sum_all()?.backward()?);
    let (g_plain, g_re) = (
        g_plain.get(x.as_tensor()).expect("dx").flatten_all()?,
        g_re.get(x.as_tensor()).expect("dx").flatten_all()?,
    );
    assert_eq!(g_plain.to_vec1::<f32>()?, g_re.to_vec1::<f32>()?);

    // A Llama with one block of six training: with recompute, the forward pass keeps at least
    // the MLP's gate and up projections and their SwiGLU product of each frozen block fewer
    // (3 x T x intermediate floats a block), less the copy of its output it keeps instead.
    let mut c = LlamaConfig::tiny(64, 64, 6, 4, 4);
    c.intermediate_size = 160;
    let varmap = VarMap::new();
    Llama::new(
        &c,
        VarBuilder::from_varmap(&varmap, candle_core::DType::F32, &dev),
    )?;
    let config = LisaConfig {
        gamma: 1,
        recompute_frozen: true,
        ..Default::default()
    };
    let opt = LisaAdamW::new(&varmap, ParamsAdamW::default(), config)?;
    let t = 128;
    let ids: Vec<u32> = (0..t as u32).map(|i| i * 7 % 64).collect();
    let ids = Tensor::from_vec(ids, (1, t), &dev)?;
    let plain = Llama::new(&c, opt.var_builder())?;
    let (off, off_bytes) = retained(|| plain.forward(&ids));
    drop(off);
    let model = Llama::from_plan(&c, &opt.plan())?;
    assert_eq!(model.recomputed_blocks().len(), 5);
    let (on, on_bytes) = retained(|| model.forward(&ids));
    drop(on);
    println!("Llama, 5 frozen blocks: plain keeps {off_bytes} B, recompute keeps {on_bytes} B");
    let per_block = 3 * t * c.intermediate_size * F32 - t * c.hidden_size * F32;
    assert!(off_bytes >= on_bytes + 5 * per_block);
    Ok(())
}
