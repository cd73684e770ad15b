//! Preference data for the trainer (cargo feature `trainer`): JSONL and parquet readers,
//! tokenization with chat templates, batching.

mod batches;
mod examples;
mod json;
mod parquet;
mod records;

pub use batches::{collate, collate_shared, split_eval, Collated, DataOrder, SharedCollated};
pub use examples::{
    tokenize_all, tokenize_records, tokenize_records_named, TokenizeReport, TokenizedExample,
};
pub use records::{
    parse_jsonl, parse_jsonl_bytes, read_dataset, read_jsonl, DataFormat, PreferenceRecord,
    ReadReport, ScoreField, ScoredResponse,
};
