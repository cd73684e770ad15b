//! Preference data on disk, in JSONL (one JSON object per line) or parquet (one row per
//! record, the Hub's format), in any of four layouts ([`DataFormat`]), read into
//! [`PreferenceRecord`]s.

use std::path::Path;

use serde_json::Value;

use super::json::{self, Node, Parsed};

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
    /// Where each record was read: `(index into files, 1-based line or row)`.
    origins: Vec<(usize, usize)>,
    /// The files read: the name errors use, and whether records are rows (parquet) or lines.
    files: Vec<(String, bool)>,
}

impl ReadReport {
    /// Where record `index` was read, as errors name it: `data/a.jsonl, line 3` or
    /// `data/b.parquet, row 7` (a record of a JSON array: the line it starts on). `None` for
    /// an index past the records as read.
    pub fn origin(&self, index: usize) -> Option<String> {
        let &(file, number) = self.origins.get(index)?;
        let (name, rows) = self.files.get(file)?;
        Some(match rows {
            true => format!("{name}, row {number}"),
            false => format!("{name}, line {number}"),
        })
    }

    /// A report of the records of one file, `name`, read as rows (parquet) or lines.
    fn of_file(name: &str, rows: bool) -> Self {
        ReadReport {
            files: vec![(name.to_string(), rows)],
            ..ReadReport::default()
        }
    }

    /// Adds the record read at line or row `number` of the last file.
    fn push(&mut self, record: PreferenceRecord, number: usize) {
        self.records.push(record);
        self.origins
            .push((self.files.len().saturating_sub(1), number));
    }

    /// Appends the report of another file, skipped entries named after `source` when
    /// `name_files`.
    fn extend(&mut self, other: ReadReport, source: &str, name_files: bool) {
        let first = self.files.len();
        self.files.extend(other.files);
        self.records.extend(other.records);
        self.origins.extend(
            other
                .origins
                .into_iter()
                .map(|(file, number)| (first + file, number)),
        );
        self.skipped.extend(
            other
                .skipped
                .into_iter()
                .map(|(line, why)| match name_files {
                    false => (line, why),
                    true => (line, format!("{source}, {why}")),
                }),
        );
    }
}

/// Reads a dataset: one file, or every `*.jsonl` and `*.parquet` file of a folder in name
/// order (the shards of a downloaded dataset; point it at one split's files). A `.parquet`
/// file is read row by row (each row is what a JSONL line would hold: string columns, number
/// columns, lists and structs), any other file as JSONL or as one JSON array of records
/// (see [`parse_jsonl_bytes`]). A malformed line or row (bad JSON, missing fields, a field
/// of the wrong type, a score that is not a finite number within f32's range, bytes that are
/// not UTF-8) is a [`RefaError::Data`] naming the file, the line and the field, or a
/// [`RefaError::DataRow`] naming the file and the row, unless `skip_bad_lines`, which skips
/// and reports it. A file that is not parquet at all, or not JSON text (compressed,
/// UTF-16, a parquet file under another name), is a [`RefaError::Config`] naming it.
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

/// Reads a JSONL file (whatever its name, a JSON array of records too), or every `*.jsonl`
/// file of a folder in name order; [`read_dataset`] reads parquet too. Errors as
/// [`read_dataset`]'s. Empty lines are ignored.
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
        let is_parquet = file
            .extension()
            .is_some_and(|x| x.eq_ignore_ascii_case("parquet"));
        let part = if is_parquet && extensions.contains(&"parquet") {
            parse_parquet(file, format, score, skip_bad_lines)?
        } else {
            let bytes = std::fs::read(file).map_err(|e| read_error(file, e))?;
            parse_jsonl_bytes(&bytes, &source, format, score, skip_bad_lines)?
        };
        report.extend(part, &source, files.len() > 1);
    }
    Ok(report)
}

/// The error of reading `file`: the operating system's, or for a symbolic link whose target
/// is missing, one that names the target (the OS names neither).
pub(super) fn read_error(file: &Path, error: std::io::Error) -> RefaError {
    match std::fs::read_link(file) {
        Ok(target) if error.kind() == std::io::ErrorKind::NotFound => RefaError::Io {
            path: file.display().to_string(),
            message: format!(
                "a symbolic link to {}, which does not exist",
                target.display()
            ),
            source: Some(crate::error::ErrorSource::new(error)),
        },
        _ => RefaError::io(file, &error),
    }
}

/// `path` itself, or the files of the folder `path` with one of `extensions` (in any case:
/// `.JSONL` too), in name order (at least one; a folder without any is an error that lists
/// what it holds).
fn data_files(path: &Path, extensions: &[&str]) -> Result<Vec<std::path::PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let entries = std::fs::read_dir(path).map_err(|e| RefaError::io(path, &e))?;
    let (mut files, mut others) = (Vec::new(), Vec::new());
    for entry in entries {
        let entry = entry.map_err(|e| RefaError::io(path, &e))?;
        let file = entry.path();
        let wanted = file
            .extension()
            .and_then(|x| x.to_str())
            .is_some_and(|x| extensions.iter().any(|e| e.eq_ignore_ascii_case(x)));
        match wanted {
            true => files.push(file),
            false => others.push(entry.file_name().to_string_lossy().into_owned()),
        }
    }
    files.sort();
    if files.is_empty() {
        let wanted: Vec<String> = extensions.iter().map(|x| format!("*.{x}")).collect();
        others.sort();
        let listed = match others.len() {
            0 => "it is empty".to_string(),
            n if n <= 8 => format!("it holds {}", others.join(", ")),
            n => format!("it holds {}, … ({n} entries)", others[..8].join(", ")),
        };
        return Err(RefaError::config(
            path,
            format!(
                "a data folder without any {} file ({listed}): name one data file (a .json \
                 file of JSONL or of one JSON array is read when named), or the folder that \
                 holds one split's shards",
                wanted.join(" or ")
            ),
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
    let mut report = ReadReport::of_file(&source, true);
    for (index, row) in super::parquet::parquet_rows(file)?.into_iter().enumerate() {
        match row.and_then(|value| parse_value(value, format, score)) {
            Ok(record) => report.push(record, index + 1),
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

/// [`read_jsonl`] on bytes already in memory; `source` names them in errors.
///
/// The text is JSONL, decoded line by line, so that a line that is not UTF-8 is reported
/// (or skipped) by its number like any other malformed line; or, where its first character
/// other than whitespace is `[`, one JSON array of records (what `json.dump(records, f)`
/// writes), each record named by the line it starts on. A UTF-8 byte-order mark at the start
/// of a line is ignored. Text that cannot be JSON at all (UTF-16, compressed, a parquet or
/// Arrow file) is a [`RefaError::Config`] naming `source` and what it is.
pub fn parse_jsonl_bytes(
    bytes: &[u8],
    source: &str,
    format: DataFormat,
    score: ScoreField,
    skip_bad_lines: bool,
) -> Result<ReadReport> {
    if let Some(what) = not_json_text(bytes) {
        return Err(RefaError::config(source, what));
    }
    let bytes = bytes.strip_prefix(BOM).unwrap_or(bytes);
    if bytes.trim_ascii_start().starts_with(b"[") {
        return parse_json_array(bytes, source, format, score, skip_bad_lines);
    }
    let mut report = ReadReport::of_file(source, false);
    // Lines end with \n or \r\n; or with \r alone in a file without any \n (classic Mac
    // OS). A raw \r is never inside a valid JSON line.
    let end = match bytes.contains(&b'\n') {
        true => b'\n',
        false => b'\r',
    };
    let lines = bytes.split(|&b| b == end).count();
    let cut_short = !bytes.trim_ascii_end().is_empty() && !bytes.ends_with(&[end]);
    for (index, raw) in bytes.split(|&b| b == end).enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let raw = raw.strip_prefix(BOM).unwrap_or(raw);
        let place = json::Place::Line {
            last: cut_short && index + 1 == lines,
        };
        let parsed = std::str::from_utf8(raw)
            .map_err(|e| not_utf8(raw.get(e.valid_up_to()), e.valid_up_to()))
            .and_then(|line| match line.trim().is_empty() {
                true => Ok(None),
                false => parse_line(line, place, format, score).map(Some),
            });
        match parsed {
            Ok(None) => {}
            Ok(Some(record)) => report.push(record, index + 1),
            Err(message) => {
                if report.records.is_empty() && report.skipped.is_empty() {
                    if let Some(why) = one_json_object(bytes, raw) {
                        return Err(RefaError::config(source, why));
                    }
                }
                if !skip_bad_lines {
                    return Err(RefaError::Data {
                        path: source.to_string(),
                        line: index + 1,
                        message,
                    });
                }
                report
                    .skipped
                    .push((index + 1, format!("line {}: {message}", index + 1)));
            }
        }
    }
    Ok(report)
}

/// The UTF-8 byte-order mark some editors (and PowerShell, and Excel's "CSV UTF-8") write.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Why `bytes` cannot be JSON text at all, judged by how they start: a UTF-16 or UTF-32
/// byte-order mark, a compressed stream, a parquet or Arrow file.
fn not_json_text(bytes: &[u8]) -> Option<String> {
    let starts = |magic: &[u8]| bytes.starts_with(magic);
    let what = if starts(b"\xFF\xFE\0\0") || starts(b"\0\0\xFE\xFF") {
        "UTF-32 text (it starts with a UTF-32 byte-order mark): save it as UTF-8"
    } else if starts(b"\xFF\xFE") || starts(b"\xFE\xFF") {
        "UTF-16 text (it starts with a UTF-16 byte-order mark): save it as UTF-8"
    } else if starts(b"\x1F\x8B") {
        "gzip-compressed: decompress it first (gunzip)"
    } else if starts(b"\x28\xB5\x2F\xFD") {
        "zstd-compressed: decompress it first (zstd -d)"
    } else if starts(b"BZh") && bytes.get(3).is_some_and(u8::is_ascii_digit) {
        "bzip2-compressed: decompress it first (bunzip2)"
    } else if starts(b"\xFD7zXZ\0") {
        "xz-compressed: decompress it first (unxz)"
    } else if starts(b"PK\x03\x04") {
        "a zip archive: extract it first"
    } else if starts(b"PAR1") {
        "a parquet file: name it *.parquet (and read it with read_dataset)"
    } else if starts(b"ARROW1") || starts(b"\xFF\xFF\xFF\xFF") {
        "an Arrow file (as `datasets`' save_to_disk writes): export the split with \
         to_parquet or to_json first"
    } else {
        return None;
    };
    Some(format!("not JSON text but {what}"))
}

/// Why a line is not UTF-8: `byte` is the first that is not, after `column` valid bytes of
/// its line.
fn not_utf8(byte: Option<&u8>, column: usize) -> String {
    format!(
        "not UTF-8 text (byte 0x{:02X} at column {}): the file is in another encoding \
         (Latin-1, Windows-1252?); save it as UTF-8",
        byte.copied().unwrap_or(0),
        column + 1
    )
}

/// For a file whose first record line, `line`, fails: where that line is not JSON on its own
/// but the whole text is one JSON object over several lines (a pretty-printed record, or
/// records wrapped in an object), why the file cannot be read.
fn one_json_object(bytes: &[u8], line: &[u8]) -> Option<String> {
    let lines = bytes.trim_ascii_end().split(|&b| b == b'\n').count();
    if lines < 2
        || !bytes.trim_ascii_start().starts_with(b"{")
        || serde_json::from_slice::<Value>(line).is_ok()
    {
        return None;
    }
    let value: Value = serde_json::from_slice(bytes).ok()?;
    let object = value.as_object()?;
    let mut keys: Vec<&str> = object.keys().map(String::as_str).take(6).collect();
    if object.len() > keys.len() {
        keys.push("…");
    }
    Some(format!(
        "one JSON object spread over {lines} lines (keys: {}), neither JSONL (one record per \
         line) nor a JSON array of records: write each record on one line (`jq -c`), or the \
         records as one JSON array",
        keys.join(", ")
    ))
}

/// The records of `bytes`, one JSON array (first character other than whitespace `[`):
/// each record named by the line it starts on, and skipped on its own with
/// `skip_bad_lines`; an array that does not close or pair up is an error at its line.
fn parse_json_array(
    bytes: &[u8],
    source: &str,
    format: DataFormat,
    score: ScoreField,
    skip_bad_lines: bool,
) -> Result<ReadReport> {
    let data_error = |line: usize, message: String| RefaError::Data {
        path: source.to_string(),
        line,
        message,
    };
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            let valid = &bytes[..e.valid_up_to()];
            let line = 1 + valid.iter().filter(|&&b| b == b'\n').count();
            let start = valid
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |at| at + 1);
            let message = not_utf8(bytes.get(valid.len()), valid.len() - start);
            return Err(data_error(line, message));
        }
    };
    let elements = json::array_elements(text).map_err(|(line, why)| data_error(line, why))?;
    let mut report = ReadReport::of_file(source, false);
    for (index, element) in elements.iter().enumerate() {
        let parsed = json::parse(element.text, json::Place::Array(element.line))
            .and_then(|value| parse_value(value, format, score))
            .map_err(|why| format!("record {} of the JSON array: {why}", index + 1));
        match parsed {
            Ok(record) => report.push(record, element.line),
            Err(message) if skip_bad_lines => report
                .skipped
                .push((element.line, format!("line {}: {message}", element.line))),
            Err(message) => return Err(data_error(element.line, message)),
        }
    }
    Ok(report)
}

fn parse_line(
    line: &str,
    place: json::Place,
    format: DataFormat,
    score: ScoreField,
) -> std::result::Result<PreferenceRecord, String> {
    let value = json::parse(line, place)?;
    parse_value(value, format, score)
}

/// One record from the JSON object of a line or a row.
fn parse_value(
    value: Value,
    format: DataFormat,
    score: ScoreField,
) -> std::result::Result<PreferenceRecord, String> {
    let record = Node::root(&value);
    record.require_object()?;
    let format = match format {
        DataFormat::Auto => detect(&record)?,
        format => format,
    };
    match format {
        // `detect` never answers Auto.
        DataFormat::Auto => Err("the format could not be detected".to_string()),
        DataFormat::Simple => {
            let (context, prompt) = prompt_turn(&record.get("prompt")?)?;
            let list = record.get("responses")?;
            let responses = list
                .items()?
                .map(|item| {
                    Ok(ScoredResponse {
                        text: item.get("text")?.string()?,
                        score: item.get("score")?.score(false)?,
                    })
                })
                .collect::<Parsed<_>>()?;
            Ok(PreferenceRecord {
                prompt,
                context,
                responses,
            })
        }
        DataFormat::UltraFeedback => {
            let prompt = record.get("instruction")?.string()?;
            let (name, label) = match score {
                ScoreField::Overall => ("overall_score", "overall"),
                ScoreField::FineGrained => ("fine-grained_score", "fine-grained"),
            };
            let list = record.get("completions")?;
            let responses = list
                .items()?
                .map(|completion| {
                    let text = completion.get("response")?.string()?;
                    let score = match completion.optional(name)? {
                        Some(value) => value.score(true)?,
                        None => {
                            return Err(format!(
                                "`{}.{name}` is missing or null: the {label} score is \
                                 needed (a score must be a finite number)",
                                completion.path()
                            ))
                        }
                    };
                    Ok(ScoredResponse { text, score })
                })
                .collect::<Parsed<_>>()?;
            Ok(PreferenceRecord {
                prompt,
                context: Vec::new(),
                responses,
            })
        }
        DataFormat::MultiResponse => {
            let texts = record.get("all_generated_responses")?;
            let scores = record.get("all_rm_scores")?;
            let texts: Vec<String> = texts.items()?.map(|t| t.string()).collect::<Parsed<_>>()?;
            let scores: Vec<f64> = scores
                .items()?
                .map(|s| s.score(false))
                .collect::<Parsed<_>>()?;
            if texts.len() != scores.len() {
                return Err(format!(
                    "{} responses but {} scores",
                    texts.len(),
                    scores.len()
                ));
            }
            let responses = texts
                .into_iter()
                .zip(scores)
                .map(|(text, score)| ScoredResponse { text, score })
                .collect();
            let (context, prompt) = prompt_turn(&record.get("prompt")?)?;
            Ok(PreferenceRecord {
                prompt,
                context,
                responses,
            })
        }
        DataFormat::Pairwise => {
            let response = |field: &'static str, score_field: &'static str, default: f64| {
                let text = response_turn(&record.get(field)?)?;
                let score = match record.optional(score_field)? {
                    Some(value) => value.score(false)?,
                    None => default,
                };
                Ok::<_, String>(ScoredResponse { text, score })
            };
            let responses = vec![
                response("chosen", "score_chosen", 1.0)?,
                response("rejected", "score_rejected", 0.0)?,
            ];
            let (context, prompt) = prompt_turn(&record.get("prompt")?)?;
            Ok(PreferenceRecord {
                prompt,
                context,
                responses,
            })
        }
    }
}

/// The format of one record, from its keys.
fn detect(record: &Node<'_>) -> std::result::Result<DataFormat, String> {
    Ok(if record.has("completions") {
        DataFormat::UltraFeedback
    } else if record.has("all_generated_responses") {
        DataFormat::MultiResponse
    } else if record.has("chosen") {
        DataFormat::Pairwise
    } else if record.has("responses") {
        DataFormat::Simple
    } else {
        let keys: Vec<String> = record
            .value()
            .as_object()
            .map(|o| o.keys().take(8).map(|k| format!("`{k}`")).collect())
            .unwrap_or_default();
        return Err(format!(
            "no known format: expected `completions`, `responses`, \
             `all_generated_responses` or `chosen`; the record has {}",
            match keys.is_empty() {
                true => "no fields".to_string(),
                false => keys.join(", "),
            }
        ));
    })
}

/// The messages of a turn given as a list: `(role, content)` each.
fn messages(turn: &Node<'_>) -> Parsed<Vec<(String, String)>> {
    turn.items()?
        .map(|m| Ok((m.get("role")?.string()?, m.get("content")?.string()?)))
        .collect()
}

/// A prompt: plain text, or messages that end with the user's turn: `(the turns before the
/// last user turn, its text)`.
fn prompt_turn(turn: &Node<'_>) -> Parsed<(Vec<ChatMessage>, String)> {
    if let Some(text) = turn.as_text() {
        return Ok((Vec::new(), text.to_string()));
    }
    if !turn.is_list() {
        return Err(turn_type(turn));
    }
    let mut messages = messages(turn)?;
    match messages.pop() {
        Some((role, content)) if role == "user" => {
            let context = messages
                .iter()
                .map(|(role, content)| ChatMessage::new(role, content))
                .collect();
            Ok((context, content))
        }
        last => Err(format!(
            "`{}`: a prompt's messages must end with the user's turn ({})",
            turn.path(),
            match last {
                None => "the list is empty".to_string(),
                Some((role, _)) => format!("the last is the {role:?} turn"),
            }
        )),
    }
}

/// A response: the text itself, or the content of the last message, which must be the
/// assistant's.
fn response_turn(turn: &Node<'_>) -> Parsed<String> {
    if let Some(text) = turn.as_text() {
        return Ok(text.to_string());
    }
    if !turn.is_list() {
        return Err(turn_type(turn));
    }
    match messages(turn)?.pop() {
        Some((role, content)) if role == "assistant" => Ok(content),
        _ => Err(format!(
            "`{}` does not end with an assistant message",
            turn.path()
        )),
    }
}

/// A turn that is neither text nor a list of messages.
fn turn_type(turn: &Node<'_>) -> String {
    turn.string().err().unwrap_or_default().replace(
        "expected a string",
        "expected a string or a list of messages ({\"role\": …, \"content\": …})",
    )
}
