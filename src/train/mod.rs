//! The training loop (cargo feature `trainer`): AdamW with warmup and cosine decay,
//! gradient accumulation and clipping, evaluation, metrics, atomic checkpoints and exact
//! resumption. Plots of the curves and the URSLA probe are in [`crate::analysis`].
//!
//! Where each part lives:
//! - `config.rs`: [`TrainConfig`] and its validation, and the checks of the loss and the
//!   examples that run before any work;
//! - `recompute.rs`: [`Recompute`], the memory estimate [`activation_bytes`] and the
//!   decision of [`Recompute::Auto`];
//! - `reference.rs`: the reference model's scores and their cache (`reference_logps.json`);
//! - `checkpoints.rs`: writing, pruning and resuming checkpoints ([`checkpoint_name`],
//!   [`latest_checkpoint`], [`Trainer::save_checkpoint`], [`Trainer::resume`]), with the
//!   optimizer shards of a data-parallel job;
//! - `output.rs`: the run's ownership of its output folder: the lock, the run id, and what
//!   a fresh run may find there;
//! - `trainer.rs`: [`Trainer`], its step and its run loop;
//! - `optimizer.rs`, `metrics.rs`, `state.rs`: [`AdamW`] and its schedule, the logged
//!   metrics, and `trainer_state.json`;
//! - `fingerprint.rs`: the fingerprints of data and weights that checkpoints and the cache
//!   carry; `data_parallel.rs` (feature `distributed`): `Trainer::new_distributed`'s
//!   gradient averaging and ZeRO-1 sharding.

mod checkpoints;
mod config;
#[cfg(feature = "distributed")]
mod data_parallel;
mod fingerprint;
mod metrics;
mod optimizer;
mod output;
mod recompute;
mod reference;
mod state;
mod trainer;

pub use checkpoints::{checkpoint_name, latest_checkpoint};
pub use config::TrainConfig;
#[cfg(feature = "distributed")]
pub use data_parallel::{DataParallel, BUCKET_BYTES};
pub use metrics::{Metric, MetricsLog, StepMetrics};
pub use optimizer::{AdamW, CosineSchedule};
pub use output::LOCK_FILE;
pub use recompute::{activation_bytes, Recompute};
pub use state::TrainerState;
pub(crate) use trainer::score_batch;
pub use trainer::{RunSummary, Trainer};
