//! The library's command line (`refa_loss::cli`) as a downstream binary uses it: flags that
//! build the model, its tokenizer, the data and the training configuration; the response end
//! and padding they take from the checkpoint's tokenizer and chat template; `--help`.
#![cfg(feature = "trainer")]

use std::sync::atomic::AtomicBool;

mod common;

use clap::{CommandFactory, Parser};
use common::examples::example_path;
use common::models::hub_model_folder;
use refa_loss::cli::{DataArgs, ModelArgs, TrainArgs};
use refa_loss::model::ModelConfig;
use refa_loss::train::Trainer;
use refa_loss::LossConfig;
use serde_json::{json, Value};
use tch::{Device, Kind};

/// A training program built on the library's flags.
#[derive(Parser, Debug)]
#[command(about = "A downstream trainer")]
struct Args {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    loss: LossConfig,
    #[command(flatten)]
    train: TrainArgs,
}

fn parse(flags: &[&str]) -> Args {
    Args::try_parse_from(std::iter::once("train").chain(flags.iter().copied())).expect("flags")
}

/// Gemma 2's template closes an assistant turn with `<end_of_turn>` (516), not the model's
/// `<eos>` (513): the flags build a tokenizer, data and configuration in which responses
/// end with 516, the scorer and the EOS regularizer read 516, batches pad with the
/// tokenizer's `<pad>` (512), and the run trains.
#[test]
fn a_template_that_ends_turns_with_another_token_trains_with_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = hub_model_folder(
        dir.path(),
        "gemma-2",
        json!({"bos_token_id": 514, "eos_token_id": 513}),
    );
    let out = dir.path().join("run");
    let args = parse(&[
        "--model",
        model.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--max-steps",
        "2",
        "--save-every",
        "0",
        "--eos-lambda",
        "0.1",
    ]);
    let model = args
        .model
        .load_model(Device::Cpu, Kind::Float, None, 3)
        .expect("model");
    let tokenizer = args
        .model
        .load_tokenizer(model.config())
        .expect("tokenizer");
    assert_eq!(
        (model.config().eos_token_id, tokenizer.end_of_turn_id()),
        (513, 516)
    );
    let limits = args.data.token_limits(model.config()).expect("limits");
    let records = args.data.read().expect("sample data");
    let data = args
        .data
        .prepare(&records, &tokenizer, limits, 3)
        .expect("data");
    let responses: Vec<_> = data.train.iter().flat_map(|e| &e.responses).collect();
    let ended = responses.iter().filter(|r| r.ends_with(516)).count();
    assert!(ended > 0 && !responses.iter().any(|r| r.ends_with(513)));
    assert!(ended + data.tokens.truncated_responses >= responses.len());
    let config = args.train.config(&tokenizer, 1e-3).expect("config");
    assert_eq!((config.scoring.eos_id, config.pad_id), (516, 512));
    let loss = args.loss.build().expect("loss");
    let mut trainer = Trainer::new(model, loss, data.train, data.eval, config).expect("trainer");
    let summary = trainer.run(&AtomicBool::new(false), |_| {}).expect("run");
    assert_eq!(summary.history.len(), 2);
    assert!(summary
        .history
        .iter()
        .all(|m| m.loss.is_finite() && m.eos_probability > 0.0));
}

/// Batches pad with the tokenizer's pad token; where it names none, with the model
/// config's `pad_token_id`; without either, with the EOS.
#[test]
fn padding_comes_from_the_tokenizer_else_the_model_config() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pad_of = |case: &str, family: &str, fields: Value| {
        let folder = hub_model_folder(&dir.path().join(case), family, fields);
        let args = parse(&["--model", folder.to_str().unwrap()]);
        let config = ModelConfig::from_file(folder.join("config.json")).expect("config");
        let tokenizer = args.model.load_tokenizer(&config).expect("tokenizer");
        let train = args.train.config(&tokenizer, 1e-3).expect("config");
        assert_eq!(train.pad_id, tokenizer.pad_id());
        tokenizer.pad_id()
    };
    // Llama 3.1's tokenizer names no pad token.
    let llama = json!({"bos_token_id": 700, "eos_token_id": 701});
    assert_eq!(pad_of("none", "llama-3.1", llama.clone()), 701);
    let mut with_pad = llama;
    with_pad["pad_token_id"] = json!(704);
    assert_eq!(pad_of("config", "llama-3.1", with_pad), 704);
    // Qwen2.5's names `<|endoftext|>` (700), which wins over the config's.
    let qwen = json!({"eos_token_id": 702, "pad_token_id": 701});
    assert_eq!(pad_of("tokenizer", "qwen2.5", qwen), 700);
}

/// `--template-kwarg NAME=VALUE` reaches the checkpoint's template (Qwen3 without
/// thinking); the bundled tokenizer's built-in template reads none, and says so.
#[test]
fn template_kwargs_reach_the_checkpoint_template() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = hub_model_folder(dir.path(), "qwen3", json!({"eos_token_id": 702}));
    let args = parse(&[
        "--model",
        model.to_str().unwrap(),
        "--template-kwarg",
        "enable_thinking=false",
    ]);
    assert_eq!(
        args.model.tokenizer.template_kwargs,
        [("enable_thinking".to_string(), Value::Bool(false))]
    );
    let config = ModelConfig::from_file(model.join("config.json")).expect("config");
    let tokenizer = args.model.load_tokenizer(&config).expect("tokenizer");
    let prompt = tokenizer.encode_prompt("Hi").expect("prompt");
    let text = tokenizer.decode(&prompt).expect("decode");
    assert!(text.ends_with("<think>\n\n</think>\n\n"), "{text:?}");

    let bundled = parse(&["--template-kwarg", "enable_thinking=false"]);
    let tiny = ModelConfig::from_json(refa_loss::cli::TINY_CONFIG).expect("config");
    let err = bundled.model.load_tokenizer(&tiny).unwrap_err();
    assert!(
        err.to_string()
            .contains("need the checkpoint's own chat template"),
        "{err}"
    );
    let err = Args::try_parse_from(["train", "--template-kwarg", "enable_thinking"]).unwrap_err();
    assert!(err.to_string().contains("is not NAME=VALUE"), "{err}");
}

/// `--help` opens with the program's about, never with the API documentation of a struct
/// it flattens (LossConfig's was the examples' first paragraph), and says that --data may be
/// a JSON array; the examples that render chat templates take --template-kwarg.
#[test]
fn help_opens_with_the_programs_about() {
    let help = Args::command().render_long_help().to_string();
    assert!(help.starts_with("A downstream trainer\n"), "{help}");
    for api in ["Every field left `None`", "](Self::build)"] {
        assert!(!help.contains(api), "{api:?} in --help:\n{help}");
    }
    let examples = [
        ("train_mistral", "Fine-tune a Mistral checkpoint"),
        ("generate", "Generate answers with a checkpoint"),
        ("ursla_probe", "Mean per-token NLL"),
        ("on_policy", "On-policy rounds"),
    ];
    for (name, about) in examples {
        let binary = example_path(name);
        if !binary.exists() {
            eprintln!("skipped {name}: `cargo test --features trainer` builds the examples");
            continue;
        }
        let output = std::process::Command::new(binary)
            .arg("--help")
            .output()
            .expect("runs");
        let help = String::from_utf8_lossy(&output.stdout);
        assert!(help.starts_with(about), "{name} --help:\n{help}");
        assert!(help.contains("--template-kwarg <NAME=VALUE>"), "{name}");
        assert!(!help.contains("Every field left `None`"), "{name}");
    }
    assert!(
        help.contains("a JSONL file (or one JSON array of records)"),
        "{help}"
    );
}
