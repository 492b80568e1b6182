"""Log-likelihoods of given answers: the summed log-probability of each sequence's supervised tokens.

Used by preference tuning (train/preference.py) and by `chattune eval --preference / --loss` (evaluate/):
one forward pass, logits only at supervised positions, in padded or padding-free batches alike.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from chattune.data.render import IGNORE, Sample


def _supervised(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep mask over input positions, their target ids): position t predicts labels[t + 1]."""
    shifted = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = shifted != IGNORE
    return keep, shifted[shifted != IGNORE]


def sequence_logps(model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each sequence's supervised tokens, their count), in batch order.

    Padded batches hold one sequence per row; padding-free ones one row whose position_ids restart at 0 per sequence.
    """
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    keep, targets = _supervised(labels)
    if "position_ids" in inputs and labels.shape[0] == 1:
        starts = inputs["position_ids"][0] == 0
        seq_of = (starts.cumsum(0) - 1)[keep[0].to(starts.device)]
        n = int(starts.sum())
    else:
        seq_of = keep.nonzero()[:, 0]
        n = labels.shape[0]
    outputs = model(**inputs, logits_to_keep=keep)
    logits = outputs.logits.reshape(-1, outputs.logits.shape[-1]).float()
    token_logps = -F.cross_entropy(logits, targets.to(logits.device), reduction="none")
    seq_of = seq_of.to(logits.device)
    sums = torch.zeros(n, device=logits.device).index_add(0, seq_of, token_logps)
    counts = torch.zeros(n, device=logits.device).index_add(0, seq_of, torch.ones_like(token_logps))
    return sums, counts



def score_samples(model: Any, samples: Sequence[Sample], pad_id: int, *, batch_size: int,
                  progress: Callable[[int], None] | None = None) -> tuple[list[float], list[int]]:
    """(summed log-probability, supervised token count) of each sample, in order; padded batches, no gradients."""
    device = next(model.parameters()).device
    sums: list[float] = []
    counts: list[int] = []
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].input_ids))  # little padding per batch
    got: dict[int, tuple[float, int]] = {}
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(samples[i].input_ids) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            labels = torch.full((len(idx), width), IGNORE, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                n = len(samples[i].input_ids)
                ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(samples[i].input_ids), \
                    torch.tensor(samples[i].labels), 1
            s, c = sequence_logps(model, {"input_ids": ids.to(device), "labels": labels.to(device),
                                          "attention_mask": mask.to(device)})
            for row, i in enumerate(idx):
                got[i] = (float(s[row]), int(c[row]))
            if progress is not None:
                progress(len(idx))
    for i in range(len(samples)):
        sums.append(got[i][0])
        counts.append(got[i][1])
    return sums, counts
