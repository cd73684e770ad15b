//! The losses: one file each, all behind the [`PreferenceLoss`] trait.

mod common;
mod config;
mod contrast;
mod dpo;
mod eos;
mod info_nca;
mod mpo;
mod one_vs_all;
mod output;
mod refa_dynamic;
mod regularized;
mod simpo;

pub use config::{EosKind, LossConfig, LossKind};
pub use dpo::Dpo;
pub use eos::{EosMode, EosRegularizer, TargetLength};
pub use info_nca::{InfoNca, InfoNcaVariant};
pub use mpo::Mpo;
pub use one_vs_all::RefaOneVsAll;
pub use output::{LossMetrics, LossOutput, MetricsSummary};
pub use refa_dynamic::RefaDynamic;
pub use regularized::Regularized;
pub use simpo::SimPo;

use crate::batch::PreferenceBatch;
use crate::error::Result;

/// A loss over a [`PreferenceBatch`].
///
/// `compute` validates the configuration (β > 0, γ > 0, …) and the batch's inputs, then
/// returns a [`LossOutput`] whose `loss` is in the autograd graph of the batch's tensors.
/// Configurations are plain `Copy` structs with `pub` fields and paper defaults:
///
/// ```no_run
/// # use refa_loss::{RefaDynamic, EosRegularizer, PreferenceLoss};
/// let refa = RefaDynamic { beta: 2.5, ..Default::default() }.with_regularizer(EosRegularizer::default());
/// ```
pub trait PreferenceLoss {
    /// Short name for logs and errors, e.g. `"RefaDynamic"`.
    fn name(&self) -> &'static str;

    /// Computes the loss on `batch`.
    fn compute(&self, batch: &PreferenceBatch) -> Result<LossOutput>;

    /// Checks the hyperparameters alone (β > 0, γ > 0, …), so that a bad configuration
    /// fails before any batch exists; `compute` checks them too. Default: nothing to check.
    fn validate(&self) -> Result<()> {
        Ok(())
    }

    /// Whether `compute` reads `ref_logp_sum` (a trainer then scores the responses once
    /// with the frozen starting model).
    fn needs_reference(&self) -> bool {
        false
    }

    /// This loss plus an EOS-probability regularizer.
    fn with_regularizer(self, regularizer: EosRegularizer) -> Regularized<Self>
    where
        Self: Sized,
    {
        Regularized {
            loss: self,
            regularizer,
        }
    }
}

impl<L: PreferenceLoss + ?Sized> PreferenceLoss for Box<L> {
    fn name(&self) -> &'static str {
        (**self).name()
    }

    fn compute(&self, batch: &PreferenceBatch) -> Result<LossOutput> {
        (**self).compute(batch)
    }

    fn validate(&self) -> Result<()> {
        (**self).validate()
    }

    fn needs_reference(&self) -> bool {
        (**self).needs_reference()
    }
}

impl<L: PreferenceLoss + ?Sized> PreferenceLoss for &L {
    fn name(&self) -> &'static str {
        (**self).name()
    }

    fn compute(&self, batch: &PreferenceBatch) -> Result<LossOutput> {
        (**self).compute(batch)
    }

    fn validate(&self) -> Result<()> {
        (**self).validate()
    }

    fn needs_reference(&self) -> bool {
        (**self).needs_reference()
    }
}
