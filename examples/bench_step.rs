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
//! The batch: `--prompts` prompts of `--responses` responses each. With `--lengths uniform`
//! (default) each sequence's length is drawn uniformly from `[tokens/2, tokens)`, of which the
//! prompt (shared by a prompt's responses) takes `--prompt-fraction` of `tokens/2`. With
//! `--lengths long-tail` lengths follow UltraFeedback-like long tails (see [`LongTail`]):
//! log-normal prompts (median 90 tokens, mean about 160) and responses (median 250, mean
//! about 340), capped at `--tokens` per sequence; prompts are about 29 % of the tokens, and
//! padding 2 × 4 sequences to their longest wastes about 46 % of the positions on average.
//!
//! `--layout` chooses how the step lays out the batch: `trainer` (default) is the trainer's
//! `train_step` (padded, or prefix sharing with `--share-prompts`); `padded`, `packed` and
//! `packed-shared` run the same step (collation, forward, chunked scoring, REFA-dynamic,
//! backward, clipping, fused AdamW) written out here, with the model's padded pass, its
//! packed row (`CausalLm::forward_packed`: flash kernel on CUDA in bf16, block-diagonal
//! elsewhere), or the packed row with each prompt once (`PackedBatch::with_shared_prompts`).
//! Outside the trainer, `--recompute auto` means no recomputation. `--dump DIR` writes the model's
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
use clap::{Parser, ValueEnum};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use refa_loss::data::{collate, collate_shared, TokenizedExample};
use refa_loss::model::{
    CausalLm, Encoded, ForwardOptions, LoraConfig, ModelConfig, PackedBatch, Padding,
};
use refa_loss::scoring::{preference_loss_backward, PreferenceTargets, ScoringConfig};
use refa_loss::train::{AdamW, CosineSchedule, Recompute, TrainConfig, Trainer};
use refa_loss::{device, RefaDynamic};

/// How sequence lengths are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Lengths {
    /// Uniform in `[tokens/2, tokens)`, one prompt length for the batch.
    Uniform,
    /// UltraFeedback-like log-normal prompts and responses ([`LongTail`]).
    LongTail,
}

/// How the timed step lays out its batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Layout {
    /// The trainer's `train_step` (padded; prefix sharing with `--share-prompts`).
    Trainer,
    /// Right-padded to the longest sequence (`CausalLm::forward_pass`).
    Padded,
    /// One packed row (`CausalLm::forward_packed`).
    Packed,
    /// One packed row, each prompt once before its responses.
    PackedShared,
}

/// UltraFeedback-like lengths in tokens: `round(exp(N(ln median, sigma²)))`, the prompt
/// clamped to `[4, cap/2]` and each response to `[2, cap − prompt]`.
///
/// Fit to the shape of UltraFeedback's prompts and completions under a Llama/Mistral
/// tokenizer (tens to thousands of tokens, long right tails): prompt median 90 (mean
/// 90·e^(1.07²/2) ≈ 160), response median 250 (mean ≈ 340). With `cap` = 1024 the prompt is
/// 29 % of the tokens on average, and 2 prompts × 4 responses padded to their longest are
/// 46 % padding (× 8 responses: 52 %), over 20 000 simulated batches.
struct LongTail;

impl LongTail {
    const PROMPT_MEDIAN: f64 = 90.0;
    const PROMPT_SIGMA: f64 = 1.07;
    const RESPONSE_MEDIAN: f64 = 250.0;
    const RESPONSE_SIGMA: f64 = 0.78;

    fn draw(rng: &mut ChaCha8Rng, median: f64, sigma: f64, low: usize, high: usize) -> usize {
        // Box-Muller: a standard normal from two uniforms in (0, 1].
        let (u, v): (f64, f64) = (1.0 - rng.gen::<f64>(), rng.gen::<f64>());
        let normal = (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos();
        ((median.ln() + sigma * normal).exp().round() as usize).clamp(low, high.max(low))
    }

    fn prompt(rng: &mut ChaCha8Rng, cap: usize) -> usize {
        Self::draw(rng, Self::PROMPT_MEDIAN, Self::PROMPT_SIGMA, 4, cap / 2)
    }

    fn response(rng: &mut ChaCha8Rng, cap: usize, prompt: usize) -> usize {
        Self::draw(rng, Self::RESPONSE_MEDIAN, Self::RESPONSE_SIGMA, 2, cap - prompt)
    }
}

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
    /// Sequence lengths: uniform, or UltraFeedback-like long tails capped at --tokens.
    #[arg(long, value_enum, default_value_t = Lengths::Uniform)]
    lengths: Lengths,
    /// The step's batch layout: the trainer's step, or padded / packed / packed-shared.
    #[arg(long, value_enum, default_value_t = Layout::Trainer)]
    layout: Layout,
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
    if args.prompts == 0 || args.responses < 2 || args.tokens < 16 || args.steps == 0 {
        anyhow::bail!("need --prompts >= 1, --responses >= 2, --tokens >= 16, --steps >= 1");
    }
    if args.share_prompts && args.layout != Layout::Trainer {
        anyhow::bail!("--share-prompts is the trainer's; use --layout packed-shared");
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
    // prefix sharing the prompts once plus the responses, each padded to the longest; packed,
    // the tokens alone (each prompt once when shared).
    let prompt_tokens: usize = examples.iter().map(|e| e.responses[0].prompt.len()).sum();
    let padded_tokens = if args.layout == Layout::Packed {
        tokens
    } else if args.layout == Layout::PackedShared {
        prompt_tokens + examples.iter().flat_map(|e| &e.responses).map(|r| r.response.len()).sum::<usize>()
    } else if args.share_prompts {
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
    if args.layout != Layout::Trainer {
        anyhow::ensure!(job.is_none(), "--layout {:?} runs outside the trainer: no torchrun job", args.layout);
        let (model, _, examples, _, train_config) = parts;
        let recompute = args.recompute == Recompute::All;
        let mut step = LayoutStep::new(model, examples, args.layout, recompute, &train_config);
        let kernel = step.kernel()?;
        for _ in 0..args.warmup {
            step.run()?;
        }
        device::reset_peak_memory(device)?;
        let mut times = Vec::with_capacity(args.steps);
        for _ in 0..args.steps {
            let start = Instant::now();
            step.run()?;
            times.push(start.elapsed().as_secs_f64());
        }
        let _ = std::fs::remove_dir_all(&scratch);
        let measured = Measured {
            fastest: times.iter().copied().fold(f64::INFINITY, f64::min),
            seconds: median(&mut times),
            parameters,
            tokens,
            padded_tokens,
            recompute,
            kernel,
            world_size,
        };
        println!("{}", record(&args, device, kind, &measured)?);
        return Ok(());
    }
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
    let measured = Measured {
        fastest: times.iter().copied().fold(f64::INFINITY, f64::min),
        seconds: median(&mut times),
        parameters,
        tokens,
        padded_tokens,
        recompute: trainer.recomputes(),
        kernel: None,
        world_size,
    };
    println!("{}", record(&args, device, kind, &measured)?);
    Ok(())
}

/// What a timed run measured.
struct Measured {
    /// The median step.
    seconds: f64,
    /// The fastest step (on a shared machine, the least disturbed).
    fastest: f64,
    parameters: i64,
    tokens: usize,
    padded_tokens: usize,
    recompute: bool,
    /// The packed layouts' attention kernel.
    kernel: Option<String>,
    world_size: usize,
}

/// The JSON record of a run (`tokens_per_s` counts real tokens; `padded_tokens` the
/// positions the layers computed).
fn record(
    args: &Args,
    device: tch::Device,
    kind: tch::Kind,
    m: &Measured,
) -> anyhow::Result<serde_json::Value> {
    let peak = device::memory_stats(device)?.map(|s| s.peak_allocated);
    let flops = 6.0 * m.parameters as f64 * m.tokens as f64 / m.seconds;
    Ok(serde_json::json!({
        "name": args.name,
        "model": args.model,
        "device": format!("{device:?}"),
        "dtype": format!("{kind:?}"),
        "parameters": m.parameters,
        "lora_rank": args.lora_rank,
        "recompute": m.recompute,
        "share_prompts": args.share_prompts,
        "layout": format!("{:?}", args.layout),
        "lengths": format!("{:?}", args.lengths),
        "kernel": m.kernel,
        "prompts": args.prompts,
        "world_size": m.world_size,
        "responses": args.responses,
        "tokens": m.tokens,
        "padded_tokens": m.padded_tokens,
        "positions_per_token": m.padded_tokens as f64 / m.tokens as f64,
        "ms_per_step": m.seconds * 1e3,
        "ms_fastest_step": m.fastest * 1e3,
        "tokens_per_s": m.tokens as f64 / m.seconds,
        "tokens_per_s_padded": m.padded_tokens as f64 / m.seconds,
        "mfu": args.peak_tflops.map(|peak| flops / (peak * 1e12)),
        "peak_allocated_bytes": peak,
    }))
}

/// The training step outside the trainer, for the padded and packed layouts: collation,
/// forward pass, chunked scoring with REFA-dynamic and its backward pass, clipping at 1.0,
/// one fused AdamW step; it ends with a read of the loss and the gradient norm.
struct LayoutStep {
    model: CausalLm,
    optimizer: AdamW,
    examples: Vec<TokenizedExample>,
    layout: Layout,
    recompute: bool,
    scoring: ScoringConfig,
    pad_id: i64,
}

impl LayoutStep {
    fn new(
        model: CausalLm,
        examples: Vec<TokenizedExample>,
        layout: Layout,
        recompute: bool,
        config: &TrainConfig,
    ) -> Self {
        let parameters = model.var_store().variables().into_iter().collect();
        LayoutStep {
            optimizer: AdamW::new(parameters),
            model,
            examples,
            layout,
            recompute,
            scoring: config.scoring,
            pad_id: config.pad_id,
        }
    }

    /// The packed layouts' attention kernel, by name.
    fn kernel(&self) -> anyhow::Result<Option<String>> {
        if self.layout == Layout::Padded {
            return Ok(None);
        }
        let batch = self.packed_batch()?;
        Ok(Some(format!("{:?}", self.model.packed_kernel(&batch)?)))
    }

    fn device(&self) -> tch::Device {
        self.model.lm_head_weight().device()
    }

    /// The packed row of the batch (plain or with shared prompts), from the host's ids.
    fn packed_batch(&self) -> anyhow::Result<PackedBatch> {
        let responses = self.examples.iter().flat_map(|e| &e.responses);
        if self.layout == Layout::PackedShared {
            let prompts: Vec<&[i64]> =
                self.examples.iter().map(|e| e.responses[0].prompt.as_slice()).collect();
            let responses: Vec<&[i64]> = responses.map(|r| r.response.as_slice()).collect();
            return Ok(PackedBatch::with_shared_prompts(&prompts, &responses, self.device())?);
        }
        let sequences: Vec<Vec<i64>> = responses.map(Encoded::input_ids).collect();
        let sequences: Vec<&[i64]> = sequences.iter().map(Vec::as_slice).collect();
        Ok(PackedBatch::from_sequences(&sequences, self.device())?)
    }

    fn run(&mut self) -> anyhow::Result<()> {
        let chosen: Vec<&TokenizedExample> = self.examples.iter().collect();
        let device = self.device();
        let options = ForwardOptions {
            train: true,
            recompute: self.recompute,
            padding: Padding::Right,
        };
        let (pass, hidden, labels, rewards, slot_mask) = match self.layout {
            Layout::Padded | Layout::Trainer => {
                let batch = collate(&chosen, self.pad_id, device);
                let pass =
                    self.model
                        .forward_pass(&batch.input_ids, &batch.attention_mask, &options)?;
                let hidden = pass.hidden.shallow_clone();
                (pass, hidden, batch.labels, batch.rewards, batch.slot_mask)
            }
            Layout::Packed => {
                let batch = collate(&chosen, self.pad_id, device);
                let packed = self.packed_batch()?;
                let pass = self.model.forward_packed(&packed, &options)?;
                let hidden = packed.unpack(&pass.hidden)?;
                (pass, hidden, batch.labels, batch.rewards, batch.slot_mask)
            }
            Layout::PackedShared => {
                let batch = collate_shared(&chosen, self.pad_id, device)?;
                let packed = self.packed_batch()?;
                let pass = self.model.forward_packed(&packed, &options)?;
                let hidden = packed.unpack(&pass.hidden)?;
                (pass, hidden, batch.labels, batch.rewards, batch.slot_mask)
            }
        };
        let targets = PreferenceTargets {
            slot_mask: Some(&slot_mask),
            value_checks: false,
            ..PreferenceTargets::new(&rewards)
        };
        let output = preference_loss_backward(
            &RefaDynamic::default(),
            &hidden,
            self.model.lm_head_weight(),
            &labels,
            &self.scoring,
            &targets,
        )?;
        pass.finish_backward(&self.model)?;
        let norm = self.optimizer.clip_grad_norm(1.0)?;
        self.optimizer.step_if_finite(1e-5, &norm)?;
        let (loss, norm) = (output.loss.double_value(&[]), norm.double_value(&[]));
        anyhow::ensure!(loss.is_finite() && norm.is_finite(), "loss {loss}, gradient norm {norm}");
        Ok(())
    }
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
    let uniform_prompt =
        ((shortest as f64 * args.prompt_fraction).round() as usize).clamp(1, shortest - 1);
    let token = |rng: &mut ChaCha8Rng| rng.gen_range(3..config.vocab_size);
    (0..args.prompts)
        .map(|_| {
            let prompt_len = match args.lengths {
                Lengths::Uniform => uniform_prompt,
                Lengths::LongTail => LongTail::prompt(&mut rng, args.tokens),
            };
            let mut prompt: Vec<i64> = (0..prompt_len).map(|_| token(&mut rng)).collect();
            prompt[0] = config.bos_token_id;
            let responses: Vec<Encoded> = (0..args.responses)
                .map(|_| {
                    let response_len = match args.lengths {
                        Lengths::Uniform => rng.gen_range(shortest..args.tokens) - prompt_len,
                        Lengths::LongTail => LongTail::response(&mut rng, args.tokens, prompt_len),
                    };
                    let mut response: Vec<i64> =
                        (0..response_len).map(|_| token(&mut rng)).collect();
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
