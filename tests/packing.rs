//! Packed micro-batches (`CausalLm::forward_packed`): the hidden states of every sequence's
//! tokens, and every weight's gradient through them, equal the padded path's (f32, CPU,
//! 1e-5) for the families' switches (Mistral with a binding sliding window, Gemma 2's
//! soft-capped attention and alternating windows, Qwen2's per-layer windows, Qwen3's q/k
//! norms, Phi-3 with full and partial rotary), with layer recomputation and with LoRA; prefix
//! sharing on the packed row equals the plain layout; the flash kernel's entry point answers
//! CPU tensors with an error; the CUDA checks run only where a GPU is present.
#![cfg(feature = "model")]

use std::path::{Path, PathBuf};

use refa_loss::model::{
    flash_attention_varlen, CausalLm, ForwardOptions, LoraConfig, PackedBatch, PackedKernel,
    VarlenArgs,
};
use refa_loss::scoring::{ChunkedScorer, ScoringConfig};
use refa_loss::RefaError;
use tch::{Device, Kind, Tensor};

/// The fixture variants and what each exercises.
const VARIANTS: &[&str] = &[
    "mistral",       // sliding window 48 on every layer: binds for the longer sequences
    "gemma2",        // soft-capped attention, window 32 on alternate layers, sandwich norms
    "qwen2_sliding", // windows on some layers only, q/k/v biases
    "qwen3",         // q/k norms
    "phi3",          // fused projections split on load
    "phi3_partial",  // partial rotary
];

/// Ragged lengths with an empty slot and sequences longer than every window.
const LENGTHS: &[usize] = &[70, 5, 0, 33, 1, 52];

/// A fixture folder: under `REFA_FIXTURES` when set (the GPU machine's copy, see
/// `scripts/gpu-bench --build`), else the repository's `tests/fixtures/families`.
fn fixture(variant: &str) -> PathBuf {
    std::env::var_os("REFA_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/families"))
        .join(variant)
}

fn load(variant: &str, lora: Option<&LoraConfig>, device: Device, kind: Kind) -> CausalLm {
    let model = CausalLm::from_pretrained(fixture(variant), device, kind, lora).expect("model");
    // Move LoRA's B off zero so that the adapters change the model and get gradients in A.
    tch::no_grad(|| {
        for (name, mut t) in model.adapter_parameters() {
            if name.contains("lora_B") {
                tch::manual_seed(name.len() as i64);
                t.copy_(&(t.randn_like() * 0.05));
            }
        }
    });
    model
}

/// Deterministic token ids in `[3, vocab)`.
fn sequences(lengths: &[usize], vocab: i64, seed: u64) -> Vec<Vec<i64>> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        3 + ((state >> 33) as i64) % (vocab - 3)
    };
    lengths
        .iter()
        .map(|&n| (0..n).map(|_| next()).collect())
        .collect()
}

/// Right-padded `(input_ids, attention_mask)` `[N, T]`, T the longest length (at least 1).
fn padded(sequences: &[Vec<i64>]) -> (Tensor, Tensor) {
    let width = sequences.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let (mut ids, mut mask) = (
        vec![0i64; sequences.len() * width],
        vec![0i64; sequences.len() * width],
    );
    for (n, s) in sequences.iter().enumerate() {
        ids[n * width..n * width + s.len()].copy_from_slice(s);
        mask[n * width..n * width + s.len()].fill(1);
    }
    let grid = |v: &[i64]| Tensor::from_slice(v).view([sequences.len() as i64, width as i64]);
    (grid(&ids), grid(&mask))
}

fn slices(sequences: &[Vec<i64>]) -> Vec<&[i64]> {
    sequences.iter().map(Vec::as_slice).collect()
}

fn relative_error(actual: &Tensor, expected: &Tensor) -> f64 {
    let scale = expected.abs().max().double_value(&[]).max(1e-12);
    (actual - expected).abs().max().double_value(&[]) / scale
}

/// Runs `forward` (which returns the hidden states in the padded layout and what finishes
/// the backward pass), back-propagates `Σ hidden ⊙ probe` and returns the probed hidden
/// states and every trainable variable's gradient, by name.
fn probe_gradients<'a>(
    model: &CausalLm,
    probe: &Tensor,
    forward: impl FnOnce() -> (Tensor, Box<dyn FnOnce() + 'a>),
) -> (Tensor, Vec<(String, Tensor)>) {
    zero_gradients(model);
    let (hidden, finish) = forward();
    (&hidden * probe).sum(Kind::Float).backward();
    finish();
    let mut grads: Vec<(String, Tensor)> = model
        .var_store()
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad() && t.grad().defined())
        .map(|(n, t)| (n, t.grad().copy()))
        .collect();
    grads.sort_by(|a, b| a.0.cmp(&b.0));
    ((hidden * probe.ne(0.0)).detach(), grads)
}

fn zero_gradients(model: &CausalLm) {
    for t in model.var_store().trainable_variables() {
        let mut g = t.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}

/// Asserts values and gradients agree within `tolerance` (gradients relative to their
/// largest magnitude, at least 1) and that the same weights got gradients (all but an
/// untied LM head, which hidden states do not reach).
fn assert_same(
    what: &str,
    (values, grads): &(Tensor, Vec<(String, Tensor)>),
    (expected_values, expected_grads): &(Tensor, Vec<(String, Tensor)>),
    tolerance: f64,
) -> f64 {
    let error = relative_error(values, expected_values);
    assert!(
        error <= tolerance,
        "{what}: hidden states differ by {error:e}"
    );
    let names = |g: &[(String, Tensor)]| g.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(
        names(grads),
        names(expected_grads),
        "{what}: the weights with gradients"
    );
    assert!(!grads.is_empty(), "{what}: no gradient at all");
    let mut worst = error;
    for ((name, a), (_, b)) in grads.iter().zip(expected_grads) {
        let scale = b.abs().max().double_value(&[]).max(1.0);
        let error = (a - b).abs().max().double_value(&[]) / scale;
        assert!(
            error <= tolerance,
            "{what}, {name}: gradients differ by {error:e}"
        );
        worst = worst.max(error);
    }
    worst
}

/// A random probe `[N, T, H]`, zero at padding positions.
fn probe_for(mask: &Tensor, hidden_size: i64, seed: i64) -> Tensor {
    tch::manual_seed(seed);
    let shape = mask.size();
    Tensor::randn(
        [shape[0], shape[1], hidden_size],
        (Kind::Float, Device::Cpu),
    ) * mask.to_kind(Kind::Float).unsqueeze(2)
}

/// The padded pass's and the packed pass's probed hidden states and gradients.
fn padded_and_packed(
    model: &CausalLm,
    sequences: &[Vec<i64>],
    recompute: bool,
    kernel: PackedKernel,
) -> [(Tensor, Vec<(String, Tensor)>); 2] {
    let (ids, mask) = padded(sequences);
    let probe = probe_for(&mask, model.config().hidden_size, 5).to_device(device_of(model));
    let options = ForwardOptions {
        recompute,
        ..ForwardOptions::default()
    };
    let plain = probe_gradients(model, &probe, || {
        let pass = model
            .forward_pass(
                &ids.to_device(device_of(model)),
                &mask.to_device(device_of(model)),
                &options,
            )
            .expect("padded pass");
        let hidden = pass.hidden.shallow_clone();
        (
            hidden,
            Box::new(move || pass.finish_backward(model).expect("finish")),
        )
    });
    let batch = PackedBatch::from_sequences(&slices(sequences), device_of(model))
        .expect("packed batch")
        .with_kernel(kernel);
    let packed = probe_gradients(model, &probe, || {
        let pass = model.forward_packed(&batch, &options).expect("packed pass");
        let hidden = batch.unpack(&pass.hidden).expect("unpack");
        (
            hidden,
            Box::new(move || pass.finish_backward(model).expect("finish")),
        )
    });
    [plain, packed]
}

fn device_of(model: &CausalLm) -> Device {
    model.lm_head_weight().device()
}

/// The packed row's hidden states and every weight's gradient equal the padded path's, for
/// every family's switches, with and without recomputation.
#[test]
fn packed_equals_padded_for_every_family() {
    for variant in VARIANTS {
        let model = load(variant, None, Device::Cpu, Kind::Float);
        let data = sequences(LENGTHS, model.config().vocab_size, 1);
        for recompute in [false, true] {
            let [plain, packed] = padded_and_packed(&model, &data, recompute, PackedKernel::Auto);
            let worst = assert_same(
                &format!("{variant}, recompute {recompute}"),
                &packed,
                &plain,
                1e-5,
            );
            println!("{variant} recompute={recompute}: worst relative difference {worst:.1e}");
        }
    }
}

/// With LoRA adapters (the base frozen), the adapters' gradients through the packed row
/// equal the padded path's, with and without recomputation.
#[test]
fn packed_equals_padded_with_lora() {
    let lora = LoraConfig {
        rank: 4,
        dropout: 0.0,
        ..LoraConfig::default()
    };
    for variant in ["mistral", "gemma2", "phi3_partial"] {
        let model = load(variant, Some(&lora), Device::Cpu, Kind::Float);
        assert!(!model.var_store().trainable_variables().is_empty());
        let data = sequences(LENGTHS, model.config().vocab_size, 2);
        for recompute in [false, true] {
            let [plain, packed] = padded_and_packed(&model, &data, recompute, PackedKernel::Auto);
            let worst = assert_same(
                &format!("{variant} LoRA, recompute {recompute}"),
                &packed,
                &plain,
                1e-5,
            );
            println!("{variant} LoRA recompute={recompute}: worst relative difference {worst:.1e}");
        }
    }
}

/// Packing a right-padded batch on the device gives the batch packed from the sequences,
/// and the chunked scorer reads the unpacked hidden states as it reads the padded ones.
#[test]
fn right_padded_packing_and_scoring() {
    let model = load("mistral", None, Device::Cpu, Kind::Float);
    let data = sequences(LENGTHS, model.config().vocab_size, 3);
    let (ids, mask) = padded(&data);
    let lengths: Vec<i64> = data.iter().map(|s| s.len() as i64).collect();
    let from_padded = PackedBatch::from_right_padded(&ids, &lengths).expect("from padded");
    let from_sequences = PackedBatch::from_sequences(&slices(&data), Device::Cpu).expect("packed");
    assert_eq!(from_padded.input_ids(), from_sequences.input_ids());
    assert_eq!(from_padded.positions(), from_sequences.positions());
    assert_eq!(from_padded.total(), lengths.iter().sum::<i64>());
    assert_eq!(from_padded.unpacked_shape(), (6, 70));
    assert_eq!(from_padded.segment_count(), 5);
    // Labels: the second half of each sequence is its response.
    let labels = ids.copy();
    for (n, &len) in lengths.iter().enumerate() {
        let _ = labels.get(n as i64).narrow(0, 0, len / 2).fill_(-100);
    }
    let labels = labels.where_self(&mask.ne(0), &Tensor::from(-100i64));
    let scoring = ScoringConfig::new(model.config().eos_token_id);
    let score = |hidden: &Tensor| {
        let head = model.lm_head_weight().detach();
        let mut scorer = ChunkedScorer::new(hidden, &head, &labels, &scoring).expect("scorer");
        scorer.forward().logp_sum.detach()
    };
    let plain = tch::no_grad(|| {
        let hidden = model.forward(&ids, &mask, false).expect("padded");
        score(&hidden)
    });
    let packed = tch::no_grad(|| {
        let pass = model
            .forward_packed(&from_padded, &ForwardOptions::default())
            .expect("packed");
        score(&from_padded.unpack(&pass.hidden).expect("unpack"))
    });
    assert!(
        relative_error(&packed, &plain) < 1e-5,
        "{packed:?} vs {plain:?}"
    );
}

/// Prompts and responses for the shared layout: 2 prompts × 3 responses, one slot empty.
fn shared_data(vocab: i64) -> (Vec<Vec<i64>>, Vec<Vec<i64>>) {
    let prompts = sequences(&[30, 9], vocab, 4);
    let responses = sequences(&[40, 3, 25, 12, 0, 55], vocab, 5);
    (prompts, responses)
}

/// Prefix sharing on the packed row: the hidden states that score each response (the
/// prompt's last token, then the response's) and every weight's gradient equal those of the
/// padded plain layout over prompt + response, with and without recomputation.
#[test]
fn shared_prompts_equal_the_plain_layout() {
    for variant in ["mistral", "gemma2", "qwen2_sliding", "phi3_partial"] {
        let model = &load(variant, None, Device::Cpu, Kind::Float);
        let (prompts, responses) = shared_data(model.config().vocab_size);
        let per_prompt = responses.len() / prompts.len();
        let full: Vec<Vec<i64>> = responses
            .iter()
            .enumerate()
            .map(|(r, response)| [prompts[r / per_prompt].clone(), response.clone()].concat())
            .collect();
        let (ids, mask) = padded(&full);
        let width = 1 + responses.iter().map(Vec::len).max().unwrap() as i64;
        // Shared position t of row r is full position prompt_len − 1 + t: probe the positions
        // that score the response (the prompt's last, and each response token but its last).
        let rows = responses.len() as i64;
        let (mut index, mut read) = (
            vec![0i64; (rows * width) as usize],
            vec![0f32; (rows * width) as usize],
        );
        for (r, response) in responses.iter().enumerate() {
            let prompt = prompts[r / per_prompt].len();
            for t in 0..response.len() {
                index[r * width as usize + t] = (prompt - 1 + t) as i64;
                read[r * width as usize + t] = 1.0;
            }
        }
        let hidden_size = model.config().hidden_size;
        let index = Tensor::from_slice(&index)
            .view([rows, width, 1])
            .expand([rows, width, hidden_size], false);
        tch::manual_seed(9);
        let probe = Tensor::randn([rows, width, hidden_size], (Kind::Float, Device::Cpu))
            * Tensor::from_slice(&read).view([rows, width, 1]);
        for recompute in [false, true] {
            let options = ForwardOptions {
                recompute,
                ..ForwardOptions::default()
            };
            let plain = probe_gradients(model, &probe, || {
                let pass = model.forward_pass(&ids, &mask, &options).expect("plain");
                let hidden = pass.hidden.gather(1, &index, false);
                (
                    hidden,
                    Box::new(move || pass.finish_backward(model).expect("finish")),
                )
            });
            let batch = PackedBatch::with_shared_prompts(
                &slices(&prompts),
                &slices(&responses),
                Device::Cpu,
            )
            .expect("shared batch");
            assert_eq!(batch.unpacked_shape(), (rows, width));
            assert_eq!(batch.total(), 39 + 135);
            let shared = probe_gradients(model, &probe, || {
                let pass = model.forward_packed(&batch, &options).expect("shared");
                let hidden = batch.unpack(&pass.hidden).expect("unpack");
                (
                    hidden,
                    Box::new(move || pass.finish_backward(model).expect("finish")),
                )
            });
            let worst = assert_same(
                &format!("{variant} shared, recompute {recompute}"),
                &shared,
                &plain,
                1e-5,
            );
            println!(
                "{variant} shared recompute={recompute}: worst relative difference {worst:.1e}"
            );
        }
    }
}

/// The flash kernel's entry point answers CPU tensors with a typed error (the C++ exception
/// caught at the boundary), and so does a packed pass that insists on it; soft-capped
/// attention refuses it by name.
#[test]
fn the_flash_kernel_refuses_the_cpu_cleanly() {
    let q = Tensor::randn([6, 4, 16], (Kind::BFloat16, Device::Cpu));
    let kv = Tensor::randn([6, 2, 16], (Kind::BFloat16, Device::Cpu));
    let cum = Tensor::from_slice(&[0i32, 2, 6]);
    let args = VarlenArgs {
        cum_q: &cum,
        cum_k: &cum,
        max_q: 4,
        max_k: 4,
        causal: true,
        scale: None,
        window_left: None,
    };
    match flash_attention_varlen(&q, &kv, &kv, &args) {
        Err(RefaError::Torch { message, .. }) => {
            assert!(message.contains("CUDA only"), "{message}")
        }
        other => panic!("expected a libtorch error, got {other:?}"),
    }
    let model = load("mistral", None, Device::Cpu, Kind::Float);
    let data = sequences(&[7, 3], model.config().vocab_size, 6);
    let batch = PackedBatch::from_sequences(&slices(&data), Device::Cpu)
        .expect("batch")
        .with_kernel(PackedKernel::Flash);
    assert_eq!(
        model.packed_kernel(&batch).expect("kernel"),
        PackedKernel::Flash
    );
    match model.forward_packed(&batch, &ForwardOptions::default()) {
        Err(RefaError::Torch { message, .. }) => assert!(message.contains("CUDA"), "{message}"),
        other => panic!("expected a libtorch error, got {other:?}"),
    }
    let auto = PackedBatch::from_sequences(&slices(&data), Device::Cpu).expect("batch");
    assert_eq!(
        model.packed_kernel(&auto).expect("kernel"),
        PackedKernel::Segments
    );
    let gemma = load("gemma2", None, Device::Cpu, Kind::Float);
    let capped = PackedBatch::from_sequences(&slices(&data), Device::Cpu)
        .expect("batch")
        .with_kernel(PackedKernel::Flash);
    let error = gemma
        .forward_packed(&capped, &ForwardOptions::default())
        .unwrap_err();
    assert!(matches!(error, RefaError::InvalidSetting { .. }), "{error}");
    assert!(error.to_string().contains("soft cap"), "{error}");
}

/// Malformed batches are typed errors that name the argument.
#[test]
fn bad_packed_batches_are_refused() {
    let ids = Tensor::zeros([2, 5], (Kind::Int64, Device::Cpu));
    let shape = PackedBatch::from_right_padded(&ids, &[3]).unwrap_err();
    assert!(
        matches!(
            shape,
            RefaError::ShapeMismatch {
                tensor: "input_ids",
                ..
            }
        ),
        "{shape}"
    );
    let long = PackedBatch::from_right_padded(&ids, &[3, 6]).unwrap_err();
    assert!(
        matches!(
            long,
            RefaError::InvalidSetting {
                name: "lengths",
                ..
            }
        ),
        "{long}"
    );
    let empty = PackedBatch::from_sequences(&[&[], &[]], Device::Cpu).unwrap_err();
    assert!(
        matches!(
            empty,
            RefaError::InvalidSetting {
                name: "sequences",
                ..
            }
        ),
        "{empty}"
    );
    let uneven =
        PackedBatch::with_shared_prompts(&[&[1, 2], &[3]], &[&[4], &[5], &[6]], Device::Cpu)
            .unwrap_err();
    assert!(
        matches!(
            uneven,
            RefaError::InvalidSetting {
                name: "responses",
                ..
            }
        ),
        "{uneven}"
    );
    let no_prompt =
        PackedBatch::with_shared_prompts(&[&[1, 2], &[]], &[&[4], &[5]], Device::Cpu).unwrap_err();
    assert!(
        matches!(
            no_prompt,
            RefaError::InvalidSetting {
                name: "prompts",
                ..
            }
        ),
        "{no_prompt}"
    );
    let batch = PackedBatch::from_sequences(&[&[4, 5, 6], &[7]], Device::Cpu).expect("batch");
    let wrong = batch
        .unpack(&Tensor::zeros([2, 4, 8], (Kind::Float, Device::Cpu)))
        .unwrap_err();
    assert!(
        matches!(
            wrong,
            RefaError::ShapeMismatch {
                tensor: "hidden",
                ..
            }
        ),
        "{wrong}"
    );
    let model = load("mistral", None, Device::Cpu, Kind::Float);
    let outside = PackedBatch::from_sequences(&[&[4, 500]], Device::Cpu).expect("batch");
    let error = model
        .forward_packed(&outside, &ForwardOptions::default())
        .unwrap_err();
    assert!(
        error.to_string().contains("outside the vocabulary"),
        "{error}"
    );
}

/// On a GPU: the flash kernel's values and gradients equal the block-diagonal path's within
/// bf16 rounding (plain packing and shared prompts, a binding window, grouped-query heads).
/// Skipped without CUDA.
#[test]
fn cuda_flash_kernel_equals_the_block_diagonal_path() {
    if !refa_loss::device::cuda_is_available() {
        eprintln!("skipped: no CUDA device");
        return;
    }
    let device = Device::Cuda(0);
    for variant in ["mistral", "qwen3"] {
        let model = load(variant, None, device, Kind::BFloat16);
        let data = sequences(LENGTHS, model.config().vocab_size, 7);
        let batch = PackedBatch::from_sequences(&slices(&data), device).expect("batch");
        assert_eq!(
            model.packed_kernel(&batch).expect("kernel"),
            PackedKernel::Flash
        );
        let [segments, flash] = [PackedKernel::Segments, PackedKernel::Flash].map(|kernel| {
            let [_, packed] = padded_and_packed(&model, &data, false, kernel);
            packed
        });
        let to_f32 = |(v, g): (Tensor, Vec<(String, Tensor)>)| {
            let g = g
                .into_iter()
                .map(|(n, t)| (n, t.to_kind(Kind::Float)))
                .collect();
            (v.to_kind(Kind::Float), g)
        };
        let worst = assert_same(
            &format!("{variant} flash"),
            &to_f32(flash),
            &to_f32(segments),
            5e-2,
        );
        println!("{variant} flash vs block-diagonal (bf16): worst relative difference {worst:.1e}");
        let (prompts, responses) = shared_data(model.config().vocab_size);
        let run = |kernel: PackedKernel| {
            zero_gradients(&model);
            let batch =
                PackedBatch::with_shared_prompts(&slices(&prompts), &slices(&responses), device)
                    .expect("shared")
                    .with_kernel(kernel);
            let pass = model
                .forward_packed(&batch, &ForwardOptions::default())
                .expect("forward");
            let hidden = batch
                .unpack(&pass.hidden)
                .expect("unpack")
                .to_kind(Kind::Float);
            hidden.square().sum(Kind::Float).backward();
            let grads: Vec<Tensor> = model
                .var_store()
                .trainable_variables()
                .iter()
                .filter(|t| t.grad().defined())
                .map(|t| t.grad().to_kind(Kind::Float))
                .collect();
            (hidden.detach(), grads)
        };
        let (a, ga) = run(PackedKernel::Flash);
        let (b, gb) = run(PackedKernel::Segments);
        // Padding positions copy packed position 0 in both layouts.
        assert!(relative_error(&a, &b) < 5e-2, "{variant} shared values");
        for (x, y) in ga.iter().zip(&gb) {
            let scale = y.abs().max().double_value(&[]).max(1.0);
            let error = (x - y).abs().max().double_value(&[]) / scale;
            assert!(error < 5e-2, "{variant} shared gradients: {error:e}");
        }
    }
}

/// The trainer's examples pack in its collation's row order: the unpacked layouts have the
/// collated labels' shapes, and the plain packing equals packing the collated ids.
#[cfg(feature = "trainer")]
#[test]
fn examples_pack_in_the_collation_order() {
    use refa_loss::data::{collate, collate_shared, TokenizedExample};
    use refa_loss::model::Encoded;
    let encoded = |prompt: &[i64], response: &[i64]| Encoded {
        prompt: prompt.to_vec(),
        response: response.to_vec(),
    };
    let first = TokenizedExample {
        responses: vec![
            encoded(&[1, 5, 6], &[7, 8, 2]),
            encoded(&[1, 5, 6], &[9, 2]),
        ],
        rewards: vec![1.0, 0.0],
    };
    let second = TokenizedExample {
        responses: vec![
            encoded(&[1, 4], &[3, 3, 3, 3, 2]),
            encoded(&[1, 4], &[2]),
            encoded(&[1, 4], &[10, 11, 2]),
        ],
        rewards: vec![0.0, 1.0, 0.5],
    };
    let examples = [&first, &second];
    let collated = collate(&examples, 0, Device::Cpu);
    let lengths: Vec<i64> = collated
        .attention_mask
        .sum_dim_intlist(1, false, Kind::Int64)
        .iter::<i64>()
        .expect("lengths")
        .collect();
    let packed = PackedBatch::from_examples(&examples, Device::Cpu).expect("packed");
    let expected = PackedBatch::from_right_padded(&collated.input_ids, &lengths).expect("padded");
    assert_eq!(packed.input_ids(), expected.input_ids());
    let (n, t) = packed.unpacked_shape();
    assert_eq!(vec![n, t], collated.labels.size());
    let shared = PackedBatch::shared_from_examples(&examples, Device::Cpu).expect("shared");
    let collated_shared = collate_shared(&examples, 0, Device::Cpu).expect("collate_shared");
    let (n, t) = shared.unpacked_shape();
    assert_eq!(vec![n, t], collated_shared.labels.size());
    assert_eq!(shared.total(), 3 + 2 + 5 + 5 + 1 + 3);
    let mixed = TokenizedExample {
        responses: vec![encoded(&[1, 5], &[2]), encoded(&[1, 6], &[2])],
        rewards: vec![0.0, 1.0],
    };
    let error = PackedBatch::shared_from_examples(&[&mixed], Device::Cpu).unwrap_err();
    assert!(
        matches!(
            error,
            RefaError::InvalidSetting {
                name: "examples",
                ..
            }
        ),
        "{error}"
    );
}
