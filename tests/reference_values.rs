//! Every loss, variant and regularizer against the independent f64 reference, on hundreds of
//! random batches with ragged masks, skipped prompts and NaN in masked slots.

mod common;

use common::{all_cases, close, random_batch, rng, values, BatchSpec, Tensors};

/// f64 tolerance: both sides do O(K) exact-to-rounding operations on values of magnitude
/// <= 1e3, so they agree to ~1e-13; 1e-10 (relative to max(1, |value|)) leaves a wide margin
/// and still catches any formula error.
const TOLERANCE: f64 = 1e-10;
const BATCHES: u64 = 300;

#[test]
fn tensor_losses_match_the_f64_reference() {
    let mut worst = 0.0f64;
    let mut evaluations = 0;
    for seed in 0..BATCHES {
        let mut rng = rng(seed);
        let batch = random_batch(&mut rng, BatchSpec::default());
        let tensors = Tensors::new(&batch);
        for case in all_cases(&mut rng) {
            let output = case
                .loss
                .compute(&tensors.batch())
                .unwrap_or_else(|e| panic!("{}: {e}", case.label));
            let (expected, expected_per_prompt) = (case.reference)(&batch);
            let got = output.loss.double_value(&[]);
            let got_per_prompt = values(&output.per_prompt);
            for (g, e) in std::iter::once((got, expected))
                .chain(got_per_prompt.into_iter().zip(expected_per_prompt))
            {
                worst = worst.max((g - e).abs() / e.abs().max(1.0));
                assert!(
                    close(g, e, TOLERANCE, TOLERANCE),
                    "seed {seed}, {}: got {g}, reference {e}",
                    case.label
                );
            }
            evaluations += 1;
        }
    }
    println!("{evaluations} loss evaluations; largest relative discrepancy {worst:e}");
}

#[test]
fn masked_slots_get_exactly_zero_gradient_and_no_gradient_is_nan() {
    for seed in 0..60 {
        let mut rng = rng(1000 + seed);
        let batch = random_batch(
            &mut rng,
            BatchSpec {
                mask_rate: 0.4,
                ..Default::default()
            },
        );
        let tensors = Tensors::new(&batch);
        let mask = values(&tensors.mask.to_kind(tch::Kind::Double));
        for case in all_cases(&mut rng) {
            tensors.zero_grads();
            let output = case.loss.compute(&tensors.batch()).expect("loss");
            output.loss.backward();
            for leaf in [&tensors.logp_sum, &tensors.ref_logp_sum, &tensors.eos_logp] {
                let grad = leaf.grad();
                if !grad.defined() {
                    continue;
                }
                for (g, m) in values(&grad).iter().zip(&mask) {
                    assert!(g.is_finite(), "seed {seed}, {}: gradient {g}", case.label);
                    if *m == 0.0 {
                        assert_eq!(
                            *g, 0.0,
                            "seed {seed}, {}: masked slot got gradient",
                            case.label
                        );
                    }
                }
            }
        }
    }
}
