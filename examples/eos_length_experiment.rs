//! Does the EOS regularizer make outputs longer? (The paper's Table 4: 1636 → 1846 characters
//! at p = 2.) A small experiment that runs on a CPU in a few minutes.
//!
//! 1. A synthetic instruction task with a known quality and length: "Count from a to b."; the
//!    right answer lists every number, so stopping early costs quality.
//! 2. Next-token (SFT) training of a tiny Mistral on answers with a brevity bias: most
//!    training answers stop partway, as human-written data tends to be terse.
//! 3. From that SFT model, REFA-dynamic preference training (complete > 75 % > 50 % > wrong
//!    list) with λ = 0, with `FinalProbability` and with `TargetLength`.
//! 4. Greedy answers to held-out prompts: mean length and mean quality (the fraction of the
//!    expected numbers produced, in order, before the first mistake), over several seeds.
//!
//! ```text
//! scripts/cargo run --release --features trainer --example eos_length_experiment
//! ```

#[path = "common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use clap::Parser;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use refa_loss::cli;
use refa_loss::data::{split_eval, TokenizedExample};
use refa_loss::model::{CausalLm, ChatTemplate, ChatTokenizer, GenerationOptions, ModelConfig};
use refa_loss::train::{CosineSchedule, Recompute, TrainConfig, Trainer};
use refa_loss::{
    EosMode, EosRegularizer, LossMetrics, LossOutput, PreferenceBatch, PreferenceLoss, RefaDynamic,
    Result as RefaResult, TargetLength,
};
use tch::{Device, Kind};

#[derive(Parser, Debug)]
#[command(about = "The EOS regularizer's effect on generated length, on a synthetic counting task")]
struct Args {
    /// Seeds (each: a fresh SFT model, then every setting).
    #[arg(long, default_value_t = 3)]
    seeds: u64,
    /// SFT steps.
    #[arg(long, default_value_t = 300)]
    sft_steps: i64,
    /// Preference steps per setting.
    #[arg(long, default_value_t = 60)]
    preference_steps: i64,
    /// Peak learning rate of the preference stage.
    #[arg(long, default_value_t = 1e-4)]
    preference_lr: f64,
    /// Show the first held-out answer of every model.
    #[arg(long)]
    show: bool,
    /// λ of FinalProbability.
    #[arg(long, default_value_t = 0.1)]
    final_lambda: f64,
    /// λ of TargetLength (per token of shortfall).
    #[arg(long, default_value_t = 0.01)]
    target_lambda: f64,
    /// Held-out prompts answered per setting.
    #[arg(long, default_value_t = 32)]
    prompts: usize,
    /// Working folder (checkpoints, metrics).
    #[arg(long, default_value = "runs/eos-experiment")]
    output_dir: PathBuf,
    /// Start over in an --output-dir that holds an earlier experiment: delete its
    /// checkpoints and metrics first (without it, such a folder is refused).
    #[arg(long)]
    overwrite_output_dir: bool,
}

/// Next-token training: the mean negative log-probability per token of every valid response.
struct NextToken;

impl PreferenceLoss for NextToken {
    fn name(&self) -> &'static str {
        "NextToken"
    }

    fn compute(&self, batch: &PreferenceBatch) -> RefaResult<LossOutput> {
        let valid = batch.mask().to_kind(batch.kind());
        let tokens = (batch.lengths() * &valid).sum(batch.kind()).clamp_min(1.0);
        let per_prompt = -(batch.logp_sum() * &valid).sum_dim_intlist(1, false, None);
        let loss = per_prompt.sum(batch.kind()) / tokens;
        let metrics = LossMetrics::for_loss(&loss, batch.num_prompts(), batch.num_prompts());
        Ok(LossOutput {
            loss,
            per_prompt,
            metrics,
        })
    }
}

/// One counting prompt: `first..=last`.
#[derive(Clone, Copy, Debug)]
struct Task {
    first: i64,
    last: i64,
}

impl Task {
    fn random(rng: &mut impl Rng) -> Self {
        let first = rng.gen_range(1..60);
        Task {
            first,
            last: first + rng.gen_range(3..12),
        }
    }

    fn prompt(&self) -> String {
        format!("Count from {} to {}.", self.first, self.last)
    }

    /// The first `fraction` of the list (at least one number).
    fn answer(&self, fraction: f64) -> String {
        let count = self.last - self.first + 1;
        let kept = ((count as f64 * fraction).round() as i64).clamp(1, count);
        let numbers: Vec<String> = (self.first..self.first + kept)
            .map(|n| n.to_string())
            .collect();
        format!("{}.", numbers.join(", "))
    }

    fn wrong_answer(&self) -> String {
        let numbers: Vec<String> = (self.first..=self.last)
            .rev()
            .map(|n| (n + 3).to_string())
            .collect();
        format!("{}.", numbers.join(", "))
    }

    /// Fraction of the expected numbers produced in order before the first mistake.
    fn quality(&self, output: &str) -> f64 {
        let produced: Vec<i64> = output
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|s| s.parse().ok())
            .collect();
        let correct = produced
            .iter()
            .zip(self.first..=self.last)
            .take_while(|(got, want)| **got == *want)
            .count();
        correct as f64 / (self.last - self.first + 1) as f64
    }
}

fn main() {
    common::quiet_on_closed_pipe();
    common::exit_on_error(run(Args::parse()));
}

fn run(args: Args) -> anyhow::Result<()> {
    tch::set_num_threads(2);
    let tiny = ModelConfig::from_json(cli::TINY_CONFIG)?;
    let tokenizer = cli::sample_tokenizer(ChatTemplate::MistralInstruct, &tiny)?;
    let settings: [(&str, Option<EosRegularizer>); 3] = [
        ("lambda = 0", None),
        (
            "FinalProbability",
            Some(EosRegularizer {
                lambda: args.final_lambda,
                mode: EosMode::FinalProbability,
            }),
        ),
        (
            "TargetLength",
            Some(EosRegularizer {
                lambda: args.target_lambda,
                mode: EosMode::TargetLength(TargetLength::PromptLongest),
            }),
        ),
    ];
    let mut results: Vec<Vec<(f64, f64)>> = vec![Vec::new(); settings.len() + 1];
    for seed in 0..args.seeds {
        let mut rng = ChaCha8Rng::seed_from_u64(1000 + seed);
        let held_out: Vec<Task> = (0..args.prompts).map(|_| Task::random(&mut rng)).collect();
        let sft_dir = args.output_dir.join(format!("seed-{seed}/sft"));
        let sft = train_sft(&args, &tokenizer, seed, &sft_dir)?;
        results[0].push(evaluate(&sft, &tokenizer, &held_out, args.show)?);
        for (i, (name, regularizer)) in settings.iter().enumerate() {
            let dir = args
                .output_dir
                .join(format!("seed-{seed}/{}", name.replace([' ', '='], "")));
            let model = train_preference(&args, &tokenizer, seed, &sft, *regularizer, &dir)?;
            let (length, quality) = evaluate(&model, &tokenizer, &held_out, args.show)?;
            println!(
                "seed {seed}: {name:<17} mean length {length:6.1} characters, quality {quality:.3}"
            );
            results[i + 1].push((length, quality));
        }
    }
    println!("\n| model | mean length (characters) | quality | seeds |");
    println!("|---|---:|---:|---:|");
    let names = std::iter::once("SFT only").chain(settings.iter().map(|(n, _)| *n));
    for (name, runs) in names.zip(&results) {
        let (length, quality): (Vec<f64>, Vec<f64>) = runs.iter().copied().unzip();
        println!(
            "| {name} | {} | {} | {} |",
            mean_spread(&length, 1),
            mean_spread(&quality, 3),
            runs.len()
        );
    }
    Ok(())
}

/// Next-token training on brevity-biased answers; returns the checkpoint folder.
fn train_sft(
    args: &Args,
    tokenizer: &ChatTokenizer,
    seed: u64,
    dir: &Path,
) -> anyhow::Result<PathBuf> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let examples: Vec<TokenizedExample> = (0..256)
        .map(|_| {
            let task = Task::random(&mut rng);
            // The brevity bias: 70 % of the training answers stop partway.
            let fraction = if rng.gen_bool(0.3) {
                1.0
            } else {
                rng.gen_range(0.3..0.8)
            };
            let encoded = tokenizer.encode(&task.prompt(), &task.answer(fraction), 64, 128)?;
            Ok(TokenizedExample {
                responses: vec![encoded],
                rewards: vec![0.0],
            })
        })
        .collect::<RefaResult<_>>()?;
    let model = cli::tiny_model(Device::Cpu, Kind::Float, None, seed)?;
    let config = train_config(args, tokenizer, dir, seed, args.sft_steps, 3e-3, 8);
    train(model, Box::new(NextToken), examples, config)
}

/// REFA-dynamic (plus the regularizer) from the SFT checkpoint.
fn train_preference(
    args: &Args,
    tokenizer: &ChatTokenizer,
    seed: u64,
    sft: &Path,
    regularizer: Option<EosRegularizer>,
    dir: &Path,
) -> anyhow::Result<PathBuf> {
    let mut rng = ChaCha8Rng::seed_from_u64(500 + seed);
    let examples: Vec<TokenizedExample> = (0..128)
        .map(|_| {
            let task = Task::random(&mut rng);
            let answers = [
                (task.answer(1.0), 9.0),
                (task.answer(0.75), 6.0),
                (task.answer(0.5), 4.0),
                (task.wrong_answer(), 1.0),
            ];
            let responses = answers
                .iter()
                .map(|(text, _)| tokenizer.encode(&task.prompt(), text, 64, 128))
                .collect::<RefaResult<_>>()?;
            Ok(TokenizedExample {
                responses,
                rewards: answers.iter().map(|a| a.1).collect(),
            })
        })
        .collect::<RefaResult<_>>()?;
    let model = CausalLm::from_pretrained(sft, Device::Cpu, Kind::Float, None)?;
    let loss: Box<dyn PreferenceLoss> = match regularizer {
        Some(r) => Box::new(RefaDynamic::default().with_regularizer(r)),
        None => Box::new(RefaDynamic::default()),
    };
    train(
        model,
        loss,
        examples,
        train_config(
            args,
            tokenizer,
            dir,
            seed,
            args.preference_steps,
            args.preference_lr,
            4,
        ),
    )
}

/// The run's settings; responses end, and are padded, as `tokenizer` says, and an earlier
/// run in `dir` is deleted first with --overwrite-output-dir.
fn train_config(
    args: &Args,
    tokenizer: &ChatTokenizer,
    dir: &Path,
    seed: u64,
    steps: i64,
    lr: f64,
    prompts: usize,
) -> TrainConfig {
    TrainConfig {
        prompts_per_batch: prompts,
        max_steps: steps,
        schedule: CosineSchedule {
            peak: lr,
            warmup: steps / 10,
            total: steps,
            min_ratio: 0.1,
        },
        eval_every: 0,
        save_every: 0,
        keep_checkpoints: 1,
        output_dir: dir.to_path_buf(),
        seed,
        recompute: Recompute::None,
        overwrite_output_dir: args.overwrite_output_dir,
        ..TrainConfig::default()
    }
    .with_tokenizer(tokenizer)
}

fn train(
    model: CausalLm,
    loss: Box<dyn PreferenceLoss>,
    examples: Vec<TokenizedExample>,
    config: TrainConfig,
) -> anyhow::Result<PathBuf> {
    let (train, eval) = split_eval(examples, 0.05, config.seed)?;
    let mut trainer = Trainer::new(model, loss, train, eval, config)?;
    let summary = trainer.run(&AtomicBool::new(false), |_| {})?;
    summary
        .last_checkpoint
        .ok_or_else(|| anyhow::anyhow!("no checkpoint written"))
}

/// Mean length in characters and mean quality of greedy answers to `tasks`.
fn evaluate(
    checkpoint: &Path,
    tokenizer: &ChatTokenizer,
    tasks: &[Task],
    show: bool,
) -> anyhow::Result<(f64, f64)> {
    let model = CausalLm::from_pretrained(checkpoint, Device::Cpu, Kind::Float, None)?;
    let options = GenerationOptions {
        max_new_tokens: 80,
        ..GenerationOptions::default()
    };
    let (mut length, mut quality) = (0.0, 0.0);
    for task in tasks {
        let prompt = tokenizer.encode_prompt(&task.prompt())?;
        let output = tokenizer.decode(&model.generate(&prompt, &options)?)?;
        if show && std::ptr::eq(task, &tasks[0]) {
            println!("  {} -> {output:?}", task.prompt());
        }
        length += output.chars().count() as f64;
        quality += task.quality(&output);
    }
    Ok((length / tasks.len() as f64, quality / tasks.len() as f64))
}

/// `mean ± standard deviation` over seeds.
fn mean_spread(values: &[f64], decimals: usize) -> String {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let deviation =
        (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0)).sqrt();
    format!("{mean:.decimals$} ± {deviation:.decimals$}")
}
