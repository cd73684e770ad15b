//! The URSLA probe (the paper's Table 2): each response's mean per-token negative
//! log-probability under a checkpoint, bucketed by response length, as a table and a plot.
//!
//! ```text
//! scripts/cargo run --release --features trainer --example ursla_probe -- \
//!     --model runs/refa/checkpoint-60 --tokenizer examples/data/tokenizer.json
//! ```
//!
//! The paper reports, for Mistral-7B on Alpaca, a mean NLL falling from 0.493 to 0.336 over
//! five length buckets: longer responses are more certain per token (URSLA).

#[path = "common/mod.rs"]
mod common;

use std::path::PathBuf;

use clap::Parser;
use refa_loss::analysis::{length_buckets, render_png, response_nll, Panel, Series};
use refa_loss::cli::{read_records, CheckpointArgs};
use refa_loss::data::{tokenize_all, DataFormat, ScoreField};
use refa_loss::scoring::ScoringConfig;

#[derive(Parser, Debug)]
#[command(about = "Mean per-token NLL of responses by length bucket (the paper's URSLA probe)")]
struct Args {
    #[command(flatten)]
    checkpoint: CheckpointArgs,
    /// Responses to probe, in the trainer's formats (default: the bundled sample).
    #[arg(long)]
    data: Option<PathBuf>,
    /// UltraFeedback format instead of the simple one.
    #[arg(long)]
    ultrafeedback: bool,
    /// Number of length buckets.
    #[arg(long, default_value_t = 5)]
    buckets: usize,
    /// Where the plot goes.
    #[arg(long, default_value = "ursla.png")]
    plot: PathBuf,
}

fn main() {
    common::quiet_on_closed_pipe();
    common::exit_on_error(run(Args::parse()));
}

fn run(args: Args) -> anyhow::Result<()> {
    let (model, tokenizer) = args.checkpoint.load()?;
    let format = if args.ultrafeedback {
        DataFormat::UltraFeedback
    } else {
        DataFormat::Simple
    };
    let report = read_records(args.data.as_deref(), format, ScoreField::Overall, false)?;
    // Every response counts here, preference or not.
    let examples = tokenize_all(&report.records, &tokenizer, 512, 2048)?;
    let samples = response_nll(
        &model,
        &examples,
        8,
        &ScoringConfig::new(tokenizer.end_of_turn_id()),
    )?;
    if args.buckets < 2 {
        anyhow::bail!(
            "--buckets {}: at least 2 are needed to see a trend",
            args.buckets
        );
    }
    if samples.len() < args.buckets {
        anyhow::bail!(
            "{} responses with tokens, fewer than the {} length buckets: nothing to compare",
            samples.len(),
            args.buckets
        );
    }
    let buckets = length_buckets(&samples, args.buckets);
    println!(
        "{} responses; mean per-token NLL by length bucket:\n",
        samples.len()
    );
    println!("| bucket | lengths (tokens) | count | mean NLL | std. error |");
    println!("|---:|---|---:|---:|---:|");
    for (i, b) in buckets.iter().enumerate() {
        println!(
            "| {} | {}–{} | {} | {:.3} | {:.3} |",
            i + 1,
            b.min_length,
            b.max_length,
            b.count,
            b.mean_nll,
            b.std_error
        );
    }
    let falls = buckets.windows(2).all(|w| w[1].mean_nll < w[0].mean_nll);
    let verdict = match (buckets.len(), falls) {
        (0 | 1, _) => "cannot tell (all responses have the same length)",
        (_, true) => "yes",
        (_, false) => "no",
    };
    println!("\nNLL falls monotonically with length: {verdict}");
    let points = buckets
        .iter()
        .map(|b| ((b.min_length + b.max_length) as f64 / 2.0, b.mean_nll))
        .collect();
    let series = Series {
        name: "mean nll".into(),
        points,
        color: [31, 119, 180],
        markers: true,
    };
    let panel = Panel {
        title: "per-token nll by length".into(),
        x_label: "tokens".into(),
        series: vec![series],
    };
    render_png(&[panel], 1, &args.plot)?;
    println!("plot: {}", args.plot.display());
    Ok(())
}
