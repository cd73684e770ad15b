//! # refa-loss
//!
//! Reference-free multi-preference alignment losses on libtorch tensors, after
//! *REFA: Reference Free Alignment for multi-preference optimization* (Gupta et al.), with the
//! baselines the paper compares against.
//!
//! A loss reads a [`PreferenceBatch`]: for `P` prompts with `K` response slots each, the
//! summed token log-probability of every response under the model being trained, its length
//! in tokens and its reward (plus, optionally, a slot mask for ragged `K`, reference-model
//! log-probabilities and EOS log-probabilities). It returns a [`LossOutput`] whose `loss` is
//! in the autograd graph, ready for `backward()`.
//!
//! ## The losses in brief
//!
//! With `s_y = logp_sum_y / lengths_y`, the prompt's mean reward `r̄`, positives
//! `Y+ = {r > r̄}`, negatives `Y− = {r <= r̄}`, deviations `d_y = |r_y − r̄|^p` and logits
//! `u_y = β·s_y + α·d_y`:
//!
//! | loss | per-prompt value |
//! |---|---|
//! | [`RefaDynamic`] | `−log( P+ / (P+ + γ·P−) )`, `P± = Σ_{Y±} e^{u}` |
//! | [`RefaOneVsAll`] | `−log( e^{u_i*} / (e^{u_i*} + γ·Σ_{j≠i*} e^{u_j}) )`, `i*` = best |
//! | [`InfoNca`] | `−Σ_i softmax(r/τ)_i · log softmax(β·s)_i` (or against a reference) |
//! | [`EosRegularizer`] | `λ·Σ_y P(EOS at |y|)` and three other modes |
//! | [`SimPo`] | `−log σ(β(s_w − s_l) − γ_m)` |
//! | [`Dpo`] | `−log σ(β[(logp_w − ref_w) − (logp_l − ref_l)])` |
//! | [`Mpo`] | `−log( Σ_{Y+} e^{u} / Σ_{Y} e^{u} )` with `u = β(logp − ref) + α·d` |
//!
//! Prompts whose rewards are all equal, or that have fewer than two responses, carry no
//! preference: every loss skips them and reports how many it skipped. `docs/math.md` holds
//! every formula as implemented, each decision the paper leaves open, and the closed-form
//! gradients the tests check.
//!
//! ## Quickstart
//!
//! ```
//! use refa_loss::{EosRegularizer, PreferenceBatch, PreferenceLoss, RefaDynamic};
//! use tch::{Kind, Tensor};
//!
//! # fn main() -> Result<(), refa_loss::RefaError> {
//! // Two prompts, three responses each; the second prompt has only two real responses.
//! let logp_sum = Tensor::from_slice2(&[[-12.0f32, -30.0, -25.0], [-8.0, -9.0, 0.0]])
//!     .set_requires_grad(true);
//! let lengths = Tensor::from_slice2(&[[10.0f32, 20.0, 12.0], [4.0, 6.0, 1.0]]);
//! let rewards = Tensor::from_slice2(&[[8.0f32, 3.0, 5.0], [7.0, 6.5, 0.0]]);
//! let mask = Tensor::from_slice2(&[[true, true, true], [true, true, false]]);
//! let eos_logp = Tensor::from_slice2(&[[-0.1f32, -0.7, -2.0], [-0.3, -0.2, 0.0]]);
//!
//! let batch = PreferenceBatch::new(&logp_sum, &lengths, &rewards)?
//!     .with_mask(&mask)?
//!     .with_eos(&eos_logp, &mask)?;
//! let refa = RefaDynamic::default().with_regularizer(EosRegularizer::default());
//! let output = refa.compute(&batch)?;
//! output.loss.backward();
//!
//! let metrics = output.metrics.summary()?;
//! assert_eq!(metrics.prompts_used, 2);
//! // Gradient descent raises positives' log-probabilities and lowers negatives'.
//! let grad = logp_sum.grad();
//! assert!(grad.double_value(&[0, 0]) < 0.0); // reward 8 > mean 5.33: a positive
//! assert!(grad.double_value(&[0, 1]) > 0.0); // reward 3: a negative
//! assert_eq!(grad.double_value(&[1, 2]), 0.0); // masked slot: exactly no gradient
//! # Ok(()) }
//! ```
//!
//! ## Devices and kinds
//!
//! Inputs may be f32, f64, bf16 or f16 on any device; losses compute in f64 for f64 inputs
//! and in f32 otherwise, on the inputs' device. Use [`device::cuda_if_available`] rather than
//! `tch::Device::cuda_if_available`: it makes CUDA visible to binaries that link this crate
//! without a build script of their own.

#![warn(missing_docs)]

mod batch;
#[cfg(feature = "trainer")]
pub mod cli;
#[cfg(feature = "trainer")]
pub mod data;
pub mod device;
#[cfg(feature = "distributed")]
pub mod distributed;
mod error;
mod ffi;

// `doc-only` turns libtorch off in torch-sys: a binary built with it cannot link. Say so plainly
// instead of with hundreds of undefined symbols (`--all-features` switches it on too).
#[cfg(all(feature = "doc-only", not(doc)))]
compile_error!(
    "feature `doc-only` is for documentation builds (docs.rs) only; build and test with \
     `--features trainer` (or `model`) instead of `--all-features`"
);
#[cfg(feature = "trainer")]
pub mod analysis;
pub mod loss;
#[cfg(feature = "model")]
pub mod model;
#[cfg(feature = "trainer")]
pub mod on_policy;
mod partition;
mod reduce;
#[cfg(feature = "model")]
pub mod reward;
pub mod scoring;
#[cfg(feature = "trainer")]
pub mod train;
mod validate;

pub use batch::PreferenceBatch;
pub use error::{ErrorSource, RefaError, Result};
pub use loss::{
    Dpo, EosKind, EosMode, EosRegularizer, InfoNca, InfoNcaVariant, LossConfig, LossKind,
    LossMetrics, LossOutput, MetricsSummary, Mpo, PreferenceLoss, RefaDynamic, RefaOneVsAll,
    Regularized, SimPo, TargetLength,
};
pub use partition::{top_bottom_sets, DeviationMode, Partition, RELATIVE_TIE_TOLERANCE};
