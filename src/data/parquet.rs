//! `.parquet` datasets, the Hugging Face Hub's storage format: each row is turned into the
//! JSON object a JSONL line of the same dataset would hold (strings, numbers, lists, structs
//! as objects), so one parser serves both.

use std::cell::Cell;
use std::panic::{catch_unwind, UnwindSafe};
use std::path::Path;
use std::sync::Once;

use parquet::file::reader::{FileReader, SerializedFileReader};
use serde_json::Value;

use crate::error::{RefaError, Result};

/// Every row of the parquet file `path` as a JSON object, in file order, or why that row
/// could not be decoded. A file that is not parquet (or that the reader cannot open) is a
/// [`RefaError::Config`] naming it.
///
/// The `parquet` crate may panic on a corrupt file rather than return an error; such a panic
/// is caught here and reported as the file's error, so that bad input never takes the
/// caller's process down.
pub(super) fn parquet_rows(path: &Path) -> Result<Vec<std::result::Result<Value, String>>> {
    let file = std::fs::File::open(path).map_err(|e| RefaError::io(path, &e))?;
    let decoded = quiet_catch_unwind(move || decode(file));
    match decoded {
        Ok(Ok(rows)) => Ok(rows),
        Ok(Err(why)) => Err(RefaError::config(
            path,
            format!("not a readable parquet file: {why}"),
        )),
        Err(_) => Err(RefaError::config(
            path,
            "the parquet reader failed on this file (corrupt or unsupported)",
        )),
    }
}

fn decode(
    file: std::fs::File,
) -> std::result::Result<Vec<std::result::Result<Value, String>>, String> {
    let bytes = file.metadata().map_err(|e| e.to_string())?.len() as usize;
    let reader = SerializedFileReader::new(file).map_err(|e| e.to_string())?;
    let declared = usize::try_from(reader.metadata().file_metadata().num_rows()).unwrap_or(0);
    // And the footer itself may be damaged: a preference record holds text, so a file cannot
    // hold more rows than it has bytes (dictionary and run-length encodings included).
    if declared > bytes {
        return Err(format!(
            "its footer declares {declared} rows in {bytes} bytes (damaged file)"
        ));
    }
    let rows = reader.get_row_iter(None).map_err(|e| e.to_string())?;
    // A damaged page can make the row reader yield rows without end: never read more rows
    // than the footer declares.
    let rows: Vec<_> = rows
        .take(declared.saturating_add(1))
        .map(|row| row.map(|r| r.to_json_value()).map_err(|e| e.to_string()))
        .collect();
    if rows.len() > declared {
        return Err(format!(
            "its pages hold more rows than the {declared} its footer declares (damaged file)"
        ));
    }
    Ok(rows)
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
