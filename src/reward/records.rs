//! The files of on-policy training: prompt lines in, multi-response lines out.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{RefaError, Result};

/// A prompt as one JSONL line holds it: the instruction, and every other field of the line
/// (a `constraint`, a `topic`, a reference answer…) kept for the reward to read and written
/// back with the answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prompt {
    /// The user's instruction.
    pub prompt: String,
    /// The line's other fields.
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

impl Prompt {
    /// A prompt without other fields.
    pub fn new(prompt: impl Into<String>) -> Self {
        Prompt {
            prompt: prompt.into(),
            fields: Map::new(),
        }
    }

    /// The same prompt with `field` set to `value`.
    pub fn with(mut self, field: &str, value: Value) -> Self {
        self.fields.insert(field.to_string(), value);
        self
    }
}

/// Reads prompts from a JSONL file: one object per line with a string `prompt` (other fields
/// kept in [`Prompt::fields`]); blank lines are skipped, a UTF-8 byte-order mark and CRLF
/// line ends are accepted.
///
/// # Errors
/// [`RefaError::Io`] when the file cannot be read; [`RefaError::Data`] naming the file and
/// the 1-based line for a line that is not UTF-8, not a JSON object, or has no string
/// `prompt`; [`RefaError::Config`] for a file without any prompt.
pub fn read_prompts(path: impl AsRef<Path>) -> Result<Vec<Prompt>> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| RefaError::io(path, &e))?;
    let bytes = bytes.strip_prefix("\u{feff}".as_bytes()).unwrap_or(&bytes);
    let mut prompts = Vec::new();
    for (index, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let line = std::str::from_utf8(raw).map_err(|e| data_error(path, index, format!("not UTF-8 text ({e})")))?;
        if line.trim().is_empty() {
            continue;
        }
        prompts.push(parse_prompt(line).map_err(|message| data_error(path, index, message))?);
    }
    if prompts.is_empty() {
        return Err(RefaError::config(path, "holds no prompt line (`{\"prompt\": …}`)"));
    }
    Ok(prompts)
}

fn parse_prompt(line: &str) -> std::result::Result<Prompt, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let Value::Object(mut fields) = value else {
        return Err("not a JSON object (expected {\"prompt\": \"…\", …})".to_string());
    };
    match fields.remove("prompt") {
        Some(Value::String(prompt)) => Ok(Prompt { prompt, fields }),
        Some(other) => Err(format!("`prompt` is {other}, not a string")),
        None => Err("no `prompt` field".to_string()),
    }
}

fn data_error(path: &Path, index: usize, message: String) -> RefaError {
    RefaError::Data {
        path: path.display().to_string(),
        line: index + 1,
        message,
    }
}

/// One line of the multi-response layout the trainer reads (its data format
/// `multi-response`, SimPO's and REFA v4's on-policy sets): the prompt's fields,
/// `all_generated_responses` and, once scored, `all_rm_scores`.
#[derive(Debug, Clone, PartialEq)]
pub struct MultiResponseRecord {
    /// The prompt and its other fields (written as they were read).
    pub prompt: Prompt,
    /// The answers.
    pub responses: Vec<String>,
    /// One finite score per answer; `None` before scoring (the trainer needs them).
    pub scores: Option<Vec<f64>>,
}

impl MultiResponseRecord {
    /// Records of `prompts[i]` with `responses[i]` and, when given, `scores[i]` (the three
    /// lists zipped; extra entries of a longer one are left out).
    pub fn zip(prompts: &[Prompt], responses: &[Vec<String>], scores: Option<&[Vec<f64>]>) -> Vec<Self> {
        prompts
            .iter()
            .zip(responses)
            .enumerate()
            .map(|(i, (prompt, answers))| MultiResponseRecord {
                prompt: prompt.clone(),
                responses: answers.clone(),
                scores: scores.and_then(|s| s.get(i)).cloned(),
            })
            .collect()
    }

    /// The JSON object of the line: `prompt`, the other fields, `all_generated_responses`,
    /// and `all_rm_scores` when scored (these three replace fields of the same names).
    pub fn to_json(&self) -> Value {
        let mut object = self.prompt.fields.clone();
        object.insert("prompt".into(), self.prompt.prompt.clone().into());
        object.insert("all_generated_responses".into(), self.responses.clone().into());
        match &self.scores {
            Some(scores) => object.insert("all_rm_scores".into(), scores.clone().into()),
            None => object.remove("all_rm_scores"),
        };
        Value::Object(object)
    }

    /// As many scores as answers, each finite (JSON has no NaN: it would be written `null`).
    fn check(&self, index: usize) -> Result<()> {
        let Some(scores) = &self.scores else {
            return Ok(());
        };
        if scores.len() != self.responses.len() {
            let what = format!("{} scores for {} answers (record {index})", scores.len(), self.responses.len());
            return Err(RefaError::option("all_rm_scores", what, "one score per answer"));
        }
        match scores.iter().enumerate().find(|(_, s)| !s.is_finite()) {
            Some((k, &value)) => Err(RefaError::InvalidValue {
                tensor: "all_rm_scores",
                position: format!("record {index}, answer {k}"),
                value,
                requirement: "a finite number (JSON cannot hold NaN or infinity)",
            }),
            None => Ok(()),
        }
    }
}

/// Writes `records` as JSONL at `path`, atomically: the lines go to a hidden file beside it,
/// which is synced and then renamed over `path`, so a reader (or a crash) sees the old file
/// or the whole new one, never a part. The folder is created when missing.
///
/// # Errors
/// A record with as many scores as answers but a non-finite one, or a different count
/// (checked before anything is written); I/O errors naming the file.
pub fn write_multi_response(path: impl AsRef<Path>, records: &[MultiResponseRecord]) -> Result<()> {
    let path = path.as_ref();
    for (index, record) in records.iter().enumerate() {
        record.check(index)?;
    }
    let mut text = String::new();
    for record in records {
        text.push_str(&record.to_json().to_string());
        text.push('\n');
    }
    write_atomically(path, text.as_bytes())
}

/// `bytes` to `path` through a synced hidden sibling and a rename.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let folder = match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(folder) => folder.to_path_buf(),
        None => PathBuf::from("."),
    };
    std::fs::create_dir_all(&folder).map_err(|e| RefaError::io(&folder, &e))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temporary = folder.join(format!(".{name}.{}.partial", std::process::id()));
    let written = std::fs::File::create(&temporary)
        .and_then(|mut file| {
            file.write_all(bytes)?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&temporary, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temporary);
        return Err(RefaError::io(path, &e));
    }
    // The rename itself survives a crash once the folder is synced.
    if let Ok(dir) = std::fs::File::open(&folder) {
        let _ = dir.sync_all();
    }
    Ok(())
}
