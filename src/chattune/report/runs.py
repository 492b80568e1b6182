"""A run directory read back from its files only (run_config.yaml, metrics.jsonl, summary.json, ...).

Reports and sweeps depend on the run-directory contract, not on how training or
evaluation produced it, so a run from an older or newer chattune still reads.
Missing files are fine: an unfinished or failed run shows what it has.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from chattune.errors import RunDirError


@dataclass
class RunData:
    """Everything a report shows about one run."""

    root: Path
    name: str
    config: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    model_info: dict[str, Any] = field(default_factory=dict)
    data_report: dict[str, Any] = field(default_factory=dict)
    predictions: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        """Training wrote summary.json, its last file."""
        return bool(self.summary)

    @property
    def train_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.metrics if r.get("loss") is not None]

    @property
    def eval_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.metrics if r.get("eval_loss") is not None]

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) of one metrics.jsonl key, rows without it skipped."""
        rows = [r for r in self.metrics if isinstance(r.get(key), (int, float)) and r.get("step") is not None]
        return [r["step"] for r in rows], [float(r[key]) for r in rows]

    def get(self, dotted: str, default: Any = None) -> Any:
        """A config value by its key path, e.g. lora.r."""
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node


def load_run(path: str | Path, name: str | None = None) -> RunData:
    """Read one run directory; RunDirError when it is not one."""
    root = Path(path)
    cfg_file = root / "run_config.yaml"
    if not cfg_file.is_file():
        raise RunDirError("not a chattune run directory (no run_config.yaml)", where=str(root),
                          fix="pass the output_dir of a `chattune train` run, or a folder holding such runs")
    try:
        config = yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise RunDirError(f"run_config.yaml is not valid YAML ({exc})", where=str(cfg_file)) from None
    predictions = {}
    for p in sorted((root / "predictions").glob("epoch_*.jsonl")):
        try:
            predictions[int(p.stem.split("_", 1)[1])] = _jsonl(p)
        except ValueError:
            continue
    evals = {p.stem: _json(p) for p in sorted((root / "eval").glob("*.json"))}
    return RunData(root=root, name=name or root.name, config=config, metrics=_jsonl(root / "metrics.jsonl"),
                   summary=_json(root / "summary.json"), model_info=_json(root / "model_info.json"),
                   data_report=_json(root / "data_report.json"), predictions=dict(sorted(predictions.items())),
                   evals={k: v for k, v in evals.items() if v})


def expand_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories from the arguments: a run itself, or a folder holding runs (a sweep's output_dir)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / "run_config.yaml").is_file():
            found.append(p)
            continue
        inner = _ordered_children(p)
        if not inner:
            raise RunDirError("neither a run directory nor a folder holding runs (no run_config.yaml found)",
                              where=str(p), fix="pass a run's output_dir (e.g. runs/demo) or a sweep's output_dir")
        found += inner
    return found


def load_runs(paths: Iterable[str | Path]) -> list[RunData]:
    """Load several runs; names are folder names, made unique with their parent folder when they clash."""
    dirs = expand_run_dirs(paths)
    names = [d.name for d in dirs]
    return [load_run(d, name=f"{d.parent.name}/{d.name}" if names.count(d.name) > 1 else d.name) for d in dirs]


def _ordered_children(folder: Path) -> list[Path]:
    """Runs inside a folder: in the sweep's order when it has a sweep.json, else by name."""
    if not folder.is_dir():
        return []
    runs = [c for c in sorted(folder.iterdir()) if (c / "run_config.yaml").is_file()]
    order = [r.get("name") for r in _json(folder / "sweep.json").get("runs", [])]
    return sorted(runs, key=lambda c: order.index(c.name) if c.name in order else len(order))


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a run killed mid-write leaves a partial last line
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}
