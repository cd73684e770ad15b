//! What a training step reports, and the JSON-lines log it goes to.

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

/// Running means of [`MetricsSummary`] values; a `None` value is left out of its mean.
#[derive(Debug, Default)]
pub(crate) struct MetricsAccumulator {
    sums: [f64; 8],
    counts: [f64; 8],
}

impl MetricsAccumulator {
    pub fn add(&mut self, m: &MetricsSummary, mean_length: f64) {
        let values = [
            Some(m.loss),
            m.margin,
            m.score_positive,
            m.score_negative,
            m.positive_mass,
            m.accuracy,
            m.eos_probability,
            Some(mean_length),
        ];
        for (i, value) in values.into_iter().enumerate() {
            if let Some(v) = value {
                self.sums[i] += v;
                self.counts[i] += 1.0;
            }
        }
    }

    pub fn finish(&self, step: i64) -> StepMetrics {
        let mean = |i: usize| {
            if self.counts[i] > 0.0 {
                self.sums[i] / self.counts[i]
            } else {
                f64::NAN
            }
        };
        StepMetrics {
            step,
            loss: mean(0),
            margin: mean(1),
            score_positive: mean(2),
            score_negative: mean(3),
            positive_mass: mean(4),
            accuracy: mean(5),
            eos_probability: mean(6),
            mean_length: mean(7),
            ..StepMetrics::default()
        }
    }
}

impl StepMetrics {
    /// One JSON object with TRL-like names; `prefix` is `""` for training, `"eval/"` for
    /// evaluations. NaN (a metric with no data) is written as `null`.
    pub fn to_json(&self, prefix: &str) -> String {
        let number = |v: f64| {
            if v.is_finite() {
                serde_json::json!(v)
            } else {
                serde_json::Value::Null
            }
        };
        let mut object = serde_json::Map::new();
        object.insert("step".into(), serde_json::json!(self.step));
        for (name, value) in [
            ("loss", self.loss),
            ("rewards/margins", self.margin),
            ("logps/positive", self.score_positive),
            ("logps/negative", self.score_negative),
            ("rewards/positive_mass", self.positive_mass),
            ("rewards/accuracies", self.accuracy),
            ("eos/prob", self.eos_probability),
            ("lengths/mean", self.mean_length),
        ] {
            object.insert(format!("{prefix}{name}"), number(value));
        }
        if prefix.is_empty() {
            for (name, value) in [
                ("grad_norm", self.grad_norm),
                ("lr", self.lr),
                ("tokens_per_s", self.tokens_per_s),
                ("tokens_per_s_padded", self.tokens_per_s_padded),
            ] {
                object.insert(name.into(), number(value));
            }
        }
        serde_json::Value::Object(object).to_string()
    }
}

/// Appends one JSON line per record to a file (the trainer's `metrics.jsonl`), flushed at once.
#[derive(Debug)]
pub struct MetricsLog {
    file: File,
    path: std::path::PathBuf,
}

impl MetricsLog {
    /// Opens (appending) `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| RefaError::io(path, &e))?;
        Ok(MetricsLog {
            file,
            path: path.to_path_buf(),
        })
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

    /// Writes one line.
    pub fn write(&mut self, line: &str) -> Result<()> {
        writeln!(self.file, "{line}")
            .and_then(|_| self.file.flush())
            .map_err(|e| RefaError::io(&self.path, &e))
    }
}
