//! Text generation with a key/value cache: the answer to one prompt
//! ([`CausalLm::generate`]), or K answers to each of many prompts decoded together
//! ([`CausalLm::sample`]); greedy or sampled (temperature, top-p), seeded, bounded by the
//! model's context.

use tch::{Device, Kind, Tensor};

use crate::error::{RefaError, Result};
use crate::model::decoding::DecodeBatch;
use crate::model::sampler::{stream_seed, Sampler, SplitMix64};
use crate::model::CausalLm;

pub use crate::model::sampler::GREEDY_BELOW_TEMPERATURE;

/// How one answer is decoded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerationOptions {
    /// Most new tokens (the stop token included). The model's context
    /// (`max_position_embeddings`) may allow fewer: see [`ContextClamp`]. Default 256.
    pub max_new_tokens: usize,
    /// 0 (or anything below [`GREEDY_BELOW_TEMPERATURE`]): greedy; otherwise the softmax
    /// temperature of sampling. Default 0.
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`.
    /// Default 1 (every token).
    pub top_p: f64,
    /// Seed of sampling (see [`CausalLm::sample`] for how answers are tied to it). Default 0.
    pub seed: i64,
    /// An id that ends an answer besides the config's `eos_token_ids`: the chat template's
    /// end of turn ([`ChatTokenizer::end_of_turn_id`](crate::model::ChatTokenizer::end_of_turn_id)),
    /// which many instruct checkpoints emit instead of their EOS. Default none.
    pub stop_token_id: Option<i64>,
}

impl Default for GenerationOptions {
    /// Greedy, up to 256 new tokens, stopping at the config's EOS ids.
    fn default() -> Self {
        GenerationOptions {
            max_new_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop_token_id: None,
        }
    }
}

impl GenerationOptions {
    /// `temperature` finite and >= 0, `top_p` in (0, 1], at least one new token.
    pub fn validate(&self) -> Result<()> {
        RefaError::require(
            self.temperature.is_finite() && self.temperature >= 0.0,
            "temperature",
            self.temperature,
            "finite and >= 0 (0: greedy)",
        )?;
        RefaError::require(
            self.top_p > 0.0 && self.top_p <= 1.0,
            "top_p",
            self.top_p,
            "in (0, 1]",
        )?;
        RefaError::require(
            self.max_new_tokens >= 1,
            "max_new_tokens",
            self.max_new_tokens,
            ">= 1",
        )
    }
}

/// How [`CausalLm::sample`] batches its work.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleOptions {
    /// K: answers per prompt. Default 1.
    pub samples_per_prompt: usize,
    /// Most rows (answers) decoded together, which bounds the key/value cache to
    /// `max_rows × (longest prompt + max_new_tokens)` positions per layer. Default 64.
    pub max_rows: usize,
    /// How each answer is decoded.
    pub generation: GenerationOptions,
}

impl Default for SampleOptions {
    /// One greedy answer per prompt, 64 rows at a time.
    fn default() -> Self {
        SampleOptions {
            samples_per_prompt: 1,
            max_rows: 64,
            generation: GenerationOptions::default(),
        }
    }
}

impl SampleOptions {
    /// K answers per prompt decoded with `generation`, 64 rows at a time.
    pub fn new(samples_per_prompt: usize, generation: GenerationOptions) -> Self {
        SampleOptions {
            samples_per_prompt,
            generation,
            ..SampleOptions::default()
        }
    }

    /// [`GenerationOptions::validate`], and at least one sample and one row.
    pub fn validate(&self) -> Result<()> {
        self.generation.validate()?;
        RefaError::require(
            self.samples_per_prompt >= 1,
            "samples_per_prompt",
            self.samples_per_prompt,
            ">= 1",
        )?;
        RefaError::require(self.max_rows >= 1, "max_rows", self.max_rows, ">= 1")
    }
}

/// Why an answer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The model emitted this stop id (an EOS id, or the extra stop id), the answer's last
    /// token.
    StopToken(i64),
    /// `max_new_tokens` were generated.
    MaxNewTokens,
    /// The prompt and the answer filled the model's context (`max_position_embeddings`)
    /// before `max_new_tokens`; the prompt is listed in [`Samples::clamped`].
    ContextFull,
}

/// One answer: its new tokens and why it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The new token ids, the stop id last when one ended the answer.
    pub tokens: Vec<i64>,
    /// Why the answer ended.
    pub stop: StopReason,
}

/// A prompt whose answers the model's context allows fewer new tokens than asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextClamp {
    /// The prompt's index in the call.
    pub prompt: usize,
    /// Its length in tokens.
    pub prompt_tokens: usize,
    /// The new tokens its answers may have: `context − prompt_tokens`.
    pub max_new_tokens: usize,
    /// The new tokens asked for.
    pub requested: usize,
    /// The model's context, `max_position_embeddings`.
    pub context: usize,
}

impl std::fmt::Display for ContextClamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "prompt {} ({} tokens): at most {} new tokens instead of {}, the model's context \
             (max_position_embeddings) being {} positions",
            self.prompt, self.prompt_tokens, self.max_new_tokens, self.requested, self.context
        )
    }
}

/// What [`CausalLm::sample`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Samples {
    /// `completions[p][k]`: the `k`-th answer to prompt `p` (`P` lists of `K`).
    pub completions: Vec<Vec<Completion>>,
    /// The prompts whose answers the context bounded below `max_new_tokens`, in prompt
    /// order (empty when none): tell the user, since their answers may end cut.
    pub clamped: Vec<ContextClamp>,
}

/// One answer being decoded.
struct Row {
    prompt: usize,
    sample: usize,
    /// New tokens it may have.
    budget: usize,
    stream: SplitMix64,
    tokens: Vec<i64>,
    stop: Option<StopReason>,
}

/// What every group of one call shares.
struct Plan<'a> {
    prompts: Vec<&'a [i64]>,
    sampler: Sampler,
    stop_ids: Vec<i64>,
    requested: usize,
}

impl CausalLm {
    /// Continues `prompt` (token ids, BOS included) until any of the config's EOS ids
    /// (`eos_token_ids`), the extra `stop_token_id`, `max_new_tokens`, or the end of the
    /// model's context, with a key/value cache: the prompt is processed once, then one
    /// position per new token. Returns the new tokens (the stop id included when produced).
    ///
    /// This is [`sample`](Self::sample) of one prompt and one answer (the same tokens, the
    /// same seed streams), without the report of why the answer ended: use `sample` to learn
    /// whether the context cut it. Errors as `sample`'s.
    pub fn generate(&self, prompt: &[i64], options: &GenerationOptions) -> Result<Vec<i64>> {
        let options = SampleOptions::new(1, *options);
        let samples = self.sample(&[prompt], &options)?;
        let answer = samples.completions.into_iter().flatten().next();
        Ok(answer.map(|c| c.tokens).unwrap_or_default())
    }

    /// K = `samples_per_prompt` answers to each of `prompts` (token ids, BOS included),
    /// decoded together through the key/value cache, `max_rows` answers at a time.
    ///
    /// Each group of rows runs its distinct prompts once, left-padded, with every row at its
    /// own positions and masked from the padding, then feeds one token per row per step;
    /// the K answers of a prompt share its prompt pass. Finished rows leave the batch (once a
    /// quarter of it has finished), so long answers do not make short ones cost work. Greedy
    /// answers equal those of decoding each prompt alone.
    ///
    /// Seeds: answer `k` of a prompt draws from its own stream, seeded by `seed`, the
    /// prompt's token ids and `k`, so the same prompt gets the same K answers whatever else
    /// is in the call, in any order and any `max_rows` (up to the last bits of the logits,
    /// which padding may change). Two identical prompts in one call get identical answers.
    ///
    /// Bounds: a prompt must leave room for one new token in the context
    /// (`max_position_embeddings`), else the call fails naming it; a prompt whose
    /// `prompt + max_new_tokens` would pass the context gets `context − prompt` new tokens,
    /// listed in [`Samples::clamped`], and its answers that reach the end say
    /// [`StopReason::ContextFull`].
    ///
    /// # Errors
    /// Invalid options; an empty prompt, a prompt too long for the context, a token or stop
    /// id outside the vocabulary (each named by its prompt index); logits that are NaN or
    /// infinite ([`RefaError::InvalidValue`] naming the prompt, the answer and the step: the
    /// weights hold NaN/inf, or f16 overflowed).
    pub fn sample<P: AsRef<[i64]>>(&self, prompts: &[P], options: &SampleOptions) -> Result<Samples> {
        options.validate()?;
        let prompts: Vec<&[i64]> = prompts.iter().map(AsRef::as_ref).collect();
        self.check_prompts(&prompts, &options.generation)?;
        let (budgets, clamped) = self.budgets(&prompts, options.generation.max_new_tokens);
        let plan = Plan {
            sampler: Sampler::new(options.generation.temperature, options.generation.top_p),
            stop_ids: self.stop_ids(&options.generation),
            requested: options.generation.max_new_tokens,
            prompts,
        };
        let mut rows = rows_of(&plan.prompts, &budgets, options);
        // Similar lengths together: less padding per group.
        rows.sort_by_key(|r| plan.prompts[r.prompt].len());
        tch::no_grad(|| -> Result<()> {
            for group in rows.chunks_mut(options.max_rows) {
                self.decode_group(&plan, group)?;
            }
            Ok(())
        })?;
        Ok(Samples {
            completions: completions_of(rows, plan.prompts.len(), options.samples_per_prompt),
            clamped,
        })
    }

    /// Every prompt non-empty, within the vocabulary and shorter than the context; the stop
    /// id within the vocabulary.
    fn check_prompts(&self, prompts: &[&[i64]], options: &GenerationOptions) -> Result<()> {
        let vocab = self.config().vocab_size;
        let context = self.config().max_position_embeddings;
        if let Some(id) = options.stop_token_id.filter(|id| !(0..vocab).contains(id)) {
            let rule = format!("in [0, {vocab}), the model's vocabulary");
            return Err(RefaError::option("stop_token_id", id, rule));
        }
        for (p, prompt) in prompts.iter().enumerate() {
            if prompt.is_empty() {
                return Err(RefaError::ShapeMismatch {
                    tensor: "prompt",
                    actual: vec![0],
                    expected: format!("at least one token (prompt {p})"),
                });
            }
            if let Some((i, id)) = prompt.iter().enumerate().find(|(_, id)| !(0..vocab).contains(*id)) {
                let rule = format!("in [0, {vocab}), the model's vocabulary (prompt {p}, position {i})");
                return Err(RefaError::option("prompt token id", id, rule));
            }
            if prompt.len() as i64 >= context {
                return Err(RefaError::ShapeMismatch {
                    tensor: "prompt",
                    actual: vec![prompt.len() as i64],
                    expected: format!(
                        "at most {} tokens (prompt {p}): the model's context \
                         (max_position_embeddings) is {context} positions and the answer needs \
                         one at least; shorten the prompt or leave it out",
                        context - 1
                    ),
                });
            }
        }
        Ok(())
    }

    /// Each prompt's budget of new tokens, `min(max_new_tokens, context − prompt)`, and the
    /// prompts the context cut.
    fn budgets(&self, prompts: &[&[i64]], max_new_tokens: usize) -> (Vec<usize>, Vec<ContextClamp>) {
        let context = self.config().max_position_embeddings.max(0) as usize;
        let mut clamped = Vec::new();
        let budgets = prompts
            .iter()
            .enumerate()
            .map(|(p, prompt)| {
                let room = context.saturating_sub(prompt.len());
                if room < max_new_tokens {
                    clamped.push(ContextClamp {
                        prompt: p,
                        prompt_tokens: prompt.len(),
                        max_new_tokens: room,
                        requested: max_new_tokens,
                        context,
                    });
                }
                room.min(max_new_tokens)
            })
            .collect();
        (budgets, clamped)
    }

    /// The config's EOS ids and the extra stop id.
    fn stop_ids(&self, options: &GenerationOptions) -> Vec<i64> {
        let mut ids = self.config().eos_token_ids.clone();
        ids.extend(options.stop_token_id);
        ids
    }

    /// Decodes one group of rows to the end.
    fn decode_group(&self, plan: &Plan, rows: &mut [Row]) -> Result<()> {
        let (distinct, slots) = distinct_prompts(rows);
        let texts: Vec<&[i64]> = distinct.iter().map(|&p| plan.prompts[p]).collect();
        let longest = rows
            .iter()
            .map(|r| (plan.prompts[r.prompt].len() + r.budget) as i64)
            .max()
            .unwrap_or(1);
        let (mut batch, logits) = DecodeBatch::prefill(self, &texts, longest)?;
        batch.select(&slots);
        let index: Vec<i64> = slots.iter().map(|&s| s as i64).collect();
        let mut logits = logits.index_select(0, &Tensor::from_slice(&index).to(logits.device()));
        // Batch row i decodes rows[live[i]].
        let mut live: Vec<usize> = (0..rows.len()).collect();
        loop {
            let tokens = next_tokens(&logits, rows, &live, plan.sampler)?;
            for (&r, &token) in live.iter().zip(&tokens) {
                rows[r].push(token, &plan.stop_ids, plan.requested);
            }
            let going: Vec<usize> = (0..live.len()).filter(|&i| rows[live[i]].stop.is_none()).collect();
            if going.is_empty() {
                return Ok(());
            }
            let mut feed = tokens;
            if going.len() * 4 <= batch.rows() * 3 {
                batch.select(&going);
                live = going.iter().map(|&i| live[i]).collect();
                feed = going.iter().map(|&i| feed[i]).collect();
            }
            logits = batch.step(&feed)?;
        }
    }
}

impl Row {
    /// Appends `token` and ends the answer at a stop id or at its budget.
    fn push(&mut self, token: i64, stop_ids: &[i64], requested: usize) {
        if self.stop.is_some() {
            return;
        }
        self.tokens.push(token);
        self.stop = if stop_ids.contains(&token) {
            Some(StopReason::StopToken(token))
        } else if self.tokens.len() >= self.budget {
            Some(match self.budget < requested {
                true => StopReason::ContextFull,
                false => StopReason::MaxNewTokens,
            })
        } else {
            None
        };
    }
}

/// One row per (prompt, sample), in prompt order, each with its seed stream.
fn rows_of(prompts: &[&[i64]], budgets: &[usize], options: &SampleOptions) -> Vec<Row> {
    let k = options.samples_per_prompt;
    let seed = options.generation.seed;
    prompts
        .iter()
        .zip(budgets)
        .enumerate()
        .flat_map(|(p, (prompt, &budget))| {
            (0..k).map(move |sample| Row {
                prompt: p,
                sample,
                budget,
                stream: SplitMix64::new(stream_seed(seed, prompt, sample)),
                tokens: Vec::new(),
                stop: None,
            })
        })
        .collect()
}

/// `completions[p][k]` from rows that hold, per prompt, its K samples in order.
fn completions_of(mut rows: Vec<Row>, prompts: usize, k: usize) -> Vec<Vec<Completion>> {
    // The sort by length was stable: each prompt's rows are still in sample order.
    rows.sort_by_key(|r| r.prompt);
    let mut completions: Vec<Vec<Completion>> = (0..prompts).map(|_| Vec::with_capacity(k)).collect();
    for row in rows {
        completions[row.prompt].push(Completion {
            tokens: row.tokens,
            stop: row.stop.unwrap_or(StopReason::MaxNewTokens),
        });
    }
    completions
}

/// The distinct prompts of a group in order of first appearance, and each row's index
/// among them.
fn distinct_prompts(rows: &[Row]) -> (Vec<usize>, Vec<usize>) {
    let mut distinct: Vec<usize> = Vec::new();
    let slots = rows
        .iter()
        .map(|row| match distinct.iter().position(|&p| p == row.prompt) {
            Some(slot) => slot,
            None => {
                distinct.push(row.prompt);
                distinct.len() - 1
            }
        })
        .collect();
    (distinct, slots)
}

/// The next token of every batch row (row `i` decoding `rows[live[i]]`), after checking
/// that the logits of the rows still decoding are finite. One transfer to the host per step.
fn next_tokens(logits: &Tensor, rows: &mut [Row], live: &[usize], sampler: Sampler) -> Result<Vec<i64>> {
    let uniforms: Vec<f64> = live
        .iter()
        .map(|&r| match (sampler.is_greedy(), rows[r].stop) {
            (false, None) => rows[r].stream.next_f64(),
            _ => 0.0,
        })
        .collect();
    let chosen = sampler.choose(logits, &uniforms)?;
    let finite = logits.isfinite().all_dim(-1, false).to_kind(Kind::Int64);
    let host = Tensor::cat(&[chosen, finite], 0).to_device(Device::Cpu);
    let host = Vec::<i64>::try_from(&host)?;
    let (tokens, finite) = host.split_at(live.len());
    for (i, &r) in live.iter().enumerate() {
        if finite[i] == 0 && rows[r].stop.is_none() {
            return Err(non_finite_logits(logits, i, &rows[r]));
        }
    }
    Ok(tokens.to_vec())
}

/// The error for row `i`'s logits holding NaN or infinity.
fn non_finite_logits(logits: &Tensor, i: usize, row: &Row) -> RefaError {
    let values = logits.get(i as i64);
    let bad = values.masked_select(&values.isfinite().logical_not());
    let value = bad.f_double_value(&[0]).unwrap_or(f64::NAN);
    RefaError::InvalidValue {
        tensor: "logits",
        position: format!(
            "prompt {}, answer {}, new token {}",
            row.prompt,
            row.sample,
            row.tokens.len()
        ),
        value,
        requirement: "finite: the model computed NaN or infinity (check the checkpoint's \
                      weights for NaN/inf, or run in f32/bf16 instead of f16); no answer was \
                      written",
    }
}
