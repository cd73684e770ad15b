//! The optimizer: fused AdamW (libtorch's multi-tensor kernel through csrc/) against a plain
//! f64 reference and against tch's own AdamW, multi-tensor clipping against a plain norm, the
//! cosine schedule, and the allocator statistics on the CPU.
#![cfg(feature = "trainer")]

use refa_loss::device;
use refa_loss::train::{AdamW, CosineSchedule};
use tch::{Device, Kind, Tensor};

const SHAPES: [&[i64]; 4] = [&[7, 5], &[13], &[3, 4, 2], &[1]];

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(&t.detach().to_kind(Kind::Double).flatten(0, -1)).expect("values")
}

/// AdamW on plain numbers: the textbook update in f64.
struct Reference {
    w: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
}

impl Reference {
    fn step(&mut self, g: &[f64], t: i32, lr: f64, wd: f64) {
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
        for (((w, m), v), g) in self.w.iter_mut().zip(&mut self.m).zip(&mut self.v).zip(g) {
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            let m_hat = *m / (1.0 - b1.powi(t));
            let v_hat = *v / (1.0 - b2.powi(t));
            *w = *w * (1.0 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps);
        }
    }
}

/// Ten fused steps equal the f64 reference to 1e-6, for f32 parameters and for bf16
/// parameters with f32 master weights (whose bf16 copy is the master rounded).
#[test]
fn fused_adamw_matches_the_reference_over_ten_steps() {
    for kind in [Kind::Float, Kind::BFloat16] {
        tch::manual_seed(11);
        let params: Vec<Tensor> = SHAPES
            .iter()
            .map(|s| {
                Tensor::randn(*s, (Kind::Float, Device::Cpu))
                    .to_kind(kind)
                    .set_requires_grad(true)
            })
            .collect();
        let mut adamw = adamw_over(&params, "p");
        adamw.weight_decay = 0.05;
        let mut references: Vec<Reference> = params
            .iter()
            .map(|p| Reference {
                w: values(p),
                m: vec![0.0; p.numel()],
                v: vec![0.0; p.numel()],
            })
            .collect();
        for step in 1..=10 {
            let lr = 1e-2 / step as f64;
            for (p, r) in params.iter().zip(&mut references) {
                let g = Tensor::randn(p.size(), (Kind::Float, Device::Cpu)).to_kind(kind);
                r.step(&values(&g), step, lr, 0.05);
                p.set_grad(&g);
            }
            adamw.step(lr).expect("step");
            for p in &params {
                assert_eq!(
                    values(&p.grad()).iter().map(|x| x.abs()).sum::<f64>(),
                    0.0,
                    "gradients are zeroed"
                );
            }
        }
        let state = adamw.state_tensors();
        for (i, (p, r)) in params.iter().zip(&references).enumerate() {
            let updated = match kind {
                Kind::Float => values(p),
                _ => {
                    let master = &state
                        .iter()
                        .find(|(n, _)| *n == format!("p{i}.master"))
                        .expect("master")
                        .1;
                    assert_eq!(
                        values(&master.to_kind(kind)),
                        values(p),
                        "the parameter is its master rounded"
                    );
                    values(master)
                }
            };
            let worst = updated
                .iter()
                .zip(&r.w)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(worst < 1e-6, "{kind:?} p{i}: largest difference {worst:e}");
        }
    }
}

/// One step equals tch's own `nn::AdamW` (libtorch's per-tensor implementation) on f32.
#[test]
fn one_step_equals_tch_adamw() {
    use tch::nn::OptimizerConfig;
    tch::manual_seed(3);
    let store = tch::nn::VarStore::new(Device::Cpu);
    let root = store.root();
    let ours: Vec<Tensor> = SHAPES
        .iter()
        .enumerate()
        .map(|(i, s)| root.randn(&format!("w{i}"), s, 0.0, 1.0))
        .collect();
    let theirs: Vec<Tensor> = ours
        .iter()
        .map(|t| t.detach().copy().set_requires_grad(true))
        .collect();
    let mut adamw = adamw_over(&ours, "w");
    adamw.weight_decay = 0.1;
    let other_store = tch::nn::VarStore::new(Device::Cpu);
    let other_root = other_store.root();
    let registered: Vec<Tensor> = theirs
        .iter()
        .enumerate()
        .map(|(i, t)| other_root.var_copy(&format!("w{i}"), t))
        .collect();
    let mut reference = tch::nn::AdamW {
        wd: 0.1,
        ..Default::default()
    }
    .build(&other_store, 1e-3)
    .expect("tch adamw");
    for (a, b) in ours.iter().zip(&registered) {
        let g = Tensor::randn(a.size(), (Kind::Float, Device::Cpu));
        a.set_grad(&g);
        b.set_grad(&g);
    }
    adamw.step(1e-3).expect("step");
    reference.step();
    for (a, b) in ours.iter().zip(&registered) {
        let worst = values(a)
            .iter()
            .zip(values(b))
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-6, "largest difference {worst:e}");
    }
}

trait SetGrad {
    fn set_grad(&self, g: &Tensor);
}

impl SetGrad for Tensor {
    /// Writes `g` into this leaf's `.grad` (allocating it through a backward pass once).
    fn set_grad(&self, g: &Tensor) {
        if !self.grad().defined() {
            (self * g.to_kind(self.kind()).detach())
                .sum(Kind::Float)
                .backward();
        }
        tch::no_grad(|| self.grad().copy_(g));
    }
}

/// The multi-tensor norm equals the plain L2 norm of every gradient, and the gradients are
/// scaled to `max_norm` exactly when the norm exceeds it.
#[test]
fn clipping_equals_the_plain_norm_and_scale() {
    tch::manual_seed(5);
    let params: Vec<Tensor> = SHAPES
        .iter()
        .map(|s| Tensor::zeros(*s, (Kind::Float, Device::Cpu)).set_requires_grad(true))
        .collect();
    let adamw = adamw_over(&params, "p");
    for max_norm in [0.0, 0.5, 1e6] {
        let grads: Vec<Vec<f64>> = params
            .iter()
            .map(|p| {
                let g = Tensor::randn(p.size(), (Kind::Float, Device::Cpu));
                p.set_grad(&g);
                values(&g)
            })
            .collect();
        let norm = grads.iter().flatten().map(|x| x * x).sum::<f64>().sqrt();
        let got = adamw
            .clip_grad_norm(max_norm)
            .expect("clip")
            .double_value(&[]);
        assert!((got - norm).abs() < 1e-5 * norm, "norm {got} vs {norm}");
        let scale = if max_norm > 0.0 && norm > max_norm {
            max_norm / (norm + 1e-6)
        } else {
            1.0
        };
        for (p, g) in params.iter().zip(&grads) {
            for (a, b) in values(&p.grad()).iter().zip(g) {
                assert!(
                    (a - b * scale).abs() < 1e-6,
                    "max_norm {max_norm}: {a} vs {}",
                    b * scale
                );
            }
        }
    }
}

#[test]
fn the_cosine_schedule_warms_up_linearly_and_decays_to_its_floor() {
    let schedule = CosineSchedule {
        peak: 1e-3,
        warmup: 4,
        total: 20,
        min_ratio: 0.1,
    };
    assert!((schedule.lr(2) - 0.5e-3).abs() < 1e-15);
    assert!((schedule.lr(4) - 1e-3).abs() < 1e-15);
    assert!(
        (schedule.lr(12) - 0.55e-3).abs() < 1e-15,
        "half way down: {}",
        schedule.lr(12)
    );
    assert!((schedule.lr(20) - 1e-4).abs() < 1e-15);
    assert!((schedule.lr(30) - 1e-4).abs() < 1e-15, "stays at the floor");
    assert!(schedule.validate().is_ok());
    let broken = CosineSchedule {
        min_ratio: -2.0,
        ..schedule
    };
    assert!(broken
        .validate()
        .unwrap_err()
        .to_string()
        .contains("min_lr_ratio"));
}

#[test]
fn memory_statistics_are_none_on_the_cpu() {
    assert_eq!(device::memory_stats(Device::Cpu).expect("stats"), None);
    device::reset_peak_memory(Device::Cpu).expect("no-op");
    if device::cuda_is_available() {
        let stats = device::memory_stats(Device::Cuda(0))
            .expect("stats")
            .expect("a GPU has them");
        assert!(stats.total > 0 && stats.peak_allocated >= stats.allocated);
    } else {
        eprintln!("CUDA part skipped: no CUDA device");
    }
}

/// A non-finite gradient norm makes the fused kernel skip the update on the device: weights
/// and moments stay as they were, and after the rewind the next step is the one a run
/// without the bad step would take.
#[test]
fn a_non_finite_norm_skips_the_step_on_the_device() {
    tch::manual_seed(8);
    let make = || {
        let p = Tensor::randn([6, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let adamw = AdamW::new(vec![("p".into(), p.shallow_clone())]);
        (p, adamw)
    };
    let (p, mut adamw) = make();
    let (q, mut clean) = make();
    tch::no_grad(|| q.shallow_clone().copy_(&p));
    let g = Tensor::randn([6, 3], (Kind::Float, Device::Cpu));
    p.set_grad(&g);
    q.set_grad(&g);
    adamw.step(1e-2).expect("step");
    clean.step(1e-2).expect("step");
    let before = values(&p);
    p.set_grad(&g.full_like(f64::NAN));
    let norm = adamw.clip_grad_norm(1.0).expect("clip");
    adamw.step_if_finite(1e-2, &norm).expect("skipped step");
    assert!(norm.double_value(&[]).is_nan());
    assert_eq!(values(&p), before, "weights unchanged by a skipped step");
    adamw.rewind_skipped_step();
    assert_eq!(adamw.steps(), 1);
    for (x, opt) in [(&p, &mut adamw), (&q, &mut clean)] {
        x.set_grad(&g);
        let norm = opt.clip_grad_norm(0.0).expect("norm");
        opt.step_if_finite(1e-2, &norm).expect("step");
    }
    assert_eq!(
        values(&p),
        values(&q),
        "the same second step as a clean run"
    );
}

/// AdamW over `params`, named `{prefix}0`, `{prefix}1`, … in order.
fn adamw_over(params: &[Tensor], prefix: &str) -> AdamW {
    let named = params
        .iter()
        .enumerate()
        .map(|(i, p)| (format!("{prefix}{i}"), p.shallow_clone()))
        .collect();
    AdamW::new(named)
}
