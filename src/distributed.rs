//! Data-parallel jobs on libtorch's own distributed engine, c10d (feature `distributed`): the
//! process group PyTorch's DDP and FSDP run on, reached through `csrc/refa_dist.cpp`.
//!
//! A job is one process per device, launched by `torchrun --no-python` (installed with the
//! torch wheel), which sets `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and
//! `MASTER_PORT` ([`JobEnv::from_env`]). [`ProcessGroup::new`] meets the other processes
//! through a `TCPStore` (torchrun's own when it hosts one, else rank 0's) and makes a Gloo
//! backend for CPU tensors and an NCCL backend for CUDA tensors. Every collective waits at
//! most the group's timeout and returns a [`RefaError::Distributed`] on a timeout or a lost
//! peer, naming the ranks whose processes have exited where this host can tell.

use std::ffi::{c_char, c_int, c_void, CString};
use std::ptr::NonNull;
use std::time::Duration;

use tch::Tensor;
use torch_sys::C_tensor;

use crate::error::{RefaError, Result};
use crate::ffi::take_text;

extern "C" {
    fn refa_dist_has_nccl() -> c_int;
    #[allow(clippy::too_many_arguments)]
    fn refa_dist_new(
        host: *const c_char,
        port: c_int,
        is_server: c_int,
        rank: c_int,
        world: c_int,
        timeout_ms: i64,
        prefix: *const c_char,
        use_nccl: c_int,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    fn refa_dist_free(group: *mut c_void);
    fn refa_dist_all_reduce(
        group: *mut c_void,
        tensors: *const *mut C_tensor,
        count: usize,
        average: c_int,
    ) -> *mut c_char;
    fn refa_dist_broadcast(
        group: *mut c_void,
        tensors: *const *mut C_tensor,
        count: usize,
        root: c_int,
    ) -> *mut c_char;
    fn refa_dist_reduce_scatter(
        group: *mut c_void,
        output: *mut C_tensor,
        input: *mut C_tensor,
        average: c_int,
    ) -> *mut c_char;
    fn refa_dist_all_gather(
        group: *mut c_void,
        output: *mut C_tensor,
        input: *mut C_tensor,
    ) -> *mut c_char;
    fn refa_dist_barrier(group: *mut c_void) -> *mut c_char;
    fn refa_dist_store_set(
        group: *mut c_void,
        key: *const c_char,
        value: *const c_char,
    ) -> *mut c_char;
    fn refa_dist_store_get(
        group: *mut c_void,
        key: *const c_char,
        timeout_ms: i64,
        value: *mut *mut c_char,
    ) -> *mut c_char;
}

/// Where this process sits in its job, as torchrun describes it in the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEnv {
    /// `RANK`: this process's index in the job, `0..world_size`.
    pub rank: usize,
    /// `WORLD_SIZE`: the number of processes.
    pub world_size: usize,
    /// `LOCAL_RANK`: this process's index on its host (picks its GPU). Default: `rank`.
    pub local_rank: usize,
    /// `MASTER_ADDR`: the host of the job's store. Default `127.0.0.1`.
    pub master_addr: String,
    /// `MASTER_PORT`: the store's port.
    pub master_port: u16,
    /// `TORCHELASTIC_RESTART_COUNT`: how often torchrun has restarted the job (0 at first).
    pub restart_count: u32,
    /// `TORCHELASTIC_USE_AGENT_STORE=True`: torchrun's agent serves the store, so no process
    /// of the job does.
    pub agent_store: bool,
}

impl JobEnv {
    /// The job torchrun (or any launcher setting the same variables) started this process
    /// in; `None` when `WORLD_SIZE` is unset (a plain, single-process run). A variable that
    /// is set but malformed, or a rank outside the world, is an [`RefaError::InvalidSetting`].
    pub fn from_env() -> Result<Option<JobEnv>> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`from_env`](Self::from_env) with the variables read by `var`.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<JobEnv>> {
        let Some(world) = var("WORLD_SIZE") else {
            return Ok(None);
        };
        fn parse<T: std::str::FromStr>(name: &'static str, text: &str) -> Result<T> {
            text.trim()
                .parse()
                .map_err(|_| RefaError::option(name, text, "an integer in range"))
        }
        let world_size: usize = parse("WORLD_SIZE", &world)?;
        RefaError::require(world_size >= 1, "WORLD_SIZE", world_size, ">= 1")?;
        let rank: usize = match var("RANK") {
            Some(text) => parse("RANK", &text)?,
            None => return Err(RefaError::option("RANK", "unset", "set with WORLD_SIZE")),
        };
        RefaError::require(
            rank < world_size,
            "RANK",
            rank,
            format!("< WORLD_SIZE ({world_size})"),
        )?;
        let local_rank = match var("LOCAL_RANK") {
            Some(text) => parse("LOCAL_RANK", &text)?,
            None => rank,
        };
        let master_port: u16 = match var("MASTER_PORT") {
            Some(text) => parse("MASTER_PORT", &text)?,
            None if world_size == 1 => 29500,
            None => {
                return Err(RefaError::option(
                    "MASTER_PORT",
                    "unset",
                    "set with WORLD_SIZE > 1",
                ))
            }
        };
        let restart_count = match var("TORCHELASTIC_RESTART_COUNT") {
            Some(text) => parse("TORCHELASTIC_RESTART_COUNT", &text)?,
            None => 0,
        };
        Ok(Some(JobEnv {
            rank,
            world_size,
            local_rank,
            master_addr: var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".to_string()),
            master_port,
            restart_count,
            agent_store: var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v == "True"),
        }))
    }
}

/// How [`ProcessGroup::all_reduce`] and [`ProcessGroup::reduce_scatter`] combine the ranks'
/// values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// The element-wise sum.
    Sum,
    /// The element-wise mean (the sum divided by the world size).
    Average,
}

/// Whether this build can make NCCL groups (it was compiled with NCCL's headers).
pub fn has_nccl() -> bool {
    // SAFETY: a constant query.
    unsafe { refa_dist_has_nccl() != 0 }
}

/// A process group: every process of the job, met through its store, with Gloo (CPU tensors)
/// and, when asked for, NCCL (CUDA tensors). Collectives must be called by every rank in the
/// same order; each waits at most the group's timeout.
pub struct ProcessGroup {
    handle: NonNull<c_void>,
    job: JobEnv,
    timeout: Duration,
}

// SAFETY: the C++ group is used from one thread at a time (the methods take &self, but the
// type is not Sync); moving it between threads is fine for c10d's objects.
unsafe impl Send for ProcessGroup {}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("job", &self.job)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl ProcessGroup {
    /// Meets the job's other processes and makes the backends: NCCL too when `nccl` (for
    /// CUDA tensors; an error if this build has none, see [`has_nccl`]). Keys are prefixed
    /// with the restart count, so a job torchrun restarted never reads its earlier attempt's.
    /// Fails with [`RefaError::Distributed`] when the peers do not all arrive in `timeout`.
    pub fn new(job: &JobEnv, timeout: Duration, nccl: bool) -> Result<ProcessGroup> {
        RefaError::require(
            !timeout.is_zero(),
            "dist_timeout",
            format!("{timeout:?}"),
            "> 0",
        )?;
        let host = c_string(&job.master_addr)?;
        let prefix = c_string(&format!("refa/{}", job.restart_count))?;
        let is_server = job.rank == 0 && !job.agent_store;
        let mut out: *mut c_void = std::ptr::null_mut();
        // SAFETY: valid C strings and an out pointer; the C++ side catches its exceptions.
        let message = unsafe {
            refa_dist_new(
                host.as_ptr(),
                c_int::from(job.master_port),
                c_int::from(is_server),
                job.rank as c_int,
                job.world_size as c_int,
                timeout.as_millis() as i64,
                prefix.as_ptr(),
                c_int::from(nccl),
                &mut out,
            )
        };
        if let Some(text) = take_text(message) {
            return Err(RefaError::Distributed {
                operation: "setup",
                message: format!(
                    "rank {} of {} could not meet its peers at {}:{} within {:?}: {}",
                    job.rank,
                    job.world_size,
                    job.master_addr,
                    job.master_port,
                    timeout,
                    text.lines().next().unwrap_or("")
                ),
            });
        }
        let handle = NonNull::new(out).ok_or_else(|| RefaError::Distributed {
            operation: "setup",
            message: "no group was returned".to_string(),
        })?;
        let group = ProcessGroup {
            handle,
            job: job.clone(),
            timeout,
        };
        // Who runs where, for naming a lost rank later.
        let me = format!("{} {}", hostname(), std::process::id());
        group.store_set(&format!("process/{}", job.rank), &me)?;
        Ok(group)
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.job.rank
    }

    /// The number of processes.
    pub fn world_size(&self) -> usize {
        self.job.world_size
    }

    /// The job this group belongs to.
    pub fn job(&self) -> &JobEnv {
        &self.job
    }

    /// In place on every tensor (all on one device type): the sum or mean over the ranks.
    pub fn all_reduce(&self, tensors: &[&Tensor], op: ReduceOp) -> Result<()> {
        let pointers: Vec<*mut C_tensor> = tensors.iter().map(|t| pointer(t)).collect();
        let average = c_int::from(op == ReduceOp::Average);
        // SAFETY: live tensors for the duration of the call.
        self.checked("all-reduce", unsafe {
            refa_dist_all_reduce(self.raw(), pointers.as_ptr(), pointers.len(), average)
        })
    }

    /// In place on every tensor: rank `root`'s values.
    pub fn broadcast(&self, tensors: &[&Tensor], root: usize) -> Result<()> {
        RefaError::require(root < self.world_size(), "root", root, "a rank of the job")?;
        let pointers: Vec<*mut C_tensor> = tensors.iter().map(|t| pointer(t)).collect();
        // SAFETY: live tensors for the duration of the call.
        self.checked("broadcast", unsafe {
            refa_dist_broadcast(self.raw(), pointers.as_ptr(), pointers.len(), root as c_int)
        })
    }

    /// `output` (n elements) = this rank's slice (the rank-th of `world_size` equal slices)
    /// of the sum or mean of every rank's `input` (`world_size · n` elements).
    pub fn reduce_scatter(&self, output: &Tensor, input: &Tensor, op: ReduceOp) -> Result<()> {
        let average = c_int::from(op == ReduceOp::Average);
        // SAFETY: live tensors for the duration of the call.
        self.checked("reduce-scatter", unsafe {
            refa_dist_reduce_scatter(self.raw(), pointer(output), pointer(input), average)
        })
    }

    /// `output` (contiguous, `world_size · n` elements) = every rank's `input` (n elements)
    /// in rank order.
    pub fn all_gather(&self, output: &Tensor, input: &Tensor) -> Result<()> {
        // SAFETY: live tensors for the duration of the call.
        self.checked("all-gather", unsafe {
            refa_dist_all_gather(self.raw(), pointer(output), pointer(input))
        })
    }

    /// Returns once every rank has called it.
    pub fn barrier(&self) -> Result<()> {
        // SAFETY: a live group.
        self.checked("barrier", unsafe { refa_dist_barrier(self.raw()) })
    }

    fn raw(&self) -> *mut c_void {
        self.handle.as_ptr()
    }

    fn store_set(&self, key: &str, value: &str) -> Result<()> {
        let (key, value) = (c_string(key)?, c_string(value)?);
        // SAFETY: valid C strings.
        self.checked("store", unsafe {
            refa_dist_store_set(self.raw(), key.as_ptr(), value.as_ptr())
        })
    }

    fn store_get(&self, key: &str, wait: Duration) -> Option<String> {
        let key = c_string(key).ok()?;
        let mut value: *mut c_char = std::ptr::null_mut();
        // SAFETY: a valid C string and out pointer.
        let message = unsafe {
            refa_dist_store_get(
                self.raw(),
                key.as_ptr(),
                wait.as_millis() as i64,
                &mut value,
            )
        };
        match take_text(message) {
            Some(_) => None,
            None => take_text(value),
        }
    }

    /// A failed collective's error, with the ranks whose processes are gone (on this host)
    /// or unreachable.
    fn checked(&self, operation: &'static str, message: *mut c_char) -> Result<()> {
        let Some(text) = take_text(message) else {
            return Ok(());
        };
        Err(RefaError::Distributed {
            operation,
            message: format!(
                "rank {} of {}: {}; {}",
                self.rank(),
                self.world_size(),
                text.lines().next().unwrap_or(""),
                self.lost_ranks()
            ),
        })
    }

    /// Which ranks have gone: those on this host whose process no longer runs; when the
    /// store itself is unreachable, its host (rank 0, or torchrun's agent) is. A peer's
    /// process can outlive the connection it dropped by a moment (dying, or not yet reaped),
    /// so the check is repeated for up to five seconds before it answers that none is gone.
    fn lost_ranks(&self) -> String {
        for _ in 0..50 {
            let answer = self.lost_ranks_now();
            if !answer.starts_with("every other rank") {
                return answer;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.lost_ranks_now()
    }

    fn lost_ranks_now(&self) -> String {
        let host = hostname();
        let mut lost = Vec::new();
        let mut elsewhere = Vec::new();
        for rank in (0..self.world_size()).filter(|&r| r != self.rank()) {
            let Some(entry) = self.store_get(&format!("process/{rank}"), Duration::from_secs(2))
            else {
                let holder = if self.job.agent_store {
                    "torchrun's agent"
                } else {
                    "rank 0"
                };
                return format!(
                    "the job's store is unreachable: {holder} is lost (its process has exited)"
                );
            };
            let mut parts = entry.split_whitespace();
            let (owner, pid) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            match pid.parse::<i32>() {
                Ok(pid) if owner == host => {
                    if !process_runs(pid) {
                        lost.push(format!("rank {rank} (process {pid} has exited)"));
                    }
                }
                _ => elsewhere.push(rank),
            }
        }
        match (lost.is_empty(), elsewhere.is_empty()) {
            (false, _) => format!("lost {}", lost.join(", ")),
            (true, true) => "every other rank's process still runs (a timeout?)".to_string(),
            (true, false) => format!("ranks on other hosts: {elsewhere:?} (not checked from here)"),
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: the handle came from refa_dist_new and is freed once.
        unsafe { refa_dist_free(self.handle.as_ptr()) }
    }
}

/// Whether process `pid` exists and is neither exiting (its sockets already closed while the
/// kernel tears it down, which can take a while on a loaded machine) nor a zombie.
fn process_runs(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    if unsafe { libc::kill(pid, 0) } != 0 {
        return false;
    }
    // /proc/<pid>/stat: "pid (name) state ppid pgrp session tty tpgid flags …"; the name may
    // hold spaces and parentheses. PF_EXITING (0x4) in flags: inside exit.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let flags = fields.get(6).and_then(|f| f.parse::<u64>().ok());
    let exiting = flags.is_some_and(|f| f & 0x4 != 0);
    let dead = matches!(fields.first(), Some(&"Z" | &"X" | &"x"));
    !(exiting || dead)
}

fn pointer(t: &Tensor) -> *mut C_tensor {
    t.as_ptr() as *mut C_tensor
}

fn c_string(text: &str) -> Result<CString> {
    CString::new(text).map_err(|_| RefaError::option("distributed setting", text, "no NUL byte"))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}
