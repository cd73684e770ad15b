//! Fine-tunes a Mistral checkpoint with a K-way preference loss (REFA by default).
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
//! safetensors, tokenizer.json) and `--data` at UltraFeedback-style JSONL.

#[path = "common/mod.rs"]
mod common;

use std::path::PathBuf;

use anyhow::bail;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use refa_loss::analysis::plot_history;
use refa_loss::data::{split_eval, tokenize_records, DataFormat, ScoreField, TokenizedExample};
use refa_loss::model::{
    CausalLm, ChatTokenizer, LoraConfig, LoraTarget, ModelConfig, TemplateChoice,
};
use refa_loss::scoring::ScoringConfig;
use refa_loss::train::{
    latest_checkpoint, CosineSchedule, Recompute, StepMetrics, TrainConfig, Trainer,
};
use refa_loss::LossConfig;
use tch::Device;

const TINY_CONFIG: &str = include_str!("data/tiny-config.json");
const SAMPLE_TOKENIZER: &str = include_str!("data/tokenizer.json");

fn defaults() -> TrainConfig {
    TrainConfig::default()
}

#[derive(Parser, Debug)]
#[command(about = "Fine-tune a Mistral checkpoint with REFA or another K-way preference loss")]
struct Args {
    /// Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.json). Default: the
    /// bundled tiny config with random weights.
    #[arg(long)]
    model: Option<PathBuf>,
    /// tokenizer.json (default: the model folder's, or the bundled one).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Chat template that frames prompts and responses: `auto` takes the checkpoint's own
    /// (tokenizer_config.json or chat_template.jinja) when it has one, else Mistral-instruct.
    #[arg(long, value_enum, default_value_t = TemplateChoice::Auto)]
    template: TemplateChoice,
    /// Preference data: a JSONL or parquet file, or a folder of *.jsonl / *.parquet shards.
    /// Default: the bundled sample (64 prompts × 4).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Layout of --data's lines or rows; `auto` tells each one's layout from its keys.
    #[arg(long, value_enum, default_value_t = DataFormat::Auto)]
    format: DataFormat,
    /// UltraFeedback score used as the reward.
    #[arg(long, value_enum, default_value_t = ScoreField::Overall)]
    score_field: ScoreField,
    /// Skip (and count) malformed lines or rows instead of stopping at the first one.
    #[arg(long)]
    skip_bad_lines: bool,
    /// Longest prompt in tokens (longer prompts keep their start). Default: 512, or half of
    /// --max-tokens if that is less.
    #[arg(long)]
    max_prompt_tokens: Option<usize>,
    /// Longest prompt + response in tokens (longer responses are cut and lose their EOS), at
    /// most the model's max_position_embeddings. Default: 1024, or that limit if it is less.
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Fraction of prompts held out for evaluation.
    #[arg(long, default_value_t = 0.125)]
    eval_fraction: f64,

    /// The loss and its hyperparameters (each defaults to the loss's paper value).
    #[command(flatten)]
    loss: LossConfig,

    /// Peak learning rate (default: 1e-3 for the bundled tiny model, 3e-7 (the paper's, for
    /// Mistral-7B) with --model).
    #[arg(long)]
    lr: Option<f64>,
    /// Linear warmup steps.
    #[arg(long, default_value_t = defaults().schedule.warmup)]
    warmup_steps: i64,
    /// Final learning rate as a fraction of the peak (cosine decay).
    #[arg(long, default_value_t = defaults().schedule.min_ratio)]
    min_lr_ratio: f64,
    /// Optimizer steps.
    #[arg(long, default_value_t = defaults().max_steps)]
    max_steps: i64,
    /// Prompts per micro-batch (each with all its responses).
    #[arg(long, default_value_t = defaults().prompts_per_batch)]
    prompts_per_batch: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = defaults().accumulation_steps)]
    accumulation_steps: usize,
    /// Gradient-norm clipping (0: off).
    #[arg(long, default_value_t = defaults().max_grad_norm)]
    max_grad_norm: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = defaults().weight_decay)]
    weight_decay: f64,
    /// LoRA rank (0: full fine-tuning; at most the smallest dimension of a targeted layer).
    #[arg(long, default_value_t = 0)]
    lora_rank: i64,
    /// LoRA α.
    #[arg(long, default_value_t = LoraConfig::default().alpha)]
    lora_alpha: f64,
    /// LoRA dropout.
    #[arg(long, default_value_t = LoraConfig::default().dropout)]
    lora_dropout: f64,
    /// LoRA targets, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "q,k,v,o,gate,up,down"
    )]
    lora_targets: Vec<LoraTarget>,
    /// Weight precision (default: bf16 on a GPU, f32 on the CPU).
    #[arg(long, value_enum)]
    dtype: Option<common::DType>,
    /// Recompute each decoder layer in the backward pass instead of keeping its activations:
    /// `auto` does when the largest micro-batch's activations would not fit in half of the
    /// device's free memory.
    #[arg(long, value_enum, default_value_t = Recompute::Auto)]
    recompute: Recompute,
    /// Run each prompt's layers once for all its responses (prefix sharing: same values and
    /// gradients, fewer positions through the layers; no recomputation).
    #[arg(long)]
    share_prompts: bool,
    /// Response positions whose logits are materialized at once.
    #[arg(long, default_value_t = ScoringConfig::new(2).chunk_size)]
    chunk_size: i64,
    /// Device.
    #[arg(long, value_enum, default_value_t = common::DeviceName::Auto)]
    device: common::DeviceName,
    /// Seed of initialization, data order and dropout.
    #[arg(long, default_value_t = defaults().seed)]
    seed: u64,

    /// Where checkpoints and metrics.jsonl go.
    #[arg(long, default_value = "runs/refa")]
    output_dir: PathBuf,
    /// Evaluate every this many steps.
    #[arg(long, default_value_t = defaults().eval_every)]
    eval_every: i64,
    /// Save a checkpoint every this many steps.
    #[arg(long, default_value_t = defaults().save_every)]
    save_every: i64,
    /// Checkpoints to keep.
    #[arg(long, default_value_t = defaults().keep_checkpoints)]
    keep_checkpoints: usize,
    /// Continue from a checkpoint folder, or `latest` for the newest in --output-dir (none
    /// yet: start at step 0, so that a job torchrun restarts continues where it stopped).
    #[arg(long)]
    resume: Option<String>,
    /// Start over in an --output-dir that holds an earlier run: delete its checkpoints and
    /// metrics.jsonl first (without it, such a folder is refused unless the run resumes).
    #[arg(long)]
    overwrite_output_dir: bool,
    /// Under torchrun (data-parallel, feature `distributed`): seconds a collective may wait
    /// for the other ranks before the run stops with an error naming the lost ones (default
    /// 600).
    #[arg(long)]
    dist_timeout: Option<u64>,
    /// Under torchrun: ZeRO-1, each rank keeps the optimizer state of its share of the
    /// parameters only (f32 master weights and moments: 12 of 16 bytes a parameter).
    #[arg(long)]
    shard_optimizer: bool,
    /// No progress bar (one line per step instead).
    #[arg(long)]
    quiet: bool,
}

fn main() {
    common::quiet_on_closed_pipe();
    common::exit_on_error(run(Args::parse()));
}

fn run(mut args: Args) -> anyhow::Result<()> {
    let job = common::job()?;
    if job.is_none() && (args.shard_optimizer || args.dist_timeout.is_some()) {
        bail!(
            "--shard-optimizer and --dist-timeout apply to a data-parallel job, and WORLD_SIZE \
             is unset: launch with `torchrun --no-python --nproc_per_node N` (docs/distributed.md)"
        );
    }
    if args.overwrite_output_dir && args.resume.is_some() {
        bail!("--overwrite-output-dir with --resume: a run starts over or continues, not both");
    }
    if args.dist_timeout == Some(0) {
        bail!("--dist-timeout 0: must be >= 1 second");
    }
    let mut device = args.device.resolve()?;
    if let (Some(job), Device::Cuda(_)) = (&job, device) {
        device = Device::Cuda(job.local_rank); // one GPU per process
    }
    if job.as_ref().is_some_and(|j| j.rank > 0) {
        common::silence_stdout(); // rank 0 alone prints
        args.quiet = true;
    }
    let kind = common::kind_for(args.dtype, device);
    let loss = args.loss.build()?;
    if args.lora_rank < 0 {
        bail!(
            "--lora-rank {}: must be >= 0 (0: full fine-tuning)",
            args.lora_rank
        );
    }
    let lora = (args.lora_rank > 0).then(|| LoraConfig {
        rank: args.lora_rank,
        alpha: args.lora_alpha,
        dropout: args.lora_dropout,
        targets: args.lora_targets.clone(),
    });
    let model = load_model(&args, device, kind, lora.as_ref())?;
    let limits = token_limits(&args, model.config())?;
    let tokenizer = load_tokenizer(&args, model.config())?;
    let (train, eval) = load_examples(&args, &tokenizer, limits)?;
    let resume_from = resume_folder(&args);
    let lr = args
        .lr
        .unwrap_or(if args.model.is_some() { 3e-7 } else { 1e-3 });
    let config = TrainConfig {
        prompts_per_batch: args.prompts_per_batch,
        accumulation_steps: args.accumulation_steps,
        max_steps: args.max_steps,
        schedule: CosineSchedule {
            peak: lr,
            warmup: args.warmup_steps,
            total: args.max_steps,
            min_ratio: args.min_lr_ratio,
        },
        max_grad_norm: args.max_grad_norm,
        weight_decay: args.weight_decay,
        eval_every: args.eval_every,
        save_every: args.save_every,
        keep_checkpoints: args.keep_checkpoints,
        output_dir: args.output_dir.clone(),
        seed: args.seed,
        recompute: args.recompute,
        scoring: ScoringConfig {
            chunk_size: args.chunk_size,
            ..ScoringConfig::new(model.config().eos_token_id)
        },
        pad_id: model.config().eos_token_id,
        share_prompts: args.share_prompts,
        // `--resume latest` with no checkpoint yet starts at step 0 in place of what a run
        // killed before its first checkpoint logged.
        overwrite_output_dir: args.overwrite_output_dir
            || (args.resume.is_some() && resume_from.is_none()),
    };
    println!(
        "device {device:?}, {kind:?} weights, loss {}, {} trainable parameters ({}), {} train / {} eval prompts",
        loss.name(),
        trainable(&model),
        if lora.is_some() { "LoRA" } else { "full fine-tuning" },
        train.len(),
        eval.len()
    );
    let mut trainer = match job {
        Some(job) => common::distributed_trainer(
            &job,
            (model, loss, train, eval, config),
            args.dist_timeout.unwrap_or(600),
            args.shard_optimizer,
        )?,
        None => Trainer::new(model, loss, train, eval, config)?,
    };
    if let Some(bytes) = trainer.collective_bytes_per_step() {
        println!(
            "data-parallel: {:.3} GB through collectives per step and rank",
            bytes as f64 / 1e9
        );
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
    let stop = common::StopSignals::install()?;
    let bar = progress_bar(args.max_steps, trainer.step(), args.quiet);
    let summary = trainer.run(stop.flag(), |m| report(&bar, m, args.quiet))?;
    bar.finish_and_clear();
    let after = trainer.evaluate()?;
    print_summary(&summary.history, &before, &after);
    let evaluations: Vec<StepMetrics> = std::iter::once(before.clone())
        .chain(summary.evaluations.iter().cloned())
        .chain(std::iter::once(after.clone()))
        .collect();
    let plot = args.output_dir.join("training.png");
    plot_history(&summary.history, &evaluations, &plot)?;
    println!("plot: {}", plot.display());
    if let Some(path) = &summary.last_checkpoint {
        let how = if summary.interrupted {
            "interrupted; saved"
        } else {
            "saved"
        };
        println!(
            "{how} {} (Hugging Face format; resume with --resume {})",
            path.display(),
            path.display()
        );
    }
    println!(
        "metrics: {}",
        args.output_dir.join("metrics.jsonl").display()
    );
    if let Some(status) = stop.exit_status().filter(|_| summary.interrupted) {
        eprintln!(
            "stopped by a signal before step {}: exit status {status}",
            args.max_steps
        );
        std::process::exit(status);
    }
    Ok(())
}

/// The checkpoint `--resume` names: a folder, or for `latest` the newest in --output-dir.
fn resume_folder(args: &Args) -> Option<PathBuf> {
    match args.resume.as_deref()? {
        "latest" => {
            let latest = latest_checkpoint(&args.output_dir);
            if latest.is_none() {
                println!(
                    "no checkpoint in {} yet: starting at step 0",
                    args.output_dir.display()
                );
            }
            latest
        }
        path => Some(PathBuf::from(path)),
    }
}

fn load_model(
    args: &Args,
    device: Device,
    kind: tch::Kind,
    lora: Option<&LoraConfig>,
) -> anyhow::Result<CausalLm> {
    // LoRA's A matrices are drawn when the model is built: from the seeded generator, so
    // that a run (and every rank of a job) is reproducible from --seed.
    tch::manual_seed(args.seed as i64);
    Ok(match &args.model {
        Some(folder) => CausalLm::from_pretrained(folder, device, kind, lora)?,
        None => {
            let model = CausalLm::new(ModelConfig::from_json(TINY_CONFIG)?, device, kind, lora)?;
            model.init_random(args.seed as i64);
            model
        }
    })
}

fn load_tokenizer(args: &Args, config: &ModelConfig) -> anyhow::Result<ChatTokenizer> {
    let (bos, eos) = (config.bos_token_id, config.eos_token_id);
    let builtin = args.template.builtin();
    let mut tokenizer = match (&args.tokenizer, &args.model) {
        (Some(path), _) => ChatTokenizer::from_file(path, builtin, bos, eos)?,
        (None, Some(model)) => {
            ChatTokenizer::from_file(model.join("tokenizer.json"), builtin, bos, eos)?
        }
        (None, None) => ChatTokenizer::from_json(SAMPLE_TOKENIZER, builtin, bos, eos)?,
    };
    if let Some(model) = &args.model {
        tokenizer = tokenizer.with_checkpoint_template(model, args.template)?;
        match tokenizer.jinja() {
            Some(_) => println!("chat template: the checkpoint's own"),
            None => println!("chat template: built-in {:?}", tokenizer.template()),
        }
    }
    tokenizer.check_fits(config.vocab_size)?;
    Ok(tokenizer)
}

/// `(max_prompt_tokens, max_tokens)`: the flags, or defaults that fit the model's context.
fn token_limits(args: &Args, config: &ModelConfig) -> anyhow::Result<(usize, usize)> {
    let positions = config.max_position_embeddings.max(0) as usize;
    let max_tokens = args.max_tokens.unwrap_or(positions.min(1024));
    if max_tokens > positions {
        bail!("--max-tokens {max_tokens}: more than the model's max_position_embeddings = {positions}");
    }
    let max_prompt = args
        .max_prompt_tokens
        .unwrap_or((max_tokens / 2).clamp(1, 512));
    Ok((max_prompt, max_tokens))
}

fn load_examples(
    args: &Args,
    tokenizer: &ChatTokenizer,
    (max_prompt, max_tokens): (usize, usize),
) -> anyhow::Result<(Vec<TokenizedExample>, Vec<TokenizedExample>)> {
    let report = common::read_records(
        args.data.as_deref(),
        args.format,
        args.score_field,
        args.skip_bad_lines,
    )?;
    for (_, why) in &report.skipped {
        eprintln!("skipped {why}");
    }
    let (examples, tokens) = tokenize_records(&report.records, tokenizer, max_prompt, max_tokens)?;
    println!(
        "data: {} prompts read, {} malformed lines or rows skipped; dropped {} with fewer than 2 responses and {} with all scores equal; {} responses truncated",
        report.records.len(),
        report.skipped.len(),
        tokens.fewer_than_two_responses,
        tokens.all_scores_equal,
        tokens.truncated_responses
    );
    if examples.is_empty() {
        bail!("no prompt with a preference left to train on");
    }
    Ok(split_eval(examples, args.eval_fraction, args.seed)?)
}

fn trainable(model: &CausalLm) -> i64 {
    model
        .var_store()
        .trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum()
}

fn progress_bar(total: i64, done: i64, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total as u64);
    bar.set_position(done as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps [{elapsed_precise} < {eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

fn report(bar: &ProgressBar, m: &StepMetrics, quiet: bool) {
    let line = format!(
        "loss {:.4}  margin {:.3}  acc {:.2}  {:.0} tok/s",
        m.loss, m.margin, m.accuracy, m.tokens_per_s
    );
    if quiet {
        println!("step {:>5}  {line}", m.step);
    } else {
        bar.set_position(m.step as u64);
        bar.set_message(line);
    }
}

fn print_summary(history: &[StepMetrics], before: &StepMetrics, after: &StepMetrics) {
    let window = |ms: &[StepMetrics], f: fn(&StepMetrics) -> f64| {
        let values: Vec<f64> = ms.iter().map(f).filter(|v| v.is_finite()).collect();
        values.iter().sum::<f64>() / values.len().max(1) as f64
    };
    let n = history.len().min(10);
    let (first, last) = (&history[..n], &history[history.len() - n..]);
    println!("\n| metric | first {n} steps | last {n} steps | eval before | eval after |");
    println!("|---|---:|---:|---:|---:|");
    const ROWS: [&str; 5] = [
        "loss",
        "rewards/margins",
        "rewards/positive_mass",
        "rewards/accuracies",
        "eos/prob",
    ];
    for metric in StepMetrics::LOSS_METRICS
        .iter()
        .filter(|m| ROWS.contains(&m.key))
    {
        let f = metric.get;
        println!(
            "| {} | {:.4} | {:.4} | {:.4} | {:.4} |",
            metric.label,
            window(first, f),
            window(last, f),
            f(before),
            f(after)
        );
    }
}
