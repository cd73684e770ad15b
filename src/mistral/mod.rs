//! Mistral in tch (cargo feature `mistral`): Hugging Face configs and checkpoints in and out,
//! a bf16-capable model with layer recomputation and LoRA, tokenization with chat templates.
//!
//! ```no_run
//! # #[cfg(feature = "mistral")]
//! # fn main() -> refa_loss::Result<()> {
//! use refa_loss::mistral::{Mistral, SaveOptions};
//! use tch::{Kind, Tensor};
//!
//! let device = refa_loss::device::cuda_if_available();
//! let model = Mistral::from_pretrained("mistral-7b", device, Kind::BFloat16, None)?;
//! let ids = Tensor::from_slice2(&[[1i64, 415, 2936]]).to(device);
//! let hidden = model.forward(&ids, &ids.ones_like(), false)?; // [1, 3, 4096]
//! model.save_pretrained("mistral-7b-copy", SaveOptions::default())?;
//! # Ok(()) }
//! # #[cfg(not(feature = "mistral"))] fn main() {}
//! ```

mod checkpoint;
mod config;
mod generate;
mod jinja;
mod layers;
mod lora;
mod model;
mod prefix;
mod recompute;
mod tokenizer;

pub use checkpoint::{
    remove_folder_atomically, safetensors_bytes, write_checkpoint, write_safetensors,
    CheckpointFile, CheckpointReader, SaveOptions,
};
pub use config::{MistralConfig, RopeParameters};
pub use generate::GenerationOptions;
pub use jinja::{ChatMessage, JinjaTemplate};
pub use lora::{LoraConfig, LoraTarget};
pub use model::{ForwardOptions, Mistral, Padding};
pub use prefix::SharedPrefixBatch;
pub use recompute::ForwardPass;
pub(crate) use tokenizer::check_token_limits;
pub use tokenizer::{ChatTemplate, ChatTokenizer, Encoded, TemplateChoice};
