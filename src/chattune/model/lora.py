"""LoRA: the config converter and its application to a loaded model."""

from __future__ import annotations

import atexit
import logging
import math
import shutil
import tempfile
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chattune.config import LoraConfig
from chattune.errors import ConfigError

log = logging.getLogger("chattune")


def to_lora_config(cfg: LoraConfig) -> Any:
    """peft.LoraConfig for causal-LM training from our lora section (lora.variant picks DoRA, rsLoRA or PiSSA).

    LoRA+ changes only the optimizer (train/trainer.py), so its adapter is plain LoRA's.
    """
    from peft import LoraConfig as PeftLoraConfig

    pissa = "pissa" if cfg.pissa_niter == 0 else f"pissa_niter_{cfg.pissa_niter}"
    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
        bias="none",
        use_dora=cfg.variant == "dora",
        use_rslora=cfg.variant == "rslora",
        init_lora_weights=pissa if cfg.variant == "pissa" else True,
    )


def linear_module_names(model: Any) -> list[str]:
    """Short names of the model's linear layers (what lora.target_modules may name)."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return sorted(names - {"lm_head"})


def keep_mask(shape: torch.Size, p: float, device: torch.device,
              dtype: torch.dtype = torch.bool) -> tuple[torch.Tensor, float]:
    """A Bernoulli(1 - p) keep mask (True/1 = kept) and its rescale factor, drawn as 16-bit lanes of 64-bit random words.

    On CPUs torch's bernoulli_ spends one 32-bit draw and a float compare per
    element and costs more than the adapter's matmul; four 16-bit lanes per
    64-bit word are about 3.5x cheaper. p is rounded to a multiple of 1/65536
    (0.1 becomes 0.100006) and the rescale uses that exact p, so the expectation
    is unchanged. dtype: the mask as 0/1 of that dtype, written by the compare
    itself (multiplying a bf16 tensor by a bool mask converts the mask on every
    product, forward and backward: 4x the cost of a bf16 x bf16 product).

    On a CPU the words come from numpy's SFC64 generator, seeded by one draw of
    torch's: twice as fast as torch's Mersenne Twister (1.6 against 3.3 ms for a
    2400 x 1536 mask), and torch.manual_seed, or a checkpoint's saved torch RNG
    state, still fixes every mask.
    """
    n = math.prod(shape)
    drop = round(p * 65536)
    if device.type == "cpu":
        seed = int(torch.randint(2**62, ()))
        words = torch.from_numpy(np.random.SFC64(seed).random_raw((n + 3) // 4).view(np.int64))
    else:
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)  # all 64 bits
    lanes = words.view(torch.int16)[:n].view(shape)
    keep = torch.ge(lanes, drop - 32768, out=torch.empty(shape, dtype=dtype, device=device))
    return keep, 65536 / (65536 - drop)


class SharedDropout(torch.nn.Module):
    """Dropout whose mask is reused by the next adapter that receives the very same input tensor.

    q/k/v (and gate/up) projections read one hidden-state tensor; with peft each
    of their adapters draws its own mask, and on CPUs drawing masks costs as much
    as the adapters' matmuls. Sharing the mask is what a fused projection (Qwen's
    c_attn, GLM's query_key_value) does anyway. The slot keeps the input alive,
    so a recycled tensor id can never be mistaken for the same input. On CPU the
    mask comes from keep_mask; elsewhere torch's fused dropout is already cheap.
    """

    def __init__(self, p: float, slot: dict):
        super().__init__()
        self.p = p
        self.slot = slot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout as torch's: kept inputs scaled by 1 / (1 - p) (peft's own LoRA forward calls this)."""
        masked, scale = self.masked(x)
        return masked if scale == 1.0 else masked * scale

    def masked(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(x with the dropped inputs zeroed, the rescale still owed): what FusedScaleAdd folds into its addmm.

        On a CPU, x * keep (keep: 0/1 in x's dtype) is exact and one pass each way (the backward is
        grad * keep), where torch.where(keep, x, 0) * scale took two passes forward and two back; the
        1 / (1 - p) then rides on the adapter's rank-r output as part of the LoRA scaling, for free.
        """
        if not self.training or self.p == 0:
            return x, 1.0
        if self.slot.get("input") is x and self.slot.get("version") == x._version:
            return self.slot["output"]
        if x.device.type == "cpu":
            keep, scale = keep_mask(x.shape, self.p, x.device, x.dtype)
            out = (x * keep, scale)
        else:
            out = (torch.nn.functional.dropout(x, self.p, True), 1.0)
        self.slot.update(input=x, version=x._version, output=out)
        return out

    def extra_repr(self) -> str:
        return f"p={self.p}, shared"


def _cast_unless_autocast(layer: Any, x: Any, dtype: torch.dtype) -> Any:
    """peft's input cast, skipped when autocast will cast the adapter's matmul anyway.

    peft casts a bf16 hidden state to the fp32 adapter's dtype before dropout; under
    bf16 autocast the adapter's linear casts it straight back. Skipping the round
    trip saves two copies per adapter and keeps the very tensor that q/k/v share,
    which SharedDropout needs to recognise one input.
    """
    if x is not None and x.is_floating_point() and torch.is_autocast_enabled(x.device.type) \
            and x.dtype == torch.get_autocast_dtype(x.device.type):
        return x
    return type(layer)._cast_input_dtype(layer, x, dtype)


def skip_autocast_round_trips(model: Any) -> int:
    """Give every LoRA layer _cast_unless_autocast; returns how many layers got it."""
    n = 0
    for module in model.modules():
        if isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict) and hasattr(type(module), "_cast_input_dtype"):
            module._cast_input_dtype = types.MethodType(_cast_unless_autocast, module)
            n += 1
    return n


class FusedScaleAdd:
    """A peft LoRA variant that is plain LoRA, with B, the scaling and the residual add in one addmm.

    peft computes `result + lora_B(lora_A(dropout(x))) * scaling`: three passes
    over the layer's output (and two more in backward) for a rank-8 update, which
    on CPUs costs more than the adapter's own matmuls. torch.addmm(result, h, B^T,
    alpha=scaling) is the same sum in one kernel. Where the dtypes differ outside
    autocast (bf16 base, fp32 adapters at inference), and under DeepSpeed ZeRO-3,
    peft's own arithmetic is used.
    Merging is vanilla LoRA's: the variant changes no parameter and no saved file.
    """

    @staticmethod
    def supports_lora_conversion() -> bool:
        return True

    @staticmethod
    def init(module: Any, adapter_name: str, **kwargs: Any) -> None:
        pass

    @staticmethod
    def merge_safe(module: Any, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: Any, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter)  # as peft: added in float32, rounded once

    @staticmethod
    def unmerge(module: Any, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight.data - module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(module: Any, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        lora_B = module.lora_B[active_adapter]
        scaling = module.scaling[active_adapter]
        dropout = module.lora_dropout[active_adapter]
        x, owed = dropout.masked(x) if isinstance(dropout, SharedDropout) else (dropout(x), 1.0)
        h = module.lora_A[active_adapter](x)
        scaling = scaling * owed  # s * ((x * keep) A^T): the same sum as ((x * keep * s) A^T), one rounding fewer
        mixed = not torch.is_autocast_enabled(result.device.type) and not h.dtype == lora_B.weight.dtype == result.dtype
        if mixed or hasattr(lora_B.weight, "ds_id"):  # ZeRO-3 gathers B only inside lora_B's own forward
            return result + lora_B(h) * scaling
        flat = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), lora_B.weight.t(),
                           alpha=scaling)
        return flat.view(result.shape)


def fuse_scale_add(model: Any) -> int:
    """Give vanilla LoRA linears (no DoRA, no LoRA bias, not quantised) the FusedScaleAdd variant; returns how many."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    n = 0
    for module in model.modules():
        if type(module) is not LoraLinear:
            continue
        for name in module.lora_A:
            if name not in module.lora_variant and module.lora_B[name].bias is None:
                module.lora_variant[name] = FusedScaleAdd()
                n += 1
    return n


def share_dropout_masks(model: Any) -> int:
    """Replace peft's per-adapter dropout with SharedDropout; returns how many were replaced.

    Adapters whose variant has its own forward (DoRA) keep peft's dropout: that forward is peft's to define.
    """
    slot: dict = {}
    n = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, torch.nn.ModuleDict):
            continue
        variants = getattr(module, "lora_variant", {})
        for name, drop in list(drops.items()):
            if name in variants and not isinstance(variants[name], FusedScaleAdd):
                continue
            if isinstance(drop, torch.nn.Dropout) and drop.p > 0:
                drops[name] = SharedDropout(drop.p, slot)
                n += 1
    return n


def enable_checkpointing(model: Any) -> None:
    """Recompute the frozen layers in the backward pass; their inputs carry grads so LoRA gets any.

    transformers 5 renamed gradient_checkpointing_enable (now a deprecated alias that warns on every run).
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


def apply_lora(model: Any, cfg: LoraConfig, *, gradient_checkpointing: bool) -> Any:
    """Wrap the model with fresh LoRA adapters (of lora.variant); the base weights are frozen."""
    from peft import get_peft_model

    if gradient_checkpointing:
        enable_checkpointing(model)
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
    if cfg.variant == "pissa":
        keep_pissa_init(peft_model)
        if cfg.dropout > 0:
            log.warning("lora.dropout=%g with lora.variant=pissa: dropout also drops the principal part of each "
                        "weight that PiSSA moved into the adapter, so training starts away from the base model "
                        "(on the demo: loss 3.80 instead of 2.95); set lora.dropout=0 for PiSSA", cfg.dropout)
    return with_fast_paths(peft_model, shared_dropout=cfg.shared_dropout)


def with_fast_paths(peft_model: Any, *, shared_dropout: bool) -> Any:
    """chattune's cheaper LoRA step on a peft model; layers whose variant has its own forward (DoRA) keep peft's."""
    skip_autocast_round_trips(peft_model)
    fuse_scale_add(peft_model)
    if shared_dropout:
        share_dropout_masks(peft_model)
    return peft_model


def load_trained_adapter(model: Any, adapter_dir: str, *, gradient_checkpointing: bool, shared_dropout: bool) -> Any:
    """The base model with an earlier run's adapter, trainable (model.adapter: SFT -> DPO)."""
    from peft import PeftModel

    if gradient_checkpointing:
        enable_checkpointing(model)
    peft_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    return with_fast_paths(peft_model, shared_dropout=shared_dropout)


def start_adapter_dir(spec: str) -> Path:
    """model.adapter as an adapter folder: a run directory's adapter/, or a folder holding adapter_config.json."""
    path = Path(spec)
    for folder in (path / "adapter", path):
        if (folder / "adapter_config.json").is_file():
            return folder
    raise ConfigError(f"no trained adapter at {spec}", where="model.adapter",
                      fix="name a finished run directory (e.g. runs/sft) or a folder with adapter_config.json")


def keep_pissa_init(peft_model: Any) -> Path:
    """Save PiSSA's initial adapter (before any step) so the final one can be written as plain LoRA.

    PiSSA moves the top singular directions of W from the base into A and B, leaving W_res in the base.
    peft turns the trained adapter into a rank-2r LoRA of the original W given this initial one
    (save_pretrained's path_initial_model_for_weight_conversion): chat, eval and merge then load the
    untouched base as for any run. The initial adapter is recomputed identically on resume (same seed).
    """
    folder = Path(tempfile.mkdtemp(prefix="chattune-pissa-init-"))
    atexit.register(shutil.rmtree, folder, True)
    peft_model.save_pretrained(str(folder))
    peft_model.chattune_pissa_init = folder
    return folder


def save_kwargs(peft_model: Any) -> dict[str, Any]:
    """save_pretrained's extra keywords for the run's final adapter (PiSSA: the conversion to plain LoRA)."""
    folder = getattr(peft_model, "chattune_pissa_init", None)
    return {"path_initial_model_for_weight_conversion": str(folder)} if folder is not None else {}


def loraplus_optimizer(model: Any, *, lr: float, ratio: float, weight_decay: float) -> Any:
    """AdamW with LoRA+'s parameter groups: every B matrix at lr * ratio, A at lr (peft's create_loraplus_optimizer)."""
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(model=model, optimizer_cls=torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio,
                                     weight_decay=weight_decay)
