"""Checks made before a model is loaded: where it goes, which attention kernel, whether it needs its own code."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from chattune.config import ModelConfig
from chattune.errors import MissingDependencyError, ModelError, installed

log = logging.getLogger(__name__)

_ATTN_WHERE = "model.attn_implementation"
# train.distributed modes that shard the weights while loading or right after (the names of engines.SHARDED).
SHARDED_MODES = ("deepspeed_zero3", "fsdp")


def training_device_map(cfg: ModelConfig, *, distributed: str = "ddp") -> dict[str, Any] | None:
    """Where training loads the model: straight onto this process's GPU, never spread over several.

    Loading onto the GPU directly keeps each DDP process from first holding the whole model in host RAM
    (8 processes x a 15 GB 7B model). ZeRO-3 and FSDP load it where their own sharding expects it (None).
    """
    if cfg.device_map is not None:
        # device_map="auto" runs layers on one GPU after another: memory for inference, not a training setup.
        log.info("model.device_map=%s is for inference only; training keeps the model on one device", cfg.device_map)
    import torch

    cuda = torch.cuda.is_available()
    if cfg.quantization == "none" and (not cuda or distributed in SHARDED_MODES):
        return None  # the Trainer (or the sharding engine) moves the model to its device
    # The Trainer never moves a bitsandbytes model, so it must be loaded where it will train.
    return {"": int(os.environ.get("LOCAL_RANK", 0))} if cuda else {"": "cpu"}


def inference_device_map(cfg: ModelConfig) -> Any:
    """Where inference loads the model: model.device_map if set (e.g. auto for a model larger than one GPU),
    else the first GPU when there is one (loaded straight there), else the CPU."""
    if cfg.device_map is not None:
        return cfg.device_map
    import torch

    if torch.cuda.is_available():
        return {"": 0}
    return {"": "cpu"} if cfg.quantization != "none" else None  # None: plain CPU loading, no accelerate map


def map_device(device_map: Any) -> str:
    """'cuda' or 'cpu': the kind of device a device_map puts the weights on ('auto' is cuda when a GPU exists)."""
    import torch

    if device_map is None:
        return "cpu"  # from_pretrained without a map loads onto the CPU
    if isinstance(device_map, dict):
        values = {str(v) for v in device_map.values()}
        return "cpu" if values <= {"cpu", "disk"} else "cuda"
    if device_map in ("cpu", "disk"):
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def place_for_inference(model: Any) -> Any:
    """The model on the GPU when one exists, unless accelerate placed it (device_map, bitsandbytes): kept as is."""
    import torch

    placed = getattr(model, "hf_device_map", None) is not None
    quantised = getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
    if torch.cuda.is_available() and not placed and not quantised:
        # Moving a model spread by device_map="auto" onto cuda:0 would fight accelerate's hooks.
        model = model.to("cuda")
    return model


def model_devices(model: Any) -> str:
    """The devices a loaded model's weights are on, e.g. 'cuda:0' or 'cuda:0,cuda:1' (for the log and checks)."""
    return ",".join(sorted({str(p.device) for p in model.parameters()}))


def check_attn_implementation(name: str) -> None:
    """Fail before loading when the chosen attention kernel cannot run here."""
    if name != "flash_attention_2":
        return  # sdpa and eager ship with torch; a model that lacks sdpa is reported by explain_load_error
    import torch
    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available():
        return
    unavailable = "attn_implementation=flash_attention_2 is unavailable"
    if not installed("flash_attn"):
        raise MissingDependencyError("flash-attn", pip="pip install flash-attn --no-build-isolation",
                                     note="on a CUDA GPU", what=f"{unavailable}: the flash-attn package is not installed",
                                     where=_ATTN_WHERE, otherwise="use sdpa (the default) or eager")
    reason = "it needs a CUDA GPU" if not torch.cuda.is_available() else "flash-attn is older than 2.3.3"
    raise ModelError(
        f"{unavailable}: {reason}",
        where=_ATTN_WHERE,
        fix="on a CUDA GPU run `pip install flash-attn --no-build-isolation`; otherwise use sdpa (the default) or eager",
    )


def explain_load_error(msg: str) -> ModelError | None:
    """A readable ModelError for attention-kernel failures raised while loading, else None."""
    if "scaled_dot_product_attention" in msg:
        return ModelError(
            "this model does not support attn_implementation=sdpa", where=_ATTN_WHERE, fix="set model.attn_implementation=eager"
        )
    if "flash_attn" in msg or "flash attention" in msg.lower() or "flashattention" in msg.lower():
        return ModelError(
            f"attention implementation unavailable ({msg.strip().splitlines()[0]})",
            where=_ATTN_WHERE,
            fix="install flash-attn on a CUDA machine, or use sdpa (the default) or eager",
        )
    return None


def needs_remote_code(model_dir: str | Path) -> str | None:
    """The model_type of a folder whose config maps to Python code shipped with it and unknown to transformers, else None."""
    path = Path(model_dir) / "config.json"
    try:
        conf = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # no readable config: from_pretrained reports that itself
    if not isinstance(conf, dict) or not conf.get("auto_map"):
        return None
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = conf.get("model_type")
    # A known model_type loads with transformers' own classes even when the repo also ships code.
    return None if model_type in CONFIG_MAPPING else str(model_type or "unknown")


def check_remote_code(model_dir: str | Path, cfg: ModelConfig) -> None:
    """Refuse, naming model.trust_remote_code, a model that only loads by running its own Python code."""
    if cfg.trust_remote_code:
        return
    model_type = needs_remote_code(model_dir)
    if model_type is None:
        return
    raise ModelError(
        f"this model (model_type {model_type!r}) is not built into transformers and only loads by running the "
        f"Python code shipped in its folder ({model_dir}), which model.trust_remote_code=false forbids",
        where="model.trust_remote_code",
        fix="read that code, then set model.trust_remote_code=true if you trust it; or use a version of the model "
        "that transformers supports natively (e.g. Qwen1.5/Qwen2.5 instead of Qwen-7B, glm-4-9b-chat-hf instead of glm-4-9b-chat)",
    )
