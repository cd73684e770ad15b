//! Hugging Face safetensors checkpoints: memory-mapped reading, sharded atomic writing.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors, View};
use tch::{Device, Kind, Tensor};

use crate::error::{RefaError, Result};

const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";

/// The tensors of a checkpoint folder (`model.safetensors`, or the shards listed by
/// `model.safetensors.index.json`), memory-mapped: reading one tensor copies only that
/// tensor, so loading a model never needs twice its size in host memory.
#[derive(Debug)]
pub struct CheckpointReader {
    shards: Vec<(PathBuf, Mmap)>,
    location: BTreeMap<String, usize>,
}

impl CheckpointReader {
    /// Opens every shard of the checkpoint in `folder`.
    pub fn open(folder: impl AsRef<Path>) -> Result<Self> {
        let folder = folder.as_ref();
        let files = shard_files(folder)?;
        let mut shards = Vec::with_capacity(files.len());
        let mut location = BTreeMap::new();
        for (index, path) in files.into_iter().enumerate() {
            let file = File::open(&path).map_err(|e| RefaError::io(&path, &e))?;
            // SAFETY: the map is read-only; a checkpoint rewritten underneath a running
            // reader is not supported (writers here replace folders by rename instead).
            let map = unsafe { Mmap::map(&file) }.map_err(|e| RefaError::io(&path, &e))?;
            let tensors =
                SafeTensors::deserialize(&map).map_err(|e| RefaError::config(&path, e))?;
            for name in tensors.names() {
                location.insert(name.to_string(), index);
            }
            shards.push((path, map));
        }
        Ok(CheckpointReader { shards, location })
    }

    /// Names of every tensor, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.location.keys().map(String::as_str)
    }

    /// Shape of a tensor.
    pub fn shape(&self, name: &str) -> Result<Vec<i64>> {
        let (path, map) = self.shard_of(name)?;
        let tensors = SafeTensors::deserialize(map).map_err(|e| RefaError::config(path, e))?;
        let view = tensors
            .tensor(name)
            .map_err(|e| RefaError::checkpoint(name, e.to_string()))?;
        Ok(view.shape().iter().map(|&d| d as i64).collect())
    }

    /// Reads one tensor onto `device` in `kind`.
    pub fn read(&self, name: &str, device: Device, kind: Kind) -> Result<Tensor> {
        let (path, map) = self.shard_of(name)?;
        let tensors = SafeTensors::deserialize(map).map_err(|e| RefaError::config(path, e))?;
        let view = tensors
            .tensor(name)
            .map_err(|e| RefaError::checkpoint(name, e.to_string()))?;
        let stored = kind_of(view.dtype()).ok_or_else(|| {
            RefaError::checkpoint(name, format!("unsupported dtype {:?}", view.dtype()))
        })?;
        // Casting integer bit patterns to floats would load garbage weights silently.
        if crate::validate::is_float(kind) && !crate::validate::is_float(stored) {
            return Err(RefaError::checkpoint(
                name,
                format!(
                    "stored as {:?}, but the model needs floating-point values ({kind:?})",
                    view.dtype()
                ),
            ));
        }
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let host = Tensor::f_from_data_size(view.data(), &shape, stored)?;
        Ok(host.f_to_device(device)?.f_to_kind(kind)?)
    }

    fn shard_of(&self, name: &str) -> Result<&(PathBuf, Mmap)> {
        let index = self
            .location
            .get(name)
            .ok_or_else(|| RefaError::checkpoint(name, "missing from the checkpoint"))?;
        Ok(&self.shards[*index])
    }
}

/// The shard files of a checkpoint folder, from the index when there is one.
fn shard_files(folder: &Path) -> Result<Vec<PathBuf>> {
    let index = folder.join(INDEX_FILE);
    if !index.exists() {
        let single = folder.join(SINGLE_FILE);
        if !single.exists() {
            let message = format!("neither {SINGLE_FILE} nor {INDEX_FILE} is here");
            return Err(RefaError::Io {
                path: folder.display().to_string(),
                message,
                source: None,
            });
        }
        return Ok(vec![single]);
    }
    let text = std::fs::read_to_string(&index).map_err(|e| RefaError::io(&index, &e))?;
    // A UTF-8 byte-order mark (some editors write one) is not JSON: skipped, as config.json's.
    let json: serde_json::Value = serde_json::from_str(text.trim_start_matches('\u{feff}'))
        .map_err(|e| RefaError::config(&index, e))?;
    let map = json["weight_map"]
        .as_object()
        .ok_or_else(|| RefaError::config(&index, "no `weight_map` object"))?;
    let mut files: Vec<PathBuf> = map
        .values()
        .filter_map(|v| v.as_str())
        .map(|f| folder.join(f))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F16 => Kind::Half,
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::BFloat16 => Dtype::BF16,
        Kind::Half => Dtype::F16,
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Bool => Dtype::BOOL,
        _ => return None,
    })
}

/// How a checkpoint is written.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SaveOptions {
    /// Kind of the stored floating-point tensors (bf16 or f32 are what Hugging Face expects).
    pub kind: Kind,
    /// Largest shard in bytes; a checkpoint that fits in one is a single `model.safetensors`.
    /// Default 5 GB, as `save_pretrained`.
    pub shard_bytes: u64,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            kind: Kind::BFloat16,
            shard_bytes: 5_000_000_000,
        }
    }
}

/// One tensor's bytes on the host, for the safetensors writer.
struct HostTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// The kind and safetensors dtype `tensor` is stored as: `kind` for floating-point tensors,
/// their own kind for the others.
fn stored_kind(name: &str, tensor: &Tensor, kind: Kind) -> Result<(Kind, Dtype)> {
    let kind = if tensor.is_floating_point() {
        kind
    } else {
        tensor.kind()
    };
    let dtype = dtype_of(kind)
        .ok_or_else(|| RefaError::checkpoint(name, format!("cannot store kind {kind:?}")))?;
    Ok((kind, dtype))
}

impl HostTensor {
    fn new(name: &str, tensor: &Tensor, kind: Kind) -> Result<Self> {
        let (kind, dtype) = stored_kind(name, tensor, kind)?;
        let host = tensor
            .detach()
            .f_to_device(Device::Cpu)?
            .f_to_kind(kind)?
            .f_contiguous()?;
        let mut bytes = vec![0u8; host.numel() * kind.elt_size_in_bytes()];
        host.f_copy_data_u8(&mut bytes, host.numel())?;
        let shape = host.size().iter().map(|&d| d as usize).collect();
        Ok(HostTensor {
            dtype,
            shape,
            bytes,
        })
    }
}

impl View for &HostTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// A file written into a checkpoint folder besides the model's weights.
#[derive(Debug)]
pub enum CheckpointFile {
    /// Bytes already in memory (`config.json`, a trainer's state).
    Bytes(Vec<u8>),
    /// Named tensors stored as a safetensors file, floating-point ones as `kind`, streamed
    /// one tensor at a time from their device (an optimizer's state, LoRA adapters).
    Tensors {
        /// The tensors under their names.
        tensors: Vec<(String, Tensor)>,
        /// The kind floating-point tensors are stored as.
        kind: Kind,
    },
    /// A file another process already wrote and synced on the same file system (a rank's
    /// optimizer shard), renamed into the checkpoint.
    Moved(std::path::PathBuf),
}

/// Writes `tensors` (Hugging Face names) and the files in `extra_files` (e.g. `config.json`,
/// a trainer's state and optimizer) as a checkpoint folder, atomically: everything goes to a
/// hidden sibling folder first, each file is synced, and the folder is then renamed into
/// place. A process killed midway leaves at most a stale `.partial` folder; any previous
/// checkpoint at `folder` stays loadable until the final renames; a failed write removes
/// its `.partial` folder.
///
/// Tensors are streamed: each is copied to the host, converted and written before the next
/// one is read, so host memory holds one tensor at a time, not the model and its optimizer
/// state (about 170 GB for a 7B model with f32 master weights and moments).
pub fn write_checkpoint(
    folder: impl AsRef<Path>,
    tensors: &[(String, Tensor)],
    extra_files: &[(&str, CheckpointFile)],
    options: SaveOptions,
) -> Result<()> {
    let folder = folder.as_ref();
    let staging = sibling(folder, "partial");
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| RefaError::io(&staging, &e))?;
    }
    std::fs::create_dir_all(&staging).map_err(|e| RefaError::io(&staging, &e))?;
    let written = write_shards(&staging, tensors, options).and_then(|()| {
        for (name, file) in extra_files {
            let path = staging.join(name);
            match file {
                CheckpointFile::Bytes(bytes) => write_synced(&path, bytes)?,
                CheckpointFile::Tensors { tensors, kind } => {
                    write_safetensors(&path, tensors, *kind)?
                }
                CheckpointFile::Moved(source) => {
                    std::fs::rename(source, &path).map_err(|e| RefaError::io(source, &e))?
                }
            }
        }
        replace_folder(&staging, folder)
    });
    if written.is_err() {
        // A failed save (a full disk, say) must not keep the space it took.
        let _ = std::fs::remove_dir_all(&staging);
    }
    written
}

/// Writes `tensors` as one safetensors file at `path`, floating-point ones stored as `kind`,
/// streaming one tensor at a time to the host (see [`write_checkpoint`]), then syncs it. The
/// bytes equal those of [`safetensors_bytes`] for the same tensors.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)], kind: Kind) -> Result<()> {
    let failure = std::cell::RefCell::new(None);
    let views: Vec<(&str, StreamedTensor<'_>)> = tensors
        .iter()
        .map(|(name, t)| Ok((name.as_str(), StreamedTensor::new(name, t, kind, &failure)?)))
        .collect::<Result<_>>()?;
    let metadata = Some(
        [("format".to_string(), "pt".to_string())]
            .into_iter()
            .collect(),
    );
    let written =
        safetensors::serialize_to_file(views.iter().map(|(n, v)| (*n, v)), metadata, path)
            .map_err(|e| RefaError::config(path, e));
    if let Some(error) = failure.into_inner() {
        return Err(error);
    }
    written?;
    File::open(path)
        .and_then(|file| file.sync_all())
        .map_err(|e| RefaError::io(path, &e))
}

/// Splits `tensors` into shards of at most `shard_bytes` and writes them (plus the index
/// when there is more than one).
fn write_shards(staging: &Path, tensors: &[(String, Tensor)], options: SaveOptions) -> Result<()> {
    let element = |t: &Tensor| {
        if t.is_floating_point() {
            options.kind.elt_size_in_bytes()
        } else {
            t.kind().elt_size_in_bytes()
        }
    };
    let mut shards: Vec<Vec<&(String, Tensor)>> = Vec::new();
    let (mut shard, mut shard_size) = (Vec::new(), 0u64);
    for entry in tensors {
        let size = (entry.1.numel() * element(&entry.1)) as u64;
        if !shard.is_empty() && shard_size + size > options.shard_bytes {
            shards.push(std::mem::take(&mut shard));
            shard_size = 0;
        }
        shard.push(entry);
        shard_size += size;
    }
    shards.push(shard);
    let count = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut total_size = 0u64;
    for (i, shard) in shards.iter().enumerate() {
        let file = if count == 1 {
            SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{count:05}.safetensors", i + 1)
        };
        let owned: Vec<(String, Tensor)> = shard
            .iter()
            .map(|(name, t)| (name.clone(), t.shallow_clone()))
            .collect();
        write_safetensors(&staging.join(&file), &owned, options.kind)?;
        for (name, tensor) in &owned {
            total_size += (tensor.numel() * element(tensor)) as u64;
            weight_map.insert(name.clone(), serde_json::Value::String(file.clone()));
        }
    }
    if count > 1 {
        let index = serde_json::json!({ "metadata": { "total_size": total_size }, "weight_map": weight_map });
        let text =
            serde_json::to_string_pretty(&index).map_err(|e| RefaError::config(INDEX_FILE, e))?;
        write_synced(&staging.join(INDEX_FILE), text.as_bytes())?;
    }
    Ok(())
}

/// One tensor for the streaming writer: its bytes are made on the host only when the
/// writer asks for them. A failed copy is recorded in `failure` (a `View` cannot return an
/// error) and zeros of the right length are handed out; the caller then reports the failure
/// and discards the file.
struct StreamedTensor<'a> {
    name: &'a str,
    tensor: &'a Tensor,
    kind: Kind,
    dtype: Dtype,
    shape: Vec<usize>,
    failure: &'a std::cell::RefCell<Option<RefaError>>,
}

impl<'a> StreamedTensor<'a> {
    fn new(
        name: &'a str,
        tensor: &'a Tensor,
        kind: Kind,
        failure: &'a std::cell::RefCell<Option<RefaError>>,
    ) -> Result<Self> {
        let (kind, dtype) = stored_kind(name, tensor, kind)?;
        Ok(StreamedTensor {
            name,
            tensor,
            kind,
            dtype,
            shape: tensor.size().iter().map(|&d| d as usize).collect(),
            failure,
        })
    }
}

impl View for &StreamedTensor<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        match HostTensor::new(self.name, self.tensor, self.kind) {
            Ok(host) => std::borrow::Cow::Owned(host.bytes),
            Err(error) => {
                self.failure.borrow_mut().get_or_insert(error);
                std::borrow::Cow::Owned(vec![0; self.data_len()])
            }
        }
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.kind.elt_size_in_bytes()
    }
}

/// The safetensors file of `tensors`, floating-point ones stored as `kind`, made in memory
/// (for small files; [`write_safetensors`] streams large ones).
pub fn safetensors_bytes<'a>(
    tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>,
    kind: Kind,
) -> Result<Vec<u8>> {
    let host: Vec<(&str, HostTensor)> = tensors
        .into_iter()
        .map(|(name, t)| Ok((name, HostTensor::new(name, t, kind)?)))
        .collect::<Result<_>>()?;
    let views = host.iter().map(|(name, t)| (*name, t));
    let metadata = Some(
        [("format".to_string(), "pt".to_string())]
            .into_iter()
            .collect(),
    );
    safetensors::serialize(views, metadata).map_err(|e| RefaError::config("safetensors", e))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut file = File::create(path).map_err(|e| RefaError::io(path, &e))?;
    file.write_all(bytes)
        .and_then(|_| file.sync_all())
        .map_err(|e| RefaError::io(path, &e))
}

/// Deletes a folder of user state atomically: it is first renamed to a hidden sibling
/// (`.{name}.deleting`), so that a process killed midway never leaves a visible, partly
/// deleted folder; the hidden one is removed next (and by the next call for the same name,
/// should this one be interrupted).
pub fn remove_folder_atomically(folder: &Path) -> Result<()> {
    let doomed = sibling(folder, "deleting");
    if doomed.exists() {
        std::fs::remove_dir_all(&doomed).map_err(|e| RefaError::io(&doomed, &e))?;
    }
    std::fs::rename(folder, &doomed).map_err(|e| RefaError::io(folder, &e))?;
    std::fs::remove_dir_all(&doomed).map_err(|e| RefaError::io(&doomed, &e))
}

/// `folder`'s hidden sibling `.{name}.{tag}`.
fn sibling(folder: &Path, tag: &str) -> PathBuf {
    let name = folder
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "checkpoint".into());
    folder.with_file_name(format!(".{name}.{tag}"))
}

/// Moves `staging` to `folder`. A folder cannot be renamed over a non-empty one, so an
/// existing checkpoint is first moved aside and removed only after the new one is in place.
fn replace_folder(staging: &Path, folder: &Path) -> Result<()> {
    let rename =
        |from: &Path, to: &Path| std::fs::rename(from, to).map_err(|e| RefaError::io(to, &e));
    if folder.exists() {
        let old = sibling(folder, "old");
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| RefaError::io(&old, &e))?;
        }
        rename(folder, &old)?;
        rename(staging, folder)?;
        std::fs::remove_dir_all(&old).map_err(|e| RefaError::io(&old, &e))
    } else {
        rename(staging, folder)
    }
}
