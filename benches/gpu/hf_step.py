"""The baseline training step: transformers + PyTorch, as a Python trainer would write it.

Builds `MistralForCausalLM` from the `config.json` that `examples/bench_step.rs --dump DIR`
wrote, with random weights, and the batch of the same shapes from `batch.json` (right-padded
sequences, prompts shared by their responses). One step: forward pass with SDPA attention,
logits materialized and `log_softmax` in f32 as transformers and TRL do, per-response
log-probability sums, the REFA-dynamic loss, backward, gradient clipping at 1.0, AdamW.
Prints one JSON object with the median milliseconds of `--steps` steps after `--warmup`.

Modes:
  bf16         weights in bf16, AdamW(fused=True) (pure bf16: no master weights)
  fp32-master  weights in f32 with bf16 autocast (the memory-equivalent of the crate's
               bf16 weights with f32 master copies), AdamW(fused=True)
  f32          weights in f32, no autocast, AdamW(foreach) (the CPU comparison)

Options for the stronger baselines (GPU):
  --liger      Liger-Kernel's Triton kernels patched into Mistral before the model is built
               (apply_liger_kernel_to_mistral: RMSNorm, RoPE, SwiGLU; its fused linear
               cross-entropy is off, since the loss needs per-token log-probabilities); the
               `liger-kernel` wheel must be importable
  --compile    the model under torch.compile (default mode)

Usage: python hf_step.py DIR --mode bf16 --device cuda [--warmup 2] [--steps 8]
       [--peak-tflops 989] [--name NAME] [--model LABEL] [--liger] [--compile]
"""
import argparse
import json
import os
import statistics
import time

import torch
import transformers

EOS = 2


def load_config(folder):
    """The MistralConfig of `folder/config.json`, with SDPA attention."""
    with open(os.path.join(folder, "config.json")) as f:
        config = transformers.MistralConfig(**json.load(f))
    config._attn_implementation = "sdpa"
    return config


def build_batch(spec, vocab, device, seed):
    g = torch.Generator().manual_seed(seed)
    rows, labels, masks, rewards = [], [], [], []
    width = max(p["prompt"] + r for p in spec["prompts"] for r in p["responses"])
    for p in spec["prompts"]:
        prompt = torch.randint(3, vocab, (p["prompt"],), generator=g)
        for r in p["responses"]:
            response = torch.randint(3, vocab, (r,), generator=g)
            response[-1] = EOS
            ids = torch.full((width,), EOS, dtype=torch.long)
            lab = torch.full((width,), -100, dtype=torch.long)
            mask = torch.zeros(width, dtype=torch.long)
            n = p["prompt"] + r
            ids[: p["prompt"]] = prompt
            ids[p["prompt"] : n] = response
            lab[p["prompt"] : n] = response
            mask[:n] = 1
            rows.append(ids)
            labels.append(lab)
            masks.append(mask)
        rewards.append(torch.tensor(p["rewards"], dtype=torch.float32))
    to = lambda xs: torch.stack(xs).to(device)
    return to(rows), to(masks), to(labels), to(rewards), int(sum(m.sum() for m in masks))


def refa_dynamic(logp, lengths, rewards, beta=3.0, gamma=2.0, alpha=0.01, power=2.0):
    """REFA-dynamic on [P, K] inputs, every slot valid (the crate's defaults)."""
    s = logp / lengths
    mean = rewards.mean(1, keepdim=True)
    spread = rewards.amax(1, keepdim=True) - rewards.amin(1, keepdim=True)
    pos = (rewards - mean) > 1e-9 * spread
    u = beta * s + alpha * (rewards - mean).abs().pow(power)
    neg_inf = torch.finfo(u.dtype).min
    lse_pos = torch.where(pos, u, neg_inf).logsumexp(1)
    lse_neg = torch.where(~pos, u, neg_inf).logsumexp(1)
    active = pos.any(1)
    per_prompt = torch.nn.functional.softplus(torch.log(torch.tensor(gamma)) + lse_neg - lse_pos)
    return torch.where(active, per_prompt, 0.0).sum() / active.sum().clamp_min(1)


def step(model, forward, optimizer, batch, prompts, responses, autocast):
    ids, mask, labels, rewards, _ = batch
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = forward(input_ids=ids, attention_mask=mask).logits
    logp = logits[:, :-1].float().log_softmax(-1)
    target = labels[:, 1:]
    valid = target != -100
    token = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    sums = torch.where(valid, token, 0.0).sum(1).view(prompts, responses)
    lengths = valid.sum(1).float().view(prompts, responses)
    loss = refa_dynamic(sums, lengths, rewards)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("dir")
    parser.add_argument("--mode", choices=["bf16", "fp32-master", "f32"], required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--peak-tflops", type=float)
    parser.add_argument("--name")
    parser.add_argument("--model", help="label of the model size in the output")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--liger", action="store_true")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = load_config(args.dir)
    with open(os.path.join(args.dir, "batch.json")) as f:
        spec = json.load(f)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.mode == "bf16" else torch.float32
    if args.liger:
        from liger_kernel.transformers import apply_liger_kernel_to_mistral

        apply_liger_kernel_to_mistral(
            rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
        )
    model = transformers.MistralForCausalLM(config).to(device=device, dtype=dtype)
    model.train()
    forward = torch.compile(model) if args.compile else model
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, fused=fused)
    batch = build_batch(spec, config.vocab_size, device, 0)
    prompts, responses = len(spec["prompts"]), len(spec["prompts"][0]["responses"])
    autocast = args.mode == "fp32-master"
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step(model, forward, optimizer, batch, prompts, responses, autocast)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step(model, forward, optimizer, batch, prompts, responses, autocast)
        loss.item()
        sync()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens = batch[4]
    padded = batch[0].numel()
    parameters = sum(p.numel() for p in model.parameters())
    record = {
        "name": args.name or f"transformers {args.mode}",
        "model": args.model,
        "device": str(device),
        "dtype": args.mode,
        "parameters": parameters,
        "tokens": tokens,
        "padded_tokens": padded,
        "ms_per_step": seconds * 1e3,
        "ms_fastest_step": min(times) * 1e3,
        "tokens_per_s": tokens / seconds,
        "tokens_per_s_padded": padded / seconds,
        "mfu": (6 * parameters * tokens / seconds / (args.peak_tflops * 1e12))
        if args.peak_tflops
        else None,
        "peak_allocated_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "liger": args.liger,
        "compile": args.compile,
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
