//! Checks this crate's Mistral, scorer and REFA loss against transformers on one device and
//! kind: loads the checkpoint and the reference outputs that `benches/gpu/parity.py` wrote,
//! recomputes logits, per-response log-probability sums, the REFA-dynamic loss and a few
//! parameter gradients, and prints one JSON object with the largest differences (relative to
//! the reference's largest magnitude) and whether each is within tolerance (f32: 1e-4,
//! bf16: 5e-2). Exit status 1 when one is not.
//!
//! ```text
//! python benches/gpu/parity.py DIR --dtype f32 --device cpu
//! scripts/cargo run --release --features trainer --example parity_check -- \
//!     --dir DIR --dtype f32 --device cpu
//! ```

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use refa_loss::cli::{error_message, DType, DeviceName};
use refa_loss::model::{CausalLm, ForwardOptions, Padding};
use refa_loss::scoring::{
    preference_loss_backward, score_hidden, PreferenceTargets, ScoringConfig,
};
use refa_loss::RefaDynamic;
use tch::{Kind, Tensor};

#[derive(Parser, Debug)]
#[command(about = "Compare the crate's outputs and gradients with transformers' (parity.py)")]
struct Args {
    /// The folder parity.py wrote (model/, reference-<dtype>.safetensors).
    #[arg(long)]
    dir: PathBuf,
    /// Kind of the weights.
    #[arg(long, value_enum, default_value_t = DType::F32)]
    dtype: DType,
    /// Device.
    #[arg(long, value_enum, default_value_t = DeviceName::Cpu)]
    device: DeviceName,
}

fn main() {
    match run(Args::parse()) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(error) => {
            eprintln!("error: {}", error_message(error.as_ref()));
            std::process::exit(1);
        }
    }
}

fn run(args: Args) -> anyhow::Result<bool> {
    let device = args.device.resolve()?;
    let (kind, name, tolerance) = match args.dtype {
        DType::F32 => (Kind::Float, "f32", 1e-4),
        DType::Bf16 => (Kind::BFloat16, "bf16", 5e-2),
    };
    let path = args.dir.join(format!("reference-{name}.safetensors"));
    let reference: Vec<(String, Tensor)> =
        Tensor::read_safetensors(&path).with_context(|| path.display().to_string())?;
    let get = |key: &str| -> anyhow::Result<Tensor> {
        let found = reference.iter().find(|(n, _)| n == key);
        Ok(found
            .with_context(|| format!("{key} missing from {}", path.display()))?
            .1
            .to(device))
    };
    let model = CausalLm::from_pretrained(args.dir.join("model"), device, kind, None)?;
    let (ids, mask, labels, rewards) = (
        get("input_ids")?,
        get("attention_mask")?,
        get("labels")?,
        get("rewards")?,
    );
    let options = ForwardOptions {
        padding: Padding::Right,
        ..ForwardOptions::default()
    };
    let hidden = model.forward_pass(&ids, &mask, &options)?.hidden;
    let expected_logits = get("logits")?;
    let positions = expected_logits.size()[0];
    let logits = model.logits(&hidden.get(0).narrow(0, 0, positions).detach());
    let scoring = ScoringConfig::new(model.config().eos_token_id);
    let sums = score_hidden(&hidden.detach(), model.lm_head_weight(), &labels, &scoring)?.logp_sum;
    let output = preference_loss_backward(
        &RefaDynamic::default(),
        &hidden,
        model.lm_head_weight(),
        &labels,
        &scoring,
        &PreferenceTargets::new(&rewards),
    )?;
    let mut rows = vec![
        ("logits", difference(&logits, &expected_logits)),
        ("logp_sum", difference(&sums, &get("logp_sum")?)),
        ("loss", difference(&output.loss.detach(), &get("loss")?)),
    ];
    let variables = model.var_store().variables();
    for (key, expected) in reference.iter().filter(|(n, _)| n.starts_with("grad.")) {
        let name = &key["grad.".len()..];
        let variable = variables
            .get(name)
            .with_context(|| format!("the model has no `{name}`"))?;
        rows.push((name, difference(&variable.grad(), &expected.to(device))));
    }
    let within = rows.iter().all(|(_, d)| *d <= tolerance);
    let record = serde_json::json!({
        "device": format!("{device:?}"),
        "dtype": name,
        "tolerance": tolerance,
        "within_tolerance": within,
        "relative_difference": rows.iter().map(|(n, d)| (n.to_string(), serde_json::json!(d))).collect::<serde_json::Map<_, _>>(),
    });
    println!("{record}");
    Ok(within)
}

/// `max |a − b| / max(max |b|, 1e-6)`, in f32 on the host.
fn difference(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (
        a.to_kind(Kind::Float).view([-1]),
        b.to_kind(Kind::Float).view([-1]),
    );
    if a.size() != b.size() {
        return f64::INFINITY;
    }
    let scale = b.abs().max().double_value(&[]).max(1e-6);
    (a - b).abs().max().double_value(&[]) / scale
}
