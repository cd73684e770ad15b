//! The Mistral decoder, with Hugging Face's parameter names.

use std::path::Path;

use tch::nn::{self, VarStore};
use tch::{Device, Kind, Tensor};

use crate::error::{RefaError, Result};
use crate::mistral::checkpoint::{write_checkpoint, CheckpointFile, CheckpointReader, SaveOptions};
use crate::mistral::layers::{self, apply_rotary, rms_norm, Rotary};
use crate::mistral::lora::{Linear, LoraConfig, LoraTarget};
use crate::mistral::MistralConfig;

/// A Mistral causal LM (`MistralForCausalLM`): token embedding, decoder layers (RMSNorm,
/// grouped-query attention with rotary embeddings and an optional sliding window, SwiGLU MLP),
/// final norm and LM head.
///
/// Parameters live in a [`VarStore`] under Hugging Face's names
/// (`model.layers.3.self_attn.q_proj.weight`, …), so checkpoints load and save as they are.
/// With LoRA, the base weights are frozen and only the adapters are trainable variables.
#[derive(Debug)]
pub struct Mistral {
    config: MistralConfig,
    var_store: VarStore,
    embed: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    lm_head: Option<Tensor>,
    rotary: Rotary,
    kind: Kind,
}

#[derive(Debug)]
pub(crate) struct DecoderLayer {
    input_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    post_attention_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mistral {
    /// A model with zero weights of `kind` on `device` (load weights next, or initialize
    /// them with [`init_random`](Self::init_random)). With `lora`, adapters are attached to
    /// the targeted layers and only they are trainable; its settings are checked first
    /// ([`LoraConfig::validate`]).
    pub fn new(
        config: MistralConfig,
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
            .map(|i| DecoderLayer::new(&model.sub("layers").sub(i), &config, kind, lora))
            .collect();
        let norm = zeros(&model.sub("norm"), "weight", &[config.hidden_size]);
        let lm_head = (!config.tie_word_embeddings).then(|| {
            zeros(
                &root.sub("lm_head"),
                "weight",
                &[config.vocab_size, config.hidden_size],
            )
        });
        let rotary = Rotary::new(config.head_width(), config.rope_base(), device);
        Ok(Mistral {
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
        let config = MistralConfig::from_file(folder.join("config.json"))?;
        let model = Mistral::new(config, device, kind, lora)?;
        model.load_weights(&CheckpointReader::open(folder)?)?;
        Ok(model)
    }

    /// Random weights like Hugging Face's initialization (normal, σ = 0.02; norms at 1),
    /// drawn from libtorch's global generator after seeding it with `seed` (so concurrent
    /// draws on other threads would interleave with these).
    pub fn init_random(&self, seed: i64) {
        tch::manual_seed(seed);
        tch::no_grad(|| {
            for (name, mut tensor) in self.base_parameters() {
                if name.ends_with("norm.weight") {
                    let _ = tensor.fill_(1.0);
                } else {
                    tensor.copy_(&(tensor.randn_like() * 0.02));
                }
            }
        });
    }

    /// Copies every weight from `reader`. Every parameter must be present with its shape;
    /// a tensor the model does not know is an error too (rotary `inv_freq` buffers of old
    /// checkpoints, and a tied `lm_head.weight`, are skipped).
    pub fn load_weights(&self, reader: &CheckpointReader) -> Result<()> {
        let parameters = self.base_parameters();
        let known: std::collections::HashSet<&str> =
            parameters.iter().map(|(n, _)| n.as_str()).collect();
        let tied_head = self.config.tie_word_embeddings;
        if let Some(extra) = reader.names().find(|name| {
            !known.contains(name)
                && !name.ends_with("rotary_emb.inv_freq")
                && (!tied_head || *name != "lm_head.weight")
        }) {
            return Err(RefaError::checkpoint(
                extra,
                "is in the checkpoint but not in the model (wrong architecture?)",
            ));
        }
        for (name, mut target) in parameters {
            let shape = reader.shape(&name)?;
            if shape != target.size() {
                return Err(RefaError::checkpoint(
                    &name,
                    format!("has shape {shape:?}, the model expects {:?}", target.size()),
                ));
            }
            let source = reader.read(&name, target.device(), target.kind())?;
            tch::no_grad(|| target.f_copy_(&source))?;
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
        write_checkpoint(folder, &self.merged_parameters(), &extra_files, options)
    }

    /// The configuration.
    pub fn config(&self) -> &MistralConfig {
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
    ) -> Tensor {
        let seeds = layer_seeds(self.layers.len(), train);
        let x = self.layers.iter().zip(seeds).fold(x, |x, (layer, seed)| {
            seed_dropout(seed);
            layer.forward(&x, context, train)
        });
        rms_norm(&x, &self.norm, self.config.rms_norm_eps)
    }

    /// Logits `[N, T, V]` from hidden states (materializes `N·T·V` values: prefer the
    /// chunked scorer for training).
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        hidden.matmul(&self.lm_head_weight().tr())
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
        let mask = layers::attention_mask(&valid, self.config.sliding_window, right_padded);
        // Without a mask, the whole sequence attends causally.
        let causal = mask.is_none();
        let context = AttentionContext {
            cos,
            sin,
            mask,
            causal,
            config: self.config.clone(),
        };
        Ok((self.embed_tokens(input_ids)?, context))
    }

    /// Rotary tables for positions `offset..offset + count`.
    pub(crate) fn rotary_tables(&self, offset: i64, count: i64) -> (Tensor, Tensor) {
        let (cos, sin) = self.rotary.cos_sin(offset + count, self.kind);
        (cos.narrow(0, offset, count), sin.narrow(0, offset, count))
    }

    /// Embeddings `[N, t, H]` of token ids `[N, t]`; an id outside the vocabulary is an
    /// error, not a crash.
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
        Ok(rows.view([shape[0], shape[1], self.config.hidden_size]))
    }

    /// The decoder layers, for the recomputing forward pass.
    pub(crate) fn decoder_layers(
        &self,
    ) -> impl DoubleEndedIterator<Item = &DecoderLayer> + ExactSizeIterator {
        self.layers.iter()
    }

    /// Final norm.
    pub(crate) fn final_norm(&self, x: &Tensor) -> Tensor {
        rms_norm(x, &self.norm, self.config.rms_norm_eps)
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

/// How [`Mistral::forward_pass`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ForwardOptions {
    /// LoRA dropout on (training). Default false.
    pub train: bool,
    /// Keep only each decoder layer's input and recompute the layer in the backward pass
    /// ([`crate::mistral::ForwardPass::finish_backward`]). Default false.
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

/// What every layer of one forward pass shares.
#[derive(Debug)]
pub(crate) struct AttentionContext {
    pub cos: Tensor,
    pub sin: Tensor,
    /// `[N or 1, 1, t, T]` (true = may attend), or `None` for plain (causal or full) attention.
    pub mask: Option<Tensor>,
    /// Without a mask: causal attention (a whole sequence) or full (one new token).
    pub causal: bool,
    pub config: MistralConfig,
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
    fn new(path: &nn::Path, config: &MistralConfig, kind: Kind, lora: Option<&LoraConfig>) -> Self {
        let (h, d) = (config.hidden_size, config.head_width());
        let (heads, kv) = (config.num_attention_heads, config.kv_heads());
        let trainable = lora.is_none();
        let linear = |target: LoraTarget, out: i64, inp: i64| {
            let mut p = path.clone();
            for part in target_path(target).split('.') {
                p = p.sub(part);
            }
            let adapter = lora.filter(|l| l.targets.contains(&target));
            Linear::new(&p, out, inp, kind, trainable, adapter)
        };
        let norm = |name: &str| {
            path.sub(name).add(
                "weight",
                Tensor::zeros([h], (kind, path.device())),
                trainable,
            )
        };
        DecoderLayer {
            input_norm: norm("input_layernorm"),
            q: linear(LoraTarget::Q, heads * d, h),
            k: linear(LoraTarget::K, kv * d, h),
            v: linear(LoraTarget::V, kv * d, h),
            o: linear(LoraTarget::O, h, heads * d),
            post_attention_norm: norm("post_attention_layernorm"),
            gate: linear(LoraTarget::Gate, config.intermediate_size, h),
            up: linear(LoraTarget::Up, config.intermediate_size, h),
            down: linear(LoraTarget::Down, h, config.intermediate_size),
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

    /// `x + attn(norm(x))`, then `+ mlp(norm(·))`.
    pub(crate) fn forward(&self, x: &Tensor, context: &AttentionContext, train: bool) -> Tensor {
        self.forward_cached(x, context, train, None)
    }

    /// [`forward`](Self::forward) for new positions whose predecessors' keys and values are
    /// in `cache` (which receives the new ones).
    pub(crate) fn forward_cached(
        &self,
        x: &Tensor,
        context: &AttentionContext,
        train: bool,
        cache: Option<&mut LayerCache>,
    ) -> Tensor {
        let eps = context.config.rms_norm_eps;
        let x = x + self.attention(&rms_norm(x, &self.input_norm, eps), context, train, cache);
        let normed = rms_norm(&x, &self.post_attention_norm, eps);
        let gated = self.gate.forward(&normed, train).silu() * self.up.forward(&normed, train);
        &x + self.down.forward(&gated, train)
    }

    fn attention(
        &self,
        x: &Tensor,
        context: &AttentionContext,
        train: bool,
        cache: Option<&mut LayerCache>,
    ) -> Tensor {
        let c = &context.config;
        let (n, t) = (x.size()[0], x.size()[1]);
        let (heads, kv, d) = (c.num_attention_heads, c.kv_heads(), c.head_width());
        let split = |y: Tensor, count: i64| y.view([n, t, count, d]).transpose(1, 2);
        let q = apply_rotary(
            &split(self.q.forward(x, train), heads),
            &context.cos,
            &context.sin,
        );
        let mut k = apply_rotary(
            &split(self.k.forward(x, train), kv),
            &context.cos,
            &context.sin,
        );
        let mut v = split(self.v.forward(x, train), kv);
        if let Some(cache) = cache {
            let extend = |old: &Option<Tensor>, new: &Tensor| match old {
                Some(old) => Tensor::cat(&[old, new], 2),
                None => new.shallow_clone(),
            };
            (k, v) = (extend(&cache.keys, &k), extend(&cache.values, &v));
            (cache.keys, cache.values) = (Some(k.shallow_clone()), Some(v.shallow_clone()));
        }
        // Without a mask the flash kernel shares each key/value head among its query heads
        // in place; with one, the kernels that take masks need the heads repeated.
        let groups = heads / kv;
        let share_heads = groups > 1 && context.mask.is_none();
        let repeat = |y: Tensor| {
            if groups == 1 || share_heads {
                y
            } else {
                y.repeat_interleave_self_int(groups, 1, None)
            }
        };
        let (k, v) = (repeat(k), repeat(v));
        let out = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            context.mask.as_ref(),
            0.0,
            context.causal,
            None,
            share_heads,
        );
        self.o.forward(
            &out.transpose(1, 2).contiguous().view([n, t, heads * d]),
            train,
        )
    }
}
