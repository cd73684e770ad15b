//! The flags that choose the preference data and how it is cut into tokens.

use std::path::{Path, PathBuf};

use crate::cli::bundled::SAMPLE_DATA;
use crate::data::{
    parse_jsonl, read_dataset, split_eval, tokenize_records_named, DataFormat, ReadReport,
    ScoreField, TokenizeReport, TokenizedExample,
};
use crate::error::{RefaError, Result};
use crate::model::{ChatTokenizer, ModelConfig};

/// The name errors give the bundled sample data.
const SAMPLE_NAME: &str = "bundled sample.jsonl";

/// `data` read in `format` ([`read_dataset`]), or the bundled sample
/// ([`SAMPLE_DATA`](crate::cli::SAMPLE_DATA), simple layout) when it is `None`.
pub fn read_records(
    data: Option<&Path>,
    format: DataFormat,
    score: ScoreField,
    skip_bad_lines: bool,
) -> Result<ReadReport> {
    match data {
        Some(path) => read_dataset(path, format, score, skip_bad_lines),
        None => parse_jsonl(
            SAMPLE_DATA,
            SAMPLE_NAME,
            DataFormat::Simple,
            score,
            skip_bad_lines,
        ),
    }
}

/// Token limits of one example: `prompt` tokens at most, `total` for prompt and response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenLimits {
    /// The longest prompt (longer prompts keep their start).
    pub prompt: usize,
    /// The longest prompt + response (longer responses are cut and lose their end of turn).
    pub total: usize,
}

/// `--data` and how its records become training examples.
#[derive(clap::Args, Debug, Clone)]
#[command(about = None, long_about = None)]
pub struct DataArgs {
    /// Preference data: a JSONL file (or one JSON array of records), a parquet file, or a
    /// folder of *.jsonl / *.parquet shards. Default: the bundled sample (64 prompts × 4).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Layout of --data's lines or rows; `auto` tells each one's layout from its keys.
    #[arg(long, value_enum, default_value_t = DataFormat::Auto)]
    pub format: DataFormat,
    /// UltraFeedback score used as the reward.
    #[arg(long, value_enum, default_value_t = ScoreField::Overall)]
    pub score_field: ScoreField,
    /// Skip (and count) malformed lines or rows instead of stopping at the first one.
    #[arg(long)]
    pub skip_bad_lines: bool,
    /// Longest prompt in tokens (longer prompts keep their start). Default: 512, or half of
    /// --max-tokens if that is less.
    #[arg(long)]
    pub max_prompt_tokens: Option<usize>,
    /// Longest prompt + response in tokens (longer responses are cut and lose their EOS), at
    /// most the model's max_position_embeddings. Default: 1024, or that limit if it is less.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Fraction of prompts held out for evaluation.
    #[arg(long, default_value_t = 0.125)]
    pub eval_fraction: f64,
}

impl Default for DataArgs {
    /// The flags' defaults: the bundled sample, token limits that fit the model, 1/8 held out.
    fn default() -> Self {
        DataArgs {
            data: None,
            format: DataFormat::Auto,
            score_field: ScoreField::Overall,
            skip_bad_lines: false,
            max_prompt_tokens: None,
            max_tokens: None,
            eval_fraction: 0.125,
        }
    }
}

impl DataArgs {
    /// The token limits: the flags, or defaults that fit a model of `config` (`--max-tokens`
    /// 1024 or the model's `max_position_embeddings` if less, `--max-prompt-tokens` 512 or
    /// half of that if less). `--max-tokens` past the model's context is an
    /// [`RefaError::InvalidSetting`].
    pub fn token_limits(&self, config: &ModelConfig) -> Result<TokenLimits> {
        let positions = config.max_position_embeddings.max(0) as usize;
        let total = self.max_tokens.unwrap_or(positions.min(1024));
        RefaError::require(
            total <= positions,
            "--max-tokens",
            total,
            format!("at most the model's max_position_embeddings = {positions}"),
        )?;
        let prompt = self.max_prompt_tokens.unwrap_or((total / 2).clamp(1, 512));
        Ok(TokenLimits { prompt, total })
    }

    /// The records of `--data` ([`read_records`]); its `skipped` lines are for the log.
    pub fn read(&self) -> Result<ReadReport> {
        read_records(
            self.data.as_deref(),
            self.format,
            self.score_field,
            self.skip_bad_lines,
        )
    }

    /// The records tokenized with `tokenizer` within `limits` ([`tokenize_records_named`],
    /// an error naming the file and line of its record) and
    /// split into training and held-out examples by a shuffle seeded with `seed`
    /// ([`split_eval`]). Data with no prompt left that carries a preference is a
    /// [`RefaError::Config`] naming it.
    pub fn prepare(
        &self,
        records: &ReadReport,
        tokenizer: &ChatTokenizer,
        limits: TokenLimits,
        seed: u64,
    ) -> Result<PreferenceData> {
        let name = |i: usize| {
            records
                .origin(i)
                .unwrap_or_else(|| format!("record {}", i + 1))
        };
        let (examples, tokens) = tokenize_records_named(
            &records.records,
            tokenizer,
            limits.prompt,
            limits.total,
            name,
        )?;
        let data = PreferenceData {
            train: Vec::new(),
            eval: Vec::new(),
            read: records.records.len(),
            skipped: records.skipped.len(),
            tokens,
        };
        if examples.is_empty() {
            return Err(RefaError::config(
                self.name(),
                format!(
                    "no prompt with a preference left to train on ({})",
                    data.counts()
                ),
            ));
        }
        let (train, eval) = split_eval(examples, self.eval_fraction, seed)?;
        Ok(PreferenceData {
            train,
            eval,
            ..data
        })
    }

    /// `--data` as errors name it.
    fn name(&self) -> String {
        self.data
            .as_ref()
            .map_or_else(|| SAMPLE_NAME.to_string(), |p| p.display().to_string())
    }
}

/// Training and held-out examples, with what reading and tokenizing dropped. Its `Display`
/// is the run log's `data: …` line.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferenceData {
    /// The training examples.
    pub train: Vec<TokenizedExample>,
    /// The held-out examples.
    pub eval: Vec<TokenizedExample>,
    /// Records read.
    pub read: usize,
    /// Malformed lines or rows skipped (`--skip-bad-lines`).
    pub skipped: usize,
    /// What tokenizing dropped and truncated.
    pub tokens: TokenizeReport,
}

impl PreferenceData {
    fn counts(&self) -> String {
        format!(
            "{} prompts read, {} malformed lines or rows skipped; dropped {} with fewer than 2 \
             responses and {} with all scores equal; {} responses truncated",
            self.read,
            self.skipped,
            self.tokens.fewer_than_two_responses,
            self.tokens.all_scores_equal,
            self.tokens.truncated_responses
        )
    }
}

impl std::fmt::Display for PreferenceData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "data: {}", self.counts())
    }
}
