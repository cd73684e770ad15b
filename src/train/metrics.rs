//! What a training step reports, and the JSON-lines log it goes to.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use crate::error::{RefaError, Result};
use crate::loss::MetricsSummary;

/// Averages of [`MetricsSummary`] over the micro-batches of a step (or an evaluation).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepMetrics {
    /// Optimizer step (0 for an evaluation before training).
    pub step: i64,
    /// Mean loss.
    pub loss: f64,
    /// Mean `score_positive − score_negative` (TRL: `rewards/margins`).
    pub margin: f64,
    /// Mean score of positives (`logps/positive`).
    pub score_positive: f64,
    /// Mean score of negatives (`logps/negative`).
    pub score_negative: f64,
    /// Mean positive probability mass.
    pub positive_mass: f64,
    /// Fraction of prompts whose best response scores highest.
    pub accuracy: f64,
    /// Mean `P(EOS)` where responses end with EOS (`eos/prob`).
    pub eos_probability: f64,
    /// Mean response length in tokens (`lengths/mean`).
    pub mean_length: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate of the step.
    pub lr: f64,
    /// Real (non-padding) tokens of the whole optimizer step per second of it, the device's
    /// work included (the step ends with a read of its results).
    pub tokens_per_s: f64,
    /// The same with padding counted: `N·T` positions of every micro-batch per second.
    pub tokens_per_s_padded: f64,
}

/// One number a step reports: its key in `metrics.jsonl` (TRL-like; evaluations prefix it
/// with `eval/`), a short label for tables and plots, and how it is read. The lists
/// [`StepMetrics::LOSS_METRICS`] and [`StepMetrics::TRAINING_METRICS`] are the only places
/// that name the metrics: the log, the accumulation over micro-batches, the plots and the
/// example's summary table all iterate them.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    /// The key in `metrics.jsonl`, e.g. `"rewards/margins"`.
    pub key: &'static str,
    /// A label for tables and plots, e.g. `"margin"`.
    pub label: &'static str,
    /// Reads it from a step's metrics.
    pub get: fn(&StepMetrics) -> f64,
    set: fn(&mut StepMetrics) -> &mut f64,
    /// Its value in one micro-batch's summary (`None`: no data, left out of the mean).
    of_batch: fn(&MetricsSummary, f64) -> Option<f64>,
}

macro_rules! metric {
    ($key:literal, $label:literal, $field:ident, $of_batch:expr) => {
        Metric {
            key: $key,
            label: $label,
            get: |m| m.$field,
            set: |m| &mut m.$field,
            of_batch: $of_batch,
        }
    };
}

impl StepMetrics {
    /// The statistics of the loss, averaged over a step's micro-batches (or an evaluation).
    pub const LOSS_METRICS: [Metric; 8] = [
        metric!("loss", "loss", loss, |s, _| Some(s.loss)),
        metric!("rewards/margins", "margin", margin, |s, _| s.margin),
        metric!(
            "logps/positive",
            "score positive",
            score_positive,
            |s, _| s.score_positive
        ),
        metric!(
            "logps/negative",
            "score negative",
            score_negative,
            |s, _| s.score_negative
        ),
        metric!(
            "rewards/positive_mass",
            "positive mass",
            positive_mass,
            |s, _| s.positive_mass
        ),
        metric!("rewards/accuracies", "accuracy", accuracy, |s, _| s
            .accuracy),
        metric!("eos/prob", "eos prob", eos_probability, |s, _| s
            .eos_probability),
        metric!(
            "lengths/mean",
            "mean length",
            mean_length,
            |_, length| Some(length)
        ),
    ];

    /// What only a training step has.
    pub const TRAINING_METRICS: [Metric; 4] = [
        metric!("grad_norm", "gradient norm", grad_norm, |_, _| None),
        metric!("lr", "learning rate", lr, |_, _| None),
        metric!("tokens_per_s", "tokens/s", tokens_per_s, |_, _| None),
        metric!(
            "tokens_per_s_padded",
            "tokens/s (padded)",
            tokens_per_s_padded,
            |_, _| None
        ),
    ];

    /// The values of [`LOSS_METRICS`](Self::LOSS_METRICS), in its order.
    pub(crate) fn loss_values(&self) -> Vec<f64> {
        Self::LOSS_METRICS.iter().map(|m| (m.get)(self)).collect()
    }

    /// Sets the values of [`LOSS_METRICS`](Self::LOSS_METRICS) from `values`, in its order.
    pub(crate) fn set_loss_values(&mut self, values: &[f64]) {
        for (metric, value) in Self::LOSS_METRICS.iter().zip(values) {
            *(metric.set)(self) = *value;
        }
    }

    /// The metric with `key` in either list.
    pub fn metric(key: &str) -> Option<Metric> {
        Self::LOSS_METRICS
            .iter()
            .chain(&Self::TRAINING_METRICS)
            .find(|m| m.key == key)
            .copied()
    }
}

/// Running means of the [`StepMetrics::LOSS_METRICS`], one per metric; a `None` value is
/// left out of its mean.
#[derive(Debug, Default)]
pub(crate) struct MetricsAccumulator {
    means: [(f64, f64); 8],
}

impl MetricsAccumulator {
    pub fn add(&mut self, summary: &MetricsSummary, mean_length: f64) {
        for (metric, (sum, count)) in StepMetrics::LOSS_METRICS.iter().zip(&mut self.means) {
            if let Some(value) = (metric.of_batch)(summary, mean_length) {
                *sum += value;
                *count += 1.0;
            }
        }
    }

    pub fn finish(&self, step: i64) -> StepMetrics {
        let mut metrics = StepMetrics {
            step,
            ..StepMetrics::default()
        };
        for (metric, &(sum, count)) in StepMetrics::LOSS_METRICS.iter().zip(&self.means) {
            *(metric.set)(&mut metrics) = if count > 0.0 { sum / count } else { f64::NAN };
        }
        metrics
    }
}

impl StepMetrics {
    /// One JSON object with TRL-like names; `prefix` is `""` for training (the training
    /// metrics included), `"eval/"` for evaluations. NaN (a metric with no data) is written
    /// as `null`.
    pub fn to_json(&self, prefix: &str) -> String {
        let mut object = serde_json::Map::new();
        object.insert("step".into(), serde_json::json!(self.step));
        let training: &[Metric] = if prefix.is_empty() {
            &Self::TRAINING_METRICS
        } else {
            &[]
        };
        for metric in Self::LOSS_METRICS.iter().chain(training) {
            let value = (metric.get)(self);
            let json = if value.is_finite() {
                serde_json::json!(value)
            } else {
                serde_json::Value::Null
            };
            let key = if training.iter().any(|m| m.key == metric.key) {
                metric.key.to_string()
            } else {
                format!("{prefix}{}", metric.key)
            };
            object.insert(key, json);
        }
        serde_json::Value::Object(object).to_string()
    }
}

/// Appends one JSON line per record to a file (the trainer's `metrics.jsonl`): each line in
/// one `write(2)` to a file opened with `O_APPEND`, so the kernel places every line whole at
/// the end, and no line is lost or split whatever else appends to the file.
#[derive(Debug)]
pub struct MetricsLog {
    file: File,
    path: std::path::PathBuf,
    /// The steps the log holds an evaluation of.
    evaluations: BTreeSet<i64>,
}

impl MetricsLog {
    /// Opens (appending) `path`, noting the evaluations it already holds.
    pub fn open(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| RefaError::io(path, &e))?;
        let text = std::fs::read(path).map_err(|e| RefaError::io(path, &e))?;
        let evaluations = text
            .split(|&b| b == b'\n')
            .filter_map(evaluation_step)
            .collect();
        Ok(MetricsLog {
            file,
            path: path.to_path_buf(),
            evaluations,
        })
    }

    /// Whether the log holds an evaluation of `step`.
    pub fn has_evaluation(&self, step: i64) -> bool {
        self.evaluations.contains(&step)
    }

    /// Drops every record of a step after `step` (what a run killed after its last
    /// checkpoint logged, and a resumed run logs again), atomically: the kept lines go to a
    /// hidden temporary file that is then renamed over the log. Lines that do not parse are
    /// kept as they are.
    pub fn truncate_after(&mut self, step: i64) -> Result<()> {
        let path = self.path.clone();
        let text = std::fs::read(&path).map_err(|e| RefaError::io(&path, &e))?;
        let kept: Vec<&[u8]> = text
            .split(|&b| b == b'\n')
            .filter(|line| !line.is_empty())
            .filter(|line| {
                let record: std::result::Result<serde_json::Value, _> =
                    serde_json::from_slice(line);
                let logged_step = record.ok().and_then(|r| r.get("step")?.as_i64());
                logged_step.is_none_or(|s| s <= step)
            })
            .collect();
        let mut content = kept.join(&b'\n');
        if !content.is_empty() {
            content.push(b'\n');
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let temporary = path.with_file_name(format!(".{name}.partial"));
        std::fs::write(&temporary, &content)
            .and_then(|()| File::open(&temporary)?.sync_all())
            .and_then(|()| std::fs::rename(&temporary, &path))
            .map_err(|e| RefaError::io(&path, &e))?;
        *self = MetricsLog::open(&path)?;
        Ok(())
    }

    /// Appends `line` (one JSON record, without its newline) in a single `write(2)`.
    pub fn write(&mut self, line: &str) -> Result<()> {
        let mut record = Vec::with_capacity(line.len() + 1);
        record.extend_from_slice(line.as_bytes());
        record.push(b'\n');
        let written = loop {
            match self.file.write(&record) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                result => break result.map_err(|e| RefaError::io(&self.path, &e))?,
            }
        };
        if written != record.len() {
            return Err(RefaError::io(
                &self.path,
                &std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    format!("{written} of a record's {} bytes written", record.len()),
                ),
            ));
        }
        if let Some(step) = evaluation_step(line.as_bytes()) {
            self.evaluations.insert(step);
        }
        Ok(())
    }
}

/// The step of a record that is an evaluation (it has `eval/` keys).
fn evaluation_step(line: &[u8]) -> Option<i64> {
    let record: serde_json::Value = serde_json::from_slice(line).ok()?;
    let object = record.as_object()?;
    if !object.keys().any(|k| k.starts_with("eval/")) {
        return None;
    }
    object.get("step")?.as_i64()
}
