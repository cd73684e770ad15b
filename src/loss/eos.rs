//! The EOS-probability regularizer (paper v1 Eq. 33, v4 Eq. 7–10).

use tch::{Kind, Tensor};

use crate::batch::PreferenceBatch;
use crate::error::{RefaError, Result};
use crate::loss::common::check_finite;
use crate::loss::{LossMetrics, LossOutput, PreferenceLoss};
use crate::reduce::amax_or_zero;
use crate::validate::Hyperparameters;

/// The target length `T` of [`EosMode::TargetLength`].
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum TargetLength {
    /// The longest valid response of the same prompt (default).
    #[default]
    PromptLongest,
    /// The longest valid response of the batch.
    BatchLongest,
    /// A fixed number of tokens.
    Fixed(f64),
}

/// What the regularizer penalizes; `P(EOS at |y|) = exp(eos_logp)`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum EosMode {
    /// `λ·Σ_y P(EOS at |y|)` (v1 Eq. 33): pushes EOS at the data's end down, so outputs get
    /// longer. Default.
    #[default]
    FinalProbability,
    /// `λ·Σ_y P(EOS at |y|)·max(0, T − |y|)` (v4 Eq. 7): penalizes early endings in
    /// proportion to the shortfall; zero for responses of length `T` or more.
    TargetLength(TargetLength),
    /// `−λ·Σ_y log P(EOS at |y|)` (v4 Eq. 9): pulls EOS up, so outputs get shorter.
    FinalLogProbability,
    /// `λ·Σ_y (mean_{t<b} P(EOS at t) − mean_{t>b} P(EOS at t))` (v4 Eq. 10) with 1-based
    /// response positions `t`: `t = 1` at the response's first token whatever the prompt's
    /// length (the `n`-th position marked in the step mask is `t = n`). Discourages stopping
    /// before `budget` tokens and encourages it after. The second mean is dropped when
    /// `|y| <= b`; a mean over no position is 0. Needs [`PreferenceBatch::with_eos_steps`].
    Budgeted {
        /// The budget `b` in tokens, >= 1.
        budget: usize,
    },
}

/// An EOS-probability regularizer `R`, added to a loss with
/// [`PreferenceLoss::with_regularizer`] (the full REFA objective, paper Eq. 11/34).
///
/// Sums run over a prompt's valid responses whose `eos_mask` is true (responses cut at a
/// length limit have no EOS to regularize); the result is averaged over the prompts with at
/// least one such response. It needs no preference, so prompts a loss skips still count.
///
/// # Shapes
/// Reads `[P, K]` `eos_logp`, `eos_mask` ([`PreferenceBatch::with_eos`]), `lengths`, and for
/// `Budgeted` the `[P, K, T]` per-step inputs.
///
/// # Defaults
/// `FinalProbability` with λ = 0.1. Each mode has its own λ, [`EosMode::default_lambda`],
/// which [`EosRegularizer::new`] uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EosRegularizer {
    /// Strength λ, >= 0.
    pub lambda: f64,
    /// Which quantity is penalized.
    pub mode: EosMode,
}

impl EosMode {
    /// The default strength λ of this mode, sized to the mode's scale: the paper gives one
    /// value only (v4 Table 4: 5e-5 for `TargetLength`, whose term grows with the shortfall
    /// in tokens); the others are DECIDED.
    ///
    /// | mode | λ | why |
    /// |---|---|---|
    /// | `FinalProbability` | 0.1 | a probability per response; gradient `λ·P` |
    /// | `TargetLength` | 5e-5 | paper v4 Table 4 (the term is `P·(T − |y|)`, up to `P·T`) |
    /// | `FinalLogProbability` | 0.05 | gradient `λ` whatever `P`: `FinalProbability`'s at `P = 0.5` |
    /// | `Budgeted` | 0.1 | a difference of two mean probabilities, as `FinalProbability` |
    pub fn default_lambda(&self) -> f64 {
        match self {
            EosMode::FinalProbability => 0.1,
            EosMode::TargetLength(_) => 5e-5,
            EosMode::FinalLogProbability => 0.05,
            EosMode::Budgeted { .. } => 0.1,
        }
    }
}

impl Default for EosRegularizer {
    fn default() -> Self {
        EosRegularizer::new(EosMode::FinalProbability)
    }
}

impl EosRegularizer {
    /// The regularizer in `mode` with that mode's default λ ([`EosMode::default_lambda`]).
    pub fn new(mode: EosMode) -> Self {
        EosRegularizer {
            lambda: mode.default_lambda(),
            mode,
        }
    }

    fn check(&self) -> Result<()> {
        let check = Hyperparameters::of("EosRegularizer");
        check.non_negative("lambda", self.lambda)?;
        match self.mode {
            EosMode::TargetLength(TargetLength::Fixed(target)) => {
                check.positive("target_length", target)?;
            }
            EosMode::Budgeted { budget } => {
                check.positive("budget", budget as f64)?;
            }
            _ => {}
        }
        Ok(())
    }

    /// `[P, K]` regularizer term of every response (before masking), without λ.
    fn response_terms(&self, batch: &PreferenceBatch, eos_logp: &Tensor) -> Result<Tensor> {
        Ok(match self.mode {
            EosMode::FinalProbability => eos_logp.exp(),
            EosMode::FinalLogProbability => -eos_logp,
            EosMode::TargetLength(target) => {
                let lengths = batch.lengths();
                let shortfall =
                    (target_lengths(target, &lengths, batch.mask()) - &lengths).clamp_min(0.0);
                eos_logp.exp() * shortfall
            }
            EosMode::Budgeted { budget } => budgeted_terms(batch, budget as f64)?,
        })
    }
}

impl PreferenceLoss for EosRegularizer {
    fn name(&self) -> &'static str {
        "EosRegularizer"
    }

    fn validate(&self) -> Result<()> {
        self.check()
    }

    fn compute(&self, batch: &PreferenceBatch) -> Result<LossOutput> {
        self.check()?;
        let missing = RefaError::MissingInput {
            loss: self.name(),
            input: "eos_logp and eos_mask",
            method: "with_eos",
        };
        let (eos_logp, eos_valid) = batch.eos().ok_or(missing)?;
        // The value checks run with the partition; the regularizer itself needs no partition.
        batch.validate()?;
        let terms = self.response_terms(batch, &eos_logp)? * self.lambda;
        let per_prompt = terms
            .where_scalarother(&eos_valid, 0.0)
            .sum_dim_intlist(1, false, None);
        let used = eos_valid.any_dim(1, false).sum(Kind::Double);
        let kind = per_prompt.kind();
        let loss = per_prompt.sum(kind) / used.clamp_min(1.0).to_kind(kind);
        check_finite(self.name(), batch, &loss)?;
        let metrics = LossMetrics::new(
            &loss,
            used,
            batch.num_prompts(),
            Some((eos_logp, eos_valid)),
        );
        Ok(LossOutput {
            loss,
            per_prompt,
            metrics,
        })
    }
}

/// `[P, K]` target lengths `T` for `TargetLength` (masked slots never count as longest).
fn target_lengths(target: TargetLength, lengths: &Tensor, mask: &Tensor) -> Tensor {
    let valid_lengths = lengths.where_scalarother(mask, 0.0);
    match target {
        TargetLength::PromptLongest => amax_or_zero(&valid_lengths, &[1], true).expand_as(lengths),
        TargetLength::BatchLongest => {
            amax_or_zero(&valid_lengths, &[0, 1], true).expand_as(lengths)
        }
        TargetLength::Fixed(target) => lengths.full_like(target),
    }
}

/// `[P, K]` `mean_{t<b} P(EOS at t) − mean_{t>b} P(EOS at t)` over each response's steps.
fn budgeted_terms(batch: &PreferenceBatch, budget: f64) -> Result<Tensor> {
    let missing = RefaError::MissingInput {
        loss: "EosRegularizer (Budgeted)",
        input: "eos_logp_steps and step_mask",
        method: "with_eos_steps",
    };
    let (steps_logp, steps_valid) = batch.eos_steps().ok_or(missing)?;
    // 1-based response positions: the n-th response step is t = n wherever it lies along the
    // last axis. The scorers lay steps out by position in the whole sequence, so a prompt
    // precedes them; counting the marked steps keeps t = 1 at the response's first token.
    let position = steps_valid.cumsum(2, Kind::Double);
    let probability = steps_logp.exp();
    let mean_where = |select: Tensor| {
        let select = select.logical_and(&steps_valid);
        let count = select
            .sum_dim_intlist(2, false, Kind::Double)
            .clamp_min(1.0)
            .to_kind(batch.kind());
        probability
            .where_scalarother(&select, 0.0)
            .sum_dim_intlist(2, false, None)
            / count
    };
    let early = mean_where(position.lt(budget));
    let late = mean_where(position.gt(budget));
    Ok(early - late)
}
