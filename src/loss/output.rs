//! [`LossOutput`] and the metrics a trainer logs.

use tch::{Device, Kind, Tensor};

use crate::error::Result;

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
#[derive(Debug)]
pub(crate) struct SumCount {
    pub sum: Tensor,
    pub count: Tensor,
}

impl SumCount {
    /// Sum and count of `values` where `select` (bool, same shape) is true.
    pub fn of(values: &Tensor, select: &Tensor) -> Self {
        let values = values.detach().to_kind(Kind::Double);
        SumCount {
            sum: values.where_scalarother(select, 0.0).sum(Kind::Double),
            count: select.sum(Kind::Double),
        }
    }

    fn empty(device: Device) -> Self {
        let zero = Tensor::zeros([], (Kind::Double, device));
        SumCount { sum: zero.shallow_clone(), count: zero }
    }
}

/// The statistics of one loss evaluation, kept on the device as detached f64 scalars so that
/// computing them never waits for the GPU. Call [`summary`](Self::summary) to read them.
#[derive(Debug)]
pub struct LossMetrics {
    pub(crate) loss: Tensor,
    pub(crate) prompts_used: Tensor,
    pub(crate) prompts_total: i64,
    pub(crate) positive_score: SumCount,
    pub(crate) negative_score: SumCount,
    pub(crate) positive_mass: SumCount,
    pub(crate) correct: SumCount,
    pub(crate) eos_probability: SumCount,
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
    /// Metrics of a computation that has no notion of positives and negatives.
    pub(crate) fn bare(loss: &Tensor, prompts_used: Tensor, prompts_total: i64) -> Self {
        let device = loss.device();
        LossMetrics {
            loss: loss.detach().to_kind(Kind::Double),
            prompts_used,
            prompts_total,
            positive_score: SumCount::empty(device),
            negative_score: SumCount::empty(device),
            positive_mass: SumCount::empty(device),
            correct: SumCount::empty(device),
            eos_probability: SumCount::empty(device),
            regularizer: None,
        }
    }

    /// Copies every statistic to the host at once and forms the means.
    pub fn summary(&self) -> Result<MetricsSummary> {
        let mut parts = vec![&self.loss, &self.prompts_used];
        for stat in self.sum_counts() {
            parts.extend([&stat.sum, &stat.count]);
        }
        if let Some(regularizer) = &self.regularizer {
            parts.push(regularizer);
        }
        let parts: Vec<Tensor> = parts.into_iter().map(|t| t.to_kind(Kind::Double)).collect();
        let values = Vec::<f64>::try_from(&Tensor::stack(&parts, 0).to_device(Device::Cpu))?;
        let mean = |i: usize| (values[i + 1] > 0.0).then(|| values[i] / values[i + 1]);
        let used = values[1].round() as u64;
        let (score_positive, score_negative) = (mean(2), mean(4));
        Ok(MetricsSummary {
            loss: values[0],
            prompts_used: used,
            prompts_skipped: (self.prompts_total as u64).saturating_sub(used),
            score_positive,
            score_negative,
            margin: score_positive.zip(score_negative).map(|(p, n)| p - n),
            positive_mass: mean(6),
            accuracy: mean(8),
            eos_probability: mean(10),
            regularizer: self.regularizer.as_ref().map(|_| values[12]),
        })
    }

    fn sum_counts(&self) -> [&SumCount; 5] {
        [
            &self.positive_score,
            &self.negative_score,
            &self.positive_mass,
            &self.correct,
            &self.eos_probability,
        ]
    }
}
