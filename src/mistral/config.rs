//! [`MistralConfig`]: Hugging Face's `config.json` for Mistral models, as it is.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{RefaError, Result};

/// The architecture of a Mistral checkpoint, read from Hugging Face's `config.json`.
///
/// Field names are Hugging Face's; unknown fields (`architectures`, `torch_dtype`, …) are
/// ignored. A missing required field is a [`RefaError::Config`] naming it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MistralConfig {
    /// Tokens in the vocabulary `V`.
    pub vocab_size: i64,
    /// Hidden size `H`.
    pub hidden_size: i64,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: i64,
    /// Decoder layers.
    pub num_hidden_layers: i64,
    /// Query heads.
    pub num_attention_heads: i64,
    /// Key/value heads (grouped-query attention); defaults to `num_attention_heads`.
    #[serde(default)]
    pub num_key_value_heads: Option<i64>,
    /// Width of one head; absent in older files, where it is `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<i64>,
    /// Longest sequence the rotary embeddings were trained for.
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: i64,
    /// Base of the rotary embedding frequencies (older files; newer ones write it in
    /// `rope_parameters`, see [`rope_base`](Self::rope_base)).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// transformers ≥ 5 writes `{"rope_theta": …, "rope_type": "default"}` here.
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    /// ε of the RMS norms.
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// Each token attends to at most this many positions (itself included); `null` for none.
    #[serde(default)]
    pub sliding_window: Option<i64>,
    /// The LM head shares the token embedding's weights.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token id.
    #[serde(default = "default_bos")]
    pub bos_token_id: i64,
    /// End-of-sequence token id.
    #[serde(default = "default_eos")]
    pub eos_token_id: i64,
    /// Hugging Face's model type, written back on save.
    #[serde(default = "default_model_type")]
    pub model_type: String,
}

/// The rotary embedding settings of transformers ≥ 5.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    /// Base of the frequencies.
    pub rope_theta: f64,
    /// Only `default` (plain RoPE) is supported.
    #[serde(default = "default_rope_type")]
    pub rope_type: String,
}

fn default_rope_type() -> String {
    "default".to_string()
}

fn default_max_position_embeddings() -> i64 {
    32768
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_bos() -> i64 {
    1
}
fn default_eos() -> i64 {
    2
}
fn default_model_type() -> String {
    "mistral".to_string()
}

impl MistralConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| RefaError::io(path, &e))?;
        Self::from_json(&text).map_err(|e| match e {
            RefaError::Config { message, .. } => RefaError::Config {
                path: path.display().to_string(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let config: MistralConfig = serde_json::from_str(text).map_err(|e| RefaError::Config {
            path: "config.json".to_string(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The `config.json` text Hugging Face reads back (with `architectures` and `torch_dtype`).
    pub fn to_json(&self, torch_dtype: &str) -> Result<String> {
        let mut value =
            serde_json::to_value(self).map_err(|e| RefaError::config("config.json", e))?;
        value["architectures"] = serde_json::json!(["MistralForCausalLM"]);
        value["torch_dtype"] = serde_json::json!(torch_dtype);
        value["num_key_value_heads"] = serde_json::json!(self.kv_heads());
        value["head_dim"] = serde_json::json!(self.head_width());
        value["rope_theta"] = serde_json::json!(self.rope_base());
        value["rope_parameters"] =
            serde_json::json!({ "rope_theta": self.rope_base(), "rope_type": "default" });
        serde_json::to_string_pretty(&value).map_err(|e| RefaError::config("config.json", e))
    }

    /// Base θ of the rotary frequencies: `rope_parameters.rope_theta`, else `rope_theta`,
    /// else 10 000.
    pub fn rope_base(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .map(|r| r.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10000.0)
    }

    /// Width of one attention head.
    pub fn head_width(&self) -> i64 {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> i64 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
            ("head_dim", self.head_width()),
        ];
        for (name, value) in positive {
            if value <= 0 {
                return Err(RefaError::config(
                    "config.json",
                    format!("`{name}` = {value} must be > 0"),
                ));
            }
        }
        if self.max_position_embeddings <= 0 {
            let message = format!(
                "`max_position_embeddings` = {} must be > 0",
                self.max_position_embeddings
            );
            return Err(RefaError::config("config.json", message));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            let message = format!(
                "`rms_norm_eps` = {} must be finite and > 0",
                self.rms_norm_eps
            );
            return Err(RefaError::config("config.json", message));
        }
        // The EOS id is also the trainer's padding id, and both ids index the embedding.
        for (name, id) in [
            ("bos_token_id", self.bos_token_id),
            ("eos_token_id", self.eos_token_id),
        ] {
            if !(0..self.vocab_size).contains(&id) {
                let message = format!(
                    "`{name}` = {id} is outside the vocabulary [0, {})",
                    self.vocab_size
                );
                return Err(RefaError::config("config.json", message));
            }
        }
        if self.num_attention_heads % self.kv_heads() != 0 {
            let message = format!(
                "`num_attention_heads` = {} must be a multiple of `num_key_value_heads` = {}",
                self.num_attention_heads,
                self.kv_heads()
            );
            return Err(RefaError::config("config.json", message));
        }
        if let Some(rope) = self
            .rope_parameters
            .as_ref()
            .filter(|r| r.rope_type != "default")
        {
            return Err(RefaError::config(
                "config.json",
                format!(
                    "rope_type `{}` is not supported (only `default`)",
                    rope.rope_type
                ),
            ));
        }
        if self.head_width() % 2 != 0 {
            return Err(RefaError::config(
                "config.json",
                format!(
                    "`head_dim` = {} must be even (rotary pairs)",
                    self.head_width()
                ),
            ));
        }
        Ok(())
    }
}
