//! The form five losses share: a positive set contrasted with a γ-weighted negative set.
//!
//! ```text
//! L = −log( P+ / (P+ + γ·P−) ) = log(1 + γ·P−/P+),   P± = Σ_{y ∈ Y±} exp(u_y)
//!   = log1p_exp( ln γ + logsumexp_{Y−}(u) − logsumexp_{Y+}(u) )
//! ```
//!
//! REFA-dynamic (`Y+` vs `Y−`), REFA-1-vs-all (best vs the rest), SimPO and DPO (best vs
//! worst, `ln γ` = margin resp. 0) and MPO (`Y+` vs `Y−`, γ = 1) differ only in the sets,
//! the logits `u` and `ln γ`. Writing the loss as a softplus of a log-sum-exp difference keeps
//! it exact when `γP−/P+` is tiny and finite for any score magnitude.

use tch::Tensor;

use crate::batch::PreferenceBatch;
use crate::error::Result;
use crate::loss::common::{
    average_over_active, finish, log1p_exp, masked_logsumexp, scores, ContrastStats,
};
use crate::loss::LossOutput;
use crate::partition::{DeviationMode, Partition};
use crate::validate::Hyperparameters;

/// One contrast: logits, the two sets and the log of the negatives' weight.
pub(crate) struct SetContrast<'a> {
    /// `[P, K]` scores the metrics report (before β and the deviation weights).
    pub scores: &'a Tensor,
    /// `[P, K]` logits `u`.
    pub logits: &'a Tensor,
    /// `[P, K]` bool positive set.
    pub positive: &'a Tensor,
    /// `[P, K]` bool negative set.
    pub negative: &'a Tensor,
    /// `ln γ` (SimPO: the margin γ_m; DPO and MPO: 0).
    pub log_gamma: f64,
}

impl SetContrast<'_> {
    /// `[P]` loss of every prompt, skipped ones included (their value is discarded).
    fn per_prompt(&self) -> Tensor {
        let log_ratio = masked_logsumexp(self.logits, self.negative)
            - masked_logsumexp(self.logits, self.positive);
        log1p_exp(&(log_ratio + self.log_gamma))
    }

    /// The loss averaged over active prompts, plus `extra` (`[P]`, e.g. SimPO's SFT term)
    /// added to each active prompt's loss.
    pub fn output(
        &self,
        loss_name: &'static str,
        batch: &PreferenceBatch,
        partition: &Partition,
        extra: Option<Tensor>,
    ) -> Result<LossOutput> {
        let contrast = self.per_prompt();
        let positive_mass = (-&contrast).exp();
        let per_prompt = match extra {
            Some(extra) => contrast + extra,
            None => contrast,
        };
        let stats = ContrastStats {
            scores: self.scores,
            positive: self.positive,
            negative: self.negative,
            positive_mass: &positive_mass,
        };
        finish(
            loss_name,
            batch,
            partition,
            average_over_active(&per_prompt, partition),
            stats,
        )
    }
}

/// The hyperparameters REFA-dynamic and REFA-1-vs-all share, and the logits they define
/// (the two losses keep them as flat public fields; this is their one reading).
pub(crate) struct RefaLogits {
    pub beta: f64,
    pub gamma: f64,
    pub alpha: f64,
    pub power: f64,
    pub deviation: DeviationMode,
    pub length_normalize: bool,
}

impl RefaLogits {
    /// β > 0, γ > 0, α >= 0, p > 0, all finite.
    pub fn validate(&self, loss: &'static str) -> Result<()> {
        Hyperparameters::of(loss)
            .positive("beta", self.beta)?
            .positive("gamma", self.gamma)?
            .non_negative("alpha", self.alpha)?
            .positive("power", self.power)?;
        Ok(())
    }

    /// `(s, u)`: the `[P, K]` scores and the logits `u = β·s + α·d`.
    pub fn scores_and_logits(
        &self,
        loss: &'static str,
        batch: &PreferenceBatch,
        partition: &Partition,
    ) -> Result<(Tensor, Tensor)> {
        let scores = scores(loss, batch, self.length_normalize, false)?;
        let deviations = partition.deviations(self.power, self.deviation, batch.kind());
        let logits = weighted_logits(self.beta, &scores, self.alpha, &deviations);
        Ok((scores, logits))
    }
}

/// `RefaLogits::from(&loss)` for the REFA losses, whose fields are the same.
macro_rules! refa_logits_from {
    ($($loss:ty),+) => {$(
        impl From<&$loss> for RefaLogits {
            fn from(loss: &$loss) -> Self {
                RefaLogits {
                    beta: loss.beta,
                    gamma: loss.gamma,
                    alpha: loss.alpha,
                    power: loss.power,
                    deviation: loss.deviation,
                    length_normalize: loss.length_normalize,
                }
            }
        }
    )+};
}

refa_logits_from!(crate::loss::RefaDynamic, crate::loss::RefaOneVsAll);

/// `u = β·s + α·d`: the logit of each response. The paper's weight `w = exp(α·d)` multiplies
/// `exp(β·s)`, so it adds `α·d` in log space (spec §2, DECIDED additive form).
pub(crate) fn weighted_logits(
    beta: f64,
    scores: &Tensor,
    alpha: f64,
    deviations: &Tensor,
) -> Tensor {
    scores * beta + deviations * alpha
}
