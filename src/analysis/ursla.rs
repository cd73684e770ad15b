//! The URSLA probe (paper Table 2): does a model's per-token uncertainty fall with the length
//! of the response?

use tch::{Device, Kind};

use crate::data::{collate, TokenizedExample};
use crate::error::Result;
use crate::model::CausalLm;
use crate::scoring::ScoringConfig;
use crate::train::score_batch;

/// Responses whose lengths fall in `[min_length, max_length]`, and their mean per-token NLL.
#[derive(Debug, Clone, PartialEq)]
pub struct LengthBucket {
    /// Shortest response of the bucket, in tokens.
    pub min_length: usize,
    /// Longest response of the bucket, in tokens.
    pub max_length: usize,
    /// Responses in the bucket.
    pub count: usize,
    /// Mean over the bucket's responses of `−logp_sum / length`.
    pub mean_nll: f64,
    /// Standard error of that mean (sample standard deviation / √count; 0 for one response).
    pub std_error: f64,
}

/// `(length, mean per-token NLL)` of every response of `examples` under `model`, scored
/// without gradients in batches of `prompts_per_batch` prompts.
pub fn response_nll(
    model: &CausalLm,
    examples: &[TokenizedExample],
    prompts_per_batch: usize,
    scoring: &ScoringConfig,
) -> Result<Vec<(usize, f64)>> {
    let device = model.lm_head_weight().device();
    let mut samples = Vec::new();
    for chunk in examples.chunks(prompts_per_batch.max(1)) {
        let refs: Vec<&TokenizedExample> = chunk.iter().collect();
        if refs.iter().all(|e| e.responses.is_empty()) {
            continue;
        }
        let batch = collate(&refs, model.config().eos_token_id, device);
        let scores = score_batch(model, &batch, scoring)?;
        let sums =
            Vec::<f64>::try_from(&scores.logp_sum.to_kind(Kind::Double).to_device(Device::Cpu))?;
        let lengths = Vec::<i64>::try_from(&scores.lengths.to_device(Device::Cpu))?;
        let slots = batch.rewards.size()[1] as usize;
        for (p, example) in chunk.iter().enumerate() {
            for k in 0..example.responses.len() {
                let n = p * slots + k;
                if lengths[n] > 0 {
                    samples.push((lengths[n] as usize, -sums[n] / lengths[n] as f64));
                }
            }
        }
    }
    Ok(samples)
}

/// Splits `(length, nll)` samples into `buckets` groups of (nearly) equal size by length,
/// shortest first (responses of equal length stay in one bucket).
pub fn length_buckets(samples: &[(usize, f64)], buckets: usize) -> Vec<LengthBucket> {
    let mut sorted = samples.to_vec();
    sorted.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
    let buckets = buckets.max(1);
    let mut result = Vec::new();
    let mut start = 0;
    for b in 0..buckets {
        let mut end = (sorted.len() * (b + 1)) / buckets;
        // Keep equal lengths together: extend the bucket over a run of its last length.
        while end > start && end < sorted.len() && sorted[end].0 == sorted[end - 1].0 {
            end += 1;
        }
        if end > start {
            result.push(bucket(&sorted[start..end]));
            start = end;
        }
    }
    result
}

fn bucket(samples: &[(usize, f64)]) -> LengthBucket {
    let count = samples.len();
    let mean = samples.iter().map(|s| s.1).sum::<f64>() / count as f64;
    let variance = if count > 1 {
        samples.iter().map(|s| (s.1 - mean).powi(2)).sum::<f64>() / (count - 1) as f64
    } else {
        0.0
    };
    LengthBucket {
        min_length: samples[0].0,
        max_length: samples[count - 1].0,
        count,
        mean_nll: mean,
        std_error: (variance / count as f64).sqrt(),
    }
}
