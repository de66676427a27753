//! How much of a LISA period's update survives when a trained block goes back into quantized
//! storage (issue 25, item 2, the measurement).
//!
//! ```sh
//! cargo run --release --example requant_report
//! ```
//!
//! A weight `W` (512 × 1024, N(0, 0.02²), seeded) is quantized to `Q0`; training starts from
//! `W0 = deq(Q0)`, as a block drawn from quantized storage does. A period of K = 20
//! AdamW-like steps moves every weight by ±lr per step, with a random sign each step
//! (`walk`, |Δ| ≈ lr·√K) or the same sign every step (`drift`, |Δ| = K·lr), giving `W1 = W0 + Δ`.
//! Re-freezing then stores one of:
//! - `rtn`: `quantize(W1)` by round-to-nearest (the library's `QuantizedWeight`, double
//!   quantization included for NF4);
//! - `stochastic`: each value rounded to one of its two neighbouring codes with the
//!   probability that makes it unbiased (block absmax of W1, exact in f32: NF4's double
//!   quantization of the absmax is left out here);
//! - `codes+int8Δ`, `codes+nf4Δ`: the original codes `Q0` kept, plus Δ itself quantized
//!   block-wise as int8 or NF4 (its own absmax per block);
//! - `codes+meanΔ`: `Q0` plus one f32 per block, the block's mean of Δ.
//!
//! For each, the stored weight `R` is dequantized and the report prints the fraction of the
//! update that survives, `⟨R − W0, Δ⟩ / ‖Δ‖²` (1: all of it, 0: none), the noise left,
//! `‖R − W0 − Δ‖ / ‖Δ‖`, and the extra bytes per parameter the method stores beyond the codes.

use candle_core::{DType, Device, Tensor};
use candle_lisa::nn::quant::{QuantFormat, QuantizedWeight, BLOCK, NF4_CODE};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const ROWS: usize = 512;
const COLS: usize = 1024;
const STEPS: usize = 20;

type R<T> = Result<T, Box<dyn std::error::Error>>;

fn tensor(v: &[f32]) -> candle_core::Result<Tensor> {
    Tensor::from_slice(v, (ROWS, COLS), &Device::Cpu)
}

/// Quantize and dequantize with the library (round-to-nearest).
fn round_trip(v: &[f32], format: QuantFormat) -> R<Vec<f32>> {
    let q = QuantizedWeight::quantize(&tensor(v)?, format)?;
    Ok(q.dequantize(DType::F32, &Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// Unbiased stochastic rounding onto the format's grid, block by block.
fn stochastic(v: &[f32], format: QuantFormat, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let int8: Vec<f32> = (-127..=127).map(|c| c as f32 / 127.0).collect();
    let grid: &[f32] = match format {
        QuantFormat::Nf4 => &NF4_CODE,
        _ => &int8,
    };
    let mut out = Vec::with_capacity(v.len());
    for block in v.chunks(BLOCK) {
        let a = block.iter().fold(0f32, |m, x| m.max(x.abs()));
        out.extend(block.iter().map(|&x| {
            if a == 0.0 {
                return 0.0;
            }
            let t = (x / a).clamp(-1.0, 1.0);
            let hi = grid.partition_point(|&g| g < t).min(grid.len() - 1);
            let lo = hi.saturating_sub(usize::from(grid[hi] > t));
            let (gl, gh) = (grid[lo], grid[hi]);
            let p_up = if gh > gl { (t - gl) / (gh - gl) } else { 0.0 };
            let g = if rng.random::<f32>() < p_up { gh } else { gl };
            g * a
        }));
    }
    out
}

/// `⟨r − w0, Δ⟩ / ‖Δ‖²` and `‖r − w0 − Δ‖ / ‖Δ‖`, in f64.
fn survival(r: &[f32], w0: &[f32], delta: &[f32]) -> (f64, f64) {
    let (mut dot, mut dd, mut err) = (0f64, 0f64, 0f64);
    for ((&r, &w), &d) in r.iter().zip(w0).zip(delta) {
        let moved = r as f64 - w as f64;
        dot += moved * d as f64;
        dd += (d as f64).powi(2);
        err += (moved - d as f64).powi(2);
    }
    (dot / dd, (err / dd).sqrt())
}

fn main() -> R<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    // Box–Muller, N(0, 0.02²).
    let w: Vec<f32> = (0..ROWS * COLS)
        .map(|_| {
            let (u1, u2) = (rng.random::<f64>().max(1e-300), rng.random::<f64>());
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * 0.02) as f32
        })
        .collect();
    println!(
        "W {ROWS}×{COLS} ~ N(0, 0.02²), K = {STEPS} steps of ±lr; survival = <R−W0, Δ>/‖Δ‖², \
         noise = ‖R−W0−Δ‖/‖Δ‖\n"
    );
    println!("| format | lr | update | method | extra B/param | survival | noise |");
    println!("|---|---|---|---|---|---|---|");
    for format in [QuantFormat::Int8, QuantFormat::Nf4] {
        let w0 = round_trip(&w, format)?;
        for lr in [1e-5f32, 1e-4, 1e-3] {
            for pattern in ["walk", "drift"] {
                let mut delta = vec![0f32; w.len()];
                let signs: Vec<f32> = (0..w.len())
                    .map(|_| if rng.random::<bool>() { 1.0 } else { -1.0 })
                    .collect();
                for _ in 0..STEPS {
                    for (d, s) in delta.iter_mut().zip(&signs) {
                        let sign = match pattern {
                            "walk" if rng.random::<bool>() => -1.0,
                            "walk" => 1.0,
                            _ => *s,
                        };
                        *d += sign * lr;
                    }
                }
                let w1: Vec<f32> = w0.iter().zip(&delta).map(|(a, d)| a + d).collect();
                let plus = |extra: &[f32]| -> Vec<f32> {
                    w0.iter().zip(extra).map(|(a, e)| a + e).collect()
                };
                let block_mean: Vec<f32> = delta
                    .chunks(BLOCK)
                    .flat_map(|b| {
                        let m = b.iter().sum::<f32>() / BLOCK as f32;
                        std::iter::repeat_n(m, BLOCK)
                    })
                    .collect();
                let methods: Vec<(&str, f64, Vec<f32>)> = vec![
                    ("rtn", 0.0, round_trip(&w1, format)?),
                    ("stochastic", 0.0, stochastic(&w1, format, &mut rng)),
                    (
                        "codes+int8Δ",
                        QuantFormat::Int8.bytes_per_param(DType::F32),
                        plus(&round_trip(&delta, QuantFormat::Int8)?),
                    ),
                    (
                        "codes+nf4Δ",
                        QuantFormat::Nf4.bytes_per_param(DType::F32),
                        plus(&round_trip(&delta, QuantFormat::Nf4)?),
                    ),
                    ("codes+meanΔ", 4.0 / BLOCK as f64, plus(&block_mean)),
                ];
                for (name, extra, r) in methods {
                    let (kept, noise) = survival(&r, &w0, &delta);
                    println!(
                        "| {format} | {lr:.0e} | {pattern} | {name} | {extra:.4} | {kept:.4} | \
                         {noise:.3} |"
                    );
                }
            }
        }
    }
    Ok(())
}
