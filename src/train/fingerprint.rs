//! Fingerprints of what a checkpoint or a cache depends on: the tokenized training data and
//! the starting weights. A resumed run or a reused cache is refused (or rebuilt) when they
//! differ, instead of continuing silently on other data.

use tch::{Kind, Tensor};

use crate::data::TokenizedExample;
use crate::error::Result;
use crate::model::CausalLm;

/// A 64-bit FNV-1a hash, fed piece by piece: stable across platforms, Rust versions and
/// runs (unlike `std`'s `DefaultHasher`), which a fingerprint written to disk needs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fingerprint(u64);

impl Default for Fingerprint {
    fn default() -> Self {
        Fingerprint(0xcbf2_9ce4_8422_2325)
    }
}

impl Fingerprint {
    pub fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        for &byte in bytes {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
        self
    }

    pub fn number(&mut self, value: i64) -> &mut Self {
        self.bytes(&value.to_le_bytes())
    }

    pub fn ids(&mut self, ids: &[i64]) -> &mut Self {
        self.number(ids.len() as i64);
        for &id in ids {
            self.number(id);
        }
        self
    }

    /// Every token id and reward of `examples`, in order.
    pub fn examples(&mut self, examples: &[TokenizedExample]) -> &mut Self {
        self.number(examples.len() as i64);
        for example in examples {
            self.number(example.responses.len() as i64);
            for (response, reward) in example.responses.iter().zip(&example.rewards) {
                self.ids(&response.prompt)
                    .ids(&response.response)
                    .bytes(&reward.to_le_bytes());
            }
        }
        self
    }

    /// The model's variables: names, shapes, and the sum and sum of squares of each in f64,
    /// read with one device-to-host copy.
    pub fn weights(&mut self, model: &CausalLm) -> Result<&mut Self> {
        let mut variables: Vec<(String, Tensor)> =
            model.var_store().variables().into_iter().collect();
        variables.sort_by(|a, b| a.0.cmp(&b.0));
        let mut moments = Vec::with_capacity(2 * variables.len());
        for (name, tensor) in &variables {
            self.bytes(name.as_bytes());
            for &d in &tensor.size() {
                self.number(d);
            }
            let values = tensor.detach().to_kind(Kind::Double);
            moments.push(values.sum(Kind::Double));
            moments.push(values.square().sum(Kind::Double));
        }
        if !moments.is_empty() {
            let host = Tensor::stack(&moments, 0).to_device(tch::Device::Cpu);
            for value in Vec::<f64>::try_from(&host)? {
                self.bytes(&value.to_le_bytes());
            }
        }
        Ok(self)
    }

    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}
