//! The AdamW update: fused and in place on the CPU and on CUDA, candle tensor ops elsewhere;
//! f32 master weights and moments for half-precision parameters.

use std::cell::Cell;

use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Result, Storage, Tensor, Var};
use candle_nn::ParamsAdamW;
use half::{bf16, f16};
use rayon::prelude::*;

use crate::nn::calibrate::storage_key;

#[cfg(feature = "cuda")]
mod cuda;

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

/// The constants of one update in the kernel's type.
#[derive(Clone, Copy)]
struct Consts<T> {
    b1: T,
    omb1: T,
    b2: T,
    omb2: T,
    sm: T,
    sv: T,
    eps: T,
    decay: T,
    lr: T,
    inv_scale: T,
    zero: T,
    one: T,
}

impl<T: Real> Consts<T> {
    fn new(c: &Coefficients, inv_scale: f64) -> Self {
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
fn kernel<T: Real>(k: Consts<T>, theta: &mut [T], g: &[T], m: &mut [T], v: &mut [T]) {
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
trait Half: Copy + Send + Sync {
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
fn kernel_half<H: Half>(
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
fn on_layouts<T: Real>(
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
fn on_layouts_half<H: Half>(
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
fn compact_step(
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
fn kernel_compact(
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
fn kernel_compact_half<H: Half>(
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
