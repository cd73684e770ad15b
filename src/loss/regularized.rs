//! A loss plus an EOS regularizer: the full REFA objective.

use crate::batch::PreferenceBatch;
use crate::error::Result;
use crate::loss::{EosRegularizer, LossOutput, PreferenceLoss};

/// `loss + regularizer` (paper Eq. 11/34 for `RefaDynamic`). Build it with
/// [`PreferenceLoss::with_regularizer`].
///
/// `loss` and `per_prompt` are the sums of the two parts. Each part is averaged over its own
/// prompts (the loss over prompts with a preference, the regularizer over prompts with an
/// EOS-terminated response), so `loss` can differ from the mean of `per_prompt` when some
/// prompts are skipped. The metrics are the loss's, with the regularizer's value added.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Regularized<L> {
    /// The preference loss.
    pub loss: L,
    /// The regularizer added to it.
    pub regularizer: EosRegularizer,
}

impl<L: PreferenceLoss> PreferenceLoss for Regularized<L> {
    fn name(&self) -> &'static str {
        self.loss.name()
    }

    fn needs_reference(&self) -> bool {
        self.loss.needs_reference()
    }

    fn validate(&self) -> Result<()> {
        self.loss.validate()?;
        self.regularizer.validate()
    }

    fn compute(&self, batch: &PreferenceBatch) -> Result<LossOutput> {
        let main = self.loss.compute(batch)?;
        let regularizer = self.regularizer.compute(batch)?;
        let loss = &main.loss + &regularizer.loss;
        let mut metrics = main.metrics;
        metrics.loss = loss.detach().to_kind(tch::Kind::Double);
        metrics.regularizer = Some(regularizer.metrics.loss);
        Ok(LossOutput {
            loss,
            per_prompt: main.per_prompt + regularizer.per_prompt,
            metrics,
        })
    }
}
