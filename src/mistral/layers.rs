//! The building blocks of a Mistral decoder: RMSNorm, rotary embeddings, attention masks.

use tch::{Device, Kind, Tensor};

/// RMSNorm as Hugging Face computes it: statistics in f32, the scale in the input's kind.
///
/// ```text
/// y = weight ⊙ (x / sqrt(mean(x²) + ε))
/// ```
pub(crate) fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let wide = x.to_kind(Kind::Float);
    let variance = wide.square().mean_dim(-1, true, Kind::Float);
    weight * (wide * (variance + eps).rsqrt()).to_kind(x.kind())
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

/// The attention mask `[N, 1, T, T]` (true = may attend), or `None` when plain causal
/// attention is exact (no padding, no window shorter than the sequence), which lets
/// `scaled_dot_product_attention` pick its fastest (flash) kernel.
///
/// Query `q` may attend key `k` when `k <= q`, the key is not padding, and (with a sliding
/// window `w`) `q − k < w`. Every query may attend itself, so no row is empty (a padded
/// query's output is never read).
pub(crate) fn attention_mask(valid: &Tensor, window: Option<i64>) -> Option<Tensor> {
    let positions = valid.size()[1];
    let windowed = window.is_some_and(|w| w < positions);
    let padded = valid.logical_not().any().int64_value(&[]) != 0;
    if !windowed && !padded {
        return None;
    }
    let index = Tensor::arange(positions, (Kind::Int64, valid.device()));
    let (query, key) = (index.unsqueeze(1), index.unsqueeze(0));
    let mut allowed = key.le_tensor(&query);
    if let Some(w) = window.filter(|_| windowed) {
        allowed = allowed.logical_and(&(&query - &key).lt(w));
    }
    let allowed = allowed.unsqueeze(0).logical_and(&valid.unsqueeze(1));
    let itself = key.eq_tensor(&query).unsqueeze(0);
    Some(allowed.logical_or(&itself).unsqueeze(1))
}
