//! Times the crate's training step (the trainer's `train_step`: collation, forward pass,
//! chunked scoring, REFA-dynamic, backward pass, clipping, fused AdamW) on a randomly
//! initialized Mistral and a synthetic batch, and prints one JSON object.
//!
//! ```text
//! scripts/cargo run --release --features trainer --example bench_step -- --model cpu-12m
//! scripts/cargo run --release --features trainer --example bench_step -- \
//!     --model 0.85b --device cuda --prompts 2 --responses 4 --tokens 1024 --dump runs/bench
//! ```
//!
//! The batch: `--prompts` prompts of `--responses` responses each; each sequence's length is
//! drawn uniformly from `[tokens/2, tokens)`, of which the prompt (shared by a prompt's
//! responses) takes `--prompt-fraction` of `tokens/2`. `--dump DIR` writes the model's
//! `config.json` and the batch's lengths (`batch.json`), from which
//! `benches/gpu/hf_step.py` builds the same shapes for transformers. Timings are the median
//! of `--steps` steps after `--warmup` steps; each step ends with a read of its results, so
//! the device's work is inside the time.

#[path = "common/mod.rs"]
mod common;

use common::{DType, DeviceName};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use refa_loss::data::TokenizedExample;
use refa_loss::model::{Encoded, LoraConfig, CausalLm, ModelConfig};
use refa_loss::scoring::ScoringConfig;
use refa_loss::train::{CosineSchedule, Recompute, TrainConfig, Trainer};
use refa_loss::{device, RefaDynamic};

#[derive(Parser, Debug)]
#[command(about = "Time the crate's training step on a random Mistral and a synthetic batch")]
struct Args {
    /// Model size: a preset or a config.json path.
    #[arg(long, default_value = "cpu-12m")]
    model: String,
    /// Device.
    #[arg(long, value_enum, default_value_t = DeviceName::Cpu)]
    device: DeviceName,
    /// Weight precision (default: bf16 on CUDA, f32 on the CPU).
    #[arg(long, value_enum)]
    dtype: Option<DType>,
    /// Prompts per step.
    #[arg(long, default_value_t = 2)]
    prompts: usize,
    /// Responses per prompt.
    #[arg(long, default_value_t = 4)]
    responses: usize,
    /// Longest sequence in tokens.
    #[arg(long, default_value_t = 256)]
    tokens: usize,
    /// The prompt's share of the shortest sequence.
    #[arg(long, default_value_t = 0.3)]
    prompt_fraction: f64,
    /// LoRA rank (0: full fine-tuning).
    #[arg(long, default_value_t = 0)]
    lora_rank: i64,
    /// Prefix sharing (each prompt's layers once for its responses).
    #[arg(long)]
    share_prompts: bool,
    /// Layer recomputation.
    #[arg(long, value_enum, default_value_t = Recompute::Auto)]
    recompute: Recompute,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 8)]
    steps: usize,
    /// Dense bf16 peak of the card in TFLOP/s, for the MFU (H100/H200 SXM: 989).
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// Write config.json and batch.json here (for benches/gpu/hf_step.py).
    #[arg(long)]
    dump: Option<PathBuf>,
    /// A name for the JSON record.
    #[arg(long, default_value = "refa-loss")]
    name: String,
    /// Seed of the weights and the batch.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn main() {
    common::quiet_on_closed_pipe();
    common::exit_on_error(run(Args::parse()));
}

fn run(args: Args) -> anyhow::Result<()> {
    let mut device = args.device.resolve()?;
    if let (Some(job), tch::Device::Cuda(_)) = (common::job()?, device) {
        device = tch::Device::Cuda(job.local_rank);
    }
    let kind = common::kind_for(args.dtype, device);
    let config = model_config(&args.model)?;
    if args.prompts == 0 || args.responses < 2 || args.tokens < 4 || args.steps == 0 {
        anyhow::bail!("need --prompts >= 1, --responses >= 2, --tokens >= 4, --steps >= 1");
    }
    let examples = synthetic_batch(&args, &config);
    if let Some(dir) = &args.dump {
        dump(dir, &config, &examples)?;
    }
    let lora = (args.lora_rank > 0).then(|| LoraConfig {
        rank: args.lora_rank,
        ..LoraConfig::default()
    });
    let model = CausalLm::new(config.clone(), device, kind, lora.as_ref())?;
    model.init_random(args.seed as i64);
    let parameters: i64 = model
        .var_store()
        .variables()
        .values()
        .map(|t| t.numel() as i64)
        .sum();
    let scratch = std::env::temp_dir().join(format!("refa-bench-step-{}", std::process::id()));
    let total_steps = (args.warmup + args.steps) as i64;
    let train_config = TrainConfig {
        prompts_per_batch: args.prompts,
        accumulation_steps: 1,
        max_steps: total_steps,
        schedule: CosineSchedule {
            peak: 1e-5,
            warmup: 0,
            total: total_steps,
            min_ratio: 1.0,
        },
        max_grad_norm: 1.0,
        weight_decay: 0.0,
        eval_every: 0,
        save_every: 0,
        keep_checkpoints: 1,
        output_dir: scratch.clone(),
        seed: args.seed,
        recompute: args.recompute,
        scoring: ScoringConfig::new(config.eos_token_id),
        pad_id: config.eos_token_id,
        share_prompts: args.share_prompts,
        overwrite_output_dir: false,
    };
    let lengths: Vec<usize> = examples
        .iter()
        .flat_map(|e| &e.responses)
        .map(|r| r.prompt.len() + r.response.len())
        .collect();
    let tokens: usize = lengths.iter().sum();
    // The positions the layers see: the micro-batch padded to its longest sequence, or with
    // prefix sharing the prompts once plus the responses, each padded to the longest.
    let padded_tokens = if args.share_prompts {
        let responses = examples.iter().flat_map(|e| &e.responses);
        let longest_response = responses.map(|r| r.response.len()).max().unwrap_or(0);
        let longest_prompt = examples
            .iter()
            .map(|e| e.responses[0].prompt.len())
            .max()
            .unwrap_or(0);
        args.prompts * longest_prompt + lengths.len() * longest_response
    } else {
        lengths.len() * lengths.iter().max().copied().unwrap_or(0)
    };
    // Under torchrun (feature `distributed`): one rank of a data-parallel job, each rank
    // with --prompts prompts; rank 0 alone prints.
    let job = common::job()?;
    let world_size = job.as_ref().map_or(1, |j| j.world_size);
    let parts = (
        model,
        Box::new(RefaDynamic::default()) as Box<dyn refa_loss::PreferenceLoss>,
        examples,
        Vec::new(),
        train_config,
    );
    let mut trainer = match &job {
        Some(job) => {
            if job.rank > 0 {
                common::silence_stdout();
            }
            common::distributed_trainer(job, parts, 600, false)?
        }
        None => Trainer::new(parts.0, parts.1, parts.2, parts.3, parts.4)?,
    };
    for _ in 0..args.warmup {
        trainer.train_step()?;
    }
    device::reset_peak_memory(device)?;
    let mut times = Vec::with_capacity(args.steps);
    for _ in 0..args.steps {
        let start = Instant::now();
        trainer.train_step()?;
        times.push(start.elapsed().as_secs_f64());
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let seconds = median(&mut times);
    let peak = device::memory_stats(device)?.map(|s| s.peak_allocated);
    let flops = 6.0 * parameters as f64 * tokens as f64 / seconds;
    let record = serde_json::json!({
        "name": args.name,
        "model": args.model,
        "device": format!("{device:?}"),
        "dtype": format!("{kind:?}"),
        "parameters": parameters,
        "lora_rank": args.lora_rank,
        "recompute": trainer.recomputes(),
        "share_prompts": args.share_prompts,
        "prompts": args.prompts,
        "world_size": world_size,
        "responses": args.responses,
        "tokens": tokens,
        "padded_tokens": padded_tokens,
        "ms_per_step": seconds * 1e3,
        "tokens_per_s": tokens as f64 / seconds,
        "tokens_per_s_padded": padded_tokens as f64 / seconds,
        "mfu": args.peak_tflops.map(|peak| flops / (peak * 1e12)),
        "peak_allocated_bytes": peak,
    });
    println!("{record}");
    Ok(())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The presets the benchmarks use; anything else is read as a config.json path.
fn model_config(name: &str) -> anyhow::Result<ModelConfig> {
    let preset = |vocab: i64, hidden: i64, layers: i64, heads: i64, kv: i64, inter: i64| {
        serde_json::json!({
            "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
            "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "head_dim": hidden / heads,
            "max_position_embeddings": 32768, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
            "sliding_window": null, "tie_word_embeddings": false,
            "bos_token_id": 1, "eos_token_id": 2, "model_type": "mistral"
        })
        .to_string()
    };
    let text = match name {
        "tiny" => include_str!("data/tiny-config.json").to_string(),
        // About 12 M parameters: the CPU comparison with transformers.
        "cpu-12m" => preset(8000, 256, 10, 8, 4, 768),
        // 852.6 M parameters: the configuration of the measured H200 baseline.
        "0.85b" => preset(32000, 2048, 16, 16, 4, 5632),
        // Mistral-7B v0.1's shape (sliding window off: sequences are shorter than 4096).
        "7b" => preset(32000, 4096, 32, 32, 8, 14336),
        path => std::fs::read_to_string(path).with_context(|| path.to_string())?,
    };
    Ok(ModelConfig::from_json(&text)?)
}

/// `prompts` examples of `responses` random sequences each, ending with EOS.
fn synthetic_batch(args: &Args, config: &ModelConfig) -> Vec<TokenizedExample> {
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed ^ 0xbe4c);
    let shortest = args.tokens / 2;
    let prompt_len =
        ((shortest as f64 * args.prompt_fraction).round() as usize).clamp(1, shortest - 1);
    let token = |rng: &mut ChaCha8Rng| rng.gen_range(3..config.vocab_size);
    (0..args.prompts)
        .map(|_| {
            let mut prompt: Vec<i64> = (0..prompt_len).map(|_| token(&mut rng)).collect();
            prompt[0] = config.bos_token_id;
            let responses: Vec<Encoded> = (0..args.responses)
                .map(|_| {
                    let total = rng.gen_range(shortest..args.tokens);
                    let mut response: Vec<i64> =
                        (0..total - prompt_len).map(|_| token(&mut rng)).collect();
                    *response.last_mut().expect("a response token") = config.eos_token_id;
                    Encoded {
                        prompt: prompt.clone(),
                        response,
                    }
                })
                .collect();
            let rewards = (0..args.responses)
                .map(|_| rng.gen_range(0.0..10.0))
                .collect();
            TokenizedExample { responses, rewards }
        })
        .collect()
}

/// `config.json` and `batch.json` (`{"prompts": [{"prompt": n, "responses": [m, …],
/// "rewards": […]}]}`) for the Python side.
fn dump(
    dir: &PathBuf,
    config: &ModelConfig,
    examples: &[TokenizedExample],
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| path.display().to_string())
    };
    write("config.json", config.to_json("bfloat16")?)?;
    let prompts: Vec<serde_json::Value> = examples
        .iter()
        .map(|e| {
            serde_json::json!({
                "prompt": e.responses[0].prompt.len(),
                "responses": e.responses.iter().map(|r| r.response.len()).collect::<Vec<_>>(),
                "rewards": e.rewards,
            })
        })
        .collect();
    write(
        "batch.json",
        serde_json::json!({ "prompts": prompts }).to_string(),
    )
}
