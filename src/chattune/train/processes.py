"""Several processes, one run: who this process is, the process group, and the few collectives chattune needs.

`chattune train` runs unchanged under `torchrun --nproc_per_node N` and `accelerate launch`: the HF Trainer
does the data parallelism (one device per process, the data sharded by its distributed sampler, gradients
averaged). What chattune adds lives here: only the main process writes the run directory while the others
wait where they read it, and flags and counters are combined over the processes. Everything here works in a
single process too (no process group: the collectives return the value itself).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed

from chattune.config import RunConfig


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
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def init_process_group(cfg: RunConfig) -> None:
    """Join the process group now, so the run-directory steps before the Trainer can wait for the main process."""
    if _initialized():
        return
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
        torch.distributed.barrier()


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
    return _all_reduce_many([value], op)[0]


def _all_reduce_many(values: list[float], op: str) -> list[float]:
    nccl = torch.distributed.get_backend() == "nccl"
    device = torch.device("cuda", world().local_rank) if nccl else torch.device("cpu")
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=getattr(torch.distributed.ReduceOp, op))
    return t.tolist()


def any_process(flag: bool) -> bool:
    """True when `flag` is true in at least one process (every process must call this)."""
    return bool(_all_reduce(float(flag), "MAX")) if _initialized() else flag


def sum_over_processes(value: float) -> float:
    """The sum of `value` over all processes (every process must call this); the value itself in one process."""
    return _all_reduce(value, "SUM") if _initialized() else value


def sums_over_processes(values: list[float]) -> list[float]:
    """Each value summed over all processes, in one collective (every process must call this with as many)."""
    return _all_reduce_many(values, "SUM") if _initialized() else list(values)


def process_count() -> int:
    """How many processes train together (1 without a process group)."""
    if not _initialized():
        return 1
    return torch.distributed.get_world_size()


def backend(default: str) -> str:
    """The process group's backend (gloo, nccl), or `default` without a process group."""
    if not _initialized():
        return default
    return torch.distributed.get_backend()
