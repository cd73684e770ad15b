//! Choosing the next token of many rows at once: greedy, or temperature and nucleus (top-p)
//! sampling, each row drawing from its own seeded stream.

use tch::{Kind, Tensor};

use crate::error::Result;

/// Temperatures below this decode greedily (vLLM's `_SAMPLING_EPS`, 1e-5). At such a
/// temperature sampling is greedy in all but name (a logit gap of 1e-3 is already a factor
/// e^100), while `logits / T` in f32 overflows for `T` near 1e-38 and its softmax turns
/// into NaN: treating them as greedy keeps answers exact instead of nonsense.
pub const GREEDY_BELOW_TEMPERATURE: f64 = 1e-5;

/// How a row's next token is chosen from its logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Sampler {
    /// `None`: greedy (argmax, the first of equal maxima, as `torch.argmax`).
    temperature: Option<f64>,
    top_p: f64,
}

impl Sampler {
    /// Greedy for `temperature` below [`GREEDY_BELOW_TEMPERATURE`] (0 included).
    pub fn new(temperature: f64, top_p: f64) -> Self {
        let sampled = temperature >= GREEDY_BELOW_TEMPERATURE;
        Sampler {
            temperature: sampled.then_some(temperature),
            top_p,
        }
    }

    /// Whether the rows draw random numbers at all.
    pub fn is_greedy(&self) -> bool {
        self.temperature.is_none()
    }

    /// The next token `[N]` (i64, on the logits' device) of every row of `logits` `[N, V]`
    /// (f32, finite in the rows whose tokens are used), row `i` drawing with `uniforms[i]` in
    /// `[0, 1)`.
    ///
    /// Sampling is the inverse of the cumulative distribution of `softmax((l − max l) / T)`,
    /// computed in f64 (the shift keeps `/ T` finite for every temperature at or above
    /// [`GREEDY_BELOW_TEMPERATURE`]). With `top_p < 1` the distribution is first sorted
    /// (stable, most likely first) and cut to the smallest prefix whose mass reaches `top_p`
    /// (never fewer than one token), then renormalized. Every operation is row-wise, so a
    /// row's token does not depend on the other rows of the batch.
    pub fn choose(&self, logits: &Tensor, uniforms: &[f64]) -> Result<Tensor> {
        let Some(temperature) = self.temperature else {
            return Ok(logits.argmax(-1, false));
        };
        let device = logits.device();
        let wide = logits.to_kind(Kind::Double);
        let shifted = &wide - wide.amax([-1].as_slice(), true);
        let probabilities = (shifted / temperature).softmax(-1, Kind::Double);
        let uniforms = Tensor::from_slice(uniforms)
            .to_device(device)
            .unsqueeze(1);
        if self.top_p >= 1.0 {
            return Ok(inverse_cdf(&probabilities, &uniforms));
        }
        let (sorted, order) = probabilities.sort_stable(true, -1, true);
        let before = sorted.cumsum(-1, Kind::Double) - &sorted;
        // Kept: the tokens whose predecessors' mass is still below top_p (the first always).
        let kept = before.lt(self.top_p).to_kind(Kind::Double) * &sorted;
        let pick = inverse_cdf(&kept, &uniforms);
        Ok(order.gather(-1, &pick.unsqueeze(1), false).squeeze_dim(1))
    }
}

/// For each row of non-negative `weights` `[N, V]` (not all zero), the first index whose
/// cumulative weight exceeds `uniform · total`: a draw with probability proportional to the
/// weights. A zero-weight index is never returned (the index is clamped to the row's last
/// positive weight against rounding at the very top).
fn inverse_cdf(weights: &Tensor, uniforms: &Tensor) -> Tensor {
    let cdf = weights.cumsum(-1, Kind::Double);
    let total = cdf.narrow(1, cdf.size()[1] - 1, 1);
    let target = uniforms * total;
    let below = cdf.le_tensor(&target).sum_dim_intlist(-1, false, Kind::Int64);
    let last_positive = weights
        .gt(0.0)
        .to_kind(Kind::Int64)
        .cumsum(-1, Kind::Int64)
        .argmax(-1, false);
    below.minimum(&last_positive)
}

/// The uniform draws of one row: SplitMix64 (Steele, Lea and Flood 2014), a tiny, well-mixed,
/// seedable generator. Each (prompt, sample) has its own stream (see [`stream_seed`]), so
/// an answer does not depend on which other rows were decoded beside it.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    /// A uniform draw in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// SplitMix64's finalizer: a bijection of `u64` that mixes every input bit into every output
/// bit.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The seed of the stream of sample `sample` of the prompt `prompt` (its token ids) under
/// the run's `seed`: a function of these three only, so that the same prompt gets the same
/// K answers in any batch, at any position, alone or beside others.
pub(crate) fn stream_seed(seed: i64, prompt: &[i64], sample: usize) -> u64 {
    // FNV-1a over the ids' bytes names the prompt; mixing separates nearby seeds and samples.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in prompt.iter().flat_map(|id| id.to_le_bytes()) {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    let base = mix(mix(seed as u64) ^ hash);
    mix(base.wrapping_add((sample as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits(rows: &[&[f32]]) -> Tensor {
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_slice(&flat).view([rows.len() as i64, rows[0].len() as i64])
    }

    fn tokens(t: &Tensor) -> Vec<i64> {
        Vec::<i64>::try_from(t).expect("host")
    }

    #[test]
    fn tiny_temperatures_are_greedy() {
        let l = logits(&[&[1.0, 3.0, 2.0], &[5.0, 4.0, 5.0]]);
        for t in [0.0, 1e-40, 1e-300, 9.9e-6] {
            let sampler = Sampler::new(t, 1.0);
            assert!(sampler.is_greedy(), "{t}");
            assert_eq!(tokens(&sampler.choose(&l, &[0.99, 0.99]).unwrap()), [1, 0]);
        }
        assert!(!Sampler::new(1e-5, 1.0).is_greedy());
    }

    #[test]
    fn small_temperatures_above_the_threshold_stay_finite_and_pick_the_maximum() {
        // (l − max) / T is −1e5 and below: probabilities 1 and 0, never NaN.
        let l = logits(&[&[1.0, 3.0, 2.0]]);
        let sampler = Sampler::new(2e-5, 1.0);
        for u in [0.0, 0.5, 0.999_999] {
            assert_eq!(tokens(&sampler.choose(&l, &[u]).unwrap()), [1]);
        }
    }

    #[test]
    fn inverse_cdf_follows_the_uniform_and_skips_zero_weights() {
        let l = logits(&[&[0.0, 0.0, f32::NEG_INFINITY, 0.0]]);
        let sampler = Sampler::new(1.0, 1.0);
        let pick = |u: f64| tokens(&sampler.choose(&l, &[u]).unwrap())[0];
        assert_eq!(pick(0.0), 0);
        assert_eq!(pick(0.34), 1);
        assert_eq!(pick(0.67), 3);
        assert_eq!(pick(0.999_999_999), 3);
    }

    #[test]
    fn a_tiny_nucleus_keeps_only_the_most_likely_token() {
        let l = logits(&[&[0.5, 2.0, 1.9, -1.0], &[3.0, 0.0, 0.0, 3.0]]);
        let sampler = Sampler::new(1.0, 1e-9);
        for u in [0.0, 0.3, 0.999] {
            // Ties keep the first of the maxima (a stable sort), like argmax.
            assert_eq!(tokens(&sampler.choose(&l, &[u, u]).unwrap()), [1, 0]);
        }
    }

    #[test]
    fn the_nucleus_keeps_the_smallest_prefix_reaching_top_p() {
        // Probabilities 0.5, 0.3, 0.2 (sorted order: 2, 0, 1); top_p 0.7 keeps {2, 0}.
        let p = [0.3f32, 0.2, 0.5];
        let l = logits(&[&p.map(f32::ln)]);
        let sampler = Sampler::new(1.0, 0.7);
        let pick = |u: f64| tokens(&sampler.choose(&l, &[u]).unwrap())[0];
        assert_eq!(pick(0.0), 2);
        assert_eq!(pick(0.6), 2); // 0.6 · 0.8 = 0.48 < 0.5
        assert_eq!(pick(0.7), 0); // 0.56 >= 0.5
        assert_eq!(pick(0.999), 0);
    }

    #[test]
    fn streams_depend_on_seed_prompt_and_sample_only() {
        let a = stream_seed(7, &[1, 2, 3], 0);
        assert_eq!(a, stream_seed(7, &[1, 2, 3], 0));
        assert_ne!(a, stream_seed(8, &[1, 2, 3], 0));
        assert_ne!(a, stream_seed(7, &[1, 2, 4], 0));
        assert_ne!(a, stream_seed(7, &[1, 2, 3], 1));
        let mut s = SplitMix64::new(a);
        let draws: Vec<f64> = (0..1000).map(|_| s.next_f64()).collect();
        assert!(draws.iter().all(|&u| (0.0..1.0).contains(&u)));
        let mean = draws.iter().sum::<f64>() / 1000.0;
        assert!((mean - 0.5).abs() < 0.05, "{mean}");
    }
}
