//! Every error case: the variant, and a message that names the culprit. No user input panics.

use refa_loss::{
    device, Dpo, EosMode, EosRegularizer, InfoNca, Mpo, PreferenceBatch, PreferenceLoss,
    RefaDynamic, RefaError, RefaOneVsAll, SimPo, TargetLength,
};
use tch::{Device, Kind, Tensor};

fn t(rows: &[[f64; 3]]) -> Tensor {
    Tensor::from_slice2(rows)
}

fn logp() -> Tensor {
    t(&[[-3.0, -5.0, -4.0], [-2.0, -6.0, -1.0]])
}

fn lengths() -> Tensor {
    t(&[[3.0, 5.0, 2.0], [2.0, 3.0, 1.0]])
}

fn rewards() -> Tensor {
    t(&[[9.0, 1.0, 5.0], [2.0, 7.0, 4.0]])
}

fn batch() -> PreferenceBatch {
    PreferenceBatch::new(&logp(), &lengths(), &rewards()).expect("valid batch")
}

fn message(err: &RefaError) -> String {
    err.to_string()
}

#[test]
fn mismatched_shapes_name_the_tensors_and_shapes() {
    let err = PreferenceBatch::new(
        &logp(),
        &Tensor::ones([2, 4], (Kind::Double, Device::Cpu)),
        &rewards(),
    )
    .unwrap_err();
    assert!(
        matches!(&err, RefaError::ShapeMismatch { tensor: "lengths", actual, .. } if actual == &vec![2, 4])
    );
    assert!(
        message(&err).contains("`lengths`")
            && message(&err).contains("[2, 4]")
            && message(&err).contains("[2, 3]")
    );

    let err = PreferenceBatch::new(&logp().flatten(0, -1), &lengths(), &rewards()).unwrap_err();
    assert!(
        matches!(
            err,
            RefaError::ShapeMismatch {
                tensor: "logp_sum",
                ..
            }
        ),
        "{err}"
    );

    let err = batch()
        .with_mask(&Tensor::ones([3, 3], (Kind::Bool, Device::Cpu)))
        .unwrap_err();
    assert!(
        message(&err).contains("`mask`") && message(&err).contains("[3, 3]"),
        "{err}"
    );

    let err = batch()
        .with_reference(&Tensor::zeros([2], (Kind::Double, Device::Cpu)))
        .unwrap_err();
    assert!(
        matches!(
            err,
            RefaError::ShapeMismatch {
                tensor: "ref_logp_sum",
                ..
            }
        ),
        "{err}"
    );

    let steps = Tensor::zeros([2, 4, 5], (Kind::Double, Device::Cpu));
    let err = batch().with_eos_steps(&steps, &steps.gt(0.0)).unwrap_err();
    assert!(
        matches!(
            err,
            RefaError::ShapeMismatch {
                tensor: "eos_logp_steps",
                ..
            }
        ),
        "{err}"
    );

    let steps = Tensor::zeros([2, 3, 5], (Kind::Double, Device::Cpu));
    let err = batch()
        .with_eos_steps(&steps, &Tensor::ones([2, 3, 4], (Kind::Bool, Device::Cpu)))
        .unwrap_err();
    assert!(
        matches!(
            err,
            RefaError::ShapeMismatch {
                tensor: "step_mask",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn non_float_and_non_bool_kinds_are_refused() {
    let err =
        PreferenceBatch::new(&logp().to_kind(Kind::Int64), &lengths(), &rewards()).unwrap_err();
    assert!(
        matches!(
            err,
            RefaError::WrongKind {
                tensor: "logp_sum",
                actual: Kind::Int64,
                ..
            }
        ),
        "{err}"
    );
    assert!(message(&err).contains("floating-point"));

    let err = PreferenceBatch::new(&logp(), &lengths(), &rewards().gt(0.0)).unwrap_err();
    assert!(
        matches!(
            err,
            RefaError::WrongKind {
                tensor: "rewards",
                actual: Kind::Bool,
                ..
            }
        ),
        "{err}"
    );

    let err = batch().with_mask(&lengths()).unwrap_err();
    assert!(
        matches!(
            err,
            RefaError::WrongKind {
                tensor: "mask",
                actual: Kind::Double,
                ..
            }
        ),
        "{err}"
    );

    let err = batch().with_eos(&logp(), &lengths()).unwrap_err();
    assert!(
        matches!(
            err,
            RefaError::WrongKind {
                tensor: "eos_mask",
                ..
            }
        ),
        "{err}"
    );

    let err = batch()
        .with_reference(&logp().to_kind(Kind::Int))
        .unwrap_err();
    assert!(
        matches!(
            err,
            RefaError::WrongKind {
                tensor: "ref_logp_sum",
                ..
            }
        ),
        "{err}"
    );

    // Integer lengths and rewards are fine: they are counts and scores.
    PreferenceBatch::new(
        &logp(),
        &lengths().to_kind(Kind::Int64),
        &rewards().to_kind(Kind::Int),
    )
    .expect("integer counts");
}

#[test]
fn tensors_on_different_devices_are_refused() {
    if !device::cuda_is_available() {
        eprintln!("skipped: the device-mismatch check needs a CUDA device (none here)");
        return;
    }
    let err =
        PreferenceBatch::new(&logp(), &lengths().to(Device::Cuda(0)), &rewards()).unwrap_err();
    assert!(
        matches!(
            err,
            RefaError::DeviceMismatch {
                tensor: "lengths",
                reference: "logp_sum",
                ..
            }
        ),
        "{err}"
    );
    assert!(message(&err).contains("Cuda(0)") && message(&err).contains("Cpu"));
}

#[test]
fn invalid_hyperparameters_name_the_loss_the_field_and_the_value() {
    let b = batch();
    let cases: Vec<(Box<dyn PreferenceLoss>, &str, &str)> = vec![
        (
            Box::new(RefaDynamic {
                beta: 0.0,
                ..Default::default()
            }),
            "RefaDynamic",
            "beta",
        ),
        (
            Box::new(RefaDynamic {
                beta: f64::NAN,
                ..Default::default()
            }),
            "RefaDynamic",
            "beta",
        ),
        (
            Box::new(RefaDynamic {
                gamma: -1.0,
                ..Default::default()
            }),
            "RefaDynamic",
            "gamma",
        ),
        (
            Box::new(RefaDynamic {
                alpha: -0.5,
                ..Default::default()
            }),
            "RefaDynamic",
            "alpha",
        ),
        (
            Box::new(RefaDynamic {
                power: 0.0,
                ..Default::default()
            }),
            "RefaDynamic",
            "power",
        ),
        (
            Box::new(RefaOneVsAll {
                gamma: 0.0,
                ..Default::default()
            }),
            "RefaOneVsAll",
            "gamma",
        ),
        (
            Box::new(RefaOneVsAll {
                beta: f64::INFINITY,
                ..Default::default()
            }),
            "RefaOneVsAll",
            "beta",
        ),
        (
            Box::new(InfoNca {
                tau: 0.0,
                ..Default::default()
            }),
            "InfoNca",
            "tau",
        ),
        (
            Box::new(InfoNca {
                beta: -3.0,
                ..Default::default()
            }),
            "InfoNca",
            "beta",
        ),
        (
            Box::new(EosRegularizer {
                lambda: -0.1,
                ..Default::default()
            }),
            "EosRegularizer",
            "lambda",
        ),
        (
            Box::new(EosRegularizer {
                lambda: 1.0,
                mode: EosMode::Budgeted { budget: 0 },
            }),
            "EosRegularizer",
            "budget",
        ),
        (
            Box::new(EosRegularizer {
                lambda: 1.0,
                mode: EosMode::TargetLength(TargetLength::Fixed(-4.0)),
            }),
            "EosRegularizer",
            "target_length",
        ),
        (
            Box::new(SimPo {
                margin: f64::NAN,
                ..Default::default()
            }),
            "SimPo",
            "margin",
        ),
        (
            Box::new(SimPo {
                sft_weight: -1.0,
                ..Default::default()
            }),
            "SimPo",
            "sft_weight",
        ),
        (
            Box::new(Dpo {
                beta: 0.0,
                ..Default::default()
            }),
            "Dpo",
            "beta",
        ),
        (
            Box::new(Mpo {
                alpha: f64::NAN,
                ..Default::default()
            }),
            "Mpo",
            "alpha",
        ),
    ];
    for (loss, loss_name, field) in cases {
        let err = loss.compute(&b).unwrap_err();
        assert!(
            matches!(&err, RefaError::InvalidHyperparameter { loss, name, .. } if *loss == loss_name && *name == field),
            "{err}"
        );
        assert!(
            message(&err).contains(&format!("`{field}`")) && message(&err).contains(loss_name),
            "{err}"
        );
    }
}

#[test]
fn invalid_values_in_valid_slots_name_tensor_position_and_value() {
    let bad_lengths = lengths();
    let _ = bad_lengths.get(1).get(2).fill_(0.0);
    let err = RefaDynamic::default()
        .compute(&PreferenceBatch::new(&logp(), &bad_lengths, &rewards()).expect("shapes are fine"))
        .unwrap_err();
    assert!(
        matches!(&err, RefaError::InvalidValue { tensor: "lengths", value, .. } if *value == 0.0),
        "{err}"
    );
    assert!(
        message(&err).contains("prompt 1, slot 2") && message(&err).contains("> 0"),
        "{err}"
    );

    let bad_rewards = rewards();
    let _ = bad_rewards.get(0).get(1).fill_(f64::NAN);
    let err = PreferenceBatch::new(&logp(), &lengths(), &bad_rewards)
        .expect("shapes")
        .validate()
        .unwrap_err();
    assert!(
        matches!(
            err,
            RefaError::InvalidValue {
                tensor: "rewards",
                ..
            }
        ),
        "{err}"
    );
    assert!(message(&err).contains("prompt 0, slot 1"), "{err}");

    let bad_logp = logp();
    let _ = bad_logp.get(1).get(0).fill_(f64::NEG_INFINITY);
    let err = PreferenceBatch::new(&bad_logp, &lengths(), &rewards())
        .expect("shapes")
        .validate()
        .unwrap_err();
    assert!(
        matches!(
            err,
            RefaError::InvalidValue {
                tensor: "logp_sum",
                ..
            }
        ),
        "{err}"
    );

    let bad_eos = logp();
    let _ = bad_eos.get(0).get(0).fill_(f64::NAN);
    let eos_mask = logp().lt(0.0);
    let err = batch()
        .with_eos(&bad_eos, &eos_mask)
        .expect("shapes")
        .validate()
        .unwrap_err();
    assert!(
        matches!(
            err,
            RefaError::InvalidValue {
                tensor: "eos_logp",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn invalid_values_in_masked_slots_or_with_checks_off_are_accepted() {
    let bad_lengths = lengths();
    let _ = bad_lengths.get(1).get(2).fill_(-7.0);
    let mask = Tensor::from_slice2(&[[true, true, true], [true, true, false]]);
    let masked =
        PreferenceBatch::new(&logp(), &bad_lengths, &rewards()).and_then(|b| b.with_mask(&mask));
    let value = RefaDynamic::default()
        .compute(&masked.expect("batch"))
        .expect("masked slot is ignored");
    assert!(value.loss.double_value(&[]).is_finite());

    let unchecked = PreferenceBatch::new(&logp(), &bad_lengths, &rewards())
        .expect("batch")
        .with_value_checks(false);
    assert!(!unchecked.checks_values());
    assert!(RefaDynamic::default().compute(&unchecked).is_ok());
}

#[test]
fn missing_inputs_name_the_loss_the_input_and_the_builder() {
    let b = batch();
    let err = Dpo::default().compute(&b).unwrap_err();
    assert!(
        matches!(
            err,
            RefaError::MissingInput {
                loss: "Dpo",
                input: "ref_logp_sum",
                method: "with_reference"
            }
        ),
        "{err}"
    );
    assert!(message(&err).contains("PreferenceBatch::with_reference"));
    assert!(matches!(
        Mpo::default().compute(&b),
        Err(RefaError::MissingInput { loss: "Mpo", .. })
    ));
    assert!(matches!(
        InfoNca::original().compute(&b),
        Err(RefaError::MissingInput {
            loss: "InfoNca",
            ..
        })
    ));

    let err = EosRegularizer::default().compute(&b).unwrap_err();
    assert!(
        matches!(
            err,
            RefaError::MissingInput {
                method: "with_eos",
                ..
            }
        ),
        "{err}"
    );
    let err = RefaDynamic::default()
        .with_regularizer(EosRegularizer::default())
        .compute(&b)
        .unwrap_err();
    assert!(
        matches!(
            err,
            RefaError::MissingInput {
                method: "with_eos",
                ..
            }
        ),
        "{err}"
    );

    let with_eos = batch().with_eos(&logp(), &logp().lt(0.0)).expect("eos");
    let budgeted = EosRegularizer {
        lambda: 1.0,
        mode: EosMode::Budgeted { budget: 3 },
    };
    let err = budgeted.compute(&with_eos).unwrap_err();
    assert!(
        matches!(
            err,
            RefaError::MissingInput {
                method: "with_eos_steps",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn an_overflowing_loss_is_an_error_not_a_nan() {
    // Finite rewards whose squared deviation overflows f64: α·d is infinite.
    let huge = t(&[[1e200, -1e200, 0.0], [2.0, 7.0, 4.0]]);
    let b = PreferenceBatch::new(&logp(), &lengths(), &huge).expect("batch");
    let err = RefaDynamic {
        alpha: 1.0,
        ..Default::default()
    }
    .compute(&b)
    .unwrap_err();
    assert!(
        matches!(
            err,
            RefaError::NonFiniteLoss {
                loss: "RefaDynamic",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn degenerate_batches_give_a_zero_loss_that_backpropagates() {
    // Every prompt skipped: equal rewards in one, a single response in the other.
    let logp_sum = logp().set_requires_grad(true);
    let rewards = t(&[[3.0, 3.0, 3.0], [1.0, 2.0, 3.0]]);
    let mask = Tensor::from_slice2(&[[true, true, true], [false, true, false]]);
    let b = PreferenceBatch::new(&logp_sum, &lengths(), &rewards)
        .and_then(|b| b.with_mask(&mask))
        .expect("batch");
    let output = RefaDynamic::default().compute(&b).expect("loss");
    assert_eq!(output.loss.double_value(&[]), 0.0);
    output.loss.backward();
    assert_eq!(
        logp_sum.grad().abs().sum(Kind::Double).double_value(&[]),
        0.0
    );
    let summary = output.metrics.summary().expect("metrics");
    assert_eq!((summary.prompts_used, summary.prompts_skipped), (0, 2));
    assert_eq!(summary.margin, None);

    // No prompts, and no slots.
    for shape in [[0i64, 4], [3, 0]] {
        let empty = Tensor::zeros(shape, (Kind::Float, Device::Cpu));
        let b = PreferenceBatch::new(&empty, &empty.ones_like(), &empty).expect("empty batch");
        let eos_batch = PreferenceBatch::new(&empty, &empty.ones_like(), &empty)
            .and_then(|b| b.with_eos(&empty, &empty.gt(0.0)))
            .expect("empty batch with EOS");
        for mode in [
            EosMode::TargetLength(TargetLength::PromptLongest),
            EosMode::TargetLength(TargetLength::BatchLongest),
        ] {
            let regularizer = EosRegularizer { lambda: 1.0, mode };
            assert_eq!(
                regularizer
                    .compute(&eos_batch)
                    .expect("loss")
                    .loss
                    .double_value(&[]),
                0.0,
                "{shape:?}"
            );
        }
        for loss in [
            &RefaDynamic::default() as &dyn PreferenceLoss,
            &InfoNca::default(),
            &RefaOneVsAll::default(),
        ] {
            assert_eq!(
                loss.compute(&b).expect("loss").loss.double_value(&[]),
                0.0,
                "{shape:?}"
            );
        }
    }
}

fn flags(rows: &[[bool; 3]]) -> Tensor {
    Tensor::from_slice2(rows)
}

/// Explicit sets: each broken rule is an `InvalidValue` naming the set, the prompt (and slot)
/// and the rule; a prompt with both sets empty is skipped, not an error.
#[test]
fn explicit_sets_that_overlap_touch_masked_slots_or_lack_a_side_are_refused() {
    let mask = flags(&[[true, true, false], [true, true, true]]);
    let base = || batch().with_mask(&mask).expect("mask");
    let fails = |positive: &[[bool; 3]], negative: &[[bool; 3]]| {
        let with_sets = base()
            .with_sets(&flags(positive), &flags(negative))
            .expect("shapes and kinds are fine");
        RefaDynamic::default().compute(&with_sets).unwrap_err()
    };
    type Sets<'a> = &'a [[bool; 3]; 2];
    let cases: [(Sets, Sets, &str, &str, &str); 4] = [
        (
            &[[true, false, true], [true, false, false]],
            &[[false, true, false], [false, true, false]],
            "positive",
            "prompt 0, slot 2",
            "masked slots",
        ),
        (
            &[[true, false, false], [true, false, false]],
            &[[false, true, false], [true, true, false]],
            "positive",
            "prompt 1, slot 0",
            "disjoint",
        ),
        (
            &[[true, false, false], [false, false, false]],
            &[[false, true, false], [false, true, false]],
            "positive",
            "prompt 1",
            "non-empty",
        ),
        (
            &[[true, false, false], [true, false, false]],
            &[[false, true, false], [false, false, false]],
            "negative",
            "prompt 1",
            "non-empty",
        ),
    ];
    for (positive, negative, tensor, position, rule) in cases {
        let err = fails(positive, negative);
        match &err {
            RefaError::InvalidValue {
                tensor: t,
                position: p,
                requirement,
                ..
            } => {
                assert_eq!(*t, tensor, "{err}");
                assert!(p.starts_with(position), "{err}");
                assert!(requirement.contains(rule), "{err}");
            }
            other => panic!("expected InvalidValue, got {other}"),
        }
    }
    // Both sets empty in prompt 1: it is skipped.
    let skipped = base()
        .with_sets(
            &flags(&[[true, false, false], [false, false, false]]),
            &flags(&[[false, true, false], [false, false, false]]),
        )
        .expect("sets");
    let output = RefaDynamic::default().compute(&skipped).expect("loss");
    assert_eq!(output.metrics.summary().expect("summary").prompts_used, 1);

    let err = batch()
        .with_sets(
            &flags(&[[true, false, false], [true, false, false]]),
            &rewards(),
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            RefaError::WrongKind {
                tensor: "negative",
                ..
            }
        ),
        "{err}"
    );
    let err = refa_loss::top_bottom_sets(&rewards(), &mask, 0, 2).unwrap_err();
    assert!(
        matches!(err, RefaError::InvalidSetting { name: "top", .. }),
        "{err}"
    );
}

/// `LossConfig` builds every loss with its paper defaults (checked against the structs'
/// `Default`s through the loss on one batch), applies the flags that belong to the loss,
/// refuses those that do not, and adds the EOS regularizer with the mode's default λ.
#[test]
fn loss_config_builds_each_loss_and_refuses_foreign_settings() {
    use refa_loss::{EosKind, LossConfig, LossKind, PreferenceLoss};
    let reference = t(&[[-2.0, -6.0, -3.0], [-1.0, -5.0, -2.0]]);
    let value = |loss: &dyn PreferenceLoss| {
        let batch = batch()
            .with_reference(&reference)
            .and_then(|b| b.with_eos(&logp(), &rewards().gt(2.0)))
            .expect("batch");
        loss.compute(&batch).expect("loss").loss.double_value(&[])
    };
    let expected: [(LossKind, Box<dyn PreferenceLoss>); 5] = [
        (LossKind::RefaDynamic, Box::new(RefaDynamic::default())),
        (LossKind::RefaOneVsAll, Box::new(RefaOneVsAll::default())),
        (LossKind::InfoNcaReference, Box::new(InfoNca::original())),
        (LossKind::Simpo, Box::new(SimPo::default())),
        (LossKind::Mpo, Box::new(Mpo::default())),
    ];
    for (kind, loss) in expected {
        let config = LossConfig {
            loss: kind,
            ..Default::default()
        };
        assert_eq!(
            value(config.build().expect("build").as_ref()),
            value(loss.as_ref()),
            "{kind:?}"
        );
    }
    let tuned = LossConfig {
        beta: Some(2.5),
        gamma: Some(1.2),
        ..Default::default()
    };
    let direct = RefaDynamic {
        beta: 2.5,
        gamma: 1.2,
        ..Default::default()
    };
    assert_eq!(
        value(tuned.build().expect("build").as_ref()),
        value(&direct)
    );
    let dpo = LossConfig {
        loss: LossKind::Dpo,
        length_normalize: Some(true),
        ..Default::default()
    };
    let direct = Dpo {
        length_normalize: true,
        ..Default::default()
    };
    assert_eq!(value(dpo.build().expect("build").as_ref()), value(&direct));

    for (config, culprit) in [
        (
            LossConfig {
                loss: LossKind::Simpo,
                gamma: Some(2.0),
                ..Default::default()
            },
            "gamma",
        ),
        (
            LossConfig {
                loss: LossKind::RefaDynamic,
                tau: Some(1.0),
                ..Default::default()
            },
            "tau",
        ),
        (
            LossConfig {
                loss: LossKind::Dpo,
                alpha: Some(0.1),
                ..Default::default()
            },
            "alpha",
        ),
        (
            LossConfig {
                eos_budget: Some(9),
                ..Default::default()
            },
            "eos_budget",
        ),
        (
            LossConfig {
                beta: Some(-1.0),
                ..Default::default()
            },
            "beta",
        ),
    ] {
        let err = config.build().err().expect("refused");
        assert!(err.to_string().contains(culprit), "{culprit}: {err}");
    }

    let eos = LossConfig {
        eos_mode: Some(EosKind::TargetLength),
        ..Default::default()
    };
    let direct = RefaDynamic::default().with_regularizer(EosRegularizer::new(
        EosMode::TargetLength(TargetLength::PromptLongest),
    ));
    assert_eq!(value(eos.build().expect("build").as_ref()), value(&direct));
    let off = LossConfig {
        eos_lambda: Some(0.0),
        eos_mode: Some(EosKind::Budgeted),
        ..Default::default()
    };
    assert_eq!(off.build().expect("build").name(), "RefaDynamic");
}

/// I/O and libtorch errors keep the error they came from as their `source()`.
#[test]
fn io_and_libtorch_errors_keep_their_source() {
    use std::error::Error;
    let io = RefaError::io(
        "missing.json",
        &std::io::Error::from(std::io::ErrorKind::NotFound),
    );
    let source = io.source().expect("an io source");
    assert!(source.to_string().contains("not found"), "{source}");
    let torch: RefaError = Tensor::zeros([2], (Kind::Float, Device::Cpu))
        .f_view([3])
        .unwrap_err()
        .into();
    assert!(torch.source().is_some(), "{torch}");
    assert_eq!(torch.clone(), torch, "still Clone and PartialEq");
}

/// The data readers (feature `trainer`): a malformed file, line, record or field stops the
/// read with an error that names the file, the line (or row) and the field, and says what to
/// do; what a common writer produces (a byte-order mark, a JSON array of records, repeated
/// parquet rows) is read.
#[cfg(feature = "trainer")]
mod data {
    use std::path::Path;

    use refa_loss::data::{
        parse_jsonl, parse_jsonl_bytes, read_dataset, DataFormat, PreferenceRecord, ReadReport,
        ScoreField,
    };
    use refa_loss::RefaError;

    const SIMPLE: &str = r#"{"prompt": "Why?", "responses": [{"text": "Because.", "score": 1.5}, {"text": "No idea.", "score": 0.0}]}"#;
    const MULTI: &str = r#"{"prompt": "2 + 2?", "all_generated_responses": ["4", "5"], "all_rm_scores": [0.9, -1.2]}"#;

    fn read(bytes: &[u8], skip: bool) -> refa_loss::Result<ReadReport> {
        parse_jsonl_bytes(
            bytes,
            "d.jsonl",
            DataFormat::Auto,
            ScoreField::Overall,
            skip,
        )
    }

    fn records(text: &str) -> Vec<PreferenceRecord> {
        read(text.as_bytes(), false).expect("reads").records
    }

    /// The line and message of the [`RefaError::Data`] reading `bytes` ends in.
    fn data_error(bytes: &[u8]) -> (usize, String) {
        match read(bytes, false) {
            Err(RefaError::Data {
                path,
                line,
                message,
            }) => {
                assert_eq!(path, "d.jsonl");
                (line, message)
            }
            other => panic!("expected a data error, got {other:?}"),
        }
    }

    /// The message of the [`RefaError::Config`] reading `bytes` ends in.
    fn file_error(bytes: &[u8]) -> String {
        match read(bytes, false) {
            Err(err @ RefaError::Config { .. }) => {
                assert!(err.to_string().starts_with("d.jsonl: "), "{err}");
                err.to_string()
            }
            other => panic!("expected a file error, got {other:?}"),
        }
    }

    #[test]
    fn a_byte_order_mark_is_ignored_at_the_start_of_a_file_or_a_line() {
        let plain = records(&format!("{SIMPLE}\n{MULTI}\n"));
        assert_eq!(plain.len(), 2);
        assert_eq!(records(&format!("\u{feff}{SIMPLE}\r\n{MULTI}\r\n")), plain);
        // Files concatenated with `cat`, the second with its own mark.
        assert_eq!(records(&format!("{SIMPLE}\n\u{feff}{MULTI}\n")), plain);
        assert_eq!(records(&format!("\u{feff}[{SIMPLE},\n{MULTI}]")), plain);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bom.jsonl");
        std::fs::write(&path, format!("\u{feff}{SIMPLE}\n")).expect("write");
        let report = read_dataset(&path, DataFormat::Auto, ScoreField::Overall, false);
        assert_eq!(report.expect("reads").records, plain[..1]);
    }

    #[test]
    fn python_nan_and_infinity_in_scores_name_the_line_and_the_field() {
        let cases = [
            (
                r#"{"prompt": "p", "all_generated_responses": ["a", "b"], "all_rm_scores": [1.0, NaN]}"#,
                "`all_rm_scores[1]` is NaN",
            ),
            (
                r#"{"prompt": "p", "responses": [{"text": "a", "score": Infinity}, {"text": "b", "score": 0}]}"#,
                "`responses[0].score` is Infinity",
            ),
            (
                r#"{"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 2, "score_rejected": -Infinity}"#,
                "`score_rejected` is -Infinity",
            ),
            (
                r#"{"instruction": "p", "completions": [{"response": "a", "overall_score": 7}, {"response": "b", "overall_score": NaN}]}"#,
                "`completions[1].overall_score` is NaN",
            ),
            (
                r#"{"instruction": "p", "completions": [{"response": "a", "overall_score": "nan"}]}"#,
                "`completions[0].overall_score` is the string \"nan\"",
            ),
        ];
        for (line, named) in cases {
            let text = format!("{SIMPLE}\n{line}\n");
            let (at, message) = data_error(text.as_bytes());
            assert_eq!(at, 2, "{message}");
            assert!(message.starts_with(named), "{message}");
            assert!(
                message.contains("scores must be finite numbers"),
                "{message}"
            );
            let skipped = read(text.as_bytes(), true).expect("skips");
            assert_eq!(skipped.records.len(), 1);
            assert_eq!(skipped.skipped[0].0, 2);
            assert!(
                skipped.skipped[0].1.starts_with("line 2: "),
                "{:?}",
                skipped.skipped
            );
        }
        let err = read(format!("{SIMPLE}\n{}\n", cases[0].0).as_bytes(), false).unwrap_err();
        assert!(err.to_string().starts_with("d.jsonl, line 2: "), "{err}");
        assert!(err.to_string().contains("Python's json module"), "{err}");
        // A NaN in a field the reader does not use changes nothing.
        let unused = r#"{"instruction": "p", "completions": [{"response": "a", "overall_score": 7, "annotations": {"x": NaN}}]}"#;
        assert_eq!(records(unused)[0].responses[0].score, 7.0);
        // A text field that holds one says so.
        let (_, message) = data_error(br#"{"prompt": NaN, "responses": []}"#);
        assert!(message.starts_with("`prompt` is NaN"), "{message}");
    }

    #[test]
    fn scores_a_32_bit_float_cannot_hold_are_refused_at_read_time() {
        let line = |score: &str| {
            format!(
                r#"{{"prompt": "p", "responses": [{{"text": "a", "score": 1}}, {{"text": "b", "score": {score}}}]}}"#
            )
        };
        for (score, says) in [
            ("1e300", "beyond the ±3.4e38 of a 32-bit float"),
            ("-4e38", "beyond the ±3.4e38 of a 32-bit float"),
            ("1e400", "1e400, beyond the range of a 64-bit float"),
            ("1e-60", "rounds to 0"),
        ] {
            let (at, message) = data_error(format!("{SIMPLE}\n{}\n", line(score)).as_bytes());
            assert_eq!(at, 2, "{message}");
            assert!(message.starts_with("`responses[1].score` is "), "{message}");
            assert!(message.contains(says), "{score}: {message}");
        }
        for score in ["3e38", "-3e38", "1e-30", "0", "-0.0"] {
            let read = records(&line(score))[0].responses[1].score;
            let exact: f64 = score.parse().unwrap();
            assert!(
                (read - exact).abs() <= exact.abs() * 1e-15,
                "{score}: {read}"
            );
        }
        // UltraFeedback's scores written as strings are held to the same range.
        let (_, message) = data_error(
            br#"{"instruction": "p", "completions": [{"response": "a", "overall_score": "1e39"}]}"#,
        );
        assert!(
            message.starts_with("`completions[0].overall_score` is 1e39, beyond"),
            "{message}"
        );
    }

    #[test]
    fn a_json_array_of_records_reads_as_its_lines_would() {
        let jsonl = format!("{SIMPLE}\n{MULTI}\n");
        let expected = records(&jsonl);
        // As `json.dump(records, f, indent=2)` writes it.
        let pretty = |values: &[&str]| {
            let values: Vec<serde_json::Value> = values
                .iter()
                .map(|v| serde_json::from_str(v).expect("json"))
                .collect();
            serde_json::to_string_pretty(&values).expect("pretty")
        };
        let text = pretty(&[SIMPLE, MULTI]);
        let report = read(text.as_bytes(), false).expect("an array");
        assert_eq!(report.records, expected);
        // The lines where `to_string_pretty` opens each record.
        let starts = |text: &str| -> Vec<usize> {
            let lines = text.lines().enumerate();
            lines
                .filter(|(_, l)| *l == "  {")
                .map(|(i, _)| i + 1)
                .collect()
        };
        let second = starts(&text)[1];
        assert_eq!(report.origin(0), Some("d.jsonl, line 2".to_string()));
        assert_eq!(report.origin(1), Some(format!("d.jsonl, line {second}")));
        assert_eq!(
            read(b"[{}]".as_slice(), true).expect("one").skipped.len(),
            1
        );
        assert!(read(b"  [ ]\n".as_slice(), false)
            .expect("none")
            .records
            .is_empty());

        // A bad record: named by the line it starts on and its place in the array, or skipped.
        let bad = r#"{"prompt": "p", "responses": [{"text": "a", "score": "high"}]}"#;
        let text = pretty(&[SIMPLE, bad, MULTI]);
        let start = starts(&text)[1];
        let (line, message) = data_error(text.as_bytes());
        assert_eq!(
            message,
            "record 2 of the JSON array: `responses[0].score` is the string \"high\", \
             expected a finite number (scores must be finite numbers)"
        );
        assert_eq!(line, start, "{text}");
        let skipped = read(text.as_bytes(), true).expect("skips");
        assert_eq!(skipped.records, expected);
        assert_eq!(skipped.skipped[0].0, start);

        // JSON syntax inside a record names the line of the file; NaN is named as in JSONL.
        let (line, message) = data_error(b"[\n{\"prompt\": \"p\",\n \"responses\": [}\n]");
        assert_eq!(line, 3);
        assert!(
            message.contains("`}` closes the `[` opened on line 3"),
            "{message}"
        );
        let (line, message) = data_error(b"[\n{\"prompt\": \"p\",\n \"responses\": x}\n]");
        assert_eq!(line, 2);
        assert!(message.contains("(line 3, column 15)"), "{message}");
        let nan = b"[\n{\"prompt\": \"p\", \"all_generated_responses\": [\"a\"],\n \"all_rm_scores\": [NaN]}]";
        let (line, message) = data_error(nan);
        assert_eq!(line, 2);
        assert!(message.contains("`all_rm_scores[0]` is NaN"), "{message}");
        // The array's own shape: it must close, and hold nothing after it.
        let (line, message) = data_error(format!("[\n{SIMPLE},\n{MULTI}\n").as_bytes());
        assert_eq!(line, 1);
        assert!(message.contains("never closes"), "{message}");
        let (line, message) = data_error(format!("[{SIMPLE}]\n[{MULTI}]\n").as_bytes());
        assert_eq!(line, 2);
        assert!(message.contains("text follows the JSON array"), "{message}");
        let (line, message) = data_error(format!("[\n{SIMPLE},\n]").as_bytes());
        assert_eq!(line, 3);
        assert!(message.contains("comma"), "{message}");

        // A `.json` file through read_dataset.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("train.json");
        std::fs::write(&path, pretty(&[SIMPLE, MULTI])).expect("write");
        let report = read_dataset(&path, DataFormat::Auto, ScoreField::Overall, false);
        assert_eq!(report.expect("reads").records, expected);
    }

    #[test]
    fn fields_of_the_wrong_type_are_named_by_their_path() {
        let cases: [(&str, &str); 9] = [
            (
                r#"{"prompt": 3, "responses": []}"#,
                "`prompt` is the number 3, expected a string or a list of messages",
            ),
            (
                r#"{"prompt": "p", "responses": [{"text": "a", "score": 1}, {"text": null, "score": 0}]}"#,
                "`responses[1].text` is null, expected a string",
            ),
            (
                r#"{"prompt": "p", "responses": [{"text": "a"}]}"#,
                "missing field `responses[0].score`",
            ),
            (
                r#"{"prompt": "p", "responses": {"text": "a"}}"#,
                "`responses` is an object, expected a list",
            ),
            (
                r#"{"prompt": "p", "all_generated_responses": "a", "all_rm_scores": [1]}"#,
                "`all_generated_responses` is the string \"a\", expected a list",
            ),
            (
                r#"{"prompt": [{"role": "user", "content": ["part"]}], "chosen": "a", "rejected": "b"}"#,
                "`prompt[0].content` is a list of 1 item, expected a string",
            ),
            (
                r#"{"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}"#,
                "missing field `prompt[0].content`",
            ),
            (
                r#"{"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": "9"}"#,
                "`score_chosen` is the string \"9\", expected a finite number",
            ),
            (
                r#""just text""#,
                "the record is the string \"just text\", expected a JSON object",
            ),
        ];
        for (line, named) in cases {
            let (at, message) = data_error(format!("{SIMPLE}\n{line}\n").as_bytes());
            assert_eq!(at, 2, "{message}");
            assert!(message.starts_with(named), "{line}: {message}");
        }
        let (_, message) = data_error(br#"{"question": "p", "answers": []}"#);
        assert!(
            message.starts_with("no known format") && message.contains("`answers`, `question`"),
            "{message}"
        );
        let (_, message) = data_error(
            br#"{"prompt": [{"role": "system", "content": "s"}], "chosen": "a", "rejected": "b"}"#,
        );
        assert!(
            message.contains("must end with the user's turn (the last is the \"system\" turn)"),
            "{message}"
        );
    }

    #[test]
    fn files_that_are_not_json_text_say_what_they_are() {
        let utf16: Vec<u8> = "\u{feff}{}\n"
            .encode_utf16()
            .flat_map(|unit| unit.to_le_bytes())
            .collect();
        for (bytes, says) in [
            (utf16, "UTF-16 text"),
            (b"\x1f\x8b\x08\x00rest".to_vec(), "gzip-compressed"),
            (b"\x28\xb5\x2f\xfdrest".to_vec(), "zstd-compressed"),
            (
                b"PAR1\x15\x04rest".to_vec(),
                "a parquet file: name it *.parquet",
            ),
        ] {
            let message = file_error(&bytes);
            assert!(message.contains(says), "{message}");
        }
        // UTF-16 without its mark: NUL bytes in every line.
        let utf16: Vec<u8> = format!("{SIMPLE}\n")
            .encode_utf16()
            .flat_map(|unit| unit.to_le_bytes())
            .collect();
        let (line, message) = data_error(&utf16);
        assert_eq!(line, 1);
        assert!(
            message.contains("NUL bytes: is the file UTF-16"),
            "{message}"
        );
        let mut latin1 = format!("{SIMPLE}\n").into_bytes();
        latin1.extend_from_slice(b"{\"prompt\": \"caf\xe9\", \"responses\": []}\n");
        let (line, message) = data_error(&latin1);
        assert_eq!(line, 2);
        assert!(
            message.starts_with("not UTF-8 text (byte 0xE9 at column"),
            "{message}"
        );
    }

    #[test]
    fn one_pretty_printed_object_is_named_as_such() {
        let wrapped = format!("{{\n  \"data\": [\n    {SIMPLE}\n  ],\n  \"version\": 2\n}}\n");
        let message = file_error(wrapped.as_bytes());
        assert!(
            message.contains("one JSON object spread over 6 lines (keys: data, version)"),
            "{message}"
        );
        // A record cut over lines in the middle of a JSONL file is that line's error.
        let (line, message) = data_error(format!("{SIMPLE}\n{{\"prompt\":\n\"p\"}}\n").as_bytes());
        assert_eq!(line, 2);
        assert!(
            message.contains("a JSONL record must fit on one line"),
            "{message}"
        );
        // The last line of a file cut short, without its newline.
        let (line, message) =
            data_error(format!("{SIMPLE}\n{SIMPLE}\n{{\"prompt\": \"p").as_bytes());
        assert_eq!(line, 3);
        assert!(
            message.contains("the file ends inside this record: it was cut short"),
            "{message}"
        );
        // Records separated by commas as in an array, without its brackets.
        let (line, message) = data_error(format!("{SIMPLE},\n{SIMPLE},\n").as_bytes());
        assert_eq!(line, 1);
        assert!(message.contains("a comma follows the record"), "{message}");
    }

    /// Classic Mac OS line ends (\r alone) end lines like \n and \r\n.
    #[test]
    fn carriage_returns_alone_end_lines() {
        let expected = records(&format!("{SIMPLE}\n{MULTI}\n"));
        assert_eq!(records(&format!("{SIMPLE}\r{MULTI}\r")), expected);
        let (line, _) = data_error(format!("{SIMPLE}\r{{\"prompt\": 3}}\r").as_bytes());
        assert_eq!(line, 2);
    }

    /// Shards whose extension is in capitals are read with the others, not left out.
    #[test]
    fn shard_extensions_match_in_any_case() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a.jsonl"), format!("{SIMPLE}\n")).expect("write");
        std::fs::write(dir.path().join("b.JSONL"), format!("{MULTI}\n")).expect("write");
        let report = read_dataset(dir.path(), DataFormat::Auto, ScoreField::Overall, false);
        assert_eq!(
            report.expect("reads").records,
            records(&format!("{SIMPLE}\n{MULTI}\n"))
        );
    }

    /// A shard that is a symbolic link to nothing names the link's target.
    #[test]
    fn a_dangling_symbolic_link_names_its_target() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a.jsonl"), format!("{SIMPLE}\n")).expect("write");
        std::os::unix::fs::symlink("gone.jsonl", dir.path().join("b.jsonl")).expect("link");
        std::os::unix::fs::symlink("gone.parquet", dir.path().join("c.parquet")).expect("link");
        let err =
            read_dataset(dir.path(), DataFormat::Auto, ScoreField::Overall, false).unwrap_err();
        assert!(matches!(err, RefaError::Io { .. }), "{err}");
        assert!(
            err.to_string()
                .ends_with("b.jsonl: a symbolic link to gone.jsonl, which does not exist"),
            "{err}"
        );
        std::fs::remove_file(dir.path().join("b.jsonl")).expect("remove");
        let err =
            read_dataset(dir.path(), DataFormat::Auto, ScoreField::Overall, false).unwrap_err();
        assert!(
            err.to_string()
                .contains("c.parquet: a symbolic link to gone.parquet"),
            "{err}"
        );
    }

    #[test]
    fn malformed_lines_name_the_column_and_deep_or_huge_lines_end_cleanly() {
        let (_, message) = data_error(br#"{"prompt": "p", "responses": [}"#);
        assert!(message.ends_with("at column 31"), "{message}");
        let deep = format!(
            r#"{{"prompt": "p", "responses": [], "x": {}{}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let (_, message) = data_error(deep.as_bytes());
        assert!(
            message.contains("nested more than 128 levels deep"),
            "{message}"
        );
        let long = "x".repeat(20 << 20);
        let huge = format!(r#"{{"prompt": "{long}", "responses": [{{"text": "a", "score": 1}}]}}"#);
        assert_eq!(records(&huge)[0].prompt.len(), long.len());
        assert!(read(b"", false).expect("empty").records.is_empty());
        assert!(read(b"\n \n\r\n", false).expect("blank").records.is_empty());
    }

    #[test]
    fn records_know_the_file_and_line_they_came_from() {
        let text = format!("{SIMPLE}\n\nnot json\n{MULTI}\n");
        let report = parse_jsonl(
            &text,
            "d.jsonl",
            DataFormat::Auto,
            ScoreField::Overall,
            true,
        )
        .expect("skips");
        assert_eq!(report.origin(0), Some("d.jsonl, line 1".to_string()));
        assert_eq!(report.origin(1), Some("d.jsonl, line 4".to_string()));
        assert_eq!(report.origin(2), None);
    }

    #[test]
    fn a_folder_without_data_files_lists_what_it_holds() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("train.json"), "[]").expect("write");
        std::fs::write(dir.path().join("data-00000-of-00001.arrow"), "x").expect("write");
        std::fs::create_dir(dir.path().join("test")).expect("mkdir");
        let err =
            read_dataset(dir.path(), DataFormat::Auto, ScoreField::Overall, false).unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, RefaError::Config { .. }), "{message}");
        assert!(
            message.contains("it holds data-00000-of-00001.arrow, test, train.json"),
            "{message}"
        );
        assert!(message.contains("name one data file"), "{message}");
        let message = read_dataset(
            Path::new(&dir.path().join("test")),
            DataFormat::Auto,
            ScoreField::Overall,
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(message.contains("(it is empty)"), "{message}");
    }
}

/// Parquet files as the Hub's writers make them (Arrow record batches, dictionary encoding):
/// their size says nothing of how many rows they hold, and their floats may be NaN.
#[cfg(feature = "trainer")]
mod parquet_data {
    use std::io::{BufReader, Cursor};
    use std::path::Path;
    use std::sync::Arc;

    use parquet::arrow::ArrowWriter;
    use parquet::basic::Compression;
    use parquet::file::properties::WriterProperties;
    use refa_loss::data::{read_dataset, DataFormat, ScoreField};
    use refa_loss::RefaError;

    const MULTI: &str = r#"{"prompt": "2 + 2?", "all_generated_responses": ["4", "5"], "all_rm_scores": [0.9, -1.2]}"#;

    /// Writes `jsonl` as one row group of parquet, its schema inferred from `schema_from`.
    fn write_parquet(path: &Path, jsonl: &str, schema_from: &str) {
        let (schema, _) =
            arrow_json::reader::infer_json_schema(BufReader::new(Cursor::new(schema_from)), None)
                .expect("schema");
        let schema = Arc::new(schema);
        let batches = arrow_json::ReaderBuilder::new(schema.clone())
            .with_batch_size(1 << 16)
            .build(BufReader::new(Cursor::new(jsonl)))
            .expect("reader");
        let file = std::fs::File::create(path).expect("create");
        let properties = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build();
        let mut writer = ArrowWriter::try_new(file, schema, Some(properties)).expect("writer");
        for batch in batches {
            writer.write(&batch.expect("batch")).expect("write");
        }
        writer.close().expect("close");
    }

    /// 6 400 rows of one record take a few kilobytes: fewer bytes than rows, which a bound
    /// on rows per byte once refused as a damaged file.
    #[test]
    fn a_parquet_file_of_many_repeated_rows_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("repeated.parquet");
        let jsonl = format!("{MULTI}\n").repeat(6400);
        write_parquet(&path, &jsonl, MULTI);
        let bytes = std::fs::metadata(&path).expect("size").len();
        assert!(bytes < 6400, "{bytes} bytes: not the case this test is for");
        let report = read_dataset(&path, DataFormat::Auto, ScoreField::Overall, false)
            .expect("a valid file");
        assert_eq!(report.records.len(), 6400);
        assert!(report.records.iter().all(|r| r == &report.records[0]));
        assert_eq!(report.records[0].responses[1].score, -1.2);
        let last = report.origin(6399).expect("origin");
        assert_eq!(last, format!("{}, row 6400", path.display()));
    }

    /// Text in a binary column without the UTF-8 annotation (as Spark and Impala write it)
    /// reads as its text, not as base64; binary data that is not UTF-8 is named where it is
    /// read as text.
    #[test]
    fn binary_columns_read_as_their_text() {
        use parquet::data_type::{ByteArray, ByteArrayType};
        use parquet::file::writer::SerializedFileWriter;
        use parquet::schema::parser::parse_message_type;

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("binary.parquet");
        let schema = parse_message_type(
            "message m { REQUIRED BYTE_ARRAY prompt; REQUIRED BYTE_ARRAY chosen; \
             REQUIRED BYTE_ARRAY rejected; }",
        )
        .expect("schema");
        let file = std::fs::File::create(&path).expect("create");
        let properties = Arc::new(WriterProperties::builder().build());
        let mut writer =
            SerializedFileWriter::new(file, Arc::new(schema), properties).expect("writer");
        let mut group = writer.next_row_group().expect("row group");
        let columns: [[&[u8]; 2]; 3] = [
            [b"Hi", b"Bye"],
            [b"Hello!", b"Ciao"],
            [b"Go away.", b"\xff\xfe"],
        ];
        for values in columns {
            let mut column = group.next_column().expect("column").expect("three columns");
            let values: Vec<ByteArray> =
                values.iter().map(|v| ByteArray::from(v.to_vec())).collect();
            column
                .typed::<ByteArrayType>()
                .write_batch(&values, None, None)
                .expect("write");
            column.close().expect("close");
        }
        group.close().expect("close");
        writer.close().expect("close");
        let report =
            read_dataset(&path, DataFormat::Auto, ScoreField::Overall, true).expect("reads");
        assert_eq!(report.records.len(), 1);
        assert_eq!(report.records[0].prompt, "Hi");
        assert_eq!(report.records[0].responses[0].text, "Hello!");
        assert_eq!(
            report.skipped[0].1,
            "row 2: `rejected` is 2 bytes of binary data, not UTF-8 text, expected a string or \
             a list of messages ({\"role\": …, \"content\": …})"
        );
    }

    /// A NaN or infinite float in a score column is named by its row and field (the parquet
    /// crate's JSON makes it null, which named no NaN); in a column not read it changes
    /// nothing.
    #[test]
    fn nan_floats_in_parquet_name_the_row_and_the_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nan.parquet");
        let clean = r#"{"prompt": "p", "all_generated_responses": ["a", "b"], "all_rm_scores": [1.0, 0.0], "other": 1.5}"#;
        let nan = r#"{"prompt": "q", "all_generated_responses": ["a", "b"], "all_rm_scores": [1.0, "NaN"], "other": 1.5}"#;
        let inf = r#"{"prompt": "r", "all_generated_responses": ["a", "b"], "all_rm_scores": ["-inf", 0.0], "other": 1.5}"#;
        let unused = r#"{"prompt": "s", "all_generated_responses": ["a", "b"], "all_rm_scores": [1.0, 0.0], "other": "NaN"}"#;
        write_parquet(&path, &format!("{clean}\n{nan}\n{inf}\n{unused}\n"), clean);
        let err = read_dataset(&path, DataFormat::Auto, ScoreField::Overall, false).unwrap_err();
        match &err {
            RefaError::DataRow {
                row: 2, message, ..
            } => assert!(
                message.starts_with("`all_rm_scores[1]` is a NaN float, expected a finite number"),
                "{err}"
            ),
            other => panic!("expected row 2's error, got {other:?}"),
        }
        let report =
            read_dataset(&path, DataFormat::Auto, ScoreField::Overall, true).expect("skips");
        let prompts: Vec<&str> = report.records.iter().map(|r| r.prompt.as_str()).collect();
        assert_eq!(prompts, ["p", "s"]);
        assert_eq!(report.skipped[1].0, 3);
        assert!(
            report.skipped[1]
                .1
                .starts_with("row 3: `all_rm_scores[0]` is an infinite float (-inf)"),
            "{:?}",
            report.skipped
        );
    }
}

/// Configuration files with a UTF-8 byte-order mark (as some editors save them) read as
/// without one; a batch whose template rendered an empty prompt is refused, not laid out
/// around a padding token.
#[cfg(feature = "trainer")]
mod marked_files {
    use refa_loss::data::{collate_shared, TokenizedExample};
    use refa_loss::model::{CausalLm, Encoded, ModelConfig, SaveOptions};
    use refa_loss::RefaError;
    use tch::{Device, Kind};

    #[test]
    fn a_sharded_checkpoint_index_with_a_byte_order_mark_loads() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/data/tiny-config.json"
        );
        let text = std::fs::read_to_string(path).expect("config");
        let config = ModelConfig::from_json(&format!("\u{feff}{text}")).expect("a marked config");
        let model = CausalLm::new(config, Device::Cpu, Kind::Float, None).expect("model");
        let dir = tempfile::tempdir().expect("tempdir");
        let options = SaveOptions {
            kind: Kind::Float,
            shard_bytes: 20_000,
        };
        model.save_pretrained(dir.path(), options).expect("save");
        let index = dir.path().join("model.safetensors.index.json");
        let json = std::fs::read_to_string(&index).expect("sharded");
        std::fs::write(&index, format!("\u{feff}{json}")).expect("write");
        let config = dir.path().join("config.json");
        let json = std::fs::read_to_string(&config).expect("config");
        std::fs::write(&config, format!("\u{feff}{json}")).expect("write");
        CausalLm::from_pretrained(dir.path(), Device::Cpu, Kind::Float, None)
            .expect("loads with the marks");
    }

    #[test]
    fn an_empty_prompt_is_refused_by_the_prefix_sharing_layout() {
        let example = TokenizedExample {
            responses: vec![
                Encoded {
                    prompt: vec![],
                    response: vec![5, 6, 2],
                },
                Encoded {
                    prompt: vec![],
                    response: vec![7, 2],
                },
            ],
            rewards: vec![1.0, 0.0],
        };
        let err = collate_shared(&[&example], 0, Device::Cpu).unwrap_err();
        assert!(matches!(err, RefaError::Config { .. }), "{err}");
        assert!(err.to_string().contains("prompt of no tokens"), "{err}");
        assert!(err.to_string().contains("chat template"), "{err}");
    }
}

/// Text made of JSON's punctuation, Python's non-finite literals, escapes and multi-byte
/// characters, read as JSONL and as a JSON array: records or a named error, never a panic,
/// and every score read is finite and within f32.
#[cfg(feature = "trainer")]
mod data_fuzz {
    use proptest::prelude::*;
    use refa_loss::data::{parse_jsonl_bytes, DataFormat, ScoreField};

    const PIECES: &[&str] = &[
        "[",
        "]",
        "{",
        "}",
        ",",
        ":",
        "\"",
        "\\",
        "\n",
        "\r",
        " ",
        "NaN",
        "-Infinity",
        "Infinity",
        "1e400",
        "1e300",
        "-3.5",
        "0",
        "null",
        "true",
        "\u{feff}",
        "é",
        "\"prompt\"",
        "\"responses\"",
        "\"text\"",
        "\"score\"",
        "\"chosen\"",
        "\"rejected\"",
        "\"all_generated_responses\"",
        "\"all_rm_scores\"",
        "\"completions\"",
        "\"response\"",
        "\"overall_score\"",
        "\"instruction\"",
        "\"a\"",
        "{\"prompt\": \"p\", \"responses\": [{\"text\": \"a\", \"score\": ",
    ];

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, rng_seed: proptest::test_runner::RngSeed::Fixed(0x0DA7_A5EE), ..ProptestConfig::default() })]

        #[test]
        fn json_like_text_never_panics_the_readers(
            pieces in prop::collection::vec(prop::sample::select(PIECES), 0..60),
            array in any::<bool>(),
            skip in any::<bool>(),
        ) {
            let mut text = String::from(if array { "[" } else { "" });
            text.extend(pieces);
            for format in [DataFormat::Auto, DataFormat::Simple, DataFormat::Pairwise] {
                if let Ok(report) =
                    parse_jsonl_bytes(text.as_bytes(), "fuzz", format, ScoreField::Overall, skip)
                {
                    for record in &report.records {
                        for response in &record.responses {
                            prop_assert!((response.score as f32).is_finite(), "{text:?}");
                        }
                    }
                    for (index, _) in report.records.iter().enumerate() {
                        prop_assert!(report.origin(index).is_some());
                    }
                }
            }
        }
    }
}
