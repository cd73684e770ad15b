//! Records to token ids: chat template, truncation, and the prompts that carry no preference.

use crate::data::records::PreferenceRecord;
use crate::error::{RefaError, Result};
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
/// least one token), and drops prompts that carry no preference. A record the template
/// cannot frame is a [`RefaError::Config`] naming it `record N` (1-based); see
/// [`tokenize_records_named`] to name it by file and line.
pub fn tokenize_records(
    records: &[PreferenceRecord],
    tokenizer: &ChatTokenizer,
    max_prompt: usize,
    max_total: usize,
) -> Result<(Vec<TokenizedExample>, TokenizeReport)> {
    tokenize_records_named(records, tokenizer, max_prompt, max_total, record_number)
}

/// [`tokenize_records`], an error naming the record `i` it happened at as `name(i)`, e.g.
/// `|i| report.origin(i).unwrap_or_default()` ([`ReadReport::origin`]: `data.jsonl, line 3`).
///
/// [`ReadReport::origin`]: crate::data::ReadReport::origin
pub fn tokenize_records_named(
    records: &[PreferenceRecord],
    tokenizer: &ChatTokenizer,
    max_prompt: usize,
    max_total: usize,
    name: impl Fn(usize) -> String,
) -> Result<(Vec<TokenizedExample>, TokenizeReport)> {
    check_token_limits(max_prompt, max_total)?;
    let mut report = TokenizeReport::default();
    let mut examples = Vec::new();
    for (index, record) in records.iter().enumerate() {
        if record.responses.len() < 2 {
            report.fewer_than_two_responses += 1;
            continue;
        }
        let first = record.responses[0].score;
        if record.responses.iter().all(|r| r.score == first) {
            report.all_scores_equal += 1;
            continue;
        }
        let example = tokenize_record(record, tokenizer, max_prompt, max_total)
            .map_err(|e| RefaError::config(name(index), e))?;
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

/// Tokenizes every record, preference or not (for analyses such as the URSLA probe); errors
/// name the record as [`tokenize_records`]' do.
pub fn tokenize_all(
    records: &[PreferenceRecord],
    tokenizer: &ChatTokenizer,
    max_prompt: usize,
    max_total: usize,
) -> Result<Vec<TokenizedExample>> {
    check_token_limits(max_prompt, max_total)?;
    records
        .iter()
        .enumerate()
        .map(|(index, r)| {
            tokenize_record(r, tokenizer, max_prompt, max_total)
                .map_err(|e| RefaError::config(record_number(index), e))
        })
        .collect()
}

/// How a record is named without its file: `record 3` for index 2.
fn record_number(index: usize) -> String {
    format!("record {}", index + 1)
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
