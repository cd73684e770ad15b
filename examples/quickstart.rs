//! Every loss of the crate on one small batch: losses, metrics, and the gradients with respect
//! to the response log-probabilities, with what their signs mean.
//!
//! Run: `scripts/cargo run --release --example quickstart`

use refa_loss::{
    device, Dpo, EosMode, EosRegularizer, InfoNca, InfoNcaVariant, Mpo, PreferenceBatch,
    PreferenceLoss, RefaDynamic, RefaOneVsAll, SimPo, TargetLength,
};
use tch::{Kind, Tensor};

/// Three prompts with four response slots each. The third prompt has only three responses
/// (slot 3 is masked) and the second one's scores are all equal, so it carries no preference.
struct Example {
    logp_sum: Tensor,
    lengths: Tensor,
    rewards: Tensor,
    mask: Tensor,
    ref_logp_sum: Tensor,
    eos_logp: Tensor,
    eos_mask: Tensor,
}

fn example(device: tch::Device) -> Example {
    let table = |rows: [[f64; 4]; 3]| Tensor::from_slice2(&rows).to_kind(Kind::Float).to(device);
    Example {
        logp_sum: table([
            [-42.0, -75.0, -30.0, -96.0],
            [-20.0, -25.0, -22.0, -30.0],
            [-60.0, -18.0, -44.0, 0.0],
        ]),
        lengths: table([
            [60.0, 50.0, 20.0, 80.0],
            [20.0, 25.0, 20.0, 30.0],
            [70.0, 15.0, 40.0, 1.0],
        ]),
        rewards: table([
            [9.0, 4.0, 6.5, 2.0],
            [5.0, 5.0, 5.0, 5.0],
            [8.5, 3.0, 7.0, 0.0],
        ]),
        mask: Tensor::from_slice2(&[[true; 4], [true; 4], [true, true, true, false]]).to(device),
        ref_logp_sum: table([
            [-45.0, -70.0, -31.0, -90.0],
            [-21.0, -24.0, -22.0, -31.0],
            [-62.0, -17.0, -45.0, 0.0],
        ]),
        eos_logp: table([
            [-0.2, -0.4, -0.9, -0.1],
            [-0.3, -0.3, -0.5, -0.2],
            [-0.1, -1.6, -0.7, 0.0],
        ]),
        eos_mask: Tensor::from_slice2(&[
            [true, true, true, false],
            [true; 4],
            [true, true, true, false],
        ])
        .to(device),
    }
}

fn main() -> Result<(), refa_loss::RefaError> {
    let device = device::cuda_if_available();
    println!("refa-loss quickstart on {device:?}\n");
    let data = example(device);
    print_inputs(&data)?;

    let losses: Vec<(&str, Box<dyn PreferenceLoss>)> = vec![
        (
            "RefaDynamic (paper defaults)",
            Box::new(RefaDynamic::default()),
        ),
        (
            "RefaDynamic + EOS regularizer",
            Box::new(RefaDynamic::default().with_regularizer(EosRegularizer::default())),
        ),
        ("RefaOneVsAll", Box::new(RefaOneVsAll::default())),
        ("InfoNca (reference-free)", Box::new(InfoNca::default())),
        (
            "InfoNca PositivesOnly",
            Box::new(InfoNca {
                variant: InfoNcaVariant::PositivesOnly,
                ..Default::default()
            }),
        ),
        (
            "InfoNca OneVsAll",
            Box::new(InfoNca {
                variant: InfoNcaVariant::OneVsAll,
                ..Default::default()
            }),
        ),
        ("InfoNca (with reference)", Box::new(InfoNca::original())),
        ("SimPo", Box::new(SimPo::default())),
        ("Dpo", Box::new(Dpo::default())),
        ("Mpo", Box::new(Mpo::default())),
        (
            "EosRegularizer FinalProbability",
            Box::new(EosRegularizer::default()),
        ),
        (
            "EosRegularizer TargetLength",
            Box::new(EosRegularizer {
                mode: EosMode::TargetLength(TargetLength::PromptLongest),
                lambda: 0.01,
            }),
        ),
        (
            "EosRegularizer FinalLogProbability",
            Box::new(EosRegularizer {
                mode: EosMode::FinalLogProbability,
                lambda: 0.1,
            }),
        ),
    ];
    println!(
        "{:<36} {:>8} {:>5} {:>5} {:>8} {:>8} {:>7} {:>6} {:>6}",
        "loss", "value", "used", "skip", "s+", "s-", "margin", "mass+", "acc"
    );
    let mut gradients = Vec::new();
    for (label, loss) in &losses {
        let logp_sum = data.logp_sum.detach().set_requires_grad(true);
        let eos_logp = data.eos_logp.detach().set_requires_grad(true);
        let batch = PreferenceBatch::new(&logp_sum, &data.lengths, &data.rewards)?
            .with_mask(&data.mask)?
            .with_reference(&data.ref_logp_sum)?
            .with_eos(&eos_logp, &data.eos_mask)?;
        let output = loss.compute(&batch)?;
        output.loss.backward();
        let m = output.metrics.summary()?;
        let show = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
        println!(
            "{:<36} {:>8.4} {:>5} {:>5} {:>8} {:>8} {:>7} {:>6} {:>6}",
            label,
            m.loss,
            m.prompts_used,
            m.prompts_skipped,
            show(m.score_positive),
            show(m.score_negative),
            show(m.margin),
            show(m.positive_mass),
            show(m.accuracy)
        );
        gradients.push((*label, logp_sum.grad(), eos_logp.grad()));
    }
    println!();
    for (label, logp_grad, eos_grad) in &gradients {
        if label.starts_with("RefaDynamic (") || label.starts_with("InfoNca (with") {
            println!("d loss / d logp_sum for {label}:");
            print_table(logp_grad)?;
        }
        if label.starts_with("RefaDynamic +") {
            println!("d loss / d eos_logp for {label} (λ·P(EOS) on responses that end with EOS):");
            print_table(eos_grad)?;
        }
    }
    explain();
    Ok(())
}

fn print_inputs(data: &Example) -> Result<(), refa_loss::RefaError> {
    println!(
        "rewards (prompt × slot; the second prompt's are all equal, slot 3 of the third is empty):"
    );
    print_table(&data.rewards.where_scalarother(&data.mask, f64::NAN))?;
    println!("mean token log-probability logp_sum / lengths:");
    print_table(&(&data.logp_sum / &data.lengths).where_scalarother(&data.mask, f64::NAN))?;
    Ok(())
}

fn print_table(t: &Tensor) -> Result<(), refa_loss::RefaError> {
    let rows = Vec::<Vec<f64>>::try_from(&t.to_kind(Kind::Double).to_device(tch::Device::Cpu))?;
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .map(|v| {
                if v.is_nan() {
                    "       -".into()
                } else {
                    format!("{v:>8.4}")
                }
            })
            .collect();
        println!("  {}", cells.join(" "));
    }
    println!();
    Ok(())
}

fn explain() {
    let lines = [
        "How to read the gradients: a trainer moves logp_sum against its gradient.",
        "- A negative entry (the above-mean responses: prompt 0 slots 0 and 2, prompt 2 slots 0 and 2)",
        "  means the loss falls when that response becomes more likely (Lemma 8: dL/ds < 0 on Y+).",
        "- A positive entry (the at-or-below-mean responses) means the loss falls when that response",
        "  becomes less likely (dL/ds > 0 on Y-).",
        "- The EOS regularizer's gradient lambda * P(EOS) >= 0 pushes the end-of-sequence probability",
        "  down where the data's responses end, which lengthens outputs (paper Eq. 33).",
        "- Prompt 1 has equal rewards, so it carries no preference: it is skipped and its gradients",
        "  are exactly 0, as is the empty slot of prompt 2.",
        "- Reference-free REFA divides by the length, so a long response gets a smaller gradient per",
        "  unit of summed log-probability; InfoNCA with a reference works on summed log-ratios.",
    ];
    for line in lines {
        println!("{line}");
    }
}
