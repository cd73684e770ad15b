//! Shared set-up of the loss benches: a deterministic random batch and the losses to time.
#![allow(dead_code)]

use refa_loss::{
    Dpo, EosRegularizer, InfoNca, Mpo, PreferenceBatch, PreferenceLoss, RefaDynamic, RefaOneVsAll,
    SimPo,
};
use tch::{Device, Kind, Tensor};

/// The prompt counts and slot counts the issue asks for.
pub const PROMPTS: [i64; 3] = [8, 64, 512];
pub const SLOTS: [i64; 3] = [4, 8, 16];

/// `[P, K]` f32 inputs like a trainer's: log-probability sums, lengths, 0–10 rewards, a mask
/// with one empty slot in every fourth prompt, EOS log-probabilities and a reference.
pub struct Inputs {
    pub logp_sum: Tensor,
    pub lengths: Tensor,
    pub rewards: Tensor,
    pub mask: Tensor,
    pub ref_logp_sum: Tensor,
    pub eos_logp: Tensor,
}

impl Inputs {
    pub fn new(prompts: i64, slots: i64, device: Device) -> Self {
        tch::manual_seed(0);
        let options = (Kind::Float, device);
        let lengths = Tensor::randint_low(16, 512, [prompts, slots], options);
        let logp_sum = -(Tensor::rand([prompts, slots], options) * 2.0 + 0.2) * &lengths;
        let rewards = Tensor::randint(11, [prompts, slots], options);
        let mask = Tensor::ones([prompts, slots], (Kind::Bool, device));
        let _ = mask.slice(0, 0, prompts, 4).select(1, slots - 1).fill_(0);
        let ref_logp_sum = &logp_sum + Tensor::randn([prompts, slots], options);
        let eos_logp = -Tensor::rand([prompts, slots], options) * 3.0;
        Inputs {
            logp_sum,
            lengths,
            rewards,
            mask,
            ref_logp_sum,
            eos_logp,
        }
    }

    /// One forward and backward pass of `loss`, as a trainer runs it.
    pub fn step(&self, loss: &dyn PreferenceLoss, check_values: bool) {
        let logp_sum = self.logp_sum.detach().set_requires_grad(true);
        let batch = PreferenceBatch::new(&logp_sum, &self.lengths, &self.rewards)
            .and_then(|b| b.with_mask(&self.mask))
            .and_then(|b| b.with_reference(&self.ref_logp_sum))
            .and_then(|b| b.with_eos(&self.eos_logp, &self.mask))
            .map(|b| b.with_value_checks(check_values))
            .expect("bench batch");
        let output = loss.compute(&batch).expect("bench loss");
        output.loss.backward();
    }
}

/// Every loss with its paper defaults.
pub fn losses() -> Vec<(&'static str, Box<dyn PreferenceLoss>)> {
    vec![
        ("RefaDynamic", Box::new(RefaDynamic::default())),
        (
            "RefaDynamic+Eos",
            Box::new(RefaDynamic::default().with_regularizer(EosRegularizer::default())),
        ),
        ("RefaOneVsAll", Box::new(RefaOneVsAll::default())),
        ("InfoNca", Box::new(InfoNca::default())),
        ("SimPo", Box::new(SimPo::default())),
        ("Dpo", Box::new(Dpo::default())),
        ("Mpo", Box::new(Mpo::default())),
    ]
}
