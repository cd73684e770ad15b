//! Packed micro-batches: the sequences of a micro-batch concatenated into one row, without
//! padding, attending only within their own sequence.
//!
//! A padded batch `[N, T]` computes `N·T` positions through every layer, however short most
//! of its sequences are; with long-tailed lengths (preference data: tens to thousands of
//! tokens) half of them can be padding. A [`PackedBatch`] holds the `total` real tokens as
//! one row `[1, total]`, each sequence's positions restarting at 0 (so rotary embeddings see
//! what they see in the padded layout), and its cumulative lengths. Attention runs per
//! sequence:
//!
//! - on CUDA in bf16/f16: libtorch's variable-length FlashAttention-2 kernel
//!   (`at::_flash_attention_forward` with `cum_seq_q`/`cum_seq_k`, through `csrc/`), one call
//!   per layer for the whole row, grouped-query heads shared in place, a sliding window as
//!   the kernel's window; autograd records its backward;
//! - elsewhere (the CPU, f32, Gemma 2's soft-capped attention, which the kernel lacks): a
//!   block-diagonal path that attends each sequence separately (a loop over segments, never
//!   one `[total, total]` masked attention), with the padded path's results.
//!
//! Prefix sharing fits the same row ([`PackedBatch::with_shared_prompts`]): each prompt once,
//! then the responses, each response attending to its prompt's keys and values followed by
//! its own (a key sequence longer than its query sequence, the causal mask aligned to the
//! end), so gradients of all K responses reach the one prompt pass and no explicit mask is
//! needed on the flash kernel.
//!
//! [`CausalLm::forward_packed`] runs the model on a packed batch (with recomputation, LoRA
//! and every family's switches, like [`CausalLm::forward_pass`]); [`PackedBatch::unpack`]
//! turns its hidden states `[1, total, H]` into the padded layout the chunked scorer reads,
//! the one [`collate`](crate::data::collate) (or
//! [`collate_shared`](crate::data::collate_shared)) labels.
//!
//! A trainer's micro-batch, packed (`examples` as the trainer collates them):
//!
//! ```text
//! let batch = collate(&examples, pad_id, device);               // labels [N, T] on the host
//! let packed = PackedBatch::from_examples(&examples, device)?;  // or from_right_padded
//! let options = ForwardOptions { train: true, recompute, ..ForwardOptions::default() };
//! let pass = model.forward_packed(&packed, &options)?;          // hidden [1, total, H]
//! let hidden = packed.unpack(&pass.hidden)?;                    // [N, T, H], collate's layout
//! preference_loss_backward(loss, &hidden, model.lm_head_weight(), &batch.labels, &scoring, &targets)?;
//! pass.finish_backward(&model)?;
//! ```
//!
//! With shared prompts: `PackedBatch::shared_from_examples(&examples, device)` and
//! `collate_shared`'s labels, the rest unchanged.

use tch::{Device, Kind, Tensor};

use crate::error::{RefaError, Result};
use crate::ffi;
use crate::model::causal_lm::{AttentionContext, ForwardOptions};
use crate::model::layers::{attend, LayerMask, Scoring};
use crate::model::{CausalLm, ForwardPass, ModelConfig};

/// The arguments of [`flash_attention_varlen`] besides `q`, `k`, `v`.
#[derive(Debug, Clone, Copy)]
pub struct VarlenArgs<'a> {
    /// int32 `[S + 1]` cumulative lengths of the `S` query sequences, on the inputs' device.
    pub cum_q: &'a Tensor,
    /// int32 `[S + 1]` cumulative lengths of the `S` key sequences (a key sequence may be
    /// longer than its query sequence).
    pub cum_k: &'a Tensor,
    /// The longest query sequence.
    pub max_q: i64,
    /// The longest key sequence.
    pub max_k: i64,
    /// Causal attention, the mask aligned to the end of the keys: query `i` of a sequence
    /// of `n_q` queries and `n_k` keys sees keys up to `i + n_k − n_q`.
    pub causal: bool,
    /// The factor on `q·kᵀ`; `None` for `1/√d`.
    pub scale: Option<f64>,
    /// A query sees no key more than this many positions before it (a sliding window of
    /// `window_left + 1` keys); `None` for no window.
    pub window_left: Option<i64>,
}

/// libtorch's variable-length FlashAttention-2 kernel (`at::_flash_attention_forward` with
/// cumulative lengths) on packed sequences: `[total_q, heads, d]` from `q` `[total_q, heads,
/// d]` and `k`, `v` `[total_k, kv_heads, d]` (`heads` a multiple of `kv_heads`: grouped-query
/// heads are shared in place). Differentiable: libtorch's autograd records the kernel's
/// backward.
///
/// CUDA only, bf16 or f16, head width a multiple of 8 up to 256. Anything else, and every
/// error the kernel raises, is a [`RefaError::Torch`] naming it (no C++ exception crosses
/// into Rust).
pub fn flash_attention_varlen(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    args: &VarlenArgs<'_>,
) -> Result<Tensor> {
    ffi::flash_attention_varlen(q, k, v, args)
}

/// Which attention kernel [`CausalLm::forward_packed`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PackedKernel {
    /// The flash kernel where it can run (CUDA, bf16/f16, no attention soft cap, head width a
    /// multiple of 8 up to 256), the block-diagonal path elsewhere. Default.
    #[default]
    Auto,
    /// The flash kernel, or an error saying why it cannot run.
    Flash,
    /// The block-diagonal path: each sequence's attention computed on its own.
    Segments,
}

/// One attention segment of a packed row: `len` queries from `start`, each attending to its
/// own sequence's keys up to itself, after every key of `prefix` (a prompt's `(start, len)`
/// in the same row) when there is one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    start: i64,
    len: i64,
    prefix: Option<(i64, i64)>,
}

impl Segment {
    /// Keys this segment attends over: its prefix's and its own.
    fn keys(&self) -> i64 {
        self.len + self.prefix.map_or(0, |(_, len)| len)
    }
}

/// A micro-batch laid out as one row of tokens without padding: the sequences concatenated,
/// each one's positions restarting at 0, attending only within itself (or, built by
/// [`with_shared_prompts`](Self::with_shared_prompts), each prompt once and each response
/// attending to its prompt's keys and values, then its own). [`CausalLm::forward_packed`]
/// runs the model on it: on CUDA in bf16/f16 through libtorch's variable-length flash
/// kernel, elsewhere one sequence at a time; the values and gradients are the padded path's.
///
/// A trainer's micro-batch, packed ([`from_examples`](Self::from_examples) keeps
/// `collate`'s row order; [`from_right_padded`](Self::from_right_padded) packs the collated
/// ids on the device given the rows' lengths):
///
/// ```text
/// let batch = collate(&examples, pad_id, device);               // labels [N, T] on the host
/// let packed = PackedBatch::from_examples(&examples, device)?;
/// let options = ForwardOptions { train: true, recompute, ..ForwardOptions::default() };
/// let pass = model.forward_packed(&packed, &options)?;          // hidden [1, total, H]
/// let hidden = packed.unpack(&pass.hidden)?;                    // [N, T, H], collate's layout
/// preference_loss_backward(loss, &hidden, model.lm_head_weight(), &batch.labels, &scoring, &targets)?;
/// pass.finish_backward(&model)?;
/// ```
///
/// With shared prompts: [`shared_from_examples`](Self::shared_from_examples) (or
/// [`with_shared_prompts`](Self::with_shared_prompts)) and
/// [`collate_shared`](crate::data::collate_shared)'s labels, the rest unchanged.
///
/// # Shapes
/// `total` packed positions: the sum of the sequence lengths (with shared prompts, the
/// prompts once plus the responses). [`input_ids`](Self::input_ids) `[1, total]`;
/// [`CausalLm::forward_packed`] returns hidden states `[1, total, H]`;
/// [`unpack`](Self::unpack) turns them into `[rows, width, H]`.
#[derive(Debug)]
pub struct PackedBatch {
    input_ids: Tensor,
    /// `[total]` i64: each token's position in its sequence (after its prompt for a shared
    /// prompt's response).
    positions: Tensor,
    /// The non-empty segments, in row order; they tile `0..total`.
    segments: Vec<Segment>,
    /// `[rows · width]` i64: the packed position each unpacked position reads (padding
    /// positions read position 0).
    unpack_index: Tensor,
    rows: i64,
    width: i64,
    /// One more than the largest position.
    position_span: i64,
    kernel: PackedKernel,
}

/// What the builders lay out on the host before one upload.
#[derive(Default)]
struct HostLayout {
    positions: Vec<i64>,
    segments: Vec<Segment>,
    unpack: Vec<i64>,
}

impl HostLayout {
    /// Appends a sequence of `len` tokens at row offset `start`, positions from `first`.
    fn push(&mut self, start: i64, len: i64, first: i64, prefix: Option<(i64, i64)>) {
        self.positions.extend(first..first + len);
        if len > 0 {
            self.segments.push(Segment { start, len, prefix });
        }
    }

    /// One unpacked row: `head` (the positions before the sequence's own, e.g. the prompt's
    /// last token), then the sequence's positions, padded to `width` with position 0.
    fn unpack_row(&mut self, head: Option<i64>, start: i64, len: i64, width: i64) {
        let row: Vec<i64> = head.into_iter().chain(start..start + len).collect();
        let padding = width - row.len() as i64;
        self.unpack.extend(row);
        self.unpack
            .extend(std::iter::repeat_n(0, padding.max(0) as usize));
    }

    fn total(&self) -> i64 {
        self.positions.len() as i64
    }
}

impl PackedBatch {
    /// Packs `sequences` (token ids, any lengths; an empty one is an empty slot, kept as an
    /// all-padding row of the unpacked layout) onto `device`.
    ///
    /// [`unpack`](Self::unpack) gives `[N, T, H]` with `T` the longest length (at least 1),
    /// row `n` holding sequence `n` right-padded: the layout of
    /// [`collate`](crate::data::collate)'s `input_ids` and `labels`.
    pub fn from_sequences(sequences: &[&[i64]], device: Device) -> Result<Self> {
        let width = sequences.iter().map(|s| s.len()).max().unwrap_or(0).max(1) as i64;
        let mut layout = HostLayout::default();
        let mut ids = Vec::new();
        for sequence in sequences {
            let (start, len) = (ids.len() as i64, sequence.len() as i64);
            ids.extend_from_slice(sequence);
            layout.push(start, len, 0, None);
            layout.unpack_row(None, start, len, width);
        }
        Self::upload(ids, layout, (sequences.len() as i64, width), device)
    }

    /// Packs a right-padded batch: `input_ids` `[N, T]` (i64, on the model's device) whose
    /// row `n` holds `lengths[n]` tokens (0 for an empty slot) followed by padding, as
    /// [`collate`](crate::data::collate) builds it. The tokens are gathered on the device
    /// (no host synchronization); `lengths` come from the host, where the collation knows
    /// them. [`unpack`](Self::unpack) gives `[N, T, H]`.
    pub fn from_right_padded(input_ids: &Tensor, lengths: &[i64]) -> Result<Self> {
        let shape = input_ids.size();
        if shape.len() != 2 || input_ids.kind() != Kind::Int64 || shape[0] != lengths.len() as i64 {
            return Err(RefaError::ShapeMismatch {
                tensor: "input_ids",
                actual: shape,
                expected: format!("[N, T] i64 with N = {} (one row per length)", lengths.len()),
            });
        }
        let width = shape[1];
        if let Some(bad) = lengths.iter().find(|&&l| !(0..=width).contains(&l)) {
            let requirement = format!("every length in [0, {width}] (the padded width)");
            return Err(RefaError::option("lengths", bad, requirement));
        }
        let mut layout = HostLayout::default();
        let mut source = Vec::new();
        for (n, &len) in lengths.iter().enumerate() {
            let start = source.len() as i64;
            source.extend((0..len).map(|t| n as i64 * width + t));
            layout.push(start, len, 0, None);
            layout.unpack_row(None, start, len, width);
        }
        let device = input_ids.device();
        let rows = lengths.len() as i64;
        let mut batch = Self::upload(source, layout, (rows, width), device)?;
        batch.input_ids = input_ids
            .flatten(0, -1)
            .index_select(0, &batch.input_ids.squeeze_dim(0))
            .unsqueeze(0);
        Ok(batch)
    }

    /// Packs `P` prompts and their responses for prefix sharing: the prompts once, then the
    /// responses; `responses` holds `P·K` sequences, row `p·K + k` the `k`-th response of
    /// prompt `p` (an empty one is an empty slot). Each response attends to its prompt's keys
    /// and values followed by its own, at positions continuing its prompt's.
    ///
    /// [`unpack`](Self::unpack) gives `[P·K, 1 + Lr, H]` (`Lr` the longest response, at least
    /// 1): position 0 the prompt's last token (it predicts the response's first token), then
    /// the response's tokens: the layout of
    /// [`collate_shared`](crate::data::collate_shared)'s labels, and of
    /// [`CausalLm::forward_shared_prefix`]'s output. Prompts need at least one token.
    pub fn with_shared_prompts(
        prompts: &[&[i64]],
        responses: &[&[i64]],
        device: Device,
    ) -> Result<Self> {
        let count = prompts.len();
        if count == 0 || responses.is_empty() || !responses.len().is_multiple_of(count) {
            let requirement = format!("a positive multiple of the {count} prompts (P·K)");
            return Err(RefaError::option("responses", responses.len(), requirement));
        }
        if let Some(p) = prompts.iter().position(|p| p.is_empty()) {
            return Err(RefaError::option(
                "prompts",
                format!("prompt {p} of length 0"),
                "at least one token each (its last token predicts the responses' first)",
            ));
        }
        let per_prompt = responses.len() / count;
        let longest = responses.iter().map(|r| r.len()).max().unwrap_or(0).max(1) as i64;
        let width = 1 + longest;
        let mut layout = HostLayout::default();
        let mut ids: Vec<i64> = Vec::new();
        let mut prompt_ranges = Vec::with_capacity(count);
        for prompt in prompts {
            let range = (ids.len() as i64, prompt.len() as i64);
            ids.extend_from_slice(prompt);
            layout.push(range.0, range.1, 0, None);
            prompt_ranges.push(range);
        }
        for (r, response) in responses.iter().enumerate() {
            let prompt = prompt_ranges[r / per_prompt];
            let (start, len) = (ids.len() as i64, response.len() as i64);
            ids.extend_from_slice(response);
            layout.push(start, len, prompt.1, Some(prompt));
            layout.unpack_row(Some(prompt.0 + prompt.1 - 1), start, len, width);
        }
        Self::upload(ids, layout, (responses.len() as i64, width), device)
    }

    /// Uploads ids (or gather indices), positions and the unpack index in one copy.
    fn upload(
        ids: Vec<i64>,
        layout: HostLayout,
        (rows, width): (i64, i64),
        device: Device,
    ) -> Result<Self> {
        let total = layout.total();
        if total == 0 {
            return Err(RefaError::option(
                "sequences",
                "no token",
                "at least one token in the micro-batch",
            ));
        }
        let position_span = layout.positions.iter().max().copied().unwrap_or(0) + 1;
        let unpacked = layout.unpack.len() as i64;
        let all =
            Tensor::from_slice(&[ids, layout.positions, layout.unpack].concat()).to_device(device);
        Ok(PackedBatch {
            input_ids: all.narrow(0, 0, total).unsqueeze(0),
            positions: all.narrow(0, total, total),
            segments: layout.segments,
            unpack_index: all.narrow(0, 2 * total, unpacked),
            rows,
            width,
            position_span,
            kernel: PackedKernel::Auto,
        })
    }

    /// The same batch with attention through `kernel` (default [`PackedKernel::Auto`]).
    pub fn with_kernel(mut self, kernel: PackedKernel) -> Self {
        self.kernel = kernel;
        self
    }

    /// The kernel asked for.
    pub fn kernel(&self) -> PackedKernel {
        self.kernel
    }

    /// `[1, total]` i64 token ids.
    pub fn input_ids(&self) -> &Tensor {
        &self.input_ids
    }

    /// `[total]` i64 position of each token within its sequence (for a shared prompt's
    /// response: after the prompt).
    pub fn positions(&self) -> &Tensor {
        &self.positions
    }

    /// Positions the layers compute: the row's length, `total`.
    pub fn total(&self) -> i64 {
        self.positions.size()[0]
    }

    /// `(rows, width)` of the unpacked layout [`unpack`](Self::unpack) returns.
    pub fn unpacked_shape(&self) -> (i64, i64) {
        (self.rows, self.width)
    }

    /// Number of non-empty attention segments (sequences, or prompts plus responses).
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Hidden states `[1, total, H]` of this batch (from [`CausalLm::forward_packed`]) in the
    /// padded layout `[rows, width, H]` (see the constructors), by one gather that autograd
    /// follows back into the packed row. Padding positions hold a copy of packed position 0:
    /// their values are undefined (the scorer reads response positions only) and they get
    /// no gradient from a scorer that does not read them.
    pub fn unpack(&self, hidden: &Tensor) -> Result<Tensor> {
        let shape = hidden.size();
        if shape.len() != 3 || shape[0] != 1 || shape[1] != self.total() {
            return Err(RefaError::ShapeMismatch {
                tensor: "hidden",
                actual: shape,
                expected: format!("[1, {}, H] (the packed row)", self.total()),
            });
        }
        let index = self.unpack_index.to_device(hidden.device());
        Ok(hidden
            .squeeze_dim(0)
            .index_select(0, &index)
            .view([self.rows, self.width, shape[2]]))
    }
}

/// The trainer's examples packed in the row order of its collation, so that the unpacked
/// hidden states line up with the collated labels, rewards and slot mask.
#[cfg(feature = "trainer")]
impl PackedBatch {
    /// `examples` as [`collate`](crate::data::collate) lays them out (row `p·S + k` the
    /// `k`-th response of example `p` with its prompt, `S` the most responses of an example,
    /// rows past an example's responses empty), packed: [`unpack`](Self::unpack) gives
    /// `[P·S, T, H]` for `collate`'s labels.
    pub fn from_examples(
        examples: &[&crate::data::TokenizedExample],
        device: Device,
    ) -> Result<Self> {
        let slots = examples
            .iter()
            .map(|e| e.responses.len())
            .max()
            .unwrap_or(0);
        let sequences: Vec<Vec<i64>> = examples
            .iter()
            .flat_map(|e| (0..slots).map(|k| e.responses.get(k).map(|r| r.input_ids())))
            .map(Option::unwrap_or_default)
            .collect();
        let sequences: Vec<&[i64]> = sequences.iter().map(Vec::as_slice).collect();
        Self::from_sequences(&sequences, device)
    }

    /// `examples` as [`collate_shared`](crate::data::collate_shared) lays them out (each
    /// example's prompt once, its responses in rows `p·S + k`), packed for prefix sharing:
    /// [`unpack`](Self::unpack) gives `[P·S, 1 + Lr, H]` for `collate_shared`'s labels. Every
    /// response of an example must carry the same prompt ids, of at least one token.
    pub fn shared_from_examples(
        examples: &[&crate::data::TokenizedExample],
        device: Device,
    ) -> Result<Self> {
        let slots = examples
            .iter()
            .map(|e| e.responses.len())
            .max()
            .unwrap_or(0);
        let mut prompts: Vec<&[i64]> = Vec::with_capacity(examples.len());
        let mut responses: Vec<&[i64]> = Vec::with_capacity(examples.len() * slots);
        for (p, example) in examples.iter().enumerate() {
            let prompt = example
                .responses
                .first()
                .map_or(&[][..], |r| r.prompt.as_slice());
            if example.responses.iter().any(|r| r.prompt != prompt) {
                return Err(RefaError::option(
                    "examples",
                    format!("example {p}"),
                    "responses that carry the same prompt ids, so that the prompt can be shared",
                ));
            }
            prompts.push(prompt);
            let own = example.responses.iter().map(|r| r.response.as_slice());
            responses.extend(own.chain(std::iter::repeat(&[][..])).take(slots));
        }
        Self::with_shared_prompts(&prompts, &responses, device)
    }
}

impl CausalLm {
    /// A forward pass over a packed batch: hidden states `[1, total, H]` after the final
    /// norm, in [`ForwardPass::hidden`]; turn them into the scorer's layout with
    /// [`PackedBatch::unpack`]. `options` as for [`forward_pass`](Self::forward_pass) (`train`:
    /// LoRA dropout; `recompute`: keep only each layer's input and finish with
    /// [`ForwardPass::finish_backward`]); `padding` is ignored (a packed row has none).
    ///
    /// At every sequence's tokens the values, and every weight's gradient through them,
    /// equal those of [`forward_pass`](Self::forward_pass) on the padded batch (f32, to
    /// float rounding; `tests/packing.rs`), for every family's switches. LoRA dropout draws
    /// its masks over the packed row, so with dropout on, the draws differ from a padded
    /// pass's.
    pub fn forward_packed(
        &self,
        batch: &PackedBatch,
        options: &ForwardOptions,
    ) -> Result<ForwardPass> {
        let device = self.lm_head_weight().device();
        let embedded = self.embed_tokens(&batch.input_ids.to_device(device))?;
        let (cos, sin) = self.rotary_tables(0, batch.position_span);
        let positions = batch.positions.to_device(device);
        let plan = PackedAttention::new(batch, self.config(), self.kind(), device)?;
        let context = AttentionContext::packed(
            cos.index_select(0, &positions),
            sin.index_select(0, &positions),
            self.config(),
            plan,
        );
        self.run_layers(embedded, context, options)
    }

    /// The kernel [`forward_packed`](Self::forward_packed) would use for `batch`:
    /// [`PackedKernel::Flash`] or [`PackedKernel::Segments`] (an error where the flash kernel
    /// was asked for and cannot run for this model).
    pub fn packed_kernel(&self, batch: &PackedBatch) -> Result<PackedKernel> {
        let device = self.lm_head_weight().device();
        let flash = use_flash(batch.kernel, self.config(), self.kind(), device)?;
        Ok(if flash {
            PackedKernel::Flash
        } else {
            PackedKernel::Segments
        })
    }
}

/// Whether the flash kernel runs for `kernel` on this model, device and kind.
fn use_flash(
    kernel: PackedKernel,
    config: &ModelConfig,
    kind: Kind,
    device: Device,
) -> Result<bool> {
    let width = config.head_width();
    let shape_fits = width % 8 == 0 && width <= 256;
    let capped = config.switches.attention_softcap.is_some();
    match kernel {
        PackedKernel::Segments => Ok(false),
        PackedKernel::Auto => Ok(device.is_cuda()
            && matches!(kind, Kind::BFloat16 | Kind::Half)
            && shape_fits
            && !capped),
        PackedKernel::Flash if capped => Err(RefaError::option(
            "packed kernel",
            "Flash",
            "Auto or Segments for soft-capped attention (Gemma 2): libtorch's flash kernel \
             has no soft cap",
        )),
        PackedKernel::Flash if !shape_fits => Err(RefaError::option(
            "packed kernel",
            "Flash",
            format!("Auto or Segments for head width {width}: the flash kernel takes multiples of 8 up to 256"),
        )),
        // Device and kind are checked by the kernel's entry point in csrc.
        PackedKernel::Flash => Ok(true),
    }
}

/// How a packed forward pass attends: the segments, and what the chosen kernel needs.
#[derive(Debug)]
pub(crate) struct PackedAttention {
    segments: Vec<Segment>,
    route: Route,
}

#[derive(Debug)]
enum Route {
    Flash(FlashPlan),
    /// Each segment's mask for full and for sliding layers.
    Segments {
        full: Vec<LayerMask>,
        sliding: Vec<LayerMask>,
    },
}

/// The flash kernel's cumulative lengths, and the rows that make each segment's keys when
/// prompts are shared (the prompt's rows, then the segment's own).
#[derive(Debug)]
struct FlashPlan {
    cum_q: Tensor,
    cum_k: Tensor,
    max_q: i64,
    max_k: i64,
    key_rows: Option<Tensor>,
}

impl PackedAttention {
    fn new(batch: &PackedBatch, config: &ModelConfig, kind: Kind, device: Device) -> Result<Self> {
        let segments = batch.segments.clone();
        let route = if use_flash(batch.kernel, config, kind, device)? {
            Route::Flash(FlashPlan::new(&segments, device))
        } else {
            let masks = |window| {
                segments
                    .iter()
                    .map(|s| segment_mask(s, window, device))
                    .collect()
            };
            let full: Vec<LayerMask> = masks(None);
            let sliding = match config.any_window() {
                Some(window) => masks(Some(window)),
                None => full.iter().map(LayerMask::shallow_clone).collect(),
            };
            Route::Segments { full, sliding }
        };
        Ok(PackedAttention { segments, route })
    }

    /// Attention of `q` `[1, heads, total, d]` over `k`, `v` `[1, kv_heads, total, d]` (the
    /// layer's projections with rotary embeddings) within each segment: `[1, total,
    /// heads·d]`, ready for the output projection.
    pub fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        window: Option<i64>,
        scoring: Scoring,
    ) -> Result<Tensor> {
        let (heads, total, d) = (q.size()[1], q.size()[2], q.size()[3]);
        let out = match &self.route {
            Route::Flash(plan) => plan.attend(q, k, v, window, scoring)?,
            Route::Segments { full, sliding } => {
                let masks = if window.is_some() { sliding } else { full };
                self.attend_segments(q, k, v, masks, scoring)
                    .transpose(1, 2)
            }
        };
        Ok(out.contiguous().view([1, total, heads * d]))
    }

    /// The block-diagonal path: `[1, heads, total, d]`, each segment attended on its own
    /// with the padded path's `attend`.
    fn attend_segments(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        masks: &[LayerMask],
        scoring: Scoring,
    ) -> Tensor {
        let outputs: Vec<Tensor> = self
            .segments
            .iter()
            .zip(masks)
            .map(|(segment, mask)| {
                let own = |t: &Tensor| t.narrow(2, segment.start, segment.len);
                let with_prefix = |t: &Tensor| match segment.prefix {
                    Some((start, len)) => Tensor::cat(&[t.narrow(2, start, len), own(t)], 2),
                    None => own(t),
                };
                if mask.mask.is_some() || segment.prefix.is_none() {
                    return attend(&own(q), &with_prefix(k), &with_prefix(v), mask, scoring);
                }
                // A response after its prompt, without a binding window: the prompt's queries
                // go first so that plain causal attention (whose kernel skips the masked
                // blocks) is exact, and their outputs are dropped. An explicit mask would
                // make the kernel compute every block.
                let out = attend(
                    &with_prefix(q),
                    &with_prefix(k),
                    &with_prefix(v),
                    mask,
                    scoring,
                );
                out.narrow(2, segment.keys() - segment.len, segment.len)
            })
            .collect();
        Tensor::cat(&outputs, 2)
    }
}

impl FlashPlan {
    fn new(segments: &[Segment], device: Device) -> Self {
        let cumulative = |lengths: &mut dyn Iterator<Item = i64>| -> Vec<i64> {
            std::iter::once(0)
                .chain(lengths.scan(0, |sum, l| {
                    *sum += l;
                    Some(*sum)
                }))
                .collect()
        };
        let cum_q = cumulative(&mut segments.iter().map(|s| s.len));
        let cum_k = cumulative(&mut segments.iter().map(Segment::keys));
        let shared = segments.iter().any(|s| s.prefix.is_some());
        let key_rows: Vec<i64> = if shared {
            segments
                .iter()
                .flat_map(|s| {
                    let (start, len) = s.prefix.unwrap_or((0, 0));
                    (start..start + len).chain(s.start..s.start + s.len)
                })
                .collect()
        } else {
            Vec::new()
        };
        let count = cum_q.len() as i64;
        let rows = key_rows.len() as i64;
        let all = Tensor::from_slice(&[cum_q, cum_k, key_rows].concat()).to_device(device);
        FlashPlan {
            cum_q: all.narrow(0, 0, count).to_kind(Kind::Int),
            cum_k: all.narrow(0, count, count).to_kind(Kind::Int),
            max_q: segments.iter().map(|s| s.len).max().unwrap_or(0),
            max_k: segments.iter().map(Segment::keys).max().unwrap_or(0),
            key_rows: shared.then(|| all.narrow(0, 2 * count, rows)),
        }
    }

    /// One variable-length flash call for the whole row: `[total, heads, d]`.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        window: Option<i64>,
        scoring: Scoring,
    ) -> Result<Tensor> {
        // [1, heads, total, d] -> [total, heads, d]: a view; the kernel reads any row and
        // head strides as long as the last dimension is contiguous.
        let tokens_first = |t: &Tensor| t.squeeze_dim(0).transpose(0, 1);
        let keys = |t: &Tensor| match &self.key_rows {
            Some(rows) => tokens_first(t).index_select(0, rows),
            None => tokens_first(t),
        };
        let args = VarlenArgs {
            cum_q: &self.cum_q,
            cum_k: &self.cum_k,
            max_q: self.max_q,
            max_k: self.max_k,
            causal: true,
            scale: scoring.scale,
            // The padded path lets query q see key k when q − k < w.
            window_left: window.map(|w| w - 1),
        };
        flash_attention_varlen(&tokens_first(q), &keys(k), &keys(v), &args)
    }
}

/// The mask of one segment for the block-diagonal path: query `i` (at position `p + i`
/// after a prefix of `p` keys) sees key `j` when `j <= p + i` and, with a window `w`,
/// `p + i − j < w`. No mask (plain causal attention, with the prefix's queries put first
/// when there is a prefix) when the window does not bind.
fn segment_mask(segment: &Segment, window: Option<i64>, device: Device) -> LayerMask {
    let prefix = segment.prefix.map_or(0, |(_, len)| len);
    let keys = segment.keys();
    let Some(w) = window.filter(|&w| w < keys) else {
        return LayerMask {
            mask: None,
            causal: true,
        };
    };
    let query = Tensor::arange_start(prefix, keys, (Kind::Int64, device)).unsqueeze(1);
    let key = Tensor::arange(keys, (Kind::Int64, device)).unsqueeze(0);
    let allowed = key.le_tensor(&query).logical_and(&(&query - &key).lt(w));
    LayerMask {
        mask: Some(allowed.view([1, 1, segment.len, keys])),
        causal: false,
    }
}
