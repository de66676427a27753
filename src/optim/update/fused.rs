//! The fused in-place AdamW update: one pass over θ, g, m and v (and the f32 master copy of a
//! half-precision parameter), in chunks on rayon's pool on the CPU, one kernel launch on
//! CUDA; and its compact variant with bf16 moments rounded stochastically.

use std::cell::Cell;

use candle_core::{CpuStorage, InplaceOp1, Layout, Result, Storage, Tensor};
use candle_nn::ParamsAdamW;
use half::{bf16, f16};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use super::cuda;
use super::{Coefficients, CHUNK};

/// The scalar types the fused kernel runs on.
pub(super) trait Real:
    Copy + Send + Sync + std::ops::Add<Output = Self> + std::ops::Sub<Output = Self>
{
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

/// The constants of one update in the kernel's type.
#[derive(Clone, Copy)]
pub(super) struct Consts<T> {
    pub(super) b1: T,
    pub(super) omb1: T,
    pub(super) b2: T,
    pub(super) omb2: T,
    pub(super) sm: T,
    pub(super) sv: T,
    pub(super) eps: T,
    pub(super) decay: T,
    pub(super) lr: T,
    pub(super) inv_scale: T,
    pub(super) zero: T,
    pub(super) one: T,
}

impl<T: Real> Consts<T> {
    pub(super) fn new(c: &Coefficients, inv_scale: f64) -> Self {
        let f = T::from_f64;
        Self {
            b1: f(c.beta1),
            omb1: f(c.one_minus_beta1),
            b2: f(c.beta2),
            omb2: f(c.one_minus_beta2),
            sm: f(c.scale_m),
            sv: f(c.scale_v),
            eps: f(c.eps),
            decay: f(c.decay),
            lr: f(c.lr),
            inv_scale: f(inv_scale),
            zero: f(0.0),
            one: f(1.0),
        }
    }

    /// One element: writes m and v, returns the new θ. It follows [`adamw`] op for op,
    /// including the `+ 0` of candle's affine op (it turns -0 into +0), so both give the same
    /// bits. `g · inv_scale` is `g` exactly when `inv_scale` is 1.
    #[inline(always)]
    fn step(&self, theta: T, g: T, m: &mut T, v: &mut T) -> T {
        let k = self;
        let affine = |x: T, a: T, b: T| x.mul(a) + b;
        let g = g.mul(k.inv_scale);
        let next_m = affine(*m, k.b1, k.zero) + affine(g, k.omb1, k.zero);
        let next_v = affine(*v, k.b2, k.zero) + affine(g.mul(g), k.omb2, k.zero);
        let denom = affine(affine(next_v, k.sv, k.zero).sqrt(), k.one, k.eps);
        let adjusted = affine(next_m, k.sm, k.zero).div(denom);
        *m = next_m;
        *v = next_v;
        affine(theta, k.decay, k.zero) - affine(adjusted, k.lr, k.zero)
    }
}

/// The fused update over slices of one dtype (f32 or f64 parameters).
pub(super) fn kernel<T: Real>(k: Consts<T>, theta: &mut [T], g: &[T], m: &mut [T], v: &mut [T]) {
    theta
        .par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .for_each(|(((theta, g), m), v)| {
            for (((theta, &g), m), v) in theta.iter_mut().zip(g).zip(m).zip(v) {
                *theta = k.step(*theta, g, m, v);
            }
        });
}

/// A half-precision scalar type: widened to f32 exactly, narrowed with round-to-nearest-even.
pub(super) trait Half: Copy + Send + Sync {
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
}

impl Half for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

impl Half for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

/// The fused update of a half-precision parameter: the f32 kernel on the master copy, with
/// the gradient widened on the fly; the parameter receives the new master value rounded.
pub(super) fn kernel_half<H: Half>(
    k: Consts<f32>,
    theta: &mut [H],
    g: &[H],
    master: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
) {
    theta
        .par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(master.par_chunks_mut(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|(((theta, g), master), (m, v))| {
            let elems = theta.iter_mut().zip(g).zip(master).zip(m.iter_mut().zip(v));
            for (((theta, &g), w), (m, v)) in elems {
                *w = k.step(*w, g.to_f32(), m, v);
                *theta = H::from_f32(*w);
            }
        });
}

/// [`kernel`] on the elements each operand's contiguous layout covers.
pub(super) fn on_layouts<T: Real>(
    k: Consts<T>,
    (theta, lt): (&mut [T], &Layout),
    (g, lg): (&[T], &Layout),
    (m, lm): (&mut [T], &Layout),
    (v, lv): (&mut [T], &Layout),
) -> Result<()> {
    kernel(
        k,
        range_mut(theta, lt)?,
        range(g, lg)?,
        range_mut(m, lm)?,
        range_mut(v, lv)?,
    );
    Ok(())
}

/// [`kernel_half`] on the elements each operand's contiguous layout covers.
pub(super) fn on_layouts_half<H: Half>(
    k: Consts<f32>,
    (theta, lt): (&mut [H], &Layout),
    (g, lg): (&[H], &Layout),
    (w, lw): (&mut [f32], &Layout),
    (m, lm): (&mut [f32], &Layout),
    (v, lv): (&mut [f32], &Layout),
) -> Result<()> {
    kernel_half(
        k,
        range_mut(theta, lt)?,
        range(g, lg)?,
        range_mut(w, lw)?,
        range_mut(m, lm)?,
        range_mut(v, lv)?,
    );
    Ok(())
}

/// The elements a contiguous layout covers.
pub(super) fn range<'a, T>(s: &'a [T], l: &Layout) -> Result<&'a [T]> {
    let (start, end) = contiguous(l)?;
    Ok(&s[start..end])
}

pub(super) fn range_mut<'a, T>(s: &'a mut [T], l: &Layout) -> Result<&'a mut [T]> {
    let (start, end) = contiguous(l)?;
    Ok(&mut s[start..end])
}

pub(super) fn contiguous(l: &Layout) -> Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused AdamW: non-contiguous operand".into()))
}

/// Runs `f` on the CPU storage of a tensor, write-locked: candle's in-place op traits hand out
/// one mutable storage per call, so the update nests three of them to hold θ, m and v at once.
pub(super) struct WithStorage<F>(Cell<Option<F>>);

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

pub(super) fn with_storage_mut(
    t: &Tensor,
    f: impl FnOnce(&mut CpuStorage, &Layout) -> Result<()>,
) -> Result<()> {
    t.inplace_op1(&WithStorage(Cell::new(Some(f))))
}

/// The fused AdamW update: writes update number `t` (1-based) with gradient `g · inv_scale`
/// into θ, m and v (and the master copy) in place.
///
/// Requires [`fusable`]. For f32 and f64 parameters it gives the same bits as [`adamw`]; for
/// half precision the same bits as [`adamw`] on the master copy in f32, rounded into θ.
#[allow(clippy::too_many_arguments)]
pub(crate) fn adamw_in_place(
    p: &ParamsAdamW,
    t: u64,
    theta: &Tensor,
    g: &Tensor,
    master: Option<&Tensor>,
    m: &Tensor,
    v: &Tensor,
    inv_scale: f64,
) -> Result<()> {
    let c = Coefficients::new(p, t);
    #[cfg(feature = "cuda")]
    if theta.device().is_cuda() {
        return cuda::adamw_in_place(&c, theta, g, master, m, v, inv_scale);
    }
    let (g_storage, gl) = g.storage_and_layout();
    let Storage::Cpu(g_storage) = &*g_storage else {
        candle_core::bail!("fused AdamW: the gradient is not on the CPU")
    };
    use CpuStorage::{BF16, F16, F32, F64};
    with_storage_mut(theta, |ts, tl| {
        with_storage_mut(m, |ms, ml| {
            with_storage_mut(v, |vs, vl| match master {
                None => match (ts, g_storage, ms, vs) {
                    (F32(th), F32(gs), F32(ms), F32(vs)) => {
                        let k = Consts::new(&c, inv_scale);
                        on_layouts(k, (th, tl), (gs, gl), (ms, ml), (vs, vl))
                    }
                    (F64(th), F64(gs), F64(ms), F64(vs)) => {
                        let k = Consts::new(&c, inv_scale);
                        on_layouts(k, (th, tl), (gs, gl), (ms, ml), (vs, vl))
                    }
                    _ => candle_core::bail!("fused AdamW: operands of different dtypes"),
                },
                Some(master) => with_storage_mut(master, |ws, wl| {
                    let k = Consts::new(&c, inv_scale);
                    match (ts, g_storage, ws, ms, vs) {
                        (BF16(th), BF16(gs), F32(ws), F32(ms), F32(vs)) => {
                            on_layouts_half(k, (th, tl), (gs, gl), (ws, wl), (ms, ml), (vs, vl))
                        }
                        (F16(th), F16(gs), F32(ws), F32(ms), F32(vs)) => {
                            on_layouts_half(k, (th, tl), (gs, gl), (ws, wl), (ms, ml), (vs, vl))
                        }
                        _ => candle_core::bail!("fused AdamW: operands of unexpected dtypes"),
                    }
                }),
            })
        })
    })
}

/// Rounds `x` to one of the two nearest bf16 values, up with probability equal to the
/// fraction of the gap below `x`, so the expected result is `x` (`r`: 16 uniform random bits).
/// Moments rounded to nearest would stall: 0.999 · v rounds back to v in bf16.
#[inline(always)]
pub(crate) fn bf16_stochastic(x: f32, r: u16) -> bf16 {
    if !x.is_finite() {
        return bf16::from_f32(x);
    }
    bf16::from_bits((x.to_bits().wrapping_add(u32::from(r)) >> 16) as u16)
}

/// 64 random bits for element `i` of the parameter salted `salt`, at update `t`: the
/// SplitMix64 finaliser, so the bits depend on nothing but these (not on threads or chunks).
#[inline(always)]
pub(crate) fn noise(salt: u64, t: u64, i: u64) -> u64 {
    let mut z = salt.wrapping_mul(0xA076_1D64_78BD_642F)
        ^ t.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ i.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One element with compact moments: m and v widened to f32, [`Consts::step`] on them, and
/// stored back rounded stochastically with the bits of element `i`. Returns the new weight.
#[inline(always)]
pub(super) fn compact_step(
    k: &Consts<f32>,
    (salt, t, i): (u64, u64, usize),
    w: f32,
    g: f32,
    m: &mut bf16,
    v: &mut bf16,
) -> f32 {
    let r = noise(salt, t, i as u64);
    let (mut mf, mut vf) = (m.to_f32(), v.to_f32());
    let next = k.step(w, g, &mut mf, &mut vf);
    *m = bf16_stochastic(mf, r as u16);
    *v = bf16_stochastic(vf, (r >> 16) as u16);
    next
}

/// The fused update of an f32 parameter with compact moments.
pub(super) fn kernel_compact(
    k: Consts<f32>,
    (salt, t): (u64, u64),
    theta: &mut [f32],
    g: &[f32],
    m: &mut [bf16],
    v: &mut [bf16],
) {
    theta
        .par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .enumerate()
        .for_each(|(c, ((theta, g), (m, v)))| {
            let elems = theta.iter_mut().zip(g).zip(m.iter_mut().zip(v));
            for (j, ((theta, &g), (m, v))) in elems.enumerate() {
                *theta = compact_step(&k, (salt, t, c * CHUNK + j), *theta, g, m, v);
            }
        });
}

/// The fused update of a half-precision parameter with compact moments: on the f32 master,
/// rounded to nearest-even into θ.
#[allow(clippy::too_many_arguments)]
pub(super) fn kernel_compact_half<H: Half>(
    k: Consts<f32>,
    (salt, t): (u64, u64),
    theta: &mut [H],
    g: &[H],
    master: &mut [f32],
    m: &mut [bf16],
    v: &mut [bf16],
) {
    theta
        .par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(master.par_chunks_mut(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .enumerate()
        .for_each(|(c, (((theta, g), master), (m, v)))| {
            let elems = theta.iter_mut().zip(g).zip(master).zip(m.iter_mut().zip(v));
            for (j, (((theta, &g), w), (m, v))) in elems.enumerate() {
                *w = compact_step(&k, (salt, t, c * CHUNK + j), *w, g.to_f32(), m, v);
                *theta = H::from_f32(*w);
            }
        });
}

/// [`adamw_in_place`] for compact moments (bf16, stochastically rounded), on the CPU: θ, g,
/// the master copy of a half-precision θ, m and v, each read and written once.
#[allow(clippy::too_many_arguments)]
pub(crate) fn adamw_in_place_compact(
    p: &ParamsAdamW,
    t: u64,
    theta: &Tensor,
    g: &Tensor,
    master: Option<&Tensor>,
    m: &Tensor,
    v: &Tensor,
    inv_scale: f64,
    salt: u64,
) -> Result<()> {
    let operands = [Some(theta), Some(g), master, Some(m), Some(v)];
    let on_cpu = operands.iter().flatten().all(|o| o.device().is_cpu());
    if !on_cpu
        || !operands
            .iter()
            .flatten()
            .all(|o| o.shape() == theta.shape())
    {
        candle_core::bail!("compact optimizer state: operands must be on the CPU, of θ's shape")
    }
    let k = Consts::new(&Coefficients::new(p, t), inv_scale);
    let (g_storage, gl) = g.storage_and_layout();
    let Storage::Cpu(g_storage) = &*g_storage else {
        candle_core::bail!("compact optimizer state: the gradient is not on the CPU")
    };
    use CpuStorage::{BF16, F16, F32};
    let bad = || candle_core::Error::Msg("compact optimizer state: unexpected dtypes".into());
    with_storage_mut(theta, |ts, tl| {
        with_storage_mut(m, |ms, ml| {
            with_storage_mut(v, |vs, vl| {
                let (BF16(ms), BF16(vs)) = (ms, vs) else {
                    return Err(bad());
                };
                let (ms, vs) = (range_mut(ms, ml)?, range_mut(vs, vl)?);
                let Some(master) = master else {
                    let (F32(th), F32(gs)) = (ts, g_storage) else {
                        return Err(bad());
                    };
                    let (th, gs) = (range_mut(th, tl)?, range(gs, gl)?);
                    kernel_compact(k, (salt, t), th, gs, ms, vs);
                    return Ok(());
                };
                with_storage_mut(master, |ws, wl| {
                    let F32(ws) = ws else {
                        return Err(bad());
                    };
                    let ws = range_mut(ws, wl)?;
                    match (ts, g_storage) {
                        (BF16(th), BF16(gs)) => {
                            let (th, gs) = (range_mut(th, tl)?, range(gs, gl)?);
                            kernel_compact_half(k, (salt, t), th, gs, ws, ms, vs);
                        }
                        (F16(th), F16(gs)) => {
                            let (th, gs) = (range_mut(th, tl)?, range(gs, gl)?);
                            kernel_compact_half(k, (salt, t), th, gs, ws, ms, vs);
                        }
                        _ => return Err(bad()),
                    }
                    Ok(())
                })
            })
        })
    })
}
