"""The trained adapter into the run directory: gathered from the shards where needed, written all or nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chattune.files import atomic_dir
from chattune.model.lora import save_kwargs
from chattune.train.processes import barrier, is_main_process


def save_adapter(trainer: Any, dest: Path) -> None:
    """The trained adapter into dest: gathered from the shards (ZeRO-3, FSDP) by all, written by the main process."""
    model: Any = trainer.model
    if getattr(trainer, "is_deepspeed_enabled", False) and _zero_stage(trainer) == 3:
        model = _WithStateDict(trainer.accelerator.unwrap_model(trainer.model),
                               trainer.accelerator.get_state_dict(trainer.deepspeed))  # every process takes part
    elif getattr(trainer, "is_fsdp_enabled", False):
        model = _WithStateDict(trainer.accelerator.unwrap_model(trainer.model),
                               trainer.accelerator.get_state_dict(trainer.model))
    if is_main_process():
        write_adapter(model, dest)
    barrier()  # nobody reads or returns before the adapter is on disk


def write_adapter(model: Any, dest: Path) -> None:
    """save_pretrained into a temporary folder beside dest, then swap it in (a crash never leaves half an adapter)."""
    with atomic_dir(dest) as tmp:
        model.save_pretrained(str(tmp), **save_kwargs(model))  # PiSSA: written as plain LoRA of the original base


class _WithStateDict:
    """A model whose save_pretrained writes a given (gathered) state dict."""

    def __init__(self, model: Any, state_dict: dict[str, Any]):
        self.model, self.state_dict = model, state_dict

    def save_pretrained(self, path: str) -> None:
        self.model.save_pretrained(path, state_dict=self.state_dict)


def _zero_stage(trainer: Any) -> int | None:
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return plugin.zero_stage if plugin is not None else None
