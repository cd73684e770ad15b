//! What a command-line program around a run needs: the progress bar, the summary table,
//! stopping on a signal, and reporting errors.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};

use crate::model::CausalLm;
use crate::train::StepMetrics;

/// The progress of a run: a bar with ETA and the last step's loss, margin, accuracy and
/// tokens/s, or with `quiet` one line per step on standard output.
#[derive(Debug)]
pub struct Progress {
    bar: ProgressBar,
    quiet: bool,
}

impl Progress {
    /// A bar of `total` steps with `done` of them behind (a resumed run).
    pub fn new(total: i64, done: i64, quiet: bool) -> Self {
        if quiet {
            return Progress {
                bar: ProgressBar::hidden(),
                quiet,
            };
        }
        let bar = ProgressBar::new(total.max(0) as u64);
        bar.set_position(done.max(0) as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps [{elapsed_precise} < {eta_precise}] {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Progress { bar, quiet }
    }

    /// Shows step `m` (the trainer's per-step callback).
    pub fn report(&self, m: &StepMetrics) {
        let line = format!(
            "loss {:.4}  margin {:.3}  acc {:.2}  {:.0} tok/s",
            m.loss, m.margin, m.accuracy, m.tokens_per_s
        );
        if self.quiet {
            println!("step {:>5}  {line}", m.step);
        } else {
            self.bar.set_position(m.step.max(0) as u64);
            self.bar.set_message(line);
        }
    }

    /// Removes the bar, leaving the terminal to what follows.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// The run's summary as a Markdown table: loss, margin, positive mass, accuracy and EOS
/// probability over the first and last ten steps of `history` (means of the finite values)
/// and in the evaluations `before` and `after` the run.
pub fn summary_table(history: &[StepMetrics], before: &StepMetrics, after: &StepMetrics) -> String {
    const ROWS: [&str; 5] = [
        "loss",
        "rewards/margins",
        "rewards/positive_mass",
        "rewards/accuracies",
        "eos/prob",
    ];
    let window = |ms: &[StepMetrics], f: fn(&StepMetrics) -> f64| {
        let values: Vec<f64> = ms.iter().map(f).filter(|v| v.is_finite()).collect();
        values.iter().sum::<f64>() / values.len().max(1) as f64
    };
    let n = history.len().min(10);
    let (first, last) = (&history[..n], &history[history.len() - n..]);
    let mut table = format!(
        "| metric | first {n} steps | last {n} steps | eval before | eval after |\n\
         |---|---:|---:|---:|---:|\n"
    );
    for metric in StepMetrics::LOSS_METRICS
        .iter()
        .filter(|m| ROWS.contains(&m.key))
    {
        let f = metric.get;
        table += &format!(
            "| {} | {:.4} | {:.4} | {:.4} | {:.4} |\n",
            metric.label,
            window(first, f),
            window(last, f),
            f(before),
            f(after)
        );
    }
    table
}

/// The number of values the optimizer updates (the LoRA adapters' only, with LoRA).
pub fn trainable_parameters(model: &CausalLm) -> i64 {
    model
        .var_store()
        .trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum()
}

/// SIGINT (Ctrl-C) and SIGTERM (what `kill` and job schedulers send) ask a run to stop at the
/// next step boundary and save; a second signal while stopping ends the process at once.
/// The exit status then tells a stopped run from a finished one: 130 after SIGINT, 143 after
/// SIGTERM (128 + the signal number, as shells report it).
#[derive(Debug)]
pub struct StopSignals {
    stop: Arc<AtomicBool>,
    status: Arc<AtomicUsize>,
}

impl StopSignals {
    /// Installs the handlers for the life of the process.
    pub fn install() -> std::io::Result<Self> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        use signal_hook::flag;
        let stop = Arc::new(AtomicBool::new(false));
        let status = Arc::new(AtomicUsize::new(0));
        for (signal, exit_status) in [(SIGINT, 130), (SIGTERM, 143)] {
            // Registered first, so it sees the flag as the previous signal left it.
            flag::register_conditional_shutdown(signal, exit_status, stop.clone())?;
            flag::register_usize(signal, status.clone(), exit_status as usize)?;
            flag::register(signal, stop.clone())?;
        }
        Ok(StopSignals { stop, status })
    }

    /// The flag the trainer polls ([`Trainer::run`](crate::train::Trainer::run)).
    pub fn flag(&self) -> &AtomicBool {
        &self.stop
    }

    /// 130 or 143 once a signal arrived.
    pub fn exit_status(&self) -> Option<i32> {
        match self.status.load(Ordering::SeqCst) {
            0 => None,
            status => Some(status as i32),
        }
    }
}

/// `error` and its causes as one line, `outer: cause: …`, each cause once: a cause whose
/// text the message already ends with (an I/O or libtorch error's own message, kept as the
/// source of a [`RefaError`](crate::RefaError) that quotes it) is not repeated.
pub fn error_message(error: &(dyn std::error::Error + 'static)) -> String {
    let mut message = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        let text = inner.to_string();
        if !message.ends_with(&text) {
            message = format!("{message}: {text}");
        }
        cause = inner.source();
    }
    message
}

/// A command-line tool whose output goes to a closed pipe (`… | head`) should end quietly,
/// as C tools do, not panic in `println!`: restores SIGPIPE's default action, which Rust's
/// runtime sets to "ignore". Call it first in `main`.
pub fn quiet_on_closed_pipe() {
    // SAFETY: setting a signal's disposition to its default at the start of `main`, before
    // any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Sends this process's standard output to /dev/null (the ranks of a job other than 0, so
/// that rank 0 alone prints).
pub fn silence_stdout() {
    let null = std::fs::OpenOptions::new().write(true).open("/dev/null");
    if let Ok(null) = null {
        use std::os::fd::AsRawFd;
        // SAFETY: dup2 onto the standard output descriptor; both descriptors are valid.
        unsafe { libc::dup2(null.as_raw_fd(), 1) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RefaError;

    /// An I/O error quotes the operating system's message and keeps it as its source; the
    /// chain prints it once, while a cause the message does not end with is added.
    #[test]
    fn error_message_names_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        let error = RefaError::io("data.jsonl", &io);
        assert_eq!(
            error_message(&error),
            "data.jsonl: No such file or directory"
        );
        #[derive(Debug, thiserror::Error)]
        #[error("reading the data")]
        struct Context(#[source] RefaError);
        assert_eq!(
            error_message(&Context(error)),
            "reading the data: data.jsonl: No such file or directory"
        );
    }
}
