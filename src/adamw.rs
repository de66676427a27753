//! The AdamW update: fused and in place on the CPU, candle tensor ops elsewhere.

use std::cell::Cell;

use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Result, Storage, Tensor, Var};
use candle_nn::ParamsAdamW;
use rayon::prelude::*;

/// AdamW moments of one parameter.
///
/// Invariant: `step` counts the updates applied since this state was created, so a parameter
/// that comes back after being frozen starts at 0 and its first update uses bias correction
/// for t = 1. `m` and `v` own their storage (no other tensor shares it), so the fused update
/// may write them in place.
#[derive(Debug)]
pub(crate) struct Moments {
    pub m: Tensor,
    pub v: Tensor,
    pub step: u64,
}

impl Moments {
    pub fn zeros_like(t: &Tensor) -> Result<Self> {
        Ok(Self {
            m: t.zeros_like()?,
            v: t.zeros_like()?,
            step: 0,
        })
    }

    pub fn bytes(&self) -> usize {
        (self.m.elem_count() + self.v.elem_count()) * self.m.dtype().size_in_bytes()
    }

    /// Applies update number `step + 1` to `var` with gradient `g`.
    ///
    /// On the CPU, for contiguous f32 or f64 parameters, this is [`adamw_in_place`]: it reads
    /// θ, g, m and v once, writes θ, m and v once, and allocates nothing parameter-sized.
    /// Elsewhere (CUDA, Metal, half precision) it runs the same math as tensor ops ([`adamw`])
    /// and writes the results back.
    pub fn update(&mut self, p: &ParamsAdamW, var: &Var, g: &Tensor) -> Result<()> {
        let t = self.step + 1;
        let theta = var.as_tensor();
        if fusable(theta, g, &self.m, &self.v) {
            adamw_in_place(p, t, theta, g, &self.m, &self.v)?;
        } else {
            let (next_theta, m, v) = adamw(p, t, &theta.detach(), &g.detach(), &self.m, &self.v)?;
            var.set(&next_theta)?;
            self.m = m;
            self.v = v;
        }
        self.step = t;
        Ok(())
    }
}

/// Whether [`adamw_in_place`] applies: CPU, one float dtype of 32 or 64 bits, contiguous.
pub(crate) fn fusable(theta: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor) -> bool {
    let all = [theta, g, m, v];
    matches!(theta.device(), Device::Cpu)
        && matches!(theta.dtype(), DType::F32 | DType::F64)
        && all
            .iter()
            .all(|t| t.dtype() == theta.dtype() && t.shape() == theta.shape() && t.is_contiguous())
        && {
            let keys = all.map(storage_key);
            (0..keys.len()).all(|i| !keys[i + 1..].contains(&keys[i]))
        }
}

/// Identifies a tensor's storage: equal for tensors that share it.
fn storage_key(t: &Tensor) -> usize {
    let (storage, _) = t.storage_and_layout();
    &*storage as *const Storage as usize
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

/// Elements per rayon task: large enough that scheduling costs nothing next to the memory
/// traffic, small enough to split a 1M-parameter tensor across cores.
const CHUNK: usize = 1 << 15;

/// The scalar types the fused kernel runs on.
trait Real: Copy + Send + Sync + std::ops::Add<Output = Self> + std::ops::Sub<Output = Self> {
    fn from_f64(x: f64) -> Self;
    fn mul(self, o: Self) -> Self;
    fn div(self, o: Self) -> Self;
    fn sqrt(self) -> Self;
}

macro_rules! real {
    ($t:ty) => {
        impl Real for $t {
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            fn mul(self, o: Self) -> Self {
                self * o
            }
            fn div(self, o: Self) -> Self {
                self / o
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
        }
    };
}
real!(f32);
real!(f64);

/// The fused update over slices of one dtype. Each element follows [`adamw`] op for op,
/// including the `+ 0` of candle's affine op (it turns -0 into +0), so both give the same bits.
fn kernel<T: Real>(c: &Coefficients, theta: &mut [T], g: &[T], m: &mut [T], v: &mut [T]) {
    let [b1, omb1, b2, omb2, sm, sv, eps, decay, lr, zero, one] = [
        c.beta1,
        c.one_minus_beta1,
        c.beta2,
        c.one_minus_beta2,
        c.scale_m,
        c.scale_v,
        c.eps,
        c.decay,
        c.lr,
        0.0,
        1.0,
    ]
    .map(T::from_f64);
    let affine = |x: T, a: T, b: T| x.mul(a) + b;
    theta
        .par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .for_each(|(((theta, g), m), v)| {
            for (((theta, &g), m), v) in theta.iter_mut().zip(g).zip(m).zip(v) {
                let next_m = affine(*m, b1, zero) + affine(g, omb1, zero);
                let next_v = affine(*v, b2, zero) + affine(g.mul(g), omb2, zero);
                let denom = affine(affine(next_v, sv, zero).sqrt(), one, eps);
                let adjusted = affine(next_m, sm, zero).div(denom);
                *theta = affine(*theta, decay, zero) - affine(adjusted, lr, zero);
                *m = next_m;
                *v = next_v;
            }
        });
}

/// [`kernel`] on the elements each operand's contiguous layout covers.
fn on_layouts<T: Real>(
    c: &Coefficients,
    (theta, lt): (&mut [T], &Layout),
    (g, lg): (&[T], &Layout),
    (m, lm): (&mut [T], &Layout),
    (v, lv): (&mut [T], &Layout),
) -> Result<()> {
    kernel(
        c,
        range_mut(theta, lt)?,
        range(g, lg)?,
        range_mut(m, lm)?,
        range_mut(v, lv)?,
    );
    Ok(())
}

/// The elements a contiguous layout covers.
fn range<'a, T>(s: &'a [T], l: &Layout) -> Result<&'a [T]> {
    let (start, end) = contiguous(l)?;
    Ok(&s[start..end])
}

fn range_mut<'a, T>(s: &'a mut [T], l: &Layout) -> Result<&'a mut [T]> {
    let (start, end) = contiguous(l)?;
    Ok(&mut s[start..end])
}

fn contiguous(l: &Layout) -> Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused AdamW: non-contiguous operand".into()))
}

/// Runs `f` on the CPU storage of a tensor, write-locked: candle's in-place op traits hand out
/// one mutable storage per call, so the update nests three of them to hold θ, m and v at once.
struct WithStorage<F>(Cell<Option<F>>);

impl<F: FnOnce(&mut CpuStorage, &Layout) -> Result<()>> InplaceOp1 for WithStorage<F> {
    fn name(&self) -> &'static str {
        "lisa-fused-adamw"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        match self.0.take() {
            Some(f) => f(storage, layout),
            None => candle_core::bail!("fused AdamW: storage visited twice"),
        }
    }
}

fn with_storage_mut(
    t: &Tensor,
    f: impl FnOnce(&mut CpuStorage, &Layout) -> Result<()>,
) -> Result<()> {
    t.inplace_op1(&WithStorage(Cell::new(Some(f))))
}

/// The fused AdamW update: writes update number `t` (1-based) into θ, m and v in place.
///
/// Requires [`fusable`]: every operand on the CPU, of θ's dtype (f32 or f64), contiguous, and
/// no two sharing storage. Gives the same bits as [`adamw`].
pub(crate) fn adamw_in_place(
    p: &ParamsAdamW,
    t: u64,
    theta: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
) -> Result<()> {
    let c = Coefficients::new(p, t);
    let (g_storage, g_layout) = g.storage_and_layout();
    let Storage::Cpu(g_storage) = &*g_storage else {
        candle_core::bail!("fused AdamW: the gradient is not on the CPU")
    };
    with_storage_mut(theta, |ts, tl| {
        with_storage_mut(m, |ms, ml| {
            with_storage_mut(v, |vs, vl| {
                use CpuStorage::{F32, F64};
                match (ts, g_storage, ms, vs) {
                    (F32(th), F32(gs), F32(ms), F32(vs)) => {
                        on_layouts(&c, (th, tl), (gs, g_layout), (ms, ml), (vs, vl))?
                    }
                    (F64(th), F64(gs), F64(ms), F64(vs)) => {
                        on_layouts(&c, (th, tl), (gs, g_layout), (ms, ml), (vs, vl))?
                    }
                    _ => candle_core::bail!("fused AdamW: operands of different dtypes"),
                }
                Ok(())
            })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::IndexOp;

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
                assert!(fusable(&theta, &g, &m, &v));
                adamw_in_place(&params(), t, &theta, &g, &m, &v)?;
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
        let mut state = Moments::zeros_like(var.as_tensor())?;
        assert!(!fusable(var.as_tensor(), &g, &state.m, &state.v));
        state.update(&params(), &var, &g)?;
        let zeros = reference.zeros_like()?;
        let (want, _, _) = adamw(&params(), 1, &reference, &g, &zeros, &zeros)?;
        assert_eq!(var.as_tensor().to_vec2::<f32>()?, want.to_vec2::<f32>()?);
        assert_eq!(state.step, 1);
        // A gradient sharing θ's storage is not fused either (the kernel would alias them).
        assert!(!fusable(
            var.as_tensor(),
            &var.as_tensor().i(..)?,
            &state.m,
            &state.v
        ));
        Ok(())
    }
}
