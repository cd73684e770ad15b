//! Fingerprints of what a checkpoint or a cache depends on: the tokenized training data and
//! the starting weights. A resumed run or a reused cache is refused (or rebuilt) when they
//! differ, instead of continuing silently on other data. The ranks of a data-parallel job
//! compare the same kind of fingerprints of their whole setup ([`setup_parts`]) before they
//! train together.

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
        self.values(model, |_| true)
    }

    /// [`weights`](Self::weights) of the variables `keep` selects, by name.
    fn values(&mut self, model: &CausalLm, keep: impl Fn(&Tensor) -> bool) -> Result<&mut Self> {
        let mut variables: Vec<(String, Tensor)> = model
            .var_store()
            .variables()
            .into_iter()
            .filter(|(_, t)| keep(t))
            .collect();
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

    /// The hash itself.
    #[cfg(feature = "distributed")]
    pub fn value(&self) -> u64 {
        self.0
    }

    /// The model's variables' names, shapes, kinds and whether each trains (LoRA adapters
    /// on a frozen base differ from full fine-tuning here), not their values.
    #[cfg(feature = "distributed")]
    pub fn structure(&mut self, model: &CausalLm) -> &mut Self {
        let mut variables: Vec<(String, Tensor)> =
            model.var_store().variables().into_iter().collect();
        variables.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, tensor) in &variables {
            self.bytes(name.as_bytes())
                .ids(&tensor.size())
                .bytes(format!("{:?}", tensor.kind()).as_bytes())
                .number(i64::from(tensor.requires_grad()));
        }
        self
    }
}

/// One part of what the ranks of a data-parallel job must share: its name in an error, this
/// rank's value in words where it is short (a setting), and its fingerprint.
#[cfg(feature = "distributed")]
#[derive(Debug)]
pub(crate) struct SetupPart {
    pub name: String,
    pub text: Option<String>,
    pub hash: u64,
}

/// What the ranks of a job must agree on before they train together: every setting of
/// `config`, the loss (its name and its value on the probe batch, a function of its
/// hyperparameters), the model's structure (LoRA or not) and frozen weights (which rank 0's
/// broadcast does not cover), the training and held-out data, and ZeRO-1. Always the same
/// number of parts, in the same order, on every rank.
#[cfg(feature = "distributed")]
pub(crate) fn setup_parts(
    model: &CausalLm,
    loss: &dyn crate::loss::PreferenceLoss,
    (train, eval): (&[TokenizedExample], &[TokenizedExample]),
    config: &crate::train::TrainConfig,
    shard_optimizer: bool,
) -> Result<Vec<SetupPart>> {
    let hash = |bytes: &[u8]| Fingerprint::default().bytes(bytes).value();
    let mut parts: Vec<SetupPart> = config
        .settings()
        .into_iter()
        .map(|(name, text)| SetupPart {
            name: format!("`{name}`"),
            hash: hash(text.as_bytes()),
            text: Some(text),
        })
        .collect();
    // A loss this rank cannot even run differs by its error's text.
    let probe = match crate::train::config::probe_loss(loss, &config.scoring) {
        Ok(value) => format!("{} {:016x}", loss.name(), value.to_bits()),
        Err(error) => format!("{} {error}", loss.name()),
    };
    let frozen = Fingerprint::default()
        .values(model, |t| !t.requires_grad())?
        .value();
    let computed = [
        ("the loss and its hyperparameters", hash(probe.as_bytes())),
        (
            "the model's variables (names, shapes, kinds; LoRA or not)",
            Fingerprint::default().structure(model).value(),
        ),
        ("the frozen weights", frozen),
        (
            "the training data",
            Fingerprint::default().examples(train).value(),
        ),
        (
            "the held-out data",
            Fingerprint::default().examples(eval).value(),
        ),
        ("--shard-optimizer", u64::from(shard_optimizer)),
    ];
    parts.extend(computed.into_iter().map(|(name, hash)| SetupPart {
        name: name.to_string(),
        text: None,
        hash,
    }));
    Ok(parts)
}
