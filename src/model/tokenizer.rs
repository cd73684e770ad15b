//! Hugging Face `tokenizer.json` and the chat templates of the paper's models.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::error::{RefaError, Result};
use crate::model::jinja::{ChatMessage, JinjaTemplate};

/// How a conversation turn becomes text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "trainer", derive(clap::ValueEnum))]
pub enum ChatTemplate {
    /// Mistral-instruct: `<s>[INST] {prompt} [/INST]` then `{response}</s>`.
    #[cfg_attr(feature = "trainer", value(name = "mistral"))]
    MistralInstruct,
    /// Zephyr (the SFT models of the paper's pipeline): `<s><|user|>\n{prompt}</s>\n<|assistant|>\n`
    /// then `{response}</s>`.
    Zephyr,
}

/// Which template frames the conversations: the checkpoint's own when it has one (`Auto`,
/// the trainer's default), else a built-in one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "trainer", derive(clap::ValueEnum))]
pub enum TemplateChoice {
    /// The checkpoint's `chat_template` when it has one, else Mistral-instruct.
    #[default]
    Auto,
    /// The built-in Mistral-instruct template.
    CausalLm,
    /// The built-in Zephyr template.
    Zephyr,
}

impl TemplateChoice {
    /// The built-in template this choice falls back to.
    pub fn builtin(self) -> ChatTemplate {
        match self {
            TemplateChoice::Zephyr => ChatTemplate::Zephyr,
            _ => ChatTemplate::MistralInstruct,
        }
    }
}

impl ChatTemplate {
    /// Parses `mistral` or `zephyr`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "mistral" | "mistral-instruct" => Some(ChatTemplate::MistralInstruct),
            "zephyr" => Some(ChatTemplate::Zephyr),
            _ => None,
        }
    }
}

/// A prompt and one response as token ids; the labels mark the response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Prompt ids (BOS and the template's markers included).
    pub prompt: Vec<i64>,
    /// Response ids (EOS included unless truncated).
    pub response: Vec<i64>,
}

impl Encoded {
    /// `prompt ++ response`.
    pub fn input_ids(&self) -> Vec<i64> {
        self.prompt.iter().chain(&self.response).copied().collect()
    }

    /// `−100` over the prompt, the ids over the response (the scorer's labels).
    pub fn labels(&self) -> Vec<i64> {
        std::iter::repeat_n(-100, self.prompt.len())
            .chain(self.response.iter().copied())
            .collect()
    }

    /// Whether the response ends with `eos_id` (false after truncation).
    pub fn ends_with(&self, eos_id: i64) -> bool {
        self.response.last() == Some(&eos_id)
    }
}

/// A tokenizer with a chat template and the model's BOS/EOS ids.
pub struct ChatTokenizer {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    jinja: Option<JinjaTemplate>,
    bos_id: i64,
    eos_id: i64,
}

impl std::fmt::Debug for ChatTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTokenizer")
            .field("template", &self.template)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .finish()
    }
}

impl ChatTokenizer {
    /// Loads `tokenizer.json`.
    pub fn from_file(
        path: impl AsRef<Path>,
        template: ChatTemplate,
        bos_id: i64,
        eos_id: i64,
    ) -> Result<Self> {
        let path = path.as_ref();
        let tokenizer = Tokenizer::from_file(path).map_err(|e| RefaError::config(path, e))?;
        Ok(ChatTokenizer {
            tokenizer,
            template,
            jinja: None,
            bos_id,
            eos_id,
        })
    }

    /// Parses the text of a `tokenizer.json` already in memory (e.g. one bundled with
    /// `include_str!`).
    pub fn from_json(json: &str, template: ChatTemplate, bos_id: i64, eos_id: i64) -> Result<Self> {
        let tokenizer = Tokenizer::from_bytes(json.as_bytes())
            .map_err(|e| RefaError::config("tokenizer.json", e))?;
        Ok(ChatTokenizer {
            tokenizer,
            template,
            jinja: None,
            bos_id,
            eos_id,
        })
    }

    /// Frames conversations with `template` (a checkpoint's own) instead of the built-in one.
    pub fn with_jinja(mut self, template: JinjaTemplate) -> Self {
        self.jinja = Some(template);
        self
    }

    /// With [`TemplateChoice::Auto`], the chat template of the checkpoint `folder` when it
    /// has one ([`JinjaTemplate::from_checkpoint`]); otherwise unchanged.
    pub fn with_checkpoint_template(self, folder: &Path, choice: TemplateChoice) -> Result<Self> {
        if choice != TemplateChoice::Auto {
            return Ok(self);
        }
        Ok(match JinjaTemplate::from_checkpoint(folder)? {
            Some(template) => self.with_jinja(template),
            None => self,
        })
    }

    /// The checkpoint's template, when one frames the conversations.
    pub fn jinja(&self) -> Option<&JinjaTemplate> {
        self.jinja.as_ref()
    }

    /// Plain text to ids, without special tokens added (markers written in the text, such as
    /// `</s>` in Zephyr's template, are still recognized as the tokenizer's added tokens).
    pub fn encode_text(&self, text: &str) -> Result<Vec<i64>> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| RefaError::config("tokenizer.json", e))?;
        Ok(encoding.get_ids().iter().map(|&id| i64::from(id)).collect())
    }

    /// Ids back to text, special tokens skipped.
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids: Vec<u32> = ids
            .iter()
            .filter_map(|&id| u32::try_from(id).ok())
            .collect();
        self.tokenizer
            .decode(&ids, true)
            .map_err(|e| RefaError::config("tokenizer.json", e))
    }

    /// The prompt as the template frames it, BOS first (with a checkpoint's template: the
    /// user turn rendered with `add_generation_prompt`, as the template prints it).
    pub fn encode_prompt(&self, prompt: &str) -> Result<Vec<i64>> {
        if let Some(jinja) = &self.jinja {
            let turn = [ChatMessage::new("user", prompt)];
            return self.encode_text(&jinja.render(&turn, true)?);
        }
        let text = match self.template {
            ChatTemplate::MistralInstruct => format!("[INST] {} [/INST]", prompt),
            ChatTemplate::Zephyr => format!("<|user|>\n{}</s>\n<|assistant|>\n", prompt),
        };
        let mut ids = vec![self.bos_id];
        ids.extend(self.encode_text(&text)?);
        Ok(ids)
    }

    /// A response, EOS last.
    pub fn encode_response(&self, response: &str) -> Result<Vec<i64>> {
        let mut ids = self.encode_text(response)?;
        ids.push(self.eos_id);
        Ok(ids)
    }

    /// A prompt and a response, truncated to at most `max_prompt` prompt tokens (the prompt's
    /// start is kept, BOS included) and `max_total` tokens in all (the response is cut, and
    /// then has no EOS). The prompt keeps at most `max_total − 1` tokens, so that every
    /// response keeps at least one; `max_prompt >= 1` and `max_total >= 2`.
    pub fn encode(
        &self,
        prompt: &str,
        response: &str,
        max_prompt: usize,
        max_total: usize,
    ) -> Result<Encoded> {
        check_token_limits(max_prompt, max_total)?;
        let (mut prompt, mut response) = match &self.jinja {
            Some(jinja) => self.split_conversation(jinja, prompt, response)?,
            None => (self.encode_prompt(prompt)?, self.encode_response(response)?),
        };
        prompt.truncate(max_prompt.min(max_total - 1));
        response.truncate(max_total.saturating_sub(prompt.len()));
        Ok(Encoded { prompt, response })
    }

    /// [`encode`](Self::encode) after earlier turns: `context` (a system prompt, earlier user
    /// and assistant turns) comes before the user's `prompt`. Only a checkpoint's own
    /// template can frame them; with a built-in template a non-empty context is an error.
    pub fn encode_in_context(
        &self,
        context: &[ChatMessage],
        prompt: &str,
        response: &str,
        max_prompt: usize,
        max_total: usize,
    ) -> Result<Encoded> {
        if context.is_empty() {
            return self.encode(prompt, response, max_prompt, max_total);
        }
        let Some(jinja) = &self.jinja else {
            let roles: Vec<&str> = context.iter().map(|m| m.role.as_str()).collect();
            return Err(RefaError::config(
                "chat template",
                format!(
                    "a prompt with earlier turns ({roles:?}) needs the checkpoint's own chat \
                     template; the built-in {:?} template frames a single user turn",
                    self.template
                ),
            ));
        };
        check_token_limits(max_prompt, max_total)?;
        let (mut prompt, mut response) = self.split_turns(jinja, context, prompt, response)?;
        prompt.truncate(max_prompt.min(max_total - 1));
        response.truncate(max_total.saturating_sub(prompt.len()));
        Ok(Encoded { prompt, response })
    }

    /// With a checkpoint's template: prompt ids = the user turn with the generation prompt,
    /// full ids = the user and assistant turns; the response is the full sequence after the
    /// prompt prefix, up to and including its last EOS (only whitespace may follow it). A
    /// template that does not keep the prompt a token prefix of the conversation, or whose
    /// assistant turn has no EOS, is refused: training on a misaligned split would teach the
    /// wrong tokens.
    fn split_conversation(
        &self,
        jinja: &JinjaTemplate,
        prompt: &str,
        response: &str,
    ) -> Result<(Vec<i64>, Vec<i64>)> {
        self.split_turns(jinja, &[], prompt, response)
    }

    /// [`split_conversation`](Self::split_conversation) after the turns of `context`.
    fn split_turns(
        &self,
        jinja: &JinjaTemplate,
        context: &[ChatMessage],
        prompt: &str,
        response: &str,
    ) -> Result<(Vec<i64>, Vec<i64>)> {
        let mut turns = context.to_vec();
        turns.push(ChatMessage::new("user", prompt));
        let prompt_ids = self.encode_text(&jinja.render(&turns, true)?)?;
        turns.push(ChatMessage::new("assistant", response));
        let full = self.encode_text(&jinja.render(&turns, false)?)?;
        if !full.starts_with(&prompt_ids) {
            let at = prompt_ids
                .iter()
                .zip(&full)
                .take_while(|(a, b)| a == b)
                .count();
            return Err(RefaError::config(
                "chat_template",
                format!(
                    "the prompt is not a token prefix of the conversation (they differ at token {at}): \
                     the template renders the user turn differently once an answer follows, so \
                     prompt and response cannot be split"
                ),
            ));
        }
        let rest = &full[prompt_ids.len()..];
        let end = rest
            .iter()
            .rposition(|&id| id == self.eos_id)
            .ok_or_else(|| {
                RefaError::config(
                    "chat_template",
                    format!(
                        "the assistant turn does not end with the EOS token (id {})",
                        self.eos_id
                    ),
                )
            })?;
        if !self.decode(&rest[end + 1..])?.trim().is_empty() {
            return Err(RefaError::config(
                "chat_template",
                "text follows the assistant turn's EOS token; the response cannot end with EOS",
            ));
        }
        Ok((prompt_ids, rest[..=end].to_vec()))
    }

    /// Tokens the tokenizer can produce, added tokens included.
    pub fn vocab_size(&self) -> i64 {
        self.tokenizer.get_vocab_size(true) as i64
    }

    /// Checks that every id this tokenizer can produce (and its BOS and EOS) is a row of a
    /// model whose vocabulary has `model_vocab` tokens: a larger tokenizer would index past
    /// the model's embedding.
    pub fn check_fits(&self, model_vocab: i64) -> Result<()> {
        let message = |what: String| {
            RefaError::config(
                "tokenizer.json",
                format!("{what}, but the model's vocabulary has {model_vocab} tokens"),
            )
        };
        if self.vocab_size() > model_vocab {
            return Err(message(format!(
                "the tokenizer has {} tokens",
                self.vocab_size()
            )));
        }
        for (name, id) in [("BOS", self.bos_id), ("EOS", self.eos_id)] {
            if !(0..model_vocab).contains(&id) {
                return Err(message(format!("the {name} id is {id}")));
            }
        }
        Ok(())
    }

    /// The EOS id.
    pub fn eos_id(&self) -> i64 {
        self.eos_id
    }

    /// The template.
    pub fn template(&self) -> ChatTemplate {
        self.template
    }
}

/// `max_total >= 2` (a prompt token and a response token) and `max_prompt >= 1`: with less,
/// every response would be cut to nothing.
pub(crate) fn check_token_limits(max_prompt: usize, max_total: usize) -> Result<()> {
    RefaError::require(
        max_total >= 2,
        "max_tokens",
        max_total,
        ">= 2 (one prompt and one response token at least)",
    )?;
    RefaError::require(max_prompt >= 1, "max_prompt_tokens", max_prompt, ">= 1")
}
