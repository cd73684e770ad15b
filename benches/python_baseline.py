"""The same forward + backward computations in Python PyTorch, for benches/side_by_side.rs.

Idiomatic PyTorch a researcher would write for REFA-dynamic, REFA-1-vs-all and
reference-free InfoNCA on [P, K] inputs (masked, length-normalized, mean-reward partition).
Prints one JSON line per (loss, P, K) with the mean milliseconds per step.
Usage: python python_baseline.py <threads> <min_seconds> P:K [P:K ...]
"""
import json
import sys
import time

import torch

NEG_INF = float("-inf")


def partition(rewards, mask):
    r = torch.where(mask, rewards.double(), 0.0)
    count = mask.sum(1, keepdim=True)
    mean = r.sum(1, keepdim=True) / count.clamp_min(1)
    centered = torch.where(mask, r - mean, 0.0)
    scale = r.abs().amax(1, keepdim=True)
    pos = (centered > 1e-9 * scale) & mask
    neg = mask & ~pos
    active = (count.squeeze(1) >= 2) & pos.any(1)
    best = torch.where(mask, r, NEG_INF).argmax(1)
    return centered, pos, neg, active, best


def masked_lse(x, keep):
    keep = keep | ~keep.any(1, keepdim=True)
    return torch.logsumexp(x.masked_fill(~keep, NEG_INF), 1)


def scores(logp, lengths, mask):
    return torch.where(mask, logp, 0.0) / torch.where(mask, lengths, 1.0)


def average(per_prompt, active):
    per_prompt = torch.where(active, per_prompt, 0.0)
    return per_prompt.sum() / active.sum().clamp_min(1)


def refa_dynamic(logp, lengths, rewards, mask, beta=3.0, gamma=2.0, alpha=0.01, p=2.0):
    centered, pos, neg, active, _ = partition(rewards, mask)
    u = beta * scores(logp, lengths, mask) + alpha * centered.abs().pow(p).float()
    ratio = masked_lse(u, neg) - masked_lse(u, pos) + torch.log(torch.tensor(gamma))
    return average(torch.logaddexp(torch.zeros_like(ratio), ratio), active)


def refa_one_vs_all(logp, lengths, rewards, mask, beta=2.0, gamma=2.0, alpha=0.01, p=2.0):
    centered, _, _, active, best = partition(rewards, mask)
    u = beta * scores(logp, lengths, mask) + alpha * centered.abs().pow(p).float()
    top = torch.nn.functional.one_hot(best, mask.shape[1]).bool() & mask
    rest = mask & ~top
    ratio = masked_lse(u, rest) - masked_lse(u, top) + torch.log(torch.tensor(gamma))
    return average(torch.logaddexp(torch.zeros_like(ratio), ratio), active)


def info_nca(logp, lengths, rewards, mask, beta=3.0, tau=1.0):
    centered, _, _, active, _ = partition(rewards, mask)
    z = beta * scores(logp, lengths, mask)
    log_model = z - masked_lse(z, mask).unsqueeze(1)
    scaled = centered / tau
    target = (scaled - masked_lse(scaled, mask).unsqueeze(1)).exp()
    target = torch.where(mask, target, 0.0).float()
    per_prompt = -torch.where(mask, target * log_model, 0.0).sum(1)
    return average(per_prompt, active)


LOSSES = {"RefaDynamic": refa_dynamic, "RefaOneVsAll": refa_one_vs_all, "InfoNca": info_nca}


def inputs(prompts, slots):
    torch.manual_seed(0)
    lengths = torch.randint(16, 512, (prompts, slots)).float()
    logp = -(torch.rand(prompts, slots) * 2 + 0.2) * lengths
    rewards = torch.randint(0, 11, (prompts, slots)).float()
    mask = torch.ones(prompts, slots, dtype=torch.bool)
    mask[::4, slots - 1] = False
    return logp, lengths, rewards, mask


def time_step(fn, logp, lengths, rewards, mask, min_seconds):
    def step():
        leaf = logp.detach().requires_grad_(True)
        fn(leaf, lengths, rewards, mask).backward()

    for _ in range(20):
        step()
    runs = []
    for _ in range(5):
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < min_seconds / 5:
            step()
            n += 1
        runs.append((time.perf_counter() - start) / n)
    return sorted(runs)[2] * 1e3


def main():
    threads, min_seconds = int(sys.argv[1]), float(sys.argv[2])
    torch.set_num_threads(threads)
    for shape in sys.argv[3:]:
        prompts, slots = map(int, shape.split(":"))
        data = inputs(prompts, slots)
        for name, fn in LOSSES.items():
            ms = time_step(fn, *data, min_seconds)
            print(json.dumps({"loss": name, "P": prompts, "K": slots, "ms": ms, "torch": torch.__version__}), flush=True)


if __name__ == "__main__":
    main()
