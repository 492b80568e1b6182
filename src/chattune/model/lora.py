"""LoRA: the config converter and its application to a loaded model."""

from __future__ import annotations

from typing import Any

import torch

from chattune.config import LoraConfig
from chattune.errors import ConfigError


def to_lora_config(cfg: LoraConfig) -> Any:
    """peft.LoraConfig for causal-LM training from our lora section."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
        bias="none",
    )


def linear_module_names(model: Any) -> list[str]:
    """Short names of the model's linear layers (what lora.target_modules may name)."""
    import torch

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return sorted(names - {"lm_head"})


class SharedDropout(torch.nn.Module):
    """Dropout whose mask is reused by the next adapter that receives the very same input tensor.

    q/k/v (and gate/up) projections read one hidden-state tensor; with peft each
    of their adapters draws its own mask, and on CPUs drawing masks costs as much
    as the adapters' matmuls. Sharing the mask is what a fused projection (Qwen's
    c_attn, GLM's query_key_value) does anyway. The slot keeps the input alive,
    so a recycled tensor id can never be mistaken for the same input.
    """

    def __init__(self, p: float, slot: dict):
        super().__init__()
        self.p = p
        self.slot = slot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.slot.get("input") is x and self.slot.get("version") == x._version:
            return self.slot["output"]
        out = torch.nn.functional.dropout(x, self.p, True)
        self.slot.update(input=x, version=x._version, output=out)
        return out

    def extra_repr(self) -> str:
        return f"p={self.p}, shared"


def share_dropout_masks(model: Any) -> int:
    """Replace peft's per-adapter dropout with SharedDropout; returns how many were replaced."""
    slot: dict = {}
    n = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, torch.nn.ModuleDict):
            continue
        for name, drop in list(drops.items()):
            if isinstance(drop, torch.nn.Dropout) and drop.p > 0:
                drops[name] = SharedDropout(drop.p, slot)
                n += 1
    return n


def apply_lora(model: Any, cfg: LoraConfig, *, gradient_checkpointing: bool) -> Any:
    """Wrap the model with fresh LoRA adapters; the base weights are frozen."""
    from peft import get_peft_model

    if gradient_checkpointing:
        # Checkpointing recomputes frozen layers; inputs must carry grads for LoRA to get any.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    try:
        peft_model = get_peft_model(model, to_lora_config(cfg))
    except ValueError as exc:
        if "not found in the base model" in str(exc) or "Target modules" in str(exc):
            raise ConfigError(
                f"none of {cfg.target_modules} is a module of this model",
                where="lora.target_modules",
                fix=f"use all-linear or names from: {', '.join(linear_module_names(model))}",
            ) from None
        raise
    if cfg.shared_dropout:
        share_dropout_masks(peft_model)
    return peft_model
