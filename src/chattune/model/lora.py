"""LoRA: the config converter and its application to a loaded model."""

from __future__ import annotations

from typing import Any

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


def apply_lora(model: Any, cfg: LoraConfig, *, gradient_checkpointing: bool) -> Any:
    """Wrap the model with fresh LoRA adapters; the base weights are frozen."""
    from peft import get_peft_model

    if gradient_checkpointing:
        # Checkpointing recomputes frozen layers; inputs must carry grads for LoRA to get any.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    try:
        return get_peft_model(model, to_lora_config(cfg))
    except ValueError as exc:
        if "not found in the base model" in str(exc) or "Target modules" in str(exc):
            raise ConfigError(
                f"none of {cfg.target_modules} is a module of this model",
                where="lora.target_modules",
                fix=f"use all-linear or names from: {', '.join(linear_module_names(model))}",
            ) from None
        raise
