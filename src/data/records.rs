//! Preference data on disk, in JSONL (one JSON object per line) or parquet (one row per
//! record, the Hub's format), in any of four layouts ([`DataFormat`]), read into
//! [`PreferenceRecord`]s.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{RefaError, Result};
use crate::model::ChatMessage;

/// One prompt and its scored responses (any number of them).
#[derive(Debug, Clone, PartialEq)]
pub struct PreferenceRecord {
    /// The user's instruction (the last user turn).
    pub prompt: String,
    /// The turns before it (a system prompt, earlier user and assistant turns); empty for a
    /// single-turn prompt. Only a checkpoint's own chat template can frame them.
    pub context: Vec<ChatMessage>,
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "trainer", derive(clap::ValueEnum))]
pub enum DataFormat {
    /// Each line's format from its keys: `completions` → UltraFeedback, `responses` →
    /// simple, `all_generated_responses` → multi-response, `chosen` → pairwise. Default.
    #[default]
    Auto,
    /// UltraFeedback raw: `{"instruction": …, "completions": [{"response": …,
    /// "overall_score": …, "fine-grained_score": …, "annotations": …}, …]}`.
    #[cfg_attr(feature = "trainer", value(name = "ultrafeedback"))]
    UltraFeedback,
    /// `{"prompt": …, "responses": [{"text": …, "score": …}, …]}`.
    Simple,
    /// On-policy sets scored by a reward model (SimPO's and REFA v4's K = 5 data):
    /// `{"prompt": …, "all_generated_responses": [string, …], "all_rm_scores": [float, …]}`.
    MultiResponse,
    /// Pairs (HuggingFaceH4/ultrafeedback_binarized): `{"prompt": …, "chosen": …,
    /// "rejected": …}` where `chosen` and `rejected` are strings or message lists
    /// (`[{"role", "content"}]`, the last assistant message is the response), with optional
    /// `score_chosen` and `score_rejected` (default 1 and 0).
    Pairwise,
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
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ReadReport {
    /// The records, in file order.
    pub records: Vec<PreferenceRecord>,
    /// Malformed lines (JSONL) or rows (parquet) skipped with `skip_bad_lines`: `(1-based
    /// line or row number, where and why)`, the second naming the line (`line 3: …`) or row
    /// (`row 3: …`), after its file when a folder was read (`data/b.jsonl, line 3: …`).
    pub skipped: Vec<(usize, String)>,
}

/// Reads a dataset: one file, or every `*.jsonl` and `*.parquet` file of a folder in name
/// order (the shards of a downloaded dataset; point it at one split's files). A `.parquet`
/// file is read row by row (each row is what a JSONL line would hold: string columns, number
/// columns, lists and structs), any other file as JSONL. A malformed line or row (bad JSON,
/// missing fields, a column of the wrong type, a score that is not a finite number, bytes
/// that are not UTF-8) is a [`RefaError::Data`] naming the file and the line, or a
/// [`RefaError::DataRow`] naming the file and the row, unless `skip_bad_lines`, which skips
/// and reports it. A file that is not parquet at all is a [`RefaError::Config`] naming it.
pub fn read_dataset(
    path: impl AsRef<Path>,
    format: DataFormat,
    score: ScoreField,
    skip_bad_lines: bool,
) -> Result<ReadReport> {
    read_files(
        path.as_ref(),
        &["jsonl", "parquet"],
        format,
        score,
        skip_bad_lines,
    )
}

/// Reads a JSONL file (whatever its name), or every `*.jsonl` file of a folder in name
/// order; [`read_dataset`] reads parquet too. Errors as [`read_dataset`]'s. Empty lines are
/// ignored.
pub fn read_jsonl(
    path: impl AsRef<Path>,
    format: DataFormat,
    score: ScoreField,
    skip_bad_lines: bool,
) -> Result<ReadReport> {
    read_files(path.as_ref(), &["jsonl"], format, score, skip_bad_lines)
}

/// `path`, or the files of the folder `path` with one of `extensions`, each read by its
/// extension (parquet only where `extensions` holds it).
fn read_files(
    path: &Path,
    extensions: &[&str],
    format: DataFormat,
    score: ScoreField,
    skip_bad_lines: bool,
) -> Result<ReadReport> {
    let files = data_files(path, extensions)?;
    let mut report = ReadReport::default();
    for file in &files {
        let source = file.display().to_string();
        let is_parquet = file.extension().is_some_and(|x| x == "parquet");
        let part = if is_parquet && extensions.contains(&"parquet") {
            parse_parquet(file, format, score, skip_bad_lines)?
        } else {
            let bytes = std::fs::read(file).map_err(|e| RefaError::io(file, &e))?;
            parse_jsonl_bytes(&bytes, &source, format, score, skip_bad_lines)?
        };
        report.records.extend(part.records);
        report.skipped.extend(
            part.skipped
                .into_iter()
                .map(|(line, why)| match files.len() {
                    1 => (line, why),
                    _ => (line, format!("{source}, {why}")),
                }),
        );
    }
    Ok(report)
}

/// `path` itself, or the files of the folder `path` with one of `extensions`, in name order
/// (at least one).
fn data_files(path: &Path, extensions: &[&str]) -> Result<Vec<std::path::PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let entries = std::fs::read_dir(path).map_err(|e| RefaError::io(path, &e))?;
    let mut files: Vec<std::path::PathBuf> = entries
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| {
            p.extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| extensions.contains(&x))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        let wanted: Vec<String> = extensions.iter().map(|x| format!("*.{x}")).collect();
        return Err(RefaError::config(
            path,
            format!("a data folder without any {} file", wanted.join(" or ")),
        ));
    }
    Ok(files)
}

/// The records of a parquet file, row by row; errors name the file and the 1-based row.
fn parse_parquet(
    file: &Path,
    format: DataFormat,
    score: ScoreField,
    skip_bad_lines: bool,
) -> Result<ReadReport> {
    let source = file.display().to_string();
    let mut report = ReadReport::default();
    for (index, row) in super::parquet::parquet_rows(file)?.into_iter().enumerate() {
        match row.and_then(|value| parse_value(value, format, score)) {
            Ok(record) => report.records.push(record),
            Err(message) if skip_bad_lines => report
                .skipped
                .push((index + 1, format!("row {}: {message}", index + 1))),
            Err(message) => {
                return Err(RefaError::DataRow {
                    path: source,
                    row: index + 1,
                    message,
                })
            }
        }
    }
    Ok(report)
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
            Err(message) if skip_bad_lines => report
                .skipped
                .push((index + 1, format!("line {}: {message}", index + 1))),
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
    let value: Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
    parse_value(value, format, score)
}

/// One record from the JSON object of a line or a row.
fn parse_value(
    value: Value,
    format: DataFormat,
    score: ScoreField,
) -> std::result::Result<PreferenceRecord, String> {
    let format = match format {
        DataFormat::Auto => detect(&value)?,
        format => format,
    };
    let typed = |e: serde_json::Error| e.to_string();
    match format {
        // `detect` never answers Auto.
        DataFormat::Auto => Err("the format could not be detected".to_string()),
        DataFormat::Simple => {
            let record: SimpleLine = serde_json::from_value(value).map_err(typed)?;
            let responses = record
                .responses
                .into_iter()
                .map(|r| ScoredResponse {
                    text: r.text,
                    score: r.score,
                })
                .collect();
            let (context, prompt) = record.prompt.into_prompt()?;
            Ok(PreferenceRecord {
                prompt,
                context,
                responses,
            })
        }
        DataFormat::UltraFeedback => {
            let record: UltraFeedbackLine = serde_json::from_value(value).map_err(typed)?;
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
                context: Vec::new(),
                responses,
            })
        }
        DataFormat::MultiResponse => {
            let record: MultiResponseLine = serde_json::from_value(value).map_err(typed)?;
            if record.all_generated_responses.len() != record.all_rm_scores.len() {
                return Err(format!(
                    "{} responses but {} scores",
                    record.all_generated_responses.len(),
                    record.all_rm_scores.len()
                ));
            }
            let responses = record
                .all_generated_responses
                .into_iter()
                .zip(record.all_rm_scores)
                .map(|(text, score)| {
                    finite_score("all_rm_scores", score).map(|score| ScoredResponse { text, score })
                })
                .collect::<std::result::Result<_, String>>()?;
            let (context, prompt) = record.prompt.into_prompt()?;
            Ok(PreferenceRecord {
                prompt,
                context,
                responses,
            })
        }
        DataFormat::Pairwise => {
            let record: PairwiseLine = serde_json::from_value(value).map_err(typed)?;
            let response = |field: &str, turn: Turn, score: Option<f64>, default: f64| {
                Ok::<_, String>(ScoredResponse {
                    text: turn.response(field)?,
                    score: finite_score(field, score.unwrap_or(default))?,
                })
            };
            let responses = vec![
                response("chosen", record.chosen, record.score_chosen, 1.0)?,
                response("rejected", record.rejected, record.score_rejected, 0.0)?,
            ];
            let (context, prompt) = record.prompt.into_prompt()?;
            Ok(PreferenceRecord {
                prompt,
                context,
                responses,
            })
        }
    }
}

/// The format of one line, from its keys.
fn detect(value: &Value) -> std::result::Result<DataFormat, String> {
    let has = |key: &str| value.get(key).is_some();
    Ok(if has("completions") {
        DataFormat::UltraFeedback
    } else if has("all_generated_responses") {
        DataFormat::MultiResponse
    } else if has("chosen") {
        DataFormat::Pairwise
    } else if has("responses") {
        DataFormat::Simple
    } else {
        return Err("no known format: expected `completions`, `responses`, \
                    `all_generated_responses` or `chosen`"
            .to_string());
    })
}

fn finite_score(field: &str, score: f64) -> std::result::Result<f64, String> {
    if score.is_finite() {
        Ok(score)
    } else {
        Err(format!("`{field}` holds {score}, not a finite number"))
    }
}

/// A chat message.
#[derive(Deserialize)]
struct Message {
    role: String,
    content: String,
}

/// A prompt or a response: plain text, or messages.
#[derive(Deserialize)]
#[serde(untagged)]
enum Turn {
    Text(String),
    Messages(Vec<Message>),
}

impl Turn {
    /// A prompt: `(the turns before the last user turn, its text)`. A message list must end
    /// with the user's turn.
    fn into_prompt(self) -> std::result::Result<(Vec<ChatMessage>, String), String> {
        match self {
            Turn::Text(text) => Ok((Vec::new(), text)),
            Turn::Messages(mut messages) => match messages.pop() {
                Some(last) if last.role == "user" => {
                    let context = messages
                        .into_iter()
                        .map(|m| ChatMessage::new(&m.role, &m.content))
                        .collect();
                    Ok((context, last.content))
                }
                _ => Err("a prompt's messages must end with the user's turn".to_string()),
            },
        }
    }

    /// A response: the text itself, or the content of the last message, which must be the
    /// assistant's.
    fn response(self, field: &str) -> std::result::Result<String, String> {
        match self {
            Turn::Text(text) => Ok(text),
            Turn::Messages(mut messages) => match messages.pop() {
                Some(last) if last.role == "assistant" => Ok(last.content),
                _ => Err(format!("`{field}` does not end with an assistant message")),
            },
        }
    }
}

#[derive(Deserialize)]
struct SimpleLine {
    prompt: Turn,
    responses: Vec<SimpleResponse>,
}

#[derive(Deserialize)]
struct MultiResponseLine {
    prompt: Turn,
    all_generated_responses: Vec<String>,
    all_rm_scores: Vec<f64>,
}

#[derive(Deserialize)]
struct PairwiseLine {
    prompt: Turn,
    chosen: Turn,
    rejected: Turn,
    #[serde(default)]
    score_chosen: Option<f64>,
    #[serde(default)]
    score_rejected: Option<f64>,
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
