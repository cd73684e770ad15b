//! The on-policy loop on the bundled tiny model, in seconds: sampling K answers, scoring them
//! with an external judge, training a round, evaluating held-out prompts, and resuming after
//! the last finished round (`examples/on_policy.rs` end to end), plus the library's pieces.
#![cfg(feature = "trainer")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use refa_loss::model::{
    CausalLm, ChatTemplate, ChatTokenizer, GenerationOptions, ModelConfig, SampleOptions,
};
use refa_loss::on_policy::{collect_round, evaluate_heldout, instruction_prompts, read_rounds};
use refa_loss::reward::{Prompt, Reward};
use tch::{Device, Kind};

fn repo_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(name)
}

fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile = exe.parent().and_then(Path::parent).expect("target/<profile>/deps");
    profile.join("examples").join(name)
}

/// Shorter answers score higher: a random model's sampled answers then differ in score.
struct Shorter;

impl Reward for Shorter {
    fn name(&self) -> String {
        "shorter is better".into()
    }

    fn score(&self, _: &[Prompt], responses: &[Vec<String>]) -> refa_loss::Result<Vec<Vec<f64>>> {
        Ok(responses
            .iter()
            .map(|answers| answers.iter().map(|a| -(a.len() as f64)).collect())
            .collect())
    }
}

fn tiny() -> (CausalLm, ChatTokenizer) {
    let text = std::fs::read_to_string(repo_file("examples/data/tiny-config.json")).expect("config");
    let model = CausalLm::new(ModelConfig::from_json(&text).expect("config"), Device::Cpu, Kind::Float, None)
        .expect("model");
    model.init_random(5);
    let tokenizer = ChatTokenizer::from_file(
        repo_file("examples/data/tokenizer.json"),
        ChatTemplate::MistralInstruct,
        1,
        2,
    )
    .expect("tokenizer");
    (model, tokenizer)
}

#[test]
fn a_round_keeps_the_emitted_tokens_and_drops_ties() {
    let (model, tokenizer) = tiny();
    let (train, heldout) = instruction_prompts(1, 2, 1).expect("prompts");
    let generation = GenerationOptions {
        max_new_tokens: 12,
        temperature: 1.0,
        seed: 3,
        stop_token_id: Some(tokenizer.end_of_turn_id()),
        ..GenerationOptions::default()
    };
    let options = SampleOptions::new(4, generation);
    let data = collect_round(&model, &tokenizer, &train, &Shorter, &options).expect("round");
    assert_eq!(data.records.len(), train.len());
    assert_eq!(data.examples.len() + data.ties, train.len());
    assert!(!data.examples.is_empty(), "a random model's answers differ in length");
    // The examples hold the sampled tokens themselves, answer for answer.
    let ids: Vec<Vec<i64>> = train
        .iter()
        .map(|p| tokenizer.encode_prompt(&p.prompt).expect("encode"))
        .collect();
    let samples = model.sample(&ids, &options).expect("sample");
    let example = &data.examples[0];
    let prompt = ids.iter().position(|p| *p == example.responses[0].prompt).expect("its prompt");
    for (encoded, completion) in example.responses.iter().zip(&samples.completions[prompt]) {
        assert_eq!(encoded.response, completion.tokens);
    }
    let held = evaluate_heldout(&model, &tokenizer, &heldout, &Shorter, 12).expect("evaluate");
    assert_eq!(held.answers.len(), heldout.len());
    assert!((0.0..=1.0).contains(&held.eos_probability) && held.mean_length <= 12.0);
}

fn on_policy(output: &Path, extra: &[&str]) -> Output {
    let judge = format!("python3 {}", repo_file("tests/fixtures/on_policy/length_judge.py").display());
    Command::new(example("on_policy"))
        .args(["--train-topics", "3", "--heldout-topics", "1", "--max-new-tokens", "10"])
        .args(["--lr", "1e-2", "--prompts-per-batch", "2", "--reward-command", &judge])
        .arg("--output-dir")
        .arg(output)
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("on_policy runs")
}

/// The example's whole loop with an external judge; then a second run continues after the
/// last finished round, and a third without --resume is refused.
#[test]
fn the_loop_runs_and_resumes_after_its_last_round() {
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("skipped: no python3 for the stand-in judge");
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("run");
    let first = on_policy(&out, &["--rounds", "1"]);
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(first.status.success(), "{stdout}{}", String::from_utf8_lossy(&first.stderr));
    let rounds = read_rounds(&out).expect("rounds");
    assert_eq!(rounds.len(), 2, "{stdout}");
    assert!(rounds[1].examples > 0 && rounds[1].train_loss.is_some(), "{rounds:?}");
    assert!(out.join("round-1/answers.jsonl").exists() && out.join("rounds.png").exists());
    let second = on_policy(&out, &["--rounds", "2", "--resume"]);
    assert!(second.status.success(), "{}", String::from_utf8_lossy(&second.stderr));
    let rounds = read_rounds(&out).expect("rounds");
    assert_eq!(rounds.iter().map(|r| r.round).collect::<Vec<_>>(), [0, 1, 2]);
    let third = on_policy(&out, &["--rounds", "3"]);
    assert_eq!(third.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&third.stderr).contains("--resume"));
}
