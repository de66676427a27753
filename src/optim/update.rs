//! The AdamW update of one parameter ([`Moments`]): fused and in place on the CPU and on CUDA,
//! candle tensor ops elsewhere; f32 master weights and moments for half-precision parameters.

use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor, Var};
use candle_nn::ParamsAdamW;
use rayon::prelude::*;

use crate::nn::calibrate::storage_key;

#[cfg(feature = "cuda")]
mod cuda;
mod fused;

pub(crate) use fused::{adamw_in_place, adamw_in_place_compact};

/// Elements per rayon task: large enough that scheduling costs nothing next to the memory
/// traffic, small enough to split a 1M-parameter tensor across cores.
pub(super) const CHUNK: usize = 1 << 15;

/// AdamW state of one parameter.
///
/// Invariants: `step` counts the updates applied since this state was created, so a parameter
/// that comes back after being frozen starts at 0 and its first update uses bias correction
/// for t = 1. For an f16 or bf16 parameter, `master` is an f32 copy of the weights made when
/// the state was created, the update runs on it, and the parameter holds its value rounded to
/// nearest-even; `m` and `v` are f32. For any other dtype `master` is `None` and `m`, `v` have
/// the parameter's dtype. Compact state ([`CompactState`](super::precision::CompactState)) is
/// the one exception: `m` and `v` are bf16 (for f32, bf16 and f16 parameters), and `m` being
/// bf16 is what marks it. `m`, `v` and `master` own their storage (no other tensor shares
/// it), so the fused update may write them in place. `salt` seeds the stochastic rounding of
/// compact moments, so that no two parameters round alike.
#[derive(Debug)]
pub(crate) struct Moments {
    pub m: Tensor,
    pub v: Tensor,
    pub master: Option<Tensor>,
    pub step: u64,
    pub salt: u64,
}

/// Whether parameters of `dtype` get an f32 master copy and f32 moments.
pub(crate) fn is_half(dtype: DType) -> bool {
    matches!(dtype, DType::F16 | DType::BF16)
}

/// Whether a parameter of `dtype` can keep compact (bf16) moments: f64 parameters keep
/// theirs.
pub(crate) fn can_compact(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

impl Moments {
    /// Fresh state for `theta`: zero moments (bf16 when `compact` and the dtype allows it),
    /// step 0, and for half precision a master copy of `theta`'s current value.
    pub fn new(theta: &Tensor, compact: bool, salt: u64) -> Result<Self> {
        let master = match is_half(theta.dtype()) {
            true => Some(theta.detach().to_dtype(DType::F32)?),
            false => None,
        };
        let dtype = match (&master, compact && can_compact(theta.dtype())) {
            (_, true) => DType::BF16,
            (Some(_), false) => DType::F32,
            (None, false) => theta.dtype(),
        };
        Ok(Self {
            m: Tensor::zeros(theta.shape(), dtype, theta.device())?,
            v: Tensor::zeros(theta.shape(), dtype, theta.device())?,
            master,
            step: 0,
            salt,
        })
    }

    /// Whether the moments are compact (bf16).
    pub fn is_compact(&self) -> bool {
        self.m.dtype() == DType::BF16
    }

    /// Converts the moments to compact or back (rounding to nearest when compacting); a
    /// no-op for f64 parameters and for moments already so.
    pub fn set_compact(&mut self, theta: &Tensor, compact: bool) -> Result<()> {
        if !can_compact(theta.dtype()) || compact == self.is_compact() {
            return Ok(());
        }
        let dtype = match (compact, &self.master) {
            (true, _) => DType::BF16,
            (false, Some(_)) => DType::F32,
            (false, None) => theta.dtype(),
        };
        self.m = self.m.to_dtype(dtype)?;
        self.v = self.v.to_dtype(dtype)?;
        Ok(())
    }

    /// Bytes held: the moments and the master copy.
    pub fn bytes(&self) -> usize {
        [Some(&self.m), Some(&self.v), self.master.as_ref()]
            .into_iter()
            .flatten()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// Applies update number `step + 1` to `var` with gradient `g · inv_scale` (`inv_scale`
    /// undoes loss scaling; 1 without it).
    ///
    /// On the CPU and on CUDA (feature `cuda`), for contiguous operands, this is
    /// [`adamw_in_place`]: it reads θ, g, m and v (and the master copy) once, writes them once,
    /// and allocates nothing parameter-sized. Elsewhere (Metal, non-contiguous gradients) it
    /// runs the same math as tensor ops ([`adamw`]) on detached tensors and writes the results
    /// back.
    pub fn update(&mut self, p: &ParamsAdamW, var: &Var, g: &Tensor, inv_scale: f64) -> Result<()> {
        let t = self.step + 1;
        let theta = var.as_tensor();
        if self.is_compact() {
            let g = g.contiguous()?;
            let w = self.master.as_ref();
            adamw_in_place_compact(p, t, theta, &g, w, &self.m, &self.v, inv_scale, self.salt)?;
        } else if fusable(theta, g, self.master.as_ref(), &self.m, &self.v) {
            adamw_in_place(
                p,
                t,
                theta,
                g,
                self.master.as_ref(),
                &self.m,
                &self.v,
                inv_scale,
            )?;
        } else {
            let g = match &self.master {
                Some(_) => g.detach().to_dtype(DType::F32)?,
                None => g.detach(),
            };
            let g = if inv_scale == 1.0 {
                g
            } else {
                (g * inv_scale)?
            };
            match &mut self.master {
                Some(master) => {
                    let (next_master, m, v) = adamw(p, t, master, &g, &self.m, &self.v)?;
                    var.set(&next_master.to_dtype(theta.dtype())?)?;
                    *master = next_master;
                    (self.m, self.v) = (m, v);
                }
                None => {
                    let (next_theta, m, v) = adamw(p, t, &theta.detach(), &g, &self.m, &self.v)?;
                    var.set(&next_theta)?;
                    (self.m, self.v) = (m, v);
                }
            }
        }
        self.step = t;
        Ok(())
    }
}

/// The sum of the squares of `g`'s elements: NaN exactly when an element is NaN or infinite.
/// One parallel pass on the CPU (f32 squares summed in eight lanes per chunk, so the loop
/// vectorises, chunks summed in f64; a chunk whose f32 sum overflows is summed again in f64);
/// on CUDA one kernel launch summing in f64; elsewhere candle ops in f32.
pub(crate) fn sum_squares(g: &Tensor) -> Result<f64> {
    #[cfg(feature = "cuda")]
    if g.device().is_cuda() {
        if let Some(sum) = cuda::sum_squares(g)? {
            return Ok(sum);
        }
    }
    if let (Device::Cpu, Some((start, end))) = (g.device(), g.layout().contiguous_offsets()) {
        let (storage, _) = g.storage_and_layout();
        if let Storage::Cpu(s) = &*storage {
            match s {
                CpuStorage::F32(s) => return Ok(sum_sq(&s[start..end], |&x| x)),
                CpuStorage::BF16(s) => return Ok(sum_sq(&s[start..end], |x| x.to_f32())),
                CpuStorage::F16(s) => return Ok(sum_sq(&s[start..end], |x| x.to_f32())),
                CpuStorage::F64(s) => {
                    let s = &s[start..end];
                    let chunks = s.par_chunks(CHUNK);
                    return Ok(chunks.map(|c| c.iter().map(|x| x * x).sum::<f64>()).sum());
                }
                _ => {}
            }
        }
    }
    let g = match g.dtype() {
        DType::F32 => g.detach(),
        _ => g.detach().to_dtype(DType::F32)?,
    };
    Ok(g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64)
}

/// [`sum_squares`] of each tensor, in order. On CUDA every contiguous gradient's kernel writes
/// its partial sums into one device buffer, read back once: one host synchronisation for all
/// of them, not one per tensor. The sums are those of [`sum_squares`], bit for bit.
pub(crate) fn sum_squares_all(gs: &[&Tensor]) -> Result<Vec<f64>> {
    #[cfg(feature = "cuda")]
    let batched = cuda::sum_squares_all(gs)?;
    #[cfg(not(feature = "cuda"))]
    let batched = vec![None; gs.len()];
    gs.iter()
        .zip(batched)
        .map(|(g, sum)| match sum {
            Some(sum) => Ok(sum),
            None => sum_squares(g),
        })
        .collect()
}

/// [`sum_squares`] over a slice whose elements widen to f32 with `f`.
fn sum_sq<T: Sync>(s: &[T], f: impl Fn(&T) -> f32 + Sync + Send) -> f64 {
    s.par_chunks(CHUNK)
        .map(|c| {
            let (mut lanes, mut finite) = ([0f32; 8], true);
            let mut blocks = c.chunks_exact(8);
            for block in &mut blocks {
                for (lane, x) in lanes.iter_mut().zip(block) {
                    let v = f(x);
                    finite &= v.is_finite();
                    *lane += v * v;
                }
            }
            for x in blocks.remainder() {
                let v = f(x);
                finite &= v.is_finite();
                lanes[0] += v * v;
            }
            let sum: f32 = lanes.iter().sum();
            match (finite, sum.is_finite()) {
                (false, _) => f64::NAN,
                (true, true) => sum as f64,
                (true, false) => c.iter().map(|x| (f(x) as f64).powi(2)).sum(),
            }
        })
        .sum()
}

/// Whether [`adamw_in_place`] applies: every operand on θ's device, which is the CPU (or a
/// CUDA device, with the feature `cuda`), contiguous, of θ's shape, no
/// two sharing storage; θ and g of one dtype, and either f32/f64 moments of that dtype and no
/// master, or (θ in f16/bf16) an f32 master and f32 moments.
pub(crate) fn fusable(
    theta: &Tensor,
    g: &Tensor,
    master: Option<&Tensor>,
    m: &Tensor,
    v: &Tensor,
) -> bool {
    let state_dtype = match (theta.dtype(), master) {
        (DType::F32 | DType::F64, None) => theta.dtype(),
        (DType::F16 | DType::BF16, Some(w)) if w.dtype() == DType::F32 => DType::F32,
        _ => return false,
    };
    let state = [Some(m), Some(v), master];
    let all: Vec<&Tensor> = [Some(theta), Some(g)]
        .into_iter()
        .chain(state)
        .flatten()
        .collect();
    let fused_device = match theta.device() {
        Device::Cpu => true,
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => true,
        _ => false,
    };
    fused_device
        && g.dtype() == theta.dtype()
        && state.iter().flatten().all(|t| t.dtype() == state_dtype)
        && all.iter().all(|t| {
            t.shape() == theta.shape()
                && t.is_contiguous()
                && t.device().same_device(theta.device())
        })
        && {
            let keys: Vec<usize> = all.iter().map(|t| storage_key(t)).collect();
            (0..keys.len()).all(|i| !keys[i + 1..].contains(&keys[i]))
        }
}

/// Bias corrections and the other constants of update number `t` (1-based), computed in f64
/// and rounded once, exactly as candle's tensor ops round them.
struct Coefficients {
    beta1: f64,
    one_minus_beta1: f64,
    beta2: f64,
    one_minus_beta2: f64,
    scale_m: f64,
    scale_v: f64,
    eps: f64,
    decay: f64,
    lr: f64,
}

impl Coefficients {
    fn new(p: &ParamsAdamW, t: u64) -> Self {
        let t = i32::try_from(t).unwrap_or(i32::MAX);
        Self {
            beta1: p.beta1,
            one_minus_beta1: 1.0 - p.beta1,
            beta2: p.beta2,
            one_minus_beta2: 1.0 - p.beta2,
            scale_m: 1f64 / (1f64 - p.beta1.powi(t)),
            scale_v: 1f64 / (1f64 - p.beta2.powi(t)),
            eps: p.eps,
            decay: 1f64 - p.lr * p.weight_decay,
            lr: p.lr,
        }
    }
}

/// One AdamW step (candle_nn::AdamW's math, op for op): returns `(θ', m', v')` for the update
/// number `t` (1-based) of this parameter. Every input must be detached, so nothing it builds
/// is attached to a graph and each temporary is freed as soon as the next op has read it.
pub(crate) fn adamw(
    p: &ParamsAdamW,
    t: u64,
    theta: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let c = Coefficients::new(p, t);
    let next_m = ((m * c.beta1)? + (g * c.one_minus_beta1)?)?;
    let next_v = ((v * c.beta2)? + (g.sqr()? * c.one_minus_beta2)?)?;
    let adjusted = ((&next_m * c.scale_m)? / (((&next_v * c.scale_v)?.sqrt()? + c.eps)?))?;
    let next_theta = ((theta * c.decay)? - (adjusted * c.lr)?)?;
    Ok((next_theta, next_m, next_v))
}

#[cfg(test)]
mod tests {
    use super::fused::*;
    use super::*;
    use candle_core::IndexOp;
    use half::bf16;

    fn params() -> ParamsAdamW {
        ParamsAdamW {
            lr: 3e-2,
            weight_decay: 0.1,
            ..Default::default()
        }
    }

    /// Fused and tensor-op updates give the same bits, in f32 and f64, at the first update and
    /// at a late one (other bias corrections), including zero and negative-zero gradients.
    #[test]
    fn fused_equals_tensor_ops() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F64] {
            for t in [1u64, 7, 4000] {
                let n = 3 * CHUNK + 17;
                let theta = Tensor::randn(0f64, 1., n, &dev)?.to_dtype(dtype)?;
                let mut g = Tensor::randn(0f64, 1e-2, n, &dev)?.to_dtype(dtype)?;
                let signed_zeros = Tensor::new(&[0f64, -0.0], &dev)?.to_dtype(dtype)?;
                g = Tensor::cat(&[&signed_zeros, &g.narrow(0, 2, n - 2)?], 0)?;
                let m = (Tensor::randn(0f64, 1e-2, n, &dev)? * 0.5)?.to_dtype(dtype)?;
                let v = Tensor::randn(0f64, 1e-2, n, &dev)?.sqr()?.to_dtype(dtype)?;
                let (want_theta, want_m, want_v) = adamw(&params(), t, &theta, &g, &m, &v)?;
                let (theta, m, v) = (theta.copy()?, m.copy()?, v.copy()?);
                assert!(fusable(&theta, &g, None, &m, &v));
                adamw_in_place(&params(), t, &theta, &g, None, &m, &v, 1.0)?;
                for (got, want) in [(theta, want_theta), (m, want_m), (v, want_v)] {
                    let (got, want) = (got.to_dtype(DType::F64)?, want.to_dtype(DType::F64)?);
                    let got: Vec<u64> = got.to_vec1::<f64>()?.iter().map(|x| x.to_bits()).collect();
                    let want: Vec<u64> =
                        want.to_vec1::<f64>()?.iter().map(|x| x.to_bits()).collect();
                    assert_eq!(got, want, "{dtype:?}, t = {t}");
                }
            }
        }
        Ok(())
    }

    /// Operands the kernel cannot take go through the tensor ops, with the same result.
    #[test]
    fn unfusable_operands_take_the_tensor_path() -> Result<()> {
        let dev = Device::Cpu;
        let var = Var::randn(0f32, 1., (8, 6), &dev)?;
        let reference = var.as_tensor().copy()?;
        let g = Tensor::randn(0f32, 1., (6, 8), &dev)?.t()?;
        assert!(!g.is_contiguous());
        let mut state = Moments::new(var.as_tensor(), false, 0)?;
        assert!(!fusable(var.as_tensor(), &g, None, &state.m, &state.v));
        state.update(&params(), &var, &g, 1.0)?;
        let zeros = reference.zeros_like()?;
        let (want, _, _) = adamw(&params(), 1, &reference, &g, &zeros, &zeros)?;
        assert_eq!(var.as_tensor().to_vec2::<f32>()?, want.to_vec2::<f32>()?);
        assert_eq!(state.step, 1);
        // A gradient sharing θ's storage is not fused either (the kernel would alias them).
        assert!(!fusable(
            var.as_tensor(),
            &var.as_tensor().i(..)?,
            None,
            &state.m,
            &state.v
        ));
        Ok(())
    }

    /// Half precision: the fused update equals the tensor ops on the f32 master copy, rounded
    /// to nearest-even into the weight, with and without loss-scale unscaling; it holds the
    /// master and f32 moments, and the tensor path (a non-contiguous gradient) agrees.
    #[test]
    fn half_precision_updates_the_master_and_rounds() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in [DType::BF16, DType::F16] {
            for (t, inv_scale) in [(1u64, 1.0), (9, 1.0 / 1024.0)] {
                let n = 2 * CHUNK + 5;
                let theta0 = Tensor::randn(0f32, 1., n, &dev)?.to_dtype(dtype)?;
                let g = (Tensor::randn(0f32, 1e-2, n, &dev)? / inv_scale)?.to_dtype(dtype)?;
                let var = Var::from_tensor(&theta0)?;
                let mut state = Moments::new(var.as_tensor(), false, 0)?;
                let master = state.master.clone().expect("half parameters have a master");
                assert_eq!(master.dtype(), DType::F32);
                assert_eq!(state.m.dtype(), DType::F32);
                assert_eq!(state.bytes(), 12 * n);
                let m0 = Tensor::randn(0f32, 1e-3, n, &dev)?;
                let v0 = Tensor::randn(0f32, 1e-3, n, &dev)?.sqr()?;
                state.m = m0.copy()?;
                state.v = v0.copy()?;
                state.step = t - 1;
                let g32 = (g.to_dtype(DType::F32)? * inv_scale)?;
                let (want_w, want_m, want_v) =
                    adamw(&params(), t, &master.copy()?, &g32, &m0, &v0)?;
                assert!(fusable(
                    var.as_tensor(),
                    &g,
                    Some(&master),
                    &state.m,
                    &state.v
                ));
                state.update(&params(), &var, &g, inv_scale)?;
                let w = state.master.as_ref().expect("master kept");
                assert_eq!(w.to_vec1::<f32>()?, want_w.to_vec1::<f32>()?, "{dtype:?}");
                assert_eq!(state.m.to_vec1::<f32>()?, want_m.to_vec1::<f32>()?);
                assert_eq!(state.v.to_vec1::<f32>()?, want_v.to_vec1::<f32>()?);
                let rounded = want_w.to_dtype(dtype)?.to_dtype(DType::F32)?;
                let theta = var.as_tensor().to_dtype(DType::F32)?;
                assert_eq!(theta.to_vec1::<f32>()?, rounded.to_vec1::<f32>()?);

                // The tensor path, through a non-contiguous gradient, gives the same bits.
                let var2 = Var::from_tensor(&theta0)?;
                let mut tensor_state = Moments::new(var2.as_tensor(), false, 0)?;
                tensor_state.m = m0.copy()?;
                tensor_state.v = v0.copy()?;
                tensor_state.step = t - 1;
                let g_strided = Tensor::stack(&[&g, &g], 1)?.narrow(1, 0, 1)?.squeeze(1)?;
                assert!(!g_strided.is_contiguous());
                tensor_state.update(&params(), &var2, &g_strided, inv_scale)?;
                let w2 = tensor_state.master.as_ref().expect("master kept");
                assert_eq!(w2.to_vec1::<f32>()?, want_w.to_vec1::<f32>()?);
                let theta2 = var2.as_tensor().to_dtype(DType::F32)?;
                assert_eq!(theta2.to_vec1::<f32>()?, rounded.to_vec1::<f32>()?);
            }
        }
        Ok(())
    }

    /// Stochastic rounding is unbiased: over all 2^16 random inputs the mean of the rounded
    /// values is `x` exactly, and each result is one of the two bf16 neighbours of `x`.
    #[test]
    fn stochastic_rounding_is_unbiased() {
        for x in [
            1.0f32,
            1.0 + 1e-3,
            -3.7e-5,
            6.1e-9,
            2.5e4,
            f32::MIN_POSITIVE,
            -0.0,
        ] {
            let (down, up) = {
                let t = bf16::from_bits((x.to_bits() >> 16) as u16);
                (t.to_f64(), bf16::from_bits(t.to_bits() + 1).to_f64())
            };
            let mut sum = 0.0f64;
            for r in 0..=u16::MAX {
                let y = bf16_stochastic(x, r).to_f64();
                assert!(y == down || y == up, "{x}: {y} outside [{down}, {up}]");
                sum += y;
            }
            assert_eq!(sum / 65536.0, f64::from(x), "{x}");
        }
    }

    /// Compact moments: the weights follow the f32 update exactly (the update reads m and v
    /// widened and computes in f32), each stored moment is one of the two bf16 neighbours of
    /// the f32 one, the state is 4 bytes per f32 parameter (8 with a half master), and the
    /// rounding is the same on every run.
    #[test]
    fn compact_moments_round_to_neighbours() -> Result<()> {
        let dev = Device::Cpu;
        let neighbours = |exact: &Tensor, got: &Tensor| -> Result<()> {
            for (e, g) in exact.to_vec1::<f32>()?.iter().zip(got.to_vec1::<bf16>()?) {
                let down = bf16::from_bits((e.to_bits() >> 16) as u16);
                let up = bf16::from_bits(down.to_bits() + 1);
                let exact_bf16 = bf16::from_f32(*e) == g && g.to_f32() == *e;
                assert!(g == down || g == up || exact_bf16, "{e} stored as {g}");
            }
            Ok(())
        };
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let n = 2 * CHUNK + 5;
            let theta0 = Tensor::randn(0f32, 1., n, &dev)?.to_dtype(dtype)?;
            let g = Tensor::randn(0f32, 1e-2, n, &dev)?.to_dtype(dtype)?;
            let m0 = Tensor::randn(0f32, 1e-3, n, &dev)?.to_dtype(DType::BF16)?;
            let v0 = Tensor::randn(0f32, 1e-3, n, &dev)?
                .sqr()?
                .to_dtype(DType::BF16)?;
            let mut runs = Vec::new();
            for _ in 0..2 {
                let var = Var::from_tensor(&theta0)?;
                let mut state = Moments::new(var.as_tensor(), true, 3)?;
                assert!(state.is_compact());
                let per = if dtype == DType::F32 { 4 } else { 8 };
                assert_eq!(state.bytes(), per * n, "{dtype:?}");
                (state.m, state.v, state.step) = (m0.copy()?, v0.copy()?, 4);
                let w0 = theta0.to_dtype(DType::F32)?;
                let (m32, v32) = (m0.to_dtype(DType::F32)?, v0.to_dtype(DType::F32)?);
                let g32 = g.to_dtype(DType::F32)?;
                let (want_w, want_m, want_v) = adamw(&params(), 5, &w0, &g32, &m32, &v32)?;
                state.update(&params(), &var, &g, 1.0)?;
                let w = match &state.master {
                    Some(w) => w.clone(),
                    None => var.as_tensor().clone(),
                };
                assert_eq!(w.to_vec1::<f32>()?, want_w.to_vec1::<f32>()?, "{dtype:?}");
                neighbours(&want_m, &state.m)?;
                neighbours(&want_v, &state.v)?;
                runs.push((state.m.to_vec1::<bf16>()?, state.v.to_vec1::<bf16>()?));
            }
            assert_eq!(
                runs[0], runs[1],
                "{dtype:?}: the rounding is not deterministic"
            );
        }
        Ok(())
    }

    /// The sum of squares is exact for small integers on the fast path and the strided one,
    /// finite for finite elements whose squares overflow f32, and NaN or infinite exactly when
    /// an element is, in every float dtype (the step's finiteness check rests on this).
    #[test]
    fn sum_squares_finds_nan_and_inf() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F64, DType::BF16, DType::F16] {
            let x: Vec<f32> = (0..12).map(|i| i as f32 - 6.0).collect();
            let want: f64 = x.iter().map(|&v| (v * v) as f64).sum();
            let ok = Tensor::from_vec(x, (4, 3), &dev)?.to_dtype(dtype)?;
            assert_eq!(sum_squares(&ok)?, want, "{dtype:?}");
            assert_eq!(sum_squares(&ok.t()?)?, want, "{dtype:?} strided");
            // Finite but with squares past f32's range: the f64 fallback keeps it finite.
            let huge = Tensor::from_vec(vec![1e20f32; 12], (4, 3), &dev)?.to_dtype(dtype)?;
            if dtype != DType::F16 {
                let want = 12.0
                    * (huge
                        .flatten_all()?
                        .to_dtype(DType::F64)?
                        .get(0)?
                        .to_scalar::<f64>()?)
                    .powi(2);
                let got = sum_squares(&huge)?;
                assert!(
                    (got - want).abs() <= 1e-6 * want,
                    "{dtype:?}: {got} vs {want}"
                );
            }
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut x = vec![0.5f32; 12];
                x[7] = bad;
                let t = Tensor::from_vec(x, (4, 3), &dev)?.to_dtype(dtype)?;
                assert!(!sum_squares(&t)?.is_finite(), "{dtype:?} {bad}");
                assert!(
                    !sum_squares(&t.t()?)?.is_finite(),
                    "{dtype:?} {bad} strided"
                );
            }
        }
        Ok(())
    }
}
