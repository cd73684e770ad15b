//! The training loop (cargo feature `trainer`): AdamW with warmup and cosine decay,
//! gradient accumulation and clipping, evaluation, metrics, atomic checkpoints and exact
//! resumption. Plots of the curves and the URSLA probe are in [`crate::analysis`].

#[cfg(feature = "distributed")]
mod data_parallel;
mod fingerprint;
mod metrics;
mod optimizer;
mod state;
mod trainer;

#[cfg(feature = "distributed")]
pub use data_parallel::{DataParallel, BUCKET_BYTES};
pub use metrics::{Metric, MetricsLog, StepMetrics};
pub use optimizer::{AdamW, CosineSchedule};
pub use state::TrainerState;
pub(crate) use trainer::score_batch;
pub use trainer::{
    activation_bytes, checkpoint_name, latest_checkpoint, Recompute, RunSummary, TrainConfig,
    Trainer,
};
