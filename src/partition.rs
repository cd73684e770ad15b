//! The split of each prompt's responses into positives and negatives (spec §2).

use tch::{Kind, Tensor};

use crate::error::Result;
use crate::reduce::{amax_or_zero, first_argmax, first_argmin};

/// Rewards closer to the prompt's mean than this fraction of the prompt's largest absolute
/// reward count as equal to the mean. Summing K equal f64 rewards and dividing by K can miss
/// the exact value by a few ulps; without a tolerance, equal rewards would split into a
/// spurious positive and negative. Real reward gaps are many orders of magnitude larger.
pub const RELATIVE_TIE_TOLERANCE: f64 = 1e-9;

/// How a response's reward deviation `r − r̄` enters its weight `exp(α·d)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviationMode {
    /// `d = |r − r̄|^p`: responses far from the mean on either side weigh more (SWEPO/MPO
    /// "absolute deviation"; for p = 2 the paper's literal `(r − r̄)²`). Default.
    #[default]
    Absolute,
    /// `d = sign(r − r̄)·|r − r̄|^p`: below-mean responses weigh less than 1 (the paper's v4
    /// W-REFA `α(r − r̄)` for p = 1).
    Signed,
}

/// Per-prompt partition of the valid slots, computed once per batch in f64.
///
/// With `r̄` the mean reward over a prompt's valid slots: positives `Y+ = {r > r̄}`,
/// negatives `Y− = {r <= r̄}` (ties with the mean are negative, see
/// [`RELATIVE_TIE_TOLERANCE`]). A prompt is *active* when it has at least two valid
/// responses and a non-empty `Y+`; every other prompt is skipped by every preference loss.
#[derive(Debug)]
pub struct Partition {
    valid: Tensor,
    positive: Tensor,
    negative: Tensor,
    active: Tensor,
    best: Tensor,
    worst: Tensor,
    centered: Tensor,
}

impl Partition {
    /// `rewards` is `[P, K]` f64, `mask` `[P, K]` bool.
    pub(crate) fn new(rewards: &Tensor, mask: &Tensor) -> Result<Self> {
        let rewards = rewards.where_scalarother(mask, 0.0);
        let count = mask.sum_dim_intlist(1, true, Kind::Double);
        let mean = rewards.sum_dim_intlist(1, true, Kind::Double) / count.clamp_min(1.0);
        let centered = (&rewards - mean).where_scalarother(mask, 0.0);
        let scale = amax_or_zero(&rewards.abs(), &[1], true);
        let positive = centered
            .gt_tensor(&(scale * RELATIVE_TIE_TOLERANCE))
            .logical_and(mask);
        let negative = mask.logical_and(&positive.logical_not());
        let active = count
            .squeeze_dim(1)
            .ge(2.0)
            .logical_and(&positive.any_dim(1, false));
        // Lowest slot index wins ties: argmax and argmin return the first extreme value.
        let best = first_argmax(&rewards.where_scalarother(mask, f64::NEG_INFINITY));
        let worst = first_argmin(&rewards.where_scalarother(mask, f64::INFINITY));
        Ok(Partition {
            valid: mask.shallow_clone(),
            positive,
            negative,
            active,
            best,
            worst,
            centered,
        })
    }

    /// `[P, K]` bool: the slot holds a real response.
    pub fn valid(&self) -> &Tensor {
        &self.valid
    }

    /// `[P, K]` bool: valid and above the prompt's mean reward (`Y+`).
    pub fn positive(&self) -> &Tensor {
        &self.positive
    }

    /// `[P, K]` bool: valid and at or below the prompt's mean reward (`Y−`).
    pub fn negative(&self) -> &Tensor {
        &self.negative
    }

    /// `[P]` bool: the prompt carries a preference (≥ 2 valid responses, `Y+` non-empty).
    pub fn active(&self) -> &Tensor {
        &self.active
    }

    /// `[P]` i64: the slot of the highest reward (lowest index among ties).
    pub fn best(&self) -> &Tensor {
        &self.best
    }

    /// `[P]` i64: the slot of the lowest reward (lowest index among ties).
    pub fn worst(&self) -> &Tensor {
        &self.worst
    }

    /// `[P, K]` f64: `r − r̄`, 0 in masked slots.
    pub fn centered_rewards(&self) -> &Tensor {
        &self.centered
    }

    /// `[P, K]` bool: only the best slot of each prompt.
    pub fn best_one_hot(&self) -> Tensor {
        self.one_hot(&self.best)
    }

    /// `[P, K]` bool: only the worst slot of each prompt.
    pub fn worst_one_hot(&self) -> Tensor {
        self.one_hot(&self.worst)
    }

    fn one_hot(&self, index: &Tensor) -> Tensor {
        let slots = self.valid.size()[1];
        let positions = Tensor::arange(slots, (Kind::Int64, self.valid.device()));
        positions
            .unsqueeze(0)
            .eq_tensor(&index.unsqueeze(1))
            .logical_and(&self.valid)
    }

    /// `[P, K]` deviations `d` in `kind` (0 in masked slots):
    /// `|r − r̄|^p` (`Absolute`) or `sign(r − r̄)·|r − r̄|^p` (`Signed`).
    pub fn deviations(&self, power: f64, mode: DeviationMode, kind: Kind) -> Tensor {
        let magnitude = self.centered.abs().pow_tensor_scalar(power);
        let d = match mode {
            DeviationMode::Absolute => magnitude,
            DeviationMode::Signed => magnitude * self.centered.sign(),
        };
        d.to_kind(kind)
    }

    /// Number of active prompts, as a scalar f64 tensor (no host synchronization).
    pub fn num_active(&self) -> Tensor {
        self.active.sum(Kind::Double)
    }
}
