//! The one call a trainer makes per batch: chunked scoring, the loss, the backward pass.

use tch::Tensor;

use crate::error::Result;
use crate::loss::{LossOutput, PreferenceLoss};
use crate::scoring::{ChunkedScorer, ScoringConfig};

/// What the loss needs besides the model's outputs, for `P` prompts of `K` slots
/// (sequence `n` of the model's batch is prompt `n / K`, slot `n % K`).
#[derive(Debug)]
pub struct PreferenceTargets<'a> {
    /// `[P, K]` rewards.
    pub rewards: &'a Tensor,
    /// `[P, K]` bool: the slot holds a real response (default: every slot with tokens).
    pub slot_mask: Option<&'a Tensor>,
    /// `[P, K]` reference-model `logp_sum`, for losses that need one.
    pub ref_logp_sum: Option<&'a Tensor>,
    /// Factor on the loss before back-propagation, e.g. `1 / accumulation_steps`. Default 1.
    pub loss_scale: f64,
    /// Run the batch's value checks (see [`PreferenceBatch::with_value_checks`]); each costs
    /// a host synchronization. A trainer that checks the gradient norm once per optimizer
    /// step turns them off. Default true.
    ///
    /// [`PreferenceBatch::with_value_checks`]: crate::PreferenceBatch::with_value_checks
    pub value_checks: bool,
}

impl<'a> PreferenceTargets<'a> {
    /// Rewards only: every slot with response tokens is valid, no reference, scale 1.
    pub fn new(rewards: &'a Tensor) -> Self {
        PreferenceTargets {
            rewards,
            slot_mask: None,
            ref_logp_sum: None,
            loss_scale: 1.0,
            value_checks: true,
        }
    }
}

/// Scores the responses from `hidden [N, T, H]` and `lm_head_weight [V, H]` in chunks,
/// computes `loss`, and back-propagates `loss_scale · loss` into `hidden` (hence the model)
/// and `lm_head_weight`, never holding more than `config.chunk_size × V` logits.
///
/// Returns the loss's output; its `loss` is already back-propagated (log it, do not call
/// `backward()` on it again). Gradients accumulate in the model's parameters as with any
/// `backward()`, so gradient accumulation over micro-batches works unchanged.
///
/// ```no_run
/// # use refa_loss::{scoring::{preference_loss_backward, PreferenceTargets, ScoringConfig}, RefaDynamic};
/// # fn step(hidden: &tch::Tensor, head: &tch::Tensor, labels: &tch::Tensor, rewards: &tch::Tensor) -> refa_loss::Result<()> {
/// let output = preference_loss_backward(
///     &RefaDynamic::default(),
///     hidden,            // [P·K, T, H] from the model, in its graph
///     head,              // [V, H] LM head weight
///     labels,            // [P·K, T], −100 outside the responses
///     &ScoringConfig::new(2),
///     &PreferenceTargets::new(rewards),
/// )?;
/// println!("loss {}", output.metrics.summary()?.loss);
/// // optimizer.step() ...
/// # Ok(()) }
/// ```
pub fn preference_loss_backward(
    loss: &dyn PreferenceLoss,
    hidden: &Tensor,
    lm_head_weight: &Tensor,
    labels: &Tensor,
    config: &ScoringConfig,
    targets: &PreferenceTargets<'_>,
) -> Result<LossOutput> {
    let mut scorer = ChunkedScorer::new(hidden, lm_head_weight, labels, config)?;
    let scores = scorer.forward();
    let mut batch = scores
        .to_batch(targets.rewards, targets.slot_mask)?
        .with_value_checks(targets.value_checks);
    if let Some(reference) = targets.ref_logp_sum {
        batch = batch.with_reference(reference)?;
    }
    let output = loss.compute(&batch)?;
    (&output.loss * targets.loss_scale).f_backward()?;
    scorer.backward(&scores)?;
    Ok(output)
}
