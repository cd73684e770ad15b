//! `.parquet` datasets, the Hugging Face Hub's storage format: each row is turned into the
//! JSON object a JSONL line of the same dataset would hold (strings, numbers, lists, structs
//! as objects), so one parser serves both.

use std::cell::Cell;
use std::panic::{catch_unwind, UnwindSafe};
use std::path::Path;
use std::sync::Once;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use serde_json::Value;

use crate::error::{RefaError, Result};

/// Every row of the parquet file `path` as a JSON object, in file order, or why that row
/// could not be decoded. A file that is not parquet (or that the reader cannot open), whose
/// footer contradicts itself, or whose rows would not fit in memory once decoded is a
/// [`RefaError::Config`] naming it. A NaN or infinite float becomes a stand-in that names
/// itself when its field is read as a score.
///
/// The `parquet` crate may panic on a corrupt file rather than return an error; such a panic
/// is caught here and reported as the file's error, so that bad input never takes the
/// caller's process down.
pub(super) fn parquet_rows(path: &Path) -> Result<Vec<std::result::Result<Value, String>>> {
    let file = std::fs::File::open(path).map_err(|e| super::records::read_error(path, e))?;
    let limit = memory_limit();
    let decoded = quiet_catch_unwind(move || decode(file, limit));
    match decoded {
        Ok(Ok(rows)) => Ok(rows),
        Ok(Err(why)) => Err(RefaError::config(path, why)),
        Err(_) => Err(RefaError::config(
            path,
            "the parquet reader failed on this file (corrupt or unsupported)",
        )),
    }
}

/// The least a decoded row takes in memory: its slot in the vector of rows.
const ROW_BYTES: u64 = std::mem::size_of::<std::result::Result<Value, String>>() as u64;

/// What one JSON value takes in memory besides the text it holds (the value itself, and
/// for a field of an object its key's entry), as [`decode`] counts it.
const VALUE_BYTES: u64 = std::mem::size_of::<Value>() as u64;

/// The rows of a parquet file as JSON objects, at most `limit` bytes of them once decoded.
///
/// How many bytes a file holds says little of how many rows it decodes to: dictionary and
/// run-length encodings store a column of repeated values in a few bytes (6 400 rows of one
/// record fit in 4 kB), and a damaged or hostile footer may declare billions. So the rows
/// are bounded by what they take decoded, against the memory there is: before reading, by
/// the rows the footer declares (each takes at least [`ROW_BYTES`]) and the bytes its column
/// chunks hold uncompressed; while reading, by the size of each decoded row. A damaged page
/// can also make the row reader yield rows without end: never more are read than the footer
/// declares.
fn decode(
    file: std::fs::File,
    limit: u64,
) -> std::result::Result<Vec<std::result::Result<Value, String>>, String> {
    let reader =
        SerializedFileReader::new(file).map_err(|e| format!("not a readable parquet file: {e}"))?;
    let metadata = reader.metadata();
    let declared = metadata.file_metadata().num_rows();
    let damaged = |what: String| format!("not a readable parquet file: {what} (damaged file)");
    let mut grouped = 0i64;
    let mut uncompressed = 0u64;
    for group in metadata.row_groups() {
        if group.num_rows() < 0 {
            return Err(damaged(format!("a row group of {} rows", group.num_rows())));
        }
        grouped = grouped.saturating_add(group.num_rows());
        for column in group.columns() {
            let size = u64::try_from(column.uncompressed_size()).map_err(|_| {
                damaged(format!(
                    "a column chunk of {} bytes",
                    column.uncompressed_size()
                ))
            })?;
            uncompressed = uncompressed.saturating_add(size);
        }
    }
    if declared != grouped {
        return Err(damaged(format!(
            "its footer declares {declared} rows, its row groups {grouped}"
        )));
    }
    let declared = declared as u64;
    let too_large = |what: String| {
        format!(
            "{what}, more than the {} that reading it may take now (half the memory \
             available to this process): a damaged file, or one too large for this machine; \
             split it into shards of fewer rows",
            gib(limit)
        )
    };
    if declared.saturating_mul(ROW_BYTES) > limit {
        return Err(too_large(format!(
            "its footer declares {declared} rows, which take at least {} decoded",
            gib(declared.saturating_mul(ROW_BYTES))
        )));
    }
    if uncompressed > limit {
        return Err(too_large(format!(
            "its column chunks hold {} uncompressed",
            gib(uncompressed)
        )));
    }
    let rows = reader
        .get_row_iter(None)
        .map_err(|e| format!("not a readable parquet file: {e}"))?;
    let mut decoded = Vec::new();
    let mut taken = 0u64;
    for row in rows.take(
        usize::try_from(declared)
            .unwrap_or(usize::MAX)
            .saturating_add(1),
    ) {
        if decoded.len() as u64 == declared {
            return Err(damaged(format!(
                "its pages hold more rows than the {declared} its footer declares"
            )));
        }
        let mut size = ROW_BYTES;
        let row = row
            .map(|r| row_json(r.get_column_iter(), &mut size))
            .map_err(|e| e.to_string());
        taken = taken.saturating_add(size);
        if taken > limit {
            return Err(too_large(format!(
                "its first {} rows take {} decoded",
                decoded.len() + 1,
                gib(taken)
            )));
        }
        decoded.push(row);
    }
    Ok(decoded)
}

/// A row, or a struct column's value, as a JSON object; `size` grows by what it takes.
fn row_json<'a>(fields: impl Iterator<Item = (&'a String, &'a Field)>, size: &mut u64) -> Value {
    Value::Object(
        fields
            .map(|(key, field)| {
                *size = size.saturating_add(VALUE_BYTES + key.len() as u64);
                (key.clone(), field_json(field, size))
            })
            .collect(),
    )
}

/// A field as JSON, as `Field::to_json_value` writes it, except that a NaN or infinite
/// float (which JSON cannot hold; `to_json_value` makes it null) becomes a stand-in that
/// names it, binary data its UTF-8 text (or a stand-in), and a decimal a number; `size`
/// grows by what it takes.
fn field_json(field: &Field, size: &mut u64) -> Value {
    *size = size.saturating_add(VALUE_BYTES);
    let float = match field {
        Field::Float(x) => Some(f64::from(*x)),
        Field::Double(x) => Some(*x),
        Field::Float16(x) => Some(f64::from(*x)),
        _ => None,
    };
    match field {
        _ if float.is_some_and(f64::is_nan) => super::json::stand_in("a NaN float"),
        _ if float.is_some_and(f64::is_infinite) => super::json::stand_in(&format!(
            "an infinite float ({})",
            float.unwrap_or_default()
        )),
        Field::Group(row) => row_json(row.get_column_iter(), size),
        Field::ListInternal(list) => Value::Array(
            list.elements()
                .iter()
                .map(|f| field_json(f, size))
                .collect(),
        ),
        // A column of binary values (Spark and Impala write text so, without the UTF-8
        // annotation): its text where it is UTF-8, as Spark's `binaryAsString` reads it,
        // never the base64 that `to_json_value` writes.
        Field::Bytes(bytes) => match std::str::from_utf8(bytes.data()) {
            Ok(text) => {
                *size = size.saturating_add(text.len() as u64);
                Value::String(text.to_string())
            }
            Err(_) => super::json::stand_in(&format!(
                "{} bytes of binary data, not UTF-8 text",
                bytes.data().len()
            )),
        },
        // A decimal column is a number (`to_json_value` writes its digits as a string).
        Field::Decimal(_) => match field.to_json_value() {
            Value::String(digits) => digits
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
                .map_or(Value::String(digits), Value::Number),
            other => other,
        },
        Field::MapInternal(map) => Value::Object(
            map.entries()
                .iter()
                .map(|(key, value)| {
                    let key = match key.to_json_value() {
                        Value::String(text) => text,
                        other => other.to_string(),
                    };
                    *size = size.saturating_add(VALUE_BYTES + key.len() as u64);
                    (key, field_json(value, size))
                })
                .collect(),
        ),
        other => {
            let value = other.to_json_value();
            if let Value::String(text) = &value {
                *size = size.saturating_add(text.len() as u64);
            }
            value
        }
    }
}

/// `bytes` in GiB (MiB below one GiB), for messages.
fn gib(bytes: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    match bytes as f64 / MIB {
        mib if mib < 1024.0 => format!("{mib:.1} MiB"),
        mib => format!("{:.1} GiB", mib / 1024.0),
    }
}

/// What the decoded rows of one file may take: half the memory available to this process
/// (the kernel's `MemAvailable`, and where a cgroup limits memory, its limit less its use),
/// or 8 GiB where neither can be read.
fn memory_limit() -> u64 {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let number = |text: Option<String>| text.and_then(|t| t.trim().parse::<u64>().ok());
    let available = read("/proc/meminfo").and_then(|info| {
        let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib.saturating_mul(1024))
    });
    let cgroup = match (
        number(read("/sys/fs/cgroup/memory.max")),
        number(read("/sys/fs/cgroup/memory.current")),
    ) {
        (Some(max), Some(used)) => Some(max.saturating_sub(used)),
        _ => None,
    };
    let available = match (available, cgroup) {
        (Some(a), Some(c)) => Some(a.min(c)),
        (a, c) => a.or(c),
    };
    available.map_or(8 << 30, |bytes| bytes / 2)
}

thread_local! {
    /// Whether this thread is inside [`quiet_catch_unwind`].
    static CATCHING: Cell<bool> = const { Cell::new(false) };
}

/// `catch_unwind` without the panic message on stderr: a damaged file is reported once, as
/// the error it becomes. Panics elsewhere (other threads, or this one outside `f`) still
/// reach the previous hook.
fn quiet_catch_unwind<T>(f: impl FnOnce() -> T + UnwindSafe) -> std::thread::Result<T> {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !CATCHING.with(Cell::get) {
                previous(info);
            }
        }));
    });
    CATCHING.with(|c| c.set(true));
    let result = catch_unwind(f);
    CATCHING.with(|c| c.set(false));
    result
}

#[cfg(test)]
mod tests {
    use std::io::{BufReader, Cursor};
    use std::sync::Arc;

    use super::*;

    /// `rows` copies of one record as a parquet file, one row group (a few kilobytes for
    /// thousands of rows: dictionary and run-length encoded).
    fn repeated(rows: usize) -> tempfile::NamedTempFile {
        let line = r#"{"prompt": "2 + 2?", "all_generated_responses": ["4", "5"], "all_rm_scores": [0.9, -1.2]}"#;
        let (schema, _) =
            arrow_json::reader::infer_json_schema(BufReader::new(Cursor::new(line)), None)
                .expect("schema");
        let schema = Arc::new(schema);
        let jsonl = format!("{line}\n").repeat(rows);
        let batches = arrow_json::ReaderBuilder::new(schema.clone())
            .with_batch_size(1 << 16)
            .build(BufReader::new(Cursor::new(jsonl)))
            .expect("reader");
        let file = tempfile::NamedTempFile::new().expect("temp file");
        let properties = parquet::file::properties::WriterProperties::builder()
            .set_compression(parquet::basic::Compression::SNAPPY)
            .build();
        let mut writer = parquet::arrow::ArrowWriter::try_new(
            file.reopen().expect("reopen"),
            schema,
            Some(properties),
        )
        .expect("writer");
        for batch in batches {
            writer.write(&batch.expect("batch")).expect("write");
        }
        writer.close().expect("close");
        file
    }

    /// Rows are bounded by what they take decoded, against the limit: the rows the footer
    /// declares before anything is read, and the decoded rows while reading.
    #[test]
    fn decoded_rows_are_bounded_by_the_memory_limit_not_by_the_file_size() {
        let file = repeated(10_000);
        let open = || file.reopen().expect("reopen");
        let bytes = file.as_file().metadata().expect("size").len();
        assert!(bytes < 10_000, "{bytes} bytes");
        assert_eq!(decode(open(), 1 << 30).expect("fits").len(), 10_000);
        let err = decode(open(), 10_000 * ROW_BYTES - 1).unwrap_err();
        assert!(
            err.starts_with("its footer declares 10000 rows, which take at least"),
            "{err}"
        );
        assert!(err.contains("split it into shards"), "{err}");
        let err = decode(open(), 10_000 * ROW_BYTES + 4096).unwrap_err();
        assert!(err.starts_with("its first "), "{err}");
        assert!(err.contains("rows take"), "{err}");
    }

    #[test]
    fn the_limit_is_half_the_available_memory() {
        let limit = memory_limit();
        assert!(limit >= 1 << 20, "{limit}");
        assert_eq!(gib(3 << 29), "1.5 GiB");
        assert_eq!(gib(5 << 19), "2.5 MiB");
    }
}
