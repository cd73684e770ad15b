//! AdamW with f32 state (and f32 master weights for low-precision parameters), gradient-norm
//! clipping, and a state that saves and restores exactly.

use tch::{Device, Kind, Tensor};

use crate::error::{RefaError, Result};
use crate::ffi::{self, AdamWHyper, AdamWSlot};

/// AdamW (Loshchilov & Hutter): decoupled weight decay, bias-corrected moments.
///
/// ```text
/// m ← β1·m + (1 − β1)·g          v ← β2·v + (1 − β2)·g²
/// w ← w·(1 − lr·λ) − lr·m̂ / (√v̂ + ε),   m̂ = m/(1 − β1^t), v̂ = v/(1 − β2^t)
/// ```
///
/// A step runs libtorch's fused multi-tensor kernel (`at::_fused_adamw_`, the one PyTorch's
/// `AdamW(fused=True)` runs, on the CPU and on CUDA) over every parameter at once, then
/// rounds master copies into their parameters and zeroes the gradients with multi-tensor
/// kernels: a handful of launches per step instead of ~17 per parameter tensor.
///
/// Precision: the moments `m`, `v` are f32 whatever the parameter's kind. A bf16 or f16
/// parameter also gets an f32 master copy that receives the update and is rounded into the
/// parameter after each step: at the paper's learning rates (3e-7) an update is far below
/// bf16's resolution and would otherwise be lost. Memory: 8 bytes per parameter for the
/// moments, plus 4 for the master copy of a low-precision parameter.
#[derive(Debug)]
pub struct AdamW {
    params: Vec<(String, Tensor)>,
    state: Vec<ParamState>,
    /// Exponential decay of the first moment (default 0.9).
    pub beta1: f64,
    /// Exponential decay of the second moment (default 0.999).
    pub beta2: f64,
    /// Denominator term (default 1e-8).
    pub eps: f64,
    /// Decoupled weight decay λ (default 0.0, as the paper's preference training).
    pub weight_decay: f64,
    step: i64,
    /// The step number as a 0-dim f32 tensor on each parameter device (the fused kernel
    /// reads it there).
    counters: Vec<(Device, Tensor)>,
}

#[derive(Debug)]
struct ParamState {
    m: Tensor,
    v: Tensor,
    master: Option<Tensor>,
    /// Index of the step counter on this parameter's device in `AdamW::counters`.
    counter: usize,
}

impl AdamW {
    /// An optimizer over named parameters (only those that require gradients are updated).
    pub fn new(params: Vec<(String, Tensor)>) -> Self {
        let mut params: Vec<(String, Tensor)> = params
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let mut counters: Vec<(Device, Tensor)> = Vec::new();
        let state = params
            .iter()
            .map(|(_, p)| {
                let wide = if p.kind() == Kind::Double {
                    Kind::Double
                } else {
                    Kind::Float
                };
                let counter = match counters.iter().position(|(d, _)| *d == p.device()) {
                    Some(index) => index,
                    None => {
                        counters.push((p.device(), Tensor::zeros([], (Kind::Float, p.device()))));
                        counters.len() - 1
                    }
                };
                ParamState {
                    m: Tensor::zeros(p.size(), (wide, p.device())),
                    v: Tensor::zeros(p.size(), (wide, p.device())),
                    master: (p.kind() != wide).then(|| p.detach().to_kind(wide)),
                    counter,
                }
            })
            .collect();
        AdamW {
            params,
            state,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            step: 0,
            counters,
        }
    }

    /// Steps taken.
    pub fn steps(&self) -> i64 {
        self.step
    }

    /// Number of optimized scalars.
    pub fn parameter_count(&self) -> i64 {
        self.params.iter().map(|(_, p)| p.numel() as i64).sum()
    }

    /// Global L2 norm of the gradients (in f32), and rescales them in place by
    /// `min(1, max_norm / (norm + 1e-6))` (no clipping for `max_norm <= 0`), as PyTorch's
    /// `clip_grad_norm_(foreach=True)`. Runs on the gradients' device with multi-tensor
    /// kernels and returns the norm as a 0-dim f32 tensor there, without waiting for the
    /// device; read it when the step's metrics are read. Missing gradients count as zero.
    pub fn clip_grad_norm(&self, max_norm: f64) -> Result<Tensor> {
        clip_grad_norm(&self.params, max_norm)
    }

    /// One update with learning rate `lr` (finite, >= 0), then clears the gradients.
    /// Parameters without a gradient are left alone.
    pub fn step(&mut self, lr: f64) -> Result<()> {
        self.fused_step(lr, None)
    }

    /// [`step`](Self::step), unless `grad_norm` (the 0-dim tensor [`clip_grad_norm`]
    /// returns) is not finite: then the kernel leaves weights and moments unchanged. The
    /// decision is made on the device, so nothing waits for it; once the caller has read the
    /// norm and found it non-finite, it calls [`rewind_skipped_step`] so that the step count
    /// matches the weights again. Gradients are cleared either way.
    ///
    /// [`clip_grad_norm`]: Self::clip_grad_norm
    /// [`rewind_skipped_step`]: Self::rewind_skipped_step
    pub fn step_if_finite(&mut self, lr: f64, grad_norm: &Tensor) -> Result<()> {
        self.fused_step(lr, Some(grad_norm))
    }

    /// Undoes the count of a step that [`step_if_finite`](Self::step_if_finite) skipped.
    pub fn rewind_skipped_step(&mut self) {
        self.step -= 1;
    }

    fn fused_step(&mut self, lr: f64, grad_norm: Option<&Tensor>) -> Result<()> {
        RefaError::require(lr.is_finite() && lr >= 0.0, "lr", lr, "finite and >= 0")?;
        self.step += 1;
        // The counters follow the step number on the device: a skipped step counts nothing.
        tch::no_grad(|| {
            for (device, counter) in &mut self.counters {
                match grad_norm {
                    Some(norm) => {
                        let finite = norm.to_device(*device).isfinite().to_kind(Kind::Float);
                        let _ = counter.g_add_(&finite);
                    }
                    None => {
                        let _ = counter.fill_(self.step as f64);
                    }
                }
            }
        });
        let found_inf = grad_norm.map(|norm| norm.isfinite().logical_not().to_kind(Kind::Float));
        let grads: Vec<Tensor> = self.params.iter().map(|(_, p)| p.grad()).collect();
        let slots: Vec<AdamWSlot<'_>> = self
            .params
            .iter()
            .zip(&self.state)
            .zip(&grads)
            .filter(|(_, g)| g.defined())
            .map(|(((_, p), s), g)| AdamWSlot {
                target: s.master.as_ref().unwrap_or(p),
                grad: g,
                exp_avg: &s.m,
                exp_avg_sq: &s.v,
                mirror: s.master.as_ref().map(|_| p),
                step: &self.counters[s.counter].1,
            })
            .collect();
        let hyper = AdamWHyper {
            lr,
            beta1: self.beta1,
            beta2: self.beta2,
            weight_decay: self.weight_decay,
            eps: self.eps,
        };
        tch::no_grad(|| ffi::adamw_step(&slots, &hyper, found_inf.as_ref()))
    }

    /// Sets every gradient to zero.
    pub fn zero_grad(&self) {
        for (_, p) in &self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// The state as named tensors (moments, master copies, step), for a checkpoint.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("step".to_string(), Tensor::from_slice(&[self.step]))];
        for ((name, _), s) in self.params.iter().zip(&self.state) {
            out.push((format!("{name}.exp_avg"), s.m.shallow_clone()));
            out.push((format!("{name}.exp_avg_sq"), s.v.shallow_clone()));
            if let Some(master) = &s.master {
                out.push((format!("{name}.master"), master.shallow_clone()));
            }
        }
        out
    }

    /// Restores the state written by [`state_tensors`](Self::state_tensors).
    pub fn load_state(&mut self, read: impl Fn(&str) -> Result<Tensor>) -> Result<()> {
        self.step = read("step")?.int64_value(&[0]);
        tch::no_grad(|| {
            for (_, counter) in &mut self.counters {
                let _ = counter.fill_(self.step as f64);
            }
        });
        tch::no_grad(|| -> Result<()> {
            for ((name, _), s) in self.params.iter().zip(&mut self.state) {
                s.m.f_copy_(&read(&format!("{name}.exp_avg"))?)?;
                s.v.f_copy_(&read(&format!("{name}.exp_avg_sq"))?)?;
                if let Some(master) = &mut s.master {
                    master.f_copy_(&read(&format!("{name}.master"))?)?;
                }
            }
            Ok(())
        })
    }
}

/// [`AdamW::clip_grad_norm`] over the gradients of `params` (a data-parallel trainer clips
/// over every parameter, also those whose state another rank keeps).
pub(crate) fn clip_grad_norm(params: &[(String, Tensor)], max_norm: f64) -> Result<Tensor> {
    let grads: Vec<Tensor> = params
        .iter()
        .map(|(_, p)| p.grad())
        .filter(Tensor::defined)
        .collect();
    let refs: Vec<&Tensor> = grads.iter().collect();
    ffi::clip_grad_norm(&refs, max_norm)
}

/// Linear warmup over `warmup` steps, then cosine decay to `min_ratio·peak` at `total`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CosineSchedule {
    /// Peak learning rate.
    pub peak: f64,
    /// Warmup steps.
    pub warmup: i64,
    /// Total steps.
    pub total: i64,
    /// Final learning rate as a fraction of the peak.
    pub min_ratio: f64,
}

impl CosineSchedule {
    /// `peak` finite and > 0, `warmup` >= 0, `total` >= 1, `min_ratio` in [0, 1]: anything
    /// else gives negative, growing or undefined learning rates.
    pub fn validate(&self) -> Result<()> {
        RefaError::require(
            self.peak.is_finite() && self.peak > 0.0,
            "lr",
            self.peak,
            "finite and > 0",
        )?;
        RefaError::require(
            self.total >= 1,
            "schedule total (max_steps)",
            self.total,
            ">= 1",
        )?;
        RefaError::require(self.warmup >= 0, "warmup_steps", self.warmup, ">= 0")?;
        RefaError::require(
            (0.0..=1.0).contains(&self.min_ratio),
            "min_lr_ratio",
            self.min_ratio,
            "in [0, 1]",
        )
    }

    /// The learning rate of optimizer step `step` (1-based).
    pub fn lr(&self, step: i64) -> f64 {
        if step <= self.warmup {
            return self.peak * step as f64 / self.warmup.max(1) as f64;
        }
        let progress =
            ((step - self.warmup) as f64 / (self.total - self.warmup).max(1) as f64).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.peak * (self.min_ratio + (1.0 - self.min_ratio) * cosine)
    }
}
