//! Records to token ids: chat template, truncation, and the prompts that carry no preference.

use crate::data::records::PreferenceRecord;
use crate::error::Result;
use crate::model::{check_token_limits, ChatTokenizer, Encoded};

/// One prompt's responses as token ids, with their rewards.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedExample {
    /// Each response framed by the chat template (prompt ids repeated per response).
    pub responses: Vec<Encoded>,
    /// The rewards, one per response.
    pub rewards: Vec<f64>,
}

/// Why prompts were dropped, and how many responses were truncated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenizeReport {
    /// Prompts kept.
    pub kept: usize,
    /// Dropped: fewer than two responses.
    pub fewer_than_two_responses: usize,
    /// Dropped: every response has the same score (no preference).
    pub all_scores_equal: usize,
    /// Responses cut at the length limit (they have no end-of-turn token
    /// ([`ChatTokenizer::end_of_turn_id`]), and the EOS regularizer skips them).
    pub truncated_responses: usize,
}

/// Tokenizes `records` with the chat template, truncating prompts to `max_prompt` tokens and
/// prompt + response to `max_total` (see [`ChatTokenizer::encode`]: every response keeps at
/// least one token), and drops prompts that carry no preference.
pub fn tokenize_records(
    records: &[PreferenceRecord],
    tokenizer: &ChatTokenizer,
    max_prompt: usize,
    max_total: usize,
) -> Result<(Vec<TokenizedExample>, TokenizeReport)> {
    check_token_limits(max_prompt, max_total)?;
    let mut report = TokenizeReport::default();
    let mut examples = Vec::new();
    for record in records {
        if record.responses.len() < 2 {
            report.fewer_than_two_responses += 1;
            continue;
        }
        let first = record.responses[0].score;
        if record.responses.iter().all(|r| r.score == first) {
            report.all_scores_equal += 1;
            continue;
        }
        let example = tokenize_record(record, tokenizer, max_prompt, max_total)?;
        report.truncated_responses += example
            .responses
            .iter()
            .filter(|e| !e.ends_with(tokenizer.end_of_turn_id()))
            .count();
        examples.push(example);
        report.kept += 1;
    }
    Ok((examples, report))
}

/// Tokenizes every record, preference or not (for analyses such as the URSLA probe).
pub fn tokenize_all(
    records: &[PreferenceRecord],
    tokenizer: &ChatTokenizer,
    max_prompt: usize,
    max_total: usize,
) -> Result<Vec<TokenizedExample>> {
    check_token_limits(max_prompt, max_total)?;
    records
        .iter()
        .map(|r| tokenize_record(r, tokenizer, max_prompt, max_total))
        .collect()
}

fn tokenize_record(
    record: &PreferenceRecord,
    tokenizer: &ChatTokenizer,
    max_prompt: usize,
    max_total: usize,
) -> Result<TokenizedExample> {
    let responses = record
        .responses
        .iter()
        .map(|r| {
            tokenizer.encode_in_context(
                &record.context,
                &record.prompt,
                &r.text,
                max_prompt,
                max_total,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(TokenizedExample {
        responses,
        rewards: record.responses.iter().map(|r| r.score).collect(),
    })
}
