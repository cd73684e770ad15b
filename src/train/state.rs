//! The trainer's own state in a checkpoint: `trainer_state.json`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{RefaError, Result};

/// Where a run stands; with the weights and `optimizer.safetensors` it resumes exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
