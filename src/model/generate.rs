//! Text generation with a key/value cache: greedy or sampled decoding.

use tch::{Device, Kind, Tensor};

use crate::error::{RefaError, Result};
use crate::model::causal_lm::{AttentionContext, LayerCache};
use crate::model::layers::LayerMask;
use crate::model::CausalLm;

/// How tokens are chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerationOptions {
    /// Most new tokens.
    pub max_new_tokens: usize,
    /// 0: greedy; otherwise the softmax temperature of sampling.
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f64,
    /// Seed of sampling.
    pub seed: i64,
}

impl Default for GenerationOptions {
    /// Greedy, up to 256 new tokens.
    fn default() -> Self {
        GenerationOptions {
            max_new_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl GenerationOptions {
    /// `temperature` finite and >= 0, `top_p` in (0, 1], at least one new token.
    pub fn validate(&self) -> Result<()> {
        RefaError::require(
            self.temperature.is_finite() && self.temperature >= 0.0,
            "temperature",
            self.temperature,
            "finite and >= 0 (0: greedy)",
        )?;
        RefaError::require(
            self.top_p > 0.0 && self.top_p <= 1.0,
            "top_p",
            self.top_p,
            "in (0, 1]",
        )?;
        RefaError::require(
            self.max_new_tokens >= 1,
            "max_new_tokens",
            self.max_new_tokens,
            ">= 1",
        )
    }
}

impl CausalLm {
    /// Continues `prompt` (token ids, BOS included) until any of the config's EOS ids
    /// (`eos_token_ids`) or `max_new_tokens`, with a
    /// key/value cache: the prompt is processed once, then one position per new token.
    /// Returns the new tokens (EOS included when produced).
    pub fn generate(&self, prompt: &[i64], options: &GenerationOptions) -> Result<Vec<i64>> {
        options.validate()?;
        if prompt.is_empty() {
            return Err(RefaError::ShapeMismatch {
                tensor: "prompt",
                actual: vec![0],
                expected: "at least one token".into(),
            });
        }
        let device = self.lm_head_weight().device();
        let mut random = SplitMix64(options.seed as u64);
        let mut cache: Vec<LayerCache> = self
            .decoder_layers()
            .map(|_| LayerCache::default())
            .collect();
        let mut generated = Vec::new();
        let mut next_input = prompt.to_vec();
        let mut offset = 0i64;
        tch::no_grad(|| -> Result<Vec<i64>> {
            while generated.len() < options.max_new_tokens {
                let logits = self.step(&next_input, offset, &mut cache, device)?;
                offset += next_input.len() as i64;
                let token = choose(&logits, options, &mut random)?;
                generated.push(token);
                if self.config().eos_token_ids.contains(&token) {
                    break;
                }
                next_input = vec![token];
            }
            Ok(generated)
        })
    }

    /// Logits `[V]` of the position after `tokens`, which start at position `offset`.
    fn step(
        &self,
        tokens: &[i64],
        offset: i64,
        cache: &mut [LayerCache],
        device: Device,
    ) -> Result<Tensor> {
        let count = tokens.len() as i64;
        let ids = Tensor::from_slice(tokens).view([1, count]).to(device);
        let (cos, sin) = self.rotary_tables(offset, count);
        let context = AttentionContext::new(cos, sin, self.config(), |window| {
            let (mask, causal) = cached_attention_mask(offset, count, window, device);
            LayerMask { mask, causal }
        });
        let mut x = self.embed_tokens(&ids)?;
        for (layer, layer_cache) in self.decoder_layers().zip(cache.iter_mut()) {
            x = layer.forward_cached(&x, &context, false, Some(layer_cache));
        }
        let last = self.final_norm(&x.narrow(1, count - 1, 1));
        Ok(self.logits(&last).view([-1]).to_kind(Kind::Float))
    }
}

/// Mask for `count` new positions after `offset` cached ones: `None` with `causal` for a
/// fresh prompt without a binding window, `None` without `causal` for one new token that may
/// see everything, else an explicit `[1, 1, count, offset + count]` mask.
fn cached_attention_mask(
    offset: i64,
    count: i64,
    window: Option<i64>,
    device: Device,
) -> (Option<Tensor>, bool) {
    let total = offset + count;
    let windowed = window.is_some_and(|w| w < total);
    if !windowed && offset == 0 {
        return (None, true);
    }
    if !windowed && count == 1 {
        return (None, false);
    }
    let query = Tensor::arange_start(offset, total, (Kind::Int64, device)).unsqueeze(1);
    let key = Tensor::arange(total, (Kind::Int64, device)).unsqueeze(0);
    let mut allowed = key.le_tensor(&query);
    if let Some(w) = window.filter(|_| windowed) {
        allowed = allowed.logical_and(&(&query - &key).lt(w));
    }
    (Some(allowed.unsqueeze(0).unsqueeze(0)), false)
}

/// Greedy (temperature 0) or temperature + nucleus sampling from logits `[V]`. Sampling
/// draws from the generator given, not from libtorch's global one, so that generation is
/// reproducible whatever else the process does.
fn choose(logits: &Tensor, options: &GenerationOptions, random: &mut SplitMix64) -> Result<i64> {
    if options.temperature <= 0.0 {
        return Ok(logits.argmax(0, false).int64_value(&[]));
    }
    let probabilities = (logits / options.temperature).softmax(0, Kind::Double);
    let (sorted, order) = probabilities.sort(0, true);
    let sorted = Vec::<f64>::try_from(&sorted.to_device(Device::Cpu))?;
    // Nucleus: the smallest prefix whose mass reaches top_p (at least one token).
    let mut kept = 0;
    let mut mass = 0.0;
    while kept < sorted.len() && (kept == 0 || mass < options.top_p) {
        mass += sorted[kept];
        kept += 1;
    }
    let mut target = random.next_f64() * mass;
    let mut pick = kept - 1;
    for (i, p) in sorted[..kept].iter().enumerate() {
        if target < *p {
            pick = i;
            break;
        }
        target -= p;
    }
    Ok(order.int64_value(&[pick as i64]))
}

/// SplitMix64 (Steele et al. 2014): a tiny, well-mixed, seedable generator.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}
