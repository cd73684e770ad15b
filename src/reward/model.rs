//! A reward model checkpoint as a [`Reward`].

use crate::error::{RefaError, Result};
use crate::model::{ChatTokenizer, RewardModel};
use crate::reward::{Prompt, Reward};

/// Scores each answer with a [`RewardModel`]: the prompt and the answer rendered as one
/// conversation by the reward model's own tokenizer and chat template
/// ([`ChatTokenizer::encode`], the answer closed by the template's end of turn), the logit
/// of label `label` (0, the only one of a reward model) read at the last token.
#[derive(Debug)]
pub struct RewardModelReward {
    model: RewardModel,
    tokenizer: ChatTokenizer,
    name: String,
    /// Most tokens per conversation (longer ones are cut: the prompt's start and as much of
    /// the answer as fits).
    max_tokens: usize,
    /// Most conversations per forward pass.
    max_rows: usize,
    label: usize,
}

impl RewardModelReward {
    /// `model` with its `tokenizer`; `name` says which model in messages. Conversations are
    /// cut at the model's context (`max_position_embeddings`), 16 run at a time, label 0.
    pub fn new(model: RewardModel, tokenizer: ChatTokenizer, name: impl Into<String>) -> Result<Self> {
        tokenizer.check_fits(model.config().vocab_size)?;
        let max_tokens = model.config().max_position_embeddings.max(2) as usize;
        Ok(RewardModelReward {
            model,
            tokenizer,
            name: name.into(),
            max_tokens,
            max_rows: 16,
            label: 0,
        })
    }

    /// Conversations of at most `max_tokens` tokens (>= 2), `max_rows` per pass (>= 1).
    pub fn with_limits(mut self, max_tokens: usize, max_rows: usize) -> Result<Self> {
        RefaError::require(max_tokens >= 2, "max_tokens", max_tokens, ">= 2")?;
        RefaError::require(max_rows >= 1, "max_rows", max_rows, ">= 1")?;
        (self.max_tokens, self.max_rows) = (max_tokens, max_rows);
        Ok(self)
    }

    /// Reads the logit of `label` (a classifier with several labels: the "good" one).
    pub fn with_label(mut self, label: usize) -> Result<Self> {
        let labels = self.model.labels().len();
        RefaError::require(label < labels, "label", label, format!("< {labels}, the model's labels"))?;
        self.label = label;
        Ok(self)
    }
}

impl Reward for RewardModelReward {
    fn name(&self) -> String {
        format!("reward model {}", self.name)
    }

    fn score(&self, prompts: &[Prompt], responses: &[Vec<String>]) -> Result<Vec<Vec<f64>>> {
        let mut sequences = Vec::new();
        for (prompt, answers) in prompts.iter().zip(responses) {
            for answer in answers {
                let encoded = self.tokenizer.encode(&prompt.prompt, answer, self.max_tokens - 1, self.max_tokens)?;
                sequences.push(encoded.input_ids());
            }
        }
        let logits = self.model.score_sequences(&sequences, self.max_rows)?;
        let mut flat = logits.into_iter().map(|row| row.get(self.label).copied().unwrap_or(f64::NAN));
        Ok(responses
            .iter()
            .map(|answers| flat.by_ref().take(answers.len()).collect())
            .collect())
    }
}
