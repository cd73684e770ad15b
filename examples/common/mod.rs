//! What the examples share beyond the library's command-line surface (`refa_loss::cli`):
//! reporting errors, and the names the benchmark example uses.
#![allow(dead_code)]

// The benchmark example names these through this module.
#[allow(unused_imports)]
pub use refa_loss::cli::{
    job, kind_for, quiet_on_closed_pipe, silence_stdout, DType, DeviceName, JobArgs, JobEnv,
    SAMPLE_DATA,
};

/// Runs `main`'s body, printing the error with each of its causes once
/// ([`refa_loss::cli::error_message`]) and exiting with status 1 on failure.
pub fn exit_on_error(result: anyhow::Result<()>) {
    if let Err(error) = result {
        eprintln!("error: {}", refa_loss::cli::error_message(error.as_ref()));
        std::process::exit(1);
    }
}

/// What `Trainer::new` takes.
pub type TrainerParts = (
    refa_loss::model::CausalLm,
    Box<dyn refa_loss::PreferenceLoss>,
    Vec<refa_loss::data::TokenizedExample>,
    Vec<refa_loss::data::TokenizedExample>,
    refa_loss::train::TrainConfig,
);

/// A trainer that is one rank of `job` (NCCL for a CUDA model, Gloo otherwise).
pub fn distributed_trainer(
    job: &JobEnv,
    (model, loss, train, eval, config): TrainerParts,
    timeout_s: u64,
    shard_optimizer: bool,
) -> anyhow::Result<refa_loss::train::Trainer> {
    let flags = JobArgs {
        dist_timeout: Some(timeout_s),
        shard_optimizer,
    };
    Ok(flags.trainer(Some(job), model, loss, train, eval, config)?)
}
