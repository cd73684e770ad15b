//! The flags of a training run: the optimizer and its schedule, LoRA, checkpoints and
//! resuming, and a torchrun job's settings.

use std::path::PathBuf;

use crate::data::TokenizedExample;
use crate::error::{RefaError, Result};
use crate::loss::PreferenceLoss;
use crate::model::{CausalLm, ChatTokenizer, LoraConfig, LoraTarget};
use crate::scoring::ScoringConfig;
use crate::train::{latest_checkpoint, CosineSchedule, Recompute, TrainConfig, Trainer};

fn defaults() -> TrainConfig {
    TrainConfig::default()
}

/// The LoRA flags (`--lora-rank 0`, the default, trains every weight).
#[derive(clap::Args, Debug, Clone)]
#[command(about = None, long_about = None)]
pub struct LoraArgs {
    /// LoRA rank (0: full fine-tuning; at most the smallest dimension of a targeted layer).
    #[arg(long, default_value_t = 0)]
    pub lora_rank: i64,
    /// LoRA α.
    #[arg(long, default_value_t = LoraConfig::default().alpha)]
    pub lora_alpha: f64,
    /// LoRA dropout.
    #[arg(long, default_value_t = LoraConfig::default().dropout)]
    pub lora_dropout: f64,
    /// LoRA targets, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "q,k,v,o,gate,up,down"
    )]
    pub lora_targets: Vec<LoraTarget>,
}

impl Default for LoraArgs {
    /// No LoRA, and [`LoraConfig::default`]'s settings for when a rank is set.
    fn default() -> Self {
        let lora = LoraConfig::default();
        LoraArgs {
            lora_rank: 0,
            lora_alpha: lora.alpha,
            lora_dropout: lora.dropout,
            lora_targets: LoraTarget::ALL.to_vec(),
        }
    }
}

impl LoraArgs {
    /// The adapters' settings, `None` for full fine-tuning (rank 0); a negative rank is an
    /// [`RefaError::InvalidSetting`]. The rest is checked against the model when it is built
    /// ([`LoraConfig::validate`]).
    pub fn config(&self) -> Result<Option<LoraConfig>> {
        RefaError::require(
            self.lora_rank >= 0,
            "--lora-rank",
            self.lora_rank,
            ">= 0 (0: full fine-tuning)",
        )?;
        Ok((self.lora_rank > 0).then(|| LoraConfig {
            rank: self.lora_rank,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            targets: self.lora_targets.clone(),
        }))
    }
}

/// The flags of [`TrainConfig`], with LoRA and the run's output folder. Each default is
/// [`TrainConfig::default`]'s, the learning rate's the caller's (see [`config`](Self::config)).
#[derive(clap::Args, Debug, Clone)]
#[command(about = None, long_about = None)]
pub struct TrainArgs {
    /// Peak learning rate (default: 1e-3 for the bundled tiny model, 3e-7 (the paper's, for
    /// Mistral-7B) with --model).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Linear warmup steps.
    #[arg(long, default_value_t = defaults().schedule.warmup)]
    pub warmup_steps: i64,
    /// Final learning rate as a fraction of the peak (cosine decay).
    #[arg(long, default_value_t = defaults().schedule.min_ratio)]
    pub min_lr_ratio: f64,
    /// Optimizer steps.
    #[arg(long, default_value_t = defaults().max_steps)]
    pub max_steps: i64,
    /// Prompts per micro-batch (each with all its responses).
    #[arg(long, default_value_t = defaults().prompts_per_batch)]
    pub prompts_per_batch: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = defaults().accumulation_steps)]
    pub accumulation_steps: usize,
    /// Gradient-norm clipping (0: off).
    #[arg(long, default_value_t = defaults().max_grad_norm)]
    pub max_grad_norm: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = defaults().weight_decay)]
    pub weight_decay: f64,
    /// LoRA adapters instead of full fine-tuning.
    #[command(flatten)]
    pub lora: LoraArgs,
    /// Recompute each decoder layer in the backward pass instead of keeping its activations:
    /// `auto` does when the largest micro-batch's activations would not fit in half of the
    /// device's free memory.
    #[arg(long, value_enum, default_value_t = Recompute::Auto)]
    pub recompute: Recompute,
    /// Run each prompt's layers once for all its responses (prefix sharing: same values and
    /// gradients, fewer positions through the layers; no recomputation).
    #[arg(long)]
    pub share_prompts: bool,
    /// Response positions whose logits are materialized at once.
    #[arg(long, default_value_t = ScoringConfig::new(2).chunk_size)]
    pub chunk_size: i64,
    /// Seed of initialization, data order and dropout.
    #[arg(long, default_value_t = defaults().seed)]
    pub seed: u64,
    /// Where checkpoints and metrics.jsonl go.
    #[arg(long, default_value = "runs/refa")]
    pub output_dir: PathBuf,
    /// Evaluate every this many steps.
    #[arg(long, default_value_t = defaults().eval_every)]
    pub eval_every: i64,
    /// Save a checkpoint every this many steps.
    #[arg(long, default_value_t = defaults().save_every)]
    pub save_every: i64,
    /// Checkpoints to keep.
    #[arg(long, default_value_t = defaults().keep_checkpoints)]
    pub keep_checkpoints: usize,
    /// Continue from a checkpoint folder, or `latest` for the newest in --output-dir (none
    /// yet: start at step 0, so that a job torchrun restarts continues where it stopped).
    #[arg(long)]
    pub resume: Option<String>,
    /// Start over in an --output-dir that holds an earlier run: delete its checkpoints and
    /// metrics.jsonl first (without it, such a folder is refused unless the run resumes).
    #[arg(long)]
    pub overwrite_output_dir: bool,
}

impl TrainArgs {
    /// The checkpoint `--resume` names: a folder, or for `latest` the newest in
    /// `--output-dir` (`None` while it has none: the run starts at step 0). `--resume` with
    /// `--overwrite-output-dir` is an [`RefaError::InvalidSetting`]: a run starts over or
    /// continues, not both.
    pub fn resume_from(&self) -> Result<Option<PathBuf>> {
        RefaError::require(
            !(self.overwrite_output_dir && self.resume.is_some()),
            "--overwrite-output-dir",
            "on",
            "off with --resume (a run starts over or continues, not both)",
        )?;
        Ok(match self.resume.as_deref() {
            None => None,
            Some("latest") => latest_checkpoint(&self.output_dir),
            Some(path) => Some(PathBuf::from(path)),
        })
    }

    /// The training configuration: the flags, the peak learning rate `--lr` or
    /// `default_lr`, and the response end and padding of `tokenizer`
    /// ([`TrainConfig::with_tokenizer`]: its end of turn ends responses and is the token the
    /// EOS regularizer reads, its pad id pads). `--resume latest` where no checkpoint is yet starts
    /// over at step 0 (in place of what a run killed before its first checkpoint logged).
    /// The settings are checked when the trainer is built ([`TrainConfig::validate`]).
    pub fn config(&self, tokenizer: &ChatTokenizer, default_lr: f64) -> Result<TrainConfig> {
        let resume_from = self.resume_from()?;
        Ok(TrainConfig {
            prompts_per_batch: self.prompts_per_batch,
            accumulation_steps: self.accumulation_steps,
            max_steps: self.max_steps,
            schedule: CosineSchedule {
                peak: self.lr.unwrap_or(default_lr),
                warmup: self.warmup_steps,
                total: self.max_steps,
                min_ratio: self.min_lr_ratio,
            },
            max_grad_norm: self.max_grad_norm,
            weight_decay: self.weight_decay,
            eval_every: self.eval_every,
            save_every: self.save_every,
            keep_checkpoints: self.keep_checkpoints,
            output_dir: self.output_dir.clone(),
            seed: self.seed,
            recompute: self.recompute,
            scoring: ScoringConfig {
                chunk_size: self.chunk_size,
                ..defaults().scoring
            },
            share_prompts: self.share_prompts,
            overwrite_output_dir: self.overwrite_output_dir
                || (self.resume.is_some() && resume_from.is_none()),
            ..defaults()
        }
        .with_tokenizer(tokenizer))
    }
}

#[cfg(feature = "distributed")]
pub use crate::distributed::JobEnv;

/// Stands in for [`distributed::JobEnv`](https://docs.rs/refa-loss/latest/refa_loss/distributed/struct.JobEnv.html)
/// in builds without the feature `distributed`, where [`job`] never returns one.
#[cfg(not(feature = "distributed"))]
#[derive(Debug, Clone)]
pub struct JobEnv {
    /// This process's index in the job.
    pub rank: usize,
    /// Its index on its host (picks its GPU).
    pub local_rank: usize,
    /// The number of processes.
    pub world_size: usize,
}

/// The torchrun job this process is a rank of (`WORLD_SIZE` set), `None` for a plain run.
/// A build without the feature `distributed` refuses a job of more than one process
/// ([`RefaError::Distributed`]) rather than train it as independent copies.
pub fn job() -> Result<Option<JobEnv>> {
    #[cfg(feature = "distributed")]
    return JobEnv::from_env();
    #[cfg(not(feature = "distributed"))]
    {
        if std::env::var_os("WORLD_SIZE").is_some_and(|w| w != "1") {
            return Err(RefaError::Distributed {
                operation: "setup",
                message: "WORLD_SIZE is set (a torchrun job?) but this binary was built without \
                          the `distributed` feature: build with --features distributed"
                    .into(),
            });
        }
        Ok(None)
    }
}

/// The flags of a data-parallel job under torchrun (feature `distributed`).
#[derive(clap::Args, Debug, Clone, Default)]
#[command(about = None, long_about = None)]
pub struct JobArgs {
    /// Under torchrun (data-parallel, feature `distributed`): seconds a collective may wait
    /// for the other ranks before the run stops with an error naming the lost ones (default
    /// 600).
    #[arg(long)]
    pub dist_timeout: Option<u64>,
    /// Under torchrun: ZeRO-1, each rank keeps the optimizer state of its share of the
    /// parameters only (f32 master weights and moments: 12 of 16 bytes a parameter).
    #[arg(long)]
    pub shard_optimizer: bool,
}

impl JobArgs {
    /// The job this process is a rank of ([`job`]). The job flags outside a job, and a
    /// timeout of 0, are an [`RefaError::InvalidSetting`].
    pub fn job(&self) -> Result<Option<JobEnv>> {
        let job = job()?;
        if job.is_none() {
            let flag = match self.dist_timeout {
                Some(_) => "--dist-timeout",
                None => "--shard-optimizer",
            };
            RefaError::require(
                !self.shard_optimizer && self.dist_timeout.is_none(),
                flag,
                "set",
                "given only to a data-parallel job (WORLD_SIZE is unset: launch with \
                 `torchrun --no-python --nproc_per_node N`, docs/distributed.md)",
            )?;
        }
        RefaError::require(
            self.dist_timeout != Some(0),
            "--dist-timeout",
            0,
            ">= 1 second",
        )?;
        Ok(job)
    }

    /// The seconds a collective may wait: `--dist-timeout`, default 600.
    pub fn timeout_s(&self) -> u64 {
        self.dist_timeout.unwrap_or(600)
    }

    /// A trainer ([`Trainer::new`]), or one rank of `job` (`Trainer::new_distributed`,
    /// feature `distributed`: over NCCL for a CUDA model, Gloo otherwise).
    pub fn trainer(
        &self,
        job: Option<&JobEnv>,
        model: CausalLm,
        loss: Box<dyn PreferenceLoss>,
        train: Vec<TokenizedExample>,
        eval: Vec<TokenizedExample>,
        config: TrainConfig,
    ) -> Result<Trainer> {
        let Some(job) = job else {
            return Trainer::new(model, loss, train, eval, config);
        };
        #[cfg(feature = "distributed")]
        {
            use crate::distributed::ProcessGroup;
            let nccl = model.lm_head_weight().device().is_cuda();
            let timeout = std::time::Duration::from_secs(self.timeout_s());
            let group = ProcessGroup::new(job, timeout, nccl)?;
            Trainer::new_distributed(
                model,
                loss,
                train,
                eval,
                config,
                group,
                self.shard_optimizer,
            )
        }
        #[cfg(not(feature = "distributed"))]
        {
            let _ = (job, model, loss, train, eval, config);
            Err(RefaError::Distributed {
                operation: "setup",
                message: "built without the `distributed` feature".into(),
            })
        }
    }
}
