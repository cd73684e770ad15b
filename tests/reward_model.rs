//! Reward models ([`RewardModel`]) against transformers on the tiny sequence classifiers of
//! tests/fixtures/reward_model (made by its make_reward_model.py): Llama and Mistral (one
//! label, a sliding window that binds) and Qwen2 (two labels, q/k/v biases), each sequence
//! alone, right-padded and left-padded batches, a sequence ending with pad ids; and what is
//! refused.
#![cfg(feature = "model")]

use std::path::{Path, PathBuf};

use refa_loss::model::{CausalLm, RewardModel};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

const VARIANTS: &[&str] = &["llama", "mistral", "qwen2"];

fn fixture(variant: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reward_model").join(variant)
}

/// The variant's config and weights, without expected.json.
fn folder(variant: &str, dir: &Path) -> PathBuf {
    let target = dir.join(variant);
    std::fs::create_dir_all(&target).unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture(variant).join(file), target.join(file)).unwrap();
    }
    target
}

fn expected(variant: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(variant).join("expected.json")).unwrap()).unwrap()
}

fn ids2(value: &Value) -> Vec<Vec<i64>> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row.as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect())
        .collect()
}

fn floats2(value: &Value) -> Vec<Vec<f64>> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect())
        .collect()
}

fn tensor2(rows: &[Vec<i64>]) -> Tensor {
    let flat: Vec<i64> = rows.iter().flatten().copied().collect();
    Tensor::from_slice(&flat).view([rows.len() as i64, -1])
}

fn worst(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f64::max)
}

#[test]
fn scores_equal_transformers_alone_and_in_padded_batches() {
    let dir = tempfile::tempdir().unwrap();
    for &variant in VARIANTS {
        let model = RewardModel::from_pretrained(folder(variant, dir.path()), Device::Cpu, Kind::Float)
            .unwrap_or_else(|e| panic!("{variant}: {e}"));
        let expected = expected(variant);
        assert_eq!(model.labels().len() as u64, expected["num_labels"].as_u64().unwrap());
        let sequences = ids2(&expected["sequences"]);
        let alone = floats2(&expected["alone"]);
        for max_rows in [64, 4, 1] {
            let scores = model.score_sequences(&sequences, max_rows).unwrap();
            let error = worst(&scores, &alone);
            assert!(error < 2e-5, "{variant}, rows of {max_rows}: {error:e}");
        }
        for layout in ["right_padded", "left_padded"] {
            let batch = &expected[layout];
            let ids = tensor2(&ids2(&batch["input_ids"]));
            let mask = tensor2(&ids2(&batch["attention_mask"]));
            let logits = model.forward(&ids, &mask).unwrap();
            let got = Vec::<Vec<f64>>::try_from(logits.to_kind(Kind::Double)).unwrap();
            let error = worst(&got, &floats2(&batch["logits"]));
            eprintln!("{variant} {layout}: worst difference {error:e}");
            assert!(error < 2e-5, "{variant} {layout}: {error:e}");
        }
    }
}

/// transformers pools at the rightmost token that is not the pad id, so a sequence ending
/// with pad ids scores as the sequence without them; and the scores do depend on the tokens.
#[test]
fn a_sequence_is_read_at_its_last_token_that_is_not_the_pad_id() {
    let dir = tempfile::tempdir().unwrap();
    let model = RewardModel::from_pretrained(folder("llama", dir.path()), Device::Cpu, Kind::Float).unwrap();
    let sequences = ids2(&expected("llama")["sequences"]);
    let ends_with_pads = &sequences[4];
    assert_eq!(&ends_with_pads[ends_with_pads.len() - 2..], &[0, 0]);
    let cut = ends_with_pads[..ends_with_pads.len() - 2].to_vec();
    let scores = model.score_sequences(&[ends_with_pads.clone(), cut], 8).unwrap();
    assert!((scores[0][0] - scores[1][0]).abs() < 1e-6, "{scores:?}");
    let all = model.score_sequences(&sequences, 8).unwrap();
    let spread = all.iter().map(|s| s[0]).fold(f64::NEG_INFINITY, f64::max)
        - all.iter().map(|s| s[0]).fold(f64::INFINITY, f64::min);
    assert!(spread > 0.5, "{all:?}");
}

#[test]
fn labels_come_from_id2label() {
    let dir = tempfile::tempdir().unwrap();
    let model = RewardModel::from_pretrained(folder("qwen2", dir.path()), Device::Cpu, Kind::Float).unwrap();
    assert_eq!(model.labels(), ["bad", "good"]);
    let model = RewardModel::from_pretrained(folder("llama", dir.path()), Device::Cpu, Kind::Float).unwrap();
    assert_eq!(model.labels(), ["LABEL_0"]);
}

#[test]
fn causal_lms_and_reward_models_are_not_mistaken_for_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let reward = folder("llama", dir.path());
    let message = CausalLm::from_pretrained(&reward, Device::Cpu, Kind::Float, None)
        .unwrap_err()
        .to_string();
    assert!(message.contains("score.weight"), "{message}");

    // A causal LM's folder: its architectures, and an lm_head.weight, are named.
    let causal = dir.path().join("causal");
    std::fs::create_dir_all(&causal).unwrap();
    let families = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/families/llama2");
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(families.join(file), causal.join(file)).unwrap();
    }
    let message = RewardModel::from_pretrained(&causal, Device::Cpu, Kind::Float).unwrap_err().to_string();
    assert!(message.contains("LlamaForCausalLM") && message.contains("LlamaForSequenceClassification"), "{message}");
    let edit = |folder: &Path, change: &dyn Fn(&mut Value)| {
        let path = folder.join("config.json");
        let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        change(&mut config);
        std::fs::write(&path, config.to_string()).unwrap();
    };
    edit(&causal, &|c| {
        c.as_object_mut().unwrap().remove("architectures");
    });
    let message = RewardModel::from_pretrained(&causal, Device::Cpu, Kind::Float).unwrap_err().to_string();
    assert!(message.contains("lm_head.weight") && message.contains("causal LM"), "{message}");

    // num_labels, which old files hold, must agree with id2label; the head's shape too.
    let reward = folder("mistral", &dir.path().join("labels"));
    edit(&reward, &|c| c["num_labels"] = 1.into());
    RewardModel::from_pretrained(&reward, Device::Cpu, Kind::Float).expect("num_labels 1 agrees");
    edit(&reward, &|c| c["num_labels"] = 3.into());
    let message = RewardModel::from_pretrained(&reward, Device::Cpu, Kind::Float).unwrap_err().to_string();
    assert!(message.contains("num_labels") && message.contains("id2label"), "{message}");
    edit(&reward, &|c| {
        c.as_object_mut().unwrap().remove("num_labels");
        c["id2label"] = serde_json::json!({"0": "a", "1": "b"});
    });
    let message = RewardModel::from_pretrained(&reward, Device::Cpu, Kind::Float).unwrap_err().to_string();
    assert!(message.contains("score.weight") && message.contains("[2, 32]"), "{message}");
    // A key that would change the model is still refused by name.
    edit(&reward, &|c| {
        c["id2label"] = serde_json::json!({"0": "LABEL_0"});
        c["attn_logit_softcapping"] = 30.0.into();
    });
    let message = RewardModel::from_pretrained(&reward, Device::Cpu, Kind::Float).unwrap_err().to_string();
    assert!(message.contains("attn_logit_softcapping"), "{message}");
}
