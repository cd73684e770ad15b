//! LoRA adapters (Hu et al. 2021) on the model's linear layers.

use tch::nn::Path;
use tch::{Kind, Tensor};

use crate::error::{RefaError, Result};
use crate::model::ModelConfig;

/// A linear layer of the model that can carry a LoRA adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "trainer", derive(clap::ValueEnum))]
pub enum LoraTarget {
    /// `self_attn.q_proj`
    Q,
    /// `self_attn.k_proj`
    K,
    /// `self_attn.v_proj`
    V,
    /// `self_attn.o_proj`
    O,
    /// `mlp.gate_proj`
    Gate,
    /// `mlp.up_proj`
    Up,
    /// `mlp.down_proj`
    Down,
}

impl LoraTarget {
    /// Every target.
    pub const ALL: [LoraTarget; 7] = [
        LoraTarget::Q,
        LoraTarget::K,
        LoraTarget::V,
        LoraTarget::O,
        LoraTarget::Gate,
        LoraTarget::Up,
        LoraTarget::Down,
    ];

    /// Parses `q`, `k`, `v`, `o`, `gate`, `up` or `down`.
    pub fn parse(name: &str) -> Option<Self> {
        LoraTarget::ALL.into_iter().find(|t| t.short_name() == name)
    }

    /// `q`, `k`, `v`, `o`, `gate`, `up` or `down`.
    pub fn short_name(self) -> &'static str {
        match self {
            LoraTarget::Q => "q",
            LoraTarget::K => "k",
            LoraTarget::V => "v",
            LoraTarget::O => "o",
            LoraTarget::Gate => "gate",
            LoraTarget::Up => "up",
            LoraTarget::Down => "down",
        }
    }
}

/// LoRA settings: `W' = W + (α/r)·B·A` on each target, `A` `[r, in]` Kaiming-uniform,
/// `B` `[out, r]` zero (so the adapted model starts equal to the base), dropout on the
/// adapter's input. Only `A` and `B` are trainable.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank `r`.
    pub rank: i64,
    /// Scale numerator `α` (the update is scaled by `α/r`).
    pub alpha: f64,
    /// Dropout probability on the adapter's input during training.
    pub dropout: f64,
    /// Which linear layers get adapters.
    pub targets: Vec<LoraTarget>,
}

impl LoraConfig {
    /// Checks the settings against the model they adapt: `1 <= rank <= ` the smallest
    /// dimension of a targeted layer (a larger rank adds parameters without adding rank),
    /// `α` finite and > 0, dropout in `[0, 1)`, at least one target.
    pub fn validate(&self, model: &ModelConfig) -> Result<()> {
        let attention = model.num_attention_heads * model.head_width();
        let key_value = model.kv_heads() * model.head_width();
        let largest_rank = self
            .targets
            .iter()
            .map(|target| match target {
                LoraTarget::Q | LoraTarget::O => attention.min(model.hidden_size),
                LoraTarget::K | LoraTarget::V => key_value.min(model.hidden_size),
                LoraTarget::Gate | LoraTarget::Up | LoraTarget::Down => {
                    model.intermediate_size.min(model.hidden_size)
                }
            })
            .min()
            .unwrap_or(0);
        RefaError::require(
            !self.targets.is_empty(),
            "lora.targets",
            "[]",
            "at least one layer",
        )?;
        RefaError::require(
            (1..=largest_rank).contains(&self.rank),
            "lora.rank",
            self.rank,
            format!("in [1, {largest_rank}] (the smallest dimension of a targeted layer)"),
        )?;
        RefaError::require(
            self.alpha.is_finite() && self.alpha > 0.0,
            "lora.alpha",
            self.alpha,
            "finite and > 0",
        )?;
        RefaError::require(
            (0.0..1.0).contains(&self.dropout),
            "lora.dropout",
            self.dropout,
            "in [0, 1)",
        )
    }
}

impl Default for LoraConfig {
    /// r = 16, α = 32, dropout 0.05 on every linear layer (common settings for 7B models).
    fn default() -> Self {
        LoraConfig {
            rank: 16,
            alpha: 32.0,
            dropout: 0.05,
            targets: LoraTarget::ALL.to_vec(),
        }
    }
}

/// A linear layer `y = x·Wᵀ (+ b)`, optionally with a LoRA adapter (the bias, where the
/// family has one, stays with the base projection and trains with it).
#[derive(Debug)]
pub(crate) struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    adapter: Option<Adapter>,
}

#[derive(Debug)]
struct Adapter {
    a: Tensor,
    b: Tensor,
    scale: f64,
    dropout: f64,
}

impl Linear {
    /// Creates `{path}.weight` `[out, in]` in `kind` (a trainable variable when
    /// `trainable`) and, when `lora` is given, `{path}.lora_A.weight` `[r, in]` and
    /// `{path}.lora_B.weight` `[out, r]`, kept in f32 (they are the trained master weights)
    /// and cast to the input's kind in the forward pass. With `bias`, also `{path}.bias`
    /// `[out]`.
    pub fn new(
        path: &Path,
        (out_features, in_features): (i64, i64),
        bias: bool,
        kind: Kind,
        trainable: bool,
        lora: Option<&LoraConfig>,
    ) -> Self {
        let weight = Tensor::zeros([out_features, in_features], (kind, path.device()));
        let weight = path.add("weight", weight, trainable);
        let bias = bias.then(|| {
            let zeros = Tensor::zeros([out_features], (kind, path.device()));
            path.add("bias", zeros, trainable)
        });
        let adapter = lora.map(|config| {
            // PEFT's kaiming_uniform_(a = √5): U(−1/√in, 1/√in).
            let bound = 1.0 / (in_features as f64).sqrt();
            let a = Tensor::empty([config.rank, in_features], (Kind::Float, path.device()))
                .uniform_(-bound, bound);
            let b = Tensor::zeros([out_features, config.rank], (Kind::Float, path.device()));
            Adapter {
                a: path.sub("lora_A").add("weight", a, true),
                b: path.sub("lora_B").add("weight", b, true),
                scale: config.alpha / config.rank as f64,
                dropout: config.dropout,
            }
        });
        Linear {
            weight,
            bias,
            adapter,
        }
    }

    /// `x·Wᵀ (+ b) (+ (α/r)·dropout(x)·Aᵀ·Bᵀ)`.
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let base = match &self.bias {
            None => x.matmul(&self.weight.tr()),
            Some(bias) => x.linear(&self.weight, Some(bias)),
        };
        match &self.adapter {
            None => base,
            Some(adapter) => {
                let input = x.dropout(adapter.dropout, train);
                let (a, b) = (adapter.a.to_kind(x.kind()), adapter.b.to_kind(x.kind()));
                base + input.matmul(&a.tr()).matmul(&b.tr()) * adapter.scale
            }
        }
    }

    /// `W + (α/r)·B·A`: the weight with the adapter merged in, for export.
    pub fn merged_weight(&self) -> Tensor {
        match &self.adapter {
            None => self.weight.detach(),
            Some(adapter) => {
                let update = adapter
                    .b
                    .to_kind(Kind::Float)
                    .matmul(&adapter.a.to_kind(Kind::Float))
                    * adapter.scale;
                (self.weight.to_kind(Kind::Float) + update)
                    .to_kind(self.weight.kind())
                    .detach()
            }
        }
    }

    /// The adapter's `(A, B)`, if any.
    pub fn adapter(&self) -> Option<(&Tensor, &Tensor)> {
        self.adapter.as_ref().map(|a| (&a.a, &a.b))
    }
}
