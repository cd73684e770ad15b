//! MPO / SWEPO (Gupta et al. 2024): weighted positives against all responses, with a reference.

use crate::batch::PreferenceBatch;
use crate::error::Result;
use crate::loss::common::scores;
use crate::loss::contrast::{weighted_logits, SetContrast};
use crate::loss::{LossOutput, PreferenceLoss};
use crate::partition::DeviationMode;
use crate::validate::Hyperparameters;

/// MPO (SWEPO): the deviation-weighted mass of the positives over that of all responses.
///
/// ```text
/// u_y = β·(logp_y − ref_y) + α·d_y          (weight w_y = exp(α·d_y))
/// L   = −log( Σ_{Y+} e^{u_y} / Σ_{Y} e^{u_y} )
/// ```
///
/// This is [`RefaDynamic`](crate::RefaDynamic)'s form with γ = 1, summed log-ratios against
/// a reference model instead of length-normalized log-probabilities.
///
/// # Defaults (DECIDED: the spec fixes none)
/// β = 0.1 (as DPO), α = 0.01, p = 1, `Absolute` ("weight by absolute deviation"), summed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mpo {
    /// Inverse temperature β, > 0.
    pub beta: f64,
    /// Deviation weighting strength α, >= 0.
    pub alpha: f64,
    /// Power p of the deviation, > 0.
    pub power: f64,
    /// How the sign of `r − r̄` enters the deviation.
    pub deviation: DeviationMode,
    /// Divide the log-ratios by the response lengths (off by default).
    pub length_normalize: bool,
}

impl Default for Mpo {
    fn default() -> Self {
        Mpo {
            beta: 0.1,
            alpha: 0.01,
            power: 1.0,
            deviation: DeviationMode::Absolute,
            length_normalize: false,
        }
    }
}

impl PreferenceLoss for Mpo {
    fn name(&self) -> &'static str {
        "Mpo"
    }

    fn needs_reference(&self) -> bool {
        true
    }

    fn validate(&self) -> Result<()> {
        Hyperparameters::of(self.name())
            .positive("beta", self.beta)?
            .non_negative("alpha", self.alpha)?
            .positive("power", self.power)?;
        Ok(())
    }

    fn compute(&self, batch: &PreferenceBatch) -> Result<LossOutput> {
        self.validate()?;
        let partition = batch.partition()?;
        let log_ratios = scores(self.name(), batch, self.length_normalize, true)?;
        let deviations = partition.deviations(self.power, self.deviation, batch.kind());
        let logits = weighted_logits(self.beta, &log_ratios, self.alpha, &deviations);
        SetContrast {
            scores: &log_ratios,
            logits: &logits,
            positive: partition.positive(),
            negative: partition.negative(),
            log_gamma: 0.0,
        }
        .output(self.name(), batch, partition, None)
    }
}
