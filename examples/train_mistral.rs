//! Fine-tunes a Mistral checkpoint (or any supported family) with a K-way preference loss
//! (REFA by default).
//!
//! With no arguments it trains a tiny Mistral (the bundled `examples/data/tiny-config.json`,
//! randomly initialized) on the bundled sample data (64 prompts × 4 scored responses) on the
//! CPU, or the GPU when there is one, in well under two minutes:
//!
//! ```text
//! scripts/cargo run --release --features trainer --example train_mistral
//! scripts/cargo run --release --features trainer --example train_mistral -- --help
//! ```
//!
//! For a real run, point `--model` at a Hugging Face checkpoint folder (config.json,
//! safetensors, tokenizer.json) and `--data` at UltraFeedback-style JSONL. The flags are
//! the library's (`refa_loss::cli`); this program parses them, builds, runs and reports.

#[path = "common/mod.rs"]
mod common;

use clap::Parser;
use refa_loss::analysis::plot_history;
use refa_loss::cli::{self, DataArgs, DeviceArgs, JobArgs, ModelArgs, Progress, TrainArgs};
use refa_loss::train::{RunSummary, StepMetrics};
use refa_loss::LossConfig;

#[derive(Parser, Debug)]
#[command(about = "Fine-tune a Mistral checkpoint with REFA or another K-way preference loss")]
struct Args {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    data: DataArgs,
    /// The loss and its hyperparameters (each defaults to the loss's paper value).
    #[command(flatten)]
    loss: LossConfig,
    #[command(flatten)]
    train: TrainArgs,
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    job: JobArgs,
    /// No progress bar (one line per step instead).
    #[arg(long)]
    quiet: bool,
}

fn main() {
    cli::quiet_on_closed_pipe();
    common::exit_on_error(run(Args::parse()));
}

fn run(mut args: Args) -> anyhow::Result<()> {
    let job = args.job.job()?;
    let resume_from = args.train.resume_from()?;
    if job.as_ref().is_some_and(|j| j.rank > 0) {
        cli::silence_stdout(); // rank 0 alone prints
        args.quiet = true;
    }
    let (device, kind) = args.device.resolve(job.as_ref())?;
    let loss = args.loss.build()?;
    let lora = args.train.lora.config()?;
    let model = args
        .model
        .load_model(device, kind, lora.as_ref(), args.train.seed)?;
    let limits = args.data.token_limits(model.config())?;
    let tokenizer = args.model.load_tokenizer(model.config())?;
    if let Some(note) = args.model.template_note(&tokenizer) {
        println!("{note}");
    }
    let records = args.data.read()?;
    for (_, why) in &records.skipped {
        eprintln!("skipped {why}");
    }
    let data = args
        .data
        .prepare(&records, &tokenizer, limits, args.train.seed)?;
    println!("{data}");
    if args.train.resume.is_some() && resume_from.is_none() {
        let out = args.train.output_dir.display();
        println!("no checkpoint in {out} yet: starting at step 0");
    }
    let config = args.train.config(&tokenizer, args.model.default_lr())?;
    println!(
        "device {device:?}, {kind:?} weights, loss {}, {} trainable parameters ({}), {} train / {} eval prompts",
        loss.name(),
        cli::trainable_parameters(&model),
        if lora.is_some() { "LoRA" } else { "full fine-tuning" },
        data.train.len(),
        data.eval.len()
    );
    let mut trainer = args
        .job
        .trainer(job.as_ref(), model, loss, data.train, data.eval, config)?;
    if let Some(bytes) = trainer.collective_bytes_per_step() {
        let gb = bytes as f64 / 1e9;
        println!("data-parallel: {gb:.3} GB through collectives per step and rank");
    }
    if let Some(folder) = resume_from {
        for note in trainer.resume(&folder)? {
            println!("note: {note}");
        }
        println!(
            "resumed from {} at step {}",
            folder.display(),
            trainer.step()
        );
    }
    let before = trainer.evaluate()?;
    let stop = cli::StopSignals::install()?;
    let progress = Progress::new(args.train.max_steps, trainer.step(), args.quiet);
    let summary = trainer.run(stop.flag(), |m| progress.report(m))?;
    progress.finish();
    let after = trainer.evaluate()?;
    report(&args, &summary, before, after)?;
    if let Some(status) = stop.exit_status().filter(|_| summary.interrupted) {
        let steps = args.train.max_steps;
        eprintln!("stopped by a signal before step {steps}: exit status {status}");
        std::process::exit(status);
    }
    Ok(())
}

/// The summary table, the plot, the last checkpoint and where the metrics are.
fn report(
    args: &Args,
    summary: &RunSummary,
    before: StepMetrics,
    after: StepMetrics,
) -> anyhow::Result<()> {
    print!(
        "\n{}",
        cli::summary_table(&summary.history, &before, &after)
    );
    let evaluations: Vec<StepMetrics> = std::iter::once(before)
        .chain(summary.evaluations.iter().cloned())
        .chain(std::iter::once(after))
        .collect();
    let out = &args.train.output_dir;
    let plot = out.join("training.png");
    plot_history(&summary.history, &evaluations, &plot)?;
    println!("plot: {}", plot.display());
    if let Some(path) = &summary.last_checkpoint {
        let how = if summary.interrupted {
            "interrupted; saved"
        } else {
            "saved"
        };
        let path = path.display();
        println!("{how} {path} (Hugging Face format; resume with --resume {path})");
    }
    println!("metrics: {}", out.join("metrics.jsonl").display());
    Ok(())
}
