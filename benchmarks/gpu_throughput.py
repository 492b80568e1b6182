"""GPU throughput of chattune's training step: tokens/s, MFU and peak memory.

    python benchmarks/gpu_throughput.py [--shapes 0.5b,7b] [--tokens-per-batch 16384] [--steps 10]
    python benchmarks/gpu_throughput.py --cpu-smoke      # the same step, shrunk shapes, on the CPU

Randomly initialised Qwen2.5-0.5B- and Qwen2.5-7B-shaped models (speed needs no trained weights), the step
as `chattune train` runs it on a GPU: bf16 weights, LoRA (chattune's default recipe, fp32 adapter weights) on
all linear layers, padding-free rows of ~tokens-per-batch real tokens from 300-600-token samples with the
packed attention the trainer switches on, the forward pass and loss under bf16 autocast (so the fused LoRA
path is taken), TF32 on, the supervised-positions loss, gradient clipping, AdamW; gradient checkpointing as
train.gradient_checkpointing=auto decides it (on above 1B parameters).

FLOPs on the 4N basis of LoRA training (forward 2N + backward through the activations 2N, no weight
gradients, attention scores not counted), the output head charged only at the supervised positions because
chattune computes no logits elsewhere (train/throughput.py: lora_step_flops). MFU = FLOP/s / the GPU's dense
bf16 peak (train/throughput.py: PEAK_BF16, by device name).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import Any

import torch
from common import machine

from chattune.config import LoraConfig
from chattune.data.collate import flat_collate
from chattune.model.lora import apply_lora
from chattune.model.packed_attention import use_packed_attention
from chattune.train.loss import supervised_loss, supervised_positions
from chattune.train.throughput import lora_step_flops, peak_flops

SHAPES = {  # Qwen2.5 configuration values
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               vocab_size=152064, tie_word_embeddings=False),
}
# The same head layout and tying, shrunk for --cpu-smoke (head_dim 8, two layers, a small vocabulary).
SMOKE = {
    "0.5b": dict(SHAPES["0.5b"], hidden_size=112, intermediate_size=256, num_hidden_layers=2, vocab_size=2000),
    "7b": dict(SHAPES["7b"], hidden_size=224, intermediate_size=512, num_hidden_layers=2, vocab_size=2000),
}


def batch(tokens: int, vocab: int, gen: torch.Generator, lengths: tuple[int, int] = (300, 600)) -> dict:
    """One padding-free row of ~tokens real tokens; the first third of each sample is an unsupervised prompt."""
    feats, total = [], 0
    while total < tokens:
        n = int(torch.randint(*lengths, (1,), generator=gen))
        ids = torch.randint(100, vocab, (n,), generator=gen).tolist()
        feats.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})
        total += n
    return flat_collate()(feats)


def to_device(b: dict, device: str) -> dict:
    # The collator also hands over plain ints (max_length_q / max_length_k): only tensors move.
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}


def build_model(shape: dict, device: str) -> Any:
    """A random bf16 model of this shape with chattune's LoRA, set up as build_trainer sets it up."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**shape, max_position_embeddings=4096, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    checkpointing = sum(p.numel() for p in model.parameters()) > 1e9  # train.gradient_checkpointing=auto
    model.config.use_cache = False
    model = apply_lora(model, LoraConfig(), gradient_checkpointing=checkpointing)
    use_packed_attention(model)  # what build_trainer does for padding-free batches
    model.train()
    return model


def step(model: Any, b: dict, opt: Any, device: str) -> float:
    """One optimizer step as the Trainer runs it with bf16=True: autocast forward + loss, backward, clip, AdamW."""
    autocast = torch.autocast(device, dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    with autocast:
        loss, _ = supervised_loss(model, b, None)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def run_shape(name: str, tokens: int, steps: int, device: str, *, smoke: bool = False) -> dict[str, Any]:
    """Train `steps` timed steps (after 2 warm-up steps) of one shape; its figures as a dict."""
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TrainingArguments(tf32=True) on Ampere and newer
        torch.backends.cudnn.allow_tf32 = True
    shape = (SMOKE if smoke else SHAPES)[name]
    model = build_model(shape, device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=device == "cuda")
    gen = torch.Generator().manual_seed(0)
    lengths = (30, 60) if smoke else (300, 600)
    batches = [to_device(batch(tokens, shape["vocab_size"], gen, lengths), device) for _ in range(steps + 2)]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seen = supervised = 0
    seconds, losses = 0.0, []
    for i, b in enumerate(batches):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        losses.append(step(model, b, opt, device))
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # warm-up steps excluded
            seconds += time.perf_counter() - t
            seen += b["input_ids"].numel()
            supervised += int(supervised_positions(b["labels"])[1].numel())
    flops = lora_step_flops(model, seen, supervised)
    peak = peak_flops(torch.cuda.get_device_name()) if device == "cuda" else None
    out = {"shape": name + ("-smoke" if smoke else ""), "tokens_per_s": seen / seconds, "step_s": seconds / steps,
           "tflops_per_s": flops / seconds / 1e12, "mfu": flops / seconds / peak if peak else None,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
           "supervised_share": supervised / seen, "final_loss": losses[-1],
           "params_b": sum(p.numel() for p in model.parameters()) / 1e9}
    del model, opt, batches
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def describe(r: dict[str, Any]) -> str:
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
    mem = f"{r['peak_mem_gib']:.1f} GiB" if r["peak_mem_gib"] is not None else "n/a"
    return (f"{r['shape']:>10}: {r['tokens_per_s']:10.0f} tokens/s   {r['tflops_per_s']:7.1f} TFLOP/s   MFU {mfu:>6} "
            f"(4N basis, head at {r['supervised_share']:.0%} supervised positions)   peak memory {mem}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="0.5b,7b")
    ap.add_argument("--tokens-per-batch", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cpu-smoke", action="store_true", help="run shrunk 0.5b/7b shapes on the CPU to check the script")
    args = ap.parse_args()
    if args.cpu_smoke:
        for name in args.shapes.split(","):
            print(describe(run_shape(name, 512, 2, "cpu", smoke=True)))
        return
    if not torch.cuda.is_available():
        print("gpu_throughput needs a CUDA GPU; none here (see benchmarks/RESULTS.md for recorded numbers)")
        return
    print(f"# gpu_throughput — {torch.cuda.get_device_name()}; {machine()}")
    for name in args.shapes.split(","):
        print(describe(run_shape(name, args.tokens_per_batch, args.steps, "cuda")))


if __name__ == "__main__":
    main()
