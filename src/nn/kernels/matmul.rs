//! Matrix products on candle's barrier pool: the output's columns split into one block per
//! thread, each block one single-threaded gemm call (see the [module above](super) for why).

use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor};

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
pub(crate) unsafe fn gemm_serial(
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
}
