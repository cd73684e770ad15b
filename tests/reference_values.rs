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
fn masked_slots_and_steps_get_exactly_zero_gradient_and_no_gradient_is_nan() {
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
        let slot_mask = tensors.mask.to_kind(tch::Kind::Double);
        // Per-step inputs count as masked where the slot is masked or the step is not part
        // of the response.
        let step_mask = tensors
            .mask
            .unsqueeze(-1)
            .logical_and(&tensors.step_mask)
            .to_kind(tch::Kind::Double);
        let leaves = [
            (&tensors.logp_sum, &slot_mask),
            (&tensors.ref_logp_sum, &slot_mask),
            (&tensors.eos_logp, &slot_mask),
            (&tensors.steps, &step_mask),
        ];
        for case in all_cases(&mut rng) {
            tensors.zero_grads();
            let output = case.loss.compute(&tensors.batch()).expect("loss");
            output.loss.backward();
            for (leaf, mask) in leaves {
                let grad = leaf.grad();
                if !grad.defined() {
                    continue;
                }
                for (g, m) in values(&grad).iter().zip(values(mask)) {
                    assert!(g.is_finite(), "seed {seed}, {}: gradient {g}", case.label);
                    if m == 0.0 {
                        assert_eq!(
                            *g, 0.0,
                            "seed {seed}, {}: masked input got gradient",
                            case.label
                        );
                    }
                }
            }
        }
    }
}

/// `top_bottom_sets` against the plain reference on random batches (ties, masks, prompts
/// with fewer valid slots than `top + bottom`), and the paper's top-2 against bottom-2 of 5.
#[test]
fn top_bottom_sets_match_the_reference() {
    use rand::Rng;
    for seed in 0..200 {
        let mut rng = rng(4000 + seed);
        let batch = random_batch(&mut rng, BatchSpec::default());
        let tensors = Tensors::new(&batch);
        let (top, bottom) = (rng.gen_range(1..4), rng.gen_range(1..4));
        let (positive, negative) =
            refa_loss::top_bottom_sets(&tensors.rewards, &tensors.mask, top, bottom).expect("sets");
        let (positive, negative) = (values(&positive), values(&negative));
        let k = batch.prompts[0].valid.len();
        for (p, prompt) in batch.prompts.iter().enumerate() {
            let (want_positive, want_negative) =
                common::reference::top_bottom(&prompt.rewards, &prompt.valid, top, bottom);
            for slot in 0..k {
                let at = p * k + slot;
                assert_eq!(
                    (positive[at] == 1.0, negative[at] == 1.0),
                    (want_positive[slot], want_negative[slot]),
                    "seed {seed}, top {top}, bottom {bottom}, prompt {p}, slot {slot}: rewards {:?}",
                    prompt.rewards
                );
            }
        }
    }
    let rewards = tch::Tensor::from_slice2(&[[7.0, 3.0, 9.0, 1.0, 5.0], [4.0, 4.0, 4.0, 2.0, 4.0]]);
    let mask = rewards.ones_like().to_kind(tch::Kind::Bool);
    let (positive, negative) = refa_loss::top_bottom_sets(&rewards, &mask, 2, 2).expect("sets");
    assert_eq!(
        values(&positive),
        [1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0],
        "top 2: slots 0 and 2; in the tied prompt the two lowest slots of the 4s"
    );
    assert_eq!(
        values(&negative),
        [0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0],
        "bottom 2: slots 1 and 3; in the tied prompt the 2 alone (the 4 that ties the positives is dropped)"
    );
}
