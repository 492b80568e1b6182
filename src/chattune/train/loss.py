"""Causal-LM loss computed only where labels are supervised.

The vocabulary projection and softmax are the most expensive per-token work of a
small model's step (49k-152k columns). Prompt tokens carry no loss, so their
logits are never needed: the model is asked for logits at supervised positions
only (transformers' `logits_to_keep` with a boolean mask), which gives the same
loss and gradients as the full computation with less time and memory.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer

from chattune.data.render import IGNORE
from chattune.train.resume import AtomicCheckpoints


def supervised_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep mask over input positions, their target ids): position t predicts labels[t + 1]."""
    shifted = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = shifted != IGNORE
    return keep, shifted[shifted != IGNORE]


def supervised_loss(model: Any, inputs: dict[str, torch.Tensor], num_items: int | torch.Tensor | None) -> tuple[torch.Tensor, Any]:
    """Sum of token cross-entropies / num_items (the whole accumulated batch) or / this batch's count."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    keep, targets = supervised_positions(labels)
    outputs = model(**inputs, logits_to_keep=keep)
    logits = outputs.logits.reshape(-1, outputs.logits.shape[-1])
    loss = F.cross_entropy(logits.float(), targets.to(logits.device), reduction="sum")
    denom = num_items if num_items is not None else max(int(targets.numel()), 1)
    return loss / denom, outputs


class ChattuneTrainer(AtomicCheckpoints, Trainer):
    """HF Trainer with the supervised-positions loss and atomic checkpoints; everything else is the Trainer's own."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Normalising by num_items_in_batch matches the Trainer's own rule: such a loss is
        # already scaled for gradient accumulation, a per-batch mean is divided by it later.
        if not self.model_accepts_loss_kwargs:
            num_items_in_batch = None
        counter = getattr(self, "token_counter", None)
        if counter is not None and model.training:
            counter.add(inputs)
        loss, outputs = supervised_loss(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss
