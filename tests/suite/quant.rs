//! Quantized frozen storage: int8 and NF4 codes against values derived by hand and by an
//! independent reference here, round-trip bounds, and the quantized `Linear` against a dense
//! layer over the dequantized weight (same codes).

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_lisa::nn::quant::{
    dynamic_code, QuantFormat, QuantizedWeight, BLOCK, NF4_CODE, NF4_GROUP, NF4_MAX_GAP,
};
use candle_lisa::nn::LoraAdapter;
use candle_lisa::{Linear, LisaError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

type R = Result<(), Box<dyn std::error::Error>>;

/// A seeded tensor of `shape` with values uniform in `[-scale, scale)`.
fn uniform(seed: u64, shape: &[usize], scale: f32) -> candle_core::Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

fn flat(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// Bitwise equality, reporting the first element that differs.
fn assert_same(got: &Tensor, want: &Tensor, what: &str) -> candle_core::Result<()> {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes");
    for (i, (g, w)) in flat(got)?.iter().zip(flat(want)?).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{what}: element {i}: {g} vs {w}");
    }
    Ok(())
}

/// Entries of the GradStore whose shape is `dims`.
fn count_shaped(grads: &GradStore, dims: &[usize]) -> usize {
    grads
        .get_ids()
        .filter_map(|id| grads.get_id(*id))
        .filter(|g| g.dims() == dims)
        .count()
}

/// Inverse of the standard normal CDF (Acklam's rational approximation, relative error
/// below 1.2e-9), to derive NF4's values independently of the table.
fn norm_ppf(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969683028665376e1,
        2.209460984245205e2,
        -2.759285104469687e2,
        1.38357751867269e2,
        -3.066479806614716e1,
        2.506628277459239,
    ];
    const B: [f64; 5] = [
        -5.447609879822406e1,
        1.615858368580409e2,
        -1.556989798598866e2,
        6.680131188771972e1,
        -1.328068155288572e1,
    ];
    const C: [f64; 6] = [
        -7.784894002430293e-3,
        -3.223964580411365e-1,
        -2.400758277161838,
        -2.549732539343734,
        4.374664141464968,
        2.938163982698783,
    ];
    const D: [f64; 4] = [
        7.784695709041462e-3,
        3.224671290700398e-1,
        2.445134137142996,
        3.754408661907416,
    ];
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

/// The table is QLoRA's: 8 positive quantiles of N(0, 1) at probabilities evenly spaced from
/// 0.9677083 to 0.5, 7 negative ones, an exact zero, scaled by the largest (bitsandbytes'
/// `create_normal_map`, recomputed here from the normal quantile function).
#[test]
fn nf4_table_is_the_normal_quantiles() {
    let offset = 0.9677083f64;
    let probs = |n: usize| (0..n).map(move |i| offset + (0.5 - offset) * i as f64 / n as f64);
    let mut v: Vec<f64> = probs(8).map(norm_ppf).collect();
    v.extend(probs(7).map(|p| -norm_ppf(p)));
    v.push(0.0);
    v.sort_by(f64::total_cmp);
    let max = v[15];
    for (i, (&table, want)) in NF4_CODE.iter().zip(v.iter().map(|x| x / max)).enumerate() {
        assert!(
            (table as f64 - want).abs() < 1e-6,
            "NF4[{i}] = {table}, derived {want}"
        );
    }
    assert_eq!((NF4_CODE[0], NF4_CODE[7], NF4_CODE[15]), (-1.0, 0.0, 1.0));
    let widest = NF4_CODE
        .windows(2)
        .map(|w| w[1] - w[0])
        .fold(0f32, f32::max);
    assert_eq!(NF4_MAX_GAP, widest);
}

/// bitsandbytes' signed dynamic map: 256 increasing values, 0 and 1 included, 127 negative;
/// its extremes and smallest magnitude worked out by hand from `create_dynamic_map`.
#[test]
fn dynamic_map_is_bitsandbytes_construction() {
    let code = dynamic_code();
    assert!(code.windows(2).all(|w| w[0] < w[1]), "strictly increasing");
    assert_eq!(code.iter().filter(|&&c| c < 0.0).count(), 127);
    assert_eq!(code[127], 0.0);
    assert_eq!(code[255], 1.0);
    // Exponent 10⁰, 65 points from 0.1 to 1: the outermost midpoint is 1 − 0.9/128.
    assert_eq!(code[0], -0.99296875f32);
    assert_eq!(code[254], 0.99296875f32);
    // Exponent 10⁻⁶, 2 points: the one midpoint 0.55.
    assert_eq!(code[128], 0.55e-6f32);
    assert_eq!(code[126], -0.55e-6f32);
}

/// Int8 on a weight whose codes are worked out by hand: row 0 runs −16, −15.5, …, 15.5
/// (absmax 16, so x = −16 is code −127 and x = 8 is round(63.5) = 64), row 1 is all zero.
#[test]
fn int8_codes_by_hand() -> R {
    let v: Vec<f32> = (0..BLOCK)
        .map(|j| (j as f32 - 32.0) * 0.5)
        .chain(std::iter::repeat_n(0.0, BLOCK))
        .collect();
    let w = Tensor::from_vec(v.clone(), (2, BLOCK), &Device::Cpu)?;
    let q = QuantizedWeight::quantize(&w, QuantFormat::Int8)?;
    assert_eq!(q.shape(), (2, BLOCK));
    assert_eq!(q.format(), QuantFormat::Int8);
    assert_eq!(q.block_absmax()?, [16.0, 0.0]);
    assert_eq!(q.storage_bytes(), 2 * BLOCK + 2 * 4);
    let deq = flat(&q.dequantize(DType::F32, &Device::Cpu)?)?;
    let step = 16f32 / 127.0;
    assert_eq!(deq[0], -127.0 * step); // x = −16
    assert_eq!(deq[32], 0.0); // x = 0 stays exactly 0
    assert_eq!(deq[48], 64.0 * step); // x = 8: 8/16·127 = 63.5 rounds away from zero
    assert_eq!(deq[49], 67.0 * step); // x = 8.5: 67.4375
    assert!(
        deq[BLOCK..].iter().all(|&d| d == 0.0),
        "a zero block stays zero"
    );
    // Every value, by the formula computed independently in f64.
    for (j, (&x, &d)) in v.iter().zip(&deq).enumerate().take(BLOCK) {
        let code = (x as f64 / 16.0 * 127.0).round();
        assert!((d as f64 - code * 16.0 / 127.0).abs() < 1e-5, "element {j}");
    }
    Ok(())
}

/// NF4 on two blocks whose values are exactly code values times 2 and times 1. Double
/// quantization by hand: the mean absmax is 1.5, the centred values ±0.5 have group absmax
/// 0.5, so they normalise to ±1; +1 is in the dynamic map (â = 2 exactly), −1 is not and
/// rounds to its smallest value −0.99296875 (â = 1.5 − 0.99296875/2).
#[test]
fn nf4_codes_by_hand() -> R {
    let v: Vec<f32> = (0..2 * BLOCK)
        .map(|j| NF4_CODE[j % 16] * if j < BLOCK { 2.0 } else { 1.0 })
        .collect();
    let w = Tensor::from_vec(v, (1, 2 * BLOCK), &Device::Cpu)?;
    let q = QuantizedWeight::quantize(&w, QuantFormat::Nf4)?;
    let a1 = 1.5f32 + -0.99296875f32 * 0.5;
    let absmax = q.block_absmax()?;
    assert_eq!(absmax[0], 2.0);
    assert!((absmax[1] - a1).abs() <= 1e-7, "{} vs {a1}", absmax[1]);
    // 64 bytes of codes, 2 absmax codes, 1 group scale, the offset.
    assert_eq!(q.storage_bytes(), BLOCK + 2 + 4 + 4);
    let deq = flat(&q.dequantize(DType::F32, &Device::Cpu)?)?;
    for (j, &d) in deq.iter().enumerate() {
        let want = NF4_CODE[j % 16] * if j < BLOCK { 2.0 } else { absmax[1] };
        assert_eq!(d, want, "element {j}");
    }
    assert_eq!(deq[7], 0.0);
    Ok(())
}

/// Round trips of random weights stay within the stated bounds, exact zeros survive, and
/// the storage is what the module docs say.
#[test]
fn round_trip_bounds() -> R {
    let (n, k) = (96, 640); // 960 blocks: 4 groups of 256, the last one partial
    let mut w = flat(&uniform(1, &[n, k], 0.05)?)?;
    for i in (0..w.len()).step_by(37) {
        w[i] = 0.0;
    }
    w[5 * k..6 * k].iter_mut().for_each(|x| *x = 0.0); // an all-zero row
    let wt = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu)?;
    let true_absmax: Vec<f32> = w
        .chunks(BLOCK)
        .map(|b| b.iter().fold(0f32, |m, x| m.max(x.abs())))
        .collect();

    let q = QuantizedWeight::quantize(&wt, QuantFormat::Int8)?;
    let deq = flat(&q.dequantize(DType::F32, &Device::Cpu)?)?;
    for (i, (&x, &d)) in w.iter().zip(&deq).enumerate() {
        let a = true_absmax[i / BLOCK];
        assert!(
            (x - d).abs() <= a / 254.0 * (1.0 + 1e-5),
            "int8 element {i}"
        );
        assert!(x != 0.0 || d == 0.0, "int8 zero at {i}");
    }
    assert_eq!(q.storage_bytes(), n * k + n * k / BLOCK * 4);

    let q = QuantizedWeight::quantize(&wt, QuantFormat::Nf4)?;
    let deq = flat(&q.dequantize(DType::F32, &Device::Cpu)?)?;
    let absmax = q.block_absmax()?;
    let dyn_gap = dynamic_code()
        .windows(2)
        .map(|w| w[1] - w[0])
        .fold(0f32, f32::max);
    let mean = true_absmax.iter().map(|&a| a as f64).sum::<f64>() / true_absmax.len() as f64;
    for (g, group) in true_absmax.chunks(NF4_GROUP).enumerate() {
        let s = group
            .iter()
            .fold(0f32, |m, &a| m.max((a as f64 - mean).abs() as f32));
        for (j, &a) in group.iter().enumerate() {
            let b = g * NF4_GROUP + j;
            let err = (absmax[b] - a).abs();
            assert!(
                err <= dyn_gap / 2.0 * s + 1e-6,
                "absmax of block {b}: {err}"
            );
        }
    }
    for (i, (&x, &d)) in w.iter().zip(&deq).enumerate() {
        let (a, ah) = (true_absmax[i / BLOCK], absmax[i / BLOCK]);
        let bound = NF4_MAX_GAP / 2.0 * a + (a - ah).abs() + 1e-7;
        assert!((x - d).abs() <= bound, "nf4 element {i}: {x} vs {d}");
        assert!(x != 0.0 || d == 0.0, "nf4 zero at {i}");
    }
    let blocks = n * k / BLOCK;
    assert_eq!(
        q.storage_bytes(),
        n * k / 2 + blocks + blocks.div_ceil(NF4_GROUP) * 4 + 4
    );
    let per_param = q.storage_bytes() as f64 / (n * k) as f64;
    let stated = QuantFormat::Nf4.bytes_per_param(DType::BF16);
    assert!((per_param - stated).abs() < 1e-3, "{per_param} vs {stated}");
    assert!((stated - 0.516).abs() < 5e-4);
    Ok(())
}

/// The quantized layer's y and dL/dx equal a dense frozen `Linear` over the dequantized
/// weight bit for bit (same codes, and gemm sums each output over the same depth blocks: the
/// depth here is at most 512, gemm's smallest depth block), for 2-D and 3-D inputs, with a
/// bias; no gradient of W's shape is produced.
#[test]
fn layer_matches_dequantized_dense_exactly() -> R {
    for (format, x_dims, n, k) in [
        (QuantFormat::Int8, vec![8, 256], 200, 256),
        (QuantFormat::Nf4, vec![2, 9, 512], 300, 512),
        (QuantFormat::Nf4, vec![33, 128], 130, 128),
        (QuantFormat::Int8, vec![1, 64], 70, 64),
    ] {
        let w = uniform(2, &[n, k], 0.1)?;
        let b = uniform(3, &[n], 0.1)?;
        let q = QuantizedWeight::quantize(&w, format)?;
        let deq = q.dequantize(DType::F32, &Device::Cpu)?;
        let x = Var::from_tensor(&uniform(4, &x_dims, 1.0)?)?;
        let probe = uniform(5, &[&x_dims[..x_dims.len() - 1], &[n]].concat(), 1.0)?;

        let layer = Linear::quantized(q, Some(b.clone()));
        assert_eq!(layer.weight_shape()?, (n, k));
        assert!(layer.weight().is_none() && !layer.trains_weight());
        let y = layer.forward(x.as_tensor())?;
        let grads = (&y * &probe)?.sum_all()?.backward()?;

        let dense = Linear::new(deq, Some(b));
        let y_ref = dense.forward(x.as_tensor())?;
        let grads_ref = (&y_ref * &probe)?.sum_all()?.backward()?;

        let what = format!("{format} {x_dims:?} × ({n}, {k})");
        assert_same(&y, &y_ref, &format!("{what}: y"))?;
        let dx = grads.get(x.as_tensor()).expect("dx");
        assert_same(dx, grads_ref.get(x.as_tensor()).expect("dx_ref"), &what)?;
        assert_eq!(
            count_shaped(&grads, &[n, k]) + count_shaped(&grads, &[k, n]),
            0
        );
    }
    Ok(())
}

/// At a depth above 512 gemm's depth blocks depend on the product's width, so the fused
/// panels may sum in another order than the dense product: both then lie within
/// γ_k·Σ|x||w| of the exact sum (any summation order of k terms does), so they differ by at
/// most twice that.
#[test]
fn layer_matches_dequantized_dense_at_large_depth() -> R {
    let (m, n, k) = (40, 320, 1536);
    let w = uniform(6, &[n, k], 0.05)?;
    let q = QuantizedWeight::quantize(&w, QuantFormat::Nf4)?;
    let deq = q.dequantize(DType::F32, &Device::Cpu)?;
    let x = Var::from_tensor(&uniform(7, &[m, k], 1.0)?)?;
    let g = uniform(8, &[m, n], 1.0)?;
    let layer = Linear::quantized(q, None);
    let y = layer.forward(x.as_tensor())?;
    let dx = (&y * &g)?.sum_all()?.backward()?;
    let dx = dx.get(x.as_tensor()).expect("dx");
    let eps = f32::EPSILON as f64;
    let gamma = |terms: usize| terms as f64 * eps / (1.0 - terms as f64 * eps);
    let check = |got: &Tensor, want: Tensor, bound: Tensor, terms: usize| -> R {
        let (got, want, bound) = (flat(got)?, flat(&want)?, flat(&bound)?);
        for (i, ((g, w), b)) in got.iter().zip(&want).zip(&bound).enumerate() {
            let tol = 2.0 * gamma(terms) * *b as f64;
            assert!(
                ((g - w) as f64).abs() <= tol,
                "element {i}: {g} vs {w} (tol {tol})"
            );
        }
        Ok(())
    };
    let xt = x.as_tensor().detach();
    check(
        &y,
        xt.matmul(&deq.t()?)?,
        xt.abs()?.matmul(&deq.abs()?.t()?)?,
        k,
    )?;
    check(dx, g.matmul(&deq)?, g.abs()?.matmul(&deq.abs()?)?, n)?;
    Ok(())
}

/// QLoRA: LoRA over the quantized base gets the same A and B gradients, and the same dx, as
/// LoRA over a dense base holding the dequantized weight; the base gets none.
#[test]
fn lora_over_quantized_base() -> R {
    let (n, k, rank) = (96, 192, 4);
    let w = uniform(9, &[n, k], 0.1)?;
    let q = QuantizedWeight::quantize(&w, QuantFormat::Nf4)?;
    let deq = q.dequantize(DType::F32, &Device::Cpu)?;
    let a = Var::from_tensor(&uniform(10, &[rank, k], 0.1)?)?;
    let b = Var::from_tensor(&uniform(11, &[n, rank], 0.1)?)?;
    let adapter = LoraAdapter {
        a: a.as_tensor().clone(),
        b: b.as_tensor().clone(),
        scale: 2.0,
    };
    let x = Var::from_tensor(&uniform(12, &[3, 7, k], 1.0)?)?;
    let probe = uniform(13, &[3, 7, n], 1.0)?;
    let run = |layer: Linear| -> candle_core::Result<(Tensor, GradStore)> {
        let y = layer.forward(x.as_tensor())?;
        let grads = (&y * &probe)?.sum_all()?.backward()?;
        Ok((y, grads))
    };
    let (y, grads) = run(Linear::quantized(q, None).with_lora(adapter.clone()))?;
    let (y_ref, grads_ref) = run(Linear::new(deq, None).with_lora(adapter))?;
    assert_same(&y, &y_ref, "y")?;
    for (t, name) in [(&a, "dA"), (&b, "dB"), (&x, "dx")] {
        let got = grads.get(t.as_tensor()).expect(name);
        assert_same(got, grads_ref.get(t.as_tensor()).expect(name), name)?;
    }
    assert_eq!(
        count_shaped(&grads, &[n, k]) + count_shaped(&grads, &[k, n]),
        0
    );
    Ok(())
}

/// Half precision and f64 take the transient-dequantization path (the one other devices
/// take): a bf16 layer equals a dense bf16 layer over the bf16 dequantized weight up to
/// bf16 rounding of the products' sums, an f64 one to f64's.
#[test]
fn other_dtypes_dequantize_transiently() -> R {
    let (n, k) = (64, 128);
    let w = uniform(14, &[n, k], 0.1)?;
    let q = QuantizedWeight::quantize(&w, QuantFormat::Int8)?;
    for (dtype, tol) in [(DType::BF16, 2e-2), (DType::F64, 1e-12)] {
        let x = Var::from_tensor(&uniform(15, &[5, k], 1.0)?.to_dtype(dtype)?)?;
        let layer = Linear::quantized(q.clone(), None);
        let y = layer.forward(x.as_tensor())?;
        assert_eq!(y.dtype(), dtype);
        let dx = y.sum_all()?.backward()?;
        let dx = dx.get(x.as_tensor()).expect("dx");
        let deq = q.dequantize(dtype, &Device::Cpu)?;
        let y_ref = x.as_tensor().detach().matmul(&deq.t()?)?;
        let dx_ref = Tensor::ones((5, n), dtype, &Device::Cpu)?.matmul(&deq)?;
        let diff = |a: &Tensor, b: &Tensor| -> candle_core::Result<f64> {
            (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f64>()
        };
        assert!(diff(&y, &y_ref)? <= tol, "{dtype:?} y");
        assert!(diff(dx, &dx_ref)? <= tol, "{dtype:?} dx");
    }
    Ok(())
}

/// Bad weights are refused with an error that says what was wrong; a bad input to a layer
/// is an error and the layer computes as before afterwards.
#[test]
fn bad_input_is_an_error() -> R {
    let dev = Device::Cpu;
    let refused = |w: Tensor, format: QuantFormat, needle: &str| {
        let err = QuantizedWeight::quantize(&w, format).unwrap_err();
        assert!(
            matches!(err, LisaError::InvalidArgument { .. }),
            "{needle}: {err:?}"
        );
        assert!(err.to_string().contains(needle), "{err}");
    };
    refused(
        Tensor::zeros(64, DType::F32, &dev)?,
        QuantFormat::Nf4,
        "2-D",
    );
    refused(
        Tensor::zeros((2, 2, 64), DType::F32, &dev)?,
        QuantFormat::Int8,
        "2-D",
    );
    refused(
        Tensor::zeros((0, 64), DType::F32, &dev)?,
        QuantFormat::Int8,
        "empty",
    );
    refused(
        Tensor::zeros((4, 96), DType::F32, &dev)?,
        QuantFormat::Nf4,
        "multiple of",
    );
    refused(
        Tensor::zeros((4, 64), DType::U32, &dev)?,
        QuantFormat::Int8,
        "float",
    );
    refused(
        Tensor::zeros((4, 64), DType::F32, &dev)?,
        QuantFormat::Dense,
        "dense",
    );
    let mut v = vec![0.5f32; 2 * 64];
    v[64 + 3] = f32::NAN;
    refused(
        Tensor::from_vec(v.clone(), (2, 64), &dev)?,
        QuantFormat::Nf4,
        "(1, 3) is NaN",
    );
    v[64 + 3] = f32::INFINITY;
    refused(
        Tensor::from_vec(v, (2, 64), &dev)?,
        QuantFormat::Int8,
        "inf",
    );
    assert!(Linear::with_storage(
        &Tensor::zeros(3, DType::F32, &dev)?,
        None,
        QuantFormat::Int8
    )
    .is_err());

    let w = uniform(16, &[8, 64], 0.1)?;
    let layer = Linear::with_storage(&w, None, QuantFormat::Nf4)?;
    let x = uniform(17, &[2, 64], 1.0)?;
    let before = layer.forward(&x)?;
    let err = layer.forward(&uniform(18, &[2, 63], 1.0)?).unwrap_err();
    assert!(err.to_string().contains("quantized Linear"), "{err}");
    assert_same(&layer.forward(&x)?, &before, "after an error")?;
    Ok(())
}

#[test]
fn format_names() -> R {
    for (format, name) in [
        (QuantFormat::Dense, "dense"),
        (QuantFormat::Int8, "int8"),
        (QuantFormat::Nf4, "nf4"),
    ] {
        assert_eq!(format.to_string(), name);
        assert_eq!(name.parse::<QuantFormat>()?, format);
        assert_eq!(serde_json::to_string(&format)?, format!("\"{name}\""));
        assert_eq!(
            serde_json::from_str::<QuantFormat>(&format!("\"{name}\""))?,
            format
        );
    }
    assert_eq!(QuantFormat::default(), QuantFormat::Dense);
    assert!("NF4".parse::<QuantFormat>().is_err());
    let dense = Linear::with_storage(&uniform(19, &[4, 64], 1.0)?, None, QuantFormat::Dense)?;
    assert!(dense.weight().is_some());
    Ok(())
}

/// The weight of scripts/quant_fixtures.py, made the same way: a 64-bit LCG's top 24 bits
/// as `(2u − 1) · 0.05`, every 997th value times 8, every 101st zero, block 5 all zero.
fn fixture_weight(shape: (usize, usize)) -> Vec<f32> {
    let mut state: u64 = 0x853C_49E6_748F_EA9B;
    let mut w: Vec<f32> = (0..shape.0 * shape.1)
        .map(|i| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = (state >> 40) as f32 / (1u32 << 24) as f32;
            let x = (u * 2.0 - 1.0) * 0.05;
            let x = if i % 997 == 0 { x * 8.0 } else { x };
            if i % 101 == 0 {
                0.0
            } else {
                x
            }
        })
        .collect();
    w[5 * BLOCK..6 * BLOCK].iter_mut().for_each(|x| *x = 0.0);
    w
}

/// Both formats against a second implementation in numpy (scripts/quant_fixtures.py, which
/// says what it follows): the dequantized weight bit for bit (by its SHA-256), the absmax of
/// every block and the first 128 values.
#[test]
fn matches_the_numpy_fixture() -> R {
    use sha2::{Digest, Sha256};
    let text = std::fs::read_to_string("tests/fixtures/quant/expected.json")?;
    let expected: serde_json::Value = serde_json::from_str(&text)?;
    let shape = expected["shape"]
        .as_array()
        .and_then(|s| Some((s[0].as_u64()? as usize, s[1].as_u64()? as usize)))
        .expect("shape");
    let bits = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|b| b.as_u64().expect("bits") as u32)
            .collect()
    };
    let w = Tensor::from_vec(fixture_weight(shape), shape, &Device::Cpu)?;
    for (format, name) in [(QuantFormat::Int8, "int8"), (QuantFormat::Nf4, "nf4")] {
        let want = &expected[name];
        let q = QuantizedWeight::quantize(&w, format)?;
        let absmax: Vec<u32> = q.block_absmax()?.iter().map(|a| a.to_bits()).collect();
        assert_eq!(absmax, bits(&want["block_absmax"]), "{name} block absmax");
        let deq = flat(&q.dequantize(DType::F32, &Device::Cpu)?)?;
        let first: Vec<u32> = deq[..128].iter().map(|d| d.to_bits()).collect();
        assert_eq!(first, bits(&want["first_values"]), "{name} first values");
        let bytes: Vec<u8> = deq.iter().flat_map(|d| d.to_le_bytes()).collect();
        let digest: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(digest, want["sha256"].as_str().expect("sha256"), "{name}");
    }
    Ok(())
}

/// A frozen block of quantized layers runs under frozen-block recompute: the same output and
/// dL/dx as the plain path, bit for bit.
#[test]
fn recompute_over_quantized_layers() -> R {
    use candle_lisa::nn::recompute::recompute;
    use std::sync::Arc;
    let up = Linear::with_storage(&uniform(20, &[256, 128], 0.1)?, None, QuantFormat::Nf4)?;
    let down = Linear::with_storage(&uniform(21, &[128, 256], 0.1)?, None, QuantFormat::Int8)?;
    let block = Arc::new(move |x: &Tensor| down.forward(&up.forward(x)?.tanh()?));
    let x = Var::from_tensor(&uniform(22, &[2, 6, 128], 1.0)?)?;
    let probe = uniform(23, &[2, 6, 128], 1.0)?;
    let plain = block(x.as_tensor())?;
    let grads_plain = (&plain * &probe)?.sum_all()?.backward()?;
    let y = recompute(x.as_tensor(), block)?;
    let grads = (&y * &probe)?.sum_all()?.backward()?;
    assert_same(&y, &plain, "y")?;
    let dx = grads.get(x.as_tensor()).expect("dx");
    assert_same(dx, grads_plain.get(x.as_tensor()).expect("dx"), "dx")?;
    Ok(())
}
