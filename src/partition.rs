//! The split of each prompt's responses into positives and negatives (spec §2).

use tch::{Kind, Tensor};

use crate::error::{RefaError, Result};
use crate::reduce::{amax_or_zero, first_argmax, first_argmin};
use crate::validate;

/// Rewards closer to the prompt's mean than this fraction of the prompt's reward spread
/// (`max r − min r` over its valid slots) count as equal to the mean. Averaging K f64 rewards
/// can miss the exact mean by a few ulps; without a tolerance, nearly equal rewards could
/// split into a spurious positive and negative. Measuring it against the spread (not against
/// `max |r|`) keeps the partition unchanged when a constant is added to all of a prompt's
/// rewards (spec §2), and exactly equal rewards have a spread of exactly 0, so they never split.
pub const RELATIVE_TIE_TOLERANCE: f64 = 1e-9;

/// How a response's reward deviation `r − r̄` enters its weight `exp(α·d)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "model", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "model", serde(rename_all = "kebab-case"))]
#[cfg_attr(feature = "trainer", derive(clap::ValueEnum))]
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
///
/// With explicit sets ([`PreferenceBatch::with_sets`](crate::PreferenceBatch::with_sets)),
/// `Y+` and `Y−` are the caller's; a prompt is active when both are non-empty, slots in
/// neither set take no part in any contrast, the best response is the highest-rewarded
/// positive and the worst the lowest-rewarded negative. Deviations still use the mean over
/// all valid slots.
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
    /// The mean split. `rewards` is `[P, K]` f64, `mask` `[P, K]` bool.
    pub(crate) fn new(rewards: &Tensor, mask: &Tensor) -> Result<Self> {
        let centered = CenteredRewards::new(rewards, mask);
        let positive = centered
            .values
            .gt_tensor(&(&centered.spread * RELATIVE_TIE_TOLERANCE))
            .logical_and(mask);
        let negative = mask.logical_and(&positive.logical_not());
        let active = mask
            .sum_dim_intlist(1, false, Kind::Int64)
            .ge(2)
            .logical_and(&positive.any_dim(1, false));
        Ok(Self::from_sets(
            rewards,
            mask,
            positive,
            negative,
            active,
            centered.values,
        ))
    }

    /// Caller-given sets: `[P, K]` bool, disjoint subsets of `mask` (checked by the batch).
    pub(crate) fn with_sets(
        rewards: &Tensor,
        mask: &Tensor,
        positive: &Tensor,
        negative: &Tensor,
    ) -> Result<Self> {
        let centered = CenteredRewards::new(rewards, mask);
        let (positive, negative) = (positive.logical_and(mask), negative.logical_and(mask));
        let active = positive
            .any_dim(1, false)
            .logical_and(&negative.any_dim(1, false));
        Ok(Self::from_sets(
            rewards,
            mask,
            positive,
            negative,
            active,
            centered.values,
        ))
    }

    fn from_sets(
        rewards: &Tensor,
        mask: &Tensor,
        positive: Tensor,
        negative: Tensor,
        active: Tensor,
        centered: Tensor,
    ) -> Self {
        // Lowest slot index wins ties: argmax and argmin return the first extreme value. In
        // the mean split the best response is always positive and the worst negative, so
        // searching the sets equals searching all valid slots.
        let best = first_argmax(&rewards.where_scalarother(&positive, f64::NEG_INFINITY));
        let worst = first_argmin(&rewards.where_scalarother(&negative, f64::INFINITY));
        Partition {
            valid: mask.shallow_clone(),
            positive,
            negative,
            active,
            best,
            worst,
            centered,
        }
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

    /// `[P, K]` bool: the slots that take part in a contrast, `Y+ ∪ Y−` (all valid slots
    /// in the mean split).
    pub fn participants(&self) -> Tensor {
        self.positive.logical_or(&self.negative)
    }

    /// `[P]` bool: the prompt carries a preference (mean split: ≥ 2 valid responses and `Y+`
    /// non-empty; explicit sets: `Y+` and `Y−` non-empty).
    pub fn active(&self) -> &Tensor {
        &self.active
    }

    /// `[P]` i64: the slot of the highest reward in `Y+` (lowest index among ties).
    pub fn best(&self) -> &Tensor {
        &self.best
    }

    /// `[P]` i64: the slot of the lowest reward in `Y−` (lowest index among ties).
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

/// `r − r̄` over each prompt's valid slots, and the prompt's reward spread.
struct CenteredRewards {
    /// `[P, K]` f64 `r − r̄`, 0 in masked slots.
    values: Tensor,
    /// `[P, 1]` f64 `max r − min r` over valid slots (0 with fewer than two).
    spread: Tensor,
}

impl CenteredRewards {
    /// Rewards are first taken relative to the prompt's smallest valid reward. That is exact
    /// for equal rewards and keeps the mean's rounding error relative to the spread rather
    /// than to the rewards' magnitude, so a common shift leaves the partition unchanged.
    fn new(rewards: &Tensor, mask: &Tensor) -> Self {
        let lowest = -amax_or_zero(
            &(-rewards).where_scalarother(mask, f64::NEG_INFINITY),
            &[1],
            true,
        );
        let lowest = lowest.where_scalarother(&lowest.isfinite(), 0.0);
        let relative = (rewards - lowest).where_scalarother(mask, 0.0);
        let count = mask.sum_dim_intlist(1, true, Kind::Double);
        let mean = relative.sum_dim_intlist(1, true, Kind::Double) / count.clamp_min(1.0);
        CenteredRewards {
            values: (&relative - mean).where_scalarother(mask, 0.0),
            spread: amax_or_zero(&relative, &[1], true),
        }
    }
}

/// The explicit sets of the top `top` against the bottom `bottom` responses of each prompt by
/// reward (paper v4's on-policy setup: the top-2 against the bottom-2 of 5), for
/// [`PreferenceBatch::with_sets`](crate::PreferenceBatch::with_sets).
///
/// ```text
/// rank the valid slots by reward (equal rewards: the lower slot index ranks higher)
/// Y+ = the `top` highest ranks
/// Y− = the `bottom` lowest ranks outside Y+, keeping only rewards below every reward in Y+
/// ```
///
/// Equal rewards never straddle the two sets: a bottom response that ties with a top one is
/// dropped from `Y−` (for `[4, 4, 4, 2, 4]`, top 2 against bottom 2 is `{0, 1}` against
/// `{3}`). A prompt left without a negative (all rewards equal, a single valid response)
/// gets two empty sets and is skipped by the losses.
///
/// # Shapes
/// `rewards` `[P, K]` (any real kind), `mask` `[P, K]` bool; returns two `[P, K]` bool
/// tensors `(positive, negative)` on the rewards' device.
pub fn top_bottom_sets(
    rewards: &Tensor,
    mask: &Tensor,
    top: usize,
    bottom: usize,
) -> Result<(Tensor, Tensor)> {
    let shape = validate::prompt_slot_shape("rewards", rewards)?;
    validate::numeric_kind("rewards", rewards)?;
    validate::same_shape("mask", mask, "rewards", &shape)?;
    validate::exact_kind("mask", mask, Kind::Bool)?;
    validate::same_device("mask", mask, "rewards", rewards.device())?;
    for (name, count) in [("top", top), ("bottom", bottom)] {
        if count == 0 {
            return Err(RefaError::option(name, 0, ">= 1 (top_bottom_sets)"));
        }
    }
    let rewards = rewards.to_kind(Kind::Double);
    let rank = ascending_rank(&rewards, mask);
    let valid_count = mask.sum_dim_intlist(1, true, Kind::Int64);
    let positive = rank
        .ge_tensor(&(valid_count - top as i64))
        .logical_and(mask);
    let negative = rank
        .lt(bottom as i64)
        .logical_and(mask)
        .logical_and(&positive.logical_not());
    let lowest_positive = -amax_or_zero(
        &(-&rewards).where_scalarother(&positive, f64::NEG_INFINITY),
        &[1],
        true,
    );
    let negative = negative.logical_and(&rewards.lt_tensor(&lowest_positive));
    let positive = positive.logical_and(&negative.any_dim(1, true));
    Ok((positive, negative))
}

/// `[P, K]` i64 rank of each slot in one total order: ascending reward, and among equal
/// rewards the higher slot index first; masked slots rank last.
fn ascending_rank(rewards: &Tensor, mask: &Tensor) -> Tensor {
    let slots = rewards.size()[1];
    // A stable sort of the slots in reverse order puts, among equal rewards, the higher
    // original slot first.
    let reversed = rewards.where_scalarother(mask, f64::INFINITY).flip([1]);
    let (_, order) = reversed.sort_stable(true, 1, false);
    let order = order.neg() + (slots - 1);
    let positions = Tensor::arange(slots, (Kind::Int64, rewards.device()))
        .unsqueeze(0)
        .expand_as(&order)
        .contiguous();
    order.zeros_like().scatter(1, &order, &positions)
}
