//! The training loop (cargo feature `trainer`): AdamW with warmup and cosine decay,
//! gradient accumulation and clipping, evaluation, metrics, atomic checkpoints and exact
//! resumption, and PNG plots of the curves.

mod fingerprint;
mod metrics;
mod optimizer;
mod plot;
mod state;
mod trainer;
mod ursla;

pub use metrics::{Metric, MetricsLog, StepMetrics};
pub use optimizer::{AdamW, CosineSchedule};
pub use plot::{plot_history, render_png, Panel, Series};
pub use state::TrainerState;
pub use trainer::{
    activation_bytes, checkpoint_name, latest_checkpoint, Recompute, RunSummary, TrainConfig,
    Trainer,
};
pub use ursla::{length_buckets, response_nll, LengthBucket};
