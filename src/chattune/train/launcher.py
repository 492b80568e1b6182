"""The torchrun launcher: `chattune train CONFIG --nproc N` starts itself N times, and each worker joins the group.

`launch` runs in the process the user started: it refuses a finished run once, then runs
`python -m torch.distributed.run ... -m chattune.cli train ...` and waits. `setup` runs in every training
process (also a plain single-process run): it checks the settings, joins the process group and keeps the log
to the main process.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
from typing import Any

import torch

from chattune.config import RunConfig
from chattune.errors import ConfigError
from chattune.rundir import LOCK_HELD_ENV, prepare_run_dir, run_lock
from chattune.train.engines import check_supported
from chattune.train.processes import World, init_process_group, under_launcher, world

log = logging.getLogger("chattune")

# torchrun runs each worker in its own session: a Ctrl-C reaches torchrun only, which sends every worker one
# SIGINT (they finish the step and save) and kills them after this many seconds (its default: 30).
SHUTDOWN_TIMEOUT_S = 900


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
        # This process holds output_dir's lock for the workers it starts (they see LOCK_HELD_ENV).
        with run_lock(cfg.output_dir, "chattune train --nproc") as lock:
            proc = subprocess.Popen(cmd, env={**os.environ, LOCK_HELD_ENV: str(lock)})
            rc = proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
    if rc != 0 and interrupted:
        raise KeyboardInterrupt  # the workers said what they saved and how to resume
    if rc != 0:
        log.error("launch: the training processes stopped with exit status %d (their messages are above)", rc)
    return rc


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
        check_one_gpu_per_process()
        return w
    init_process_group(cfg)
    if not w.is_main:
        # One log for the run: the other processes report only warnings and errors.
        log.setLevel(logging.WARNING)
    if cfg.train.nproc not in (1, w.size):
        log.info("distributed: %d processes were started; train.nproc=%d applies only when `chattune train` "
                 "starts them itself", w.size, cfg.train.nproc)
    return w


def check_one_gpu_per_process() -> None:
    """Refuse a single training process on a machine with several visible GPUs.

    The Trainer would wrap the model in nn.DataParallel: a padding-free row (batch size 1) is scattered to one
    GPU while the sample boundaries are cut, and attention silently falls back to the O(T^2) masked path.
    """
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus > 1:
        raise ConfigError(
            f"one training process sees {gpus} GPUs: the Trainer would split each batch over them with "
            "nn.DataParallel, which breaks padding-free batches",
            where="train.nproc",
            fix=f"use all of them: `chattune train CONFIG --nproc {gpus}` (one process per GPU, torchrun); or one: "
            "CUDA_VISIBLE_DEVICES=0 chattune train CONFIG",
        )


def _quiet_deepspeed() -> None:
    # accelerate imports DeepSpeed (when installed) for every Trainer; without GPUs DeepSpeed then warns that
    # it falls back to the CPU, which is what this machine asked for.
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
