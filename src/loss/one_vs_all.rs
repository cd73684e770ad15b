//! REFA-1-vs-all: the best response against every other one.

use crate::batch::PreferenceBatch;
use crate::error::Result;
use crate::loss::contrast::{RefaLogits, SetContrast};
use crate::loss::{LossOutput, PreferenceLoss};
use crate::partition::DeviationMode;

/// REFA-1-vs-all (paper v1 Eq. 20, v4 "1-vs-k").
///
/// ```text
/// i* = argmax_i r_i                       (ties: lowest slot index)
/// u_y = β·s_y + α·d_y                     (s, d as in RefaDynamic)
/// L  = −log( e^{u_i*} / (e^{u_i*} + γ·Σ_{j≠i*} e^{u_j}) )
/// ```
///
/// Every other valid response, above the mean or not, is in the γ-weighted sum. Prompts
/// without a preference (all rewards equal, fewer than two responses) are skipped. With
/// explicit sets ([`PreferenceBatch::with_sets`]), `i*` is the best positive and the sum runs
/// over the other members of `Y+ ∪ Y−`.
///
/// # Shapes
/// Reads `[P, K]` `logp_sum`, `lengths`, `rewards` and the mask of a [`PreferenceBatch`].
///
/// # Defaults (paper v4 Table 4, Mistral-7B base)
/// β = 2.0, γ = 2.0, α = 0.01, p = 2, `Absolute`, length-normalized.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RefaOneVsAll {
    /// Inverse temperature β on the scores, > 0.
    pub beta: f64,
    /// Weight γ of the other responses' mass, > 0.
    pub gamma: f64,
    /// Deviation weighting strength α, >= 0.
    pub alpha: f64,
    /// Power p of the deviation, > 0.
    pub power: f64,
    /// How the sign of `r − r̄` enters the deviation.
    pub deviation: DeviationMode,
    /// Score by mean token log-probability (`true`) or by the sum.
    pub length_normalize: bool,
}

impl Default for RefaOneVsAll {
    fn default() -> Self {
        RefaOneVsAll {
            beta: 2.0,
            gamma: 2.0,
            alpha: 0.01,
            power: 2.0,
            deviation: DeviationMode::Absolute,
            length_normalize: true,
        }
    }
}

impl PreferenceLoss for RefaOneVsAll {
    fn name(&self) -> &'static str {
        "RefaOneVsAll"
    }

    fn validate(&self) -> Result<()> {
        RefaLogits::from(self).validate(self.name())
    }

    fn compute(&self, batch: &PreferenceBatch) -> Result<LossOutput> {
        let refa = RefaLogits::from(self);
        refa.validate(self.name())?;
        let partition = batch.partition()?;
        let (scores, logits) = refa.scores_and_logits(self.name(), batch, partition)?;
        let best = partition.best_one_hot();
        let rest = partition.participants().logical_and(&best.logical_not());
        SetContrast {
            scores: &scores,
            logits: &logits,
            positive: &best,
            negative: &rest,
            log_gamma: self.gamma.ln(),
        }
        .output(self.name(), batch, partition, None)
    }
}
