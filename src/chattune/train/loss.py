"""Causal-LM loss computed only where labels are supervised.

The vocabulary projection and softmax are the most expensive per-token work of a
small model's step (49k-152k columns). Prompt tokens carry no loss, so their
logits are never needed: the model is asked for logits at supervised positions
only (transformers' `logits_to_keep` with a boolean mask), which gives the same
loss and gradients as the full computation with less time and memory.

The cross-entropy itself runs over row chunks (chunked_cross_entropy): the
float32 copy of the logits, their log-softmax and its gradient never exist for
the whole batch at once, only for CHUNK_ROWS rows at a time.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from chattune.data.render import IGNORE


def supervised_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep mask over input positions, their target ids): position t predicts labels[t + 1]."""
    shifted = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = shifted != IGNORE
    return keep, shifted[shifted != IGNORE]


CHUNK_ROWS = 64  # 64 x 152k float32 (Qwen's vocabulary) = 39 MB of temporaries


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of low-precision logits, upcast to float32 one chunk of rows at a time."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for a in range(0, logits.shape[0], CHUNK_ROWS):
            chunk = logits[a:a + CHUNK_ROWS].float()
            lse[a:a + CHUNK_ROWS] = torch.logsumexp(chunk, dim=-1)
            picked = chunk.gather(1, targets[a:a + CHUNK_ROWS, None]).squeeze(1)
            total += (lse[a:a + CHUNK_ROWS] - picked).sum()
        ctx.save_for_backward(logits, targets, lse)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for a in range(0, logits.shape[0], CHUNK_ROWS):
            p = (logits[a:a + CHUNK_ROWS].float() - lse[a:a + CHUNK_ROWS, None]).exp_()  # softmax
            p.scatter_add_(1, targets[a:a + CHUNK_ROWS, None], torch.full_like(p[:, :1], -1.0))
            grad[a:a + CHUNK_ROWS] = p.mul_(grad_total)
        return grad, None


def chunked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum(cross_entropy(logits.float(), targets)) without a float32 copy of all logits; same values and gradients.

    float32 logits (accelerate converts a bf16 model's outputs) take the same path: chunks stay in cache and the
    gradient needs no zero-filled buffer.
    """
    if not logits.requires_grad:
        return F.cross_entropy(logits.float(), targets, reduction="sum")
    return _ChunkedCrossEntropy.apply(logits, targets)


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
