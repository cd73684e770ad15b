//! The training loop (cargo feature `trainer`): AdamW with warmup and cosine decay,
//! gradient accumulation and clipping, evaluation, metrics, atomic checkpoints and exact
//! resumption.

mod metrics;
mod optimizer;
mod state;
mod trainer;

pub use metrics::{MetricsLog, StepMetrics};
pub use optimizer::{AdamW, CosineSchedule};
pub use state::TrainerState;
pub use trainer::{checkpoint_name, latest_checkpoint, RunSummary, TrainConfig, Trainer};
