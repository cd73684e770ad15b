//! The plain scoring path: full logits in, per-sequence values out, differentiable.

use tch::Tensor;

use crate::error::{RefaError, Result};
use crate::scoring::targets::Targets;
use crate::scoring::{score_kind, ScoringConfig, SequenceScores};
use crate::validate;

/// Scores `N` sequences from their logits `[N, T, V]` and labels `[N, T]`.
///
/// ```text
/// logp[n, t]  = log_softmax(logits[n, t])[labels[n, t + 1]]      for response labels
/// logp_sum[n] = Σ_t logp[n, t],   lengths[n] = #response labels
/// eos_logp[n] = log_softmax(logits[n, last(n)])[eos_id]
/// ```
///
/// The `log_softmax` runs in f32 (f64 for f64 logits) over the whole `[N, T − 1, V]` tensor,
/// so memory grows with `N·T·V`: this is the reference the chunked path is tested against,
/// and the simplest path for small vocabularies. Gradients flow into `logits`.
pub fn score_logits(
    logits: &Tensor,
    labels: &Tensor,
    config: &ScoringConfig,
) -> Result<SequenceScores> {
    let shape = logits.size();
    if shape.len() != 3 {
        let expected = "[N, T, V] (sequences × positions × vocabulary)".to_string();
        return Err(RefaError::ShapeMismatch {
            tensor: "logits",
            actual: shape,
            expected,
        });
    }
    validate::float_kind("logits", logits)?;
    validate::same_shape("labels", labels, "logits without V", &shape[..2])?;
    let targets = Targets::new(labels, shape[2], logits.device(), config)?;
    let log_probs = logits
        .narrow(1, 0, shape[1] - 1)
        .to_kind(score_kind(logits.kind()))
        .log_softmax(-1, None);
    let token_logp = log_probs
        .gather(2, &targets.shifted.unsqueeze(-1), false)
        .squeeze_dim(-1);
    let eos_steps = log_probs
        .select(2, config.eos_id)
        .where_scalarother(&targets.valid, 0.0);
    Ok(SequenceScores {
        logp_sum: token_logp
            .where_scalarother(&targets.valid, 0.0)
            .sum_dim_intlist(1, false, None),
        eos_logp: targets.at_last(&eos_steps),
        eos_logp_steps: config.eos_steps.then_some(eos_steps),
        lengths: targets.lengths,
        eos_mask: targets.eos_mask,
        step_mask: targets.valid,
    })
}
