//! SimPO (Meng et al. 2024), the strongest reference-free pairwise baseline.

use crate::batch::PreferenceBatch;
use crate::error::Result;
use crate::loss::common::scores;
use crate::loss::contrast::SetContrast;
use crate::loss::{LossOutput, PreferenceLoss};
use crate::validate::Hyperparameters;

/// SimPO on the best and the worst response of each prompt.
///
/// ```text
/// w = argmax_i r_i,  l = argmin_i r_i      (ties: lowest slot index)
/// s = logp_sum / lengths
/// L = −log σ( β·(s_w − s_l) − γ_m )  −  λ_sft·s_w
/// ```
///
/// For data that comes as explicit (chosen, rejected) pairs, pass `K = 2` with rewards
/// `(1, 0)`: the best and the worst response are then exactly the pair.
///
/// The optional SFT term (`sft_weight`) is the SimPO authors' `sft_weight` option: the
/// negative mean token log-probability of the chosen response. At K = 2 and α = 0,
/// [`RefaDynamic`](crate::RefaDynamic) equals SimPO with `γ_m = ln γ`.
///
/// # Defaults (SimPO authors' Mistral-7B base config)
/// β = 2.0, γ_m = 1.6 (γ/β = 0.8), no SFT term, length-normalized.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimPo {
    /// Inverse temperature β, > 0.
    pub beta: f64,
    /// Target reward margin γ_m (in logit units), finite.
    pub margin: f64,
    /// Weight of the SFT term on the chosen response, >= 0.
    pub sft_weight: f64,
    /// Score by mean token log-probability (`true`, SimPO) or by the sum.
    pub length_normalize: bool,
}

impl Default for SimPo {
    fn default() -> Self {
        SimPo {
            beta: 2.0,
            margin: 1.6,
            sft_weight: 0.0,
            length_normalize: true,
        }
    }
}

impl PreferenceLoss for SimPo {
    fn name(&self) -> &'static str {
        "SimPo"
    }

    fn validate(&self) -> Result<()> {
        Hyperparameters::of(self.name())
            .positive("beta", self.beta)?
            .finite("margin", self.margin)?
            .non_negative("sft_weight", self.sft_weight)?;
        Ok(())
    }

    fn compute(&self, batch: &PreferenceBatch) -> Result<LossOutput> {
        self.validate()?;
        let partition = batch.partition()?;
        let scores = scores(self.name(), batch, self.length_normalize, false)?;
        let logits = &scores * self.beta;
        let chosen = partition.best_one_hot();
        let sft = (self.sft_weight > 0.0).then(|| {
            let chosen_score = scores
                .where_scalarother(&chosen, 0.0)
                .sum_dim_intlist(1, false, None);
            chosen_score * (-self.sft_weight)
        });
        SetContrast {
            scores: &scores,
            logits: &logits,
            positive: &chosen,
            negative: &partition.worst_one_hot(),
            log_gamma: self.margin,
        }
        .output(self.name(), batch, partition, sft)
    }
}
