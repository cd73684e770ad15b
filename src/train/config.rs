//! How to train ([`TrainConfig`]) and what is checked before any work starts: the settings,
//! the loss on a probe batch, and the examples against the model.

use std::path::PathBuf;

use tch::{Kind, Tensor};

use crate::batch::PreferenceBatch;
use crate::data::TokenizedExample;
use crate::error::{RefaError, Result};
use crate::loss::PreferenceLoss;
use crate::model::{CausalLm, ChatTokenizer};
use crate::scoring::ScoringConfig;
use crate::train::optimizer::CosineSchedule;
use crate::train::recompute::Recompute;

/// How to train.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// Prompts per micro-batch (each with all its responses).
    pub prompts_per_batch: usize,
    /// Micro-batches per optimizer step; the loss of each is scaled by `1/accumulation_steps`
    /// so that the step's gradient is the mean over all of them.
    pub accumulation_steps: usize,
    /// Optimizer steps of the run.
    pub max_steps: i64,
    /// Learning rate schedule (its `total` should be `max_steps`).
    pub schedule: CosineSchedule,
    /// Gradient-norm clipping threshold (≤ 0: none).
    pub max_grad_norm: f64,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// Evaluate every this many steps (0: never, except at the end).
    pub eval_every: i64,
    /// Save a checkpoint every this many steps (0: only at the end).
    pub save_every: i64,
    /// Checkpoints of this run to keep (its older ones are deleted; another run's never).
    pub keep_checkpoints: usize,
    /// Where checkpoints and `metrics.jsonl` go.
    pub output_dir: PathBuf,
    /// Seed of the data order and of dropout.
    pub seed: u64,
    /// Layer-wise activation recomputation (see [`Recompute`]).
    pub recompute: Recompute,
    /// Chunked scoring settings (the id that ends a response, chunk size, per-step EOS): the
    /// tokenizer's end of turn ([`with_tokenizer`](Self::with_tokenizer)).
    pub scoring: ScoringConfig,
    /// The token id that pads batches (Mistral: its EOS, 2; the tokenizer's pad id with
    /// [`with_tokenizer`](Self::with_tokenizer)). Padding is never attended by a token nor
    /// scored; the id must be inside the model's vocabulary.
    pub pad_id: i64,
    /// Prefix sharing: run each prompt's layers once for all its responses
    /// ([`CausalLm::forward_shared_prefix`]) instead of once per response. Same values and
    /// gradients; fewer positions through the layers (K = 4, prompts 30 % of the tokens:
    /// about a fifth fewer), attention with an explicit mask. The layers then stay in the
    /// graph (`recompute` does not apply). Faster on the CPU, slower on a GPU (the mask rules
    /// out flash attention: 13 % slower on an H200, `docs/benchmarks.md`). Default false.
    pub share_prompts: bool,
    /// Start over in an output folder that holds an earlier run: a fresh run (one not
    /// resumed) deletes that run's checkpoints and `metrics.jsonl` before its first write,
    /// where it would otherwise stop with [`RefaError::OutputHasRun`]. A resumed run
    /// continues its own and ignores this. Default false (HF's `overwrite_output_dir`).
    pub overwrite_output_dir: bool,
}

impl Default for TrainConfig {
    /// The bundled example's run: 4 prompts per micro-batch, 1 micro-batch per step, 60
    /// steps, peak learning rate 1e-3 with 5 warm-up steps and cosine decay to 10 %
    /// (`schedule.total` follows `max_steps` only if set too), clipping at 1.0, no weight
    /// decay, evaluation and checkpoints every 20 steps keeping 2, `runs/refa`, seed 42,
    /// `Recompute::Auto`, Mistral's EOS (2) as EOS and padding, no prefix sharing, and an
    /// output folder that must not hold another run.
    fn default() -> Self {
        TrainConfig {
            prompts_per_batch: 4,
            accumulation_steps: 1,
            max_steps: 60,
            schedule: CosineSchedule {
                peak: 1e-3,
                warmup: 5,
                total: 60,
                min_ratio: 0.1,
            },
            max_grad_norm: 1.0,
            weight_decay: 0.0,
            eval_every: 20,
            save_every: 20,
            keep_checkpoints: 2,
            output_dir: PathBuf::from("runs/refa"),
            seed: 42,
            recompute: Recompute::Auto,
            scoring: ScoringConfig::new(2),
            pad_id: 2,
            share_prompts: false,
            overwrite_output_dir: false,
        }
    }
}

impl TrainConfig {
    /// This configuration with the response end and the padding of `tokenizer`: responses
    /// end with, and the EOS regularizer reads the probability of, its end of turn
    /// ([`ChatTokenizer::end_of_turn_id`]: `<|eot_id|>`, `<|im_end|>`, `<end_of_turn>` where
    /// the checkpoint's chat template closes a turn so, else the EOS), and batches are
    /// padded with its pad id ([`ChatTokenizer::pad_id`]). The other scoring settings stay.
    pub fn with_tokenizer(mut self, tokenizer: &ChatTokenizer) -> Self {
        self.scoring.eos_id = tokenizer.end_of_turn_id();
        self.pad_id = tokenizer.pad_id();
        self
    }

    /// Every setting by name, as text (`Debug`): what the ranks of a data-parallel job
    /// compare before they train together.
    #[cfg(feature = "distributed")]
    pub(super) fn settings(&self) -> Vec<(&'static str, String)> {
        // Destructured, so that a new field cannot be left out.
        let TrainConfig {
            prompts_per_batch,
            accumulation_steps,
            max_steps,
            schedule,
            max_grad_norm,
            weight_decay,
            eval_every,
            save_every,
            keep_checkpoints,
            output_dir,
            seed,
            recompute,
            scoring,
            pad_id,
            share_prompts,
            overwrite_output_dir,
        } = self;
        let text = |value: &dyn std::fmt::Debug| format!("{value:?}");
        vec![
            ("prompts_per_batch", text(prompts_per_batch)),
            ("accumulation_steps", text(accumulation_steps)),
            ("max_steps", text(max_steps)),
            ("schedule", text(schedule)),
            ("max_grad_norm", text(max_grad_norm)),
            ("weight_decay", text(weight_decay)),
            ("eval_every", text(eval_every)),
            ("save_every", text(save_every)),
            ("keep_checkpoints", text(keep_checkpoints)),
            ("output_dir", text(output_dir)),
            ("seed", text(seed)),
            ("recompute", text(recompute)),
            ("scoring", text(scoring)),
            ("pad_id", text(pad_id)),
            ("share_prompts", text(share_prompts)),
            ("overwrite_output_dir", text(overwrite_output_dir)),
        ]
    }

    /// Checks every setting, so that a bad one fails before any work starts: at least one
    /// prompt, micro-batch and step; a valid schedule ([`CosineSchedule::validate`]);
    /// clipping threshold >= 0 (0: off; NaN refused, it would switch clipping off silently);
    /// weight decay finite and >= 0; at least one checkpoint kept; chunks of >= 1 position.
    pub fn validate(&self) -> Result<()> {
        RefaError::require(
            self.prompts_per_batch >= 1,
            "prompts_per_batch",
            self.prompts_per_batch,
            ">= 1",
        )?;
        RefaError::require(
            self.accumulation_steps >= 1,
            "accumulation_steps",
            self.accumulation_steps,
            ">= 1",
        )?;
        RefaError::require(self.max_steps >= 1, "max_steps", self.max_steps, ">= 1")?;
        self.schedule.validate()?;
        RefaError::require(
            self.max_grad_norm >= 0.0,
            "max_grad_norm",
            self.max_grad_norm,
            ">= 0 (0: no clipping)",
        )?;
        RefaError::require(
            self.weight_decay.is_finite() && self.weight_decay >= 0.0,
            "weight_decay",
            self.weight_decay,
            "finite and >= 0",
        )?;
        RefaError::require(self.eval_every >= 0, "eval_every", self.eval_every, ">= 0")?;
        RefaError::require(self.save_every >= 0, "save_every", self.save_every, ">= 0")?;
        RefaError::require(
            self.keep_checkpoints >= 1,
            "keep_checkpoints",
            self.keep_checkpoints,
            ">= 1",
        )?;
        RefaError::require(
            self.scoring.chunk_size >= 1,
            "chunk_size",
            self.scoring.chunk_size,
            ">= 1",
        )?;
        // The shared pass keeps its layers in the graph: asking for recomputation as well
        // would be a setting that does nothing.
        RefaError::require(
            !(self.share_prompts && self.recompute == Recompute::All),
            "recompute",
            "all",
            "auto or none with share_prompts (the shared pass is not recomputed)",
        )
    }
}

/// Every token id of `examples` (and the padding id) must index the model's embedding, and
/// every sequence fit its `max_position_embeddings`.
pub(super) fn check_examples_fit(
    model: &CausalLm,
    pad_id: i64,
    examples: &[TokenizedExample],
) -> Result<()> {
    let config = model.config();
    let vocab = config.vocab_size;
    RefaError::require(
        (0..vocab).contains(&pad_id),
        "pad_id",
        pad_id,
        format!("in [0, {vocab}) (the model's vocabulary)"),
    )?;
    for (index, example) in examples.iter().enumerate() {
        for encoded in &example.responses {
            let ids = encoded.prompt.iter().chain(&encoded.response);
            if let Some(id) = ids.clone().find(|id| !(0..vocab).contains(*id)) {
                return Err(RefaError::config(
                    "tokenized data",
                    format!(
                        "example {index} holds token id {id}, outside the model's vocabulary \
                         [0, {vocab}): the tokenizer does not belong to this model"
                    ),
                ));
            }
            let length = ids.count() as i64;
            if length > config.max_position_embeddings {
                return Err(RefaError::config(
                    "tokenized data",
                    format!(
                        "example {index} has a sequence of {length} tokens, more than the \
                         model's max_position_embeddings = {}: lower the token limits",
                        config.max_position_embeddings
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Runs `loss` once on a two-response batch with every input it may read, so that a bad
/// hyperparameter or an input the scoring settings will not provide (per-step EOS for
/// `EosMode::Budgeted`) fails before the first step rather than at it. Returns the loss's
/// value there, a function of its hyperparameters (ranks of a job compare it).
pub(super) fn probe_loss(loss: &dyn PreferenceLoss, scoring: &ScoringConfig) -> Result<f64> {
    let pair = |a: f32, b: f32| Tensor::from_slice(&[a, b]).view([1, 2]);
    let mut batch = PreferenceBatch::new(&pair(-1.0, -2.0), &pair(1.0, 1.0), &pair(1.0, 0.0))?
        .with_eos(&pair(-1.0, -1.0), &pair(1.0, 1.0).gt(0.0))?;
    if loss.needs_reference() {
        batch = batch.with_reference(&pair(-1.0, -2.0))?;
    }
    if scoring.eos_steps {
        let steps = Tensor::full([1, 2, 1], -1.0, (Kind::Float, tch::Device::Cpu));
        batch = batch.with_eos_steps(&steps, &steps.lt(0.0))?;
    }
    let output = tch::no_grad(|| loss.compute(&batch))?;
    Ok(output.loss.double_value(&[]))
}
