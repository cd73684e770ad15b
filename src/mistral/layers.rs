//! The building blocks of a Mistral decoder: RMSNorm, rotary embeddings, attention masks.

use tch::{Device, Kind, Tensor};

/// RMSNorm with libtorch's fused `rms_norm` (one kernel forward and backward on CUDA, its
/// statistics in f32 for half-precision inputs), instead of the eight element-wise kernels
/// and the f32 copy of the input that a hand-written version keeps for backward.
///
/// ```text
/// y = weight ⊙ (x / sqrt(mean(x²) + ε))
/// ```
///
/// Hugging Face rounds `x / rms` to the input's kind before multiplying by the weight; the
/// fused kernel multiplies first and rounds once. Both are equal in f32 (see the test), and
/// in bf16 differ by at most one rounding.
pub(crate) fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let width = *x.size().last().unwrap_or(&0);
    x.rms_norm([width], Some(weight), eps)
}

/// Rotary position embeddings (`rotate_half` convention, as Hugging Face's Mistral).
#[derive(Debug)]
pub(crate) struct Rotary {
    inverse_frequencies: Tensor,
}

impl Rotary {
    /// `inv_freq_j = θ^(−2j/d)` for `j < d/2`, in f32.
    pub fn new(head_dim: i64, theta: f64, device: Device) -> Self {
        let exponents = Tensor::arange_start_step(0, head_dim, 2, (Kind::Int64, device))
            .to_kind(Kind::Float)
            / head_dim as f64;
        let inverse_frequencies = Tensor::from(theta)
            .to_device(device)
            .to_kind(Kind::Float)
            .pow(&exponents)
            .reciprocal();
        Rotary {
            inverse_frequencies,
        }
    }

    /// `(cos, sin)` `[T, d]` for positions `0..T`, in `kind`.
    pub fn cos_sin(&self, positions: i64, kind: Kind) -> (Tensor, Tensor) {
        let device = self.inverse_frequencies.device();
        let t = Tensor::arange(positions, (Kind::Float, device));
        let frequencies = t.unsqueeze(1) * self.inverse_frequencies.unsqueeze(0);
        let angles = Tensor::cat(&[&frequencies, &frequencies], 1);
        (angles.cos().to_kind(kind), angles.sin().to_kind(kind))
    }
}

/// `x·cos + rotate_half(x)·sin` for `x` `[N, heads, T, d]`.
pub(crate) fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let (first, second) = (x.narrow(3, 0, half), x.narrow(3, half, half));
    let rotated = Tensor::cat(&[&-second, &first], 3);
    x * cos + rotated * sin
}

/// The attention mask `[N, 1, T, T]` (true = may attend) for any padding layout, or `None`
/// when plain causal attention is exact.
///
/// Query `q` may attend key `k` when `k <= q`, the key is not padding, and (with a sliding
/// window `w`) `q − k < w`. Every query may attend itself, so no row is empty (a padded
/// query's output is never read).
///
/// With `right_padded` the caller promises that each row's tokens come first and padding
/// after (what the trainer's collation builds): a token then never sees a padding key under
/// causal attention, so no padding mask is needed and only a binding window is masked, with
/// one `[1, 1, T, T]` mask shared by the batch. `scaled_dot_product_attention` can then pick
/// its fastest (flash) kernel whenever the window does not bind. Otherwise the mask is built
/// from `valid` (no host synchronization either way).
pub(crate) fn attention_mask(
    valid: &Tensor,
    window: Option<i64>,
    right_padded: bool,
) -> Option<Tensor> {
    let positions = valid.size()[1];
    let windowed = window.filter(|&w| w < positions);
    if right_padded && windowed.is_none() {
        return None;
    }
    let index = Tensor::arange(positions, (Kind::Int64, valid.device()));
    let (query, key) = (index.unsqueeze(1), index.unsqueeze(0));
    let mut allowed = key.le_tensor(&query);
    if let Some(w) = windowed {
        allowed = allowed.logical_and(&(&query - &key).lt(w));
    }
    let allowed = if right_padded {
        allowed.unsqueeze(0)
    } else {
        let itself = key.eq_tensor(&query).unsqueeze(0);
        allowed
            .unsqueeze(0)
            .logical_and(&valid.unsqueeze(1))
            .logical_or(&itself)
    };
    Some(allowed.unsqueeze(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hugging Face's formula, as this crate computed it before the fused kernel.
    fn reference_rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
        let wide = x.to_kind(Kind::Float);
        let variance = wide.square().mean_dim(-1, true, Kind::Float);
        weight * (wide * (variance + eps).rsqrt()).to_kind(x.kind())
    }

    /// The fused RMSNorm equals the reference in values and gradients (f32 to 1e-6, bf16 to
    /// one rounding).
    #[test]
    fn fused_rms_norm_equals_the_reference() {
        tch::manual_seed(1);
        for (kind, tolerance) in [(Kind::Float, 1e-6), (Kind::BFloat16, 2e-2)] {
            let x0 = Tensor::randn([3, 5, 16], (Kind::Float, Device::Cpu)) * 3.0;
            let w0 = Tensor::randn([16], (Kind::Float, Device::Cpu));
            let run = |f: &dyn Fn(&Tensor, &Tensor, f64) -> Tensor| {
                let x = x0.to_kind(kind).set_requires_grad(true);
                let w = w0.to_kind(kind).set_requires_grad(true);
                let y = f(&x, &w, 1e-6);
                (&y * &y.ones_like().cumsum(-1, kind))
                    .sum(Kind::Float)
                    .backward();
                (
                    y.to_kind(Kind::Float),
                    x.grad().to_kind(Kind::Float),
                    w.grad().to_kind(Kind::Float),
                )
            };
            let (y, gx, gw) = run(&rms_norm);
            let (y_ref, gx_ref, gw_ref) = run(&reference_rms_norm);
            for (a, b, what) in [
                (y, y_ref, "values"),
                (gx, gx_ref, "input gradient"),
                (gw, gw_ref, "weight gradient"),
            ] {
                let scale = b.abs().max().double_value(&[]).max(1.0);
                let worst = (a - b).abs().max().double_value(&[]) / scale;
                assert!(worst < tolerance, "{kind:?} {what}: {worst:e}");
            }
        }
    }
}
