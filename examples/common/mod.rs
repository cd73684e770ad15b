//! What the examples share: the device and kind flags, loading a checkpoint with its tokenizer
//! for inference, and reporting errors.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use clap::ValueEnum;
use refa_loss::data::{parse_jsonl, read_dataset, DataFormat, ReadReport, ScoreField};
use refa_loss::device;
use refa_loss::model::{ChatTokenizer, CausalLm, TemplateChoice};
use tch::{Device, Kind};

/// The bundled sample data (64 prompts × 4 scored responses).
pub const SAMPLE_DATA: &str = include_str!("../data/sample.jsonl");

/// The `--dtype` flag: weight precision.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DType {
    F32,
    Bf16,
}

/// The `--device` flag.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DeviceName {
    /// The GPU when there is one.
    Auto,
    Cpu,
    Cuda,
}

impl DeviceName {
    pub fn resolve(self) -> anyhow::Result<Device> {
        Ok(match self {
            DeviceName::Auto => device::cuda_if_available(),
            DeviceName::Cpu => Device::Cpu,
            DeviceName::Cuda if device::cuda_is_available() => Device::Cuda(0),
            DeviceName::Cuda => anyhow::bail!("--device cuda, but no CUDA device is visible"),
        })
    }
}

/// The weight kind: the flag's, else the device's default ([`device::default_kind`]).
pub fn kind_for(dtype: Option<DType>, device: Device) -> Kind {
    match dtype {
        Some(DType::F32) => Kind::Float,
        Some(DType::Bf16) => Kind::BFloat16,
        None => device::default_kind(device),
    }
}

/// `--data` read in `format`, or the bundled sample when it is absent.
pub fn read_records(
    data: Option<&Path>,
    format: DataFormat,
    score: ScoreField,
    skip_bad_lines: bool,
) -> refa_loss::Result<ReadReport> {
    match data {
        Some(path) => read_dataset(path, format, score, skip_bad_lines),
        None => parse_jsonl(
            SAMPLE_DATA,
            "bundled sample.jsonl",
            DataFormat::Simple,
            score,
            skip_bad_lines,
        ),
    }
}

/// The flags that name a checkpoint to run.
#[derive(clap::Args, Debug)]
pub struct CheckpointArgs {
    /// Hugging Face checkpoint folder (config.json, safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// tokenizer.json (default: the checkpoint folder's).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Chat template.
    #[arg(long, value_enum, default_value_t = TemplateChoice::Auto)]
    pub template: TemplateChoice,
}

impl CheckpointArgs {
    /// The checkpoint and its tokenizer, for inference.
    pub fn load(&self) -> anyhow::Result<(CausalLm, ChatTokenizer)> {
        load_for_inference(&self.model, self.tokenizer.as_deref(), self.template)
    }
}

/// A checkpoint (bf16 on a GPU, f32 on the CPU) and its tokenizer (`tokenizer`, else the
/// checkpoint folder's `tokenizer.json`).
pub fn load_for_inference(
    folder: &Path,
    tokenizer: Option<&Path>,
    template: TemplateChoice,
) -> anyhow::Result<(CausalLm, ChatTokenizer)> {
    let device = device::cuda_if_available();
    let model = CausalLm::from_pretrained(folder, device, device::default_kind(device), None)?;
    let path = tokenizer
        .map(Path::to_path_buf)
        .unwrap_or_else(|| folder.join("tokenizer.json"));
    let config = model.config();
    let (bos, eos) = (config.bos_token_id, config.eos_token_id);
    let tokenizer = ChatTokenizer::from_file(&path, template.builtin(), bos, eos)?
        .with_checkpoint_template(folder, template)?;
    tokenizer.check_fits(config.vocab_size)?;
    Ok((model, tokenizer))
}

/// A command-line tool whose output goes to a closed pipe (`… | head`) should end quietly,
/// as C tools do, not panic in `println!`: restore SIGPIPE's default action, which Rust's
/// runtime sets to "ignore".
pub fn quiet_on_closed_pipe() {
    // SAFETY: setting a signal's disposition to its default at the start of `main`, before
    // any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Runs `main`'s body, printing the error (with its causes) and exiting with status 1 on
/// failure.
pub fn exit_on_error<E: std::fmt::Display>(result: Result<(), E>) {
    if let Err(error) = result {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

/// SIGINT (Ctrl-C) and SIGTERM (what `kill` and job schedulers send) ask a run to stop at the
/// next step boundary and save; a second signal while stopping ends the process at once.
/// The exit status then tells a stopped run from a finished one: 130 after SIGINT, 143 after
/// SIGTERM (128 + the signal number, as shells report it).
pub struct StopSignals {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    status: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl StopSignals {
    pub fn install() -> std::io::Result<Self> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        use signal_hook::flag;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let status = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for (signal, exit_status) in [(SIGINT, 130), (SIGTERM, 143)] {
            // Registered first, so it sees the flag as the previous signal left it.
            flag::register_conditional_shutdown(signal, exit_status, stop.clone())?;
            flag::register_usize(signal, status.clone(), exit_status as usize)?;
            flag::register(signal, stop.clone())?;
        }
        Ok(StopSignals { stop, status })
    }

    /// The flag the trainer polls.
    pub fn flag(&self) -> &std::sync::atomic::AtomicBool {
        &self.stop
    }

    /// 130 or 143 once a signal arrived.
    pub fn exit_status(&self) -> Option<i32> {
        match self.status.load(std::sync::atomic::Ordering::SeqCst) {
            0 => None,
            status => Some(status as i32),
        }
    }
}

/// The torchrun job this process is a rank of, if any (`WORLD_SIZE` set).
pub fn job() -> anyhow::Result<Option<JobEnv>> {
    #[cfg(feature = "distributed")]
    return Ok(refa_loss::distributed::JobEnv::from_env()?);
    #[cfg(not(feature = "distributed"))]
    {
        if std::env::var_os("WORLD_SIZE").is_some_and(|w| w != "1") {
            anyhow::bail!(
                "WORLD_SIZE is set (a torchrun job?) but this binary was built without the \
                 `distributed` feature: build with --features distributed"
            );
        }
        Ok(None)
    }
}

#[cfg(feature = "distributed")]
pub use refa_loss::distributed::JobEnv;

/// Stands in for the job description in builds without the feature `distributed`.
#[cfg(not(feature = "distributed"))]
pub struct JobEnv {
    pub rank: usize,
    pub local_rank: usize,
    pub world_size: usize,
}

/// What `Trainer::new` takes.
pub type TrainerParts = (
    refa_loss::model::CausalLm,
    Box<dyn refa_loss::PreferenceLoss>,
    Vec<refa_loss::data::TokenizedExample>,
    Vec<refa_loss::data::TokenizedExample>,
    refa_loss::train::TrainConfig,
);

/// A trainer that is one rank of `job` (NCCL for a CUDA model, Gloo otherwise).
pub fn distributed_trainer(
    job: &JobEnv,
    (model, loss, train, eval, config): TrainerParts,
    timeout_s: u64,
    shard_optimizer: bool,
) -> anyhow::Result<refa_loss::train::Trainer> {
    #[cfg(feature = "distributed")]
    {
        use refa_loss::distributed::ProcessGroup;
        let nccl = model.lm_head_weight().device().is_cuda();
        let timeout = std::time::Duration::from_secs(timeout_s);
        let group = ProcessGroup::new(job, timeout, nccl)?;
        Ok(refa_loss::train::Trainer::new_distributed(
            model,
            loss,
            train,
            eval,
            config,
            group,
            shard_optimizer,
        )?)
    }
    #[cfg(not(feature = "distributed"))]
    {
        let _ = (
            job,
            model,
            loss,
            train,
            eval,
            config,
            timeout_s,
            shard_optimizer,
        );
        anyhow::bail!("built without the `distributed` feature")
    }
}

/// Sends this process's standard output to /dev/null (the ranks of a job other than 0).
pub fn silence_stdout() {
    let null = std::fs::OpenOptions::new().write(true).open("/dev/null");
    if let Ok(null) = null {
        use std::os::fd::AsRawFd;
        // SAFETY: dup2 onto the standard output descriptor; both descriptors are valid.
        unsafe { libc::dup2(null.as_raw_fd(), 1) };
    }
}
