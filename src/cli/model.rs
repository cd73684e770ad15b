//! The flags that choose the device, the model and its tokenizer.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tch::{Device, Kind};

use crate::cli::bundled::{sample_tokenizer, tiny_model};
use crate::cli::train::JobEnv;
use crate::device;
use crate::error::{RefaError, Result};
use crate::model::{
    parse_template_kwarg, CausalLm, ChatTokenizer, LoraConfig, ModelConfig, TemplateChoice,
};

/// The `--dtype` flag: the weights' precision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DType {
    /// 32-bit floating point.
    F32,
    /// bfloat16 (the optimizer keeps f32 master weights).
    Bf16,
}

impl DType {
    /// The libtorch kind.
    pub fn kind(self) -> Kind {
        match self {
            DType::F32 => Kind::Float,
            DType::Bf16 => Kind::BFloat16,
        }
    }
}

/// The `--device` flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DeviceName {
    /// The GPU when there is one.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// The first CUDA device.
    Cuda,
}

impl DeviceName {
    /// The device: for `auto` the first GPU when there is one ([`device::cuda_if_available`]);
    /// `cuda` where no CUDA device is visible is an [`RefaError::InvalidSetting`].
    pub fn resolve(self) -> Result<Device> {
        Ok(match self {
            DeviceName::Auto => device::cuda_if_available(),
            DeviceName::Cpu => Device::Cpu,
            DeviceName::Cuda if device::cuda_is_available() => Device::Cuda(0),
            DeviceName::Cuda => {
                return Err(RefaError::option(
                    "--device",
                    "cuda",
                    "auto or cpu: no CUDA device is visible",
                ))
            }
        })
    }
}

/// The weight kind: `dtype`'s, else the device's default ([`device::default_kind`]: bf16 on
/// a GPU, f32 on the CPU).
pub fn kind_for(dtype: Option<DType>, device: Device) -> Kind {
    dtype.map_or_else(|| device::default_kind(device), DType::kind)
}

/// `--device` and `--dtype`.
#[derive(clap::Args, Debug, Clone)]
#[command(about = None, long_about = None)]
pub struct DeviceArgs {
    /// Weight precision (default: bf16 on a GPU, f32 on the CPU).
    #[arg(long, value_enum)]
    pub dtype: Option<DType>,
    /// Device.
    #[arg(long, value_enum, default_value_t = DeviceName::Auto)]
    pub device: DeviceName,
}

impl DeviceArgs {
    /// The device and the weights' kind. A rank of a data-parallel `job` on a GPU takes the
    /// GPU of its `LOCAL_RANK` (one GPU per process).
    pub fn resolve(&self, job: Option<&JobEnv>) -> Result<(Device, Kind)> {
        let device = match (self.device.resolve()?, job) {
            (Device::Cuda(_), Some(job)) => Device::Cuda(job.local_rank),
            (device, _) => device,
        };
        Ok((device, kind_for(self.dtype, device)))
    }
}

/// `--tokenizer` and `--template`: which tokenizer, and which chat template frames the
/// conversations.
#[derive(clap::Args, Debug, Clone, Default)]
#[command(about = None, long_about = None)]
pub struct TokenizerArgs {
    /// tokenizer.json (default: the model folder's; without --model, the bundled one).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Chat template that frames prompts and responses: `auto` takes the checkpoint's own
    /// (tokenizer_config.json or chat_template.jinja) when it has one, else Mistral-instruct.
    #[arg(long, value_enum, default_value_t = TemplateChoice::Auto)]
    pub template: TemplateChoice,
    /// A keyword argument of the checkpoint's chat template, as transformers'
    /// apply_chat_template takes it (enable_thinking=false for Qwen3, date_string=26 Jul
    /// 2024 for Llama 3): the value is read as JSON when it is JSON, else as text.
    /// Repeatable.
    #[arg(long = "template-kwarg", value_name = "NAME=VALUE", value_parser = parse_template_kwarg)]
    pub template_kwargs: Vec<(String, Value)>,
}

impl TokenizerArgs {
    /// The tokenizer of the checkpoint `folder` (`--tokenizer`, else its `tokenizer.json`)
    /// with its chat template ([`ChatTokenizer::with_checkpoint_template`]) and the
    /// `--template-kwarg`s ([`ChatTokenizer::with_template_kwargs`]), or without a folder the
    /// bundled one ([`sample_tokenizer`](crate::cli::sample_tokenizer)) or `--tokenizer`.
    /// The BOS and EOS ids are `config`'s, so is the pad id where the tokenizer names none
    /// ([`ChatTokenizer::with_default_pad_id`]), and every id it can produce must fit
    /// `config`'s vocabulary ([`ChatTokenizer::check_fits`]).
    pub fn load(&self, folder: Option<&Path>, config: &ModelConfig) -> Result<ChatTokenizer> {
        let (bos, eos) = (config.bos_token_id, config.eos_token_id);
        let builtin = self.template.builtin();
        let mut tokenizer = match (&self.tokenizer, folder) {
            (Some(path), _) => ChatTokenizer::from_file(path, builtin, bos, eos)?,
            (None, Some(folder)) => {
                ChatTokenizer::from_file(folder.join("tokenizer.json"), builtin, bos, eos)?
            }
            (None, None) => sample_tokenizer(builtin, config)?,
        };
        if let Some(folder) = folder {
            tokenizer = tokenizer.with_checkpoint_template(folder, self.template)?;
        }
        tokenizer = tokenizer
            .with_template_kwargs(self.template_kwargs.iter().cloned())?
            .with_default_pad_id(config.pad_token_id);
        tokenizer.check_fits(config.vocab_size)?;
        Ok(tokenizer)
    }
}

/// `--model` (optional: without it, the bundled tiny model with random weights) and the
/// tokenizer flags: what a training run starts from.
#[derive(clap::Args, Debug, Clone, Default)]
#[command(about = None, long_about = None)]
pub struct ModelArgs {
    /// Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.json). Default: the
    /// bundled tiny config with random weights.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The tokenizer and the chat template.
    #[command(flatten)]
    pub tokenizer: TokenizerArgs,
}

impl ModelArgs {
    /// The checkpoint (with LoRA adapters when `lora` is given) on `device` in `kind`, or
    /// the bundled tiny model with random weights drawn from `seed`. libtorch's generator is
    /// seeded with `seed` first: LoRA's A matrices are drawn when the model is built, so a
    /// run (and every rank of a job) is reproducible from the seed.
    pub fn load_model(
        &self,
        device: Device,
        kind: Kind,
        lora: Option<&LoraConfig>,
        seed: u64,
    ) -> Result<CausalLm> {
        tch::manual_seed(seed as i64);
        match &self.model {
            Some(folder) => CausalLm::from_pretrained(folder, device, kind, lora),
            None => tiny_model(device, kind, lora, seed),
        }
    }

    /// The tokenizer for a model of `config` ([`TokenizerArgs::load`] with `--model`'s folder).
    pub fn load_tokenizer(&self, config: &ModelConfig) -> Result<ChatTokenizer> {
        self.tokenizer.load(self.model.as_deref(), config)
    }

    /// With `--model`, which template frames the conversations (`chat template: the
    /// checkpoint's own` or `chat template: built-in Zephyr`), for the run's log.
    pub fn template_note(&self, tokenizer: &ChatTokenizer) -> Option<String> {
        self.model.as_ref()?;
        Some(match tokenizer.jinja() {
            Some(_) => "chat template: the checkpoint's own".to_string(),
            None => format!("chat template: built-in {:?}", tokenizer.template()),
        })
    }

    /// The peak learning rate when none is given: 3e-7 (the paper's, for Mistral-7B) for a
    /// checkpoint, 1e-3 for the bundled tiny model (which starts from random weights).
    pub fn default_lr(&self) -> f64 {
        if self.model.is_some() {
            3e-7
        } else {
            1e-3
        }
    }
}

/// A required `--model` and the tokenizer flags: a checkpoint to run (generation, probes).
#[derive(clap::Args, Debug, Clone)]
#[command(about = None, long_about = None)]
pub struct CheckpointArgs {
    /// Hugging Face checkpoint folder (config.json, safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// The tokenizer and the chat template.
    #[command(flatten)]
    pub tokenizer: TokenizerArgs,
}

impl CheckpointArgs {
    /// The checkpoint for inference (on the GPU in bf16 when there is one, else on the CPU
    /// in f32) and its tokenizer ([`TokenizerArgs::load`]).
    pub fn load(&self) -> Result<(CausalLm, ChatTokenizer)> {
        let device = device::cuda_if_available();
        let kind = device::default_kind(device);
        let model = CausalLm::from_pretrained(&self.model, device, kind, None)?;
        let tokenizer = self.tokenizer.load(Some(&self.model), model.config())?;
        Ok((model, tokenizer))
    }

    /// The checkpoint folder's name (`checkpoint-60`), or `refa-loss` for a path without one.
    pub fn name(&self) -> String {
        self.model
            .file_name()
            .map_or_else(|| "refa-loss".into(), |n| n.to_string_lossy().to_string())
    }
}
