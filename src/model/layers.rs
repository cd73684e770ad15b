//! The building blocks of the decoder: RMSNorm, attention masks, attention itself.

use tch::{Kind, Tensor};

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

/// An RMSNorm weight and how the family applies it: `w·x̂`, or `(1 + w)·x̂` (Gemma, whose
/// norms store the offset from one).
#[derive(Debug)]
pub(crate) struct Norm {
    pub weight: Tensor,
    offset: bool,
}

impl Norm {
    pub fn new(weight: Tensor, offset: bool) -> Self {
        Norm { weight, offset }
    }

    /// The normalized `x` over its last dimension.
    pub fn forward(&self, x: &Tensor, eps: f64) -> Tensor {
        if self.offset {
            rms_norm(x, &(&self.weight + 1.0), eps)
        } else {
            rms_norm(x, &self.weight, eps)
        }
    }
}

/// Which keys each query of one kind of layer (full or sliding) may attend.
#[derive(Debug)]
pub(crate) struct LayerMask {
    /// `[N or 1, 1, t, T]` (true = may attend), or `None` for plain attention.
    pub mask: Option<Tensor>,
    /// Without a mask: causal (queries aligned to the end of the keys) or full.
    pub causal: bool,
}

impl LayerMask {
    pub fn shallow_clone(&self) -> Self {
        LayerMask {
            mask: self.mask.as_ref().map(Tensor::shallow_clone),
            causal: self.causal,
        }
    }
}

/// How attention scores are formed: the scale of `q·kᵀ` and an optional soft cap.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Scoring {
    /// `None`: `1/√d`.
    pub scale: Option<f64>,
    /// `c·tanh(s/c)` on the scaled scores (Gemma 2).
    pub softcap: Option<f64>,
}

/// Attention of `q` `[N, heads, t, d]` over `k`, `v` `[N, kv_heads, T, d]`. Without a soft
/// cap this is libtorch's fused attention (flash when the mask allows, sharing each
/// key/value head among its query heads in place); with one, the scores are formed,
/// capped, masked and normalized in f32 explicitly, as transformers' eager path does.
pub(crate) fn attend(q: &Tensor, k: &Tensor, v: &Tensor, mask: &LayerMask, scoring: Scoring) -> Tensor {
    let groups = q.size()[1] / k.size()[1];
    let share_heads = groups > 1 && mask.mask.is_none() && scoring.softcap.is_none();
    let repeat = |y: &Tensor| {
        if groups == 1 || share_heads {
            y.shallow_clone()
        } else {
            y.repeat_interleave_self_int(groups, 1, None)
        }
    };
    let (k, v) = (repeat(k), repeat(v));
    let Some(cap) = scoring.softcap else {
        return Tensor::scaled_dot_product_attention(
            q,
            &k,
            &v,
            mask.mask.as_ref(),
            0.0,
            mask.causal,
            scoring.scale,
            share_heads,
        );
    };
    let scale = scoring.scale.unwrap_or(1.0 / (q.size()[3] as f64).sqrt());
    let scores = q.matmul(&k.transpose(-2, -1)) * scale;
    let scores = (scores / cap).tanh() * cap;
    let allowed = match (&mask.mask, mask.causal) {
        (Some(m), _) => Some(m.shallow_clone()),
        (None, true) => {
            let (t, total) = (q.size()[2], k.size()[2]);
            let device = q.device();
            let query = Tensor::arange_start(total - t, total, (Kind::Int64, device)).unsqueeze(1);
            let key = Tensor::arange(total, (Kind::Int64, device)).unsqueeze(0);
            Some(key.le_tensor(&query))
        }
        (None, false) => None,
    };
    let scores = match allowed {
        Some(allowed) => scores.masked_fill(&allowed.logical_not(), f64::NEG_INFINITY),
        None => scores,
    };
    scores.softmax(-1, Kind::Float).to_kind(q.kind()).matmul(&v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

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
