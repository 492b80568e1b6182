"""TensorBoard tracker: event files in RUN_DIR/tensorboard (`tensorboard --logdir runs` shows every run)."""

from __future__ import annotations

import json
from typing import Any

import yaml

from chattune.config import RunConfig
from chattune.errors import MissingDependencyError, extra_pip
from chattune.rundir import RunDir
from chattune.track.base import PREDICTION_KEY, Tracker, prediction_caption, prediction_text


class TensorboardTracker(Tracker):
    """Scalars under the same train/... and eval/... names; config and probe answers as text."""

    name = "tensorboard"

    def __init__(self, cfg: RunConfig, run_dir: RunDir):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise MissingDependencyError("tensorboard", pip=extra_pip("tensorboard"), where="tracking.backends",
                                         needed_for="tracking.backends=[tensorboard]",
                                         otherwise="remove tensorboard from tracking.backends") from None
        self.logdir = run_dir.root / "tensorboard"
        self._writer_cls = SummaryWriter
        self.writer: Any = None

    def start(self, info: dict[str, Any]) -> None:
        # Resumed: the same folder, with the events logged after the checkpoint (by the killed part) hidden, so
        # TensorBoard draws one curve: purge_step hides every event at a step >= it.
        purge = None if self.resume_step is None else self.resume_step + 1
        self.writer = self._writer_cls(log_dir=str(self.logdir), purge_step=purge)
        if purge is not None:
            return  # the config is already in the folder
        # Four spaces make markdown show the YAML as a code block.
        text = yaml.safe_dump(json.loads(json.dumps(info, default=str)), sort_keys=False, allow_unicode=True)
        self.writer.add_text("config", "    " + text.replace("\n", "\n    "), 0)

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def log_predictions(self, rows: list[dict], epoch: int, step: int) -> None:
        blocks = [f"**{prediction_caption(r, i)}**\n\n" + prediction_text(r).replace("\n", "  \n")
                  for i, r in enumerate(rows)]
        self.writer.add_text(PREDICTION_KEY, "\n\n---\n\n".join(blocks), step)

    def finish(self, ok: bool = True) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
