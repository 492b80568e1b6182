"""SwanLab tracker: local dashboard by default (no account, no network), or the SwanLab cloud."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from chattune.config import RunConfig
from chattune.errors import ConfigError, MissingDependencyError, extra_pip, require
from chattune.files import read_jsonl
from chattune.rundir import RunDir
from chattune.track.base import (PREDICTION_KEY, Tracker, new_run_id, prediction_caption, prediction_text,
                                 project_and_experiment, remember, tracking_entry)

log = logging.getLogger("chattune")

# Our mode names -> swanlab's ("cloud" is what the SwanLab docs call it; the SDK says "online").
MODES = {"local": "local", "cloud": "online", "offline": "offline", "disabled": "disabled"}
_WITH_DASHBOARD = "SwanLab with its local dashboard"


def default_logdir(cfg: RunConfig) -> Path:
    """Where local/offline logs go: tracking.swanlab.logdir, else <output_dir>/../swanlog."""
    s = cfg.tracking.swanlab
    return Path(s.logdir).resolve() if s.logdir else Path(cfg.output_dir).resolve().parent / "swanlog"


class SwanlabTracker(Tracker):
    """Logs config, train/eval scalars and a "Prediction" text panel to one SwanLab experiment."""

    name = "swanlab"

    def __init__(self, cfg: RunConfig, run_dir: RunDir):
        self.mode = cfg.tracking.swanlab.mode
        self.project, self.experiment = project_and_experiment(cfg)
        self.logdir = default_logdir(cfg)
        self.run_dir = run_dir
        self.swanlab = _import_swanlab(self.mode)
        self.run: Any = None
        self._id: str | None = None

    def start(self, info: dict[str, Any]) -> None:
        sl = self.swanlab
        extra: dict[str, Any] = {}
        if self.mode != "cloud":
            # A SWANLAB_WEBHOOK in the environment would be the only network call left in local mode.
            extra["integration"] = {"webhook": {"url": ""}}
        # interactive=False: never stop a training job at a login prompt.
        settings = sl.Settings(mode=MODES[self.mode], log_dir=self.logdir, interactive=False, **extra)
        # The API key stays with SwanLab (environment or its own login file): never in config or info.
        # swanlab.init installs its own SIGINT handler, which closes the run on Ctrl-C before chattune has
        # saved the adapter; ours (finish this step, save, then finish the run) stays in charge.
        main_thread = threading.current_thread() is threading.main_thread()
        ours = signal.getsignal(signal.SIGINT) if main_thread else None
        self.run = sl.init(reinit=True, project=self.project, name=self.experiment, config=info, settings=settings,
                           description=f"chattune run {self.run_dir.root}", **self._continue_experiment())
        if main_thread and ours is not None:
            signal.signal(signal.SIGINT, ours)
        if self.mode != "disabled":
            remember(self.run_dir, "swanlab", {
                "mode": self.mode, "logdir": str(self.logdir), "project": self.project, "experiment": self.run.name,
                "swanlab_run_dir": str(self.run.dir), "id": str(getattr(self.run, "id", "") or self._id or "")})
        if self.mode == "local" and self.resume_step is not None:
            self._replay()

    def _continue_experiment(self) -> dict[str, Any]:
        """init() arguments that make a resumed run continue its experiment rather than start a second one.

        Cloud and offline (synced later): the same run id with resume="allow". Local mode (swanlab 0.10.3) has no
        resume and would add an experiment named NAME-1 beside the killed one, still "running": the killed
        experiment is removed from the dashboard instead, and _replay() logs the kept history (metrics.jsonl
        up to the checkpoint, the probe answers of finished epochs) into the new one, so one experiment under
        the same name shows the whole curve.
        """
        previous = tracking_entry(self.run_dir, "swanlab") if self.resume_step is not None else {}
        if self.mode in ("cloud", "offline"):
            self._id = previous.get("id") or new_run_id()
            return {"id": self._id, "resume": "allow"}
        if self.mode == "local" and previous.get("swanlab_run_dir"):
            _forget_experiment(self.logdir, Path(previous["swanlab_run_dir"]).name)
        return {}

    def _replay(self) -> None:
        for row in read_jsonl(self.run_dir.metrics):
            self.log_row(row, int(row.get("step", 0)))
        for path in sorted(self.run_dir.predictions.glob("epoch_*.jsonl")):
            rows = read_jsonl(path)
            if rows:
                self.log_predictions(rows, int(rows[0].get("epoch", 0)), int(rows[0].get("step", 0)))

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        if self.run is not None and scalars:
            self.run.log(scalars, step=step)

    def log_predictions(self, rows: list[dict], epoch: int, step: int) -> None:
        if self.run is not None and rows:
            texts = [self.swanlab.Text(prediction_text(r), caption=prediction_caption(r, i)) for i, r in enumerate(rows)]
            self.run.log({PREDICTION_KEY: texts}, step=step)

    def finish(self, ok: bool = True) -> None:
        if self.run is not None:
            self.run.finish(state="success" if ok else "crashed", error=None if ok else "training failed")
            self.run = None


def _import_swanlab(mode: str) -> Any:
    """The swanlab module, after checking what the chosen mode needs (package, dashboard, credentials)."""
    try:
        import swanlab
    except ImportError:
        raise MissingDependencyError("swanlab", pip=extra_pip("swanlab"), note=_WITH_DASHBOARD, where="tracking.backends",
                                     needed_for="tracking.backends=[swanlab]",
                                     otherwise="set tracking.backends=[none]") from None
    if mode == "local":
        require("swanboard", extra="swanlab", note=_WITH_DASHBOARD, where="tracking.swanlab.mode",
                needed_for="tracking.swanlab.mode=local (the SwanLab dashboard)",
                otherwise="set tracking.swanlab.mode=offline")
    if mode == "cloud" and not swanlab.Settings().api_key:
        raise ConfigError("tracking.swanlab.mode=cloud needs a SwanLab API key, and none was found",
                          where="tracking.swanlab.mode",
                          fix="export SWANLAB_API_KEY=... or run `swanlab login` once; or use tracking.swanlab.mode=local")
    return swanlab


def _forget_experiment(logdir: Path, swanlog_run: str) -> None:
    """Remove a killed run's experiment (and its log folder) from the local SwanLab dashboard."""
    try:
        from swanboard.db import connect
        from swanboard.db.models import Experiment

        os.environ["SWANLAB_LOG_DIR"] = str(logdir)  # where swanboard keeps its database, as swanlab.init sets it
        connect(autocreate=True, path=str(logdir))
        Experiment.purely_delete(swanlog_run)
    except Exception as exc:  # a dashboard that cannot be cleaned must not stop training
        log.warning("swanlab: could not remove the killed run's experiment %s from the dashboard (%s); the "
                    "resumed run appears beside it", swanlog_run, exc)
