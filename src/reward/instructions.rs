//! Verifiable instruction following, in the spirit of IFEval (Zhou et al. 2023): each prompt
//! carries a constraint a program can check, and an answer scores 1 only when it is
//! non-empty, on topic, and meets the constraint.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{RefaError, Result};
use crate::reward::text;
use crate::reward::{Prompt, Reward};

/// A constraint on an answer, as a prompt line spells it: `{"kind": "max_words", "n": 12}`.
/// What each counts is defined in words below; the counting rules are Unicode-aware (see
/// the unit tests for the edge cases).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Constraint {
    /// At most `n` words (whitespace-separated pieces holding a letter or digit).
    MaxWords {
        /// The most words, >= 1.
        n: usize,
    },
    /// At most `n` sentences (ended by `.`, `!`, `?`, `…`, `。` and the like before
    /// whitespace, or by a line break).
    MaxSentences {
        /// The most sentences, >= 1.
        n: usize,
    },
    /// No comma of any script (`,` `，` `、` `،` …).
    NoCommas,
    /// No uppercase or titlecase letter, in any script.
    Lowercase,
    /// The answer, less trailing and leading whitespace, ends with `phrase` (exactly, case
    /// included); the text before it must be on topic.
    EndsWith {
        /// The closing phrase, with a letter or digit.
        phrase: String,
    },
    /// Exactly `n` bullet points (lines starting with `* `, `- ` or `• ` and content).
    BulletPoints {
        /// The number of bullet points, >= 1.
        n: usize,
    },
    /// `keyword` occurs as whole words, in any case (a phrase: its words in order).
    ContainsKeyword {
        /// The required word or phrase, with a letter or digit.
        keyword: String,
    },
}

impl Constraint {
    /// Counts >= 1, phrases and keywords with a letter or digit.
    pub fn validate(&self) -> Result<()> {
        match self.problem() {
            Some(rule) => Err(RefaError::option("constraint", self.to_json(), rule)),
            None => Ok(()),
        }
    }

    /// What makes the constraint unusable, if anything.
    fn problem(&self) -> Option<String> {
        match self {
            Constraint::MaxWords { n } | Constraint::MaxSentences { n } | Constraint::BulletPoints { n } => {
                (*n == 0).then(|| "a count `n` >= 1".to_string())
            }
            Constraint::EndsWith { phrase: text } | Constraint::ContainsKeyword { keyword: text } => {
                (!text::has_content(text)).then(|| "a phrase or keyword with a letter or digit".to_string())
            }
            Constraint::NoCommas | Constraint::Lowercase => None,
        }
    }

    /// The JSON object a prompt line holds.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The instruction in words, to write into a prompt: `in at most 12 words`,
    /// `without any commas`, `ending with "Is there anything else?"`.
    pub fn describe(&self) -> String {
        match self {
            Constraint::MaxWords { n } => format!("in at most {n} words"),
            Constraint::MaxSentences { n } => format!("in at most {n} sentences"),
            Constraint::NoCommas => "without any commas".to_string(),
            Constraint::Lowercase => "in lowercase letters only, no capital letters".to_string(),
            Constraint::EndsWith { phrase } => format!("ending with the exact phrase \"{phrase}\""),
            Constraint::BulletPoints { n } => format!("as exactly {n} bullet points (lines starting with \"* \")"),
            Constraint::ContainsKeyword { keyword } => format!("using the word \"{keyword}\""),
        }
    }

    /// What the answer breaks, or `None` when it meets the constraint.
    pub fn violation(&self, answer: &str) -> Option<String> {
        let broken = |ok: bool, what: String| (!ok).then_some(what);
        match self {
            Constraint::MaxWords { n } => {
                let words = text::word_count(answer);
                broken(words <= *n, format!("{words} words, at most {n} allowed"))
            }
            Constraint::MaxSentences { n } => {
                let sentences = text::sentence_count(answer);
                broken(sentences <= *n, format!("{sentences} sentences, at most {n} allowed"))
            }
            Constraint::NoCommas => broken(!text::has_comma(answer), "holds a comma".to_string()),
            Constraint::Lowercase => broken(text::is_lowercase(answer), "holds a capital letter".to_string()),
            Constraint::EndsWith { phrase } => broken(
                answer.trim().ends_with(phrase.trim()),
                format!("does not end with {phrase:?}"),
            ),
            Constraint::BulletPoints { n } => {
                let bullets = text::bullet_count(answer);
                broken(bullets == *n, format!("{bullets} bullet points, exactly {n} wanted"))
            }
            Constraint::ContainsKeyword { keyword } => broken(
                text::mentions(&text::lower_words(answer), &text::lower_words(keyword)),
                format!("does not use {keyword:?}"),
            ),
        }
    }

    /// The part of the answer whose content and topic are judged: all of it, or for
    /// [`EndsWith`](Constraint::EndsWith) what comes before the phrase (a reply that is the
    /// phrase alone says nothing).
    fn body<'a>(&self, answer: &'a str) -> &'a str {
        match self {
            Constraint::EndsWith { phrase } => {
                let trimmed = answer.trim();
                trimmed.strip_suffix(phrase.trim()).unwrap_or(trimmed)
            }
            _ => answer,
        }
    }
}

/// How one answer fared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Non-empty, on topic, and the constraint holds: score 1.
    Satisfied,
    /// No letter or digit (nothing, whitespace, punctuation): score 0.
    Empty,
    /// Mentions neither the topic nor any of its declared words: score 0.
    OffTopic,
    /// The constraint fails, for the reason given: score 0.
    Violated(String),
}

impl Verdict {
    /// 1 for [`Satisfied`](Verdict::Satisfied), else 0.
    pub fn score(&self) -> f64 {
        f64::from(u8::from(*self == Verdict::Satisfied))
    }
}

/// Words of a topic that do not say what it is about.
const STOPWORDS: &[&str] = &[
    "a", "an", "the", "of", "and", "or", "in", "on", "at", "to", "for", "with", "by", "from",
    "about", "my", "your", "its", "his", "her", "their", "our", "this", "that", "these", "those",
];

/// A prompt's instruction: its constraint, and the words that put an answer on topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instruction {
    /// The constraint (`constraint` of the prompt line).
    pub constraint: Constraint,
    /// Each alternative that puts an answer on topic, as lowercase words: every content word
    /// of `topic` (`"the Eiffel Tower"` → `eiffel`, `tower`), and each phrase of
    /// `topic_words`. An answer must mention one of them (whole words; a single word also
    /// in its plural).
    pub topic: Vec<Vec<String>>,
}

impl Instruction {
    /// The instruction of a prompt line: `constraint` (a [`Constraint`] object) and a `topic`
    /// string and/or a `topic_words` list of strings.
    ///
    /// # Errors
    /// [`RefaError::InvalidSetting`] naming the field and the prompt: no or a malformed
    /// `constraint` (an unknown `kind`, a missing or extra field, a count below 1), neither
    /// `topic` nor `topic_words`, or ones without a content word.
    pub fn from_prompt(prompt: &Prompt) -> Result<Self> {
        let about = || format!("in the prompt {:?}", ellipsis(&prompt.prompt));
        let field = |name: &'static str, value: Option<&Value>, rule: String| {
            let shown = value.map_or("(absent)".to_string(), Value::to_string);
            RefaError::option(name, shown, format!("{rule} ({})", about()))
        };
        let raw = prompt.fields.get("constraint");
        let parsed = match raw {
            None | Some(Value::Null) => Err("missing".to_string()),
            Some(value) => serde_json::from_value::<Constraint>(value.clone()).map_err(|e| e.to_string()),
        };
        let constraint = parsed.map_err(|detail| {
            let rule = format!(
                "an object with `kind` one of max_words, max_sentences, no_commas, lowercase, \
                 ends_with, bullet_points, contains_keyword and its field (n, phrase or \
                 keyword); here: {detail}"
            );
            field("constraint", raw, rule)
        })?;
        if let Some(rule) = constraint.problem() {
            return Err(field("constraint", raw, rule));
        }
        let topic = topic_of(prompt).map_err(|rule| field("topic", prompt.fields.get("topic"), rule))?;
        Ok(Instruction { constraint, topic })
    }

    /// The verdict on `answer`: empty, then off topic, then the constraint, in that order.
    pub fn check(&self, answer: &str) -> Verdict {
        let body = self.constraint.body(answer);
        if !text::has_content(body) {
            return Verdict::Empty;
        }
        let words = text::lower_words(body);
        if !self.topic.iter().any(|phrase| text::mentions(&words, phrase)) {
            return Verdict::OffTopic;
        }
        match self.constraint.violation(answer) {
            Some(reason) => Verdict::Violated(reason),
            None => Verdict::Satisfied,
        }
    }
}

/// The on-topic alternatives of a prompt line, or why there are none.
fn topic_of(prompt: &Prompt) -> std::result::Result<Vec<Vec<String>>, String> {
    let mut alternatives = Vec::new();
    match prompt.fields.get("topic") {
        None | Some(Value::Null) => {}
        Some(Value::String(topic)) => alternatives.extend(
            text::lower_words(topic)
                .into_iter()
                .filter(|w| !STOPWORDS.contains(&w.as_str()))
                .map(|w| vec![w]),
        ),
        Some(_) => return Err("a string such as \"the sea\"".to_string()),
    }
    match prompt.fields.get("topic_words") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for item in items {
                let phrase = item.as_str().ok_or("`topic_words` must be a list of strings")?;
                alternatives.push(text::lower_words(phrase));
            }
        }
        Some(_) => return Err("`topic_words` must be a list of strings".to_string()),
    }
    alternatives.retain(|phrase| !phrase.is_empty());
    if alternatives.is_empty() {
        return Err("a `topic` string or a `topic_words` list naming a content word, so that an \
                    off-topic answer scores 0"
            .to_string());
    }
    Ok(alternatives)
}

/// The first 40 characters of a prompt, for messages.
fn ellipsis(text: &str) -> String {
    let mut short: String = text.chars().take(40).collect();
    if short.len() < text.len() {
        short.push('…');
    }
    short
}

/// [`Instruction`] checks as a [`Reward`]: each answer scores [`Verdict::score`], 1 or 0.
/// Every prompt must carry an instruction ([`Instruction::from_prompt`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InstructionReward;

impl Reward for InstructionReward {
    fn name(&self) -> String {
        "instruction checks".to_string()
    }

    fn score(&self, prompts: &[Prompt], responses: &[Vec<String>]) -> Result<Vec<Vec<f64>>> {
        prompts
            .iter()
            .zip(responses)
            .map(|(prompt, answers)| {
                let instruction = Instruction::from_prompt(prompt)?;
                Ok(answers.iter().map(|a| instruction.check(a).score()).collect())
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn instruction(constraint: Value) -> Instruction {
        let prompt = Prompt::new("Write about the sea.")
            .with("constraint", constraint)
            .with("topic", json!("the sea"));
        Instruction::from_prompt(&prompt).expect("instruction")
    }

    /// Every check refuses what carries no answer, whatever the constraint: nothing,
    /// whitespace of several scripts, zero-width characters, punctuation; and an answer
    /// about something else.
    #[test]
    fn empty_and_off_topic_answers_score_zero_under_every_constraint() {
        let constraints = [
            json!({"kind": "max_words", "n": 12}),
            json!({"kind": "max_sentences", "n": 2}),
            json!({"kind": "no_commas"}),
            json!({"kind": "lowercase"}),
            json!({"kind": "ends_with", "phrase": "Any questions?"}),
            json!({"kind": "bullet_points", "n": 2}),
            json!({"kind": "contains_keyword", "keyword": "blue"}),
        ];
        for constraint in constraints {
            let check = instruction(constraint.clone());
            for empty in ["", " ", "\n\t \u{3000}\u{a0}", "\u{200b}\u{200d}", "...!?", "* \n- "] {
                assert_eq!(check.check(empty), Verdict::Empty, "{constraint} on {empty:?}");
                assert_eq!(check.check(empty).score(), 0.0);
            }
            for off in ["mountains are tall", "I cannot help with that.", "research", "S E A"] {
                assert_eq!(check.check(off), Verdict::OffTopic, "{constraint} on {off:?}");
            }
        }
        // The closing phrase alone says nothing, even when it names the topic.
        let ends = instruction(json!({"kind": "ends_with", "phrase": "The sea."}));
        assert_eq!(ends.check("  The sea.  "), Verdict::Empty);
    }

    #[test]
    fn max_words() {
        let check = instruction(json!({"kind": "max_words", "n": 5}));
        assert_eq!(check.check("The sea is wide."), Verdict::Satisfied);
        assert_eq!(check.check("  the   sea — is  very deep  "), Verdict::Satisfied);
        assert!(matches!(check.check("The sea is wide and deep."), Verdict::Violated(r) if r == "6 words, at most 5 allowed"));
        assert_eq!(check.check("海 sea 海 海 海"), Verdict::Satisfied);
        assert!(matches!(check.check("sea\u{3000}a\u{a0}b c d e"), Verdict::Violated(_)));
    }

    #[test]
    fn max_sentences() {
        let check = instruction(json!({"kind": "max_sentences", "n": 2}));
        assert_eq!(check.check("The sea is 3.5 km deep here. It is cold!"), Verdict::Satisfied);
        assert!(matches!(check.check("The sea. Waves. Foam."), Verdict::Violated(_)));
        assert!(matches!(check.check("the sea\nwaves\nfoam"), Verdict::Violated(_)));
        assert!(matches!(check.check("海は広い。海は深い。sea。"), Verdict::Violated(_)));
        assert_eq!(check.check("The sea... so wide?!"), Verdict::Satisfied);
    }

    #[test]
    fn no_commas() {
        let check = instruction(json!({"kind": "no_commas"}));
        assert_eq!(check.check("The sea is wide and deep."), Verdict::Satisfied);
        for comma in ["The sea, wide.", "The sea，wide", "sea、wide", "sea ، wide"] {
            assert!(matches!(check.check(comma), Verdict::Violated(_)), "{comma:?}");
        }
    }

    #[test]
    fn lowercase() {
        let check = instruction(json!({"kind": "lowercase"}));
        assert_eq!(check.check("the sea is wide. 42 waves!"), Verdict::Satisfied);
        for capital in ["The sea", "the SEA", "the sea, Émile", "the sea ǅ", "the sea Σ"] {
            assert!(matches!(check.check(capital), Verdict::Violated(_)), "{capital:?}");
        }
        assert_eq!(check.check("the sea ß ﬁ é"), Verdict::Satisfied);
    }

    #[test]
    fn ends_with() {
        let check = instruction(json!({"kind": "ends_with", "phrase": "Any other questions?"}));
        assert_eq!(check.check("The sea is wide. Any other questions?"), Verdict::Satisfied);
        assert_eq!(check.check("The sea is wide. Any other questions?  \n"), Verdict::Satisfied);
        assert!(matches!(check.check("The sea is wide. any other questions?"), Verdict::Violated(_)));
        assert!(matches!(check.check("Any other questions? The sea is wide."), Verdict::Violated(_)));
        // The text before the phrase must be on topic.
        assert_eq!(check.check("Mountains. Any other questions?"), Verdict::OffTopic);
    }

    #[test]
    fn bullet_points() {
        let check = instruction(json!({"kind": "bullet_points", "n": 2}));
        assert_eq!(check.check("The sea:\n* is wide\n* is deep"), Verdict::Satisfied);
        assert_eq!(check.check("- the sea is wide\n  • it is deep\n"), Verdict::Satisfied);
        assert!(matches!(check.check("* the sea\n* wide\n* deep"), Verdict::Violated(r) if r.starts_with("3 bullet")));
        assert!(matches!(check.check("**the sea**\n---\n-5 degrees"), Verdict::Violated(r) if r.starts_with("0 bullet")));
        assert!(matches!(check.check("* the sea\n*\n- "), Verdict::Violated(r) if r.starts_with("1 bullet")));
    }

    #[test]
    fn contains_keyword() {
        let check = instruction(json!({"kind": "contains_keyword", "keyword": "Blue Whale"}));
        assert_eq!(check.check("The sea hides the blue whale."), Verdict::Satisfied);
        assert_eq!(check.check("In the sea: BLUE-WHALE!"), Verdict::Satisfied);
        assert!(matches!(check.check("The sea hides the whale, blue and vast."), Verdict::Violated(_)));
        let single = instruction(json!({"kind": "contains_keyword", "keyword": "wave"}));
        assert_eq!(single.check("The sea makes waves."), Verdict::Satisfied);
        assert!(matches!(single.check("The sea is a microwave."), Verdict::Violated(_)));
    }

    #[test]
    fn topics_are_content_words_or_declared_phrases() {
        let prompt = Prompt::new("Describe it.")
            .with("constraint", json!({"kind": "no_commas"}))
            .with("topic", json!("the Eiffel Tower"))
            .with("topic_words", json!(["Paris", "iron lattice"]));
        let check = Instruction::from_prompt(&prompt).unwrap();
        for on in ["A tall tower.", "It stands in Paris.", "An iron lattice rises.", "EIFFEL!", "Towers everywhere"] {
            assert_eq!(check.check(on), Verdict::Satisfied, "{on:?}");
        }
        for off in ["The lattice is iron.", "It is tall.", "the"] {
            assert_eq!(check.check(off), Verdict::OffTopic, "{off:?}");
        }
        let words_only = Prompt::new("x").with("constraint", json!({"kind": "lowercase"})).with("topic_words", json!(["海"]));
        assert_eq!(Instruction::from_prompt(&words_only).unwrap().check("海は広い"), Verdict::OffTopic);
        assert_eq!(Instruction::from_prompt(&words_only).unwrap().check("海 は広い"), Verdict::Satisfied);
    }

    #[test]
    fn malformed_instructions_are_named() {
        let with = |constraint: Value, topic: Value| {
            let prompt = Prompt::new("Describe the sea in at most twelve words please, thank you.")
                .with("constraint", constraint)
                .with("topic", topic);
            Instruction::from_prompt(&prompt).map(|_| ()).unwrap_err().to_string()
        };
        let sea = json!("the sea");
        for (constraint, culprit) in [
            (json!({"kind": "max_words"}), "missing field `n`"),
            (json!({"kind": "max_words", "n": -1}), "invalid value"),
            (json!({"kind": "max_words", "n": 0}), ">= 1"),
            (json!({"kind": "max_words", "n": 3, "m": 4}), "unknown field `m`"),
            (json!({"kind": "min_words", "n": 3}), "unknown variant `min_words`"),
            (json!({"n": 3}), "missing field `kind`"),
            (json!("max_words"), "constraint"),
            (json!({"kind": "ends_with", "phrase": "  ?! "}), "letter or digit"),
            (json!({"kind": "contains_keyword", "keyword": ""}), "letter or digit"),
        ] {
            let message = with(constraint.clone(), sea.clone());
            assert!(message.contains("`constraint`") && message.contains(culprit), "{constraint}: {message}");
            assert!(message.contains("Describe the sea in at most twelve words…"), "{message}");
        }
        let prompt = Prompt::new("Describe the sea.").with("topic", sea.clone());
        assert!(Instruction::from_prompt(&prompt).unwrap_err().to_string().contains("missing"));
        for topic in [json!(null), json!("the of a"), json!(7), json!("")] {
            let message = with(json!({"kind": "no_commas"}), topic.clone());
            assert!(message.contains("`topic`") && message.contains("off-topic") || message.contains("string"), "{topic}: {message}");
        }
        let words = Prompt::new("x").with("constraint", json!({"kind": "no_commas"})).with("topic_words", json!([1]));
        assert!(Instruction::from_prompt(&words).unwrap_err().to_string().contains("list of strings"));
    }

    #[test]
    fn constraints_read_and_write_their_json() {
        for text in [
            r#"{"kind":"max_words","n":12}"#,
            r#"{"kind":"no_commas"}"#,
            r#"{"kind":"ends_with","phrase":"Is there anything else?"}"#,
        ] {
            let constraint: Constraint = serde_json::from_str(text).unwrap();
            assert_eq!(constraint.to_json(), text);
            assert!(!constraint.describe().is_empty());
        }
        assert_eq!(Constraint::MaxWords { n: 12 }.describe(), "in at most 12 words");
    }

    #[test]
    fn the_reward_scores_each_answer_one_or_zero() {
        let prompts = [
            Prompt::new("a").with("constraint", json!({"kind": "max_words", "n": 3})).with("topic", json!("sea")),
            Prompt::new("b").with("constraint", json!({"kind": "no_commas"})).with("topic", json!("moon")),
        ];
        let answers = vec![
            vec!["the sea".to_string(), "the sea is very wide".to_string(), String::new()],
            vec!["the moon, pale".to_string(), "a pale moon".to_string()],
        ];
        let scores = InstructionReward.score(&prompts, &answers).unwrap();
        assert_eq!(scores, vec![vec![1.0, 0.0, 0.0], vec![0.0, 1.0]]);
    }
}
