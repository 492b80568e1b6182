"""GPU throughput of chattune's training step: tokens/s, MFU and peak memory.

    python benchmarks/gpu_throughput.py [--shapes 0.5b,7b] [--tokens-per-batch 16384] [--steps 10]

Randomly initialised Qwen2.5-0.5B- and Qwen2.5-7B-shaped models (speed needs no
trained weights), bf16, LoRA r 8 on all linear layers, padding-free batches of
~tokens-per-batch real tokens built from 300-600-token samples, the supervised-only loss.
Needs a CUDA GPU; on a CPU it says so and stops (use --cpu-smoke to check the script itself).
"""

from __future__ import annotations

import argparse
import time

import torch
from common import machine

from chattune.config import LoraConfig
from chattune.data.collate import flat_collate
from chattune.model.lora import apply_lora
from chattune.train.loss import supervised_loss
from chattune.train.throughput import lora_flops_per_token, peak_flops

SHAPES = {  # Qwen2.5 configuration values
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               vocab_size=152064, tie_word_embeddings=False),
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=1000, tie_word_embeddings=True),
}


def batch(tokens: int, vocab: int, gen: torch.Generator) -> dict:
    feats, total = [], 0
    while total < tokens:
        n = int(torch.randint(300, 600, (1,), generator=gen))
        ids = torch.randint(100, vocab, (n,), generator=gen).tolist()
        feats.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})
        total += n
    return flat_collate()(feats)


def run_shape(name: str, tokens: int, steps: int, device: str) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**SHAPES[name], max_position_embeddings=4096, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.config.use_cache = False
    model = apply_lora(model, LoraConfig(r=8, alpha=16, dropout=0.05), gradient_checkpointing=name == "7b")
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    batches = [{k: v.to(device) for k, v in batch(tokens, cfg.vocab_size, gen).items()} for _ in range(steps + 2)]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seen, seconds = 0, 0.0
    for i, b in enumerate(batches):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss, _ = supervised_loss(model, b, None)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # warm-up steps excluded
            seconds += time.perf_counter() - t
            seen += b["input_ids"].numel()
    tps = seen / seconds
    fpt = lora_flops_per_token(model)
    peak = peak_flops(torch.cuda.get_device_name()) if device == "cuda" else None
    mem = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    mfu = f"{tps * fpt / peak:.1%}" if peak else "n/a"
    print(f"{name:>5}: {tps:10.0f} tokens/s   MFU {mfu:>6} (4N basis, N={fpt / 4 / 1e9:.2f}B)   peak memory {mem:.1f} GiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", default="0.5b,7b")
    ap.add_argument("--tokens-per-batch", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cpu-smoke", action="store_true", help="run a tiny shape on the CPU to check the script")
    args = ap.parse_args()
    if args.cpu_smoke:
        run_shape("smoke", 2048, 2, "cpu")
        return
    if not torch.cuda.is_available():
        print("gpu_throughput needs a CUDA GPU; none here (see benchmarks/RESULTS.md for recorded numbers)")
        return
    print(f"# gpu_throughput — {torch.cuda.get_device_name()}; {machine()}")
    for name in args.shapes.split(","):
        run_shape(name, args.tokens_per_batch, args.steps, "cuda")


if __name__ == "__main__":
    main()
