//! The command-line surface (cargo feature `trainer`): clap argument structs that build the
//! model, the tokenizer, the data and the [`TrainConfig`](crate::train::TrainConfig) with one
//! call each, shared by the bundled examples and usable by any downstream binary, as TRL's
//! `TrlParser` over its configuration dataclasses is.
//!
//! A training program flattens the structs it needs into its own `Parser`:
//!
//! ```no_run
//! use clap::Parser;
//! use refa_loss::cli::{DataArgs, DeviceArgs, JobArgs, ModelArgs, TrainArgs};
//! use refa_loss::LossConfig;
//!
//! #[derive(Parser)]
//! #[command(about = "Fine-tune a checkpoint with a K-way preference loss")]
//! struct Args {
//!     #[command(flatten)]
//!     model: ModelArgs,
//!     #[command(flatten)]
//!     data: DataArgs,
//!     #[command(flatten)]
//!     loss: LossConfig,
//!     #[command(flatten)]
//!     train: TrainArgs,
//!     #[command(flatten)]
//!     device: DeviceArgs,
//!     #[command(flatten)]
//!     job: JobArgs,
//! }
//!
//! # fn main() -> refa_loss::Result<()> {
//! let args = Args::parse();
//! let job = args.job.job()?;
//! let (device, kind) = args.device.resolve(job.as_ref())?;
//! let lora = args.train.lora.config()?;
//! let model = args.model.load_model(device, kind, lora.as_ref(), args.train.seed)?;
//! let tokenizer = args.model.load_tokenizer(model.config())?;
//! let limits = args.data.token_limits(model.config())?;
//! let records = args.data.read()?;
//! let data = args.data.prepare(&records, &tokenizer, limits, args.train.seed)?;
//! let config = args.train.config(&tokenizer, args.model.default_lr())?;
//! let loss = args.loss.build()?;
//! let mut trainer = args.job.trainer(job.as_ref(), model, loss, data.train, data.eval, config)?;
//! trainer.run(&std::sync::atomic::AtomicBool::new(false), |_| {})?;
//! # Ok(()) }
//! ```
//!
//! Where each part lives:
//! - `model.rs`: [`DeviceArgs`] (`--device`, `--dtype`), [`TokenizerArgs`] (`--tokenizer`,
//!   `--template`), [`ModelArgs`] (an optional `--model`, the bundled tiny model without it)
//!   and [`CheckpointArgs`] (a required `--model`, for inference);
//! - `data.rs`: [`DataArgs`] (`--data`, its format, the token limits, the held-out fraction)
//!   and the [`PreferenceData`] it builds;
//! - `train.rs`: [`TrainArgs`] (the optimizer, the schedule, checkpoints, resuming),
//!   [`LoraArgs`] and [`JobArgs`] (a torchrun job's flags);
//! - `run.rs`: what a program around a run needs: [`Progress`] (the progress bar),
//!   [`summary_table`], [`StopSignals`] (SIGINT/SIGTERM), [`error_message`] and the process
//!   settings of a command-line tool;
//! - `bundled.rs`: the bundled tiny model, tokenizer and sample data the defaults use.
//!
//! Every struct sets `about = None`, so that flattening one never puts its API
//! documentation at the top of the program's `--help`.

mod bundled;
mod data;
mod model;
mod run;
mod train;

pub use bundled::{sample_tokenizer, tiny_model, SAMPLE_DATA, SAMPLE_TOKENIZER, TINY_CONFIG};
pub use data::{read_records, DataArgs, PreferenceData, TokenLimits};
pub use model::{
    kind_for, CheckpointArgs, DType, DeviceArgs, DeviceName, ModelArgs, TokenizerArgs,
};
pub use run::{
    error_message, quiet_on_closed_pipe, silence_stdout, summary_table, trainable_parameters,
    Progress, StopSignals,
};
pub use train::{job, JobArgs, JobEnv, LoraArgs, TrainArgs};
