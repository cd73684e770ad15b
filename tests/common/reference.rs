//! An independent reference of every loss in plain f64 loops: no tensors, no shared code with
//! the crate. It follows `shared/spec/refa-math.md` literally (ratios of sums of exponentials
//! where they cannot overflow, log-sum-exp only where the spec's numbers demand it).

use refa_loss::{DeviationMode, EosMode, InfoNcaVariant, TargetLength};

/// One prompt's slots as plain numbers; `valid[k]` false marks an empty slot.
#[derive(Debug, Clone)]
pub struct RefPrompt {
    pub logp: Vec<f64>,
    pub lengths: Vec<f64>,
    pub rewards: Vec<f64>,
    pub valid: Vec<bool>,
    pub reference: Vec<f64>,
    pub eos_logp: Vec<f64>,
    pub eos_mask: Vec<bool>,
    pub steps: Vec<Vec<f64>>,
    pub step_mask: Vec<Vec<bool>>,
    /// Explicit `(positive, negative)` sets instead of the mean split.
    pub sets: Option<(Vec<bool>, Vec<bool>)>,
}

/// The whole batch.
#[derive(Debug, Clone)]
pub struct RefBatch {
    pub prompts: Vec<RefPrompt>,
}

/// `log Σ exp(x)` over `xs` (max-shifted).
pub fn logsumexp(xs: &[f64]) -> f64 {
    let max = xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return max;
    }
    max + xs.iter().map(|x| (x - max).exp()).sum::<f64>().ln()
}

/// `log(1 + exp(x))`.
pub fn softplus(x: f64) -> f64 {
    if x > 0.0 {
        x + (-x).exp().ln_1p()
    } else {
        x.exp().ln_1p()
    }
}

/// Partition of one prompt: the slots that take part (valid ones, or the members of the
/// explicit sets), which of them are positive, the mean over valid slots, whether the prompt
/// is active, and the best positive and worst negative slot.
pub struct RefPartition {
    pub slots: Vec<usize>,
    pub positive: Vec<bool>,
    pub mean: f64,
    pub active: bool,
    pub best: usize,
    pub worst: usize,
}

pub fn partition(p: &RefPrompt) -> RefPartition {
    let valid: Vec<usize> = (0..p.valid.len()).filter(|&k| p.valid[k]).collect();
    let rewards: Vec<f64> = valid.iter().map(|&k| p.rewards[k]).collect();
    let mean = if valid.is_empty() {
        0.0
    } else {
        rewards.iter().sum::<f64>() / valid.len() as f64
    };
    let spread = rewards.iter().cloned().fold(f64::NEG_INFINITY, f64::max)
        - rewards.iter().cloned().fold(f64::INFINITY, f64::min);
    let (slots, positive): (Vec<usize>, Vec<bool>) = match &p.sets {
        None => {
            let positive = valid
                .iter()
                // Equal rewards (spread 0) never split, even when Σr/K missed r by an ulp.
                .map(|&k| spread > 0.0 && p.rewards[k] - mean > 1e-9 * spread)
                .collect();
            (valid.clone(), positive)
        }
        Some((pos, neg)) => {
            let slots: Vec<usize> = (0..p.valid.len()).filter(|&k| pos[k] || neg[k]).collect();
            let positive = slots.iter().map(|&k| pos[k]).collect();
            (slots, positive)
        }
    };
    let n_positive = positive.iter().filter(|&&x| x).count();
    let active = match &p.sets {
        None => valid.len() >= 2 && n_positive > 0,
        Some(_) => n_positive > 0 && n_positive < slots.len(),
    };
    let (mut best, mut worst) = (None::<usize>, None::<usize>);
    for (i, &k) in slots.iter().enumerate() {
        if positive[i] && best.is_none_or(|b| p.rewards[k] > p.rewards[b]) {
            best = Some(k);
        }
        if !positive[i] && worst.is_none_or(|w| p.rewards[k] < p.rewards[w]) {
            worst = Some(k);
        }
    }
    RefPartition {
        slots,
        positive,
        mean,
        active,
        best: best.unwrap_or(0),
        worst: worst.unwrap_or(0),
    }
}

fn deviation(r: f64, mean: f64, power: f64, mode: DeviationMode) -> f64 {
    let magnitude = (r - mean).abs().powf(power);
    match mode {
        DeviationMode::Absolute => magnitude,
        DeviationMode::Signed => {
            magnitude * (r - mean).signum() * if r == mean { 0.0 } else { 1.0 }
        }
    }
}

/// Score of slot k: log-probability (minus reference), optionally per token.
fn score(p: &RefPrompt, k: usize, normalize: bool, reference: bool) -> f64 {
    let logp = if reference {
        p.logp[k] - p.reference[k]
    } else {
        p.logp[k]
    };
    if normalize {
        logp / p.lengths[k]
    } else {
        logp
    }
}

/// Averages per-prompt values over active prompts; returns (loss, per_prompt).
fn average(per_prompt: Vec<Option<f64>>) -> (f64, Vec<f64>) {
    let used = per_prompt.iter().filter(|v| v.is_some()).count();
    let values: Vec<f64> = per_prompt.iter().map(|v| v.unwrap_or(0.0)).collect();
    let total: f64 = values.iter().sum();
    (if used == 0 { 0.0 } else { total / used as f64 }, values)
}

/// `log(1 + γ·Σ_neg e^u / Σ_pos e^u)` for one prompt.
fn set_contrast(pos: &[f64], neg: &[f64], log_gamma: f64) -> f64 {
    softplus(log_gamma + logsumexp(neg) - logsumexp(pos))
}

/// Weighted logits u_k for the valid slots of a prompt.
#[allow(clippy::too_many_arguments)]
fn logits(
    p: &RefPrompt,
    part: &RefPartition,
    beta: f64,
    alpha: f64,
    power: f64,
    mode: DeviationMode,
    normalize: bool,
    reference: bool,
) -> Vec<f64> {
    part.slots
        .iter()
        .map(|&k| {
            beta * score(p, k, normalize, reference)
                + alpha * deviation(p.rewards[k], part.mean, power, mode)
        })
        .collect()
}

pub struct DynamicParams {
    pub beta: f64,
    pub gamma: f64,
    pub alpha: f64,
    pub power: f64,
    pub mode: DeviationMode,
    pub normalize: bool,
}

pub fn refa_dynamic(b: &RefBatch, c: &DynamicParams) -> (f64, Vec<f64>) {
    average(
        b.prompts
            .iter()
            .map(|p| {
                let part = partition(p);
                part.active.then(|| {
                    let u = logits(
                        p,
                        &part,
                        c.beta,
                        c.alpha,
                        c.power,
                        c.mode,
                        c.normalize,
                        false,
                    );
                    let (pos, neg) = split(&u, &part.positive);
                    // Literal form −log(P+/(P+ + γP−)), exact where nothing overflows.
                    let (pp, pn) = (sum_exp(&pos), sum_exp(&neg));
                    // Subnormal sums (scores below about −700) have lost digits: use the log form.
                    if pp.is_finite() && pn.is_finite() && pp > 1e-290 && pn > 1e-290 {
                        -(pp / (pp + c.gamma * pn)).ln()
                    } else {
                        set_contrast(&pos, &neg, c.gamma.ln())
                    }
                })
            })
            .collect(),
    )
}

pub fn refa_one_vs_all(b: &RefBatch, c: &DynamicParams) -> (f64, Vec<f64>) {
    average(
        b.prompts
            .iter()
            .map(|p| {
                let part = partition(p);
                part.active.then(|| {
                    let u = logits(
                        p,
                        &part,
                        c.beta,
                        c.alpha,
                        c.power,
                        c.mode,
                        c.normalize,
                        false,
                    );
                    let best: Vec<bool> = part.slots.iter().map(|&k| k == part.best).collect();
                    let (pos, neg) = split(&u, &best);
                    set_contrast(&pos, &neg, c.gamma.ln())
                })
            })
            .collect(),
    )
}

pub struct InfoNcaParams {
    pub beta: f64,
    pub tau: f64,
    pub variant: InfoNcaVariant,
    pub reference: bool,
    pub normalize: bool,
}

pub fn info_nca(b: &RefBatch, c: &InfoNcaParams) -> (f64, Vec<f64>) {
    average(
        b.prompts
            .iter()
            .map(|p| {
                let part = partition(p);
                part.active.then(|| {
                    let z: Vec<f64> = part
                        .slots
                        .iter()
                        .map(|&k| c.beta * score(p, k, c.normalize, c.reference))
                        .collect();
                    let r: Vec<f64> = part.slots.iter().map(|&k| p.rewards[k] / c.tau).collect();
                    let (lz, lr) = (logsumexp(&z), logsumexp(&r));
                    let mut loss = 0.0;
                    for (i, &k) in part.slots.iter().enumerate() {
                        let log_softmax = z[i] - lz;
                        let q = (r[i] - lr).exp();
                        loss -= match c.variant {
                            InfoNcaVariant::Full => q * log_softmax,
                            InfoNcaVariant::PositivesOnly if part.positive[i] => q * log_softmax,
                            InfoNcaVariant::PositivesOnly => 0.0,
                            InfoNcaVariant::OneVsAll if k == part.best => log_softmax,
                            InfoNcaVariant::OneVsAll => 0.0,
                        };
                    }
                    loss
                })
            })
            .collect(),
    )
}

pub fn simpo(b: &RefBatch, beta: f64, margin: f64, sft_weight: f64) -> (f64, Vec<f64>) {
    pairwise(b, |p, part| {
        let (w, l) = (
            score(p, part.best, true, false),
            score(p, part.worst, true, false),
        );
        softplus(-(beta * (w - l) - margin)) - sft_weight * w
    })
}

pub fn dpo(b: &RefBatch, beta: f64) -> (f64, Vec<f64>) {
    pairwise(b, |p, part| {
        let (w, l) = (
            score(p, part.best, false, true),
            score(p, part.worst, false, true),
        );
        softplus(-beta * (w - l))
    })
}

fn pairwise(b: &RefBatch, f: impl Fn(&RefPrompt, &RefPartition) -> f64) -> (f64, Vec<f64>) {
    average(
        b.prompts
            .iter()
            .map(|p| {
                let part = partition(p);
                part.active.then(|| f(p, &part))
            })
            .collect(),
    )
}

pub fn mpo(
    b: &RefBatch,
    beta: f64,
    alpha: f64,
    power: f64,
    mode: DeviationMode,
) -> (f64, Vec<f64>) {
    average(
        b.prompts
            .iter()
            .map(|p| {
                let part = partition(p);
                part.active.then(|| {
                    let u = logits(p, &part, beta, alpha, power, mode, false, true);
                    let (pos, _) = split(&u, &part.positive);
                    logsumexp(&u) - logsumexp(&pos)
                })
            })
            .collect(),
    )
}

/// The EOS regularizer: (loss, per_prompt).
pub fn eos(b: &RefBatch, lambda: f64, mode: EosMode) -> (f64, Vec<f64>) {
    let batch_longest = b
        .prompts
        .iter()
        .flat_map(|p| {
            (0..p.valid.len())
                .filter(|&k| p.valid[k])
                .map(|k| p.lengths[k])
        })
        .fold(0.0, f64::max);
    let mut used = 0usize;
    let mut per_prompt = Vec::new();
    for p in &b.prompts {
        let slots: Vec<usize> = (0..p.valid.len())
            .filter(|&k| p.valid[k] && p.eos_mask[k])
            .collect();
        let prompt_longest = (0..p.valid.len())
            .filter(|&k| p.valid[k])
            .map(|k| p.lengths[k])
            .fold(0.0, f64::max);
        if !slots.is_empty() {
            used += 1;
        }
        let value: f64 = slots
            .iter()
            .map(|&k| {
                let prob = p.eos_logp[k].exp();
                lambda
                    * match mode {
                        EosMode::FinalProbability => prob,
                        EosMode::FinalLogProbability => -p.eos_logp[k],
                        EosMode::TargetLength(target) => {
                            let t = match target {
                                TargetLength::PromptLongest => prompt_longest,
                                TargetLength::BatchLongest => batch_longest,
                                TargetLength::Fixed(t) => t,
                            };
                            prob * (t - p.lengths[k]).max(0.0)
                        }
                        EosMode::Budgeted { budget } => {
                            budgeted(&p.steps[k], &p.step_mask[k], budget)
                        }
                    }
            })
            .sum();
        per_prompt.push(value);
    }
    let total: f64 = per_prompt.iter().sum();
    (
        if used == 0 { 0.0 } else { total / used as f64 },
        per_prompt,
    )
}

/// Positions count the response's own steps: the n-th marked step is t = n, wherever the
/// response starts along the axis.
fn budgeted(steps: &[f64], mask: &[bool], budget: usize) -> f64 {
    let (mut early, mut n_early, mut late, mut n_late) = (0.0, 0, 0.0, 0);
    let mut t = 0;
    for (&logp, &valid) in steps.iter().zip(mask) {
        if !valid {
            continue;
        }
        t += 1;
        if t < budget {
            early += logp.exp();
            n_early += 1;
        } else if t > budget {
            late += logp.exp();
            n_late += 1;
        }
    }
    let mean = |s: f64, n: usize| if n == 0 { 0.0 } else { s / n as f64 };
    mean(early, n_early) - mean(late, n_late)
}

fn split(u: &[f64], positive: &[bool]) -> (Vec<f64>, Vec<f64>) {
    let pos = u
        .iter()
        .zip(positive)
        .filter(|(_, &p)| p)
        .map(|(&x, _)| x)
        .collect();
    let neg = u
        .iter()
        .zip(positive)
        .filter(|(_, &p)| !p)
        .map(|(&x, _)| x)
        .collect();
    (pos, neg)
}

fn sum_exp(xs: &[f64]) -> f64 {
    xs.iter().map(|x| x.exp()).sum()
}

/// The top `top` against the bottom `bottom` valid slots by reward (equal rewards: the lower
/// slot ranks higher); negatives must fall below every positive's reward, and a prompt left
/// without a negative gets two empty sets.
pub fn top_bottom(
    rewards: &[f64],
    valid: &[bool],
    top: usize,
    bottom: usize,
) -> (Vec<bool>, Vec<bool>) {
    let mut order: Vec<usize> = (0..valid.len()).filter(|&k| valid[k]).collect();
    order.sort_by(|&a, &b| rewards[a].total_cmp(&rewards[b]).then(b.cmp(&a)));
    let n = order.len();
    let (mut positive, mut negative) = (vec![false; valid.len()], vec![false; valid.len()]);
    for &k in &order[n.saturating_sub(top)..] {
        positive[k] = true;
    }
    for &k in &order[..bottom.min(n)] {
        negative[k] = !positive[k];
    }
    let lowest_positive = (0..valid.len())
        .filter(|&k| positive[k])
        .map(|k| rewards[k])
        .fold(f64::INFINITY, f64::min);
    for k in 0..valid.len() {
        negative[k] &= rewards[k] < lowest_positive;
    }
    if !negative.contains(&true) {
        positive = vec![false; valid.len()];
    }
    (positive, negative)
}
