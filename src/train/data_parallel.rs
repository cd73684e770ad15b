//! Data parallelism for the trainer (feature `distributed`): every rank draws the same
//! seeded order and takes its slice of each global batch, gradients are averaged in flat
//! buckets, and with ZeRO-1 each rank keeps the optimizer state (f32 master weights and
//! moments) of its share of the parameters only, updates that share, and broadcasts it.
//!
//! Equivalence: with `p` prompts per rank and `N` ranks, a step averages the ranks' mean
//! gradients over their `p` prompts, which is the mean over the `N·p` prompts one process
//! would take (when every prompt counts, i.e. no prompt of the batch is skipped for equal
//! rewards); the clipping norm, the learning rate and the update are then the same.

use tch::{Device, Kind, Tensor};

use crate::distributed::{ProcessGroup, ReduceOp};
use crate::error::{RefaError, Result};
use crate::train::fingerprint::SetupPart;

/// Bytes of gradient in one all-reduce (PyTorch DDP's default bucket, 25 MiB).
pub const BUCKET_BYTES: usize = 25 << 20;

/// Stops every rank when any rank's setup differs from rank 0's, naming the ranks and the
/// parts (with this rank's value where it is a setting). One all-gather of as many integers
/// as there are parts, the same number on every rank, before any collective whose shapes
/// depend on the setup: a LoRA rank beside a fully fine-tuned one would otherwise abort
/// inside Gloo, and ranks with another learning rate or other data would train together.
pub(crate) fn check_ranks_agree(group: &ProcessGroup, parts: &[SetupPart]) -> Result<()> {
    let n = parts.len();
    // The bits of each u64 travel as an i64.
    let mine: Vec<i64> = parts.iter().map(|p| p.hash as i64).collect();
    let all = Tensor::zeros(
        [(n * group.world_size()) as i64],
        (Kind::Int64, Device::Cpu),
    );
    group.all_gather(&all, &Tensor::from_slice(&mine))?;
    let all = Vec::<i64>::try_from(&all)?;
    let rank_0 = &all[..n];
    let differences: Vec<String> = (1..group.world_size())
        .filter_map(|rank| {
            let theirs = &all[rank * n..(rank + 1) * n];
            let names: Vec<&str> = parts
                .iter()
                .zip(theirs.iter().zip(rank_0))
                .filter(|(_, (a, b))| a != b)
                .map(|(part, _)| part.name.as_str())
                .collect();
            (!names.is_empty())
                .then(|| format!("rank {rank} differs from rank 0 in {}", names.join(", ")))
        })
        .collect();
    if differences.is_empty() {
        return Ok(());
    }
    // This rank's own values of the settings that differ somewhere in the job.
    let differs_anywhere = |i: usize| (1..group.world_size()).any(|r| all[r * n + i] != all[i]);
    let here: Vec<String> = parts
        .iter()
        .enumerate()
        .filter(|(i, _)| differs_anywhere(*i))
        .filter_map(|(_, part)| Some(format!("{} = {}", part.name, part.text.as_ref()?)))
        .collect();
    let here = if here.is_empty() {
        String::new()
    } else {
        format!("; here on rank {}, {}", group.rank(), here.join(", "))
    };
    Err(RefaError::Distributed {
        operation: "setup",
        message: format!(
            "the ranks were started differently: {}{here}; start every rank with the same \
             flags, model and data",
            differences.join("; ")
        ),
    })
}

/// The trainer's view of its process group.
pub struct DataParallel {
    group: ProcessGroup,
    /// Every trainable parameter, sorted by name (the order every rank agrees on).
    parameters: Vec<(String, Tensor)>,
    /// With ZeRO-1: the rank that owns each parameter's optimizer state.
    owners: Option<Vec<usize>>,
}

impl std::fmt::Debug for DataParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataParallel")
            .field("group", &self.group)
            .field("shard_optimizer", &self.owners.is_some())
            .finish()
    }
}

impl DataParallel {
    /// Over `parameters` (every trainable one); `shard_optimizer` turns on ZeRO-1, whose
    /// shares balance bytes: each parameter, largest first, goes to the rank with the fewest
    /// bytes so far (whole tensors, so each rank's optimizer stays the plain fused AdamW).
    pub fn new(
        group: ProcessGroup,
        mut parameters: Vec<(String, Tensor)>,
        shard_optimizer: bool,
    ) -> Self {
        parameters.sort_by(|a, b| a.0.cmp(&b.0));
        let owners = shard_optimizer.then(|| balance(&parameters, group.world_size()));
        DataParallel {
            group,
            parameters,
            owners,
        }
    }

    /// The process group.
    pub fn group(&self) -> &ProcessGroup {
        &self.group
    }

    /// Whether this is rank 0 (the one that prints, logs and writes the model).
    pub fn is_main(&self) -> bool {
        self.group.rank() == 0
    }

    /// Whether the optimizer state is sharded (ZeRO-1).
    pub fn shards_optimizer(&self) -> bool {
        self.owners.is_some()
    }

    /// This rank's slice of a global batch of `world · per_rank` indices.
    pub fn local_slice(&self, global: &[usize], per_rank: usize) -> Vec<usize> {
        let start = self.group.rank() * per_rank;
        global[start..start + per_rank].to_vec()
    }

    /// The parameters whose optimizer state this rank keeps: all of them, or its ZeRO-1
    /// share.
    pub fn optimized_parameters(&self) -> Vec<(String, Tensor)> {
        self.parameters
            .iter()
            .enumerate()
            .filter(|(i, _)| self.owner(*i).is_none_or(|r| r == self.group.rank()))
            .map(|(_, (n, t))| (n.clone(), t.shallow_clone()))
            .collect()
    }

    fn owner(&self, index: usize) -> Option<usize> {
        self.owners.as_ref().map(|o| o[index])
    }

    /// Averages every gradient over the ranks, in flat buckets of about [`BUCKET_BYTES`]
    /// (one collective each). A parameter without a gradient gets zeros first, so that
    /// every rank sends the same buckets.
    pub fn average_gradients(&self) -> Result<()> {
        let grads: Vec<Tensor> = self
            .parameters
            .iter()
            .map(|(_, p)| {
                if !p.grad().defined() {
                    // tch cannot assign a gradient; a zero-valued backward defines one.
                    (p * 0.0).sum(p.kind()).backward();
                }
                p.grad()
            })
            .collect();
        for bucket in buckets(&grads) {
            self.group.all_reduce(&bucket, ReduceOp::Average)?;
        }
        Ok(())
    }

    /// After a ZeRO-1 step: the gradients of the parameters this rank does not optimize
    /// are cleared (its optimizer cleared its own), and every parameter takes its owner's
    /// updated value, in buckets broadcast from each owner. Without sharding, nothing.
    pub fn after_step(&self) -> Result<()> {
        let Some(owners) = &self.owners else {
            return Ok(());
        };
        tch::no_grad(|| -> Result<()> {
            for (i, (_, p)) in self.parameters.iter().enumerate() {
                let mut g = p.grad();
                if owners[i] != self.group.rank() && g.defined() {
                    let _ = g.zero_();
                }
            }
            for owner in 0..self.group.world_size() {
                let owned: Vec<Tensor> = self
                    .parameters
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| owners[*i] == owner)
                    .map(|(_, (_, p))| p.shallow_clone())
                    .collect();
                for bucket in buckets(&owned) {
                    self.group.broadcast(&bucket, owner)?;
                }
            }
            Ok(())
        })
    }

    /// Makes every rank start from rank 0's weights.
    pub fn broadcast_parameters(&self) -> Result<()> {
        let all: Vec<Tensor> = self
            .parameters
            .iter()
            .map(|(_, p)| p.shallow_clone())
            .collect();
        tch::no_grad(|| {
            for bucket in buckets(&all) {
                self.group.broadcast(&bucket, 0)?;
            }
            Ok(())
        })
    }

    /// `values` averaged over the ranks, and `counts` summed (both read back to the host).
    pub fn reduce_metrics(&self, values: &[f64], counts: &[f64]) -> Result<(Vec<f64>, Vec<f64>)> {
        let both: Vec<f64> = values.iter().chain(counts).copied().collect();
        let tensor = Tensor::from_slice(&both)
            .to_kind(Kind::Double)
            .to_device(Device::Cpu);
        self.group.all_reduce(&[&tensor], ReduceOp::Sum)?;
        let summed = Vec::<f64>::try_from(&tensor)?;
        let world = self.group.world_size() as f64;
        let means = summed[..values.len()].iter().map(|v| v / world).collect();
        Ok((means, summed[values.len()..].to_vec()))
    }

    /// The number of ranks.
    pub fn world(&self) -> usize {
        self.group.world_size()
    }

    /// Global L2 norm of every gradient (each rank holds the averaged ones), and the same
    /// clipping as [`crate::train::AdamW::clip_grad_norm`].
    pub fn clip_grad_norm(&self, max_norm: f64) -> Result<Tensor> {
        crate::train::optimizer::clip_grad_norm(&self.parameters, max_norm)
    }

    /// Whether `flag` holds on any rank.
    pub fn any(&self, flag: bool) -> Result<bool> {
        let (_, counts) = self.reduce_metrics(&[], &[f64::from(u8::from(flag))])?;
        Ok(counts[0] > 0.0)
    }

    /// The checkpoint file of this rank's optimizer state: `optimizer.safetensors` when the
    /// state is replicated (rank 0's is written), `optimizer-R-of-N.safetensors` with ZeRO-1.
    pub fn optimizer_file(&self) -> String {
        match self.owners {
            Some(_) => format!(
                "optimizer-{:05}-of-{:05}.safetensors",
                self.group.rank(),
                self.group.world_size()
            ),
            None => "optimizer.safetensors".to_string(),
        }
    }

    /// Waits for every rank.
    pub fn barrier(&self) -> Result<()> {
        self.group.barrier()
    }

    /// Bytes one step moves per rank through collectives (what scaling is reasoned from):
    /// the gradient all-reduce (a ring sends and receives about twice the gradients' bytes)
    /// plus, with ZeRO-1, the parameter broadcasts (about the parameters' bytes).
    pub fn bytes_per_step(&self) -> u64 {
        let bytes: u64 = self
            .parameters
            .iter()
            .map(|(_, p)| p.numel() as u64 * p.kind().elt_size_in_bytes() as u64)
            .sum();
        let world = self.group.world_size() as u64;
        let ring = 2 * bytes * (world - 1) / world.max(1);
        ring + if self.owners.is_some() { bytes } else { 0 }
    }
}

/// Each parameter's owner: largest first, to the rank with the fewest bytes so far.
fn balance(parameters: &[(String, Tensor)], world: usize) -> Vec<usize> {
    let size = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
    let mut order: Vec<usize> = (0..parameters.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(size(&parameters[i].1)));
    let mut load = vec![0usize; world];
    let mut owners = vec![0; parameters.len()];
    for i in order {
        let rank = (0..world).min_by_key(|&r| (load[r], r)).unwrap_or(0);
        owners[i] = rank;
        load[rank] += size(&parameters[i].1);
    }
    owners
}

/// Consecutive runs of tensors of one device and kind, each about [`BUCKET_BYTES`].
fn buckets(tensors: &[Tensor]) -> Vec<Vec<&Tensor>> {
    let mut out: Vec<Vec<&Tensor>> = Vec::new();
    let mut bytes = 0;
    for t in tensors {
        let size = t.numel() * t.kind().elt_size_in_bytes();
        match out.last_mut() {
            Some(bucket)
                if bucket[0].device() == t.device()
                    && bucket[0].kind() == t.kind()
                    && bytes + size <= BUCKET_BYTES =>
            {
                bucket.push(t);
                bytes += size;
            }
            _ => {
                out.push(vec![t]);
                bytes = size;
            }
        }
    }
    out
}
