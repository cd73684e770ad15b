//! The trainer's own state in a checkpoint: `trainer_state.json`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{RefaError, Result};
use crate::train::optimizer::CosineSchedule;

/// Where a run stands; with the weights and `optimizer.safetensors` it resumes exactly.
///
/// The last five fields record what the position and the schedule depend on and which run
/// wrote the checkpoint; checkpoints written before they existed read them as `None`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: i64,
    /// Completed passes over the training data.
    pub epoch: u64,
    /// Examples of the current epoch already used.
    pub position: usize,
    /// The run's seed (data order and dropout).
    pub seed: u64,
    /// The model trains LoRA adapters (`adapters.safetensors`) on a frozen base.
    pub lora: bool,
    /// Number of training examples the data position counts.
    #[serde(default)]
    pub train_examples: Option<usize>,
    /// Fingerprint of the tokenized training data (token ids and rewards).
    #[serde(default)]
    pub data_fingerprint: Option<String>,
    /// The run's optimizer steps.
    #[serde(default)]
    pub max_steps: Option<i64>,
    /// The learning-rate schedule the steps so far followed.
    #[serde(default)]
    pub schedule: Option<CosineSchedule>,
    /// The run that wrote it: random when a run starts, kept when it is resumed. Pruning
    /// deletes only checkpoints of the run that prunes.
    #[serde(default)]
    pub run_id: Option<String>,
}

impl TrainerState {
    /// File name inside a checkpoint folder.
    pub const FILE: &'static str = "trainer_state.json";

    /// Pretty JSON.
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self).map_err(|e| RefaError::config(Self::FILE, e))
    }

    /// Reads `folder/trainer_state.json`.
    pub fn read(folder: &Path) -> Result<Self> {
        let path = folder.join(Self::FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| RefaError::io(&path, &e))?;
        serde_json::from_str(&text).map_err(|e| RefaError::config(&path, e))
    }
}
