"""Weights & Biases tracker: the same scalars, the config, and the probe answers as a table."""

from __future__ import annotations

import os
from typing import Any

from chattune.config import RunConfig
from chattune.errors import MissingDependencyError, extra_pip
from chattune.rundir import RunDir
from chattune.track.base import PREDICTION_KEY, Tracker, new_run_id, project_and_experiment, remember, tracking_entry


class WandbTracker(Tracker):
    """One W&B run; WANDB_PROJECT / WANDB_NAME / WANDB_MODE (e.g. offline) in the environment take precedence."""

    name = "wandb"

    def __init__(self, cfg: RunConfig, run_dir: RunDir):
        try:
            import wandb
        except ImportError:
            raise MissingDependencyError("wandb", pip=extra_pip("wandb"), where="tracking.backends",
                                         needed_for="tracking.backends=[wandb]",
                                         otherwise="remove wandb from tracking.backends") from None
        self.wandb = wandb
        project, experiment = project_and_experiment(cfg)
        self.project = os.environ.get("WANDB_PROJECT") or project
        self.experiment = os.environ.get("WANDB_NAME") or experiment
        self.run_dir = run_dir
        self.run: Any = None

    def start(self, info: dict[str, Any]) -> None:
        # wandb writes its files under dir/wandb; keep them inside the run directory. The run id is stored in
        # tracking.json: a resumed chattune run continues the same W&B run (resume="allow").
        run_id = (tracking_entry(self.run_dir, "wandb").get("id") if self.resume_step is not None else None) or new_run_id()
        remember(self.run_dir, "wandb", {"id": run_id, "project": self.project})
        self.run = self.wandb.init(project=self.project, name=self.experiment, config=info, dir=str(self.run_dir.root),
                                   id=run_id, resume="allow")

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        if self.run is not None and scalars:
            self.run.log(scalars, step=step)

    def log_predictions(self, rows: list[dict], epoch: int, step: int) -> None:
        if self.run is not None and rows:
            table = self.wandb.Table(columns=["epoch", "question", "answer", "ground truth"],
                                     data=[[r["epoch"], r["question"], r["answer"], r["reference"]] for r in rows])
            self.run.log({PREDICTION_KEY: table}, step=step)

    def finish(self, ok: bool = True) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if ok else 1)
            self.run = None
