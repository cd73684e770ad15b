//! Bad input of every kind a user can hand the trainer, the generator and the URSLA probe,
//! through the built example binaries (as a user runs them) and the library calls they make:
//! each case ends with a typed error naming the culprit (exit status 1) or a handled run,
//! never a panic (exit status 101) and never exit 0 with a wrong result. Plus signals,
//! kills during saving and pruning, resumption on other data, and arbitrary bytes fed to the
//! data readers.
#![cfg(feature = "trainer")]

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::examples::{assert_refused, command, repo_file, run, succeeded, text};
use common::models::{set_config_fields, tiny_model_folder};
use proptest::prelude::*;
use refa_loss::data::{parse_jsonl_bytes, DataFormat, ScoreField};
use refa_loss::model::CausalLm;
use refa_loss::train::TrainerState;
use tch::{Device, Kind, Tensor};

fn train_args<'a>(dir: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--output-dir",
        dir,
        "--quiet",
        "--max-steps",
        "2",
        "--save-every",
        "0",
    ];
    args.extend_from_slice(extra);
    args
}

#[test]
fn bad_trainer_flags_are_refused_before_the_first_step() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().to_str().expect("utf-8 path");
    let cases: &[(&[&str], &str)] = &[
        (&["--prompts-per-batch", "0"], "prompts_per_batch"),
        (&["--accumulation-steps", "0"], "accumulation_steps"),
        (&["--lr=-1"], "`lr`"),
        (&["--lr", "nan"], "`lr`"),
        (&["--min-lr-ratio=-2"], "min_lr_ratio"),
        (&["--warmup-steps=-1"], "warmup_steps"),
        (&["--max-tokens", "1"], "max_tokens"),
        (&["--max-tokens", "0"], "max_tokens"),
        (&["--max-prompt-tokens", "0"], "max_prompt_tokens"),
        (&["--max-tokens", "5000"], "max_position_embeddings"),
        (&["--lora-rank", "100000"], "lora.rank"),
        (&["--lora-rank=-1"], "--lora-rank"),
        (
            &["--lora-rank", "4", "--lora-dropout", "1.5"],
            "lora.dropout",
        ),
        (&["--lora-rank", "4", "--lora-alpha", "nan"], "lora.alpha"),
        (&["--max-grad-norm", "nan"], "max_grad_norm"),
        (&["--max-grad-norm=-1"], "max_grad_norm"),
        (&["--weight-decay", "inf"], "weight_decay"),
        (&["--eval-fraction", "1.5"], "eval_fraction"),
        (&["--eval-fraction=-0.1"], "eval_fraction"),
        (&["--keep-checkpoints", "0"], "keep_checkpoints"),
        (&["--chunk-size", "0"], "chunk_size"),
        (&["--beta=-1"], "beta"),
        (&["--gamma", "0"], "gamma"),
        (
            &[
                "--eos-lambda",
                "0.1",
                "--eos-mode",
                "budgeted",
                "--eos-budget",
                "0",
            ],
            "budget",
        ),
        (
            &[
                "--eos-lambda",
                "0.1",
                "--eos-target",
                "soon",
                "--eos-mode",
                "target-length",
            ],
            "eos_target",
        ),
        (&["--loss", "simpo", "--gamma", "2"], "`gamma`"),
        (&["--share-prompts", "--recompute", "all"], "`recompute`"),
        (&["--shard-optimizer"], "--shard-optimizer"),
        (&["--dist-timeout", "5"], "--dist-timeout"),
        (&["--loss", "refa-dynamic", "--tau", "0.5"], "`tau`"),
        (&["--eos-budget", "8"], "eos_budget"),
    ];
    for (flags, culprit) in cases {
        let mut args = vec!["--output-dir", out, "--quiet"];
        args.extend_from_slice(flags);
        // --max-steps stays valid unless the case is about it.
        let output = run("train_mistral", &args);
        assert_refused(&output, culprit, &format!("{flags:?}"));
        assert!(
            !dir.path().join("checkpoint-60").exists(),
            "{flags:?}: no checkpoint after a refused configuration"
        );
    }
    for steps in ["--max-steps=-5", "--max-steps=0"] {
        let output = run("train_mistral", &["--output-dir", out, "--quiet", steps]);
        assert_refused(&output, "max_steps", steps);
    }
}

#[test]
fn checkpoints_and_tokenizers_that_do_not_fit_the_model_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("run");
    let out = out.to_str().expect("utf-8");

    // An EOS id outside the vocabulary (it would also be the padding id).
    let bad_eos = tiny_model_folder(dir.path(), "bad-eos", |_| {});
    set_config_fields(&bad_eos, serde_json::json!({"eos_token_id": 9999}));
    let output = run(
        "train_mistral",
        &train_args(out, &["--model", bad_eos.to_str().unwrap()]),
    );
    assert_refused(&output, "eos_token_id", "eos id outside the vocabulary");

    // A tokenizer larger than the model's vocabulary (512 tokens against 300 rows).
    let small = tiny_model_folder(dir.path(), "small-vocab", |c| c.vocab_size = 300);
    let output = run(
        "train_mistral",
        &train_args(out, &["--model", small.to_str().unwrap()]),
    );
    assert_refused(&output, "tokenizer", "tokenizer larger than the model");
    let prompts = dir.path().join("prompts.json");
    std::fs::write(&prompts, r#"[{"instruction": "Say hi."}]"#).expect("prompts");
    let output = run(
        "generate",
        &[
            "--model",
            small.to_str().unwrap(),
            "--prompts",
            prompts.to_str().unwrap(),
            "--output",
            dir.path().join("gen.json").to_str().unwrap(),
        ],
    );
    assert_refused(
        &output,
        "tokenizer",
        "generate with a tokenizer larger than the model",
    );

    // Integer bit patterns where float weights belong.
    let ints = tiny_model_folder(dir.path(), "int-weights", |_| {});
    let weights = ints.join("model.safetensors");
    let mut tensors = Tensor::read_safetensors(&weights).expect("read");
    for (name, tensor) in tensors.iter_mut() {
        if name == "model.norm.weight" {
            *tensor = tensor.to_kind(Kind::Int);
        }
    }
    Tensor::write_safetensors(&tensors, &weights).expect("write");
    let output = run(
        "train_mistral",
        &train_args(out, &["--model", ints.to_str().unwrap()]),
    );
    assert_refused(&output, "model.norm.weight", "I32 weights");

    // max_position_embeddings below --max-tokens.
    let short = tiny_model_folder(dir.path(), "short-context", |c| {
        c.max_position_embeddings = 64
    });
    let output = run(
        "train_mistral",
        &train_args(
            out,
            &["--model", short.to_str().unwrap(), "--max-tokens", "128"],
        ),
    );
    assert_refused(
        &output,
        "max_position_embeddings",
        "context shorter than --max-tokens",
    );
}

/// A Hub-style folder (config, weights, tokenizer.json, tokenizer_config.json with a chat
/// template) trains with its own template by default (Mistral-7B-Instruct-v0.1's here),
/// refuses one that cannot split prompt and response, and takes a built-in one on request.
#[test]
fn a_checkpoint_with_its_own_chat_template_trains_with_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = tiny_model_folder(dir.path(), "hub-model", |_| {});
    std::fs::copy(
        repo_file("tests/fixtures/chat_template/mistral/tokenizer_config.json"),
        model.join("tokenizer_config.json"),
    )
    .expect("template");
    let out = dir.path().join("run");
    let args = train_args(out.to_str().unwrap(), &["--model", model.to_str().unwrap()]);
    let stdout = succeeded(&run("train_mistral", &args), "the checkpoint's template");
    assert!(
        stdout.contains("chat template: the checkpoint's own"),
        "{stdout}"
    );
    // A template whose generation prompt merges with the answer's first token under this
    // tokenizer cannot be split: refused, never trained on misaligned.
    std::fs::copy(
        repo_file("tests/fixtures/chat_template/zephyr/tokenizer_config.json"),
        model.join("tokenizer_config.json"),
    )
    .expect("template");
    assert_refused(
        &run("train_mistral", &args),
        "not a token prefix",
        "misaligned template",
    );
    let mut builtin = args.clone();
    builtin.extend_from_slice(&["--template", "zephyr", "--overwrite-output-dir"]);
    let stdout = succeeded(&run("train_mistral", &builtin), "--template zephyr");
    assert!(
        stdout.contains("chat template: built-in Zephyr"),
        "{stdout}"
    );
}

#[test]
fn generate_and_the_ursla_probe_refuse_what_they_cannot_answer() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = tiny_model_folder(dir.path(), "model", |_| {});
    let model = model.to_str().unwrap();
    let out = dir.path().join("out.json");
    let out = out.to_str().unwrap();
    for (flags, culprit) in [
        (&["--temperature", "nan"][..], "temperature"),
        (&["--temperature=-1"][..], "temperature"),
        (&["--top-p", "0"][..], "top_p"),
        (&["--max-new-tokens", "0"][..], "max_new_tokens"),
    ] {
        let mut args = vec!["--model", model, "--output", out];
        args.extend_from_slice(flags);
        assert_refused(
            &run("generate", &args),
            culprit,
            &format!("generate {flags:?}"),
        );
    }
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").expect("empty file");
    let output = run(
        "generate",
        &[
            "--model",
            model,
            "--output",
            out,
            "--prompts",
            empty.to_str().unwrap(),
        ],
    );
    assert_refused(&output, "no prompt", "generate on an empty prompt file");
    assert!(
        !Path::new(out).exists(),
        "no output file for an empty prompt file"
    );

    let no_responses = dir.path().join("no-responses.jsonl");
    std::fs::write(&no_responses, "{\"prompt\": \"p\", \"responses\": []}\n").expect("data");
    let output = run(
        "ursla_probe",
        &[
            "--model",
            model,
            "--data",
            no_responses.to_str().unwrap(),
            "--plot",
            dir.path().join("u.png").to_str().unwrap(),
        ],
    );
    assert_refused(&output, "responses", "URSLA probe without responses");
}

#[test]
fn non_utf8_lines_are_named_and_can_be_skipped() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sample = std::fs::read(repo_file("examples/data/sample.jsonl")).expect("sample");
    let mut data = b"{\"prompt\": \"caf\xe9\", \"responses\": []}\n".to_vec();
    data.extend_from_slice(&sample);
    let path = dir.path().join("latin1.jsonl");
    std::fs::write(&path, &data).expect("data");
    let out = dir.path().join("run");
    let out = out.to_str().unwrap();
    let data_flag = ["--data", path.to_str().unwrap()];
    let output = run("train_mistral", &train_args(out, &data_flag));
    assert_refused(&output, "line 1", "a Latin-1 line");
    assert!(text(&output.stderr).contains("UTF-8"));
    let mut skipping = data_flag.to_vec();
    skipping.push("--skip-bad-lines");
    let output = run("train_mistral", &train_args(out, &skipping));
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stderr).contains("skipped line 1"));
}

/// Two runs with the same --seed write the same weights, LoRA adapters included (their A
/// matrices were once drawn before the generator was seeded, so LoRA runs differed).
#[test]
fn runs_with_the_same_seed_are_identical_with_lora() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut adapters = Vec::new();
    for name in ["a", "b"] {
        let out = dir.path().join(name);
        let out = out.to_str().unwrap();
        let lora = ["--lora-rank", "4", "--lora-dropout", "0.1", "--seed", "7"];
        succeeded(&run("train_mistral", &train_args(out, &lora)), "LoRA run");
        let file = Path::new(out).join("checkpoint-2/adapters.safetensors");
        adapters.push(std::fs::read(&file).expect("adapters"));
    }
    assert!(
        adapters[0] == adapters[1],
        "two runs with --seed 7 wrote different adapters"
    );
}

/// Parquet data through the binary: a Hub-style folder of shards trains; a damaged file and a
/// file that is not parquet stop the run naming the file; a bad row is named by its row, or
/// skipped with `--skip-bad-lines`.
#[test]
fn parquet_data_trains_and_damaged_parquet_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("run");
    let out = out.to_str().unwrap();
    let shards = repo_file("tests/fixtures/parquet/multi_response/data");
    let output = run(
        "train_mistral",
        &train_args(out, &["--data", shards.to_str().unwrap()]),
    );
    let stdout = succeeded(&output, "parquet shards");
    assert!(stdout.contains("data: 64 prompts read"), "{stdout}");

    let mut bytes = std::fs::read(shards.join("train-00000-of-00002.parquet")).expect("shard");
    let middle = bytes.len() / 2;
    bytes.truncate(middle);
    let cut = dir.path().join("cut.parquet");
    std::fs::write(&cut, &bytes).expect("write");
    let output = run(
        "train_mistral",
        &train_args(out, &["--data", cut.to_str().unwrap()]),
    );
    assert_refused(&output, "cut.parquet", "a truncated parquet file");
    let csv = dir.path().join("table.parquet");
    std::fs::write(&csv, "prompt,chosen,rejected\nhi,a,b\n").expect("write");
    let output = run(
        "train_mistral",
        &train_args(out, &["--data", csv.to_str().unwrap()]),
    );
    assert_refused(&output, "table.parquet", "a CSV file named .parquet");
    assert!(text(&output.stderr).contains("not a readable parquet file"));

    // The ultrafeedback_binarized fixture read as multi-response sets: every row lacks the
    // columns, named by row; with --skip-bad-lines all four are skipped and nothing is left.
    let binarized = repo_file("tests/fixtures/parquet/ultrafeedback_binarized/data");
    let args = [
        "--data",
        binarized.to_str().unwrap(),
        "--format",
        "multi-response",
    ];
    let output = run("train_mistral", &train_args(out, &args));
    assert_refused(&output, "row 1", "rows without the format's columns");
    let mut skipping = args.to_vec();
    skipping.push("--skip-bad-lines");
    let output = run("train_mistral", &train_args(out, &skipping));
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stderr));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("skipped row 4: missing field"), "{stderr}");
    assert!(
        stderr.contains("no prompt with a preference left"),
        "{stderr}"
    );
}

fn wait_for_file(path: &Path, child: &mut Child, limit: Duration) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            child.try_wait().expect("child").is_none(),
            "the run ended early"
        );
        assert!(start.elapsed() < limit, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn send(child: &Child, signal: i32) {
    // SAFETY: kill(2) on our own child's pid, with a valid signal number.
    let result = unsafe { libc::kill(child.id() as i32, signal) };
    assert_eq!(result, 0, "kill");
}

/// SIGTERM and SIGINT stop the run at a step boundary with a checkpoint, and the exit status
/// (143, 130) tells the stop from a finished run.
#[test]
fn signals_save_a_checkpoint_and_exit_non_zero() {
    for (signal, status) in [(libc::SIGTERM, 143), (libc::SIGINT, 130)] {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = dir.path().to_str().unwrap();
        let child = command(
            "train_mistral",
            &[
                "--output-dir",
                out,
                "--quiet",
                "--max-steps",
                "100000",
                "--save-every",
                "0",
                "--eval-every",
                "0",
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
        // metrics.jsonl gets its first training line after step 1.
        let metrics = dir.path().join("metrics.jsonl");
        let start = Instant::now();
        while std::fs::read_to_string(&metrics)
            .unwrap_or_default()
            .lines()
            .count()
            < 2
        {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "no training step"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        send(&child, signal);
        let output = child.wait_with_output().expect("wait");
        assert_eq!(
            output.status.code(),
            Some(status),
            "{}",
            text(&output.stderr)
        );
        let checkpoint = refa_loss::train::latest_checkpoint(dir.path()).expect("a checkpoint");
        let state = TrainerState::read(&checkpoint).expect("state");
        assert!(state.step >= 1 && state.step < 100000);
    }
}

/// The step of the newest checkpoint in `folder` (whose state reads), if any.
fn latest_step(folder: &Path) -> Option<i64> {
    let latest = refa_loss::train::latest_checkpoint(folder)?;
    TrainerState::read(&latest).ok().map(|s| s.step)
}

/// Killed (SIGKILL) at random points of a run that saves and prunes every step: every
/// visible checkpoint loads, no hidden leftovers are visible as checkpoints, and resuming
/// from the latest continues with a metrics log that holds each step once.
#[test]
fn kills_during_saving_and_pruning_leave_every_visible_checkpoint_loadable() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().to_str().unwrap();
    let base = [
        "--output-dir",
        out,
        "--quiet",
        "--save-every",
        "1",
        "--keep-checkpoints",
        "2",
        "--eval-every",
        "0",
        "--max-steps",
        "400",
    ];
    let mut random = 0x2545_f491_4f6c_dd1du64;
    for round in 0..6 {
        // As a restarted job is: the latest checkpoint, or step 0 in place of a run killed
        // before its first.
        let mut args = base.to_vec();
        args.extend_from_slice(&["--resume", "latest"]);
        let before = latest_step(dir.path());
        let mut child = command("train_mistral", &args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        // Killed only once it saves (on a loaded machine its start alone can outlast the
        // random delay below), at a random moment of its saving and pruning.
        let start = Instant::now();
        while latest_step(dir.path()) <= before {
            assert!(
                child.try_wait().expect("child").is_none(),
                "round {round}: the run ended early"
            );
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "round {round}: no checkpoint"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        random ^= random << 13;
        random ^= random >> 7;
        random ^= random << 17;
        std::thread::sleep(Duration::from_millis(300 + random % 900));
        send(&child, libc::SIGKILL);
        child.wait().expect("wait");
        for entry in std::fs::read_dir(dir.path()).expect("dir") {
            let path = entry.expect("entry").path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if !name.starts_with("checkpoint-") {
                continue;
            }
            let state =
                TrainerState::read(&path).unwrap_or_else(|e| panic!("round {round}: {name}: {e}"));
            CausalLm::from_pretrained(&path, Device::Cpu, Kind::Float, None)
                .unwrap_or_else(|e| panic!("round {round}: {name}: {e}"));
            Tensor::read_safetensors(path.join("optimizer.safetensors"))
                .unwrap_or_else(|e| panic!("round {round}: {name} optimizer: {e}"));
            assert_eq!(name, format!("checkpoint-{}", state.step));
        }
    }
    let latest = refa_loss::train::latest_checkpoint(dir.path()).expect("a checkpoint survived");
    let step = TrainerState::read(&latest).expect("state").step;
    let mut args = base.to_vec();
    let stop_at = (step + 2).to_string();
    let last = args.len() - 1;
    args[last] = &stop_at;
    args.extend_from_slice(&["--resume", "latest"]);
    succeeded(&run("train_mistral", &args), "the resumed run");
    let log = std::fs::read_to_string(dir.path().join("metrics.jsonl")).expect("log");
    let mut steps: Vec<i64> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r.get("loss").is_some() && r.get("eval/loss").is_none())
        .filter_map(|r| r["step"].as_i64())
        .collect();
    let count = steps.len();
    steps.dedup();
    assert_eq!(steps.len(), count, "a step logged twice: {steps:?}");
    assert_eq!(
        steps,
        (1..=step + 2).collect::<Vec<_>>(),
        "every step logged once"
    );
}

/// The `checkpoint-N` folders of `folder` by step, each with its `trainer_state.json` and
/// the bytes of its weights.
fn checkpoint_contents(folder: &Path) -> Vec<(i64, TrainerState, Vec<u8>)> {
    let mut found: Vec<(i64, TrainerState, Vec<u8>)> = std::fs::read_dir(folder)
        .expect("list")
        .filter_map(|e| {
            let path = e.ok()?.path();
            let step = path
                .file_name()?
                .to_str()?
                .strip_prefix("checkpoint-")?
                .parse()
                .ok()?;
            let state = TrainerState::read(&path).expect("state");
            let weights = std::fs::read(path.join("model.safetensors")).expect("weights");
            Some((step, state, weights))
        })
        .collect();
    found.sort_by_key(|(step, _, _)| *step);
    found
}

/// `(training steps, evaluated steps)` of `folder/metrics.jsonl`, in the log's order.
fn logged_steps(folder: &Path) -> (Vec<i64>, Vec<i64>) {
    let log = std::fs::read_to_string(folder.join("metrics.jsonl")).expect("log");
    let mut steps = (Vec::new(), Vec::new());
    for line in log.lines() {
        let record: serde_json::Value = serde_json::from_str(line).expect("a whole JSON line");
        let step = record["step"].as_i64().expect("step");
        if record.get("eval/loss").is_some() {
            steps.1.push(step);
        } else {
            steps.0.push(step);
        }
    }
    steps
}

/// The issue's case: a finished run, then a fresh one in its folder. Once, the fresh run
/// pruned each checkpoint it wrote (the earlier run's numbers were higher) and exited 0. Now
/// it is refused before its first step, naming the folder, what is there and the ways on, and
/// the earlier run stays whole; with --overwrite-output-dir it starts over and leaves only its
/// own checkpoints and log.
#[test]
fn a_fresh_run_in_a_finished_runs_folder_is_refused_or_starts_over() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().to_str().unwrap();
    succeeded(
        &run("train_mistral", &["--output-dir", out, "--quiet"]),
        "the first run",
    );
    let earlier = checkpoint_contents(dir.path());
    let steps: Vec<i64> = earlier.iter().map(|c| c.0).collect();
    assert_eq!(steps, [40, 60]);
    let log = std::fs::read(dir.path().join("metrics.jsonl")).expect("log");

    let fresh = ["--output-dir", out, "--quiet", "--max-steps", "30"];
    let output = run("train_mistral", &fresh);
    assert_refused(
        &output,
        "--resume latest",
        "a fresh run in a finished run's folder",
    );
    let stderr = text(&output.stderr);
    for part in [
        out,
        "checkpoint-40, checkpoint-60",
        "--overwrite-output-dir",
    ] {
        assert!(
            stderr.contains(part),
            "the error should name {part}: {stderr}"
        );
    }
    assert!(
        checkpoint_contents(dir.path()) == earlier,
        "the earlier run's checkpoints changed"
    );
    assert_eq!(
        std::fs::read(dir.path().join("metrics.jsonl")).expect("log"),
        log
    );

    let mut over = fresh.to_vec();
    over.push("--overwrite-output-dir");
    succeeded(&run("train_mistral", &over), "--overwrite-output-dir");
    let now = checkpoint_contents(dir.path());
    let steps: Vec<i64> = now.iter().map(|c| c.0).collect();
    assert_eq!(steps, [20, 30], "only the new run's checkpoints");
    let earlier_id = earlier[0].1.run_id.clone().expect("run id");
    for (step, state, _) in &now {
        assert!(
            state.run_id.is_some() && state.run_id != Some(earlier_id.clone()),
            "checkpoint-{step} of run {:?}",
            state.run_id
        );
    }
    assert_eq!(now[0].1.run_id, now[1].1.run_id);
    let (trained, evaluated) = logged_steps(dir.path());
    assert_eq!(trained, (1..=30).collect::<Vec<_>>());
    assert_eq!(
        evaluated,
        [0, 20, 30],
        "one evaluation per step, one at step 0"
    );
}

/// A second trainer process on a folder in use is refused, naming the holder's pid, before it
/// writes anything; the lock dies with its holder, even one killed with SIGKILL.
#[test]
fn a_second_trainer_on_a_folder_in_use_is_refused_and_the_lock_dies_with_its_holder() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().to_str().unwrap();
    let flags = |steps: &'static str| {
        let base = ["--output-dir", out, "--quiet", "--eval-every", "0"];
        let rest = [
            "--save-every",
            "0",
            "--resume",
            "latest",
            "--max-steps",
            steps,
        ];
        [&base[..], &rest[..]].concat()
    };
    let mut holder = command("train_mistral", &flags("100000"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    // metrics.jsonl appears once the holder has the lock and its pid is written.
    wait_for_file(
        &dir.path().join("metrics.jsonl"),
        &mut holder,
        Duration::from_secs(120),
    );
    let output = run("train_mistral", &flags("2"));
    let pid = format!("pid {}", holder.id());
    send(&holder, libc::SIGKILL);
    holder.wait().expect("wait");
    assert_refused(&output, &pid, "a second trainer on a folder in use");
    assert!(
        text(&output.stderr).contains("in use"),
        "{}",
        text(&output.stderr)
    );

    let output = run("train_mistral", &flags("2"));
    assert!(
        output.status.success(),
        "the lock died with its holder: {}",
        text(&output.stderr)
    );
    let (trained, _) = logged_steps(dir.path());
    assert_eq!(trained, [1, 2]);
}

/// Resuming on other data is refused (the data position belongs to other examples); a
/// resume with another step count is accepted and says what changes.
#[test]
fn resuming_on_other_data_is_refused_and_schedule_changes_are_reported() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().to_str().unwrap();
    succeeded(
        &run("train_mistral", &train_args(out, &[])),
        "the first run",
    );
    let sample = std::fs::read_to_string(repo_file("examples/data/sample.jsonl")).expect("sample");
    let smaller: String = sample.lines().take(20).map(|l| format!("{l}\n")).collect();
    let path = dir.path().join("smaller.jsonl");
    std::fs::write(&path, smaller).expect("data");
    let resume = [
        "--output-dir",
        out,
        "--quiet",
        "--max-steps",
        "4",
        "--resume",
        "latest",
    ];
    let mut other_data = resume.to_vec();
    other_data.extend_from_slice(&["--data", path.to_str().unwrap()]);
    assert_refused(
        &run("train_mistral", &other_data),
        "other training data",
        "resume on a smaller data file",
    );
    let stdout = succeeded(&run("train_mistral", &resume), "resumed with more steps");
    assert!(stdout.contains("max_steps changes from 2 to 4"), "{stdout}");
}

/// A DPO run in a folder that holds another run's `reference_logps.json` scores the
/// reference anew: before any step the policy equals the reference, so DPO's loss is ln 2.
#[test]
fn a_stale_reference_cache_is_rebuilt_not_reused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().to_str().unwrap();
    let stale = serde_json::json!({ "fingerprint": "0000000000000000",
        "train": vec![vec![-1.0; 4]; 56], "eval": vec![vec![-50.0; 4]; 8] });
    std::fs::write(dir.path().join("reference_logps.json"), stale.to_string()).expect("stale");
    succeeded(
        &run("train_mistral", &train_args(out, &["--loss", "dpo"])),
        "DPO",
    );
    let log = std::fs::read_to_string(dir.path().join("metrics.jsonl")).expect("log");
    let first: serde_json::Value =
        serde_json::from_str(log.lines().next().expect("line")).expect("json");
    let loss = first["eval/loss"]
        .as_f64()
        .expect("eval loss before training");
    assert!(
        (loss - std::f64::consts::LN_2).abs() < 1e-4,
        "eval loss {loss}, expected ln 2"
    );
    let cache = std::fs::read_to_string(dir.path().join("reference_logps.json")).expect("cache");
    assert!(
        !cache.contains("0000000000000000"),
        "the stale cache was replaced"
    );
}

const ALL_FORMATS: [DataFormat; 5] = [
    DataFormat::Auto,
    DataFormat::Simple,
    DataFormat::UltraFeedback,
    DataFormat::MultiResponse,
    DataFormat::Pairwise,
];

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        ".{0,12}".prop_map(serde_json::Value::from),
        prop::sample::select(vec![
            "prompt",
            "responses",
            "text",
            "score",
            "instruction",
            "completions",
            "response",
            "overall_score",
            "fine-grained_score",
            "user",
            "assistant"
        ])
        .prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            prop::collection::vec(
                (
                    prop::sample::select(vec![
                        "prompt",
                        "responses",
                        "text",
                        "score",
                        "instruction",
                        "completions",
                        "response",
                        "overall_score",
                        "fine-grained_score",
                        "all_generated_responses",
                        "all_rm_scores",
                        "chosen",
                        "rejected",
                        "score_chosen",
                        "role",
                        "content",
                        "other"
                    ]),
                    inner
                ),
                0..6,
            )
            .prop_map(|fields| serde_json::Value::Object(
                fields
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect()
            )),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, rng_seed: proptest::test_runner::RngSeed::Fixed(0xBAD_DA7A), ..ProptestConfig::default() })]

    /// Arbitrary bytes never panic a reader: records, a named error, or skipped lines.
    #[test]
    fn arbitrary_bytes_never_panic_the_readers(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        for format in ALL_FORMATS {
            for skip in [false, true] {
                let _ = parse_jsonl_bytes(&bytes, "fuzz", format, ScoreField::Overall, skip);
            }
        }
    }

    /// Arbitrary JSON values (shaped like the formats' fields) never panic a reader, and a
    /// record it accepts has finite scores.
    #[test]
    fn arbitrary_json_never_panics_the_readers(values in prop::collection::vec(json_value(), 1..5)) {
        let text: String = values.iter().map(|v| format!("{v}\n")).collect();
        for format in ALL_FORMATS {
            for score in [ScoreField::Overall, ScoreField::FineGrained] {
                if let Ok(report) = parse_jsonl_bytes(text.as_bytes(), "fuzz", format, score, true) {
                    for record in report.records {
                        prop_assert!(record.responses.iter().all(|r| r.score.is_finite()));
                    }
                }
            }
        }
    }
}

/// An I/O error's message is printed once: the examples printed the operating system's
/// message, then the same message again as the error's cause.
#[test]
fn an_io_error_is_reported_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("run");
    let missing = dir.path().join("missing.jsonl");
    let output = run(
        "train_mistral",
        &train_args(
            out.to_str().unwrap(),
            &["--data", missing.to_str().unwrap()],
        ),
    );
    assert_refused(&output, "missing.jsonl", "missing data file");
    let stderr = text(&output.stderr);
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "{stderr}"
    );
}

/// The EOS experiment in a folder that holds its earlier run: refused, naming
/// --overwrite-output-dir, which starts it over.
#[test]
fn the_eos_experiment_starts_over_in_its_folder_with_overwrite_output_dir() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("eos");
    let mut args = vec![
        "--seeds",
        "1",
        "--sft-steps",
        "2",
        "--preference-steps",
        "2",
        "--prompts",
        "1",
        "--output-dir",
        out.to_str().unwrap(),
    ];
    succeeded(&run("eos_length_experiment", &args), "the first run");
    assert_refused(
        &run("eos_length_experiment", &args),
        "--overwrite-output-dir",
        "a rerun into the same folder",
    );
    args.push("--overwrite-output-dir");
    let stdout = succeeded(&run("eos_length_experiment", &args), "started over");
    assert!(stdout.contains("| SFT only |"), "{stdout}");
}
