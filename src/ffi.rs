//! The C surface of `csrc/refa_ops.cpp`: libtorch operations tch 0.24 does not bind.
//!
//! Each C function returns NULL on success or a `malloc`ed message that [`check`] turns into
//! [`RefaError::Torch`] (every C++ exception is caught on the C++ side). Tensors cross as
//! tch's `C_tensor` pointers, which are `at::Tensor*`. Nothing here is public: the crate's
//! safe wrappers are `adamw_step` and `clip_grad_norm` (feature `trainer`, the only user),
//! [`memory_stats`], [`pin_memory`] and [`flash_attention_varlen`] (the packed layout's
//! attention on CUDA).

#![cfg_attr(feature = "doc-only", allow(unused_imports, dead_code))]

use std::ffi::{c_char, c_int, CStr};

use tch::Tensor;
use torch_sys::C_tensor;

use crate::error::{RefaError, Result};

#[cfg(not(feature = "doc-only"))]
extern "C" {
    fn refa_free_error(message: *mut c_char);
    #[cfg(feature = "trainer")]
    #[allow(clippy::too_many_arguments)]
    fn refa_adamw_step(
        targets: *const *mut C_tensor,
        grads: *const *mut C_tensor,
        exp_avgs: *const *mut C_tensor,
        exp_avg_sqs: *const *mut C_tensor,
        mirrors: *const *mut C_tensor,
        steps: *const *mut C_tensor,
        count: usize,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        found_inf: *mut C_tensor,
    ) -> *mut c_char;
    #[cfg(feature = "trainer")]
    fn refa_clip_grad_norm(
        grads: *const *mut C_tensor,
        count: usize,
        max_norm: f64,
        norm_out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn refa_memory_stats(index: c_int, out: *mut i64, available: *mut c_int) -> *mut c_char;
    fn refa_pin_memory(host: *mut C_tensor, out: *mut *mut C_tensor) -> *mut c_char;
    fn refa_reset_peak_memory(index: c_int) -> *mut c_char;
    #[cfg(feature = "model")]
    #[allow(clippy::too_many_arguments)]
    fn refa_flash_attention_varlen(
        q: *mut C_tensor,
        k: *mut C_tensor,
        v: *mut C_tensor,
        cum_q: *mut C_tensor,
        cum_k: *mut C_tensor,
        max_q: i64,
        max_k: i64,
        causal: c_int,
        scale: f64,
        window_left: i64,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
}

/// Turns a returned message into an error, freeing it.
#[cfg(not(feature = "doc-only"))]
pub(crate) fn check(message: *mut c_char) -> Result<()> {
    match take_text(message) {
        None => Ok(()),
        Some(text) => Err(RefaError::torch(text)),
    }
}

/// The text of a string the C++ side allocated with malloc (an error message or a returned
/// value), freed; None for NULL.
#[cfg(not(feature = "doc-only"))]
pub(crate) fn take_text(message: *mut c_char) -> Option<String> {
    if message.is_null() {
        return None;
    }
    // SAFETY: a non-null return is a NUL-terminated string from malloc, owned by us now.
    let text = unsafe { CStr::from_ptr(message) }
        .to_string_lossy()
        .into_owned();
    unsafe { refa_free_error(message) };
    Some(text)
}

fn pointer(t: &Tensor) -> *mut C_tensor {
    t.as_ptr() as *mut C_tensor
}

/// One tensor of [`adamw_step`]: the f32/f64 tensor updated, its gradient, its moments, the
/// low-precision parameter a master copy is rounded into, and the step counter (a 0-dim
/// float tensor on the target's device, already incremented).
#[cfg(feature = "trainer")]
pub(crate) struct AdamWSlot<'a> {
    pub target: &'a Tensor,
    pub grad: &'a Tensor,
    pub exp_avg: &'a Tensor,
    pub exp_avg_sq: &'a Tensor,
    pub mirror: Option<&'a Tensor>,
    pub step: &'a Tensor,
}

/// AdamW's hyperparameters for one step.
#[cfg(feature = "trainer")]
pub(crate) struct AdamWHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

/// One fused AdamW step (`at::_fused_adamw_`) over `slots`, then every gradient zeroed. A
/// non-zero `found_inf` (0-dim float on the device) makes the kernel skip the update.
#[cfg(all(feature = "trainer", not(feature = "doc-only")))]
pub(crate) fn adamw_step(
    slots: &[AdamWSlot<'_>],
    hyper: &AdamWHyper,
    found_inf: Option<&Tensor>,
) -> Result<()> {
    let column = |f: &dyn Fn(&AdamWSlot<'_>) -> *mut C_tensor| -> Vec<*mut C_tensor> {
        slots.iter().map(f).collect()
    };
    let targets = column(&|s| pointer(s.target));
    let grads = column(&|s| pointer(s.grad));
    let exp_avgs = column(&|s| pointer(s.exp_avg));
    let exp_avg_sqs = column(&|s| pointer(s.exp_avg_sq));
    let mirrors = column(&|s| s.mirror.map_or(std::ptr::null_mut(), pointer));
    let steps = column(&|s| pointer(s.step));
    let found_inf = found_inf.map_or(std::ptr::null_mut(), pointer);
    // SAFETY: every pointer is a live tch tensor borrowed for the call; the arrays hold
    // `slots.len()` entries each.
    check(unsafe {
        refa_adamw_step(
            targets.as_ptr(),
            grads.as_ptr(),
            exp_avgs.as_ptr(),
            exp_avg_sqs.as_ptr(),
            mirrors.as_ptr(),
            steps.as_ptr(),
            slots.len(),
            hyper.lr,
            hyper.beta1,
            hyper.beta2,
            hyper.weight_decay,
            hyper.eps,
            found_inf,
        )
    })
}

/// The global L2 norm of `grads` as a 0-dim f32 tensor on their device (no host
/// synchronization), scaling them in place to at most `max_norm` when it is > 0.
#[cfg(all(feature = "trainer", not(feature = "doc-only")))]
pub(crate) fn clip_grad_norm(grads: &[&Tensor], max_norm: f64) -> Result<Tensor> {
    let pointers: Vec<*mut C_tensor> = grads.iter().map(|g| pointer(g)).collect();
    let mut norm: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: live tensors for the call; on success `norm` is a new `at::Tensor*` that the
    // returned tch Tensor owns (tch frees it with `delete`, as it was allocated with `new`).
    check(unsafe { refa_clip_grad_norm(pointers.as_ptr(), pointers.len(), max_norm, &mut norm) })?;
    Ok(unsafe { Tensor::from_ptr(norm) })
}

/// A page-locked copy of the host tensor `host` (for asynchronous uploads to a GPU).
#[cfg(not(feature = "doc-only"))]
pub(crate) fn pin_memory(host: &Tensor) -> Result<Tensor> {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: a live tensor; on success `out` is a new `at::Tensor*` the returned tch Tensor
    // owns (allocated with `new`, as tch's own).
    check(unsafe { refa_pin_memory(pointer(host), &mut out) })?;
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// `[allocated, peak allocated, reserved, peak reserved, free, total]` bytes of accelerator
/// `index`, or `None` without an accelerator.
#[cfg(not(feature = "doc-only"))]
pub(crate) fn memory_stats(index: usize) -> Result<Option<[i64; 6]>> {
    let mut out = [0i64; 6];
    let mut available: c_int = 0;
    // SAFETY: `out` has the six slots the function writes.
    check(unsafe { refa_memory_stats(index as c_int, out.as_mut_ptr(), &mut available) })?;
    Ok((available != 0).then_some(out))
}

/// Resets the peak statistics of accelerator `index`.
#[cfg(not(feature = "doc-only"))]
pub(crate) fn reset_peak_memory(index: usize) -> Result<()> {
    // SAFETY: plain value argument.
    check(unsafe { refa_reset_peak_memory(index as c_int) })
}

/// Variable-length flash attention (`at::_flash_attention_forward`): `[total_q, heads, d]`
/// from `q` `[total_q, heads, d]` and `k`, `v` `[total_k, kv_heads, d]`; differentiable
/// through libtorch's autograd. CUDA, bf16/f16 only: anything else is a [`RefaError::Torch`]
/// naming the problem.
#[cfg(all(feature = "model", not(feature = "doc-only")))]
pub(crate) fn flash_attention_varlen(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    args: &crate::model::VarlenArgs<'_>,
) -> Result<Tensor> {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: live tensors borrowed for the call; on success `out` is a new `at::Tensor*`
    // the returned tch Tensor owns (allocated with `new`, as tch's own).
    check(unsafe {
        refa_flash_attention_varlen(
            pointer(q),
            pointer(k),
            pointer(v),
            pointer(args.cum_q),
            pointer(args.cum_k),
            args.max_q,
            args.max_k,
            c_int::from(args.causal),
            args.scale.unwrap_or(0.0),
            args.window_left.unwrap_or(-1),
            &mut out,
        )
    })?;
    Ok(unsafe { Tensor::from_ptr(out) })
}

// Documentation builds link nothing: the same functions, answering with an error.
#[cfg(feature = "doc-only")]
mod unlinked {
    use super::*;
    fn unavailable<T>() -> Result<T> {
        Err(RefaError::torch("built with `doc-only`: no libtorch"))
    }
    #[cfg(feature = "trainer")]
    pub(crate) fn adamw_step(
        _: &[AdamWSlot<'_>],
        _: &AdamWHyper,
        _: Option<&Tensor>,
    ) -> Result<()> {
        unavailable()
    }
    #[cfg(feature = "trainer")]
    pub(crate) fn clip_grad_norm(_: &[&Tensor], _: f64) -> Result<Tensor> {
        unavailable()
    }
    pub(crate) fn memory_stats(_: usize) -> Result<Option<[i64; 6]>> {
        unavailable()
    }
    pub(crate) fn reset_peak_memory(_: usize) -> Result<()> {
        unavailable()
    }
    pub(crate) fn pin_memory(_: &Tensor) -> Result<Tensor> {
        unavailable()
    }
    #[cfg(feature = "model")]
    pub(crate) fn flash_attention_varlen(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &crate::model::VarlenArgs<'_>,
    ) -> Result<Tensor> {
        unavailable()
    }
    #[cfg(feature = "distributed")]
    pub(crate) fn take_text(_: *mut c_char) -> Option<String> {
        Some("built with `doc-only`: no libtorch".to_string())
    }
}
#[cfg(feature = "doc-only")]
pub(crate) use unlinked::*;
