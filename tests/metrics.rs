//! The metrics a trainer logs, against values computed by hand.

use refa_loss::{EosRegularizer, InfoNca, PreferenceBatch, PreferenceLoss, RefaDynamic};
use tch::Tensor;

/// Prompt 0: scores s = [−2, −3, −3], rewards [9, 1, 5] (mean 5: slot 2 ties with the mean
/// and is negative). Prompt 1: equal rewards, skipped. EOS probabilities 0.5, 0.25 (prompt 0,
/// slot 2 truncated) and 0.1 (prompt 1, slot 0 only).
fn batch() -> PreferenceBatch {
    let logp = Tensor::from_slice2(&[[-2.0, -6.0, -3.0], [-1.0, -2.0, -3.0]]);
    let lengths = Tensor::from_slice2(&[[1.0, 2.0, 1.0], [1.0, 1.0, 1.0]]);
    let rewards = Tensor::from_slice2(&[[9.0, 1.0, 5.0], [4.0, 4.0, 4.0]]);
    let eos_logp =
        Tensor::from_slice2(&[[0.5f64.ln(), 0.25f64.ln(), -1.0], [0.1f64.ln(), -1.0, -1.0]]);
    let eos_mask = Tensor::from_slice2(&[[true, true, false], [true, false, false]]);
    PreferenceBatch::new(&logp, &lengths, &rewards)
        .and_then(|b| b.with_eos(&eos_logp, &eos_mask))
        .expect("batch")
}

fn assert_close(got: Option<f64>, expected: f64) {
    let got = got.expect("metric present");
    assert!((got - expected).abs() < 1e-12, "{got} vs {expected}");
}

#[test]
fn refa_dynamic_metrics_match_hand_computation() {
    let loss = RefaDynamic {
        beta: 1.0,
        gamma: 1.0,
        alpha: 0.0,
        ..Default::default()
    };
    let m = loss
        .compute(&batch())
        .expect("loss")
        .metrics
        .summary()
        .expect("summary");
    let expected_loss = (1.0 + 2.0 * (-1.0f64).exp()).ln();
    assert!((m.loss - expected_loss).abs() < 1e-12);
    assert_eq!((m.prompts_used, m.prompts_skipped), (1, 1));
    assert_close(m.score_positive, -2.0);
    assert_close(m.score_negative, -3.0);
    assert_close(m.margin, 1.0);
    assert_close(m.positive_mass, 1.0 / (1.0 + 2.0 * (-1.0f64).exp()));
    assert_close(m.accuracy, 1.0);
    assert_close(m.eos_probability, (0.5 + 0.25 + 0.1) / 3.0);
    assert_eq!(m.regularizer, None);
}

#[test]
fn regularized_metrics_add_the_regularizer() {
    let loss = RefaDynamic {
        beta: 1.0,
        gamma: 1.0,
        alpha: 0.0,
        ..Default::default()
    }
    .with_regularizer(EosRegularizer {
        lambda: 1.0,
        ..Default::default()
    });
    let output = loss.compute(&batch()).expect("loss");
    let m = output.metrics.summary().expect("summary");
    // The regularizer averages over both prompts (each has an EOS-terminated response).
    let regularizer = (0.75 + 0.1) / 2.0;
    assert_close(m.regularizer, regularizer);
    assert!((m.loss - ((1.0 + 2.0 * (-1.0f64).exp()).ln() + regularizer)).abs() < 1e-12);
    assert!((output.loss.double_value(&[]) - m.loss).abs() < 1e-15);
    assert_eq!(m.prompts_used, 1);
}

#[test]
fn accuracy_counts_prompts_whose_best_response_scores_highest() {
    // The best response (reward 9) now has the lowest score.
    let logp = Tensor::from_slice2(&[[-5.0, -1.0, -3.0]]);
    let rewards = Tensor::from_slice2(&[[9.0, 1.0, 5.0]]);
    let b = PreferenceBatch::new(&logp, &logp.ones_like(), &rewards).expect("batch");
    let m = InfoNca::default()
        .compute(&b)
        .expect("loss")
        .metrics
        .summary()
        .expect("summary");
    assert_close(m.accuracy, 0.0);
    assert_eq!(m.eos_probability, None);
}
