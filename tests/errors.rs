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
