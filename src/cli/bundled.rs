//! What runs without any file of the user's: a tiny Mistral configuration, a 512-token
//! tokenizer and 64 prompts × 4 scored responses (`examples/data/`).

use tch::{Device, Kind};

use crate::error::Result;
use crate::model::{CausalLm, ChatTemplate, ChatTokenizer, LoraConfig, ModelConfig};

/// `examples/data/tiny-config.json`: a 2-layer Mistral of hidden size 64 over a 512-token
/// vocabulary (BOS 1, EOS 2), for runs that take seconds on a CPU.
pub const TINY_CONFIG: &str = include_str!("../../examples/data/tiny-config.json");

/// `examples/data/tokenizer.json`: the 512-token tokenizer the tiny model's vocabulary fits.
pub const SAMPLE_TOKENIZER: &str = include_str!("../../examples/data/tokenizer.json");

/// `examples/data/sample.jsonl`: 64 prompts × 4 scored responses in the simple layout
/// (`{"prompt", "responses": [{"text", "score"}]}`), made by `examples/data/make_sample.py`.
pub const SAMPLE_DATA: &str = include_str!("../../examples/data/sample.jsonl");

/// The tiny model ([`TINY_CONFIG`]) with random weights drawn from `seed`
/// ([`CausalLm::init_random`]), with LoRA adapters when `lora` is given.
pub fn tiny_model(
    device: Device,
    kind: Kind,
    lora: Option<&LoraConfig>,
    seed: u64,
) -> Result<CausalLm> {
    let model = CausalLm::new(ModelConfig::from_json(TINY_CONFIG)?, device, kind, lora)?;
    model.init_random(seed as i64);
    Ok(model)
}

/// The bundled tokenizer ([`SAMPLE_TOKENIZER`]) framing conversations with `template`, with
/// the BOS and EOS ids of `config`.
pub fn sample_tokenizer(template: ChatTemplate, config: &ModelConfig) -> Result<ChatTokenizer> {
    ChatTokenizer::from_json(
        SAMPLE_TOKENIZER,
        template,
        config.bos_token_id,
        config.eos_token_id,
    )
}
