//! Rust (this crate) against the same computation in Python PyTorch, in one run, on one
//! libtorch (the project's `.venv`): forward + backward of REFA-dynamic, REFA-1-vs-all and
//! reference-free InfoNCA for P ∈ {8, 64, 512} × K ∈ {4, 8, 16}, CPU, f32, one thread.
//! Prints a markdown table with the Rust/Python time ratio (< 1: Rust is faster).
//!
//! Run: `scripts/cargo bench --bench side_by_side`

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{losses, Inputs, PROMPTS, SLOTS};
use tch::Device;

const THREADS: i32 = 1;
const MIN_SECONDS: f64 = 1.0;
const COMPARED: [&str; 3] = ["RefaDynamic", "RefaOneVsAll", "InfoNca"];

/// Median over 5 runs of the mean step time in milliseconds, after a warm-up.
fn time_step(step: impl Fn()) -> f64 {
    for _ in 0..20 {
        step();
    }
    let mut runs: Vec<f64> = (0..5)
        .map(|_| {
            let (mut n, start) = (0u32, Instant::now());
            while start.elapsed() < Duration::from_secs_f64(MIN_SECONDS / 5.0) {
                step();
                n += 1;
            }
            start.elapsed().as_secs_f64() / f64::from(n)
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[2] * 1e3
}

/// Python's step times for one shape, keyed by loss name.
fn python_times(prompts: i64, slots: i64) -> HashMap<String, f64> {
    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/python_baseline.py");
    let output = Command::new(python)
        .arg(script)
        .arg(THREADS.to_string())
        .arg(MIN_SECONDS.to_string())
        .arg(format!("{prompts}:{slots}"))
        .output()
        .expect("run the Python baseline (scripts/cargo installs .venv)");
    assert!(
        output.status.success(),
        "python baseline failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| {
            let field = |name: &str| {
                let start = line.find(&format!("\"{name}\": ")).expect("field") + name.len() + 4;
                line[start..]
                    .split([',', '}'])
                    .next()
                    .expect("value")
                    .trim()
                    .trim_matches('"')
                    .to_string()
            };
            (field("loss"), field("ms").parse().expect("ms"))
        })
        .collect()
}

fn main() {
    tch::set_num_threads(THREADS);
    let losses: Vec<_> = losses()
        .into_iter()
        .filter(|(name, _)| COMPARED.contains(name))
        .collect();
    println!("| loss | P | K | Rust ms (checks on) | Rust ms (checks off) | Python ms | Rust/Python (on) | Rust/Python (off) |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let (mut log_on, mut log_off, mut rows) = (0.0, 0.0, 0.0);
    // Shape by shape, Rust then Python right after, so that both see the same machine state.
    for prompts in PROMPTS {
        for slots in SLOTS {
            let inputs = Inputs::new(prompts, slots, Device::Cpu);
            let python = python_times(prompts, slots);
            for (name, loss) in &losses {
                let on = time_step(|| inputs.step(loss.as_ref(), true));
                let off = time_step(|| inputs.step(loss.as_ref(), false));
                let py = python[*name];
                println!("| {name} | {prompts} | {slots} | {on:.3} | {off:.3} | {py:.3} | {:.2} | {:.2} |", on / py, off / py);
                (log_on, log_off, rows) = (
                    log_on + (on / py).ln(),
                    log_off + (off / py).ln(),
                    rows + 1.0,
                );
            }
        }
    }
    println!(
        "\ngeometric mean of Rust/Python over {rows} rows: {:.2} (checks on), {:.2} (checks off)",
        (log_on / rows).exp(),
        (log_off / rows).exp()
    );
}
