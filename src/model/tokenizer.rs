//! Hugging Face `tokenizer.json` and the chat templates of the paper's models.

use std::path::Path;

use serde_json::Value;
use tokenizers::Tokenizer;

use crate::error::{RefaError, Result};
use crate::model::jinja::{is_python_space, read_tokenizer_config, ChatMessage, JinjaTemplate};

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
    Mistral,
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
    /// Response ids (the end-of-turn token included unless truncated; see
    /// [`ChatTokenizer::end_of_turn_id`]).
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

    /// Whether the response ends with `eos_id` (false after truncation); pass
    /// [`ChatTokenizer::end_of_turn_id`].
    pub fn ends_with(&self, eos_id: i64) -> bool {
        self.response.last() == Some(&eos_id)
    }
}

/// A tokenizer with a chat template, the model's BOS/EOS ids, and the ids that end a
/// response and pad a batch.
pub struct ChatTokenizer {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    jinja: Option<JinjaTemplate>,
    bos_id: i64,
    eos_id: i64,
    end_of_turn_id: i64,
    pad_id: Option<i64>,
}

impl std::fmt::Debug for ChatTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTokenizer")
            .field("template", &self.template)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("end_of_turn_id", &self.end_of_turn_id)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

/// Stand-ins for the contents of a turn, found again in the rendered text: plain ASCII
/// letters, which no template's `trim` or `strip` changes.
const USER_PROBE: &str = "RefaProbeUserTurnText";
const ANSWER_PROBE: &str = "RefaProbeAssistantTurnText";

impl ChatTokenizer {
    /// Loads `tokenizer.json` (a UTF-8 byte-order mark before its JSON is skipped). Its pad
    /// token is the `pad_token` of the `tokenizer_config.json` beside it when there is one,
    /// else that of the file's own padding settings, else none ([`pad_id`](Self::pad_id)
    /// then falls back to the model's or the EOS id). The response end is `eos_id` until a
    /// checkpoint's template says otherwise ([`with_jinja`](Self::with_jinja)).
    pub fn from_file(
        path: impl AsRef<Path>,
        template: ChatTemplate,
        bos_id: i64,
        eos_id: i64,
    ) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| RefaError::io(path, &e))?;
        let tokenizer = Tokenizer::from_bytes(bytes.strip_prefix(BOM).unwrap_or(&bytes))
            .map_err(|e| RefaError::config(path, e))?;
        let mut chat = Self::new(tokenizer, template, bos_id, eos_id);
        if let Some(folder) = path.parent() {
            chat = chat.with_checkpoint_pad_token(folder)?;
        }
        Ok(chat)
    }

    /// Parses the text of a `tokenizer.json` already in memory (e.g. one bundled with
    /// `include_str!`); its pad token is that of its padding settings, if any.
    pub fn from_json(json: &str, template: ChatTemplate, bos_id: i64, eos_id: i64) -> Result<Self> {
        let tokenizer = Tokenizer::from_bytes(json.trim_start_matches('\u{feff}').as_bytes())
            .map_err(|e| RefaError::config("tokenizer.json", e))?;
        Ok(Self::new(tokenizer, template, bos_id, eos_id))
    }

    fn new(tokenizer: Tokenizer, template: ChatTemplate, bos_id: i64, eos_id: i64) -> Self {
        let pad_id = tokenizer.get_padding().map(|p| i64::from(p.pad_id));
        ChatTokenizer {
            tokenizer,
            template,
            jinja: None,
            bos_id,
            eos_id,
            end_of_turn_id: eos_id,
            pad_id,
        }
    }

    /// Frames conversations with `template` (a checkpoint's own) instead of the built-in one,
    /// and takes the response end from it: the token the template closes an assistant turn
    /// with ([`end_of_turn_id`](Self::end_of_turn_id)).
    pub fn with_jinja(mut self, template: JinjaTemplate) -> Self {
        self.end_of_turn_id = self.probe_end_of_turn(&template).unwrap_or(self.eos_id);
        self.jinja = Some(template);
        self
    }

    /// Passes `kwargs` to the checkpoint's template, as transformers' `apply_chat_template`
    /// passes its keyword arguments (`enable_thinking`, `date_string`, …), and takes the
    /// response end again from the template so configured. An empty `kwargs` changes
    /// nothing; any other needs a checkpoint's template (the built-in ones read none), and
    /// the names transformers sets itself (`messages`, `add_generation_prompt`, `tools`,
    /// `documents`) are refused.
    pub fn with_template_kwargs(
        self,
        kwargs: impl IntoIterator<Item = (String, Value)>,
    ) -> Result<Self> {
        let kwargs: Vec<(String, Value)> = kwargs.into_iter().collect();
        if kwargs.is_empty() {
            return Ok(self);
        }
        let Some(jinja) = self.jinja.clone() else {
            let names: Vec<&str> = kwargs.iter().map(|(name, _)| name.as_str()).collect();
            return Err(RefaError::config(
                "chat template keyword arguments",
                format!(
                    "{names:?} need the checkpoint's own chat template; the built-in {:?} \
                     template reads none (use --template auto with a checkpoint that has one)",
                    self.template
                ),
            ));
        };
        Ok(self.with_jinja(jinja.with_kwargs(kwargs)?))
    }

    /// With [`TemplateChoice::Auto`], the chat template of the checkpoint `folder` when it
    /// has one ([`JinjaTemplate::from_checkpoint`]); otherwise the template is unchanged.
    /// In every case the `pad_token` of the folder's `tokenizer_config.json`, when it names
    /// one, becomes the pad token.
    pub fn with_checkpoint_template(self, folder: &Path, choice: TemplateChoice) -> Result<Self> {
        let this = self.with_checkpoint_pad_token(folder)?;
        if choice != TemplateChoice::Auto {
            return Ok(this);
        }
        Ok(match JinjaTemplate::from_checkpoint(folder)? {
            Some(template) => this.with_jinja(template),
            None => this,
        })
    }

    /// Pads with `pad_id` (a model config's `pad_token_id`) where the tokenizer names no pad
    /// token of its own: the tokenizer's pad token wins, whenever it is read, and without
    /// either [`pad_id`](Self::pad_id) is the EOS id. `None` changes nothing.
    pub fn with_default_pad_id(mut self, pad_id: Option<i64>) -> Self {
        self.pad_id = self.pad_id.or(pad_id);
        self
    }

    /// The `pad_token` of `folder/tokenizer_config.json` (text or `{"content": …}`) as the
    /// pad id, when the file exists and names a token this tokenizer knows.
    fn with_checkpoint_pad_token(mut self, folder: &Path) -> Result<Self> {
        let path = folder.join("tokenizer_config.json");
        let Some(config) = read_tokenizer_config(&path)? else {
            return Ok(self);
        };
        let name = match config.get("pad_token") {
            Some(Value::String(name)) => Some(name.as_str()),
            Some(object) => object.get("content").and_then(Value::as_str),
            None => None,
        };
        if let Some(name) = name {
            let id = self.tokenizer.token_to_id(name).ok_or_else(|| {
                RefaError::config(
                    &path,
                    format!("`pad_token` is {name:?}, which the tokenizer does not know"),
                )
            })?;
            self.pad_id = Some(i64::from(id));
        }
        Ok(self)
    }

    /// The token `template` closes an assistant turn with: the first added token after the
    /// answer in a one-turn conversation (`<|eot_id|>`, `<|im_end|>`, `<end_of_turn>`,
    /// `</s>`, `<|end|>`), past whitespace only. `None` when the template prints no such
    /// token there, or cannot render a user turn and an answer (with or without a system
    /// prompt).
    fn probe_end_of_turn(&self, template: &JinjaTemplate) -> Option<i64> {
        let turns = [
            ChatMessage::new("user", USER_PROBE),
            ChatMessage::new("assistant", ANSWER_PROBE),
        ];
        let with_system = [ChatMessage::new("system", "You are a helpful assistant.")];
        let text = template.render(&turns, false).ok().or_else(|| {
            let turns: Vec<ChatMessage> = with_system.iter().chain(&turns).cloned().collect();
            template.render(&turns, false).ok()
        })?;
        let after = &text[text.rfind(ANSWER_PROBE)? + ANSWER_PROBE.len()..];
        let added = self.tokenizer.get_added_tokens_decoder();
        for id in self.encode_text(after).ok()? {
            if u32::try_from(id).is_ok_and(|id| added.contains_key(&id)) {
                return Some(id);
            }
            if !self.decode_raw(&[id])?.chars().all(is_python_space) {
                return None;
            }
        }
        None
    }

    /// Ids to text with special tokens kept.
    fn decode_raw(&self, ids: &[i64]) -> Option<String> {
        let ids: Vec<u32> = ids
            .iter()
            .filter_map(|&id| u32::try_from(id).ok())
            .collect();
        self.tokenizer.decode(&ids, false).ok()
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
    /// user turn rendered with `add_generation_prompt`, as the template prints it). A
    /// template that renders it as no tokens at all is refused, naming the template.
    pub fn encode_prompt(&self, prompt: &str) -> Result<Vec<i64>> {
        if let Some(jinja) = &self.jinja {
            let turn = [ChatMessage::new("user", prompt)];
            let ids = self.encode_text(&jinja.render(&turn, true)?)?;
            return check_prompt(jinja, ids);
        }
        let text = match self.template {
            ChatTemplate::MistralInstruct => format!("[INST] {} [/INST]", prompt),
            ChatTemplate::Zephyr => format!("<|user|>\n{}</s>\n<|assistant|>\n", prompt),
        };
        let mut ids = vec![self.bos_id];
        ids.extend(self.encode_text(&text)?);
        Ok(ids)
    }

    /// A response, the end-of-turn token last (with a built-in template: EOS).
    pub fn encode_response(&self, response: &str) -> Result<Vec<i64>> {
        let mut ids = self.encode_text(response)?;
        ids.push(self.end_of_turn_id);
        Ok(ids)
    }

    /// A prompt and a response, truncated to at most `max_prompt` prompt tokens (the prompt's
    /// start is kept, BOS included) and `max_total` tokens in all (the response is cut, and
    /// then has no end-of-turn token). The prompt keeps at most `max_total − 1` tokens, so that every
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

    /// With a checkpoint's template: the prompt is the user turn rendered with the generation
    /// prompt (what the model sees at inference), the response what the model emits after it
    /// (the answer as the template prints it, up to and including the end-of-turn token; only
    /// whitespace and special tokens may follow it). See [`split_turns`](Self::split_turns).
    fn split_conversation(
        &self,
        jinja: &JinjaTemplate,
        prompt: &str,
        response: &str,
    ) -> Result<(Vec<i64>, Vec<i64>)> {
        self.split_turns(jinja, &[], prompt, response)
    }

    /// [`split_conversation`](Self::split_conversation) after the turns of `context`.
    ///
    /// Where the rendered prompt is a prefix of the whole conversation, the response is the
    /// conversation's text after it. Where it is not (Mistral v0.3 and Nemo print the system
    /// prompt only in a user turn that ends the rendering), it is what the template prints
    /// for the assistant's turn ([`emitted_text`](Self::emitted_text)). Either way the ids
    /// are those of prompt + response as one text, which must start with the prompt's own
    /// ids; a split that cannot be made so is refused (training on a misaligned split would
    /// teach the wrong tokens).
    fn split_turns(
        &self,
        jinja: &JinjaTemplate,
        context: &[ChatMessage],
        prompt: &str,
        response: &str,
    ) -> Result<(Vec<i64>, Vec<i64>)> {
        let mut turns = context.to_vec();
        turns.push(ChatMessage::new("user", prompt));
        let prompt_text = jinja.render(&turns, true)?;
        let prompt_ids = check_prompt(jinja, self.encode_text(&prompt_text)?)?;
        turns.push(ChatMessage::new("assistant", response));
        let full_text = jinja.render(&turns, false)?;
        let emitted = match full_text.strip_prefix(&prompt_text) {
            Some(rest) => rest.to_string(),
            None => self.emitted_text(jinja, &turns, &full_text)?,
        };
        let ids = self.encode_text(&format!("{prompt_text}{emitted}"))?;
        if !ids.starts_with(&prompt_ids) {
            let at = prompt_ids
                .iter()
                .zip(&ids)
                .take_while(|(a, b)| a == b)
                .count();
            return Err(RefaError::config(
                &jinja.origin,
                format!(
                    "the prompt is not a token prefix of the conversation (they differ at token \
                     {at}): the answer's first tokens merge with the prompt's last ones, so \
                     prompt and response cannot be split"
                ),
            ));
        }
        let rest = &ids[prompt_ids.len()..];
        let end = self.end_of_response(jinja, rest)?;
        Ok((prompt_ids, rest[..=end].to_vec()))
    }

    /// The index in `rest` (the ids after the prompt) of the end-of-turn token that ends the
    /// response: the last one, after which only whitespace and special tokens (a template's
    /// closing EOS, as Phi-3 prints) may follow.
    fn end_of_response(&self, jinja: &JinjaTemplate, rest: &[i64]) -> Result<usize> {
        let end = rest
            .iter()
            .rposition(|&id| id == self.end_of_turn_id)
            .ok_or_else(|| {
                RefaError::config(
                    &jinja.origin,
                    format!(
                        "the assistant turn does not end with the end-of-turn token (id {}): \
                         the template closes an assistant turn with no token of the tokenizer's \
                         added vocabulary, so a response has no end to learn",
                        self.end_of_turn_id
                    ),
                )
            })?;
        if !self.decode(&rest[end + 1..])?.chars().all(is_python_space) {
            return Err(RefaError::config(
                &jinja.origin,
                "text follows the assistant turn's end-of-turn token; the response cannot end \
                 with it",
            ));
        }
        Ok(end)
    }

    /// What the model emits after the generation prompt, for a template that renders the
    /// turns before the answer differently once an answer follows (`turns` ends with the
    /// user's turn and the answer, `full_text` is their rendering): the text the template
    /// prints for the assistant's turn there. Probes with stand-in texts find (1) what the
    /// template prints between the user's text and the answer, of which the part the
    /// generation prompt ends with belongs to the prompt and the rest (Mistral v0.3's space)
    /// opens the answer, and (2) where the answer begins in the conversation.
    fn emitted_text(
        &self,
        jinja: &JinjaTemplate,
        turns: &[ChatMessage],
        full_text: &str,
    ) -> Result<String> {
        let refused = |why: &str| {
            RefaError::config(
                &jinja.origin,
                format!(
                    "the prompt is not a token prefix of the conversation: the template renders \
                     the turns before the answer differently once an answer follows, and {why}, \
                     so prompt and response cannot be split"
                ),
            )
        };
        let n = turns.len();
        let mut probe = turns.to_vec();
        probe[n - 2].content = USER_PROBE.to_string();
        probe[n - 1].content = ANSWER_PROBE.to_string();
        let prompt = jinja.render(&probe[..n - 1], true)?;
        let conversation = jinja.render(&probe, false)?;
        let after_user = |text: &str| {
            text.rfind(USER_PROBE)
                .map(|at| text[at + USER_PROBE.len()..].to_string())
        };
        let (Some(closing), Some(between)) = (after_user(&prompt), after_user(&conversation))
        else {
            return Err(refused("the user's turn is not printed as written"));
        };
        let opening = between
            .strip_prefix(closing.as_str())
            .and_then(|rest| rest.find(ANSWER_PROBE).map(|at| rest[..at].to_string()))
            .ok_or_else(|| refused("the generation prompt is not what opens the answer"))?;
        let mut located = turns.to_vec();
        located[n - 1].content = ANSWER_PROBE.to_string();
        let with_probe = jinja.render(&located, false)?;
        let at = with_probe
            .rfind(ANSWER_PROBE)
            .ok_or_else(|| refused("the answer is not printed as written"))?;
        let (head, tail) = (&with_probe[..at], &with_probe[at + ANSWER_PROBE.len()..]);
        let answer = full_text
            .strip_prefix(head)
            .filter(|rest| rest.ends_with(tail) && head.ends_with(&opening))
            .ok_or_else(|| refused("the answer changes the text around it"))?;
        Ok(format!("{opening}{answer}"))
    }

    /// Tokens the tokenizer can produce, added tokens included.
    pub fn vocab_size(&self) -> i64 {
        self.tokenizer.get_vocab_size(true) as i64
    }

    /// Checks that every id this tokenizer can produce (and its BOS, EOS, end-of-turn and pad
    /// ids) is a row of a model whose vocabulary has `model_vocab` tokens: a larger tokenizer
    /// would index past the model's embedding.
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
        let ids = [
            ("BOS", self.bos_id),
            ("EOS", self.eos_id),
            ("end-of-turn", self.end_of_turn_id),
            ("pad", self.pad_id()),
        ];
        for (name, id) in ids {
            if !(0..model_vocab).contains(&id) {
                return Err(message(format!("the {name} id is {id}")));
            }
        }
        Ok(())
    }

    /// The EOS id (the model's, as given to [`from_file`](Self::from_file)).
    pub fn eos_id(&self) -> i64 {
        self.eos_id
    }

    /// The token that ends a response: what the checkpoint's chat template closes an
    /// assistant turn with (`<|eot_id|>` for Llama 3, `<|im_end|>` for Qwen and SmolLM2,
    /// `<end_of_turn>` for Gemma, `<|end|>` for Phi-3, `</s>` for Mistral), read from a
    /// rendered one-turn conversation; the EOS id with a built-in template, or when the
    /// template closes the turn with no added token. Responses end with it (unless cut), the
    /// EOS regularizer reads its probability, and generation should stop at it.
    pub fn end_of_turn_id(&self) -> i64 {
        self.end_of_turn_id
    }

    /// The id that pads batches: the tokenizer's pad token (`pad_token` of the
    /// `tokenizer_config.json` beside `tokenizer.json` or in the checkpoint folder, else the
    /// padding settings of `tokenizer.json`), else the model's
    /// ([`with_default_pad_id`](Self::with_default_pad_id)), else the EOS id. Padding is never attended or
    /// scored, so any id of the vocabulary would do; this one is what transformers pads with.
    pub fn pad_id(&self) -> i64 {
        self.pad_id.unwrap_or(self.eos_id)
    }

    /// The template.
    pub fn template(&self) -> ChatTemplate {
        self.template
    }
}

/// The UTF-8 byte-order mark some editors write before a file's text.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// `ids`, the prompt as `jinja` rendered it, unless it has no token: a response would then be
/// learned with nothing before it (and the prefix-sharing layout would attend to padding).
fn check_prompt(jinja: &JinjaTemplate, ids: Vec<i64>) -> Result<Vec<i64>> {
    if ids.is_empty() {
        return Err(RefaError::config(
            &jinja.origin,
            "the chat template renders the user's turn with the generation prompt as no text \
             at all, so a response would have no prompt: use a template that prints the \
             user's turn, or a built-in one (--template mistral or zephyr)",
        ));
    }
    Ok(ids)
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
