//! A checkpoint's own chat template: the Jinja source of its `tokenizer_config.json` (or
//! `chat_template.jinja` beside it), rendered with `minijinja` the way transformers'
//! `apply_chat_template` renders it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use minijinja::value::{from_args, Value as JinjaValue};
use minijinja::{Error as JinjaError, ErrorKind, State};
use serde::Serialize;
use serde_json::Value;

use crate::error::{RefaError, Result};

/// Keyword arguments of a chat template, as transformers' `apply_chat_template(…, **kwargs)`
/// takes them: Qwen3's `enable_thinking`, Llama 3's `date_string`, any other a template reads.
pub type TemplateKwargs = BTreeMap<String, Value>;

/// The variables transformers itself passes to every template: a keyword argument of one of
/// these names is a `TypeError` there (given twice), and refused here.
const RESERVED_VARIABLES: [&str; 4] = ["messages", "add_generation_prompt", "tools", "documents"];

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
/// `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `tools` and `documents`
/// (none) and the keyword arguments ([`kwargs`](Self::kwargs)), a `raise_exception(msg)`
/// function that fails the rendering with the template's message, `strftime_now(format)`
/// (the current time, UTC), and Python's string methods (`.strip()`, `.startswith()`, …)
/// through `minijinja-contrib`'s `pycompat`. Whitespace is Python's: the `trim` filter and
/// `.strip()`, `.lstrip()`, `.rstrip()`, `.split()`, `.splitlines()` and `.isspace()` treat
/// U+001C..U+001F as whitespace too, as `str.strip()` does (Rust's `trim` keeps them).
#[derive(Debug, Clone, PartialEq)]
pub struct JinjaTemplate {
    /// The template source.
    pub source: String,
    /// The text of the BOS token (`<s>` for Mistral).
    pub bos_token: String,
    /// The text of the EOS token (`</s>` for Mistral).
    pub eos_token: String,
    /// Keyword arguments passed to the template beside the conversation (empty by default);
    /// they override `bos_token` and `eos_token` when named so, as in transformers. Set them
    /// with [`with_kwargs`](Self::with_kwargs), which refuses the names transformers
    /// reserves.
    pub kwargs: TemplateKwargs,
    /// Where the source was read, as errors name the template: the checkpoint's
    /// `chat_template.jinja` or `tokenizer_config.json`; `chat_template` for one made in
    /// code ([`new`](Self::new)).
    pub origin: String,
}

impl JinjaTemplate {
    /// A template made in code from its `source` and the texts of the BOS and EOS tokens,
    /// with no keyword arguments; errors name it `chat_template`.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Self {
        JinjaTemplate {
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            kwargs: TemplateKwargs::new(),
            origin: TEMPLATE_NAME.to_string(),
        }
    }

    /// The template of a Hugging Face checkpoint folder: `chat_template.jinja`, else the
    /// `chat_template` of `tokenizer_config.json` (a string, or a list of named templates of
    /// which `default` is taken); `None` when the folder has neither. The BOS and EOS texts
    /// come from `tokenizer_config.json` (strings or `{"content": …}` objects; a UTF-8
    /// byte-order mark before its JSON is skipped).
    pub fn from_checkpoint(folder: &Path) -> Result<Option<Self>> {
        let config_path = folder.join("tokenizer_config.json");
        let config = read_tokenizer_config(&config_path)?.unwrap_or(Value::Null);
        let jinja_path = folder.join("chat_template.jinja");
        let (source, origin) = match std::fs::read_to_string(&jinja_path) {
            Ok(source) => (Some(source), jinja_path),
            Err(_) => (template_of(&config, &config_path)?, config_path),
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
            kwargs: TemplateKwargs::new(),
            origin: origin.display().to_string(),
        }))
    }

    /// This template with `kwargs` added to its keyword arguments (a later value of a name
    /// replaces an earlier one). `messages`, `add_generation_prompt`, `tools` and `documents`
    /// are refused: transformers passes them itself.
    pub fn with_kwargs(
        mut self,
        kwargs: impl IntoIterator<Item = (String, Value)>,
    ) -> Result<Self> {
        for (name, value) in kwargs {
            if RESERVED_VARIABLES.contains(&name.as_str()) {
                return Err(RefaError::config(
                    "chat template keyword arguments",
                    format!(
                        "`{name}` is set by the renderer itself (as in transformers' \
                         apply_chat_template); pass a keyword argument the template reads, \
                         such as enable_thinking or date_string"
                    ),
                ));
            }
            self.kwargs.insert(name, value);
        }
        Ok(self)
    }

    /// The conversation as text; with `add_generation_prompt`, followed by what opens the
    /// assistant's turn. Errors (the template's own `raise_exception`, a syntax error, a
    /// rendering that does not end within [`RENDER_FUEL`] instructions) are
    /// [`RefaError::Config`] naming the template's [`origin`](Self::origin).
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let env = compiled(&self.source).map_err(|e| self.error(&e))?;
        env.get_template(TEMPLATE_NAME)
            .and_then(|t| t.render(self.context(messages, add_generation_prompt)))
            .map_err(|e| self.error(&e))
    }

    /// `error` of this template as the crate reports it.
    fn error(&self, error: &JinjaError) -> RefaError {
        let message = match error.kind() {
            ErrorKind::OutOfFuel => format!(
                "the chat template did not finish rendering within {RENDER_FUEL} instructions \
                 (a loop that never ends?): fix or replace the template ({error})"
            ),
            _ => format!("{error:#}"),
        };
        RefaError::config(&self.origin, message)
    }

    /// What the template sees, as transformers builds it: the special tokens, the keyword
    /// arguments over them, then the conversation, `tools` and `documents` (none).
    fn context(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> BTreeMap<String, JinjaValue> {
        let mut context = BTreeMap::new();
        context.insert(
            "bos_token".into(),
            JinjaValue::from(self.bos_token.as_str()),
        );
        context.insert(
            "eos_token".into(),
            JinjaValue::from(self.eos_token.as_str()),
        );
        for (name, value) in &self.kwargs {
            context.insert(name.clone(), JinjaValue::from_serialize(value));
        }
        context.insert("messages".into(), JinjaValue::from_serialize(messages));
        context.insert(
            "add_generation_prompt".into(),
            JinjaValue::from(add_generation_prompt),
        );
        context.insert("tools".into(), JinjaValue::from(()));
        context.insert("documents".into(), JinjaValue::from(()));
        context
    }
}

/// The name a template is compiled under (errors name it).
const TEMPLATE_NAME: &str = "chat_template";

/// The instructions one rendering may execute before it fails: a template that loops for
/// ever stops (in about 0.4 s on a CPU core) instead of hanging. The Hub templates of
/// tests/fixtures/chat_template/hub use 30 to 110 for a one-turn conversation and 4 600 to
/// 13 300 for one of 100 turns; this bound is about a thousand times the latter.
pub const RENDER_FUEL: u64 = 10_000_000;

/// The environment holding `source` compiled, as transformers sets one up. Compiled once per
/// source: the trainer renders every response of a data set with one template, and
/// compiling took most of a render (0.2 ms for Llama 3.1's).
fn compiled(source: &str) -> std::result::Result<Arc<minijinja::Environment<'static>>, JinjaError> {
    static CACHE: Mutex<Vec<(String, Arc<minijinja::Environment<'static>>)>> =
        Mutex::new(Vec::new());
    let mut cache = CACHE.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((_, env)) = cache.iter().find(|(cached, _)| cached == source) {
        return Ok(Arc::clone(env));
    }
    let mut env = minijinja::Environment::new();
    env.set_fuel(Some(RENDER_FUEL));
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(python_methods);
    env.add_filter("trim", python_trim);
    env.add_function(
        "raise_exception",
        |message: String| -> std::result::Result<String, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, message))
        },
    );
    env.add_function("strftime_now", |format: String| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        strftime_utc(&format, now)
    });
    env.add_template_owned(TEMPLATE_NAME, source.to_string())?;
    let env = Arc::new(env);
    // A handful of templates at most are in use at once; the oldest goes first.
    if cache.len() >= 8 {
        cache.remove(0);
    }
    cache.push((source.to_string(), Arc::clone(&env)));
    Ok(env)
}

/// A `--template-kwarg` value, `NAME=VALUE`: the value is read as JSON when it is JSON
/// (`true`, `3`, `"text"`, `[1, 2]`) and taken as text otherwise (`date_string=26 Jul 2024`).
/// Usable as a clap `value_parser`.
pub fn parse_template_kwarg(text: &str) -> Result<(String, Value)> {
    let Some((name, value)) = text.split_once('=') else {
        return Err(RefaError::config(
            "chat template keyword argument",
            format!("`{text}` is not NAME=VALUE (for example enable_thinking=false)"),
        ));
    };
    let name = name.trim();
    let valid = !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(RefaError::config(
            "chat template keyword argument",
            format!("`{name}` is not a template variable name (letters, digits and _)"),
        ));
    }
    let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_string()));
    Ok((name.to_string(), value))
}

/// Python's `str.isspace()` characters, which `str.strip()` removes: Unicode's White_Space
/// (what Rust's `char::is_whitespace` tests) and the separators U+001C..U+001F.
pub(crate) fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.strip(chars)` (both ends), `lstrip` (`start`) or `rstrip` (`end`).
fn python_strip<'a>(text: &'a str, chars: Option<&str>, start: bool, end: bool) -> &'a str {
    let strip = |c: char| match chars {
        Some(chars) => chars.contains(c),
        None => is_python_space(c),
    };
    let text = if start {
        text.trim_start_matches(strip)
    } else {
        text
    };
    if end {
        text.trim_end_matches(strip)
    } else {
        text
    }
}

/// Jinja2's `trim(chars=None)` filter: Python's `str.strip` of the value's text.
fn python_trim(value: &JinjaValue, chars: Option<String>) -> String {
    let text = value.to_string();
    python_strip(&text, chars.as_deref(), true, true).to_string()
}

/// Python's `str.split()` without a separator: runs of whitespace split, none kept, at most
/// `max_splits` splits (the rest keeps its trailing whitespace, as in Python).
fn python_split_whitespace(text: &str, max_splits: Option<i64>) -> Vec<String> {
    let mut parts = Vec::new();
    let mut rest = text.trim_start_matches(is_python_space);
    while !rest.is_empty() {
        if max_splits.is_some_and(|m| m >= 0 && parts.len() as i64 >= m) {
            parts.push(rest.to_string());
            break;
        }
        match rest.find(is_python_space) {
            Some(at) => {
                parts.push(rest[..at].to_string());
                rest = rest[at..].trim_start_matches(is_python_space);
            }
            None => {
                parts.push(rest.to_string());
                break;
            }
        }
    }
    parts
}

/// Python's `str.splitlines(keepends)`: `\n`, `\r`, `\r\n`, `\v`, `\f`, U+001C..U+001E,
/// U+0085, U+2028 and U+2029 end lines.
fn python_splitlines(text: &str, keep_ends: bool) -> Vec<String> {
    let is_break = |c: char| {
        matches!(
            c,
            '\n' | '\r'
                | '\u{0b}'
                | '\u{0c}'
                | '\u{1c}'
                | '\u{1d}'
                | '\u{1e}'
                | '\u{85}'
                | '\u{2028}'
                | '\u{2029}'
        )
    };
    let mut lines = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(is_break) {
        let width = if rest[at..].starts_with("\r\n") {
            2
        } else {
            rest[at..].chars().next().map_or(1, char::len_utf8)
        };
        let end = if keep_ends { at + width } else { at };
        lines.push(rest[..end].to_string());
        rest = &rest[at + width..];
    }
    if !rest.is_empty() {
        lines.push(rest.to_string());
    }
    lines
}

/// The string methods whose whitespace must be Python's, or `None` to leave the call to
/// `pycompat` (a separator given to `split`, any other method).
fn python_string_method(
    text: &str,
    method: &str,
    args: &[JinjaValue],
) -> std::result::Result<Option<JinjaValue>, JinjaError> {
    let strip = |start: bool, end: bool| -> std::result::Result<_, JinjaError> {
        let (chars,): (Option<&str>,) = from_args(args)?;
        Ok(Some(JinjaValue::from(python_strip(
            text, chars, start, end,
        ))))
    };
    match method {
        "strip" => strip(true, true),
        "lstrip" => strip(true, false),
        "rstrip" => strip(false, true),
        "isspace" => {
            let () = from_args(args)?;
            let all = !text.is_empty() && text.chars().all(is_python_space);
            Ok(Some(JinjaValue::from(all)))
        }
        "split" => {
            let (separator, max_splits): (Option<&str>, Option<i64>) = from_args(args)?;
            Ok(separator
                .is_none()
                .then(|| JinjaValue::from(python_split_whitespace(text, max_splits))))
        }
        "splitlines" => {
            let (keep_ends,): (Option<bool>,) = from_args(args)?;
            let lines = python_splitlines(text, keep_ends.unwrap_or(false));
            Ok(Some(JinjaValue::from(lines)))
        }
        _ => Ok(None),
    }
}

/// `minijinja-contrib`'s Python methods, with Python's whitespace where they differ.
fn python_methods(
    state: &State,
    value: &JinjaValue,
    method: &str,
    args: &[JinjaValue],
) -> std::result::Result<JinjaValue, JinjaError> {
    if let Some(text) = value.as_str() {
        if let Some(result) = python_string_method(text, method, args)? {
            return Ok(result);
        }
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// `strftime(format)` of the UTC time `unix_seconds`, for the directives chat templates use:
/// `%d %e %m %y %Y %b %B %a %A %H %I %M %S %p %j %%` (C locale); any other is kept as written.
pub(crate) fn strftime_utc(format: &str, unix_seconds: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = unix_seconds.div_euclid(86_400);
    let seconds = unix_seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let (hour, minute, second) = (seconds / 3600, seconds / 60 % 60, seconds % 60);
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(directive) = chars.next() else {
            out.push('%');
            break;
        };
        let text = match directive {
            'd' => format!("{day:02}"),
            'e' => format!("{day:2}"),
            'm' => format!("{month:02}"),
            'y' => format!("{:02}", year.rem_euclid(100)),
            'Y' => year.to_string(),
            'b' => month_name[..3].to_string(),
            'B' => month_name.to_string(),
            'a' => DAYS[weekday][..3].to_string(),
            'A' => DAYS[weekday].to_string(),
            'H' => format!("{hour:02}"),
            'I' => format!("{:02}", (hour + 11) % 12 + 1),
            'M' => format!("{minute:02}"),
            'S' => format!("{second:02}"),
            'p' => if hour < 12 { "AM" } else { "PM" }.to_string(),
            'j' => format!("{day_of_year:03}"),
            '%' => "%".to_string(),
            other => format!("%{other}"),
        };
        out.push_str(&text);
    }
    out
}

/// `(year, month, day)` of the day `days` after 1970-01-01 (proleptic Gregorian calendar;
/// Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Days from 1970-01-01 to `year-month-day` (the inverse of [`civil_from_days`]).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let shifted_month = (month + 9) % 12;
    let day_of_year = (153 * shifted_month + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The JSON of a `tokenizer_config.json`, a UTF-8 byte-order mark before it skipped (some
/// editors write one); `None` when there is no such file.
pub(crate) fn read_tokenizer_config(path: &Path) -> Result<Option<Value>> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(None);
    };
    serde_json::from_str(text.trim_start_matches('\u{feff}'))
        .map(Some)
        .map_err(|e| RefaError::config(path, e))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_whitespace_is_unicode_white_space_and_the_four_separators() {
        let python: Vec<u32> = (0..=0x10FFFF)
            .filter_map(char::from_u32)
            .filter(|&c| is_python_space(c))
            .map(u32::from)
            .collect();
        // Python 3: [c for c in map(chr, range(0x110000)) if c.isspace()]
        let expected: Vec<u32> = [
            0x9, 0xa, 0xb, 0xc, 0xd, 0x1c, 0x1d, 0x1e, 0x1f, 0x20, 0x85, 0xa0, 0x1680,
        ]
        .into_iter()
        .chain(0x2000..=0x200a)
        .chain([0x2028, 0x2029, 0x202f, 0x205f, 0x3000])
        .collect();
        assert_eq!(python, expected);
    }

    #[test]
    fn string_methods_split_and_strip_as_python_does() {
        let text = "\u{1c} a\u{1f}b  c \u{3000}";
        assert_eq!(python_strip(text, None, true, true), "a\u{1f}b  c");
        assert_eq!(
            python_strip(text, None, true, false),
            "a\u{1f}b  c \u{3000}"
        );
        assert_eq!(python_strip("xxaxx", Some("x"), false, true), "xxa");
        // "\x1c a\x1fb  c \u3000".split() == ['a', 'b', 'c']; .split(None, 1) == ['a', 'b  c \u3000']
        assert_eq!(python_split_whitespace(text, None), ["a", "b", "c"]);
        assert_eq!(
            python_split_whitespace(text, Some(1)),
            ["a", "b  c \u{3000}"]
        );
        assert!(python_split_whitespace(" \u{1d} ", None).is_empty());
        // "a\r\nb\x1cc\n".splitlines() == ['a', 'b', 'c'], keepends: ['a\r\n', 'b\x1c', 'c\n']
        assert_eq!(python_splitlines("a\r\nb\u{1c}c\n", false), ["a", "b", "c"]);
        assert_eq!(
            python_splitlines("a\r\nb\u{1c}c\n", true),
            ["a\r\n", "b\u{1c}", "c\n"]
        );
    }

    #[test]
    fn strftime_formats_utc_dates_as_python_does() {
        // datetime(2024, 7, 26, 13, 5, 9).strftime(...) in Python.
        let t = 1_721_999_109;
        assert_eq!(strftime_utc("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(
            strftime_utc("%A %B %e, %y %H:%M:%S %p %I %j %%", t),
            "Friday July 26, 24 13:05:09 PM 01 208 %"
        );
        assert_eq!(strftime_utc("%d %b %Y", 0), "01 Jan 1970");
        assert_eq!(strftime_utc("%Y-%m-%d %a", 951_782_400), "2000-02-29 Tue");
        assert_eq!(strftime_utc("%Q", 0), "%Q");
    }

    #[test]
    fn kwargs_parse_as_json_or_text_and_reserved_names_are_refused() {
        assert_eq!(
            parse_template_kwarg("enable_thinking=false").unwrap(),
            ("enable_thinking".into(), Value::Bool(false))
        );
        assert_eq!(
            parse_template_kwarg("date_string=26 Jul 2024").unwrap(),
            ("date_string".into(), Value::String("26 Jul 2024".into()))
        );
        assert_eq!(parse_template_kwarg("n=3").unwrap().1, serde_json::json!(3));
        assert!(parse_template_kwarg("no value").is_err());
        assert!(parse_template_kwarg("bad name=1").is_err());
        let template =
            JinjaTemplate::new("{{ x }}|{{ bos_token }}|{{ tools is none }}", "<s>", "</s>");
        let set = |name: &str| {
            template
                .clone()
                .with_kwargs([(name.to_string(), Value::from(1))])
        };
        assert!(set("messages").is_err() && set("tools").is_err());
        let template = set("x")
            .unwrap()
            .with_kwargs([("bos_token".into(), Value::from("B"))])
            .unwrap();
        assert_eq!(
            template.render(&[], false).unwrap(),
            "1|B|True",
            "Python prints True"
        );
    }
}

