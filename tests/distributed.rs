//! The collectives of `refa_loss::distributed` across real processes on the CPU (Gloo): this
//! test binary starts copies of itself as the ranks of a job (the variables torchrun sets),
//! each checks its results and exits 0; a rank that is killed makes the others fail with an
//! error naming it, within the timeout.
#![cfg(feature = "distributed")]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use refa_loss::distributed::{JobEnv, ProcessGroup, ReduceOp};
use refa_loss::RefaError;
use tch::{Device, Kind, Tensor};

const ROLE: &str = "REFA_DIST_TEST_ROLE";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Starts `world` copies of this test binary running `test` as ranks of one job.
fn launch(test: &str, role: &str, world: usize) -> Vec<std::process::Child> {
    let port = free_port().to_string();
    (0..world)
        .map(|rank| {
            Command::new(std::env::current_exe().expect("test binary"))
                .args([test, "--exact", "--nocapture", "--test-threads", "1"])
                .env(ROLE, role)
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn a rank")
        })
        .collect()
}

fn group(timeout: Duration) -> ProcessGroup {
    let job = JobEnv::from_env().expect("env").expect("a job");
    ProcessGroup::new(&job, timeout, false).expect("group")
}

fn worker_collectives() {
    let pg = group(Duration::from_secs(60));
    let (rank, world) = (pg.rank() as f64, pg.world_size() as f64);
    let opts = (Kind::Float, Device::Cpu);
    // All-reduce, sum and mean, over two tensors at once.
    let a = Tensor::full([3], rank + 1.0, opts);
    let b = Tensor::full([2, 2], 10.0 * rank, opts);
    pg.all_reduce(&[&a, &b], ReduceOp::Sum).expect("all-reduce");
    let sum_ranks = world * (world - 1.0) / 2.0;
    assert_eq!(a.double_value(&[0]), sum_ranks + world);
    assert_eq!(b.double_value(&[1, 1]), 10.0 * sum_ranks);
    let c = Tensor::full([4], rank, opts);
    pg.all_reduce(&[&c], ReduceOp::Average).expect("average");
    assert!((c.double_value(&[2]) - sum_ranks / world).abs() < 1e-6);
    // Broadcast from the last rank.
    let d = Tensor::full([5], rank, opts);
    pg.broadcast(&[&d], pg.world_size() - 1).expect("broadcast");
    assert_eq!(d.double_value(&[4]), world - 1.0);
    // Reduce-scatter: input[i] = rank + i; this rank's slice of the sum.
    let n = 3;
    let input = Tensor::arange(n * pg.world_size() as i64, opts) + rank;
    let output = Tensor::zeros([n], opts);
    pg.reduce_scatter(&output, &input, ReduceOp::Sum)
        .expect("reduce-scatter");
    for j in 0..n {
        let i = rank as i64 * n + j;
        assert_eq!(output.double_value(&[j]), world * i as f64 + sum_ranks);
    }
    // All-gather: every rank's [rank, rank].
    let mine = Tensor::full([2], rank, opts);
    let all = Tensor::zeros([2 * pg.world_size() as i64], opts);
    pg.all_gather(&all, &mine).expect("all-gather");
    for r in 0..pg.world_size() {
        assert_eq!(all.double_value(&[2 * r as i64 + 1]), r as f64);
    }
    pg.barrier().expect("barrier");
}

fn worker_lost_peer() {
    let pg = group(Duration::from_secs(10));
    pg.barrier().expect("first barrier");
    if pg.rank() == 1 {
        // Rank 1 dies without a word.
        std::process::abort();
    }
    std::thread::sleep(Duration::from_millis(500));
    let x = Tensor::ones([4], (Kind::Float, Device::Cpu));
    let err = pg.all_reduce(&[&x], ReduceOp::Sum).unwrap_err();
    assert!(matches!(err, RefaError::Distributed { .. }), "{err}");
    eprintln!("SURVIVOR: {err}");
    assert!(err.to_string().contains("lost rank 1"), "{err}");
}

/// A rank of a job that stays met until the test closes its stdin, then checks with one more
/// barrier that the job is still whole.
fn worker_hold() {
    use std::io::{Read, Write};
    let pg = group(Duration::from_secs(120));
    pg.barrier().expect("first barrier");
    println!("READY");
    std::io::stdout().flush().expect("stdout");
    let mut rest = String::new();
    std::io::stdin().read_to_string(&mut rest).expect("stdin");
    pg.barrier().expect("the job is whole after the intruder");
}

/// A process started with a running job's port and a rank index the job has, or another
/// world size: it must stop at once, saying so.
fn worker_intrude() {
    let job = JobEnv::from_env().expect("env").expect("a job");
    let err = ProcessGroup::new(&job, Duration::from_secs(60), false).unwrap_err();
    eprintln!("INTRUDER: {err}");
    assert!(
        err.to_string()
            .contains("another job uses this MASTER_PORT"),
        "{err}"
    );
}

/// Runs the worker named by the role variable, when this process is a rank.
fn as_worker() -> bool {
    match std::env::var(ROLE).as_deref() {
        Ok("collectives") => worker_collectives(),
        Ok("lost") => worker_lost_peer(),
        Ok("hold") => worker_hold(),
        Ok("intrude") => worker_intrude(),
        _ => return false,
    }
    true
}

#[test]
fn collectives_agree_across_three_processes() {
    if as_worker() {
        return;
    }
    let ranks = launch("collectives_agree_across_three_processes", "collectives", 3);
    for (rank, child) in ranks.into_iter().enumerate() {
        let output = child.wait_with_output().expect("wait");
        assert!(
            output.status.success(),
            "rank {rank}: {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn a_lost_rank_is_named_by_the_survivors_within_the_timeout() {
    if as_worker() {
        return;
    }
    let start = Instant::now();
    let mut ranks = launch(
        "a_lost_rank_is_named_by_the_survivors_within_the_timeout",
        "lost",
        3,
    );
    let killed = ranks.remove(1).wait_with_output().expect("wait");
    assert!(!killed.status.success());
    for child in ranks {
        let output = child.wait_with_output().expect("wait");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{stderr}");
        assert!(
            stderr.contains("SURVIVOR: distributed all-reduce"),
            "{stderr}"
        );
    }
    assert!(
        start.elapsed() < Duration::from_secs(40),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn job_variables_are_checked() {
    let vars = |pairs: &'static [(&'static str, &'static str)]| {
        move |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    };
    assert_eq!(JobEnv::from_vars(vars(&[])).expect("none"), None);
    let job = JobEnv::from_vars(vars(&[
        ("WORLD_SIZE", "2"),
        ("RANK", "1"),
        ("MASTER_PORT", "29501"),
        ("TORCHELASTIC_RESTART_COUNT", "3"),
        ("TORCHELASTIC_USE_AGENT_STORE", "True"),
    ]))
    .expect("ok")
    .expect("job");
    assert_eq!(
        (job.rank, job.local_rank, job.restart_count, job.agent_store),
        (1, 1, 3, true)
    );
    for (bad, name) in [
        (
            &[("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_PORT", "1")][..],
            "RANK",
        ),
        (&[("WORLD_SIZE", "two"), ("RANK", "0")][..], "WORLD_SIZE"),
        (&[("WORLD_SIZE", "2"), ("MASTER_PORT", "1")][..], "RANK"),
        (&[("WORLD_SIZE", "2"), ("RANK", "0")][..], "MASTER_PORT"),
        (
            &[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "99999")][..],
            "MASTER_PORT",
        ),
    ] {
        let pairs: Vec<(String, String)> = bad
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let err = JobEnv::from_vars(|n| pairs.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone()))
            .unwrap_err();
        assert!(err.to_string().contains(name), "{err}");
    }
}

/// A process started with the port of a running job (a rank index the job has, or another
/// world size) stops at once with an error that says so, well inside its 60 s timeout (it
/// once waited in the job's rendezvous far past it), and the job goes on unharmed.
#[test]
fn a_rank_on_another_jobs_port_stops_at_once_and_the_job_goes_on() {
    use std::io::{BufRead, BufReader, Read};
    if as_worker() {
        return;
    }
    let test = "a_rank_on_another_jobs_port_stops_at_once_and_the_job_goes_on";
    let port = free_port().to_string();
    let spawn = |role: &str, rank: usize, world: usize| {
        Command::new(std::env::current_exe().expect("test binary"))
            .args([test, "--exact", "--nocapture", "--test-threads", "1"])
            .env(ROLE, role)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", &port)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn")
    };
    let mut job: Vec<_> = (0..2).map(|rank| spawn("hold", rank, 2)).collect();
    // Both ranks have met once each prints READY (each waits at most its own timeout).
    let mut outputs = Vec::new();
    for child in &mut job {
        let mut reader = BufReader::new(child.stdout.take().expect("stdout"));
        let mut seen = String::new();
        while !seen.contains("READY") {
            let mut line = String::new();
            let read = reader.read_line(&mut line).expect("read");
            assert!(read > 0, "a rank of the job ended before meeting: {seen}");
            seen.push_str(&line);
        }
        outputs.push(reader);
    }
    for (rank, world) in [(1, 2), (2, 3)] {
        let start = Instant::now();
        let intruder = spawn("intrude", rank, world)
            .wait_with_output()
            .expect("wait");
        assert!(
            intruder.status.success(),
            "rank {rank} of {world}: {}",
            String::from_utf8_lossy(&intruder.stderr)
        );
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "rank {rank} of {world} waited {:?}",
            start.elapsed()
        );
    }
    for child in &mut job {
        drop(child.stdin.take()); // the ranks' signal to finish
    }
    for (rank, (child, mut stdout)) in job.into_iter().zip(outputs).enumerate() {
        let mut rest = String::new();
        stdout.read_to_string(&mut rest).expect("read");
        let output = child.wait_with_output().expect("wait");
        assert!(
            output.status.success(),
            "rank {rank}: {rest}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
