//! Rotary position embeddings and their scalings, computed as transformers computes them.
//!
//! Every variant yields inverse frequencies `inv_freq` `[r/2]` (f32) for the rotary width
//! `r = head_dim · partial_rotary_factor`, and an attention factor that multiplies `cos`
//! and `sin`:
//!
//! | `rope_type` | `inv_freq_j` (with `f_j = θ^(−2j/r)`) | factor |
//! |---|---|---|
//! | `default` | `f_j` | 1 |
//! | `linear` | `f_j / s` | 1 |
//! | `llama3` | `f_j` for wavelengths `λ_j = 2π/f_j` below `L/h`; `f_j/s` above `L/l`; between, `(1−a)·f_j/s + a·f_j` with `a = (L/λ_j − l)/(h − l)` | 1 |
//! | `yarn` | `f_j/s·(1 − e_j) + f_j·e_j`, `e_j = 1 − clamp((j − lo)/(hi − lo), 0, 1)`, `lo`, `hi` the dimensions that turn `β_fast`, `β_slow` times in `L` positions | `attention_factor`, else `0.1·ln s + 1` (or the ratio of the two `mscale` terms) |
//!
//! (`s` = `factor`, `L` = `original_max_position_embeddings`, `l`, `h` = `low_freq_factor`,
//! `high_freq_factor`.) `dynamic` (NTK) and `longrope` are refused: transformers recomputes
//! their frequencies from the longest position a forward call has seen, so one model's
//! outputs depend on the calls made before (dynamic) or on the length of the batch
//! (longrope).

use tch::{Device, Kind, Tensor};

/// The rotary settings of a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    /// Base θ of the frequencies (`rope_theta`).
    pub theta: f64,
    /// Width of the rotated part of each head (`head_dim · partial_rotary_factor`, even).
    pub rotary_dim: i64,
    /// The scaling (`rope_type`).
    pub scaling: RopeScaling,
}

/// A RoPE scaling that transformers applies identically at every position.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE (`default`).
    None,
    /// Position interpolation (`linear`): every frequency divided by `factor`.
    Linear {
        /// `s`.
        factor: f64,
    },
    /// Llama 3.1's smooth interpolation by wavelength (`llama3`).
    Llama3 {
        /// `s` (8 for Llama 3.1).
        factor: f64,
        /// `l` (1 for Llama 3.1).
        low_freq_factor: f64,
        /// `h` (4 for Llama 3.1).
        high_freq_factor: f64,
        /// `L` (8 192 for Llama 3.1).
        original_max_position_embeddings: f64,
    },
    /// YaRN (`yarn`).
    Yarn {
        /// `s`.
        factor: f64,
        /// `L`.
        original_max_position_embeddings: f64,
        /// Rotations bounding extrapolation (default 32).
        beta_fast: f64,
        /// Rotations bounding interpolation (default 1).
        beta_slow: f64,
        /// Round the correction range outwards (default true).
        truncate: bool,
        /// The factor on `cos` and `sin`.
        attention_factor: f64,
    },
}

impl Rope {
    /// The inverse frequencies `[rotary_dim / 2]` (f32) and the factor on `cos`/`sin`.
    pub fn inverse_frequencies(&self, device: Device) -> (Tensor, f64) {
        let dim = self.rotary_dim;
        let exponents = Tensor::arange_start_step(0, dim, 2, (Kind::Int64, device))
            .to_kind(Kind::Float)
            / dim as f64;
        let powers = Tensor::from(self.theta)
            .to_device(device)
            .to_kind(Kind::Float)
            .pow(&exponents);
        let plain = powers.reciprocal();
        match &self.scaling {
            RopeScaling::None => (plain, 1.0),
            RopeScaling::Linear { factor } => (plain / *factor, 1.0),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let scaled = llama3_frequencies(
                    &plain,
                    *factor,
                    *low_freq_factor,
                    *high_freq_factor,
                    *original_max_position_embeddings,
                );
                (scaled, 1.0)
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                truncate,
                attention_factor,
            } => {
                let (low, high) = yarn_correction_range(
                    *beta_fast,
                    *beta_slow,
                    dim as f64,
                    self.theta,
                    *original_max_position_embeddings,
                    *truncate,
                );
                let extrapolation = 1.0 - linear_ramp(low, high, dim / 2, device);
                let interpolated = powers.reciprocal() / *factor;
                let mixed: Tensor =
                    &interpolated * (1.0 - &extrapolation) + &plain * &extrapolation;
                (mixed, *attention_factor)
            }
        }
    }
}

/// Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
fn llama3_frequencies(
    plain: &Tensor,
    factor: f64,
    low_freq_factor: f64,
    high_freq_factor: f64,
    original: f64,
) -> Tensor {
    let low_freq_wavelength = original / low_freq_factor;
    let high_freq_wavelength = original / high_freq_factor;
    let wavelength = plain.reciprocal() * (2.0 * std::f64::consts::PI);
    let long = wavelength.gt(low_freq_wavelength);
    let divided = plain.where_self(&long.logical_not(), &(plain / factor));
    let smooth = (wavelength.reciprocal() * original - low_freq_factor)
        / (high_freq_factor - low_freq_factor);
    let smoothed: Tensor = (1.0 - &smooth) * &divided / factor + &smooth * &divided;
    let medium = wavelength
        .lt(high_freq_wavelength)
        .logical_not()
        .logical_and(&long.logical_not());
    smoothed.where_self(&medium, &divided)
}

/// YaRN's correction range: the (fractional) dimensions whose frequencies turn `beta_fast`
/// and `beta_slow` times over `original` positions, rounded outwards when `truncate`.
fn yarn_correction_range(
    beta_fast: f64,
    beta_slow: f64,
    dim: f64,
    base: f64,
    original: f64,
    truncate: bool,
) -> (f64, f64) {
    let dimension_of = |rotations: f64| {
        dim * (original / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln())
    };
    let (mut low, mut high) = (dimension_of(beta_fast), dimension_of(beta_slow));
    if truncate {
        (low, high) = (low.floor(), high.ceil());
    }
    (low.max(0.0), high.min(dim - 1.0))
}

/// `clamp((j − low) / (high − low), 0, 1)` for `j < count`, in f32.
fn linear_ramp(low: f64, high: f64, count: i64, device: Device) -> Tensor {
    let high = if low == high { high + 0.001 } else { high };
    ((Tensor::arange(count, (Kind::Float, device)) - low) / (high - low)).clamp(0.0, 1.0)
}

/// YaRN's default attention factor: `0.1·m·ln s + 1` for `s > 1`, else 1.
pub(crate) fn yarn_mscale(scale: f64, m: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * m * scale.ln() + 1.0
    }
}

/// The rotary tables of a model: `cos` and `sin` `[T, rotary_dim]` for positions `0..T`.
#[derive(Debug)]
pub(crate) struct Rotary {
    inverse_frequencies: Tensor,
    attention_factor: f64,
}

impl Rotary {
    /// The tables of `rope` on `device`.
    pub fn new(rope: &Rope, device: Device) -> Self {
        let (inverse_frequencies, attention_factor) = rope.inverse_frequencies(device);
        Rotary {
            inverse_frequencies,
            attention_factor,
        }
    }

    /// `(cos, sin)` `[T, rotary_dim]` for positions `0..T`, in `kind` (computed in f32 and
    /// scaled by the attention factor before the cast, as transformers does).
    pub fn cos_sin(&self, positions: i64, kind: Kind) -> (Tensor, Tensor) {
        let device = self.inverse_frequencies.device();
        let t = Tensor::arange(positions, (Kind::Float, device));
        let frequencies = t.unsqueeze(1) * self.inverse_frequencies.unsqueeze(0);
        let angles = Tensor::cat(&[&frequencies, &frequencies], 1);
        let scale = self.attention_factor;
        (
            (angles.cos() * scale).to_kind(kind),
            (angles.sin() * scale).to_kind(kind),
        )
    }
}

/// `x·cos + rotate_half(x)·sin` on the first `rotary_dim` features of `x`
/// `[N, heads, T, d]` (all of them unless the rotation is partial); the rest pass through.
pub(crate) fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let (width, rotary) = (x.size()[3], cos.size()[cos.dim() - 1]);
    if rotary < width {
        let rotated = apply_rotary(&x.narrow(3, 0, rotary), cos, sin);
        return Tensor::cat(&[rotated, x.narrow(3, rotary, width - rotary)], 3);
    }
    let half = width / 2;
    let (first, second) = (x.narrow(3, 0, half), x.narrow(3, half, half));
    let rotated = Tensor::cat(&[&-second, &first], 3);
    x * cos + rotated * sin
}
