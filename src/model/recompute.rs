//! Layer-wise activation recomputation: keep only each decoder layer's input during the
//! forward pass, recompute the layer during the backward pass.

use tch::{Kind, Tensor};

use crate::error::Result;
use crate::model::causal_lm::{layer_seeds, seed_dropout, AttentionContext, ForwardOptions};
use crate::model::CausalLm;

/// The result of [`CausalLm::forward_pass`] (or [`CausalLm::forward_packed`]): the hidden states, and what the backward pass
/// needs to finish when layers were not kept in the autograd graph.
///
/// Usage: compute the loss from `hidden` and back-propagate it (e.g. with
/// [`preference_loss_backward`](crate::scoring::preference_loss_backward)), then call
/// [`finish_backward`](Self::finish_backward). Without recomputation that call does nothing.
#[derive(Debug)]
pub struct ForwardPass {
    /// `[N, T, H]` hidden states after the final norm (`[1, total, H]` for a packed row).
    pub hidden: Tensor,
    recompute: Option<Recompute>,
}

#[derive(Debug)]
struct Recompute {
    /// Token embeddings, in the graph of the embedding weights.
    embedded: Tensor,
    /// Each layer's input, detached.
    inputs: Vec<Tensor>,
    /// The last layer's output as a leaf: `hidden = norm(last)`.
    last: Tensor,
    context: AttentionContext,
    train: bool,
    /// Seeds that make each layer's dropout identical in the forward and the recomputation.
    seeds: Vec<i64>,
}

impl CausalLm {
    /// A forward pass (see [`ForwardOptions`]). With `recompute`, the decoder layers run
    /// without a graph and only their inputs are kept (memory: one `[N, T, H]` tensor per
    /// layer instead of every activation); [`ForwardPass::finish_backward`] recomputes each
    /// layer, last to first, and back-propagates through it. Gradients equal those of the
    /// plain pass.
    pub fn forward_pass(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        options: &ForwardOptions,
    ) -> Result<ForwardPass> {
        let (embedded, context) = self.embed(input_ids, attention_mask, options.padding)?;
        self.run_layers(embedded, context, options)
    }

    /// The decoder layers and the final norm over `embedded` (a padded batch or a packed
    /// row, as `context` says), keeping the layers in the graph or, with
    /// `options.recompute`, only their inputs.
    pub(crate) fn run_layers(
        &self,
        embedded: Tensor,
        context: AttentionContext,
        options: &ForwardOptions,
    ) -> Result<ForwardPass> {
        let train = options.train;
        if !options.recompute {
            return Ok(ForwardPass {
                hidden: self.forward_layers(embedded, &context, train)?,
                recompute: None,
            });
        }
        let seeds = layer_seeds(self.decoder_layers().len(), train);
        let mut inputs = Vec::with_capacity(seeds.len());
        let mut x = embedded.detach();
        tch::no_grad(|| -> Result<()> {
            for (layer, seed) in self.decoder_layers().zip(&seeds) {
                inputs.push(x.shallow_clone());
                seed_dropout(*seed);
                x = layer.forward(&x, &context, train)?;
            }
            Ok(())
        })?;
        let last = x.set_requires_grad(true);
        let hidden = self.final_norm(&last);
        let recompute = Recompute {
            embedded,
            inputs,
            last,
            context,
            train,
            seeds,
        };
        Ok(ForwardPass {
            hidden,
            recompute: Some(recompute),
        })
    }
}

impl ForwardPass {
    /// Back-propagates through the recomputed layers into the model's parameters, once the
    /// loss's gradient has reached `hidden`. A no-op without recomputation, or when no
    /// gradient reached the hidden states.
    pub fn finish_backward(self, model: &CausalLm) -> Result<()> {
        let Some(r) = self.recompute else {
            return Ok(());
        };
        let mut grad = r.last.grad();
        if !grad.defined() {
            return Ok(());
        }
        let layers: Vec<_> = model.decoder_layers().collect();
        for ((layer, input), seed) in layers.iter().zip(&r.inputs).zip(&r.seeds).rev() {
            let input = input.detach().set_requires_grad(true);
            seed_dropout(*seed);
            let output = layer.forward(&input, &r.context, r.train)?;
            (output * &grad).sum(Kind::Float).f_backward()?;
            grad = input.grad();
        }
        // A frozen embedding (LoRA) has nothing to receive the gradient.
        if r.embedded.requires_grad() {
            (r.embedded * grad).sum(Kind::Float).f_backward()?;
        }
        Ok(())
    }
}
