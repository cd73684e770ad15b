//! Checkpoints: writing them atomically (with the optimizer shards of a data-parallel job
//! staged and moved in), pruning, finding the newest, and resuming from one.

use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

use crate::data::DataOrder;
use crate::error::{RefaError, Result};
use crate::model::{remove_folder_atomically, CheckpointFile, CheckpointReader, SaveOptions};
use crate::train::state::TrainerState;
use crate::train::trainer::Trainer;

impl Trainer {
    /// Writes `checkpoint-{step}` (a Hugging Face checkpoint plus the trainer's state, with
    /// this run's id) atomically, then deletes this run's older checkpoints beyond
    /// `keep_checkpoints`; another run's checkpoints in the folder are never deleted, nor
    /// replaced (a checkpoint of this step written by another run stops the save with an
    /// error). Like [`run`](Self::run) it first makes the output folder this run's.
    ///
    /// In a data-parallel job every rank calls it: a rank whose optimizer state is its own
    /// (ZeRO-1) writes it to a hidden staging folder, all ranks wait for each other, rank 0
    /// moves the shards into the checkpoint it writes and renames it into place, and all
    /// wait again. A rank lost midway fails the others' wait, and no checkpoint appears.
    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        self.claim_output()?;
        let folder = self.config.output_dir.join(checkpoint_name(self.step));
        let staging = self
            .config
            .output_dir
            .join(format!(".shards-{}", checkpoint_name(self.step)));
        let Some(parallel) = &self.parallel else {
            return self.write_checkpoint(&folder, Vec::new());
        };
        // With ZeRO-1 the other ranks stage their shards for rank 0 to move in; rank 0's own
        // goes straight into the checkpoint it writes.
        if parallel.shards_optimizer() && !parallel.is_main() {
            let name = parallel.optimizer_file();
            std::fs::create_dir_all(&staging).map_err(|e| RefaError::io(&staging, &e))?;
            let partial = staging.join(format!(".{name}.partial"));
            let tensors = self.optimizer.state_tensors();
            crate::model::write_safetensors(&partial, &tensors, Kind::Float)?;
            let path = staging.join(&name);
            std::fs::rename(&partial, &path).map_err(|e| RefaError::io(&path, &e))?;
        }
        parallel.barrier()?;
        let result = if parallel.is_main() {
            let moved = staged_shards(&staging, parallel.world())?;
            let written = self.write_checkpoint(&folder, moved);
            if staging.exists() {
                let _ = remove_folder_atomically(&staging);
            }
            written
        } else {
            Ok(folder.clone())
        };
        parallel.barrier()?;
        result
    }

    /// Rank 0's (or the single process's) part of [`save_checkpoint`](Self::save_checkpoint):
    /// the model, the trainer's state, the optimizer state (its own, or `extra` shards) and
    /// the adapters, then pruning.
    fn write_checkpoint(
        &self,
        folder: &Path,
        extra: Vec<(String, CheckpointFile)>,
    ) -> Result<PathBuf> {
        let state = TrainerState {
            step: self.step,
            epoch: self.order.epoch,
            position: self.order.position,
            seed: self.config.seed,
            lora: !self.model.adapter_parameters().is_empty(),
            train_examples: Some(self.train.len()),
            data_fingerprint: Some(self.data_fingerprint.clone()),
            max_steps: Some(self.config.max_steps),
            schedule: Some(self.config.schedule),
            run_id: Some(self.run_id.clone()),
        };
        self.check_not_another_runs(folder)?;
        // The optimizer state and adapters are streamed tensor by tensor like the weights.
        let tensors = |tensors| CheckpointFile::Tensors {
            tensors,
            kind: Kind::Float,
        };
        let mut files: Vec<(String, CheckpointFile)> = vec![(
            TrainerState::FILE.to_string(),
            CheckpointFile::Bytes(state.to_json()?.into_bytes()),
        )];
        let own_file = match &self.parallel {
            Some(parallel) => parallel.optimizer_file(),
            None => "optimizer.safetensors".to_string(),
        };
        files.push((own_file, tensors(self.optimizer.state_tensors())));
        files.extend(extra);
        if state.lora {
            files.push((
                "adapters.safetensors".to_string(),
                tensors(self.model.adapter_parameters()),
            ));
        }
        let options = SaveOptions {
            kind: self.model.kind(),
            ..SaveOptions::default()
        };
        let (names, contents): (Vec<String>, Vec<CheckpointFile>) = files.into_iter().unzip();
        let files = names.iter().map(String::as_str).zip(contents).collect();
        self.model.save_pretrained_with(folder, options, files)?;
        self.prune_checkpoints(folder)?;
        Ok(folder.to_path_buf())
    }

    /// Refuses to replace `folder` when it is a checkpoint of another run (one whose state
    /// names another run id; a checkpoint of this run, or one from before run ids, is
    /// replaced as before).
    fn check_not_another_runs(&self, folder: &Path) -> Result<()> {
        let owner = TrainerState::read(folder).ok().and_then(|s| s.run_id);
        match owner {
            Some(owner) if owner != self.run_id => Err(RefaError::config(
                folder,
                format!(
                    "a checkpoint of another run (run id {owner}; this run is {}): saving \
                     would replace it; move it away or choose another output folder",
                    self.run_id
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Continues from a checkpoint written by [`save_checkpoint`](Self::save_checkpoint):
    /// weights (or LoRA adapters), optimizer moments, step and data position. The next
    /// steps then produce what an uninterrupted run would have.
    ///
    /// A checkpoint of other training data (another fingerprint, or a position beyond this
    /// data) is refused. Returns notes on what this run changes: a learning-rate schedule or
    /// a step count other than the checkpoint's. The run keeps the checkpoint's run id (its
    /// earlier checkpoints stay subject to pruning), and its log drops the records of
    /// `metrics.jsonl` after the checkpoint's step (a killed run logged them; they run
    /// again) before the next record is written.
    pub fn resume(&mut self, folder: impl AsRef<Path>) -> Result<Vec<String>> {
        let folder = folder.as_ref();
        let state = TrainerState::read(folder)?;
        self.check_resumable(folder, &state)?;
        let read_file = |file: &str| -> Result<Vec<(String, Tensor)>> {
            let path = folder.join(file);
            Tensor::read_safetensors(&path).map_err(|e| RefaError::config(&path, e))
        };
        if state.lora {
            copy_into(
                &self.model.adapter_parameters(),
                &read_file("adapters.safetensors")?,
            )?;
        } else {
            self.model.load_weights(&CheckpointReader::open(folder)?)?;
        }
        let optimizer = self.read_optimizer_state(folder)?;
        let device = self.model.lm_head_weight().device();
        self.optimizer.load_state(|name| {
            let found = optimizer.iter().find(|(n, _)| n == name);
            found.map(|(_, t)| t.to_device(device)).ok_or_else(|| {
                RefaError::checkpoint(name, "missing from the checkpoint's optimizer state")
            })
        })?;
        self.step = state.step;
        self.order = DataOrder::resume(self.train.len(), state.seed, state.epoch, state.position);
        if let Some(run_id) = &state.run_id {
            self.run_id.clone_from(run_id);
        }
        self.resumed = true;
        if self.output_claimed && self.is_main() {
            // Settled already (an evaluation came first): drop the later records now.
            self.log.truncate_after(self.step)?;
        }
        Ok(self.schedule_notes(&state))
    }

    /// The optimizer tensors this process needs, from `optimizer.safetensors` or from the
    /// ZeRO-1 shards (`optimizer-R-of-N.safetensors`) of a job of any size: each file is read
    /// in turn and only the names this process's optimizer holds are kept.
    fn read_optimizer_state(&self, folder: &Path) -> Result<Vec<(String, Tensor)>> {
        let wanted: std::collections::HashSet<String> = self
            .optimizer
            .state_tensors()
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        let mut files: Vec<PathBuf> = std::fs::read_dir(folder)
            .map_err(|e| RefaError::io(folder, &e))?
            .filter_map(|e| Some(e.ok()?.path()))
            .filter(|p| {
                let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
                name.is_some_and(|n| n.starts_with("optimizer") && n.ends_with(".safetensors"))
            })
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(RefaError::config(
                folder,
                "a checkpoint without optimizer state",
            ));
        }
        let mut kept = Vec::new();
        for path in files {
            let tensors =
                Tensor::read_safetensors(&path).map_err(|e| RefaError::config(&path, e))?;
            kept.extend(
                tensors
                    .into_iter()
                    .filter(|(name, _)| wanted.contains(name)),
            );
        }
        Ok(kept)
    }

    /// Refuses a checkpoint whose data position belongs to other training data.
    fn check_resumable(&self, folder: &Path, state: &TrainerState) -> Result<()> {
        let path = folder.join(TrainerState::FILE);
        let other_data = |what: String| {
            RefaError::config(
                &path,
                format!("{what}: resume with the same data and tokenization settings"),
            )
        };
        if let Some(fingerprint) = &state.data_fingerprint {
            if *fingerprint != self.data_fingerprint {
                return Err(other_data(format!(
                    "written for other training data ({} examples, fingerprint {fingerprint}); \
                     this run has {} examples (fingerprint {})",
                    state.train_examples.unwrap_or(0),
                    self.train.len(),
                    self.data_fingerprint
                )));
            }
        }
        if state.position > self.train.len() {
            return Err(other_data(format!(
                "its data position {} lies beyond this run's {} training examples",
                state.position,
                self.train.len()
            )));
        }
        Ok(())
    }

    /// What this run changes against the checkpoint's schedule, in words.
    fn schedule_notes(&self, state: &TrainerState) -> Vec<String> {
        let mut notes = Vec::new();
        if let Some(max_steps) = state.max_steps.filter(|&m| m != self.config.max_steps) {
            notes.push(format!(
                "max_steps changes from {max_steps} to {}",
                self.config.max_steps
            ));
        }
        if let Some(schedule) = state.schedule.filter(|s| *s != self.config.schedule) {
            notes.push(format!(
                "the learning-rate schedule changes from {schedule:?} to {:?}: steps 1..={} \
                 followed the old one, the steps from {} on follow the new one",
                self.config.schedule,
                state.step,
                state.step + 1
            ));
        }
        notes
    }

    /// Deletes this run's oldest checkpoints (by step) so that `keep_checkpoints` remain,
    /// `written` among them whatever its step. Checkpoints of other runs (another run id in
    /// their state, or none) are not counted and never deleted.
    fn prune_checkpoints(&self, written: &Path) -> Result<()> {
        if !self.is_main() {
            return Ok(());
        }
        let own: Vec<PathBuf> = checkpoints(&self.config.output_dir)
            .into_iter()
            .map(|(_, path)| path)
            .filter(|path| path != written)
            .filter(|path| {
                let state = TrainerState::read(path).ok();
                state.and_then(|s| s.run_id).as_deref() == Some(self.run_id.as_str())
            })
            .collect();
        let keep_others = self.config.keep_checkpoints.max(1) - 1;
        let excess = own.len().saturating_sub(keep_others);
        for path in &own[..excess] {
            remove_folder_atomically(path)?;
        }
        Ok(())
    }
}

/// `checkpoint-{step}`.
pub fn checkpoint_name(step: i64) -> String {
    format!("checkpoint-{step}")
}

/// The newest `checkpoint-*` folder in `output_dir`.
pub fn latest_checkpoint(output_dir: &Path) -> Option<PathBuf> {
    checkpoints(output_dir).pop().map(|(_, path)| path)
}

/// The `checkpoint-{step}` folders of `output_dir`, oldest first (hidden staging and
/// deletion folders do not count; an unreadable folder has none).
pub(super) fn checkpoints(output_dir: &Path) -> Vec<(i64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(output_dir) else {
        return Vec::new();
    };
    let mut found: Vec<(i64, PathBuf)> = entries
        .filter_map(|e| {
            let name = e.ok()?.file_name().to_str()?.to_string();
            let step: i64 = name.strip_prefix("checkpoint-")?.parse().ok()?;
            Some((step, output_dir.join(name)))
        })
        .collect();
    found.sort_by_key(|(step, _)| *step);
    found
}

/// Copies named tensors from `source` into the variables `targets`.
fn copy_into(targets: &[(String, Tensor)], source: &[(String, Tensor)]) -> Result<()> {
    tch::no_grad(|| {
        for (name, target) in targets {
            let (_, value) = source
                .iter()
                .find(|(n, _)| n == name)
                .ok_or_else(|| RefaError::checkpoint(name, "missing"))?;
            target.shallow_clone().f_copy_(value)?;
        }
        Ok(())
    })
}

/// The optimizer shards the other ranks of a job of `world` staged in `staging` (none when
/// the folder does not exist), to be moved into rank 0's checkpoint. Files of another world
/// size (left by an earlier, failed job) are not taken.
fn staged_shards(staging: &Path, world: usize) -> Result<Vec<(String, CheckpointFile)>> {
    if !staging.exists() {
        return Ok(Vec::new());
    }
    let suffix = format!("-of-{world:05}.safetensors");
    let mut names: Vec<String> = std::fs::read_dir(staging)
        .map_err(|e| RefaError::io(staging, &e))?
        .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.starts_with("optimizer-") && n.ends_with(&suffix))
        .collect();
    names.sort();
    Ok(names
        .into_iter()
        .map(|name| {
            let path = staging.join(&name);
            (name, CheckpointFile::Moved(path))
        })
        .collect())
}
