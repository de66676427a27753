//! The frozen-aware Linear: same values and dx as candle's matmul, no dW.

use crate::common::max_abs_diff;
use candle_core::backprop::GradStore;
use candle_core::{Device, Module, Tensor, Var};
use candle_lisa::nn::frozen_matmul;
use candle_lisa::Linear;

fn randn(shape: &[usize]) -> candle_core::Result<Tensor> {
    Tensor::randn(0f32, 1., shape, &Device::Cpu)
}

/// Entries of the GradStore whose shape is `dims`.
fn count_shaped(grads: &GradStore, dims: &[usize]) -> usize {
    grads
        .get_ids()
        .filter_map(|id| grads.get_id(*id))
        .filter(|g| g.dims() == dims)
        .count()
}

/// Compares the frozen Linear with the reference `x·Wᵀ + b` computed by candle's own ops, for an
/// input given as a Var `x_var` seen through `view` (e.g. a transpose).
fn check(
    x_var: &Var,
    view: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
    out: usize,
) -> candle_core::Result<()> {
    let x = view(x_var.as_tensor())?;
    let in_dim = *x.dims().last().unwrap();
    let w = randn(&[out, in_dim])?;
    let b = randn(&[out])?;
    let probe = randn(&[&x.dims()[..x.rank() - 1], &[out]].concat())?;

    let frozen = Linear::new(w.clone(), Some(b.clone()));
    let y = frozen.forward(&x)?;
    let grads = (&y * &probe)?.sum_all()?.backward()?;

    // Reference on a contiguous copy (candle 0.11.1's Linear is wrong on non-contiguous 3-D
    // input), through the stock, differentiable matmul.
    let x_ref = Var::from_tensor(&x.contiguous()?)?;
    let rows = x.elem_count() / in_dim;
    let y_ref = x_ref
        .as_tensor()
        .reshape((rows, in_dim))?
        .matmul(&w.t()?)?
        .broadcast_add(&b)?
        .reshape(y.shape())?;
    let grads_ref = (&y_ref * &probe)?.sum_all()?.backward()?;

    assert!(max_abs_diff(&y, &y_ref) <= 1e-5);
    let dx = grads.get(x_var.as_tensor()).expect("dx");
    let dx_ref = grads_ref.get(x_ref.as_tensor()).expect("dx_ref");
    assert_eq!(dx.shape(), x_var.shape());
    let dx_view = view(dx)?;
    assert!(max_abs_diff(&dx_view, dx_ref) <= 1e-5, "dx differs");
    // The stock path stores dW (keyed by w.t(), shape (in, out)) and db; the frozen one neither.
    assert_eq!(count_shaped(&grads_ref, &[in_dim, out]), 1);
    assert_eq!(count_shaped(&grads, &[in_dim, out]), 0);
    assert_eq!(count_shaped(&grads, &[out, in_dim]), 0);
    assert!(grads.get(&w).is_none() && grads.get(&b).is_none());
    Ok(())
}

#[test]
fn three_d_input() -> candle_core::Result<()> {
    let x = Var::from_tensor(&randn(&[2, 5, 7])?)?;
    check(&x, |t| Ok(t.clone()), 3)
}

#[test]
fn non_contiguous_input() -> candle_core::Result<()> {
    // A (2, 7, 5) variable seen as (2, 5, 7) through a transpose.
    let x = Var::from_tensor(&randn(&[2, 7, 5])?)?;
    check(&x, |t| t.transpose(1, 2), 4)
}

#[test]
fn two_d_and_four_d_inputs() -> candle_core::Result<()> {
    check(&Var::from_tensor(&randn(&[6, 8])?)?, |t| Ok(t.clone()), 5)?;
    check(
        &Var::from_tensor(&randn(&[2, 3, 4, 8])?)?,
        |t| Ok(t.clone()),
        5,
    )
}

#[test]
fn narrowed_input_keeps_its_offset() -> candle_core::Result<()> {
    // Rows 3..8 of a (9, 6) variable: contiguous, with a start offset.
    let x = Var::from_tensor(&randn(&[9, 6])?)?;
    check(&x, |t| t.narrow(0, 3, 5), 4)
}

/// A column-sliced weight (non-contiguous) gives the same result as its contiguous copy.
#[test]
fn column_sliced_weight() -> candle_core::Result<()> {
    let big = randn(&[4, 10])?;
    let w = big.narrow(1, 2, 6)?;
    assert!(!w.is_contiguous());
    let x = randn(&[3, 6])?;
    let y = frozen_matmul(&x, &w)?;
    let y_ref = x.matmul(&w.contiguous()?.t()?)?;
    assert!(max_abs_diff(&y, &y_ref) <= 1e-5);
    Ok(())
}

/// A trainable weight (a Var) takes candle's differentiable path and gets its gradient.
#[test]
fn trainable_weight_gets_gradients() -> candle_core::Result<()> {
    let w = Var::from_tensor(&randn(&[3, 4])?)?;
    let b = Var::from_tensor(&randn(&[3])?)?;
    let x = randn(&[2, 4])?;
    let y = Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone())).forward(&x)?;
    let grads = y.sum_all()?.backward()?;
    // d(sum)/dW = column sums of x for every output row; d(sum)/db = number of rows.
    let dw_expected = x.sum_keepdim(0)?.broadcast_as((3, 4))?;
    assert!(max_abs_diff(grads.get(w.as_tensor()).unwrap(), &dw_expected) <= 1e-5);
    assert_eq!(
        grads.get(b.as_tensor()).unwrap().to_vec1::<f32>()?,
        [2., 2., 2.]
    );
    Ok(())
}

#[test]
fn shape_mismatch_is_an_error() -> candle_core::Result<()> {
    let err = frozen_matmul(&randn(&[2, 5])?, &randn(&[3, 4])?).unwrap_err();
    assert!(err.to_string().contains("frozen_matmul"), "{err}");
    Ok(())
}
