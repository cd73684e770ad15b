//! The reference model's scores: the log-probability sums of every example under the
//! starting model, computed once and cached in `reference_logps.json` with a fingerprint of
//! what they depend on.

use tch::{Kind, Tensor};

use crate::data::TokenizedExample;
use crate::error::{RefaError, Result};
use crate::train::fingerprint::Fingerprint;
use crate::train::trainer::{score_batch, Trainer};

/// Reference-model log-probability sums, computed once from the starting model.
pub(super) type ReferenceCache = Vec<Vec<f64>>;

/// `reference_logps.json`: the sums of the training and held-out examples, and the
/// fingerprint of the data and the starting weights they were computed from.
#[derive(serde::Serialize, serde::Deserialize)]
struct ReferenceFile {
    fingerprint: String,
    train: ReferenceCache,
    eval: ReferenceCache,
}

impl Trainer {
    /// `[P, K]` reference sums for the examples at `indices`, when the loss needs them, on
    /// the device of the batch's `[P, K]` `rewards`.
    pub(super) fn reference_tensor(
        &self,
        indices: &[usize],
        eval: bool,
        rewards: &Tensor,
    ) -> Option<Tensor> {
        let (train, held) = self.reference.as_ref()?;
        let cache = if eval { held } else { train };
        let slots = rewards.size()[1] as usize;
        let mut values = vec![0f32; indices.len() * slots];
        for (p, &i) in indices.iter().enumerate() {
            for (k, v) in cache[i].iter().enumerate() {
                values[p * slots + k] = *v as f32;
            }
        }
        Some(
            Tensor::from_slice(&values)
                .view([indices.len() as i64, slots as i64])
                .to(rewards.device()),
        )
    }

    /// The reference sums from `reference_logps.json` when its fingerprint (data, starting
    /// weights, scoring settings) matches this run; otherwise scored anew and written
    /// atomically. A cache of other data or another model is never reused.
    pub(super) fn load_or_score_reference(&self) -> Result<(ReferenceCache, ReferenceCache)> {
        let path = self.config.output_dir.join("reference_logps.json");
        let fingerprint = Fingerprint::default()
            .examples(&self.train)
            .examples(&self.eval)
            .number(self.config.scoring.eos_id)
            .weights(&self.model)?
            .hex();
        let cached = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<ReferenceFile>(&bytes).ok())
            .filter(|file| file.fingerprint == fingerprint);
        if let Some(file) = cached {
            return Ok((file.train, file.eval));
        }
        let file = ReferenceFile {
            fingerprint,
            train: self.score_all(&self.train)?,
            eval: self.score_all(&self.eval)?,
        };
        if !self.is_main() {
            return Ok((file.train, file.eval));
        }
        let text = serde_json::to_vec(&file).map_err(|e| RefaError::config(&path, e))?;
        let temporary = self.config.output_dir.join(".reference_logps.json.partial");
        std::fs::write(&temporary, text)
            .and_then(|()| std::fs::rename(&temporary, &path))
            .map_err(|e| RefaError::io(&path, &e))?;
        Ok((file.train, file.eval))
    }

    /// `logp_sum` of every response of `examples` under the current model.
    fn score_all(&self, examples: &[TokenizedExample]) -> Result<ReferenceCache> {
        let mut cache = Vec::with_capacity(examples.len());
        let indices: Vec<usize> = (0..examples.len()).collect();
        for chunk in indices.chunks(self.config.prompts_per_batch.max(1)) {
            let batch = self.collate(examples, chunk);
            let sums = score_batch(&self.model, &batch, &self.config.scoring)?.logp_sum;
            let sums =
                Vec::<f64>::try_from(&sums.to_kind(Kind::Double).to_device(tch::Device::Cpu))?;
            let slots = batch.rewards.size()[1] as usize;
            for (p, &i) in chunk.iter().enumerate() {
                cache.push(sums[p * slots..p * slots + examples[i].responses.len()].to_vec());
            }
        }
        Ok(cache)
    }
}
