//! Layer-wise activation recomputation: the choice ([`Recompute`]), the memory estimate it
//! rests on ([`activation_bytes`]) and the decision of [`Recompute::Auto`].

use crate::data::TokenizedExample;
use crate::model::CausalLm;
use crate::scoring::ScoringConfig;
use crate::train::config::TrainConfig;

/// Whether the decoder layers are recomputed in the backward pass (keeping only each
/// layer's input) or keep their activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "trainer", derive(clap::ValueEnum))]
pub enum Recompute {
    /// Recompute only when the activations of the largest micro-batch would not fit in half
    /// of the device's free memory (measured when the trainer starts, after the optimizer's
    /// state is allocated and less the gradients still to come; see [`activation_bytes`]).
    /// Default: recomputation costs about a third more compute.
    #[default]
    Auto,
    /// Always recompute (memory: one `[N, T, H]` tensor per layer).
    All,
    /// Never recompute.
    None,
}

/// Estimated bytes of the activations autograd keeps for one micro-batch of `tokens`
/// positions (padding included) without recomputation: per decoder layer and position, about
/// `12·H + 5·I` values (the two norms' inputs and outputs, queries, keys and values, the
/// rotary intermediates, attention output, residuals, and the MLP's gate, up, activation,
/// product and down input), in the model's kind. The chunked scorer adds `chunk_size × V`
/// f32 logits, counted too.
pub fn activation_bytes(model: &CausalLm, tokens: i64, scoring: &ScoringConfig) -> i64 {
    let c = model.config();
    let per_position = 12 * c.hidden_size + 5 * c.intermediate_size;
    let element = model.kind().elt_size_in_bytes() as i64;
    let layers = c.num_hidden_layers * tokens * per_position * element;
    layers + scoring.chunk_size * c.vocab_size * 4
}

/// Free memory where `device` lives: the driver's count for a GPU, `MemAvailable` of
/// `/proc/meminfo` for the CPU (None when unknown).
fn free_memory(device: tch::Device) -> Option<i64> {
    if device.is_cuda() {
        return crate::device::memory_stats(device)
            .ok()
            .flatten()
            .map(|s| s.free as i64);
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// [`Recompute::Auto`] decided against the largest micro-batch the data can form (the
/// longest sequence, padded, times the most responses, times the prompts per batch).
pub(super) fn resolve_recompute(
    model: &CausalLm,
    train: &[TokenizedExample],
    config: &TrainConfig,
) -> bool {
    if config.share_prompts {
        return false; // the shared pass keeps its layers in the graph
    }
    match config.recompute {
        Recompute::All => true,
        Recompute::None => false,
        Recompute::Auto => {
            let longest = train
                .iter()
                .flat_map(|e| &e.responses)
                .map(|r| (r.prompt.len() + r.response.len()) as i64)
                .max()
                .unwrap_or(0);
            let slots = train.iter().map(|e| e.responses.len()).max().unwrap_or(0) as i64;
            let tokens = config.prompts_per_batch as i64 * slots * longest;
            let needed = activation_bytes(model, tokens, &config.scoring);
            let device = model.lm_head_weight().device();
            recompute_needed(needed, gradient_bytes(model), free_memory(device))
        }
    }
}

/// Bytes the trainable parameters' gradients will take once the first backward pass has
/// allocated them (one tensor of each trainable parameter's size and kind).
fn gradient_bytes(model: &CausalLm) -> i64 {
    model
        .var_store()
        .trainable_variables()
        .iter()
        .map(|t| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64)
        .sum()
}

/// Auto recomputation's rule: recompute unless the activations fit in half of what stays
/// free once the gradients exist (the other half is headroom for the allocator's
/// fragmentation, the scorer's chunks and the backward pass's temporaries). Unknown free
/// memory recomputes.
fn recompute_needed(activations: i64, gradients: i64, free: Option<i64>) -> bool {
    free.is_none_or(|free| activations > (free - gradients) / 2)
}

#[cfg(test)]
mod recompute_tests {
    use super::recompute_needed;

    const GIB: i64 = 1 << 30;

    #[test]
    fn gradients_still_to_come_count_against_the_free_memory() {
        // Mistral-7B fully fine-tuned on a 140 GiB card: after weights, master copies and
        // moments, 45 GiB stay free; 14 GiB of bf16 gradients are still to come; 59 GiB of
        // activations without recomputation.
        assert!(recompute_needed(59 * GIB, 14 * GIB, Some(45 * GIB)));
        // The 0.85 B model: 3 GiB of activations, 120 GiB free.
        assert!(!recompute_needed(3 * GIB, 2 * GIB, Some(120 * GIB)));
        // Fits only if the gradients are forgotten.
        assert!(recompute_needed(20 * GIB, 10 * GIB, Some(45 * GIB)));
        assert!(!recompute_needed(20 * GIB, 0, Some(45 * GIB)));
        assert!(recompute_needed(GIB, 0, None));
    }
}
