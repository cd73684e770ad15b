//! Row reductions that accept empty rows.
//!
//! libtorch's `amax`, `argmax` and `argmin` refuse a reduction over a dimension of size 0,
//! which a batch with `K = 0` slots (or `P = 0` prompts) has. Such a batch is legal: every
//! prompt is skipped and the loss is zero. These wrappers return the neutral answer instead.

use tch::{Kind, Tensor};

/// `x.amax(dims, keepdim)`, or zeros of the reduced shape when a reduced dimension is empty.
pub(crate) fn amax_or_zero(x: &Tensor, dims: &[i64], keepdim: bool) -> Tensor {
    if has_empty(x, dims) {
        x.sum_dim_intlist(dims, keepdim, None).zeros_like()
    } else {
        x.amax(dims, keepdim)
    }
}

/// Index of the first maximum along dimension 1 (`[P]`), or zeros when `K = 0`.
pub(crate) fn first_argmax(x: &Tensor) -> Tensor {
    if has_empty(x, &[1]) {
        Tensor::zeros([x.size()[0]], (Kind::Int64, x.device()))
    } else {
        x.argmax(1, false)
    }
}

/// Index of the first minimum along dimension 1 (`[P]`), or zeros when `K = 0`.
pub(crate) fn first_argmin(x: &Tensor) -> Tensor {
    first_argmax(&-x)
}

fn has_empty(x: &Tensor, dims: &[i64]) -> bool {
    let size = x.size();
    dims.iter().any(|&d| size[d as usize] == 0)
}
