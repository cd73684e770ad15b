//! Sequence scoring: the chunked path equals the plain path in values and gradients, a tiny
//! model trains identically through both, and bad input gets typed errors.

mod common;

use rand::Rng;
use refa_loss::scoring::{
    preference_loss_backward, score_hidden, score_logits, ChunkedScorer, PreferenceTargets,
    ScoringConfig,
};
use refa_loss::{EosMode, EosRegularizer, PreferenceLoss, RefaDynamic, RefaError, RefaOneVsAll};
use tch::{Device, Kind, Tensor};

const EOS: i64 = 1;

/// A random scoring problem: `P·K` sequences of `T` labels over a vocabulary of `V`.
struct Problem {
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    rewards: Tensor,
    prompts: i64,
}

fn problem(seed: u64, kind: Kind) -> Problem {
    let mut rng = common::rng(seed);
    let (prompts, slots) = (rng.gen_range(1..4), rng.gen_range(2..5));
    let (positions, width, vocab) = (
        rng.gen_range(2..14),
        rng.gen_range(3..9),
        rng.gen_range(4..24),
    );
    let sequences = prompts * slots;
    let mut labels = vec![-100i64; (sequences * positions) as usize];
    for n in 0..sequences as usize {
        // Prompt, then a response (possibly empty) that ends in EOS or is cut, then padding.
        let prompt = rng.gen_range(1..=positions as usize);
        let response = if rng.gen_bool(0.15) {
            0
        } else {
            rng.gen_range(0..=positions as usize - prompt)
        };
        for t in prompt..prompt + response {
            labels[n * positions as usize + t] = rng.gen_range(0..vocab);
        }
        if response > 0 && rng.gen_bool(0.7) {
            labels[n * positions as usize + prompt + response - 1] = EOS;
        }
    }
    tch::manual_seed(seed as i64);
    let options = (kind, Device::Cpu);
    Problem {
        hidden: Tensor::randn([sequences, positions, width], options).set_requires_grad(true),
        weight: (Tensor::randn([vocab, width], options) * 0.7).set_requires_grad(true),
        labels: Tensor::from_slice(&labels).view([sequences, positions]),
        rewards: Tensor::randint(6, [prompts, slots], (Kind::Double, Device::Cpu)),
        prompts,
    }
}

fn losses() -> Vec<Box<dyn PreferenceLoss>> {
    vec![
        Box::new(RefaDynamic::default().with_regularizer(EosRegularizer {
            lambda: 0.5,
            mode: EosMode::Budgeted { budget: 3 },
        })),
        Box::new(RefaOneVsAll::default().with_regularizer(EosRegularizer {
            lambda: 0.7,
            ..Default::default()
        })),
    ]
}

/// Loss value and gradients with respect to hidden and head through the plain path.
fn plain(p: &Problem, loss: &dyn PreferenceLoss, config: &ScoringConfig) -> (f64, Tensor, Tensor) {
    let logits = p.hidden.matmul(&p.weight.tr());
    let scores = score_logits(&logits, &p.labels, config).expect("plain scores");
    let output = loss
        .compute(&scores.to_batch(&p.rewards, None).expect("batch"))
        .expect("loss");
    let grads = Tensor::run_backward(&[&output.loss], &[&p.hidden, &p.weight], false, false);
    (
        output.loss.double_value(&[]),
        grads[0].shallow_clone(),
        grads[1].shallow_clone(),
    )
}

/// The same through the chunked one-call path.
fn chunked(
    p: &Problem,
    loss: &dyn PreferenceLoss,
    config: &ScoringConfig,
) -> (f64, Tensor, Tensor) {
    let (hidden, weight) = (
        p.hidden.detach().set_requires_grad(true),
        p.weight.detach().set_requires_grad(true),
    );
    let output = preference_loss_backward(
        loss,
        &hidden,
        &weight,
        &p.labels,
        config,
        &PreferenceTargets::new(&p.rewards),
    )
    .expect("chunked step");
    let grad = |t: &Tensor| {
        if t.grad().defined() {
            t.grad()
        } else {
            t.zeros_like()
        }
    };
    (output.loss.double_value(&[]), grad(&hidden), grad(&weight))
}

fn max_difference(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Tolerances: f64 sums of the same terms in a different order agree to ~1e-15 relative; f32
/// to ~1e-7 per operation over a few hundred terms, so 1e-5 absolute on O(1) values.
fn chunked_equals_plain(kind: Kind, tolerance: f64) {
    let mut worst = 0.0f64;
    for seed in 0..40 {
        let p = problem(seed, kind);
        for chunk_size in [1, 3, 7, 1024] {
            let config = ScoringConfig {
                chunk_size,
                eos_steps: true,
                ..ScoringConfig::new(EOS)
            };
            for loss in losses() {
                let (lp, hp, wp) = plain(&p, loss.as_ref(), &config);
                let (lc, hc, wc) = chunked(&p, loss.as_ref(), &config);
                let diffs = [
                    (lp - lc).abs(),
                    max_difference(&hp, &hc),
                    max_difference(&wp, &wc),
                ];
                worst = diffs.iter().fold(worst, |w, d| w.max(*d));
                assert!(
                    diffs.iter().all(|d| *d <= tolerance),
                    "seed {seed}, chunk {chunk_size}, {}: {diffs:?}",
                    loss.name()
                );
            }
        }
    }
    println!("{kind:?}: largest chunked/plain difference {worst:e}");
}

#[test]
fn chunked_equals_plain_in_f64() {
    chunked_equals_plain(Kind::Double, 1e-10);
}

#[test]
fn chunked_equals_plain_in_f32() {
    chunked_equals_plain(Kind::Float, 1e-5);
}

#[test]
fn sequence_values_match_between_paths_and_flag_truncation() {
    for seed in 0..20 {
        let p = problem(100 + seed, Kind::Double);
        let config = ScoringConfig {
            chunk_size: 5,
            eos_steps: true,
            ..ScoringConfig::new(EOS)
        };
        let plain =
            score_logits(&p.hidden.matmul(&p.weight.tr()), &p.labels, &config).expect("plain");
        let chunked = score_hidden(&p.hidden, &p.weight, &p.labels, &config).expect("chunked");
        for (a, b) in [
            (&plain.logp_sum, &chunked.logp_sum),
            (&plain.eos_logp, &chunked.eos_logp),
            (
                plain.eos_logp_steps.as_ref().expect("steps"),
                chunked.eos_logp_steps.as_ref().expect("steps"),
            ),
        ] {
            assert!(max_difference(a, b) < 1e-12);
        }
        assert!(!chunked.logp_sum.requires_grad());
        assert_eq!(plain.lengths, chunked.lengths);
        assert_eq!(plain.eos_mask, chunked.eos_mask);
        // By hand: length = response labels; eos_mask = the last response label is EOS.
        let labels = Vec::<Vec<i64>>::try_from(&p.labels).expect("labels");
        let lengths = Vec::<i64>::try_from(&chunked.lengths).expect("lengths");
        let eos_mask = Vec::<bool>::try_from(&chunked.eos_mask).expect("eos mask");
        for (n, row) in labels.iter().enumerate() {
            let response: Vec<i64> = row[1..].iter().copied().filter(|&l| l != -100).collect();
            assert_eq!(lengths[n], response.len() as i64);
            assert_eq!(eos_mask[n], response.last() == Some(&EOS));
        }
        // Sequences without response tokens are masked slots of the batch.
        let batch = chunked.to_batch(&p.rewards, None).expect("batch");
        let mask = Vec::<bool>::try_from(&batch.mask().flatten(0, -1)).expect("mask");
        assert!(lengths.iter().zip(&mask).all(|(l, m)| (*l > 0) == *m));
        assert_eq!(batch.num_prompts(), p.prompts);
    }
}

#[test]
fn bf16_inputs_score_in_f32_and_match_f32_closely() {
    let p = problem(7, Kind::Float);
    let config = ScoringConfig {
        chunk_size: 4,
        ..ScoringConfig::new(EOS)
    };
    let (hidden, weight) = (
        p.hidden.detach().to_kind(Kind::BFloat16),
        p.weight.detach().to_kind(Kind::BFloat16),
    );
    let low = score_hidden(&hidden, &weight, &p.labels, &config).expect("bf16 scores");
    assert_eq!(low.logp_sum.kind(), Kind::Float);
    let reference = score_logits(
        &hidden
            .to_kind(Kind::Float)
            .matmul(&weight.to_kind(Kind::Float).tr()),
        &p.labels,
        &config,
    )
    .expect("f32 scores");
    // bf16 logits carry 8 bits of mantissa: ~0.4 % relative error per logit.
    let scale = reference.logp_sum.abs().max().double_value(&[]).max(1.0);
    assert!(max_difference(&low.logp_sum, &reference.logp_sum) < 0.02 * scale);
}

/// A tiny "model": embedding → linear → LM head, trained for a few SGD steps with
/// RefaDynamic, once through the plain path and once through the chunked one.
#[test]
fn a_tiny_model_trains_identically_through_both_paths() {
    let p = problem(3, Kind::Double);
    let (vocab, width) = (p.weight.size()[0], p.weight.size()[1]);
    let ids = p.labels.clamp_min(0);
    tch::manual_seed(11);
    let start = [
        Tensor::randn([vocab, width], (Kind::Double, Device::Cpu)),
        Tensor::randn([width, width], (Kind::Double, Device::Cpu)) * 0.5,
        Tensor::randn([vocab, width], (Kind::Double, Device::Cpu)) * 0.5,
    ];
    let config = ScoringConfig {
        chunk_size: 3,
        ..ScoringConfig::new(EOS)
    };
    let loss = RefaDynamic::default();
    let train = |use_chunked: bool| {
        let params: Vec<Tensor> = start
            .iter()
            .map(|t| t.copy().set_requires_grad(true))
            .collect();
        let mut losses = Vec::new();
        for _ in 0..5 {
            let hidden = params[0]
                .index_select(0, &ids.flatten(0, -1))
                .view([ids.size()[0], ids.size()[1], width])
                .matmul(&params[1])
                .tanh();
            let value = if use_chunked {
                let targets = PreferenceTargets::new(&p.rewards);
                preference_loss_backward(&loss, &hidden, &params[2], &p.labels, &config, &targets)
                    .expect("step")
                    .loss
            } else {
                let scores = score_logits(&hidden.matmul(&params[2].tr()), &p.labels, &config)
                    .expect("scores");
                let output = loss
                    .compute(&scores.to_batch(&p.rewards, None).expect("batch"))
                    .expect("loss");
                output.loss.backward();
                output.loss
            };
            losses.push(value.double_value(&[]));
            tch::no_grad(|| {
                for param in &params {
                    let mut param = param.shallow_clone();
                    let _ = param.f_sub_(&(param.grad() * 0.5)).expect("sgd");
                    let _ = param.grad().zero_();
                }
            });
        }
        (params, losses)
    };
    let (plain_params, plain_losses) = train(false);
    let (chunked_params, chunked_losses) = train(true);
    for (a, b) in plain_params.iter().zip(&chunked_params) {
        assert!(max_difference(a, b) < 1e-10, "{}", max_difference(a, b));
    }
    for (a, b) in plain_losses.iter().zip(&chunked_losses) {
        assert!((a - b).abs() < 1e-10);
    }
    assert!(
        plain_losses.last() < plain_losses.first(),
        "training lowers the loss: {plain_losses:?}"
    );
}

#[test]
fn bad_scoring_input_gets_typed_errors() {
    let p = problem(1, Kind::Double);
    let config = ScoringConfig::new(EOS);
    let vocab = p.weight.size()[0];

    let err =
        ChunkedScorer::new(&p.hidden, &p.weight.narrow(1, 0, 2), &p.labels, &config).unwrap_err();
    assert!(
        matches!(
            err,
            RefaError::ShapeMismatch {
                tensor: "lm_head_weight",
                ..
            }
        ),
        "{err}"
    );
    let err =
        ChunkedScorer::new(&p.hidden, &p.weight, &p.labels.narrow(1, 0, 1), &config).unwrap_err();
    assert!(
        matches!(
            err,
            RefaError::ShapeMismatch {
                tensor: "labels",
                ..
            }
        ),
        "{err}"
    );
    let err =
        ChunkedScorer::new(&p.hidden.select(0, 0), &p.weight, &p.labels, &config).unwrap_err();
    assert!(
        matches!(
            err,
            RefaError::ShapeMismatch {
                tensor: "hidden",
                ..
            }
        ),
        "{err}"
    );
    let err = ChunkedScorer::new(
        &p.hidden,
        &p.weight.to_kind(Kind::Float),
        &p.labels,
        &config,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            RefaError::WrongKind {
                tensor: "lm_head_weight",
                ..
            }
        ),
        "{err}"
    );
    let err = ChunkedScorer::new(&p.hidden, &p.weight, &p.labels.to_kind(Kind::Int), &config)
        .unwrap_err();
    assert!(
        matches!(
            err,
            RefaError::WrongKind {
                tensor: "labels",
                ..
            }
        ),
        "{err}"
    );

    let err = ChunkedScorer::new(&p.hidden, &p.weight, &p.labels, &ScoringConfig::new(vocab))
        .unwrap_err();
    assert!(
        matches!(err, RefaError::InvalidSetting { name: "eos_id", .. }),
        "{err}"
    );
    assert!(err.to_string().contains(&format!("[0, {vocab})")), "{err}");
    let zero_chunk = ScoringConfig {
        chunk_size: 0,
        ..config
    };
    let err = score_hidden(&p.hidden, &p.weight, &p.labels, &zero_chunk).unwrap_err();
    assert!(
        matches!(
            err,
            RefaError::InvalidSetting {
                name: "chunk_size",
                ref value,
                ..
            } if value == "0"
        ),
        "{err}"
    );

    let labels = p.labels.copy();
    let _ = labels.get(0).get(1).fill_(vocab + 3);
    let err = score_logits(&p.hidden.matmul(&p.weight.tr()), &labels, &config).unwrap_err();
    assert!(
        matches!(
            err,
            RefaError::InvalidValue {
                tensor: "labels",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("sequence 0, position 1"), "{err}");

    let scores = score_hidden(&p.hidden, &p.weight, &p.labels, &config).expect("scores");
    let err = scores
        .to_batch(
            &Tensor::zeros([p.prompts + 1, 2], (Kind::Double, Device::Cpu)),
            None,
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            RefaError::ShapeMismatch {
                tensor: "rewards",
                ..
            }
        ),
        "{err}"
    );
}

/// A head that is not a leaf (here a scaled parameter, as a tied or adapted head would be)
/// gets its gradient through the surrogate pass; the parameter behind it still matches.
#[test]
fn a_non_leaf_head_gets_the_same_gradient() {
    for seed in [21, 22, 23] {
        non_leaf_head_matches(seed);
    }
}

/// Seed 21 happens to have no response token at all: both paths give zero gradients.
fn non_leaf_head_matches(seed: u64) {
    let p = problem(seed, Kind::Double);
    let config = ScoringConfig {
        chunk_size: 4,
        ..ScoringConfig::new(EOS)
    };
    let loss = RefaDynamic::default();
    let gradient = |use_chunked: bool| {
        let parameter = p.weight.detach().set_requires_grad(true);
        let head = &parameter * 0.5;
        let hidden = p.hidden.detach().set_requires_grad(true);
        if use_chunked {
            let targets = PreferenceTargets::new(&p.rewards);
            preference_loss_backward(&loss, &hidden, &head, &p.labels, &config, &targets)
                .expect("step");
        } else {
            let scores =
                score_logits(&hidden.matmul(&head.tr()), &p.labels, &config).expect("scores");
            loss.compute(&scores.to_batch(&p.rewards, None).expect("batch"))
                .expect("loss")
                .loss
                .backward();
        }
        (parameter.grad(), hidden.grad())
    };
    let ((wp, hp), (wc, hc)) = (gradient(false), gradient(true));
    assert!(max_difference(&wp, &wc) < 1e-12 && max_difference(&hp, &hc) < 1e-12);
}

/// `EosMode::Budgeted` counts positions from each response's first token, whatever the
/// prompt's length: two real sequences whose prompts (6 and 7 tokens) are longer than the
/// budget, through both scorers, `to_batch` and the regularizer, against a value computed by
/// hand. (Read by position in the whole sequence, every step would lie past the budget and
/// the regularizer would only push EOS up.)
#[test]
fn budgeted_eos_counts_positions_from_the_response_start() {
    let (positions, vocab, budget, lambda) = (10i64, 3i64, 2usize, 0.5);
    // Labels: the prompt is ignored; responses of 4 and 3 tokens that end with EOS.
    let mut labels = vec![-100i64; 2 * positions as usize];
    labels[6..10].copy_from_slice(&[0, 2, 0, EOS]);
    labels[10 + 7..20].copy_from_slice(&[2, 0, EOS]);
    let labels = Tensor::from_slice(&labels).view([2, positions]);
    // Logits: EOS logit x = 0.4·t − 2 + n at row t of sequence n, the two others 0, so
    // P(EOS) = e^x / (e^x + 2) there.
    let eos_logit = |n: i64, t: i64| 0.4 * t as f64 - 2.0 + n as f64;
    let probability = |n: i64, t: i64| {
        let e = eos_logit(n, t).exp();
        e / (e + 2.0)
    };
    let mut logits = vec![0.0f64; (2 * positions * vocab) as usize];
    for n in 0..2 {
        for t in 0..positions {
            logits[((n * positions + t) * vocab + EOS) as usize] = eos_logit(n, t);
        }
    }
    let logits = Tensor::from_slice(&logits).view([2, positions, vocab]);
    // Output row t predicts label t + 1: sequence 0's response tokens 1..4 are read at rows
    // 5..8, sequence 1's tokens 1..3 at rows 6..8. Budget 2: t = 1 is early, t >= 3 late.
    let sequence_0 = probability(0, 5) - (probability(0, 7) + probability(0, 8)) / 2.0;
    let sequence_1 = probability(1, 6) - probability(1, 8);
    let expected = lambda * (sequence_0 + sequence_1);

    let config = ScoringConfig {
        eos_steps: true,
        ..ScoringConfig::new(EOS)
    };
    let regularizer = EosRegularizer {
        lambda,
        mode: EosMode::Budgeted { budget },
    };
    let rewards = Tensor::from_slice2(&[[1.0f64, 2.0]]);
    let identity = Tensor::eye(vocab, (Kind::Double, Device::Cpu));
    for (path, scores) in [
        (
            "plain",
            score_logits(&logits, &labels, &config).expect("plain"),
        ),
        (
            "chunked",
            score_hidden(&logits, &identity, &labels, &config).expect("chunked"),
        ),
    ] {
        let batch = scores.to_batch(&rewards, None).expect("batch");
        let got = regularizer
            .compute(&batch)
            .expect("loss")
            .loss
            .double_value(&[]);
        assert!(
            (got - expected).abs() < 1e-12,
            "{path}: {got}, by hand {expected}"
        );
    }
}
