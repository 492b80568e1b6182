"""Several processes, one run: the torchrun launcher, DDP / DeepSpeed ZeRO / FSDP2 settings, main-process guards.

`chattune train` runs unchanged under `torchrun --nproc_per_node N` and `accelerate launch`: the HF Trainer
does the data parallelism (one device per process, the data sharded by its distributed sampler, gradients
averaged). This module

- starts torchrun itself for `chattune train CONFIG --nproc N` (or train.nproc / a sharding engine),
- converts train.distributed into TrainingArguments fields (pure functions, testable without GPUs),
- refuses QLoRA combinations the libraries cannot run,
- lets only the main process write the run directory while the others wait where they read it,
- gathers the adapter from the shards before the main process saves it.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from transformers import TrainerCallback

from chattune.config import RunConfig
from chattune.errors import ConfigError, MissingDependencyError

log = logging.getLogger("chattune")

SHARDED = ("deepspeed_zero3", "fsdp")  # modes that split the weights themselves over the processes
# torchrun runs each worker in its own session: a Ctrl-C reaches torchrun only, which sends every worker one
# SIGINT (they finish the step and save) and kills them after this many seconds (its default: 30).
SHUTDOWN_TIMEOUT_S = 900
_DEEPSPEED_PIP = "pip install 'chattune[deepspeed]' (deepspeed==0.19.8) on the GPU machine"


# ---------------------------------------------------------------------------
# who is this process


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (from the launcher's environment)."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """RANK / LOCAL_RANK / WORLD_SIZE as torchrun, accelerate launch and the deepspeed launcher set them."""
    env = os.environ
    return World(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))


def is_main_process() -> bool:
    """True in a single-process run and in rank 0 of a distributed one (works before the process group exists)."""
    return world().is_main


def under_launcher() -> bool:
    """True inside a process started by torchrun / accelerate launch / deepspeed (they all set LOCAL_RANK)."""
    return "LOCAL_RANK" in os.environ


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def init_process_group(cfg: RunConfig) -> None:
    """Join the process group now, so the run-directory steps before the Trainer can wait for the main process."""
    if _initialized():
        return
    import torch
    from accelerate import PartialState

    # The Trainer's TrainingArguments later reuse this group (and, for DeepSpeed on CPU, this whole state).
    if not torch.cuda.is_available() and cfg.train.distributed.startswith("deepspeed"):
        _deepspeed_on_cpu()
    elif world().size > 1:
        PartialState(cpu=not torch.cuda.is_available())  # gloo on CPU, nccl on GPUs


def _deepspeed_on_cpu() -> None:
    # accelerate picks no backend for DeepSpeed without an accelerator (every process would think it is
    # alone), so the state is set up here with gloo and TrainingArguments told to use it (use_configured_state).
    import deepspeed.ops
    from accelerate import PartialState

    # DeepSpeed would first JIT-compile a shared-memory all-reduce for CPUs (minutes on a small CPU) that
    # training never calls.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")


def barrier() -> None:
    """Wait until every process gets here (a no-op in a single process)."""
    if _initialized():
        import torch.distributed as dist

        dist.barrier()


@contextmanager
def main_process_first() -> Iterator[None]:
    """The main process runs the block first (it creates files and caches); the others run it after, reading them."""
    main = is_main_process()
    if not main:
        barrier()
    yield
    if main:
        barrier()


def _all_reduce(value: float, op: str) -> float:
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", world().local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return float(t.item())


def any_process(flag: bool) -> bool:
    """True when `flag` is true in at least one process (every process must call this)."""
    return bool(_all_reduce(float(flag), "MAX")) if _initialized() else flag


def sum_over_processes(value: float) -> float:
    """The sum of `value` over all processes (every process must call this); the value itself in one process."""
    return _all_reduce(value, "SUM") if _initialized() else value


def process_count() -> int:
    """How many processes train together (1 without a process group)."""
    if not _initialized():
        return 1
    import torch.distributed as dist

    return dist.get_world_size()


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
    import importlib.util

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
    import torch

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
        import torch

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
# the launcher


def needs_launch(cfg: RunConfig) -> bool:
    """True when `chattune train` should start torchrun: several processes asked for, or an engine that needs it."""
    return not under_launcher() and (cfg.train.nproc > 1 or cfg.train.distributed != "ddp")


def launch_command(train_argv: list[str], nproc: int) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc_per_node N -m chattune.cli train ...`."""
    # --standalone: a single-node rendezvous on a free port, so two runs on one machine never collide.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}", "-m", "chattune.cli", *train_argv]


def worker_argv(args: Any, nproc: int) -> list[str]:
    """The `chattune train` arguments each worker gets: the user's own, with train.nproc recorded."""
    argv = ["--debug"] if getattr(args, "debug", False) else []
    argv += ["train", str(args.config), *args.overrides, f"train.nproc={nproc}"]
    for flag in ("overwrite", "resume", "resume_force"):
        if getattr(args, flag, False):
            argv.append("--" + flag.replace("_", "-"))
    return argv


def launch(cfg: RunConfig, args: Any) -> int:
    """Run this `chattune train` as train.nproc processes under torchrun; return its exit status."""
    check_supported(cfg)
    if not getattr(args, "overwrite", False):
        from chattune.verbs.train import prepare_run_dir

        # A finished run is refused here, once, rather than by every process under torchrun's failure report.
        prepare_run_dir(cfg, overwrite=False, resume=getattr(args, "resume", False))
    nproc = cfg.train.nproc
    cmd = launch_command(worker_argv(args, nproc), nproc)
    log.info("launch: %d training process%s (%s) through torchrun: %s", nproc, "es" if nproc > 1 else "",
             cfg.train.distributed, shlex.join(cmd))
    # On Ctrl-C this process only takes note and keeps waiting while torchrun lets the workers save.
    interrupted = []
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    try:
        proc = subprocess.Popen(cmd)
        rc = proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
    if rc != 0 and interrupted:
        raise KeyboardInterrupt  # the workers said what they saved and how to resume
    if rc != 0:
        log.error("launch: the training processes stopped with exit status %d (their messages are above)", rc)
    return rc


def _quiet_deepspeed() -> None:
    # accelerate imports DeepSpeed (when installed) for every Trainer; without GPUs DeepSpeed then warns that
    # it falls back to the CPU, which is what this machine asked for.
    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


# ---------------------------------------------------------------------------
# inside each training process


def setup(cfg: RunConfig) -> World:
    """Check the settings, join the process group and keep the log to the main process; return this process's World."""
    check_supported(cfg)
    _quiet_deepspeed()
    w = world()
    if not under_launcher():
        if cfg.train.distributed != "ddp":
            raise ConfigError(f"train.distributed={cfg.train.distributed} runs under a distributed launcher",
                              where="train.distributed",
                              fix="start it with `chattune train CONFIG --nproc N` (it starts torchrun), torchrun "
                              "or accelerate launch")
        return w
    init_process_group(cfg)
    if not w.is_main:
        # One log for the run: the other processes report only warnings and errors.
        log.setLevel(logging.WARNING)
    if cfg.train.nproc not in (1, w.size):
        log.info("distributed: %d processes were started; train.nproc=%d applies only when `chattune train` "
                 "starts them itself", w.size, cfg.train.nproc)
    return w


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
    import torch.distributed as dist

    return dist.get_backend() if _initialized() else str(args.ddp_backend or "default")


class SyncedInterrupt(TrainerCallback):
    """Makes a Ctrl-C seen by any process stop every process after the same step (else they would deadlock)."""

    def __init__(self, inner: Any):
        self.inner = inner

    def on_step_end(self, args, state, control, **kw):
        self.inner.requested = any_process(self.inner.requested)
        return self.inner.on_step_end(args, state, control, **kw)


def synced(interrupt: Any) -> Any:
    """The interrupt callback itself in one process; wrapped so all processes agree when there are several."""
    return SyncedInterrupt(interrupt) if world().size > 1 else interrupt


# ---------------------------------------------------------------------------
# saving


class _WithStateDict:
    """A model whose save_pretrained writes a given (gathered) state dict."""

    def __init__(self, model: Any, state_dict: dict[str, Any]):
        self.model, self.state_dict = model, state_dict

    def save_pretrained(self, path: str) -> None:
        self.model.save_pretrained(path, state_dict=self.state_dict)


def save_adapter(trainer: Any, dest: Path) -> None:
    """The trained adapter into dest: gathered from the shards (ZeRO-3, FSDP) by all, written by the main process."""
    from chattune.train import resume as resume_mod

    model: Any = trainer.model
    if getattr(trainer, "is_deepspeed_enabled", False) and _zero_stage(trainer) == 3:
        model = _WithStateDict(trainer.accelerator.unwrap_model(trainer.model),
                               trainer.accelerator.get_state_dict(trainer.deepspeed))  # every process takes part
    elif getattr(trainer, "is_fsdp_enabled", False):
        model = _WithStateDict(trainer.accelerator.unwrap_model(trainer.model),
                               trainer.accelerator.get_state_dict(trainer.model))
    if is_main_process():
        resume_mod.save_adapter(model, dest)
    barrier()  # nobody reads or returns before the adapter is on disk


def _zero_stage(trainer: Any) -> int | None:
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return plugin.zero_stage if plugin is not None else None
