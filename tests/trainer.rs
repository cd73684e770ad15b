//! The trainer: data parsing, exact resumption, atomic checkpoints, checkpoint round trip,
//! and a short end-to-end run whose loss falls.
#![cfg(feature = "trainer")]

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use refa_loss::data::{
    parse_jsonl, read_jsonl, split_eval, tokenize_records, DataFormat, ScoreField, TokenizedExample,
};
use refa_loss::model::{
    CausalLm, ChatMessage, ChatTemplate, ChatTokenizer, JinjaTemplate, ModelConfig, SaveOptions,
};
use refa_loss::scoring::ScoringConfig;
use refa_loss::train::{CosineSchedule, Recompute, TrainConfig, Trainer};
use refa_loss::{EosRegularizer, PreferenceLoss, RefaDynamic, RefaError};
use tch::{Device, Kind, Tensor};

fn data_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/data")
        .join(name)
}

fn tokenizer() -> ChatTokenizer {
    ChatTokenizer::from_file(
        data_file("tokenizer.json"),
        ChatTemplate::MistralInstruct,
        1,
        2,
    )
    .expect("tokenizer")
}

fn sample_records() -> Vec<refa_loss::data::PreferenceRecord> {
    read_jsonl(
        data_file("sample.jsonl"),
        DataFormat::Simple,
        ScoreField::Overall,
        false,
    )
    .expect("sample")
    .records
}

fn tiny_config() -> ModelConfig {
    ModelConfig::from_json(&std::fs::read_to_string(data_file("tiny-config.json")).expect("config"))
        .expect("config")
}

fn examples() -> Vec<TokenizedExample> {
    tokenize_records(&sample_records(), &tokenizer(), 128, 256)
        .expect("tokenize")
        .0
}

/// Random initialization and the trainer's dropout seeding use libtorch's global generator,
/// and tests run on parallel threads: every test that creates or trains a model holds this
/// lock for its whole run, so that each model's weights are a function of its seed alone.
static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn torch_rng() -> std::sync::MutexGuard<'static, ()> {
    TORCH_RNG
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn tiny_model(seed: i64) -> CausalLm {
    let model = CausalLm::new(tiny_config(), Device::Cpu, Kind::Float, None).expect("model");
    model.init_random(seed);
    model
}

fn config(output_dir: &Path, max_steps: i64) -> TrainConfig {
    TrainConfig {
        prompts_per_batch: 4,
        accumulation_steps: 2,
        max_steps,
        schedule: CosineSchedule {
            peak: 2e-3,
            warmup: 2,
            total: max_steps,
            min_ratio: 0.1,
        },
        max_grad_norm: 1.0,
        weight_decay: 0.01,
        eval_every: 0,
        save_every: 0,
        keep_checkpoints: 2,
        output_dir: output_dir.to_path_buf(),
        seed: 7,
        recompute: Recompute::All,
        scoring: ScoringConfig::new(2),
        pad_id: 2,
        share_prompts: false,
        overwrite_output_dir: false,
    }
}

fn loss() -> Box<dyn PreferenceLoss> {
    Box::new(RefaDynamic::default().with_regularizer(EosRegularizer {
        lambda: 0.05,
        ..Default::default()
    }))
}

/// A trainer on the sample data (its held-out split included) from `tiny_model(model_seed)`.
fn sample_trainer(model_seed: i64, config: TrainConfig) -> Trainer {
    let (train, eval) = split_eval(examples(), 0.125, 7).expect("split");
    Trainer::new(tiny_model(model_seed), loss(), train, eval, config).expect("trainer")
}

#[test]
fn both_formats_parse_with_ragged_k_and_named_bad_lines() {
    let simple = concat!(
        r#"{"prompt": "p1", "responses": [{"text": "a", "score": 1}, {"text": "b", "score": 2}, {"text": "c", "score": 3}]}"#,
        "\n\n",
        r#"{"prompt": "p2", "responses": [{"text": "a", "score": 5}, {"text": "b", "score": 4}]}"#,
        "\n"
    );
    let report = parse_jsonl(
        simple,
        "simple.jsonl",
        DataFormat::Simple,
        ScoreField::Overall,
        false,
    )
    .expect("simple");
    assert_eq!(
        report
            .records
            .iter()
            .map(|r| r.responses.len())
            .collect::<Vec<_>>(),
        vec![3, 2]
    );

    let ultra = concat!(
        r#"{"instruction": "q", "completions": [{"response": "x", "overall_score": 8.5, "fine-grained_score": 4.25, "annotations": {}},"#,
        r#" {"response": "y", "overall_score": "3", "fine-grained_score": 2.0, "annotations": {}}]}"#
    );
    let overall = parse_jsonl(
        ultra,
        "uf.jsonl",
        DataFormat::UltraFeedback,
        ScoreField::Overall,
        false,
    )
    .expect("uf");
    assert_eq!(
        overall.records[0].responses[1].score, 3.0,
        "string scores are read"
    );
    let fine = parse_jsonl(
        ultra,
        "uf.jsonl",
        DataFormat::UltraFeedback,
        ScoreField::FineGrained,
        false,
    )
    .expect("uf");
    assert_eq!(fine.records[0].responses[0].score, 4.25);

    let bad = format!(
        "{}\n{{\"prompt\": 3}}\n",
        simple.lines().next().expect("line")
    );
    let err = parse_jsonl(
        &bad,
        "bad.jsonl",
        DataFormat::Simple,
        ScoreField::Overall,
        false,
    )
    .unwrap_err();
    assert!(
        matches!(&err, RefaError::Data { path, line: 2, .. } if path == "bad.jsonl"),
        "{err}"
    );
    let skipped = parse_jsonl(
        &bad,
        "bad.jsonl",
        DataFormat::Simple,
        ScoreField::Overall,
        true,
    )
    .expect("skip");
    assert_eq!(
        (
            skipped.records.len(),
            skipped.skipped.len(),
            skipped.skipped[0].0
        ),
        (1, 1, 2)
    );
    let missing = r#"{"instruction": "q", "completions": [{"response": "x"}]}"#;
    let err = parse_jsonl(
        missing,
        "uf.jsonl",
        DataFormat::UltraFeedback,
        ScoreField::Overall,
        false,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("overall_score") && err.to_string().contains("line 1"),
        "{err}"
    );
}

#[test]
fn tokenization_drops_prompts_without_preference_and_flags_truncation() {
    let text = concat!(
        r#"{"prompt": "What is 2 plus 2?", "responses": [{"text": "4.", "score": 7}, {"text": "5.", "score": 2}]}"#,
        "\n",
        r#"{"prompt": "What is 3 plus 3?", "responses": [{"text": "6.", "score": 5}, {"text": "6!", "score": 5}]}"#,
        "\n",
        r#"{"prompt": "What is 4 plus 4?", "responses": [{"text": "8.", "score": 5}]}"#,
        "\n",
        r#"{"prompt": "What is 5 plus 5?", "responses": [{"text": "10 is the answer because five and five make ten.", "score": 9}, {"text": "11.", "score": 1}]}"#
    );
    let report =
        parse_jsonl(text, "t", DataFormat::Simple, ScoreField::Overall, false).expect("parse");
    let tok = tokenizer();
    let (examples, counts) = tokenize_records(&report.records, &tok, 64, 20).expect("tokenize");
    assert_eq!(
        (
            counts.kept,
            counts.all_scores_equal,
            counts.fewer_than_two_responses
        ),
        (2, 1, 1)
    );
    assert_eq!(examples.len(), 2);
    assert!(
        counts.truncated_responses >= 1,
        "the long answer is cut at 20 tokens"
    );
    let long = &examples[1].responses[0];
    assert!(!long.ends_with(2) && long.prompt.len() + long.response.len() == 20);
    assert!(examples[0].responses.iter().all(|r| r.ends_with(2)));
}

/// Losses of steps 3 and 4 of an uninterrupted run equal those of a run stopped after step
/// 2, saved, and resumed in a fresh trainer.
#[test]
fn resume_continues_exactly() {
    let _rng = torch_rng();
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().expect("temp dir");
    let straight_dir = dir.path().join("straight");
    let mut straight = sample_trainer(3, config(&straight_dir, 4));
    let uninterrupted: Vec<f64> = (0..4)
        .map(|_| straight.train_step().expect("step").loss)
        .collect();

    let resumed_dir = dir.path().join("resumed");
    let mut first = sample_trainer(3, config(&resumed_dir, 4));
    let early: Vec<f64> = (0..2)
        .map(|_| first.train_step().expect("step").loss)
        .collect();
    let checkpoint = first.save_checkpoint().expect("save");
    drop(first);
    // A fresh process would start from a fresh model: a different random init on purpose.
    let mut second = sample_trainer(99, config(&resumed_dir, 4));
    second.resume(&checkpoint).expect("resume");
    assert_eq!(second.step(), 2);
    let late: Vec<f64> = (0..2)
        .map(|_| second.train_step().expect("step").loss)
        .collect();
    assert_eq!(early, uninterrupted[..2]);
    assert_eq!(
        late,
        uninterrupted[2..],
        "resumed losses equal the uninterrupted ones"
    );
}

#[test]
fn a_failed_write_leaves_the_previous_checkpoint_loadable() {
    let _rng = torch_rng();
    let model = tiny_model(1);
    let dir = tempfile::tempdir().expect("temp dir");
    let folder = dir.path().join("checkpoint-1");
    model
        .save_pretrained(
            &folder,
            SaveOptions {
                kind: Kind::Float,
                shard_bytes: 50_000,
            },
        )
        .expect("save");
    // A write that dies midway: the last tensor cannot be stored (a complex kind), after
    // several shards were already written.
    let mut tensors: Vec<(String, Tensor)> = model.var_store().variables().into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors.push((
        "broken".into(),
        Tensor::zeros([2], (Kind::ComplexFloat, Device::Cpu)),
    ));
    let options = SaveOptions {
        kind: Kind::Float,
        shard_bytes: 50_000,
    };
    let err = refa_loss::model::write_checkpoint(&folder, &tensors, &[], options).unwrap_err();
    assert!(err.to_string().contains("broken"), "{err}");
    assert!(
        !dir.path().join(".checkpoint-1.partial").exists(),
        "a failed save removes its staging folder"
    );
    let reloaded = CausalLm::from_pretrained(&folder, Device::Cpu, Kind::Float, None)
        .expect("previous checkpoint loads");
    let ids = Tensor::from_slice2(&[[1i64, 5, 9, 2]]);
    let a = model
        .forward(&ids, &ids.ones_like(), false)
        .expect("forward");
    let b = reloaded
        .forward(&ids, &ids.ones_like(), false)
        .expect("forward");
    assert_eq!((a - b).abs().max().double_value(&[]), 0.0);
}

#[test]
fn a_short_run_lowers_the_loss_and_its_checkpoints_load_in_the_mistral_loader() {
    let _rng = torch_rng();
    tch::set_num_threads(2);
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cfg = config(dir.path(), 30);
    cfg.save_every = 10;
    cfg.eval_every = 15;
    let mut trainer = sample_trainer(3, cfg);
    let summary = trainer.run(&AtomicBool::new(false), |_| {}).expect("run");
    assert_eq!(summary.steps, 30);
    let mean = |ms: &[refa_loss::train::StepMetrics]| {
        ms.iter().map(|m| m.loss).sum::<f64>() / ms.len() as f64
    };
    let (first, last) = (mean(&summary.history[..5]), mean(&summary.history[25..]));
    assert!(
        last < first * 0.8,
        "loss falls: first 5 steps {first:.4}, last 5 {last:.4}"
    );
    assert_eq!(summary.evaluations.len(), 2);

    // Only the newest two checkpoints are kept, and they are Hugging Face checkpoints.
    let mut kept: Vec<String> = std::fs::read_dir(dir.path())
        .expect("list")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    kept.sort();
    assert_eq!(kept, vec!["checkpoint-20", "checkpoint-30"]);
    let last_checkpoint = summary.last_checkpoint.expect("checkpoint");
    let loaded =
        CausalLm::from_pretrained(&last_checkpoint, Device::Cpu, Kind::Float, None).expect("load");
    let ids = Tensor::from_slice2(&[[1i64, 40, 41, 42, 2]]);
    let a = trainer
        .model()
        .forward(&ids, &ids.ones_like(), false)
        .expect("forward");
    let b = loaded
        .forward(&ids, &ids.ones_like(), false)
        .expect("forward");
    assert_eq!((a - b).abs().max().double_value(&[]), 0.0);
    let lines = std::fs::read_to_string(dir.path().join("metrics.jsonl")).expect("metrics");
    assert_eq!(
        lines
            .lines()
            .filter(|l| l.contains("\"grad_norm\""))
            .count(),
        30
    );
    assert!(lines.lines().any(|l| l.contains("eval/loss")));
}

/// Weights that turn non-finite (here: poisoned by hand after two good steps) stop the run
/// with an error naming the step and the last good checkpoint, which stays loadable.
#[test]
fn a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint() {
    let _rng = torch_rng();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut trainer = sample_trainer(4, config(dir.path(), 10));
    trainer.train_step().expect("step 1");
    trainer.train_step().expect("step 2");
    let good = trainer.save_checkpoint().expect("save");
    tch::no_grad(|| {
        let weights = trainer.model().var_store().variables();
        let _ = weights["model.norm.weight"].shallow_clone().fill_(f64::NAN);
    });
    let err = trainer.run(&AtomicBool::new(false), |_| {}).unwrap_err();
    let RefaError::Diverged {
        step,
        last_checkpoint,
        ..
    } = &err
    else {
        panic!("expected Diverged, got {err}")
    };
    assert_eq!(*step, 3, "{err}");
    assert_eq!(
        last_checkpoint.as_deref(),
        Some(good.to_str().expect("utf-8 path")),
        "{err}"
    );
    let reloaded = CausalLm::from_pretrained(&good, Device::Cpu, Kind::Float, None)
        .expect("the last good checkpoint loads");
    let norm = &reloaded.var_store().variables()["model.norm.weight"];
    assert!(bool::try_from(norm.isfinite().all()).expect("bool"));
}

#[test]
fn training_curves_are_plotted_as_a_png() {
    use refa_loss::analysis::plot_history;
    use refa_loss::train::StepMetrics;
    let history: Vec<StepMetrics> = (1..=40)
        .map(|step| StepMetrics {
            step,
            loss: 1.0 / step as f64,
            margin: step as f64 * 0.1,
            positive_mass: 0.5,
            ..StepMetrics::default()
        })
        .collect();
    let evaluations = vec![StepMetrics {
        step: 20,
        loss: 0.06,
        ..StepMetrics::default()
    }];
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("training.png");
    plot_history(&history, &evaluations, &path).expect("plot");
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&path).expect("png"),
    ));
    let mut reader = decoder.read_info().expect("png header");
    let mut pixels = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut pixels).expect("png data");
    assert_eq!((info.width, info.height), (920, 640), "2 × 2 panels");
    let colored = pixels
        .chunks(3)
        .filter(|p| p[0] == 31 && p[1] == 119 && p[2] == 180)
        .count();
    assert!(
        colored > 500,
        "the training curves are drawn ({colored} pixels)"
    );
}

/// The URSLA probe on a model whose per-token probabilities are known: with every weight
/// zero the logits are zero, every token has probability 1/V, and every bucket's mean NLL is
/// ln V exactly.
#[test]
fn the_ursla_probe_recovers_a_known_per_token_nll() {
    let _rng = torch_rng();
    use refa_loss::analysis::{length_buckets, response_nll};
    let config = tiny_config();
    let vocab = config.vocab_size as f64;
    let uniform = CausalLm::new(config, Device::Cpu, Kind::Float, None).expect("model"); // all weights zero
    let all =
        refa_loss::data::tokenize_all(&sample_records(), &tokenizer(), 128, 256).expect("tokenize");
    let samples = response_nll(&uniform, &all, 8, &ScoringConfig::new(2)).expect("probe");
    assert_eq!(samples.len(), 64 * 4);
    let buckets = length_buckets(&samples, 5);
    assert_eq!(
        buckets.iter().map(|b| b.count).sum::<usize>(),
        samples.len()
    );
    for b in &buckets {
        assert!(
            (b.mean_nll - vocab.ln()).abs() < 1e-5 && b.std_error < 1e-5,
            "{b:?}"
        );
        assert!(b.min_length <= b.max_length);
    }
    assert!(
        buckets
            .windows(2)
            .all(|w| w[0].max_length < w[1].min_length),
        "buckets are disjoint and ordered"
    );

    // Synthetic samples following URSLA (nll = 0.3 + 2/length) give falling bucket means.
    let synthetic: Vec<(usize, f64)> = (1..=100).map(|len| (len, 0.3 + 2.0 / len as f64)).collect();
    let buckets = length_buckets(&synthetic, 5);
    assert_eq!(buckets.len(), 5);
    assert!(buckets.windows(2).all(|w| w[1].mean_nll < w[0].mean_nll));
}

/// A stop request (what Ctrl-C sends in the example) ends the run after the current step
/// with a checkpoint of that step, from which training resumes.
#[test]
fn a_stop_request_saves_a_checkpoint_and_exits() {
    let _rng = torch_rng();
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut trainer = sample_trainer(5, config(dir.path(), 20));
    let stop = AtomicBool::new(false);
    let summary = trainer
        .run(&stop, |m| {
            if m.step == 3 {
                stop.store(true, Ordering::SeqCst);
            }
        })
        .expect("run");
    assert!(summary.interrupted);
    assert_eq!(summary.steps, 3);
    let checkpoint = summary.last_checkpoint.expect("checkpoint");
    assert!(checkpoint.ends_with("checkpoint-3"));
    drop(trainer); // its lock on the folder
    let mut resumed = sample_trainer(6, config(dir.path(), 20));
    resumed.resume(&checkpoint).expect("resume");
    assert_eq!(resumed.step(), 3);
}

/// Two trainers on one output folder would delete each other's checkpoints: the second one
/// (in this process here, as in another) is refused naming the lock's holder, until the
/// first is gone.
#[test]
fn a_second_trainer_on_a_folder_in_use_is_refused_until_the_first_is_dropped() {
    let _rng = torch_rng();
    let dir = tempfile::tempdir().expect("temp dir");
    let first = sample_trainer(1, config(dir.path(), 2));
    let (train, eval) = split_eval(examples(), 0.125, 7).expect("split");
    let err = Trainer::new(tiny_model(1), loss(), train, eval, config(dir.path(), 2)).unwrap_err();
    let RefaError::OutputInUse { pid, path } = &err else {
        panic!("expected OutputInUse, got {err}")
    };
    assert_eq!(*pid, Some(std::process::id()), "{err}");
    assert_eq!(Path::new(path), dir.path(), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    drop(first);
    let mut second = sample_trainer(1, config(dir.path(), 2));
    second.train_step().expect("the folder is free again");
}

/// `checkpoint-N` names of `folder`, by step.
fn checkpoint_names(folder: &Path) -> Vec<String> {
    let mut names: Vec<(i64, String)> = std::fs::read_dir(folder)
        .expect("list")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| Some((n.strip_prefix("checkpoint-")?.parse().ok()?, n.clone())))
        .collect();
    names.sort();
    names.into_iter().map(|(_, n)| n).collect()
}

fn run_id(checkpoint: &Path) -> String {
    refa_loss::train::TrainerState::read(checkpoint)
        .expect("state")
        .run_id
        .expect("a run id")
}

/// A fresh run in a folder that holds another run's checkpoints is refused before its first
/// step and leaves them as they were; told to start over, it removes them and leaves only its
/// own checkpoints and log.
#[test]
fn a_fresh_run_where_another_run_is_refused_unless_it_starts_over() {
    let _rng = torch_rng();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut earlier = sample_trainer(2, config(dir.path(), 2));
    earlier.run(&AtomicBool::new(false), |_| {}).expect("run");
    drop(earlier);
    let earlier_id = run_id(&dir.path().join("checkpoint-2"));
    let log = std::fs::read_to_string(dir.path().join("metrics.jsonl")).expect("log");

    let mut fresh = sample_trainer(2, config(dir.path(), 1));
    let err = fresh.run(&AtomicBool::new(false), |_| {}).unwrap_err();
    let RefaError::OutputHasRun { found, .. } = &err else {
        panic!("expected OutputHasRun, got {err}")
    };
    assert!(found.contains("checkpoint-2"), "{err}");
    for offer in ["--resume latest", "--overwrite-output-dir"] {
        assert!(err.to_string().contains(offer), "{err}");
    }
    assert_eq!(fresh.step(), 0);
    drop(fresh);
    assert_eq!(checkpoint_names(dir.path()), ["checkpoint-2"]);
    assert_eq!(run_id(&dir.path().join("checkpoint-2")), earlier_id);
    let unchanged = std::fs::read_to_string(dir.path().join("metrics.jsonl")).expect("log");
    assert_eq!(unchanged, log);

    let mut cfg = config(dir.path(), 1);
    cfg.overwrite_output_dir = true;
    let mut over = sample_trainer(2, cfg);
    over.run(&AtomicBool::new(false), |_| {}).expect("run");
    assert_eq!(checkpoint_names(dir.path()), ["checkpoint-1"]);
    assert_ne!(run_id(&dir.path().join("checkpoint-1")), earlier_id);
    let log = std::fs::read_to_string(dir.path().join("metrics.jsonl")).expect("log");
    assert_eq!(log.lines().count(), 1, "only the new run's step: {log}");
    let hidden: Vec<String> = std::fs::read_dir(dir.path())
        .expect("list")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(".overwritten"))
        .collect();
    assert!(hidden.is_empty(), "{hidden:?}");
}

/// Pruning deletes only this run's older checkpoints: a run resumed into a folder that holds
/// another run's higher-numbered checkpoints keeps its newest and leaves the other run's
/// alone, and it refuses to replace one of them.
#[test]
fn pruning_deletes_only_this_runs_older_checkpoints() {
    let _rng = torch_rng();
    let dir = tempfile::tempdir().expect("temp dir");
    let (start, shared) = (dir.path().join("start"), dir.path().join("shared"));
    let mut first = sample_trainer(3, config(&start, 6));
    first.train_step().expect("step");
    let from = first.save_checkpoint().expect("save");
    drop(first);
    let mut other = sample_trainer(4, config(&shared, 6));
    for step in 1..=5 {
        other.train_step().expect("step");
        if step >= 4 {
            other.save_checkpoint().expect("save");
        }
    }
    drop(other);
    let other_id = run_id(&shared.join("checkpoint-4"));

    let mut cfg = config(&shared, 6);
    cfg.keep_checkpoints = 1;
    let mut resumed = sample_trainer(3, cfg);
    resumed.resume(&from).expect("resume");
    for _ in 0..2 {
        resumed.train_step().expect("step");
        resumed.save_checkpoint().expect("save");
    }
    assert_eq!(
        checkpoint_names(&shared),
        ["checkpoint-3", "checkpoint-4", "checkpoint-5"],
        "its own checkpoint-2 pruned, the newest kept, the other run's untouched"
    );
    assert_eq!(run_id(&shared.join("checkpoint-3")), run_id(&from));
    assert_eq!(run_id(&shared.join("checkpoint-5")), other_id);
    resumed.train_step().expect("step 4");
    let err = resumed.save_checkpoint().unwrap_err();
    assert!(err.to_string().contains("another run"), "{err}");
    assert_eq!(run_id(&shared.join("checkpoint-4")), other_id);
}

/// A run resumed from a checkpoint while the log holds what the interrupted run logged after
/// it: every training step and every evaluation appears once, the evaluation of the resumed
/// step and of the last step included.
#[test]
fn a_resumed_run_logs_each_step_and_evaluation_once() {
    let _rng = torch_rng();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cfg = config(dir.path(), 4);
    cfg.eval_every = 2;
    cfg.save_every = 2;
    let mut first = sample_trainer(5, cfg.clone());
    first.evaluate().expect("evaluation before");
    first.run(&AtomicBool::new(false), |_| {}).expect("run");
    first.evaluate().expect("evaluation after");
    drop(first);
    // Continued from checkpoint-2 as the example does: evaluate, run, evaluate.
    let mut resumed = sample_trainer(6, cfg);
    resumed
        .resume(dir.path().join("checkpoint-2"))
        .expect("resume");
    resumed.evaluate().expect("evaluation before");
    resumed.run(&AtomicBool::new(false), |_| {}).expect("run");
    resumed.evaluate().expect("evaluation after");
    let log = std::fs::read_to_string(dir.path().join("metrics.jsonl")).expect("log");
    let records: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).expect("a whole JSON line"))
        .collect();
    let steps = |evaluation: bool| -> Vec<i64> {
        records
            .iter()
            .filter(|r| r.get("eval/loss").is_some() == evaluation)
            .map(|r| r["step"].as_i64().expect("step"))
            .collect()
    };
    assert_eq!(steps(false), [1, 2, 3, 4], "{log}");
    assert_eq!(steps(true), [0, 2, 4], "{log}");
}

/// Every record is one `write(2)` to a file opened for appending: lines from two writers
/// never split or interleave.
#[test]
fn metrics_records_from_two_writers_stay_whole() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("metrics.jsonl");
    let pad = "x".repeat(4000);
    std::thread::scope(|scope| {
        for writer in 0..2 {
            let (path, pad) = (&path, &pad);
            scope.spawn(move || {
                let mut log = refa_loss::train::MetricsLog::open(path).expect("open");
                for step in 0..300 {
                    let line = serde_json::json!({ "step": step, "writer": writer, "pad": pad });
                    log.write(&line.to_string()).expect("write");
                }
            });
        }
    });
    let text = std::fs::read_to_string(&path).expect("log");
    assert_eq!(text.lines().count(), 600);
    for line in text.lines() {
        let record: serde_json::Value = serde_json::from_str(line).expect("a whole record");
        assert_eq!(record["pad"].as_str().map(str::len), Some(4000));
    }
}

/// The streaming writer (one tensor on the host at a time) writes the same bytes as the
/// in-memory serializer, for f32 and bf16 storage, integer tensors included.
#[test]
fn streaming_save_writes_byte_identical_files() {
    let _rng = torch_rng();
    let model = tiny_model(2);
    let dir = tempfile::tempdir().expect("temp dir");
    let mut tensors: Vec<(String, Tensor)> = model.var_store().variables().into_iter().collect();
    tensors.push(("step".into(), Tensor::from_slice(&[7i64])));
    for kind in [Kind::Float, Kind::BFloat16] {
        let path = dir.path().join(format!("{kind:?}.safetensors"));
        refa_loss::model::write_safetensors(&path, &tensors, kind).expect("streamed");
        let in_memory =
            refa_loss::model::safetensors_bytes(tensors.iter().map(|(n, t)| (n.as_str(), t)), kind)
                .expect("in memory");
        assert_eq!(std::fs::read(&path).expect("read"), in_memory, "{kind:?}");
    }
}

/// Prefix sharing trains exactly as the plain layout does: the same losses and the same
/// weights after three steps (f32, no dropout), in fewer padded positions.
#[test]
fn prefix_sharing_trains_like_the_plain_layout() {
    let _rng = torch_rng();
    let run = |share_prompts: bool| {
        let dir = tempfile::tempdir().expect("temp dir");
        // The shared pass keeps its layers in the graph; the plain one recomputes them, which
        // changes nothing in the values.
        let base = config(dir.path(), 3);
        let config = TrainConfig {
            share_prompts,
            recompute: if share_prompts {
                Recompute::None
            } else {
                base.recompute
            },
            ..base
        };
        let mut trainer = sample_trainer(9, config);
        let steps: Vec<_> = (0..3)
            .map(|_| trainer.train_step().expect("step"))
            .collect();
        let weights =
            trainer.model().var_store().variables()["model.layers.0.mlp.up_proj.weight"].copy();
        (steps, weights)
    };
    let (plain, plain_weights) = run(false);
    let (shared, shared_weights) = run(true);
    for (a, b) in plain.iter().zip(&shared) {
        assert!(
            (a.loss - b.loss).abs() < 1e-5,
            "step {}: {} vs {}",
            a.step,
            a.loss,
            b.loss
        );
        assert!((a.grad_norm - b.grad_norm).abs() < 1e-4 * a.grad_norm.max(1.0));
    }
    let worst = (&plain_weights - &shared_weights)
        .abs()
        .max()
        .double_value(&[]);
    assert!(worst < 1e-5, "weights differ by {worst:e}");
}

/// The dataset layouts people download, read by name and by `auto`, from a folder of shards:
/// multi-response sets with reward-model scores, pairs as strings or message lists (with
/// and without scores), the simple and the UltraFeedback layouts; a prompt with a system
/// message keeps it as context, which a checkpoint's template frames and a built-in one
/// refuses.
#[test]
fn hub_dataset_layouts_are_read_by_name_and_by_auto() {
    let dir = tempfile::tempdir().expect("temp dir");
    let shards = dir.path().join("data");
    std::fs::create_dir_all(&shards).expect("folder");
    let multi = r#"{"prompt": "Name a colour.", "all_generated_responses": ["Red.", "Blue is one.", "Green"], "all_rm_scores": [0.5, 2.25, -1.0]}"#;
    let pair_text = r#"{"prompt": "2+2?", "chosen": "4", "rejected": "5", "score_chosen": 9.0, "score_rejected": 2.0}"#;
    let pair_messages = r#"{"prompt": "Hi", "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]}"#;
    let simple = r#"{"prompt": [{"role": "user", "content": "Why?"}], "responses": [{"text": "Because.", "score": 1}, {"text": "No idea.", "score": 0}]}"#;
    std::fs::write(
        shards.join("train-00000-of-00002.jsonl"),
        format!("{multi}\n{pair_text}\n"),
    )
    .expect("shard");
    std::fs::write(
        shards.join("train-00001-of-00002.jsonl"),
        format!("{pair_messages}\n{simple}\n"),
    )
    .expect("shard");
    std::fs::write(shards.join("README.md"), "not data").expect("other file");
    let report = read_jsonl(&shards, DataFormat::Auto, ScoreField::Overall, false).expect("auto");
    let summary: Vec<(String, Vec<(String, f64)>)> = report
        .records
        .iter()
        .map(|r| {
            (
                r.prompt.clone(),
                r.responses
                    .iter()
                    .map(|x| (x.text.clone(), x.score))
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                "Name a colour.".into(),
                vec![
                    ("Red.".into(), 0.5),
                    ("Blue is one.".into(), 2.25),
                    ("Green".into(), -1.0)
                ]
            ),
            ("2+2?".into(), vec![("4".into(), 9.0), ("5".into(), 2.0)]),
            (
                "Hi".into(),
                vec![("Hello!".into(), 1.0), ("Go away.".into(), 0.0)]
            ),
            (
                "Why?".into(),
                vec![("Because.".into(), 1.0), ("No idea.".into(), 0.0)]
            ),
        ]
    );
    let by_name = parse_jsonl(
        multi,
        "m",
        DataFormat::MultiResponse,
        ScoreField::Overall,
        false,
    )
    .expect("multi");
    assert_eq!(by_name.records[0].responses.len(), 3);
    let wrong =
        parse_jsonl(multi, "m", DataFormat::Pairwise, ScoreField::Overall, false).unwrap_err();
    assert!(wrong.to_string().contains("m, line 1"), "{wrong}");
    let mismatched =
        r#"{"prompt": "p", "all_generated_responses": ["a", "b"], "all_rm_scores": [1.0]}"#;
    let err = parse_jsonl(
        mismatched,
        "m",
        DataFormat::Auto,
        ScoreField::Overall,
        false,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("2 responses but 1 scores"),
        "{err}"
    );
    let system = r#"{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "chosen": "Hi.", "rejected": "Hello there, how are you doing today?"}"#;
    // A system turn before the user's: kept as context, framed only by a checkpoint's own
    // template (the built-in ones have no system turn).
    let records = parse_jsonl(system, "s", DataFormat::Auto, ScoreField::Overall, false)
        .expect("a system prompt")
        .records;
    assert_eq!(records[0].prompt, "Hi");
    assert_eq!(
        records[0].context,
        vec![ChatMessage::new("system", "Be brief.")]
    );
    let err = tokenize_records(&records, &tokenizer(), 128, 256).unwrap_err();
    assert!(err.to_string().contains("earlier turns"), "{err}");
    let templated = tokenizer().with_jinja(JinjaTemplate::new(
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}{{ '<<SYS>> ' + m.content + ' <</SYS>> ' }}{% elif m.role == 'user' %}{{ '[INST] ' + m.content + ' [/INST]' }}{% else %}{{ m.content + eos_token }}{% endif %}{% endfor %}",
        "<s>",
        "</s>",
    ));
    let (examples, _) =
        tokenize_records(&records, &templated, 128, 256).expect("with the template");
    let rendered = templated
        .decode(&examples[0].responses[0].prompt)
        .expect("decode");
    // The bundled 512-token vocabulary has no capital B: it decodes as unknown.
    assert!(rendered.contains("brief. <</SS>> [INST] Hi"), "{rendered}");
    let assistant_turn = r#"{"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], "chosen": "a", "rejected": "b"}"#;
    let err = parse_jsonl(
        assistant_turn,
        "s",
        DataFormat::Auto,
        ScoreField::Overall,
        false,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("must end with the user's turn"),
        "{err}"
    );
}
