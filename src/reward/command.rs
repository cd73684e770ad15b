//! Rewards from an external program: any judge (a Python script, an API client) that reads
//! prompts and answers as JSONL and writes one line of scores per prompt.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::error::{RefaError, Result};
use crate::reward::records::write_atomically;
use crate::reward::{MultiResponseRecord, Prompt, Reward};

/// How the program receives the JSONL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CommandInput {
    /// On its standard input. Default.
    #[default]
    Stdin,
    /// In a file whose path is passed as the program's last argument (removed afterwards).
    FileArgument,
}

/// A [`Reward`] computed by an external program.
///
/// The program gets one JSON line per prompt, the prompt line's fields plus its answers:
///
/// ```json
/// {"prompt": "Describe the sea in at most 12 words.", "constraint": {"kind": "max_words", "n": 12}, "topic": "the sea", "all_generated_responses": ["…", "…"]}
/// ```
///
/// (the layout [`write_multi_response`](crate::reward::write_multi_response) writes, without
/// scores), and must write, in the same order, one line per prompt on its standard output:
/// `{"scores": [0.5, -1.0]}`, one finite number per answer. Blank output lines are ignored;
/// whatever it writes on standard error is shown when it fails.
///
/// ```text
/// # judge.py
/// import json, sys
/// for line in sys.stdin:
///     record = json.loads(line)
///     print(json.dumps({"scores": [float(len(r) < 80) for r in record["all_generated_responses"]]}))
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandReward {
    program: String,
    args: Vec<String>,
    timeout: Duration,
    input: CommandInput,
}

/// How much of the program's standard error a failure shows.
const STDERR_TAIL: usize = 2000;

impl CommandReward {
    /// The program and its arguments (`["python3", "judge.py"]`, run without a shell), the
    /// JSONL on its standard input, at most 10 minutes per call.
    pub fn new<S: Into<String>>(command: impl IntoIterator<Item = S>) -> Result<Self> {
        let mut words = command.into_iter().map(Into::into);
        let program = words
            .next()
            .filter(|p| !p.trim().is_empty())
            .ok_or_else(|| RefaError::option("reward command", "(empty)", "a program and its arguments"))?;
        Ok(CommandReward {
            program,
            args: words.collect(),
            timeout: Duration::from_secs(600),
            input: CommandInput::Stdin,
        })
    }

    /// At most `timeout` per call (> 0); the program (and anything it started in its process
    /// group) is killed after it.
    pub fn with_timeout(mut self, timeout: Duration) -> Result<Self> {
        RefaError::require(!timeout.is_zero(), "reward command timeout", format!("{timeout:?}"), "> 0")?;
        self.timeout = timeout;
        Ok(self)
    }

    /// How the program receives the JSONL.
    pub fn with_input(mut self, input: CommandInput) -> Self {
        self.input = input;
        self
    }

    /// The command line, for messages.
    fn shown(&self) -> String {
        std::iter::once(&self.program).chain(&self.args).cloned().collect::<Vec<_>>().join(" ")
    }

    /// Where messages about the output point.
    fn output_name(&self) -> String {
        format!("output of reward command `{}`", self.shown())
    }

    fn failure(&self, message: String) -> RefaError {
        RefaError::Io {
            path: format!("reward command `{}`", self.shown()),
            message,
            source: None,
        }
    }

    /// Runs the program on `input`; its standard output, or why it failed.
    fn run(&self, input: Vec<u8>) -> Result<String> {
        let file = match self.input {
            CommandInput::Stdin => None,
            CommandInput::FileArgument => Some(self.input_file(&input)?),
        };
        let result = self.run_with(input, file.as_deref());
        if let Some(path) = file {
            let _ = std::fs::remove_file(path);
        }
        result
    }

    fn input_file(&self, input: &[u8]) -> Result<std::path::PathBuf> {
        static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("refa-reward-{}-{call}.jsonl", std::process::id());
        let path = std::env::temp_dir().join(name);
        write_atomically(&path, input)?;
        Ok(path)
    }

    fn run_with(&self, input: Vec<u8>, file: Option<&std::path::Path>) -> Result<String> {
        let mut command = Command::new(&self.program);
        command.args(&self.args).args(file);
        let stdin = if file.is_some() { Stdio::null() } else { Stdio::piped() };
        // Its own process group, so that a timeout kills what it started too.
        command.stdin(stdin).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
        let mut child = command
            .spawn()
            .map_err(|e| self.failure(format!("could not start: {e}")))?;
        if let Some(mut pipe) = child.stdin.take() {
            // A program that exits without reading all of its input closes the pipe: not an
            // error in itself (its output decides). The thread is not joined: something the
            // program started may hold the pipe without reading it.
            std::thread::spawn(move || {
                block_sigpipe();
                let _ = pipe.write_all(&input);
            });
        }
        let start = Instant::now();
        let stdout = reader(child.stdout.take());
        let stderr = reader(child.stderr.take());
        let status = self.wait(&mut child, start)?;
        // The pipes close when the program exits, unless something it started keeps them
        // open: wait for them within what is left of the timeout (a second at least).
        let left = self.timeout.saturating_sub(start.elapsed()).max(Duration::from_secs(1));
        let output = stdout.recv_timeout(left).map_err(|_| {
            kill_group(&mut child);
            self.failure("exited, but its standard output stayed open (a process it started holds it)".to_string())
        })?;
        let errors = stderr.recv_timeout(Duration::from_secs(1)).unwrap_or_default();
        if !status.success() {
            return Err(self.failure(format!("exited with {status}; {}", tail(&errors))));
        }
        String::from_utf8(output).map_err(|e| self.failure(format!("wrote output that is not UTF-8: {e}")))
    }

    /// Waits for the child up to the timeout; kills its process group after it.
    fn wait(&self, child: &mut Child, start: Instant) -> Result<std::process::ExitStatus> {
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if start.elapsed() < self.timeout => std::thread::sleep(Duration::from_millis(5)),
                Ok(None) => {
                    kill_group(child);
                    let _ = child.wait();
                    let message = format!(
                        "did not finish within {:.1} s and was killed (give it more time with \
                         CommandReward::with_timeout)",
                        self.timeout.as_secs_f64()
                    );
                    return Err(self.failure(message));
                }
                Err(e) => return Err(self.failure(format!("could not be waited for: {e}"))),
            }
        }
    }

    /// The scores of each output line, checked against the answers.
    fn parse(&self, output: &str, responses: &[Vec<String>]) -> Result<Vec<Vec<f64>>> {
        // A byte-order mark (some Windows tools write one) is not part of the first line.
        let output = output.strip_prefix('\u{feff}').unwrap_or(output);
        let lines: Vec<(usize, &str)> = output
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .collect();
        let mut scores = Vec::with_capacity(responses.len());
        for (i, answers) in responses.iter().enumerate() {
            let Some(&(number, line)) = lines.get(i) else {
                let message = format!(
                    "ended after {} score lines; expected {} (one per prompt, in input order)",
                    lines.len(),
                    responses.len()
                );
                return Err(self.data_error(lines.len() + 1, message));
            };
            let row = parse_scores(line, answers.len()).map_err(|m| self.data_error(number + 1, m))?;
            scores.push(row);
        }
        if let Some(&(number, _)) = lines.get(responses.len()) {
            let message = format!("one line more than the {} prompts sent", responses.len());
            return Err(self.data_error(number + 1, message));
        }
        Ok(scores)
    }

    fn data_error(&self, line: usize, message: String) -> RefaError {
        RefaError::Data {
            path: self.output_name(),
            line,
            message,
        }
    }
}

impl Reward for CommandReward {
    fn name(&self) -> String {
        format!("command {}", self.shown())
    }

    fn score(&self, prompts: &[Prompt], responses: &[Vec<String>]) -> Result<Vec<Vec<f64>>> {
        let mut input = String::new();
        for record in MultiResponseRecord::zip(prompts, responses, None) {
            input.push_str(&record.to_json().to_string());
            input.push('\n');
        }
        let output = self.run(input.into_bytes())?;
        self.parse(&output, responses)
    }
}

/// One output line: `{"scores": [...]}` with `count` finite numbers.
fn parse_scores(line: &str, count: usize) -> std::result::Result<Vec<f64>, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| {
        let hint = if ["NaN", "Infinity"].iter().any(|w| line.contains(w)) {
            " (NaN and Infinity, which Python's json writes for such floats, are not scores)"
        } else {
            ""
        };
        format!("not JSON{hint}: {e}: {}", shorten(line))
    })?;
    let Some(Value::Array(items)) = value.get("scores") else {
        return Err(format!("expected {{\"scores\": [...]}}, got {}", shorten(line)));
    };
    if items.len() != count {
        return Err(format!("{} scores for {count} answers", items.len()));
    }
    items
        .iter()
        .enumerate()
        .map(|(k, item)| match item.as_f64() {
            Some(score) if score.is_finite() => Ok(score),
            _ => Err(format!("score {k} is {item}, not a finite number")),
        })
        .collect()
}

/// A pipe read to the end on its own thread (so that neither pipe can fill and block the
/// program), its bytes sent when it closes.
fn reader(pipe: Option<impl Read + Send + 'static>) -> std::sync::mpsc::Receiver<Vec<u8>> {
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        let _ = sender.send(bytes);
    });
    receiver
}

/// Blocks SIGPIPE on the calling thread, so that writing to a pipe the program closed fails
/// with EPIPE instead of killing this process (binaries that restore SIGPIPE's default
/// action, as command-line tools do, would otherwise die with it).
fn block_sigpipe() {
    // SAFETY: changes only this thread's signal mask, through a zeroed sigset_t that
    // sigemptyset initializes.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGPIPE);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// SIGKILL to the child's process group (it leads its own).
fn kill_group(child: &mut Child) {
    // SAFETY: kill(2) with a negative pid signals the group the child leads; no memory is
    // touched.
    let group = -(child.id() as libc::pid_t);
    if unsafe { libc::kill(group, libc::SIGKILL) } != 0 {
        let _ = child.kill();
    }
}

/// The end of the program's standard error, for a failure message.
fn tail(errors: &[u8]) -> String {
    let text = String::from_utf8_lossy(errors);
    let text = text.trim();
    if text.is_empty() {
        return "it wrote nothing on standard error".to_string();
    }
    let start = text.char_indices().rev().nth(STDERR_TAIL).map_or(0, |(i, _)| i);
    format!("its standard error ends:\n{}", &text[start..])
}

/// A line cut to 200 characters for a message.
fn shorten(line: &str) -> String {
    let mut short: String = line.chars().take(200).collect();
    if short.len() < line.len() {
        short.push('…');
    }
    short
}
