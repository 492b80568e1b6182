"""Where `chattune eval` puts its results: RUN_DIR/eval/<name>.json (metrics, settings, model, data sha256),
RUN_DIR/eval/<name>.predictions.jsonl (every row's answers), and the run's trackers.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from chattune import track
from chattune.config import RunConfig
from chattune.errors import ChattuneError
from chattune.evaluate.tasks import EvalTask
from chattune.files import write_bytes, write_json, write_jsonl
from chattune.rundir import RunDir
from chattune.track.base import Tracker, project_and_experiment

log = logging.getLogger("chattune")


def common_fields(task: EvalTask, rd: RunDir, cfg: RunConfig, compare_base: bool) -> dict[str, Any]:
    """What every result file records besides its metrics: name, time, model, data file and hash, settings."""
    return {
        "name": task.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_dir": str(rd.root),
        "model": {"base": cfg.model.name_or_path, "adapter": str(rd.adapter), "dtype": cfg.model.dtype,
                  "quantization": cfg.model.quantization, "compared_with_base": compare_base},
        "data": {"path": str(task.path.resolve()), "sha256": sha256(task.path)},
        "settings": task.settings,
        "predictions": str(predictions_path(rd, task.name)),
    }


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (which data was scored, beyond its name)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def predictions_path(rd: RunDir, name: str) -> Path:
    """RUN_DIR/eval/<name>.predictions.jsonl"""
    return rd.root / "eval" / f"{name}.predictions.jsonl"


def result_path(rd: RunDir, name: str) -> Path:
    """RUN_DIR/eval/<name>.json"""
    return rd.root / "eval" / f"{name}.json"


def save(rd: RunDir, name: str, record: dict[str, Any], predictions: Sequence[dict[str, Any]]) -> Path:
    """Write the predictions (JSON lines) and the result (JSON); returns the result's path."""
    out = result_path(rd, name)
    write_jsonl(predictions_path(rd, name), predictions)
    write_json(out, record)
    return out


def open_trackers(cfg: RunConfig, rd: RunDir, name: str) -> list[Tracker]:
    """The run's trackers (tracking.backends), logging to a separate experiment '<experiment>-eval-<name>'."""
    named = cfg.model_copy(deep=True)
    named.output_dir = str(rd.root.resolve())  # the names training used, wherever eval runs from
    project, experiment = project_and_experiment(named)
    named.tracking.swanlab.project, named.tracking.swanlab.experiment = project, f"{experiment}-eval-{name}"
    try:
        return track.make_trackers(named, rd)
    except ChattuneError as exc:
        # The result file is what counts; a tracker that cannot start must not cost the evaluation.
        log.warning("results go to %s/eval/ only, not to the trackers: %s", rd.root, exc.render())
        return []


def tracker_scalars(record: dict[str, Any]) -> dict[str, float]:
    """eval/<name>/<model>/<metric> numbers of a result (accuracy and its interval for multiple choice)."""
    out = {}
    for who, values in record["metrics"].items():
        for k, v in values.items():
            if k == "ci95":
                out[f"eval/{record['name']}/{who}/ci95_low"], out[f"eval/{record['name']}/{who}/ci95_high"] = v
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"eval/{record['name']}/{who}/{k}"] = float(v)
    return out


def log_to_trackers(trackers: Sequence[Tracker], rd: RunDir, record: dict[str, Any]) -> None:
    """Send the result's numbers to each tracker, at the run's last training step."""
    if not trackers:
        return
    summary = json.loads(rd.summary.read_text(encoding="utf-8")) if rd.summary.is_file() else {}
    info = {k: record[k] for k in ("name", "kind", "rows", "model", "data", "settings", "run_dir")}
    # A tracker's start records where its logs are in RUN_DIR/tracking.json; that must keep pointing at training.
    pointer = rd.root / "tracking.json"
    saved = pointer.read_bytes() if pointer.is_file() else None
    for t in trackers:
        try:
            t.start(info)
            t.log_scalars(tracker_scalars(record), int(summary.get("global_step") or 0))
            t.finish(ok=True)
        except Exception as exc:  # a tracker's own failure (network, disk) must not lose the computed result
            log.warning("could not log the result to %s: %s", getattr(t, "name", t), exc)
    if saved is not None:
        write_bytes(pointer, saved)
    else:
        pointer.unlink(missing_ok=True)
