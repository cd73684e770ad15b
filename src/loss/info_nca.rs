//! InfoNCA (Chen et al. 2024) and its reference-free REFA forms.

use tch::{Kind, Tensor};

use crate::batch::PreferenceBatch;
use crate::error::Result;
use crate::loss::common::{average_over_active, finish, masked_logsumexp, scores, ContrastStats};
use crate::loss::{LossOutput, PreferenceLoss};
use crate::validate::Hyperparameters;

/// Which terms of the InfoNCA cross-entropy are kept (paper Table 3; DECIDED interpretation,
/// the paper never defines them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InfoNcaVariant {
    /// `L = −Σ_i q_i·log softmax(z)_i` over every valid response (InfoNCA proper). Default.
    #[default]
    Full,
    /// The same sum restricted to `i ∈ Y+` ("Refa-InfoNCA (dynamic)", Appendix C fix 1):
    /// below-mean responses are no longer pulled up by their share of `q`.
    PositivesOnly,
    /// `L = −log softmax(z)_{i*}` for the best response `i*` ("Refa-InfoNCA (1-vs-all)",
    /// Appendix C fix 2).
    OneVsAll,
}

/// InfoNCA: the model's distribution over a prompt's responses is fit to the reward softmax.
///
/// ```text
/// q_i = softmax_i(r_i / τ)                                  reward target
/// z_i = β·(logp_sum_i − ref_logp_sum_i)                     with a reference (summed)
/// z_i = β·s_i,  s_i = logp_sum_i / lengths_i                 reference-free (Refa-InfoNCA)
/// L   = −Σ_i q_i·log softmax(z)_i                           (see InfoNcaVariant)
/// ```
///
/// `∂L/∂z_i = softmax(z)_i − q_i`: the loss is minimal (the entropy of `q`) exactly when the
/// model's softmax equals the target. Prompts without a preference are skipped, as in every
/// loss of the crate. With explicit sets ([`PreferenceBatch::with_sets`]) both softmaxes run
/// over `Y+ ∪ Y−` and `i*` is the best positive.
///
/// # Defaults
/// Reference-free (paper v4 Table 4): β = 3.0 (v1: 2.0–2.5), τ = 1.0, length-normalized,
/// `Full`. With a reference, [`InfoNca::original`]: β = 0.01, τ = 1e-4 on 0–10 scores (the
/// InfoNCA authors' repository), summed log-ratios.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InfoNca {
    /// Inverse temperature β on the logits, > 0.
    pub beta: f64,
    /// Reward temperature τ of the target softmax, > 0.
    pub tau: f64,
    /// Which terms of the cross-entropy are kept.
    pub variant: InfoNcaVariant,
    /// Score against `ref_logp_sum` (original InfoNCA) instead of reference-free.
    pub use_reference: bool,
    /// Divide the (log-ratio) scores by the response lengths.
    pub length_normalize: bool,
}

impl Default for InfoNca {
    fn default() -> Self {
        InfoNca {
            beta: 3.0,
            tau: 1.0,
            variant: InfoNcaVariant::Full,
            use_reference: false,
            length_normalize: true,
        }
    }
}

impl InfoNca {
    /// The original InfoNCA with a reference model: β = 0.01, τ = 1e-4, summed log-ratios.
    pub fn original() -> Self {
        InfoNca {
            beta: 0.01,
            tau: 1e-4,
            variant: InfoNcaVariant::Full,
            use_reference: true,
            length_normalize: false,
        }
    }
}

impl PreferenceLoss for InfoNca {
    fn name(&self) -> &'static str {
        "InfoNca"
    }

    fn needs_reference(&self) -> bool {
        self.use_reference
    }

    fn validate(&self) -> Result<()> {
        Hyperparameters::of(self.name())
            .positive("beta", self.beta)?
            .positive("tau", self.tau)?;
        Ok(())
    }

    fn compute(&self, batch: &PreferenceBatch) -> Result<LossOutput> {
        self.validate()?;
        let partition = batch.partition()?;
        // With explicit sets only Y+ ∪ Y− take part; in the mean split that is every valid slot.
        let valid = &partition.participants();
        let scores = scores(
            self.name(),
            batch,
            self.length_normalize,
            self.use_reference,
        )?;
        let logits = &scores * self.beta;
        let log_model = &logits - masked_logsumexp(&logits, valid).unsqueeze(1);
        let target = reward_target(partition.centered_rewards(), valid, self.tau, batch.kind());
        let best = partition.best_one_hot();
        let rest = valid.logical_and(&best.logical_not());
        let (terms, positive, negative) = match self.variant {
            InfoNcaVariant::Full => (
                &target * &log_model,
                partition.positive(),
                partition.negative(),
            ),
            InfoNcaVariant::PositivesOnly => {
                let kept = (&target * &log_model).where_scalarother(partition.positive(), 0.0);
                (kept, partition.positive(), partition.negative())
            }
            InfoNcaVariant::OneVsAll => (log_model.where_scalarother(&best, 0.0), &best, &rest),
        };
        let per_prompt = -terms
            .where_scalarother(valid, 0.0)
            .sum_dim_intlist(1, false, None);
        let positive_mass = log_model
            .exp()
            .where_scalarother(positive, 0.0)
            .sum_dim_intlist(1, false, None);
        let stats = ContrastStats {
            scores: &scores,
            positive,
            negative,
            positive_mass: &positive_mass,
        };
        finish(
            self.name(),
            batch,
            partition,
            average_over_active(&per_prompt, partition),
            stats,
        )
    }
}

/// `q = softmax(r/τ)` over each prompt's valid slots, 0 elsewhere. Computed from the centered
/// rewards in f64 (the same softmax, and exact for τ as small as 1e-4), then cast.
fn reward_target(centered: &Tensor, valid: &Tensor, tau: f64, kind: Kind) -> Tensor {
    let scaled = centered / tau;
    let log_target = &scaled - masked_logsumexp(&scaled, valid).unsqueeze(1);
    log_target.exp().where_scalarother(valid, 0.0).to_kind(kind)
}
