//! The code tables: NF4's 16 values and bitsandbytes' 8-bit dynamic map.

use std::sync::OnceLock;

/// The 16 NormalFloat4 values, sorted; index 7 is an exact 0.
///
/// Copied from bitsandbytes' `get_4bit_type("nf4")` (`bitsandbytes/functional.py`, the
/// literal list under `if typename == "nf4"`, which its CUDA kernels carry as `nf4_data`):
/// the quantiles of N(0, 1) at evenly spaced probabilities, 8 on the positive side and 7 on
/// the negative one plus an exact zero, scaled to [-1, 1] (QLoRA, Dettmers et al. 2023,
/// appendix E).
#[allow(clippy::excessive_precision)] // the digits as published, rounded to f32 here
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// The index of 0 in [`NF4_CODE`]: what an all-zero block stores.
pub(crate) const NF4_ZERO: usize = 7;

/// The widest gap between neighbouring [`NF4_CODE`] values (between −1 and the next one):
/// rounding to the nearest code errs by at most half of it, times the block's absmax.
pub const NF4_MAX_GAP: f32 = NF4_CODE[1] - NF4_CODE[0];

/// bitsandbytes' signed 8-bit dynamic quantization map, sorted: 256 values in [-1, 1] with
/// a dynamic exponent (Dettmers 2016, "8-Bit Approximations for Parallelism in Deep
/// Learning"), which bitsandbytes' `quantize_blockwise` uses by default and therefore its
/// double quantization of NF4's absmax values.
///
/// Built as `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)` in
/// `bitsandbytes/functional.py` builds it: for `i` in 0..7, the midpoints of `2^i + 1` evenly
/// spaced points in [0.1, 1], times `10^(i − 6)`, with both signs; then 0 and 1. Computed
/// here in f64 and rounded to f32, so a value may differ from bitsandbytes' (computed by
/// torch in f32) in its last bit.
pub fn dynamic_code() -> &'static [f32; 256] {
    static CODE: OnceLock<[f32; 256]> = OnceLock::new();
    CODE.get_or_init(|| {
        let mut data: Vec<f64> = Vec::with_capacity(256);
        for i in 0..7i32 {
            let points = (1usize << i) + 1;
            let boundary = |j: usize| 0.1 + 0.9 * j as f64 / (points - 1) as f64;
            let scale = 10f64.powi(i - 6);
            for j in 0..points - 1 {
                let mean = (boundary(j) + boundary(j + 1)) / 2.0;
                data.push(scale * mean);
                data.push(-scale * mean);
            }
        }
        data.push(0.0);
        data.push(1.0);
        data.sort_by(f64::total_cmp);
        let mut code = [0f32; 256];
        for (c, v) in code.iter_mut().zip(&data) {
            *c = *v as f32;
        }
        code
    })
}
