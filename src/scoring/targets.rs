//! Labels turned into the response positions the scorers read.

use tch::{Device, Kind, Tensor};

use crate::device::upload;
use crate::error::{RefaError, Result};
use crate::reduce::amax_or_zero;
use crate::scoring::ScoringConfig;
use crate::validate;

/// The response tokens of `N` sequences of `T` labels, after the causal shift: the hidden
/// state at position `t` predicts `labels[t + 1]`. Only positions whose label is not the
/// ignore index are kept, so prompt and padding positions cost nothing downstream.
#[derive(Debug)]
pub(crate) struct Targets {
    /// Number of sequences `N`.
    pub sequences: i64,
    /// Positions per sequence `T`.
    pub positions: i64,
    /// `[N, T − 1]` bool: shifted label `t` is a response token.
    pub valid: Tensor,
    /// `[N, T − 1]` i64: shifted labels, ignored ones replaced by 0.
    pub shifted: Tensor,
    /// `[N]` i64: shifted index of each sequence's last response token (0 when it has none).
    pub last: Tensor,
    /// `[N]` count of response tokens.
    pub lengths: Tensor,
    /// `[N]` bool: the last response token is EOS.
    pub eos_mask: Tensor,
    /// `[M]` i64 flat index `n·T + t` into `[N·T]` of each kept position's hidden state.
    pub flat_position: Tensor,
    /// `[M]` i64 sequence `n` of each kept position.
    pub sequence: Tensor,
    /// `[M]` i64 shifted position `t` of each kept position.
    pub step: Tensor,
    /// `[M]` i64 target token of each kept position.
    pub token: Tensor,
    /// `[M]` bool: the kept position is its sequence's last response token.
    pub is_last: Tensor,
}

impl Targets {
    /// Validates `labels` (`[N, T]` i64, on `device` or on the CPU) against a vocabulary of
    /// `vocab` tokens. Labels on the CPU (as the trainer's collation keeps them) are turned
    /// into targets there, where the selection of response positions and the vocabulary
    /// check cost no device synchronization, and the targets are uploaded once.
    pub fn new(
        labels: &Tensor,
        vocab: i64,
        device: Device,
        config: &ScoringConfig,
    ) -> Result<Self> {
        config.validate(vocab)?;
        let shape = labels.size();
        if shape.len() != 2 || shape[1] < 1 {
            let expected = "[N, T] with T >= 1 (sequences × positions)".to_string();
            return Err(RefaError::ShapeMismatch {
                tensor: "labels",
                actual: shape,
                expected,
            });
        }
        validate::exact_kind("labels", labels, Kind::Int64)?;
        if labels.device() != Device::Cpu {
            validate::same_device("labels", labels, "hidden", device)?;
        }
        let targets = Self::build(labels, vocab, config)?;
        Ok(if labels.device() == device {
            targets
        } else {
            targets.uploaded(device)
        })
    }

    fn build(labels: &Tensor, vocab: i64, config: &ScoringConfig) -> Result<Self> {
        let device = labels.device();
        let (sequences, positions) = (labels.size()[0], labels.size()[1]);
        let shifted = labels.narrow(1, 1, positions - 1);
        let valid = shifted.ne(config.ignore_index);
        check_vocabulary(&shifted, &valid, vocab)?;
        let shifted = shifted.where_scalarother(&valid, 0);
        let steps = Tensor::arange(positions - 1, (Kind::Int64, device)).unsqueeze(0);
        let last = amax_or_zero(&steps.where_scalarother(&valid, -1), &[1], false).clamp_min(0);
        let lengths = valid.sum_dim_intlist(1, false, Kind::Int64);
        // With T = 1 there is no response token, so no sequence ends with EOS.
        let eos_mask = if positions > 1 {
            let last_token = shifted.gather(1, &last.unsqueeze(1), false).squeeze_dim(1);
            last_token.eq(config.eos_id).logical_and(&lengths.gt(0))
        } else {
            lengths.gt(0)
        };
        let kept = valid.nonzero();
        let (sequence, step) = (kept.select(1, 0), kept.select(1, 1));
        Ok(Targets {
            sequences,
            positions,
            flat_position: &sequence * positions + &step,
            token: shifted.index(&[Some(&sequence), Some(&step)]),
            is_last: step.eq_tensor(&last.index_select(0, &sequence)),
            valid,
            shifted,
            last,
            lengths,
            eos_mask,
            sequence,
            step,
        })
    }

    /// Number of kept (response) positions `M`.
    pub fn kept(&self) -> i64 {
        self.sequence.size()[0]
    }

    /// The same targets on `device`, copied asynchronously from the host.
    fn uploaded(self, device: Device) -> Self {
        let up = |t: Tensor| upload(&t, device);
        Targets {
            sequences: self.sequences,
            positions: self.positions,
            valid: up(self.valid),
            shifted: up(self.shifted),
            last: up(self.last),
            lengths: up(self.lengths),
            eos_mask: up(self.eos_mask),
            flat_position: up(self.flat_position),
            sequence: up(self.sequence),
            step: up(self.step),
            token: up(self.token),
            is_last: up(self.is_last),
        }
    }
}

/// Every response label must be a token of the vocabulary (one host synchronization).
fn check_vocabulary(shifted: &Tensor, valid: &Tensor, vocab: i64) -> Result<()> {
    let bad = shifted
        .lt(0)
        .logical_or(&shifted.ge(vocab))
        .logical_and(valid);
    if bad.any().int64_value(&[]) == 0 {
        return Ok(());
    }
    let index = Vec::<i64>::try_from(&bad.nonzero().get(0).to_device(Device::Cpu))?;
    Err(RefaError::InvalidValue {
        tensor: "labels",
        position: format!("sequence {}, position {}", index[0], index[1] + 1),
        value: shifted.int64_value(&index) as f64,
        requirement: "a token id in [0, vocab) or the ignore index",
    })
}

impl Targets {
    /// `x[n, last[n]]` for `[N, T − 1]` `x`, as `[N]` (zeros when `T = 1`).
    pub fn at_last(&self, x: &Tensor) -> Tensor {
        if x.size()[1] == 0 {
            return Tensor::zeros([self.sequences], (x.kind(), x.device()));
        }
        x.gather(1, &self.last.unsqueeze(1), false).squeeze_dim(1)
    }
}
