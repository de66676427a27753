//! The LM head's cross-entropy in f32: the loss and dL/dlogits in one pass per row, the
//! gradient left in place of the logits.

use multiversion::multiversion;

use super::{exp, max, par_fill, sum, SharedMut};

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
