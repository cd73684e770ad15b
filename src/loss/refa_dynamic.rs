//! REFA-dynamic: all above-mean responses against all the others.

use crate::batch::PreferenceBatch;
use crate::error::Result;
use crate::loss::contrast::{RefaLogits, SetContrast};
use crate::loss::{LossOutput, PreferenceLoss};
use crate::partition::DeviationMode;

/// REFA-dynamic (paper v1 Eq. 9/10/24, v4 Eq. 6/22), the paper's best configuration.
///
/// ```text
/// s_y = logp_sum_y / lengths_y            (or logp_sum_y when !length_normalize)
/// d_y = |r_y − r̄|^p                       (Signed: sign(r_y − r̄)·|r_y − r̄|^p)
/// u_y = β·s_y + α·d_y                      (weight exp(α·d_y) in log space)
/// L   = −log( P+ / (P+ + γ·P−) ),   P± = Σ_{y ∈ Y±} exp(u_y)
/// ```
///
/// `Y+` holds the responses rewarded above the prompt's mean, `Y−` the rest. Averaged over
/// the prompts that carry a preference. The appendix writes `β(s + α'·d)`; that is this
/// family with `α' = α/β`.
///
/// # Shapes
/// Reads `[P, K]` `logp_sum`, `lengths`, `rewards` and the mask of a [`PreferenceBatch`].
///
/// # Defaults (paper v4 Table 4, Mistral-7B base)
/// β = 3.0 (v1: 2–4), γ = 2.0 (v1: 0.7–1.4), α = 0.01, p = 2, `Absolute`, length-normalized.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RefaDynamic {
    /// Inverse temperature β on the scores, > 0.
    pub beta: f64,
    /// Weight γ of the negatives' mass, > 0.
    pub gamma: f64,
    /// Deviation weighting strength α, >= 0 (0 turns weighting off).
    pub alpha: f64,
    /// Power p of the deviation, > 0 (paper: 1 or 2).
    pub power: f64,
    /// How the sign of `r − r̄` enters the deviation.
    pub deviation: DeviationMode,
    /// Score by mean token log-probability (`true`) or by the sum.
    pub length_normalize: bool,
}

impl Default for RefaDynamic {
    fn default() -> Self {
        RefaDynamic {
            beta: 3.0,
            gamma: 2.0,
            alpha: 0.01,
            power: 2.0,
            deviation: DeviationMode::Absolute,
            length_normalize: true,
        }
    }
}

impl PreferenceLoss for RefaDynamic {
    fn name(&self) -> &'static str {
        "RefaDynamic"
    }

    fn validate(&self) -> Result<()> {
        RefaLogits::from(self).validate(self.name())
    }

    fn compute(&self, batch: &PreferenceBatch) -> Result<LossOutput> {
        let refa = RefaLogits::from(self);
        refa.validate(self.name())?;
        let partition = batch.partition()?;
        let (scores, logits) = refa.scores_and_logits(self.name(), batch, partition)?;
        SetContrast {
            scores: &scores,
            logits: &logits,
            positive: partition.positive(),
            negative: partition.negative(),
            log_gamma: self.gamma.ln(),
        }
        .output(self.name(), batch, partition, None)
    }
}
