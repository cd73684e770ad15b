//! The dense decoder families this crate runs, and the handful of switches in which they
//! differ: one decoder ([`CausalLm`](crate::model::CausalLm)) reads them as data.
//!
//! | family | `model_type` | differences from Llama |
//! |---|---|---|
//! | Mistral | `mistral` | a sliding window on every layer (when set) |
//! | Llama 2 / 3.x, SmolLM2 | `llama` | optional `attention_bias` / `mlp_bias`; rope scaling |
//! | Qwen2 / Qwen2.5 | `qwen2` | q/k/v biases; the window only on layers `use_sliding_window` and `max_window_layers` (or `layer_types`) pick |
//! | Qwen3 | `qwen3` | per-head RMSNorm of q and k before RoPE |
//! | Gemma | `gemma` | embeddings × √H, `(1 + w)` norms, tanh-GELU, tied head |
//! | Gemma 2 | `gemma2` | Gemma's, plus sandwich norms, `query_pre_attn_scalar`, attention and final logit soft-capping, sliding and full layers alternating |
//! | Phi-3 | `phi3` | fused `qkv_proj` and `gate_up_proj` in the checkpoint |

use serde_json::Value;

/// A decoder family, from `config.json`'s `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// `mistral`: Mistral 7B v0.1–v0.3, Mistral Nemo.
    Mistral,
    /// `llama`: Llama 2, Llama 3.x, TinyLlama, SmolLM2.
    Llama,
    /// `qwen2`: Qwen2, Qwen2.5.
    Qwen2,
    /// `qwen3`: Qwen3 (dense).
    Qwen3,
    /// `gemma`: Gemma (v1).
    Gemma,
    /// `gemma2`: Gemma 2.
    Gemma2,
    /// `phi3`: Phi-3, Phi-3.5 mini.
    Phi3,
}

/// Families that look like ours but are not dense decoders of text: refused with a reason.
const REFUSED_KINDS: &[(&str, &str)] = &[
    ("mixtral", "a mixture of experts"),
    ("qwen2_moe", "a mixture of experts"),
    ("qwen3_moe", "a mixture of experts"),
    ("phimoe", "a mixture of experts"),
    ("deepseek_v2", "a mixture of experts"),
    ("deepseek_v3", "a mixture of experts"),
    ("dbrx", "a mixture of experts"),
    ("olmoe", "a mixture of experts"),
    ("jamba", "a mixture of experts with state-space layers"),
    ("llava", "multimodal (vision and text)"),
    ("llava_next", "multimodal (vision and text)"),
    ("mllama", "multimodal (vision and text)"),
    ("qwen2_vl", "multimodal (vision and text)"),
    ("qwen2_5_vl", "multimodal (vision and text)"),
    ("gemma3", "multimodal (vision and text)"),
    ("paligemma", "multimodal (vision and text)"),
    ("phi3_v", "multimodal (vision and text)"),
    ("phi4_multimodal", "multimodal"),
    ("mistral3", "multimodal (vision and text)"),
    ("pixtral", "multimodal (vision and text)"),
];

impl Family {
    /// Every supported family.
    pub const ALL: [Family; 7] = [
        Family::Mistral,
        Family::Llama,
        Family::Qwen2,
        Family::Qwen3,
        Family::Gemma,
        Family::Gemma2,
        Family::Phi3,
    ];

    /// Hugging Face's `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Mistral => "mistral",
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma => "gemma",
            Family::Gemma2 => "gemma2",
            Family::Phi3 => "phi3",
        }
    }

    /// The causal-LM class transformers loads the family with (`architectures[0]`).
    pub fn causal_lm_class(self) -> &'static str {
        match self {
            Family::Mistral => "MistralForCausalLM",
            Family::Llama => "LlamaForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
            Family::Gemma => "GemmaForCausalLM",
            Family::Gemma2 => "Gemma2ForCausalLM",
            Family::Phi3 => "Phi3ForCausalLM",
        }
    }

    /// The family of a `model_type`, or why it is refused.
    pub fn from_model_type(model_type: &str) -> Result<Family, String> {
        if let Some(family) = Family::ALL.into_iter().find(|f| f.model_type() == model_type) {
            return Ok(family);
        }
        let supported = Family::ALL.map(Family::model_type).join(", ");
        match REFUSED_KINDS.iter().find(|(kind, _)| *kind == model_type) {
            Some((_, what)) => Err(format!(
                "`model_type` = \"{model_type}\" is {what}, which refa-loss does not run; \
                 supported dense decoders: {supported}"
            )),
            None => Err(format!(
                "`model_type` = \"{model_type}\" is not a family refa-loss knows; \
                 supported: {supported}"
            )),
        }
    }

    /// The family an `architectures` class name belongs to (`LlamaForCausalLM` → Llama),
    /// for configs without `model_type`.
    pub fn from_class(class: &str) -> Option<Family> {
        Family::ALL
            .into_iter()
            .find(|f| f.causal_lm_class() == class)
    }

    /// Defaults transformers' config class of the family uses for an absent key.
    pub(crate) fn default_of(self, key: &str) -> Option<Value> {
        let gemma = matches!(self, Family::Gemma | Family::Gemma2);
        Some(match key {
            "tie_word_embeddings" => Value::Bool(gemma),
            "rms_norm_eps" if self == Family::Phi3 => 1e-5.into(),
            "rms_norm_eps" => 1e-6.into(),
            "rope_theta" => 10000.0.into(),
            "head_dim" if gemma => 256.into(),
            "hidden_act" | "hidden_activation" if gemma => "gelu_pytorch_tanh".into(),
            "hidden_act" => "silu".into(),
            "query_pre_attn_scalar" => 256.into(),
            "attn_logit_softcapping" if self == Family::Gemma2 => 50.0.into(),
            "final_logit_softcapping" if self == Family::Gemma2 => 30.0.into(),
            "sliding_window" if matches!(self, Family::Gemma2 | Family::Mistral) => 4096.into(),
            "sliding_window" if self == Family::Qwen2 || self == Family::Qwen3 => 4096.into(),
            "max_window_layers" if self == Family::Qwen2 => 28.into(),
            "max_window_layers" if self == Family::Qwen3 => 28.into(),
            "bos_token_id" if gemma => 2.into(),
            "eos_token_id" if gemma => 1.into(),
            "pad_token_id" if gemma => 0.into(),
            // Qwen's config classes have no default ids: the checkpoint must name them.
            "bos_token_id" | "eos_token_id" if matches!(self, Family::Qwen2 | Family::Qwen3) => {
                return None
            }
            "eos_token_id" if self == Family::Phi3 => 32000.into(),
            "bos_token_id" => 1.into(),
            "eos_token_id" => 2.into(),
            _ => return None,
        })
    }

    /// The switches in which this family's decoder differs, before the config's own keys
    /// (biases, soft-capping, …) are read.
    pub(crate) fn base_switches(self) -> Switches {
        let gemma = matches!(self, Family::Gemma | Family::Gemma2);
        Switches {
            qkv_bias: self == Family::Qwen2,
            output_bias: false,
            mlp_bias: false,
            qk_norm: self == Family::Qwen3,
            norm_offset: gemma,
            scale_embeddings: gemma,
            sandwich_norms: self == Family::Gemma2,
            fused_projections: self == Family::Phi3,
            activation: Activation::Silu,
            query_scale: None,
            attention_softcap: None,
            final_softcap: None,
        }
    }
}

/// The MLP's activation (`hidden_act`, Gemma's `hidden_activation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu`: `x·σ(x)` (Llama, Mistral, Qwen, Phi-3).
    Silu,
    /// `gelu_pytorch_tanh` / `gelu_new`: GELU with the tanh approximation (Gemma).
    GeluTanh,
    /// `gelu`: GELU with the exact error function.
    Gelu,
}

impl Activation {
    /// The activation named by transformers' `ACT2FN` key, if supported.
    pub fn from_name(name: &str) -> Option<Activation> {
        match name {
            "silu" | "swish" => Some(Activation::Silu),
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Some(Activation::GeluTanh),
            "gelu" => Some(Activation::Gelu),
            _ => None,
        }
    }
}

/// The per-family differences of the one decoder, read from `config.json`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Switches {
    /// q, k and v projections carry biases (Qwen2; Llama's and Qwen3's `attention_bias`).
    pub qkv_bias: bool,
    /// The output projection carries a bias (Llama's and Qwen3's `attention_bias`).
    pub output_bias: bool,
    /// The MLP's projections carry biases (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    /// RMSNorm over each head of q and k before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Norms compute `(1 + w)·x̂` instead of `w·x̂` (Gemma).
    pub norm_offset: bool,
    /// Embeddings are multiplied by `√H` (Gemma).
    pub scale_embeddings: bool,
    /// Norms after attention and around the MLP as well (Gemma 2).
    pub sandwich_norms: bool,
    /// The checkpoint stores `qkv_proj` and `gate_up_proj` fused (Phi-3).
    pub fused_projections: bool,
    /// The MLP's activation.
    pub activation: Activation,
    /// Attention logits are scaled by this instead of `1/√head_dim` (Gemma 2:
    /// `query_pre_attn_scalar^−½`).
    pub query_scale: Option<f64>,
    /// Attention logits are soft-capped, `c·tanh(x/c)` (Gemma 2).
    pub attention_softcap: Option<f64>,
    /// The LM head's logits are soft-capped, `c·tanh(x/c)` (Gemma 2).
    pub final_softcap: Option<f64>,
}

/// Keys of `config.json` that never change the computation: bookkeeping, generation
/// defaults transformers kept in old configs, and settings that only change how the same
/// math is run (`pretraining_tp`, `use_cache`).
pub(crate) const HARMLESS_KEYS: &[&str] = &[
    "architectures",
    "model_type",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "initializer_range",
    "_name_or_path",
    "_model_name_or_path",
    "unk_token_id",
    "name_or_path",
    "auto_map",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "torchscript",
    "use_bfloat16",
    "tf_legacy_loss",
    "pruned_heads",
    "id2label",
    "label2id",
    "problem_type",
    "tokenizer_class",
    "prefix",
    "task_specific_params",
    "finetuning_task",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "is_decoder",
    "add_cross_attention",
    "tie_encoder_decoder",
    "cross_attention_hidden_size",
    "sep_token_id",
    "decoder_start_token_id",
    "max_length",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "num_beam_groups",
    "diversity_penalty",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "num_return_sequences",
    "output_scores",
    "return_dict_in_generate",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
    "pretraining_tp",
    "cache_implementation",
    "_attn_implementation_autoset",
    "attn_implementation",
    "_attn_implementation",
    "output_router_logits",
    "use_return_dict",
];

/// Dropout keys: training with a nonzero value would differ from transformers' training,
/// so only 0 is accepted.
pub(crate) const DROPOUT_KEYS: &[&str] = &[
    "attention_dropout",
    "embd_pdrop",
    "resid_pdrop",
    "hidden_dropout",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
];
