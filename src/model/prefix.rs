//! Prefix sharing: a prompt's layers run once for all of its K responses.
//!
//! A K-way preference loss feeds each prompt K times, once per response. Here each decoder
//! layer runs on the `P` prompts alone, and the `P·K` responses attend to their prompt's
//! keys and values of that layer (expanded to the response rows, in the autograd graph), so
//! the gradients of all K responses flow back into the one prompt pass. For UltraFeedback-like
//! lengths (prompt ≈ 30 % of the tokens) and K = 4 that is about a fifth fewer positions
//! through every layer; the values and gradients equal those of the plain pass.

use tch::{Kind, Tensor};

use crate::error::{RefaError, Result};
use crate::model::causal_lm::{layer_seeds, seed_dropout, AttentionContext, LayerCache, Padding};
use crate::model::layers::LayerMask;
use crate::model::CausalLm;

/// A batch laid out for prefix sharing: each prompt once, its responses after it.
///
/// # Shapes
/// `prompt_ids` `[P, Lp]` right-padded, `prompt_lengths` its `P` lengths (>= 1);
/// `response_ids` and `response_mask` `[P·K, Lr]` right-padded, row `p·K + k` the `k`-th
/// response of prompt `p` (an all-zero mask row is an empty slot).
#[derive(Debug)]
pub struct SharedPrefixBatch {
    /// `[P, Lp]` i64 prompt token ids.
    pub prompt_ids: Tensor,
    /// The prompts' lengths in tokens, on the host.
    pub prompt_lengths: Vec<i64>,
    /// `[P·K, Lr]` i64 response token ids.
    pub response_ids: Tensor,
    /// `[P·K, Lr]` 1 for tokens, 0 for padding.
    pub response_mask: Tensor,
}

impl SharedPrefixBatch {
    fn check(&self) -> Result<(i64, i64)> {
        let prompt = self.prompt_ids.size();
        let response = self.response_ids.size();
        let prompts = self.prompt_lengths.len() as i64;
        let shape_error =
            |tensor: &'static str, actual: Vec<i64>, expected: String| RefaError::ShapeMismatch {
                tensor,
                actual,
                expected,
            };
        if prompt.len() != 2 || prompt[0] != prompts || prompt[0] == 0 || prompt[1] == 0 {
            let expected =
                format!("[P, Lp] with P = {prompts} (the prompt lengths given), P, Lp >= 1");
            return Err(shape_error("prompt_ids", prompt, expected));
        }
        if response.len() != 2 || response[0] % prompts != 0 || response[0] == 0 || response[1] == 0
        {
            let expected = format!("[P·K, Lr] with P = {prompts}, K, Lr >= 1");
            return Err(shape_error("response_ids", response, expected));
        }
        if self.response_mask.size() != response {
            let expected = format!("{response:?} like `response_ids`");
            return Err(shape_error(
                "response_mask",
                self.response_mask.size(),
                expected,
            ));
        }
        if let Some(bad) = self
            .prompt_lengths
            .iter()
            .find(|&&l| !(1..=prompt[1]).contains(&l))
        {
            return Err(RefaError::option(
                "prompt_lengths",
                bad,
                format!("in [1, {}] (the prompt width)", prompt[1]),
            ));
        }
        Ok((prompts, response[0] / prompts))
    }
}

impl CausalLm {
    /// Hidden states for scoring the responses of a [`SharedPrefixBatch`], computing each
    /// prompt's layers once: `[P·K, 1 + Lr, H]`, where position 0 holds the last prompt
    /// token's hidden state (it predicts the response's first token) and positions `1..`
    /// the response's. Score them with labels `[P·K, 1 + Lr]` that hold −100 at position 0
    /// and the response tokens after it (see [`crate::scoring`]); values and gradients equal
    /// those of the plain [`forward_pass`](Self::forward_pass) over prompt + response.
    /// `train` enables LoRA dropout (one mask per prompt position, shared by its responses).
    /// Layers are kept in the graph (no recomputation).
    pub fn forward_shared_prefix(&self, batch: &SharedPrefixBatch, train: bool) -> Result<Tensor> {
        let (prompts, responses) = batch.check()?;
        let device = self.lm_head_weight().device();
        let prompt_mask = Tensor::from_slice(&batch.prompt_lengths)
            .to_device(device)
            .unsqueeze(1)
            .gt_tensor(
                &Tensor::arange(batch.prompt_ids.size()[1], (Kind::Int64, device)).unsqueeze(0),
            );
        let (mut prompt_x, prompt_context) =
            self.embed(&batch.prompt_ids, &prompt_mask, Padding::Right)?;
        let rows = Tensor::arange(prompts, (Kind::Int64, device))
            .repeat_interleave_self_int(responses, 0, None);
        let prompt_lengths = Tensor::from_slice(&batch.prompt_lengths)
            .to_device(device)
            .index_select(0, &rows);
        let mut response_x = self.embed_tokens(&batch.response_ids.to_device(device))?;
        let response_context = self.response_context(&prompt_lengths, batch)?;
        let seeds = layer_seeds(self.decoder_layers().len(), train);
        for (layer, seed) in self.decoder_layers().zip(seeds) {
            seed_dropout(seed);
            let mut prompt_cache = LayerCache::default();
            prompt_x =
                layer.forward_cached(&prompt_x, &prompt_context, train, Some(&mut prompt_cache));
            let expand = |t: Option<Tensor>| t.map(|t| t.index_select(0, &rows));
            let mut shared = LayerCache {
                keys: expand(prompt_cache.keys),
                values: expand(prompt_cache.values),
            };
            response_x =
                layer.forward_cached(&response_x, &response_context, train, Some(&mut shared));
        }
        let last = (Tensor::from_slice(&batch.prompt_lengths).to_device(device) - 1)
            .view([prompts, 1, 1])
            .expand([prompts, 1, prompt_x.size()[2]], false);
        let last_prompt = prompt_x.gather(1, &last, false).index_select(0, &rows);
        Ok(self.final_norm(&Tensor::cat(&[last_prompt, response_x], 1)))
    }

    /// Rotary tables at each response position (after its prompt) and the mask over
    /// `[prompt keys ++ response keys]`: a response token sees its prompt's tokens and the
    /// response tokens up to itself (within the sliding window, if one binds).
    fn response_context(
        &self,
        prompt_lengths: &Tensor,
        batch: &SharedPrefixBatch,
    ) -> Result<AttentionContext> {
        let device = prompt_lengths.device();
        let (rows, width) = (batch.response_ids.size()[0], batch.response_ids.size()[1]);
        let prompt_width = batch.prompt_ids.size()[1];
        let steps = Tensor::arange(width, (Kind::Int64, device));
        let positions = prompt_lengths.unsqueeze(1) + steps.unsqueeze(0);
        let longest = batch.prompt_lengths.iter().max().copied().unwrap_or(0) + width;
        let (cos, sin) = self.rotary_tables(0, longest);
        let table = |t: &Tensor| {
            t.index_select(0, &positions.flatten(0, -1))
                .view([rows, 1, width, -1])
        };
        let query = positions.unsqueeze(2);
        let prompt_keys = Tensor::arange(prompt_width, (Kind::Int64, device)).view([1, 1, -1]);
        let build = |window: Option<i64>| {
            let mut sees_prompt = prompt_keys.lt_tensor(&prompt_lengths.view([-1, 1, 1]));
            let mut sees_response = steps.view([1, 1, -1]).le_tensor(&steps.view([1, -1, 1]));
            if let Some(window) = window {
                sees_prompt = sees_prompt.logical_and(&(&query - &prompt_keys).lt(window));
                let distance = steps.view([1, -1, 1]) - steps.view([1, 1, -1]);
                sees_response = sees_response.logical_and(&distance.lt(window));
            }
            let mask = Tensor::cat(
                &[
                    sees_prompt.expand([rows, width, prompt_width], false),
                    sees_response.expand([rows, width, width], false),
                ],
                2,
            );
            LayerMask {
                mask: Some(mask.unsqueeze(1)),
                causal: false,
            }
        };
        Ok(AttentionContext::new(
            table(&cos),
            table(&sin),
            self.config(),
            build,
        ))
    }
}
