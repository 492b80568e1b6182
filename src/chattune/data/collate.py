"""Batches for training: padding-free (flattened with position_ids) or right-padded."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from chattune.data.render import IGNORE, Sample


class SampleDataset(torch.utils.data.Dataset):
    """Rendered samples as the dicts the Trainer's dataloader expects."""

    def __init__(self, samples: Sequence[Sample]):
        self.samples = samples if isinstance(samples, Sequence) else list(samples)  # a SampleStore stays on disk

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        s = self.samples[i]
        return {"input_ids": s.input_ids, "labels": s.labels}


def padded_collate(pad_id: int) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """Right-pad each batch to its longest sample; padding is masked and never supervised."""

    def collate(features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return collate


def flat_collate() -> Callable[[list[dict]], dict[str, Any]]:
    """Concatenate the batch into one row with restarting position_ids and no padding.

    The model must run with use_cache=False: only then does transformers derive
    per-sequence attention blocks from position_ids on SDPA/eager, so samples
    never attend to each other. The sample boundaries (cu_seq_lens_*) travel with
    the batch: flash-attention and model/packed_attention.py attend per sample.
    """
    from transformers import DataCollatorWithFlattening

    return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE, return_flash_attn_kwargs=True)


def make_collate(padding_free: bool, pad_id: int) -> Callable[[list[dict]], dict[str, Any]]:
    """The collator the config asks for."""
    return flat_collate() if padding_free else padded_collate(pad_id)
