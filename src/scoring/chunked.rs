//! The chunked scoring path: hidden states and the LM head in, at most `chunk_size × V`
//! logits alive at a time, exact gradients by recomputation.

use tch::{Kind, Tensor};

use crate::error::{RefaError, Result};
use crate::scoring::targets::Targets;
use crate::scoring::{score_kind, ScoringConfig, SequenceScores};
use crate::validate;

/// Scores sequences from hidden states `[N, T, H]` and an LM head `[V, H]` without ever
/// holding more than `chunk_size × V` logits.
///
/// tch has no custom autograd functions, so the pass is split in two:
/// 1. [`forward`](Self::forward) computes, without building a graph, each response token's
///    log-probability and `log P(EOS)` chunk by chunk, sums them per sequence and returns
///    [`SequenceScores`] whose `logp_sum`, `eos_logp` (and `eos_logp_steps`) are fresh leaves
///    that require gradients. Build the loss on them and call `backward()`: that graph is
///    only `[P, K]` wide.
/// 2. [`backward`](Self::backward) reads the leaves' gradients `a_i` (token) and `b_i` (EOS)
///    of every response position, recomputes each chunk's logits and turns them in place
///    into `∂L/∂logits_i = a_i·e_token + b_i·e_eos − (a_i + b_i)·softmax(logits_i)`; two
///    matmuls give the chunk's gradients with respect to its hidden states and the head
///    (added in place to the head's `.grad`). One surrogate `Σ hidden ⊙ grad` backward pass
///    then sends the hidden-state gradients into the real `hidden`, so the model's own graph
///    is traversed once.
///
/// When the head is frozen (it does not require gradients, as with LoRA), the forward pass
/// also keeps `p_i @ W` for each position, one extra matmul, and the backward pass needs no
/// recomputation at all: the gradient with respect to the hidden states is then a closed form
/// of gathered head rows (see `hidden_gradient_from_expectation`), and the whole step costs
/// what the plain path costs.
///
/// Only response positions (labels other than the ignore index) are scored: prompt and
/// padding positions cost neither memory nor time. The matmul runs in the inputs' kind
/// (bf16 stays bf16); logsumexp and sums run in f32 (f64 for f64 inputs).
///
/// For the whole step in one call, see [`preference_loss_backward`](crate::scoring::preference_loss_backward).
#[derive(Debug)]
pub struct ChunkedScorer<'a> {
    hidden: &'a Tensor,
    weight: &'a Tensor,
    targets: Targets,
    config: ScoringConfig,
    /// `[M, H]` `softmax(logits_i) @ W` of each response position, kept by the forward pass
    /// when only `hidden` needs gradients (a frozen head, as with LoRA): the backward pass
    /// then needs no recomputation at all (see [`ChunkedScorer::backward`]).
    expected_embedding: Option<Tensor>,
}

impl<'a> ChunkedScorer<'a> {
    /// Validates the shapes (`hidden [N, T, H]`, `lm_head_weight [V, H]` of the same kind and
    /// device, `labels [N, T]` i64), the labels and the configuration.
    pub fn new(
        hidden: &'a Tensor,
        lm_head_weight: &'a Tensor,
        labels: &Tensor,
        config: &ScoringConfig,
    ) -> Result<Self> {
        let shape = hidden.size();
        if shape.len() != 3 {
            let expected = "[N, T, H] (sequences × positions × hidden size)".to_string();
            return Err(RefaError::ShapeMismatch {
                tensor: "hidden",
                actual: shape,
                expected,
            });
        }
        validate::float_kind("hidden", hidden)?;
        let head = lm_head_weight.size();
        if head.len() != 2 || head[1] != shape[2] {
            let expected = format!("[V, H] with H = {} (the hidden size)", shape[2]);
            return Err(RefaError::ShapeMismatch {
                tensor: "lm_head_weight",
                actual: head,
                expected,
            });
        }
        if lm_head_weight.kind() != hidden.kind() {
            let expected = "the kind of `hidden` (the matmul runs in the inputs' kind)";
            return Err(RefaError::WrongKind {
                tensor: "lm_head_weight",
                actual: lm_head_weight.kind(),
                expected,
            });
        }
        validate::same_device("lm_head_weight", lm_head_weight, "hidden", hidden.device())?;
        validate::same_shape("labels", labels, "hidden without H", &shape[..2])?;
        let targets = Targets::new(labels, head[0], hidden.device(), config)?;
        Ok(ChunkedScorer {
            hidden,
            weight: lm_head_weight,
            targets,
            config: *config,
            expected_embedding: None,
        })
    }

    /// Per-sequence scores computed without a graph; `logp_sum`, `eos_logp` and
    /// `eos_logp_steps` are leaves that require gradients (see [`backward`](Self::backward)).
    pub fn forward(&mut self) -> SequenceScores {
        // The closed form behind the kept expectation holds for linear logits only.
        let keep_expected = self.hidden.requires_grad()
            && !self.weight.requires_grad()
            && self.config.logit_softcap.is_none();
        let (token, eos, expected) = tch::no_grad(|| {
            let hidden = self.selected_hidden();
            let (mut token, mut eos, mut expected) = (Vec::new(), Vec::new(), Vec::new());
            for (start, len) in self.chunks() {
                let logits = self.chunk_logits(&hidden.narrow(0, start, len), self.weight);
                let (t, e, normalizer) = self.log_probabilities(&logits, start, len);
                if keep_expected {
                    let probabilities = (logits - normalizer.unsqueeze(1))
                        .exp()
                        .to_kind(self.weight.kind());
                    expected.push(probabilities.matmul(self.weight));
                }
                token.push(t);
                eos.push(e);
            }
            (
                self.concat(&token),
                self.concat(&eos),
                keep_expected.then(|| self.concat(&expected)),
            )
        });
        self.expected_embedding = expected;
        let mut scores = self.gather_per_sequence(&token, &eos);
        scores.logp_sum = scores.logp_sum.set_requires_grad(true);
        scores.eos_logp = scores.eos_logp.set_requires_grad(true);
        scores.eos_logp_steps = scores
            .eos_logp_steps
            .map(|steps| steps.set_requires_grad(true));
        scores
    }

    /// Sends the gradients accumulated on `scores`' leaves (by a loss's `backward()`) into
    /// `hidden` and `lm_head_weight`, chunk by chunk. Leaves without a gradient count as
    /// zero; nothing happens if neither `hidden` nor the head requires gradients.
    pub fn backward(&self, scores: &SequenceScores) -> Result<()> {
        let (need_hidden, need_weight) = (self.hidden.requires_grad(), self.weight.requires_grad());
        if !(need_hidden || need_weight) {
            return Ok(());
        }
        if self.targets.kept() == 0 {
            return self.backward_zero();
        }
        let (token_coef, eos_coef) = self.coefficients(scores);
        if let Some(expected) = &self.expected_embedding {
            let grad = self.hidden_gradient_from_expectation(expected, &token_coef, &eos_coef);
            return Ok((self.selected_hidden() * grad)
                .sum(Kind::Float)
                .f_backward()?);
        }
        // Gathered once: its detached values feed the recomputation, its graph the surrogate.
        let selected = self.selected_hidden();
        let (hidden_grad, head_grad) =
            self.recompute_chunks(&selected.detach(), &token_coef, &eos_coef)?;
        let mut surrogate = Tensor::zeros([], (Kind::Float, self.hidden.device()));
        if let Some(grad) = hidden_grad {
            surrogate += (selected * grad).sum(Kind::Float);
        }
        if let Some(grad) = head_grad {
            surrogate += (self.weight * grad).sum(Kind::Float);
        }
        if surrogate.requires_grad() {
            surrogate.f_backward()?;
        }
        Ok(())
    }

    /// Without response tokens the loss does not depend on the model: send zero gradients,
    /// so that the parameters' gradients are defined, as the plain path leaves them.
    fn backward_zero(&self) -> Result<()> {
        let mut surrogate = Tensor::zeros([], (Kind::Float, self.hidden.device()));
        for t in [self.hidden, self.weight]
            .into_iter()
            .filter(|t| t.requires_grad())
        {
            surrogate += t.sum(Kind::Float) * 0.0;
        }
        Ok(surrogate.f_backward()?)
    }

    /// Recomputes each chunk's logits from `hidden` (`[M, H]`, detached) and applies the closed-form gradient of the loss with
    /// respect to them, `∂L/∂logits_i = a_i·e_token + b_i·e_eos − (a_i + b_i)·softmax_i`,
    /// built in place in the logits' own buffer. Returns the `[M, H]` gradient of the
    /// selected hidden states (when `hidden` requires gradients) and, for a head that is not
    /// a leaf, its `[V, H]` gradient. A leaf head (a model parameter, the usual case) gets
    /// its gradient added in place with `addmm_`, chunk by chunk: no autograd graph and no
    /// second `[V, H]` buffer is ever built.
    fn recompute_chunks(
        &self,
        hidden: &Tensor,
        token_coef: &Tensor,
        eos_coef: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let need_hidden = self.hidden.requires_grad();
        let head_grad = if self.weight.requires_grad() {
            Some(self.head_gradient_buffer()?)
        } else {
            None
        };
        let hidden_grad = tch::no_grad(|| {
            let mut hidden_grads = Vec::new();
            for (start, len) in self.chunks() {
                let chunk = hidden.narrow(0, start, len);
                let logits_grad = self.logits_gradient(
                    &chunk,
                    token_coef.narrow(0, start, len),
                    eos_coef.narrow(0, start, len),
                    start,
                );
                if need_hidden {
                    hidden_grads.push(logits_grad.matmul(self.weight));
                }
                if let Some(grad) = &head_grad {
                    let _ = grad.shallow_clone().addmm_(&logits_grad.tr(), &chunk);
                }
            }
            need_hidden.then(|| self.concat(&hidden_grads))
        });
        let non_leaf_head_grad = head_grad.filter(|_| !self.weight.is_leaf());
        Ok((hidden_grad, non_leaf_head_grad))
    }

    /// Where the head's gradient accumulates: the parameter's own `.grad` for a leaf
    /// (created as zeros when absent, as the first `backward()` would), a fresh buffer else.
    fn head_gradient_buffer(&self) -> Result<Tensor> {
        if !self.weight.is_leaf() {
            return Ok(self.weight.zeros_like().detach());
        }
        if !self.weight.grad().defined() {
            (self.weight.sum(Kind::Float) * 0.0).f_backward()?;
        }
        Ok(self.weight.grad())
    }

    /// `[len, V]` `∂L/∂logits` of a chunk, in the head's kind.
    fn logits_gradient(
        &self,
        hidden: &Tensor,
        token_coef: Tensor,
        eos_coef: Tensor,
        start: i64,
    ) -> Tensor {
        let len = hidden.size()[0];
        let mut grad = self.chunk_logits(hidden, self.weight);
        // d(c·tanh(z/c))/dz = 1 − (capped/c)², applied once the capped logits' gradient is
        // built.
        let cap_derivative = self
            .config
            .logit_softcap
            .map(|cap| 1.0 - (&grad / cap).square());
        let normalizer = grad.logsumexp(1, true);
        let _ = grad
            .g_sub_(&normalizer)
            .exp_()
            .g_mul_(&(-(&token_coef + &eos_coef)).unsqueeze(1));
        let tokens = self.targets.token.narrow(0, start, len).unsqueeze(1);
        let _ = grad.scatter_add_(1, &tokens, &token_coef.unsqueeze(1));
        let _ = grad.select(1, self.config.eos_id).g_add_(&eos_coef);
        if let Some(derivative) = cap_derivative {
            let _ = grad.g_mul_(&derivative);
        }
        grad.to_kind(self.weight.kind())
    }

    /// `[M, H]` hidden states of the response positions.
    fn selected_hidden(&self) -> Tensor {
        let width = self.hidden.size()[2];
        self.hidden
            .reshape([-1, width])
            .index_select(0, &self.targets.flat_position)
    }

    /// `(start, len)` of each chunk of the `M` response positions.
    fn chunks(&self) -> impl Iterator<Item = (i64, i64)> {
        let (total, size) = (self.targets.kept(), self.config.chunk_size);
        (0..total)
            .step_by(size as usize)
            .map(move |start| (start, size.min(total - start)))
    }

    /// `[len, V]` logits of a chunk of response positions, in the score kind (soft-capped
    /// when the config says so).
    fn chunk_logits(&self, hidden: &Tensor, weight: &Tensor) -> Tensor {
        let logits = hidden.matmul(&weight.tr()).to_kind(self.kind());
        match self.config.logit_softcap {
            Some(cap) => (logits / cap).tanh() * cap,
            None => logits,
        }
    }

    /// `(log P(token), log P(EOS), log-normalizer)` `[len]` of the response positions
    /// `start..start + len` from their logits.
    fn log_probabilities(&self, logits: &Tensor, start: i64, len: i64) -> (Tensor, Tensor, Tensor) {
        let normalizer = logits.logsumexp(1, false);
        let tokens = self.targets.token.narrow(0, start, len).unsqueeze(1);
        let token = logits.gather(1, &tokens, false).squeeze_dim(1) - &normalizer;
        let eos = logits.select(1, self.config.eos_id) - &normalizer;
        (token, eos, normalizer)
    }

    /// `[M, H]` gradient of the loss with respect to the selected hidden states, in closed
    /// form. With `a_i`, `b_i` the coefficients of position `i`'s token and EOS
    /// log-probabilities, `∂L/∂logits_i = a_i·e_token + b_i·e_eos − (a_i + b_i)·p_i`, so
    /// `∂L/∂h_i = a_i·W[token_i] + b_i·W[eos] − (a_i + b_i)·(p_i @ W)`: the expectation
    /// `p_i @ W` from the forward pass replaces any recomputation of the logits.
    fn hidden_gradient_from_expectation(
        &self,
        expected: &Tensor,
        token_coef: &Tensor,
        eos_coef: &Tensor,
    ) -> Tensor {
        let kind = self.kind();
        let token_rows = self
            .weight
            .index_select(0, &self.targets.token)
            .to_kind(kind);
        let eos_row = self
            .weight
            .get(self.config.eos_id)
            .to_kind(kind)
            .unsqueeze(0);
        let (a, b) = (token_coef.unsqueeze(1), eos_coef.unsqueeze(1));
        let grad = token_rows * &a + eos_row * &b - expected.to_kind(kind) * (a + b);
        grad.to_kind(self.hidden.kind())
    }

    /// Per-sequence sums from per-position values `[M]`.
    fn gather_per_sequence(&self, token: &Tensor, eos: &Tensor) -> SequenceScores {
        let t = &self.targets;
        let zeros = Tensor::zeros([t.sequences], (self.kind(), self.hidden.device()));
        let last = eos.where_scalarother(&t.is_last, 0.0);
        let eos_logp_steps = self.config.eos_steps.then(|| {
            let mut steps = Tensor::zeros(
                [t.sequences, t.positions - 1],
                (self.kind(), self.hidden.device()),
            );
            let _ = steps.index_put_(&[Some(&t.sequence), Some(&t.step)], eos, false);
            steps
        });
        SequenceScores {
            logp_sum: zeros.index_add(0, &t.sequence, token),
            eos_logp: zeros.index_add(0, &t.sequence, &last),
            eos_logp_steps,
            lengths: t.lengths.shallow_clone(),
            eos_mask: t.eos_mask.shallow_clone(),
            step_mask: t.valid.shallow_clone(),
        }
    }

    /// `[M]` gradients of the loss with respect to each position's token and EOS
    /// log-probability, read from the leaves of `scores`.
    fn coefficients(&self, scores: &SequenceScores) -> (Tensor, Tensor) {
        let t = &self.targets;
        let grad = |leaf: &Tensor| {
            let g = leaf.grad();
            if g.defined() {
                g.to_kind(self.kind())
            } else {
                leaf.zeros_like().to_kind(self.kind())
            }
        };
        let token = grad(&scores.logp_sum).index_select(0, &t.sequence);
        let mut eos = grad(&scores.eos_logp)
            .index_select(0, &t.sequence)
            .where_scalarother(&t.is_last, 0.0);
        if let Some(steps) = &scores.eos_logp_steps {
            eos += grad(steps).index(&[Some(&t.sequence), Some(&t.step)]);
        }
        (token, eos)
    }

    fn concat(&self, parts: &[Tensor]) -> Tensor {
        if parts.is_empty() {
            return Tensor::zeros([0], (self.kind(), self.hidden.device()));
        }
        Tensor::cat(parts, 0)
    }

    fn kind(&self) -> Kind {
        score_kind(self.hidden.kind())
    }
}

/// Scores sequences from hidden states and the LM head in chunks, without gradients (for a
/// reference model, evaluation or generation bookkeeping). See [`ChunkedScorer`].
pub fn score_hidden(
    hidden: &Tensor,
    lm_head_weight: &Tensor,
    labels: &Tensor,
    config: &ScoringConfig,
) -> Result<SequenceScores> {
    let scores = ChunkedScorer::new(hidden, lm_head_weight, labels, config)?.forward();
    Ok(SequenceScores {
        logp_sum: scores.logp_sum.detach(),
        eos_logp: scores.eos_logp.detach(),
        eos_logp_steps: scores.eos_logp_steps.map(|s| s.detach()),
        ..scores
    })
}
