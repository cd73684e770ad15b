//! A run owns its output folder. Three rules keep two runs from destroying each other's work
//! there:
//! - one trainer process at a time: an advisory lock (`flock`) on `.trainer.lock`, which
//!   holds the owner's pid and dies with the process (`kill -9` included);
//! - a run id, random, written into every checkpoint's `trainer_state.json` and kept across
//!   resumption: pruning deletes only this run's checkpoints;
//! - a fresh run (one not resumed) refuses a folder that holds another run's checkpoints or
//!   metrics, unless told to start over ([`TrainConfig::overwrite_output_dir`]), which
//!   removes them first.
//!
//! [`TrainConfig::overwrite_output_dir`]: crate::train::TrainConfig::overwrite_output_dir

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{RefaError, Result};
use crate::train::checkpoints::checkpoints;
use crate::train::metrics::MetricsLog;
use crate::train::trainer::{DataParallel, Trainer};

/// The lock file in the output folder.
pub const LOCK_FILE: &str = ".trainer.lock";

/// The log of every step and evaluation in the output folder.
pub(super) const METRICS_FILE: &str = "metrics.jsonl";

/// The output folder's lock, held while this value lives (and at most while the process
/// does: the kernel releases a `flock` with the last descriptor of the file, so a killed
/// trainer never leaves a stale lock behind).
#[derive(Debug)]
pub(super) struct OutputLock {
    _file: File,
}

impl OutputLock {
    /// Takes the lock of `output_dir` (which exists) without waiting and writes this
    /// process's pid into it. Another holder, this process included (a second trainer on
    /// the folder), makes it [`RefaError::OutputInUse`] with the holder's pid.
    pub(super) fn acquire(output_dir: &Path) -> Result<Self> {
        let path = output_dir.join(LOCK_FILE);
        // Not truncated on open: the holder's pid stays readable until the lock is ours.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| RefaError::io(&path, &e))?;
        // SAFETY: flock(2) on a descriptor `file` owns for the whole call.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(RefaError::io(&path, &error));
            }
            return Err(RefaError::OutputInUse {
                path: output_dir.display().to_string(),
                pid: holder(&path),
            });
        }
        let pid = format!("{}\n", std::process::id());
        file.set_len(0)
            .and_then(|()| file.write_all(pid.as_bytes()))
            .map_err(|e| RefaError::io(&path, &e))?;
        Ok(OutputLock { _file: file })
    }
}

/// The pid written in a held lock file, if that process lives (between taking the lock and
/// writing its pid, a holder leaves the previous holder's there for a moment).
fn holder(path: &Path) -> Option<u32> {
    let pid: i32 = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
    // SAFETY: kill(2) with signal 0 sends nothing; it only asks whether the pid exists.
    let alive = unsafe { libc::kill(pid, 0) } == 0
        || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    alive.then_some(pid as u32)
}

/// The lock for the process that writes the output folder: the single process, or rank 0
/// of a data-parallel job (the others write only their optimizer shards, into rank 0's
/// checkpoints). When rank 0 cannot take it, every rank stops, instead of waiting for it in
/// the next collective.
pub(super) fn lock_output(
    output_dir: &Path,
    parallel: Option<&DataParallel>,
) -> Result<Option<OutputLock>> {
    let writes = parallel.is_none_or(DataParallel::is_main);
    let lock = if writes {
        OutputLock::acquire(output_dir).map(Some)
    } else {
        Ok(None)
    };
    if let Some(parallel) = parallel {
        if parallel.any(lock.is_err())? && lock.is_ok() {
            return Err(refused_on_rank_0(output_dir));
        }
    }
    lock
}

fn refused_on_rank_0(output_dir: &Path) -> RefaError {
    RefaError::Distributed {
        operation: "setup",
        message: format!(
            "rank 0 refused the output folder {} (its error says why)",
            output_dir.display()
        ),
    }
}

/// A new run id: 16 hex digits from the operating system's randomness (the seeded
/// generators would give two runs with one seed the same id).
pub(super) fn new_run_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// What an earlier run left in an output folder: its checkpoints and the records of
/// `metrics.jsonl`.
#[derive(Debug)]
struct EarlierRun {
    checkpoints: Vec<PathBuf>,
    records: usize,
}

impl EarlierRun {
    /// None for a folder without checkpoints and with an empty (or no) `metrics.jsonl`.
    fn find(output_dir: &Path) -> Option<Self> {
        let checkpoints: Vec<PathBuf> = checkpoints(output_dir)
            .into_iter()
            .map(|(_, path)| path)
            .collect();
        let records = std::fs::read(output_dir.join(METRICS_FILE))
            .map(|bytes| {
                bytes
                    .split(|&b| b == b'\n')
                    .filter(|l| !l.is_empty())
                    .count()
            })
            .unwrap_or(0);
        (!checkpoints.is_empty() || records > 0).then_some(EarlierRun {
            checkpoints,
            records,
        })
    }

    /// In words, e.g. `checkpoint-40, checkpoint-60 and 63 records in metrics.jsonl`.
    fn describe(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        let names: Vec<String> = self
            .checkpoints
            .iter()
            .filter_map(|p| Some(p.file_name()?.to_string_lossy().into_owned()))
            .collect();
        match names.len() {
            0 => {}
            1..=3 => parts.extend(names),
            n => parts.push(format!("{n} checkpoints, {} to {}", names[0], names[n - 1])),
        }
        if self.records > 0 {
            parts.push(format!("{} records in {METRICS_FILE}", self.records));
        }
        match parts.split_last() {
            Some((last, [])) => last.clone(),
            Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
            None => String::new(),
        }
    }
}

/// Removes an earlier run from `output_dir`: its checkpoints, `metrics.jsonl` and the hidden
/// leftovers of interrupted saves and removals are renamed into one hidden folder,
/// `.overwritten-{run_id}`, which is then deleted, so that an interrupted removal never
/// leaves a visible, partly deleted checkpoint.
fn remove_earlier_run(output_dir: &Path, run_id: &str) -> Result<()> {
    let trash = output_dir.join(format!(".overwritten-{run_id}"));
    std::fs::create_dir_all(&trash).map_err(|e| RefaError::io(&trash, &e))?;
    let entries = std::fs::read_dir(output_dir).map_err(|e| RefaError::io(output_dir, &e))?;
    for entry in entries {
        let entry = entry.map_err(|e| RefaError::io(output_dir, &e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !belongs_to_a_run(&name) || entry.path() == trash {
            continue;
        }
        let path = entry.path();
        std::fs::rename(&path, trash.join(&name)).map_err(|e| RefaError::io(&path, &e))?;
    }
    std::fs::remove_dir_all(&trash).map_err(|e| RefaError::io(&trash, &e))
}

/// Whether a file of the output folder is a run's: its log, a checkpoint, or what an
/// interrupted save, pruning or removal left (`.checkpoint-N.partial|.old|.deleting`, a
/// data-parallel job's `.shards-checkpoint-N`, `.overwritten-*`). The lock, the reference
/// cache (checked by its fingerprint) and anything else of the user's stay.
fn belongs_to_a_run(name: &str) -> bool {
    name == METRICS_FILE
        || name.starts_with("checkpoint-")
        || name.starts_with(".checkpoint-")
        || name.starts_with(".shards-checkpoint-")
        || name.starts_with(".overwritten-")
        || name == format!(".{METRICS_FILE}.partial")
}

impl Trainer {
    /// Settles, once and before this trainer first writes to its output folder (its first
    /// record, step or checkpoint), that the folder is this run's. A resumed run's log drops
    /// the records of steps after its checkpoint (a killed run logged them; they run again).
    /// A fresh run in a folder that holds another run's checkpoints or metrics is refused
    /// with [`RefaError::OutputHasRun`], or with `overwrite_output_dir` removes them first.
    /// In a data-parallel job rank 0 decides, and every rank stops when it refuses.
    pub(super) fn claim_output(&mut self) -> Result<()> {
        if self.output_claimed {
            return Ok(());
        }
        let claimed = if self.is_main() {
            self.claim_as_writer()
        } else {
            Ok(())
        };
        if self.agree(claimed.is_err())? && claimed.is_ok() {
            return Err(refused_on_rank_0(&self.config.output_dir));
        }
        claimed?;
        self.output_claimed = true;
        Ok(())
    }

    fn claim_as_writer(&mut self) -> Result<()> {
        let output_dir = self.config.output_dir.clone();
        if self.resumed {
            return self.log.truncate_after(self.step);
        }
        let Some(earlier) = EarlierRun::find(&output_dir) else {
            return Ok(());
        };
        if !self.config.overwrite_output_dir {
            return Err(RefaError::OutputHasRun {
                path: output_dir.display().to_string(),
                found: earlier.describe(),
            });
        }
        remove_earlier_run(&output_dir, &self.run_id)?;
        // The open log was the earlier run's, now deleted.
        self.log = MetricsLog::open(&output_dir.join(METRICS_FILE))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_earlier_run_is_described_by_its_checkpoints_and_records() {
        let run = |names: &[&str], records| EarlierRun {
            checkpoints: names.iter().map(PathBuf::from).collect(),
            records,
        };
        assert_eq!(run(&["checkpoint-60"], 0).describe(), "checkpoint-60");
        assert_eq!(
            run(&["checkpoint-40", "checkpoint-60"], 63).describe(),
            "checkpoint-40, checkpoint-60 and 63 records in metrics.jsonl"
        );
        assert_eq!(
            run(
                &[
                    "checkpoint-1",
                    "checkpoint-2",
                    "checkpoint-3",
                    "checkpoint-4"
                ],
                0
            )
            .describe(),
            "4 checkpoints, checkpoint-1 to checkpoint-4"
        );
        assert_eq!(run(&[], 2).describe(), "2 records in metrics.jsonl");
    }

    #[test]
    fn a_second_lock_on_a_folder_is_refused_with_the_holders_pid_until_it_is_dropped() {
        let dir = std::env::temp_dir().join(format!("refa-lock-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("folder");
        let first = OutputLock::acquire(&dir).expect("first lock");
        match OutputLock::acquire(&dir) {
            Err(RefaError::OutputInUse { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("expected OutputInUse, got {other:?}"),
        }
        drop(first);
        OutputLock::acquire(&dir).expect("free again");
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
