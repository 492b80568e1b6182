"""QLoRA: 8-bit / 4-bit loading through bitsandbytes, and preparing a k-bit model for LoRA training."""

from __future__ import annotations

from typing import Any

import torch

from chattune.config import ModelConfig
from chattune.errors import MissingDependencyError, extra_pip, installed

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def bitsandbytes_available() -> bool:
    """True when the bitsandbytes package can be imported."""
    return installed("bitsandbytes")


def compute_dtype(cfg: ModelConfig, dtype: torch.dtype) -> torch.dtype:
    """The dtype 4-bit matmuls run in: model.bnb_4bit_compute_dtype, or the model's dtype for auto."""
    return dtype if cfg.bnb_4bit_compute_dtype == "auto" else _DTYPES[cfg.bnb_4bit_compute_dtype]


def to_bnb_config(cfg: ModelConfig, dtype: torch.dtype) -> Any:
    """transformers.BitsAndBytesConfig for model.quantization, or None when the model is not quantised."""
    if cfg.quantization == "none":
        return None
    if not bitsandbytes_available():
        raise MissingDependencyError("bitsandbytes", pip=extra_pip("qlora"), note="bitsandbytes==0.50.2",
                                     needed_for=f"model.quantization={cfg.quantization}", where="model.quantization",
                                     otherwise="set model.quantization=none")
    check_bitsandbytes_imports(cfg.quantization)
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=cfg.bnb_4bit_double_quant,
        bnb_4bit_compute_dtype=compute_dtype(cfg, dtype),
    )


def check_bitsandbytes_imports(quantization: str) -> None:
    """bitsandbytes is installed but cannot be imported (a missing native library, a mismatched torch): a
    dependency problem, said as one, before transformers reports it as a problem with the model folder."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, OSError (a .so), RuntimeError (CUDA setup): same fix
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        raise MissingDependencyError(
            "bitsandbytes", pip="pip install --force-reinstall 'bitsandbytes==0.50.2'",
            what=f"model.quantization={quantization} needs the bitsandbytes package, which is installed but "
            f"broken: importing it fails ({reason})", where="model.quantization",
            note="a version built for this torch and platform", otherwise="set model.quantization=none") from None


def is_quantized(model: Any) -> bool:
    """True for a model loaded in 8-bit or 4-bit by bitsandbytes."""
    return bool(getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False))


def keep_4bit_layers_differentiable(model: Any) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel; returns the layers changed.

    On CPUs with AVX512-BF16, a Linear4bit that runs once in eval mode without grad
    (the probe answers before training) repacks its weights in place, and from then on
    runs a kernel with no backward: gradients silently stop at every frozen 4-bit
    layer. Training keeps the differentiable kernel for the whole run.
    """
    n = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def prepare_for_kbit_training(model: Any, dtype: torch.dtype) -> Any:
    """Freeze a quantised model, upcasting its non-quantised layers to fp32 only when it computes in fp16."""
    if not is_quantized(model):
        return model
    keep_4bit_layers_differentiable(model)
    if dtype == torch.float16:
        # fp16 layer norms and embeddings overflow and lose gradients: peft's recipe keeps them in fp32.
        # Gradient checkpointing is left to apply_lora (peft's default here would force it on).
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    # In bf16 (or fp32) the fp32 copy buys no range and, measured on a 2-core CPU with SmolLM2-135M,
    # made each step ~20% slower and the 4-bit model 44% larger (123 -> 177 MiB).
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def parameter_count(p: Any) -> int:
    """Number of weights a parameter holds; a packed 4-bit tensor stores two per byte of its storage.

    A ZeRO-3 partitioned parameter (loaded under zero.Init) counts its whole size (ds_numel), not this process's
    empty placeholder."""
    n = getattr(p, "ds_numel", None) or p.numel()
    if p.__class__.__name__ == "Params4bit":
        return n * 2 * p.element_size()
    return n


def describe_quantization(model: Any) -> str:
    """'none', '8bit', or '4bit-nf4' / '4bit-fp4' (with '+dq' for double quantisation) for a loaded model."""
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if not is_quantized(model) or qc is None:
        return "none"
    get = qc.get if isinstance(qc, dict) else lambda k, d=None: getattr(qc, k, d)
    if get("load_in_8bit"):
        return "8bit"
    return f"4bit-{get('bnb_4bit_quant_type', 'nf4')}" + ("+dq" if get("bnb_4bit_use_double_quant") else "")
