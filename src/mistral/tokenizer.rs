//! Hugging Face `tokenizer.json` and the chat templates of the paper's models.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::error::{RefaError, Result};

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
            bos_id,
            eos_id,
        })
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

    /// The prompt as the template frames it, BOS first.
    pub fn encode_prompt(&self, prompt: &str) -> Result<Vec<i64>> {
        let text = match self.template {
            ChatTemplate::MistralInstruct => format!("[INST] {} [/INST]", prompt.trim()),
            ChatTemplate::Zephyr => format!("<|user|>\n{}</s>\n<|assistant|>\n", prompt.trim()),
        };
        let mut ids = vec![self.bos_id];
        ids.extend(self.encode_text(&text)?);
        Ok(ids)
    }

    /// A response, EOS last.
    pub fn encode_response(&self, response: &str) -> Result<Vec<i64>> {
        let mut ids = self.encode_text(response.trim())?;
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
        let mut prompt = self.encode_prompt(prompt)?;
        prompt.truncate(max_prompt.min(max_total - 1));
        let mut response = self.encode_response(response)?;
        response.truncate(max_total.saturating_sub(prompt.len()));
        Ok(Encoded { prompt, response })
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
