//! JSON records as data files hold them: one per line (JSONL), or all in one array (the layout
//! `json.dump(records, f)` writes, common on the Hub), parsed with messages that say what is
//! wrong and where; and the fields of a record read with their path in every message
//! (`` `responses[1].score` is the string "high", expected a number ``).

use serde_json::{Map, Value};

/// A record, or why it cannot be read.
pub(super) type Parsed<T> = std::result::Result<T, String>;

/// Stands in for a value JSON cannot hold, followed by what it was: Python's `NaN`,
/// `Infinity` and `-Infinity` (what `json.dumps` writes for `float('nan')` and
/// `float('inf')`), a literal beyond f64 such as `1e400`, a NaN or infinite float of a
/// parquet file, or binary data of one that is not UTF-8 text. The record still parses, so
/// the field that holds the value is named when it is read (and a field that is not read
/// does not matter). The NULs keep it apart from any text a dataset holds in practice.
const STAND_IN: &str = "\u{0}refa-loss: a value JSON cannot hold\u{0}";

/// The stand-in for a value JSON cannot hold, `description` saying what it was (`NaN, which
/// JSON does not allow …`, `a NaN float`, `12 bytes of binary data`).
pub(super) fn stand_in(description: &str) -> Value {
    Value::String(format!("{STAND_IN}{description}"))
}

/// What a stand-in made by [`stand_in`] stands for.
fn stood_in(text: &str) -> Option<&str> {
    text.strip_prefix(STAND_IN)
}

/// What the JSON literal `literal` (outside the JSON grammar, or beyond f64) is.
fn describe_literal(literal: &str) -> String {
    match literal {
        "NaN" => "NaN, which JSON does not allow (Python's json module writes it for \
                  float('nan'))"
            .to_string(),
        "Infinity" | "-Infinity" => format!(
            "{literal}, which JSON does not allow (Python's json module writes it for \
             float('inf'))"
        ),
        _ => format!("{literal}, beyond the range of a 64-bit float"),
    }
}

/// Where the text of a record sits in its file, for the messages of syntax errors.
#[derive(Debug, Clone, Copy)]
pub(super) enum Place {
    /// A JSONL line; `last` when it ends the file without a newline (a file cut short ends
    /// so).
    Line {
        /// The line ends the file, with no newline after it.
        last: bool,
    },
    /// A record of a JSON array that starts on this 1-based line of the file.
    Array(usize),
}

/// Parses the JSON text of one record. A syntax error names the column (a JSONL line) or the
/// line and the column of the file (a record of an array, which may span several).
pub(super) fn parse(text: &str, place: Place) -> Parsed<Value> {
    let error = match serde_json::from_str(text) {
        Ok(value) => return Ok(value),
        Err(error) => error,
    };
    if error.is_syntax() {
        if let Some(marked) = mark_non_finite(text) {
            if let Ok(value) = serde_json::from_str(&marked) {
                return Ok(value);
            }
        }
    }
    Err(syntax_message(&error, text, place))
}

/// serde's message for `error`, with the position in the file's terms and a hint where the
/// cause is a usual one.
fn syntax_message(error: &serde_json::Error, text: &str, place: Place) -> String {
    let full = error.to_string();
    let what = full
        .rfind(" at line ")
        .map_or(full.as_str(), |at| &full[..at]);
    let what = match what.strip_prefix("recursion limit exceeded") {
        Some(_) => "nested more than 128 levels deep",
        None => what,
    };
    let (line, column) = (error.line(), error.column());
    let mut message = match place {
        Place::Array(first) if line > 0 => {
            format!("{what} (line {}, column {column})", first + line - 1)
        }
        _ if column > 0 => format!("{what} at column {column}"),
        _ => what.to_string(),
    };
    let comma_after = || {
        let record = text.trim_end().strip_suffix(',')?;
        serde_json::from_str::<serde::de::IgnoredAny>(record).ok()
    };
    let hint = if text.contains('\0') {
        "the text holds NUL bytes: is the file UTF-16 or binary? Save it as UTF-8 text"
    } else if error.is_eof() && matches!(place, Place::Line { last: true }) {
        "the file ends inside this record: it was cut short (an interrupted download or \
         write?)"
    } else if error.is_eof() && matches!(place, Place::Line { .. }) {
        "the line ends inside a JSON value: the record is cut short, or spread over several \
         lines (a JSONL record must fit on one line; `jq -c` writes one per line)"
    } else if matches!(place, Place::Line { .. }) && comma_after().is_some() {
        "a comma follows the record: JSONL separates records by line breaks alone (drop the \
         commas, or make the file one JSON array `[…]`)"
    } else {
        return message;
    };
    message.push_str("; ");
    message.push_str(hint);
    message
}

/// `text` with each number JSON cannot hold outside strings (`NaN`, `Infinity`,
/// `-Infinity`, a literal beyond f64) replaced by its [`stand_in`], or `None`
/// where there is none.
fn mark_non_finite(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut marked = String::new();
    let (mut copied, mut at) = (0, 0);
    while at < bytes.len() {
        match bytes[at] {
            b'"' => {
                at += 1;
                while at < bytes.len() && bytes[at] != b'"' {
                    at += if bytes[at] == b'\\' { 2 } else { 1 };
                }
                at += 1;
            }
            b'N' | b'I' | b'-' | b'0'..=b'9' => {
                // Only ASCII bytes were matched, so `at` is a character boundary.
                let rest = &text[at..];
                let end = ["NaN", "Infinity", "-Infinity"]
                    .into_iter()
                    .find(|token| rest.starts_with(token))
                    .map(str::len)
                    .or_else(|| {
                        let len = rest
                            .bytes()
                            .take_while(|b| {
                                matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                            })
                            .count();
                        let number: f64 = rest[..len].parse().ok()?;
                        (!number.is_finite()).then_some(len)
                    });
                match end {
                    Some(len) => {
                        marked.push_str(&text[copied..at]);
                        marked.push_str(&stand_in(&describe_literal(&rest[..len])).to_string());
                        at += len;
                        copied = at;
                    }
                    None => at += 1,
                }
            }
            _ => at += 1,
        }
    }
    if copied == 0 {
        return None;
    }
    marked.push_str(&text[copied..]);
    Some(marked)
}

/// One record of a JSON array: the line it starts on and its text.
pub(super) struct Element<'a> {
    /// 1-based line of the file where the record starts.
    pub line: usize,
    /// Its JSON text.
    pub text: &'a str,
}

/// The records of `text`, a JSON array (its first character other than whitespace is `[`),
/// cut apart without parsing them, so that each is parsed, named by the line it starts on
/// and skipped on its own. A file whose array does not close, whose brackets do not pair up,
/// or which holds more than the array is an error `(line, why)`.
pub(super) fn array_elements(text: &str) -> std::result::Result<Vec<Element<'_>>, (usize, String)> {
    let bytes = text.as_bytes();
    let mut elements = Vec::new();
    let mut open: Vec<(u8, usize)> = Vec::new();
    let mut start: Option<(usize, usize)> = None;
    let mut line = 1;
    let mut at = 0;
    let mut closed = false;
    while at < bytes.len() {
        let byte = bytes[at];
        if byte == b'\n' {
            line += 1;
        }
        if closed {
            if !byte.is_ascii_whitespace() {
                return Err((
                    line,
                    "text follows the JSON array's closing `]`: a data file holds one JSON \
                     array of records, or one record per line (JSONL)"
                        .to_string(),
                ));
            }
            at += 1;
            continue;
        }
        let starts_record = open.len() == 1 && start.is_none();
        match byte {
            b'"' => {
                if starts_record {
                    start = Some((at, line));
                }
                let opened = line;
                at += 1;
                while at < bytes.len() && bytes[at] != b'"' {
                    if bytes[at] == b'\n' {
                        line += 1;
                    }
                    at += if bytes[at] == b'\\' { 2 } else { 1 };
                }
                if at >= bytes.len() {
                    return Err((
                        opened,
                        "a string that never closes: the file ends inside it (cut short?)"
                            .to_string(),
                    ));
                }
            }
            b'[' | b'{' => {
                if starts_record {
                    start = Some((at, line));
                }
                open.push((byte, line));
            }
            b']' | b'}' => {
                let expected = if byte == b']' { b'[' } else { b'{' };
                match open.pop() {
                    Some((opener, _)) if opener == expected => {}
                    Some((opener, opened)) => {
                        return Err((
                            line,
                            format!(
                                "`{}` closes the `{}` opened on line {opened}",
                                byte as char, opener as char
                            ),
                        ))
                    }
                    None => return Err((line, "a closing bracket with nothing open".to_string())),
                }
                if open.is_empty() {
                    match start.take() {
                        Some((from, first)) => elements.push(Element {
                            line: first,
                            text: text[from..at].trim_end(),
                        }),
                        None if !elements.is_empty() => {
                            return Err((
                                line,
                                "a comma before the array's closing `]`, with no record after it"
                                    .to_string(),
                            ))
                        }
                        None => {}
                    }
                    closed = true;
                }
            }
            b',' if open.len() == 1 => match start.take() {
                Some((from, first)) => elements.push(Element {
                    line: first,
                    text: text[from..at].trim_end(),
                }),
                None => return Err((line, "a comma with no record before it".to_string())),
            },
            byte if byte.is_ascii_whitespace() => {}
            _ => {
                if starts_record {
                    start = Some((at, line));
                }
            }
        }
        at += 1;
    }
    match open.first() {
        Some((_, opened)) if !closed => Err((
            *opened,
            format!(
                "the JSON array opened on line {opened} never closes: the file ends inside \
                 it (cut short?)"
            ),
        )),
        _ => Ok(elements),
    }
}

/// What a JSON value is, for messages: `the string "high"`, `the number 3`, `null`,
/// `a list of 2 items`, `an object`, `NaN`.
fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => match stood_in(s) {
            Some(literal) => literal.to_string(),
            None => {
                let excerpt: String = s.chars().take(40).collect();
                let more = if excerpt.len() < s.len() { "…" } else { "" };
                format!("the string {:?}{more}", excerpt)
            }
        },
        Value::Array(items) if items.len() == 1 => "a list of 1 item".to_string(),
        Value::Array(items) => format!("a list of {} items", items.len()),
        Value::Object(_) => "an object".to_string(),
    }
}

/// A value of a record and where it sits in it (`responses[1].score`), so that every
/// message names the field.
#[derive(Debug, Clone, Copy)]
pub(super) struct Node<'a> {
    value: &'a Value,
    parent: Option<(&'a Node<'a>, Step<'a>)>,
}

/// How a node is reached from its parent.
#[derive(Debug, Clone, Copy)]
enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

impl<'a> Node<'a> {
    /// The record itself.
    pub fn root(value: &'a Value) -> Self {
        Node {
            value,
            parent: None,
        }
    }

    /// The field's path: `prompt`, `responses[1].score`; `the record` for the record.
    pub fn path(&self) -> String {
        match self.parent {
            None => "the record".to_string(),
            Some((parent, step)) => {
                let mut path = match parent.parent {
                    None => String::new(),
                    Some(_) => parent.path(),
                };
                match step {
                    Step::Key(key) if path.is_empty() => path.push_str(key),
                    Step::Key(key) => {
                        path.push('.');
                        path.push_str(key);
                    }
                    Step::Index(index) => path.push_str(&format!("[{index}]")),
                }
                path
            }
        }
    }

    /// `the record is …` or `` `prompt` is … ``.
    fn wrong(&self, expected: &str) -> String {
        let name = match self.parent {
            None => "the record".to_string(),
            Some(_) => format!("`{}`", self.path()),
        };
        format!("{name} is {}, expected {expected}", describe(self.value))
    }

    /// The object this node holds.
    fn object(&self) -> Parsed<&'a Map<String, Value>> {
        self.value
            .as_object()
            .ok_or_else(|| self.wrong("a JSON object"))
    }

    /// Whether this node is an object with the field `key`.
    pub fn has(&self, key: &str) -> bool {
        self.value.get(key).is_some()
    }

    /// Refuses anything but an object, naming what the record is instead.
    pub fn require_object(&self) -> Parsed<()> {
        self.object().map(|_| ())
    }

    /// The field `key` of this object; a missing one is an error.
    pub fn get(&'a self, key: &'a str) -> Parsed<Node<'a>> {
        let map = self.object()?;
        let value = map.get(key).ok_or_else(|| {
            let child = Node {
                value: &Value::Null,
                parent: Some((self, Step::Key(key))),
            };
            format!("missing field `{}`", child.path())
        })?;
        Ok(Node {
            value,
            parent: Some((self, Step::Key(key))),
        })
    }

    /// The field `key` of this object, `None` where it is missing or null.
    pub fn optional(&'a self, key: &'a str) -> Parsed<Option<Node<'a>>> {
        let map = self.object()?;
        Ok(map.get(key).filter(|v| !v.is_null()).map(|value| Node {
            value,
            parent: Some((self, Step::Key(key))),
        }))
    }

    /// The raw value.
    pub fn value(&self) -> &'a Value {
        self.value
    }

    /// The items of this list.
    pub fn items(&'a self) -> Parsed<impl Iterator<Item = Node<'a>> + 'a> {
        let items = self.value.as_array().ok_or_else(|| self.wrong("a list"))?;
        Ok(items.iter().enumerate().map(move |(index, value)| Node {
            value,
            parent: Some((self, Step::Index(index))),
        }))
    }

    /// Whether this node holds a list.
    pub fn is_list(&self) -> bool {
        self.value.is_array()
    }

    /// The text this node holds.
    pub fn string(&self) -> Parsed<String> {
        match self.value {
            Value::String(s) if stood_in(s).is_none() => Ok(s.clone()),
            _ => Err(self.wrong("a string")),
        }
    }

    /// The text this node holds, or `None` where it holds something else.
    pub fn as_text(&self) -> Option<&'a str> {
        self.value.as_str().filter(|s| stood_in(s).is_none())
    }

    /// A score: a JSON number (or, with `strings`, a string that holds one, as UltraFeedback
    /// writes some), finite and within f32 (rewards are f32 tensors).
    pub fn score(&self, strings: bool) -> Parsed<f64> {
        const REQUIREMENT: &str = "a finite number (scores must be finite numbers)";
        let number = match self.value {
            Value::Number(n) => n.as_f64(),
            Value::String(s) if stood_in(s).is_some() => None,
            Value::String(s) if strings => match s.trim().parse::<f64>() {
                Ok(x) if x.is_finite() => Some(x),
                _ => None,
            },
            _ => None,
        };
        let number = number.ok_or_else(|| self.wrong(REQUIREMENT))?;
        finite_f32(number, &format!("`{}`", self.path()))
    }
}

/// `x` as messages show a score: `1e300` rather than its 301 digits.
fn show(x: f64) -> String {
    match x.abs() {
        a if a >= 1e16 || (a < 1e-5 && a > 0.0) => format!("{x:e}"),
        _ => x.to_string(),
    }
}

/// `score` where it is finite and a 32-bit float holds it (rewards are f32 tensors), else an
/// error naming `name`.
pub(super) fn finite_f32(score: f64, name: &str) -> Parsed<f64> {
    if !score.is_finite() {
        return Err(format!(
            "{name} is {}: scores must be finite numbers",
            show(score)
        ));
    }
    let single = score as f32;
    if !single.is_finite() {
        return Err(format!(
            "{name} is {}, beyond the ±3.4e38 of a 32-bit float (rewards are f32): \
             scores must be finite numbers within f32's range; rescale them",
            show(score)
        ));
    }
    if single == 0.0 && score != 0.0 {
        return Err(format!(
            "{name} is {}, which a 32-bit float rounds to 0 (rewards are f32), so it \
             would tie with a score of 0: rescale the scores",
            show(score)
        ));
    }
    Ok(score)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_literals_are_marked_outside_strings_only() {
        let text =
            r#"{"a": [1, NaN, -Infinity], "b": "NaN Infinity 1e999", "c": 1e400, "d": -2.5e-3}"#;
        let value = parse(text, Place::Line { last: false }).expect("parses with stand-ins");
        let seen = |v: &Value| describe(v);
        assert!(seen(&value["a"][1]).starts_with("NaN, which JSON does not allow"));
        assert!(seen(&value["a"][2]).starts_with("-Infinity, which JSON"));
        assert_eq!(value["b"], Value::String("NaN Infinity 1e999".into()));
        assert_eq!(
            seen(&value["c"]),
            "1e400, beyond the range of a 64-bit float"
        );
        assert_eq!(value["d"], serde_json::json!(-2.5e-3));
        assert!(mark_non_finite(r#"{"a": 1, "b": "x\"NaN"}"#).is_none());
        let err = Node::root(&value)
            .get("a")
            .expect("a")
            .items()
            .expect("list")
            .nth(1)
            .expect("NaN")
            .score(false)
            .unwrap_err();
        assert!(
            err.starts_with("`a[1]` is NaN, which JSON does not allow"),
            "{err}"
        );
        assert!(err.contains("scores must be finite numbers"), "{err}");
    }

    #[test]
    fn paths_name_nested_fields() {
        let value = serde_json::json!({"responses": [{"text": "a", "score": 1}, {"text": "b", "score": "high"}]});
        let root = Node::root(&value);
        let responses = root.get("responses").expect("responses");
        let items: Vec<Node> = responses.items().expect("list").collect();
        let err = items[1]
            .get("score")
            .and_then(|s| s.score(false))
            .unwrap_err();
        assert!(
            err.starts_with("`responses[1].score` is the string \"high\""),
            "{err}"
        );
        let err = items[1].get("weight").unwrap_err();
        assert_eq!(err, "missing field `responses[1].weight`");
        let err = Node::root(&serde_json::json!([1]))
            .get("prompt")
            .unwrap_err();
        assert!(err.starts_with("the record is a list of 1 item,"), "{err}");
    }

    #[test]
    fn arrays_are_cut_into_records_by_line() {
        let text = "[\n  {\"a\": \"x,]}\"},\n  {\"b\": [1, 2]}\n]\n";
        let elements = array_elements(text).expect("array");
        let cut: Vec<(usize, &str)> = elements.iter().map(|e| (e.line, e.text)).collect();
        assert_eq!(cut, [(2, "{\"a\": \"x,]}\"}"), (3, "{\"b\": [1, 2]}")]);
        assert!(array_elements("[]").expect("empty").is_empty());
        assert_eq!(array_elements("[\n{},\n]").err().map(|e| e.0), Some(3));
        assert_eq!(array_elements("[\n{},\n{").err().map(|e| e.0), Some(1));
        assert_eq!(array_elements("[{}]\n[{}]").err().map(|e| e.0), Some(2));
        assert_eq!(
            array_elements("[\n{\"a\": [1}\n]").err().map(|e| e.0),
            Some(2)
        );
    }
}
