//! The training loop: micro-batches, gradient accumulation, clipping, AdamW, evaluation,
//! checkpoints and exact resumption.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tch::{Kind, Tensor};

use crate::batch::PreferenceBatch;
use crate::data::{collate, collate_shared, Collated, DataOrder, TokenizedExample};
use crate::error::{RefaError, Result};
use crate::loss::{LossMetrics, PreferenceLoss};
use crate::model::{
    remove_folder_atomically, CheckpointFile, CheckpointReader, ForwardOptions, CausalLm, Padding,
    SaveOptions,
};
use crate::scoring::{
    preference_loss_backward, score_hidden, PreferenceTargets, ScoringConfig, SequenceScores,
};
use crate::train::fingerprint::Fingerprint;
use crate::train::metrics::{MetricsAccumulator, MetricsLog, StepMetrics};
use crate::train::optimizer::{AdamW, CosineSchedule};
use crate::train::state::TrainerState;

#[cfg(feature = "distributed")]
use crate::train::data_parallel::DataParallel;

/// Without the feature `distributed` no trainer is data-parallel: an uninhabited type keeps
/// the code paths of [`Trainer`] the same in both builds.
#[cfg(not(feature = "distributed"))]
enum DataParallel {}

#[cfg(not(feature = "distributed"))]
#[allow(clippy::unused_self, missing_docs)]
impl DataParallel {
    fn is_main(&self) -> bool {
        match *self {}
    }
    fn world(&self) -> usize {
        match *self {}
    }
    fn local_slice(&self, _: &[usize], _: usize) -> Vec<usize> {
        match *self {}
    }
    fn average_gradients(&self) -> Result<()> {
        match *self {}
    }
    fn clip_grad_norm(&self, _: f64) -> Result<Tensor> {
        match *self {}
    }
    fn after_step(&self) -> Result<()> {
        match *self {}
    }
    fn reduce_metrics(&self, _: &[f64], _: &[f64]) -> Result<(Vec<f64>, Vec<f64>)> {
        match *self {}
    }
    fn barrier(&self) -> Result<()> {
        match *self {}
    }
    fn optimizer_file(&self) -> String {
        match *self {}
    }
    fn shards_optimizer(&self) -> bool {
        match *self {}
    }
    fn bytes_per_step(&self) -> u64 {
        match *self {}
    }
    fn any(&self, _: bool) -> Result<bool> {
        match *self {}
    }
}

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
    /// Layer-wise activation recomputation (see [`Recompute`]).
    pub recompute: Recompute,
    /// Chunked scoring settings (EOS id, chunk size, per-step EOS).
    pub scoring: ScoringConfig,
    /// The token id that pads batches (Mistral: its EOS, 2). Padding is never attended by
    /// a token nor scored; the id must be inside the model's vocabulary.
    pub pad_id: i64,
    /// Prefix sharing: run each prompt's layers once for all its responses
    /// ([`CausalLm::forward_shared_prefix`]) instead of once per response. Same values and
    /// gradients; fewer positions through the layers (K = 4, prompts 30 % of the tokens:
    /// about a fifth fewer), attention with an explicit mask. The layers then stay in the
    /// graph (`recompute` does not apply). Faster on the CPU, slower on a GPU (the mask rules
    /// out flash attention: 13 % slower on an H200, `docs/benchmarks.md`). Default false.
    pub share_prompts: bool,
}

impl Default for TrainConfig {
    /// The bundled example's run: 4 prompts per micro-batch, 1 micro-batch per step, 60
    /// steps, peak learning rate 1e-3 with 5 warm-up steps and cosine decay to 10 %
    /// (`schedule.total` follows `max_steps` only if set too), clipping at 1.0, no weight
    /// decay, evaluation and checkpoints every 20 steps keeping 2, `runs/refa`, seed 42,
    /// `Recompute::Auto`, Mistral's EOS (2) as EOS and padding.
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
        }
    }
}

impl TrainConfig {
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

/// Whether the decoder layers are recomputed in the backward pass (keeping only each
/// layer's input) or keep their activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "trainer", derive(clap::ValueEnum))]
pub enum Recompute {
    /// Recompute only when the activations of the largest micro-batch would not fit in half
    /// of the device's free memory (measured when the trainer starts, after the optimizer's
    /// state is allocated and less the gradients still to come; see [`activation_bytes`]).
    /// Default: recomputation costs about a third more compute.
    #[default]
    Auto,
    /// Always recompute (memory: one `[N, T, H]` tensor per layer).
    All,
    /// Never recompute.
    None,
}

/// Estimated bytes of the activations autograd keeps for one micro-batch of `tokens`
/// positions (padding included) without recomputation: per decoder layer and position, about
/// `12·H + 5·I` values (the two norms' inputs and outputs, queries, keys and values, the
/// rotary intermediates, attention output, residuals, and the MLP's gate, up, activation,
/// product and down input), in the model's kind. The chunked scorer adds `chunk_size × V`
/// f32 logits, counted too.
pub fn activation_bytes(model: &CausalLm, tokens: i64, scoring: &ScoringConfig) -> i64 {
    let c = model.config();
    let per_position = 12 * c.hidden_size + 5 * c.intermediate_size;
    let element = model.kind().elt_size_in_bytes() as i64;
    let layers = c.num_hidden_layers * tokens * per_position * element;
    layers + scoring.chunk_size * c.vocab_size * 4
}

/// Free memory where `device` lives: the driver's count for a GPU, `MemAvailable` of
/// `/proc/meminfo` for the CPU (None when unknown).
fn free_memory(device: tch::Device) -> Option<i64> {
    if device.is_cuda() {
        return crate::device::memory_stats(device)
            .ok()
            .flatten()
            .map(|s| s.free as i64);
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Reference-model log-probability sums, computed once from the starting model.
type ReferenceCache = Vec<Vec<f64>>;

/// `reference_logps.json`: the sums of the training and held-out examples, and the
/// fingerprint of the data and the starting weights they were computed from.
#[derive(serde::Serialize, serde::Deserialize)]
struct ReferenceFile {
    fingerprint: String,
    train: ReferenceCache,
    eval: ReferenceCache,
}

/// Trains a [`CausalLm`] with a preference loss on tokenized examples.
pub struct Trainer {
    model: CausalLm,
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
    data_fingerprint: String,
    recompute: bool,
    /// The job this trainer is a rank of (feature `distributed`).
    parallel: Option<DataParallel>,
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

/// What one micro-batch of a training step leaves for the step's single read.
struct MicroBatch {
    metrics: LossMetrics,
    mean_length: f64,
    tokens: i64,
    padded_tokens: i64,
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
    /// A trainer at step 0. Everything is checked before any work: the settings
    /// ([`TrainConfig::validate`]), the loss's hyperparameters and inputs (the loss is run
    /// once on a two-response probe batch), and every example against the model (token ids
    /// in its vocabulary, sequences within `max_position_embeddings`, at least one training
    /// example). Losses that need a reference score every example once with the starting
    /// model here (cached in `reference_logps.json` in the output folder, with a fingerprint
    /// of the data and the weights: a cache from other data or another model is rebuilt).
    pub fn new(
        model: CausalLm,
        loss: Box<dyn PreferenceLoss>,
        train: Vec<TokenizedExample>,
        eval: Vec<TokenizedExample>,
        config: TrainConfig,
    ) -> Result<Self> {
        Self::build(model, loss, train, eval, config, None)
    }

    /// [`new`](Self::new) for one rank of a data-parallel job (feature `distributed`): every
    /// rank draws the same seeded order and trains on its slice of each global batch of
    /// `prompts_per_batch × world size` prompts (per micro-batch), gradients are averaged
    /// over the ranks in flat buckets, and every rank starts from rank 0's weights. With
    /// `shard_optimizer` (ZeRO-1) each rank keeps the AdamW state (f32 master weights and
    /// moments) of its share of the parameters only and broadcasts its share after each
    /// step. Rank 0 alone writes `metrics.jsonl`, the reference cache and the model; each
    /// rank writes its optimizer shard into the same checkpoint folder. See
    /// `docs/distributed.md`.
    #[cfg(feature = "distributed")]
    pub fn new_distributed(
        model: CausalLm,
        loss: Box<dyn PreferenceLoss>,
        train: Vec<TokenizedExample>,
        eval: Vec<TokenizedExample>,
        config: TrainConfig,
        group: crate::distributed::ProcessGroup,
        shard_optimizer: bool,
    ) -> Result<Self> {
        let trainable = trainable_parameters(&model);
        let parallel = DataParallel::new(group, trainable, shard_optimizer);
        parallel.broadcast_parameters()?;
        Self::build(model, loss, train, eval, config, Some(parallel))
    }

    fn build(
        model: CausalLm,
        loss: Box<dyn PreferenceLoss>,
        train: Vec<TokenizedExample>,
        eval: Vec<TokenizedExample>,
        config: TrainConfig,
        parallel: Option<DataParallel>,
    ) -> Result<Self> {
        let pad_id = config.pad_id;
        config.validate()?;
        RefaError::require(!train.is_empty(), "training examples", 0, ">= 1")?;
        check_examples_fit(&model, pad_id, &train)?;
        check_examples_fit(&model, pad_id, &eval)?;
        loss.validate()?;
        probe_loss(loss.as_ref(), &config.scoring)?;
        let data_fingerprint = Fingerprint::default().examples(&train).hex();
        std::fs::create_dir_all(&config.output_dir)
            .map_err(|e| RefaError::io(&config.output_dir, &e))?;
        let named = match &parallel {
            #[cfg(feature = "distributed")]
            Some(parallel) => parallel.optimized_parameters(),
            _ => model.var_store().variables().into_iter().collect(),
        };
        // The optimizer's state exists from here on, so the free memory that decides
        // recomputation is what the activations can really have.
        let mut optimizer = AdamW::new(named);
        let recompute = resolve_recompute(&model, &train, &config);
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
            data_fingerprint,
            recompute,
            parallel,
        };
        if trainer.loss.needs_reference() {
            trainer.reference = Some(trainer.load_or_score_reference()?);
        }
        Ok(trainer)
    }

    /// The model.
    pub fn model(&self) -> &CausalLm {
        &self.model
    }

    /// Optimizer steps done.
    pub fn step(&self) -> i64 {
        self.step
    }

    /// Whether the layers are recomputed in the backward pass (the resolved
    /// [`TrainConfig::recompute`]).
    pub fn recomputes(&self) -> bool {
        self.recompute
    }

    /// Trainable scalars.
    pub fn trainable_parameters(&self) -> i64 {
        self.optimizer.parameter_count()
    }

    /// One optimizer step over `accumulation_steps` micro-batches.
    ///
    /// Nothing waits for the device until the step is queued: batches are built on the host
    /// and uploaded asynchronously, the scorer's targets come from labels on the host, the
    /// loss runs without value checks, the gradient norm stays on the device and the fused
    /// AdamW kernel skips the update by itself when that norm is not finite. Then one read
    /// (the norm, then each micro-batch's metrics) ends the step, which is also where the
    /// step's time is taken. A non-finite norm is reported as an error; weights and moments
    /// are then unchanged.
    pub fn train_step(&mut self) -> Result<StepMetrics> {
        let start = Instant::now();
        let step = self.step + 1;
        // Dropout draws are a function of the step, so a resumed run draws the same masks.
        tch::manual_seed(self.config.seed as i64 ^ (step << 20));
        let scale = 1.0 / self.config.accumulation_steps as f64;
        let mut outputs = Vec::with_capacity(self.config.accumulation_steps);
        let (mut tokens, mut padded_tokens) = (0, 0);
        for _ in 0..self.config.accumulation_steps {
            let indices = self.next_local_batch();
            let micro = if self.config.share_prompts {
                self.shared_micro_batch(&indices, scale)?
            } else {
                self.plain_micro_batch(&indices, scale)?
            };
            outputs.push((micro.metrics, micro.mean_length));
            tokens += micro.tokens;
            padded_tokens += micro.padded_tokens;
        }
        let norm = match &self.parallel {
            Some(parallel) => {
                parallel.average_gradients()?;
                parallel.clip_grad_norm(self.config.max_grad_norm)?
            }
            None => self.optimizer.clip_grad_norm(self.config.max_grad_norm)?,
        };
        let lr = self.config.schedule.lr(step);
        self.optimizer.step_if_finite(lr, &norm)?;
        if let Some(parallel) = &self.parallel {
            parallel.after_step()?;
        }
        let grad_norm = norm.double_value(&[]);
        if !grad_norm.is_finite() {
            self.optimizer.rewind_skipped_step();
            return Err(RefaError::NonFiniteLoss {
                loss: "gradient norm",
                value: grad_norm,
            });
        }
        let mut accumulator = MetricsAccumulator::default();
        for (metrics, mean_length) in &outputs {
            accumulator.add(&metrics.summary()?, *mean_length);
        }
        let mut metrics = accumulator.finish(step);
        let (mut tokens, mut padded_tokens) = (tokens as f64, padded_tokens as f64);
        if let Some(parallel) = &self.parallel {
            // The job's step: the ranks' means averaged, their tokens summed.
            let (means, counts) =
                parallel.reduce_metrics(&metrics.loss_values(), &[tokens, padded_tokens])?;
            metrics.set_loss_values(&means);
            (tokens, padded_tokens) = (counts[0], counts[1]);
        }
        let seconds = start.elapsed().as_secs_f64();
        self.step = step;
        let metrics = StepMetrics {
            grad_norm,
            lr,
            tokens_per_s: tokens / seconds,
            tokens_per_s_padded: padded_tokens / seconds,
            ..metrics
        };
        self.write_log(&metrics.to_json(""))?;
        Ok(metrics)
    }

    /// This rank's prompts of the next micro-batch: the whole batch in a single process, its
    /// slice of the job's batch (`prompts_per_batch` per rank) in a data-parallel one.
    fn next_local_batch(&mut self) -> Vec<usize> {
        let per_rank = self.config.prompts_per_batch;
        match &self.parallel {
            Some(parallel) => {
                let global = self.order.next_batch(per_rank * parallel.world());
                parallel.local_slice(&global, per_rank)
            }
            None => self.order.next_batch(per_rank),
        }
    }

    /// Bytes this rank moves through collectives each optimizer step (gradient all-reduce,
    /// plus ZeRO-1's parameter broadcasts): what scaling across GPUs is reasoned from. None
    /// for a single process.
    pub fn collective_bytes_per_step(&self) -> Option<u64> {
        self.parallel.as_ref().map(DataParallel::bytes_per_step)
    }

    /// Whether this process writes the log, the reference cache and the model: always, but
    /// in a data-parallel job only rank 0.
    pub fn is_main(&self) -> bool {
        self.parallel.as_ref().is_none_or(DataParallel::is_main)
    }

    fn write_log(&mut self, json: &str) -> Result<()> {
        if self.is_main() {
            self.log.write(json)?;
        }
        Ok(())
    }

    /// Forward, loss and backward of one micro-batch, each response with its prompt.
    fn plain_micro_batch(&self, indices: &[usize], scale: f64) -> Result<MicroBatch> {
        let batch = self.collate(&self.train, indices);
        let reference = self.reference_tensor(indices, false, &batch.rewards);
        let options = ForwardOptions {
            train: true,
            recompute: self.recompute,
            padding: Padding::Right,
        };
        let pass = self
            .model
            .forward_pass(&batch.input_ids, &batch.attention_mask, &options)?;
        let scored = (&batch.labels, &batch.rewards, &batch.slot_mask);
        let output = self.loss_backward(&pass.hidden, scored, reference.as_ref(), scale)?;
        pass.finish_backward(&self.model)?;
        Ok(MicroBatch {
            metrics: output.metrics,
            mean_length: batch.mean_response_length,
            tokens: batch.tokens,
            padded_tokens: batch.padded_tokens,
        })
    }

    /// The same with each prompt's layers run once for its responses (prefix sharing).
    fn shared_micro_batch(&self, indices: &[usize], scale: f64) -> Result<MicroBatch> {
        let chosen: Vec<&TokenizedExample> = indices.iter().map(|&i| &self.train[i]).collect();
        let device = self.model.lm_head_weight().device();
        let batch = collate_shared(&chosen, self.config.pad_id, device)?;
        let reference = self.reference_tensor(indices, false, &batch.rewards);
        let hidden = self.model.forward_shared_prefix(&batch.batch, true)?;
        let scored = (&batch.labels, &batch.rewards, &batch.slot_mask);
        let output = self.loss_backward(&hidden, scored, reference.as_ref(), scale)?;
        Ok(MicroBatch {
            metrics: output.metrics,
            mean_length: batch.mean_response_length,
            tokens: batch.tokens,
            padded_tokens: batch.padded_tokens,
        })
    }

    /// Scores `hidden` against `(labels, rewards, slot_mask)`, computes the loss and sends
    /// `scale ·` its gradient into the model; value checks are off (the step checks the
    /// gradient norm once, at its end).
    fn loss_backward(
        &self,
        hidden: &Tensor,
        (labels, rewards, slot_mask): (&Tensor, &Tensor, &Tensor),
        reference: Option<&Tensor>,
        scale: f64,
    ) -> Result<crate::loss::LossOutput> {
        let targets = PreferenceTargets {
            rewards,
            slot_mask: Some(slot_mask),
            ref_logp_sum: reference,
            loss_scale: scale,
            value_checks: false,
        };
        preference_loss_backward(
            self.loss.as_ref(),
            hidden,
            self.model.lm_head_weight(),
            labels,
            &self.config.scoring,
            &targets,
        )
    }

    /// Loss and metrics on the held-out examples, without gradients.
    pub fn evaluate(&mut self) -> Result<StepMetrics> {
        let mut accumulator = MetricsAccumulator::default();
        let indices: Vec<usize> = (0..self.eval.len()).collect();
        for chunk in indices.chunks(self.config.prompts_per_batch.max(1)) {
            let batch = self.collate(&self.eval, chunk);
            let reference = self.reference_tensor(chunk, true, &batch.rewards);
            let summary = tch::no_grad(|| -> Result<_> {
                let scores = score_batch(&self.model, &batch, &self.config.scoring)?;
                let mut preference = scores.to_batch(&batch.rewards, Some(&batch.slot_mask))?;
                if let Some(reference) = &reference {
                    preference = preference.with_reference(reference)?;
                }
                self.loss.compute(&preference)?.metrics.summary()
            })?;
            accumulator.add(&summary, batch.mean_response_length);
        }
        let metrics = accumulator.finish(self.step);
        self.write_log(&metrics.to_json("eval/"))?;
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
        // The log keeps the history up to where this run starts: a fresh run drops an earlier
        // run's steps, a resumed one the steps logged after its checkpoint (a killed run's).
        if self.is_main() {
            self.log.truncate_after(self.step)?;
        }
        let mut summary = RunSummary {
            steps: self.step,
            history: Vec::new(),
            evaluations: Vec::new(),
            last_checkpoint: None,
            interrupted: false,
        };
        while self.step < self.config.max_steps {
            if self.agree(stop.load(Ordering::SeqCst))? {
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

    /// Whether any rank says so (a stop request seen by one rank stops every rank at the
    /// same step, so that no rank waits in a collective the others never join).
    fn agree(&self, flag: bool) -> Result<bool> {
        match &self.parallel {
            Some(parallel) => parallel.any(flag),
            None => Ok(flag),
        }
    }

    /// Writes `checkpoint-{step}` (a Hugging Face checkpoint plus the trainer's state)
    /// atomically, then deletes checkpoints beyond the newest `keep_checkpoints`.
    ///
    /// In a data-parallel job every rank calls it: a rank whose optimizer state is its own
    /// (ZeRO-1) writes it to a hidden staging folder, all ranks wait for each other, rank 0
    /// moves the shards into the checkpoint it writes and renames it into place, and all
    /// wait again. A rank lost midway fails the others' wait, and no checkpoint appears.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let folder = self.config.output_dir.join(checkpoint_name(self.step));
        let staging = self
            .config
            .output_dir
            .join(format!(".shards-{}", checkpoint_name(self.step)));
        let Some(parallel) = &self.parallel else {
            return self.write_checkpoint(&folder, Vec::new());
        };
        // With ZeRO-1 the other ranks stage their shards for rank 0 to move in; rank 0's own
        // goes straight into the checkpoint it writes.
        if parallel.shards_optimizer() && !parallel.is_main() {
            let name = parallel.optimizer_file();
            std::fs::create_dir_all(&staging).map_err(|e| RefaError::io(&staging, &e))?;
            let partial = staging.join(format!(".{name}.partial"));
            let tensors = self.optimizer.state_tensors();
            crate::model::write_safetensors(&partial, &tensors, Kind::Float)?;
            let path = staging.join(&name);
            std::fs::rename(&partial, &path).map_err(|e| RefaError::io(&path, &e))?;
        }
        parallel.barrier()?;
        let result = if parallel.is_main() {
            let moved = staged_shards(&staging, parallel.world())?;
            let written = self.write_checkpoint(&folder, moved);
            if staging.exists() {
                let _ = remove_folder_atomically(&staging);
            }
            written
        } else {
            Ok(folder.clone())
        };
        parallel.barrier()?;
        result
    }

    /// Rank 0's (or the single process's) part of [`save_checkpoint`](Self::save_checkpoint):
    /// the model, the trainer's state, the optimizer state (its own, or `extra` shards) and
    /// the adapters, then pruning.
    fn write_checkpoint(
        &self,
        folder: &Path,
        extra: Vec<(String, CheckpointFile)>,
    ) -> Result<PathBuf> {
        let state = TrainerState {
            step: self.step,
            epoch: self.order.epoch,
            position: self.order.position,
            seed: self.config.seed,
            lora: !self.model.adapter_parameters().is_empty(),
            train_examples: Some(self.train.len()),
            data_fingerprint: Some(self.data_fingerprint.clone()),
            max_steps: Some(self.config.max_steps),
            schedule: Some(self.config.schedule),
        };
        // The optimizer state and adapters are streamed tensor by tensor like the weights.
        let tensors = |tensors| CheckpointFile::Tensors {
            tensors,
            kind: Kind::Float,
        };
        let mut files: Vec<(String, CheckpointFile)> = vec![(
            TrainerState::FILE.to_string(),
            CheckpointFile::Bytes(state.to_json()?.into_bytes()),
        )];
        let own_file = match &self.parallel {
            Some(parallel) => parallel.optimizer_file(),
            None => "optimizer.safetensors".to_string(),
        };
        files.push((own_file, tensors(self.optimizer.state_tensors())));
        files.extend(extra);
        if state.lora {
            files.push((
                "adapters.safetensors".to_string(),
                tensors(self.model.adapter_parameters()),
            ));
        }
        let options = SaveOptions {
            kind: self.model.kind(),
            ..SaveOptions::default()
        };
        let (names, contents): (Vec<String>, Vec<CheckpointFile>) = files.into_iter().unzip();
        let files = names.iter().map(String::as_str).zip(contents).collect();
        self.model.save_pretrained_with(folder, options, files)?;
        self.prune_checkpoints()?;
        Ok(folder.to_path_buf())
    }

    /// Continues from a checkpoint written by [`save_checkpoint`](Self::save_checkpoint):
    /// weights (or LoRA adapters), optimizer moments, step and data position. The next
    /// steps then produce what an uninterrupted run would have.
    ///
    /// A checkpoint of other training data (another fingerprint, or a position beyond this
    /// data) is refused. Returns notes on what this run changes: a learning-rate schedule or
    /// a step count other than the checkpoint's. ([`run`](Self::run) then drops the records
    /// of `metrics.jsonl` after the checkpoint's step: a killed run logged them, and they
    /// are run again.)
    pub fn resume(&mut self, folder: impl AsRef<Path>) -> Result<Vec<String>> {
        let folder = folder.as_ref();
        let state = TrainerState::read(folder)?;
        self.check_resumable(folder, &state)?;
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
        let optimizer = self.read_optimizer_state(folder)?;
        let device = self.model.lm_head_weight().device();
        self.optimizer.load_state(|name| {
            let found = optimizer.iter().find(|(n, _)| n == name);
            found.map(|(_, t)| t.to_device(device)).ok_or_else(|| {
                RefaError::checkpoint(name, "missing from the checkpoint's optimizer state")
            })
        })?;
        self.step = state.step;
        self.order = DataOrder::resume(self.train.len(), state.seed, state.epoch, state.position);
        Ok(self.schedule_notes(&state))
    }

    /// The optimizer tensors this process needs, from `optimizer.safetensors` or from the
    /// ZeRO-1 shards (`optimizer-R-of-N.safetensors`) of a job of any size: each file is read
    /// in turn and only the names this process's optimizer holds are kept.
    fn read_optimizer_state(&self, folder: &Path) -> Result<Vec<(String, Tensor)>> {
        let wanted: std::collections::HashSet<String> = self
            .optimizer
            .state_tensors()
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        let mut files: Vec<PathBuf> = std::fs::read_dir(folder)
            .map_err(|e| RefaError::io(folder, &e))?
            .filter_map(|e| Some(e.ok()?.path()))
            .filter(|p| {
                let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
                name.is_some_and(|n| n.starts_with("optimizer") && n.ends_with(".safetensors"))
            })
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(RefaError::config(
                folder,
                "a checkpoint without optimizer state",
            ));
        }
        let mut kept = Vec::new();
        for path in files {
            let tensors =
                Tensor::read_safetensors(&path).map_err(|e| RefaError::config(&path, e))?;
            kept.extend(
                tensors
                    .into_iter()
                    .filter(|(name, _)| wanted.contains(name)),
            );
        }
        Ok(kept)
    }

    /// Refuses a checkpoint whose data position belongs to other training data.
    fn check_resumable(&self, folder: &Path, state: &TrainerState) -> Result<()> {
        let path = folder.join(TrainerState::FILE);
        let other_data = |what: String| {
            RefaError::config(
                &path,
                format!("{what}: resume with the same data and tokenization settings"),
            )
        };
        if let Some(fingerprint) = &state.data_fingerprint {
            if *fingerprint != self.data_fingerprint {
                return Err(other_data(format!(
                    "written for other training data ({} examples, fingerprint {fingerprint}); \
                     this run has {} examples (fingerprint {})",
                    state.train_examples.unwrap_or(0),
                    self.train.len(),
                    self.data_fingerprint
                )));
            }
        }
        if state.position > self.train.len() {
            return Err(other_data(format!(
                "its data position {} lies beyond this run's {} training examples",
                state.position,
                self.train.len()
            )));
        }
        Ok(())
    }

    /// What this run changes against the checkpoint's schedule, in words.
    fn schedule_notes(&self, state: &TrainerState) -> Vec<String> {
        let mut notes = Vec::new();
        if let Some(max_steps) = state.max_steps.filter(|&m| m != self.config.max_steps) {
            notes.push(format!(
                "max_steps changes from {max_steps} to {}",
                self.config.max_steps
            ));
        }
        if let Some(schedule) = state.schedule.filter(|s| *s != self.config.schedule) {
            notes.push(format!(
                "the learning-rate schedule changes from {schedule:?} to {:?}: steps 1..={} \
                 followed the old one, the steps from {} on follow the new one",
                self.config.schedule,
                state.step,
                state.step + 1
            ));
        }
        notes
    }

    fn collate(&self, examples: &[TokenizedExample], indices: &[usize]) -> Collated {
        let chosen: Vec<&TokenizedExample> = indices.iter().map(|&i| &examples[i]).collect();
        collate(&chosen, self.pad_id, self.model.lm_head_weight().device())
    }

    /// `[P, K]` reference sums for the examples at `indices`, when the loss needs them, on
    /// the device of the batch's `[P, K]` `rewards`.
    fn reference_tensor(&self, indices: &[usize], eval: bool, rewards: &Tensor) -> Option<Tensor> {
        let (train, held) = self.reference.as_ref()?;
        let cache = if eval { held } else { train };
        let slots = rewards.size()[1] as usize;
        let mut values = vec![0f32; indices.len() * slots];
        for (p, &i) in indices.iter().enumerate() {
            for (k, v) in cache[i].iter().enumerate() {
                values[p * slots + k] = *v as f32;
            }
        }
        Some(
            Tensor::from_slice(&values)
                .view([indices.len() as i64, slots as i64])
                .to(rewards.device()),
        )
    }

    /// The reference sums from `reference_logps.json` when its fingerprint (data, starting
    /// weights, scoring settings) matches this run; otherwise scored anew and written
    /// atomically. A cache of other data or another model is never reused.
    fn load_or_score_reference(&self) -> Result<(ReferenceCache, ReferenceCache)> {
        let path = self.config.output_dir.join("reference_logps.json");
        let fingerprint = Fingerprint::default()
            .examples(&self.train)
            .examples(&self.eval)
            .number(self.config.scoring.eos_id)
            .weights(&self.model)?
            .hex();
        let cached = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<ReferenceFile>(&bytes).ok())
            .filter(|file| file.fingerprint == fingerprint);
        if let Some(file) = cached {
            return Ok((file.train, file.eval));
        }
        let file = ReferenceFile {
            fingerprint,
            train: self.score_all(&self.train)?,
            eval: self.score_all(&self.eval)?,
        };
        if !self.is_main() {
            return Ok((file.train, file.eval));
        }
        let text = serde_json::to_vec(&file).map_err(|e| RefaError::config(&path, e))?;
        let temporary = self.config.output_dir.join(".reference_logps.json.partial");
        std::fs::write(&temporary, text)
            .and_then(|()| std::fs::rename(&temporary, &path))
            .map_err(|e| RefaError::io(&path, &e))?;
        Ok((file.train, file.eval))
    }

    /// `logp_sum` of every response of `examples` under the current model.
    fn score_all(&self, examples: &[TokenizedExample]) -> Result<ReferenceCache> {
        let mut cache = Vec::with_capacity(examples.len());
        let indices: Vec<usize> = (0..examples.len()).collect();
        for chunk in indices.chunks(self.config.prompts_per_batch.max(1)) {
            let batch = self.collate(examples, chunk);
            let sums = score_batch(&self.model, &batch, &self.config.scoring)?.logp_sum;
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
        if !self.is_main() {
            return Ok(());
        }
        let checkpoints = checkpoints(&self.config.output_dir);
        let excess = checkpoints
            .len()
            .saturating_sub(self.config.keep_checkpoints.max(1));
        for (_, path) in &checkpoints[..excess] {
            remove_folder_atomically(path)?;
        }
        Ok(())
    }

    /// Turns a non-finite gradient norm (what a non-finite loss or model output becomes:
    /// the step runs without value checks) into [`RefaError::Diverged`], with the step and
    /// the last good checkpoint.
    fn diverged(&self, error: RefaError) -> RefaError {
        let message = match &error {
            RefaError::NonFiniteLoss { loss, value } => format!("{loss} is {value}"),
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

/// Scores a collated (right-padded) batch under `model` without gradients: the forward pass
/// and the chunked scorer, as evaluation, reference scoring and the URSLA probe need.
pub(crate) fn score_batch(
    model: &CausalLm,
    batch: &Collated,
    scoring: &ScoringConfig,
) -> Result<SequenceScores> {
    tch::no_grad(|| {
        let options = ForwardOptions::right_padded();
        let hidden = model
            .forward_pass(&batch.input_ids, &batch.attention_mask, &options)?
            .hidden;
        score_hidden(&hidden, model.lm_head_weight(), &batch.labels, scoring)
    })
}

/// [`Recompute::Auto`] decided against the largest micro-batch the data can form (the
/// longest sequence, padded, times the most responses, times the prompts per batch).
fn resolve_recompute(model: &CausalLm, train: &[TokenizedExample], config: &TrainConfig) -> bool {
    if config.share_prompts {
        return false; // the shared pass keeps its layers in the graph
    }
    match config.recompute {
        Recompute::All => true,
        Recompute::None => false,
        Recompute::Auto => {
            let longest = train
                .iter()
                .flat_map(|e| &e.responses)
                .map(|r| (r.prompt.len() + r.response.len()) as i64)
                .max()
                .unwrap_or(0);
            let slots = train.iter().map(|e| e.responses.len()).max().unwrap_or(0) as i64;
            let tokens = config.prompts_per_batch as i64 * slots * longest;
            let needed = activation_bytes(model, tokens, &config.scoring);
            let device = model.lm_head_weight().device();
            recompute_needed(needed, gradient_bytes(model), free_memory(device))
        }
    }
}

/// Bytes the trainable parameters' gradients will take once the first backward pass has
/// allocated them (one tensor of each trainable parameter's size and kind).
fn gradient_bytes(model: &CausalLm) -> i64 {
    model
        .var_store()
        .trainable_variables()
        .iter()
        .map(|t| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64)
        .sum()
}

/// Auto recomputation's rule: recompute unless the activations fit in half of what stays
/// free once the gradients exist (the other half is headroom for the allocator's
/// fragmentation, the scorer's chunks and the backward pass's temporaries). Unknown free
/// memory recomputes.
fn recompute_needed(activations: i64, gradients: i64, free: Option<i64>) -> bool {
    free.is_none_or(|free| activations > (free - gradients) / 2)
}

/// Every token id of `examples` (and the padding id) must index the model's embedding, and
/// every sequence fit its `max_position_embeddings`.
fn check_examples_fit(model: &CausalLm, pad_id: i64, examples: &[TokenizedExample]) -> Result<()> {
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
/// `EosMode::Budgeted`) fails before the first step rather than at it.
fn probe_loss(loss: &dyn PreferenceLoss, scoring: &ScoringConfig) -> Result<()> {
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
    tch::no_grad(|| loss.compute(&batch)).map(|_| ())
}

/// `checkpoint-{step}`.
pub fn checkpoint_name(step: i64) -> String {
    format!("checkpoint-{step}")
}

/// The newest `checkpoint-*` folder in `output_dir`.
pub fn latest_checkpoint(output_dir: &Path) -> Option<PathBuf> {
    checkpoints(output_dir).pop().map(|(_, path)| path)
}

/// The `checkpoint-{step}` folders of `output_dir`, oldest first (hidden staging and
/// deletion folders do not count; an unreadable folder has none).
fn checkpoints(output_dir: &Path) -> Vec<(i64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(output_dir) else {
        return Vec::new();
    };
    let mut found: Vec<(i64, PathBuf)> = entries
        .filter_map(|e| {
            let name = e.ok()?.file_name().to_str()?.to_string();
            let step: i64 = name.strip_prefix("checkpoint-")?.parse().ok()?;
            Some((step, output_dir.join(name)))
        })
        .collect();
    found.sort_by_key(|(step, _)| *step);
    found
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

/// The optimizer shards the other ranks of a job of `world` staged in `staging` (none when
/// the folder does not exist), to be moved into rank 0's checkpoint. Files of another world
/// size (left by an earlier, failed job) are not taken.
fn staged_shards(staging: &Path, world: usize) -> Result<Vec<(String, CheckpointFile)>> {
    if !staging.exists() {
        return Ok(Vec::new());
    }
    let suffix = format!("-of-{world:05}.safetensors");
    let mut names: Vec<String> = std::fs::read_dir(staging)
        .map_err(|e| RefaError::io(staging, &e))?
        .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.starts_with("optimizer-") && n.ends_with(&suffix))
        .collect();
    names.sort();
    Ok(names
        .into_iter()
        .map(|name| {
            let path = staging.join(&name);
            (name, CheckpointFile::Moved(path))
        })
        .collect())
}

/// Every trainable parameter with its name (what the optimizer and the gradient all-reduce
/// cover).
#[cfg(feature = "distributed")]
fn trainable_parameters(model: &CausalLm) -> Vec<(String, Tensor)> {
    model
        .var_store()
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect()
}

#[cfg(test)]
mod recompute_tests {
    use super::recompute_needed;

    const GIB: i64 = 1 << 30;

    #[test]
    fn gradients_still_to_come_count_against_the_free_memory() {
        // Mistral-7B fully fine-tuned on a 140 GiB card: after weights, master copies and
        // moments, 45 GiB stay free; 14 GiB of bf16 gradients are still to come; 59 GiB of
        // activations without recomputation.
        assert!(recompute_needed(59 * GIB, 14 * GIB, Some(45 * GIB)));
        // The 0.85 B model: 3 GiB of activations, 120 GiB free.
        assert!(!recompute_needed(3 * GIB, 2 * GIB, Some(120 * GIB)));
        // Fits only if the gradients are forgotten.
        assert!(recompute_needed(20 * GIB, 10 * GIB, Some(45 * GIB)));
        assert!(!recompute_needed(20 * GIB, 0, Some(45 * GIB)));
        assert!(recompute_needed(GIB, 0, None));
    }
}
