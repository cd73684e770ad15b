//! Preference data on disk: UltraFeedback's raw format and a simple format, one JSON object
//! per line, read into [`PreferenceRecord`]s.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{RefaError, Result};

/// One prompt and its scored responses (any number of them).
#[derive(Debug, Clone, PartialEq)]
pub struct PreferenceRecord {
    /// The user's instruction.
    pub prompt: String,
    /// The responses with their scores.
    pub responses: Vec<ScoredResponse>,
}

/// A response and its reward.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredResponse {
    /// The response text.
    pub text: String,
    /// Its score (UltraFeedback: 0..10 overall, 1..5 fine-grained).
    pub score: f64,
}

/// Which line format a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "trainer", derive(clap::ValueEnum))]
pub enum DataFormat {
    /// UltraFeedback raw: `{"instruction": …, "completions": [{"response": …,
    /// "overall_score": …, "fine-grained_score": …, "annotations": …}, …]}`.
    #[cfg_attr(feature = "trainer", value(name = "ultrafeedback"))]
    UltraFeedback,
    /// `{"prompt": …, "responses": [{"text": …, "score": …}, …]}`.
    Simple,
}

/// Which UltraFeedback score is the reward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "trainer", derive(clap::ValueEnum))]
pub enum ScoreField {
    /// `overall_score` (0..10, the paper's choice). Default.
    #[default]
    Overall,
    /// `fine-grained_score` (the mean of the four aspect ratings, 1..5).
    FineGrained,
}

/// What reading a file produced.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadReport {
    /// The records, in file order.
    pub records: Vec<PreferenceRecord>,
    /// Malformed lines skipped with `skip_bad_lines`: `(line number, why)`.
    pub skipped: Vec<(usize, String)>,
}

/// Reads a JSONL file. A malformed line (bad JSON, missing fields, a score that is not a
/// finite number, bytes that are not UTF-8) is a [`RefaError::Data`] naming the file and the
/// line, unless `skip_bad_lines`, which skips and reports it. Empty lines are ignored.
pub fn read_jsonl(
    path: impl AsRef<Path>,
    format: DataFormat,
    score: ScoreField,
    skip_bad_lines: bool,
) -> Result<ReadReport> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| RefaError::io(path, &e))?;
    parse_jsonl_bytes(
        &bytes,
        &path.display().to_string(),
        format,
        score,
        skip_bad_lines,
    )
}

/// [`read_jsonl`] on text already in memory; `source` names it in errors.
pub fn parse_jsonl(
    text: &str,
    source: &str,
    format: DataFormat,
    score: ScoreField,
    skip_bad_lines: bool,
) -> Result<ReadReport> {
    parse_jsonl_bytes(text.as_bytes(), source, format, score, skip_bad_lines)
}

/// [`read_jsonl`] on bytes already in memory, decoded line by line, so that a line that is
/// not UTF-8 is reported (or skipped) by its number like any other malformed line.
pub fn parse_jsonl_bytes(
    bytes: &[u8],
    source: &str,
    format: DataFormat,
    score: ScoreField,
    skip_bad_lines: bool,
) -> Result<ReadReport> {
    let mut report = ReadReport {
        records: Vec::new(),
        skipped: Vec::new(),
    };
    for (index, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let parsed = std::str::from_utf8(raw)
            .map_err(|e| format!("not UTF-8 text ({e})"))
            .and_then(|line| match line.trim().is_empty() {
                true => Ok(None),
                false => parse_line(line, format, score).map(Some),
            });
        match parsed {
            Ok(None) => {}
            Ok(Some(record)) => report.records.push(record),
            Err(message) if skip_bad_lines => report.skipped.push((index + 1, message)),
            Err(message) => {
                return Err(RefaError::Data {
                    path: source.to_string(),
                    line: index + 1,
                    message,
                })
            }
        }
    }
    Ok(report)
}

fn parse_line(
    line: &str,
    format: DataFormat,
    score: ScoreField,
) -> std::result::Result<PreferenceRecord, String> {
    match format {
        DataFormat::Simple => {
            let record: SimpleLine = serde_json::from_str(line).map_err(|e| e.to_string())?;
            let responses = record
                .responses
                .into_iter()
                .map(|r| ScoredResponse {
                    text: r.text,
                    score: r.score,
                })
                .collect();
            Ok(PreferenceRecord {
                prompt: record.prompt,
                responses,
            })
        }
        DataFormat::UltraFeedback => {
            let record: UltraFeedbackLine =
                serde_json::from_str(line).map_err(|e| e.to_string())?;
            let responses = record
                .completions
                .into_iter()
                .enumerate()
                .map(|(i, c)| {
                    Ok(ScoredResponse {
                        score: c.score(score).map_err(|e| format!("completion {i}: {e}"))?,
                        text: c.response,
                    })
                })
                .collect::<std::result::Result<_, String>>()?;
            Ok(PreferenceRecord {
                prompt: record.instruction,
                responses,
            })
        }
    }
}

#[derive(Deserialize)]
struct SimpleLine {
    prompt: String,
    responses: Vec<SimpleResponse>,
}

#[derive(Deserialize)]
struct SimpleResponse {
    text: String,
    score: f64,
}

#[derive(Deserialize)]
struct UltraFeedbackLine {
    instruction: String,
    completions: Vec<Completion>,
}

#[derive(Deserialize)]
struct Completion {
    response: String,
    #[serde(default)]
    overall_score: Option<Value>,
    #[serde(rename = "fine-grained_score", default)]
    fine_grained_score: Option<Value>,
}

impl Completion {
    fn score(&self, field: ScoreField) -> std::result::Result<f64, String> {
        let (name, value) = match field {
            ScoreField::Overall => ("overall_score", &self.overall_score),
            ScoreField::FineGrained => ("fine-grained_score", &self.fine_grained_score),
        };
        let number = match value {
            Some(Value::Number(n)) => n.as_f64(),
            Some(Value::Null) => None,
            // UltraFeedback stores some scores as strings ("8.5").
            Some(Value::String(s)) => s.trim().parse().ok(),
            _ => None,
        };
        number
            .filter(|x| x.is_finite())
            .ok_or_else(|| format!("`{name}` is missing or not a number"))
    }
}
