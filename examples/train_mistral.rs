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

use clap::{Parser, ValueEnum};
use common::Template;
use indicatif::{ProgressBar, ProgressStyle};
use refa_loss::data::{
    parse_jsonl, read_jsonl, split_eval, tokenize_records, DataFormat, ScoreField,
};
use refa_loss::mistral::{
    ChatTemplate, ChatTokenizer, LoraConfig, LoraTarget, Mistral, MistralConfig,
};
use refa_loss::scoring::ScoringConfig;
use refa_loss::train::{
    latest_checkpoint, plot_history, CosineSchedule, Recompute, StepMetrics, TrainConfig, Trainer,
};
use refa_loss::{
    device, DeviationMode, Dpo, EosMode, EosRegularizer, InfoNca, InfoNcaVariant, Mpo,
    PreferenceLoss, RefaDynamic, RefaOneVsAll, Regularized, SimPo, TargetLength,
};
use tch::{Device, Kind};

const SAMPLE_DATA: &str = include_str!("data/sample.jsonl");
const TINY_CONFIG: &str = include_str!("data/tiny-config.json");
const SAMPLE_TOKENIZER: &str = include_str!("data/tokenizer.json");

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
    /// Chat template that frames prompts and responses.
    #[arg(long, value_enum, default_value_t = Template::Mistral)]
    template: Template,
    /// Preference data, one JSON object per line. Default: the bundled sample (64 prompts × 4).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Line format of --data.
    #[arg(long, value_enum, default_value_t = Format::Simple)]
    format: Format,
    /// UltraFeedback score used as the reward.
    #[arg(long, value_enum, default_value_t = Score::Overall)]
    score_field: Score,
    /// Skip (and count) malformed lines instead of stopping at the first one.
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

    /// The loss.
    #[arg(long, value_enum, default_value_t = LossName::RefaDynamic)]
    loss: LossName,
    /// β (default: the loss's paper default).
    #[arg(long)]
    beta: Option<f64>,
    /// γ of REFA (negatives' weight).
    #[arg(long)]
    gamma: Option<f64>,
    /// α, deviation weighting of REFA and MPO.
    #[arg(long)]
    alpha: Option<f64>,
    /// p, power of the deviation.
    #[arg(long)]
    power: Option<f64>,
    /// Sign mode of the deviation.
    #[arg(long, value_enum)]
    deviation: Option<Deviation>,
    /// τ, reward temperature of InfoNCA.
    #[arg(long)]
    tau: Option<f64>,
    /// SimPO's target margin γ_m.
    #[arg(long)]
    margin: Option<f64>,
    /// SimPO's SFT term weight.
    #[arg(long)]
    sft_weight: Option<f64>,
    /// Score by summed instead of mean token log-probability.
    #[arg(long)]
    no_length_normalize: bool,
    /// λ of the EOS regularizer (0: off).
    #[arg(long, default_value_t = 0.0)]
    eos_lambda: f64,
    /// What the EOS regularizer penalizes.
    #[arg(long, value_enum, default_value_t = EosModeName::FinalProbability)]
    eos_mode: EosModeName,
    /// TargetLength's T: `prompt`, `batch` or a number of tokens.
    #[arg(long, default_value = "prompt")]
    eos_target: String,
    /// Budgeted's b in tokens.
    #[arg(long, default_value_t = 256)]
    eos_budget: usize,

    /// Peak learning rate (default: 1e-3 for the bundled tiny model, 3e-7 (the paper's, for
    /// Mistral-7B) with --model).
    #[arg(long)]
    lr: Option<f64>,
    /// Linear warmup steps.
    #[arg(long, default_value_t = 5)]
    warmup_steps: i64,
    /// Final learning rate as a fraction of the peak (cosine decay).
    #[arg(long, default_value_t = 0.1)]
    min_lr_ratio: f64,
    /// Optimizer steps.
    #[arg(long, default_value_t = 60)]
    max_steps: i64,
    /// Prompts per micro-batch (each with all its responses).
    #[arg(long, default_value_t = 4)]
    prompts_per_batch: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    accumulation_steps: usize,
    /// Gradient-norm clipping (0: off).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// LoRA rank (0: full fine-tuning; at most the smallest dimension of a targeted layer).
    #[arg(long, default_value_t = 0)]
    lora_rank: i64,
    /// LoRA α.
    #[arg(long, default_value_t = 32.0)]
    lora_alpha: f64,
    /// LoRA dropout.
    #[arg(long, default_value_t = 0.05)]
    lora_dropout: f64,
    /// LoRA targets, comma-separated among q,k,v,o,gate,up,down.
    #[arg(long, default_value = "q,k,v,o,gate,up,down")]
    lora_targets: String,
    /// Weight precision (default: bf16 on a GPU, f32 on the CPU).
    #[arg(long, value_enum)]
    dtype: Option<DType>,
    /// Recompute each decoder layer in the backward pass instead of keeping its activations:
    /// `auto` does when the largest micro-batch's activations would not fit in half of the
    /// device's free memory.
    #[arg(long, value_enum, default_value_t = Recompute::Auto)]
    recompute: Recompute,
    /// Response positions whose logits are materialized at once.
    #[arg(long, default_value_t = 1024)]
    chunk_size: i64,
    /// Device.
    #[arg(long, value_enum, default_value_t = DeviceName::Auto)]
    device: DeviceName,
    /// Seed of initialization, data order and dropout.
    #[arg(long, default_value_t = 42)]
    seed: u64,

    /// Where checkpoints and metrics.jsonl go.
    #[arg(long, default_value = "runs/refa")]
    output_dir: PathBuf,
    /// Evaluate every this many steps.
    #[arg(long, default_value_t = 20)]
    eval_every: i64,
    /// Save a checkpoint every this many steps.
    #[arg(long, default_value_t = 20)]
    save_every: i64,
    /// Checkpoints to keep.
    #[arg(long, default_value_t = 2)]
    keep_checkpoints: usize,
    /// Continue from a checkpoint folder, or `latest` for the newest in --output-dir.
    #[arg(long)]
    resume: Option<String>,
    /// No progress bar (one line per step instead).
    #[arg(long)]
    quiet: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Format {
    Simple,
    Ultrafeedback,
}
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Score {
    Overall,
    FineGrained,
}
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum LossName {
    RefaDynamic,
    RefaOneVsAll,
    InfoNca,
    InfoNcaPositivesOnly,
    InfoNcaOneVsAll,
    InfoNcaReference,
    Simpo,
    Dpo,
    Mpo,
}
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Deviation {
    Absolute,
    Signed,
}
#[derive(Clone, Copy, Debug, ValueEnum)]
enum EosModeName {
    FinalProbability,
    TargetLength,
    FinalLogProbability,
    Budgeted,
}
#[derive(Clone, Copy, Debug, ValueEnum)]
enum DType {
    F32,
    Bf16,
}
#[derive(Clone, Copy, Debug, ValueEnum)]
enum DeviceName {
    Auto,
    Cpu,
    Cuda,
}

fn main() {
    common::exit_on_error(run(Args::parse()));
}

fn run(args: Args) -> Result<(), String> {
    let device = match args.device {
        DeviceName::Auto => device::cuda_if_available(),
        DeviceName::Cpu => Device::Cpu,
        DeviceName::Cuda if device::cuda_is_available() => Device::Cuda(0),
        DeviceName::Cuda => return Err("--device cuda, but no CUDA device is visible".into()),
    };
    let kind = match args.dtype {
        Some(DType::Bf16) => Kind::BFloat16,
        Some(DType::F32) => Kind::Float,
        None if device.is_cuda() => Kind::BFloat16,
        None => Kind::Float,
    };
    if args.lora_rank < 0 {
        return Err(format!(
            "--lora-rank {}: must be >= 0 (0: full fine-tuning)",
            args.lora_rank
        ));
    }
    let lora = (args.lora_rank > 0)
        .then(|| lora_config(&args))
        .transpose()?;
    let model = load_model(&args, device, kind, lora.as_ref())?;
    let limits = token_limits(&args, model.config())?;
    let tokenizer = load_tokenizer(&args, model.config())?;
    let (train, eval) = load_examples(&args, &tokenizer, limits)?;
    let loss = build_loss(&args)?;
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
    };
    println!(
        "device {device:?}, {kind:?} weights, loss {}, {} trainable parameters ({}), {} train / {} eval prompts",
        loss.name(),
        trainable(&model),
        if lora.is_some() { "LoRA" } else { "full fine-tuning" },
        train.len(),
        eval.len()
    );
    let pad_id = model.config().eos_token_id;
    let mut trainer =
        Trainer::new(model, loss, train, eval, pad_id, config).map_err(|e| e.to_string())?;
    if let Some(resume) = &args.resume {
        let folder = if resume == "latest" {
            latest_checkpoint(&args.output_dir)
                .ok_or_else(|| format!("no checkpoint in {}", args.output_dir.display()))?
        } else {
            PathBuf::from(resume)
        };
        for note in trainer.resume(&folder).map_err(|e| e.to_string())? {
            println!("note: {note}");
        }
        println!(
            "resumed from {} at step {}",
            folder.display(),
            trainer.step()
        );
    }
    let before = trainer.evaluate().map_err(|e| e.to_string())?;
    let stop = common::StopSignals::install().map_err(|e| e.to_string())?;
    let bar = progress_bar(args.max_steps, trainer.step(), args.quiet);
    let summary = trainer
        .run(stop.flag(), |m| report(&bar, m, args.quiet))
        .map_err(|e| e.to_string())?;
    bar.finish_and_clear();
    let after = trainer.evaluate().map_err(|e| e.to_string())?;
    print_summary(&summary.history, &before, &after);
    let evaluations: Vec<StepMetrics> = std::iter::once(before.clone())
        .chain(summary.evaluations.iter().cloned())
        .chain(std::iter::once(after.clone()))
        .collect();
    let plot = args.output_dir.join("training.png");
    plot_history(&summary.history, &evaluations, &plot).map_err(|e| e.to_string())?;
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

fn lora_config(args: &Args) -> Result<LoraConfig, String> {
    let targets = args
        .lora_targets
        .split(',')
        .map(|t| {
            LoraTarget::parse(t.trim())
                .ok_or_else(|| format!("unknown LoRA target `{t}` (q,k,v,o,gate,up,down)"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(LoraConfig {
        rank: args.lora_rank,
        alpha: args.lora_alpha,
        dropout: args.lora_dropout,
        targets,
    })
}

fn load_model(
    args: &Args,
    device: Device,
    kind: Kind,
    lora: Option<&LoraConfig>,
) -> Result<Mistral, String> {
    match &args.model {
        Some(folder) => {
            Mistral::from_pretrained(folder, device, kind, lora).map_err(|e| e.to_string())
        }
        None => {
            let config = MistralConfig::from_json(TINY_CONFIG).map_err(|e| e.to_string())?;
            let model = Mistral::new(config, device, kind, lora).map_err(|e| e.to_string())?;
            model.init_random(args.seed as i64);
            Ok(model)
        }
    }
}

fn load_tokenizer(args: &Args, config: &MistralConfig) -> Result<ChatTokenizer, String> {
    let template: ChatTemplate = args.template.into();
    let (bos, eos) = (config.bos_token_id, config.eos_token_id);
    let tokenizer = match (&args.tokenizer, &args.model) {
        (Some(path), _) => ChatTokenizer::from_file(path, template, bos, eos),
        (None, Some(model)) => {
            ChatTokenizer::from_file(model.join("tokenizer.json"), template, bos, eos)
        }
        (None, None) => ChatTokenizer::from_json(SAMPLE_TOKENIZER, template, bos, eos),
    };
    let tokenizer = tokenizer.map_err(|e| e.to_string())?;
    tokenizer
        .check_fits(config.vocab_size)
        .map_err(|e| e.to_string())?;
    Ok(tokenizer)
}

/// `(max_prompt_tokens, max_tokens)`: the flags, or defaults that fit the model's context.
fn token_limits(args: &Args, config: &MistralConfig) -> Result<(usize, usize), String> {
    let positions = config.max_position_embeddings.max(0) as usize;
    let max_tokens = args.max_tokens.unwrap_or(positions.min(1024));
    if max_tokens > positions {
        return Err(format!(
            "--max-tokens {max_tokens}: more than the model's max_position_embeddings = {positions}"
        ));
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
) -> Result<
    (
        Vec<refa_loss::data::TokenizedExample>,
        Vec<refa_loss::data::TokenizedExample>,
    ),
    String,
> {
    let format = match args.format {
        Format::Simple => DataFormat::Simple,
        Format::Ultrafeedback => DataFormat::UltraFeedback,
    };
    let score = match args.score_field {
        Score::Overall => ScoreField::Overall,
        Score::FineGrained => ScoreField::FineGrained,
    };
    let report = match &args.data {
        Some(path) => read_jsonl(path, format, score, args.skip_bad_lines),
        None => parse_jsonl(
            SAMPLE_DATA,
            "bundled sample.jsonl",
            DataFormat::Simple,
            score,
            args.skip_bad_lines,
        ),
    }
    .map_err(|e| e.to_string())?;
    for (line, why) in &report.skipped {
        eprintln!("skipped line {line}: {why}");
    }
    let (examples, tokens) = tokenize_records(&report.records, tokenizer, max_prompt, max_tokens)
        .map_err(|e| e.to_string())?;
    println!(
        "data: {} prompts read, {} malformed lines skipped; dropped {} with fewer than 2 responses and {} with all scores equal; {} responses truncated",
        report.records.len(),
        report.skipped.len(),
        tokens.fewer_than_two_responses,
        tokens.all_scores_equal,
        tokens.truncated_responses
    );
    if examples.is_empty() {
        return Err("no prompt with a preference left to train on".into());
    }
    split_eval(examples, args.eval_fraction, args.seed).map_err(|e| e.to_string())
}

fn build_loss(args: &Args) -> Result<Box<dyn PreferenceLoss>, String> {
    let normalize = !args.no_length_normalize;
    let deviation = args.deviation.map(|d| match d {
        Deviation::Absolute => DeviationMode::Absolute,
        Deviation::Signed => DeviationMode::Signed,
    });
    let loss: Box<dyn PreferenceLoss> = match args.loss {
        LossName::RefaDynamic => {
            let d = RefaDynamic::default();
            Box::new(RefaDynamic {
                beta: args.beta.unwrap_or(d.beta),
                gamma: args.gamma.unwrap_or(d.gamma),
                alpha: args.alpha.unwrap_or(d.alpha),
                power: args.power.unwrap_or(d.power),
                deviation: deviation.unwrap_or(d.deviation),
                length_normalize: normalize,
            })
        }
        LossName::RefaOneVsAll => {
            let d = RefaOneVsAll::default();
            Box::new(RefaOneVsAll {
                beta: args.beta.unwrap_or(d.beta),
                gamma: args.gamma.unwrap_or(d.gamma),
                alpha: args.alpha.unwrap_or(d.alpha),
                power: args.power.unwrap_or(d.power),
                deviation: deviation.unwrap_or(d.deviation),
                length_normalize: normalize,
            })
        }
        LossName::InfoNca
        | LossName::InfoNcaPositivesOnly
        | LossName::InfoNcaOneVsAll
        | LossName::InfoNcaReference => {
            let d = if args.loss == LossName::InfoNcaReference {
                InfoNca::original()
            } else {
                InfoNca::default()
            };
            let variant = match args.loss {
                LossName::InfoNcaPositivesOnly => InfoNcaVariant::PositivesOnly,
                LossName::InfoNcaOneVsAll => InfoNcaVariant::OneVsAll,
                _ => InfoNcaVariant::Full,
            };
            Box::new(InfoNca {
                beta: args.beta.unwrap_or(d.beta),
                tau: args.tau.unwrap_or(d.tau),
                variant,
                length_normalize: d.length_normalize && normalize,
                ..d
            })
        }
        LossName::Simpo => {
            let d = SimPo::default();
            Box::new(SimPo {
                beta: args.beta.unwrap_or(d.beta),
                margin: args.margin.unwrap_or(d.margin),
                sft_weight: args.sft_weight.unwrap_or(d.sft_weight),
                length_normalize: normalize,
            })
        }
        LossName::Dpo => Box::new(Dpo {
            beta: args.beta.unwrap_or(Dpo::default().beta),
            ..Dpo::default()
        }),
        LossName::Mpo => {
            let d = Mpo::default();
            Box::new(Mpo {
                beta: args.beta.unwrap_or(d.beta),
                alpha: args.alpha.unwrap_or(d.alpha),
                power: args.power.unwrap_or(d.power),
                deviation: deviation.unwrap_or(d.deviation),
                ..d
            })
        }
    };
    if args.eos_lambda == 0.0 {
        return Ok(loss);
    }
    let mode = match args.eos_mode {
        EosModeName::FinalProbability => EosMode::FinalProbability,
        EosModeName::FinalLogProbability => EosMode::FinalLogProbability,
        EosModeName::Budgeted => EosMode::Budgeted {
            budget: args.eos_budget,
        },
        EosModeName::TargetLength => EosMode::TargetLength(match args.eos_target.as_str() {
            "prompt" => TargetLength::PromptLongest,
            "batch" => TargetLength::BatchLongest,
            n => TargetLength::Fixed(
                n.parse()
                    .map_err(|_| format!("--eos-target `{n}`: prompt, batch or a number"))?,
            ),
        }),
    };
    Ok(Box::new(Regularized {
        loss,
        regularizer: EosRegularizer {
            lambda: args.eos_lambda,
            mode,
        },
    }))
}

fn trainable(model: &Mistral) -> i64 {
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
    type Getter = fn(&StepMetrics) -> f64;
    let rows: [(&str, Getter); 5] = [
        ("loss", |m| m.loss),
        ("margin", |m| m.margin),
        ("positive mass", |m| m.positive_mass),
        ("accuracy", |m| m.accuracy),
        ("eos prob", |m| m.eos_probability),
    ];
    for (name, f) in rows {
        println!(
            "| {name} | {:.4} | {:.4} | {:.4} | {:.4} |",
            window(first, f),
            window(last, f),
            f(before),
            f(after)
        );
    }
}
