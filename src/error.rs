//! The crate's one error type.

use tch::{Device, Kind, TchError};

/// Everything that can go wrong when a loss is given bad input.
///
/// Each variant names the culprit: the tensor, its shape or the offending value, so that a
/// message read in a training log points straight at the line of code that built the batch.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RefaError {
    /// A tensor's shape does not match what the batch expects.
    #[error("tensor `{tensor}` has shape {actual:?}, expected {expected}")]
    ShapeMismatch {
        /// The argument name, e.g. `"lengths"`.
        tensor: &'static str,
        /// The shape it has.
        actual: Vec<i64>,
        /// The shape it should have, in words, e.g. `"[P, K] = [2, 4] like `logp_sum`"`.
        expected: String,
    },

    /// A tensor has the wrong element type.
    #[error("tensor `{tensor}` has kind {actual:?}, expected {expected}")]
    WrongKind {
        /// The argument name.
        tensor: &'static str,
        /// The kind it has.
        actual: Kind,
        /// What it should be, e.g. `"a floating-point kind (f32, f64, bf16 or f16)"`.
        expected: &'static str,
    },

    /// Two tensors of one batch live on different devices.
    #[error("tensor `{tensor}` is on {actual:?} but `{reference}` is on {expected:?}")]
    DeviceMismatch {
        /// The argument name.
        tensor: &'static str,
        /// Its device.
        actual: Device,
        /// The tensor it was compared with.
        reference: &'static str,
        /// That tensor's device.
        expected: Device,
    },

    /// A loss hyperparameter is out of its domain.
    #[error("invalid hyperparameter `{name}` = {value} for {loss}: must be {requirement}")]
    InvalidHyperparameter {
        /// The loss or regularizer, e.g. `"RefaDynamic"`.
        loss: &'static str,
        /// The field name, e.g. `"beta"`.
        name: &'static str,
        /// The value it had.
        value: f64,
        /// The domain, e.g. `"finite and > 0"`.
        requirement: &'static str,
    },

    /// A setting of the scorer, the model, the trainer or the data pipeline (a flag of the
    /// examples) is out of its domain; checked before any work starts.
    #[error("invalid setting `{name}` = {value}: must be {requirement}")]
    InvalidSetting {
        /// The setting, e.g. `"lr"`, `"lora.rank"` or `"eos_id"`.
        name: &'static str,
        /// The value it had, as text.
        value: String,
        /// The domain, e.g. `"finite and > 0"` or `"in [0, 32000), the vocabulary"`.
        requirement: String,
    },

    /// A value in a valid (unmasked) slot is out of its domain.
    #[error("tensor `{tensor}` holds {value} at {position}, which must be {requirement}")]
    InvalidValue {
        /// The argument name.
        tensor: &'static str,
        /// Where, e.g. `"prompt 3, slot 1"`.
        position: String,
        /// The value found there.
        value: f64,
        /// The domain, e.g. `"> 0"`.
        requirement: &'static str,
    },

    /// A loss needs an input the batch was not given.
    #[error(
        "{loss} needs `{input}`, which the batch lacks: add it with `PreferenceBatch::{method}`"
    )]
    MissingInput {
        /// The loss that needs it.
        loss: &'static str,
        /// The missing input.
        input: &'static str,
        /// The builder method that supplies it.
        method: &'static str,
    },

    /// The computed loss is not finite although every checked input was.
    #[error("{loss} produced a non-finite loss ({value}); the inputs are finite, so a hyperparameter or a reward scale overflows")]
    NonFiniteLoss {
        /// The loss.
        loss: &'static str,
        /// The value it produced.
        value: f64,
    },

    /// A file could not be read or written.
    #[error("{path}: {message}")]
    Io {
        /// The file or folder.
        path: String,
        /// The operating system's message.
        message: String,
        /// The error itself, for [`std::error::Error::source`] (`None` when there was none).
        #[source]
        source: Option<ErrorSource>,
    },

    /// A configuration file is malformed or incomplete (serde's message names a missing or
    /// mistyped field, with its line and column).
    #[error("{path}: {message}")]
    Config {
        /// The file, e.g. `config.json`.
        path: String,
        /// What is wrong.
        message: String,
    },

    /// A line of a data file is malformed.
    #[error("{path}, line {line}: {message}")]
    Data {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        message: String,
    },

    /// A collective of a distributed job failed: a timeout, a lost process, a closed
    /// connection, or a job the environment describes inconsistently.
    #[error("distributed {operation}: {message}")]
    Distributed {
        /// What failed, e.g. `"all-reduce"` or `"setup"`.
        operation: &'static str,
        /// Why, with the lost ranks where they could be told.
        message: String,
    },

    /// A row of a parquet data file is malformed.
    #[error("{path}, row {row}: {message}")]
    DataRow {
        /// The file.
        path: String,
        /// 1-based row number, counted over the whole file.
        row: usize,
        /// What is wrong with it.
        message: String,
    },

    /// Training produced a non-finite loss or gradient; the run stopped.
    #[error("training diverged at step {step}: {message}; last good checkpoint: {}", last_checkpoint.as_deref().unwrap_or("none yet"))]
    Diverged {
        /// The optimizer step that failed.
        step: i64,
        /// What was not finite.
        message: String,
        /// The newest checkpoint, untouched by the failed step.
        last_checkpoint: Option<String>,
    },

    /// Another trainer holds the output folder's lock (`.trainer.lock`): two trainers in one
    /// folder would delete or replace each other's checkpoints and lose logged steps.
    #[error(
        "output folder {path} is in use by another trainer (pid {}): wait for it to end, or \
         choose another output folder",
        .pid.map_or_else(|| "unknown".to_string(), |p| p.to_string())
    )]
    OutputInUse {
        /// The output folder.
        path: String,
        /// The process holding the lock, when its lock file names a live one.
        pid: Option<u32>,
    },

    /// A fresh run was asked for in an output folder that holds another run's checkpoints
    /// or metrics; the earlier run is left as it was.
    #[error(
        "output folder {path} holds an earlier run ({found}): continue it with `--resume \
         latest` (Trainer::resume), start over with `--overwrite-output-dir` \
         (TrainConfig::overwrite_output_dir), which deletes it, or choose another output folder"
    )]
    OutputHasRun {
        /// The output folder.
        path: String,
        /// What is there, e.g. `checkpoint-40, checkpoint-60 and 63 records in metrics.jsonl`.
        found: String,
    },

    /// A checkpoint lacks a tensor the model needs, holds one it does not know, or holds one
    /// of the wrong shape or kind.
    #[error("checkpoint tensor `{tensor}`: {problem}")]
    Checkpoint {
        /// The tensor's Hugging Face name, e.g. `model.layers.3.self_attn.q_proj.weight`.
        tensor: String,
        /// What is wrong, e.g. `missing` or `has shape [4, 8], the model expects [8, 8]`.
        problem: String,
    },

    /// libtorch reported an error (or a C++ exception was caught at the boundary of
    /// `csrc/`).
    #[error("libtorch: {message}")]
    Torch {
        /// libtorch's message.
        message: String,
        /// The `TchError`, for [`std::error::Error::source`] (`None` when there was none).
        #[source]
        source: Option<ErrorSource>,
    },
}

/// The error a [`RefaError`] came from, shared (so that `RefaError` stays `Clone`) and
/// compared by its message (so that it stays `PartialEq`).
#[derive(Debug, Clone)]
pub struct ErrorSource(std::sync::Arc<dyn std::error::Error + Send + Sync>);

impl ErrorSource {
    /// Wraps `error`.
    pub fn new(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        ErrorSource(std::sync::Arc::new(error))
    }

    /// The original error (downcast it to `std::io::Error`, `tch::TchError`, …).
    pub fn get(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.0
    }
}

impl PartialEq for ErrorSource {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_string() == other.0.to_string()
    }
}

impl std::fmt::Display for ErrorSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for ErrorSource {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl From<TchError> for RefaError {
    fn from(err: TchError) -> Self {
        RefaError::Torch {
            message: err.to_string(),
            source: Some(ErrorSource::new(err)),
        }
    }
}

impl RefaError {
    /// An I/O error on `path`.
    pub fn io(path: impl AsRef<std::path::Path>, err: &std::io::Error) -> Self {
        RefaError::Io {
            path: path.as_ref().display().to_string(),
            message: err.to_string(),
            source: Some(ErrorSource::new(std::io::Error::new(
                err.kind(),
                err.to_string(),
            ))),
        }
    }

    /// A libtorch error known only by its message (from `csrc/`, or made more precise).
    pub fn torch(message: impl Into<String>) -> Self {
        RefaError::Torch {
            message: message.into(),
            source: None,
        }
    }

    /// [`RefaError::InvalidSetting`] for the setting `name`.
    pub fn option(
        name: &'static str,
        value: impl std::fmt::Display,
        requirement: impl Into<String>,
    ) -> Self {
        RefaError::InvalidSetting {
            name,
            value: value.to_string(),
            requirement: requirement.into(),
        }
    }

    /// [`RefaError::InvalidSetting`] unless `ok`.
    pub fn require(
        ok: bool,
        name: &'static str,
        value: impl std::fmt::Display,
        requirement: impl Into<String>,
    ) -> Result<(), Self> {
        if ok {
            Ok(())
        } else {
            Err(RefaError::option(name, value, requirement))
        }
    }

    /// [`RefaError::Config`]: a file's content is wrong.
    pub fn config(path: impl AsRef<std::path::Path>, message: impl std::fmt::Display) -> Self {
        RefaError::Config {
            path: path.as_ref().display().to_string(),
            message: message.to_string(),
        }
    }

    /// A problem with one checkpoint tensor.
    pub fn checkpoint(tensor: impl Into<String>, problem: impl Into<String>) -> Self {
        RefaError::Checkpoint {
            tensor: tensor.into(),
            problem: problem.into(),
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = RefaError> = std::result::Result<T, E>;
