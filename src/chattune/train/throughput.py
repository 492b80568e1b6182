"""Throughput figures: model FLOPs utilisation (MFU) and peak memory on a GPU.

LoRA training freezes the base weights, so a token costs the forward pass (2N
FLOPs for N parameters) plus the backward pass through the activations (another
2N) but no weight gradients: 4N per token, attention scores not counted.
"""

from __future__ import annotations

from typing import Any

import torch

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, by a substring of the device name.
PEAK_BF16 = {
    "H200": 989e12, "H100": 989e12, "H800": 989e12, "GH200": 989e12,
    "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12,
    "A10G": 70e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12,
}


def peak_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of a GPU by its name, or None when unknown."""
    for key in sorted(PEAK_BF16, key=len, reverse=True):
        if key in device_name:
            return PEAK_BF16[key]
    return None


def lora_flops_per_token(model: Any) -> float:
    """4 x parameters that take part in the forward pass (input embeddings are lookups, not matmuls)."""
    n = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = emb is not None and getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if emb is not None and not tied:
        n -= emb.weight.numel()
    return 4.0 * n


def gpu_stats(tokens_per_s: float, flops_per_token: float) -> dict[str, float]:
    """{'mfu', 'peak_mem_gib'} on a CUDA device; empty on CPU."""
    if not torch.cuda.is_available():
        return {}
    out = {"peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    peak = peak_flops(torch.cuda.get_device_name())
    if peak:
        out["mfu"] = round(tokens_per_s * flops_per_token / peak, 4)
    return out
