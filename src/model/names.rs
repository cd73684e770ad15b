//! Where each of the model's parameters lives in a checkpoint. The model keeps one weight per
//! projection (so LoRA targets and recomputation are the same for every family); Phi-3's
//! checkpoints store q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj`, split here on
//! load and fused again on save.

use tch::Tensor;

use crate::model::ModelConfig;

/// The checkpoint tensor a parameter is read from, and which rows of it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Source {
    /// The checkpoint's tensor name.
    pub tensor: String,
    /// `(first row, rows, rows of the whole tensor)` when the parameter is part of a fused
    /// tensor.
    rows: Option<(i64, i64, i64)>,
}

impl Source {
    /// The shape the checkpoint stores, given the parameter's.
    pub fn stored_shape(&self, parameter: &[i64]) -> Vec<i64> {
        let mut shape = parameter.to_vec();
        if let (Some((_, _, total)), Some(first)) = (self.rows, shape.first_mut()) {
            *first = total;
        }
        shape
    }

    /// The parameter's part of the stored tensor.
    pub fn part(&self, stored: &Tensor) -> Tensor {
        match self.rows {
            Some((start, len, _)) => stored.narrow(0, start, len),
            None => stored.shallow_clone(),
        }
    }
}

/// The fused groups of a layer: `(fused name, [(part name, rows)])`.
fn fused_groups(config: &ModelConfig) -> [(&'static str, Vec<(&'static str, i64)>); 2] {
    let d = config.head_width();
    let (q, kv) = (config.num_attention_heads * d, config.kv_heads() * d);
    let width = config.intermediate_size;
    [
        (
            "self_attn.qkv_proj",
            vec![("self_attn.q_proj", q), ("self_attn.k_proj", kv), ("self_attn.v_proj", kv)],
        ),
        (
            "mlp.gate_up_proj",
            vec![("mlp.gate_proj", width), ("mlp.up_proj", width)],
        ),
    ]
}

/// Splits `model.layers.{i}.{module}.{leaf}` into `(prefix with the layer, module, leaf)`.
fn layer_parts(name: &str) -> Option<(&str, &str, &str)> {
    let rest = name.strip_prefix("model.layers.")?;
    let layer_end = rest.find('.')? + "model.layers.".len();
    let (prefix, module_and_leaf) = (&name[..layer_end], &name[layer_end + 1..]);
    let leaf_start = module_and_leaf.rfind('.')?;
    Some((
        prefix,
        &module_and_leaf[..leaf_start],
        &module_and_leaf[leaf_start + 1..],
    ))
}

/// Where parameter `name` is stored.
pub(crate) fn source(name: &str, config: &ModelConfig) -> Source {
    let plain = Source {
        tensor: name.to_string(),
        rows: None,
    };
    if !config.switches.fused_projections {
        return plain;
    }
    let Some((prefix, module, leaf)) = layer_parts(name) else {
        return plain;
    };
    for (fused, parts) in fused_groups(config) {
        let total: i64 = parts.iter().map(|(_, rows)| rows).sum();
        let mut start = 0;
        for (part, rows) in parts {
            if part == module {
                return Source {
                    tensor: format!("{prefix}.{fused}.{leaf}"),
                    rows: Some((start, rows, total)),
                };
            }
            start += rows;
        }
    }
    plain
}

/// The parameters under the checkpoint's names: fused projections concatenated again.
pub(crate) fn to_checkpoint(
    parameters: Vec<(String, Tensor)>,
    config: &ModelConfig,
) -> Vec<(String, Tensor)> {
    if !config.switches.fused_projections {
        return parameters;
    }
    let mut groups: std::collections::BTreeMap<String, Vec<(i64, Tensor)>> = Default::default();
    let mut tensors = Vec::new();
    for (name, tensor) in parameters {
        let source = source(&name, config);
        match source.rows {
            Some((start, _, _)) => groups.entry(source.tensor).or_default().push((start, tensor)),
            None => tensors.push((name, tensor)),
        }
    }
    for (name, mut parts) in groups {
        parts.sort_by_key(|(start, _)| *start);
        let parts: Vec<Tensor> = parts.into_iter().map(|(_, t)| t).collect();
        tensors.push((name, Tensor::cat(&parts, 0)));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
}
