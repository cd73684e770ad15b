//! The example binaries as a user runs them: where they are, running one, and what a clean
//! refusal or a finished run looks like.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A file of the repository, e.g. `examples/data/sample.jsonl`.
pub fn repo_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(name)
}

/// An example binary of this build, without checking that it exists (`cargo test` builds
/// the examples beside the tests; `cargo test --test NAME` does not).
pub fn example_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps");
    profile.join("examples").join(name)
}

/// [`example_path`], which must exist.
pub fn example(name: &str) -> PathBuf {
    let path = example_path(name);
    assert!(
        path.exists(),
        "{} is missing: `cargo test --features trainer` builds the examples with the tests",
        path.display()
    );
    path
}

/// The example `name` with `args`, standard input closed.
pub fn command(name: &str, args: &[&str]) -> Command {
    let mut command = Command::new(example(name));
    command.args(args).stdin(Stdio::null());
    command
}

/// Runs the example `name` with `args` to its end.
pub fn run(name: &str, args: &[&str]) -> Output {
    command(name, args).output().expect("example runs")
}

/// Bytes of an output as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The run stopped with exit status 1 and an error naming `culprit`, without a panic.
pub fn assert_refused(output: &Output, culprit: &str, case: &str) {
    let stderr = text(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(1),
        "{case}: expected a clean error, got {:?}\nstderr: {stderr}\nstdout: {}",
        output.status,
        text(&output.stdout)
    );
    assert!(!stderr.contains("panicked"), "{case}: panicked: {stderr}");
    assert!(
        stderr.contains(culprit),
        "{case}: the error should name `{culprit}`: {stderr}"
    );
}

/// The run finished with exit status 0; its standard output.
pub fn succeeded(output: &Output, case: &str) -> String {
    assert!(
        output.status.success(),
        "{case}: {:?}\nstderr: {}",
        output.status,
        text(&output.stderr)
    );
    text(&output.stdout)
}
