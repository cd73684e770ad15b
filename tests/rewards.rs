//! Rewards of on-policy training (`refa_loss::reward`): prompt files in, multi-response files
//! out (read back by the trainer's reader), checked scores, an external judge command (a
//! tiny Python script: its answers, and each way its output or its run can go wrong), and a
//! reward model behind the same trait.
#![cfg(feature = "model")]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use refa_loss::model::{ChatTemplate, ChatTokenizer, RewardModel};
use refa_loss::reward::{
    checked_scores, read_prompts, write_multi_response, CommandInput, CommandReward,
    InstructionReward, MultiResponseRecord, Prompt, Reward, RewardModelReward,
};
use refa_loss::{RefaError, Result};
use serde_json::json;
use tch::{Device, Kind};

fn prompts() -> Vec<Prompt> {
    vec![
        Prompt::new("Describe the sea in at most 5 words.")
            .with("constraint", json!({"kind": "max_words", "n": 5}))
            .with("topic", json!("the sea")),
        Prompt::new("Describe the moon without any commas.")
            .with("constraint", json!({"kind": "no_commas"}))
            .with("topic", json!("the moon")),
    ]
}

fn answers() -> Vec<Vec<String>> {
    let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    vec![
        owned(&["The sea is wide.", "The sea is wide, deep and old.", "  "]),
        owned(&["The moon, pale.", "A pale moon rises."]),
    ]
}

#[test]
fn prompt_files_keep_every_field_and_name_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prompts.jsonl");
    let text = "\u{feff}{\"prompt\": \"Describe the sea.\", \"constraint\": {\"kind\": \"no_commas\"}, \"topic\": \"the sea\"}\r\n\n  \n{\"prompt\": \"Hi\"}\n";
    std::fs::write(&path, text).unwrap();
    let read = read_prompts(&path).unwrap();
    assert_eq!(read.len(), 2);
    assert_eq!(read[0].prompt, "Describe the sea.");
    assert_eq!(read[0].fields["topic"], json!("the sea"));
    assert_eq!(read[0].fields["constraint"], json!({"kind": "no_commas"}));
    assert!(read[1].fields.is_empty());

    for (line, culprit) in [
        ("{\"prompt\": \"a\"", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ("{\"text\": \"a\"}", "no `prompt` field"),
        ("{\"prompt\": 7}", "`prompt` is 7, not a string"),
    ] {
        std::fs::write(&path, format!("{{\"prompt\": \"ok\"}}\n\n{line}\n")).unwrap();
        let error = read_prompts(&path).unwrap_err();
        let RefaError::Data { line: number, message, .. } = &error else { panic!("{error}") };
        assert_eq!(*number, 3, "{error}");
        assert!(message.contains(culprit), "{error}");
        assert!(error.to_string().contains("prompts.jsonl, line 3"), "{error}");
    }
    std::fs::write(&path, b"{\"prompt\": \"ok\"}\n{\"prompt\": \"\xff\"}\n").unwrap();
    assert!(read_prompts(&path).unwrap_err().to_string().contains("line 2: not UTF-8"));
    std::fs::write(&path, "\n \n").unwrap();
    assert!(read_prompts(&path).unwrap_err().to_string().contains("no prompt line"));
    let missing = read_prompts(dir.path().join("missing.jsonl")).unwrap_err();
    assert!(matches!(missing, RefaError::Io { .. }), "{missing}");
}

#[test]
fn scored_answers_are_written_atomically_in_the_layout_the_trainer_reads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("round-0/scored.jsonl");
    let (prompts, answers) = (prompts(), answers());
    let scores = checked_scores(&InstructionReward, &prompts, &answers).unwrap();
    assert_eq!(scores, vec![vec![1.0, 0.0, 0.0], vec![0.0, 1.0]]);
    let records = MultiResponseRecord::zip(&prompts, &answers, Some(&scores));
    write_multi_response(&path, &records).unwrap();
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["prompt"], json!("Describe the sea in at most 5 words."));
    assert_eq!(lines[0]["constraint"], json!({"kind": "max_words", "n": 5}));
    assert_eq!(lines[0]["all_generated_responses"][1], json!("The sea is wide, deep and old."));
    assert_eq!(lines[1]["all_rm_scores"], json!([0.0, 1.0]));
    let leftovers = std::fs::read_dir(path.parent().unwrap()).unwrap().count();
    assert_eq!(leftovers, 1, "no temporary file stays behind");
    #[cfg(feature = "trainer")]
    {
        use refa_loss::data::{read_jsonl, DataFormat, ScoreField};
        for format in [DataFormat::MultiResponse, DataFormat::Auto] {
            let report = read_jsonl(&path, format, ScoreField::Overall, false).unwrap();
            assert_eq!(report.records.len(), 2);
            assert_eq!(report.records[0].prompt, "Describe the sea in at most 5 words.");
            let got: Vec<(String, f64)> = report.records[1].responses.iter().map(|r| (r.text.clone(), r.score)).collect();
            assert_eq!(got, vec![("The moon, pale.".into(), 0.0), ("A pale moon rises.".into(), 1.0)]);
        }
    }
    // Unscored: no all_rm_scores. A NaN score, or a score too few, is refused before the
    // file is touched.
    let unscored = MultiResponseRecord::zip(&prompts, &answers, None);
    let draft = dir.path().join("draft.jsonl");
    write_multi_response(&draft, &unscored).unwrap();
    assert!(!std::fs::read_to_string(&draft).unwrap().contains("all_rm_scores"));
    let before = std::fs::read(&path).unwrap();
    let mut bad = records.clone();
    bad[1].scores = Some(vec![0.0, f64::NAN]);
    let message = write_multi_response(&path, &bad).unwrap_err().to_string();
    assert!(message.contains("all_rm_scores") && message.contains("record 1, answer 1"), "{message}");
    bad[1].scores = Some(vec![0.0]);
    let message = write_multi_response(&path, &bad).unwrap_err().to_string();
    assert!(message.contains("1 scores for 2 answers (record 1)"), "{message}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

/// A reward that answers whatever it is told to.
struct Fixed(Vec<Vec<f64>>);

impl Reward for Fixed {
    fn name(&self) -> String {
        "fixed".into()
    }
    fn score(&self, _: &[Prompt], _: &[Vec<String>]) -> Result<Vec<Vec<f64>>> {
        Ok(self.0.clone())
    }
}

#[test]
fn checked_scores_name_the_reward_and_the_answer() {
    let (prompts, answers) = (prompts(), answers());
    let good = vec![vec![1.0, 2.0, 3.0], vec![4.0, 5.0]];
    assert_eq!(checked_scores(&Fixed(good), &prompts, &answers).unwrap().len(), 2);
    for (scores, culprit) in [
        (vec![vec![1.0, 2.0, 3.0]], "1 lists for 2 prompts"),
        (vec![vec![1.0, 2.0], vec![4.0, 5.0]], "2 scores for the 3 answers of prompt 0"),
        (vec![vec![1.0, 2.0, 3.0], vec![4.0, f64::INFINITY]], "prompt 1, answer 1 (fixed)"),
    ] {
        let message = checked_scores(&Fixed(scores), &prompts, &answers).unwrap_err().to_string();
        assert!(message.contains(culprit), "{message}");
    }
    let message = checked_scores(&Fixed(vec![]), &prompts, &answers[..1]).unwrap_err().to_string();
    assert!(message.contains("one list per prompt"), "{message}");
}

/// A judge written as a user would: Python reading the JSONL on stdin (or from the file
/// named by its last argument), one line of scores out per line in.
const JUDGE: &str = r#"
import json, sys
source = open(sys.argv[1]) if len(sys.argv) > 1 else sys.stdin
for line in source:
    record = json.loads(line)
    n = record["constraint"].get("n", 1000)
    print(json.dumps({"scores": [float(len(r.split()) <= n) - 0.5 * ("," in r) for r in record["all_generated_responses"]]}))
"#;

fn python() -> Option<PathBuf> {
    ["python3", "python"].iter().find_map(|name| {
        let ok = std::process::Command::new(name).arg("-c").arg("pass").status().ok()?.success();
        ok.then(|| PathBuf::from(name))
    })
}

fn judge(dir: &Path, code: &str) -> Option<CommandReward> {
    let python = python()?;
    static SCRIPTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let number = SCRIPTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let script = dir.join(format!("judge-{number}.py"));
    std::fs::write(&script, code).unwrap();
    Some(CommandReward::new([python.display().to_string(), script.display().to_string()]).unwrap())
}

#[test]
fn an_external_judge_scores_through_stdin_or_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let Some(command) = judge(dir.path(), JUDGE) else {
        eprintln!("skipped: no python3");
        return;
    };
    let (prompts, answers) = (prompts(), answers());
    let want = vec![vec![1.0, -0.5, 1.0], vec![0.5, 1.0]];
    assert_eq!(checked_scores(&command, &prompts, &answers).unwrap(), want);
    let from_file = command.clone().with_input(CommandInput::FileArgument);
    assert_eq!(checked_scores(&from_file, &prompts, &answers).unwrap(), want);
    assert!(command.name().starts_with("command ") && command.name().ends_with(".py"));
    // CRLF line ends, a byte-order mark, integers and blank lines are fine.
    let windows = judge(dir.path(), "import sys\nsys.stdin.read()\nsys.stdout.write('\\ufeff{\"scores\": [1, 0, 2]}\\r\\n\\r\\n{\"scores\": [3, 4.5]}\\r\\n')\n").unwrap();
    assert_eq!(windows.score(&prompts, &answers).unwrap(), vec![vec![1.0, 0.0, 2.0], vec![3.0, 4.5]]);
    // A judge that reads nothing and writes its lines at once still works (the unread input
    // must not kill this process with SIGPIPE), even for a large input.
    let lazy = judge(dir.path(), "print('{\"scores\": [1, 2, 3]}')\nprint('{\"scores\": [4, 5]}')\n").unwrap();
    let mut big = answers.clone();
    big[0] = vec!["x".repeat(1 << 20), String::new(), String::new()];
    assert_eq!(lazy.score(&prompts, &big).unwrap(), vec![vec![1.0, 2.0, 3.0], vec![4.0, 5.0]]);
}

#[test]
fn a_judge_that_goes_wrong_is_named_with_its_line_and_what_was_wrong() {
    let dir = tempfile::tempdir().unwrap();
    if python().is_none() {
        eprintln!("skipped: no python3");
        return;
    }
    let (prompts, answers) = (prompts(), answers());
    let emit = |lines: &[&str]| {
        let code: String = lines.iter().map(|l| format!("print({l:?})\n")).collect();
        judge(dir.path(), &format!("import sys\nsys.stdin.read()\n{code}")).unwrap()
    };
    for (lines, line, culprit) in [
        (&["debug: starting", "{\"scores\": [1, 2, 3]}"][..], 1, "not JSON"),
        (&["{\"scores\": [1, 2, 3]}", "{\"scores\": [1, NaN]}"][..], 2, "NaN and Infinity"),
        (&["{\"scores\": [1, 2]}", "{\"scores\": [1, 2]}"][..], 1, "2 scores for 3 answers"),
        (&["{\"scores\": [1, 2, 3]}", "{\"score\": [1, 2]}"][..], 2, "expected {\"scores\": [...]}"),
        (&["{\"scores\": [1, 2, 3]}", "{\"scores\": [1, \"high\"]}"][..], 2, "score 1 is \"high\""),
        (&["{\"scores\": [1, 2, 3]}", "{\"scores\": [1, 1e999]}"][..], 2, "number out of range"),
        (&["{\"scores\": [1, 2, 3]}"][..], 2, "ended after 1 score lines; expected 2"),
        (&["{\"scores\": [1, 2, 3]}", "", "{\"scores\": [1, 2]}", "{\"scores\": []}"][..], 4, "one line more"),
    ] {
        let error = emit(lines).score(&prompts, &answers).unwrap_err();
        let RefaError::Data { path, line: number, message } = &error else { panic!("{error}") };
        assert!(path.starts_with("output of reward command `") && path.contains("judge-"), "{error}");
        assert_eq!(*number, line, "{lines:?}: {error}");
        assert!(message.contains(culprit), "{lines:?}: {error}");
    }
    let failing = judge(dir.path(), "import sys\nsys.stderr.write('Traceback: KeyError: topic\\n')\nsys.exit(3)\n").unwrap();
    let message = failing.score(&prompts, &answers).unwrap_err().to_string();
    assert!(message.contains("exit status: 3") && message.contains("KeyError: topic"), "{message}");
    let missing = CommandReward::new(["/nonexistent/judge", "--fast"]).unwrap();
    let message = missing.score(&prompts, &answers).unwrap_err().to_string();
    assert!(message.contains("`/nonexistent/judge --fast`") && message.contains("could not start"), "{message}");
    assert!(CommandReward::new(Vec::<String>::new()).is_err());
    assert!(CommandReward::new([" "]).is_err());
}

#[test]
fn a_judge_that_hangs_is_killed_at_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    // The judge starts a child of its own that would hold the output open too.
    let code = "import subprocess, time\nsubprocess.Popen(['sleep', '60'])\ntime.sleep(60)\n";
    let Some(hanging) = judge(dir.path(), code) else {
        return;
    };
    let hanging = hanging.with_timeout(Duration::from_millis(1500)).unwrap();
    let start = Instant::now();
    let message = hanging.score(&prompts(), &answers()).unwrap_err().to_string();
    let took = start.elapsed();
    assert!(message.contains("did not finish within 1.5 s and was killed"), "{message}");
    assert!(took < Duration::from_secs(20), "{took:?}");
    assert!(CommandReward::new(["true"]).unwrap().with_timeout(Duration::ZERO).is_err());
}

/// A word-level tokenizer of a dozen words (ids below the reward fixture's vocabulary of 96).
fn tiny_tokenizer() -> ChatTokenizer {
    let words = ["[UNK]", "<s>", "</s>", "the", "sea", "is", "wide", "moon", "pale", "a", "describe", "<|user|>", "<|assistant|>"];
    let vocab: serde_json::Map<String, serde_json::Value> =
        words.iter().enumerate().map(|(i, w)| (w.to_string(), json!(i + 3))).collect();
    let json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    ChatTokenizer::from_json(&json.to_string(), ChatTemplate::Zephyr, 1, 2).expect("tokenizer")
}

#[test]
fn a_reward_model_scores_the_templated_conversation() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reward_model/llama");
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(file), dir.path().join(file)).unwrap();
    }
    let load = || RewardModel::from_pretrained(dir.path(), Device::Cpu, Kind::Float).unwrap();
    let tokenizer = tiny_tokenizer();
    let (prompts, answers) = (prompts(), answers());
    let mut sequences = Vec::new();
    for (prompt, list) in prompts.iter().zip(&answers) {
        for answer in list {
            sequences.push(tokenizer.encode(&prompt.prompt, answer, 63, 64).unwrap().input_ids());
        }
    }
    let direct = load().score_sequences(&sequences, 3).unwrap();
    let reward = RewardModelReward::new(load(), tiny_tokenizer(), "llama-rm").unwrap();
    let reward = reward.with_limits(64, 2).unwrap();
    assert_eq!(reward.name(), "reward model llama-rm");
    let scores = checked_scores(&reward, &prompts, &answers).unwrap();
    let flat: Vec<f64> = scores.iter().flatten().copied().collect();
    assert_eq!(scores.iter().map(Vec::len).collect::<Vec<_>>(), [3, 2]);
    for (got, want) in flat.iter().zip(&direct) {
        assert!((got - want[0]).abs() < 1e-6, "{got} vs {}", want[0]);
    }
    assert!(flat.iter().any(|s| (s - flat[0]).abs() > 1e-3), "answers score differently: {flat:?}");
    let message = RewardModelReward::new(load(), tiny_tokenizer(), "x").unwrap().with_label(1).unwrap_err().to_string();
    assert!(message.contains("label") && message.contains("< 1"), "{message}");
}
