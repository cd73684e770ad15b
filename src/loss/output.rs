//! [`LossOutput`] and the metrics a trainer logs.

use tch::{Device, Kind, Tensor};

use crate::error::Result;
use crate::reduce::first_argmax;

/// What every loss returns.
#[derive(Debug)]
pub struct LossOutput {
    /// Scalar loss in the autograd graph of the batch's inputs, averaged over the prompts the
    /// loss uses (for a regularized loss: the loss plus the regularizer, each with its own
    /// average). Zero, and still differentiable, when every prompt is skipped.
    pub loss: Tensor,
    /// `[P]` loss of each prompt (0 for a skipped prompt), in the autograd graph.
    pub per_prompt: Tensor,
    /// Detached statistics; reading them costs one device-to-host copy in all.
    pub metrics: LossMetrics,
}

/// A sum and a count, so that means over batches combine exactly.
struct SumCount {
    sum: Tensor,
    count: Tensor,
}

impl SumCount {
    /// Sum and count of `values` where `select` (bool, same shape) is true.
    fn of(values: &Tensor, select: &Tensor) -> Self {
        let values = values.to_kind(Kind::Double);
        SumCount {
            sum: values.where_scalarother(select, 0.0).sum(Kind::Double),
            count: select.sum(Kind::Double),
        }
    }

    fn empty(device: Device) -> Self {
        let zero = Tensor::zeros([], (Kind::Double, device));
        SumCount {
            sum: zero.shallow_clone(),
            count: zero,
        }
    }
}

/// What a contrast loss tells its metrics; the partition adds the rest (see
/// [`ContrastInputs::new`]).
pub(crate) struct ContrastStats<'a> {
    /// `[P, K]` scores the loss compares.
    pub scores: &'a Tensor,
    /// `[P, K]` bool: the positives the loss favours.
    pub positive: &'a Tensor,
    /// `[P, K]` bool: the negatives it penalizes.
    pub negative: &'a Tensor,
    /// `[P]` probability mass the loss puts on the positives.
    pub positive_mass: &'a Tensor,
}

/// What the contrast statistics are computed from, kept detached until they are read.
#[derive(Debug)]
pub(crate) struct ContrastInputs {
    /// `[P, K]` scores the loss compares.
    pub scores: Tensor,
    /// `[P, K]` bool: the positives the loss favours.
    pub positive: Tensor,
    /// `[P, K]` bool: the negatives it penalizes.
    pub negative: Tensor,
    /// `[P]` probability mass the loss puts on the positives.
    pub positive_mass: Tensor,
    /// `[P]` bool: prompts the loss used.
    pub active: Tensor,
    /// `[P, K]` bool: valid slots.
    pub valid: Tensor,
    /// `[P]` i64: highest-reward slot.
    pub best: Tensor,
}

impl ContrastInputs {
    /// A loss's statistics, and what the partition adds: used prompts, competing slots, the
    /// best slot.
    pub(crate) fn new(stats: ContrastStats<'_>, partition: &crate::partition::Partition) -> Self {
        ContrastInputs {
            scores: stats.scores.shallow_clone(),
            positive: stats.positive.shallow_clone(),
            negative: stats.negative.shallow_clone(),
            positive_mass: stats.positive_mass.shallow_clone(),
            active: partition.active().shallow_clone(),
            // With explicit sets only Y+ ∪ Y− compete for the top score.
            valid: partition.participants(),
            best: partition.best().shallow_clone(),
        }
    }
}

/// The statistics of one loss evaluation. Producing them costs nothing: they hold detached
/// views of the loss's intermediate tensors, and the reductions run only when
/// [`summary`](Self::summary) reads them, with a single device-to-host copy.
#[derive(Debug)]
pub struct LossMetrics {
    pub(crate) loss: Tensor,
    pub(crate) prompts_used: Tensor,
    pub(crate) prompts_total: i64,
    pub(crate) contrast: Option<ContrastInputs>,
    pub(crate) eos: Option<(Tensor, Tensor)>,
    pub(crate) regularizer: Option<Tensor>,
}

/// Plain numbers read from [`LossMetrics`]. A mean over an empty set is `None`.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsSummary {
    /// The loss value.
    pub loss: f64,
    /// Prompts that contributed to the loss.
    pub prompts_used: u64,
    /// Prompts skipped: no preference (all rewards equal) or fewer than two responses. For an
    /// `EosRegularizer` alone: prompts without any response that ends with EOS.
    pub prompts_skipped: u64,
    /// Mean score of the loss's positive responses (`Y+`, or the chosen one for pairwise and
    /// one-vs-all losses) over used prompts. The score is the length-normalized or summed
    /// log-probability, minus the reference's where the loss uses one.
    pub score_positive: Option<f64>,
    /// Mean score of the loss's negative responses over used prompts.
    pub score_negative: Option<f64>,
    /// `score_positive − score_negative`.
    pub margin: Option<f64>,
    /// Mean over used prompts of the probability mass the loss puts on the positives, e.g.
    /// `P+/(P+ + γP−)` for REFA-dynamic (`exp(−loss)` per prompt).
    pub positive_mass: Option<f64>,
    /// Fraction of used prompts whose highest-reward response also has the highest score.
    pub accuracy: Option<f64>,
    /// Mean `P(EOS)` where valid responses end with EOS, when the batch has EOS inputs.
    pub eos_probability: Option<f64>,
    /// The regularizer's share of `loss`, for a regularized loss.
    pub regularizer: Option<f64>,
}

impl LossMetrics {
    /// The metrics of a loss defined outside the crate: its value and how many of the
    /// batch's prompts it used (`summary()` reports the rest as skipped; the contrast
    /// statistics are `None`).
    pub fn for_loss(loss: &Tensor, prompts_used: i64, prompts_total: i64) -> Self {
        let used = Tensor::from(prompts_used as f64).to_device(loss.device());
        Self::new(loss, used, prompts_total, None)
    }

    /// Metrics of `loss` over `prompts_used` of `prompts_total` prompts; `eos` is
    /// `(eos_logp, valid & eos_mask)` when the batch has EOS inputs.
    pub(crate) fn new(
        loss: &Tensor,
        prompts_used: Tensor,
        prompts_total: i64,
        eos: Option<(Tensor, Tensor)>,
    ) -> Self {
        LossMetrics {
            loss: loss.detach().to_kind(Kind::Double),
            prompts_used,
            prompts_total,
            contrast: None,
            eos: eos.map(|(logp, valid)| (logp.detach(), valid)),
            regularizer: None,
        }
    }

    /// Adds the statistics of a loss that contrasts positives with negatives.
    pub(crate) fn with_contrast(mut self, inputs: ContrastInputs) -> Self {
        self.contrast = Some(ContrastInputs {
            scores: inputs.scores.detach(),
            positive_mass: inputs.positive_mass.detach(),
            ..inputs
        });
        self
    }

    /// Reduces every statistic on the device, copies them to the host at once and forms
    /// the means.
    pub fn summary(&self) -> Result<MetricsSummary> {
        let device = self.loss.device();
        let contrast = self.contrast_statistics();
        let eos = match &self.eos {
            Some((logp, valid)) => SumCount::of(&logp.exp(), valid),
            None => SumCount::empty(device),
        };
        let regularizer = self.regularizer.as_ref().map_or_else(
            || Tensor::zeros([], (Kind::Double, device)),
            |r| r.to_kind(Kind::Double),
        );
        let mut parts = vec![
            self.loss.shallow_clone(),
            self.prompts_used.to_kind(Kind::Double),
            regularizer,
        ];
        for stat in [
            &contrast.score_positive,
            &contrast.score_negative,
            &contrast.positive_mass,
            &contrast.accuracy,
            &eos,
        ] {
            parts.extend([stat.sum.shallow_clone(), stat.count.shallow_clone()]);
        }
        // Read back in the order pushed: one copy, no index arithmetic.
        let host = Vec::<f64>::try_from(&Tensor::stack(&parts, 0).to_device(Device::Cpu))?;
        let mut values = host.into_iter();
        let mut next = || values.next().unwrap_or(f64::NAN);
        let (loss, used, regularizer) = (next(), next().round() as u64, next());
        let mut mean = || {
            let (sum, count) = (next(), next());
            (count > 0.0).then(|| sum / count)
        };
        let (score_positive, score_negative) = (mean(), mean());
        let (positive_mass, accuracy, eos_probability) = (mean(), mean(), mean());
        Ok(MetricsSummary {
            loss,
            prompts_used: used,
            prompts_skipped: (self.prompts_total as u64).saturating_sub(used),
            score_positive,
            score_negative,
            margin: score_positive.zip(score_negative).map(|(p, n)| p - n),
            positive_mass,
            accuracy,
            eos_probability,
            regularizer: self.regularizer.as_ref().map(|_| regularizer),
        })
    }

    /// The contrast statistics as sums and counts (empty without a contrast).
    fn contrast_statistics(&self) -> ContrastStatistics {
        let device = self.loss.device();
        let Some(c) = &self.contrast else {
            return ContrastStatistics {
                score_positive: SumCount::empty(device),
                score_negative: SumCount::empty(device),
                positive_mass: SumCount::empty(device),
                accuracy: SumCount::empty(device),
            };
        };
        let active_slots = c.active.unsqueeze(1);
        let top = first_argmax(
            &c.scores
                .masked_fill(&c.valid.logical_not(), f64::NEG_INFINITY),
        );
        ContrastStatistics {
            score_positive: SumCount::of(&c.scores, &c.positive.logical_and(&active_slots)),
            score_negative: SumCount::of(&c.scores, &c.negative.logical_and(&active_slots)),
            positive_mass: SumCount::of(&c.positive_mass, &c.active),
            accuracy: SumCount::of(&top.eq_tensor(&c.best), &c.active),
        }
    }
}

/// The contrast statistics of [`LossMetrics::summary`], by name.
struct ContrastStatistics {
    score_positive: SumCount,
    score_negative: SumCount,
    positive_mass: SumCount,
    accuracy: SumCount,
}
