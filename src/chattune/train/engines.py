"""DDP, DeepSpeed ZeRO and FSDP2: train.distributed checked against what the libraries can run, and converted
into TrainingArguments fields (pure functions, testable without GPUs); one log line describing the setup.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from chattune.config import RunConfig
from chattune.errors import ConfigError, MissingDependencyError
from chattune.model.placement import SHARDED_MODES
from chattune.train.processes import backend, under_launcher, world

log = logging.getLogger("chattune")

SHARDED = SHARDED_MODES  # modes that split the weights themselves over the processes
_DEEPSPEED_PIP = "pip install 'chattune[deepspeed]' (deepspeed==0.19.8) on the GPU machine"


# ---------------------------------------------------------------------------
# checks


def check_supported(cfg: RunConfig) -> None:
    """Refuse, before any model is loaded, distributed settings the libraries cannot run."""
    t, quant = cfg.train, cfg.model.quantization
    mode = t.distributed
    if quant != "none" and mode in SHARDED:
        raise ConfigError(
            f"model.quantization={quant} cannot be combined with train.distributed={mode}: "
            + ("bitsandbytes 8-bit weights cannot be sharded by DeepSpeed ZeRO-3 or FSDP at all"
               if quant == "8bit" else
               "sharding 4-bit weights needs bitsandbytes' float quant_storage and sharded (zero.Init / "
               "rank-0) loading, which chattune does not set up"),
            where="train.distributed",
            fix="for QLoRA use train.distributed=ddp or deepspeed_zero2 (each GPU holds the whole quantised model, "
            "the LoRA optimizer state is sharded with zero2); to shard the weights, set model.quantization=none and "
            "use deepspeed_zero3 or fsdp",
        )
    if quant != "none" and t.cpu_offload:
        raise ConfigError(
            f"model.quantization={quant} with train.cpu_offload=true: bitsandbytes weights live on the GPU and "
            "are not offloaded, and the few LoRA optimizer states gain nothing from it",
            where="train.cpu_offload", fix="drop train.cpu_offload, or set model.quantization=none",
        )
    if mode.startswith("deepspeed"):
        _check_deepspeed(cfg)
    if mode == "fsdp":
        _check_fsdp(cfg)
    _check_accelerate_env(mode)


def _check_deepspeed(cfg: RunConfig) -> None:
    if importlib.util.find_spec("deepspeed") is None:
        raise MissingDependencyError("deepspeed", pip=_DEEPSPEED_PIP, needed_for=f"train.distributed={cfg.train.distributed}",
                                     where="train.distributed", otherwise="use ddp or fsdp")
    path = cfg.train.deepspeed_config
    if path is None:
        return
    try:
        conf = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError:
        raise ConfigError("DeepSpeed config file not found", where=f"train.deepspeed_config={path}",
                          fix="check the path, e.g. configs/distributed/deepspeed_zero3.json") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"not valid JSON ({exc.msg}, line {exc.lineno})", where=path,
                          fix="fix the JSON syntax at that line") from None
    stage = (conf.get("zero_optimization") or {}).get("stage") if isinstance(conf, dict) else None
    want = int(cfg.train.distributed[-1])
    if stage != want:
        raise ConfigError(f"the file sets zero_optimization.stage={stage!r} but train.distributed="
                          f"{cfg.train.distributed} asks for stage {want}", where=path,
                          fix=f"set \"stage\": {want} in the file, or choose train.distributed=deepspeed_zero{stage}")


def _check_fsdp(cfg: RunConfig) -> None:
    if not torch.cuda.is_available():
        # accelerate runs FSDP only on accelerators; on CPU processes the Trainer would quietly fall back to DDP.
        raise ConfigError("train.distributed=fsdp needs GPUs (accelerate does not run FSDP on CPU processes)",
                          where="train.distributed", fix="use train.distributed=ddp or deepspeed_zero3 on this machine")
    procs = world().size if under_launcher() else cfg.train.nproc
    if procs < 2:
        raise ConfigError("train.distributed=fsdp shards the model over several processes, but only one is started",
                          where="train.distributed",
                          fix="start one process per GPU: `chattune train CONFIG --nproc N` (N >= 2), or use ddp")


def _check_accelerate_env(mode: str) -> None:
    # `accelerate launch` with a DeepSpeed/FSDP accelerate config exports these; the engine must come from one place.
    env = os.environ
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and not mode.startswith("deepspeed"):
        wanted = "deepspeed_zero2 or deepspeed_zero3"
    elif env.get("ACCELERATE_USE_FSDP", "").lower() == "true" and mode != "fsdp":
        wanted = "fsdp"
    else:
        return
    raise ConfigError(f"accelerate launch was configured for another engine than train.distributed={mode}",
                      where="accelerate config",
                      fix=f"launch with a plain multi-GPU accelerate config and set train.distributed={wanted}")


# ---------------------------------------------------------------------------
# converters to TrainingArguments (pure)


def deepspeed_config(stage: int, *, offload: bool = False) -> dict[str, Any]:
    """The DeepSpeed ZeRO-2/3 config chattune uses; "auto" values are filled in from TrainingArguments by transformers.

    configs/distributed/deepspeed_zero{2,3}[_offload].json are exactly these dicts (a test keeps them equal).
    """
    if stage not in (2, 3):
        raise ValueError(f"ZeRO stage {stage}: chattune ships stage 2 and 3")
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                            "reduce_bucket_size": "auto"}
    if stage == 2:
        zero.update(allgather_partitions=True, allgather_bucket_size=200_000_000, reduce_scatter=True)
    else:
        zero.update(stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto",
                    stage3_max_live_parameters=1_000_000_000, stage3_max_reuse_distance=1_000_000_000,
                    sub_group_size=1_000_000_000,
                    # the adapter is saved from the gathered 16-bit weights, not from ZeRO shards
                    stage3_gather_16bit_weights_on_model_save=True)
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    conf: dict[str, Any] = {
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "steps_per_print": 1_000_000,  # chattune's own progress bar and metrics.jsonl report progress
        "wall_clock_breakdown": False,
    }
    if offload:
        # An offloaded optimizer must be DeepSpeed's CPU Adam (built on first use); the schedule stays the Trainer's.
        conf["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                         "weight_decay": "auto"}}
    return conf


def fsdp_config(*, offload: bool = False) -> dict[str, Any]:
    """TrainingArguments.fsdp_config for FSDP2: shard every decoder layer, gather full weights to save."""
    return {
        "version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # the model's own decoder-layer class (_no_split_modules)
        "reshard_after_forward": True,  # full sharding (ZeRO-3-like); False keeps weights gathered between fwd/bwd
        "state_dict_type": "FULL_STATE_DICT",  # the adapter is gathered on the main process and saved as usual
        "cpu_offload": offload,
        "cpu_ram_efficient_loading": False,  # every process loads the base weights before sharding
        "activation_checkpointing": False,  # train.gradient_checkpointing already recomputes activations
    }


def training_args_kwargs(cfg: RunConfig, *, cuda: bool | None = None, world_size: int | None = None) -> dict[str, Any]:
    """The TrainingArguments fields of train.distributed (ddp backend, deepspeed=..., fsdp=..., fsdp_config=...)."""
    if cuda is None:
        cuda = torch.cuda.is_available()
    size = world().size if world_size is None else world_size
    t = cfg.train
    kw: dict[str, Any] = {}
    if size > 1:
        # CPU processes talk over gloo; on GPUs the Trainer's default is nccl. (A backend named in a single
        # process would make accelerate look for a process group that does not exist.)
        kw["ddp_backend"] = None if cuda else "gloo"
        # Every LoRA weight takes part in every forward pass; searching the graph for unused ones costs time.
        kw["ddp_find_unused_parameters"] = False
    if t.distributed.startswith("deepspeed"):
        stage = int(t.distributed[-1])
        kw["deepspeed"] = t.deepspeed_config or deepspeed_config(stage, offload=t.cpu_offload)
        if not cuda:
            kw["accelerator_config"] = {"use_configured_state": True}  # the gloo state init_process_group made
    elif t.distributed == "fsdp":
        kw["fsdp"] = True
        kw["fsdp_config"] = fsdp_config(offload=t.cpu_offload)
    return kw


def shards_weights(cfg: RunConfig) -> bool:
    """True when every process holds only a slice of the weights (ZeRO-3, FSDP): forward passes need all of them."""
    return cfg.train.distributed in SHARDED and world().size > 1


# ---------------------------------------------------------------------------
# what the Trainer logs


class DistributedReport(TrainerCallback):
    """Logs the processes, the global batch and the learning rate it gets, once training is set up."""

    def on_train_begin(self, args, state, control, **kw):
        if args.world_size <= 1 or not state.is_world_process_zero:
            return
        log.info(describe(args.world_size, args.per_device_train_batch_size, args.gradient_accumulation_steps,
                          args.learning_rate, mode=_mode_of(args), backend=_backend_of(args), max_steps=state.max_steps))


def describe(nproc: int, per_device: int, grad_accum: int, learning_rate: float, *, mode: str, backend: str,
             max_steps: int | None = None) -> str:
    """One log line: how many processes, the global batch and what the learning rate applies to."""
    global_batch = per_device * grad_accum * nproc
    steps = f"; {max_steps} optimizer steps" if max_steps else ""
    return (f"distributed: {nproc} processes ({mode}, {backend}); global batch {global_batch} samples = "
            f"{per_device} per device x {grad_accum} grad_accum x {nproc} processes{steps}; learning_rate "
            f"{learning_rate:g} applies to that global batch as configured (not rescaled); loss averaged over "
            f"the supervised tokens of all processes")


def _mode_of(args: Any) -> str:
    if args.deepspeed:
        conf = args.hf_deepspeed_config.config if getattr(args, "hf_deepspeed_config", None) else {}
        return f"deepspeed ZeRO-{conf.get('zero_optimization', {}).get('stage', '?')}"
    if args.fsdp:
        return "FSDP2"
    return "DDP"


def _backend_of(args: Any) -> str:
    return backend(str(args.ddp_backend or "default"))
