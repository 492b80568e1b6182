"""Throughput figures: model FLOPs utilisation (MFU) and peak memory on a GPU.

LoRA training freezes the base weights, so a token costs the forward pass (2N
FLOPs for N parameters) plus the backward pass through the activations (another
2N) but no weight gradients: 4N per token, attention scores not counted.
"""

from __future__ import annotations

from typing import Any, Callable

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


def lora_step_flops(model: Any, tokens: int, supervised: int) -> float:
    """FLOPs of one LoRA step on the 4N basis as chattune runs it: every token through the body, the output
    head only at the supervised positions (train/loss.py computes no logits elsewhere)."""
    return step_flops_counter(model)(tokens, supervised)


def step_flops_counter(model: Any) -> Callable[[int, int], float]:
    """lora_step_flops for this model as a function of (tokens, supervised), its weights counted once.

    Input embeddings are lookups, not matmuls; a tied head is the table's one matmul, counted once.
    A bitsandbytes 4-bit weight counts as the weights it holds, not its packed bytes (two per byte).
    """
    n, n_emb, n_head, tied = _weights(model)
    body = n - n_emb - (0 if tied else n_head)
    return lambda tokens, supervised: 4.0 * (body * tokens + n_head * supervised)


def gpu_stats(flops_per_s: float) -> dict[str, float]:
    """{'mfu', 'peak_mem_gib'} on a CUDA device (MFU from this device's model FLOP/s); empty on CPU."""
    if not torch.cuda.is_available():
        return {}
    out = {"peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    peak = peak_flops(torch.cuda.get_device_name())
    if peak:
        out["mfu"] = round(flops_per_s / peak, 4)
    return out
