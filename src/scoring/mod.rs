//! Sequence scoring: from a causal LM's outputs to the few numbers per response the losses
//! read, in memory-bounded chunks with exact gradients.
//!
//! A loss needs, per response, the summed token log-probability, the token count and the
//! log-probability of EOS where the response ends (and, for
//! [`EosMode::Budgeted`](crate::EosMode::Budgeted), at every position). Computing them the
//! usual way materializes `[N, T, V]` logits and their `log_softmax` in f32: for 4 responses
//! of 1024 tokens and a 32 000-token vocabulary that is about 0.5 GB per prompt before the
//! backward pass. This module offers two paths to the same [`SequenceScores`]:
//!
//! - [`score_logits`]: the plain path from logits, differentiable through them; the reference.
//! - [`ChunkedScorer`] and [`score_hidden`]: from hidden states `[N, T, H]` and the LM head
//!   `[V, H]`, computing logits for at most `chunk_size` response positions at a time, and
//!   only for response positions (prompt and padding cost nothing). Its backward pass
//!   recomputes each chunk's logits; gradients equal the plain path's.
//! - [`preference_loss_backward`]: the one call a trainer makes: chunked scoring, the loss,
//!   and the backward pass into the model.
//!
//! # Labels
//! `labels` is `[N, T]` i64, aligned with the input ids as in Hugging Face: the model's
//! output at position `t` predicts `labels[t + 1]`. Prompt and padding positions hold
//! `ignore_index` (−100). A response's tokens include its final EOS (spec §1), so `lengths`
//! counts it and `logp_sum` includes its log-probability; a response cut at a length limit
//! has no EOS and gets `eos_mask = false`. A sequence whose labels are all ignored is a
//! zero-length response: [`SequenceScores::to_batch`] masks its slot.

mod chunked;
mod plain;
mod step;
mod targets;

pub use chunked::{score_hidden, ChunkedScorer};
pub use plain::score_logits;
pub use step::{preference_loss_backward, PreferenceTargets};

use tch::{Kind, Tensor};

use crate::batch::PreferenceBatch;
use crate::error::{RefaError, Result};
use crate::validate;

/// How labels are read and how much memory the chunked scorer may use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoringConfig {
    /// The end-of-sequence token id (Mistral: 2).
    pub eos_id: i64,
    /// Label value of positions that are not response tokens (Hugging Face: −100).
    pub ignore_index: i64,
    /// Also return `log P(EOS)` at every response position (for `EosMode::Budgeted`).
    pub eos_steps: bool,
    /// Response positions whose logits the chunked scorer materializes at once; peak memory
    /// of the scoring step is about `chunk_size × V` floats. Default 1024.
    pub chunk_size: i64,
    /// The chunked scorer soft-caps the logits, `c·tanh(z/c)`, as the model's LM head does
    /// (Gemma 2's `final_logit_softcapping`; see
    /// [`CausalLm::scoring_config`](crate::model::CausalLm::scoring_config)). Default `None`.
    pub logit_softcap: Option<f64>,
}

impl ScoringConfig {
    /// Defaults for a vocabulary whose EOS token is `eos_id`: ignore index −100, no per-step
    /// EOS, chunks of 1024 positions.
    pub fn new(eos_id: i64) -> Self {
        ScoringConfig {
            eos_id,
            ignore_index: -100,
            eos_steps: false,
            chunk_size: 1024,
            logit_softcap: None,
        }
    }

    pub(crate) fn validate(&self, vocab: i64) -> Result<()> {
        let setting = |name, value: i64, requirement: String| {
            RefaError::option(name, value, format!("{requirement} (ScoringConfig)"))
        };
        if !(0..vocab).contains(&self.eos_id) {
            return Err(setting(
                "eos_id",
                self.eos_id,
                format!("in [0, {vocab}), the vocabulary"),
            ));
        }
        if let Some(cap) = self.logit_softcap.filter(|c| !(c.is_finite() && *c > 0.0)) {
            return Err(RefaError::option(
                "logit_softcap",
                cap,
                "finite and > 0 (ScoringConfig)",
            ));
        }
        if self.chunk_size <= 0 {
            return Err(setting("chunk_size", self.chunk_size, "> 0".to_string()));
        }
        if (0..vocab).contains(&self.ignore_index) {
            return Err(setting(
                "ignore_index",
                self.ignore_index,
                format!("outside [0, {vocab}), not a token"),
            ));
        }
        Ok(())
    }
}

/// Per-sequence values the losses read, for `N = P·K` sequences.
#[derive(Debug)]
pub struct SequenceScores {
    /// `[N]` summed log-probability of each response's tokens (EOS included).
    pub logp_sum: Tensor,
    /// `[N]` number of response tokens (i64; 0 for a sequence without any).
    pub lengths: Tensor,
    /// `[N]` `log P(EOS)` at the position of each response's last token (0 without tokens).
    pub eos_logp: Tensor,
    /// `[N]` bool: the response's last token is EOS.
    pub eos_mask: Tensor,
    /// `[N, T − 1]` `log P(EOS)` at every shifted position (0 outside the response), when
    /// requested by [`ScoringConfig::eos_steps`].
    pub eos_logp_steps: Option<Tensor>,
    /// `[N, T − 1]` bool: the shifted position is a response token.
    pub step_mask: Tensor,
}

impl SequenceScores {
    /// Reshapes to `[P, K]` (sequence `n` is prompt `n / K`, slot `n % K`) and builds the
    /// [`PreferenceBatch`] with EOS inputs (and per-step EOS inputs when present). Slots with
    /// `slot_mask` false or without response tokens are masked.
    pub fn to_batch(
        &self,
        rewards: &Tensor,
        slot_mask: Option<&Tensor>,
    ) -> Result<PreferenceBatch> {
        let shape = validate::prompt_slot_shape("rewards", rewards)?;
        let sequences = self.logp_sum.size()[0];
        if shape[0] * shape[1] != sequences {
            let expected =
                format!("[P, K] with P·K = {sequences} (the number of scored sequences)");
            return Err(RefaError::ShapeMismatch {
                tensor: "rewards",
                actual: shape,
                expected,
            });
        }
        let grid = |t: &Tensor| t.view([shape[0], shape[1]]);
        let mut mask = grid(&self.lengths).gt(0);
        if let Some(slot_mask) = slot_mask {
            validate::same_shape("slot_mask", slot_mask, "rewards", &shape)?;
            validate::exact_kind("slot_mask", slot_mask, Kind::Bool)?;
            mask = mask.logical_and(slot_mask);
        }
        let lengths = grid(&self.lengths).to_kind(self.logp_sum.kind());
        let mut batch = PreferenceBatch::new(&grid(&self.logp_sum), &lengths, rewards)?
            .with_mask(&mask)?
            .with_eos(&grid(&self.eos_logp), &grid(&self.eos_mask))?;
        if let Some(steps) = &self.eos_logp_steps {
            let cube = |t: &Tensor| t.view([shape[0], shape[1], -1]);
            batch = batch.with_eos_steps(&cube(steps), &cube(&self.step_mask))?;
        }
        Ok(batch)
    }
}

/// f64 inputs score in f64; every other kind in f32 (logsumexp and sums), as the losses do.
pub(crate) use crate::validate::compute_kind as score_kind;
