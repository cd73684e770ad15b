//! Batched sampling through the key/value cache ([`CausalLm::sample`]) on the tiny
//! transformers checkpoints of tests/fixtures/families: batched greedy answers equal each
//! prompt decoded alone (which tests/families.rs holds equal to transformers), seeded answers
//! do not depend on what else is in the batch, the sampler draws from the right
//! distribution; and generation's bounds: NaN weights, prompts longer than the context,
//! answers the context cuts, numerically greedy temperatures, bad ids.
#![cfg(feature = "model")]

use std::path::{Path, PathBuf};

use refa_loss::model::{
    CausalLm, GenerationOptions, SampleOptions, Samples, StopReason,
};
use refa_loss::RefaError;
use tch::{Device, Kind, Tensor};

/// Families with their particularities: sliding windows (Mistral 48 on every layer, Qwen2
/// and Gemma 2 32 on some), Llama 3's rope scaling and two EOS ids, Qwen3's q/k norms,
/// Gemma's scaled embeddings and soft-capping, Phi-3's fused projections.
const VARIANTS: &[&str] = &[
    "mistral",
    "llama3",
    "qwen2_sliding",
    "qwen3",
    "gemma",
    "gemma2",
    "phi3",
];

fn families_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/families")
}

/// The variant's checkpoint (config.json and weights, without the expected outputs beside
/// them) loaded in f32 on the CPU.
fn load(variant: &str) -> CausalLm {
    let dir = tempfile::tempdir().expect("temp dir");
    let source = families_dir().join(variant);
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(source.join(file), dir.path().join(file)).expect("copy fixture");
    }
    CausalLm::from_pretrained(dir.path(), Device::Cpu, Kind::Float, None).expect("load")
}

/// Prompts of 3 to 70 tokens (longer than the sliding windows) cut from the fixture's
/// seeded input ids, and the fixture's own two prompts.
fn prompts(variant: &str) -> Vec<Vec<i64>> {
    let path = families_dir().join(variant).join("expected.safetensors");
    let tensors = Tensor::read_safetensors(path).expect("expected.safetensors");
    let ids = &tensors.iter().find(|(n, _)| n == "input_ids").expect("input_ids").1;
    let row = |r: i64, start: i64, len: i64| -> Vec<i64> {
        Vec::try_from(ids.get(r).narrow(0, start, len)).expect("ids")
    };
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(families_dir().join(variant).join("expected.json")).unwrap(),
    )
    .unwrap();
    let mut prompts = vec![row(0, 0, 3), row(1, 10, 70), row(0, 20, 17), row(1, 0, 9), row(0, 50, 40)];
    for p in expected["prompt_ids"].as_array().unwrap() {
        prompts.push(p.as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect());
    }
    prompts
}

fn greedy(max_new_tokens: usize) -> GenerationOptions {
    GenerationOptions {
        max_new_tokens,
        ..GenerationOptions::default()
    }
}

fn tokens(samples: &Samples) -> Vec<Vec<Vec<i64>>> {
    samples
        .completions
        .iter()
        .map(|answers| answers.iter().map(|a| a.tokens.clone()).collect())
        .collect()
}

#[test]
fn batched_greedy_answers_equal_each_prompt_decoded_alone() {
    for &variant in VARIANTS {
        let model = load(variant);
        let prompts = prompts(variant);
        let alone: Vec<Vec<i64>> = prompts
            .iter()
            .map(|p| model.generate(p, &greedy(24)).expect("generate"))
            .collect();
        // All rows in one batch, and groups of 3 rows (prompts split across groups, rows
        // finishing at different steps and leaving the batch).
        for max_rows in [64, 3] {
            let options = SampleOptions {
                samples_per_prompt: 2,
                max_rows,
                generation: greedy(24),
            };
            let batched = model.sample(&prompts, &options).expect("sample");
            assert!(batched.clamped.is_empty());
            for (p, answers) in batched.completions.iter().enumerate() {
                assert_eq!(answers.len(), 2);
                for answer in answers {
                    assert_eq!(
                        answer.tokens, alone[p],
                        "{variant}, max_rows {max_rows}: prompt {p} ({} tokens)",
                        prompts[p].len()
                    );
                    let expected_stop = match answer.tokens.last() {
                        Some(t) if model.config().eos_token_ids.contains(t) => StopReason::StopToken(*t),
                        _ => StopReason::MaxNewTokens,
                    };
                    assert_eq!(answer.stop, expected_stop, "{variant}: prompt {p}");
                }
            }
        }
    }
}

fn sampled(seed: i64, max_rows: usize) -> SampleOptions {
    SampleOptions {
        samples_per_prompt: 3,
        max_rows,
        generation: GenerationOptions {
            max_new_tokens: 16,
            temperature: 1.0,
            top_p: 0.95,
            seed,
            ..GenerationOptions::default()
        },
    }
}

#[test]
fn seeded_answers_do_not_depend_on_the_batch() {
    for variant in ["llama3", "gemma2"] {
        let model = load(variant);
        let prompts = prompts(variant);
        let all = tokens(&model.sample(&prompts, &sampled(5, 64)).expect("all"));
        assert_eq!(all, tokens(&model.sample(&prompts, &sampled(5, 64)).expect("again")));
        // In other groupings, orders and company, each prompt gets the same three answers.
        assert_eq!(all, tokens(&model.sample(&prompts, &sampled(5, 2)).expect("rows of 2")));
        let reversed: Vec<Vec<i64>> = prompts.iter().rev().cloned().collect();
        let mut back = tokens(&model.sample(&reversed, &sampled(5, 4)).expect("reversed"));
        back.reverse();
        assert_eq!(all, back, "{variant}: reversed");
        for (p, prompt) in prompts.iter().enumerate() {
            let alone = tokens(&model.sample(&[prompt], &sampled(5, 64)).expect("alone"));
            assert_eq!(alone[0], all[p], "{variant}: prompt {p} alone");
        }
        // generate() is sample() of one prompt and one answer.
        let first = model.generate(&prompts[1], &sampled(5, 64).generation).expect("generate");
        assert_eq!(first, all[1][0]);
        // The K answers differ from each other, and another seed gives others.
        let distinct = all.iter().filter(|a| a[0] != a[1] || a[1] != a[2]).count();
        assert!(distinct >= prompts.len() - 1, "{variant}: {all:?}");
        assert_ne!(all, tokens(&model.sample(&prompts, &sampled(6, 64)).expect("seed 6")));
    }
}

#[test]
fn a_tiny_nucleus_and_a_tiny_temperature_are_greedy() {
    let model = load("qwen3");
    let prompts = prompts("qwen3");
    let want = tokens(&model.sample(&prompts, &SampleOptions::new(2, greedy(24))).unwrap());
    for (temperature, top_p) in [(1.0, 1e-9), (1e-40, 1.0), (f64::MIN_POSITIVE, 0.9), (9e-6, 1.0)] {
        let options = SampleOptions::new(
            2,
            GenerationOptions {
                temperature,
                top_p,
                seed: 11,
                ..greedy(24)
            },
        );
        let got = tokens(&model.sample(&prompts, &options).expect("sample"));
        assert_eq!(got, want, "temperature {temperature:e}, top_p {top_p:e}");
    }
}

/// The first-token counts of 4000 samples follow `softmax(logits / T)` (restricted to the
/// nucleus when top_p < 1): Pearson's χ² within 5 standard deviations of its mean (tokens
/// expected fewer than 5 times pooled into one cell), and no token outside the nucleus.
#[test]
fn sampled_first_tokens_follow_the_tempered_distribution() {
    let model = load("llama3");
    let prompt = prompts("llama3").swap_remove(3);
    let ids = Tensor::from_slice(&prompt).view([1, -1]);
    let hidden = model.forward(&ids, &ids.ones_like(), false).unwrap();
    let logits = model.logits(&hidden).get(0).get(prompt.len() as i64 - 1).to_kind(Kind::Double);
    let count = 4000usize;
    for (temperature, top_p) in [(1.0, 1.0), (0.5, 1.0), (0.25, 1.0), (0.5, 0.6)] {
        let mut expected = Vec::<f64>::try_from((&logits / temperature).softmax(0, Kind::Double)).unwrap();
        if top_p < 1.0 {
            nucleus(&mut expected, top_p);
        }
        let options = SampleOptions {
            samples_per_prompt: count,
            max_rows: 1000,
            generation: GenerationOptions {
                max_new_tokens: 1,
                temperature,
                top_p,
                seed: 3,
                ..GenerationOptions::default()
            },
        };
        let samples = model.sample(&[&prompt], &options).expect("sample");
        let mut seen = vec![0f64; expected.len()];
        for answer in &samples.completions[0] {
            seen[answer.tokens[0] as usize] += 1.0;
        }
        let outside = seen.iter().zip(&expected).filter(|(s, e)| **s > 0.0 && **e == 0.0).count();
        assert_eq!(outside, 0, "T {temperature}, top_p {top_p}: tokens outside the nucleus");
        let (chi2, cells) = chi_square(&seen, &expected, count as f64);
        let freedom = cells as f64 - 1.0;
        let bound = freedom + 5.0 * (2.0 * freedom).sqrt();
        eprintln!("T {temperature}, top_p {top_p}: chi2 {chi2:.1} over {cells} cells (bound {bound:.1})");
        assert!(freedom >= 1.0 && chi2 < bound, "T {temperature}, top_p {top_p}: chi2 {chi2} over {cells} cells");
        // The test has power: the same counts are far from the distribution at 3 T.
        let other = Vec::<f64>::try_from((&logits / (3.0 * temperature)).softmax(0, Kind::Double)).unwrap();
        let (far, cells) = chi_square(&seen, &other, count as f64);
        let bound = cells as f64 - 1.0 + 5.0 * (2.0 * (cells as f64 - 1.0)).sqrt();
        assert!(top_p < 1.0 || far > bound, "T {temperature}: chi2 {far} against 3 T");
    }
}

/// Pearson's χ² of `seen` counts against `expected` probabilities of `n` draws, and its
/// number of cells (tokens expected at least 5 times, plus one pooling the others).
fn chi_square(seen: &[f64], expected: &[f64], n: f64) -> (f64, usize) {
    let (mut chi2, mut cells) = (0.0, 0);
    let (mut pooled_seen, mut pooled_expected) = (0.0, 0.0);
    for (&s, &p) in seen.iter().zip(expected) {
        if n * p >= 5.0 {
            chi2 += (s - n * p).powi(2) / (n * p);
            cells += 1;
        } else {
            pooled_seen += s;
            pooled_expected += n * p;
        }
    }
    if pooled_expected > 0.0 {
        chi2 += (pooled_seen - pooled_expected).powi(2) / pooled_expected.max(1e-9);
        cells += 1;
    }
    (chi2, cells)
}

/// Zeroes what lies outside the smallest most-likely set reaching `top_p`, renormalized.
fn nucleus(probabilities: &mut [f64], top_p: f64) {
    let mut order: Vec<usize> = (0..probabilities.len()).collect();
    order.sort_by(|&a, &b| probabilities[b].total_cmp(&probabilities[a]));
    let mut mass = 0.0;
    for &i in &order {
        if mass >= top_p {
            probabilities[i] = 0.0;
        } else {
            mass += probabilities[i];
        }
    }
    let total: f64 = probabilities.iter().sum();
    probabilities.iter_mut().for_each(|p| *p /= total);
}

#[test]
fn nan_weights_are_an_error_naming_the_logits_not_empty_answers() {
    let model = load("llama2");
    let (name, weight) = model
        .var_store()
        .variables()
        .into_iter()
        .find(|(n, _)| n.ends_with("layers.1.mlp.down_proj.weight"))
        .expect("a weight");
    tch::no_grad(|| {
        let _ = weight.get(0).fill_(f64::NAN);
    });
    let prompts = prompts("llama2");
    for generation in [greedy(8), sampled(1, 64).generation] {
        let error = model
            .sample(&prompts, &SampleOptions::new(2, generation))
            .expect_err(&format!("NaN in {name}"));
        let RefaError::InvalidValue { tensor, position, value, .. } = &error else {
            panic!("{error}");
        };
        assert_eq!(*tensor, "logits");
        assert!(value.is_nan(), "{error}");
        assert!(position.starts_with("prompt ") && position.contains("new token 0"), "{error}");
        assert!(error.to_string().contains("NaN/inf"), "{error}");
        assert!(model.generate(&prompts[0], &generation).is_err());
    }
}

#[test]
fn the_context_bounds_every_answer_and_says_where_it_cut() {
    // max_position_embeddings = 256 in every fixture.
    let model = load("llama2");
    let long = |n: usize| -> Vec<i64> { (0..n).map(|i| 4 + (i as i64 * 7) % 120).collect() };
    // A prompt filling the context is refused by its index, whatever max_new_tokens.
    for length in [256, 300] {
        let error = model
            .sample(&[long(5), long(length)], &SampleOptions::new(1, greedy(4)))
            .expect_err("too long");
        let message = error.to_string();
        assert!(message.contains("prompt 1") && message.contains("max_position_embeddings"), "{message}");
        assert!(message.contains(&format!("[{length}]")) && message.contains("at most 255"), "{message}");
    }
    // 250 + 24 > 256: answers to that prompt get 6 new tokens, and the clamp is reported.
    let prompts = [long(10), long(250), long(255)];
    let samples = model.sample(&prompts, &SampleOptions::new(2, greedy(24))).expect("sample");
    assert_eq!(samples.clamped.len(), 2);
    let clamp = samples.clamped[0];
    assert_eq!((clamp.prompt, clamp.prompt_tokens, clamp.max_new_tokens), (1, 250, 6));
    assert_eq!((clamp.requested, clamp.context), (24, 256));
    assert!(clamp.to_string().contains("prompt 1 (250 tokens): at most 6 new tokens instead of 24"));
    assert_eq!(samples.clamped[1].max_new_tokens, 1);
    for (p, budget) in [(1, 6), (2, 1)] {
        for answer in &samples.completions[p] {
            assert!(answer.tokens.len() <= budget);
            if answer.tokens.len() == budget {
                assert!(matches!(answer.stop, StopReason::ContextFull | StopReason::StopToken(_)));
            }
        }
    }
    // The clamped answers are the first tokens of what an unbounded model would say: the
    // same as the unclamped answer cut, so nothing but the length changed.
    let short = model.generate(&prompts[1], &greedy(6)).expect("6 tokens");
    assert_eq!(samples.completions[1][0].tokens, short);
    // The short prompt, padded by 245 columns until the long ones finished and left the
    // batch (which then dropped the padding), answers as it does alone.
    let alone = model.generate(&prompts[0], &greedy(24)).expect("alone");
    assert_eq!(samples.completions[0][1].tokens, alone);
}

#[test]
fn stop_ids_end_answers_and_bad_ids_are_named() {
    let model = load("llama2");
    let prompts = prompts("llama2");
    let free = model.generate(&prompts[0], &greedy(24)).expect("free");
    let stop = free[4];
    let options = GenerationOptions {
        stop_token_id: Some(stop),
        ..greedy(24)
    };
    let samples = model.sample(&prompts[..1], &SampleOptions::new(1, options)).unwrap();
    let answer = &samples.completions[0][0];
    let first = free.iter().position(|&t| t == stop).unwrap();
    assert_eq!(answer.tokens, free[..=first]);
    assert_eq!(answer.stop, StopReason::StopToken(stop));

    let vocab = model.config().vocab_size;
    let bad_stop = GenerationOptions {
        stop_token_id: Some(vocab),
        ..greedy(4)
    };
    let message = model.generate(&prompts[0], &bad_stop).unwrap_err().to_string();
    assert!(message.contains("stop_token_id") && message.contains("vocabulary"), "{message}");
    let message = model
        .sample(&[vec![5, 6], vec![5, vocab + 3]], &SampleOptions::new(1, greedy(4)))
        .unwrap_err()
        .to_string();
    assert!(message.contains("prompt 1, position 1") && message.contains(&format!("{}", vocab + 3)), "{message}");
    let message = model
        .sample(&[vec![5, 6], vec![]], &SampleOptions::new(1, greedy(4)))
        .unwrap_err()
        .to_string();
    assert!(message.contains("at least one token (prompt 1)"), "{message}");
    for (options, name) in [
        (SampleOptions { samples_per_prompt: 0, ..SampleOptions::default() }, "samples_per_prompt"),
        (SampleOptions { max_rows: 0, ..SampleOptions::default() }, "max_rows"),
        (SampleOptions::new(1, GenerationOptions { temperature: f64::NAN, ..greedy(4) }), "temperature"),
        (SampleOptions::new(1, GenerationOptions { top_p: 0.0, ..greedy(4) }), "top_p"),
        (SampleOptions::new(1, greedy(0)), "max_new_tokens"),
    ] {
        let message = model.sample(&prompts, &options).unwrap_err().to_string();
        assert!(message.contains(name), "{message}");
    }
    // No prompt: nothing to do, no error.
    let none: [Vec<i64>; 0] = [];
    assert!(model.sample(&none, &SampleOptions::default()).unwrap().completions.is_empty());
}
