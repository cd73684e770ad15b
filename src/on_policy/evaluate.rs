//! Held-out evaluation: greedy answers to prompts the model never trained on, scored by the
//! reward, with their length and the model's probability of ending where it ended.

use tch::{Kind, Tensor};

use crate::error::Result;
use crate::model::{CausalLm, ChatTokenizer, GenerationOptions, SampleOptions, StopReason};
use crate::on_policy::round::{answer_texts, content_tokens};
use crate::reward::{checked_scores, Prompt, Reward};

/// The held-out figures of one model.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldOut {
    /// Mean reward of the greedy answers (for the instruction checks: the share of prompts
    /// whose answer is non-empty, on topic and meets its constraint).
    pub score: f64,
    /// Mean answer length in tokens, the end of turn not counted.
    pub mean_length: f64,
    /// Share of answers that ended with a stop token within `max_new_tokens`.
    pub ended: f64,
    /// Mean probability of the end-of-turn token right after each answer's content (where
    /// the model ended it, or after the last token of an answer cut at `max_new_tokens`).
    pub eos_probability: f64,
    /// Share of empty answers.
    pub empty: f64,
    /// The greedy answers, for inspection.
    pub answers: Vec<String>,
}

/// Greedy answers (up to `max_new_tokens`, stopping at the template's end of turn) to every
/// held-out prompt, scored by `reward`.
///
/// # Errors
/// From encoding, generation, the forward pass and the reward.
pub fn evaluate_heldout(
    model: &CausalLm,
    tokenizer: &ChatTokenizer,
    prompts: &[Prompt],
    reward: &dyn Reward,
    max_new_tokens: usize,
) -> Result<HeldOut> {
    let end_of_turn = tokenizer.end_of_turn_id();
    let generation = GenerationOptions {
        max_new_tokens,
        stop_token_id: Some(end_of_turn),
        ..GenerationOptions::default()
    };
    let prompt_ids: Vec<Vec<i64>> = prompts
        .iter()
        .map(|p| tokenizer.encode_prompt(&p.prompt))
        .collect::<Result<_>>()?;
    let samples = model.sample(&prompt_ids, &SampleOptions::new(1, generation))?;
    let answers = answer_texts(tokenizer, &samples)?;
    let scores = checked_scores(reward, prompts, &answers)?;
    let completions: Vec<_> = samples.completions.iter().map(|c| &c[0]).collect();
    let count = prompts.len().max(1) as f64;
    let mut eos_total = 0.0;
    for (ids, completion) in prompt_ids.iter().zip(&completions) {
        let content = content_tokens(&completion.tokens, completion.stop);
        eos_total += end_probability(model, ids, content, end_of_turn)?;
    }
    let lengths = completions
        .iter()
        .map(|c| content_tokens(&c.tokens, c.stop).len() as f64);
    let texts: Vec<String> = answers.into_iter().map(|mut a| a.remove(0)).collect();
    Ok(HeldOut {
        score: scores.iter().map(|s| s[0]).sum::<f64>() / count,
        mean_length: lengths.sum::<f64>() / count,
        ended: completions
            .iter()
            .filter(|c| matches!(c.stop, StopReason::StopToken(_)))
            .count() as f64
            / count,
        eos_probability: eos_total / count,
        empty: texts.iter().filter(|t| t.trim().is_empty()).count() as f64 / count,
        answers: texts,
    })
}

/// `P(end_of_turn | prompt, content)`: the model's probability of closing the turn right
/// after `content`.
fn end_probability(model: &CausalLm, prompt: &[i64], content: &[i64], end_of_turn: i64) -> Result<f64> {
    let ids: Vec<i64> = prompt.iter().chain(content).copied().collect();
    let device = model.lm_head_weight().device();
    let tokens = Tensor::from_slice(&ids).unsqueeze(0).to(device);
    let probability = tch::no_grad(|| -> Result<f64> {
        let hidden = model.forward(&tokens, &tokens.ones_like(), false)?;
        let last = hidden.narrow(1, ids.len() as i64 - 1, 1);
        let logits = model.logits(&last).view([-1]).to_kind(Kind::Float);
        Ok(logits.softmax(0, Kind::Float).double_value(&[end_of_turn]))
    })?;
    Ok(probability)
}
