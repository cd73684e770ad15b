//! Batches of prompts × their responses, padded once, in a reproducible order.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Tensor};

use crate::data::examples::TokenizedExample;
use crate::device::upload;
use crate::error::{RefaError, Result};
use crate::model::SharedPrefixBatch;

/// `P` prompts with `K` response slots (`K` = the most responses of any prompt in the batch),
/// flattened to `N = P·K` right-padded sequences of `T` tokens.
#[derive(Debug)]
pub struct Collated {
    /// `[N, T]` token ids (padding: `pad_id`), right-padded.
    pub input_ids: Tensor,
    /// `[N, T]` 1 for tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// `[N, T]` response token ids, −100 elsewhere (prompt, padding, empty slots), kept on
    /// the CPU: the scorer builds its targets there (no device synchronization) and
    /// uploads them once.
    pub labels: Tensor,
    /// `[P, K]` rewards (0 in empty slots).
    pub rewards: Tensor,
    /// `[P, K]` bool: the slot holds a response.
    pub slot_mask: Tensor,
    /// Number of real (non-padding) tokens.
    pub tokens: i64,
    /// Number of positions including padding, `N·T`.
    pub padded_tokens: i64,
    /// Mean response length in tokens over the batch's responses.
    pub mean_response_length: f64,
}

/// Pads `examples` into one right-padded batch on `device`. Everything is built on the host;
/// token ids and mask travel in one asynchronous copy, rewards and slot mask in another.
pub fn collate(examples: &[&TokenizedExample], pad_id: i64, device: Device) -> Collated {
    let prompts = examples.len() as i64;
    let slots = examples
        .iter()
        .map(|e| e.responses.len())
        .max()
        .unwrap_or(0) as i64;
    let width = examples
        .iter()
        .flat_map(|e| &e.responses)
        .map(|r| r.prompt.len() + r.response.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let sequences = (prompts * slots) as usize;
    let mut ids = vec![pad_id; sequences * width];
    let mut mask = vec![0i64; sequences * width];
    let mut labels = vec![-100i64; sequences * width];
    let mut rewards = vec![0f32; sequences];
    let mut slot_mask = vec![false; sequences];
    for (p, example) in examples.iter().enumerate() {
        for (k, (encoded, reward)) in example.responses.iter().zip(&example.rewards).enumerate() {
            let n = p * slots as usize + k;
            let row = n * width;
            for (t, (id, label)) in encoded
                .input_ids()
                .into_iter()
                .zip(encoded.labels())
                .enumerate()
            {
                (ids[row + t], mask[row + t], labels[row + t]) = (id, 1, label);
            }
            rewards[n] = *reward as f32;
            slot_mask[n] = true;
        }
    }
    let tokens = mask.iter().sum();
    let responses: Vec<usize> = examples
        .iter()
        .flat_map(|e| e.responses.iter().map(|r| r.response.len()))
        .collect();
    let mean_response_length =
        responses.iter().sum::<usize>() as f64 / responses.len().max(1) as f64;
    let (n, t) = (sequences as i64, width as i64);
    let tokens_and_mask = Tensor::from_slice(&[ids, mask].concat()).view([2, n, t]);
    let tokens_and_mask = upload(&tokens_and_mask, device);
    let slot_flags: Vec<f32> = slot_mask.iter().map(|&v| f32::from(u8::from(v))).collect();
    let per_slot = Tensor::from_slice(&[rewards, slot_flags].concat()).view([2, prompts, slots]);
    let per_slot = upload(&per_slot, device);
    Collated {
        input_ids: tokens_and_mask.get(0),
        attention_mask: tokens_and_mask.get(1),
        labels: Tensor::from_slice(&labels).view([n, t]),
        rewards: per_slot.get(0),
        slot_mask: per_slot.get(1).gt(0.5),
        tokens,
        padded_tokens: n * t,
        mean_response_length,
    }
}

/// A batch for prefix sharing ([`CausalLm::forward_shared_prefix`]): each prompt once, its
/// responses after it, and the labels that score them.
///
/// [`CausalLm::forward_shared_prefix`]: crate::model::CausalLm::forward_shared_prefix
#[derive(Debug)]
pub struct SharedCollated {
    /// Prompts `[P, Lp]` and responses `[P·K, Lr]`, on the device.
    pub batch: SharedPrefixBatch,
    /// `[P·K, 1 + Lr]` labels on the host: −100 at position 0 (the prompt's last token),
    /// then the response's tokens, −100 for padding and empty slots.
    pub labels: Tensor,
    /// `[P, K]` rewards (0 in empty slots).
    pub rewards: Tensor,
    /// `[P, K]` bool: the slot holds a response.
    pub slot_mask: Tensor,
    /// Tokens of the data, as the plain layout counts them (each response with its prompt).
    pub tokens: i64,
    /// Positions the layers process, padding included: `P·Lp + P·K·Lr`.
    pub padded_tokens: i64,
    /// Mean response length in tokens over the batch's responses.
    pub mean_response_length: f64,
}

/// The prompt ids an example's responses share (its first response's).
fn prompt_of(example: &TokenizedExample) -> &[i64] {
    example.responses.first().map_or(&[], |r| &r.prompt)
}

/// Lays `examples` out for prefix sharing on `device`. Every response of an example must
/// carry the same prompt ids (as the tokenizer produces them for one prompt), at least one:
/// an empty prompt is a [`RefaError::Config`] (it would be laid out as one padding token
/// that the responses attend to).
pub fn collate_shared(
    examples: &[&TokenizedExample],
    pad_id: i64,
    device: Device,
) -> Result<SharedCollated> {
    let prompts = examples.len();
    let slots = examples
        .iter()
        .map(|e| e.responses.len())
        .max()
        .unwrap_or(0);
    for (i, example) in examples.iter().enumerate() {
        if example.responses.iter().any(|r| r.prompt.is_empty()) {
            return Err(RefaError::config(
                "tokenized data",
                format!(
                    "example {i} of the batch has a prompt of no tokens (its chat template \
                     rendered the prompt as nothing): a response needs a prompt token before \
                     it to be scored; use a template that frames the user's turn"
                ),
            ));
        }
        if example
            .responses
            .iter()
            .any(|r| r.prompt != prompt_of(example))
        {
            return Err(RefaError::config(
                "tokenized data",
                format!("example {i}: its responses carry different prompt ids, so the prompt cannot be shared"),
            ));
        }
    }
    let prompt_width = examples
        .iter()
        .map(|e| prompt_of(e).len())
        .max()
        .unwrap_or(1)
        .max(1);
    let response_width = examples
        .iter()
        .flat_map(|e| &e.responses)
        .map(|r| r.response.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let rows = prompts * slots;
    let mut prompt_ids = vec![pad_id; prompts * prompt_width];
    let mut prompt_lengths = Vec::with_capacity(prompts);
    let mut response_ids = vec![pad_id; rows * response_width];
    let mut response_mask = vec![0i64; rows * response_width];
    let mut labels = vec![-100i64; rows * (1 + response_width)];
    let mut rewards = vec![0f32; rows];
    let mut slot_flags = vec![0f32; rows];
    let mut tokens = 0i64;
    for (p, example) in examples.iter().enumerate() {
        let prompt = prompt_of(example);
        prompt_ids[p * prompt_width..p * prompt_width + prompt.len()].copy_from_slice(prompt);
        prompt_lengths.push(prompt.len().max(1) as i64);
        for (k, (encoded, reward)) in example.responses.iter().zip(&example.rewards).enumerate() {
            let row = p * slots + k;
            let ids = &encoded.response;
            response_ids[row * response_width..row * response_width + ids.len()]
                .copy_from_slice(ids);
            response_mask[row * response_width..row * response_width + ids.len()].fill(1);
            let label_row = row * (1 + response_width);
            labels[label_row + 1..label_row + 1 + ids.len()].copy_from_slice(ids);
            rewards[row] = *reward as f32;
            slot_flags[row] = 1.0;
            tokens += (prompt.len() + ids.len()) as i64;
        }
    }
    let responses: Vec<usize> = examples
        .iter()
        .flat_map(|e| e.responses.iter().map(|r| r.response.len()))
        .collect();
    let (rows_i, slots_i) = (rows as i64, slots as i64);
    let response_grid = Tensor::from_slice(&[response_ids, response_mask].concat()).view([
        2,
        rows_i,
        response_width as i64,
    ]);
    let response_grid = upload(&response_grid, device);
    let per_slot =
        Tensor::from_slice(&[rewards, slot_flags].concat()).view([2, prompts as i64, slots_i]);
    let per_slot = upload(&per_slot, device);
    Ok(SharedCollated {
        batch: SharedPrefixBatch {
            prompt_ids: upload(
                &Tensor::from_slice(&prompt_ids).view([prompts as i64, prompt_width as i64]),
                device,
            ),
            prompt_lengths,
            response_ids: response_grid.get(0),
            response_mask: response_grid.get(1),
        },
        labels: Tensor::from_slice(&labels).view([rows_i, 1 + response_width as i64]),
        rewards: per_slot.get(0),
        slot_mask: per_slot.get(1).gt(0.5),
        tokens,
        padded_tokens: (prompts * prompt_width + rows * response_width) as i64,
        mean_response_length: responses.iter().sum::<usize>() as f64
            / responses.len().max(1) as f64,
    })
}

/// Splits off `fraction` of the examples (at least one when there are two or more) as a
/// held-out evaluation set, by a seeded shuffle: `(train, eval)`.
pub fn split_eval(
    examples: Vec<TokenizedExample>,
    fraction: f64,
    seed: u64,
) -> Result<(Vec<TokenizedExample>, Vec<TokenizedExample>)> {
    RefaError::require(
        (0.0..1.0).contains(&fraction),
        "eval_fraction",
        fraction,
        "in [0, 1) (some examples must remain for training)",
    )?;
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_e7a1));
    let held = ((examples.len() as f64 * fraction).round() as usize).clamp(
        usize::from(fraction > 0.0 && examples.len() > 1),
        examples.len().saturating_sub(1),
    );
    let held_out: std::collections::HashSet<usize> = order[..held].iter().copied().collect();
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (i, example) in examples.into_iter().enumerate() {
        if held_out.contains(&i) {
            eval.push(example)
        } else {
            train.push(example)
        }
    }
    Ok((train, eval))
}

/// The order in which training examples are visited: a fresh seeded shuffle every epoch.
/// Its state is `(epoch, position)`, so a resumed run continues exactly where it stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataOrder {
    seed: u64,
    len: usize,
    /// Completed passes over the data.
    pub epoch: u64,
    /// Examples of the current epoch already handed out.
    pub position: usize,
    order: Vec<usize>,
}

impl DataOrder {
    /// Starts at epoch 0, position 0.
    pub fn new(len: usize, seed: u64) -> Self {
        Self::resume(len, seed, 0, 0)
    }

    /// Continues at `(epoch, position)`.
    pub fn resume(len: usize, seed: u64, epoch: u64, position: usize) -> Self {
        let order = Self::shuffled(len, seed, epoch);
        DataOrder {
            seed,
            len,
            epoch,
            position,
            order,
        }
    }

    fn shuffled(len: usize, seed: u64, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..len).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(
            seed.wrapping_add(epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        ));
        order
    }

    /// The next `count` example indices, wrapping into a new epoch (and a new shuffle).
    pub fn next_batch(&mut self, count: usize) -> Vec<usize> {
        let mut batch = Vec::with_capacity(count);
        while batch.len() < count && self.len > 0 {
            if self.position == self.len {
                self.epoch += 1;
                self.position = 0;
                self.order = Self::shuffled(self.len, self.seed, self.epoch);
            }
            batch.push(self.order[self.position]);
            self.position += 1;
        }
        batch
    }
}
