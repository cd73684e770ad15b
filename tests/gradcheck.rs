//! Autograd gradients of every loss and variant against central finite differences in f64,
//! with respect to `logp_sum`, `ref_logp_sum`, `eos_logp` and the per-step EOS inputs.

mod common;

use common::{all_cases, random_batch, rng, values, BatchSpec, Case, Tensors};
use refa_loss::PreferenceBatch;
use tch::{Kind, Tensor};

/// Step of the central difference. Its truncation error is O(h²·|L'''|) ~ 1e-12 and its
/// rounding error O(ε·|L|/h) ~ 1e-10 for |L| ~ 1; with scores of magnitude up to ~200
/// (unnormalized), |L'''| can reach ~1e2, so the agreement to ask for is ~1e-7.
const STEP: f64 = 1e-6;
const ATOL: f64 = 1e-7;
const RTOL: f64 = 1e-6;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Leaf {
    LogpSum,
    RefLogpSum,
    EosLogp,
    EosSteps,
}

fn batch_with(t: &Tensors, leaf: Leaf, replacement: &Tensor) -> PreferenceBatch {
    let pick = |l: Leaf, own: &Tensor| {
        if l == leaf {
            replacement.shallow_clone()
        } else {
            own.detach()
        }
    };
    let logp = pick(Leaf::LogpSum, &t.logp_sum);
    let reference = pick(Leaf::RefLogpSum, &t.ref_logp_sum);
    let eos = pick(Leaf::EosLogp, &t.eos_logp);
    let steps = pick(Leaf::EosSteps, &t.steps);
    t.batch_with_leaves(&logp, &reference, &eos, &steps)
}

fn numeric_gradient(case: &Case, t: &Tensors, leaf: Leaf, source: &Tensor, index: usize) -> f64 {
    let flat = source.detach().flatten(0, -1);
    let at = |delta: f64| {
        let shifted = flat.copy();
        let _ = shifted.get(index as i64).g_add_scalar_(delta);
        let batch = batch_with(t, leaf, &shifted.view(source.size().as_slice()));
        case.loss
            .compute(&batch)
            .expect("loss")
            .loss
            .double_value(&[])
    };
    (at(STEP) - at(-STEP)) / (2.0 * STEP)
}

#[test]
fn autograd_matches_central_differences_for_every_loss() {
    let mut checked = 0;
    let mut worst = 0.0f64;
    for seed in 0..12 {
        let mut rng = rng(500 + seed);
        let spec = BatchSpec {
            max_prompts: 3,
            max_slots: 5,
            max_steps: 5,
            ..Default::default()
        };
        let batch = random_batch(&mut rng, spec);
        let t = Tensors::new(&batch);
        for case in all_cases(&mut rng) {
            t.zero_grads();
            let output = case.loss.compute(&t.batch()).expect("loss");
            output.loss.backward();
            for (leaf, source) in [
                (Leaf::LogpSum, &t.logp_sum),
                (Leaf::RefLogpSum, &t.ref_logp_sum),
                (Leaf::EosLogp, &t.eos_logp),
                (Leaf::EosSteps, &t.steps),
            ] {
                let grad = source.grad();
                let analytic = if grad.defined() {
                    values(&grad)
                } else {
                    vec![0.0; source.numel()]
                };
                let valid = values(&valid_mask(&t, leaf));
                for (i, &a) in analytic.iter().enumerate() {
                    if valid[i] == 0.0 {
                        continue; // masked inputs hold NaN: no finite difference exists there
                    }
                    let n = numeric_gradient(&case, &t, leaf, source, i);
                    worst = worst.max((a - n).abs() / n.abs().max(1.0));
                    assert!(
                        (a - n).abs() <= ATOL + RTOL * n.abs(),
                        "seed {seed}, {}, {leaf:?}[{i}]: autograd {a}, finite difference {n}",
                        case.label
                    );
                    checked += 1;
                }
            }
        }
    }
    println!("{checked} partial derivatives checked; largest relative discrepancy {worst:e}");
    assert!(checked > 1000);
}

fn valid_mask(t: &Tensors, leaf: Leaf) -> Tensor {
    match leaf {
        Leaf::EosSteps => t
            .mask
            .unsqueeze(-1)
            .logical_and(&t.step_mask)
            .to_kind(Kind::Double),
        _ => t.mask.to_kind(Kind::Double),
    }
}
