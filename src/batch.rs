//! [`PreferenceBatch`]: the validated `[P, K]` inputs every loss reads.

use std::cell::OnceCell;

use tch::{Device, Kind, Tensor};

use crate::error::{RefaError, Result};
use crate::partition::Partition;
use crate::validate::{self, compute_kind, ValueCheck};

/// One batch of `P` prompts with `K` response slots each, validated once.
///
/// Build it from the three required `[P, K]` tensors, then add what the chosen loss needs:
///
/// | builder | tensors | needed by |
/// |---|---|---|
/// | [`new`](Self::new) | `logp_sum`, `lengths`, `rewards` | every loss |
/// | [`with_mask`](Self::with_mask) | `mask` (bool) | ragged K: `false` marks an empty slot |
/// | [`with_reference`](Self::with_reference) | `ref_logp_sum` | `InfoNca` with a reference, `Dpo`, `Mpo` |
/// | [`with_eos`](Self::with_eos) | `eos_logp`, `eos_mask` (bool) | `EosRegularizer` |
/// | [`with_eos_steps`](Self::with_eos_steps) | `eos_logp_steps`, `step_mask` (bool) `[P, K, T]` | `EosRegularizer` in `Budgeted` mode |
/// | [`with_sets`](Self::with_sets) | `positive`, `negative` (bool) | explicit `Y+`/`Y−` instead of the mean split (every loss) |
///
/// Shapes, kinds and devices are checked by each builder call. Values (lengths `> 0`, finite
/// rewards and log-probabilities in valid slots) are checked once, together with the
/// partition into positives and negatives, the first time a loss reads the batch (or when
/// [`validate`](Self::validate) is called); that check copies a few flags to the host, which
/// waits for the GPU. Turn it off with [`with_value_checks(false)`](Self::with_value_checks)
/// once the pipeline is trusted. Masked slots may hold anything, NaN included: they never
/// reach a loss and receive exactly zero gradient.
///
/// Floating-point inputs may be f32, f64, bf16 or f16; the losses compute in f64 when
/// `logp_sum` is f64 and in f32 otherwise. The conversion is part of the autograd graph, so
/// gradients reach the caller's tensors in their own kind.
///
/// ```no_run
/// # use refa_loss::PreferenceBatch;
/// # use tch::{Tensor, Kind};
/// # fn main() -> Result<(), refa_loss::RefaError> {
/// let logp_sum = Tensor::from_slice2(&[[-12.0f32, -30.0, -25.0], [-8.0, -9.0, -40.0]]);
/// let lengths = Tensor::from_slice2(&[[10.0f32, 20.0, 12.0], [4.0, 6.0, 30.0]]);
/// let rewards = Tensor::from_slice2(&[[8.0f32, 3.0, 5.0], [7.0, 6.5, 0.0]]);
/// let mask = Tensor::from_slice2(&[[true, true, true], [true, true, false]]);
/// let batch = PreferenceBatch::new(&logp_sum, &lengths, &rewards)?.with_mask(&mask)?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct PreferenceBatch {
    logp_sum: Tensor,
    lengths: Tensor,
    rewards: Tensor,
    mask: Tensor,
    reference: Option<Tensor>,
    eos: Option<EosInputs>,
    eos_steps: Option<EosSteps>,
    sets: Option<ExplicitSets>,
    check_values: bool,
    kind: Kind,
    partition: OnceCell<Result<Partition>>,
}

/// `log P(EOS)` where each response ends, and whether it really ended with EOS.
#[derive(Debug)]
pub(crate) struct EosInputs {
    pub logp: Tensor,
    pub mask: Tensor,
}

/// `log P(EOS)` at every response position, and which positions belong to the response.
#[derive(Debug)]
pub(crate) struct EosSteps {
    pub logp: Tensor,
    pub mask: Tensor,
}

/// Caller-given positive and negative sets.
#[derive(Debug)]
struct ExplicitSets {
    positive: Tensor,
    negative: Tensor,
}

impl PreferenceBatch {
    /// A batch of `[P, K]` summed response log-probabilities, response lengths in tokens and
    /// rewards, with every slot valid.
    ///
    /// `logp_sum` must be floating point (it carries the gradient); `lengths` and `rewards`
    /// may be any numeric kind and are treated as constants.
    pub fn new(logp_sum: &Tensor, lengths: &Tensor, rewards: &Tensor) -> Result<Self> {
        let shape = validate::prompt_slot_shape("logp_sum", logp_sum)?;
        validate::float_kind("logp_sum", logp_sum)?;
        let device = logp_sum.device();
        for (name, tensor) in [("lengths", lengths), ("rewards", rewards)] {
            validate::numeric_kind(name, tensor)?;
            validate::same_shape(name, tensor, "logp_sum", &shape)?;
            validate::same_device(name, tensor, "logp_sum", device)?;
        }
        let kind = compute_kind(logp_sum.kind());
        Ok(PreferenceBatch {
            logp_sum: logp_sum.to_kind(kind),
            lengths: lengths.to_kind(kind).detach(),
            rewards: rewards.to_kind(Kind::Double).detach(),
            mask: Tensor::ones(shape.as_slice(), (Kind::Bool, device)),
            reference: None,
            eos: None,
            eos_steps: None,
            sets: None,
            check_values: true,
            kind,
            partition: OnceCell::new(),
        })
    }

    /// Marks which slots hold a real response (`[P, K]`, bool). Default: all of them.
    pub fn with_mask(mut self, mask: &Tensor) -> Result<Self> {
        self.check_prompt_slot_tensor("mask", mask, Kind::Bool)?;
        self.mask = mask.detach();
        self.partition = OnceCell::new();
        Ok(self)
    }

    /// Adds `[P, K]` summed log-probabilities of the same responses under a frozen
    /// reference model (floating point; gradients flow into it too if it requires them).
    pub fn with_reference(mut self, ref_logp_sum: &Tensor) -> Result<Self> {
        self.check_prompt_slot_float("ref_logp_sum", ref_logp_sum)?;
        self.reference = Some(ref_logp_sum.to_kind(self.kind));
        self.partition = OnceCell::new();
        Ok(self)
    }

    /// Adds `[P, K]` `log P(EOS)` at the position where each response ends, and a bool mask
    /// that is `true` where the response really ends with EOS (`false` when it was cut at a
    /// length limit).
    pub fn with_eos(mut self, eos_logp: &Tensor, eos_mask: &Tensor) -> Result<Self> {
        self.check_prompt_slot_float("eos_logp", eos_logp)?;
        self.check_prompt_slot_tensor("eos_mask", eos_mask, Kind::Bool)?;
        self.eos = Some(EosInputs {
            logp: eos_logp.to_kind(self.kind),
            mask: eos_mask.detach(),
        });
        self.partition = OnceCell::new();
        Ok(self)
    }

    /// Adds `[P, K, T]` `log P(EOS)` at response positions and the bool mask of the positions
    /// that belong to the response (needed by `EosMode::Budgeted` only).
    ///
    /// The layout along `T` is free: the `n`-th position marked in `step_mask` is the
    /// response's `n`-th token (1-based position `t = n`), whatever comes before it. So the
    /// scorers' sequence-aligned output, where a response starts after its prompt, and a
    /// response-aligned tensor that starts at index 0 both mean the same thing.
    pub fn with_eos_steps(mut self, eos_logp_steps: &Tensor, step_mask: &Tensor) -> Result<Self> {
        let (p, k) = (self.num_prompts(), self.num_slots());
        let shape = eos_logp_steps.size();
        let expected = format!("[P, K, T] with [P, K] = [{p}, {k}]");
        if shape.len() != 3 || shape[0] != p || shape[1] != k {
            return Err(RefaError::ShapeMismatch {
                tensor: "eos_logp_steps",
                actual: shape,
                expected,
            });
        }
        validate::float_kind("eos_logp_steps", eos_logp_steps)?;
        validate::same_device("eos_logp_steps", eos_logp_steps, "logp_sum", self.device())?;
        validate::same_shape("step_mask", step_mask, "eos_logp_steps", &shape)?;
        validate::exact_kind("step_mask", step_mask, Kind::Bool)?;
        validate::same_device("step_mask", step_mask, "logp_sum", self.device())?;
        self.eos_steps = Some(EosSteps {
            logp: eos_logp_steps.to_kind(self.kind),
            mask: step_mask.detach(),
        });
        self.partition = OnceCell::new();
        Ok(self)
    }

    /// Gives the positive and negative sets `Y+` and `Y−` explicitly (`[P, K]` bool each)
    /// instead of the split at the mean reward, e.g. the top-2 against the bottom-2 of 5
    /// generated responses (paper v4's on-policy setup; [`top_bottom_sets`](crate::top_bottom_sets)
    /// builds those).
    ///
    /// The sets must be disjoint subsets of the valid slots, and a prompt that uses them
    /// needs both non-empty; a prompt with both empty is skipped. Slots in neither set take
    /// no part in any contrast, deviations still use the mean over all valid slots, and the
    /// best (worst) response of the pairwise and 1-vs-all losses is the highest-rewarded
    /// positive (lowest-rewarded negative). Checked with the value checks, each violation a
    /// [`RefaError::InvalidValue`] naming the prompt and slot.
    pub fn with_sets(mut self, positive: &Tensor, negative: &Tensor) -> Result<Self> {
        self.check_prompt_slot_tensor("positive", positive, Kind::Bool)?;
        self.check_prompt_slot_tensor("negative", negative, Kind::Bool)?;
        self.sets = Some(ExplicitSets {
            positive: positive.detach(),
            negative: negative.detach(),
        });
        self.partition = OnceCell::new();
        Ok(self)
    }

    /// Switches the value checks on (default) or off. Off saves one host-device
    /// synchronization per batch; invalid values then produce undefined (possibly NaN)
    /// losses instead of a [`RefaError::InvalidValue`].
    pub fn with_value_checks(mut self, enabled: bool) -> Self {
        self.check_values = enabled;
        self.partition = OnceCell::new();
        self
    }

    /// Runs the value checks and the partition now instead of at the first loss.
    pub fn validate(&self) -> Result<()> {
        self.partition().map(|_| ())
    }

    /// The partition into positives and negatives, the deviations and the skipped prompts,
    /// computed on first use and cached.
    pub fn partition(&self) -> Result<&Partition> {
        self.partition
            .get_or_init(|| {
                if self.check_values {
                    self.check_values()?;
                }
                match &self.sets {
                    None => Partition::new(&self.rewards, &self.mask),
                    Some(sets) => Partition::with_sets(
                        &self.rewards,
                        &self.mask,
                        &sets.positive,
                        &sets.negative,
                    ),
                }
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Number of prompts `P`.
    pub fn num_prompts(&self) -> i64 {
        self.logp_sum.size()[0]
    }

    /// Number of response slots per prompt `K`.
    pub fn num_slots(&self) -> i64 {
        self.logp_sum.size()[1]
    }

    /// Device of every tensor of the batch.
    pub fn device(&self) -> Device {
        self.logp_sum.device()
    }

    /// The kind the losses compute in (f64 for f64 inputs, else f32).
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Whether value checks run (see [`with_value_checks`](Self::with_value_checks)).
    pub fn checks_values(&self) -> bool {
        self.check_values
    }

    /// The `[P, K]` slot mask (bool).
    pub fn mask(&self) -> &Tensor {
        &self.mask
    }

    /// `[P, K]` `logp_sum` in the compute kind, in the autograd graph, with masked slots
    /// replaced by 0 so that garbage there can neither reach a loss nor receive a gradient
    /// (the `where` passes exactly zero gradient to them). For losses written outside the
    /// crate, as are the accessors below.
    pub fn logp_sum(&self) -> Tensor {
        self.masked(&self.logp_sum, 0.0)
    }

    /// `[P, K]` `lengths` in the compute kind, masked slots replaced by 1 (safe to divide by).
    pub fn lengths(&self) -> Tensor {
        self.masked(&self.lengths, 1.0)
    }

    /// `[P, K]` `ref_logp_sum` with masked slots replaced by 0, if the batch has it.
    pub fn ref_logp_sum(&self) -> Option<Tensor> {
        self.reference.as_ref().map(|r| self.masked(r, 0.0))
    }

    /// EOS inputs restricted to valid slots: `(eos_logp, valid & eos_mask)`.
    pub(crate) fn eos(&self) -> Option<(Tensor, Tensor)> {
        self.eos.as_ref().map(|eos| {
            let valid = self.mask.logical_and(&eos.mask);
            (eos.logp.where_scalarother(&valid, 0.0), valid)
        })
    }

    /// Per-step EOS inputs restricted to valid slots: `(eos_logp_steps, step mask)`.
    pub(crate) fn eos_steps(&self) -> Option<(Tensor, Tensor)> {
        self.eos_steps.as_ref().map(|steps| {
            let valid = steps.mask.logical_and(&self.mask.unsqueeze(-1));
            (steps.logp.where_scalarother(&valid, 0.0), valid)
        })
    }

    fn masked(&self, tensor: &Tensor, fill: f64) -> Tensor {
        tensor.where_scalarother(&self.mask, fill)
    }

    fn check_prompt_slot_tensor(
        &self,
        name: &'static str,
        tensor: &Tensor,
        kind: Kind,
    ) -> Result<()> {
        validate::same_shape(name, tensor, "logp_sum", &self.logp_sum.size())?;
        validate::exact_kind(name, tensor, kind)?;
        validate::same_device(name, tensor, "logp_sum", self.device())
    }

    fn check_prompt_slot_float(&self, name: &'static str, tensor: &Tensor) -> Result<()> {
        validate::same_shape(name, tensor, "logp_sum", &self.logp_sum.size())?;
        validate::float_kind(name, tensor)?;
        validate::same_device(name, tensor, "logp_sum", self.device())
    }

    /// Every value check of the batch, answered with one device-to-host copy.
    fn check_values(&self) -> Result<()> {
        let set_rules = match &self.sets {
            Some(sets) => sets.checks(&self.mask),
            None => Vec::new(),
        };
        let mut checks = vec![
            ValueCheck::positive_finite("lengths", &self.lengths, &self.mask),
            ValueCheck::finite("rewards", &self.rewards, &self.mask),
            ValueCheck::finite("logp_sum", &self.logp_sum, &self.mask),
        ];
        if let Some(reference) = &self.reference {
            checks.push(ValueCheck::finite("ref_logp_sum", reference, &self.mask));
        }
        if let Some(eos) = &self.eos {
            let valid = self.mask.logical_and(&eos.mask);
            checks.push(ValueCheck::finite("eos_logp", &eos.logp, &valid));
        }
        if let Some(steps) = &self.eos_steps {
            let valid = steps.mask.logical_and(&self.mask.unsqueeze(-1));
            checks.push(ValueCheck::finite("eos_logp_steps", &steps.logp, &valid));
        }
        checks.extend(
            set_rules
                .iter()
                .map(|(name, bad, requirement)| ValueCheck::flagged(name, bad, requirement)),
        );
        validate::run_value_checks(&checks)
    }
}

impl ExplicitSets {
    /// `(tensor, [P, K] or [P] flags of violations, requirement)` of every rule of the sets.
    fn checks(&self, mask: &Tensor) -> Vec<(&'static str, Tensor, &'static str)> {
        let outside = |set: &Tensor| set.logical_and(&mask.logical_not());
        let (has_positive, has_negative) = (
            self.positive.any_dim(1, false),
            self.negative.any_dim(1, false),
        );
        vec![
            ("positive", outside(&self.positive), "false in masked slots"),
            ("negative", outside(&self.negative), "false in masked slots"),
            (
                "positive",
                self.positive.logical_and(&self.negative),
                "disjoint from `negative`",
            ),
            (
                "positive",
                has_negative.logical_and(&has_positive.logical_not()),
                "non-empty in every prompt whose `negative` set is non-empty",
            ),
            (
                "negative",
                has_positive.logical_and(&has_negative.logical_not()),
                "non-empty in every prompt whose `positive` set is non-empty",
            ),
        ]
    }
}
