//! Shared test helpers: random batches, their tensor and reference forms, and loss lists;
//! the example binaries (`examples`) and model folders (`models`) the end-to-end tests use.
#![allow(dead_code)]

pub mod examples;
#[cfg(feature = "model")]
pub mod models;
pub mod reference;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use refa_loss::{
    DeviationMode, Dpo, EosMode, EosRegularizer, InfoNca, InfoNcaVariant, Mpo, PreferenceBatch,
    PreferenceLoss, RefaDynamic, RefaOneVsAll, SimPo, TargetLength,
};
use reference::{DynamicParams, InfoNcaParams, RefBatch, RefPrompt};
use tch::{Kind, Tensor};

/// Deterministic generator for one test.
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Shape and content knobs of a random batch.
#[derive(Debug, Clone, Copy)]
pub struct BatchSpec {
    pub max_prompts: usize,
    pub max_slots: usize,
    pub max_steps: usize,
    /// Probability that a slot is masked out.
    pub mask_rate: f64,
    /// Probability that a prompt's rewards are all equal (a skipped prompt).
    pub tie_rate: f64,
    /// Probability that the batch gives explicit positive and negative sets.
    pub sets_rate: f64,
}

impl Default for BatchSpec {
    fn default() -> Self {
        BatchSpec {
            max_prompts: 6,
            max_slots: 7,
            max_steps: 9,
            mask_rate: 0.2,
            tie_rate: 0.15,
            sets_rate: 0.3,
        }
    }
}

/// A random batch with ragged masks, skipped prompts and NaN garbage in masked slots.
pub fn random_batch(rng: &mut impl Rng, spec: BatchSpec) -> RefBatch {
    let p = rng.gen_range(1..=spec.max_prompts);
    let k = rng.gen_range(1..=spec.max_slots);
    let t = rng.gen_range(1..=spec.max_steps);
    let explicit_sets = rng.gen_bool(spec.sets_rate);
    let prompts = (0..p)
        .map(|_| {
            let mut prompt = random_prompt(rng, k, t, spec);
            if explicit_sets {
                prompt.sets = Some(random_sets(rng, &prompt.valid));
            }
            poison_masked_slots(&mut prompt);
            prompt
        })
        .collect();
    RefBatch { prompts }
}

/// Disjoint random `(positive, negative)` subsets of the valid slots, both non-empty, with
/// some slots in neither; both empty (a skipped prompt) a fifth of the time or when fewer
/// than two slots are valid.
fn random_sets(rng: &mut impl Rng, valid: &[bool]) -> (Vec<bool>, Vec<bool>) {
    let k = valid.len();
    let slots: Vec<usize> = (0..k).filter(|&i| valid[i]).collect();
    let (mut positive, mut negative) = (vec![false; k], vec![false; k]);
    if slots.len() < 2 || rng.gen_bool(0.2) {
        return (positive, negative);
    }
    let first_positive = rng.gen_range(0..slots.len());
    let first_negative = (first_positive + rng.gen_range(1..slots.len())) % slots.len();
    positive[slots[first_positive]] = true;
    negative[slots[first_negative]] = true;
    for &i in &slots {
        if !positive[i] && !negative[i] {
            match rng.gen_range(0..3) {
                0 => positive[i] = true,
                1 => negative[i] = true,
                _ => {}
            }
        }
    }
    (positive, negative)
}

fn random_prompt(rng: &mut impl Rng, k: usize, t: usize, spec: BatchSpec) -> RefPrompt {
    let valid: Vec<bool> = (0..k).map(|_| !rng.gen_bool(spec.mask_rate)).collect();
    let tied = rng.gen_bool(spec.tie_rate);
    let tie_value = rng.gen_range(0.0..10.0);
    // Integer-like rewards (as UltraFeedback's) half of the time, so exact ties happen.
    let integer = rng.gen_bool(0.5);
    let rewards = (0..k)
        .map(|_| match (tied, integer) {
            (true, _) => tie_value,
            (false, true) => rng.gen_range(0..=10) as f64,
            (false, false) => rng.gen_range(0.0..10.0),
        })
        .collect();
    let lengths: Vec<f64> = (0..k).map(|_| rng.gen_range(1..=60) as f64).collect();
    let logp = lengths
        .iter()
        .map(|&len| -len * rng.gen_range(0.1..3.0))
        .collect();
    let reference = lengths
        .iter()
        .map(|&len| -len * rng.gen_range(0.1..3.0))
        .collect();
    let eos_logp = (0..k).map(|_| rng.gen_range(-6.0..-0.01)).collect();
    let eos_mask = (0..k).map(|_| rng.gen_bool(0.8)).collect();
    let steps = (0..k)
        .map(|_| (0..t).map(|_| rng.gen_range(-9.0..-0.01)).collect())
        .collect();
    // Each response's steps start after a random "prompt" offset, as the scorers lay them out.
    let step_mask = (0..k)
        .map(|_| {
            let n = rng.gen_range(0..=t);
            let start = rng.gen_range(0..=t - n);
            (0..t).map(|i| (start..start + n).contains(&i)).collect()
        })
        .collect();
    RefPrompt {
        logp,
        lengths,
        rewards,
        valid,
        reference,
        eos_logp,
        eos_mask,
        steps,
        step_mask,
        sets: None,
    }
}

/// Masked slots hold NaN and absurd values: the crate must never read them.
fn poison_masked_slots(p: &mut RefPrompt) {
    for k in 0..p.valid.len() {
        if !p.valid[k] {
            p.logp[k] = f64::NAN;
            p.lengths[k] = -3.0;
            p.rewards[k] = f64::NAN;
            p.reference[k] = f64::INFINITY;
            p.eos_logp[k] = f64::NAN;
            p.steps[k].iter_mut().for_each(|x| *x = f64::NAN);
        }
    }
}

/// `[P, K]` tensor of one field.
pub fn table(b: &RefBatch, field: impl Fn(&RefPrompt) -> &Vec<f64>) -> Tensor {
    let (p, k) = dims(b);
    let flat: Vec<f64> = b.prompts.iter().flat_map(|x| field(x).clone()).collect();
    Tensor::from_slice(&flat).view([p as i64, k as i64])
}

/// `[P, K]` bool tensor of one field.
pub fn flags(b: &RefBatch, field: impl Fn(&RefPrompt) -> &Vec<bool>) -> Tensor {
    let (p, k) = dims(b);
    let flat: Vec<bool> = b.prompts.iter().flat_map(|x| field(x).clone()).collect();
    Tensor::from_slice(&flat).view([p as i64, k as i64])
}

pub fn dims(b: &RefBatch) -> (usize, usize) {
    (b.prompts.len(), b.prompts[0].valid.len())
}

/// The tensors of a batch, f64 leaves that require gradients where a loss may differentiate.
pub struct Tensors {
    pub logp_sum: Tensor,
    pub lengths: Tensor,
    pub rewards: Tensor,
    pub mask: Tensor,
    pub ref_logp_sum: Tensor,
    pub eos_logp: Tensor,
    pub eos_mask: Tensor,
    pub steps: Tensor,
    pub step_mask: Tensor,
    /// Explicit `(positive, negative)` sets, when the batch has them.
    pub sets: Option<(Tensor, Tensor)>,
}

impl Tensors {
    pub fn new(b: &RefBatch) -> Self {
        let (p, k) = dims(b);
        let t = b.prompts[0].steps[0].len() as i64;
        let steps: Vec<f64> = b
            .prompts
            .iter()
            .flat_map(|x| x.steps.iter().flatten().copied())
            .collect();
        let step_mask: Vec<bool> = b
            .prompts
            .iter()
            .flat_map(|x| x.step_mask.iter().flatten().copied())
            .collect();
        Tensors {
            logp_sum: table(b, |x| &x.logp).set_requires_grad(true),
            lengths: table(b, |x| &x.lengths),
            rewards: table(b, |x| &x.rewards),
            mask: flags(b, |x| &x.valid),
            ref_logp_sum: table(b, |x| &x.reference).set_requires_grad(true),
            eos_logp: table(b, |x| &x.eos_logp).set_requires_grad(true),
            eos_mask: flags(b, |x| &x.eos_mask),
            steps: Tensor::from_slice(&steps)
                .view([p as i64, k as i64, t])
                .set_requires_grad(true),
            step_mask: Tensor::from_slice(&step_mask).view([p as i64, k as i64, t]),
            sets: b.prompts[0].sets.is_some().then(|| {
                let set = |i: usize| {
                    flags(b, |x| match &x.sets {
                        Some(sets) => {
                            if i == 0 {
                                &sets.0
                            } else {
                                &sets.1
                            }
                        }
                        None => &x.valid,
                    })
                };
                (set(0), set(1))
            }),
        }
    }

    /// A batch with every optional input.
    pub fn batch(&self) -> PreferenceBatch {
        self.batch_with_leaves(
            &self.logp_sum,
            &self.ref_logp_sum,
            &self.eos_logp,
            &self.steps,
        )
    }

    /// The same batch with other floating-point inputs in place of the leaves (masks,
    /// lengths, rewards and explicit sets are the batch's own).
    pub fn batch_with_leaves(
        &self,
        logp_sum: &Tensor,
        ref_logp_sum: &Tensor,
        eos_logp: &Tensor,
        steps: &Tensor,
    ) -> PreferenceBatch {
        let batch = PreferenceBatch::new(logp_sum, &self.lengths, &self.rewards)
            .and_then(|b| b.with_mask(&self.mask))
            .and_then(|b| b.with_reference(ref_logp_sum))
            .and_then(|b| b.with_eos(eos_logp, &self.eos_mask))
            .and_then(|b| b.with_eos_steps(steps, &self.step_mask));
        match &self.sets {
            Some((positive, negative)) => batch.and_then(|b| b.with_sets(positive, negative)),
            None => batch,
        }
        .expect("valid test batch")
    }

    pub fn zero_grads(&self) {
        for t in [
            &self.logp_sum,
            &self.ref_logp_sum,
            &self.eos_logp,
            &self.steps,
        ] {
            let mut g = t.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }
}

/// A reference computation: `(loss, per_prompt)` of a batch.
pub type Reference = Box<dyn Fn(&RefBatch) -> (f64, Vec<f64>)>;

/// A named loss, with the reference that computes it.
pub struct Case {
    pub label: String,
    pub loss: Box<dyn PreferenceLoss>,
    pub reference: Reference,
}

fn case(
    label: impl Into<String>,
    loss: impl PreferenceLoss + 'static,
    reference: impl Fn(&RefBatch) -> (f64, Vec<f64>) + 'static,
) -> Case {
    Case {
        label: label.into(),
        loss: Box::new(loss),
        reference: Box::new(reference),
    }
}

/// Every loss, every variant and every regularizer mode, with randomized hyperparameters.
pub fn all_cases(rng: &mut impl Rng) -> Vec<Case> {
    let mut cases = Vec::new();
    for mode in [DeviationMode::Absolute, DeviationMode::Signed] {
        for normalize in [true, false] {
            let (beta, gamma, alpha, power) = (
                rng.gen_range(0.5..5.0),
                rng.gen_range(0.3..3.0),
                rng.gen_range(0.0..0.5),
                [1.0, 2.0][rng.gen_range(0..2)],
            );
            let params = move || DynamicParams {
                beta,
                gamma,
                alpha,
                power,
                mode,
                normalize,
            };
            let dynamic = RefaDynamic {
                beta,
                gamma,
                alpha,
                power,
                deviation: mode,
                length_normalize: normalize,
            };
            cases.push(case(format!("{dynamic:?}"), dynamic, move |b| {
                reference::refa_dynamic(b, &params())
            }));
            let one = RefaOneVsAll {
                beta,
                gamma,
                alpha,
                power,
                deviation: mode,
                length_normalize: normalize,
            };
            cases.push(case(format!("{one:?}"), one, move |b| {
                reference::refa_one_vs_all(b, &params())
            }));
        }
    }
    for variant in [
        InfoNcaVariant::Full,
        InfoNcaVariant::PositivesOnly,
        InfoNcaVariant::OneVsAll,
    ] {
        for use_reference in [false, true] {
            let (beta, tau) = (rng.gen_range(0.05..4.0), rng.gen_range(0.2..3.0));
            let normalize = !use_reference;
            let loss = InfoNca {
                beta,
                tau,
                variant,
                use_reference,
                length_normalize: normalize,
            };
            let params = InfoNcaParams {
                beta,
                tau,
                variant,
                reference: use_reference,
                normalize,
            };
            cases.push(case(format!("{loss:?}"), loss, move |b| {
                reference::info_nca(b, &params)
            }));
        }
    }
    let simpo = SimPo {
        beta: rng.gen_range(0.5..4.0),
        margin: rng.gen_range(-1.0..2.0),
        sft_weight: rng.gen_range(0.0..1.0),
        length_normalize: true,
    };
    cases.push(case(format!("{simpo:?}"), simpo, move |b| {
        reference::simpo(b, simpo.beta, simpo.margin, simpo.sft_weight)
    }));
    let dpo = Dpo {
        beta: rng.gen_range(0.01..1.0),
        length_normalize: false,
    };
    cases.push(case(format!("{dpo:?}"), dpo, move |b| {
        reference::dpo(b, dpo.beta)
    }));
    for deviation in [DeviationMode::Absolute, DeviationMode::Signed] {
        let mpo = Mpo {
            beta: rng.gen_range(0.01..1.0),
            alpha: rng.gen_range(0.0..0.5),
            power: 1.0,
            deviation,
            length_normalize: false,
        };
        cases.push(case(format!("{mpo:?}"), mpo, move |b| {
            reference::mpo(b, mpo.beta, mpo.alpha, mpo.power, mpo.deviation)
        }));
    }
    for mode in eos_modes(rng) {
        let eos = EosRegularizer {
            lambda: rng.gen_range(0.0..2.0),
            mode,
        };
        cases.push(case(format!("{eos:?}"), eos, move |b| {
            reference::eos(b, eos.lambda, eos.mode)
        }));
    }
    let dynamic = RefaDynamic::default();
    let eos = EosRegularizer {
        lambda: 0.3,
        mode: EosMode::FinalProbability,
    };
    let params = || DynamicParams {
        beta: 3.0,
        gamma: 2.0,
        alpha: 0.01,
        power: 2.0,
        mode: DeviationMode::Absolute,
        normalize: true,
    };
    cases.push(case(
        "RefaDynamic + EosRegularizer",
        dynamic.with_regularizer(eos),
        move |b| {
            let (l, pl) = reference::refa_dynamic(b, &params());
            let (r, pr) = reference::eos(b, 0.3, EosMode::FinalProbability);
            (l + r, pl.iter().zip(&pr).map(|(a, b)| a + b).collect())
        },
    ));
    cases
}

pub fn eos_modes(rng: &mut impl Rng) -> Vec<EosMode> {
    vec![
        EosMode::FinalProbability,
        EosMode::FinalLogProbability,
        EosMode::TargetLength(TargetLength::PromptLongest),
        EosMode::TargetLength(TargetLength::BatchLongest),
        EosMode::TargetLength(TargetLength::Fixed(rng.gen_range(1.0..80.0))),
        EosMode::Budgeted {
            budget: rng.gen_range(1..8),
        },
    ]
}

/// Reads a tensor as f64 values.
pub fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(&t.detach().to_kind(Kind::Double).flatten(0, -1)).expect("f64 values")
}

/// `|a − b| <= atol + rtol·|b|`.
pub fn close(a: f64, b: f64, atol: f64, rtol: f64) -> bool {
    (a - b).abs() <= atol + rtol * b.abs()
}
