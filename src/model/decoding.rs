//! Rows of one batch decoding through the key/value cache: prompts of different lengths
//! left-padded into one block, each row with its own rotary positions and attention mask,
//! finished rows dropped from the cache as the batch goes.
//!
//! Left padding puts every row's newest token in the same column, so one step feeds one
//! column for all rows. A row's positions count its own tokens only (`column − padding`),
//! as if it were decoded alone, and its padding keys are masked out. A batch without
//! padding (one prompt, or prompts of equal length) builds no mask at all, exactly as
//! decoding a single prompt does.

use tch::{Device, Kind, Tensor};

use crate::error::Result;
use crate::model::causal_lm::{AttentionContext, LayerCache};
use crate::model::layers::LayerMask;
use crate::model::CausalLm;

/// The cache and per-row bookkeeping of a batch being decoded.
#[derive(Debug)]
pub(crate) struct DecodeBatch<'m> {
    model: &'m CausalLm,
    cache: Vec<LayerCache>,
    /// `[N, columns]`: true where a cached key is a real token (not padding).
    valid: Tensor,
    /// Per row: the padding columns before its first token.
    padding: Vec<i64>,
    /// Per row: the tokens it holds (prompt and fed answer), which is also the position of
    /// the next token it is fed.
    lengths: Vec<i64>,
    /// Cached columns (the longest row's length).
    columns: i64,
    /// Rotary tables `[L, rotary_dim]` for positions `0..L`, `L` the longest sequence the
    /// batch may reach.
    cos: Tensor,
    sin: Tensor,
    device: Device,
}

impl<'m> DecodeBatch<'m> {
    /// Runs `prompts` (each non-empty, ids checked against the vocabulary) through the model,
    /// left-padded, filling the cache; returns the batch and the logits `[P, V]` (f32) of the
    /// position after each prompt. `longest` bounds the positions the batch will reach.
    pub fn prefill(model: &'m CausalLm, prompts: &[&[i64]], longest: i64) -> Result<(Self, Tensor)> {
        let device = model.lm_head_weight().device();
        let width = prompts.iter().map(|p| p.len() as i64).max().unwrap_or(0);
        let padding: Vec<i64> = prompts.iter().map(|p| width - p.len() as i64).collect();
        let filler = model.config().pad_token_id.unwrap_or(model.config().eos_token_id);
        let ids: Vec<i64> = prompts
            .iter()
            .zip(&padding)
            .flat_map(|(p, &pad)| std::iter::repeat_n(filler, pad as usize).chain(p.iter().copied()))
            .collect();
        let rows = prompts.len() as i64;
        let ids = Tensor::from_slice(&ids).view([rows, width]).to(device);
        let columns = Tensor::arange(width, (Kind::Int64, device)).unsqueeze(0);
        let pads = Tensor::from_slice(&padding).to(device).unsqueeze(1);
        let valid = columns.ge_tensor(&pads);
        let (cos, sin) = model.rotary_tables(0, longest.max(width));
        let mut batch = DecodeBatch {
            model,
            cache: model.decoder_layers().map(|_| LayerCache::default()).collect(),
            valid,
            padding,
            lengths: prompts.iter().map(|p| p.len() as i64).collect(),
            columns: 0,
            cos,
            sin,
            device,
        };
        let positions = (&columns - &pads).clamp_min(0);
        let logits = batch.run(&ids, &positions, 0)?;
        Ok((batch, logits))
    }

    /// Repeats rows: row `i` of the result is row `rows[i]` now (K samples of one prompt share
    /// its prompt pass).
    pub fn select(&mut self, rows: &[usize]) {
        let index: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
        let index = Tensor::from_slice(&index).to(self.device);
        for layer in &mut self.cache {
            for t in [&mut layer.keys, &mut layer.values].into_iter().flatten() {
                *t = t.index_select(0, &index);
            }
        }
        self.valid = self.valid.index_select(0, &index);
        self.padding = rows.iter().map(|&r| self.padding[r]).collect();
        self.lengths = rows.iter().map(|&r| self.lengths[r]).collect();
        self.trim_padding();
    }

    /// Feeds one token per row (`tokens[i]` to row `i`; finished rows are fed anything) and
    /// returns the logits `[N, V]` (f32) of the next position.
    pub fn step(&mut self, tokens: &[i64]) -> Result<Tensor> {
        let rows = tokens.len() as i64;
        let ids = Tensor::from_slice(tokens).view([rows, 1]).to(self.device);
        let positions = Tensor::from_slice(&self.lengths).view([rows, 1]).to(self.device);
        let ones = Tensor::ones([rows, 1], (Kind::Bool, self.device));
        self.valid = Tensor::cat(&[&self.valid, &ones], 1);
        let start = self.lengths.first().copied().unwrap_or(0);
        let logits = self.run(&ids, &positions, start)?;
        for length in &mut self.lengths {
            *length += 1;
        }
        Ok(logits)
    }

    /// Rows in the batch.
    pub fn rows(&self) -> usize {
        self.lengths.len()
    }

    /// `ids` `[N, t]` at `positions` `[N, t]` after the cached columns, through every layer;
    /// logits of the last column. `start`: the rows' first position when they all share
    /// their positions (every row as long as the others).
    fn run(&mut self, ids: &Tensor, positions: &Tensor, start: i64) -> Result<Tensor> {
        let count = ids.size()[1];
        let offset = self.columns;
        let padded = self.padding.iter().any(|&p| p > 0);
        let (cos, sin) = self.rotary(positions, start);
        let valid = &self.valid;
        let context = AttentionContext::new(cos, sin, self.model.config(), |window| {
            attention_mask(valid, padded, offset, count, window)
        });
        let mut x = self.model.embed_tokens(ids)?;
        for (layer, cache) in self.model.decoder_layers().zip(self.cache.iter_mut()) {
            x = layer.forward_cached(&x, &context, false, Some(cache));
        }
        self.columns += count;
        let last = self.model.final_norm(&x.narrow(1, count - 1, 1));
        Ok(self.model.logits(&last).squeeze_dim(1).to_kind(Kind::Float))
    }

    /// Rotary tables for `positions` `[N, t]`: `[t, r]` from `start` when every row is at the
    /// same positions (as a single prompt is decoded), else `[N, 1, t, r]` row by row.
    fn rotary(&self, positions: &Tensor, start: i64) -> (Tensor, Tensor) {
        let count = positions.size()[1];
        if self.lengths.windows(2).all(|w| w[0] == w[1]) {
            return (self.cos.narrow(0, start, count), self.sin.narrow(0, start, count));
        }
        let flat = positions.flatten(0, -1);
        let shape = [positions.size()[0], 1, count, -1];
        (
            self.cos.index_select(0, &flat).view(shape),
            self.sin.index_select(0, &flat).view(shape),
        )
    }

    /// Drops leading columns that are padding in every row (after rows with the longest
    /// prompts finished): less to attend over, and no mask once no row is padded.
    fn trim_padding(&mut self) {
        let Some(&common) = self.padding.iter().min() else {
            return;
        };
        if common == 0 {
            return;
        }
        for layer in &mut self.cache {
            for t in [&mut layer.keys, &mut layer.values].into_iter().flatten() {
                *t = t.narrow(2, common, t.size()[2] - common);
            }
        }
        self.valid = self.valid.narrow(1, common, self.columns - common);
        self.columns -= common;
        for pad in &mut self.padding {
            *pad -= common;
        }
    }
}

/// The mask of `count` new columns after `offset` cached ones.
///
/// Without padding: `None` and causal for a fresh prompt, `None` and not causal for one new
/// token (it may see every cached key), as single-prompt decoding does, unless a sliding
/// window binds; then, and whenever a row is padded, an explicit `[N or 1, 1, count, total]`
/// mask: key `k` is visible to query `q` when `k <= q`, `q − k < window`, and the key is a
/// real token (or is the query itself, so that a padding query's row is never empty).
fn attention_mask(
    valid: &Tensor,
    padded: bool,
    offset: i64,
    count: i64,
    window: Option<i64>,
) -> LayerMask {
    let total = offset + count;
    let windowed = window.is_some_and(|w| w < total);
    if !padded && !windowed {
        return LayerMask {
            mask: None,
            causal: offset == 0,
        };
    }
    let device = valid.device();
    let query = Tensor::arange_start(offset, total, (Kind::Int64, device)).unsqueeze(1);
    let key = Tensor::arange(total, (Kind::Int64, device)).unsqueeze(0);
    let mut allowed = key.le_tensor(&query);
    if let Some(w) = window.filter(|_| windowed) {
        allowed = allowed.logical_and(&(&query - &key).lt(w));
    }
    let mut allowed = allowed.unsqueeze(0);
    if padded {
        let itself = key.eq_tensor(&query).unsqueeze(0);
        allowed = allowed
            .logical_and(&valid.unsqueeze(1))
            .logical_or(&itself);
    }
    LayerMask {
        mask: Some(allowed.unsqueeze(1)),
        causal: false,
    }
}
