//! Rewards for on-policy training (cargo feature `model`): whatever scores the K answers
//! sampled for each prompt, behind one small trait, [`Reward`].
//!
//! | reward | scores | reads from each prompt line |
//! |---|---|---|
//! | [`InstructionReward`] | 1 when the answer is non-empty, on topic and meets the prompt's verifiable constraint (IFEval-like: word or sentence limits, no commas, lowercase, an ending, bullet points, a keyword), else 0 | `constraint`, `topic` and/or `topic_words` |
//! | [`RewardModelReward`] | a sequence classifier's logit ([`RewardModel`](crate::model::RewardModel)) on the chat-templated prompt and answer | the prompt |
//! | [`CommandReward`] | what an external program (any Python judge) writes, one JSON line per prompt | everything: the lines are passed on |
//!
//! Prompts are JSONL lines ([`Prompt`], [`read_prompts`]) such as
//!
//! ```json
//! {"prompt": "Describe the sea in at most 12 words.", "constraint": {"kind": "max_words", "n": 12}, "topic": "the sea"}
//! ```
//!
//! and scored answers go out in the multi-response layout the trainer reads
//! ([`write_multi_response`]: `prompt`, `all_generated_responses`, `all_rm_scores`).
//!
//! ```no_run
//! # fn main() -> refa_loss::Result<()> {
//! use refa_loss::reward::{checked_scores, read_prompts, write_multi_response, InstructionReward, MultiResponseRecord};
//!
//! let prompts = read_prompts("prompts.jsonl")?;
//! let answers = vec![vec!["waves roll in under a grey sky".to_string()]; prompts.len()];
//! let scores = checked_scores(&InstructionReward, &prompts, &answers)?;
//! let records = MultiResponseRecord::zip(&prompts, &answers, Some(&scores));
//! write_multi_response("round-0.jsonl", &records)?;
//! # Ok(()) }
//! ```

mod command;
mod instructions;
mod model;
mod records;
mod text;

pub use command::{CommandInput, CommandReward};
pub use instructions::{Constraint, Instruction, InstructionReward, Verdict};
pub use model::RewardModelReward;
pub use records::{read_prompts, write_multi_response, MultiResponseRecord, Prompt};

use crate::error::{RefaError, Result};

/// Scores answers to prompts.
///
/// Batched by design: one call receives every prompt of a round with its K answers, so that a
/// reward model can fill its batches and an external command starts once.
pub trait Reward {
    /// What this reward is, for messages: `instruction checks`, `reward model runs/rm`,
    /// `command python3 judge.py`.
    fn name(&self) -> String;

    /// The score of each answer: `scores[i][k]` for `responses[i][k]`, an answer to
    /// `prompts[i]`, in the same shape (any number of answers per prompt). Use
    /// [`checked_scores`] to have the shape and finiteness checked.
    fn score(&self, prompts: &[Prompt], responses: &[Vec<String>]) -> Result<Vec<Vec<f64>>>;
}

/// `reward.score(prompts, responses)`, checked: one list of scores per prompt, one finite
/// score per answer; otherwise a [`RefaError::InvalidValue`] or
/// [`RefaError::InvalidSetting`] naming the reward, the prompt and the answer.
pub fn checked_scores<R: Reward + ?Sized>(
    reward: &R,
    prompts: &[Prompt],
    responses: &[Vec<String>],
) -> Result<Vec<Vec<f64>>> {
    RefaError::require(
        prompts.len() == responses.len(),
        "responses",
        format!("{} lists of answers", responses.len()),
        format!("one list per prompt ({})", prompts.len()),
    )?;
    let scores = reward.score(prompts, responses)?;
    let shape_error = |what: String| {
        let requirement = format!("one score per answer, from {}", reward.name());
        RefaError::option("scores", what, requirement)
    };
    if scores.len() != prompts.len() {
        return Err(shape_error(format!("{} lists for {} prompts", scores.len(), prompts.len())));
    }
    for (i, (row, answers)) in scores.iter().zip(responses).enumerate() {
        if row.len() != answers.len() {
            let what = format!("{} scores for the {} answers of prompt {i}", row.len(), answers.len());
            return Err(shape_error(what));
        }
        if let Some((k, &value)) = row.iter().enumerate().find(|(_, s)| !s.is_finite()) {
            return Err(RefaError::InvalidValue {
                tensor: "scores",
                position: format!("prompt {i}, answer {k} ({})", reward.name()),
                value,
                requirement: "a finite number",
            });
        }
    }
    Ok(scores)
}
