"""Experiment tracking behind one factory: make_trackers(cfg, run_dir) -> a list of trackers ([] for none).

Each tracker gets the run's start (config, model, data, system), train/... and eval/... scalars, the probe
answers ("Prediction") and the finish; see track/base.py. metrics.jsonl and predictions/ are written
whatever the trackers are.
"""

from __future__ import annotations

from chattune.config import RunConfig
from chattune.rundir import RunDir
from chattune.track.base import Tracker
from chattune.track.swanlab import SwanlabTracker
from chattune.track.tensorboard import TensorboardTracker
from chattune.track.wandb import WandbTracker


def make_trackers(cfg: RunConfig, run_dir: RunDir, resume_step: int | None = None) -> list[Tracker]:
    """One tracker per entry of tracking.backends ('none' adds none); other processes than the main one get [].

    resume_step: the checkpoint step a resumed run continues from; each tracker then continues the run's
    experiment (same SwanLab experiment, W&B run id, TensorBoard folder) instead of starting a second one.
    """
    if not is_main_process():
        return []
    kinds = {"swanlab": SwanlabTracker, "tensorboard": TensorboardTracker, "wandb": WandbTracker}
    # dict.fromkeys: keep the order, drop repeats.
    trackers = [kinds[b](cfg, run_dir) for b in dict.fromkeys(cfg.tracking.backends) if b != "none"]
    for t in trackers:
        t.resume_step = resume_step
    return trackers


def is_main_process() -> bool:
    """True in a single-process run and in the main process of a distributed one."""
    from accelerate import PartialState

    return PartialState().is_main_process
