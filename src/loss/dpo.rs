//! DPO (Rafailov et al. 2023) on the best and the worst response.

use crate::batch::PreferenceBatch;
use crate::error::Result;
use crate::loss::common::scores;
use crate::loss::contrast::SetContrast;
use crate::loss::{LossOutput, PreferenceLoss};
use crate::validate::Hyperparameters;

/// DPO on the best and the worst response of each prompt; needs reference log-probabilities.
///
/// ```text
/// w = argmax_i r_i,  l = argmin_i r_i      (ties: lowest slot index)
/// L = −log σ( β·[(logp_w − ref_w) − (logp_l − ref_l)] )
/// ```
///
/// # Defaults
/// β = 0.1 (the DPO paper's value), summed log-probabilities.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dpo {
    /// Inverse temperature β, > 0.
    pub beta: f64,
    /// Divide the log-ratios by the response lengths (not DPO; off by default).
    pub length_normalize: bool,
}

impl Default for Dpo {
    fn default() -> Self {
        Dpo {
            beta: 0.1,
            length_normalize: false,
        }
    }
}

impl PreferenceLoss for Dpo {
    fn name(&self) -> &'static str {
        "Dpo"
    }

    fn needs_reference(&self) -> bool {
        true
    }

    fn validate(&self) -> Result<()> {
        Hyperparameters::of(self.name()).positive("beta", self.beta)?;
        Ok(())
    }

    fn compute(&self, batch: &PreferenceBatch) -> Result<LossOutput> {
        self.validate()?;
        let partition = batch.partition()?;
        let log_ratios = scores(self.name(), batch, self.length_normalize, true)?;
        let logits = &log_ratios * self.beta;
        SetContrast {
            scores: &log_ratios,
            logits: &logits,
            positive: &partition.best_one_hot(),
            negative: &partition.worst_one_hot(),
            log_gamma: 0.0,
        }
        .output(self.name(), batch, partition, None)
    }
}
