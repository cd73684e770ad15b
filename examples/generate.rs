//! Generates answers with a checkpoint (greedy or sampled, with a key/value cache) and writes
//! them in AlpacaEval's `model_outputs.json` format: `[{"instruction", "output", "generator"}]`.
//!
//! ```text
//! scripts/cargo run --release --features trainer --example generate -- \
//!     --model runs/refa/checkpoint-60 --tokenizer examples/data/tokenizer.json
//! ```
//!
//! Prompts: `--prompts` is a JSON array or JSONL of objects with an `instruction` (AlpacaEval)
//! or `prompt` field; by default the bundled sample's prompts.

#[path = "common/mod.rs"]
mod common;

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use refa_loss::cli::CheckpointArgs;
use refa_loss::model::{GenerationOptions, SampleOptions};

#[derive(Parser, Debug)]
#[command(about = "Generate answers with a checkpoint, in AlpacaEval's model_outputs.json format")]
struct Args {
    #[command(flatten)]
    checkpoint: CheckpointArgs,
    /// Prompts file (JSON array or JSONL with `instruction` or `prompt`); default: the bundled sample's.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Output file.
    #[arg(long, default_value = "model_outputs.json")]
    output: PathBuf,
    /// The `generator` name written with each output (default: the checkpoint folder's name).
    #[arg(long)]
    generator: Option<String>,
    /// Most new tokens per answer (fewer where the prompt and the answer would pass the
    /// model's context, max_position_embeddings: a warning names each such prompt).
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// 0 for greedy decoding, else the sampling temperature (below 1e-5: greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Sampling seed (each answer's draws depend on it and on its prompt only).
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// Only the first N prompts.
    #[arg(long)]
    limit: Option<usize>,
}

fn main() {
    common::quiet_on_closed_pipe();
    common::exit_on_error(run(Args::parse()));
}

fn run(args: Args) -> anyhow::Result<()> {
    let options = GenerationOptions {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        ..GenerationOptions::default()
    };
    options.validate()?;
    let mut prompts = read_prompts(&args)?;
    prompts.truncate(args.limit.unwrap_or(usize::MAX));
    if prompts.is_empty() {
        anyhow::bail!("no prompt to answer (the prompt file is empty, or --limit 0)");
    }
    let (model, tokenizer) = args.checkpoint.load()?;
    let generator = args
        .generator
        .clone()
        .unwrap_or_else(|| args.checkpoint.name());
    let ids = prompts
        .iter()
        .map(|prompt| tokenizer.encode_prompt(prompt))
        .collect::<refa_loss::Result<Vec<_>>>()?;
    // Answers end at the template's end of turn as well as at the config's EOS ids.
    let generation = GenerationOptions {
        stop_token_id: Some(tokenizer.end_of_turn_id()),
        ..options
    };
    let samples = model.sample(&ids, &SampleOptions::new(1, generation))?;
    for clamp in &samples.clamped {
        eprintln!("warning: {clamp}");
    }
    let mut outputs = Vec::with_capacity(prompts.len());
    let mut lengths = Vec::with_capacity(prompts.len());
    for (prompt, answers) in prompts.iter().zip(&samples.completions) {
        let new = answers
            .first()
            .map(|a| a.tokens.as_slice())
            .unwrap_or_default();
        let text = tokenizer.decode(new)?;
        lengths.push(text.chars().count());
        outputs.push(
            serde_json::json!({ "instruction": prompt, "output": text, "generator": generator }),
        );
    }
    let json = serde_json::to_string_pretty(&outputs)?;
    if let Some(parent) = args.output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| parent.display().to_string())?;
    }
    std::fs::write(&args.output, json).with_context(|| args.output.display().to_string())?;
    let mean = lengths.iter().sum::<usize>() as f64 / lengths.len().max(1) as f64;
    println!(
        "{} answers written to {} (mean length {mean:.0} characters)",
        outputs.len(),
        args.output.display()
    );
    if let Some(first) = outputs.first() {
        println!("first: {} -> {}", first["instruction"], first["output"]);
    }
    Ok(())
}

fn read_prompts(args: &Args) -> anyhow::Result<Vec<String>> {
    let text = match &args.prompts {
        Some(path) => std::fs::read_to_string(path).with_context(|| path.display().to_string())?,
        None => common::SAMPLE_DATA.to_string(),
    };
    let values: Vec<serde_json::Value> = match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(serde_json::Value::Array(items)) => items,
        _ => text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .enumerate()
            .map(|(i, l)| {
                serde_json::from_str(l).with_context(|| format!("prompts line {}", i + 1))
            })
            .collect::<anyhow::Result<_>>()?,
    };
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.get("instruction")
                .or_else(|| v.get("prompt"))
                .and_then(|p| p.as_str())
                .map(str::to_string)
                .ok_or_else(|| {
                    anyhow::anyhow!("prompt {}: no `instruction` or `prompt` string", i + 1)
                })
        })
        .collect()
}
