//! Data-parallel training on the CPU with Gloo, through the built `train_mistral` example:
//! launched by the torch wheel's `torchrun --no-python`, or as plain processes with the
//! variables torchrun sets. Two processes with one prompt each train as one process with two
//! prompts (with and without ZeRO-1, with gradient accumulation); a killed rank makes the
//! other exit with an error naming it, leaving the last checkpoint loadable; a resumed job
//! continues exactly; torchrun's restarts continue from the latest checkpoint; a checkpoint of
//! two processes resumes on one.
#![cfg(feature = "distributed")]

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::examples::{example, repo_file, text};
use refa_loss::train::TrainerState;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The flags of every run here: the bundled model and data, CPU, f32, no evaluations.
fn flags<'a>(out: &'a Path, extra: &[&'a str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--device",
        "cpu",
        "--dtype",
        "f32",
        "--quiet",
        "--eval-every",
        "0",
        "--keep-checkpoints",
        "10",
        "--output-dir",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(out.display().to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// `torchrun --no-python --nproc_per_node 2 train_mistral <args>`.
fn torchrun(args: &[String], restarts: u32) -> Command {
    let mut command = Command::new(repo_file(".venv/bin/torchrun"));
    command
        .args(["--no-python", "--nproc_per_node", "2", "--max-restarts"])
        .arg(restarts.to_string())
        .args(["--master_port", &free_port().to_string()])
        .arg(example("train_mistral"))
        .args(args)
        .stdin(Stdio::null());
    command
}

fn succeed(mut command: Command, what: &str) -> Output {
    let output = command.output().expect("runs");
    assert!(
        output.status.success(),
        "{what}: {:?}\nstdout: {}\nstderr: {}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    );
    output
}

fn single(args: &[String]) -> Command {
    let mut command = Command::new(example("train_mistral"));
    command.args(args).stdin(Stdio::null());
    command
}

/// Largest difference between two checkpoints' weights, relative to the largest weight.
fn weight_difference(a: &Path, b: &Path) -> f64 {
    let read =
        |p: &Path| tch::Tensor::read_safetensors(p.join("model.safetensors")).expect("weights");
    let (a, b) = (read(a), read(b));
    assert_eq!(a.len(), b.len());
    a.iter()
        .map(|(name, x)| {
            let y = &b.iter().find(|(n, _)| n == name).expect("same names").1;
            let diff = (x - y).abs().max().double_value(&[]);
            diff / y.abs().max().double_value(&[]).max(1e-12)
        })
        .fold(0.0, f64::max)
}

#[test]
fn two_processes_train_as_one_with_twice_the_prompts() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, extra) in [
        ("plain", &[][..]),
        ("zero1", &["--shard-optimizer"][..]),
        (
            "accumulation",
            &["--shard-optimizer", "--accumulation-steps", "2"][..],
        ),
        (
            "lora",
            &[
                "--shard-optimizer",
                "--lora-rank",
                "4",
                "--lora-dropout",
                "0",
            ][..],
        ),
    ] {
        let accumulation: Vec<&str> = extra
            .iter()
            .copied()
            .filter(|f| *f != "--shard-optimizer")
            .collect();
        let two = dir.path().join(format!("{name}-2"));
        let one = dir.path().join(format!("{name}-1"));
        let mut args = vec![
            "--max-steps",
            "3",
            "--prompts-per-batch",
            "1",
            "--save-every",
            "1",
        ];
        args.extend_from_slice(extra);
        let job = succeed(torchrun(&flags(&two, &args), 0), name);
        assert!(
            text(&job.stdout).contains("GB through collectives per step and rank"),
            "{name}: {}",
            text(&job.stdout)
        );
        let mut args = vec!["--max-steps", "3", "--prompts-per-batch", "2"];
        args.extend_from_slice(&accumulation);
        succeed(single(&flags(&one, &args)), name);
        let difference = weight_difference(&two.join("checkpoint-3"), &one.join("checkpoint-3"));
        assert!(
            difference < 1e-5,
            "{name}: weights differ by {difference:e}"
        );
        let shards = std::fs::read_dir(two.join("checkpoint-3"))
            .expect("checkpoint")
            .filter(|e| {
                let name = e
                    .as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .into_owned();
                name.starts_with("optimizer-") && name.ends_with("-of-00002.safetensors")
            })
            .count();
        assert_eq!(shards, if extra.is_empty() { 0 } else { 2 }, "{name}");
        // Rank 0 alone logs: one line per step, no duplicates.
        let log = std::fs::read_to_string(two.join("metrics.jsonl")).expect("log");
        let steps = log.lines().filter(|l| l.contains("\"grad_norm\"")).count();
        assert_eq!(steps, 3, "{name}: {log}");
    }

    // The ZeRO-1 job's checkpoint of step 2 resumes on one process (weights and both
    // optimizer shards) and its step 3 equals the job's.
    let resumed = dir.path().join("zero1-resumed-on-1");
    std::fs::create_dir_all(&resumed).expect("folder");
    let from = dir.path().join("zero1-2/checkpoint-2");
    let args = [
        "--max-steps",
        "3",
        "--prompts-per-batch",
        "2",
        "--resume",
        from.to_str().unwrap(),
    ];
    succeed(single(&flags(&resumed, &args)), "resume on one process");
    let difference = weight_difference(
        &resumed.join("checkpoint-3"),
        &dir.path().join("zero1-2/checkpoint-3"),
    );
    assert!(
        difference < 1e-5,
        "resumed on one: weights differ by {difference:e}"
    );
}

/// Rank `rank` of a job of two started by hand (the variables torchrun sets).
fn rank(rank: usize, port: u16, args: &[String]) -> Child {
    Command::new(example("train_mistral"))
        .args(args)
        .env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn a rank")
}

/// A torchrun job of `args` (output captured), once its `checkpoint-20` exists in `out`.
fn start_job_until_step_20(args: &[String], restarts: u32, out: &Path) -> Child {
    let mut job = torchrun(args, restarts);
    job.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = job.spawn().expect("torchrun");
    wait_for(&out.join("checkpoint-20"), Duration::from_secs(120));
    child
}

fn wait_for(path: &Path, limit: Duration) {
    let start = Instant::now();
    while !path.exists() {
        assert!(start.elapsed() < limit, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_killed_rank_stops_the_other_with_its_name_and_a_resumed_job_continues_exactly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let steps = [
        "--max-steps",
        "400",
        "--prompts-per-batch",
        "1",
        "--shard-optimizer",
    ];
    // The uninterrupted job.
    let straight = dir.path().join("straight");
    let mut args = steps.to_vec();
    args.extend_from_slice(&["--save-every", "400"]);
    succeed(torchrun(&flags(&straight, &args), 0), "uninterrupted job");

    // The same job, rank 1 killed once checkpoint-20 exists.
    let broken = dir.path().join("broken");
    let mut args = steps.to_vec();
    args.extend_from_slice(&["--save-every", "10", "--dist-timeout", "60"]);
    let args = flags(&broken, &args);
    let port = free_port();
    let survivor = rank(0, port, &args);
    let mut victim = rank(1, port, &args);
    wait_for(&broken.join("checkpoint-20"), Duration::from_secs(120));
    let killed_at = Instant::now();
    victim.kill().expect("kill rank 1");
    let victim = victim.wait_with_output().expect("rank 1 ends");
    let output = survivor.wait_with_output().expect("rank 0 ends");
    let stderr = format!(
        "rank 0: {}\nrank 1 ({:?}): {}",
        text(&output.stderr),
        victim.status,
        text(&victim.stderr)
    );
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("lost rank 1"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        killed_at.elapsed() < Duration::from_secs(40),
        "{:?}",
        killed_at.elapsed()
    );
    // Every visible checkpoint is whole; no staging folder became one.
    let latest = refa_loss::train::latest_checkpoint(&broken).expect("a checkpoint");
    let state = TrainerState::read(&latest).expect("state");
    assert!(state.step >= 20, "{}", state.step);
    for file in [
        "model.safetensors",
        "optimizer-00000-of-00002.safetensors",
        "optimizer-00001-of-00002.safetensors",
    ] {
        assert!(
            latest.join(file).exists(),
            "{} lacks {file}",
            latest.display()
        );
    }

    // Resumed by torchrun with two processes: the end equals the uninterrupted job's.
    let mut args = steps.to_vec();
    args.extend_from_slice(&["--save-every", "400", "--resume", "latest"]);
    succeed(torchrun(&flags(&broken, &args), 0), "resumed job");
    let difference = weight_difference(
        &broken.join("checkpoint-400"),
        &straight.join("checkpoint-400"),
    );
    assert!(
        difference < 1e-5,
        "resumed job: weights differ by {difference:e}"
    );
}

#[test]
fn torchrun_restarts_a_job_that_lost_a_rank_from_its_latest_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("restarted");
    let args = flags(
        &out,
        &[
            "--max-steps",
            "400",
            "--prompts-per-batch",
            "1",
            "--save-every",
            "10",
            "--resume",
            "latest",
            "--dist-timeout",
            "20",
        ],
    );
    let child = start_job_until_step_20(&args, 1, &out);
    // Kill the first attempt's rank 1 (a process of this job whose RANK is 1).
    let victim = ranks_of(&out)
        .into_iter()
        .find(|(_, r)| *r == 1)
        .expect("rank 1")
        .0;
    // SAFETY: SIGKILL to a process this test started (through torchrun).
    unsafe { libc::kill(victim, libc::SIGKILL) };
    let output = child.wait_with_output().expect("torchrun ends");
    assert!(
        output.status.success(),
        "{}\n{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    let state = TrainerState::read(&out.join("checkpoint-400")).expect("final checkpoint");
    assert_eq!(state.step, 400);
    let log = text(&output.stdout) + &text(&output.stderr);
    assert!(log.contains("resumed from"), "{log}");
}

/// `(pid, RANK)` of the running processes whose command line names `out`.
fn ranks_of(out: &Path) -> Vec<(i32, usize)> {
    let needle = out.display().to_string();
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if !cmdline.contains(&needle)
                || !cmdline.contains("train_mistral")
                || cmdline.contains("torchrun")
            {
                return None;
            }
            let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
            let rank = environ
                .split(|&b| b == 0)
                .find_map(|v| v.strip_prefix(b"RANK="))
                .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())?;
            Some((pid, rank))
        })
        .collect()
}

#[test]
fn sigterm_to_torchrun_stops_every_rank_at_one_step_with_a_whole_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("stopped");
    let args = flags(
        &out,
        &[
            "--max-steps",
            "100000",
            "--prompts-per-batch",
            "1",
            "--save-every",
            "20",
            "--shard-optimizer",
        ],
    );
    let child = start_job_until_step_20(&args, 0, &out);
    // SAFETY: SIGTERM to the torchrun this test started; it forwards it to the ranks.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let output = child.wait_with_output().expect("torchrun ends");
    let stderr = text(&output.stderr);
    assert_eq!(
        stderr.matches("stopped by a signal").count(),
        2,
        "both ranks stop on the signal: {stderr}"
    );
    let latest = refa_loss::train::latest_checkpoint(&out).expect("a checkpoint");
    let step = TrainerState::read(&latest).expect("state").step;
    assert!(step >= 20, "the interrupted step {step} is saved");
    for file in [
        "model.safetensors",
        "optimizer-00000-of-00002.safetensors",
        "optimizer-00001-of-00002.safetensors",
    ] {
        assert!(
            latest.join(file).exists(),
            "{} lacks {file}",
            latest.display()
        );
    }
}

/// Ranks started by hand with different flags stop before they train together, every one
/// with an error naming the difference; a LoRA rank beside a fully fine-tuned one too (it
/// once aborted inside Gloo, SIGABRT), and nothing is written.
#[test]
fn ranks_started_differently_stop_naming_the_difference() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sample = std::fs::read_to_string(repo_file("examples/data/sample.jsonl")).expect("data");
    let fewer = dir.path().join("fewer.jsonl");
    std::fs::write(
        &fewer,
        sample.lines().take(40).collect::<Vec<_>>().join("\n"),
    )
    .expect("data");
    let fewer = fewer.to_str().unwrap().to_string();
    let cases: [(&str, &[&str], &str); 3] = [
        ("lr", &["--lr", "0.01"], "`schedule"),
        ("data", &["--data", &fewer], "the training data"),
        (
            "lora",
            &["--lora-rank", "4"],
            "the model's variables (names, shapes, kinds; LoRA or not)",
        ),
    ];
    for (name, extra, culprit) in cases {
        let out = dir.path().join(name);
        let base = [
            "--max-steps",
            "3",
            "--prompts-per-batch",
            "1",
            "--dist-timeout",
            "60",
        ];
        let mut different = base.to_vec();
        different.extend_from_slice(extra);
        let port = free_port();
        let ranks = [
            rank(0, port, &flags(&out, &base)),
            rank(1, port, &flags(&out, &different)),
        ];
        for (index, child) in ranks.into_iter().enumerate() {
            let output = child.wait_with_output().expect("a rank ends");
            let stderr = text(&output.stderr);
            assert_eq!(
                output.status.code(),
                Some(1),
                "{name}, rank {index}: {stderr}"
            );
            assert!(
                stderr.contains("started differently") && stderr.contains(culprit),
                "{name}, rank {index}: the error should name {culprit}: {stderr}"
            );
        }
        assert!(
            refa_loss::train::latest_checkpoint(&out).is_none(),
            "{name}: a checkpoint"
        );
    }
}
