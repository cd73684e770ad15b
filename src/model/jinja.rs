//! A checkpoint's own chat template: the Jinja source of its `tokenizer_config.json` (or
//! `chat_template.jinja` beside it), rendered with `minijinja` the way transformers'
//! `apply_chat_template` renders it.

use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::error::{RefaError, Result};

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A turn of `role`.
    pub fn new(role: &str, content: &str) -> Self {
        ChatMessage {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// A Jinja chat template with the special tokens it may print.
///
/// Rendering follows transformers: `trim_blocks` and `lstrip_blocks` on, the variables
/// `messages`, `add_generation_prompt`, `bos_token` and `eos_token`, a `raise_exception(msg)`
/// function that fails the rendering with the template's message, and Python's string
/// methods (`.strip()`, `.startswith()`, …) through `minijinja-contrib`'s `pycompat`.
#[derive(Debug, Clone, PartialEq)]
pub struct JinjaTemplate {
    /// The template source.
    pub source: String,
    /// The text of the BOS token (`<s>` for Mistral).
    pub bos_token: String,
    /// The text of the EOS token (`</s>` for Mistral).
    pub eos_token: String,
}

impl JinjaTemplate {
    /// The template of a Hugging Face checkpoint folder: `chat_template.jinja`, else the
    /// `chat_template` of `tokenizer_config.json` (a string, or a list of named templates of
    /// which `default` is taken); `None` when the folder has neither. The BOS and EOS texts
    /// come from `tokenizer_config.json` (strings or `{"content": …}` objects).
    pub fn from_checkpoint(folder: &Path) -> Result<Option<Self>> {
        let config_path = folder.join("tokenizer_config.json");
        let config: Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => {
                serde_json::from_str(&text).map_err(|e| RefaError::config(&config_path, e))?
            }
            Err(_) => Value::Null,
        };
        let jinja_path = folder.join("chat_template.jinja");
        let source = match std::fs::read_to_string(&jinja_path) {
            Ok(source) => Some(source),
            Err(_) => template_of(&config, &config_path)?,
        };
        let Some(source) = source else {
            return Ok(None);
        };
        let token = |name: &str| match config.get(name) {
            Some(Value::String(text)) => text.clone(),
            Some(object) => object
                .get("content")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            None => String::new(),
        };
        Ok(Some(JinjaTemplate {
            source,
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
        }))
    }

    /// The conversation as text; with `add_generation_prompt`, followed by what opens the
    /// assistant's turn.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        let context = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        env.render_str(&self.source, context)
            .map_err(|e| RefaError::config("chat_template", format!("{e:#}")))
    }
}

/// `chat_template` of a `tokenizer_config.json`: a string, or the `default` of a list.
fn template_of(config: &Value, path: &Path) -> Result<Option<String>> {
    match config.get("chat_template") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(source)) => Ok(Some(source.clone())),
        Some(Value::Array(named)) => Ok(named
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_string)),
        Some(other) => Err(RefaError::config(
            path,
            format!("`chat_template` is {other}, not a string or a list of named templates"),
        )),
    }
}
