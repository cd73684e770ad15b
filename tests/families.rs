//! Every supported decoder family against transformers, on tiny random checkpoints that
//! transformers wrote (`tests/fixtures/families/make_fixtures.py`): f32 logits on 2 × 128
//! tokens, greedy generation token for token, both spellings of `config.json` (transformers
//! 5's `rope_parameters` and the Hub's `rope_theta`/`rope_scaling`), saving as a faithful
//! round trip, LoRA and recomputation; and the refusals.
#![cfg(feature = "model")]

use std::path::{Path, PathBuf};
use std::process::Command;

use refa_loss::model::{
    CausalLm, CheckpointReader, Family, ForwardOptions, GenerationOptions, LoraConfig,
    ModelConfig, SaveOptions,
};
use refa_loss::scoring::{score_logits, ChunkedScorer, ScoringConfig};
use refa_loss::RefaError;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

/// Every variant folder and the family it must load as.
const VARIANTS: &[(&str, Family)] = &[
    ("mistral", Family::Mistral),
    ("mistral_nemo", Family::Mistral),
    ("llama2", Family::Llama),
    ("llama3", Family::Llama),
    ("llama_linear", Family::Llama),
    ("llama_yarn", Family::Llama),
    ("llama_bias", Family::Llama),
    ("smollm2", Family::Llama),
    ("qwen2", Family::Qwen2),
    ("qwen2_sliding", Family::Qwen2),
    ("qwen3", Family::Qwen3),
    ("gemma", Family::Gemma),
    ("gemma2", Family::Gemma2),
    ("phi3", Family::Phi3),
    ("phi3_partial", Family::Phi3),
];

/// Variants whose settings transformers recomputes per forward call: refused by name.
const REFUSED_VARIANTS: &[(&str, &str)] = &[
    ("llama_dynamic", "dynamic"),
    ("phi3_longrope", "longrope"),
];

fn families_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/families")
}

/// A folder with the variant's weights and the chosen spelling of its config as
/// `config.json`.
fn variant_folder(variant: &str, spelling: &str, parent: &Path) -> PathBuf {
    let source = families_dir().join(variant);
    let folder = parent.join(format!("{variant}-{spelling}"));
    std::fs::create_dir_all(&folder).expect("folder");
    std::fs::copy(source.join(spelling), folder.join("config.json")).expect("config");
    std::fs::copy(
        source.join("model.safetensors"),
        folder.join("model.safetensors"),
    )
    .expect("weights");
    folder
}

/// `(input_ids [2, 128], logits [2, 128, V])` from transformers.
fn expected_logits(variant: &str) -> (Tensor, Tensor) {
    let path = families_dir().join(variant).join("expected.safetensors");
    let tensors = Tensor::read_safetensors(path).expect("expected.safetensors");
    let get = |name: &str| {
        tensors
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{name} in expected.safetensors"))
            .1
            .shallow_clone()
    };
    (get("input_ids"), get("logits"))
}

fn expected_json(variant: &str) -> Value {
    let text = std::fs::read_to_string(families_dir().join(variant).join("expected.json"))
        .expect("expected.json");
    serde_json::from_str(&text).expect("json")
}

fn ids_of(value: &Value) -> Vec<Vec<i64>> {
    value
        .as_array()
        .expect("list")
        .iter()
        .map(|row| {
            row.as_array()
                .expect("ids")
                .iter()
                .map(|v| v.as_i64().expect("id"))
                .collect()
        })
        .collect()
}

/// Logits of each row alone (no padding), `[2, T, V]`.
fn logits_of(model: &CausalLm, ids: &Tensor) -> Tensor {
    let rows: Vec<Tensor> = (0..ids.size()[0])
        .map(|row| {
            let ids = ids.narrow(0, row, 1);
            let hidden = model.forward(&ids, &ids.ones_like(), false).expect("forward");
            model.logits(&hidden)
        })
        .collect();
    Tensor::cat(&rows, 0)
}

/// `max |a − b| / max |b|`.
fn relative_error(actual: &Tensor, expected: &Tensor) -> f64 {
    let scale = expected.abs().max().double_value(&[]).max(1e-12);
    (actual - expected).abs().max().double_value(&[]) / scale
}

/// Checkpoints written in f32, so that reloading is exact.
fn f32_save() -> SaveOptions {
    SaveOptions {
        kind: Kind::Float,
        ..SaveOptions::default()
    }
}

fn load(folder: &Path) -> CausalLm {
    CausalLm::from_pretrained(folder, Device::Cpu, Kind::Float, None)
        .unwrap_or_else(|e| panic!("{}: {e}", folder.display()))
}

#[test]
fn every_family_matches_transformers_in_both_spellings() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut report = Vec::new();
    for &(variant, family) in VARIANTS {
        let (ids, expected) = expected_logits(variant);
        for spelling in ["config.json", "config.hub.json"] {
            let model = load(&variant_folder(variant, spelling, dir.path()));
            assert_eq!(model.config().family, family, "{variant} {spelling}");
            let error = relative_error(&logits_of(&model, &ids), &expected);
            report.push(format!("{variant} ({spelling}): {error:.2e}"));
            assert!(error <= 1e-4, "{variant} ({spelling}): relative error {error:e}");
        }
    }
    println!("{}", report.join("\n"));
}

#[test]
fn both_spellings_read_as_the_same_model() {
    for &(variant, _) in VARIANTS {
        let read = |spelling: &str| {
            ModelConfig::from_file(families_dir().join(variant).join(spelling))
                .unwrap_or_else(|e| panic!("{variant} {spelling}: {e}"))
        };
        let (new, hub) = (read("config.json"), read("config.hub.json"));
        let essentials = |c: &ModelConfig| {
            (
                c.family,
                c.rope.clone(),
                c.sliding_window,
                c.sliding_layers.clone(),
                c.switches,
                c.eos_token_ids.clone(),
                c.head_dim,
            )
        };
        assert_eq!(essentials(&new), essentials(&hub), "{variant}");
    }
}

#[test]
fn greedy_generation_equals_transformers_token_for_token() {
    for &(variant, _) in VARIANTS {
        let model = load(&variant_folder(variant, "config.json", tempfile::tempdir().expect("dir").path()));
        let expected = expected_json(variant);
        let prompts = ids_of(&expected["prompt_ids"]);
        let greedy = ids_of(&expected["greedy"]);
        let max_new_tokens = expected["max_new_tokens"].as_u64().expect("max_new_tokens") as usize;
        let options = GenerationOptions {
            max_new_tokens,
            ..GenerationOptions::default()
        };
        for (prompt, want) in prompts.iter().zip(&greedy) {
            let got = model.generate(prompt, &options).expect("generate");
            assert_eq!(&got, want, "{variant}: prompt {prompt:?}");
        }
    }
}

/// Rope scaling and the window really act: the same weights with them removed give other
/// logits (so the parity above could fail).
#[test]
fn rope_scaling_and_windows_change_the_logits() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (variant, edit) in [
        ("llama3", "rope_scaling"),
        ("llama_yarn", "rope_scaling"),
        ("llama_linear", "rope_scaling"),
        ("mistral", "sliding_window"),
        ("qwen2_sliding", "sliding_window"),
        ("gemma2", "sliding_window"),
    ] {
        let folder = variant_folder(variant, "config.hub.json", dir.path());
        let mut config: Value =
            serde_json::from_str(&std::fs::read_to_string(folder.join("config.json")).unwrap())
                .unwrap();
        config[edit] = Value::Null;
        std::fs::write(folder.join("config.json"), config.to_string()).unwrap();
        let model = load(&folder);
        let (ids, expected) = expected_logits(variant);
        let error = relative_error(&logits_of(&model, &ids), &expected);
        assert!(error > 1e-3, "{variant} without {edit}: {error:e}");
    }
}

#[test]
fn saving_is_a_faithful_round_trip() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut for_transformers: Vec<PathBuf> = Vec::new();
    for &(variant, _) in VARIANTS {
        for spelling in ["config.json", "config.hub.json"] {
            let model = load(&variant_folder(variant, spelling, dir.path()));
            let saved = dir.path().join(format!("{variant}-{spelling}-saved"));
            model
                .save_pretrained(&saved, f32_save())
                .expect("save");
            // Every key of the file read is written back with its value (the dtype aside).
            let read = |path: PathBuf| -> serde_json::Map<String, Value> {
                serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
            };
            let original = read(families_dir().join(variant).join(spelling));
            let written = read(saved.join("config.json"));
            for (key, value) in &original {
                if key == "dtype" || key == "torch_dtype" {
                    continue;
                }
                assert_eq!(written.get(key), Some(value), "{variant} {spelling}: `{key}`");
            }
            // The same tensor names and shapes as transformers wrote.
            let names = |folder: &Path| -> Vec<(String, Vec<i64>)> {
                let reader = CheckpointReader::open(folder).expect("reader");
                reader
                    .names()
                    .map(|n| (n.to_string(), reader.shape(n).unwrap()))
                    .collect()
            };
            assert_eq!(
                names(&saved),
                names(&families_dir().join(variant)),
                "{variant}: tensors"
            );
            let (ids, expected) = expected_logits(variant);
            let error = relative_error(&logits_of(&load(&saved), &ids), &expected);
            assert!(error <= 1e-4, "{variant} reloaded: {error:e}");
            if spelling == "config.json" {
                for_transformers.extend([saved, families_dir().join(variant)]);
            }
        }
    }
    if let Some(python) = fixture_python() {
        transformers_loads(&python, &for_transformers);
    }
}

/// `scripts/fixture-python` when it can run transformers here (it exits 77 when it cannot
/// be set up, e.g. offline); `None` then, and the transformers half of the round trip is
/// skipped with a note.
fn fixture_python() -> Option<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fixture-python");
    let status = Command::new(&script)
        .args(["-c", "import transformers"])
        .status()
        .ok()?;
    if status.success() {
        Some(script)
    } else {
        eprintln!("skipped: transformers loading saved folders (scripts/fixture-python: {status})");
        None
    }
}

/// transformers loads each saved folder (pairs of saved folder, variant folder) to the
/// variant's logits.
fn transformers_loads(python: &Path, pairs: &[PathBuf]) {
    let output = Command::new(python)
        .arg(families_dir().join("check_saved.py"))
        .args(pairs)
        .output()
        .expect("check_saved.py");
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "transformers on the saved folders: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn other_families_and_settings_are_refused_by_name() {
    let refused = families_dir().join("refused");
    for entry in std::fs::read_dir(&refused).expect("refused/") {
        let folder = entry.expect("entry").path();
        let text = std::fs::read_to_string(folder.join("config.json")).expect("config");
        let model_type = serde_json::from_str::<Value>(&text).unwrap()["model_type"]
            .as_str()
            .expect("model_type")
            .to_string();
        let error = ModelConfig::from_json(&text).expect_err("refused");
        let message = error.to_string();
        assert!(
            matches!(error, RefaError::Config { .. })
                && message.contains(&format!("\"{model_type}\""))
                && message.contains("llama"),
            "{model_type}: {message}"
        );
    }
    for (variant, rope_type) in REFUSED_VARIANTS {
        for spelling in ["config.json", "config.hub.json"] {
            let path = families_dir().join(variant).join(spelling);
            let message = ModelConfig::from_file(&path).expect_err(variant).to_string();
            assert!(
                message.contains(rope_type) && message.contains("rope_type"),
                "{variant} {spelling}: {message}"
            );
        }
    }
}

/// Each key that changes the math, set to a value the crate does not run, is refused with
/// its name; keys that never change it are accepted.
#[test]
fn config_keys_that_change_the_math_are_implemented_or_refused() {
    let base = std::fs::read_to_string(families_dir().join("llama3/config.hub.json")).unwrap();
    let with = |key: &str, value: Value| {
        let mut config: Value = serde_json::from_str(&base).unwrap();
        config[key] = value;
        ModelConfig::from_json(&config.to_string())
    };
    for (key, value, named) in [
        ("hidden_act", Value::from("relu2"), "hidden_act"),
        ("attention_dropout", Value::from(0.1), "attention_dropout"),
        ("sliding_window_pattern", Value::from(2), "sliding_window_pattern"),
        ("partial_rotary_factor", Value::from(1.5), "partial_rotary_factor"),
        ("quantization_config", serde_json::json!({"quant_method": "gptq"}), "quantization_config"),
        ("model_type", Value::from("falcon"), "falcon"),
        ("rope_scaling", serde_json::json!({"rope_type": "su", "factor": 2.0}), "su"),
        ("rope_scaling", serde_json::json!({"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
        ("rope_scaling", serde_json::json!({"rope_type": "linear", "factor": 2.0, "magic": 1}), "magic"),
        ("eos_token_id", serde_json::json!([2, "x"]), "eos_token_id"),
    ] {
        let message = with(key, value.clone())
            .expect_err(&format!("{key} = {value}"))
            .to_string();
        assert!(message.contains(named), "{key} = {value}: {message}");
    }
    for (key, value) in [
        ("pretraining_tp", Value::from(1)),
        ("use_cache", Value::from(false)),
        ("_name_or_path", Value::from("meta-llama/Llama-3.2-1B")),
        ("attention_dropout", Value::from(0.0)),
    ] {
        with(key, value.clone()).unwrap_or_else(|e| panic!("{key} = {value}: {e}"));
    }
    // A window of 0 would mask every key; it is refused for the families that slide.
    let mistral = std::fs::read_to_string(families_dir().join("mistral/config.json")).unwrap();
    for window in [0, -4] {
        let text = mistral.replace("\"sliding_window\": 48", &format!("\"sliding_window\": {window}"));
        let message = ModelConfig::from_json(&text).expect_err("window").to_string();
        assert!(message.contains("sliding_window"), "{message}");
    }
    // Llama 3 Instruct's list of end ids: every one ends generation.
    let config = ModelConfig::from_json(&base).expect("llama3");
    assert_eq!(config.eos_token_ids, vec![2, 3]);
    assert_eq!(config.eos_token_id, 2);
}

/// LoRA (with biases staying on their projections) and recomputation on every family:
/// recomputed gradients equal the plain ones, and a LoRA model saves to a checkpoint that
/// loads back to the same logits.
#[test]
fn lora_and_recomputation_work_for_every_family() {
    let dir = tempfile::tempdir().expect("temp dir");
    for &(variant, _) in VARIANTS {
        let folder = variant_folder(variant, "config.json", dir.path());
        let lora = LoraConfig {
            rank: 4,
            dropout: 0.0,
            ..LoraConfig::default()
        };
        let model = CausalLm::from_pretrained(&folder, Device::Cpu, Kind::Float, Some(&lora))
            .expect("lora model");
        let (ids, _) = expected_logits(variant);
        let ids = ids.narrow(0, 0, 1).narrow(1, 0, 40);
        let mask = ids.ones_like();
        // Move B off zero so that the adapters change the model.
        tch::no_grad(|| {
            for (name, mut t) in model.adapter_parameters() {
                if name.contains("lora_B") {
                    let _ = t.copy_(&(t.randn_like() * 0.05));
                }
            }
        });
        let gradients = |recompute: bool| -> Vec<Tensor> {
            for (_, t) in model.adapter_parameters() {
                if t.grad().defined() {
                    let _ = t.grad().zero_();
                }
            }
            let options = ForwardOptions {
                recompute,
                ..ForwardOptions::default()
            };
            let pass = model.forward_pass(&ids, &mask, &options).expect("forward");
            model.logits(&pass.hidden).square().mean(Kind::Float).backward();
            pass.finish_backward(&model).expect("finish");
            model
                .adapter_parameters()
                .iter()
                .map(|(_, t)| t.grad().copy())
                .collect()
        };
        let (plain, recomputed) = (gradients(false), gradients(true));
        for (a, b) in plain.iter().zip(&recomputed) {
            assert!(relative_error(b, a) < 1e-5, "{variant}: recomputed gradient");
        }
        let before = model.logits(&model.forward(&ids, &mask, false).unwrap());
        let saved = dir.path().join(format!("{variant}-merged"));
        model.save_pretrained(&saved, f32_save()).expect("save");
        let after = logits_of(&load(&saved), &ids);
        assert!(relative_error(&after, &before) < 1e-5, "{variant}: merged LoRA");
    }
}

/// The chunked scorer soft-caps the logits as Gemma 2's head does: its scores and
/// gradients equal those of the plain scorer on the model's (capped) logits.
#[test]
fn the_chunked_scorer_applies_the_final_soft_cap() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = load(&variant_folder("gemma2", "config.json", dir.path()));
    let (ids, _) = expected_logits("gemma2");
    let ids = ids.narrow(1, 0, 24);
    let mask = ids.ones_like();
    let labels = ids.copy();
    let _ = labels.narrow(1, 0, 10).fill_(-100);
    let scoring = model.scoring_config(ScoringConfig {
        chunk_size: 7,
        ..ScoringConfig::new(model.config().eos_token_id)
    });
    assert_eq!(scoring.logit_softcap, Some(3.0));
    let hidden = model.forward(&ids, &mask, false).unwrap().detach().set_requires_grad(true);
    // A frozen head: the scorer must not take the closed form that assumes linear logits.
    let head = model.lm_head_weight().detach();
    let mut scorer = ChunkedScorer::new(&hidden, &head, &labels, &scoring).unwrap();
    let chunked = scorer.forward();
    chunked.logp_sum.sum(Kind::Float).backward();
    scorer.backward(&chunked).unwrap();
    let chunked_grad = hidden.grad().copy();
    let hidden_plain = hidden.detach().set_requires_grad(true);
    let plain = score_logits(&model.logits(&hidden_plain), &labels, &scoring).unwrap();
    plain.logp_sum.sum(Kind::Float).backward();
    assert!(relative_error(&chunked.logp_sum, &plain.logp_sum) < 1e-5);
    assert!(relative_error(&chunked_grad, &hidden_plain.grad()) < 1e-5);
}

/// A few scored examples with ids inside the tiny vocabulary: `prompts` prompts of K = 3
/// responses, each ending with the EOS id.
#[cfg(feature = "trainer")]
fn synthetic_examples(prompts: usize, eos: i64, seed: u64) -> Vec<refa_loss::data::TokenizedExample> {
    use refa_loss::model::Encoded;
    let mut state = seed;
    let mut next = move |bound: i64| {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 33) % bound as u64) as i64
    };
    (0..prompts)
        .map(|_| {
            let prompt: Vec<i64> = (0..4 + next(6)).map(|_| 4 + next(120)).collect();
            let responses = (0..3)
                .map(|_| {
                    let mut response: Vec<i64> = (0..2 + next(8)).map(|_| 4 + next(120)).collect();
                    response.push(eos);
                    Encoded {
                        prompt: prompt.clone(),
                        response,
                    }
                })
                .collect();
            refa_loss::data::TokenizedExample {
                responses,
                rewards: vec![1.0, 0.0, -1.0],
            }
        })
        .collect()
}

/// The trainer runs on every family (plain and with shared prompts): the loss is finite and
/// falls over a few steps on fixed data, the saved checkpoint loads back; on Gemma 2 it
/// scores with the model's final soft cap even when the caller's scoring settings lack it.
#[cfg(feature = "trainer")]
#[test]
fn the_trainer_runs_on_every_family() {
    use refa_loss::train::{CosineSchedule, Recompute, TrainConfig, Trainer};
    use refa_loss::{EosRegularizer, PreferenceLoss, RefaDynamic};
    let dir = tempfile::tempdir().expect("temp dir");
    for &(variant, _) in VARIANTS {
        for share_prompts in [false, true] {
            let model = load(&variant_folder(variant, "config.json", dir.path()));
            let eos = model.config().eos_token_id;
            let output_dir = dir.path().join(format!("{variant}-{share_prompts}-run"));
            let config = TrainConfig {
                prompts_per_batch: 2,
                accumulation_steps: 1,
                max_steps: 4,
                schedule: CosineSchedule {
                    peak: 3e-3,
                    warmup: 0,
                    total: 4,
                    min_ratio: 1.0,
                },
                max_grad_norm: 1.0,
                weight_decay: 0.0,
                eval_every: 0,
                save_every: 0,
                keep_checkpoints: 1,
                output_dir,
                seed: 3,
                recompute: if share_prompts { Recompute::None } else { Recompute::All },
                scoring: ScoringConfig::new(eos),
                pad_id: eos,
                share_prompts,
                overwrite_output_dir: false,
            };
            let loss = RefaDynamic::default().with_regularizer(EosRegularizer::default());
            let train = synthetic_examples(2, eos, 11);
            let mut trainer =
                Trainer::new(model, Box::new(loss), train.clone(), train, config).expect("trainer");
            if variant == "gemma2" {
                assert_eq!(trainer.scoring().logit_softcap, Some(3.0), "gemma2 scoring");
            }
            let before = trainer.evaluate().expect("eval").loss;
            for _ in 0..4 {
                let step = trainer.train_step().expect("step");
                assert!(step.loss.is_finite(), "{variant}: loss {}", step.loss);
            }
            let after = trainer.evaluate().expect("eval").loss;
            assert!(after < before, "{variant} (shared {share_prompts}): {before} -> {after}");
            let saved = trainer.save_checkpoint().expect("save");
            load(&saved);
        }
    }
}
