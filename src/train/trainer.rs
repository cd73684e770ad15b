//! The training loop: micro-batches, gradient accumulation, clipping, AdamW, evaluation,
//! checkpoints and exact resumption.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tch::{Kind, Tensor};

use crate::data::{collate, Collated, DataOrder, TokenizedExample};
use crate::error::{RefaError, Result};
use crate::loss::PreferenceLoss;
use crate::mistral::{safetensors_bytes, CheckpointReader, Mistral, SaveOptions};
use crate::scoring::{preference_loss_backward, score_hidden, PreferenceTargets, ScoringConfig};
use crate::train::metrics::{MetricsAccumulator, MetricsLog, StepMetrics};
use crate::train::optimizer::{AdamW, CosineSchedule};
use crate::train::state::TrainerState;

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
    /// Checkpoints to keep (older ones are deleted).
    pub keep_checkpoints: usize,
    /// Where checkpoints and `metrics.jsonl` go.
    pub output_dir: PathBuf,
    /// Seed of the data order and of dropout.
    pub seed: u64,
    /// Layer-wise activation recomputation.
    pub recompute: bool,
    /// Chunked scoring settings (EOS id, chunk size, per-step EOS).
    pub scoring: ScoringConfig,
}

/// Reference-model log-probability sums, computed once from the starting model.
type ReferenceCache = Vec<Vec<f64>>;

/// Trains a [`Mistral`] with a preference loss on tokenized examples.
pub struct Trainer {
    model: Mistral,
    loss: Box<dyn PreferenceLoss>,
    optimizer: AdamW,
    config: TrainConfig,
    train: Vec<TokenizedExample>,
    eval: Vec<TokenizedExample>,
    order: DataOrder,
    pad_id: i64,
    reference: Option<(ReferenceCache, ReferenceCache)>,
    log: MetricsLog,
    step: i64,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("loss", &self.loss.name())
            .field("step", &self.step)
            .field("config", &self.config)
            .finish()
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    /// Optimizer steps done (in all, across resumptions).
    pub steps: i64,
    /// Metrics of every step run in this process.
    pub history: Vec<StepMetrics>,
    /// Evaluations of this process.
    pub evaluations: Vec<StepMetrics>,
    /// The last checkpoint written.
    pub last_checkpoint: Option<PathBuf>,
    /// The run stopped early on request (Ctrl-C).
    pub interrupted: bool,
}

impl Trainer {
    /// A trainer at step 0. Losses that need a reference score every example once with
    /// the starting model here (cached in `reference_logps.json` in the output folder).
    pub fn new(
        model: Mistral,
        loss: Box<dyn PreferenceLoss>,
        train: Vec<TokenizedExample>,
        eval: Vec<TokenizedExample>,
        pad_id: i64,
        config: TrainConfig,
    ) -> Result<Self> {
        std::fs::create_dir_all(&config.output_dir)
            .map_err(|e| RefaError::io(&config.output_dir, &e))?;
        let named = model.var_store().variables().into_iter().collect();
        let mut optimizer = AdamW::new(named);
        optimizer.weight_decay = config.weight_decay;
        let log = MetricsLog::open(&config.output_dir.join("metrics.jsonl"))?;
        let order = DataOrder::new(train.len(), config.seed);
        let mut trainer = Trainer {
            model,
            loss,
            optimizer,
            config,
            train,
            eval,
            order,
            pad_id,
            reference: None,
            log,
            step: 0,
        };
        if trainer.loss.needs_reference() {
            trainer.reference = Some(trainer.load_or_score_reference()?);
        }
        Ok(trainer)
    }

    /// The model.
    pub fn model(&self) -> &Mistral {
        &self.model
    }

    /// Optimizer steps done.
    pub fn step(&self) -> i64 {
        self.step
    }

    /// Trainable scalars.
    pub fn trainable_parameters(&self) -> i64 {
        self.optimizer.parameter_count()
    }

    /// One optimizer step over `accumulation_steps` micro-batches.
    pub fn train_step(&mut self) -> Result<StepMetrics> {
        let start = Instant::now();
        let step = self.step + 1;
        // Dropout draws are a function of the step, so a resumed run draws the same masks.
        tch::manual_seed(self.config.seed as i64 ^ (step << 20));
        let scale = 1.0 / self.config.accumulation_steps as f64;
        let (mut accumulator, mut tokens) = (MetricsAccumulator::default(), 0);
        for _ in 0..self.config.accumulation_steps {
            let indices = self.order.next_batch(self.config.prompts_per_batch);
            let batch = self.collate(&self.train, &indices);
            let reference = self.reference_tensor(&indices, false, &batch);
            let pass = self.model.forward_pass(
                &batch.input_ids,
                &batch.attention_mask,
                true,
                self.config.recompute,
            )?;
            let targets = PreferenceTargets {
                rewards: &batch.rewards,
                slot_mask: Some(&batch.slot_mask),
                ref_logp_sum: reference.as_ref(),
                loss_scale: scale,
            };
            let output = preference_loss_backward(
                self.loss.as_ref(),
                &pass.hidden,
                self.model.lm_head_weight(),
                &batch.labels,
                &self.config.scoring,
                &targets,
            )?;
            pass.finish_backward(&self.model)?;
            accumulator.add(&output.metrics.summary()?, batch.mean_response_length);
            tokens += batch.tokens;
        }
        let grad_norm = self.optimizer.clip_grad_norm(self.config.max_grad_norm);
        if !grad_norm.is_finite() {
            self.optimizer.zero_grad();
            return Err(RefaError::NonFiniteLoss {
                loss: "gradient norm",
                value: grad_norm,
            });
        }
        let lr = self.config.schedule.lr(step);
        self.optimizer.step(lr);
        self.step = step;
        let metrics = StepMetrics {
            grad_norm,
            lr,
            tokens_per_s: tokens as f64 / start.elapsed().as_secs_f64(),
            ..accumulator.finish(step)
        };
        self.log.write(&metrics.to_json(""))?;
        Ok(metrics)
    }

    /// Loss and metrics on the held-out examples, without gradients.
    pub fn evaluate(&mut self) -> Result<StepMetrics> {
        let mut accumulator = MetricsAccumulator::default();
        let indices: Vec<usize> = (0..self.eval.len()).collect();
        for chunk in indices.chunks(self.config.prompts_per_batch.max(1)) {
            let batch = self.collate(&self.eval, chunk);
            let reference = self.reference_tensor(chunk, true, &batch);
            let summary = tch::no_grad(|| -> Result<_> {
                let hidden = self
                    .model
                    .forward(&batch.input_ids, &batch.attention_mask, false)?;
                let scores = score_hidden(
                    &hidden,
                    self.model.lm_head_weight(),
                    &batch.labels,
                    &self.config.scoring,
                )?;
                let mut preference = scores.to_batch(&batch.rewards, Some(&batch.slot_mask))?;
                if let Some(reference) = &reference {
                    preference = preference.with_reference(reference)?;
                }
                self.loss.compute(&preference)?.metrics.summary()
            })?;
            accumulator.add(&summary, batch.mean_response_length);
        }
        let metrics = accumulator.finish(self.step);
        self.log.write(&metrics.to_json("eval/"))?;
        Ok(metrics)
    }

    /// Trains until `max_steps`, evaluating and saving on schedule; stops cleanly (saving a
    /// checkpoint) when `stop` turns true. A non-finite loss or gradient stops the run with
    /// an error that names the step; the checkpoints written before it stay untouched.
    /// `on_step` sees every step's metrics (for a progress bar).
    pub fn run(
        &mut self,
        stop: &AtomicBool,
        mut on_step: impl FnMut(&StepMetrics),
    ) -> Result<RunSummary> {
        let mut summary = RunSummary {
            steps: self.step,
            history: Vec::new(),
            evaluations: Vec::new(),
            last_checkpoint: None,
            interrupted: false,
        };
        while self.step < self.config.max_steps {
            if stop.load(Ordering::SeqCst) {
                summary.interrupted = true;
                break;
            }
            let metrics = self.train_step().map_err(|e| self.diverged(e))?;
            on_step(&metrics);
            summary.history.push(metrics);
            if self.config.eval_every > 0
                && self.step % self.config.eval_every == 0
                && !self.eval.is_empty()
            {
                summary.evaluations.push(self.evaluate()?);
            }
            if self.config.save_every > 0 && self.step % self.config.save_every == 0 {
                summary.last_checkpoint = Some(self.save_checkpoint()?);
            }
        }
        if summary
            .last_checkpoint
            .as_ref()
            .is_none_or(|p| !p.ends_with(checkpoint_name(self.step)))
        {
            summary.last_checkpoint = Some(self.save_checkpoint()?);
        }
        summary.steps = self.step;
        Ok(summary)
    }

    /// Writes `checkpoint-{step}` (a Hugging Face checkpoint plus the trainer's state)
    /// atomically, then deletes checkpoints beyond the newest `keep_checkpoints`.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let folder = self.config.output_dir.join(checkpoint_name(self.step));
        let state = TrainerState {
            step: self.step,
            epoch: self.order.epoch,
            position: self.order.position,
            seed: self.config.seed,
            lora: !self.model.adapter_parameters().is_empty(),
        };
        let optimizer = self.optimizer.state_tensors();
        let mut files = vec![
            (TrainerState::FILE, state.to_json()?.into_bytes()),
            (
                "optimizer.safetensors",
                safetensors_bytes(optimizer.iter().map(|(n, t)| (n.as_str(), t)), Kind::Float)?,
            ),
        ];
        if state.lora {
            let adapters = self.model.adapter_parameters();
            files.push((
                "adapters.safetensors",
                safetensors_bytes(adapters.iter().map(|(n, t)| (n.as_str(), t)), Kind::Float)?,
            ));
        }
        let options = SaveOptions {
            kind: self.model.kind(),
            ..SaveOptions::default()
        };
        self.model.save_pretrained_with(&folder, options, files)?;
        self.prune_checkpoints()?;
        Ok(folder)
    }

    /// Continues from a checkpoint written by [`save_checkpoint`](Self::save_checkpoint):
    /// weights (or LoRA adapters), optimizer moments, step and data position. The next
    /// steps then produce what an uninterrupted run would have.
    pub fn resume(&mut self, folder: impl AsRef<Path>) -> Result<()> {
        let folder = folder.as_ref();
        let state = TrainerState::read(folder)?;
        let read_file = |file: &str| -> Result<Vec<(String, Tensor)>> {
            let path = folder.join(file);
            Tensor::read_safetensors(&path).map_err(|e| RefaError::config(&path, e))
        };
        if state.lora {
            copy_into(
                &self.model.adapter_parameters(),
                &read_file("adapters.safetensors")?,
            )?;
        } else {
            self.model.load_weights(&CheckpointReader::open(folder)?)?;
        }
        let optimizer = read_file("optimizer.safetensors")?;
        let device = self.model.lm_head_weight().device();
        self.optimizer.load_state(|name| {
            let found = optimizer.iter().find(|(n, _)| n == name);
            found
                .map(|(_, t)| t.to_device(device))
                .ok_or_else(|| RefaError::checkpoint(name, "missing from optimizer.safetensors"))
        })?;
        self.step = state.step;
        self.order = DataOrder::resume(self.train.len(), state.seed, state.epoch, state.position);
        Ok(())
    }

    fn collate(&self, examples: &[TokenizedExample], indices: &[usize]) -> Collated {
        let chosen: Vec<&TokenizedExample> = indices.iter().map(|&i| &examples[i]).collect();
        collate(&chosen, self.pad_id, self.model.lm_head_weight().device())
    }

    /// `[P, K]` reference sums for the examples at `indices`, when the loss needs them.
    fn reference_tensor(&self, indices: &[usize], eval: bool, batch: &Collated) -> Option<Tensor> {
        let (train, held) = self.reference.as_ref()?;
        let cache = if eval { held } else { train };
        let slots = batch.rewards.size()[1] as usize;
        let mut values = vec![0f32; indices.len() * slots];
        for (p, &i) in indices.iter().enumerate() {
            for (k, v) in cache[i].iter().enumerate() {
                values[p * slots + k] = *v as f32;
            }
        }
        Some(
            Tensor::from_slice(&values)
                .view([indices.len() as i64, slots as i64])
                .to(batch.rewards.device()),
        )
    }

    fn load_or_score_reference(&self) -> Result<(ReferenceCache, ReferenceCache)> {
        let path = self.config.output_dir.join("reference_logps.json");
        if let Ok(text) = std::fs::read_to_string(&path) {
            return serde_json::from_str(&text).map_err(|e| RefaError::config(&path, e));
        }
        let cache = (self.score_all(&self.train)?, self.score_all(&self.eval)?);
        let text = serde_json::to_string(&cache).map_err(|e| RefaError::config(&path, e))?;
        std::fs::write(&path, text).map_err(|e| RefaError::io(&path, &e))?;
        Ok(cache)
    }

    /// `logp_sum` of every response of `examples` under the current model.
    fn score_all(&self, examples: &[TokenizedExample]) -> Result<ReferenceCache> {
        let mut cache = Vec::with_capacity(examples.len());
        let indices: Vec<usize> = (0..examples.len()).collect();
        for chunk in indices.chunks(self.config.prompts_per_batch.max(1)) {
            let batch = self.collate(examples, chunk);
            let sums = tch::no_grad(|| -> Result<Tensor> {
                let hidden = self
                    .model
                    .forward(&batch.input_ids, &batch.attention_mask, false)?;
                Ok(score_hidden(
                    &hidden,
                    self.model.lm_head_weight(),
                    &batch.labels,
                    &self.config.scoring,
                )?
                .logp_sum)
            })?;
            let sums =
                Vec::<f64>::try_from(&sums.to_kind(Kind::Double).to_device(tch::Device::Cpu))?;
            let slots = batch.rewards.size()[1] as usize;
            for (p, &i) in chunk.iter().enumerate() {
                cache.push(sums[p * slots..p * slots + examples[i].responses.len()].to_vec());
            }
        }
        Ok(cache)
    }

    fn prune_checkpoints(&self) -> Result<()> {
        let dir = &self.config.output_dir;
        let entries = std::fs::read_dir(dir).map_err(|e| RefaError::io(dir, &e))?;
        let mut steps: Vec<i64> = entries
            .filter_map(|e| {
                e.ok()?
                    .file_name()
                    .to_str()?
                    .strip_prefix("checkpoint-")?
                    .parse()
                    .ok()
            })
            .collect();
        steps.sort_unstable();
        let excess = steps
            .len()
            .saturating_sub(self.config.keep_checkpoints.max(1));
        for step in &steps[..excess] {
            let path = dir.join(checkpoint_name(*step));
            std::fs::remove_dir_all(&path).map_err(|e| RefaError::io(&path, &e))?;
        }
        Ok(())
    }

    /// Turns a non-finite loss, gradient or model output into [`RefaError::Diverged`], with
    /// the step and the last good checkpoint.
    fn diverged(&self, error: RefaError) -> RefaError {
        let message = match &error {
            RefaError::NonFiniteLoss { loss, value } => format!("{loss} is {value}"),
            RefaError::InvalidValue {
                tensor,
                position,
                value,
                ..
            } if matches!(*tensor, "logp_sum" | "eos_logp" | "eos_logp_steps") => {
                format!("the model's `{tensor}` is {value} at {position}")
            }
            _ => return error,
        };
        RefaError::Diverged {
            step: self.step + 1,
            message,
            last_checkpoint: latest_checkpoint(&self.config.output_dir)
                .map(|p| p.display().to_string()),
        }
    }
}

/// `checkpoint-{step}`.
pub fn checkpoint_name(step: i64) -> String {
    format!("checkpoint-{step}")
}

/// The newest `checkpoint-*` folder in `output_dir`.
pub fn latest_checkpoint(output_dir: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(output_dir).ok()?;
    entries
        .filter_map(|e| {
            let name = e.ok()?.file_name().to_str()?.to_string();
            let step: i64 = name.strip_prefix("checkpoint-")?.parse().ok()?;
            Some((step, output_dir.join(name)))
        })
        .max_by_key(|(step, _)| *step)
        .map(|(_, path)| path)
}

/// Copies named tensors from `source` into the variables `targets`.
fn copy_into(targets: &[(String, Tensor)], source: &[(String, Tensor)]) -> Result<()> {
    tch::no_grad(|| {
        for (name, target) in targets {
            let (_, value) = source
                .iter()
                .find(|(n, _)| n == name)
                .ok_or_else(|| RefaError::checkpoint(name, "missing"))?;
            target.shallow_clone().f_copy_(value)?;
        }
        Ok(())
    })
}
