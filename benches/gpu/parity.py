"""Reference outputs of transformers for the crate's parity check (examples/parity_check.rs).

Builds a random `MistralForCausalLM` from `DIR/config.json` (written by
`examples/bench_step.rs --dump DIR`), saves it to `DIR/model` (safetensors, f32), builds the
batch of `DIR/batch.json` (right-padded, prompts shared by their responses, random ids),
and writes `DIR/reference-<dtype>.safetensors` with, for the model run in `--dtype`:
  input_ids, attention_mask, labels [N, T]; rewards [P, K];
  logits [T0, V]: the first sequence's logits at its first T0 positions (f32);
  logp_sum [N]: each response's summed token log-probability (log_softmax in f32);
  loss []: REFA-dynamic with the crate's defaults;
  grad.<name>: the loss's gradient of a few parameters (f32).

Usage: python parity.py DIR --dtype f32|bf16 --device cpu|cuda
"""
import argparse
import json
import os

import safetensors.torch
import torch
import transformers

from hf_step import build_batch, load_config, refa_dynamic

GRADIENTS = [
    "model.norm.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "lm_head.weight",
]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("dir")
    parser.add_argument("--dtype", choices=["f32", "bf16"], required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--positions", type=int, default=16)
    args = parser.parse_args()
    device = torch.device(args.device)
    config = load_config(args.dir)
    with open(os.path.join(args.dir, "batch.json")) as f:
        spec = json.load(f)
    folder = os.path.join(args.dir, "model")
    if not os.path.exists(os.path.join(folder, "config.json")):
        torch.manual_seed(1)
        model = transformers.MistralForCausalLM(config)
        with torch.no_grad():  # norms away from 1, so that their gradients say something
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.add_(0.1 * torch.randn_like(p))
        model.save_pretrained(folder, safe_serialization=True)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = transformers.MistralForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    ids, mask, labels, rewards, _ = build_batch(spec, config.vocab_size, device, 7)
    prompts, responses = rewards.shape
    logits = model(input_ids=ids, attention_mask=mask).logits
    logp = logits[:, :-1].float().log_softmax(-1)
    target = labels[:, 1:]
    valid = target != -100
    token = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    sums = torch.where(valid, token, 0.0).sum(1)
    lengths = valid.sum(1).float()
    loss = refa_dynamic(sums.view(prompts, responses), lengths.view(prompts, responses), rewards)
    loss.backward()
    params = dict(model.named_parameters())
    out = {
        "input_ids": ids.cpu(),
        "attention_mask": mask.cpu(),
        "labels": labels.cpu(),
        "rewards": rewards.float().cpu(),
        "logits": logits[0, : args.positions].float().detach().cpu().contiguous(),
        "logp_sum": sums.detach().float().cpu(),
        "loss": loss.detach().float().cpu().reshape(()),
    }
    for name in GRADIENTS:
        if name in params and params[name].grad is not None:
            out[f"grad.{name}"] = params[name].grad.float().cpu().contiguous()
    path = os.path.join(args.dir, f"reference-{args.dtype}.safetensors")
    safetensors.torch.save_file(out, path)
    print(json.dumps({"reference": path, "loss": float(loss)}))


if __name__ == "__main__":
    main()
