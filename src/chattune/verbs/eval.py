"""`chattune eval RUN_DIR`: generation metrics and/or multiple-choice accuracy, for the tuned (and base) model.

Writes RUN_DIR/eval/<name>.json (metrics, settings, model, data sha256) and
RUN_DIR/eval/<name>.predictions.jsonl (every row's answers), and prints a table.
The base model is the same loaded model with its adapter switched off, so
comparing costs no second load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

from chattune.config import RunConfig
from chattune.errors import ConfigError, DataError
from chattune.evaluate import answers as gen
from chattune.evaluate import mcq as mc
from chattune.evaluate.metrics import KEYS, check_installed, parse_metrics
from chattune.files import write_json
from chattune.options import EVAL
from chattune.rundir import RunDir

log = logging.getLogger("chattune")

LABELS = {"bleu-4": "BLEU-4", "rouge-1": "ROUGE-1", "rouge-2": "ROUGE-2", "rouge-l": "ROUGE-L",
          "exact": "exact match", "answer_chars": "answer length (chars)"}


def run(run_dir: str | Path, *, data: str | None = EVAL.data, mcq: str | None = EVAL.mcq, metrics: str = EVAL.metrics,
        compare_base: bool = EVAL.compare_base, limit: int | None = EVAL.limit, batch_size: int = EVAL.batch_size,
        max_new_tokens: int = EVAL.max_new_tokens, shots: int = EVAL.shots, name: str | None = EVAL.name) -> list[Path]:
    """Score a run on a data file (generation metrics) and/or a multiple-choice file; returns the result files."""
    check_options(data=data, mcq=mcq, limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens, shots=shots,
                  name=name)
    rd = RunDir(Path(run_dir))
    cfg = rd.load_config()
    rd.require_adapter()
    # Read and check every input before the slow model load.
    jobs: list[Job] = []
    if data:
        jobs.append(generation_job(data, cfg, metrics=parse_metrics(metrics), limit=limit, name=name,
                                   batch_size=batch_size, max_new_tokens=max_new_tokens))
    if mcq:
        mcq_name = name or Path(mcq).stem
        if jobs and jobs[0].name == mcq_name:
            mcq_name += "-mcq"
        jobs.append(mcq_job(mcq, cfg, shots=shots, limit=limit, name=mcq_name, batch_size=batch_size))
    trackers = {job.name: open_trackers(cfg, rd, job.name) for job in jobs}
    from chattune.infer.session import load_session

    log.info("loading %s with the adapter of %s", cfg.model.name_or_path, rd.root)
    session = load_session(rd.root)
    written = []
    for job in jobs:
        record, predictions = job.evaluate(session, variants(session, compare_base))
        record.update(common_fields(job, rd, cfg, compare_base))
        written.append(save(rd, job.name, record, predictions))
        job.show(record, predictions)
        log_to_trackers(trackers[job.name], rd, record)
        log.info("wrote %s and %s", written[-1], predictions_path(rd, job.name))
    return written


def check_options(*, data: str | None, mcq: str | None, limit: int | None, batch_size: int, max_new_tokens: int,
                  shots: int, name: str | None) -> None:
    """Reject impossible option values with the option's name."""
    if not data and not mcq:
        raise ConfigError("nothing to evaluate", where="chattune eval",
                          fix="pass --data FILE (BLEU/ROUGE/exact match) and/or --mcq FILE (multiple-choice accuracy)")
    for flag, value, low in (("--limit", limit, 1), ("--batch-size", batch_size, 1),
                             ("--max-new-tokens", max_new_tokens, 1), ("--shots", shots, 0)):
        if value is not None and value < low:
            raise ConfigError(f"must be at least {low} (got {value})", where=flag)
    if name is not None and not re.fullmatch(r"[\w.\-]+", name):
        raise ConfigError(f"{name!r} is not a plain file name", where="--name",
                          fix="use letters, digits, '.', '-' and '_' only")


def variants(session: Any, compare_base: bool) -> list[tuple[str, Callable[[], ContextManager]]]:
    """("tuned", no-op) and, when asked, ("base", the adapter switched off) as context-manager factories."""
    out: list[tuple[str, Callable[[], ContextManager]]] = [("tuned", contextlib.nullcontext)]
    if compare_base:
        out.append(("base", session.model.disable_adapter))
    return out


# ---------------------------------------------------------------------------
# jobs


@dataclass
class Job:
    """One evaluation: its result name, the input file, the settings it records, and how to run and show it."""

    kind: str
    name: str
    path: Path
    settings: dict[str, Any]
    evaluate: Callable[[Any, list], tuple[dict[str, Any], list[dict[str, Any]]]]
    show: Callable[[dict[str, Any], list[dict[str, Any]]], None]


def generation_job(path: str, cfg: RunConfig, *, metrics: list[str], limit: int | None, name: str | None,
                   batch_size: int, max_new_tokens: int) -> Job:
    """Answer every row greedily and score BLEU-4 / ROUGE / exact match against the reference answers."""
    check_installed(metrics)
    rows = gen.load_rows(path, cfg, limit=limit)
    settings = {"metrics": metrics, "limit": limit, "batch_size": batch_size, "max_new_tokens": max_new_tokens,
                "decoding": "greedy", "system": cfg.data.system}

    def evaluate(session: Any, models: list) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        answers, scores, averages, wall = {}, {}, {}, {}
        for who, ctx in models:
            started = time.perf_counter()
            with ctx():
                answers[who] = gen.answer_rows(session.model, session.renderer, rows, batch_size=batch_size,
                                               max_new_tokens=max_new_tokens, desc=f"{who}: generating")
            wall[who] = round(time.perf_counter() - started, 1)
            scores[who], averages[who] = gen.score_answers(answers[who], rows, metrics)
        record = {"kind": "generation", "rows": len(rows), "metrics": averages, "wall_s": wall}
        return record, gen.prediction_rows(rows, answers, scores)

    def show(record: dict[str, Any], predictions: list[dict[str, Any]]) -> None:
        show_generation(record, [k for m in metrics for k in KEYS[m]] + ["answer_chars"], predictions)

    return Job("generation", name or Path(path).stem, Path(path), settings, evaluate, show)


def mcq_job(path: str, cfg: RunConfig, *, shots: int, limit: int | None, name: str, batch_size: int) -> Job:
    """Multiple choice: the most likely option letter after the rendered prompt, zero- or k-shot."""
    questions = mc.load_questions(path)
    if shots >= len(questions):
        raise DataError(f"--shots {shots} uses every question of the file as an example, leaving none to score",
                        where=str(path), fix="lower --shots")
    examples, scored = questions[:shots], questions[shots:]
    scored = scored[:limit] if limit else scored
    prompts = [mc.build_messages(q, examples, cfg.data.system) for q in scored]
    letters = [list(q.options) for q in scored]
    chance = round(100 * sum(1 / len(q.options) for q in scored) / len(scored), 2)
    settings = {"shots": shots, "examples": [q.where for q in examples], "limit": limit, "batch_size": batch_size,
                "scoring": "log-likelihood of each option letter as the first answer token", "system": cfg.data.system}

    def evaluate(session: Any, models: list) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        from tqdm.auto import tqdm

        results, choices, wall = {}, {}, {}
        for who, ctx in models:
            started = time.perf_counter()
            with ctx(), tqdm(total=len(scored), desc=f"{who}: scoring", unit="q", dynamic_ncols=True) as bar:
                logprobs = mc.option_logprobs(session.model, session.renderer, prompts, letters,
                                              batch_size=batch_size, progress=bar.update)
            wall[who] = round(time.perf_counter() - started, 1)
            choices[who] = [(mc.choose(lp), lp) for lp in logprobs]
            results[who] = mc.accuracy(sum(c == q.answer for (c, _), q in zip(choices[who], scored)), len(scored))
        predictions = [
            {"where": q.where, "question": q.question, "options": q.options, "answer": q.answer,
             **{who: {"choice": choices[who][i][0], "correct": choices[who][i][0] == q.answer,
                      "logprobs": {k: round(v, 4) for k, v in choices[who][i][1].items()}} for who in choices}}
            for i, q in enumerate(scored)
        ]
        record = {"kind": "mcq", "rows": len(scored), "chance": chance, "metrics": results, "wall_s": wall}
        return record, predictions

    return Job("mcq", name, Path(path), settings, evaluate, show_mcq)


# ---------------------------------------------------------------------------
# results


def common_fields(job: Job, rd: RunDir, cfg: RunConfig, compare_base: bool) -> dict[str, Any]:
    """What every result file records besides its metrics: name, time, model, data file and hash, settings."""
    return {
        "name": job.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_dir": str(rd.root),
        "model": {"base": cfg.model.name_or_path, "adapter": str(rd.adapter), "dtype": cfg.model.dtype,
                  "quantization": cfg.model.quantization, "compared_with_base": compare_base},
        "data": {"path": str(job.path.resolve()), "sha256": sha256(job.path)},
        "settings": job.settings,
        "predictions": str(predictions_path(rd, job.name)),
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


def save(rd: RunDir, name: str, record: dict[str, Any], predictions: Sequence[dict[str, Any]]) -> Path:
    """Write the predictions (JSON lines) and the result (JSON); returns the result's path."""
    out = rd.root / "eval" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = predictions_path(rd, name).with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions), encoding="utf-8")
    tmp.replace(predictions_path(rd, name))
    write_json(out, record)
    return out


def open_trackers(cfg: RunConfig, rd: RunDir, name: str) -> list[Any]:
    """The run's trackers (tracking.backends), logging to a separate experiment '<experiment>-eval-<name>'."""
    from chattune.errors import ChattuneError
    from chattune.track import make_trackers
    from chattune.track.base import project_and_experiment

    named = cfg.model_copy(deep=True)
    named.output_dir = str(rd.root.resolve())  # the names training used, wherever eval runs from
    project, experiment = project_and_experiment(named)
    named.tracking.swanlab.project, named.tracking.swanlab.experiment = project, f"{experiment}-eval-{name}"
    try:
        return make_trackers(named, rd)
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


def log_to_trackers(trackers: Sequence[Any], rd: RunDir, record: dict[str, Any]) -> None:
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
        pointer.write_bytes(saved)
    else:
        pointer.unlink(missing_ok=True)


# ---------------------------------------------------------------------------
# terminal tables


def show_generation(record: dict[str, Any], keys: Sequence[str], predictions: Sequence[dict[str, Any]],
                    examples: int = 3) -> None:
    """A glimpse of the first answers, then the metrics table (base, tuned, difference)."""
    from rich.console import Console
    from rich.table import Table

    m = record["metrics"]
    whos = [w for w in ("base", "tuned") if w in m]
    table = Table(title=f"{record['name']}: {record['rows']} rows, greedy, at most "
                        f"{record['settings']['max_new_tokens']} new tokens (scores 0-100)")
    table.add_column("metric")
    for w in whos:
        table.add_column(f"{w} model", justify="right")
    if len(whos) == 2:
        table.add_column("tuned − base", justify="right")
    for k in keys:
        cells = [f"{m[w][k]:.2f}" if k != "answer_chars" else f"{m[w][k]:.0f}" for w in whos]
        if len(whos) == 2:
            cells.append(f"{m['tuned'][k] - m['base'][k]:+.2f}" if k != "answer_chars" else "")
        table.add_row(LABELS.get(k, k), *cells)
    table.add_row("time (s)", *[f"{record['wall_s'][w]:.0f}" for w in whos], *([""] if len(whos) == 2 else []))
    console = Console()
    glimpse = Table(title=f"the first {min(examples, len(predictions))} answers (all in {record['predictions']})",
                    show_lines=True)
    for col in ("question", *(f"{w} model" for w in whos), "reference"):
        glimpse.add_column(col, overflow="fold", ratio=1)
    for p in predictions[:examples]:
        glimpse.add_row(*(_clip(p[k]) for k in ("question", *whos, "reference")))
    console.print(glimpse)
    console.print(table)


def _clip(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def show_mcq(record: dict[str, Any], predictions: Sequence[dict[str, Any]] = ()) -> None:
    """Accuracy with its 95 % interval for each model."""
    from rich.console import Console
    from rich.table import Table

    s = record["settings"]
    table = Table(title=f"{record['name']}: {record['rows']} questions, {s['shots']}-shot, "
                        f"chance {record['chance']:.1f}%")
    for col in ("model", "accuracy", "95% interval (Wilson)", "correct", "time (s)"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for who in ("base", "tuned"):
        r = record["metrics"].get(who)
        if r:
            lo, hi = r["ci95"]
            table.add_row(f"{who} model", f"{r['accuracy']:.1f}%", f"{lo:.1f}% – {hi:.1f}%",
                          f"{r['correct']}/{r['n']}", f"{record['wall_s'][who]:.0f}")
    Console().print(table)
