//! Reward models: Hugging Face sequence-classification checkpoints
//! (`LlamaForSequenceClassification`, `MistralForSequenceClassification`,
//! `Qwen2ForSequenceClassification`, and the other supported families' classes) read as the
//! decoder plus a linear `score` head at each sequence's last non-padding token.

use std::path::Path;

use serde_json::Value;
use tch::{Device, Kind, Tensor};

use crate::error::{RefaError, Result};
use crate::model::{CausalLm, CheckpointReader, Family, ForwardOptions, ModelConfig, Padding};

/// The head's tensor in the checkpoint.
const SCORE: &str = "score.weight";

/// A sequence classifier of any supported [`Family`]: the decoder (token embedding, layers,
/// final norm; no LM head) and `score.weight` `[num_labels, H]` without bias, read at the
/// last non-padding token of each sequence, as transformers'
/// `GenericForSequenceClassification` (5.x) computes it. With `num_labels` = 1 this is a
/// reward model: its one logit is the reward.
#[derive(Debug)]
pub struct RewardModel {
    /// The decoder, built without an LM head.
    decoder: CausalLm,
    /// `[num_labels, H]`.
    score: Tensor,
    /// The checkpoint's config as read (the decoder's own copy marks the head as tied so that
    /// none is built).
    config: ModelConfig,
    labels: Vec<String>,
}

impl RewardModel {
    /// Loads a sequence-classification checkpoint folder (`config.json`, safetensors).
    ///
    /// `config.json` is read as a causal LM's ([`ModelConfig::from_json`]: unknown keys that
    /// could change the model are refused) after taking out `num_labels`, which only old files
    /// hold; the labels come from `id2label` (`num_labels` when it is the only one given,
    /// else 2 labels, transformers' default). `architectures`, when present, must name a
    /// `…ForSequenceClassification` class of the config's family.
    ///
    /// # Errors
    /// A causal LM's folder (an `lm_head.weight`, or `architectures` of a causal LM), a
    /// missing or misshaped `score.weight`, and everything [`CausalLm::from_pretrained`]
    /// refuses.
    pub fn from_pretrained(folder: impl AsRef<Path>, device: Device, kind: Kind) -> Result<Self> {
        let folder = folder.as_ref();
        let path = folder.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| RefaError::io(&path, &e))?;
        let (config, labels) = read_config(&text).map_err(|e| match e {
            RefaError::Config { message, .. } => RefaError::config(&path, message),
            other => other,
        })?;
        let reader = CheckpointReader::open(folder)?;
        if reader.names().any(|n| n == "lm_head.weight") {
            let problem = "is in a sequence-classification checkpoint: this folder holds a \
                           causal LM (load it with CausalLm::from_pretrained)";
            return Err(RefaError::checkpoint("lm_head.weight", problem));
        }
        let mut headless = config.clone();
        headless.tie_word_embeddings = true;
        let decoder = CausalLm::new(headless, device, kind, None)?;
        decoder.load_weights_beside(&reader, &[SCORE])?;
        let expected = vec![labels.len() as i64, config.hidden_size];
        let shape = reader.shape(SCORE)?;
        if shape != expected {
            let problem = format!(
                "has shape {shape:?}, expected [num_labels, hidden_size] = {expected:?} \
                 (num_labels from id2label)"
            );
            return Err(RefaError::checkpoint(SCORE, problem));
        }
        let score = reader.read(SCORE, device, kind)?;
        Ok(RewardModel {
            decoder,
            score,
            config,
            labels,
        })
    }

    /// The checkpoint's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The labels (`id2label` in id order); one for a reward model.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// The logits `[N, num_labels]` (f32) of `input_ids` `[N, T]` (i64) with
    /// `attention_mask` `[N, T]`, padded in any layout, read where transformers reads them:
    /// at the rightmost token that is not `pad_token_id` (position 0 for a row of padding
    /// only), so a sequence that ends with the pad id (a pad id shared with EOS) is read at
    /// the token before it. Without a `pad_token_id`, at the rightmost position the mask
    /// attends (transformers then takes the last position and refuses batches of more than
    /// one). Positions are the columns, as transformers numbers them without `position_ids`;
    /// rotary attention depends only on differences, so left padding changes nothing.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let options = ForwardOptions {
            padding: Padding::Any,
            ..ForwardOptions::default()
        };
        self.logits_with(input_ids, attention_mask, &options)
    }

    /// The logits `[N, num_labels]` of each of `sequences` (token ids, at least one each),
    /// `max_rows` at a time, each batch right-padded with the pad id (the EOS id when the
    /// config names none): [`forward`](Self::forward)'s values for the padded batch, and
    /// transformers' for each sequence alone.
    pub fn score_sequences(&self, sequences: &[Vec<i64>], max_rows: usize) -> Result<Vec<Vec<f64>>> {
        RefaError::require(max_rows >= 1, "max_rows", max_rows, ">= 1")?;
        let mut scores = Vec::with_capacity(sequences.len());
        for chunk in sequences.chunks(max_rows) {
            let (ids, mask) = self.right_padded(chunk)?;
            let logits = self.logits_with(&ids, &mask, &ForwardOptions::right_padded())?;
            let rows = Vec::<Vec<f64>>::try_from(logits.to_kind(Kind::Double).to_device(Device::Cpu))?;
            scores.extend(rows);
        }
        Ok(scores)
    }

    /// `sequences` as a right-padded batch `[N, T]` and its mask on the model's device.
    fn right_padded(&self, sequences: &[Vec<i64>]) -> Result<(Tensor, Tensor)> {
        if let Some(i) = sequences.iter().position(Vec::is_empty) {
            return Err(RefaError::ShapeMismatch {
                tensor: "sequence",
                actual: vec![0],
                expected: format!("at least one token (sequence {i})"),
            });
        }
        let width = sequences.iter().map(Vec::len).max().unwrap_or(1);
        let pad = self.config.pad_token_id.unwrap_or(self.config.eos_token_id);
        let mut ids = Vec::with_capacity(sequences.len() * width);
        let mut mask = Vec::with_capacity(sequences.len() * width);
        for sequence in sequences {
            let fill = width - sequence.len();
            ids.extend(sequence.iter().copied().chain(std::iter::repeat_n(pad, fill)));
            mask.extend(std::iter::repeat_n(1i64, sequence.len()).chain(std::iter::repeat_n(0, fill)));
        }
        let shape = [sequences.len() as i64, width as i64];
        let device = self.score.device();
        Ok((
            Tensor::from_slice(&ids).view(shape).to(device),
            Tensor::from_slice(&mask).view(shape).to(device),
        ))
    }

    fn logits_with(&self, input_ids: &Tensor, attention_mask: &Tensor, options: &ForwardOptions) -> Result<Tensor> {
        tch::no_grad(|| {
            let hidden = self.decoder.forward_pass(input_ids, attention_mask, options)?.hidden;
            let read = self.read_positions(input_ids, attention_mask);
            let rows = Tensor::arange(hidden.size()[0], (Kind::Int64, hidden.device()));
            let pooled = hidden.index(&[Some(rows), Some(read)]);
            Ok(pooled.matmul(&self.score.tr()).to_kind(Kind::Float))
        })
    }

    /// Per row, the position read: the rightmost non-pad token, else the rightmost attended.
    fn read_positions(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Tensor {
        let device = self.score.device();
        let (ids, mask) = (input_ids.to_device(device), attention_mask.to_device(device));
        let keep = match self.config.pad_token_id {
            Some(pad) => ids.ne(pad),
            None => mask.ne(0),
        };
        let index = Tensor::arange(ids.size()[1], (Kind::Int64, device)).unsqueeze(0);
        // argmax of index·keep: the rightmost kept position (0 when none is).
        (index * keep.to_kind(Kind::Int64)).argmax(-1, false)
    }
}

/// The causal LM's config of a classifier's `config.json`, and its labels.
fn read_config(text: &str) -> Result<(ModelConfig, Vec<String>)> {
    let mut raw: serde_json::Map<String, Value> =
        serde_json::from_str(text.trim_start_matches('\u{feff}')).map_err(|e| RefaError::config("config.json", e))?;
    let labels = labels(&raw)?;
    raw.remove("num_labels");
    let config = ModelConfig::from_json(&Value::Object(raw.clone()).to_string())?;
    check_architecture(&raw, config.family)?;
    Ok((config, labels))
}

/// The label names in id order, from `id2label` (or `num_labels` alone).
fn labels(raw: &serde_json::Map<String, Value>) -> Result<Vec<String>> {
    let count = raw.get("num_labels").and_then(Value::as_u64);
    let Some(Value::Object(map)) = raw.get("id2label") else {
        let n = count.unwrap_or(2) as usize;
        return Ok((0..n).map(|i| format!("LABEL_{i}")).collect());
    };
    let mut labels = vec![None; map.len()];
    for (key, name) in map {
        let id = key.parse::<usize>().ok().filter(|&i| i < map.len());
        let (Some(id), Some(name)) = (id, name.as_str()) else {
            let message = format!("`id2label` holds \"{key}\": {name}; expected ids 0..{} naming labels", map.len());
            return Err(RefaError::config("config.json", message));
        };
        labels[id] = Some(name.to_string());
    }
    let labels: Vec<String> = labels.into_iter().flatten().collect();
    if labels.is_empty() || count.is_some_and(|n| n as usize != labels.len()) {
        let message = format!(
            "`num_labels` = {count:?} and `id2label` ({} labels) disagree, or name no label",
            labels.len()
        );
        return Err(RefaError::config("config.json", message));
    }
    Ok(labels)
}

/// `architectures`, when given, names the family's sequence-classification class.
fn check_architecture(raw: &serde_json::Map<String, Value>, family: Family) -> Result<()> {
    let Some(classes) = raw.get("architectures").and_then(Value::as_array) else {
        return Ok(());
    };
    let wanted = family.causal_lm_class().replace("ForCausalLM", "ForSequenceClassification");
    if classes.iter().any(|c| c.as_str() == Some(&wanted)) {
        return Ok(());
    }
    let message = format!(
        "`architectures` = {classes:?} is not a reward model (a sequence classifier, \
         `{wanted}` for this `{}` checkpoint); a causal LM loads with CausalLm::from_pretrained",
        family.model_type()
    );
    Err(RefaError::config("config.json", message))
}
