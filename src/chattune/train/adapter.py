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
    if zero3_enabled(trainer):
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        model = _WithStateDict(unwrapped, gather_trainable_zero3(unwrapped))  # every process takes part
    elif getattr(trainer, "is_fsdp_enabled", False):
        model = _WithStateDict(trainer.accelerator.unwrap_model(trainer.model),
                               trainer.accelerator.get_state_dict(trainer.model))
    if is_main_process():
        write_adapter(model, dest)
    barrier()  # nobody reads or returns before the adapter is on disk


def gather_trainable_zero3(model: Any) -> dict[str, Any] | None:
    """The trainable parameters (LoRA weights, modules_to_save) gathered whole from their ZeRO-3 shards.

    Collective: every process calls it; the main process gets {name: CPU tensor} keyed as model.state_dict()
    would be (what peft's save_pretrained(state_dict=...) picks the adapter from), the others None. Only these
    parameters are gathered: the frozen base model (all but a fraction of a percent) is never assembled anywhere,
    where accelerate's get_state_dict(engine) would gather all of it to the main process at every save.
    """
    import deepspeed

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    main = is_main_process()
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
        return {n: p.detach().to("cpu", copy=True) for n, p in named} if main else None


def zero3_enabled(trainer: Any) -> bool:
    """True when the Trainer runs DeepSpeed ZeRO stage 3 (parameters partitioned over the processes)."""
    return bool(getattr(trainer, "is_deepspeed_enabled", False)) and _zero_stage(trainer) == 3


def write_adapter(model: Any, dest: Path) -> None:
    """save_pretrained into a temporary folder beside dest, then swap it in (a crash never leaves half an adapter)."""
    with atomic_dir(dest) as tmp:
        model.save_pretrained(str(tmp), **save_kwargs(model))  # PiSSA: written as plain LoRA of the original base


class _WithStateDict:
    """A model whose save_pretrained writes a given (gathered) state dict."""

    def __init__(self, model: Any, state_dict: dict[str, Any] | None):
        self.model, self.state_dict = model, state_dict

    def save_pretrained(self, path: str) -> None:
        self.model.save_pretrained(path, state_dict=self.state_dict)


def _zero_stage(trainer: Any) -> int | None:
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return plugin.zero_stage if plugin is not None else None
