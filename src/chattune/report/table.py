"""Several runs side by side: one row per run, as Markdown and CSV."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any, Sequence

from chattune.files import atomic_path
from chattune.report.runs import RunData

# Config keys that differ between runs of one sweep by construction, not by choice.
_ALWAYS_DIFFERENT = {"output_dir", "tracking.swanlab.experiment", "sweep.grid"}
# eval/<name>.json numbers that are not scores.
_NOT_SCORES = {"answer_chars", "n", "correct", "ci95"}


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'lora': {'r': 8}} -> {'lora.r': 8}."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def varying_keys(runs: Sequence[RunData]) -> list[str]:
    """Config keys whose values differ between the runs, in config order."""
    flats = [flat_config(r.config) for r in runs]
    keys = list(dict.fromkeys(k for f in flats for k in f))
    return [k for k in keys if k not in _ALWAYS_DIFFERENT and len({repr(f.get(k)) for f in flats}) > 1]


def eval_scores(run: RunData) -> dict[str, float]:
    """The tuned model's scores from eval/<name>.json, as '<name> <metric>' (e.g. 'legal rouge-l', 'mcq accuracy')."""
    out: dict[str, float] = {}
    for name, record in run.evals.items():
        tuned = (record.get("metrics") or {}).get("tuned") or {}
        for metric, value in tuned.items():
            if metric not in _NOT_SCORES and isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{name} {metric}"] = float(value)
    return out


def comparison_rows(runs: Sequence[RunData], *, keys: Sequence[str] | None = None,
                    status: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One dict per run, columns in display order: name, status, the varying config keys, losses, evals, speed, size."""
    keys = list(keys) if keys is not None else varying_keys(runs)
    status = status or {}
    score_names = list(dict.fromkeys(k for r in runs for k in eval_scores(r)))
    rows = []
    for r in runs:
        losses = [float(x["loss"]) for x in r.train_rows]
        evals = [float(x["eval_loss"]) for x in r.eval_rows]
        speeds = [float(x["tokens_per_s"]) for x in r.train_rows if isinstance(x.get("tokens_per_s"), (int, float))]
        scores = eval_scores(r)
        row: dict[str, Any] = {"run": r.name, "status": status.get(r.name) or ("finished" if r.finished else "unfinished")}
        row.update({k: r.get(k) for k in keys})
        row.update({
            "steps": r.summary.get("global_step") or (r.train_rows[-1]["step"] if r.train_rows else None),
            "final train loss": losses[-1] if losses else None,
            "best train loss": min(losses) if losses else None,
            "final eval loss": evals[-1] if evals else r.summary.get("eval_loss"),
            "best eval loss": min(evals) if evals else None,
        })
        row.update({name: scores.get(name) for name in score_names})
        row.update({
            # The median skips the slow first steps (warm-up, compilation) without hiding a real slowdown.
            "tokens/s": statistics.median(speeds) if speeds else None,
            "wall time (s)": r.summary.get("wall_s"),
            "trainable params": r.model_info.get("trainable_params") or r.summary.get("trainable_params"),
            "total params": r.model_info.get("total_params") or r.summary.get("total_params"),
        })
        rows.append(row)
    return rows


def fmt(value: Any, column: str = "") -> str:
    """A table cell: losses to 4 decimals, counts with thousands separators, empty for missing."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}" if "params" in column else str(value)
    if isinstance(value, float):
        if "loss" in column:
            return f"{value:.4f}"
        if column in ("tokens/s", "wall time (s)"):
            return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"
        return f"{value:.4g}" if abs(value) < 1e-3 else f"{value:.2f}"
    if isinstance(value, (list, dict)):
        return str(value)
    return str(value)


def shown_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Columns worth showing: those with a value in some row (no eval columns for runs without eval data)."""
    if not rows:
        return []
    return [c for c in rows[0] if c in ("run", "status") or any(r.get(c) is not None for r in rows)]


def to_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """A GitHub-flavoured Markdown table of the columns that have values."""
    if not rows:
        return ""
    cols = shown_columns(rows)
    numeric = {c for c in cols if any(isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool) for r in rows)}
    lines = ["| " + " | ".join(cols) + " |",
             "| " + " | ".join("---:" if c in numeric else "---" for c in cols) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c), c).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines) + "\n"


def csv_value(value: Any) -> Any:
    """A CSV cell: missing is empty; a float that arithmetic left a few units in the last place off a short
    decimal (178.39999999999998, a sum of binary fractions) is written as that decimal (178.4); any other float
    as Python's shortest exact text, so measured values (losses) read back unchanged."""
    if value is None:
        return ""
    if isinstance(value, float) and math.isfinite(value) and value != 0:
        short = float(f"{value:.12g}")
        return repr(short) if abs(short - value) <= 4 * math.ulp(value) else repr(value)
    return value


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """The same table as CSV, with unrounded numbers (without float noise)."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8", newline="") as f:  # csv writes its own \r\n
        if rows:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows({k: csv_value(v) for k, v in r.items()} for r in rows)
    return path
