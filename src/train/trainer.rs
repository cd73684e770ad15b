//! The trainer and its loop: micro-batches, gradient accumulation, clipping, AdamW,
//! evaluation and the run. Its configuration is in `config.rs`, the recomputation decision
//! in `recompute.rs`, the reference scores in `reference.rs` and checkpoints (writing,
//! pruning, resuming) in `checkpoints.rs`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tch::Tensor;

use crate::data::{collate, collate_shared, Collated, DataOrder, TokenizedExample};
use crate::error::{RefaError, Result};
use crate::loss::{LossMetrics, PreferenceLoss};
use crate::model::{CausalLm, ForwardOptions, Padding};
use crate::scoring::{
    preference_loss_backward, score_hidden, PreferenceTargets, ScoringConfig, SequenceScores,
};
use crate::train::checkpoints::{checkpoint_name, latest_checkpoint};
use crate::train::config::{check_examples_fit, probe_loss, TrainConfig};
use crate::train::fingerprint::Fingerprint;
use crate::train::metrics::{MetricsAccumulator, MetricsLog, StepMetrics};
use crate::train::optimizer::AdamW;
use crate::train::output::{lock_output, new_run_id, OutputLock, METRICS_FILE};
use crate::train::recompute::resolve_recompute;
use crate::train::reference::ReferenceCache;

#[cfg(feature = "distributed")]
pub(super) use crate::train::data_parallel::DataParallel;

/// Without the feature `distributed` no trainer is data-parallel: an uninhabited type keeps
/// the code paths of [`Trainer`] the same in both builds.
#[cfg(not(feature = "distributed"))]
pub(super) enum DataParallel {}

#[cfg(not(feature = "distributed"))]
#[allow(clippy::unused_self, missing_docs)]
impl DataParallel {
    pub(super) fn is_main(&self) -> bool {
        match *self {}
    }
    pub(super) fn world(&self) -> usize {
        match *self {}
    }
    pub(super) fn local_slice(&self, _: &[usize], _: usize) -> Vec<usize> {
        match *self {}
    }
    pub(super) fn average_gradients(&self) -> Result<()> {
        match *self {}
    }
    pub(super) fn clip_grad_norm(&self, _: f64) -> Result<Tensor> {
        match *self {}
    }
    pub(super) fn after_step(&self) -> Result<()> {
        match *self {}
    }
    pub(super) fn reduce_metrics(&self, _: &[f64], _: &[f64]) -> Result<(Vec<f64>, Vec<f64>)> {
        match *self {}
    }
    pub(super) fn barrier(&self) -> Result<()> {
        match *self {}
    }
    pub(super) fn optimizer_file(&self) -> String {
        match *self {}
    }
    pub(super) fn shards_optimizer(&self) -> bool {
        match *self {}
    }
    pub(super) fn bytes_per_step(&self) -> u64 {
        match *self {}
    }
    pub(super) fn any(&self, _: bool) -> Result<bool> {
        match *self {}
    }
}

/// Trains a [`CausalLm`] with a preference loss on tokenized examples.
pub struct Trainer {
    pub(super) model: CausalLm,
    pub(super) loss: Box<dyn PreferenceLoss>,
    pub(super) optimizer: AdamW,
    pub(super) config: TrainConfig,
    pub(super) train: Vec<TokenizedExample>,
    pub(super) eval: Vec<TokenizedExample>,
    pub(super) order: DataOrder,
    pub(super) pad_id: i64,
    pub(super) reference: Option<(ReferenceCache, ReferenceCache)>,
    pub(super) log: MetricsLog,
    pub(super) step: i64,
    pub(super) data_fingerprint: String,
    pub(super) recompute: bool,
    /// The job this trainer is a rank of (feature `distributed`).
    pub(super) parallel: Option<DataParallel>,
    /// This run's id, in its checkpoints (a resumed run keeps its checkpoint's).
    pub(super) run_id: String,
    /// The output folder's lock (held by the process that writes there), released on drop.
    pub(super) _lock: Option<OutputLock>,
    /// [`resume`](Self::resume) was called: the run continues the one of its checkpoint.
    pub(super) resumed: bool,
    /// The output folder is settled as this run's (`claim_output`).
    pub(super) output_claimed: bool,
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
    ///
    /// The trainer locks its output folder for its lifetime, before writing anything there:
    /// a second trainer on the folder, in this process or another, stops with
    /// [`RefaError::OutputInUse`] naming the holder's pid. The lock dies with the process.
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
    ///
    /// First the ranks compare fingerprints of their settings, loss, model structure, frozen
    /// weights and data, and all stop with [`RefaError::Distributed`] naming what differs
    /// when any rank was started otherwise than rank 0.
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
        let parts = crate::train::fingerprint::setup_parts(
            &model,
            loss.as_ref(),
            (&train, &eval),
            &config,
            shard_optimizer,
        )?;
        crate::train::data_parallel::check_ranks_agree(&group, &parts)?;
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
        // The model decides how its logits are formed (Gemma 2 soft-caps them): score what
        // the model computes, whatever the caller's scoring settings said.
        let config = TrainConfig {
            scoring: model.scoring_config(config.scoring),
            ..config
        };
        config.validate()?;
        RefaError::require(!train.is_empty(), "training examples", 0, ">= 1")?;
        check_examples_fit(&model, pad_id, &train)?;
        check_examples_fit(&model, pad_id, &eval)?;
        loss.validate()?;
        probe_loss(loss.as_ref(), &config.scoring)?;
        let data_fingerprint = Fingerprint::default().examples(&train).hex();
        std::fs::create_dir_all(&config.output_dir)
            .map_err(|e| RefaError::io(&config.output_dir, &e))?;
        // Before anything is written there: a second trainer on the folder stops here.
        let lock = lock_output(&config.output_dir, parallel.as_ref())?;
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
        let log = MetricsLog::open(&config.output_dir.join(METRICS_FILE))?;
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
            run_id: new_run_id(),
            _lock: lock,
            resumed: false,
            output_claimed: false,
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

    /// The trainer's scoring settings: the configured ones with the model's own (its final
    /// logit soft cap, see [`CausalLm::scoring_config`]).
    pub fn scoring(&self) -> &ScoringConfig {
        &self.config.scoring
    }

    /// The trained model, ending the run (the output folder's lock is released): for
    /// generation, or for the next round of on-policy training.
    pub fn into_model(self) -> CausalLm {
        self.model
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
        self.claim_output()?;
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

    /// Loss and metrics on the held-out examples, without gradients. The log holds one
    /// evaluation per step: evaluating again at a step it already holds (after a resumption,
    /// or at the end of a run that evaluated at its last step) writes nothing new. In a
    /// data-parallel job every rank calls it.
    pub fn evaluate(&mut self) -> Result<StepMetrics> {
        self.claim_output()?;
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
        if !self.log.has_evaluation(self.step) {
            self.write_log(&metrics.to_json("eval/"))?;
        }
        Ok(metrics)
    }

    /// Trains until `max_steps`, evaluating and saving on schedule; stops cleanly (saving a
    /// checkpoint) when `stop` turns true. A non-finite loss or gradient stops the run with
    /// an error that names the step; the checkpoints written before it stay untouched.
    /// `on_step` sees every step's metrics (for a progress bar).
    ///
    /// Before the first step the output folder becomes this run's: a fresh run where another
    /// run's checkpoints or metrics are stops with [`RefaError::OutputHasRun`] (or removes
    /// them, with [`TrainConfig::overwrite_output_dir`]); a resumed run's log loses the
    /// records of the steps after its checkpoint, which run again. The first
    /// [`evaluate`](Self::evaluate), [`train_step`](Self::train_step) or
    /// [`save_checkpoint`](Self::save_checkpoint) does the same.
    pub fn run(
        &mut self,
        stop: &AtomicBool,
        mut on_step: impl FnMut(&StepMetrics),
    ) -> Result<RunSummary> {
        self.claim_output()?;
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
    pub(super) fn agree(&self, flag: bool) -> Result<bool> {
        match &self.parallel {
            Some(parallel) => parallel.any(flag),
            None => Ok(flag),
        }
    }

    /// The examples of `examples` at `indices` as one right-padded batch on the model's
    /// device.
    pub(super) fn collate(&self, examples: &[TokenizedExample], indices: &[usize]) -> Collated {
        let chosen: Vec<&TokenizedExample> = indices.iter().map(|&i| &examples[i]).collect();
        collate(&chosen, self.pad_id, self.model.lm_head_weight().device())
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
