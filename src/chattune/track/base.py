"""What every tracker receives (run info, train/eval scalars, probe answers) and the callback that drives them."""

from __future__ import annotations

import json
import os
import platform
import uuid
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable, Sequence

from transformers import TrainerCallback

from chattune.config import RunConfig
from chattune.files import write_json
from chattune.rundir import RunDir

# ProgressAndMetrics row keys -> the chart names the seed tutorials (HF SwanLabCallback) show.
TRAIN_KEYS = {
    "loss": "train/loss",
    "grad_norm": "train/grad_norm",
    "learning_rate": "train/learning_rate",
    "epoch": "train/epoch",
    "tokens_per_s": "train/tokens_per_s",
    "mfu": "train/mfu",  # these two on a GPU only (train/throughput.py: gpu_stats)
    "peak_mem_gib": "train/peak_mem_gib",
}
PREDICTION_KEY = "Prediction"


class Tracker:
    """One experiment tracker. Subclasses write to one backend; the sinks have the callbacks' signatures."""

    name = "tracker"
    # The checkpoint step a resumed run continues from (make_trackers sets it); None for a fresh run.
    resume_step: int | None = None

    def start(self, info: dict[str, Any]) -> None:
        """Open the run with the resolved config, model, data and system information."""

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        """Record named scalars (train/..., eval/...) at an optimizer step."""

    def log_predictions(self, rows: list[dict], epoch: int, step: int) -> None:
        """Record the probe answers of one epoch (0 = the base model before training)."""

    def finish(self, ok: bool = True) -> None:
        """Close the run (ok=False marks it as crashed where the backend knows that)."""

    def log_row(self, row: dict, step: int) -> None:
        """ProgressAndMetrics sink: one metrics.jsonl row -> train/... (training step) or eval/... scalars."""
        scalars = train_scalars(row) if row.get("loss") is not None else {}
        self.log_scalars({**scalars, **eval_scalars(row)}, step)


def train_scalars(row: dict) -> dict[str, float]:
    """A metrics.jsonl row as train/... scalars (missing values left out)."""
    return {name: float(row[key]) for key, name in TRAIN_KEYS.items() if row.get(key) is not None}


def eval_scalars(logs: dict) -> dict[str, float]:
    """The eval_* numbers of a Trainer log as eval/... scalars."""
    return {f"eval/{k[len('eval_'):]}": float(v) for k, v in logs.items()
            if k.startswith("eval_") and isinstance(v, (int, float)) and not isinstance(v, bool)}


def prediction_text(row: dict) -> str:
    """One probe answer as the text a tracker shows: question, answer, ground truth."""
    return f"question: {row['question']}\nanswer: {row['answer']}\nground truth: {row['reference']}"


def prediction_caption(row: dict, index: int) -> str:
    """Short label of a probe answer: whose answer it is and which probe."""
    who = "base model" if row["epoch"] == 0 else f"epoch {row['epoch']}"
    return f"{who} · probe {index + 1}"


def project_and_experiment(cfg: RunConfig) -> tuple[str, str]:
    """Tracker names: tracking.swanlab.project/experiment, else the output folder's parent and own name."""
    root = Path(cfg.output_dir).resolve()
    s = cfg.tracking.swanlab
    return s.project or root.parent.name or "chattune", s.experiment or root.name


def run_info(cfg: RunConfig, run_dir: RunDir) -> dict[str, Any]:
    """What a tracker records at the start: resolved config, model and data facts, system information."""
    root = run_dir.root
    return {
        **cfg.model_dump(mode="json"),
        "model_info": _read_json(root / "model_info.json"),
        "data_stats": _data_stats(_read_json(root / "data_report.json")),
        "system": system_info(),
    }


def system_info() -> dict[str, Any]:
    """Python, library versions and the hardware training runs on."""
    import peft
    import torch
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "chattune": version("chattune"),
        "torch": str(torch.__version__),
        "transformers": str(transformers.__version__),
        "peft": str(peft.__version__),
        "cpu_count": os.cpu_count(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def tracking_entry(run_dir: RunDir, name: str) -> dict[str, Any]:
    """What RUN/tracking.json remembers about one tracker (ids, log folders), {} when nothing."""
    entry = _read_json(run_dir.root / "tracking.json").get(name)
    return entry if isinstance(entry, dict) else {}


def remember(run_dir: RunDir, name: str, entry: dict[str, Any]) -> None:
    """Store one tracker's entry in RUN/tracking.json (a resumed run continues the same experiment from it;
    `chattune dashboard RUN` finds the SwanLab logs there)."""
    path = run_dir.root / "tracking.json"
    data = _read_json(path)
    data[name] = entry
    write_json(path, data)


def new_run_id() -> str:
    """An id for a tracker's run, stored so that a resumed run continues it."""
    return uuid.uuid4().hex[:21]


def _data_stats(report: dict[str, Any]) -> dict[str, Any]:
    return {"files": report.get("files", {}), "skipped": len(report.get("skipped", [])), **report.get("render", {})}


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


class TrackingCallback(TrainerCallback):
    """Starts the trackers when training starts and finishes them when it ends.

    Add it before PredictionProbes so the run is open when the base model's answers arrive.
    Scalars and probe answers reach the trackers through the other callbacks' sinks.
    """

    def __init__(self, trackers: Sequence[Tracker], info: Callable[[], dict[str, Any]]):
        self.trackers = list(trackers)
        self.info = info

    def on_train_begin(self, args, state, control, **kw):
        if self.trackers and state.is_world_process_zero:
            info = self.info()
            for t in self.trackers:
                t.start(info)

    def on_train_end(self, args, state, control, **kw):
        for t in self.trackers:
            t.finish(ok=True)
