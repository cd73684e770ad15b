//! What the examples share: the chat-template flag, loading a checkpoint with its tokenizer
//! for inference, and reporting errors.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use clap::ValueEnum;
use refa_loss::device;
use refa_loss::mistral::{ChatTemplate, ChatTokenizer, Mistral};
use tch::Kind;

/// The `--template` flag.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Template {
    /// `[INST] … [/INST]`
    Mistral,
    /// `<|user|> … <|assistant|>`
    Zephyr,
}

impl From<Template> for ChatTemplate {
    fn from(template: Template) -> Self {
        match template {
            Template::Mistral => ChatTemplate::MistralInstruct,
            Template::Zephyr => ChatTemplate::Zephyr,
        }
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
    #[arg(long, value_enum, default_value_t = Template::Mistral)]
    pub template: Template,
}

impl CheckpointArgs {
    /// The checkpoint and its tokenizer, for inference.
    pub fn load(&self) -> Result<(Mistral, ChatTokenizer), String> {
        load_for_inference(&self.model, self.tokenizer.as_deref(), self.template)
    }
}

/// A checkpoint (bf16 on a GPU, f32 on the CPU) and its tokenizer (`tokenizer`, else the
/// checkpoint folder's `tokenizer.json`).
pub fn load_for_inference(
    folder: &Path,
    tokenizer: Option<&Path>,
    template: Template,
) -> Result<(Mistral, ChatTokenizer), String> {
    let device = device::cuda_if_available();
    let kind = if device.is_cuda() {
        Kind::BFloat16
    } else {
        Kind::Float
    };
    let model = Mistral::from_pretrained(folder, device, kind, None).map_err(|e| e.to_string())?;
    let path = tokenizer
        .map(Path::to_path_buf)
        .unwrap_or_else(|| folder.join("tokenizer.json"));
    let config = model.config();
    let tokenizer = ChatTokenizer::from_file(
        &path,
        template.into(),
        config.bos_token_id,
        config.eos_token_id,
    )
    .map_err(|e| e.to_string())?;
    tokenizer
        .check_fits(config.vocab_size)
        .map_err(|e| e.to_string())?;
    Ok((model, tokenizer))
}

/// Runs `main`'s body, printing an error and exiting with status 1 on failure.
pub fn exit_on_error(result: Result<(), String>) {
    if let Err(message) = result {
        eprintln!("error: {message}");
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
