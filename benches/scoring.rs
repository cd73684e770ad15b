//! Plain against chunked scoring, side by side in one run: time and peak memory of one
//! forward + backward pass of the scoring step (scores → RefaDynamic → gradients into the
//! hidden states and, when trained, the LM head), N = 8 sequences × T = 1024 tokens, H = 4096,
//! V ∈ {32 000, 128 000}, f32.
//!
//! Each measurement runs on the CPU in a child process (this binary, re-executed) whose peak
//! resident memory is reset after the inputs are allocated (`/proc/self/clear_refs`), so the
//! figure is the scoring step's own peak. (tch exposes no CUDA allocator statistics; a GPU
//! measurement needs them and is not part of this bench.)
//!
//! Run: `scripts/cargo bench --bench scoring` (several minutes: the plain path at
//! V = 128 000 needs about 20 GB of memory).

use std::process::Command;
use std::time::Instant;

use refa_loss::scoring::{
    preference_loss_backward, score_logits, PreferenceTargets, ScoringConfig,
};
use refa_loss::{PreferenceLoss, RefaDynamic};
use tch::{Device, Kind, Tensor};

const SEQUENCES: i64 = 8;
const POSITIONS: i64 = 1024;
const WIDTH: i64 = 4096;
const PROMPT: i64 = 64;
const VOCABULARIES: [i64; 2] = [32_000, 128_000];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Path {
    Plain,
    Chunked,
}

/// Hidden states, head, labels (a 64-token prompt, then response tokens ending in EOS) and
/// rewards of two prompts × four responses.
struct Inputs {
    hidden: Tensor,
    head: Tensor,
    labels: Tensor,
    rewards: Tensor,
}

fn inputs(vocab: i64, train_head: bool, device: Device) -> Inputs {
    tch::manual_seed(0);
    let options = (Kind::Float, device);
    let hidden =
        (Tensor::randn([SEQUENCES, POSITIONS, WIDTH], options) * 0.05).set_requires_grad(true);
    let head = (Tensor::randn([vocab, WIDTH], options) * 0.02).set_requires_grad(train_head);
    let labels = Tensor::randint(vocab, [SEQUENCES, POSITIONS], (Kind::Int64, device));
    let _ = labels.narrow(1, 0, PROMPT).fill_(-100);
    let _ = labels.select(1, POSITIONS - 1).fill_(2);
    let rewards = Tensor::from_slice(&[9.0f32, 6.0, 3.0, 1.0, 2.0, 8.0, 5.0, 7.0])
        .view([2, 4])
        .to(device);
    // Steady state of training: the gradient buffers already exist (they persist across
    // steps), so the measured peak is the scoring step's working memory, not their first
    // allocation. Both paths accumulate into them in place.
    let mut anchor = hidden.sum(Kind::Float) * 0.0;
    if train_head {
        anchor += head.sum(Kind::Float) * 0.0;
    }
    anchor.backward();
    Inputs {
        hidden,
        head,
        labels,
        rewards,
    }
}

fn step(path: Path, x: &Inputs, loss: &dyn PreferenceLoss) {
    let config = ScoringConfig::new(2);
    match path {
        Path::Plain => {
            let scores =
                score_logits(&x.hidden.matmul(&x.head.tr()), &x.labels, &config).expect("scores");
            let batch = scores.to_batch(&x.rewards, None).expect("batch");
            loss.compute(&batch).expect("loss").loss.backward();
        }
        Path::Chunked => {
            let targets = PreferenceTargets::new(&x.rewards);
            preference_loss_backward(loss, &x.hidden, &x.head, &x.labels, &config, &targets)
                .expect("step");
        }
    }
}

fn status_kib(field: &str) -> i64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .expect("status field");
    line.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("kB value")
}

/// Child mode: one measurement, printed as `seconds peak_bytes`.
fn child(path: Path, vocab: i64, train_head: bool) {
    tch::set_num_threads(2);
    let x = inputs(vocab, train_head, Device::Cpu);
    let loss = RefaDynamic::default();
    std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak RSS");
    let before = status_kib("VmRSS:");
    let start = Instant::now();
    step(path, &x, &loss);
    println!(
        "{} {}",
        start.elapsed().as_secs_f64(),
        (status_kib("VmHWM:") - before) * 1024
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        let path = if args[i + 1] == "plain" {
            Path::Plain
        } else {
            Path::Chunked
        };
        return child(
            path,
            args[i + 2].parse().expect("V"),
            args[i + 3] == "trained",
        );
    }
    println!("scoring step, N = {SEQUENCES}, T = {POSITIONS}, H = {WIDTH}, f32, CPU (2 threads)");
    println!("| V | head | plain s | chunked s | time chunked/plain | plain peak MiB | chunked peak MiB | memory chunked/plain |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|");
    // `-- --vocab 128000` runs one vocabulary only.
    let only: Option<i64> = args
        .iter()
        .position(|a| a == "--vocab")
        .and_then(|i| args.get(i + 1)?.parse().ok());
    for vocab in VOCABULARIES
        .into_iter()
        .filter(|v| only.is_none_or(|o| o == *v))
    {
        for head in ["trained", "frozen"] {
            let run = |path: &str| measure(path, vocab, head);
            let (plain, chunked) = (run("plain"), run("chunked"));
            let mib = |bytes: f64| bytes / (1024.0 * 1024.0);
            let cell = |m: Option<(f64, f64)>, f: &dyn Fn((f64, f64)) -> String| {
                m.map_or("out of memory".into(), f)
            };
            let ratio = |i: usize| match (plain, chunked) {
                (Some(p), Some(c)) => {
                    let (p, c) = if i == 0 { (p.0, c.0) } else { (p.1, c.1) };
                    format!("{:.3}", c / p)
                }
                _ => "-".into(),
            };
            println!(
                "| {vocab} | {head} | {} | {} | {} | {} | {} | {} |",
                cell(plain, &|m| format!("{:.2}", m.0)),
                cell(chunked, &|m| format!("{:.2}", m.0)),
                ratio(0),
                cell(plain, &|m| format!("{:.0}", mib(m.1))),
                cell(chunked, &|m| format!("{:.0}", mib(m.1))),
                ratio(1),
            );
        }
    }
}

/// Runs one child measurement; `None` when the child died (out of memory).
fn measure(path: &str, vocab: i64, head: &str) -> Option<(f64, f64)> {
    let exe = std::env::current_exe().expect("own path");
    let output = Command::new(exe)
        .args(["--child", path, &vocab.to_string(), head])
        .output()
        .expect("spawn the measurement");
    if !output.status.success() {
        eprintln!(
            "{path} V={vocab} {head}: {}",
            String::from_utf8_lossy(&output.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
        return None;
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let mut fields = text
        .split_whitespace()
        .map(|v| v.parse::<f64>().expect("number"));
    Some((fields.next()?, fields.next()?))
}
