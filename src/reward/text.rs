//! What the instruction checks count in a text: content, words, sentences, bullet points,
//! commas, and mentions of words and phrases. Unicode-aware throughout (Rust's
//! `char::is_alphanumeric`, `is_whitespace` and `to_lowercase`).

/// Characters that are commas: ASCII, fullwidth, small, halfwidth ideographic, ideographic
/// and Arabic.
const COMMAS: &[char] = &[',', '，', '﹐', '､', '、', '،'];

/// Characters that end a sentence when followed by whitespace or the end of the text.
const TERMINATORS: &[char] = &['.', '!', '?', '…', '。', '！', '？'];

/// Full-width terminators end a sentence whatever follows (CJK text puts no space after
/// them).
const WIDE_TERMINATORS: &[char] = &['。', '！', '？'];

/// Closing marks after a terminator belong to the sentence it ends (`She said "go!" Then…`).
const CLOSERS: &[char] = &['"', '\'', ')', ']', '»', '”', '’'];

/// Bullet markers: a line whose first non-blank character is one of these, followed by
/// whitespace and then content, is a bullet point.
const BULLETS: &[char] = &['*', '-', '•'];

/// Whether `text` holds any letter or digit (whitespace, punctuation, zero-width and
/// control characters alone are empty).
pub fn has_content(text: &str) -> bool {
    text.chars().any(char::is_alphanumeric)
}

/// Words: whitespace-separated pieces holding a letter or a digit (so `—` or a bullet marker
/// alone is not a word; `don't` and `well-known` are one word each).
pub fn word_count(text: &str) -> usize {
    text.split_whitespace().filter(|w| has_content(w)).count()
}

/// Sentences: pieces with content ended by a terminator (`.`, `!`, `?`, `…`, repeated or
/// followed by closing quotes and brackets) that is followed by whitespace or the end, by
/// `。`, `！` or `？` anywhere, or by a line break. A decimal point (`3.5`) ends nothing; abbreviations (`e.g.
/// this`) do, which only makes "at most N sentences" stricter.
pub fn sentence_count(text: &str) -> usize {
    let chars: Vec<char> = text.chars().collect();
    let (mut count, mut current) = (0, false);
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        current |= c.is_alphanumeric();
        let mut end = i + 1;
        if TERMINATORS.contains(&c) {
            while end < chars.len() && (TERMINATORS.contains(&chars[end]) || CLOSERS.contains(&chars[end])) {
                end += 1;
            }
        }
        let followed = chars.get(end).is_none_or(|n| n.is_whitespace()) || WIDE_TERMINATORS.contains(&c);
        let breaks = c == '\n' || (TERMINATORS.contains(&c) && followed);
        if breaks {
            count += usize::from(current);
            current = false;
        }
        i = if breaks { end } else { i + 1 };
    }
    count + usize::from(current)
}

/// Lines that are bullet points: `* item`, `- item` or `• item` (any indentation), the
/// marker followed by whitespace and then content. `**bold**`, `---` and `-5 °C` are not.
pub fn bullet_count(text: &str) -> usize {
    text.lines()
        .filter(|line| {
            let line = line.trim_start();
            let mut chars = line.chars();
            let marker = chars.next().is_some_and(|c| BULLETS.contains(&c));
            let rest = chars.as_str();
            marker && rest.starts_with(char::is_whitespace) && has_content(rest)
        })
        .count()
}

/// Whether `text` holds a comma of any script ([`COMMAS`]).
pub fn has_comma(text: &str) -> bool {
    text.contains(COMMAS)
}

/// Whether `text` reads the same lowercased (no uppercase or titlecase letter, in any
/// script).
pub fn is_lowercase(text: &str) -> bool {
    text.to_lowercase() == text
}

/// The lowercased words of `text`: maximal runs of letters and digits (so punctuation,
/// apostrophes and hyphens separate words: `sea's` → `sea`, `s`).
pub fn lower_words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// Whether the words of `phrase` occur in `words` one after the other (whole words,
/// lowercase). A one-word phrase also matches its plural (`+s`, `+es`).
pub fn mentions(words: &[String], phrase: &[String]) -> bool {
    match phrase {
        [] => false,
        [single] => words.iter().any(|w| {
            w == single
                || w.strip_suffix('s').is_some_and(|stem| stem == single)
                || w.strip_suffix("es").is_some_and(|stem| stem == single)
        }),
        _ => words.windows(phrase.len()).any(|window| window == phrase),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_needs_a_letter_or_a_digit() {
        for empty in ["", "   ", "\n\t", "\u{200b}\u{feff}", "...", "— * —", "\u{3000}"] {
            assert!(!has_content(empty), "{empty:?}");
        }
        for full in ["a", " 7 ", "é", "海", "ß!"] {
            assert!(has_content(full), "{full:?}");
        }
    }

    #[test]
    fn words_are_whitespace_pieces_with_content() {
        assert_eq!(word_count("The sea is wide."), 4);
        assert_eq!(word_count("  don't   well-known — fine  "), 3);
        assert_eq!(word_count("a\u{3000}b\u{a0}c"), 3); // ideographic and no-break spaces
        assert_eq!(word_count(" * - "), 0);
        assert_eq!(word_count(""), 0);
    }

    #[test]
    fn sentences_end_at_terminators_followed_by_space_or_at_line_breaks() {
        assert_eq!(sentence_count("The sea is wide. It is deep!"), 2);
        assert_eq!(sentence_count("Pi is 3.14 or so. Yes"), 2);
        assert_eq!(sentence_count("Wait... what?! She said \"go!\" (twice.) Then"), 5);
        assert_eq!(sentence_count("line one\nline two\n\n"), 2);
        assert_eq!(sentence_count("海は広い。海は深い。"), 2);
        assert_eq!(sentence_count("   "), 0);
        assert_eq!(sentence_count("..."), 0);
        assert_eq!(sentence_count("no terminator at all"), 1);
    }

    #[test]
    fn bullets_need_a_marker_a_space_and_content() {
        let text = "Intro:\n* one\n  - two\n• three\n*\n- \n**bold**\n---\n-5 degrees\n*\tfour";
        assert_eq!(bullet_count(text), 4);
        assert_eq!(bullet_count(""), 0);
    }

    #[test]
    fn commas_of_every_script_count() {
        assert!(has_comma("a, b"));
        assert!(has_comma("海，山"));
        assert!(has_comma("海、山"));
        assert!(has_comma("أ، ب"));
        assert!(!has_comma("a; b. c"));
    }

    #[test]
    fn lowercase_means_unchanged_by_lowercasing() {
        assert!(is_lowercase("the sea at 5 am."));
        assert!(is_lowercase("海"));
        assert!(!is_lowercase("The sea"));
        assert!(!is_lowercase("la mer À"));
        assert!(!is_lowercase("ǅ")); // titlecase
        assert!(!is_lowercase("ΣΑ"));
    }

    #[test]
    fn mentions_are_whole_words_plurals_and_phrases() {
        let words = lower_words("The Seas' waves, a seashore; VOLCANOES rise. Eiffel-Tower!");
        let phrase = |p: &str| lower_words(p);
        assert!(mentions(&words, &phrase("sea")));
        assert!(mentions(&words, &phrase("volcano")));
        assert!(mentions(&words, &phrase("eiffel tower")));
        assert!(!mentions(&words, &phrase("shore")));
        assert!(!mentions(&words, &phrase("tower eiffel")));
        assert!(!mentions(&words, &[]));
        assert!(!mentions(&lower_words("research"), &phrase("sea")));
    }
}
