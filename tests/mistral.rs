//! Mistral in tch against Hugging Face transformers (fixtures from
//! `tests/fixtures/make_mistral_fixtures.py`), checkpoint round trips, recomputation, LoRA,
//! and tokenization with chat templates.
#![cfg(feature = "model")]

use std::path::{Path, PathBuf};

use refa_loss::model::{
    CausalLm, ChatTemplate, ChatTokenizer, CheckpointReader, ForwardOptions, LoraConfig,
    LoraTarget, ModelConfig, Padding, SaveOptions,
};
use refa_loss::RefaError;
use tch::{Device, Kind, Tensor};

/// Tests that draw from libtorch's global generator (initialization, dropout) take this
/// lock: tests run on parallel threads and would otherwise interleave their draws.
static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn torch_rng() -> std::sync::MutexGuard<'static, ()> {
    TORCH_RNG
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// `(input_ids, attention_mask, logits)` written by transformers.
fn reference(folder: &Path) -> (Tensor, Tensor, Tensor) {
    let tensors =
        Tensor::read_safetensors(folder.join("reference.safetensors")).expect("reference");
    let get = |name: &str| {
        tensors
            .iter()
            .find(|(n, _)| n == name)
            .expect("tensor")
            .1
            .shallow_clone()
    };
    (get("input_ids"), get("attention_mask"), get("logits"))
}

/// Largest |difference| over the positions the mask marks as tokens.
fn max_error_on_tokens(a: &Tensor, b: &Tensor, mask: &Tensor) -> f64 {
    let keep = mask.ne(0).unsqueeze(-1).expand_as(a);
    (a - b).abs().masked_select(&keep).max().double_value(&[])
}

#[test]
fn logits_match_transformers_within_1e4() {
    let mut worst = 0.0f64;
    for name in ["tiny", "sliding", "sharded", "tied"] {
        let folder = fixture(&format!("mistral/{name}"));
        let model =
            CausalLm::from_pretrained(&folder, Device::Cpu, Kind::Float, None).expect("load");
        let (ids, mask, expected) = reference(&folder);
        let logits = model.logits(&model.forward(&ids, &mask, false).expect("forward"));
        let error = max_error_on_tokens(&logits, &expected, &mask);
        println!("{name}: max |logit error| = {error:e}");
        assert!(error < 1e-4, "{name}: {error}");
        worst = worst.max(error);
    }
    println!("max parity error over all fixtures: {worst:e}");
}

#[test]
fn sliding_window_changes_the_result_when_shorter_than_the_sequence() {
    // Guard that the window is really applied: without it the logits differ.
    let folder = fixture("mistral/sliding");
    let config = ModelConfig::from_file(folder.join("config.json")).expect("config");
    assert_eq!(config.sliding_window, Some(4));
    let unwindowed = config.with_sliding_window(None);
    let model = CausalLm::new(unwindowed, Device::Cpu, Kind::Float, None).expect("model");
    model
        .load_weights(&CheckpointReader::open(&folder).expect("reader"))
        .expect("weights");
    let (ids, mask, expected) = reference(&folder);
    let logits = model.logits(&model.forward(&ids, &mask, false).expect("forward"));
    assert!(max_error_on_tokens(&logits, &expected, &mask) > 1e-3);
}

#[test]
fn a_saved_checkpoint_loads_back_identically_single_and_sharded() {
    let model = CausalLm::from_pretrained(fixture("mistral/tiny"), Device::Cpu, Kind::Float, None)
        .expect("load");
    let (ids, mask, _) = reference(&fixture("mistral/tiny"));
    let before = model.forward(&ids, &mask, false).expect("forward");
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, shard_bytes) in [("single", 1u64 << 40), ("sharded", 20_000)] {
        let folder = dir.path().join(name);
        model
            .save_pretrained(
                &folder,
                SaveOptions {
                    kind: Kind::Float,
                    shard_bytes,
                },
            )
            .expect("save");
        assert_eq!(
            folder.join("model.safetensors.index.json").exists(),
            name == "sharded"
        );
        let reloaded =
            CausalLm::from_pretrained(&folder, Device::Cpu, Kind::Float, None).expect("reload");
        let after = reloaded.forward(&ids, &mask, false).expect("forward");
        assert_eq!(
            (&before - &after).abs().max().double_value(&[]),
            0.0,
            "{name}"
        );
    }
    // For the by-hand check that transformers loads what we write:
    // REFA_EXPORT_DIR=/tmp/x cargo test ... then tests/fixtures/check_transformers_loads.py /tmp/x
    if let Ok(export) = std::env::var("REFA_EXPORT_DIR") {
        let options = SaveOptions {
            kind: Kind::Float,
            shard_bytes: 20_000,
        };
        model
            .save_pretrained(Path::new(&export).join("sharded"), options)
            .expect("export");
        model
            .save_pretrained(Path::new(&export).join("bf16"), SaveOptions::default())
            .expect("export");
    }
    // Saving over an existing checkpoint replaces it and leaves no staging folder behind.
    let folder = dir.path().join("single");
    model
        .save_pretrained(
            &folder,
            SaveOptions {
                kind: Kind::BFloat16,
                ..Default::default()
            },
        )
        .expect("overwrite");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(leftovers.len(), 2, "{leftovers:?}");
    let text = std::fs::read_to_string(folder.join("config.json")).expect("config");
    assert!(text.contains("\"torch_dtype\": \"bfloat16\"") && text.contains("MistralForCausalLM"));
}

#[test]
fn config_reads_hugging_face_files_and_names_missing_fields() {
    let config = ModelConfig::from_file(fixture("mistral/tiny/config.json")).expect("config");
    assert_eq!(
        (config.hidden_size, config.kv_heads(), config.head_width()),
        (32, 2, 8)
    );
    assert_eq!(config.rope_base(), 10000.0);
    // An old-style file: no head_dim, top-level rope_theta, bookkeeping fields.
    let old = r#"{"model_type": "mistral", "vocab_size": 10, "hidden_size": 16, "intermediate_size": 8, "num_hidden_layers": 1,
                  "num_attention_heads": 2, "rope_theta": 500.0, "sliding_window": null, "_name_or_path": "x"}"#;
    let config = ModelConfig::from_json(old).expect("old config");
    // A key that might change the model is refused by name, never ignored.
    let unknown = old.replace("\"_name_or_path\": \"x\"", "\"whatever\": [1]");
    let message = ModelConfig::from_json(&unknown).unwrap_err().to_string();
    assert!(message.contains("`whatever`"), "{message}");
    assert_eq!(
        (config.head_width(), config.kv_heads(), config.rope_base()),
        (8, 2, 500.0)
    );
    let missing = r#"{"model_type": "mistral", "vocab_size": 10, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}"#;
    let err = ModelConfig::from_json(missing).unwrap_err();
    assert!(
        matches!(err, RefaError::Config { .. }) && err.to_string().contains("hidden_size"),
        "{err}"
    );
    let bad = old.replace(
        "\"num_attention_heads\": 2",
        "\"num_attention_heads\": 3, \"num_key_value_heads\": 2",
    );
    assert!(ModelConfig::from_json(&bad)
        .unwrap_err()
        .to_string()
        .contains("multiple"));
}

#[test]
fn missing_extra_and_misshaped_tensors_are_named() {
    let source = CausalLm::from_pretrained(fixture("mistral/tiny"), Device::Cpu, Kind::Float, None)
        .expect("load");
    let reader = CheckpointReader::open(fixture("mistral/tiny")).expect("reader");
    let all: Vec<(String, Tensor)> = reader
        .names()
        .map(|n| {
            (
                n.to_string(),
                reader.read(n, Device::Cpu, Kind::Float).expect("read"),
            )
        })
        .collect();
    let dir = tempfile::tempdir().expect("temp dir");
    let write = |name: &str, tensors: Vec<(String, Tensor)>| {
        let folder = dir.path().join(name);
        refa_loss::model::write_checkpoint(
            &folder,
            &tensors,
            &[],
            SaveOptions {
                kind: Kind::Float,
                ..Default::default()
            },
        )
        .expect("write");
        CheckpointReader::open(&folder).expect("reader")
    };
    let missing = write(
        "missing",
        all.iter()
            .filter(|(n, _)| n != "model.norm.weight")
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect(),
    );
    let err = source.load_weights(&missing).unwrap_err();
    assert!(
        matches!(&err, RefaError::Checkpoint { tensor, .. } if tensor == "model.norm.weight"),
        "{err}"
    );

    let mut extra_tensors: Vec<(String, Tensor)> = all
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    extra_tensors.push((
        "model.layers.9.mlp.up_proj.weight".into(),
        Tensor::zeros([2, 2], (Kind::Float, Device::Cpu)),
    ));
    let err = source
        .load_weights(&write("extra", extra_tensors))
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("model.layers.9.mlp.up_proj.weight"),
        "{err}"
    );

    let reshaped: Vec<(String, Tensor)> = all
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                if n == "lm_head.weight" {
                    t.narrow(0, 0, 10).contiguous()
                } else {
                    t.shallow_clone()
                },
            )
        })
        .collect();
    let err = source
        .load_weights(&write("reshaped", reshaped))
        .unwrap_err();
    assert!(
        err.to_string().contains("lm_head.weight") && err.to_string().contains("[10, 32]"),
        "{err}"
    );
}

fn random_model(kind: Kind, lora: Option<&LoraConfig>) -> CausalLm {
    let config = ModelConfig::from_file(fixture("mistral/sliding/config.json")).expect("config");
    let model = CausalLm::new(config, Device::Cpu, kind, lora).expect("model");
    model.init_random(5);
    model
}

fn batch() -> (Tensor, Tensor) {
    let (ids, mask, _) = reference(&fixture("mistral/tiny"));
    (ids, mask)
}

/// Gradients of `Σ hidden ⊙ probe` with respect to every trainable variable.
fn gradients(model: &CausalLm, recompute: bool, train: bool) -> Vec<(String, Tensor)> {
    let (ids, mask) = batch();
    for t in model.var_store().trainable_variables() {
        let mut g = t.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    let options = ForwardOptions {
        train,
        recompute,
        padding: Padding::Any,
    };
    let pass = model.forward_pass(&ids, &mask, &options).expect("forward");
    tch::manual_seed(99);
    let probe = pass.hidden.randn_like();
    (&pass.hidden * probe).sum(Kind::Double).backward();
    pass.finish_backward(model).expect("finish");
    let mut grads: Vec<(String, Tensor)> = model
        .var_store()
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .map(|(n, t)| {
            // The LM head is not on the path to the hidden states: no gradient.
            let g = t.grad();
            (
                n,
                if g.defined() {
                    g.copy()
                } else {
                    t.zeros_like()
                },
            )
        })
        .collect();
    grads.sort_by(|a, b| a.0.cmp(&b.0));
    grads
}

#[test]
fn recomputation_gives_the_plain_gradients() {
    let _rng = torch_rng();
    let model = random_model(Kind::Double, None);
    let (plain, recomputed) = (
        gradients(&model, false, false),
        gradients(&model, true, false),
    );
    assert_eq!(plain.len(), recomputed.len());
    for ((name, a), (_, b)) in plain.iter().zip(&recomputed) {
        let diff = (a - b).abs().max().double_value(&[]);
        assert!(diff < 1e-12, "{name}: {diff}");
    }
    // With LoRA dropout active, the recomputation replays the dropout masks of the plain
    // pass (both reseed every layer from the same starting seed).
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.3,
        targets: vec![LoraTarget::Q, LoraTarget::Down],
    };
    let model = random_model(Kind::Double, Some(&lora));
    perturb_adapters(&model);
    tch::manual_seed(1234);
    let plain = gradients(&model, false, true);
    tch::manual_seed(1234);
    let recomputed = gradients(&model, true, true);
    tch::manual_seed(4321);
    let other_masks = gradients(&model, true, true);
    let mut differs = false;
    for (((name, a), (_, b)), (_, c)) in plain.iter().zip(&recomputed).zip(&other_masks) {
        assert!((a - b).abs().max().double_value(&[]) < 1e-12, "{name}");
        differs |= (a - c).abs().max().double_value(&[]) > 1e-9;
    }
    assert!(
        differs,
        "dropout is active: other seeds give other gradients"
    );
}

/// Non-zero B, so that the adapters (and their dropout) affect the output.
fn perturb_adapters(model: &CausalLm) {
    tch::no_grad(|| {
        for (name, mut t) in model.var_store().variables() {
            if name.contains("lora_B") {
                t.copy_(&(t.randn_like() * 0.1));
            }
        }
    });
}

#[test]
fn lora_starts_equal_to_the_base_and_merges_exactly() {
    let _rng = torch_rng();
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: LoraTarget::ALL.to_vec(),
    };
    let folder = fixture("mistral/tiny");
    let base = CausalLm::from_pretrained(&folder, Device::Cpu, Kind::Float, None).expect("base");
    let adapted =
        CausalLm::from_pretrained(&folder, Device::Cpu, Kind::Float, Some(&lora)).expect("lora");
    let (ids, mask) = batch();
    let h0 = base.forward(&ids, &mask, false).expect("base forward");
    let h1 = adapted.forward(&ids, &mask, false).expect("lora forward");
    assert_eq!(
        (&h0 - &h1).abs().max().double_value(&[]),
        0.0,
        "B = 0: the adapter adds nothing"
    );

    // Only the adapters are trainable: 7 targets × 2 layers × (A, B).
    let trainable = adapted.var_store().trainable_variables();
    assert_eq!(trainable.len(), 28);
    // Give B non-zero values, then merge: the merged checkpoint equals the adapted model.
    perturb_adapters(&adapted);
    let adapted_hidden = adapted.forward(&ids, &mask, false).expect("forward");
    assert!((&adapted_hidden - &h0).abs().max().double_value(&[]) > 1e-3);
    let dir = tempfile::tempdir().expect("temp dir");
    adapted
        .save_pretrained(
            dir.path().join("merged"),
            SaveOptions {
                kind: Kind::Float,
                ..Default::default()
            },
        )
        .expect("save");
    let merged =
        CausalLm::from_pretrained(dir.path().join("merged"), Device::Cpu, Kind::Float, None)
            .expect("merged");
    let merged_hidden = merged.forward(&ids, &mask, false).expect("forward");
    let diff = (&merged_hidden - &adapted_hidden)
        .abs()
        .max()
        .double_value(&[]);
    assert!(diff < 1e-5, "merged vs adapters applied: {diff}");
}

#[test]
fn bf16_model_runs_close_to_f32() {
    let folder = fixture("mistral/tiny");
    let model =
        CausalLm::from_pretrained(&folder, Device::Cpu, Kind::BFloat16, None).expect("bf16 load");
    let (ids, mask, expected) = reference(&folder);
    let logits = model
        .logits(&model.forward(&ids, &mask, false).expect("forward"))
        .to_kind(Kind::Float);
    let error = max_error_on_tokens(&logits, &expected, &mask);
    assert!(error < 0.05, "bf16 logits error {error}");
}

#[test]
fn chat_templates_frame_prompts_and_mark_responses() {
    let path = fixture("tokenizer/tokenizer.json");
    let mistral =
        ChatTokenizer::from_file(&path, ChatTemplate::MistralInstruct, 1, 2).expect("tokenizer");
    let encoded = mistral
        .encode(
            "What is the capital of France?",
            "The capital of France is Paris.",
            64,
            128,
        )
        .expect("encode");
    assert_eq!(encoded.prompt[0], 1, "BOS first");
    assert!(encoded.ends_with(2), "EOS last");
    assert!(!encoded.prompt[1..].contains(&1) && !encoded.prompt.contains(&2));
    let labels = encoded.labels();
    assert!(labels[..encoded.prompt.len()].iter().all(|&l| l == -100));
    assert_eq!(&labels[encoded.prompt.len()..], encoded.response.as_slice());
    assert!(mistral
        .decode(&encoded.prompt)
        .expect("decode")
        .contains("[INST] What is the capital of France? [/INST]"));

    // Truncation cuts the response, which then has no EOS.
    let cut = mistral
        .encode(
            "What is the capital of France?",
            "The capital of France is Paris.",
            64,
            encoded.prompt.len() + 3,
        )
        .expect("encode");
    assert_eq!(cut.response.len(), 3);
    assert!(!cut.ends_with(2));

    // Zephyr writes `</s>` after the user turn: the tokenizer reads it as the EOS token.
    let zephyr = ChatTokenizer::from_file(&path, ChatTemplate::Zephyr, 1, 2).expect("tokenizer");
    let prompt = zephyr.encode_prompt("Name three colors.").expect("prompt");
    assert_eq!(prompt.iter().filter(|&&id| id == 2).count(), 1);
    assert!(zephyr
        .decode(&prompt)
        .expect("decode")
        .contains("<|assistant|>"));
}

/// Greedy decoding by full recomputation of the whole sequence at every step.
fn greedy_without_cache(model: &CausalLm, prompt: &[i64], steps: usize) -> Vec<i64> {
    let mut sequence = prompt.to_vec();
    let mut generated = Vec::new();
    for _ in 0..steps {
        let ids = Tensor::from_slice(&sequence).view([1, sequence.len() as i64]);
        let hidden = model
            .forward(&ids, &ids.ones_like(), false)
            .expect("forward");
        let next = model
            .logits(&hidden.narrow(1, sequence.len() as i64 - 1, 1))
            .view([-1])
            .argmax(0, false)
            .int64_value(&[]);
        generated.push(next);
        sequence.push(next);
        if next == model.config().eos_token_id {
            break;
        }
    }
    generated
}

#[test]
fn cached_generation_equals_full_recomputation() {
    use refa_loss::model::GenerationOptions;
    // The sliding fixture has a window of 4: the cache path must apply it too.
    for name in ["tiny", "sliding"] {
        let model = CausalLm::from_pretrained(
            fixture(&format!("mistral/{name}")),
            Device::Cpu,
            Kind::Float,
            None,
        )
        .expect("load");
        let prompt = [1i64, 17, 42, 5, 33, 8];
        let options = GenerationOptions {
            max_new_tokens: 12,
            ..GenerationOptions::default()
        };
        let cached = model.generate(&prompt, &options).expect("generate");
        assert_eq!(cached, greedy_without_cache(&model, &prompt, 12), "{name}");
        assert!(!cached.is_empty());
        // Sampling is reproducible, and a tiny nucleus is greedy.
        let sampled = GenerationOptions {
            temperature: 1.0,
            top_p: 1.0,
            seed: 3,
            ..options
        };
        assert_eq!(
            model.generate(&prompt, &sampled).expect("a"),
            model.generate(&prompt, &sampled).expect("b")
        );
        let nucleus = GenerationOptions {
            temperature: 1.0,
            top_p: 1e-6,
            ..options
        };
        assert_eq!(model.generate(&prompt, &nucleus).expect("nucleus"), cached);
    }
}

/// Right-padded batches: causal attention without a mask (and with shared grouped-query
/// heads) equals the explicitly masked path at every token position, in values and in the
/// gradients of every weight, with and without a sliding window shorter than the batch.
#[test]
fn right_padded_attention_without_a_mask_equals_the_masked_path() {
    let _rng = torch_rng();
    let base = ModelConfig::from_file(fixture("mistral/sliding/config.json")).expect("config");
    for window in [None, Some(3)] {
        let config = base.clone().with_sliding_window(window);
        let model = CausalLm::new(config, Device::Cpu, Kind::Float, None).expect("model");
        model.init_random(17);
        let lengths = [9i64, 4, 7, 1];
        let width = 9;
        let mut ids = vec![0i64; lengths.len() * width as usize];
        let mut mask = vec![0i64; ids.len()];
        for (row, &length) in lengths.iter().enumerate() {
            for t in 0..length as usize {
                ids[row * width as usize + t] = 3 + ((row * 7 + t * 5) % 20) as i64;
                mask[row * width as usize + t] = 1;
            }
        }
        let ids = Tensor::from_slice(&ids).view([lengths.len() as i64, width]);
        let mask = Tensor::from_slice(&mask).view([lengths.len() as i64, width]);
        tch::manual_seed(4);
        let probe = Tensor::randn(
            [lengths.len() as i64, width, model.config().hidden_size],
            (Kind::Float, Device::Cpu),
        ) * mask.unsqueeze(-1).to_kind(Kind::Float);
        let run = |padding: Padding| {
            let options = ForwardOptions {
                train: true,
                recompute: false,
                padding,
            };
            let pass = model.forward_pass(&ids, &mask, &options).expect("forward");
            let grads = probe_gradients(&model, &pass.hidden, &probe);
            let hidden = pass.hidden.detach() * mask.unsqueeze(-1).to_kind(Kind::Float);
            (hidden, grads)
        };
        let (masked, fast) = (run(Padding::Any), run(Padding::Right));
        assert!(masked.1.len() > 10);
        assert_same_pass(&format!("window {window:?}"), &masked, &fast, 1e-6);
    }
}

/// Prefix sharing: each prompt's layers run once for its K responses, and the hidden states
/// that score the responses, and every weight's gradient through them, equal those of the
/// plain pass over prompt + response (f32, 1e-5), with and without a binding sliding window,
/// for prompts of different lengths and an empty response slot.
#[test]
fn prefix_sharing_equals_the_plain_pass_in_values_and_gradients() {
    use refa_loss::model::SharedPrefixBatch;
    let _rng = torch_rng();
    let base = ModelConfig::from_file(fixture("mistral/sliding/config.json")).expect("config");
    let prompts: [&[i64]; 2] = [&[1, 7, 9, 4, 12], &[1, 5, 3]];
    let responses: [[&[i64]; 3]; 2] = [
        [&[8, 6, 2], &[10, 11, 13, 14, 2], &[15, 2]],
        [&[4, 4, 4, 2], &[], &[9, 2]],
    ];
    for window in [None, Some(4)] {
        let config = base.clone().with_sliding_window(window);
        let model = CausalLm::new(config, Device::Cpu, Kind::Float, None).expect("model");
        model.init_random(23);
        let k = 3usize;
        let prompt_width = prompts.iter().map(|p| p.len()).max().unwrap();
        let response_width = responses.iter().flatten().map(|r| r.len()).max().unwrap();
        let full_width = prompts
            .iter()
            .zip(&responses)
            .flat_map(|(p, rs)| rs.iter().map(move |r| p.len() + r.len()))
            .max()
            .unwrap();
        let rows = prompts.len() * k;
        let (mut p_ids, mut r_ids, mut r_mask) = (
            vec![2i64; prompts.len() * prompt_width],
            vec![2i64; rows * response_width],
            vec![0i64; rows * response_width],
        );
        let (mut f_ids, mut f_mask) =
            (vec![2i64; rows * full_width], vec![0i64; rows * full_width]);
        for (p, prompt) in prompts.iter().enumerate() {
            p_ids[p * prompt_width..p * prompt_width + prompt.len()].copy_from_slice(prompt);
            for (j, response) in responses[p].iter().enumerate() {
                let row = p * k + j;
                for (t, &id) in response.iter().enumerate() {
                    r_ids[row * response_width + t] = id;
                    r_mask[row * response_width + t] = 1;
                }
                for (t, &id) in prompt.iter().chain(response.iter()).enumerate() {
                    f_ids[row * full_width + t] = id;
                    f_mask[row * full_width + t] = 1;
                }
            }
        }
        let grid = |v: &[i64], w: usize, n: usize| Tensor::from_slice(v).view([n as i64, w as i64]);
        let batch = SharedPrefixBatch {
            prompt_ids: grid(&p_ids, prompt_width, prompts.len()),
            prompt_lengths: prompts.iter().map(|p| p.len() as i64).collect(),
            response_ids: grid(&r_ids, response_width, rows),
            response_mask: grid(&r_mask, response_width, rows),
        };
        // Which shared positions are read: the last prompt token and each response token but
        // the last (those predict the response's tokens).
        let hidden_size = model.config().hidden_size;
        let mut read = vec![0f32; rows * (1 + response_width)];
        let mut plain_index = vec![0i64; rows * (1 + response_width)];
        for (p, prompt) in prompts.iter().enumerate() {
            for (j, response) in responses[p].iter().enumerate() {
                let row = p * k + j;
                for t in 0..response.len() {
                    read[row * (1 + response_width) + t] = 1.0;
                    plain_index[row * (1 + response_width) + t] = (prompt.len() - 1 + t) as i64;
                }
            }
        }
        tch::manual_seed(6);
        let probe = Tensor::randn(
            [rows as i64, 1 + response_width as i64, hidden_size],
            (Kind::Float, Device::Cpu),
        ) * Tensor::from_slice(&read).view([rows as i64, 1 + response_width as i64, 1]);
        let gradients = |hidden: Tensor| {
            let grads = probe_gradients(&model, &hidden, &probe);
            ((hidden * &probe.ne(0.0)).detach(), grads)
        };
        let shared = gradients(model.forward_shared_prefix(&batch, false).expect("shared"));
        let plain = model
            .forward_pass(
                &grid(&f_ids, full_width, rows),
                &grid(&f_mask, full_width, rows),
                &ForwardOptions::default(),
            )
            .expect("plain")
            .hidden;
        let index = Tensor::from_slice(&plain_index)
            .view([rows as i64, 1 + response_width as i64, 1])
            .expand([rows as i64, 1 + response_width as i64, hidden_size], false);
        let plain = gradients(plain.gather(1, &index, false));
        assert_same_pass(&format!("window {window:?}"), &shared, &plain, 1e-5);
    }
}

/// The gradient of `Σ hidden · probe` with respect to every weight that takes part in it
/// (the LM head does not), by name; earlier gradients are zeroed first.
fn probe_gradients(model: &CausalLm, hidden: &Tensor, probe: &Tensor) -> Vec<(String, Tensor)> {
    for t in model.var_store().trainable_variables() {
        let mut g = t.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    (hidden * probe).sum(Kind::Float).backward();
    let mut grads: Vec<(String, Tensor)> = model
        .var_store()
        .variables()
        .into_iter()
        .filter(|(_, t)| t.grad().defined())
        .map(|(n, t)| (n, t.grad().copy()))
        .collect();
    grads.sort_by(|a, b| a.0.cmp(&b.0));
    grads
}

/// Two passes agree within `tolerance`: their hidden states absolutely, every weight's
/// gradient relative to its largest magnitude (at least 1).
fn assert_same_pass(
    what: &str,
    (a, a_grads): &(Tensor, Vec<(String, Tensor)>),
    (b, b_grads): &(Tensor, Vec<(String, Tensor)>),
    tolerance: f64,
) {
    let worst = (a - b).abs().max().double_value(&[]);
    assert!(
        worst < tolerance,
        "{what}: hidden states differ by {worst:e}"
    );
    assert_eq!(
        a_grads.len(),
        b_grads.len(),
        "{what}: weights with gradients"
    );
    for ((name, a), (_, b)) in a_grads.iter().zip(b_grads) {
        let scale = b.abs().max().double_value(&[]).max(1.0);
        let worst = (a - b).abs().max().double_value(&[]) / scale;
        assert!(
            worst < tolerance,
            "{what}, {name}: gradients differ by {worst:e}"
        );
    }
}

/// A checkpoint's own chat template, rendered with minijinja, gives transformers'
/// `apply_chat_template` ids token for token (tests/fixtures/chat_template, made by its
/// script): Mistral-7B-Instruct-v0.1's template and a multi-line Zephyr-style one, for
/// prompts and whole conversations (unicode, spaces, newlines, an empty answer).
#[test]
fn checkpoint_chat_templates_match_transformers_token_for_token() {
    use refa_loss::model::{ChatMessage, JinjaTemplate, TemplateChoice};
    let root = fixture("chat_template");
    let expected: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(root.join("expected.json")).expect("fixture"),
    )
    .expect("json");
    let tokenizer_json = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/tokenizer.json");
    let ids = |v: &serde_json::Value| -> Vec<i64> {
        v.as_array()
            .expect("ids")
            .iter()
            .map(|x| x.as_i64().expect("id"))
            .collect()
    };
    let (mut split, mut refused) = (0, 0);
    for case in &expected {
        let name = case["template"].as_str().expect("name");
        let tokenizer =
            ChatTokenizer::from_file(&tokenizer_json, ChatTemplate::MistralInstruct, 1, 2)
                .and_then(|t| t.with_checkpoint_template(&root.join(name), TemplateChoice::Auto))
                .expect("tokenizer");
        assert!(
            tokenizer.jinja().is_some(),
            "{name}: the checkpoint's template is used"
        );
        let (prompt, response) = (
            case["prompt"].as_str().unwrap(),
            case["response"].as_str().unwrap(),
        );
        assert_eq!(
            tokenizer.encode_prompt(prompt).expect("prompt"),
            ids(&case["prompt_ids"]),
            "{name}: {prompt:?}"
        );
        let full = ids(&case["full_ids"]);
        let result = tokenizer.encode(prompt, response, 4096, 8192);
        if !full.starts_with(&ids(&case["prompt_ids"])) {
            // transformers' own ids show the template re-tokenizes the prompt once an answer
            // follows: the split is refused, never made misaligned.
            let err = result.unwrap_err();
            assert!(
                err.to_string().contains("not a token prefix"),
                "{name}: {err}"
            );
            refused += 1;
            continue;
        }
        let encoded = result.expect("conversation");
        let last_eos = full.iter().rposition(|&id| id == 2).expect("an EOS");
        assert_eq!(
            encoded.input_ids(),
            full[..=last_eos].to_vec(),
            "{name}: {prompt:?} -> {response:?}"
        );
        assert!(encoded.ends_with(2));
        split += 1;
    }
    assert!(split >= 6, "{split} conversations split, {refused} refused");
    // The template's own errors and a misaligned split are refused with a message.
    let mistral = JinjaTemplate::from_checkpoint(&root.join("mistral"))
        .expect("read")
        .expect("template");
    let err = mistral
        .render(
            &[
                ChatMessage::new("system", "Be brief."),
                ChatMessage::new("user", "Hi"),
            ],
            false,
        )
        .unwrap_err();
    assert!(err.to_string().contains("roles must alternate"), "{err}");
    let shifting = JinjaTemplate {
        source: "{{ bos_token }}{% if messages|length > 1 %}[CHAT] {% endif %}{% for m in messages %}{{ m.content }}{% endfor %}{{ eos_token }}".into(),
        ..mistral.clone()
    };
    let tokenizer = ChatTokenizer::from_file(&tokenizer_json, ChatTemplate::MistralInstruct, 1, 2)
        .expect("tokenizer")
        .with_jinja(shifting);
    let err = tokenizer.encode("Question", "Answer", 64, 128).unwrap_err();
    assert!(err.to_string().contains("not a token prefix"), "{err}");
    // No template in a folder: the built-in one stays.
    let plain = ChatTokenizer::from_file(&tokenizer_json, ChatTemplate::MistralInstruct, 1, 2)
        .and_then(|t| t.with_checkpoint_template(&root, TemplateChoice::Auto))
        .expect("tokenizer");
    assert!(plain.jinja().is_none());
}

/// The built-in Mistral-instruct template against Mistral's own tokenization: for a dozen
/// conversations (unicode, leading and trailing spaces, newlines, tabs, code, brackets), the
/// prompt ids and prompt + response ids equal those of mistral-common's `encode_instruct`
/// with Mistral-7B v0.1's vocabulary (tests/fixtures/mistral_common, made by its script).
/// mistral-common refuses an empty answer; ours is the EOS alone.
#[test]
fn mistral_instruct_matches_mistral_common_token_for_token() {
    let root = fixture("mistral_common");
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("expected.json")).expect("fixture"),
    )
    .expect("json");
    let tokenizer = ChatTokenizer::from_file(
        root.join("tokenizer.json"),
        ChatTemplate::MistralInstruct,
        1,
        2,
    )
    .expect("tokenizer");
    let ids = |v: &serde_json::Value| -> Vec<i64> {
        v.as_array()
            .expect("ids")
            .iter()
            .map(|x| x.as_i64().expect("id"))
            .collect()
    };
    let mut compared = 0;
    for case in expected["cases"].as_array().expect("cases") {
        let (prompt, response) = (
            case["prompt"].as_str().unwrap(),
            case["response"].as_str().unwrap(),
        );
        let prompt_ids = ids(&case["prompt_ids"]);
        assert_eq!(
            tokenizer.encode_prompt(prompt).expect("prompt"),
            prompt_ids,
            "prompt {prompt:?}"
        );
        let encoded = tokenizer
            .encode(prompt, response, 100_000, 200_000)
            .expect("encode");
        if case["full_ids"].is_null() {
            assert_eq!(
                encoded.response,
                vec![2],
                "an empty answer is the EOS alone"
            );
            continue;
        }
        assert_eq!(
            encoded.input_ids(),
            ids(&case["full_ids"]),
            "{prompt:?} -> {response:?}"
        );
        compared += 1;
    }
    assert_eq!(compared, 11);
}
