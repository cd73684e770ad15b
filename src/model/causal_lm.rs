//! The decoder of every supported family, with Hugging Face's parameter names; the families'
//! differences are data ([`Switches`](crate::model::Switches)) read from `config.json`.

use std::path::Path;

use tch::nn::{self, VarStore};
use tch::{Device, Kind, Tensor};

use crate::error::{RefaError, Result};
use crate::model::checkpoint::{write_checkpoint, CheckpointFile, CheckpointReader, SaveOptions};
use crate::model::layers::{self, attend, LayerMask, Norm, Scoring};
use crate::model::lora::{Linear, LoraConfig, LoraTarget};
use crate::model::names;
use crate::model::packed::PackedAttention;
use crate::model::rope::{apply_rotary, Rotary};
use crate::model::{Activation, ModelConfig};

/// A Hugging Face decoder-only causal LM of any supported [`Family`](crate::model::Family)
/// (`MistralForCausalLM`, `LlamaForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM`,
/// `GemmaForCausalLM`, `Gemma2ForCausalLM`, `Phi3ForCausalLM`): token embedding (× √H for
/// Gemma), decoder layers (RMSNorm, grouped-query attention with rotary embeddings, optional
/// biases, q/k norms, sliding windows and soft-capping, a gated MLP), final norm and LM head
/// (soft-capped for Gemma 2).
///
/// Parameters live in a [`VarStore`] under Hugging Face's names
/// (`model.layers.3.self_attn.q_proj.weight`, …), so checkpoints load and save as they are
/// (Phi-3's fused `qkv_proj` and `gate_up_proj` are split on load and fused on save).
/// With LoRA, the base weights are frozen and only the adapters are trainable variables.
#[derive(Debug)]
pub struct CausalLm {
    config: ModelConfig,
    var_store: VarStore,
    embed: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Norm,
    lm_head: Option<Tensor>,
    rotary: Rotary,
    kind: Kind,
}

#[derive(Debug)]
pub(crate) struct DecoderLayer {
    input_norm: Norm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// Qwen3's per-head norms of q and k.
    qk_norms: Option<(Norm, Norm)>,
    /// Before the MLP, or (Gemma 2) on the attention output.
    post_attention_norm: Norm,
    /// Gemma 2's norms before and after the MLP.
    feedforward_norms: Option<(Norm, Norm)>,
    gate: Linear,
    up: Linear,
    down: Linear,
    /// This layer's sliding window.
    window: Option<i64>,
}

impl CausalLm {
    /// A model with zero weights of `kind` on `device` (load weights next, or initialize
    /// them with [`init_random`](Self::init_random)). With `lora`, adapters are attached to
    /// the targeted layers and only they are trainable; its settings are checked first
    /// ([`LoraConfig::validate`]).
    pub fn new(
        config: ModelConfig,
        device: Device,
        kind: Kind,
        lora: Option<&LoraConfig>,
    ) -> Result<Self> {
        if let Some(lora) = lora {
            lora.validate(&config)?;
        }
        let var_store = VarStore::new(device);
        let root = var_store.root();
        let model = root.sub("model");
        let trainable = lora.is_none();
        let zeros = |path: &nn::Path, name: &str, dims: &[i64]| {
            path.add(name, Tensor::zeros(dims, (kind, device)), trainable)
        };
        let embed = zeros(
            &model.sub("embed_tokens"),
            "weight",
            &[config.vocab_size, config.hidden_size],
        );
        let layers = (0..config.num_hidden_layers)
            .map(|i| DecoderLayer::new(&model.sub("layers").sub(i), &config, i, kind, lora))
            .collect();
        let norm = Norm::new(
            zeros(&model.sub("norm"), "weight", &[config.hidden_size]),
            config.switches.norm_offset,
        );
        let lm_head = (!config.tie_word_embeddings).then(|| {
            zeros(
                &root.sub("lm_head"),
                "weight",
                &[config.vocab_size, config.hidden_size],
            )
        });
        let rotary = Rotary::new(&config.rope, device);
        Ok(CausalLm {
            config,
            var_store,
            embed,
            layers,
            norm,
            lm_head,
            rotary,
            kind,
        })
    }

    /// Loads `config.json` and the safetensors weights of a Hugging Face checkpoint folder.
    pub fn from_pretrained(
        folder: impl AsRef<Path>,
        device: Device,
        kind: Kind,
        lora: Option<&LoraConfig>,
    ) -> Result<Self> {
        let folder = folder.as_ref();
        let config = ModelConfig::from_file(folder.join("config.json"))?;
        let model = CausalLm::new(config, device, kind, lora)?;
        model.load_weights(&CheckpointReader::open(folder)?)?;
        Ok(model)
    }

    /// Random weights like Hugging Face's initialization (normal, σ = 0.02; norms at 1, or
    /// 0 where the family stores `w` of `(1 + w)`; biases at 0),
    /// drawn from libtorch's global generator after seeding it with `seed` (so concurrent
    /// draws on other threads would interleave with these).
    pub fn init_random(&self, seed: i64) {
        tch::manual_seed(seed);
        tch::no_grad(|| {
            let norm_value = if self.config.switches.norm_offset { 0.0 } else { 1.0 };
            for (name, mut tensor) in self.base_parameters() {
                if name.ends_with("norm.weight") {
                    let _ = tensor.fill_(norm_value);
                } else if name.ends_with(".bias") {
                    let _ = tensor.zero_();
                } else {
                    tensor.copy_(&(tensor.randn_like() * 0.02));
                }
            }
        });
    }

    /// Copies every weight from `reader`. Every parameter must be present with its shape;
    /// a tensor the model does not know is an error too (rotary `inv_freq` buffers of old
    /// checkpoints, and a tied `lm_head.weight`, are skipped). Phi-3's fused projections
    /// are split into the model's q/k/v and gate/up weights.
    pub fn load_weights(&self, reader: &CheckpointReader) -> Result<()> {
        self.load_weights_beside(reader, &[])
    }

    /// [`load_weights`](Self::load_weights) from a checkpoint that also holds `heads`:
    /// tensors another module reads (a sequence classifier's `score.weight`).
    pub(crate) fn load_weights_beside(&self, reader: &CheckpointReader, heads: &[&str]) -> Result<()> {
        let parameters = self.base_parameters();
        let sources: Vec<names::Source> = parameters
            .iter()
            .map(|(name, _)| names::source(name, &self.config))
            .collect();
        let known: std::collections::HashSet<&str> =
            sources.iter().map(|s| s.tensor.as_str()).collect();
        let tied_head = self.config.tie_word_embeddings;
        if let Some(extra) = reader.names().find(|name| {
            !known.contains(name)
                && !heads.contains(name)
                && !name.ends_with("rotary_emb.inv_freq")
                && (!tied_head || *name != "lm_head.weight")
        }) {
            return Err(RefaError::checkpoint(
                extra,
                format!(
                    "is in the checkpoint but not in a `{}` model with this config.json \
                     (wrong architecture, or a config key that adds it is missing?)",
                    self.config.family.model_type()
                ),
            ));
        }
        for ((name, mut target), source) in parameters.into_iter().zip(sources) {
            let shape = reader.shape(&source.tensor)?;
            let expected = source.stored_shape(&target.size());
            if shape != expected {
                return Err(RefaError::checkpoint(
                    &source.tensor,
                    format!("has shape {shape:?}, the model expects {expected:?} (for {name})"),
                ));
            }
            let stored = reader.read(&source.tensor, target.device(), target.kind())?;
            let part = source.part(&stored);
            tch::no_grad(|| target.f_copy_(&part))?;
        }
        Ok(())
    }

    /// Writes a Hugging Face checkpoint (config.json and safetensors shards) atomically,
    /// with LoRA adapters merged into the base weights.
    pub fn save_pretrained(&self, folder: impl AsRef<Path>, options: SaveOptions) -> Result<()> {
        self.save_pretrained_with(folder, options, Vec::new())
    }

    /// [`save_pretrained`](Self::save_pretrained) with more files in the same atomic folder
    /// (a trainer's state, its optimizer state and LoRA adapters, streamed like the weights).
    pub fn save_pretrained_with(
        &self,
        folder: impl AsRef<Path>,
        options: SaveOptions,
        mut extra_files: Vec<(&str, CheckpointFile)>,
    ) -> Result<()> {
        let dtype = match options.kind {
            Kind::BFloat16 => "bfloat16",
            Kind::Half => "float16",
            _ => "float32",
        };
        let config = self.config.to_json(dtype)?.into_bytes();
        extra_files.push(("config.json", CheckpointFile::Bytes(config)));
        let tensors = names::to_checkpoint(self.merged_parameters(), &self.config);
        write_checkpoint(folder, &tensors, &extra_files, options)
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The parameters (for the optimizer: `var_store().trainable_variables()`).
    pub fn var_store(&self) -> &VarStore {
        &self.var_store
    }

    /// The LM head weight `[V, H]` (the embedding when tied), for the chunked scorer.
    pub fn lm_head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// The scoring settings of this model: `base` with the LM head's soft cap (Gemma 2's
    /// `final_logit_softcapping`, else none), so that the chunked scorer computes this
    /// model's log-probabilities. The trainer applies it to its configuration itself.
    pub fn scoring_config(&self, base: crate::scoring::ScoringConfig) -> crate::scoring::ScoringConfig {
        crate::scoring::ScoringConfig {
            logit_softcap: self.config.switches.final_softcap,
            ..base
        }
    }

    /// The kind of the base weights.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Hidden states `[N, T, H]` after the final norm, for `input_ids` `[N, T]` (i64) and
    /// `attention_mask` `[N, T]` (1 or true for tokens), padded in any layout (an explicit
    /// attention mask is built when there is padding; see [`Padding`]). `train` enables LoRA
    /// dropout, whose masks come from libtorch's global generator, reseeded per layer (see
    /// [`forward_pass`](Self::forward_pass), which also takes the faster right-padded path).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let options = ForwardOptions {
            train,
            ..ForwardOptions::default()
        };
        Ok(self
            .forward_pass(input_ids, attention_mask, &options)?
            .hidden)
    }

    /// The decoder layers in the autograd graph, then the final norm.
    pub(crate) fn forward_layers(
        &self,
        x: Tensor,
        context: &AttentionContext,
        train: bool,
    ) -> Result<Tensor> {
        let seeds = layer_seeds(self.layers.len(), train);
        let mut x = x;
        for (layer, seed) in self.layers.iter().zip(seeds) {
            seed_dropout(seed);
            x = layer.forward(&x, context, train)?;
        }
        Ok(self.final_norm(&x))
    }

    /// Logits `[N, T, V]` from hidden states (materializes `N·T·V` values: prefer the
    /// chunked scorer for training), soft-capped where the family caps them (Gemma 2).
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        let logits = hidden.matmul(&self.lm_head_weight().tr());
        match self.config.switches.final_softcap {
            Some(cap) => (logits / cap).tanh() * cap,
            None => logits,
        }
    }

    /// Token embeddings and the per-batch attention context (rotary tables, mask).
    pub(crate) fn embed(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        padding: Padding,
    ) -> Result<(Tensor, AttentionContext)> {
        let shape = input_ids.size();
        if shape.len() != 2 || input_ids.kind() != Kind::Int64 || shape.contains(&0) {
            let expected = "[N, T] i64 token ids with N, T >= 1".to_string();
            return Err(RefaError::ShapeMismatch {
                tensor: "input_ids",
                actual: shape,
                expected,
            });
        }
        if attention_mask.size() != shape {
            let expected = format!("{shape:?} like `input_ids`");
            return Err(RefaError::ShapeMismatch {
                tensor: "attention_mask",
                actual: attention_mask.size(),
                expected,
            });
        }
        let (cos, sin) = self.rotary.cos_sin(shape[1], self.kind);
        let valid = attention_mask.to_device(self.embed.device()).ne(0);
        let right_padded = padding == Padding::Right;
        let context = AttentionContext::new(cos, sin, &self.config, |window| {
            let mask = layers::attention_mask(&valid, window, right_padded);
            // Without a mask, the whole sequence attends causally.
            let causal = mask.is_none();
            LayerMask { mask, causal }
        });
        Ok((self.embed_tokens(input_ids)?, context))
    }

    /// Rotary tables for positions `offset..offset + count`.
    pub(crate) fn rotary_tables(&self, offset: i64, count: i64) -> (Tensor, Tensor) {
        let (cos, sin) = self.rotary.cos_sin(offset + count, self.kind);
        (cos.narrow(0, offset, count), sin.narrow(0, offset, count))
    }

    /// Embeddings `[N, t, H]` of token ids `[N, t]` (× √H, rounded to the model's kind, for
    /// Gemma); an id outside the vocabulary is an error, not a crash.
    pub(crate) fn embed_tokens(&self, input_ids: &Tensor) -> Result<Tensor> {
        let shape = input_ids.size();
        let rows = self
            .embed
            .f_index_select(0, &input_ids.flatten(0, -1))
            .map_err(|e| {
                RefaError::torch(format!(
                    "`input_ids` hold a token id outside the vocabulary [0, {}): {e}",
                    self.config.vocab_size
                ))
            })?;
        let rows = rows.view([shape[0], shape[1], self.config.hidden_size]);
        if !self.config.switches.scale_embeddings {
            return Ok(rows);
        }
        let normalizer = Tensor::from((self.config.hidden_size as f64).sqrt())
            .to_kind(self.kind)
            .to_device(rows.device());
        Ok(rows * normalizer)
    }

    /// The decoder layers, for the recomputing forward pass.
    pub(crate) fn decoder_layers(
        &self,
    ) -> impl DoubleEndedIterator<Item = &DecoderLayer> + ExactSizeIterator {
        self.layers.iter()
    }

    /// Final norm.
    pub(crate) fn final_norm(&self, x: &Tensor) -> Tensor {
        self.norm.forward(x, self.config.rms_norm_eps)
    }

    /// The LoRA adapters (`…lora_A.weight`, `…lora_B.weight`) under their names.
    pub fn adapter_parameters(&self) -> Vec<(String, Tensor)> {
        let mut adapters: Vec<(String, Tensor)> = self
            .var_store
            .variables()
            .into_iter()
            .filter(|(name, _)| name.contains(".lora_"))
            .collect();
        adapters.sort_by(|a, b| a.0.cmp(&b.0));
        adapters
    }

    /// Base weights under their Hugging Face names (LoRA adapters excluded).
    fn base_parameters(&self) -> Vec<(String, Tensor)> {
        let mut parameters: Vec<(String, Tensor)> = self
            .var_store
            .variables()
            .into_iter()
            .filter(|(name, _)| !name.contains(".lora_"))
            .collect();
        parameters.sort_by(|a, b| a.0.cmp(&b.0));
        parameters
    }

    /// Base weights with every adapter merged in, under Hugging Face's names.
    fn merged_parameters(&self) -> Vec<(String, Tensor)> {
        let mut merged: Vec<(String, Tensor)> = self.base_parameters();
        for (i, layer) in self.layers.iter().enumerate() {
            for (target, linear) in layer.linears() {
                if linear.adapter().is_some() {
                    let name = format!("model.layers.{i}.{}.weight", target_path(target));
                    if let Some(entry) = merged.iter_mut().find(|(n, _)| *n == name) {
                        entry.1 = linear.merged_weight();
                    }
                }
            }
        }
        merged
    }
}

/// One seed per layer when training, so that LoRA dropout draws the same masks in a plain
/// pass and in a recomputing pass started from the same torch seed (and in the recomputation
/// itself); `-1` (no reseeding) when not training.
pub(crate) fn layer_seeds(layers: usize, train: bool) -> Vec<i64> {
    if !train {
        return vec![-1; layers];
    }
    let base = Tensor::randint(1 << 40, [1], (Kind::Int64, Device::Cpu)).int64_value(&[0]);
    (0..layers as i64).map(|i| base + i).collect()
}

/// Seeds torch's generators for one layer's dropout (no-op for `-1`).
pub(crate) fn seed_dropout(seed: i64) {
    if seed >= 0 {
        tch::manual_seed(seed);
    }
}

/// How the rows of a batch are padded, which decides whether attention needs a mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Padding {
    /// Any layout (left, right, inside): an explicit `[N, 1, T, T]` mask is built, exact for
    /// every position. Default.
    #[default]
    Any,
    /// Each row's tokens come first and its padding after, as the trainer's
    /// [`collate`](crate::data::collate) builds batches. Causal attention without a mask is
    /// then exact at every token position (a token never attends a later key), so none is
    /// built (only a `[1, 1, T, T]` one for a sliding window shorter than the batch) and
    /// attention can take its flash kernel, with grouped-query heads shared in place
    /// (`enable_gqa`). The promise is not checked (that would cost a host synchronization);
    /// outputs at padding positions are undefined.
    Right,
}

/// How [`CausalLm::forward_pass`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ForwardOptions {
    /// LoRA dropout on (training). Default false.
    pub train: bool,
    /// Keep only each decoder layer's input and recompute the layer in the backward pass
    /// ([`crate::model::ForwardPass::finish_backward`]). Default false.
    pub recompute: bool,
    /// The batch's padding layout. Default [`Padding::Any`].
    pub padding: Padding,
}

impl ForwardOptions {
    /// Inference on a right-padded batch (the trainer's evaluation and scoring): no dropout,
    /// no recomputation, [`Padding::Right`].
    pub fn right_padded() -> Self {
        ForwardOptions {
            padding: Padding::Right,
            ..ForwardOptions::default()
        }
    }
}

/// What every layer of one forward pass shares: the rotary tables and the masks of full
/// and of sliding layers, or, for a packed row, its segments.
#[derive(Debug)]
pub(crate) struct AttentionContext {
    pub cos: Tensor,
    pub sin: Tensor,
    /// Full (unwindowed) layers.
    pub full: LayerMask,
    /// Sliding layers (the same as `full` when no layer slides).
    pub sliding: LayerMask,
    pub config: ModelConfig,
    /// A packed row's attention (then `full` and `sliding` are unused).
    pub packed: Option<PackedAttention>,
}

impl AttentionContext {
    /// A context whose masks `build` makes from a window (`None` for full layers).
    pub fn new(
        cos: Tensor,
        sin: Tensor,
        config: &ModelConfig,
        build: impl Fn(Option<i64>) -> LayerMask,
    ) -> Self {
        let full = build(None);
        let sliding = match config.any_window() {
            Some(window) => build(Some(window)),
            None => full.shallow_clone(),
        };
        AttentionContext {
            cos,
            sin,
            full,
            sliding,
            config: config.clone(),
            packed: None,
        }
    }

    /// The context of a packed row: rotary tables `[total, rotary_dim]` gathered at each
    /// token's position, and the row's attention plan.
    pub fn packed(cos: Tensor, sin: Tensor, config: &ModelConfig, plan: PackedAttention) -> Self {
        let unused = || LayerMask {
            mask: None,
            causal: true,
        };
        AttentionContext {
            cos,
            sin,
            full: unused(),
            sliding: unused(),
            config: config.clone(),
            packed: Some(plan),
        }
    }

    /// The mask of a layer with `window`.
    fn mask_for(&self, window: Option<i64>) -> &LayerMask {
        if window.is_some() {
            &self.sliding
        } else {
            &self.full
        }
    }
}

/// One layer's cached keys and values `[N, kv_heads, T, d]` (before the GQA repeat).
#[derive(Debug, Default)]
pub(crate) struct LayerCache {
    pub keys: Option<Tensor>,
    pub values: Option<Tensor>,
}

fn target_path(target: LoraTarget) -> &'static str {
    match target {
        LoraTarget::Q => "self_attn.q_proj",
        LoraTarget::K => "self_attn.k_proj",
        LoraTarget::V => "self_attn.v_proj",
        LoraTarget::O => "self_attn.o_proj",
        LoraTarget::Gate => "mlp.gate_proj",
        LoraTarget::Up => "mlp.up_proj",
        LoraTarget::Down => "mlp.down_proj",
    }
}

impl DecoderLayer {
    fn new(
        path: &nn::Path,
        config: &ModelConfig,
        index: i64,
        kind: Kind,
        lora: Option<&LoraConfig>,
    ) -> Self {
        let (h, d) = (config.hidden_size, config.head_width());
        let (heads, kv) = (config.num_attention_heads, config.kv_heads());
        let switches = &config.switches;
        let trainable = lora.is_none();
        let linear = |target: LoraTarget, shape: (i64, i64), bias: bool| {
            let mut p = path.clone();
            for part in target_path(target).split('.') {
                p = p.sub(part);
            }
            let adapter = lora.filter(|l| l.targets.contains(&target));
            Linear::new(&p, shape, bias, kind, trainable, adapter)
        };
        let norm_at = |p: nn::Path, width: i64| {
            let weight = p.add("weight", Tensor::zeros([width], (kind, p.device())), trainable);
            Norm::new(weight, switches.norm_offset)
        };
        let norm = |name: &str| norm_at(path.sub(name), h);
        let attention = path.sub("self_attn");
        let qk_norms = switches
            .qk_norm
            .then(|| (norm_at(attention.sub("q_norm"), d), norm_at(attention.sub("k_norm"), d)));
        let feedforward_norms = switches.sandwich_norms.then(|| {
            (
                norm("pre_feedforward_layernorm"),
                norm("post_feedforward_layernorm"),
            )
        });
        let width = config.intermediate_size;
        let (qkv_bias, mlp_bias) = (switches.qkv_bias, switches.mlp_bias);
        DecoderLayer {
            input_norm: norm("input_layernorm"),
            q: linear(LoraTarget::Q, (heads * d, h), qkv_bias),
            k: linear(LoraTarget::K, (kv * d, h), qkv_bias),
            v: linear(LoraTarget::V, (kv * d, h), qkv_bias),
            o: linear(LoraTarget::O, (h, heads * d), switches.output_bias),
            qk_norms,
            post_attention_norm: norm("post_attention_layernorm"),
            feedforward_norms,
            gate: linear(LoraTarget::Gate, (width, h), mlp_bias),
            up: linear(LoraTarget::Up, (width, h), mlp_bias),
            down: linear(LoraTarget::Down, (h, width), mlp_bias),
            window: config.layer_window(index as usize),
        }
    }

    fn linears(&self) -> [(LoraTarget, &Linear); 7] {
        [
            (LoraTarget::Q, &self.q),
            (LoraTarget::K, &self.k),
            (LoraTarget::V, &self.v),
            (LoraTarget::O, &self.o),
            (LoraTarget::Gate, &self.gate),
            (LoraTarget::Up, &self.up),
            (LoraTarget::Down, &self.down),
        ]
    }

    /// `x + attn(norm(x))`, then `+ mlp(norm(·))` (Gemma 2: each branch's output normed too),
    /// for a padded batch or a packed row (whose flash kernel can fail, hence the `Result`).
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        context: &AttentionContext,
        train: bool,
    ) -> Result<Tensor> {
        let normed = self.input_norm.forward(x, context.config.rms_norm_eps);
        let attended = match &context.packed {
            Some(plan) => {
                let (q, k, v) = self.projections(&normed, context, train);
                let out = plan.attend(&q, &k, &v, self.window, self.scoring(context))?;
                self.o.forward(&out, train)
            }
            None => self.attention(&normed, context, train, None),
        };
        Ok(self.residual_and_mlp(x, attended, context, train))
    }

    /// [`forward`](Self::forward) for new positions of a padded batch whose predecessors'
    /// keys and values are in `cache` (which receives the new ones).
    pub(crate) fn forward_cached(
        &self,
        x: &Tensor,
        context: &AttentionContext,
        train: bool,
        cache: Option<&mut LayerCache>,
    ) -> Tensor {
        let eps = context.config.rms_norm_eps;
        let attended = self.attention(&self.input_norm.forward(x, eps), context, train, cache);
        self.residual_and_mlp(x, attended, context, train)
    }

    /// The residual connections around the attention output `attended` and the MLP.
    fn residual_and_mlp(
        &self,
        x: &Tensor,
        attended: Tensor,
        context: &AttentionContext,
        train: bool,
    ) -> Tensor {
        let eps = context.config.rms_norm_eps;
        let Some((pre_mlp, post_mlp)) = &self.feedforward_norms else {
            let x = x + attended;
            let mlp = self.mlp(&self.post_attention_norm.forward(&x, eps), context, train);
            return &x + mlp;
        };
        let x = x + self.post_attention_norm.forward(&attended, eps);
        let mlp = self.mlp(&pre_mlp.forward(&x, eps), context, train);
        &x + post_mlp.forward(&mlp, eps)
    }

    /// `down(act(gate(x)) ⊙ up(x))`.
    fn mlp(&self, x: &Tensor, context: &AttentionContext, train: bool) -> Tensor {
        let gate = self.gate.forward(x, train);
        let activated = match context.config.switches.activation {
            Activation::Silu => gate.silu(),
            Activation::GeluTanh => gate.gelu("tanh"),
            Activation::Gelu => gate.gelu("none"),
        };
        self.down.forward(&(activated * self.up.forward(x, train)), train)
    }

    /// How this model forms attention scores.
    fn scoring(&self, context: &AttentionContext) -> Scoring {
        Scoring {
            scale: context.config.switches.query_scale,
            softcap: context.config.switches.attention_softcap,
        }
    }

    /// Attention of a padded batch (with the cached keys and values before the new ones).
    fn attention(
        &self,
        x: &Tensor,
        context: &AttentionContext,
        train: bool,
        cache: Option<&mut LayerCache>,
    ) -> Tensor {
        let c = &context.config;
        let (n, t) = (x.size()[0], x.size()[1]);
        let (heads, d) = (c.num_attention_heads, c.head_width());
        let (q, mut k, mut v) = self.projections(x, context, train);
        if let Some(cache) = cache {
            let extend = |old: &Option<Tensor>, new: &Tensor| match old {
                Some(old) => Tensor::cat(&[old, new], 2),
                None => new.shallow_clone(),
            };
            (k, v) = (extend(&cache.keys, &k), extend(&cache.values, &v));
            (cache.keys, cache.values) = (Some(k.shallow_clone()), Some(v.shallow_clone()));
        }
        let out = attend(&q, &k, &v, context.mask_for(self.window), self.scoring(context));
        self.o.forward(
            &out.transpose(1, 2).contiguous().view([n, t, heads * d]),
            train,
        )
    }

    /// Queries `[N, heads, t, d]`, keys and values `[N, kv_heads, t, d]` of `x` `[N, t, H]`:
    /// projected, q/k-normed where the family norms them, rotated by the context's tables.
    fn projections(
        &self,
        x: &Tensor,
        context: &AttentionContext,
        train: bool,
    ) -> (Tensor, Tensor, Tensor) {
        let c = &context.config;
        let (n, t) = (x.size()[0], x.size()[1]);
        let (heads, kv, d) = (c.num_attention_heads, c.kv_heads(), c.head_width());
        let eps = c.rms_norm_eps;
        let split = |y: Tensor, count: i64, norm: Option<&Norm>| {
            let y = y.view([n, t, count, d]);
            let y = match norm {
                Some(norm) => norm.forward(&y, eps),
                None => y,
            };
            apply_rotary(&y.transpose(1, 2), &context.cos, &context.sin)
        };
        let (q_norm, k_norm) = match &self.qk_norms {
            Some((q, k)) => (Some(q), Some(k)),
            None => (None, None),
        };
        let q = split(self.q.forward(x, train), heads, q_norm);
        let k = split(self.k.forward(x, train), kv, k_norm);
        let v = self.v.forward(x, train).view([n, t, kv, d]).transpose(1, 2);
        (q, k, v)
    }
}
