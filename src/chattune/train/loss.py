"""Causal-LM loss computed only where labels are supervised.

The vocabulary projection and softmax are the most expensive per-token work of a
small model's step (49k-152k columns). Prompt tokens carry no loss, so their
logits are never needed: the model is asked for logits at supervised positions
only (transformers' `logits_to_keep` with a boolean mask), which gives the same
loss and gradients as the full computation with less time and memory.

The cross-entropy itself runs over row chunks (chunked_cross_entropy): the
float32 copy of the logits, their log-softmax and its gradient never exist for
the whole batch at once, only for one chunk of rows at a time. The chunk is
per device (chunk_rows): 64 rows on a CPU (cache-sized), about 256 MiB of float32
temporaries on a GPU, where 64-row chunks would launch thousands of tiny kernels.

Under mixed precision accelerate wraps the model's forward so that every output
is converted to float32, a full float32 copy of the kept logits (and a float32
gradient for it) that the chunking exists to avoid; keep_logits_dtype takes that
conversion off (autocast stays).
"""

from __future__ import annotations

from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F

from chattune.data.render import IGNORE


def predicts_label(labels: torch.Tensor) -> torch.Tensor:
    """Over positions 0..T-2: whether position t predicts a supervised token (labels[t + 1] is not IGNORE)."""
    return labels[:, 1:] != IGNORE


def supervised_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep mask over input positions, their target ids): position t predicts labels[t + 1]."""
    shifted = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = predicts_label(labels)
    return keep, shifted[keep[:, :-1]]


CHUNK_ROWS = 64  # on a CPU: 64 x 152k float32 (Qwen's vocabulary) = 39 MB of temporaries
GPU_CHUNK_BYTES = 1 << 28  # on a GPU: 256 MiB of float32 per chunk (441 rows of a 152k vocabulary)


def chunk_rows(vocab: int, device: torch.device | str) -> int:
    """Rows per cross-entropy chunk: CHUNK_ROWS on a CPU; on a GPU as many as fit GPU_CHUNK_BYTES (at least 256)."""
    if torch.device(device).type == "cpu":
        return CHUNK_ROWS
    return max(256, GPU_CHUNK_BYTES // (4 * max(vocab, 1)))


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of low-precision logits, upcast to float32 one chunk of rows at a time."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        rows = ctx.rows = chunk_rows(logits.shape[1], logits.device)
        for a in range(0, logits.shape[0], rows):
            chunk = logits[a:a + rows].float()
            lse[a:a + rows] = torch.logsumexp(chunk, dim=-1)
            picked = chunk.gather(1, targets[a:a + rows, None]).squeeze(1)
            total += (lse[a:a + rows] - picked).sum()
        ctx.save_for_backward(logits, targets, lse)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        rows = ctx.rows
        for a in range(0, logits.shape[0], rows):
            p = (logits[a:a + rows].float() - lse[a:a + rows, None]).exp_()  # softmax
            p.scatter_add_(1, targets[a:a + rows, None], torch.full_like(p[:, :1], -1.0))
            grad[a:a + rows] = p.mul_(grad_total)
        return grad, None


def chunked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum(cross_entropy(logits.float(), targets)) without a float32 copy of all logits; same values and gradients.

    float32 logits (accelerate converts a bf16 model's outputs) take the same path: chunks stay in cache and the
    gradient needs no zero-filled buffer.
    """
    if not logits.requires_grad:
        return F.cross_entropy(logits.float(), targets, reduction="sum")
    return _ChunkedCrossEntropy.apply(logits, targets)


def keep_logits_dtype(model: Any) -> bool:
    """Take accelerate's float32 output conversion off a prepared model's forward, keeping its autocast.

    accelerate (mixed precision) sets model.forward = fp32-converter(autocast(forward)); the converter copies the
    kept logits to float32 whole, which chunked_cross_entropy upcasts chunk by chunk anyway (same values, same
    gradients). True when a converter was removed.
    """
    from accelerate.utils.operations import ConvertOutputsToFp32

    forward = getattr(model, "forward", None)
    func = getattr(forward, "__func__", forward)
    converter = getattr(func, "__wrapped__", None)
    if not isinstance(converter, ConvertOutputsToFp32):
        return False
    inner = converter.model_forward
    model.forward = MethodType(inner, model) if hasattr(forward, "__func__") else inner
    return True


def supervised_loss(model: Any, inputs: dict[str, torch.Tensor], num_items: int | torch.Tensor | None) -> tuple[torch.Tensor, Any]:
    """Sum of token cross-entropies / num_items (the whole accumulated batch) or / this batch's count."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    keep, targets = supervised_positions(labels)
    outputs = model(**inputs, logits_to_keep=keep)
    logits = outputs.logits.reshape(-1, outputs.logits.shape[-1])
    loss = chunked_cross_entropy(logits, targets.to(logits.device))
    denom = num_items if num_items is not None else max(int(targets.numel()), 1)
    return loss / denom, outputs
