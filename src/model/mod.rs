//! Hugging Face decoder-only causal LMs in tch (cargo feature `model`): configs and
//! checkpoints of every supported [`Family`] in and out, one bf16-capable decoder with layer
//! recomputation and LoRA, generation, tokenization with chat templates.
//!
//! Supported: Mistral (v0.1–v0.3, Nemo), Llama 2 and 3.x (`llama3`, `linear`, `yarn` rope
//! scaling), SmolLM2, Qwen2/2.5, Qwen3, Gemma, Gemma 2, Phi-3 (without `longrope`). Other
//! families, mixtures of experts and multimodal checkpoints are refused by name, and so is
//! any `config.json` key that would change the computation and is not implemented.
//!
//! ```no_run
//! # #[cfg(feature = "model")]
//! # fn main() -> refa_loss::Result<()> {
//! use refa_loss::model::{CausalLm, SaveOptions};
//! use tch::{Kind, Tensor};
//!
//! let device = refa_loss::device::cuda_if_available();
//! let model = CausalLm::from_pretrained("Llama-3.2-1B-Instruct", device, Kind::BFloat16, None)?;
//! let ids = Tensor::from_slice2(&[[128000i64, 791, 6864]]).to(device);
//! let hidden = model.forward(&ids, &ids.ones_like(), false)?; // [1, 3, 2048]
//! model.save_pretrained("llama-copy", SaveOptions::default())?;
//! # Ok(()) }
//! # #[cfg(not(feature = "model"))] fn main() {}
//! ```

mod causal_lm;
mod checkpoint;
mod config;
mod decoding;
mod family;
mod generate;
mod jinja;
mod layers;
mod lora;
mod names;
mod packed;
mod prefix;
mod recompute;
mod reward_model;
mod rope;
mod sampler;
mod tokenizer;

pub use checkpoint::{
    remove_folder_atomically, safetensors_bytes, write_checkpoint, write_safetensors,
    CheckpointFile, CheckpointReader, SaveOptions,
};
pub use config::ModelConfig;
pub use family::{Activation, Family, Switches};
pub use rope::{Rope, RopeScaling};
pub use generate::{
    Completion, ContextClamp, GenerationOptions, SampleOptions, Samples, StopReason,
    GREEDY_BELOW_TEMPERATURE,
};
pub use jinja::{
    parse_template_kwarg, ChatMessage, JinjaTemplate, TemplateKwargs, RENDER_FUEL,
};
pub use lora::{LoraConfig, LoraTarget};
pub use causal_lm::{ForwardOptions, CausalLm, Padding};
pub use packed::{flash_attention_varlen, PackedBatch, PackedKernel, VarlenArgs};
pub use prefix::SharedPrefixBatch;
pub use recompute::ForwardPass;
pub use reward_model::RewardModel;
pub(crate) use tokenizer::check_token_limits;
pub use tokenizer::{ChatTemplate, ChatTokenizer, Encoded, TemplateChoice};
