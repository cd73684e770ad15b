//! The training half of a round, and the record of finished rounds that makes the loop
//! resumable.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::TokenizedExample;
use crate::error::{RefaError, Result};
use crate::loss::PreferenceLoss;
use crate::model::CausalLm;
use crate::on_policy::HeldOut;
use crate::train::{StepMetrics, TrainConfig, Trainer};

/// Trains `model` on one round's examples for `epochs` passes (`max_steps` and the
/// schedule's length are set from the data: `⌈examples / (prompts_per_batch ·
/// accumulation_steps)⌉ · epochs` steps), saves the final checkpoint in
/// `config.output_dir`, and returns the model, the checkpoint's folder and each step's
/// metrics.
///
/// # Errors
/// No examples, and everything [`Trainer::new`], [`Trainer::train_step`] and
/// [`Trainer::save_checkpoint`] refuse.
pub fn train_round(
    model: CausalLm,
    loss: Box<dyn PreferenceLoss>,
    examples: Vec<TokenizedExample>,
    config: TrainConfig,
    epochs: usize,
) -> Result<(CausalLm, PathBuf, Vec<StepMetrics>)> {
    RefaError::require(!examples.is_empty(), "round examples", 0, ">= 1 prompt whose answers scored differently")?;
    let per_step = (config.prompts_per_batch * config.accumulation_steps).max(1);
    let steps = (examples.len().div_ceil(per_step) * epochs.max(1)) as i64;
    let config = TrainConfig {
        max_steps: steps,
        schedule: crate::train::CosineSchedule {
            total: steps,
            warmup: config.schedule.warmup.min(steps / 2),
            ..config.schedule
        },
        eval_every: 0,
        save_every: 0,
        ..config
    };
    let mut trainer = Trainer::new(model, loss, examples, Vec::new(), config)?;
    let mut history = Vec::with_capacity(steps as usize);
    for _ in 0..steps {
        history.push(trainer.train_step()?);
    }
    let checkpoint = trainer.save_checkpoint()?;
    Ok((trainer.into_model(), checkpoint, history))
}

/// One finished round, as a line of `rounds.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    /// 0 for the model before training, then 1, 2, …
    pub round: usize,
    /// Held-out greedy score (mean reward).
    pub heldout_score: f64,
    /// Held-out mean answer length in tokens.
    pub heldout_length: f64,
    /// Held-out mean probability of the end of turn after each answer.
    pub heldout_eos_probability: f64,
    /// Held-out share of answers ended by a stop token.
    pub heldout_ended: f64,
    /// Held-out share of empty answers.
    pub heldout_empty: f64,
    /// Mean reward of the round's sampled training answers (none for round 0).
    pub sampled_score: Option<f64>,
    /// Training prompts kept (answers scored differently); 0 for round 0.
    pub examples: usize,
    /// Mean training loss of the round's steps (none for round 0).
    pub train_loss: Option<f64>,
    /// The round's final checkpoint (none for round 0).
    pub checkpoint: Option<PathBuf>,
}

impl RoundRecord {
    /// The held-out part of a record.
    pub fn with_heldout(round: usize, heldout: &HeldOut) -> Self {
        RoundRecord {
            round,
            heldout_score: heldout.score,
            heldout_length: heldout.mean_length,
            heldout_eos_probability: heldout.eos_probability,
            heldout_ended: heldout.ended,
            heldout_empty: heldout.empty,
            sampled_score: None,
            examples: 0,
            train_loss: None,
            checkpoint: None,
        }
    }
}

/// The rounds finished so far in `folder/rounds.jsonl` (empty when there is none).
///
/// # Errors
/// A file that cannot be read or a line that is not a round record (naming the line).
pub fn read_rounds(folder: &Path) -> Result<Vec<RoundRecord>> {
    let path = folder.join(ROUNDS_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(RefaError::io(&path, &e)),
    };
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|e| {
                RefaError::config(&path, format!("line {}: not a round record ({e})", i + 1))
            })
        })
        .collect()
}

/// Appends one round to `folder/rounds.jsonl` (one `write` of a whole line, synced).
///
/// # Errors
/// The file cannot be opened or written.
pub fn append_round(folder: &Path, record: &RoundRecord) -> Result<()> {
    let path = folder.join(ROUNDS_FILE);
    let mut line = serde_json::to_string(record).map_err(|e| RefaError::config(&path, e))?;
    line.push('\n');
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| RefaError::io(&path, &e))?;
    file.write_all(line.as_bytes())
        .and_then(|()| file.sync_data())
        .map_err(|e| RefaError::io(&path, &e))
}

const ROUNDS_FILE: &str = "rounds.jsonl";
