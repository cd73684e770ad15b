//! [`ModelConfig`]: a Hugging Face `config.json` of a supported decoder family, read key by
//! key. Every key that changes the computation is implemented or refused by name; the file's
//! text is kept so that saving writes back every key as it was.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{RefaError, Result};
use crate::model::family::{Activation, Family, Switches, DROPOUT_KEYS, HARMLESS_KEYS};
use crate::model::rope::{yarn_mscale, Rope, RopeScaling};

/// The architecture of a checkpoint, read from Hugging Face's `config.json`.
///
/// Both spellings transformers reads are accepted: top-level `rope_theta` / `rope_scaling`
/// (the Hub's files, transformers 4) and `rope_parameters` (transformers 5). A key the crate
/// does not understand is refused ([`RefaError::Config`] naming it), since it could change
/// the model; keys that never do (bookkeeping, generation defaults) are listed in the
/// source. [`to_json`](Self::to_json) writes the file back with every key kept.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The decoder family (`model_type`).
    pub family: Family,
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
    /// Key/value heads (grouped-query attention); `num_attention_heads` when absent.
    pub num_key_value_heads: i64,
    /// Width of one head; `hidden_size / num_attention_heads` when absent (Gemma: 256).
    pub head_dim: i64,
    /// Longest sequence the rotary embeddings were trained for.
    pub max_position_embeddings: i64,
    /// Rotary embeddings: base, rotated width and scaling.
    pub rope: Rope,
    /// ε of the RMS norms.
    pub rms_norm_eps: f64,
    /// The window of sliding layers: each token attends to at most this many positions
    /// (itself included); `None` for none.
    pub sliding_window: Option<i64>,
    /// Which layers slide (`layer_types`, Qwen's `use_sliding_window`/`max_window_layers`,
    /// Gemma 2's alternation; every layer for Mistral and Phi-3).
    pub sliding_layers: Vec<bool>,
    /// The LM head shares the token embedding's weights.
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token id.
    pub bos_token_id: i64,
    /// The first end-of-sequence token id.
    pub eos_token_id: i64,
    /// Every end-of-sequence id (`eos_token_id` may be a list: Llama 3 Instruct).
    pub eos_token_ids: Vec<i64>,
    /// The padding id, where the checkpoint names one.
    pub pad_token_id: Option<i64>,
    /// The per-family differences of the decoder.
    pub switches: Switches,
    /// The file as read, written back by [`to_json`](Self::to_json).
    raw: Map<String, Value>,
}

impl ModelConfig {
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
        let value: Value = serde_json::from_str(text.trim_start_matches('\u{feff}'))
            .map_err(|e| RefaError::config("config.json", e))?;
        let Value::Object(raw) = value else {
            return Err(RefaError::config("config.json", "is not a JSON object"));
        };
        let config = Keys::new(&raw)?.read()?;
        config.validate()?;
        Ok(config)
    }

    /// The `config.json` text transformers reads back: every key of the file read, verbatim,
    /// except the values changed on this struct since (written over them) and `torch_dtype`
    /// (and `dtype`, where the file had it), set to the saved kind.
    ///
    /// # Errors
    /// A family, RoPE or switch changed on the struct since it was read: those are written
    /// as the file spelled them, so a change could not be saved faithfully.
    pub fn to_json(&self, torch_dtype: &str) -> Result<String> {
        let read = Keys::new(&self.raw)?.read()?;
        if self.family != read.family || self.rope != read.rope || self.switches != read.switches {
            return Err(RefaError::config(
                "config.json",
                "the family, RoPE settings or switches were changed on this ModelConfig after \
                 it was read; edit config.json itself (ModelConfig::from_json) instead",
            ));
        }
        let mut value = self.raw.clone();
        let mut set_changed = |key: &str, now: Value, before: Value| {
            if now != before {
                value.insert(key.to_string(), now);
            }
        };
        set_changed("model_type", self.family.model_type().into(), read.family.model_type().into());
        for (key, now, before) in [
            ("vocab_size", self.vocab_size, read.vocab_size),
            ("hidden_size", self.hidden_size, read.hidden_size),
            ("intermediate_size", self.intermediate_size, read.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers, read.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads, read.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads, read.num_key_value_heads),
            ("head_dim", self.head_dim, read.head_dim),
            ("max_position_embeddings", self.max_position_embeddings, read.max_position_embeddings),
            ("bos_token_id", self.bos_token_id, read.bos_token_id),
        ] {
            set_changed(key, now.into(), before.into());
        }
        set_changed("rms_norm_eps", self.rms_norm_eps.into(), read.rms_norm_eps.into());
        let tied = self.tie_word_embeddings;
        set_changed("tie_word_embeddings", tied.into(), read.tie_word_embeddings.into());
        let eos = |c: &ModelConfig| -> Value {
            match c.raw.get("eos_token_id") {
                Some(Value::Array(_)) => c.eos_token_ids.clone().into(),
                _ => c.eos_token_id.into(),
            }
        };
        set_changed("eos_token_id", eos(self), eos(&read));
        let pad = |c: &ModelConfig| -> Value { c.pad_token_id.into() };
        set_changed("pad_token_id", pad(self), pad(&read));
        if self.sliding_window != read.sliding_window || self.sliding_layers != read.sliding_layers
        {
            value.insert("sliding_window".into(), self.sliding_window.into());
            let types: Vec<&str> = self
                .sliding_layers
                .iter()
                .map(|&s| if s { "sliding_attention" } else { "full_attention" })
                .collect();
            let derived = matches!(self.family, Family::Qwen2 | Family::Qwen3 | Family::Gemma2);
            if value.contains_key("layer_types") || derived {
                value.insert("layer_types".into(), types.into());
            }
            if self.sliding_window.is_some() && value.contains_key("use_sliding_window") {
                value.insert("use_sliding_window".into(), true.into());
            }
        }
        if self.raw.contains_key("dtype") {
            value.insert("dtype".into(), torch_dtype.into());
        }
        value.insert("torch_dtype".into(), torch_dtype.into());
        if !value.contains_key("architectures") {
            value.insert("architectures".into(), vec![self.family.causal_lm_class()].into());
        }
        serde_json::to_string_pretty(&Value::Object(value))
            .map_err(|e| RefaError::config("config.json", e))
    }

    /// Base θ of the rotary frequencies.
    pub fn rope_base(&self) -> f64 {
        self.rope.theta
    }

    /// Width of one attention head.
    pub fn head_width(&self) -> i64 {
        self.head_dim
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> i64 {
        self.num_key_value_heads
    }

    /// The window of layer `layer`, or `None` when it attends to every earlier position.
    pub fn layer_window(&self, layer: usize) -> Option<i64> {
        self.sliding_window
            .filter(|_| self.sliding_layers.get(layer).copied().unwrap_or(false))
    }

    /// The window shared by the sliding layers, when at least one layer slides.
    pub fn any_window(&self) -> Option<i64> {
        self.sliding_window
            .filter(|_| self.sliding_layers.iter().any(|&s| s))
    }

    /// The same model with `window` on every layer that slides (for Mistral and Phi-3:
    /// every layer), `None` for none.
    pub fn with_sliding_window(self, window: Option<i64>) -> Self {
        let layers = self.num_hidden_layers as usize;
        let sliding_layers = if self.sliding_layers.iter().any(|&s| s) {
            self.sliding_layers.clone()
        } else {
            vec![true; layers]
        };
        ModelConfig {
            sliding_window: window,
            sliding_layers,
            ..self
        }
    }

    fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, value) in positive {
            if value <= 0 {
                return Err(invalid(name, value, "must be > 0"));
            }
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(invalid("rms_norm_eps", self.rms_norm_eps, "must be finite and > 0"));
        }
        if let Some(window) = self.any_window().filter(|&w| w <= 0) {
            return Err(invalid(
                "sliding_window",
                window,
                "must be > 0 (the positions a token attends to, itself included), or null",
            ));
        }
        // The EOS id is also the trainer's default padding id, and every id indexes the
        // embedding.
        let ids = [("bos_token_id", self.bos_token_id)]
            .into_iter()
            .chain(self.eos_token_ids.iter().map(|&id| ("eos_token_id", id)))
            .chain(self.pad_token_id.map(|id| ("pad_token_id", id)));
        for (name, id) in ids {
            if !(0..self.vocab_size).contains(&id) {
                let rule = format!("is outside the vocabulary [0, {})", self.vocab_size);
                return Err(invalid(name, id, &rule));
            }
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            let message = format!(
                "`num_attention_heads` = {} must be a multiple of `num_key_value_heads` = {}",
                self.num_attention_heads, self.num_key_value_heads
            );
            return Err(RefaError::config("config.json", message));
        }
        let rotary = self.rope.rotary_dim;
        if rotary <= 0 || rotary % 2 != 0 || rotary > self.head_dim {
            let rule = format!(
                "must give an even rotary width in [2, head_dim = {}]",
                self.head_dim
            );
            return Err(invalid("head_dim × partial_rotary_factor", rotary, &rule));
        }
        for (name, value) in [
            ("attn_logit_softcapping", self.switches.attention_softcap),
            ("final_logit_softcapping", self.switches.final_softcap),
            ("query_pre_attn_scalar (as its scale)", self.switches.query_scale),
        ] {
            if let Some(v) = value.filter(|v| !(v.is_finite() && *v > 0.0)) {
                return Err(invalid(name, v, "must be finite and > 0"));
            }
        }
        Ok(())
    }
}

fn invalid(key: &str, value: impl std::fmt::Display, rule: &str) -> RefaError {
    RefaError::config("config.json", format!("`{key}` = {value} {rule}"))
}

/// Reads the keys of one `config.json`, remembering which it used so that the rest can be
/// checked.
struct Keys<'a> {
    raw: &'a Map<String, Value>,
    family: Family,
    used: std::cell::RefCell<BTreeSet<&'static str>>,
}

impl<'a> Keys<'a> {
    fn new(raw: &'a Map<String, Value>) -> Result<Self> {
        let family = family_of(raw)?;
        Ok(Keys {
            raw,
            family,
            used: Default::default(),
        })
    }

    /// The value of `key` (`None` for null, as transformers reads it), the family's default
    /// when absent, remembering the key as used.
    fn get(&self, key: &'static str) -> Option<Value> {
        self.used.borrow_mut().insert(key);
        match self.raw.get(key) {
            None => self.family.default_of(key),
            Some(Value::Null) => None,
            Some(v) => Some(v.clone()),
        }
    }

    fn int(&self, key: &'static str) -> Result<Option<i64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .or_else(|| v.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))
                .map(Some)
                .ok_or_else(|| invalid(key, &v, "must be an integer")),
        }
    }

    fn required_int(&self, key: &'static str) -> Result<i64> {
        self.int(key)?.ok_or_else(|| {
            RefaError::config("config.json", format!("missing field `{key}`"))
        })
    }

    fn float(&self, key: &'static str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| invalid(key, &v, "must be a number")),
        }
    }

    fn flag(&self, key: &'static str) -> Result<bool> {
        match self.get(key) {
            None => Ok(false),
            Some(v) => v.as_bool().ok_or_else(|| invalid(key, &v, "must be true or false")),
        }
    }

    /// An id or a list of ids (`eos_token_id` of Llama 3 Instruct).
    fn ids(&self, key: &'static str) -> Result<Vec<i64>> {
        let values = match self.get(key) {
            None => return Ok(Vec::new()),
            Some(Value::Array(items)) => items,
            Some(single) => vec![single],
        };
        values
            .iter()
            .map(|v| v.as_i64().ok_or_else(|| invalid(key, v, "must be a token id or a list of them")))
            .collect()
    }

    fn read(self) -> Result<ModelConfig> {
        let family = self.family;
        let num_attention_heads = self.required_int("num_attention_heads")?;
        let hidden_size = self.required_int("hidden_size")?;
        let head_dim = match self.int("head_dim")? {
            Some(d) => d,
            None if num_attention_heads > 0 => hidden_size / num_attention_heads,
            None => 0,
        };
        let num_hidden_layers = self.required_int("num_hidden_layers")?;
        let max_position_embeddings = self.int("max_position_embeddings")?.unwrap_or(32768);
        let eos_token_ids = self.ids("eos_token_id")?;
        let Some(&eos_token_id) = eos_token_ids.first() else {
            return Err(RefaError::config(
                "config.json",
                "names no `eos_token_id`; add the id the model ends a response with",
            ));
        };
        let (sliding_window, sliding_layers) = self.sliding(num_hidden_layers)?;
        let config = ModelConfig {
            family,
            vocab_size: self.required_int("vocab_size")?,
            hidden_size,
            intermediate_size: self.required_int("intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: self
                .int("num_key_value_heads")?
                .unwrap_or(num_attention_heads),
            head_dim,
            max_position_embeddings,
            rope: self.rope(head_dim, max_position_embeddings)?,
            rms_norm_eps: self.float("rms_norm_eps")?.unwrap_or(1e-6),
            sliding_window,
            sliding_layers,
            tie_word_embeddings: self.flag("tie_word_embeddings")?,
            bos_token_id: self.int("bos_token_id")?.unwrap_or(eos_token_id),
            eos_token_id,
            eos_token_ids,
            pad_token_id: self.int("pad_token_id")?,
            switches: self.switches(head_dim)?,
            raw: self.raw.clone(),
        };
        self.refuse_unknown_keys()?;
        Ok(config)
    }

    /// The biases, norms, activation and soft-capping of the family, from its keys.
    fn switches(&self, head_dim: i64) -> Result<Switches> {
        let family = self.family;
        let mut switches = family.base_switches();
        let (attention_bias, mlp_bias) = (self.flag("attention_bias")?, self.flag("mlp_bias")?);
        if matches!(family, Family::Llama | Family::Qwen3 | Family::Gemma | Family::Gemma2) {
            switches.qkv_bias = attention_bias;
            switches.output_bias = attention_bias;
        } else if attention_bias {
            return Err(invalid("attention_bias", true, &format!("is not how transformers runs `{}`", family.model_type())));
        }
        if family == Family::Llama {
            switches.mlp_bias = mlp_bias;
        } else if mlp_bias {
            return Err(invalid("mlp_bias", true, &format!("is not how transformers runs `{}`", family.model_type())));
        }
        let activation_key = if family == Family::Gemma2 { "hidden_activation" } else { "hidden_act" };
        let name = self.get(activation_key).unwrap_or_else(|| {
            let default = family.default_of("hidden_act");
            default.unwrap_or_else(|| "silu".into())
        });
        let name = name.as_str().unwrap_or_default().to_string();
        // transformers reads Gemma's legacy "gelu" as the tanh approximation.
        let name = if family == Family::Gemma && name == "gelu" { "gelu_pytorch_tanh".to_string() } else { name };
        switches.activation = Activation::from_name(&name).ok_or_else(|| {
            invalid(activation_key, format!("\"{name}\""), "is not supported (silu, gelu, gelu_pytorch_tanh)")
        })?;
        if family == Family::Gemma2 {
            self.used.borrow_mut().insert("hidden_act");
            let scalar = self.float("query_pre_attn_scalar")?.unwrap_or(head_dim as f64);
            switches.query_scale = Some(scalar.powf(-0.5));
            switches.attention_softcap = self.float("attn_logit_softcapping")?;
            switches.final_softcap = self.float("final_logit_softcapping")?;
        }
        if matches!(family, Family::Gemma | Family::Gemma2) && self.flag("use_bidirectional_attention")? {
            return Err(invalid(
                "use_bidirectional_attention",
                true,
                "is not supported (a causal decoder is trained here)",
            ));
        }
        Ok(switches)
    }

    /// The window and which layers it applies to.
    fn sliding(&self, layers: i64) -> Result<(Option<i64>, Vec<bool>)> {
        let family = self.family;
        let count = layers.max(0) as usize;
        let window = match family {
            Family::Llama | Family::Gemma => return Ok((None, vec![false; count])),
            Family::Qwen2 | Family::Qwen3 if !self.flag("use_sliding_window")? => {
                // transformers drops the window unless `use_sliding_window`.
                self.used.borrow_mut().extend(["sliding_window", "max_window_layers"]);
                None
            }
            _ => self.int("sliding_window")?,
        };
        let slides = match self.raw.get("layer_types").filter(|v| !v.is_null()) {
            Some(types) => {
                // An explicit list wins over the keys transformers derives it from.
                self.used.borrow_mut().extend(["layer_types", "max_window_layers", "use_sliding_window"]);
                layer_types(types, count)?
            }
            None => match family {
                Family::Qwen2 | Family::Qwen3 => {
                    let first = self.int("max_window_layers")?.unwrap_or(0).max(0) as usize;
                    (0..count).map(|i| window.is_some() && i >= first).collect()
                }
                Family::Gemma2 => (0..count).map(|i| (i + 1) % 2 == 1).collect(),
                _ => vec![window.is_some(); count],
            },
        };
        if family == Family::Mistral && slides.iter().any(|s| !s) && window.is_some() {
            return Err(invalid("layer_types", "with full layers", "is not how transformers runs Mistral (every layer slides)"));
        }
        Ok((window, slides))
    }

    /// RoPE in either spelling.
    fn rope(&self, head_dim: i64, max_positions: i64) -> Result<Rope> {
        let (parameters, spelling) = self.rope_parameters()?;
        let field = |key: &str| parameters.get(key).filter(|v| !v.is_null());
        let number = |key: &str| -> Result<Option<f64>> {
            match field(key) {
                None => Ok(None),
                Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                    invalid(&format!("{spelling}.{key}"), v, "must be a number")
                }),
            }
        };
        let rope_type = field("rope_type")
            .or_else(|| field("type"))
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_string();
        let theta = match number("rope_theta")? {
            Some(theta) => theta,
            None => self.float("rope_theta")?.unwrap_or(10000.0),
        };
        self.used.borrow_mut().insert("rope_theta");
        let partial = match number("partial_rotary_factor")? {
            Some(p) => p,
            None => self.float("partial_rotary_factor")?.unwrap_or(1.0),
        };
        // Phi-3 keeps the pretraining length at the top level, and it wins there.
        let original = match self.float("original_max_position_embeddings")? {
            Some(top) => Some(top),
            None => number("original_max_position_embeddings")?,
        }
        .unwrap_or(max_positions as f64);
        let required = |key: &str| -> Result<f64> {
            number(key)?.ok_or_else(|| {
                RefaError::config(
                    "config.json",
                    format!("`{spelling}` of type `{rope_type}` needs `{key}`"),
                )
            })
        };
        let scaling = match rope_type.as_str() {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear { factor: required("factor")? },
            "llama3" => RopeScaling::Llama3 {
                factor: required("factor")?,
                low_freq_factor: required("low_freq_factor")?,
                high_freq_factor: required("high_freq_factor")?,
                original_max_position_embeddings: original,
            },
            "yarn" => {
                let factor = number("factor")?.unwrap_or(max_positions as f64 / original);
                let nonzero = |v: Option<f64>| v.filter(|&x| x != 0.0);
                let attention_factor = match number("attention_factor")? {
                    Some(a) => a,
                    None => match (nonzero(number("mscale")?), nonzero(number("mscale_all_dim")?)) {
                        (Some(m), Some(all)) => yarn_mscale(factor, m) / yarn_mscale(factor, all),
                        _ => yarn_mscale(factor, 1.0),
                    },
                };
                RopeScaling::Yarn {
                    factor,
                    original_max_position_embeddings: original,
                    beta_fast: nonzero(number("beta_fast")?).unwrap_or(32.0),
                    beta_slow: nonzero(number("beta_slow")?).unwrap_or(1.0),
                    truncate: field("truncate").and_then(Value::as_bool).unwrap_or(true),
                    attention_factor,
                }
            }
            "dynamic" | "longrope" => {
                return Err(invalid(
                    &format!("{spelling}.rope_type"),
                    format!("\"{rope_type}\""),
                    "is not supported: transformers recomputes its frequencies from the longest \
                     position each forward call sees, so the model would not be one fixed \
                     function (supported: default, linear, llama3, yarn)",
                ))
            }
            other => {
                return Err(invalid(
                    &format!("{spelling}.rope_type"),
                    format!("\"{other}\""),
                    "is not supported (default, linear, llama3, yarn)",
                ))
            }
        };
        if let RopeScaling::Linear { factor }
        | RopeScaling::Llama3 { factor, .. }
        | RopeScaling::Yarn { factor, .. } = &scaling
        {
            if !(factor.is_finite() && *factor > 0.0) {
                return Err(invalid(&format!("{spelling}.factor"), factor, "must be finite and > 0"));
            }
        }
        if !(theta.is_finite() && theta > 1.0) {
            return Err(invalid("rope_theta", theta, "must be finite and > 1"));
        }
        if !(partial.is_finite() && partial > 0.0 && partial <= 1.0) {
            return Err(invalid("partial_rotary_factor", partial, "must be in (0, 1]"));
        }
        Ok(Rope {
            theta,
            rotary_dim: (head_dim as f64 * partial) as i64,
            scaling,
        })
    }

    /// The rope settings object (`rope_parameters`, else `rope_scaling`, else empty) and the
    /// key it came from; unknown keys inside it are refused.
    fn rope_parameters(&self) -> Result<(Map<String, Value>, &'static str)> {
        self.used.borrow_mut().extend(["rope_parameters", "rope_scaling"]);
        let (value, spelling) = match (self.raw.get("rope_parameters"), self.raw.get("rope_scaling")) {
            (Some(v), _) if !v.is_null() => (v.clone(), "rope_parameters"),
            (_, Some(v)) if !v.is_null() => (v.clone(), "rope_scaling"),
            _ => return Ok((Map::new(), "rope_scaling")),
        };
        let Value::Object(mut map) = value else {
            return Err(invalid(spelling, value, "must be an object"));
        };
        // transformers 5 may nest the settings by layer type; one set for all is what we run.
        if !map.is_empty() && map.values().all(Value::is_object) {
            let mut sets = map.values();
            let first = sets.next().cloned().unwrap_or_default();
            if sets.any(|other| *other != first) {
                return Err(invalid(spelling, "per layer type", "differs between layer types, which is not supported"));
            }
            let Value::Object(inner) = first else { unreachable!("checked above") };
            map = inner;
        }
        const ROPE_KEYS: &[&str] = &[
            "rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings",
            "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "truncate",
            "attention_factor", "mscale", "mscale_all_dim", "partial_rotary_factor",
            "short_factor", "long_factor",
        ];
        if let Some(key) = map.keys().find(|k| !ROPE_KEYS.contains(&k.as_str())) {
            return Err(invalid(&format!("{spelling}.{key}"), &map[key], "is not a RoPE setting refa-loss knows; it may change the model"));
        }
        Ok((map, spelling))
    }

    /// Refuses every key that was neither read nor known to leave the computation alone.
    fn refuse_unknown_keys(&self) -> Result<()> {
        let used = self.used.borrow();
        for (key, value) in self.raw {
            if used.contains(key.as_str()) || HARMLESS_KEYS.contains(&key.as_str()) {
                continue;
            }
            if DROPOUT_KEYS.contains(&key.as_str()) {
                if value.is_null() || value.as_f64() == Some(0.0) {
                    continue;
                }
                return Err(invalid(key, value, "is not supported: only 0 (no dropout) trains as transformers would"));
            }
            if key == "quantization_config" {
                return Err(invalid(key, "(present)", "marks a quantized checkpoint; load a float (f32/bf16/f16) checkpoint instead"));
            }
            return Err(invalid(
                key,
                value,
                &format!(
                    "is not a `{}` setting refa-loss knows, and it may change the model; \
                     remove it if it does not",
                    self.family.model_type()
                ),
            ));
        }
        Ok(())
    }
}

/// The family from `model_type`, else from `architectures`.
fn family_of(raw: &Map<String, Value>) -> Result<Family> {
    if let Some(model_type) = raw.get("model_type").and_then(Value::as_str) {
        return Family::from_model_type(model_type).map_err(|m| RefaError::config("config.json", m));
    }
    let classes: Vec<&str> = raw
        .get("architectures")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    classes
        .iter()
        .find_map(|c| Family::from_class(c))
        .ok_or_else(|| {
            let supported = Family::ALL.map(Family::model_type).join(", ");
            RefaError::config(
                "config.json",
                format!(
                    "names no `model_type` (and `architectures` = {classes:?} names no supported \
                     class); supported: {supported}"
                ),
            )
        })
}

/// `layer_types` as "does layer i slide".
fn layer_types(types: &Value, count: usize) -> Result<Vec<bool>> {
    let items = types
        .as_array()
        .ok_or_else(|| invalid("layer_types", types, "must be a list"))?;
    if items.len() != count {
        let rule = format!("must name one type per layer ({count})");
        return Err(invalid("layer_types", format!("a list of {}", items.len()), &rule));
    }
    items
        .iter()
        .map(|t| match t.as_str() {
            Some("sliding_attention") => Ok(true),
            Some("full_attention") => Ok(false),
            _ => Err(invalid("layer_types", t, "must hold \"full_attention\" or \"sliding_attention\"")),
        })
        .collect()
}
