//! One round's data: the model answers each prompt K times, a reward scores the answers, and
//! the scored answers become the trainer's examples, on the exact tokens the model emitted.

use crate::data::TokenizedExample;
use crate::error::Result;
use crate::model::{CausalLm, ChatTokenizer, Encoded, SampleOptions, Samples};
use crate::reward::{checked_scores, MultiResponseRecord, Prompt, Reward};

/// What [`collect_round`] produced.
#[derive(Debug, Clone)]
pub struct RoundData {
    /// Every prompt with its K answers (text) and their scores, in the multi-response layout
    /// the trainer reads (`prompt`, `all_generated_responses`, `all_rm_scores`).
    pub records: Vec<MultiResponseRecord>,
    /// The trainable examples: prompts whose answers scored differently (the others carry no
    /// preference), each answer as the token ids the model emitted, its end of turn
    /// included when it produced one.
    pub examples: Vec<TokenizedExample>,
    /// Prompts dropped because all K answers scored the same.
    pub ties: usize,
    /// Mean score over every answer.
    pub mean_score: f64,
    /// Prompts whose answers the context cut below `max_new_tokens`.
    pub clamped: usize,
}

/// Samples K answers for every prompt (framed by the tokenizer's chat template), scores them
/// with `reward`, and builds the round's examples.
///
/// # Errors
/// From encoding, sampling ([`CausalLm::sample`]), decoding and the reward
/// ([`checked_scores`]: one finite score per answer).
pub fn collect_round(
    model: &CausalLm,
    tokenizer: &ChatTokenizer,
    prompts: &[Prompt],
    reward: &dyn Reward,
    options: &SampleOptions,
) -> Result<RoundData> {
    let prompt_ids: Vec<Vec<i64>> = prompts
        .iter()
        .map(|p| tokenizer.encode_prompt(&p.prompt))
        .collect::<Result<_>>()?;
    let samples = model.sample(&prompt_ids, options)?;
    let answers = answer_texts(tokenizer, &samples)?;
    let scores = checked_scores(reward, prompts, &answers)?;
    let records = MultiResponseRecord::zip(prompts, &answers, Some(&scores));
    let mut examples = Vec::new();
    for ((ids, completions), rewards) in prompt_ids.iter().zip(&samples.completions).zip(&scores) {
        if rewards.iter().all(|r| *r == rewards[0]) {
            continue;
        }
        let responses = completions
            .iter()
            .map(|c| Encoded {
                prompt: ids.clone(),
                response: c.tokens.clone(),
            })
            .collect();
        examples.push(TokenizedExample {
            responses,
            rewards: rewards.clone(),
        });
    }
    let all: Vec<f64> = scores.iter().flatten().copied().collect();
    Ok(RoundData {
        records,
        ties: prompts.len() - examples.len(),
        mean_score: all.iter().sum::<f64>() / all.len().max(1) as f64,
        clamped: samples.clamped.len(),
        examples,
    })
}

/// Each answer's text, without its stop token.
pub(crate) fn answer_texts(tokenizer: &ChatTokenizer, samples: &Samples) -> Result<Vec<Vec<String>>> {
    samples
        .completions
        .iter()
        .map(|answers| {
            answers
                .iter()
                .map(|c| tokenizer.decode(content_tokens(&c.tokens, c.stop)))
                .collect()
        })
        .collect()
}

/// The tokens of an answer before its stop token.
pub(crate) fn content_tokens(tokens: &[i64], stop: crate::model::StopReason) -> &[i64] {
    match stop {
        crate::model::StopReason::StopToken(_) => &tokens[..tokens.len().saturating_sub(1)],
        _ => tokens,
    }
}
