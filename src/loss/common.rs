//! Pieces every preference loss shares: scores, masked log-sum-exp, averaging, metrics.

use tch::{Kind, Tensor};

use crate::batch::PreferenceBatch;
use crate::error::{RefaError, Result};
pub(crate) use crate::loss::output::ContrastStats;
use crate::loss::output::{ContrastInputs, LossMetrics, LossOutput};
use crate::partition::Partition;

/// Per-response scores `[P, K]`: `logp_sum` (minus `ref_logp_sum` when `reference`), divided
/// by `lengths` when `length_normalize`. Masked slots score 0.
pub(crate) fn scores(
    loss: &'static str,
    batch: &PreferenceBatch,
    length_normalize: bool,
    reference: bool,
) -> Result<Tensor> {
    let scores = if reference {
        let reference = batch.ref_logp_sum().ok_or(RefaError::MissingInput {
            loss,
            input: "ref_logp_sum",
            method: "with_reference",
        })?;
        batch.logp_sum() - reference
    } else {
        batch.logp_sum()
    };
    Ok(if length_normalize {
        scores / batch.lengths()
    } else {
        scores
    })
}

/// `log Σ_{k ∈ set} exp(x_k)` over each row of `x` `[P, K]`.
///
/// Slots outside `set` get `-inf` and so exactly zero gradient. A row whose set is empty
/// (only possible for a skipped prompt) is summed over all its slots instead: the result
/// is discarded, but it must stay finite, or its zero gradient would turn into NaN.
pub(crate) fn masked_logsumexp(x: &Tensor, set: &Tensor) -> Tensor {
    let nonempty = set.any_dim(1, true);
    let set = set.logical_or(&nonempty.logical_not());
    x.masked_fill(&set.logical_not(), f64::NEG_INFINITY)
        .logsumexp(1, false)
}

/// `log(1 + exp(x))`, exact in f64 across the whole range and with the exact derivative
/// `σ(x)` everywhere (libtorch's `softplus` switches to `x` above 20, an error of 2e-9).
pub(crate) fn log1p_exp(x: &Tensor) -> Tensor {
    x.zeros_like().logaddexp(x)
}

/// Zeroes the rows of skipped prompts (their gradient is then exactly zero) and averages
/// the rest: returns `(loss, per_prompt)`.
pub(crate) fn average_over_active(per_prompt: &Tensor, partition: &Partition) -> (Tensor, Tensor) {
    let per_prompt = per_prompt.where_scalarother(partition.active(), 0.0);
    let kind = per_prompt.kind();
    let used = partition.num_active().clamp_min(1.0).to_kind(kind);
    (per_prompt.sum(kind) / used, per_prompt)
}

/// Builds the [`LossOutput`], with metrics, and refuses a non-finite loss when the batch's
/// value checks are on.
pub(crate) fn finish(
    loss_name: &'static str,
    batch: &PreferenceBatch,
    partition: &Partition,
    (loss, per_prompt): (Tensor, Tensor),
    stats: ContrastStats<'_>,
) -> Result<LossOutput> {
    check_finite(loss_name, batch, &loss)?;
    let metrics = LossMetrics::new(
        &loss,
        partition.num_active(),
        batch.num_prompts(),
        batch.eos(),
    )
    .with_contrast(ContrastInputs::new(stats, partition));
    Ok(LossOutput {
        loss,
        per_prompt,
        metrics,
    })
}

/// Errors when value checks are on and `loss` is not finite (one host synchronization).
pub(crate) fn check_finite(
    loss_name: &'static str,
    batch: &PreferenceBatch,
    loss: &Tensor,
) -> Result<()> {
    if batch.checks_values() {
        let value = loss.detach().to_kind(Kind::Double).double_value(&[]);
        if !value.is_finite() {
            return Err(RefaError::NonFiniteLoss {
                loss: loss_name,
                value,
            });
        }
    }
    Ok(())
}
