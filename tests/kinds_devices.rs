//! Input kinds (f32, f64, bf16, f16) and devices: results on the inputs' device, in f64 for
//! f64 inputs and f32 otherwise, gradients back in the caller's kind. CUDA tests run on a GPU
//! and skip with a message without one.

mod common;

use common::{all_cases, close, random_batch, rng, values, BatchSpec, Tensors};
use refa_loss::{device, PreferenceBatch, PreferenceLoss, RefaDynamic};
use tch::{Device, Kind, Tensor};

/// Batch from `t`'s tensors converted to `kind` on `device`; returns it and the new logp leaf.
fn converted(t: &Tensors, kind: Kind, device: Device) -> (PreferenceBatch, Tensor) {
    let leaf = |x: &Tensor| x.detach().to_kind(kind).to(device).set_requires_grad(true);
    let logp = leaf(&t.logp_sum);
    let batch = PreferenceBatch::new(&logp, &t.lengths.to(device), &t.rewards.to(device))
        .and_then(|b| b.with_mask(&t.mask.to(device)))
        .and_then(|b| b.with_reference(&leaf(&t.ref_logp_sum)))
        .and_then(|b| b.with_eos(&leaf(&t.eos_logp), &t.eos_mask.to(device)))
        .and_then(|b| b.with_eos_steps(&leaf(&t.steps), &t.step_mask.to(device)))
        .and_then(|b| match &t.sets {
            Some((positive, negative)) => b.with_sets(&positive.to(device), &negative.to(device)),
            None => Ok(b),
        })
        .expect("batch");
    (batch, logp)
}

/// Half-precision inputs compute in f32: the result equals the f64 computation on the same
/// (already rounded) values to f32 accuracy. Tolerance 1e-4 relative: f32 carries ~7 digits,
/// and the losses chain a few dozen operations on values of magnitude up to ~100.
#[test]
fn half_precision_inputs_compute_in_f32_with_gradients_in_their_kind() {
    for kind in [Kind::BFloat16, Kind::Half, Kind::Float] {
        for seed in 0..20 {
            let mut rng = rng(7000 + seed);
            let t = Tensors::new(&random_batch(&mut rng, BatchSpec::default()));
            for case in all_cases(&mut rng) {
                let (low, leaf) = converted(&t, kind, Device::Cpu);
                let output = case.loss.compute(&low).expect("loss");
                assert_eq!(output.loss.kind(), Kind::Float, "{kind:?} {}", case.label);
                output.loss.backward();
                let grad = leaf.grad();
                if grad.defined() {
                    assert_eq!(grad.kind(), kind);
                }
                // The same rounded inputs, in f64.
                let rounded = |x: &Tensor| x.detach().to_kind(kind).to_kind(Kind::Double);
                let exact = Tensors {
                    logp_sum: rounded(&t.logp_sum),
                    ref_logp_sum: rounded(&t.ref_logp_sum),
                    eos_logp: rounded(&t.eos_logp),
                    steps: rounded(&t.steps),
                    lengths: t.lengths.shallow_clone(),
                    rewards: t.rewards.shallow_clone(),
                    mask: t.mask.shallow_clone(),
                    eos_mask: t.eos_mask.shallow_clone(),
                    step_mask: t.step_mask.shallow_clone(),
                    sets: t
                        .sets
                        .as_ref()
                        .map(|(p, n)| (p.shallow_clone(), n.shallow_clone())),
                };
                let expected = case
                    .loss
                    .compute(&exact.batch())
                    .expect("f64 loss")
                    .loss
                    .double_value(&[]);
                let got = output.loss.double_value(&[]);
                assert!(
                    close(got, expected, 1e-4, 1e-4),
                    "{kind:?} seed {seed} {}: {got} vs {expected}",
                    case.label
                );
            }
        }
    }
}

#[test]
fn f64_inputs_compute_in_f64() {
    let t = Tensors::new(&random_batch(&mut rng(3), BatchSpec::default()));
    let output = RefaDynamic::default().compute(&t.batch()).expect("loss");
    assert_eq!(output.loss.kind(), Kind::Double);
    assert_eq!(output.per_prompt.kind(), Kind::Double);
}

#[test]
fn cuda_results_match_cpu_and_stay_on_the_gpu() {
    if !device::cuda_is_available() {
        eprintln!("skipped: no CUDA device (refa_loss::device::cuda_is_available() is false)");
        return;
    }
    let gpu = Device::Cuda(0);
    let mut worst = 0.0f64;
    for seed in 0..40 {
        let mut rng = rng(9000 + seed);
        let t = Tensors::new(&random_batch(&mut rng, BatchSpec::default()));
        for case in all_cases(&mut rng) {
            t.zero_grads();
            let cpu = case.loss.compute(&t.batch()).expect("cpu loss");
            cpu.loss.backward();
            let (batch, leaf) = converted(&t, Kind::Double, gpu);
            let out = case.loss.compute(&batch).expect("gpu loss");
            assert_eq!(out.loss.device(), gpu);
            assert_eq!(out.per_prompt.device(), gpu);
            out.loss.backward();
            let (a, b) = (out.loss.double_value(&[]), cpu.loss.double_value(&[]));
            worst = worst.max((a - b).abs());
            assert!(
                close(a, b, 1e-10, 1e-10),
                "seed {seed} {}: gpu {a} vs cpu {b}",
                case.label
            );
            let grad_of = |x: &Tensor| {
                if x.grad().defined() {
                    values(&x.grad())
                } else {
                    vec![0.0; x.numel()]
                }
            };
            for (g, c) in grad_of(&leaf).iter().zip(grad_of(&t.logp_sum)) {
                assert!(
                    close(*g, c, 1e-12, 1e-10),
                    "seed {seed} {}: gradient {g} vs {c}",
                    case.label
                );
            }
            let (bf16, _) = converted(&t, Kind::BFloat16, gpu);
            assert!(case
                .loss
                .compute(&bf16)
                .expect("bf16 gpu loss")
                .loss
                .double_value(&[])
                .is_finite());
        }
    }
    println!("CUDA vs CPU in f64: largest difference {worst:e}");
}
