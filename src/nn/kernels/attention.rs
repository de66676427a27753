//! Fused attention in f32, forward and backward: per query head, in blocks of
//! [`ROWS_PER_BLOCK`] query rows over only the keys a block can see (from the first key any
//! of its rows does not mask to the last: under a sliding window the work is linear in
//! T × window), the probabilities recomputed in the backward pass, grouped queries summed
//! per group in head order.

use multiversion::multiversion;

use super::matmul::gemm_serial;
use super::{dot, exp, max, sum, SharedMut};

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
    pub mask: AttnMask<'a>,
    pub scale: f32,
}

/// The additive mask of an attention.
#[derive(Clone, Copy, Debug)]
pub(crate) enum AttnMask<'a> {
    /// A `(t, t)` matrix of any values.
    Dense(&'a [f32]),
    /// Causal, within a sliding window when given: query `i` sees keys `j ≤ i` with
    /// `i − j < window`, with no matrix behind it, so neither the plan nor the softmax reads
    /// anything of size `t × t`.
    Causal(Option<usize>),
}

impl AttnMask<'_> {
    /// The keys `lo..hi` query `i` of `t` sees under a causal mask with this window.
    fn causal_range(window: Option<usize>, i: usize) -> (usize, usize) {
        let w = window.unwrap_or(usize::MAX).max(1);
        ((i + 1).saturating_sub(w), i + 1)
    }
}

impl AttnInputs<'_> {
    /// Rows of the probabilities `softmax(q_h·k_hᵀ·scale + mask)` of one query head: rows
    /// `rows.start..rows.end` into `p` (row stride `rows.width()`), over keys
    /// `rows.first..rows.cols` only (the mask is −∞ outside them).
    fn probs(&self, dims: &AttnDims, task: usize, rows: RowBlock, p: &mut [f32]) {
        let (t, d) = (dims.t, dims.d);
        let (qh, kh) = dims.heads(task);
        let RowBlock {
            start,
            end,
            first,
            cols,
        } = rows;
        let width = rows.width();
        // SAFETY: q_h and k_h are `t × d` matrices inside q and k (checked by `check`); the
        // block's rows of q_h and rows `first..cols` of k_h lie inside them; p holds
        // `(end − start) × width` elements; kᵀ reads k with its strides swapped.
        unsafe {
            gemm_serial(
                (end - start, width, d),
                p.as_mut_ptr(),
                width,
                false,
                self.q.as_ptr().add(qh.offset + start * qh.rs),
                (qh.rs, 1),
                self.k.as_ptr().add(kh.offset + first * kh.rs),
                (1, kh.rs),
            );
        }
        match self.mask {
            AttnMask::Dense(mask) => {
                let masks = mask[start * t..end * t].chunks_exact(t);
                for (row, mask) in p.chunks_exact_mut(width).zip(masks) {
                    softmax_row(row, &mask[first..cols], self.scale);
                }
            }
            AttnMask::Causal(window) => {
                let mut mask = vec![0f32; width];
                for (r, row) in p.chunks_exact_mut(width).take(end - start).enumerate() {
                    let (lo, hi) = AttnMask::causal_range(window, start + r);
                    for (j, m) in mask.iter_mut().enumerate() {
                        let key = first + j;
                        *m = match lo <= key && key < hi {
                            true => 0.0,
                            false => f32::NEG_INFINITY,
                        };
                    }
                    softmax_row(row, &mask, self.scale);
                }
            }
        }
    }

    fn check(&self, dims: &AttnDims) -> bool {
        let AttnDims { b, h, kv, t, d, .. } = *dims;
        kv > 0
            && h % kv == 0
            && self.q.len() == b * h * t * d
            && self.k.len() == b * kv * t * d
            && self.v.len() == b * kv * t * d
            && match self.mask {
                AttnMask::Dense(m) => m.len() == t * t,
                AttnMask::Causal(_) => true,
            }
    }

    /// The query rows in blocks of [`ROWS_PER_BLOCK`], each with the keys its rows can see:
    /// from the first key any of them does not mask with −∞ to one past the last. Under a
    /// causal mask that skips the upper triangle, block by block (about 60% of the work at
    /// T = 256); under a sliding window also the keys behind it.
    fn blocks(&self, t: usize) -> Vec<RowBlock> {
        let mask = match self.mask {
            AttnMask::Dense(mask) => mask,
            AttnMask::Causal(window) => {
                return (0..t)
                    .step_by(ROWS_PER_BLOCK)
                    .map(|start| {
                        let end = t.min(start + ROWS_PER_BLOCK);
                        let first = AttnMask::causal_range(window, start).0;
                        RowBlock {
                            start,
                            end,
                            first,
                            cols: end,
                        }
                    })
                    .collect()
            }
        };
        let seen = |row: &[f32]| last_visible(row).map_or(0, |j| j + 1);
        let from = first_visible;
        (0..t)
            .step_by(ROWS_PER_BLOCK)
            .map(|start| {
                let end = t.min(start + ROWS_PER_BLOCK);
                let rows = || mask[start * t..end * t].chunks_exact(t);
                // A block whose every key is masked still softmaxes one column (NaN, as the
                // unfused path gives for such rows).
                let cols = rows().map(seen).max().unwrap_or(0).max(1);
                let first = rows().filter_map(from).min().unwrap_or(0).min(cols - 1);
                RowBlock {
                    start,
                    end,
                    first,
                    cols,
                }
            })
            .collect()
    }
}

/// Lanes of the mask scans: whole chunks are tested branch-free (so the loop vectorises),
/// then the chunk that holds the answer element by element. The scans read the `(t, t)` mask
/// once per call; at T = 8192 that is 67M values, which element by element took longer than
/// the windowed attention itself.
const SCAN: usize = 32;

/// Whether a chunk of mask values holds one that is not −∞.
#[inline(always)]
fn any_visible(chunk: &[f32]) -> bool {
    chunk
        .iter()
        .fold(false, |a, &m| a | (m != f32::NEG_INFINITY))
}

/// The first position of `row` not masked with −∞.
fn first_visible(row: &[f32]) -> Option<usize> {
    let chunks = row.chunks(SCAN);
    for (c, chunk) in chunks.enumerate() {
        if any_visible(chunk) {
            return chunk
                .iter()
                .position(|&m| m != f32::NEG_INFINITY)
                .map(|j| c * SCAN + j);
        }
    }
    None
}

/// The last position of `row` not masked with −∞.
fn last_visible(row: &[f32]) -> Option<usize> {
    let tail = row.len() % SCAN;
    let (body, end) = row.split_at(row.len() - tail);
    if let Some(j) = end.iter().rposition(|&m| m != f32::NEG_INFINITY) {
        return Some(body.len() + j);
    }
    for (c, chunk) in body.chunks_exact(SCAN).enumerate().rev() {
        if any_visible(chunk) {
            return chunk
                .iter()
                .rposition(|&m| m != f32::NEG_INFINITY)
                .map(|j| c * SCAN + j);
        }
    }
    None
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

/// Query rows `start..end` of an attention, and the keys `first..cols` they see.
#[derive(Clone, Copy)]
struct RowBlock {
    start: usize,
    end: usize,
    first: usize,
    cols: usize,
}

impl RowBlock {
    /// How many keys the block sees.
    fn width(&self) -> usize {
        self.cols - self.first
    }
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
            let (start, end, first, width) = (rows.start, rows.end, rows.first, rows.width());
            x.probs(&dims, task, rows, p);
            // SAFETY: each task writes the rows of its own head of y (laid out as q); rows
            // `first..cols` of v_h lie inside v.
            unsafe {
                gemm_serial(
                    (end - start, d, width),
                    out.at(qh.offset + start * qh.rs),
                    qh.rs,
                    false,
                    p.as_ptr(),
                    (width, 1),
                    x.v.as_ptr().add(vh.offset + first * vh.rs),
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
    // One `t × d` buffer per query head (summed into dk and dv over each group below),
    // accumulated over the row blocks. Separate buffers, not one of all heads: glibc serves
    // blocks of 32 MiB or more with fresh mappings whose pages fault in at every step (at
    // Gemma 3 1B's heads and T = 8192 one buffer of all heads is 32 MiB, and the backward pass
    // took 1.6× its share of work), while smaller ones are reused from the heap.
    let share = || {
        (0..dims.b * dims.h)
            .map(|_| vec![0f32; t * d])
            .collect::<Vec<_>>()
    };
    let (mut dk_parts, mut dv_parts) = (share(), share());
    let outs = |parts: &mut [Vec<f32>]| -> Vec<SharedMut> {
        parts
            .iter_mut()
            .map(|p| SharedMut(p.as_mut_ptr()))
            .collect()
    };
    let (dk_out, dv_out) = (outs(&mut dk_parts), outs(&mut dv_parts));
    let dq_out = SharedMut(dq.as_mut_ptr());
    for_each_head(&dims, 2, |task, bufs| {
        let [p, ds] = bufs else { unreachable!() };
        let (qh, kh) = dims.heads(task);
        // This query head's shares of dk and dv: contiguous `t × d` blocks.
        let (dk_own, dv_own) = (&dk_out[task], &dv_out[task]);
        for &rows in &blocks {
            let (start, first, w) = (rows.start, rows.first, rows.width());
            let n = rows.end - start;
            x.probs(&dims, task, rows, p);
            let gb = g[qh.offset + start * qh.rs..].as_ptr();
            // SAFETY: each task writes the blocks of its own query head in dq, dk and dv;
            // the reads stay inside q, k, v and g (checked above) and the scratch buffers
            // (`n × w` elements).
            unsafe {
                // dv_h[first..cols] += pᵀ·g_block
                gemm_serial(
                    (w, d, n),
                    dv_own.at(first * d),
                    d,
                    true,
                    p.as_ptr(),
                    (1, w),
                    gb,
                    (qh.rs, 1),
                );
                // dp = g_block·v[first..cols]ᵀ
                gemm_serial(
                    (n, w, d),
                    ds.as_mut_ptr(),
                    w,
                    false,
                    gb,
                    (qh.rs, 1),
                    x.v.as_ptr().add(kh.offset + first * kh.rs),
                    (1, kh.rs),
                );
            }
            softmax_grad_rows(&mut ds[..n * w], &p[..n * w], w, x.scale);
            // SAFETY: as above.
            unsafe {
                // dq_block = ds·k[first..cols], laid out as q
                gemm_serial(
                    (n, d, w),
                    dq_out.at(qh.offset + start * qh.rs),
                    qh.rs,
                    false,
                    ds.as_ptr(),
                    (w, 1),
                    x.k.as_ptr().add(kh.offset + first * kh.rs),
                    (kh.rs, 1),
                );
                // dk_h[first..cols] += dsᵀ·q_block
                gemm_serial(
                    (w, d, n),
                    dk_own.at(first * d),
                    d,
                    true,
                    ds.as_ptr(),
                    (1, w),
                    x.q.as_ptr().add(qh.offset + start * qh.rs),
                    (qh.rs, 1),
                );
            }
        }
    });
    // Sum each group's shares (in head order) into its key/value head, laid out as k and v.
    let group = dims.h / dims.kv;
    let fold = |parts: Vec<Vec<f32>>| -> Vec<f32> {
        let mut out = vec![0f32; dims.b * dims.kv * t * d];
        for bi in 0..dims.b {
            for kvi in 0..dims.kv {
                let at = dims.head(bi, kvi, dims.kv);
                for share in 0..group {
                    let part = &parts[bi * dims.h + kvi * group + share];
                    for (i, part) in part.chunks_exact(d).enumerate() {
                        let row = &mut out[at.offset + i * at.rs..][..d];
                        row.iter_mut().zip(part).for_each(|(o, p)| *o += p);
                    }
                }
            }
        }
        out
    };
    Some((dq, fold(dk_parts), fold(dv_parts)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Result, Tensor};

    /// The fused attention and its gradients against candle's autograd in f64 through plain
    /// ops, with grouped queries, masks with random finite offsets (causal or not), and lengths
    /// that are no multiple of the vector width or of the row block.
    #[test]
    fn attention_matches_autograd() -> Result<()> {
        // One row block; three (the last partial) under a causal mask, so that blocks see
        // different numbers of keys; a sliding window of 40 keys, so that blocks also skip
        // the keys behind it; and a mask with no −∞ at all; in both layouts.
        for layout in [HeadLayout::HeadMajor, HeadLayout::TokenMajor] {
            for (t, window) in [
                (37, Some(37)),
                (150, Some(150)),
                (150, Some(40)),
                (150, None),
            ] {
                attention_case(t, window, layout)?;
            }
        }
        Ok(())
    }

    #[test]
    fn mask_scans_find_the_visible_ends() {
        let inf = f32::NEG_INFINITY;
        for n in [1, 5, 31, 32, 33, 64, 100] {
            for lo in 0..n {
                for hi in lo..n {
                    let row: Vec<f32> = (0..n)
                        .map(|j| if j < lo || j > hi { inf } else { 0.5 })
                        .collect();
                    assert_eq!(first_visible(&row), Some(lo), "{n} {lo} {hi}");
                    assert_eq!(last_visible(&row), Some(hi), "{n} {lo} {hi}");
                }
            }
            assert_eq!(first_visible(&vec![inf; n]), None);
            assert_eq!(last_visible(&vec![inf; n]), None);
        }
    }

    #[test]
    fn a_sliding_window_skips_the_keys_behind_it() {
        let t = 200;
        let mask: Vec<f32> =
            crate::nn::ops::sliding_window_mask(t, Some(50), DType::F32, &Device::Cpu)
                .and_then(|m| m.flatten_all()?.to_vec1())
                .unwrap();
        // Rows 64..128 see keys 64 − 49 = 15 up to 127; rows 192..200 keys 143..199; the
        // same read off the mask and from the window alone.
        for mask in [AttnMask::Dense(&mask), AttnMask::Causal(Some(50))] {
            let x = AttnInputs {
                q: &[],
                k: &[],
                v: &[],
                mask,
                scale: 1.0,
            };
            let blocks: Vec<(usize, usize)> =
                x.blocks(t).iter().map(|b| (b.first, b.cols)).collect();
            assert_eq!(blocks, vec![(0, 64), (15, 128), (79, 192), (143, 200)]);
        }
    }

    #[test]
    fn a_causal_window_without_a_matrix_equals_its_matrix() -> Result<()> {
        let dev = Device::Cpu;
        for (t, window) in [(150, Some(40)), (150, None), (70, Some(1))] {
            let dims = AttnDims {
                b: 1,
                h: 4,
                kv: 2,
                t,
                d: 8,
                layout: HeadLayout::HeadMajor,
            };
            let v = |heads: usize, seed: f32| -> Result<Vec<f32>> {
                (Tensor::randn(0f32, 1.0, (1, heads, t, 8), &dev)? + seed as f64)?
                    .flatten_all()?
                    .to_vec1()
            };
            let (q, k, vv, g) = (v(4, 0.0)?, v(2, 0.1)?, v(2, 0.2)?, v(4, 0.3)?);
            let dense: Vec<f32> = crate::nn::ops::sliding_window_mask(t, window, DType::F32, &dev)?
                .flatten_all()?
                .to_vec1()?;
            let run = |mask| {
                let x = AttnInputs {
                    q: &q,
                    k: &k,
                    v: &vv,
                    mask,
                    scale: 0.3,
                };
                (
                    attention_fwd(x, dims).unwrap(),
                    attention_bwd(x, &g, dims).unwrap(),
                )
            };
            assert_eq!(
                run(AttnMask::Dense(&dense)),
                run(AttnMask::Causal(window)),
                "{t} {window:?}"
            );
        }
        Ok(())
    }

    fn attention_case(t: usize, window: Option<usize>, layout: HeadLayout) -> Result<()> {
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
        if window.is_some() {
            mask = (mask + crate::nn::ops::sliding_window_mask(t, window, DType::F32, &dev)?)?;
        }
        let (qs, ks, vs, gs) = (laid(&q)?, laid(&k)?, laid(&v)?, laid(&g)?);
        let ms = mask.flatten_all()?.to_vec1::<f32>()?;
        let x = AttnInputs {
            q: &qs,
            k: &ks,
            v: &vs,
            mask: AttnMask::Dense(&ms),
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
                mask: AttnMask::Dense(&ms[1..]),
                ..x
            },
            dims
        )
        .is_none());
        Ok(())
    }
}
