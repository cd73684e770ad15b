//! AdamW with f32 state (and f32 master weights for low-precision parameters), gradient-norm
//! clipping, and a state that saves and restores exactly.

use tch::{Kind, Tensor};

use crate::error::{RefaError, Result};

/// AdamW (Loshchilov & Hutter): decoupled weight decay, bias-corrected moments.
///
/// ```text
/// m ← β1·m + (1 − β1)·g          v ← β2·v + (1 − β2)·g²
/// w ← w − lr·( m̂ / (√v̂ + ε) + λ·w ),   m̂ = m/(1 − β1^t), v̂ = v/(1 − β2^t)
/// ```
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
}

#[derive(Debug)]
struct ParamState {
    m: Tensor,
    v: Tensor,
    master: Option<Tensor>,
}

impl AdamW {
    /// An optimizer over named parameters (only those that require gradients are updated).
    pub fn new(params: Vec<(String, Tensor)>) -> Self {
        let mut params: Vec<(String, Tensor)> = params
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let state = params
            .iter()
            .map(|(_, p)| ParamState {
                m: Tensor::zeros(p.size(), (Kind::Float, p.device())),
                v: Tensor::zeros(p.size(), (Kind::Float, p.device())),
                master: (p.kind() != Kind::Float && p.kind() != Kind::Double)
                    .then(|| p.detach().to_kind(Kind::Float)),
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

    /// Global L2 norm of the gradients, and rescales them to at most `max_norm` (no clipping
    /// for `max_norm <= 0`). Missing gradients count as zero.
    pub fn clip_grad_norm(&self, max_norm: f64) -> f64 {
        let norms: Vec<Tensor> = self
            .params
            .iter()
            .filter_map(|(_, p)| {
                let g = p.grad();
                g.defined()
                    .then(|| g.to_kind(Kind::Float).square().sum(Kind::Float))
            })
            .collect();
        if norms.is_empty() {
            return 0.0;
        }
        let norm = Tensor::stack(&norms, 0)
            .sum(Kind::Float)
            .sqrt()
            .double_value(&[]);
        if max_norm > 0.0 && norm > max_norm {
            let scale = max_norm / (norm + 1e-6);
            tch::no_grad(|| {
                for (_, p) in &self.params {
                    let mut g = p.grad();
                    if g.defined() {
                        let _ = g.g_mul_scalar_(scale);
                    }
                }
            });
        }
        norm
    }

    /// One update with learning rate `lr`, then clears the gradients.
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.beta1, self.beta2);
        let (correction1, correction2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        tch::no_grad(|| {
            for ((_, p), s) in self.params.iter().zip(&mut self.state) {
                let mut g = p.grad();
                if !g.defined() {
                    continue;
                }
                let grad = g.to_kind(Kind::Float);
                let _ = s.m.g_mul_scalar_(b1).g_add_(&(&grad * (1.0 - b1)));
                let _ = s.v.g_mul_scalar_(b2).g_add_(&(grad.square() * (1.0 - b2)));
                let update = (&s.m / correction1) / ((&s.v / correction2).sqrt() + self.eps);
                let mut target = s
                    .master
                    .as_ref()
                    .map_or_else(|| p.shallow_clone(), Tensor::shallow_clone);
                if self.weight_decay > 0.0 {
                    let _ = target.g_mul_scalar_(1.0 - lr * self.weight_decay);
                }
                let _ = target.g_sub_(&(update * lr).to_kind(target.kind()));
                if s.master.is_some() {
                    p.shallow_clone().copy_(&target);
                }
                let _ = g.zero_();
            }
        });
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
