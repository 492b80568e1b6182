"""Throughput figures: model FLOPs utilisation (MFU) and peak memory on a GPU.

LoRA training freezes the base weights, so a token costs the forward pass (2N
FLOPs for N parameters) plus the backward pass through the activations (another
2N) but no weight gradients: 4N per token, attention scores not counted.
"""

from __future__ import annotations

from typing import Any

import torch

from chattune.model.quant import parameter_count

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, by a substring of the device name; the longest match wins,
# so "H100 PCIe" (756 TFLOP/s) and "H100 NVL" (835) are not given the SXM part's 989 ("NVIDIA H100 80GB HBM3").
PEAK_BF16 = {
    "H200": 989e12, "H200 NVL": 835e12, "H100": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12,
    "H800": 989e12, "H800 PCIe": 756e12, "GH200": 989e12,
    "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12,
    "A10G": 70e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12,
}


def peak_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of a GPU by its name, or None when unknown (fp16 on V100/T4: their fp16 peak)."""
    for key in sorted(PEAK_BF16, key=len, reverse=True):
        if key.lower() in device_name.lower():
            return PEAK_BF16[key]
    return None


def _weights(model: Any) -> tuple[int, int, int, bool]:
    """(all weights, input embedding weights, output head weights, head tied to the embeddings); 4-bit unpacked."""
    n = sum(parameter_count(p) for p in model.parameters())  # a tied head is one parameter, counted once
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    n_emb = parameter_count(emb.weight) if emb is not None else 0
    n_head = parameter_count(head.weight) if head is not None else 0
    tied = emb is not None and head is not None and head.weight is emb.weight
    return n, n_emb, n_head, tied


def lora_flops_per_token(model: Any) -> float:
    """4 x parameters that take part in the forward pass (input embeddings are lookups, not matmuls).

    A bitsandbytes 4-bit weight counts as the weights it holds, not its packed bytes (two per byte).
    """
    n, n_emb, _, tied = _weights(model)
    return 4.0 * (n if tied else n - n_emb)  # a tied table is the head's matmul: counted once


def lora_step_flops(model: Any, tokens: int, supervised: int) -> float:
    """FLOPs of one LoRA step on the 4N basis as chattune runs it: every token through the body, the output
    head only at the supervised positions (train/loss.py computes no logits elsewhere)."""
    n, n_emb, n_head, tied = _weights(model)
    body = n - n_emb - (0 if tied else n_head)
    return 4.0 * (body * tokens + n_head * supervised)


def gpu_stats(tokens_per_s: float, flops_per_token: float) -> dict[str, float]:
    """{'mfu', 'peak_mem_gib'} on a CUDA device; empty on CPU."""
    if not torch.cuda.is_available():
        return {}
    out = {"peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    peak = peak_flops(torch.cuda.get_device_name())
    if peak:
        out["mfu"] = round(tokens_per_s * flops_per_token / peak, 4)
    return out
