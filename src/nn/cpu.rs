//! CPU kernels that keep every core busy from one thread pool.
//!
//! candle 0.11.1 runs its elementwise ops on its own barrier pool (one spinning worker per
//! extra core) and its matmuls through `gemm` on rayon's global pool, so on the CPU two pools
//! compete for the same cores and each gemm call pays rayon's wake-ups several times (once per
//! packing pass and once per depth block). Measured on 2 cores at T = 256: 180–220 GFLOP/s
//! through candle's matmul, 270–295 GFLOP/s with the output split into one column block per
//! core of candle's barrier pool and each block a single-threaded gemm call (the figure
//! PyTorch's MKL reaches on the same machine). [`matmul`] does the latter.
//!
//! The rest are the f32 kernels of the model's ops, forward and backward, one pass each on
//! the same pool: attention (per query head, in blocks of 64 rows over only the keys a block
//! can see, in either head layout), RMSNorm, RoPE, SwiGLU and the LM head's cross-entropy.
//! Their inner loops are compiled for several instruction sets and picked at run time
//! (`multiversion`). Their sums run in fixed lanes and fixed row groups, so their results do
//! not depend on the thread count; a matmul's column blocks do, and gemm may then sum in
//! another order.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor};
use multiversion::multiversion;

/// Element types the CPU matmul handles itself: the ones `gemm` has kernels for and candle
/// stores as plain vectors.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
    fn zero() -> Self;
    fn one() -> Self;
}

impl Elem for f32 {
    fn slice(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
    fn zero() -> Self {
        0.0
    }
    fn one() -> Self {
        1.0
    }
}

impl Elem for f64 {
    fn slice(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
    fn zero() -> Self {
        0.0
    }
    fn one() -> Self {
        1.0
    }
}

/// A strided matrix inside a slice: element `(i, j)` is `data[offset + i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a, T> {
    pub data: &'a [T],
    pub offset: usize,
    pub rs: isize,
    pub cs: isize,
}

/// Below this many multiply-adds a product runs on the calling thread alone.
const PARALLEL_MIN_WORK: usize = 1 << 16;

/// Output columns per block are a multiple of this (the widest microkernel's register tile).
const COL_ALIGN: usize = 16;

/// `dst (m × n, row-major) = a (m × k) · b (k × n)` for `batch` products, the `i`-th reading
/// `a` and `b` `a_skip` and `b_skip` elements further on and writing `m·n` further on.
///
/// Work is spread over candle's barrier pool: whole products per thread when there are at
/// least as many products as threads, otherwise each product's columns split into one block
/// per thread. Every block is one single-threaded gemm call.
///
/// # Safety
/// Every element `a` and `b` address must lie inside their slices (the callers take the
/// strides from candle layouts, which address only their storage), and `dst` must be valid
/// for `batch·m·n` writes.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_batched<T: Elem>(
    batch: usize,
    (m, n, k): (usize, usize, usize),
    a: MatRef<'_, T>,
    a_skip: usize,
    b: MatRef<'_, T>,
    b_skip: usize,
    dst: *mut T,
) {
    let pool = candle_core::utils::barrier_pool();
    let threads = pool.n_workers() + 1;
    let dst_ptr = dst as usize;
    let (a_ptr, b_ptr) = (
        a.data.as_ptr().wrapping_add(a.offset) as usize,
        b.data.as_ptr().wrapping_add(b.offset) as usize,
    );
    // One gemm call: product `i`, output columns `c0..c1`.
    let call = |i: usize, c0: usize, c1: usize| {
        let (a_ptr, b_ptr, dst_ptr) = (a_ptr as *const T, b_ptr as *const T, dst_ptr as *mut T);
        // SAFETY: the caller guarantees the operands are in bounds; blocks write disjoint
        // column ranges of disjoint products.
        unsafe {
            gemm::gemm(
                m,
                c1 - c0,
                k,
                dst_ptr.add(i * m * n + c0),
                1,
                n as isize,
                false,
                a_ptr.add(i * a_skip),
                a.cs,
                a.rs,
                b_ptr.add(i * b_skip).wrapping_offset(c0 as isize * b.cs),
                b.cs,
                b.rs,
                T::zero(),
                T::one(),
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    };
    if threads == 1 || batch * m * n * k < PARALLEL_MIN_WORK {
        (0..batch).for_each(|i| call(i, 0, n));
    } else if batch >= threads {
        pool.execute_chunked(batch, |products| products.for_each(|i| call(i, 0, n)));
    } else {
        let width = n.div_ceil(threads).next_multiple_of(COL_ALIGN);
        let blocks = n.div_ceil(width);
        for i in 0..batch {
            pool.execute_chunked(blocks, |range| {
                range.for_each(|j| call(i, j * width, n.min((j + 1) * width)))
            });
        }
    }
}

/// The strides of a tensor's batch dimensions, folded into one: `Some(skip)` when every batch
/// index `i` (in row-major order over the batch dimensions) starts `i·skip` elements on.
fn batch_skip(dims: &[usize], stride: &[usize]) -> Option<usize> {
    let rank = dims.len();
    let mut skip = None;
    for d in (0..rank - 2).rev() {
        if dims[d] == 1 {
            continue;
        }
        match skip {
            None => skip = Some((stride[d], stride[d] * dims[d])),
            Some((s, next)) if stride[d] == next => skip = Some((s, next * dims[d])),
            Some(_) => return None,
        }
    }
    Some(skip.map_or(0, |(s, _)| s))
}

/// `a.matmul(b)` for tensors that need no gradient, with the same shapes and errors.
///
/// On the CPU in f32 and f64 it runs the gemm calls on candle's barrier pool (see the module
/// docs) and reads any strided layout without copying; elsewhere, and for layouts whose batch
/// dimensions do not fold into one stride, it is candle's `matmul`. The result does not track
/// gradients.
pub(crate) fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    match (a.device(), a.dtype(), b.dtype()) {
        (Device::Cpu, DType::F32, DType::F32) => matmul_cpu::<f32>(a, b),
        (Device::Cpu, DType::F64, DType::F64) => matmul_cpu::<f64>(a, b),
        _ => a.detach().matmul(&b.detach()),
    }
}

fn matmul_cpu<T: Elem + candle_core::WithDType>(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    match product::<T>(a, b) {
        Some((dst, dims)) => Tensor::from_vec(dst, dims, &Device::Cpu),
        // candle's own result, or its error for operands that do not fit.
        None => a.detach().matmul(&b.detach()),
    }
}

/// `a · b` as a row-major vector and its dims, for CPU tensors of element type `T`; `None`
/// when the operands do not fit or their batch dimensions do not fold into one stride.
pub(crate) fn product<T: Elem>(a: &Tensor, b: &Tensor) -> Option<(Vec<T>, Vec<usize>)> {
    let (ad, bd) = (a.dims(), b.dims());
    let rank = ad.len();
    if rank < 2
        || bd.len() != rank
        || ad[..rank - 2] != bd[..rank - 2]
        || ad[rank - 1] != bd[rank - 2]
    {
        return None;
    }
    let (m, k, n) = (ad[rank - 2], ad[rank - 1], bd[rank - 1]);
    let batch: usize = ad[..rank - 2].iter().product();
    let mut out_dims = ad[..rank - 2].to_vec();
    out_dims.extend([m, n]);
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    let (Storage::Cpu(sa), Storage::Cpu(sb)) = (&*sa, &*sb) else {
        return None;
    };
    let (da, db) = (T::slice(sa)?, T::slice(sb)?);
    if batch * m * n == 0 || k == 0 {
        return Some((vec![T::zero(); batch * m * n], out_dims));
    }
    let (a_skip, b_skip) = (batch_skip(ad, la.stride())?, batch_skip(bd, lb.stride())?);
    let (sa_, sb_) = (la.stride(), lb.stride());
    let mat = |data, offset, s: &[usize]| MatRef {
        data,
        offset,
        rs: s[rank - 2] as isize,
        cs: s[rank - 1] as isize,
    };
    let mut dst: Vec<T> = Vec::with_capacity(batch * m * n);
    // SAFETY: the layouts come from candle tensors whose storage holds every element they
    // address; gemm with `read_dst = false` writes every element of `dst`'s capacity, so the
    // length may cover it afterwards.
    unsafe {
        gemm_batched(
            batch,
            (m, n, k),
            mat(da, la.start_offset(), sa_),
            a_skip,
            mat(db, lb.start_offset(), sb_),
            b_skip,
            dst.as_mut_ptr(),
        );
        dst.set_len(batch * m * n);
    }
    Some((dst, out_dims))
}

/// `x (m × k) · wᵀ` for a weight `w (n × k)`, on storages (a custom op's forward): the CPU
/// path of [`matmul`] without building tensors.
pub(crate) fn linear_fwd_cpu(
    x: &CpuStorage,
    lx: &candle_core::Layout,
    w: &CpuStorage,
    lw: &candle_core::Layout,
) -> Option<CpuStorage> {
    fn run<T: Elem>(
        x: &[T],
        lx: &candle_core::Layout,
        w: &[T],
        lw: &candle_core::Layout,
    ) -> Option<Vec<T>> {
        let (m, k) = lx.shape().dims2().ok()?;
        let (n, k2) = lw.shape().dims2().ok()?;
        if k != k2 || m * n == 0 || k == 0 {
            return None;
        }
        let (sx, sw) = (lx.stride(), lw.stride());
        let mut dst: Vec<T> = Vec::with_capacity(m * n);
        // SAFETY: as in `product`; `wᵀ` is `w` with its strides swapped.
        unsafe {
            gemm_batched(
                1,
                (m, n, k),
                MatRef {
                    data: x,
                    offset: lx.start_offset(),
                    rs: sx[0] as isize,
                    cs: sx[1] as isize,
                },
                0,
                MatRef {
                    data: w,
                    offset: lw.start_offset(),
                    rs: sw[1] as isize,
                    cs: sw[0] as isize,
                },
                0,
                dst.as_mut_ptr(),
            );
            dst.set_len(m * n);
        }
        Some(dst)
    }
    match (x, w) {
        (CpuStorage::F32(x), CpuStorage::F32(w)) => run(x, lx, w, lw).map(CpuStorage::F32),
        (CpuStorage::F64(x), CpuStorage::F64(w)) => run(x, lx, w, lw).map(CpuStorage::F64),
        _ => None,
    }
}

/// `dst (m × n, row stride dst_rs) (+)= a · b` on the calling thread; `accumulate` adds to
/// what `dst` holds instead of overwriting it.
///
/// # Safety
/// `a`, `b` and `dst` must address only elements inside their slices.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_serial(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: *const f32,
    (a_rs, a_cs): (usize, usize),
    b: *const f32,
    (b_rs, b_cs): (usize, usize),
) {
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            a,
            a_cs as isize,
            a_rs as isize,
            b,
            b_cs as isize,
            b_rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// `e^x` in f32, branch-free so that loops over slices vectorise: Cody–Waite reduction
/// `x = n·ln 2 + r`, a degree-6 polynomial for `e^r` on `|r| ≤ ln 2 / 2`, and `2^n` from
/// the exponent bits. Relative error below 3e-7 (checked against f64 in the tests); exactly 0
/// below −87.3 (so a −∞ mask gives 0), +∞ above 88.3 (a little early: e^88.7 is the largest
/// finite f32), NaN for NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer without `round`, which
    // is a library call (and no vector instruction) on baseline x86-64.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.3, 88.3);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let y = p * f32::from_bits(((n as i32 + 127) as u32) << 23);
    let y = if x > 88.3 { f32::INFINITY } else { y };
    let y = if x < -87.3 { 0.0 } else { y };
    if x.is_nan() {
        x
    } else {
        y
    }
}

/// Sum of a slice in 16 interleaved lanes (so the loop vectorises; the order of the additions
/// is fixed, so the result is deterministic).
#[inline(always)]
fn sum(xs: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let chunks = xs.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (l, x) in lanes.iter_mut().zip(c) {
            *l += x;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `Σ a_i·b_i` in 16 interleaved lanes, as [`sum`].
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Largest element (−∞ for an empty slice; NaNs are skipped, as by `f32::max`).
#[inline(always)]
fn max(xs: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = xs.chunks_exact(16);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    for c in chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l = l.max(x);
        }
    }
    lanes.iter().fold(tail, |m, &x| m.max(x))
}

/// `row = softmax(row·scale + mask)`, in place.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon",
))]
fn softmax_row(row: &mut [f32], mask: &[f32], scale: f32) {
    for (x, m) in row.iter_mut().zip(mask) {
        *x = *x * scale + m;
    }
    let top = max(row);
    for x in row.iter_mut() {
        *x = exp(*x - top);
    }
    let inv = 1.0 / sum(row);
    for x in row.iter_mut() {
        *x *= inv;
    }
}

/// The shapes of a fused attention: `b` sequences of `t` positions, `h` query heads and `kv`
/// key/value heads of `d` elements (query head `j` reads key/value head `j / (h / kv)`), an
/// additive mask `(t, t)`; all contiguous, in `layout`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AttnDims {
    pub b: usize,
    pub h: usize,
    pub kv: usize,
    pub t: usize,
    pub d: usize,
    pub layout: HeadLayout,
}

/// Where the heads of `q`, `k`, `v`, the output and the gradients lie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HeadLayout {
    /// `(b, heads, t, d)`: each head a contiguous `t × d` block.
    HeadMajor,
    /// `(b, t, heads·d)`: as the projections make them; a head's rows are `heads·d` apart.
    TokenMajor,
}

/// Where one head's `t × d` matrix starts, and its row stride.
#[derive(Clone, Copy)]
struct HeadAt {
    offset: usize,
    rs: usize,
}

impl AttnDims {
    /// Head `hi` of sequence `bi` in a tensor of `heads` heads.
    fn head(&self, bi: usize, hi: usize, heads: usize) -> HeadAt {
        let (t, d) = (self.t, self.d);
        match self.layout {
            HeadLayout::HeadMajor => HeadAt {
                offset: (bi * heads + hi) * t * d,
                rs: d,
            },
            HeadLayout::TokenMajor => HeadAt {
                offset: bi * t * heads * d + hi * d,
                rs: heads * d,
            },
        }
    }

    /// Query head `task = bi·h + hi`, and the key/value head it reads.
    fn heads(&self, task: usize) -> (HeadAt, HeadAt) {
        let (bi, hi) = (task / self.h, task % self.h);
        (
            self.head(bi, hi, self.h),
            self.head(bi, hi / (self.h / self.kv), self.kv),
        )
    }
}

/// The inputs of a fused attention, as contiguous f32 slices.
#[derive(Clone, Copy)]
pub(crate) struct AttnInputs<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub mask: &'a [f32],
    pub scale: f32,
}

impl AttnInputs<'_> {
    /// Rows of the probabilities `softmax(q_h·k_hᵀ·scale + mask)` of one query head: rows
    /// `rows.start..rows.end` into `p` (row stride `cols`), over the first `cols` keys only
    /// (the mask is −∞ beyond them).
    fn probs(&self, dims: &AttnDims, task: usize, rows: RowBlock, p: &mut [f32]) {
        let (t, d) = (dims.t, dims.d);
        let (qh, kh) = dims.heads(task);
        let RowBlock { start, end, cols } = rows;
        // SAFETY: q_h and k_h are `t × d` matrices inside q and k (checked by `check`); the
        // block's rows of q_h and the first `cols` rows of k_h lie inside them; p holds
        // `(end − start) × cols` elements; kᵀ reads k with its strides swapped.
        unsafe {
            gemm_serial(
                (end - start, cols, d),
                p.as_mut_ptr(),
                cols,
                false,
                self.q.as_ptr().add(qh.offset + start * qh.rs),
                (qh.rs, 1),
                self.k.as_ptr().add(kh.offset),
                (1, kh.rs),
            );
        }
        let masks = self.mask[start * t..end * t].chunks_exact(t);
        for (row, mask) in p.chunks_exact_mut(cols).zip(masks) {
            softmax_row(row, &mask[..cols], self.scale);
        }
    }

    fn check(&self, dims: &AttnDims) -> bool {
        let AttnDims { b, h, kv, t, d, .. } = *dims;
        kv > 0
            && h % kv == 0
            && self.q.len() == b * h * t * d
            && self.k.len() == b * kv * t * d
            && self.v.len() == b * kv * t * d
            && self.mask.len() == t * t
    }

    /// The query rows in blocks of [`ROWS_PER_BLOCK`], each with the number of keys its rows
    /// can see: one past the last key any of them does not mask with −∞. Under a causal mask
    /// that skips the upper triangle, block by block (about 60% of the work at T = 256).
    fn blocks(&self, t: usize) -> Vec<RowBlock> {
        let seen = |row: &[f32]| {
            row.iter()
                .rposition(|&m| m != f32::NEG_INFINITY)
                .map_or(0, |j| j + 1)
        };
        (0..t)
            .step_by(ROWS_PER_BLOCK)
            .map(|start| {
                let end = t.min(start + ROWS_PER_BLOCK);
                let rows = self.mask[start * t..end * t].chunks_exact(t);
                // A block whose every key is masked still softmaxes one column (NaN, as the
                // unfused path gives for such rows).
                let cols = rows.map(seen).max().unwrap_or(0).max(1);
                RowBlock { start, end, cols }
            })
            .collect()
    }
}

/// `ds = p ⊙ (dp − Σ_j dp ⊙ p)·scale` over rows of `cols`, with `dp` in `ds` on entry.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon",
))]
fn softmax_grad_rows(ds: &mut [f32], p: &[f32], cols: usize, scale: f32) {
    for (dsr, pr) in ds.chunks_exact_mut(cols).zip(p.chunks_exact(cols)) {
        let row = dot(dsr, pr);
        for (s, &pv) in dsr.iter_mut().zip(pr) {
            *s = pv * (*s - row) * scale;
        }
    }
}

/// Query rows per block of the attention kernels.
const ROWS_PER_BLOCK: usize = 64;

/// Query rows `start..end` of an attention, and how many keys they see.
#[derive(Clone, Copy)]
struct RowBlock {
    start: usize,
    end: usize,
    cols: usize,
}

/// Runs `f(task, scratch)` for every query head on candle's barrier pool, with `scratch`
/// buffers of `ROWS_PER_BLOCK × t` elements per chunk of tasks.
fn for_each_head(dims: &AttnDims, scratch: usize, f: impl Fn(usize, &mut [Vec<f32>]) + Sync) {
    let len = ROWS_PER_BLOCK.min(dims.t) * dims.t;
    candle_core::utils::barrier_pool().execute_chunked(dims.b * dims.h, |tasks| {
        let mut bufs = vec![vec![0f32; len]; scratch];
        tasks.for_each(|task| f(task, &mut bufs));
    });
}

/// A pointer that may cross threads: tasks write disjoint blocks of the buffer behind it.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: only used for writes to disjoint ranges, each by one task.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The element at `offset` (a method, so that closures capture the whole `SharedMut`).
    fn at(&self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }

    /// The `len` elements at `offset`.
    ///
    /// # Safety
    /// No other live slice may overlap them, and they must lie inside the buffer.
    #[allow(clippy::mut_from_ref)]
    unsafe fn block(&self, offset: usize, len: usize) -> &mut [f32] {
        unsafe { std::slice::from_raw_parts_mut(self.0.add(offset), len) }
    }
}

/// `softmax(q·kᵀ·scale + mask)·v`, laid out as `q`; `None` when the slices do not fit `dims`.
pub(crate) fn attention_fwd(x: AttnInputs<'_>, dims: AttnDims) -> Option<Vec<f32>> {
    if !x.check(&dims) {
        return None;
    }
    let d = dims.d;
    let blocks = x.blocks(dims.t);
    let mut y = vec![0f32; x.q.len()];
    let out = SharedMut(y.as_mut_ptr());
    for_each_head(&dims, 1, |task, bufs| {
        let p = &mut bufs[0];
        let (qh, vh) = dims.heads(task);
        for &rows in &blocks {
            let RowBlock { start, end, cols } = rows;
            x.probs(&dims, task, rows, p);
            // SAFETY: each task writes the rows of its own head of y (laid out as q); the
            // first `cols` rows of v_h lie inside v.
            unsafe {
                gemm_serial(
                    (end - start, d, cols),
                    out.at(qh.offset + start * qh.rs),
                    qh.rs,
                    false,
                    p.as_ptr(),
                    (cols, 1),
                    x.v.as_ptr().add(vh.offset),
                    (vh.rs, 1),
                );
            }
        }
    });
    Some(y)
}

/// The gradients `(dq, dk, dv)` of [`attention_fwd`] for the output gradient `g` (laid out as
/// `q`), each laid out as its input. The probabilities are recomputed block by block; with grouped
/// queries, each query head's share of dk and dv is summed into its key/value head afterwards,
/// in head order. `None` when the slices do not fit `dims`.
pub(crate) fn attention_bwd(
    x: AttnInputs<'_>,
    g: &[f32],
    dims: AttnDims,
) -> Option<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    if !x.check(&dims) || g.len() != x.q.len() {
        return None;
    }
    let (t, d) = (dims.t, dims.d);
    let blocks = x.blocks(t);
    let mut dq = vec![0f32; x.q.len()];
    // One block per query head (summed into dk and dv over each group below), accumulated
    // over the row blocks.
    let (mut dk, mut dv) = (vec![0f32; x.q.len()], vec![0f32; x.q.len()]);
    let (dq_out, dk_out, dv_out) = (
        SharedMut(dq.as_mut_ptr()),
        SharedMut(dk.as_mut_ptr()),
        SharedMut(dv.as_mut_ptr()),
    );
    for_each_head(&dims, 2, |task, bufs| {
        let [p, ds] = bufs else { unreachable!() };
        let (qh, kh) = dims.heads(task);
        // This query head's shares of dk and dv: contiguous `t × d` blocks.
        let own = task * t * d;
        for &rows in &blocks {
            let RowBlock { start, end, cols } = rows;
            let n = end - start;
            x.probs(&dims, task, rows, p);
            let gb = g[qh.offset + start * qh.rs..].as_ptr();
            // SAFETY: each task writes the blocks of its own query head in dq, dk and dv;
            // the reads stay inside q, k, v and g (checked above) and the scratch buffers
            // (`n × cols` elements).
            unsafe {
                // dv_h[..cols] += pᵀ·g_block
                gemm_serial(
                    (cols, d, n),
                    dv_out.at(own),
                    d,
                    true,
                    p.as_ptr(),
                    (1, cols),
                    gb,
                    (qh.rs, 1),
                );
                // dp = g_block·v[..cols]ᵀ
                gemm_serial(
                    (n, cols, d),
                    ds.as_mut_ptr(),
                    cols,
                    false,
                    gb,
                    (qh.rs, 1),
                    x.v.as_ptr().add(kh.offset),
                    (1, kh.rs),
                );
            }
            softmax_grad_rows(&mut ds[..n * cols], &p[..n * cols], cols, x.scale);
            // SAFETY: as above.
            unsafe {
                // dq_block = ds·k[..cols], laid out as q
                gemm_serial(
                    (n, d, cols),
                    dq_out.at(qh.offset + start * qh.rs),
                    qh.rs,
                    false,
                    ds.as_ptr(),
                    (cols, 1),
                    x.k.as_ptr().add(kh.offset),
                    (kh.rs, 1),
                );
                // dk_h[..cols] += dsᵀ·q_block
                gemm_serial(
                    (cols, d, n),
                    dk_out.at(own),
                    d,
                    true,
                    ds.as_ptr(),
                    (1, cols),
                    x.q.as_ptr().add(qh.offset + start * qh.rs),
                    (qh.rs, 1),
                );
            }
        }
    });
    // Sum each group's shares (in head order) into its key/value head, laid out as k and v.
    let group = dims.h / dims.kv;
    let (dk, dv) = match (group, dims.layout) {
        (1, HeadLayout::HeadMajor) => (dk, dv),
        _ => {
            let fold = |parts: Vec<f32>| -> Vec<f32> {
                let mut out = vec![0f32; dims.b * dims.kv * t * d];
                for bi in 0..dims.b {
                    for kvi in 0..dims.kv {
                        let at = dims.head(bi, kvi, dims.kv);
                        for share in 0..group {
                            let own = ((bi * dims.h) + kvi * group + share) * t * d;
                            for (i, part) in parts[own..own + t * d].chunks_exact(d).enumerate() {
                                let row = &mut out[at.offset + i * at.rs..][..d];
                                row.iter_mut().zip(part).for_each(|(o, p)| *o += p);
                            }
                        }
                    }
                }
                out
            };
            (fold(dk), fold(dv))
        }
    };
    Some((dq, dk, dv))
}

/// A tensor's elements as a contiguous f32 CPU slice, borrowed from its storage: the guard,
/// and the range of the elements in it. `None` off the CPU, for other dtypes, or when the
/// tensor is not contiguous.
pub(crate) fn f32_view(
    t: &Tensor,
) -> Option<(candle_core::StorageRef<'_>, std::ops::Range<usize>)> {
    if t.dtype() != DType::F32 || !t.device().is_cpu() {
        return None;
    }
    let (s, l) = t.storage_and_layout();
    let range = l.contiguous_offsets()?;
    match &*s {
        Storage::Cpu(CpuStorage::F32(_)) => Some((s, range.0..range.1)),
        _ => None,
    }
}

/// The slice an [`f32_view`] describes.
pub(crate) fn f32_slice<'a>(
    view: &'a (candle_core::StorageRef<'_>, std::ops::Range<usize>),
) -> &'a [f32] {
    match &*view.0 {
        Storage::Cpu(CpuStorage::F32(v)) => &v[view.1.clone()],
        _ => &[],
    }
}

/// Elements per task of the elementwise kernels: large enough that handing out a task costs
/// nothing next to it, small enough to balance (candle's own elementwise ops use the same).
const ELEMENTS_PER_TASK: usize = 16 * 1024;

/// `N` vectors of `len` elements, filled in parallel on candle's barrier pool: `fill(range,
/// outs)` writes every element of `outs[i]`, the slots `range` of output `i`. Ranges start
/// at multiples of `align` elements (a row length, so that no row is split).
fn par_fill<const N: usize>(
    len: usize,
    align: usize,
    fill: impl Fn(std::ops::Range<usize>, [&mut [MaybeUninit<f32>]; N]) + Sync,
) -> [Vec<f32>; N] {
    let mut outs: [Vec<f32>; N] = std::array::from_fn(|_| Vec::with_capacity(len));
    let ptrs = outs.each_mut().map(|v| SharedMut(v.as_mut_ptr()));
    let step = ELEMENTS_PER_TASK.div_ceil(align.max(1)) * align.max(1);
    let run = |task: usize| {
        let range = task * step..len.min((task + 1) * step);
        // SAFETY: the tasks' ranges are disjoint and inside each vector's capacity.
        let slots = ptrs.map(|p| unsafe {
            std::slice::from_raw_parts_mut(
                p.0.add(range.start).cast::<MaybeUninit<f32>>(),
                range.len(),
            )
        });
        fill(range, slots);
    };
    let tasks = len.div_ceil(step);
    match tasks {
        0 => {}
        1 => run(0),
        _ => candle_core::utils::barrier_pool().execute_chunked(tasks, |r| r.for_each(run)),
    }
    // SAFETY: `fill` wrote every element of every range, and the ranges cover 0..len.
    outs.each_mut()
        .iter_mut()
        .for_each(|v| unsafe { v.set_len(len) });
    outs
}

/// `silu(gate) ⊙ up`, elementwise, `σ(x) = 1 / (1 + e^−x)`.
pub(crate) fn swiglu_fwd(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let [y] = par_fill(gate.len(), 1, |r, [y]| {
        swiglu_chunk(&gate[r.clone()], &up[r], y)
    });
    y
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon",
))]
fn swiglu_chunk(gate: &[f32], up: &[f32], y: &mut [MaybeUninit<f32>]) {
    for ((y, &g), &u) in y.iter_mut().zip(gate).zip(up) {
        y.write(g * u / (1.0 + exp(-g)));
    }
}

/// `(dL/dgate, dL/dup)` of [`swiglu_fwd`] for the output gradient `dy`:
/// `dup = dy·silu(gate)`, `dgate = dy·up·σ(gate)·(1 + gate − silu(gate))`.
pub(crate) fn swiglu_bwd(gate: &[f32], up: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let [dgate, dup] = par_fill(gate.len(), 1, |r, [dgate, dup]| {
        swiglu_bwd_chunk(&gate[r.clone()], &up[r.clone()], &dy[r], dgate, dup)
    });
    (dgate, dup)
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon",
))]
fn swiglu_bwd_chunk(
    gate: &[f32],
    up: &[f32],
    dy: &[f32],
    dgate: &mut [MaybeUninit<f32>],
    dup: &mut [MaybeUninit<f32>],
) {
    let ins = gate.iter().zip(up).zip(dy);
    for ((dg, du), ((&g, &u), &d)) in dgate.iter_mut().zip(dup.iter_mut()).zip(ins) {
        let s = 1.0 / (1.0 + exp(-g));
        let silu = g * s;
        du.write(d * silu);
        dg.write(d * u * s * (1.0 + g - silu));
    }
}

/// `x / √(mean(x²) + ε) ⊙ w` over rows of `w.len()` elements.
pub(crate) fn rms_norm_fwd(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let h = w.len();
    let [y] = par_fill(x.len(), h, |r, [y]| rms_norm_rows(&x[r], w, eps, y));
    y
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon",
))]
fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, y: &mut [MaybeUninit<f32>]) {
    let h = w.len();
    for (y, x) in y.chunks_exact_mut(h).zip(x.chunks_exact(h)) {
        let inv = 1.0 / (dot(x, x) / h as f32 + eps).sqrt();
        for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
            y.write(x * inv * w);
        }
    }
}

/// Rows per partial sum of the norm weight's gradient: the partial sums, and the order they
/// are added in, do not depend on the number of threads.
const ROWS_PER_PARTIAL: usize = 32;

/// `(dL/dx, dL/dw)` of [`rms_norm_fwd`] for the output gradient `dy`, with `r = 1/√(mean(x²)
/// + ε)` and `n = x·r`: `dx = (dy⊙w − n·mean(dy⊙w⊙n))·r`, `dw = Σ_rows dy⊙n` (when
/// `with_dw`).
pub(crate) fn rms_norm_bwd(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    eps: f32,
    with_dw: bool,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let h = w.len();
    let [dx] = par_fill(x.len(), h, |r, [dx]| {
        rms_norm_bwd_rows(&x[r.clone()], &dy[r], w, eps, dx)
    });
    let dw = with_dw.then(|| {
        let rows = x.len() / h.max(1);
        let partials = rows.div_ceil(ROWS_PER_PARTIAL);
        let [parts] = par_fill(partials * h, h, |r, [out]| {
            for (p, out) in (r.start / h..r.end / h).zip(out.chunks_exact_mut(h)) {
                let acc: &mut [f32] = &mut vec![0f32; h];
                let first = p * ROWS_PER_PARTIAL;
                let span = first * h..rows.min(first + ROWS_PER_PARTIAL) * h;
                rms_norm_dw_rows(&x[span.clone()], &dy[span], eps, acc);
                for (o, &a) in out.iter_mut().zip(acc.iter()) {
                    o.write(a);
                }
            }
        });
        let mut dw = vec![0f32; h];
        for part in parts.chunks_exact(h) {
            dw.iter_mut().zip(part).for_each(|(d, p)| *d += p);
        }
        dw
    });
    (dx, dw)
}

/// dL/dx of [`rms_norm_rows`] for whole rows of `x` and `dy`.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon",
))]
fn rms_norm_bwd_rows(x: &[f32], dy: &[f32], w: &[f32], eps: f32, dx: &mut [MaybeUninit<f32>]) {
    let h = w.len();
    let rows = x.chunks_exact(h).zip(dy.chunks_exact(h));
    for (dx, (x, dy)) in dx.chunks_exact_mut(h).zip(rows) {
        let inv = 1.0 / (dot(x, x) / h as f32 + eps).sqrt();
        let mut lanes = [0f32; 16];
        let mut tail = 0f32;
        // mean(dy⊙w⊙n) = r·Σ dy·w·x / h
        let (cx, cd, cw) = (x.chunks_exact(16), dy.chunks_exact(16), w.chunks_exact(16));
        for ((&x, &d), &w) in cx
            .remainder()
            .iter()
            .zip(cd.remainder())
            .zip(cw.remainder())
        {
            tail += d * w * x;
        }
        for ((x, d), w) in cx.zip(cd).zip(cw) {
            for i in 0..16 {
                lanes[i] += d[i] * w[i] * x[i];
            }
        }
        let mean = (lanes.iter().sum::<f32>() + tail) * inv / h as f32;
        for (((dx, &x), &d), &w) in dx.iter_mut().zip(x).zip(dy).zip(w) {
            dx.write((d * w - x * inv * mean) * inv);
        }
    }
}

/// `acc += Σ_rows dy ⊙ x·r` over whole rows of `x` and `dy` (rows of `acc.len()`).
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon",
))]
fn rms_norm_dw_rows(x: &[f32], dy: &[f32], eps: f32, acc: &mut [f32]) {
    let h = acc.len();
    for (x, dy) in x.chunks_exact(h).zip(dy.chunks_exact(h)) {
        let inv = 1.0 / (dot(x, x) / h as f32 + eps).sqrt();
        for ((a, &x), &d) in acc.iter_mut().zip(x).zip(dy) {
            *a += d * x * inv;
        }
    }
}

/// Rotary embedding in the "rotate half" layout over rows of `row` elements, each `row / d`
/// heads of `d`: for row `i` (position `i mod t`) and `j < d/2` in each head, `y_j = x_j·cos −
/// x_{j+d/2}·sin` and `y_{j+d/2} = x_{j+d/2}·cos + x_j·sin`, with `cos`, `sin` `(t, d/2)`. With
/// `sign = −1` it is the inverse rotation (the backward pass). `row = d` for `(b, h, t, d)`,
/// `row = h·d` for `(b, t, h·d)`.
pub(crate) fn rope_fwd(
    x: &[f32],
    (cos, sin): (&[f32], &[f32]),
    (t, d, row): (usize, usize, usize),
    sign: f32,
) -> Vec<f32> {
    let [y] = par_fill(x.len(), row, |r, [y]| {
        let first = r.start / row;
        rope_rows(&x[r], (cos, sin), (t, d, row), sign, first, y)
    });
    y
}

/// [`rope_fwd`] on whole rows of `x`, the first of which is row `first`.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon",
))]
fn rope_rows(
    x: &[f32],
    (cos, sin): (&[f32], &[f32]),
    (t, d, row): (usize, usize, usize),
    sign: f32,
    first: usize,
    y: &mut [MaybeUninit<f32>],
) {
    let half = d / 2;
    for (i, (y, x)) in y.chunks_exact_mut(row).zip(x.chunks_exact(row)).enumerate() {
        let pos = (first + i) % t;
        let (c, s) = (
            &cos[pos * half..(pos + 1) * half],
            &sin[pos * half..(pos + 1) * half],
        );
        for (y, x) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
            let (x1, x2) = x.split_at(half);
            let (y1, y2) = y.split_at_mut(half);
            for j in 0..half {
                let sj = sign * s[j];
                y1[j].write(x1[j] * c[j] - x2[j] * sj);
                y2[j].write(x2[j] * c[j] + x1[j] * sj);
            }
        }
    }
}

/// Whether every tensor is f32 on the CPU (what the kernels here take).
pub(crate) fn all_cpu_f32(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.dtype() == DType::F32 && t.device().is_cpu())
}

/// `f` on the elements of contiguous f32 CPU tensors, borrowed from their storage; an error
/// for any other tensor.
pub(crate) fn with_slices<const N: usize, R>(
    ts: [&Tensor; N],
    f: impl FnOnce([&[f32]; N]) -> R,
) -> Result<R> {
    let views = ts.map(f32_view);
    if views.iter().any(Option::is_none) {
        candle_core::bail!("candle-lisa CPU kernel: a tensor is not contiguous f32 on the CPU")
    }
    let slices = views
        .each_ref()
        .map(|v| v.as_ref().map_or(&[][..], f32_slice));
    Ok(f(slices))
}

/// Cross-entropy over rows of `logits` (`rows × v`, row-major), and its gradient in the same
/// pass. Returns the loss sum, in row order in f64: per row, `log Σ_j e^{x_j}` minus the logit
/// of the row's label, times the row's weight (0 for an ignored row). Leaves dL/dlogits in
/// place of the logits for the loss sum times `scale` ([`cross_entropy_bwd`] with `coef =
/// weight · scale`), so that the backward pass needs no second product with the head.
pub(crate) fn cross_entropy_fused(
    logits: &mut [f32],
    v: usize,
    labels: &[u32],
    weights: &[f32],
    scale: f32,
) -> f64 {
    let base = SharedMut(logits.as_mut_ptr());
    let [per_row] = par_fill(labels.len(), 1, |r, [out]| {
        for (o, row) in out.iter_mut().zip(r) {
            // SAFETY: each row is one task's, inside `logits` (rows·v elements).
            let x = unsafe { base.block(row * v, v) };
            let (weight, label) = (weights[row], (labels[row] as usize).min(v - 1));
            if weight == 0.0 {
                x.fill(0.0);
                o.write(0.0);
                continue;
            }
            o.write(cross_entropy_row(x, label, weight, scale));
        }
    });
    per_row.iter().map(|&l| l as f64).sum()
}

/// One row of [`cross_entropy_fused`]: returns the row's loss, leaves its gradient in `x`.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon",
))]
fn cross_entropy_row(x: &mut [f32], label: usize, weight: f32, scale: f32) -> f32 {
    let picked = x[label];
    let top = max(x);
    for x in x.iter_mut() {
        *x = exp(*x - top);
    }
    let total = sum(x);
    let c = weight * scale;
    let norm = c / total;
    for x in x.iter_mut() {
        *x *= norm;
    }
    x[label] -= c;
    weight * (top + total.ln() - picked)
}

/// `logits ← (softmax(logits) − one_hot(label))·coef` per row, in place: the gradient of
/// [`cross_entropy_fwd`] with `coef` = the row's weight times the upstream gradient.
pub(crate) fn cross_entropy_bwd(logits: &mut [f32], v: usize, labels: &[u32], coef: &[f32]) {
    let base = SharedMut(logits.as_mut_ptr());
    let run = |rows: std::ops::Range<usize>| {
        for row in rows {
            // SAFETY: each row is one task's, inside `logits` (rows·v elements).
            let x = unsafe { base.block(row * v, v) };
            let c = coef[row];
            if c == 0.0 {
                x.fill(0.0);
                continue;
            }
            let top = max(x);
            for x in x.iter_mut() {
                *x = exp(*x - top);
            }
            let scale = c / sum(x);
            for x in x.iter_mut() {
                *x *= scale;
            }
            x[(labels[row] as usize).min(v - 1)] -= c;
        }
    };
    match labels.len() {
        0 => {}
        1 => run(0..1),
        n => candle_core::utils::barrier_pool().execute_chunked(n, run),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every layout the callers produce (row-major, transposed, batched, a batched transpose,
    /// an offset view) against a sum in f64 over the same elements.
    #[test]
    fn matmul_matches_a_direct_sum() -> Result<()> {
        let dev = Device::Cpu;
        let reference = |a: &Tensor, b: &Tensor| -> Result<Vec<f64>> {
            let (a, b) = (a.to_dtype(DType::F64)?, b.to_dtype(DType::F64)?);
            let rank = a.rank();
            let (m, k, n) = (a.dim(rank - 2)?, a.dim(rank - 1)?, b.dim(rank - 1)?);
            let batch = a.elem_count() / (m * k);
            let a = a.reshape((batch, m, k))?.to_vec3::<f64>()?;
            let b = b.reshape((batch, k, n))?.to_vec3::<f64>()?;
            let mut out = Vec::new();
            for (ap, bp) in a.iter().zip(&b) {
                for row in ap {
                    out.extend((0..n).map(|j| (0..k).map(|l| row[l] * bp[l][j]).sum::<f64>()));
                }
            }
            Ok(out)
        };
        let x = Tensor::randn(0f32, 1.0, (2, 3, 70, 40), &dev)?;
        let y = Tensor::randn(0f32, 1.0, (2, 3, 40, 90), &dev)?;
        let wide = Tensor::randn(0f32, 1.0, (300, 260), &dev)?;
        let cases: Vec<(Tensor, Tensor)> = vec![
            (x.get(0)?.get(0)?, y.get(0)?.get(0)?),
            (x.clone(), y.clone()),
            (y.transpose(2, 3)?, x.transpose(2, 3)?),
            (x.get(1)?, y.get(1)?.narrow(2, 5, 60)?),
            (wide.narrow(0, 3, 256)?, wide.t()?.narrow(1, 10, 250)?),
            (x.get(0)?.get(0)?.narrow(0, 0, 1)?, y.get(0)?.get(0)?),
        ];
        for (a, b) in cases {
            let got = matmul(&a, &b)?;
            assert_eq!(got.dims(), a.matmul(&b.contiguous()?)?.dims());
            let got = got.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            let want = reference(&a, &b)?;
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{g} vs {w}");
            }
        }
        assert!(matmul(&x, &x).is_err());
        Ok(())
    }

    #[test]
    fn exp_is_within_3e7_of_f64() {
        let mut worst = 0f64;
        for i in -2_000_000..=2_000_000 {
            let x = i as f32 * 4.3e-5;
            let want = (x as f64).exp();
            worst = worst.max(((exp(x) as f64) - want).abs() / want);
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-87.4), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    /// The fused attention and its gradients against candle's autograd in f64 through plain
    /// ops, with grouped queries, masks with random finite offsets (causal or not), and lengths
    /// that are no multiple of the vector width or of the row block.
    #[test]
    fn attention_matches_autograd() -> Result<()> {
        // One row block; three (the last partial) under a causal mask, so that blocks see
        // different numbers of keys; and a mask with no −∞ at all; in both layouts.
        for layout in [HeadLayout::HeadMajor, HeadLayout::TokenMajor] {
            for (t, causal) in [(37, true), (150, true), (150, false)] {
                attention_case(t, causal, layout)?;
            }
        }
        Ok(())
    }

    fn attention_case(t: usize, causal: bool, layout: HeadLayout) -> Result<()> {
        let dev = Device::Cpu;
        let dims = AttnDims {
            b: 2,
            h: 4,
            kv: 2,
            t,
            d: 8,
            layout,
        };
        let AttnDims { b, h, kv, t, d, .. } = dims;
        // The kernels' layout of a `(b, heads, t, d)` tensor, flattened.
        let laid = |x: &Tensor| -> Result<Vec<f32>> {
            match layout {
                HeadLayout::HeadMajor => x.flatten_all()?.to_vec1::<f32>(),
                HeadLayout::TokenMajor => x.transpose(1, 2)?.flatten_all()?.to_vec1::<f32>(),
            }
        };
        let scale = 0.35;
        let q = Tensor::randn(0f32, 1.0, (b, h, t, d), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (b, kv, t, d), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (b, kv, t, d), &dev)?;
        let g = Tensor::randn(0f32, 1.0, (b, h, t, d), &dev)?;
        let mut mask = Tensor::randn(0f32, 1.0, (t, t), &dev)?;
        if causal {
            mask = (mask + crate::nn::ops::causal_mask(t, DType::F32, &dev)?)?;
        }
        let (qs, ks, vs, gs) = (laid(&q)?, laid(&k)?, laid(&v)?, laid(&g)?);
        let ms = mask.flatten_all()?.to_vec1::<f32>()?;
        let x = AttnInputs {
            q: &qs,
            k: &ks,
            v: &vs,
            mask: &ms,
            scale,
        };
        let y = attention_fwd(x, dims).unwrap();
        let (dq, dk, dv) = attention_bwd(x, &gs, dims).unwrap();

        let f64v = |t: &Tensor| -> Result<candle_core::Var> {
            candle_core::Var::from_tensor(&t.to_dtype(DType::F64)?)
        };
        let (qv, kv_, vv) = (f64v(&q)?, f64v(&k)?, f64v(&v)?);
        let n = h / kv;
        let expand = |t: &Tensor| -> Result<Tensor> {
            t.unsqueeze(2)?
                .broadcast_as((b, kv, n, t.dim(2)?, d))?
                .reshape((b, h, t.dim(2)?, d))
        };
        let (ke, ve) = (expand(kv_.as_tensor())?, expand(vv.as_tensor())?);
        let scores = (qv.as_tensor().matmul(&ke.t()?)? * scale as f64)?
            .broadcast_add(&mask.to_dtype(DType::F64)?)?;
        let p = candle_nn::ops::softmax(&scores, candle_core::D::Minus1)?;
        let want_y = p.matmul(&ve)?;
        let grads = (&want_y * g.to_dtype(DType::F64)?)?.sum_all()?.backward()?;
        let close = |got: &[f32], want: &Tensor, what: &str| -> Result<()> {
            let want = laid(&want.to_dtype(DType::F32)?)?;
            let want: Vec<f64> = want.iter().map(|&w| w as f64).collect();
            assert_eq!(got.len(), want.len(), "{what}");
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (*g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
                    "{what} ({layout:?}): {g} vs {w}"
                );
            }
            Ok(())
        };
        close(&y, &want_y, "y")?;
        close(&dq, grads.get(qv.as_tensor()).unwrap(), "dq")?;
        close(&dk, grads.get(kv_.as_tensor()).unwrap(), "dk")?;
        close(&dv, grads.get(vv.as_tensor()).unwrap(), "dv")?;
        assert!(attention_fwd(
            AttnInputs {
                mask: &ms[1..],
                ..x
            },
            dims
        )
        .is_none());
        Ok(())
    }

    /// The ops' f32 CPU paths (these kernels) against their f64 paths (plain candle ops,
    /// checked by finite differences in the model's gradient test): outputs and every input's
    /// gradient, through candle's autograd, on rows that are no multiple of the vector width.
    #[test]
    fn fused_ops_match_their_f64_paths() -> Result<()> {
        use crate::nn::ops;
        use candle_core::Var;
        type Op = fn(&[Tensor]) -> Result<Tensor>;
        let dev = Device::Cpu;
        let (b, h, t, d) = (2, 3, 21, 10);
        let cos = Tensor::randn(0f32, 1.0, (t + 4, d / 2), &dev)?;
        let sin = Tensor::randn(0f32, 1.0, (t + 4, d / 2), &dev)?;
        let cases: Vec<(&str, Vec<Tensor>, Op)> = vec![
            (
                "swiglu",
                vec![
                    Tensor::randn(0f32, 3.0, (b, t, 37), &dev)?,
                    Tensor::randn(0f32, 1.0, (b, t, 37), &dev)?,
                ],
                |x| ops::swiglu(&x[0], &x[1]),
            ),
            (
                "rms_norm",
                vec![
                    Tensor::randn(0f32, 1.0, (b, t, 37), &dev)?,
                    Tensor::randn(1f32, 0.2, 37, &dev)?,
                ],
                |x| ops::rms_norm(&x[0], &x[1], 1e-5),
            ),
            (
                "rope",
                vec![Tensor::randn(0f32, 1.0, (b, h, t, d), &dev)?, cos, sin],
                |x| ops::rope(&x[0], &x[1], &x[2]),
            ),
        ];
        for (name, inputs, op) in cases {
            let probe = Tensor::randn(0f64, 1.0, op(&inputs)?.shape(), &dev)?;
            let run = |dtype: DType| -> Result<(Vec<f64>, Vec<Vec<f64>>)> {
                let vars = inputs
                    .iter()
                    .map(|x| Var::from_tensor(&x.to_dtype(dtype)?))
                    .collect::<Result<Vec<_>>>()?;
                let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
                let y = op(&ts)?;
                let grads = (&y * probe.to_dtype(dtype)?)?.sum_all()?.backward()?;
                let flat = |t: &Tensor| t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>();
                let gs = vars
                    .iter()
                    .map(|v| grads.get(v.as_tensor()).map(flat).transpose())
                    .collect::<Result<Vec<_>>>()?;
                Ok((flat(&y)?, gs.into_iter().flatten().collect()))
            };
            let (y32, g32) = run(DType::F32)?;
            let (y64, g64) = run(DType::F64)?;
            assert_eq!(g32.len(), g64.len(), "{name}: gradients");
            let pairs = std::iter::once((&y32, &y64)).chain(g32.iter().zip(&g64));
            for (i, (got, want)) in pairs.enumerate() {
                assert_eq!(got.len(), want.len());
                for (g, w) in got.iter().zip(want) {
                    let ok = (g - w).abs() <= 2e-5 * (1.0 + w.abs());
                    assert!(ok, "{name} output {i} (0: y, then gradients): {g} vs {w}");
                }
            }
        }
        Ok(())
    }
}
